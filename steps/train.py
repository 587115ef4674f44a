"""train: a LoRA adapter (QLoRA on CUDA) with trl: SFT on the curated train split, DPO on its preference pairs.

    python -m steps.train --mode retail_media data/validation/retail_media/report.json \
        data/curated/retail_media data/adapters/retail_media

Loss is on every assistant turn and the end-of-turn token closing it (the model learns to stop), found by
locating each turn in the rendered chat template, so any template works without {% generation %} markers;
`train.assistant_only_loss: false` trains on all tokens. Padding-free batches by default (no pad tokens are
computed; attention stays within each example). Checkpoints every `train.save_steps`; a re-run with the same
params and data resumes from the last one and ends at the same step count. Same seed and data on CPU give the
same adapter, bit for bit. Writes the adapter (safetensors), tokenizer + chat template, loss.png and
train_info.json, whole; each stage (sft, dpo) is its own MLflow run. `train.warm_start: champion` continues the
registry champion's adapter on the records it has not trained on plus a replay sample (loraflow/warm_start.py);
train_info.json's `started_from` says what the run started from and why, and trained_ids.json lists every record
the adapter has learned from.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from loraflow import generation, tracking, training, warm_start
from loraflow.config import Params
from loraflow.errors import ValidationFailed
from loraflow.io import atomic_dir, read_json, read_jsonl, sha256_file, write_json
from loraflow.stepcli import run_step
from loraflow.train_plan import choose_hardware, choose_stages
from loraflow.trainer import StageSetup, peak_memory_mb, train_stages

log = logging.getLogger(__name__)


def run(params: Params, mode: str, validation_report: Path, curated_dir: Path, adapter_dir: Path) -> dict[str, Any]:
    """Train one adapter: SFT on train.jsonl, DPO on prefs.jsonl, or SFT then DPO (`train.method`; `auto`: SFT,
    then DPO when prefs.jsonl holds at least `train.dpo_min_pairs` pairs).

    Args:
        params: reads `base` and `train`.
        mode: names the MLflow experiment (loraflow-<mode>).
        validation_report: validate's report.json; training refuses data that did not pass.
        curated_dir: folder with train.jsonl and prefs.jsonl (curate's output).
        adapter_dir: gets adapter_model.safetensors, adapter_config.json, tokenizer files, loss.png and
            train_info.json, whole or not at all.

    Each stage is its own MLflow run. Checkpoints go to `<train.checkpoint_dir>/<mode>/<stage>-<key>`, where
    the key hashes what decides the weights; re-running after a crash resumes from the newest complete one.

    Returns:
        train_info (also written to adapter_dir/train_info.json), including the MLflow run id(s).
    """
    import torch

    from loraflow.models import load_tokenizer, resolve, template_sha256

    tp = params.train
    curated_dir, adapter_dir = Path(curated_dir), Path(adapter_dir)
    data = {"sft": curated_dir / "train.jsonl", "dpo": curated_dir / "prefs.jsonl"}
    pairs = len(read_jsonl(data["dpo"])) if tp.method == "auto" and data["dpo"].exists() else 0
    stages, stages_why = choose_stages(tp.method, pairs, tp.dpo_min_pairs)
    log.info("train: %s", stages_why)
    _check_validated(Path(validation_report), [data[s] for s in stages])
    records = {s: read_jsonl(data[s]) for s in stages}
    for s in stages:
        if not records[s]:
            raise ValidationFailed(f"{data[s]}: no records to train {s} on (train.method={tp.method})")
    hw = choose_hardware(tp)

    model_path = resolve(params.base.model, params.base.model_cache)
    tok = load_tokenizer(model_path, params.base.trust_remote_code)
    # Under torchrun / accelerate launch every rank trains its share of each batch; only rank 0 writes the
    # outputs and talks to MLflow, the others wait for it.
    rank, world = training.process()
    experiment_id = tracking.setup(params, mode) if rank == 0 else ""
    tags = {"data_sha256": {s: sha256_file(data[s]) for s in stages}, **tracking.dvc_hashes(adapter_dir, mode)}
    mlflow_training = training.MlflowTraining(params, mode, experiment_id, tags) if rank == 0 else None
    setup = StageSetup(params, mode, tok, model_path, hw, main=rank == 0)
    if hw.cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="loraflow-champion-") as champion_tmp:
        # train.warm_start: continue the champion on what it has not learned (+ a replay sample), or from scratch
        start = warm_start.resolve(params, mode, records, Path(champion_tmp))
        if start.kind == "champion":  # a stage with nothing new keeps what the champion learned
            skipped = [s for s in stages if not start.new[s]]
            stages = [s for s in stages if start.new[s]]
            if skipped:
                start.reason += f"; {', '.join(skipped)} skipped: nothing new"
        log.info("train: %s", start.reason)
        t0 = time.time()
        start_key = warm_start.selection_sha256(start, stages[0]) if start.kind == "champion" else ""
        results = train_stages(setup, stages, {s: start.records[s] for s in stages}, tags["data_sha256"],
                               mlflow_training, start.adapter_dir, start_key)
        wall = time.time() - t0

    last = results[-1]
    info = {
        "mode": mode,
        "method": tp.method,
        "method_reason": stages_why,
        "base_model": params.base.model,
        "quantization": "4bit-nf4" if hw.use_4bit else "none",
        "quantization_reason": hw.quantization_reason,
        "precision": "bf16" if hw.bf16 else "fp32",
        "precision_reason": hw.precision_reason,
        "hardware": torch.cuda.get_device_name(0) if hw.cuda else f"cpu x{os.cpu_count()}",
        "world_size": world,  # processes that trained (DDP); tokens_seen counts all of them
        "steps": last["steps"],
        "epochs": last["epochs"],
        "started_from": start.info(),  # the champion's adapter (warm start) or the base model, and why
        "train_records": len(start.records["sft"]) if "sft" in stages else 0,  # what this run trained on
        "pref_records": len(start.records["dpo"]) if "dpo" in stages else 0,
        "tokens_seen": sum(r["tokens_seen"] for r in results),
        "wall_seconds": round(wall, 2),
        # over what this process trained: a resumed stage only ran the steps after its checkpoint
        "tokens_per_second": round(sum(r["tokens_this_run"] for r in results) / max(sum(r["train_seconds"] for r in results), 1e-9), 1),
        "peak_memory_mb": peak_memory_mb(hw.cuda),
        "final_loss": last["final_loss"],
        "train_loss": last["train_loss"],
        "resumed_from_step": {r["stage"]: r["resumed_from_step"] for r in results},
        "loss_mask": "assistant turns + end-of-turn token" if tp.assistant_only_loss else "all tokens",
        "padding_free": tp.padding_free or tp.packing,
        "packing": tp.packing,
        "batching": results[0]["batching"],
        "truncated_records": sum(r["truncated"] for r in results),
        "trainable_parameters": last["trainable"],
        "total_parameters": last["total"],
        "train_data_sha256": tags["data_sha256"].get("sft", ""),
        "prefs_data_sha256": tags["data_sha256"].get("dpo", ""),
        "dvc_curated_md5": tags.get("dvc.curated_md5"),
        "chat_template_sha256": template_sha256(tok),
        "generation_config": params.generate.model_dump(),
        "seed": params.base.seed,
        "params": params.to_dict()["train"],
        "stages": [{k: v for k, v in r.items() if k not in ("checkpoints", "load_seconds")} for r in results],
        "mlflow_run_id": last["mlflow_run_id"],
        "mlflow_run_ids": {r["stage"]: r["mlflow_run_id"] for r in results},
        "mlflow_experiment_id": experiment_id,
        "git_commit": tracking.git_commit(),
        "adapter_sha256": last["adapter_sha256"],
    }
    training.wait_for_everyone()  # every rank is done with the checkpoints before rank 0 removes them
    if rank == 0:
        with atomic_dir(adapter_dir) as tmp:
            shutil.copytree(last["checkpoints"] / "final", tmp, dirs_exist_ok=True)
            tok.save_pretrained(tmp)
            generation.write(tmp, params.generate)  # how this adapter answers: evaluate and serving read it back
            write_json(tmp / "train_info.json", info)
            warm_start.write_trained_ids(tmp, start.learned)  # what a later warm start counts as already learned
        mlflow_training.finish(last["mlflow_run_id"], adapter_dir, info)
        if not tp.keep_checkpoints:
            for r in results:
                training.remove_checkpoints(r["checkpoints"])
    training.wait_for_everyone()  # no rank returns before the adapter is written
    if world > 1:
        log.info("train: rank %d of %d finished", rank, world)
    log.info("train: %s, %d steps, %d tokens in %.0f s (%.0f tokens/s), final loss %s", tp.method, info["steps"],
             info["tokens_seen"], wall, info["tokens_per_second"] or 0, info["final_loss"])
    return info


def _check_validated(report_file: Path, files: list[Path]) -> None:
    """The gate holds even when someone runs train by hand: the report must pass and match the data."""
    if not report_file.exists():
        raise ValidationFailed(f"{report_file}: no validation report; run the validate step first")
    report = read_json(report_file)
    if not report.get("success"):
        raise ValidationFailed(f"{report_file}: the curated data failed validation; see report.html beside it")
    for f in files:
        if not f.exists():
            raise ValidationFailed(f"{f}: missing; run the curate step first")
        if report.get("files", {}).get(f.name) != sha256_file(f):
            raise ValidationFailed(f"{f} changed since it was validated ({report_file}); validate again")


def main(argv: list[str] | None = None) -> None:
    run_step(__doc__, run, ("validation_report", "curated_dir", "adapter_dir"), argv)


if __name__ == "__main__":
    main()

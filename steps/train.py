"""train: a LoRA adapter (QLoRA on CUDA) with trl: SFT on the curated train split, DPO on its preference pairs.

    python -m steps.train --mode retail_media data/validation/retail_media/report.json \
        data/curated/retail_media data/adapters/retail_media

Loss is on every assistant turn and the end-of-turn token closing it (the model learns to stop), found by
locating each turn in the rendered chat template, so any template works without {% generation %} markers;
`train.assistant_only_loss: false` trains on all tokens. Padding-free batches by default (no pad tokens are
computed; attention stays within each example). Checkpoints every `train.save_steps`; a re-run with the same
params and data resumes from the last one and ends at the same step count. Same seed and data on CPU give the
same adapter, bit for bit. Writes the adapter (safetensors), tokenizer + chat template, loss.png and
train_info.json, whole; each stage (sft, dpo) is its own MLflow run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loraflow import generation, tracking, training
from loraflow.config import Params, load_params
from loraflow.errors import ValidationFailed
from loraflow.io import atomic_dir, read_json, read_jsonl, sha256_file, write_json
from loraflow.stepcli import step_errors, step_parser

log = logging.getLogger(__name__)


def choose_quantization(setting: str, cuda: bool, has_bnb: bool) -> tuple[bool, str]:
    """Decide 4-bit or not; returns (use_4bit, reason) so the choice can be logged and recorded."""
    if setting == "none":
        return False, "train.quantization=none"
    if setting == "4bit":
        if not has_bnb:
            raise ValueError("train.quantization=4bit needs the bitsandbytes package (pip install bitsandbytes)")
        if not cuda:  # bitsandbytes' CPU backend: the same code path, slower than plain LoRA and starting worse
            return True, "train.quantization=4bit on CPU (bitsandbytes CPU backend; plain LoRA is faster on CPU)"
        return True, "train.quantization=4bit"
    if cuda and has_bnb:
        return True, "auto: CUDA and bitsandbytes present -> 4-bit NF4 QLoRA"
    if cuda:
        return False, "auto: CUDA present but bitsandbytes missing -> plain LoRA in bf16"
    return False, "auto: no CUDA -> plain LoRA (QLoRA on CPU is slower and starts worse)"


def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions (AVX512-BF16 or AMX): without them bf16 on CPU is emulated and slow."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def choose_precision(setting: str, cuda: bool, cuda_bf16: bool, cpu_bf16: bool, use_4bit: bool) -> tuple[bool, str]:
    """bf16 autocast (the LoRA and base weights stay float32) or float32; returns (bf16, reason)."""
    if setting == "fp32":
        return False, "train.precision=fp32"
    if setting == "bf16":
        if cuda and not cuda_bf16:
            raise ValueError("train.precision=bf16: this GPU has no bf16 support; use train.precision=fp32")
        slow = "" if cuda or cpu_bf16 else " (this CPU emulates bf16: expect it many times slower than fp32)"
        return True, "train.precision=bf16" + slow
    if cuda:
        return (True, "auto: CUDA with bf16") if cuda_bf16 else (False, "auto: CUDA without bf16 -> float32")
    if use_4bit:  # the bitsandbytes CPU backend computes in float32 (its tested path)
        return False, "auto: 4-bit on CPU -> float32"
    if cpu_bf16:
        return True, "auto: CPU with native bf16 instructions (AVX512-BF16/AMX) -> bf16 autocast"
    return False, "auto: CPU without native bf16 -> float32"


def choose_stages(method: str, pairs: int, min_pairs: int) -> tuple[list[str], str]:
    """The training stages for `train.method`, and why; `pairs` counts prefs.jsonl (read for auto only)."""
    if method != "auto":
        return {"sft": ["sft"], "dpo": ["dpo"], "sft+dpo": ["sft", "dpo"]}[method], f"method {method}"
    if pairs >= min_pairs:
        return ["sft", "dpo"], f"auto: {pairs} preference pairs >= train.dpo_min_pairs {min_pairs} -> SFT, then DPO"
    return ["sft"], f"auto: {pairs} preference pairs < train.dpo_min_pairs {min_pairs} -> SFT only"


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
    from transformers import set_seed

    from loraflow.models import device, load_tokenizer, resolve, template_sha256

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
    cuda = device() == "cuda"
    use_4bit, why = choose_quantization(tp.quantization, cuda, importlib.util.find_spec("bitsandbytes") is not None)
    (log.warning if use_4bit and not cuda else log.info)("train: %s", why)
    cpu_bf16 = not cuda and cpu_has_bf16()
    bf16, why_precision = choose_precision(tp.precision, cuda, cuda and torch.cuda.is_bf16_supported(), cpu_bf16, use_4bit)
    (log.warning if bf16 and not cuda and not cpu_bf16 else log.info)("train: %s", why_precision)  # emulated bf16

    model_path = resolve(params.base.model, params.base.model_cache)
    tok = load_tokenizer(model_path, params.base.trust_remote_code)
    # Under torchrun / accelerate launch every rank trains its share of each batch; only rank 0 writes the
    # outputs and talks to MLflow, the others wait for it.
    rank, world = training.process()
    experiment_id = tracking.setup(params, mode) if rank == 0 else ""
    ctx = _Context(params, mode, tok, model_path, use_4bit, why, cuda, bf16, experiment_id,
                   {"data_sha256": {s: sha256_file(data[s]) for s in stages},
                    **tracking.dvc_hashes(adapter_dir, mode)}, rank)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    results: list[dict[str, Any]] = []
    init_adapter: Path | None = None
    for stage in stages:
        set_seed(params.base.seed)
        key = training.run_key(params, stage, ctx.tags["data_sha256"][stage],
                               results[-1]["adapter_sha256"] if results else "")
        res = _train_stage(ctx, stage, key, records[stage], init_adapter)
        results.append(res)
        init_adapter = res["checkpoints"] / "final"
    wall = time.time() - t0

    last = results[-1]
    info = {
        "mode": mode,
        "method": tp.method,
        "method_reason": stages_why,
        "base_model": params.base.model,
        "quantization": "4bit-nf4" if use_4bit else "none",
        "quantization_reason": why,
        "precision": "bf16" if bf16 else "fp32",
        "precision_reason": why_precision,
        "hardware": torch.cuda.get_device_name(0) if cuda else f"cpu x{os.cpu_count()}",
        "world_size": world,  # processes that trained (DDP); tokens_seen counts all of them
        "steps": last["steps"],
        "epochs": last["epochs"],
        "train_records": len(records.get("sft", [])),
        "pref_records": len(records.get("dpo", [])),
        "tokens_seen": sum(r["tokens_seen"] for r in results),
        "wall_seconds": round(wall, 2),
        # over what this process trained: a resumed stage only ran the steps after its checkpoint
        "tokens_per_second": round(sum(r["tokens_this_run"] for r in results) / max(sum(r["train_seconds"] for r in results), 1e-9), 1),
        "peak_memory_mb": _peak_memory_mb(cuda),
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
        "train_data_sha256": ctx.tags["data_sha256"].get("sft", ""),
        "prefs_data_sha256": ctx.tags["data_sha256"].get("dpo", ""),
        "dvc_curated_md5": ctx.tags.get("dvc.curated_md5"),
        "chat_template_sha256": template_sha256(tok),
        "generation_config": params.generate.model_dump(),
        "seed": params.base.seed,
        "params": params.to_dict()["train"],
        "stages": [{k: v for k, v in r.items() if k not in ("checkpoints",)} for r in results],
        "mlflow_run_id": last["mlflow_run_id"],
        "mlflow_run_ids": {r["stage"]: r["mlflow_run_id"] for r in results},
        "mlflow_experiment_id": experiment_id,
        "git_commit": tracking.git_commit(),
    }
    info["adapter_sha256"] = last["adapter_sha256"]
    for r in info["stages"]:
        r.pop("history", None)
    training.wait_for_everyone()  # every rank is done with the checkpoints before rank 0 removes them
    if rank == 0:
        with atomic_dir(adapter_dir) as tmp:
            shutil.copytree(last["checkpoints"] / "final", tmp, dirs_exist_ok=True)
            tok.save_pretrained(tmp)
            generation.write(tmp, params.generate)  # how this adapter answers: evaluate and serving read it back
            write_json(tmp / "train_info.json", info)
        _finish_mlflow(ctx, last, adapter_dir, info)
        if not tp.keep_checkpoints:
            for r in results:
                training.remove_checkpoints(r["checkpoints"])
    training.wait_for_everyone()  # no rank returns before the adapter is written
    if world > 1:
        log.info("train: rank %d of %d finished", rank, world)
    log.info("train: %s, %d steps, %d tokens in %.0f s (%.0f tokens/s), final loss %s", tp.method, info["steps"],
             info["tokens_seen"], wall, info["tokens_per_second"] or 0, info["final_loss"])
    return info


class _Context:
    """What every stage shares: params, tokenizer, the hardware decision, the MLflow experiment."""

    def __init__(self, params, mode, tok, model_path, use_4bit, why, cuda, bf16, experiment_id, tags, rank=0):
        self.params, self.mode, self.tok, self.model_path = params, mode, tok, model_path
        self.use_4bit, self.why, self.cuda, self.bf16 = use_4bit, why, cuda, bf16
        self.experiment_id, self.tags = experiment_id, tags
        self.main = rank == 0  # the process that writes files and MLflow


def micro_batches(batch_size: int, grad_accum: int, packing: bool, attn_implementation: str) -> tuple[int, int, str]:
    """(sequences per forward pass, gradient accumulation steps, why): the same effective batch either way.

    Padding-free trl flattens a batch into one sequence; attention stays within each example either through
    varlen kernels (flash attention) or a block-diagonal mask (sdpa, eager). Measured on CPU (bench/train.py):
    a flattened batch of ~8 examples (~1,200 tokens) is faster than padding, but a flattened batch of 8 packed
    blocks (~2,600 tokens) is not (the masked attention grows with the square of the length), so without a
    varlen kernel packed blocks go one per forward pass, accumulated to the batch.
    """
    if packing and "flash" not in (attn_implementation or ""):
        return 1, batch_size * grad_accum, ("packed blocks, one per forward pass, the batch by gradient "
                                            f"accumulation ({attn_implementation or 'no'} attention has no varlen kernel)")
    return batch_size, grad_accum, "packed blocks" if packing else "one flattened sequence per batch"


def sft_dataset(tok, records: list[dict], max_length: int, assistant_only: bool, model_dir: str | None = None):
    """Pre-tokenized SFT examples: input_ids and (when assistant-only) the loss mask of every assistant turn
    plus its end-of-turn token, cut to max_length (keep the start). Returns (dataset, records truncated)."""
    from datasets import Dataset

    from loraflow.checks import assistant_masks
    from loraflow.generation import end_of_turn_ids

    rows, truncated = [], 0
    for ids, mask in assistant_masks(tok, [r["messages"] for r in records], end_of_turn_ids(tok, model_dir)):
        if len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        if assistant_only and not any(mask):
            continue  # nothing to learn from once truncated
        rows.append({"input_ids": ids, "assistant_masks": mask} if assistant_only else {"input_ids": ids})
    return Dataset.from_list(rows), truncated


def _train_stage(ctx: _Context, stage: str, key: str, records: list[dict], init_adapter: Path | None) -> dict[str, Any]:
    import mlflow
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer

    from loraflow.models import load_causal_lm

    params, tp = ctx.params, ctx.params.train
    folder = Path(tp.checkpoint_dir) / ctx.mode / f"{stage}-{key}"
    resume = training.last_checkpoint(folder)
    resumed_from = int(resume.name.split("-")[1]) if resume else 0
    tokens_before = int(read_json(resume / "trainer_state.json").get("num_input_tokens_seen") or 0) if resume else 0
    if resume:
        log.info("train: resuming %s from %s (step %d)", stage, resume, resumed_from)

    model = load_causal_lm(ctx.model_path, quantize_4bit=ctx.use_4bit, trust_remote_code=params.base.trust_remote_code)
    if ctx.use_4bit:  # QLoRA: norms and embeddings up to float32, base frozen (trl 1.16's trainers do not)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=tp.gradient_checkpointing)
    peft_config = None
    if init_adapter is not None:  # sft+dpo: DPO continues the SFT adapter (trl keeps a frozen copy as reference)
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        peft_config = LoraConfig(r=tp.lora_r, lora_alpha=tp.lora_alpha, lora_dropout=tp.lora_dropout,
                                 target_modules=tp.target_modules, task_type="CAUSAL_LM")
    padding_free = stage == "sft" and (tp.padding_free or tp.packing)
    per_forward, accumulate, batching = micro_batches(tp.batch_size, tp.grad_accum, stage == "sft" and tp.packing,
                                                      getattr(model.config, "_attn_implementation", ""))
    if not padding_free:
        batching = "padded batches"
    log.info("train: %s: %s", stage, batching)
    common = dict(
        output_dir=str(folder),
        per_device_train_batch_size=per_forward,
        gradient_accumulation_steps=accumulate,
        lr_scheduler_type=tp.lr_scheduler,
        warmup_steps=tp.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        logging_steps=tp.logging_steps,
        save_strategy="steps" if tp.save_steps else "no",
        save_steps=tp.save_steps or 500,
        save_total_limit=2,
        report_to="none",  # our callback logs to MLflow in batches: no HTTP call per step
        seed=params.base.seed,
        data_seed=params.base.seed,
        bf16=ctx.bf16,  # autocast; trl's configs default to bf16=True, which on an older CPU is emulated and slow
        use_cpu=not ctx.cuda,  # without it accelerate does not join CPU processes (torchrun, accelerate launch)
        gradient_checkpointing=tp.gradient_checkpointing,
        optim="paged_adamw_8bit" if ctx.use_4bit and ctx.cuda else "adamw_torch",  # paging needs CUDA
        # real tokens only: padded batches count their attention mask; a padding-free batch has no padding
        # ("non_padding" would miss real tokens equal to the pad id, which is <|im_end|> for SmolLM2)
        include_num_input_tokens_seen="all" if padding_free else "non_padding",
        dataloader_num_workers=0,
        dataloader_pin_memory=ctx.cuda,  # pinning needs an accelerator; on CPU it only warns
        disable_tqdm=True,
    )
    truncated = 0
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        dataset, truncated = sft_dataset(ctx.tok, records, tp.max_length, tp.assistant_only_loss, ctx.model_path)
        if truncated:
            log.warning("train: %d of %d records longer than train.max_length=%d tokens were cut to it",
                        truncated, len(records), tp.max_length)
        cfg = SFTConfig(**common, num_train_epochs=tp.epochs, max_steps=tp.max_steps, learning_rate=tp.learning_rate,
                        packing=tp.packing, padding_free=padding_free, neftune_noise_alpha=tp.neftune_noise_alpha,
                        # already cut above; packing uses max_length as its block size
                        max_length=tp.max_length if tp.packing else None)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=ctx.tok,
                             peft_config=peft_config)
    else:
        from trl import DPOConfig, DPOTrainer

        dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
        cfg = DPOConfig(**common, num_train_epochs=tp.dpo_epochs, max_steps=tp.dpo_max_steps,
                        learning_rate=tp.dpo_learning_rate, beta=tp.dpo_beta, max_length=tp.max_length)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=ctx.tok,
                             peft_config=peft_config)

    run_name = f"train-{stage}-{ctx.mode}-{params.digest('base', 'train')}"
    with (mlflow.start_run(experiment_id=ctx.experiment_id, run_name=run_name, log_system_metrics=tp.system_metrics)
          if ctx.main else contextlib.nullcontext()) as mrun:
        callback = None
        if ctx.main:
            mlflow.log_params({**tracking.flat_params(params, "base", "train"), "stage": stage})
            mlflow.set_tags({"loraflow.mode": ctx.mode, "loraflow.step": "train", "loraflow.stage": stage,
                             "loraflow.run_key": key, "git_commit": tracking.git_commit() or "",
                             "data_sha256": ctx.tags["data_sha256"][stage], "quantization": "4bit-nf4" if ctx.use_4bit else "none",
                             "quantization_reason": ctx.why,
                             "precision": "bf16" if ctx.bf16 else "fp32", "resumed_from_step": str(resumed_from),
                             **{k: v for k, v in ctx.tags.items() if k.startswith("dvc.")}})
            callback = training.mlflow_callback(mrun.info.run_id, tp.metrics_flush_every)
            trainer.add_callback(callback)
            trainer.add_callback(training.progress_callback(f"train {ctx.mode} {stage}"))
        before = training.base_fingerprint(trainer.model)
        t0 = time.time()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        seconds = time.time() - t0
        base_unchanged = training.base_fingerprint(trainer.model) == before
        if not base_unchanged:
            raise RuntimeError(f"train {stage}: the base model's weights changed during LoRA training")
        history = [h for h in trainer.state.log_history if "loss" in h]
        final = folder / "final"
        if ctx.main:
            trainer.model.save_pretrained(str(final), selected_adapters=["default"])
        training.wait_for_everyone()  # every rank reads final/ next (its hash; DPO starts from it)
        trainable, total = trainer.model.get_nb_trainable_parameters()
        # what the LoRA layers were wrapped around: Linear4bit proves QLoRA really trained on 4-bit weights
        base_layers = Counter(type(m.base_layer).__name__ for m in trainer.model.modules() if isinstance(m, LoraLayer))
        tokens = int(trainer.state.num_input_tokens_seen or 0)
        chart = ctx.main and training.loss_chart(trainer.state.log_history, f"{ctx.mode}: {stage} loss",
                                                 final / "loss.png")
        if chart:
            mlflow.log_artifact(str(chart))
        res = {
            "stage": stage,
            "steps": int(trainer.state.global_step),
            "epochs": float(trainer.state.epoch or 0),
            "resumed_from_step": resumed_from,
            "tokens_seen": tokens,
            "train_seconds": round(seconds, 2),
            "tokens_this_run": tokens - tokens_before,
            "final_loss": history[-1]["loss"] if history else None,
            "train_loss": result.training_loss,
            "truncated": truncated,
            "batching": batching,
            "base_weights_unchanged": base_unchanged,
            "lora_base_layers": dict(base_layers),
            "trainable": trainable,
            "total": total,
            "mlflow_run_id": mrun.info.run_id if ctx.main else None,
            "mlflow_batches": callback.calls if callback else 0,
            "adapter_sha256": sha256_file(final / "adapter_model.safetensors"),
            "checkpoints": folder,
        }
        if ctx.main:
            mlflow.log_metrics({"train_seconds": seconds, "train_loss": float(result.training_loss or 0),
                                "steps": res["steps"]}, step=res["steps"])
    return res


def _finish_mlflow(ctx: _Context, last: dict[str, Any], adapter_dir: Path, info: dict[str, Any]) -> None:
    """The adapter, train_info and the final numbers go on the last stage's run (the one promote registers)."""
    import mlflow

    with mlflow.start_run(run_id=last["mlflow_run_id"]):
        mlflow.log_metrics({"tokens_per_second": float(info["tokens_per_second"] or 0),
                            "wall_seconds": info["wall_seconds"], "peak_memory_mb": info["peak_memory_mb"],
                            "tokens_seen": info["tokens_seen"]}, step=info["steps"])
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        mlflow.set_tags({"adapter_sha256": info["adapter_sha256"], "train_data_sha256": info["train_data_sha256"],
                         "chat_template_sha256": info["chat_template_sha256"]})


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


def _peak_memory_mb(cuda: bool) -> float:
    if cuda:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    ap = step_parser(__doc__)
    ap.add_argument("--mode", required=True)
    ap.add_argument("validation_report", type=Path)
    ap.add_argument("curated_dir", type=Path)
    ap.add_argument("adapter_dir", type=Path)
    args = ap.parse_args(argv)
    with step_errors():
        run(load_params(args.params, args.set), args.mode, args.validation_report, args.curated_dir, args.adapter_dir)


if __name__ == "__main__":
    main()

"""train: a LoRA adapter (QLoRA on CUDA) on the curated train split, with trl's SFTTrainer.

    python -m steps.train --mode retail_media data/validation/retail_media/report.json \
        data/curated/retail_media data/adapters/retail_media

Loss is on the final assistant turn only: each conversation becomes a conversational prompt/completion
pair, which trl masks for us and which works with any chat template (assistant_only_loss needs
{% generation %} markers that most templates, SmolLM2's included, lack).
Writes the adapter (safetensors), tokenizer + chat template and train_info.json, whole; logs the run to MLflow.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from loraflow import tracking
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
        if not (cuda and has_bnb):
            raise ValueError("train.quantization=4bit needs CUDA and the bitsandbytes package")
        return True, "train.quantization=4bit"
    if cuda and has_bnb:
        return True, "auto: CUDA and bitsandbytes present -> 4-bit NF4 QLoRA"
    if cuda:
        return False, "auto: CUDA present but bitsandbytes missing -> plain LoRA in bf16"
    return False, "auto: no CUDA -> plain LoRA in float32 (QLoRA on CPU is slower and starts worse)"


def to_prompt_completion(records: list[dict]) -> list[dict[str, Any]]:
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records]


def run(params: Params, mode: str, validation_report: Path, curated_dir: Path, adapter_dir: Path) -> dict[str, Any]:
    """Train one adapter.

    Args:
        params: reads `base` and `train`.
        mode: names the MLflow experiment (loraflow-<mode>).
        validation_report: validate's report.json; training refuses data that did not pass.
        curated_dir: folder with train.jsonl (curate's output).
        adapter_dir: gets adapter_model.safetensors, adapter_config.json, tokenizer files and train_info.json.

    Returns:
        train_info (also written to adapter_dir/train_info.json), including the MLflow run id.
    """
    import mlflow
    import torch
    from datasets import Dataset
    from mlflow.entities import Metric
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from loraflow.models import device, load_causal_lm, load_tokenizer, resolve

    tp = params.train
    curated_dir, adapter_dir = Path(curated_dir), Path(adapter_dir)
    _check_validated(Path(validation_report), curated_dir)
    set_seed(params.base.seed)
    cuda = device() == "cuda"
    use_4bit, why = choose_quantization(tp.quantization, cuda, importlib.util.find_spec("bitsandbytes") is not None)
    log.info("train: %s", why)

    model_path = resolve(params.base.model, params.base.model_cache)
    tok = load_tokenizer(model_path, params.base.trust_remote_code)
    model = load_causal_lm(model_path, quantize_4bit=use_4bit, trust_remote_code=params.base.trust_remote_code)
    records = read_jsonl(curated_dir / "train.jsonl")
    dataset = Dataset.from_list(to_prompt_completion(records))

    experiment_id = tracking.setup(params, mode)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="loraflow-train-") as work, \
            mlflow.start_run(experiment_id=experiment_id, run_name=f"train-{mode}-{params.digest('base', 'train')}") as mrun:
        cfg = SFTConfig(
            output_dir=work,
            per_device_train_batch_size=tp.batch_size,
            gradient_accumulation_steps=tp.grad_accum,
            num_train_epochs=tp.epochs,
            max_steps=tp.max_steps,
            learning_rate=tp.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,  # a float < 1 is a ratio of the total steps in transformers 5
            max_length=tp.max_length,
            logging_steps=tp.logging_steps,
            save_strategy="no",
            report_to="none",  # we log to MLflow in batches ourselves: no HTTP call per step
            seed=params.base.seed,
            data_seed=params.base.seed,
            bf16=cuda,  # SFTConfig defaults to bf16, which fails on CPU
            gradient_checkpointing=tp.gradient_checkpointing,
            optim="paged_adamw_8bit" if use_4bit else "adamw_torch",
            include_num_input_tokens_seen=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        lora = LoraConfig(r=tp.lora_r, lora_alpha=tp.lora_alpha, lora_dropout=tp.lora_dropout,
                          target_modules=tp.target_modules, task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok, peft_config=lora)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = trainer.train()
        wall = time.time() - t0

        history = [h for h in trainer.state.log_history if "loss" in h]
        tokens = int(trainer.state.num_input_tokens_seen or 0)
        trainable, total = trainer.model.get_nb_trainable_parameters()
        info = {
            "mode": mode,
            "method": tp.method,
            "base_model": params.base.model,
            "quantization": "4bit-nf4" if use_4bit else "none",
            "quantization_reason": why,
            "hardware": torch.cuda.get_device_name(0) if cuda else f"cpu x{os.cpu_count()}",
            "steps": trainer.state.global_step,
            "epochs": float(trainer.state.epoch or 0),
            "train_records": len(records),
            "tokens_seen": tokens,
            "wall_seconds": round(wall, 2),
            "tokens_per_second": round(tokens / wall, 1) if wall else None,
            "peak_memory_mb": _peak_memory_mb(cuda),
            "final_loss": history[-1]["loss"] if history else None,
            "train_loss": result.training_loss,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "train_data_sha256": sha256_file(curated_dir / "train.jsonl"),
            "seed": params.base.seed,
            "params": params.to_dict()["train"],
            "mlflow_run_id": mrun.info.run_id,
            "mlflow_experiment_id": experiment_id,
            "git_commit": tracking.git_commit(),
        }

        client = mlflow.MlflowClient()
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(h[k]), now, int(h["step"])) for h in history for k in ("loss", "learning_rate") if k in h]
        metrics += [Metric(k, float(info[k]), now, info["steps"]) for k in ("tokens_per_second", "wall_seconds", "train_loss")]
        for i in range(0, len(metrics), 500):  # one call per 500 metrics, not one per step
            client.log_batch(mrun.info.run_id, metrics=metrics[i:i + 500])
        mlflow.log_params(tracking.flat_params(params, "base", "train"))
        mlflow.set_tags({"loraflow.mode": mode, "loraflow.step": "train", "git_commit": info["git_commit"] or "",
                         "train_data_sha256": info["train_data_sha256"], "quantization": info["quantization"]})

        with atomic_dir(adapter_dir) as tmp:
            trainer.model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            info["adapter_sha256"] = sha256_file(tmp / "adapter_model.safetensors")
            write_json(tmp / "train_info.json", info)
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        mlflow.set_tag("adapter_sha256", info["adapter_sha256"])
    log.info("train: %d steps, %d tokens in %.0f s (%.0f tokens/s), final loss %s",
             info["steps"], tokens, wall, info["tokens_per_second"] or 0, info["final_loss"])
    return info


def _check_validated(report_file: Path, curated_dir: Path) -> None:
    """The gate holds even when someone runs train by hand: the report must pass and match the data."""
    if not report_file.exists():
        raise ValidationFailed(f"{report_file}: no validation report; run the validate step first")
    report = read_json(report_file)
    if not report.get("success"):
        raise ValidationFailed(f"{report_file}: the curated data failed validation; see report.html beside it")
    want = report.get("files", {}).get("train.jsonl")
    if want != sha256_file(curated_dir / "train.jsonl"):
        raise ValidationFailed(f"{curated_dir / 'train.jsonl'} changed since it was validated ({report_file}); validate again")


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

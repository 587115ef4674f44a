"""Training throughput, from one run: loraflow's train step vs a bare trl SFTTrainer script, same everything.

    python bench/train.py                 # 8 optimizer steps per run, batch 8, the sample data
    python bench/train.py --steps 12 --batch-size 8

Same model (params.yaml's base.model), same curated sample data (conversations of varied lengths: 60-260
tokens), same LoRA (r, alpha, dropout, target modules), learning rate, batch size, max length, seed and
number of optimizer steps, gradient checkpointing as params.yaml sets it (trl's SFTConfig default is on, which
alone costs ~30% on CPU). The bare script is what a user writes from trl's docs: conversations as
prompt/completion pairs (so the loss is on the answer), padded batches, trl's own tokenization.
loraflow's runs go through `steps.train.run` whole (MLflow logging, checkpoints every 4 steps and all):
plain (padded batches, like the bare script), padding-free (the default) and packed.

Both sides train at the same precision: the one loraflow chooses here (train.precision auto: bf16 autocast on a
CPU with native bf16, else float32), so a ratio measures the method, not the number format. Where that is
bf16, a float32 row follows (padding-free with train.precision=fp32 vs the bare script with bf16=False).

tokens/s counts real tokens only (no padding), over `trainer.train()` in both. The bare script runs first
and last; its mean is the reference (the float32 row's bare side runs once). The last line is the headline,
ratio first, same precision on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import loraflow  # noqa: E402,F401  (offline env before transformers is imported)
from loraflow.config import Params, load_params  # noqa: E402
from loraflow.io import read_jsonl  # noqa: E402
from loraflow.train_plan import choose_hardware  # noqa: E402
from steps import curate, train, validate  # noqa: E402


def bare_trl(params: Params, records: list[dict], steps: int, work: str, bf16: bool) -> tuple[float, int]:
    """The reference: trl's SFTTrainer as its docs show it, in bf16 autocast or float32.
    Returns (seconds in train(), real tokens)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from loraflow.models import resolve

    tp = params.train
    set_seed(params.base.seed)
    path = resolve(params.base.model, params.base.model_cache)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records])
    cfg = SFTConfig(output_dir=work, per_device_train_batch_size=tp.batch_size, max_steps=steps,
                    learning_rate=tp.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.05,
                    max_length=tp.max_length, logging_steps=tp.logging_steps, save_strategy="no", report_to="none",
                    seed=params.base.seed, include_num_input_tokens_seen="non_padding",
                    # ours' precision; on a machine without CUDA, transformers accepts bf16 only with use_cpu
                    bf16=bf16, use_cpu=bf16 and not torch.cuda.is_available(),
                    # trl's SFTConfig turns gradient checkpointing on by default; the same setting as ours
                    # (params.yaml: off) keeps this a comparison of the same computation
                    gradient_checkpointing=tp.gradient_checkpointing,
                    disable_tqdm=True)
    lora = LoraConfig(r=tp.lora_r, lora_alpha=tp.lora_alpha, lora_dropout=tp.lora_dropout,
                      target_modules=tp.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=lora)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, int(trainer.state.num_input_tokens_seen)


def ours(params: Params, project: Path, mode: str, overrides: list[str]) -> tuple[float, int]:
    p = load_params(project / "params.yaml", overrides)
    info = train.run(p, mode, project / "data/validation" / mode / "report.json", project / "data/curated" / mode,
                     project / "data/adapters" / mode)
    stage = info["stages"][0]
    return stage["train_seconds"], stage["tokens_this_run"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--mode", default="retail_media")
    a = ap.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-train-") as tmp:
        project = Path(tmp)
        common = [f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}", "train.save_steps=4",
                  f"base.tracking_uri=sqlite:///{project / 'mlflow.db'}"]
        params = load_params(ROOT / "params.yaml", common)
        (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
        cur = project / "data/curated" / a.mode
        curate.run(params, ROOT / "data/raw" / a.mode, cur, None)
        validate.run(params, cur, project / "data/validation" / a.mode, project / "data/profiles" / f"{a.mode}.json")
        records = read_jsonl(cur / "train.jsonl")
        bf16 = choose_hardware(params.train).bf16  # what ours trains in here; the bare side gets the same
        precision = "bf16" if bf16 else "fp32"
        print(f"{len(records)} conversations, {a.steps} steps x batch {a.batch_size}, max_length "
              f"{params.train.max_length}, LoRA r={params.train.lora_r} {params.train.target_modules}, "
              f"{params.base.model}, {os.cpu_count()} CPUs, both sides {precision}")
        cwd = os.getcwd()
        os.chdir(project)  # checkpoints land in the throwaway project
        try:
            runs: dict[str, tuple[float, int]] = {}
            runs["bare trl (first)"] = bare_trl(params, records, a.steps, str(project / "bare"), bf16)
            runs["loraflow plain"] = ours(params, project, a.mode, [*common, "train.padding_free=false"])
            runs["loraflow padding-free"] = ours(params, project, a.mode, [*common, "train.padding_free=true"])
            runs["loraflow packing"] = ours(params, project, a.mode, [*common, "train.packing=true"])
            if bf16:
                runs["loraflow padding-free fp32"] = ours(params, project, a.mode,
                                                          [*common, "train.padding_free=true", "train.precision=fp32"])
                runs["bare trl fp32"] = bare_trl(params, records, a.steps, str(project / "bare"), False)
            runs["bare trl (last)"] = bare_trl(params, records, a.steps, str(project / "bare"), bf16)
        finally:
            os.chdir(cwd)
    rate = {k: tok / s for k, (s, tok) in runs.items()}
    for k, (s, tok) in runs.items():
        print(f"{k:26s} {s:7.1f} s  {tok:7d} tokens  {rate[k]:7.1f} tokens/s")
    ref = (rate["bare trl (first)"] + rate["bare trl (last)"]) / 2
    ratios = {k: rate[k] / ref for k in ("loraflow plain", "loraflow padding-free", "loraflow packing")}
    if bf16:
        ratios["padding-free fp32 vs bare fp32"] = rate["loraflow padding-free fp32"] / rate["bare trl fp32"]
    print(json.dumps({"precision": precision, **{k: round(v, 3) for k, v in ratios.items()}}))
    if bf16:
        print(f"float32 on both sides: {ratios['padding-free fp32 vs bare fp32']:.2f}x tokens/s padding-free "
              "vs bare trl SFTTrainer")
    best = max(("loraflow padding-free", "loraflow packing"), key=ratios.get)
    print(f"{ratios[best]:.2f}x tokens/s {best.split()[1]} vs bare trl SFTTrainer, both {precision} (goal >= 1.3x); "
          f"plain {ratios['loraflow plain']:.2f}x (goal >= 1.0x)")


if __name__ == "__main__":
    main()

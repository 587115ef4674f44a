"""One training stage through trl: the dataset, the model with LoRA, the SFT or DPO trainer, the run.

Tracking is handed in (`tracking`: an object with `stage_run`, e.g. `training.MlflowTraining`; None tracks
nothing), so a benchmark or a test runs the very stage the train step runs, with its own callbacks beside.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loraflow import training
from loraflow.config import Params
from loraflow.io import read_json, sha256_file
from loraflow.train_plan import Hardware, micro_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSetup:
    """What every stage shares: params, tokenizer, base model, the hardware decision, this process's role."""

    params: Params
    mode: str
    tok: Any
    model_path: str
    hardware: Hardware
    main: bool = True  # the process that writes files (rank 0 under torchrun / accelerate launch)


class StageRun(Protocol):
    """One stage's tracked run, as `train_stage` uses it."""

    run_id: str | None
    callbacks: list  # TrainerCallbacks that log while training
    batches: int  # logging calls made (read after training)

    def log_artifact(self, path: Path) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class StageTracking(Protocol):
    def stage_run(self, stage: str, tags: dict[str, str]) -> contextlib.AbstractContextManager[StageRun]: ...


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


@dataclass
class BuiltTrainer:
    trainer: Any  # trl's SFTTrainer or DPOTrainer
    batching: str  # how a batch goes through the model, in words
    truncated: int  # records cut to train.max_length
    load_seconds: float  # loading the base model (and k-bit preparation)


def build_trainer(setup: StageSetup, stage: str, records: list[dict], init_adapter: Path | None,
                  folder: Path) -> BuiltTrainer:
    """The base model (4-bit when the hardware decision says so) with LoRA, and trl's trainer for `stage`
    ("sft" or "dpo"), checkpointing into `folder`. `init_adapter`: continue that adapter (DPO after SFT, or the
    champion on a warm start)."""
    from datasets import Dataset
    from peft import LoraConfig, PeftModel

    from loraflow.models import load_causal_lm

    params, tp, hw = setup.params, setup.params.train, setup.hardware
    t0 = time.perf_counter()
    model = load_causal_lm(setup.model_path, quantize_4bit=hw.use_4bit, trust_remote_code=params.base.trust_remote_code)
    if hw.use_4bit:  # QLoRA: norms and embeddings up to float32, base frozen (trl 1.16's trainers do not)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=tp.gradient_checkpointing)
    load_seconds = time.perf_counter() - t0
    peft_config = None
    # sft+dpo: DPO continues the SFT adapter (trl keeps a frozen copy as reference); a warm start continues the
    # champion's. Either way the base stays frozen: only the loaded LoRA weights are trainable.
    if init_adapter is not None:
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
        report_to="none",  # the tracking's callback logs to MLflow in batches: no HTTP call per step
        seed=params.base.seed,
        data_seed=params.base.seed,
        bf16=hw.bf16,  # autocast; trl's configs default to bf16=True, which on an older CPU is emulated and slow
        use_cpu=not hw.cuda,  # without it accelerate does not join CPU processes (torchrun, accelerate launch)
        gradient_checkpointing=tp.gradient_checkpointing,
        optim="paged_adamw_8bit" if hw.use_4bit and hw.cuda else "adamw_torch",  # paging needs CUDA
        # real tokens only: padded batches count their attention mask; a padding-free batch has no padding
        # ("non_padding" would miss real tokens equal to the pad id, which is <|im_end|> for SmolLM2)
        include_num_input_tokens_seen="all" if padding_free else "non_padding",
        dataloader_num_workers=0,
        dataloader_pin_memory=hw.cuda,  # pinning needs an accelerator; on CPU it only warns
        disable_tqdm=True,
    )
    truncated = 0
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        dataset, truncated = sft_dataset(setup.tok, records, tp.max_length, tp.assistant_only_loss, setup.model_path)
        if truncated:
            log.warning("train: %d of %d records longer than train.max_length=%d tokens were cut to it",
                        truncated, len(records), tp.max_length)
        cfg = SFTConfig(**common, num_train_epochs=tp.epochs, max_steps=tp.max_steps, learning_rate=tp.learning_rate,
                        packing=tp.packing, padding_free=padding_free, neftune_noise_alpha=tp.neftune_noise_alpha,
                        # already cut above; packing uses max_length as its block size
                        max_length=tp.max_length if tp.packing else None)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=setup.tok,
                             peft_config=peft_config)
    else:
        from trl import DPOConfig, DPOTrainer

        dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
        cfg = DPOConfig(**common, num_train_epochs=tp.dpo_epochs, max_steps=tp.dpo_max_steps,
                        learning_rate=tp.dpo_learning_rate, beta=tp.dpo_beta, max_length=tp.max_length)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=setup.tok,
                             peft_config=peft_config)
    return BuiltTrainer(trainer, batching, truncated, load_seconds)


def check_base_unchanged(model, before: dict[str, tuple[float, float]], stage: str) -> bool:
    """LoRA must leave the base weights as loaded: raises when their fingerprint moved since `before`."""
    if training.base_fingerprint(model) != before:
        raise RuntimeError(f"train {stage}: the base model's weights changed during LoRA training")
    return True


def train_stage(setup: StageSetup, stage: str, key: str, records: list[dict], init_adapter: Path | None,
                tracking: StageTracking | None = None, callbacks: list | tuple = ()) -> dict[str, Any]:
    """Train one stage, resuming from the newest complete checkpoint under `<train.checkpoint_dir>/<mode>/
    <stage>-<key>`, and save its adapter to `<that folder>/final` (the main process only).

    Args:
        key: `training.run_key` of what decides this stage's weights.
        init_adapter: the adapter to continue (DPO after SFT, the champion on a warm start), or None for a fresh LoRA.
        tracking: where the stage's run is logged (`training.MlflowTraining`), or None for no tracking.
        callbacks: more TrainerCallbacks (a progress bar, a benchmark's step timer).
    Returns:
        the stage's record: steps, tokens, losses, batching, the adapter's sha256, its run id, ...
    """
    from peft.tuners.lora import LoraLayer

    tp = setup.params.train
    folder = Path(tp.checkpoint_dir) / setup.mode / f"{stage}-{key}"
    resume = training.last_checkpoint(folder)
    resumed_from = int(resume.name.split("-")[1]) if resume else 0
    state = read_json(resume / "trainer_state.json") if resume else {}
    tokens_before = int(state.get("num_input_tokens_seen") or 0)
    # A checkpoint at the stage's last step (a run killed while it wrote its adapter): its weights are the stage's
    # result. Trainer.train would take one more batch before it checks max_steps, a different adapter.
    finished = bool(resume) and 0 < int(state.get("max_steps") or 0) <= int(state.get("global_step") or 0)
    if resume:
        log.info("train: resuming %s from %s (step %d%s)", stage, resume, resumed_from,
                 ", its last: no step left to train" if finished else "")
    built = build_trainer(setup, stage, records, init_adapter, folder)
    trainer, hw = built.trainer, setup.hardware
    tags = {"loraflow.run_key": key, "quantization": "4bit-nf4" if hw.use_4bit else "none",
            "quantization_reason": hw.quantization_reason, "precision": "bf16" if hw.bf16 else "fp32",
            "resumed_from_step": str(resumed_from)}
    with (tracking.stage_run(stage, tags) if tracking else contextlib.nullcontext()) as run:
        for callback in [*(run.callbacks if run else []), *callbacks]:
            trainer.add_callback(callback)
        before = training.base_fingerprint(trainer.model)
        t0 = time.time()
        train_loss = training.load_finished(trainer, resume) if finished else \
            trainer.train(resume_from_checkpoint=str(resume) if resume else None).training_loss
        seconds = time.time() - t0
        base_unchanged = check_base_unchanged(trainer.model, before, stage)
        history = [h for h in trainer.state.log_history if "loss" in h]
        final = folder / "final"
        if setup.main:
            trainer.model.save_pretrained(str(final), selected_adapters=["default"])
        training.wait_for_everyone()  # every rank reads final/ next (its hash; DPO starts from it)
        trainable, total = trainer.model.get_nb_trainable_parameters()
        # what the LoRA layers were wrapped around: Linear4bit proves QLoRA really trained on 4-bit weights
        base_layers = Counter(type(m.base_layer).__name__ for m in trainer.model.modules() if isinstance(m, LoraLayer))
        tokens = int(trainer.state.num_input_tokens_seen or 0)
        chart = setup.main and training.loss_chart(trainer.state.log_history, f"{setup.mode}: {stage} loss",
                                                   final / "loss.png")
        if chart and run:
            run.log_artifact(chart)
        res = {
            "stage": stage,
            "steps": int(trainer.state.global_step),
            "epochs": float(trainer.state.epoch or 0),
            "resumed_from_step": resumed_from,
            "tokens_seen": tokens,
            "train_seconds": round(seconds, 2),
            "tokens_this_run": tokens - tokens_before,
            "final_loss": history[-1]["loss"] if history else None,
            "train_loss": train_loss,
            "truncated": built.truncated,
            "batching": built.batching,
            "base_weights_unchanged": base_unchanged,
            "lora_base_layers": dict(base_layers),
            "trainable": trainable,
            "total": total,
            "mlflow_run_id": run.run_id if run else None,
            "mlflow_batches": run.batches if run else 0,
            "adapter_sha256": sha256_file(final / "adapter_model.safetensors"),
            "checkpoints": folder,  # these two stay out of train_info.json
            "load_seconds": round(built.load_seconds, 2),
        }
        if run:
            run.log_metrics({"train_seconds": seconds, "train_loss": float(train_loss or 0),
                             "steps": res["steps"]}, step=res["steps"])
    return res


def train_stages(setup: StageSetup, stages: list[str], records: dict[str, list[dict]], data_sha256: dict[str, str],
                 tracking: StageTracking | None = None, start_adapter: Path | None = None, start_key: str = "",
                 callbacks: list | tuple = ()) -> list[dict[str, Any]]:
    """Each stage in turn from the same seed, each continuing the previous stage's adapter; returns their
    records (`train_stage`'s), the last one's adapter in `<its checkpoints>/final`.

    `start_adapter`: the first stage continues it (a warm start from the champion) instead of a fresh LoRA;
    `start_key` (loraflow.warm_start.selection_sha256) joins the first stage's checkpoint key, so a resume never
    mixes runs that started from different adapters or trained on different selections."""
    from transformers import set_seed

    params = setup.params
    results: list[dict[str, Any]] = []
    init_adapter: Path | None = start_adapter
    for stage in stages:
        set_seed(params.base.seed)
        key = training.run_key(params, stage, data_sha256[stage], results[-1]["adapter_sha256"] if results else start_key)
        progress = [training.progress_callback(f"train {setup.mode} {stage}")] if setup.main else []
        res = train_stage(setup, stage, key, records[stage], init_adapter, tracking, [*progress, *callbacks])
        results.append(res)
        init_adapter = res["checkpoints"] / "final"
    return results


def peak_memory_mb(cuda: bool) -> float:
    """Peak memory of this process: allocated on the GPU, or resident on the CPU."""
    if cuda:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB

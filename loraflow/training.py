"""What training needs around trl: run keys, resumable checkpoints, the base-weights fingerprint, MLflow
tracking (each stage its own run, metrics in batches), progress, a loss chart.

Each piece is testable without a training run; loraflow/trainer.py runs a stage with them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraflow import tracking
from loraflow.config import Params

log = logging.getLogger(__name__)

# train params that change how a run is carried out or logged, not the weights it produces
OPERATIONAL = ("checkpoint_dir", "keep_checkpoints", "save_steps", "logging_steps", "system_metrics",
               "metrics_flush_every")


def run_key(params: Params, stage: str, *data_sha256: str) -> str:
    """Identity of one training stage: what decides its weights (train params, base model, seed, data).

    Checkpoints are kept under this key, so a re-run resumes only a run that would produce the same adapter.
    """
    train = {k: v for k, v in params.to_dict()["train"].items() if k not in OPERATIONAL}
    ident = {"stage": stage, "train": train, "model": params.base.model, "seed": params.base.seed,
             "data": list(data_sha256)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, or None.

    transformers writes trainer_state.json last, so a checkpoint cut off mid-write (a kill during the save)
    lacks it, or holds a torn one, and is skipped.
    """
    found = []
    for d in Path(folder).glob("checkpoint-*"):
        m = _CHECKPOINT.match(d.name)
        state = d / "trainer_state.json"
        if not (m and d.is_dir() and state.exists()):
            continue
        try:
            json.loads(state.read_text())
        except ValueError:
            continue
        found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


def load_finished(trainer, checkpoint: Path) -> float | None:
    """Take a checkpoint written at its run's last step as the result without training: its adapter weights into
    `trainer.model`, its state into `trainer.state`. Returns the run's mean training loss, step-weighted from the
    losses the checkpoint logged (what Trainer reports as train_loss, to its logs' rounding)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    checkpoint = Path(checkpoint)
    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    unmatched = set_peft_model_state_dict(trainer.model, weights).unexpected_keys
    if unmatched:
        raise RuntimeError(f"{checkpoint}: {len(unmatched)} tensors match no LoRA layer of the model, e.g. {unmatched[0]}")
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    total, last = 0.0, 0
    for entry in trainer.state.log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total / last if last else None


def process() -> tuple[int, int]:
    """(rank, world size) of this process: torchrun and `accelerate launch` set RANK and WORLD_SIZE; (0, 1) alone.
    Read from the environment so it is known before the trainer sets up the process group."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def wait_for_everyone() -> None:
    """A barrier across all ranks (the trainer has set up the process group by then); nothing when alone."""
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def remove_checkpoints(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    parent = Path(folder).parent
    if parent.exists() and not any(parent.iterdir()):
        parent.rmdir()


def base_fingerprint(model) -> dict[str, tuple[float, float]]:
    """Per frozen (non-LoRA) tensor: its sum and sum of squares in float64. Cheap enough for 7B models, and
    any update an optimizer makes shows in it; compared before and after training to prove the base untouched."""
    import torch

    out = {}
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "lora_" in name or t.device.type == "meta":
                continue
            d = t.detach().double() if t.dtype.is_floating_point else t.detach().to(torch.float64)
            out[name.replace(".base_layer", "")] = (float(d.sum()), float((d * d).sum()))
    return out


def mlflow_callback(run_id: str, flush_every: int):
    """A TrainerCallback sending loss, learning rate, grad norm, tokens/s (and DPO's rewards) to MLflow in
    batches: one `log_batch` call per `flush_every` log events and one at the end, never one per step."""
    import mlflow
    from mlflow.entities import Metric
    from transformers import TrainerCallback

    class MlflowBatchLogger(TrainerCallback):
        def __init__(self) -> None:
            self.client = mlflow.MlflowClient()
            self.buffer: list[Metric] = []
            self.events = 0
            self.calls = 0
            self.last: tuple[float, int] | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            now = time.time()
            ms = int(now * 1000)
            step = int(state.global_step)
            for k, v in (logs or {}).items():
                if isinstance(v, (int, float)) and not k.startswith(("train_", "total_flos")):
                    self.buffer.append(Metric(k.replace("rewards/", "rewards_"), float(v), ms, step))
            tokens = int(state.num_input_tokens_seen or 0)
            if self.last is not None and tokens > self.last[1] and now > self.last[0]:
                self.buffer.append(Metric("tokens_per_second", (tokens - self.last[1]) / (now - self.last[0]), ms, step))
            self.last = (now, tokens)
            self.events += 1
            if self.events % flush_every == 0:
                self.flush()

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = (time.time(), int(state.num_input_tokens_seen or 0))

        def on_train_end(self, args, state, control, **kwargs):
            self.flush()

        def flush(self) -> None:
            while self.buffer:
                chunk, self.buffer = self.buffer[:1000], self.buffer[1000:]
                self.client.log_batch(run_id, metrics=chunk, synchronous=True)
                self.calls += 1

    return MlflowBatchLogger()


class MlflowTraining:
    """The train step's tracking: each stage its own MLflow run in the mode's experiment (params, tags, metrics
    in batches, the loss chart); the last stage's run then gets the adapter and the run's totals (`finish`).

    Args:
        tags: run-wide: {"data_sha256": {stage: sha256}} and DVC's hashes ("dvc.*").
    """

    def __init__(self, params: Params, mode: str, experiment_id: str, tags: dict[str, Any]) -> None:
        self.params, self.mode, self.experiment_id, self.tags = params, mode, experiment_id, tags

    @contextlib.contextmanager
    def stage_run(self, stage: str, tags: dict[str, str]) -> Iterator[_StageRun]:
        import mlflow

        params = self.params
        run_name = f"train-{stage}-{self.mode}-{params.digest('base', 'train')}"
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name,
                              log_system_metrics=params.train.system_metrics) as mrun:
            mlflow.log_params({**tracking.flat_params(params, "base", "train"), "stage": stage})
            mlflow.set_tags({"loraflow.mode": self.mode, "loraflow.step": "train", "loraflow.stage": stage,
                             "git_commit": tracking.git_commit() or "", "data_sha256": self.tags["data_sha256"][stage],
                             **tags, **{k: v for k, v in self.tags.items() if k.startswith("dvc.")}})
            yield _StageRun(mrun.info.run_id, mlflow_callback(mrun.info.run_id, params.train.metrics_flush_every))

    def finish(self, run_id: str, adapter_dir: Path, info: dict[str, Any]) -> None:
        """The adapter, train_info and the final numbers go on the last stage's run (the one promote registers)."""
        import mlflow

        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({"tokens_per_second": float(info["tokens_per_second"] or 0),
                                "wall_seconds": info["wall_seconds"], "peak_memory_mb": info["peak_memory_mb"],
                                "tokens_seen": info["tokens_seen"]}, step=info["steps"])
            mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
            mlflow.set_tags({"adapter_sha256": info["adapter_sha256"], "train_data_sha256": info["train_data_sha256"],
                             "chat_template_sha256": info["chat_template_sha256"]})


class _StageRun:
    """One stage's MLflow run while it trains: its id, its metrics callback, artifacts and final metrics."""

    def __init__(self, run_id: str, callback) -> None:
        self.run_id, self.callback, self.callbacks = run_id, callback, [callback]

    @property
    def batches(self) -> int:
        return self.callback.calls

    def log_artifact(self, path: Path) -> None:
        import mlflow

        mlflow.log_artifact(str(path))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=step)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Progress:
    """Training progress with an ETA from the steps this process ran: a bar redrawn in place on a terminal,
    a log line at every 10% otherwise (Prefect workers, CI, files)."""

    WIDTH = 24

    def __init__(self, label: str, stream=None, tty: bool | None = None) -> None:
        import sys

        self.label, self.stream = label, stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.t0, self.first, self.total, self.loss, self.logged = 0.0, 0, 0, None, 0

    def begin(self, step: int, total: int) -> None:
        self.t0, self.first, self.total = time.time(), step, max(total, 1)
        self.logged = step * 10 // self.total

    def line(self, step: int) -> str:
        done = step - self.first
        elapsed = time.time() - self.t0
        eta = elapsed / done * (self.total - step) if done else None
        filled = self.WIDTH * step // self.total
        loss = f" loss {self.loss:.3f}" if self.loss is not None else ""
        return (f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {step}/{self.total} "
                f"{100 * step // self.total:3d}%{loss} elapsed {_clock(elapsed)} "
                f"ETA {_clock(eta) if eta is not None else '?'}")

    def step(self, step: int) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(step))
            self.stream.flush()
        elif step * 10 // self.total > self.logged:
            self.logged = step * 10 // self.total
            log.info("%s", self.line(step))

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def progress_callback(label: str, stream=None, tty: bool | None = None):
    """The Progress above as a TrainerCallback (trl's own tqdm bar is off: it has no 10% lines for logs)."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self.progress = Progress(label, stream, tty)

        def on_train_begin(self, args, state, control, **kwargs):
            self.progress.begin(int(state.global_step), int(state.max_steps))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.progress.loss = float(logs["loss"])

        def on_step_end(self, args, state, control, **kwargs):
            self.progress.step(int(state.global_step))

        def on_train_end(self, args, state, control, **kwargs):
            self.progress.end()

    return ProgressCallback()


def loss_chart(history: list[dict[str, Any]], title: str, path: Path) -> Path | None:
    """A PNG of training loss (and learning rate) per step; None when nothing was logged."""
    points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lr = [(h["step"], h["learning_rate"]) for h in history if "learning_rate" in h and "loss" in h]
    if lr:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in lr], [v for _, v in lr], color="tab:gray", linewidth=1, label="learning rate")
        ax2.set_ylabel("learning rate", color="tab:gray")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})  # no version string: same history -> same bytes
    plt.close(fig)
    return path

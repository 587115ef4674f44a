"""What `loraflow serve` is told on its command line (loraflow/cli.py fills it; tests build it directly)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from loraflow.serve.auth import ApiKey


@dataclasses.dataclass
class ServeSettings:
    root: Path = Path(".")
    params_file: str = "params.yaml"
    overrides: list[str] = dataclasses.field(default_factory=list)
    lru_size: int = 4  # adapters kept loaded; each SmolLM2 all-linear r=16 adapter is ~10 MB
    unknown_mode: Literal["base", "404"] = "base"
    poll_interval: float = 30.0  # seconds between registry polls; 0 = only on POST /adapters/reload
    max_messages: int = 64
    max_chars: int = 32_000  # all message contents together
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_batch: int = 32  # requests generated together in one batch; 1 = one at a time
    batch_window_ms: float = 10.0  # an idle server waits this long for more requests to share the first batch
    feedback_threshold: int = 50  # new feedback events for a mode that start a pipeline run; 0 = never
    trigger_command: str | None = None  # e.g. "python -m steps.curate ... {mode}"; None = Prefect or `loraflow run`
    deployment: str = "loraflow/on-demand"
    # train.warm_start for the runs feedback starts (before `overrides`, so a -S train.warm_start=... still wins):
    # champion continues the served adapter on the new records + a replay sample (measured: docs/benchmarks.md).
    feedback_warm_start: Literal["champion", "off"] = "champion"
    # Starts a pipeline run: (mode, root, params_file, overrides, trigger_command, deployment) -> how it started.
    # Handed in by the entry point (flows/cli.py: Prefect-aware); None = a local `loraflow run` process.
    trigger: Callable[..., dict[str, Any]] | None = None
    response_memory: int = 10_000  # served answers remembered so feedback can name just the response id
    keys: list[ApiKey] = dataclasses.field(default_factory=list)  # none: anyone may call (loopback only, or --insecure)
    rate_limit: int = 60  # requests per minute per key, unless the key names its own rpm

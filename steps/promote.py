"""promote: decide from the evaluation whether the candidate becomes `champion`, then record it in MLflow.

    python -m steps.promote --mode retail_media data/eval/retail_media/metrics.json \
        data/adapters/retail_media data/promotion/retail_media

The decision is the pure function `loraflow.promotion.decide`; `loraflow.registry.register` records it.
Aliases, not stages: `champion` is what serving uses, `challenger` the best candidate that did not pass the
gate or that awaits a person (policy `manual`). The pipeline never moves `champion` back; a run whose
champion changed since it was evaluated does not overwrite it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from loraflow import registry
from loraflow.config import Params, registered_model_name
from loraflow.io import atomic_dir, read_json, write_json
from loraflow.promotion import decide
from loraflow.stepcli import run_step

log = logging.getLogger(__name__)

def run(params: Params, mode: str, metrics_file: Path, adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Decide and record the promotion of one candidate adapter.

    Args:
        params: reads `base` and `promote`.
        mode: the registered model is loraflow-<mode>.
        metrics_file: evaluate's metrics.json.
        adapter_dir: the candidate adapter folder (train's output).
        out_dir: gets decision.json, written whole.
    """
    metrics = read_json(metrics_file)
    d = decide(metrics["candidate"], metrics["base"], metrics.get("champion"), params.promote, metrics.get("deltas"),
               metrics.get("forgetting"))
    if d.decision == "reject":
        # A regression is not registered: nothing in the registry can be served by mistake.
        reg = {"registered_model": registered_model_name(mode), "version": None, "aliases_after": None,
               "registry_note": "not registered"}
    else:
        reg = registry.register(params, mode, Path(adapter_dir), metrics, d)
    out = {"decision": d.decision, "reason": d.reason, **reg, "compared_to": d.compared_to,
           "policy": params.promote.model_dump()}
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "decision.json", out)
    log.info("promote: %s (%s)", d.decision, d.reason)
    return out


def main(argv: list[str] | None = None) -> None:
    run_step(__doc__, run, ("metrics_file", "adapter_dir", "out_dir"), argv)


if __name__ == "__main__":
    main()

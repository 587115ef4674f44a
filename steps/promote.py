"""promote: decide from the evaluation whether the candidate becomes `champion`, check that it is served as it
was evaluated, then record it in MLflow.

    python -m steps.promote --mode retail_media data/eval/retail_media/metrics.json \
        data/adapters/retail_media data/promotion/retail_media

The decision is the pure function `loraflow.promotion.decide`. A candidate that passes is registered (a version,
no alias moved yet), then the parity gate (`loraflow.parity.gate`, params `promote.parity`) replays the eval prompts
(predictions.jsonl beside metrics.json) on every serving target; a target that does not answer as evaluated
rejects the candidate, naming the target, the numbers and the first differing answer, and no alias moves.
Aliases, not stages: `champion` is what serving uses, `challenger` the best candidate that did not pass the
gate or that awaits a person (policy `manual`). The pipeline never moves `champion` back; a run whose
champion changed since it was evaluated does not overwrite it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from loraflow import parity, registry
from loraflow.config import Params, registered_model_name
from loraflow.io import atomic_dir, read_json, read_jsonl, reserved, write_json
from loraflow.promotion import decide
from loraflow.stepcli import run_step

log = logging.getLogger(__name__)
RESERVE = 256 << 10  # bytes claimed for decision.json before the registry is touched (a decision is a few KiB)


def run(params: Params, mode: str, metrics_file: Path, adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Decide, check parity and record the promotion of one candidate adapter.

    Args:
        params: reads `base`, `evaluate` (the parity gate's scorer) and `promote`.
        mode: the registered model is loraflow-<mode>.
        metrics_file: evaluate's metrics.json; its predictions.jsonl beside it holds the evaluated answers.
        adapter_dir: the candidate adapter folder (train's output).
        out_dir: gets decision.json, written whole.
    """
    metrics_file, out_dir = Path(metrics_file), Path(out_dir)
    previous = out_dir / "decision.json"
    # Room for decision.json first: a full disk must stop promote before anything is registered or moved.
    with reserved(out_dir, max(RESERVE, 4 * previous.stat().st_size if previous.exists() else 0)):
        out = _promote(params, mode, metrics_file, Path(adapter_dir))
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "decision.json", out)
    log.info("promote: %s (%s)", out["decision"], out["reason"])
    return out


def _promote(params: Params, mode: str, metrics_file: Path, adapter_dir: Path) -> dict[str, Any]:
    metrics = read_json(metrics_file)
    d = decide(metrics["candidate"], metrics["base"], metrics.get("champion"), params.promote, metrics.get("deltas"),
               metrics.get("forgetting"))
    par = None
    if d.decision == "reject":
        # A regression is not registered: nothing in the registry can be served by mistake.
        # The aliases are read back so the decision says which version stays champion.
        reg = {"registered_model": registered_model_name(mode), "version": None,
               "aliases_after": registry.current_aliases(params, mode), "registry_note": "not registered"}
    else:
        version = registry.register_version(params, mode, Path(adapter_dir), metrics, d)
        if params.promote.parity.targets:
            evaluated = parity.Evaluated.from_predictions(read_jsonl(metrics_file.parent / "predictions.jsonl"))
            par = parity.gate(params, mode, version, Path(adapter_dir), evaluated)
            registry.set_tags(params, mode, version, parity.version_tags(par))
        if par is not None and not par["passed"]:
            # Registered (its tags say why) but no alias points at it: it is never served.
            d = replace(d, decision="reject", reason=par["reason"])
            registry.set_tags(params, mode, version, {"decision": "reject", "decision_reason": d.reason})
            reg = {"registered_model": registered_model_name(mode), "version": version,
                   "aliases_after": registry.current_aliases(params, mode),
                   "registry_note": f"v{version} registered but failed the parity gate: no alias moved"}
        else:
            reg = registry.move(params, mode, version, metrics, d)
    return {"decision": d.decision, "reason": d.reason, **reg, "compared_to": d.compared_to, "parity": par,
            "policy": params.promote.model_dump()}


def main(argv: list[str] | None = None) -> None:
    run_step(__doc__, run, ("metrics_file", "adapter_dir", "out_dir"), argv)


if __name__ == "__main__":
    main()

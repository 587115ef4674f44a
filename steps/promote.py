"""promote: decide from the evaluation whether the candidate becomes `champion`, then record it in MLflow.

    python -m steps.promote --mode retail_media data/eval/retail_media/metrics.json \
        data/adapters/retail_media data/promotion/retail_media

The decision is the pure function `decide`; the registry write is thin. Aliases, not stages:
`champion` is what serving uses, `challenger` the best candidate that did not pass the gate or that
awaits a person (policy `manual`). The pipeline never moves `champion` back; a run whose champion
changed since it was evaluated does not overwrite it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflow import tracking
from loraflow.config import Params, PromoteParams, load_params, registered_model_name
from loraflow.io import atomic_dir, read_json, write_json
from loraflow.stepcli import step_errors, step_parser

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    decision: str  # "promote" | "challenger" | "reject"
    reason: str
    metric: str
    reference: str  # "champion" or "base"
    delta: float
    compared_to: dict[str, Any] = field(default_factory=dict)


def decide(candidate: dict, base: dict, champion: dict | None, policy: PromoteParams,
           deltas: dict | None = None) -> Decision:
    """Pure promotion rule on evaluation summaries ({metric: {"mean", "ci_low", "ci_high"}}).

    The primary metric must beat the champion (or the base when there is none) by more than
    `min_delta`, and, when `require_ci_above_zero`, the paired bootstrap interval of the difference must
    lie above zero. A candidate that fails that but still beats the base becomes `challenger`;
    one that does not beat the base is rejected. Policy `manual` turns a pass into `challenger`.
    """
    m = policy.primary_metric
    ref_name, ref = ("champion", champion) if champion else ("base", base)
    cand, refv, basev = candidate[m]["mean"], ref[m]["mean"], base[m]["mean"]
    delta = cand - refv
    compared = {"metric": m, "candidate": cand, ref_name: refv, "base": basev, "min_delta": policy.min_delta}
    ci = ((deltas or {}).get(f"candidate_vs_{ref_name}") or {}).get(m)
    gate = f"{m} {cand:.4f} vs {ref_name} {refv:.4f} (delta {delta:+.4f}, needs > {policy.min_delta:+.4f}"
    passed = delta > policy.min_delta
    if policy.require_ci_above_zero:
        if ci is None:
            passed, gate = False, gate + "; no confidence interval available"
        else:
            compared["ci_low"] = ci["ci_low"]
            passed = passed and ci["ci_low"] > 0
            gate += f"; CI low {ci['ci_low']:+.4f} must be > 0"
    gate += ")"
    if passed:
        if policy.policy == "auto":
            return Decision("promote", f"candidate beats {ref_name}: {gate}", m, ref_name, delta, compared)
        return Decision("challenger", f"candidate passes the gate but promote.policy=manual: a person decides; {gate}",
                        m, ref_name, delta, compared)
    if champion and cand - basev > policy.min_delta:
        return Decision("challenger", f"candidate beats base ({cand:.4f} vs {basev:.4f}) but not champion: {gate}",
                        m, ref_name, delta, compared)
    return Decision("reject", f"candidate does not beat {ref_name}: {gate}", m, ref_name, delta, compared)


def register(params: Params, mode: str, adapter_dir: Path, metrics: dict, decision: Decision) -> dict[str, Any]:
    """Create (or reuse) the registry version for this adapter and move aliases as decided."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from loraflow.pyfunc import AdapterModel

    name = registered_model_name(mode)
    tracking.setup(params, mode)
    client = mlflow.MlflowClient()
    info = read_json(adapter_dir / "train_info.json")
    sha = info["adapter_sha256"]
    try:
        client.create_registered_model(name, description=f"LoRA adapters for mode {mode!r}, managed by loraflow")
    except MlflowException:
        pass  # exists

    # Idempotent: the same adapter (by content hash) is registered once, however often promote re-runs.
    existing = client.search_model_versions(f"name='{name}' and tag.adapter_sha256='{sha}'")
    if existing:
        version = str(existing[0].version)
        log.info("promote: adapter %s already registered as %s v%s", sha[:12], name, version)
    else:
        with mlflow.start_run(run_id=info["mlflow_run_id"]):
            model_info = mlflow.pyfunc.log_model(
                name="model",
                python_model=AdapterModel(),
                artifacts={"adapter": str(adapter_dir)},
                model_config={"base_model": params.base.model, "model_cache": params.base.model_cache},
                pip_requirements=["loraflow", "torch", "transformers", "peft", "mlflow"],
                registered_model_name=name,
            )
        version = str(model_info.registered_model_version)
    m = decision.metric
    tags = {
        "adapter_sha256": sha,
        "train_data_sha256": info.get("train_data_sha256", ""),
        "git_commit": info.get("git_commit") or "",
        "base_model": params.base.model,
        "decision": decision.decision,
        "decision_reason": decision.reason,
        f"eval_{m}_candidate": f"{metrics['candidate'][m]['mean']:.4f}",
        f"eval_{m}_base": f"{metrics['base'][m]['mean']:.4f}",
        "eval_set_sha256": metrics["eval_set"]["sha256"],
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)

    aliases = _aliases(client, name)
    if decision.decision == "promote":
        # Compare-and-set: only move champion if it still points where it did when we were evaluated.
        if aliases.get("champion") == version:
            pass  # a re-run of a promotion that already happened
        elif aliases.get("champion") != metrics.get("champion_version"):
            log.warning("promote: champion moved to v%s since evaluation (was v%s); leaving it, marking challenger",
                        aliases.get("champion"), metrics.get("champion_version"))
            client.set_registered_model_alias(name, "challenger", version)
        else:
            if aliases.get("champion"):
                client.set_model_version_tag(name, version, "previous_champion", aliases["champion"])
            client.set_registered_model_alias(name, "champion", version)
    elif decision.decision == "challenger":
        client.set_registered_model_alias(name, "challenger", version)
    return {"registered_model": name, "version": version, "aliases_after": _aliases(client, name)}


def _aliases(client, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


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
    d = decide(metrics["candidate"], metrics["base"], metrics.get("champion"), params.promote, metrics.get("deltas"))
    if d.decision == "reject":
        # A regression is not registered: nothing in the registry can be served by mistake.
        reg = {"registered_model": registered_model_name(mode), "version": None, "aliases_after": None}
    else:
        reg = register(params, mode, Path(adapter_dir), metrics, d)
    out = {"decision": d.decision, "reason": d.reason, **reg, "compared_to": d.compared_to,
           "policy": params.promote.model_dump()}
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "decision.json", out)
    log.info("promote: %s (%s)", d.decision, d.reason)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = step_parser(__doc__)
    ap.add_argument("--mode", required=True)
    ap.add_argument("metrics_file", type=Path)
    ap.add_argument("adapter_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args(argv)
    with step_errors():
        run(load_params(args.params, args.set), args.mode, args.metrics_file, args.adapter_dir, args.out_dir)


if __name__ == "__main__":
    main()

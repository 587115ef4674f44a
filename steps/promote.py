"""promote: decide from the evaluation whether the candidate becomes `champion`, then record it in MLflow.

    python -m steps.promote --mode retail_media data/eval/retail_media/metrics.json \
        data/adapters/retail_media data/promotion/retail_media

The decision is the pure function `decide`; the registry write is thin. Aliases, not stages:
`champion` is what serving uses, `challenger` the best candidate that did not pass the gate or that
awaits a person (policy `manual`). The pipeline never moves `champion` back; a run whose champion
changed since it was evaluated does not overwrite it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflow import degeneration, generation, registry, tracking
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


def _primary(m: str, candidate: dict, ref: dict, ref_name: str, policy: PromoteParams,
             deltas: dict | None) -> tuple[bool, str, dict[str, Any]]:
    """The gate on the primary metric against one reference: (passed, words with numbers, numbers)."""
    cand, refv = candidate[m]["mean"], ref[m]["mean"]
    delta = cand - refv
    nums: dict[str, Any] = {"candidate": cand, ref_name: refv, "delta": delta}
    text = f"{m} {cand:.4f} vs {ref_name} {refv:.4f} (delta {delta:+.4f}, needs > {policy.min_delta:+.4f}"
    passed = delta > policy.min_delta
    if policy.require_ci_above_zero:
        ci = ((deltas or {}).get(f"candidate_vs_{ref_name}") or {}).get(m)
        if ci is None:
            passed, text = False, text + "; no confidence interval available"
        else:
            nums["ci_low"] = ci["ci_low"]
            passed = passed and ci["ci_low"] > 0
            text += f"; CI low {ci['ci_low']:+.4f} must be > 0"
    return passed, text + ")", nums


def _forgetting_sets(forgetting: dict | None) -> dict[str, dict]:
    if not forgetting:
        return {}
    return forgetting.get("sets", forgetting)


def _rate(summary: dict | None, name: str) -> float | None:
    rate = ((summary or {}).get("degeneration") or {}).get(name)
    return None if rate is None else rate["mean"]


# rate -> (what it is, True when higher is worse)
_RATES = {k: degeneration.RATES[k] for k in ("stop_rate", "loop_rate")}  # the two with floors and guards


def _degeneration(candidate: dict, ref: dict, ref_name: str, policy: PromoteParams,
                  forgetting: dict | None) -> tuple[list[str], list[str], dict[str, Any]]:
    """Degenerate answers: floors on the eval set's stop and loop rates, then no set (eval + forgetting sets)
    worse than the reference by more than `degeneration_tolerance`. Rates missing from the metrics fail a
    floor that is on (an evaluation that did not measure them proves nothing)."""
    failed, held, nums = [], [], {}
    floors = {"stop_rate": ("min_stop_rate", policy.min_stop_rate), "loop_rate": ("max_loop_rate", policy.max_loop_rate)}
    for rate, (key, limit) in floors.items():
        if limit is None:
            continue
        what, higher_worse = _RATES[rate]
        value = _rate(candidate, rate)
        if value is None:
            failed.append(f"degeneration floor promote.{key}: the metrics hold no {rate} (evaluate again)")
            continue
        nums[f"degeneration:{key}"] = {"candidate": value, "limit": limit}
        bad = value > limit if higher_worse else value < limit
        text = (f"degeneration floor promote.{key}: {rate} {value:.3f} ({what}) "
                f"{'>' if bad and higher_worse else '<' if bad else 'within'} {limit:.2f}")
        (failed if bad else held).append(text)
    tol = policy.degeneration_tolerance
    sets = {"the eval set": (candidate, ref, ref_name)}
    for name, scores in _forgetting_sets(forgetting).items():
        r_name = ref_name if scores.get(ref_name) else "base"
        sets[repr(name)] = (scores["candidate"], scores[r_name], r_name)
    for where, (cand, reference, r_name) in ({} if tol is None else sets).items():
        for rate, (_what, higher_worse) in _RATES.items():
            c, r = _rate(cand, rate), _rate(reference, rate)
            if c is None or r is None:
                continue
            worse = (c - r) if higher_worse else (r - c)
            nums[f"degeneration:{where}:{rate}"] = {"candidate": c, r_name: r, "tolerance": tol}
            text = (f"degeneration on {where}: {rate} {c:.3f} vs {r_name} {r:.3f} "
                    f"({'rise' if higher_worse else 'drop'} {worse:+.3f}, tolerance {tol:.2f})")
            (failed if worse > tol else held).append(text)
    return failed, held, nums


def _guards(candidate: dict, ref: dict, ref_name: str, policy: PromoteParams,
            forgetting: dict | None) -> tuple[list[str], list[str], dict[str, Any]]:
    """Guard metrics, degenerate answers and the forgetting guard against one reference:
    (failures, holds, numbers)."""
    failed, held, nums = [], [], {}
    for g, tol in policy.guards.items():
        cand, refv = candidate[g]["mean"], ref[g]["mean"]
        nums[g] = {"candidate": cand, ref_name: refv, "tolerance": tol}
        text = f"{g} {cand:.4f} vs {ref_name} {refv:.4f} (drop {refv - cand:+.4f}, tolerance {tol:.4f})"
        (failed if refv - cand > tol else held).append(text)
    d_failed, d_held, d_nums = _degeneration(candidate, ref, ref_name, policy, forgetting)
    failed, held = failed + d_failed, held + d_held
    nums.update(d_nums)
    tol = policy.forgetting_tolerance
    metric = (forgetting or {}).get("metric", policy.primary_metric)
    for set_name, scores in ({} if tol is None else _forgetting_sets(forgetting)).items():
        # Compare with the same model the gate compares with; a set the champion was not scored on uses base.
        r_name = ref_name if scores.get(ref_name) else "base"
        cand, refv = scores["candidate"][metric]["mean"], scores[r_name][metric]["mean"]
        nums[f"forgetting:{set_name}"] = {"candidate": cand, r_name: refv, "tolerance": tol}
        text = (f"forgetting on {set_name!r}: {metric} {cand:.4f} vs {r_name} {refv:.4f} "
                f"(drop {refv - cand:+.4f}, tolerance {tol:.4f})")
        (failed if refv - cand > tol else held).append(text)
    return failed, held, nums


def decide(candidate: dict, base: dict, champion: dict | None, policy: PromoteParams,
           deltas: dict | None = None, forgetting: dict | None = None) -> Decision:
    """Pure promotion rule on evaluation summaries ({metric: {"mean", "ci_low", "ci_high"}}).

    The primary metric must beat the champion (or the base when there is none) by more than `min_delta`
    and, when `require_ci_above_zero`, the paired bootstrap interval of the difference must lie above zero.
    The candidate's answers must end their turn and not loop often (`min_stop_rate`, `max_loop_rate` on the
    eval set's `degeneration` rates) nor more than the reference does beyond `degeneration_tolerance` on
    any set. Each guard metric (`guards: {metric: tolerance}`) may not fall more than its tolerance below the same
    reference, nor may the primary metric on any set of `forgetting` (metrics.json's section:
    `{"metric"?: str, "sets": {name: {"base": summary, "champion": summary | None, "candidate": summary}}}`)
    fall more than `forgetting_tolerance`. A candidate that fails against the champion but passes all of
    that against the base becomes `challenger`; anything else that fails is rejected. Policy `manual`
    turns a pass into `challenger`.
    """
    m = policy.primary_metric
    ref_name, ref = ("champion", champion) if champion else ("base", base)
    ok, gate, nums = _primary(m, candidate, ref, ref_name, policy, deltas)
    failed, held, gnums = _guards(candidate, ref, ref_name, policy, forgetting)
    compared = {"metric": m, **nums, "base": base[m]["mean"], "min_delta": policy.min_delta, "guards": gnums}
    delta = nums["delta"]
    guard_words = (f"; guards held: {'; '.join(held)}" if held else "")
    if ok and not failed:
        if policy.policy == "auto":
            return Decision("promote", f"candidate beats {ref_name}: {gate}{guard_words}", m, ref_name, delta, compared)
        return Decision("challenger", f"candidate passes the gate but promote.policy=manual: a person decides; "
                                      f"{gate}{guard_words}", m, ref_name, delta, compared)
    why = ("; ".join(([] if ok else [f"primary {gate}"]) + [f"guard regressed: {f}" for f in failed]))
    if champion:
        b_ok, b_gate, _ = _primary(m, candidate, base, "base", policy, deltas)
        b_failed, _, _ = _guards(candidate, base, "base", policy, forgetting)
        if b_ok and not b_failed:
            return Decision("challenger", f"candidate beats base ({b_gate}) but not champion: {why}",
                            m, ref_name, delta, compared)
    return Decision("reject", f"candidate does not pass the gate against {ref_name}: {why}", m, ref_name, delta, compared)


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def chat_template_sha256(adapter_dir: Path) -> str:
    """Hash of the chat template saved with the adapter: a template change changes what the model sees."""
    jinja = adapter_dir / "chat_template.jinja"
    if jinja.exists():
        return _sha256_bytes(jinja.read_bytes())
    cfg = adapter_dir / "tokenizer_config.json"
    template = read_json(cfg).get("chat_template") if cfg.exists() else None
    return _sha256_bytes(json.dumps(template, sort_keys=True).encode()) if template else "none"


def _version_tags(params: Params, adapter_dir: Path, mode: str, info: dict, metrics: dict,
                  decision: Decision) -> dict[str, str]:
    summary = {n: {k: round(v["mean"], 6) for k, v in metrics[n].items() if isinstance(v, dict) and "mean" in v}
               for n in ("base", "champion", "candidate") if metrics.get(n)}
    tags = {
        "mode": mode,
        "adapter_sha256": info["adapter_sha256"],
        "train_data_sha256": info.get("train_data_sha256", ""),
        "eval_set_sha256": metrics["eval_set"]["sha256"],
        "chat_template_sha256": chat_template_sha256(adapter_dir),
        "git_commit": info.get("git_commit") or tracking.git_commit() or "",
        "base_model": params.base.model,
        "params.train": json.dumps(info.get("params", {}), sort_keys=True),
        "params.promote": json.dumps(params.promote.model_dump(), sort_keys=True),
        "metrics": json.dumps(summary, sort_keys=True),
        "decision": decision.decision,
        "decision_reason": decision.reason,
        "evaluated_against_champion": str(metrics.get("champion_version") or "none"),
        **tracking.dvc_hashes(adapter_dir, mode),
    }
    return tags


def register(params: Params, mode: str, adapter_dir: Path, metrics: dict, decision: Decision) -> dict[str, Any]:
    """Create (or reuse) the registry version for this adapter and move aliases as decided."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

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
        signature = infer_signature(["What is retail media?"], ["An answer."],
                                    params={"max_new_tokens": generation.load(adapter_dir, params.generate).max_new_tokens})
        with mlflow.start_run(run_id=info["mlflow_run_id"]):
            model_info = mlflow.pyfunc.log_model(
                name="model",
                python_model=AdapterModel(),
                artifacts={"adapter": str(adapter_dir)},
                model_config={"base_model": params.base.model, "model_cache": params.base.model_cache},
                signature=signature,
                pip_requirements=["loraflow", "torch", "transformers", "peft", "mlflow"],
                registered_model_name=name,
            )
        version = str(model_info.registered_model_version)
    for k, v in _version_tags(params, Path(adapter_dir), mode, info, metrics, decision).items():
        client.set_model_version_tag(name, version, k, v)
    with registry.alias_lock(client, name):
        note = _move_aliases(client, name, version, metrics, decision, params.promote.min_delta)
    client.set_model_version_tag(name, version, "alias_outcome", note)
    return {"registered_model": name, "version": version, "aliases_after": registry.aliases(client, name),
            "registry_note": note}


def _move_aliases(client, name: str, version: str, metrics: dict, decision: Decision, min_delta: float) -> str:
    """Compare-and-set under the lock: re-read `champion`, then move it only if that is still right."""
    if decision.decision == "challenger":
        client.set_registered_model_alias(name, "challenger", version)
        return "challenger: " + decision.reason
    current = registry.aliases(client, name).get("champion")
    evaluated_against = metrics.get("champion_version")
    evaluated_against = str(evaluated_against) if evaluated_against else None
    mv = client.get_model_version(name, version)
    if current == version:
        return f"already champion (v{version}); nothing moved"
    if registry.ROLLED_BACK_TAG in mv.tags:
        # A person rolled this adapter back: the pipeline never undoes that.
        return f"not moved: v{version} was rolled back ({mv.tags[registry.ROLLED_BACK_TAG]})"
    if current == evaluated_against:
        # The reason is in the version's decision_reason tag; the history stays short enough to read in the UI.
        registry.move_champion(client, name, version, "pipeline (promote, policy auto)")
        return f"champion moved to v{version} (was {('v' + current) if current else 'none'})"
    # Champion moved since this candidate was evaluated. A sibling run evaluated against the same champion on
    # the same eval set can be compared on the same numbers (the better one wins); anything else (a person's
    # choice, a newer lineage) is left alone.
    cur = client.get_model_version(name, current) if current else None
    m = decision.metric
    if (cur is not None and cur.tags.get("evaluated_against_champion") == str(evaluated_against or "none")
            and cur.tags.get("eval_set_sha256") == metrics["eval_set"]["sha256"]
            and "metrics" in cur.tags and _by_pipeline(client, name, current)):
        # Same eval set, same reference: the means in its `metrics` tag (6 decimals) compare with ours.
        theirs, ours = json.loads(cur.tags["metrics"])["candidate"][m], round(metrics["candidate"][m]["mean"], 6)
        if ours - theirs > min_delta:
            registry.move_champion(client, name, version, "pipeline (promote, policy auto)",
                                   f"beat concurrent v{current}")
            # The displaced sibling passed the gate too: it ends where it would have had it come second.
            client.set_registered_model_alias(name, "challenger", current)
            return f"champion moved to v{version}: beats v{current}, promoted concurrently ({m} {ours:.4f} vs {theirs:.4f})"
        client.set_registered_model_alias(name, "challenger", version)
        return f"challenger: concurrent champion v{current} is as good or better ({m} {theirs:.4f} vs {ours:.4f})"
    log.warning("promote: champion moved to v%s since evaluation (against %s); leaving it, marking challenger",
                current, evaluated_against or "no champion")
    client.set_registered_model_alias(name, "challenger", version)
    return (f"challenger: champion moved to v{current} since this candidate was evaluated "
            f"(against {('v' + evaluated_against) if evaluated_against else 'no champion'}); left as it is")


def _by_pipeline(client, name: str, version: str) -> bool:
    events = registry.history(client, name)
    return bool(events) and events[-1]["version"] == version and events[-1]["by"].startswith("pipeline")


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

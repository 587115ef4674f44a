"""The promotion rule: a pure function from evaluation summaries and the policy to a Decision.

No I/O and no registry here (loraflow.registry records what was decided), so the rule is unit-tested on plain
numbers. Aliases, not stages: `promote` makes the candidate `champion` (what serving uses); `challenger` is
the best candidate that did not pass the gate or that awaits a person (policy `manual`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraflow import degeneration
from loraflow.config import PromoteParams


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
    nums["margin"] = delta - policy.min_delta
    if policy.require_ci_above_zero:
        ci = ((deltas or {}).get(f"candidate_vs_{ref_name}") or {}).get(m)
        if ci is None:  # nothing to measure a margin against: fails closed
            del nums["margin"]
            return False, text + "; no confidence interval available)", nums
        nums["ci_low"] = ci["ci_low"]
        nums["margin"] = min(nums["margin"], ci["ci_low"])
        text += f"; CI low {ci['ci_low']:+.4f} must be > 0"
    return nums["margin"] > 0, text + ")", nums


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
        margin = (limit - value) if higher_worse else (value - limit)
        nums[f"degeneration:{key}"] = {"candidate": value, "limit": limit, "margin": margin}
        bad = margin < 0
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
            margin = tol - worse
            nums[f"degeneration:{where}:{rate}"] = {"candidate": c, r_name: r, "tolerance": tol, "margin": margin}
            text = (f"degeneration on {where}: {rate} {c:.3f} vs {r_name} {r:.3f} "
                    f"({'rise' if higher_worse else 'drop'} {worse:+.3f}, tolerance {tol:.2f})")
            (failed if margin < 0 else held).append(text)
    return failed, held, nums


def _guards(candidate: dict, ref: dict, ref_name: str, policy: PromoteParams,
            forgetting: dict | None) -> tuple[list[str], list[str], dict[str, Any]]:
    """Guard metrics, degenerate answers and the forgetting guard against one reference:
    (failures, holds, numbers)."""
    failed, held, nums = [], [], {}
    for g, tol in policy.guards.items():
        cand, refv = candidate[g]["mean"], ref[g]["mean"]
        nums[g] = {"candidate": cand, ref_name: refv, "tolerance": tol, "margin": tol - (refv - cand)}
        text = f"{g} {cand:.4f} vs {ref_name} {refv:.4f} (drop {refv - cand:+.4f}, tolerance {tol:.4f})"
        (failed if nums[g]["margin"] < 0 else held).append(text)
    d_failed, d_held, d_nums = _degeneration(candidate, ref, ref_name, policy, forgetting)
    failed, held = failed + d_failed, held + d_held
    nums.update(d_nums)
    tol = policy.forgetting_tolerance
    metric = (forgetting or {}).get("metric", policy.primary_metric)
    for set_name, scores in ({} if tol is None else _forgetting_sets(forgetting)).items():
        # Compare with the same model the gate compares with; a set the champion was not scored on uses base.
        r_name = ref_name if scores.get(ref_name) else "base"
        cand, refv = scores["candidate"][metric]["mean"], scores[r_name][metric]["mean"]
        margin = tol - (refv - cand)
        nums[f"forgetting:{set_name}"] = {"candidate": cand, r_name: refv, "tolerance": tol, "margin": margin}
        text = (f"forgetting on {set_name!r}: {metric} {cand:.4f} vs {r_name} {refv:.4f} "
                f"(drop {refv - cand:+.4f}, tolerance {tol:.4f})")
        (failed if margin < 0 else held).append(text)
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
    fall more than `forgetting_tolerance`. `compared_to` carries each check's numbers and its `margin`: how far
    inside its limit the candidate is (negative: failed by that much; the primary metric fails at 0 too, the
    guards pass at 0). A candidate that fails against the champion but passes all of
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

"""decide() on plain numbers: better, equal, worse, within noise, manual policy, no champion."""

from __future__ import annotations

from loraflow.config import PromoteParams
from steps.promote import decide


def s(mean: float, lo: float | None = None, hi: float | None = None) -> dict:
    return {"rougeL": {"mean": mean, "ci_low": lo if lo is not None else mean, "ci_high": hi if hi is not None else mean}}


AUTO = PromoteParams()


def test_better_than_base_with_no_champion_promotes():
    d = decide(s(0.5), s(0.3), None, AUTO)
    assert d.decision == "promote" and d.reference == "base" and abs(d.delta - 0.2) < 1e-9
    assert "0.5000" in d.reason and "0.3000" in d.reason


def test_equal_to_reference_is_rejected():
    d = decide(s(0.3), s(0.3), None, AUTO)
    assert d.decision == "reject"


def test_worse_than_base_is_rejected():
    assert decide(s(0.2), s(0.3), None, AUTO).decision == "reject"


def test_champion_is_the_reference_when_present():
    d = decide(s(0.45), s(0.3), s(0.5), AUTO)
    assert d.decision == "challenger" and d.reference == "champion"  # beats base, not champion
    assert decide(s(0.55), s(0.3), s(0.5), AUTO).decision == "promote"
    assert decide(s(0.25), s(0.3), s(0.5), AUTO).decision == "reject"


def test_min_delta_demands_a_margin():
    pol = PromoteParams(min_delta=0.05)
    assert decide(s(0.33), s(0.3), None, pol).decision == "reject"
    assert decide(s(0.36), s(0.3), None, pol).decision == "promote"


def test_within_noise_fails_when_ci_required():
    pol = PromoteParams(require_ci_above_zero=True)
    deltas = {"candidate_vs_base": {"rougeL": {"mean": 0.02, "ci_low": -0.03, "ci_high": 0.07}}}
    d = decide(s(0.32), s(0.3), None, pol, deltas)
    assert d.decision == "reject" and "CI low -0.0300" in d.reason
    deltas["candidate_vs_base"]["rougeL"]["ci_low"] = 0.01
    assert decide(s(0.32), s(0.3), None, pol, deltas).decision == "promote"


def test_manual_policy_never_promotes():
    d = decide(s(0.9), s(0.3), None, PromoteParams(policy="manual"))
    assert d.decision == "challenger" and "manual" in d.reason

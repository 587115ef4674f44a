"""decide() on plain numbers: better, equal, worse, within noise, guard regression, forgetting, manual policy,
no champion."""

from __future__ import annotations

import pytest

from loraflow.config import PromoteParams
from loraflow.promotion import decide


def _m(v: float) -> dict:
    return {"mean": v, "ci_low": v, "ci_high": v}


def s(mean: float, lo: float | None = None, hi: float | None = None, bertscore: float = 0.8,
      stop: float = 1.0, loop: float = 0.0) -> dict:
    return {"rougeL": {"mean": mean, "ci_low": lo if lo is not None else mean, "ci_high": hi if hi is not None else mean},
            "bertscore": _m(bertscore), "degeneration": {"stop_rate": _m(stop), "loop_rate": _m(loop)}}


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


def test_equal_to_champion_is_not_promoted():
    d = decide(s(0.5), s(0.3), s(0.5), AUTO)
    assert d.decision == "challenger" and "delta +0.0000" in d.reason  # beats base, ties champion


GUARDED = PromoteParams(guards={"bertscore": 0.02})


def test_guard_regression_blocks_a_better_primary():
    d = decide(s(0.5, bertscore=0.75), s(0.3, bertscore=0.8), None, GUARDED)
    assert d.decision == "reject"
    assert "guard regressed: bertscore 0.7500 vs base 0.8000 (drop +0.0500, tolerance 0.0200)" in d.reason
    assert d.compared_to["guards"]["bertscore"] == {"candidate": 0.75, "base": 0.8, "tolerance": 0.02,
                                                    "margin": pytest.approx(-0.03)}


def test_guard_drop_within_tolerance_passes_and_is_reported():
    d = decide(s(0.5, bertscore=0.79), s(0.3, bertscore=0.8), None, GUARDED)
    assert d.decision == "promote" and "guards held: bertscore 0.7900 vs base 0.8000" in d.reason


def test_guard_regression_against_champion_only_makes_a_challenger():
    d = decide(s(0.6, bertscore=0.80), s(0.3, bertscore=0.79), s(0.5, bertscore=0.85), GUARDED)
    assert d.decision == "challenger" and "bertscore 0.8000 vs champion 0.8500" in d.reason


def _forgetting(cand: float, base: float, champion: float | None = None) -> dict:
    one = {"base": s(base), "champion": s(champion) if champion is not None else None, "candidate": s(cand)}
    return {"metric": "rougeL", "sets": {"general": one}}


def test_forgetting_guard_rejects_a_candidate_that_forgets_other_sets():
    d = decide(s(0.5), s(0.3), None, AUTO, forgetting=_forgetting(0.20, 0.30))
    assert d.decision == "reject" and "forgetting on 'general': rougeL 0.2000 vs base 0.3000" in d.reason
    assert decide(s(0.5), s(0.3), None, AUTO, forgetting=_forgetting(0.29, 0.30)).decision == "promote"
    off = PromoteParams(forgetting_tolerance=None)
    assert decide(s(0.5), s(0.3), None, off, forgetting=_forgetting(0.20, 0.30)).decision == "promote"


def test_forgetting_guard_compares_with_champion_when_it_was_scored():
    d = decide(s(0.6), s(0.3), s(0.5), AUTO, forgetting=_forgetting(0.30, 0.30, champion=0.40))
    assert d.decision == "challenger" and "forgetting on 'general': rougeL 0.3000 vs champion 0.4000" in d.reason


def test_within_noise_against_champion_with_ci_required():
    pol = PromoteParams(require_ci_above_zero=True)
    deltas = {"candidate_vs_champion": {"rougeL": {"mean": 0.01, "ci_low": -0.04, "ci_high": 0.06}},
              "candidate_vs_base": {"rougeL": {"mean": 0.2, "ci_low": 0.1, "ci_high": 0.3}}}
    d = decide(s(0.51), s(0.31), s(0.5), pol, deltas)
    assert d.decision == "challenger" and "CI low -0.0400 must be > 0" in d.reason


def test_default_gate_rejects_a_looping_adapter_that_raised_rouge():
    """The numbers of a real candidate (issue 13): ROUGE-L +0.047 over base, but 33% of its answers end their
    turn and 71% loop. The gate as params.yaml ships it rejects it and says which guard and by how much."""
    from pathlib import Path

    from loraflow.config import load_params

    default = load_params(Path(__file__).resolve().parents[1] / "params.yaml").promote
    d = decide(s(0.143, stop=0.333, loop=0.714), s(0.096, stop=0.857, loop=0.048), None, default)
    assert d.decision == "reject"
    assert "degeneration floor promote.max_loop_rate: loop_rate 0.714 (answers that loop) > 0.20" in d.reason
    assert "degeneration floor promote.min_stop_rate: stop_rate 0.333 (answers that end their turn) < 0.80" in d.reason
    assert "degeneration on the eval set: loop_rate 0.714 vs base 0.048 (rise +0.666, tolerance 0.10)" in d.reason
    assert "primary" not in d.reason  # ROUGE-L itself passed: only the degeneration guards stopped it
    assert d.compared_to["guards"]["degeneration:max_loop_rate"] == {"candidate": 0.714, "limit": 0.2,
                                                                      "margin": pytest.approx(0.2 - 0.714)}


def test_degeneration_worse_than_the_reference_beyond_tolerance_fails_above_the_floors():
    d = decide(s(0.5, stop=0.85), s(0.3, stop=1.0), None, AUTO)  # floor 0.8 holds, but a 0.15 drop > 0.1
    assert d.decision == "reject" and "degeneration on the eval set: stop_rate 0.850 vs base 1.000 (drop +0.150" in d.reason
    assert decide(s(0.5, stop=0.95), s(0.3, stop=1.0), None, AUTO).decision == "promote"
    off = PromoteParams(degeneration_tolerance=None)
    assert decide(s(0.5, stop=0.85), s(0.3, stop=1.0), None, off).decision == "promote"


def test_degeneration_on_a_forgetting_set_names_the_set():
    forgetting = {"metric": "rougeL", "sets": {"general": {"base": s(0.3), "champion": None,
                                                           "candidate": s(0.3, loop=0.4)}}}
    d = decide(s(0.5), s(0.3), None, AUTO, forgetting=forgetting)
    assert d.decision == "reject" and "degeneration on 'general': loop_rate 0.400 vs base 0.000" in d.reason


def test_missing_degeneration_rates_fail_closed_unless_the_floors_are_off():
    bare = {"rougeL": _m(0.5)}
    d = decide(bare, {"rougeL": _m(0.3)}, None, AUTO)
    assert d.decision == "reject" and "the metrics hold no loop_rate" in d.reason
    off = PromoteParams(min_stop_rate=None, max_loop_rate=None)
    assert decide(bare, {"rougeL": _m(0.3)}, None, off).decision == "promote"


def test_the_gate_writes_each_checks_margin_and_the_margins_benchmark_reads_it():
    """decide() writes every check's margin into compared_to (decision.json): > 0 exactly where the check passed,
    the distance to failing in the gate's own units; bench/margins.py reads those, restating no rule."""
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("margins", ROOT / "bench" / "margins.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    policy = PromoteParams(guards={"bertscore": 0.02})
    cases = [  # (candidate, forgetting: candidate vs base), each with one guard just held or just failed
        (s(0.5, stop=0.85, loop=0.15, bertscore=0.79), _forgetting(0.29, 0.30)),
        (s(0.5, stop=0.75, loop=0.25, bertscore=0.77), _forgetting(0.27, 0.30)),
        (s(0.31), None),
    ]
    for cand, forgetting in cases:
        d = decide(cand, s(0.3, stop=0.9, loop=0.1), None, policy, forgetting=forgetting)
        m = bench.margins(d.compared_to)
        failed = {k for k, v in m.items() if v <= 0}
        assert (d.decision == "promote") == (not failed), (d.reason, m)
        for name in failed:  # each failed guard is named in the gate's reason
            word = {"degeneration:min_stop_rate": "stop_rate", "degeneration:max_loop_rate": "loop_rate"}.get(name, name.split(":")[-1])
            assert word.split()[0] in d.reason, (name, d.reason)
    m = bench.margins(decide(*cases[0][:1], s(0.3, stop=0.9, loop=0.1), None, policy, forgetting=cases[0][1]).compared_to)
    assert m["forgetting:general"] == pytest.approx(0.29 - (0.30 - 0.02))
    assert m["bertscore"] == pytest.approx(0.79 - (0.8 - 0.02)) and m["delta rougeL vs base"] == pytest.approx(0.2)
    assert m["degeneration:min_stop_rate"] == pytest.approx(0.85 - 0.8)
    # with the interval required, the primary's margin is the nearer of its two limits
    ci = {"candidate_vs_base": {"rougeL": {"ci_low": 0.05, "ci_high": 0.3}}}
    d = decide(s(0.31), s(0.3), None, PromoteParams(require_ci_above_zero=True, min_delta=0.0), deltas=ci)
    assert d.decision == "promote" and d.compared_to["margin"] == pytest.approx(0.01)
    ci["candidate_vs_base"]["rougeL"]["ci_low"] = -0.002
    d = decide(s(0.31), s(0.3), None, PromoteParams(require_ci_above_zero=True, min_delta=0.0), deltas=ci)
    assert d.decision == "reject" and d.compared_to["margin"] == pytest.approx(-0.002)
    # no interval at all: the gate fails closed and claims no margin; the benchmark reads that as failed
    d = decide(s(0.31), s(0.3), None, PromoteParams(require_ci_above_zero=True, min_delta=0.0))
    assert d.decision == "reject" and "margin" not in d.compared_to
    assert bench.margins(d.compared_to)["delta rougeL vs base"] < 0

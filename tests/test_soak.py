"""The serve soak (bench/soak.py), shortened: the real `loraflow serve` process under mixed load (streams, hang-ups,
feedback, a broken adapter, champions moving every few seconds in a real SQLite registry, --lru-size below the
modes), then every promise checked. SOAK_SECONDS lengthens the load (default 90 s; the measured 5-minute run and its
figures are in docs/reliability.md)."""

from __future__ import annotations

import os

import pytest

from bench import soak

pytestmark = pytest.mark.slow


def test_serve_soak_keeps_every_promise(tmp_path, capsys):
    seconds = os.environ.get("SOAK_SECONDS", "90")
    a = soak.parse(["--seconds", seconds, "--clients", "4", "--workdir", str(tmp_path / "soak")])
    with capsys.disabled():  # its progress and figures are the test's story
        r = soak.soak(a)
    f = r["figures"]
    # the load was what it says: every kind of request, the broken mode, hung-up streams, moves, feedback
    assert f["hangups"] >= 1 and f["broken_requests"] >= 1 and f["feedback_acked"] >= 1 and f["answers"] >= 1, f
    # the mover's registry writes take their time on a busy machine: 24 moves in 90 s at load average 10
    assert f["moves"] >= int(float(seconds) / a.move_every) // 2 and f["move_errors"] == 0, f
    assert set(f["kinds"]) >= set(soak.KINDS), f["kinds"]
    broken = {name: detail for name, (ok, detail) in r["checks"].items() if not ok}
    assert not broken, "\n".join(f"{k}: {v}" for k, v in broken.items())

"""Two runs of one mode at once, with real processes: the second refuses naming the holder (or waits for it with
$LORAFLOW_LOCK_WAIT), the step commands `dvc repro` runs and `loraflow run` alike; a killed holder blocks nobody."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraflow import runlock
from tests.conftest import MODE, ROOT, chat, write_jsonl

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _holder(root: Path, mode: str, *, lines: int = 0, env: dict | None = None) -> subprocess.Popen:
    """A process that takes the mode's lock, says so on stdout, appends `lines` lines to data/curated/<mode>/log
    one by one (0.05 s apart) and holds on until its stdin closes."""
    script = f"""
import sys, time, os
from loraflow import runlock
with runlock.hold({str(root)!r}, {mode!r}, command="holder-" + str(os.getpid())):
    print("held", time.time(), flush=True)
    log = os.path.join({str(root)!r}, "data", "curated", {mode!r}, "log")
    for i in range({lines}):
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "a") as f:
            f.write(f"{{os.getpid()}} {{i}}\\n")
        time.sleep(0.05)
    sys.stdin.read()
    print("released", time.time(), flush=True)
"""
    return subprocess.Popen([sys.executable, "-c", script], cwd=root, env={**ENV, **(env or {})}, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_held(proc: subprocess.Popen) -> float:
    line = proc.stdout.readline()
    assert line.startswith("held"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return float(line.split()[1])


def test_a_step_command_refuses_while_another_process_runs_the_mode_naming_it(tmp_path):
    write_jsonl(tmp_path / "data" / "raw" / "m" / "a.jsonl", [chat("Qual é a capital da França?", "Paris.")])
    a = _holder(tmp_path, "m")
    try:
        _wait_held(a)
        for argv in (["steps.curate", "data/raw/m", "data/curated/m"],  # what dvc repro runs
                     ["steps.model_card", "--mode", "m", "s", "t", "u", "v", "w"]):  # the run_step() steps
            r = subprocess.run([sys.executable, "-m", *argv, "--params", str(ROOT / "params.yaml")], cwd=tmp_path,
                               env=ENV, capture_output=True, text=True, timeout=300)
            assert r.returncode == 1, (argv, r.stderr[-2000:])
            err = r.stderr.strip().splitlines()[-1]
            assert err.startswith("error: mode 'm' is being run by ") and f"pid {a.pid} on {socket.gethostname()}" in err
            assert f"holder-{a.pid}" in err and "LORAFLOW_LOCK_WAIT" in err, err
        assert not (tmp_path / "data" / "curated" / "m").exists()  # refused before writing anything
        assert runlock.holder(runlock.lock_path(tmp_path, "m"))["pid"] == a.pid
    finally:
        a.communicate("", timeout=60)
    assert runlock.holder(runlock.lock_path(tmp_path, "m")) is None  # the name goes with the lock
    # the holder gone, the same command runs
    r = subprocess.run([sys.executable, "-m", "steps.curate", "data/raw/m", "data/curated/m", "--params",
                        str(ROOT / "params.yaml")], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_with_a_wait_the_second_run_writes_after_the_first_never_between(tmp_path):
    a = _holder(tmp_path, "m", lines=20)
    try:
        _wait_held(a)
        b = _holder(tmp_path, "m", lines=20, env={runlock.WAIT_ENV: "60"})
        time.sleep(1.5)  # a has written its 20 lines by now; b is still waiting
        assert b.poll() is None and len((tmp_path / "data" / "curated" / "m" / "log").read_text().splitlines()) == 20
        released = float(a.communicate("", timeout=60)[0].split()[-1])
        got = _wait_held(b)
        b.communicate("", timeout=60)
    finally:
        for p in (a, locals().get("b")):
            if p is not None and p.poll() is None:
                p.kill()
    assert got >= released
    pids = [int(x.split()[0]) for x in (tmp_path / "data" / "curated" / "m" / "log").read_text().splitlines()]
    assert pids == [a.pid] * 20 + [b.pid] * 20


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    a = _holder(tmp_path, "m")
    _wait_held(a)
    with pytest.raises(runlock.ModeBusy, match=f"pid {a.pid} "):
        with runlock.hold(tmp_path, "m"):
            pass
    os.kill(a.pid, signal.SIGKILL)
    a.wait(timeout=30)
    assert runlock.holder(runlock.lock_path(tmp_path, "m"))["pid"] == a.pid  # its name is still in the file...
    with runlock.hold(tmp_path, "m", command="next"):  # ...but the kernel released its lock
        assert runlock.holder(runlock.lock_path(tmp_path, "m"))["command"] == "next"


def test_one_process_nests_and_other_modes_are_free(tmp_path):
    with runlock.hold(tmp_path, "m"), runlock.hold(tmp_path, "m"), runlock.hold(tmp_path, "other"):
        assert runlock.holder(runlock.lock_path(tmp_path, "m"))["pid"] == os.getpid()
    assert runlock.holder(runlock.lock_path(tmp_path, "m")) is None


@pytest.mark.slow
def test_loraflow_run_refuses_while_another_run_of_the_mode_holds_it(tmp_path):
    """The real `loraflow run` (Prefect flow, ephemeral server): its run ends failed, naming the holder, before
    curating anything."""
    a = _holder(tmp_path, MODE)
    try:
        _wait_held(a)
        r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--mode", MODE, "--params", str(ROOT / "params.yaml"),
                            "--root", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**ENV, "PREFECT_HOME": str(tmp_path / ".prefect-home")})
    finally:
        a.communicate("", timeout=60)
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-3000:])
    assert f"error: mode '{MODE}' is being run by pid {a.pid} on {socket.gethostname()}" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "data" / "curated").exists()
    assert json.loads(runlock.lock_path(tmp_path, MODE).read_text() or "null") is None

"""Issue 23, the Prefect server going away mid-flow, for real, on shrunk params (one training step, three eval
prompts, no parity replay):

1. A real `prefect server` SIGKILLed while `train` runs and started again on the same port and database: the
   client's retries carry the flow through; the restarted server shows the run Completed. Then a run during which
   the server stays down until the flow's end: the process fails naming the server; the restarted server still
   shows that run Running until the next run (holding the mode's lock) sets it Crashed, saying why, and recomputes
   nothing that was finished.
2. Ephemeral mode (no PREFECT_API_URL): the flow's process SIGKILLed while `train` runs; the re-run takes curate
   and validate from the cache (their outputs untouched), trains, completes, and sets the killed run Crashed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MODE, ROOT, SHRUNK
from tests.test_prefect_server import _free_port, _process, _wait_healthy

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
FAST = ["train.max_steps=1", "evaluate.max_examples=3", "generate.max_new_tokens=8", "evaluate.guard_sets=[]",
        "promote.parity.targets=[]"]
OUTS = {"curate": f"data/curated/{MODE}/stats.json", "validate": f"data/validation/{MODE}/report.json",
        "train": f"data/adapters/{MODE}/train_info.json", "evaluate": f"data/eval/{MODE}/metrics.json",
        "promote": f"data/promotion/{MODE}/decision.json", "model_card": f"model_cards/{MODE}.md"}


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", **extra}
    env.pop("PREFECT_API_URL", None)
    return {**env, **extra}


def _flow(project: Path, env: dict[str, str], overrides: list[str], log: Path) -> subprocess.Popen:
    sets = [a for o in overrides for a in ("-S", o)]
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--mode", MODE, "--params", "params.yaml", *sets],
                                cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _when_training(project: Path, proc: subprocess.Popen, log: Path, timeout: float = 1200) -> None:
    """Return once validate's report is written and train has begun (its output not yet there)."""
    deadline = time.monotonic() + timeout
    while not (project / OUTS["validate"]).exists():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "validate did not finish in time:\n" + log.read_text()[-4000:]
        time.sleep(0.2)
    time.sleep(1.0)
    assert not (project / OUTS["train"]).exists() and proc.poll() is None


def _mtimes(project: Path) -> dict[str, float]:
    return {s: (project / f).stat().st_mtime_ns for s, f in OUTS.items() if (project / f).exists()}


def _task_states(log: str) -> dict[str, str]:
    """Each step's final state as the flow's own log reports it: `Task run 'train-1a2' - Finished in state Cached(...)`."""
    return {m[1]: m[2] for m in re.finditer(r"Task run '(\w+)-\w+' - Finished in state (\w+)", log)}


def _runs(env: dict[str, str]) -> dict[str, dict]:
    """name -> {state, message} of every loraflow flow run the (real or ephemeral) server holds."""
    code = ("import json; from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    print(json.dumps({str(r.id): {'name': r.name, 'state': r.state.name, 'message': r.state.message or ''}"
            " for r in c.read_flow_runs()}))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.campaign  # not yet passing: its second half found every step recomputed (docs/reliability.md)
def test_prefect_server_killed_mid_flow_then_down_at_its_end(project, tracking, tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(tmp_path / "prefect_home", PREFECT_API_URL=api)
    overrides = SHRUNK + tracking + FAST
    logs = tmp_path / "logs"
    logs.mkdir()
    server_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]

    # 1. killed while train runs, started again at once on the same port and database
    with _process(server_cmd, tmp_path, env, logs / "server-1.log") as server:
        _wait_healthy(api, server, logs / "server-1.log")
        flow = _flow(project, env, overrides, logs / "flow-1.log")
        try:
            _when_training(project, flow, logs / "flow-1.log")
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
            killed = time.monotonic()
            with _process(server_cmd, tmp_path, env, logs / "server-2.log") as again:
                _wait_healthy(api, again, logs / "server-2.log")
                back = time.monotonic() - killed
                assert flow.wait(timeout=1800) == 0, (logs / "flow-1.log").read_text()[-4000:]
                runs = _runs(env)
        finally:
            if flow.poll() is None:
                os.killpg(flow.pid, signal.SIGKILL)
    text = (logs / "flow-1.log").read_text()
    print(f"1. server back {back:.1f} s after the kill; run states {runs}; task states in the log {_task_states(text)}")
    assert [r["state"] for r in runs.values()] == ["Completed"], runs
    assert _task_states(text) == dict.fromkeys(OUTS, "Completed")  # every step ran once, none failed
    done = _mtimes(project)
    assert set(done) == set(OUTS)

    # 2. a run during which the server goes down and stays down past the client's retries (2 here: about 6 s)
    # and past the run's end
    changed = [*overrides, "model_card.license=mit"]  # only model_card's cache key changes
    with _process(server_cmd, tmp_path, env, logs / "server-3.log") as server:
        _wait_healthy(api, server, logs / "server-3.log")
        flow = _flow(project, {**env, "PREFECT_CLIENT_MAX_RETRIES": "2"}, changed, logs / "flow-2.log")
        deadline = time.monotonic() + 300
        # killed while model_card (the one step to recompute) runs: every earlier step came from the cache
        while "Task run 'promote-" not in (logs / "flow-2.log").read_text():
            assert flow.poll() is None and time.monotonic() < deadline, (logs / "flow-2.log").read_text()[-4000:]
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        t0 = time.monotonic()
        rc = flow.wait(timeout=600)
        ended = time.monotonic() - t0
    text = (logs / "flow-2.log").read_text()
    print(f"2. the flow's process ended {ended:.1f} s after the kill, exit {rc}; its last lines:\n{text[-1500:]}")
    # it fails, naming the server it could not reach and what to do
    assert rc != 0 and f"error: the Prefect server {api} stopped answering" in text and "re-run" in text, text[-3000:]
    with _process(server_cmd, tmp_path, env, logs / "server-4.log") as server:
        _wait_healthy(api, server, logs / "server-4.log")
        stale = {k: r for k, r in _runs(env).items() if r["state"] != "Completed"}
        assert [r["state"] for r in stale.values()] == ["Running"], stale  # the server cannot know it ended

        flow = _flow(project, env, changed, logs / "flow-3.log")
        assert flow.wait(timeout=1800) == 0, (logs / "flow-3.log").read_text()[-4000:]
        runs = _runs(env)
    text = (logs / "flow-3.log").read_text()
    (crashed_id, crashed), = stale.items()
    print(f"3. states after the next run: {runs}; task states {_task_states(text)}")
    assert runs[crashed_id]["state"] == "Crashed" and "ended without reporting" in runs[crashed_id]["message"]
    assert sorted(r["state"] for r in runs.values()) == ["Completed", "Completed", "Crashed"]
    states = _task_states(text)
    assert {s: states[s] for s in ("curate", "validate", "train", "evaluate", "promote")} == dict.fromkeys(
        ("curate", "validate", "train", "evaluate", "promote"), "Cached")
    after = _mtimes(project)
    assert {s: after[s] for s in OUTS if s != "model_card"} == {s: done[s] for s in OUTS if s != "model_card"}
    assert "license: mit" in (project / OUTS["model_card"]).read_text()


def test_ephemeral_flow_killed_mid_train_resumes_from_cached_steps(project, tracking, tmp_path):
    env = _env(tmp_path / "prefect_home")  # no PREFECT_API_URL: Prefect's ephemeral server, in the flow's process
    overrides = SHRUNK + tracking + FAST
    flow = _flow(project, env, overrides, tmp_path / "flow-1.log")
    try:
        _when_training(project, flow, tmp_path / "flow-1.log")
        os.killpg(flow.pid, signal.SIGKILL)  # the process and the ephemeral server in it
        flow.wait(timeout=30)
    finally:
        if flow.poll() is None:
            os.killpg(flow.pid, signal.SIGKILL)
    before = _mtimes(project)
    assert set(before) == {"curate", "validate"}, before

    t0 = time.monotonic()
    again = _flow(project, env, overrides, tmp_path / "flow-2.log")
    assert again.wait(timeout=1800) == 0, (tmp_path / "flow-2.log").read_text()[-4000:]
    took = time.monotonic() - t0
    text = (tmp_path / "flow-2.log").read_text()
    states = _task_states(text)
    print(f"re-run in {took:.1f} s; task states {states}")
    assert states == {"curate": "Cached", "validate": "Cached", "train": "Completed", "evaluate": "Completed",
                      "promote": "Completed", "model_card": "Completed"}
    after = _mtimes(project)
    assert {s: after[s] for s in before} == before  # finished steps' outputs were not written again
    assert set(after) == set(OUTS)
    runs = _runs(env)
    assert sorted(r["state"] for r in runs.values()) == ["Completed", "Crashed"], runs
    crashed, = [r for r in runs.values() if r["state"] == "Crashed"]
    assert "ended without reporting" in crashed["message"]

"""The deployments for real: a `prefect server` on loopback, process work pools `cpu` and `gpu`, the
deployments from prefect.yaml, one worker per pool, `prefect deployment run` on shrunk params.

One test, in stages, because the server, workers and first run are the expensive part:
1. the on-demand run completes with every output; training ran as the `gpu` deployment's run, on its pool;
   the eval table and the decision are Prefect artifacts; flows.summary renders them;
2. a second run with nothing changed recomputes nothing (every step's task run is Cached); after an edit to
   loraflow/checks.py (the loss mask) the next run recomputes validate and train, and curate stays Cached;
3. the raw-data check starts nothing while the data is unchanged, and starts a run once a file lands
   (that file breaks validation, so the run fails fast and the recorded hash stays the old one).
Everything it starts is stopped in a finally (SIGINT to each process group: workers ignore SIGTERM).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from loraflow.config import STEPS
from tests.conftest import MODE, ROOT, SHRUNK, chat, write_jsonl

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _process(cmd: list[str], cwd: Path, env: dict[str, str], log: Path):
    """Start cmd in its own process group; on exit SIGINT the group, then SIGKILL what is left."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # the group may outlive its leader (a flow run the worker started)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"{url}: server exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} not healthy after {timeout} s: {log.read_text()[-3000:]}")


def _cli(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    r = subprocess.run([str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout


def _run_deployment(name: str, params: dict, cwd: Path, env: dict[str, str]) -> str:
    out = _cli(["deployment", "run", name, "--params", json.dumps(params)], cwd, env)
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def _wait_final(client, run_id: str, logs: list[Path], timeout: float = 1500):
    deadline = time.time() + timeout
    while time.time() < deadline:
        fr = client.read_flow_run(run_id)
        if fr.state and fr.state.is_final():
            return fr
        time.sleep(3)
    raise AssertionError(f"flow run {run_id} not finished after {timeout} s; worker logs:\n"
                         + "\n".join(p.read_text()[-2000:] for p in logs))


def _task_states(client, run_id: str) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {t.name.rsplit("-", 1)[0]: t.state.name for t in runs}


def _children(client, run_id: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))


def test_deployments_on_a_real_server_with_workers(project, tracking, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.variables import Variable

    from flows.pipeline import raw_variable

    shutil.copy(ROOT / "prefect.yaml", project / "prefect.yaml")
    shutil.copytree(ROOT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    # training hands data and adapter over through a DVC remote (here to the gpu worker in the same folder;
    # tests/test_two_clones.py has it in another clone)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"],
                [str(BIN / "dvc"), "remote", "add", "-d", "shared", str(tmp_path / "dvc-remote")]):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
           # the project copy's code (flows, steps, loraflow), which step 2b edits
           "PYTHONPATH": os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")])),
           "PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    logs = tmp_path / "logs"
    logs.mkdir()
    overrides = SHRUNK + tracking + ["curate.too_long=keep"]  # step 3 adds an over-long record the gate must see

    with ExitStack() as stack:
        server = stack.enter_context(_process(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            tmp_path, env, logs / "server.log"))
        _wait_healthy(api, server, logs / "server.log")
        for pool in ("cpu", "gpu"):
            _cli(["work-pool", "create", pool, "--type", "process"], project, env)
        out = _cli(["--no-prompt", "deploy", "--name", "on-demand", "--name", "gpu"], project, env)
        assert "loraflow/on-demand" in out and "loraflow-train/gpu" in out, out
        worker_logs = []
        for pool in ("cpu", "gpu"):
            worker_logs.append(logs / f"worker-{pool}.log")
            stack.enter_context(_process([str(BIN / "prefect"), "worker", "start", "--pool", pool],
                                         project, {**env, "LORAFLOW_HOME": str(project)}, worker_logs[-1]))

        stack.enter_context(temporary_settings({PREFECT_API_URL: api}))
        client = stack.enter_context(get_client(sync_client=True))

        # 1. a full run through the deployment
        first = _run_deployment("loraflow/on-demand", {"overrides": overrides}, project, env)
        fr = _wait_final(client, first, worker_logs)
        assert fr.state.is_completed(), (fr.state.message, [p.read_text()[-3000:] for p in worker_logs])
        assert re.fullmatch(rf"{MODE}-[0-9a-f]{{10}}", fr.name)  # mode and params hash
        for out_file in (f"data/curated/{MODE}/train.jsonl", f"data/validation/{MODE}/report.json",
                         f"data/adapters/{MODE}/adapter_model.safetensors", f"data/eval/{MODE}/metrics.json",
                         f"data/promotion/{MODE}/decision.json", f"model_cards/{MODE}.md"):
            assert (project / out_file).exists(), out_file
        trained = [c for c in _children(client, first) if c.deployment_id]
        assert len(trained) == 1 and trained[0].work_pool_name == "gpu" and trained[0].state.is_completed()
        states = _task_states(client, first)
        assert {s: states[s] for s in STEPS if s != "train"} == {s: "Completed" for s in STEPS if s != "train"}
        assert _task_states(client, trained[0].id)["train"] == "Completed"
        adapter_mtime = (project / "data" / "adapters" / MODE / "adapter_model.safetensors").stat().st_mtime

        from flows.summary import render

        summary = render(MODE)
        metrics = json.loads((project / "data" / "eval" / MODE / "metrics.json").read_text())
        decision = json.loads((project / "data" / "promotion" / MODE / "decision.json").read_text())
        assert f"{metrics['candidate']['rougeL']['mean']:.4f}" in summary and decision["decision"] in summary
        assert Variable.get(raw_variable(MODE))["flow_run"] == fr.name

        # 2. nothing changed: nothing recomputed
        second = _run_deployment("loraflow/on-demand", {"overrides": overrides}, project, env)
        fr2 = _wait_final(client, second, worker_logs)
        assert fr2.state.is_completed(), fr2.state.message
        states = _task_states(client, second)
        assert {s: states[s] for s in STEPS if s != "train"} == {s: "Cached" for s in STEPS if s != "train"}
        trained2 = [c for c in _children(client, second) if c.deployment_id]
        assert _task_states(client, trained2[0].id)["train"] == "Cached"
        assert (project / "data" / "adapters" / MODE / "adapter_model.safetensors").stat().st_mtime == adapter_mtime

        # 2b. an edit to the loss mask's module re-runs the steps that run it (validate, train), not curate
        checks = project / "loraflow" / "checks.py"
        checks.write_text(checks.read_text() + "\n# edited: the cache keys must see it\n")
        edited = _run_deployment("loraflow/on-demand", {"overrides": overrides}, project, env)
        fr_edit = _wait_final(client, edited, worker_logs)
        assert fr_edit.state.is_completed(), fr_edit.state.message
        states = _task_states(client, edited)
        assert (states["curate"], states["validate"]) == ("Cached", "Completed"), states
        trained3 = [c for c in _children(client, edited) if c.deployment_id]
        assert _task_states(client, trained3[0].id)["train"] == "Completed"

        # 3. the raw-data check: nothing while unchanged, a run once new data lands
        def check() -> dict:
            r = subprocess.run([sys.executable, "-m", "flows.retrain", "--mode", MODE,
                                "--deployment", "loraflow/on-demand", *[a for o in overrides for a in ("-S", o)]],
                               cwd=project, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
            return json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])

        recorded = Variable.get(raw_variable(MODE))["raw_hash"]
        unchanged = check()
        assert unchanged["started"] is None and "unchanged" in unchanged["reason"]
        assert unchanged["raw_hash"] == recorded
        write_jsonl(project / "data" / "raw" / MODE / "zz_long.jsonl", [chat("Explique tudo.", "Detalhe. " * 700)])
        changed = check()
        assert changed["started"] and changed["raw_hash"] != recorded
        fr3 = _wait_final(client, changed["started"], worker_logs)
        assert fr3.state.is_failed() and "validation failed" in fr3.state.message
        assert Variable.get(raw_variable(MODE))["raw_hash"] == recorded  # a failed run records nothing

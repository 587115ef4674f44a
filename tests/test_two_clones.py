"""Training on a GPU worker that is another machine, as far as one machine can show it: two clones of the
project in two folders sharing only a Prefect server, an MLflow server and a DVC remote folder.

Clone A runs the pipeline with training handed to the `loraflow-train/gpu` deployment; that pool's only worker
runs in clone B (LORAFLOW_HOME=B, B's code on its PYTHONPATH, its own Prefect home). B pulls A's validated data
from the remote by md5, trains, pushes the adapter; A pulls exactly that adapter, checks it, evaluates it and
promotes it. Everything started is stopped in a finally (SIGINT to each process group, then SIGKILL).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from loraflow.io import read_json, sha256_file, sha256_tree
from tests.conftest import MODE, ROOT, SHRUNK
from tests.test_prefect_server import _cli, _free_port, _process, _wait_healthy

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _git(args: list[str], cwd: Path) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout


# What a pipeline run leaves in a checkout, untracked but not ignored (dvc.lock, the drift profile, model cards,
# metrics kept in git, users' feedback, the server's state): never part of a clone.
RUN_OUTPUTS = ("data/", "model_cards/", "dvc.lock")


def _clone(dst: Path) -> Path:
    """What a fresh clone holds: the project's files git tracks, plus new ones not ignored (uncommitted work) —
    but not what a run of the pipeline or the server left behind, so the test passes after `make pipeline` too."""
    tracked = set(_git(["ls-files", "-z", "--cached"], ROOT).split("\0"))
    new = [n for n in _git(["ls-files", "-z", "--others", "--exclude-standard"], ROOT).split("\0")
           if not n.startswith(RUN_OUTPUTS)]
    for name in filter(None, sorted(tracked) + new):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    _git(["init", "-q"], dst)
    _git(["add", "-A"], dst)
    _git(["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"], dst)
    return dst


def test_a_run_in_clone_a_trains_on_a_gpu_worker_in_clone_b_and_promotes_its_adapter(tmp_path):
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    t0 = time.time()
    a, b, remote, logs = (tmp_path / n for n in ("clone-a", "clone-b", "dvc-remote", "logs"))
    for d in (a, b, remote, logs):
        d.mkdir()
    for clone in (_clone(a), _clone(b)):  # each machine names the shared remote in its own config.local
        r = subprocess.run([str(BIN / "dvc"), "remote", "add", "--local", "-d", "shared", str(remote)], cwd=clone,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    prefect_port, mlflow_port = _free_port(), _free_port()
    api, mlflow_url = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
           "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    # Two machines: each clone's own code, Prefect home and results; nothing of the test's checkout on the path.
    env_a = {**env, "PYTHONPATH": str(a), "PREFECT_HOME": str(tmp_path / "home-a")}
    env_b = {**env, "PYTHONPATH": str(b), "PREFECT_HOME": str(tmp_path / "home-b"), "LORAFLOW_HOME": str(b)}
    # the handoff is under test, not the model: shorter examples, and no forgetting-guard set to answer
    overrides = SHRUNK + ["train.max_length=128", "evaluate.guard_sets=[]", f"base.tracking_uri={mlflow_url}"]

    with ExitStack() as stack:
        mlflow_srv = stack.enter_context(_process(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--artifacts-destination", str(tmp_path / "mlartifacts"), "--host", "127.0.0.1", "--port",
             str(mlflow_port)], tmp_path, env, logs / "mlflow.log"))
        prefect_srv = stack.enter_context(_process(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            tmp_path, env_a, logs / "prefect.log"))
        _wait_healthy(api, prefect_srv, logs / "prefect.log")
        _wait_healthy(mlflow_url, mlflow_srv, logs / "mlflow.log")
        _cli(["work-pool", "create", "gpu", "--type", "process"], a, env_a)
        out = _cli(["--no-prompt", "deploy", "--name", "gpu"], a, env_a)  # deployed from A
        assert "loraflow-train/gpu" in out, out
        worker_log = logs / "worker-gpu.log"
        stack.enter_context(_process([str(BIN / "prefect"), "worker", "start", "--pool", "gpu"], b, env_b, worker_log))

        run = subprocess.run([sys.executable, "-m", "flows.pipeline", "--mode", MODE,
                              *[x for o in overrides for x in ("-S", o)]],
                             cwd=a, env={**env_a, "LORAFLOW_TRAIN_DEPLOYMENT": "loraflow-train/gpu"},
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:], worker_log.read_text()[-5000:])
        result = ast.literal_eval([ln for ln in run.stdout.splitlines() if ln.startswith("{")][-1])
        assert result["decision"] == "promote", result

        stack.enter_context(temporary_settings({PREFECT_API_URL: api}))
        client = stack.enter_context(get_client(sync_client=True))
        deployment = client.read_deployment_by_name("loraflow-train/gpu")
        # the deployment sends the worker to its own checkout, not to the folder it was deployed from
        assert deployment.pull_steps == [{"flows.checkout.worker_checkout": {}}]
        trained = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
        assert len(trained) == 1 and trained[0].state.is_completed() and trained[0].work_pool_name == "gpu"
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[trained[0].id])))
        record = json.loads(artifact.data)[0]
        # the registry, while its server is up: the version A registered and the run B trained
        decision = read_json(a / "data" / "promotion" / MODE / "decision.json")
        assert decision["decision"] == "promote" and decision["version"]
        registry = mlflow.MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
        version = registry.get_model_version(f"loraflow-{MODE}", str(decision["version"]))
        champion = registry.get_model_version_by_alias(f"loraflow-{MODE}", "champion")
        run_tags = registry.get_run(record["mlflow_run_id"]).data.tags

    # B trained, with B's code, in B's folder, on exactly A's validated data
    assert record["checkout"] == str(b.resolve())
    assert Path(record["code"]) == (b / "steps" / "train.py").resolve()
    for part in ("curated", "validation"):
        assert sha256_tree(b / "data" / part / MODE) == sha256_tree(a / "data" / part / MODE), part
    assert (b / "data" / "adapters" / MODE / "train_info.json").exists()
    assert not (b / "data" / "eval").exists() and not (b / "data" / "promotion").exists()  # B only trained
    assert (b / ".checkpoints").is_dir() and not (a / ".checkpoints").exists()  # and A never trained
    # every folder that travelled is in the remote under the md5 the record names
    for key in ("curated_md5", "validation_md5", "adapter_md5"):
        md5 = record[key]
        assert (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file(), (key, md5)

    # A evaluated exactly B's adapter: same files, same MLflow run, the sha256 A checked
    adapter_a, adapter_b = a / "data" / "adapters" / MODE, b / "data" / "adapters" / MODE
    assert sha256_tree(adapter_a) == sha256_tree(adapter_b)
    info = read_json(adapter_a / "train_info.json")
    assert info["mlflow_run_id"] == record["mlflow_run_id"]
    assert sha256_file(adapter_a / "adapter_model.safetensors") == record["adapter_sha256"] == info["adapter_sha256"]
    metrics = read_json(a / "data" / "eval" / MODE / "metrics.json")
    assert metrics["candidate_adapter_sha256"] == record["adapter_sha256"]
    assert metrics["mlflow_run_id"] == record["mlflow_run_id"]  # A's evaluation is logged on B's training run

    # ...and promoted it: the registered version's run is B's training run
    assert version.run_id == record["mlflow_run_id"] and champion.version == version.version
    assert version.tags["adapter_sha256"] == record["adapter_sha256"]
    assert run_tags["dvc.adapter_md5"] == record["adapter_md5"] and run_tags["adapter_sha256"] == record["adapter_sha256"]
    print(f"two-clone run: {time.time() - t0:.0f} s")


def _identity(clone: Path) -> dict:
    """The controller's side: clone's own code computes its identity (its loraflow on the path, nothing of ours)."""
    r = subprocess.run([sys.executable, "-c", "import json; from loraflow import handoff; "
                        "print(json.dumps(handoff.code_identity()))"], cwd=clone, env={**os.environ, "PYTHONPATH": str(clone)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _worker_trains(clone: Path, code: dict) -> subprocess.CompletedProcess:
    """The worker's side: clone's train flow (its function, without a Prefect server) handed the controller's
    identity and bogus md5s, so that getting past the code check ends at the DVC pull, never at training."""
    handoff = {"code": code, "params_digest": "x", "curated_md5": "0" * 32 + ".dir", "validation_md5": "0" * 32 + ".dir",
               "report_sha256": "0" * 64}
    script = ("import json, sys; from flows.pipeline import train_flow; "
              f"train_flow.fn(mode={MODE!r}, handoff=json.loads(sys.argv[1]))")
    return subprocess.run([sys.executable, "-c", script, json.dumps(handoff)], cwd=clone, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(clone), "PREFECT_HOME": str(clone / ".prefect-home")},
                          timeout=300)


def test_a_worker_whose_train_code_differs_from_the_controllers_refuses_naming_both_commits(tmp_path):
    a, b = (tmp_path / n for n in ("clone-a", "clone-b"))
    for d in (a, b):
        d.mkdir()
        _clone(d)
    _git(["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "worker"], b)
    commit_a, commit_b = (_git(["rev-parse", "HEAD"], c).strip() for c in (a, b))
    assert commit_a != commit_b  # different commits, the same code
    sent = _identity(a)
    assert sent["commit"] == commit_a and sent["dirty"] == [] and "loraflow/checks.py" in sent["files"]

    same = _worker_trains(b, sent)  # passes the code check: refused later, by the params digest
    assert same.returncode != 0 and "differ from the controller's" in same.stderr and "code differs" not in same.stderr

    # A change outside train's code (the server) is no reason to refuse
    (b / "loraflow" / "serve" / "routes.py").write_text((b / "loraflow" / "serve" / "routes.py").read_text() + "\n# edit\n")
    assert "code differs" not in _worker_trains(b, sent).stderr

    # An uncommitted edit to a module train runs (the loss mask's): refused, naming both commits, "dirty", the file
    checks = b / "loraflow" / "checks.py"
    checks.write_text(checks.read_text() + "\nBIN_WIDTH = 9\n")
    r = _worker_trains(b, sent)
    assert r.returncode != 0
    msg = r.stderr.strip().splitlines()[-1]
    assert "HandoffError: this worker's train step code differs from the controller's" in msg, r.stderr[-3000:]
    assert f"controller at commit {commit_a[:12]} in " in msg and f"worker at commit {commit_b[:12]} dirty (" in msg
    assert "loraflow/checks.py (differs)" in msg and "routes.py" not in msg.split("files:")[1]
    assert not (b / "data" / "curated").exists()  # refused before pulling anything

    # Committed, the worker is clean but still another commit's code
    _git(["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "edit"], b)
    msg = _worker_trains(b, sent).stderr.strip().splitlines()[-1]
    head_b = _git(["rev-parse", "HEAD"], b).strip()
    assert f"worker at commit {head_b[:12]} in " in msg and "dirty (" not in msg and "loraflow/checks.py (differs)" in msg

    # The controller dirty instead: its message says so, and the worker refuses all the same
    (a / "loraflow" / "checks.py").write_text(checks.read_text())
    sent_dirty = _identity(a)
    assert sent_dirty["dirty"] == ["loraflow/checks.py"]
    _git(["checkout", "-q", commit_b, "--", "loraflow/checks.py"], b)  # b back to the original checks.py
    msg = _worker_trains(b, sent_dirty).stderr.strip().splitlines()[-1]
    assert f"controller at commit {commit_a[:12]} dirty (loraflow/checks.py)" in msg and "(differs)" in msg

    # A controller too old to send its code's identity is refused as well
    old = _worker_trains(b, {})
    assert "sent no identity of its train step code" in old.stderr

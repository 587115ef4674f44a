"""The train step under `accelerate launch` (DDP): two CPU processes over gloo train one adapter together, and
only rank 0 writes it and talks to MLflow."""

from __future__ import annotations

import math
import socket
import subprocess

import pytest

from loraflow.io import read_json
from tests.conftest import MODE, mlflow_client
from tests.test_train import BIN, FAST, _env, _prepared, _train_cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_over_gloo_write_one_adapter_and_one_mlflow_run(project):
    _prepared(project, [*FAST, "train.max_length=96"])
    # --multi_gpu picks accelerate's torch.distributed launcher; with no CUDA each rank trains on the CPU and
    # accelerate joins them over gloo (`--cpu` would start a single process without MPI).
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(_free_port()), "-m", *_train_cmd()[2:]]
    env = {**_env(), "OMP_NUM_THREADS": "1"}  # two ranks on a small machine: one thread each
    r = subprocess.run(launch, cwd=project, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-5000:]
    assert "rank 0 of 2 finished" in r.stderr and "rank 1 of 2 finished" in r.stderr

    adapter = project / "data" / "adapters" / MODE
    info = read_json(adapter / "train_info.json")
    assert info["world_size"] == 2 and info["steps"] == 3
    assert info["final_loss"] is not None and math.isfinite(info["final_loss"])
    # one adapter folder, whole, and the checkpoints cleaned up once (by rank 0, after both ranks were done)
    assert sorted(p.name for p in adapter.parent.iterdir()) == [MODE]
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "loss.png").exists()
    assert not (project / ".checkpoints" / MODE).exists()

    client = mlflow_client(project / "mlflow.db")
    [exp] = [e for e in client.search_experiments() if e.name == f"loraflow-{MODE}"]
    runs = client.search_runs([exp.experiment_id])
    assert [run.info.run_id for run in runs] == [info["mlflow_run_id"]]  # exactly one run: rank 0's
    # each step's loss logged once (two loggers would each send steps 1-3)
    assert [m.step for m in client.get_metric_history(info["mlflow_run_id"], "loss")] == [1, 2, 3]
    assert "adapter" in {a.path for a in client.list_artifacts(info["mlflow_run_id"])}

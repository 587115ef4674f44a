"""Promotion against a real `mlflow server` on loopback, then the champion loaded back with mlflow.pyfunc
and asked a question. The adapter is a real peft LoRA adapter on the base model (untrained: the registry
path, not the quality, is under test)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from loraflow.config import load_params
from loraflow.io import sha256_file, write_json
from steps import promote
from tests.conftest import MODE, ROOT
from tests.test_registry import summary

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` in its own process group (it spawns workers), stopped with the whole group."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
         "--artifacts-destination", str(tmp_path / "srv-artifacts"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not come up: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def lora_adapter(params, folder: Path, run_id: str) -> Path:
    from peft import LoraConfig, get_peft_model

    from loraflow.models import load_causal_lm, load_tokenizer, resolve

    path = resolve(params.base.model, params.base.model_cache)
    tok = load_tokenizer(path)
    model = get_peft_model(load_causal_lm(path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_json(folder / "train_info.json", {
        "adapter_sha256": sha256_file(folder / "adapter_model.safetensors"), "mlflow_run_id": run_id,
        "base_model": params.base.model, "params": {"lora_r": 4}, "train_data_sha256": "d" * 64})
    return folder


def test_promote_against_a_tracking_server_and_generate_with_the_champion(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from loraflow import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    # a stand-in adapter and metrics (no predictions.jsonl): the registry over REST, not parity
    params = load_params(ROOT / "params.yaml", [f"base.tracking_uri={mlflow_server}", "promote.parity.targets=[]"])
    exp = tracking.setup(params, MODE)
    with mlflow.start_run(experiment_id=exp) as run:
        pass
    adapter = lora_adapter(params, tmp_path / "adapter", run.info.run_id)
    metrics = {"eval_set": {"path": "eval.jsonl", "sha256": "e" * 64, "size": 6}, "base": summary(0.3),
               "candidate": summary(0.5), "champion": None, "champion_version": None, "deltas": {}}
    write_json(tmp_path / "metrics.json", metrics)

    out = promote.run(params, MODE, tmp_path / "metrics.json", adapter, tmp_path / "promotion")
    assert out["decision"] == "promote" and out["aliases_after"] == {"champion": out["version"]}
    again = promote.run(params, MODE, tmp_path / "metrics.json", adapter, tmp_path / "promotion")
    assert again["version"] == out["version"]  # idempotent over REST too

    model = mlflow.pyfunc.load_model(f"models:/loraflow-{MODE}@champion")
    short, = model.predict(pd.DataFrame({"prompt": ["What is the capital of France?"]}), params={"max_new_tokens": 3})
    longer, = model.predict(pd.DataFrame({"messages": [[{"role": "user", "content": "What is the capital of France?"}]]}),
                            params={"max_new_tokens": 24})
    assert short.strip() and len(longer) > len(short) and longer.startswith(short.strip()[:3])
    assert (tmp_path / "srv-artifacts").exists()  # artifacts went through the server, not a local folder

"""Folders handed between two checkouts through a DVC remote folder, by md5 (the real dvc CLI), and the checks
on what arrives; the gpu deployment's pull step. The whole round trip through Prefect: tests/test_two_clones.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraflow import handoff
from loraflow.config import Paths, load_params
from loraflow.io import sha256_file, write_json
from tests.conftest import MODE, ROOT, mlflow_client

DVC = str(Path(sys.executable).parent / "dvc")


def _checkout(path: Path, remote: Path | None) -> Path:
    path.mkdir(parents=True)
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"],
                *([[DVC, "remote", "add", "-d", "--local", "shared", str(remote)]] if remote else [])):
        subprocess.run(cmd, cwd=path, check=True, capture_output=True)
    return path


@pytest.fixture
def clones(tmp_path):
    remote = tmp_path / "remote"
    return _checkout(tmp_path / "a", remote), _checkout(tmp_path / "b", remote), remote


def test_a_folder_pushed_from_one_checkout_is_pulled_by_md5_in_another(clones):
    a, b, remote = clones
    src = a / "data" / "curated" / MODE
    src.mkdir(parents=True)
    (src / "train.jsonl").write_text('{"id": 1}\n')
    (src / "sub").mkdir()
    (src / "sub" / "x.txt").write_text("x")
    md5 = handoff.push(a, src)
    # DVC's own hash of the folder: the one `dvc add` would record
    subprocess.run([DVC, "add", "-q", "--no-commit", f"data/curated/{MODE}"], cwd=a, check=True, capture_output=True)
    assert yaml.safe_load((a / "data" / "curated" / f"{MODE}.dvc").read_text())["outs"][0]["md5"] == md5
    assert (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()

    dest = b / "data" / "curated" / MODE
    assert handoff.pull(b, md5, dest, {"train.jsonl": sha256_file(src / "train.jsonl")}) is True
    assert (dest / "train.jsonl").read_text() == '{"id": 1}\n' and (dest / "sub" / "x.txt").read_text() == "x"
    mtime = (dest / "train.jsonl").stat().st_mtime_ns
    assert handoff.pull(b, md5, dest) is False  # already there: left alone
    assert (dest / "train.jsonl").stat().st_mtime_ns == mtime
    assert not list((b / ".dvc" / "tmp").glob("handoff-*"))  # scratch repositories are removed


def test_a_remote_copy_that_does_not_match_the_expected_sha256_is_refused(clones):
    a, b, remote = clones
    src = a / "adapter"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    md5 = handoff.push(a, src)
    for f in (remote / "files" / "md5").rglob("*"):  # corrupt the file's copy in the remote (not the .dir list)
        if f.is_file() and not f.name.endswith(".dir"):
            f.chmod(0o644)
            f.write_bytes(b"tampered")
    dest = b / "adapter"
    with pytest.raises(handoff.HandoffError, match=r"adapter_model.safetensors .* expected"):
        handoff.pull(b, md5, dest, {"adapter_model.safetensors": sha256_file(src / "adapter_model.safetensors")})
    assert not dest.exists()


def test_no_default_remote_names_the_fix(tmp_path):
    a = _checkout(tmp_path / "a", None)
    (a / "x").mkdir()
    with pytest.raises(handoff.HandoffError, match="dvc remote add -d"):
        handoff.push(a, a / "x")


def test_the_controller_checks_the_pulled_adapter_against_train_info_and_the_mlflow_run(clones):
    a, b, _ = clones
    params = load_params(ROOT / "params.yaml", [f"base.tracking_uri=sqlite:///{a / 'mlflow.db'}"])
    client = mlflow_client(a / "mlflow.db")
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    pa, pb = Paths(a, MODE), Paths(b, MODE)
    pb.adapter.mkdir(parents=True)
    (pb.adapter / "adapter_model.safetensors").write_bytes(b"weights")
    sha = sha256_file(pb.adapter / "adapter_model.safetensors")
    write_json(pb.adapter / "train_info.json", {"adapter_sha256": sha, "mlflow_run_id": run_id})
    client.set_tag(run_id, "adapter_sha256", sha)
    sent = {"curated_md5": "c.dir", "validation_md5": "v.dir"}
    record = handoff.push_adapter(params, pb, {"adapter_sha256": sha, "mlflow_run_id": run_id}, sent)
    assert record["checkout"] == str(b) and client.get_run(run_id).data.tags["dvc.adapter_md5"] == record["adapter_md5"]
    assert handoff.pull_adapter(params, pa, record)["mlflow_run_id"] == run_id

    elsewhere = load_params(ROOT / "params.yaml", [f"base.tracking_uri=sqlite:///{b / 'own.db'}"])
    with pytest.raises(handoff.HandoffError, match="same MLflow server"):  # each side logging to its own store
        handoff.pull_adapter(elsewhere, pa, record)

    client.set_tag(run_id, "adapter_sha256", "0" * 64)  # the run says another adapter was trained
    with pytest.raises(handoff.HandoffError, match=f"MLflow run {run_id} tag adapter_sha256"):
        handoff.pull_adapter(params, pa, record)


def test_the_gpu_pull_step_moves_to_the_workers_own_checkout(tmp_path, monkeypatch):
    from flows.checkout import worker_checkout

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORAFLOW_HOME", raising=False)
    with pytest.raises(RuntimeError, match="LORAFLOW_HOME is not set"):
        worker_checkout()
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="not a loraflow checkout"):
        worker_checkout()
    monkeypatch.setenv("LORAFLOW_HOME", str(ROOT))
    assert worker_checkout() == {"directory": str(ROOT)} and Path(os.getcwd()) == ROOT

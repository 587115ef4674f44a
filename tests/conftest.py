"""Shared fixtures: the real params shrunk for tests, and a throwaway copy of the project in tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import loraflow  # noqa: F401  (sets the offline env before anything imports transformers)

# Tests never share the user's ~/.prefect (its SQLite database) with other runs on the machine, and never
# talk to a Prefect server the user configured: each test session gets its own Prefect home.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="loraflow-test-prefect-")
for _k in ("PREFECT_API_URL", "PREFECT_API_KEY"):
    os.environ.pop(_k, None)
# Nor an MLflow store the environment names: MLFLOW_TRACKING_URI wins over params (tracking.tracking_uri), and
# every test points its steps at its own SQLite file. Tests that check the variable set it themselves.
_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
for _k in _MLFLOW_ENV:
    os.environ.pop(_k, None)

ROOT = Path(__file__).resolve().parents[1]


def _formats_dir() -> Path:
    """Real files in the formats users bring: shared/formats beside the checkout (CI) or further up (worktrees),
    or beside the repository a local clone was made from (`git clone . $(mktemp -d)/ci`)."""
    import subprocess

    roots = [ROOT]
    origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True).stdout.strip()
    if origin and Path(origin).is_dir():
        roots.append(Path(origin).resolve())
    for root in roots:
        for d in root.parents:
            if (d / "shared" / "formats").is_dir():
                return d / "shared" / "formats"
    return ROOT.parent / "shared" / "formats"


FORMATS = _formats_dir()
MODE = "retail_media"

# Real steps, shrunk: a few training steps, a few eval prompts. min_delta=-1 (and no forgetting or degeneration
# guards: 3 steps and 24 new tokens answer like the base, which rarely ends its turn in 24 tokens) makes the gate
# pass so the registry path always runs; the gate's own logic is unit-tested on plain numbers in test_promote.py.
SHRUNK = [
    "train.max_steps=3",
    "train.batch_size=4",
    "train.logging_steps=1",
    "evaluate.max_examples=6",
    "generate.max_new_tokens=24",
    "evaluate.bootstrap_samples=200",
    "promote.min_delta=-1.0",
    "promote.forgetting_tolerance=null",
    "promote.min_stop_rate=null",
    "promote.max_loop_rate=null",
    "promote.degeneration_tolerance=null",
    # the in-process serving targets; `mlflow models serve` (a process start) is replayed in tests/test_pipeline.py
    "promote.parity.targets=[server,merged]",
]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (this machine has none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's pipeline files and sample raw data, with its own MLflow store."""
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    # dvc.yaml's stages depend on their code (steps/*.py, loraflow/*.py), relative to the project.
    for name in ("steps", "loraflow"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "raw", tmp_path / "data" / "raw")
    shutil.copytree(ROOT / "data" / "guard", tmp_path / "data" / "guard")  # evaluate.guard_sets
    return tmp_path


@pytest.fixture
def tracking(project: Path) -> list[str]:
    """Overrides pointing MLflow at a SQLite file inside the test's project copy."""
    return [f"base.tracking_uri=sqlite:///{project / 'mlflow.db'}"]


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def chat(q: str, a: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}



def mlflow_client(db: Path):
    """A client for one test's SQLite store, registry included: without registry_uri, MlflowClient uses the
    process-wide registry URI, which an earlier test's in-process step set (tracking.use) to its own database."""
    import mlflow

    uri = f"sqlite:///{db}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(autouse=True)
def _no_mlflow_env_leak(request):
    """A test (or the code under test) must not leave an MLflow URI in the environment: every later
    subprocess would inherit it, and `MLFLOW_TRACKING_URI` wins over a test's own params."""
    before = {k: os.environ.get(k) for k in _MLFLOW_ENV}
    yield
    leaked = {k: os.environ.get(k) for k in _MLFLOW_ENV if os.environ.get(k) != before[k]}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert not leaked, f"{request.node.nodeid} left {leaked} in os.environ"

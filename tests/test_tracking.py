"""MLflow wiring: params choose the store, and the environment only when a person set it."""

from __future__ import annotations

from loraflow import tracking
from loraflow.config import load_params
from tests.conftest import ROOT


def test_each_setup_follows_its_params_not_the_previous_setups_export(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("a", "b"):
        params = load_params(ROOT / "params.yaml", [f"base.tracking_uri=sqlite:///{tmp_path / name}.db"])
        tracking.setup(params, "x")
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / name}.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/person.db")  # a person's choice still wins
    assert tracking.tracking_uri(params) == f"sqlite:///{tmp_path}/person.db"

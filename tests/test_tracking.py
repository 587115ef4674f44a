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


def test_training_progress_bar_on_a_terminal_and_a_line_per_10_percent_in_logs(caplog, monkeypatch):
    import io

    from loraflow import training

    clock = iter(range(0, 10_000, 2))  # every step takes 2 s
    monkeypatch.setattr(training.time, "time", lambda: next(clock))
    tty = io.StringIO()
    bar = training.Progress("train m sft", tty, tty=True)
    bar.begin(0, 20)
    bar.loss = 2.5
    for s in range(1, 21):
        bar.step(s)
    bar.end()
    frames = tty.getvalue().split("\r")[1:]
    assert len(frames) == 20 and frames[9].startswith("train m sft [############............] 10/20  50% loss 2.500")
    assert "ETA 0:20" in frames[9] and frames[-1].rstrip().endswith("ETA 0:00") and tty.getvalue().endswith("\n")

    with caplog.at_level("INFO", logger=training.log.name):
        logs = training.Progress("train m sft", io.StringIO(), tty=False)
        logs.begin(5, 40)  # resumed at step 5: the ETA counts only the steps this process ran
        for s in range(6, 41):
            logs.step(s)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 9 and lines[0].startswith("train m sft [") and " 8/40  20%" in lines[0]
    assert lines[-1].split()[-1] == "0:00"

"""Whole-pipeline runs on shrunk params: the Prefect flow through `loraflow run`, a dataset that fails the
gate, and `dvc repro` (twice: the second run must re-run nothing), then a DVC experiment and `dvc push` on it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraflow.config import apply_overrides
from tests.conftest import MODE, ROOT, SHRUNK, chat, mlflow_client, write_jsonl

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    # PYTHONPATH: subprocesses import this checkout's code, whatever the editable install points at.
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)


def _registry(project: Path):
    return mlflow_client(project / "mlflow.db")


def test_loraflow_run_end_to_end_through_prefect(project, tracking):
    every_target = "promote.parity.targets=[server,mlflow,merged]"  # mlflow: a real `mlflow models serve`
    sets = [a for o in [*SHRUNK, *tracking, every_target] for a in ("-S", o)]
    r = _run([str(BIN / "loraflow"), "run", "--mode", MODE, *sets], project)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "Flow run" in r.stdout + r.stderr and "Completed" in r.stdout + r.stderr  # it ran under Prefect

    cur = project / "data" / "curated" / MODE
    stats = json.loads((cur / "stats.json").read_text())
    assert stats["totals"]["curated"] + stats["totals"]["duplicates"] + stats["totals"]["quarantined"] == stats["totals"]["read"]
    assert json.loads((project / "data" / "validation" / MODE / "report.json").read_text())["success"]

    adapter = project / "data" / "adapters" / MODE
    info = json.loads((adapter / "train_info.json").read_text())
    assert (adapter / "adapter_model.safetensors").stat().st_size > 1000 and (adapter / "adapter_config.json").exists()
    assert info["steps"] == 3 and info["tokens_seen"] > 0 and info["quantization"] == "none"

    metrics = json.loads((project / "data" / "eval" / MODE / "metrics.json").read_text())
    assert metrics["eval_set"]["size"] == 6 and metrics["champion"] is None and "no champion" in metrics["note"]
    for name in ("base", "candidate"):
        for m in ("rouge1", "rouge2", "rougeL", "bertscore"):
            s = metrics[name][m]
            assert 0 <= s["ci_low"] <= s["mean"] <= s["ci_high"] <= 1
    preds = (project / "data" / "eval" / MODE / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 6 and all(json.loads(p)["candidate_answer"] for p in preds)

    decision = json.loads((project / "data" / "promotion" / MODE / "decision.json").read_text())
    assert decision["decision"] == "promote" and decision["aliases_after"]["champion"] == decision["version"]
    client = _registry(project)
    mv = client.get_model_version_by_alias(f"loraflow-{MODE}", "champion")
    assert str(mv.version) == decision["version"] and mv.tags["adapter_sha256"] == info["adapter_sha256"]
    # parity: every serving target answered the 6 eval prompts as evaluation did, before the alias moved
    par = decision["parity"]
    assert par["passed"] and set(par["targets"]) == {"server", "mlflow", "merged"}, par
    for target in ("server", "mlflow"):
        assert par["targets"][target]["identical"] == 6, par["targets"][target]
    assert par["targets"]["merged"]["token_agreement"] >= 0.99
    assert mv.tags["parity"] == "passed" and mv.tags["parity.mlflow.identical"] == "6/6"
    report = _run([str(BIN / "loraflow"), "report", "--mode", MODE, *sets], project)
    assert report.returncode == 0, report.stderr
    assert "server: 6/6 identical" in report.stdout and "mlflow: 6/6 identical" in report.stdout
    assert f"v{decision['version']} is champion" in report.stdout

    from huggingface_hub import ModelCard

    card = ModelCard.load(project / "model_cards" / f"{MODE}.md")
    assert card.data.library_name == "peft" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["rougeL"] == round(metrics["candidate"]["rougeL"]["mean"], 4)
    assert f"{metrics['base']['rougeL']['mean']:.3f}" in card.text
    # the printed summary carries both numbers
    assert f"{metrics['candidate']['rougeL']['mean']:.4f}" in r.stdout and f"{metrics['base']['rougeL']['mean']:.4f}" in r.stdout


def test_data_breaking_an_expectation_stops_before_training(project, tracking):
    long = chat("Explique tudo sobre retail media.", "Detalhe. " * 700)
    write_jsonl(project / "data" / "raw" / MODE / "zz_long.jsonl", [long])
    # curate drops over-long records by default; keep it so that the validation gate is what stops the run
    sets = [a for o in [*SHRUNK, *tracking, "curate.too_long=keep"] for a in ("-S", o)]
    r = _run([str(BIN / "loraflow"), "run", "--mode", MODE, *sets], project)
    assert r.returncode == 1
    err = r.stdout + r.stderr
    assert "validation failed" in err and "n_tokens" in err and f"{MODE}/zz_long.jsonl#1" in err
    assert not (project / "data" / "adapters" / MODE).exists()
    assert not (project / "data" / "promotion" / MODE).exists()
    if (project / "mlflow.db").exists():
        assert not _registry(project).search_registered_models()


def test_dvc_repro_runs_all_stages_then_nothing_then_an_experiment_and_push(project, tmp_path_factory):
    """One `dvc repro` of the whole DAG serves three promises (a full repro is the expensive part): every stage
    runs, then nothing; `dvc exp run` with a train param re-runs train and what follows, `exp show` compares, and
    `dvc push` stores the curated data and the adapter; an edit to a module a stage runs makes that stage stale."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(apply_overrides(params, SHRUNK), sort_keys=False))
    shutil.copy(ROOT / ".gitignore", project / ".gitignore")
    remote = tmp_path_factory.mktemp("dvc-remote")
    dvc = str(BIN / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "remote", "add", "-d", "local", str(remote)]):
        assert _run(cmd, project).returncode == 0
    r = _run([dvc, "repro"], project)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    for stage in ("curate", "validate", "train", "evaluate", "promote", "model_card"):
        assert f"Running stage '{stage}@{MODE}'" in r.stdout
    assert (project / "model_cards" / f"{MODE}.md").exists() and (project / "dvc.lock").exists()
    again = _run([dvc, "repro"], project)
    assert again.returncode == 0 and "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in again.stdout

    # an experiment: changing a train param re-runs training and what follows, not curation or validation
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"],
                [dvc, "exp", "run", "-S", "train.lora_r=8", "-S", "train.lora_alpha=16", "-n", "r8"],
                [dvc, "exp", "show", "--json"], [dvc, "push"]):
        r = _run(cmd, project)
        assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
        if cmd[1:3] == ["exp", "run"]:
            ran = r.stdout
        if cmd[1:3] == ["exp", "show"]:
            shown = json.loads(r.stdout)
    assert f"Running stage 'train@{MODE}'" in ran and f"Running stage 'evaluate@{MODE}'" in ran
    assert f"'curate@{MODE}'" not in ran.replace(f"Stage 'curate@{MODE}' didn't change", "")
    # exp show --json: the workspace, then each commit with its experiments under experiments[].revs[]
    commit = next(c for c in shown if c["rev"] != "workspace")
    r8 = next(r["data"] for e in commit["experiments"] for r in e["revs"] if e["name"] == "r8")
    base = commit["data"]
    assert r8["params"]["params.yaml"]["data"]["train"]["lora_r"] == 8
    assert base["params"]["params.yaml"]["data"]["train"]["lora_r"] == 16
    metrics_file = f"data/eval/{MODE}/metrics.json"
    for d in (r8, base):
        assert 0 <= d["metrics"][metrics_file]["data"]["candidate"]["rougeL"]["mean"] <= 1
    # the remote holds the curated data and the adapter (content-addressed by md5)
    st = _run([dvc, "status", "--cloud", f"data/curated/{MODE}", f"data/adapters/{MODE}"], project)
    assert st.returncode == 0 and "in sync" in st.stdout, st.stdout + st.stderr
    for f in (project / "data" / "curated" / MODE / "train.jsonl",
              project / "data" / "adapters" / MODE / "adapter_model.safetensors"):
        md5 = hashlib.md5(f.read_bytes()).hexdigest()
        assert (remote / "files" / "md5" / md5[:2] / md5[2:]).exists(), f

    # an edit to the loss mask's module (run by validate and train, imported by neither step directly) is a
    # change DVC sees: those two stages are stale, curate is not
    checks = project / "loraflow" / "checks.py"
    checks.write_text(checks.read_text() + "\n# edited\n")
    status = _run([dvc, "status"], project)
    assert status.returncode == 0, status.stderr
    stale = {line.rstrip(":").strip() for line in status.stdout.splitlines() if line.rstrip().endswith(":")
             and "@" in line and not line.startswith("\t")}
    assert {f"validate@{MODE}", f"train@{MODE}"} <= stale and f"curate@{MODE}" not in stale, status.stdout

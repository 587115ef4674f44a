"""The Prefect flow: one task per step, each wrapping the same step function that DVC runs.

    python -m flows.pipeline --mode retail_media -S train.max_steps=5

(`loraflow run` calls this flow.) Without PREFECT_API_URL, Prefect starts its ephemeral server in-process.
Deployments (nightly, on demand, training on a GPU pool): see prefect.yaml.

- Caching: a step whose inputs did not change is not recomputed. Its key is the content of the files it
  reads (the same paths dvc.yaml lists as deps), its params sections (`base` + its own; train also `generate`), the
  source of every project module the step runs (loraflow.codedeps, the same .py deps as dvc.yaml) and the task's
  source; results persist under <root>/.prefect/results (env LORAFLOW_PREFECT_RESULTS).
  Like `dvc repro`, the key ignores the registry: pass refresh=True to recompute everything.
- A failed validation fails its task, so the flow ends Failed with the validation message and nothing
  downstream runs.
- A run whose process ended without reporting how it ended (killed, or the Prefect server was unreachable
  when it finished) stays Running in the server. The next run of the mode in the same project, once it holds the
  mode's lock (so no live run can hold it), sets such runs Crashed, naming itself, and resumes from the cache.
  Runs find each other by a tag naming the lock (`lock_tag`). Task states are events Prefect sends as they
  happen: a server down mid-run loses them, not the run's work.
- Training runs in-process, or, when `train_deployment` (env LORAFLOW_TRAIN_DEPLOYMENT) names a deployment
  of the `loraflow-train` flow, on that deployment's work pool (the GPU one), in the worker's own checkout:
  the validated data goes there and the adapter comes back through the DVC remote, by md5 (loraflow.handoff);
  the worker's record of what it did is its flow run's `handoff-<mode>` artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy
from prefect.filesystems import LocalFileSystem
from prefect.variables import Variable

from loraflow import codedeps, runlock
from loraflow import handoff as handoff_io
from loraflow.config import Params, Paths, load_params, stage_sections
from loraflow.evaluation import METRICS
from loraflow.io import sha256_file, sha256_tree
from loraflow.parity import line as parity_line
from steps import curate as curate_step
from steps import evaluate as evaluate_step
from steps import model_card as model_card_step
from steps import promote as promote_step
from steps import train as train_step
from steps import validate as validate_step

# What each step reads and writes: the same paths as its deps/outs in dvc.yaml.
INPUTS: dict[str, Callable[[Paths, Params], list[Path]]] = {
    "curate": lambda p, _: [p.raw, p.feedback],
    # Not the drift profile it reads: validate rewrites it on every pass, so as a key input it would make the
    # second run of unchanged data recompute. dvc.yaml has it as a persisted out, not a dep, for the same reason.
    "validate": lambda p, _: [p.curated],
    "train": lambda p, _: [p.validation / "report.json", p.curated],
    "evaluate": lambda p, params: [p.curated / "eval.jsonl", p.adapter,
                                   *(p.root / g for g in params.evaluate.guard_sets)],
    "promote": lambda p, _: [p.eval / "metrics.json", p.eval / "predictions.jsonl", p.adapter],
    "model_card": lambda p, _: [p.curated / "stats.json", p.adapter / "train_info.json", p.eval / "metrics.json",
                                p.promotion / "decision.json"],
}
OUTPUTS: dict[str, Callable[[Paths], list[Path]]] = {
    "curate": lambda p: [p.curated / "stats.json"],
    "validate": lambda p: [p.validation / "report.json"],
    "train": lambda p: [p.adapter / "train_info.json"],
    "evaluate": lambda p: [p.eval / "metrics.json"],
    "promote": lambda p: [p.promotion / "decision.json"],
    "model_card": lambda p: [p.card],
}


def content_hash(path: Path) -> str:
    if path.is_dir():
        return sha256_tree(path)
    return sha256_file(path) if path.exists() else "missing"


PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def step_cache_key(step: str, code_root: Path = PACKAGE_ROOT) -> Callable[[Any, dict[str, Any]], str]:
    """Cache key of one step: its input files' content, its params sections, and the source of every project
    module the step runs (loraflow.codedeps: the same files as its dvc.yaml stage's code deps)."""
    code = [code_root / f for f in codedeps.step_modules(step, code_root)]

    def key(_ctx: Any, inputs: dict[str, Any]) -> str:
        params: Params = inputs["params"]
        p: Paths = inputs["p"]
        h = hashlib.sha256(f"{step}\0{p.root}\0{p.mode}\0{params.digest(*stage_sections(step))}\0".encode())
        for f in code:
            h.update(f"{f.relative_to(code_root).as_posix()}\0{sha256_file(f)}\n".encode())
        for path in INPUTS[step](p, params):
            h.update(f"{path.relative_to(p.root)}\0{content_hash(path)}\n".encode())
        return h.hexdigest()

    return key


def _cached(step: str) -> CacheKeyFnPolicy:
    return TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=step_cache_key(step))


@task(name="curate", cache_policy=_cached("curate"), persist_result=True)
def curate(params: Params, p: Paths) -> dict[str, Any]:
    return curate_step.run(params, p.raw, p.curated, p.feedback if p.feedback.is_dir() else None)


@task(name="validate", cache_policy=_cached("validate"), persist_result=True)
def validate(params: Params, p: Paths) -> dict[str, Any]:
    return validate_step.run(params, p.curated, p.validation, p.profile)


@task(name="train", cache_policy=_cached("train"), persist_result=True)
def train(params: Params, p: Paths) -> dict[str, Any]:
    return train_step.run(params, p.mode, p.validation / "report.json", p.curated, p.adapter)


@task(name="evaluate", cache_policy=_cached("evaluate"), persist_result=True)
def evaluate(params: Params, p: Paths) -> dict[str, Any]:
    return evaluate_step.run(params, p.mode, p.curated / "eval.jsonl", p.adapter, p.eval)


# The registry may be a server across a network: the only step worth retrying.
@task(name="promote", cache_policy=_cached("promote"), persist_result=True, retries=2, retry_delay_seconds=5)
def promote(params: Params, p: Paths) -> dict[str, Any]:
    return promote_step.run(params, p.mode, p.eval / "metrics.json", p.adapter, p.promotion)


@task(name="model_card", cache_policy=_cached("model_card"), persist_result=True)
def model_card(params: Params, p: Paths) -> str:
    return model_card_step.run(params, p.mode, p.curated / "stats.json", p.adapter / "train_info.json",
                               p.eval / "metrics.json", p.promotion / "decision.json", p.card)


def result_storage(p: Paths) -> LocalFileSystem:
    """The project's own result store (cached step results), saved as a block: Prefect wants it server-side."""
    path = os.environ.get("LORAFLOW_PREFECT_RESULTS") or str(p.root / ".prefect" / "results")
    block = LocalFileSystem(basepath=path)
    block.save(f"loraflow-results-{hashlib.sha256(path.encode()).hexdigest()[:12]}", overwrite=True)
    return block


def _step(t, params: Params, p: Paths, refresh: bool, storage: LocalFileSystem):
    """Run one step task; a missing output forces a recompute even when the inputs match the cache."""
    missing = any(not out.exists() for out in OUTPUTS[t.name](p))
    return t.with_options(result_storage=storage, refresh_cache=refresh or missing)(params, p)


def run_name() -> str:
    """`<mode>-<params hash>`: runs with the same params share a suffix in the UI."""
    from prefect.runtime import flow_run

    a = flow_run.parameters
    try:
        digest = load_params(a.get("params_file", "params.yaml"), a.get("overrides")).digest()
    except Exception:  # the flow itself reports bad params; the name must not hide that
        digest = "bad-params"
    return f"{a['mode']}-{digest}"


def raw_variable(mode: str) -> str:
    """The Prefect Variable that holds the raw-data hash of the last successful run of a mode."""
    return f"loraflow_raw_{mode.lower().replace('-', '_')}"


def _load(mode: str, params_file: str, overrides: list[str] | None, root: str) -> tuple[Params, Paths]:
    params = load_params(params_file, overrides)
    if mode not in params.base.modes:
        raise ValueError(f"mode {mode!r} is not in base.modes {params.base.modes} ({params_file})")
    return params, Paths(Path(root).resolve(), mode)


@flow(name="loraflow-train", flow_run_name=run_name)
def train_flow(mode: str, params_file: str = "params.yaml", overrides: list[str] | None = None,
               root: str = ".", refresh: bool = False, handoff: dict[str, Any] | None = None) -> dict[str, Any]:
    """Only the training step: deployed to the GPU work pool (prefect.yaml), started by `pipeline`.

    With `handoff` (from `pipeline` in another checkout: the DVC md5s of the validated data, the sha256 of
    the validation report, the digest of the train params, the identity of its train step code), the data
    comes from the DVC remote and the adapter goes back to it; the flow run's `handoff-<mode>` artifact records
    what was trained where. A checkout whose train step code or train params differ from the controller's
    refuses before pulling anything.
    """
    params, p = _load(mode, params_file, overrides, root)
    if handoff is None:
        return _step(train, params, p, refresh, result_storage(p))
    code = handoff_io.check_code(handoff.get("code"))  # before anything is pulled: the controller's code, or refuse
    digest = params.digest(*stage_sections("train"))
    if digest != handoff["params_digest"]:
        raise ValueError(f"{p.root / params_file}: this checkout's train params (digest {digest}, with "
                         f"overrides {overrides}) differ from the controller's ({handoff['params_digest']}): "
                         "check out the controller's commit")
    handoff_io.pull_inputs(p, handoff)
    info = _step(train, params, p, refresh, result_storage(p))
    record = {**handoff_io.push_adapter(params, p, info, handoff), "code_sha256": code["code_sha256"],
              "commit": code["commit"] or "", "dirty": ", ".join(code["dirty"])}
    create_table_artifact(key=_handoff_key(mode), table=[record],
                          description=f"The {mode} adapter this run trained, pushed to the DVC remote")
    return record


def _handoff_key(mode: str) -> str:
    return f"handoff-{mode.lower().replace('_', '-')}"


def _handoff_record(flow_run_id: Any, mode: str) -> dict[str, Any]:
    """The record a training run left as its artifact: the server is all the controller shares with it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[_handoff_key(mode)]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    if len(found) != 1:
        raise RuntimeError(f"training run {flow_run_id}: expected one {_handoff_key(mode)} artifact, found {len(found)}")
    return json.loads(found[0].data)[0]


def _train_elsewhere(deployment: str, params: Params, p: Paths, params_file: str, overrides: list[str] | None,
                     refresh: bool) -> dict[str, Any]:
    """Train on another pool's worker, in its own checkout: the data and the adapter travel by DVC md5."""
    from prefect.deployments import run_deployment

    try:  # the worker resolves it in its checkout
        rel = Path(params_file).resolve().relative_to(p.root)
    except ValueError:
        raise ValueError(f"{params_file}: outside the project {p.root}, so a worker in another checkout cannot "
                         "read it; keep the params file in the project (committed)") from None
    sent = {**handoff_io.push_inputs(p), "params_digest": params.digest(*stage_sections("train")),
            "code": handoff_io.code_identity()}
    fr = run_deployment(deployment, timeout=None, parameters={
        "mode": p.mode, "params_file": str(rel), "overrides": overrides, "refresh": refresh, "handoff": sent})
    if not fr.state or not fr.state.is_completed():
        state = fr.state.name if fr.state else "unknown"
        raise RuntimeError(f"training run {fr.name} of deployment {deployment} ended {state}: "
                           f"{fr.state.message if fr.state else ''}")
    return handoff_io.pull_adapter(params, p, _handoff_record(fr.id, p.mode))


def _eval_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name in ("base", "champion", "candidate"):
        s = metrics.get(name)
        if s:
            rows.append({"model": name, **{m: f"{s[m]['mean']:.4f} [{s[m]['ci_low']:.4f}, {s[m]['ci_high']:.4f}]"
                                           for m in METRICS}})
    return rows


def _decision_markdown(mode: str, decision: dict[str, Any], run: str) -> str:
    return (f"# Promotion decision for `{mode}`: **{decision['decision']}**\n\n{decision['reason']}\n\n"
            f"| | |\n|---|---|\n| registered model | `{decision.get('registered_model')}` |\n"
            f"| version | {decision.get('version')} |\n| aliases after | {decision.get('aliases_after')} |\n"
            f"| flow run | {run} |\n"
            + "".join(f"| parity: {t} | {parity_line(t, r)} |\n"
                      for t, r in ((decision.get("parity") or {}).get("targets") or {}).items()))


@flow(name="loraflow", flow_run_name=run_name)
def pipeline(mode: str, params_file: str = "params.yaml", overrides: list[str] | None = None,
             root: str = ".", train_deployment: str | None = None, refresh: bool = False) -> dict[str, Any]:
    """Run the whole DAG for one mode; returns the decision and the headline numbers."""
    from prefect.runtime import flow_run

    params, p = _load(mode, params_file, overrides, root)
    # One run of a mode at a time (another flow run, `dvc repro`, the feedback trigger): refused, naming the holder.
    with runlock.hold(p.root, mode, command=f"the loraflow flow, run {flow_run.name} ({' '.join(sys.argv)})") as lock:
        close_abandoned_runs(lock)
        return _pipeline(params, p, params_file, overrides, train_deployment, refresh, flow_run.name)


def lock_tag(lock: Path) -> str:
    """The tag every flow run holding this lock file (this host, this project, this mode) carries."""
    return f"loraflow-lock:{socket.gethostname()}:{hashlib.sha256(str(lock).encode()).hexdigest()[:12]}"


def close_abandoned_runs(lock: Path) -> list[str]:
    """Tag this run with its lock, then set Crashed every other run with that tag the server still thinks is
    under way: this run holds the lock, so their processes are gone. Returns their names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.logging import get_run_logger
    from prefect.runtime import flow_run
    from prefect.states import Crashed

    tag, closed = lock_tag(lock), []
    with get_client(sync_client=True) as client:
        me = client.read_flow_run(flow_run.id)
        client.update_flow_run(me.id, tags=sorted({*me.tags, tag}))
        stale = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[tag]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))))
        for fr in stale:
            if fr.id == me.id:
                continue
            since = fr.start_time.isoformat(timespec="seconds") if fr.start_time else "?"
            client.set_flow_run_state(fr.id, Crashed(message=(
                f"its process ended without reporting how the run ended (killed, or the Prefect server was "
                f"unreachable when it finished); found by flow run {me.name} ({me.id}), which took the lock {lock} "
                f"after it. Steps it finished are cached: {me.name} recomputes only the rest")), force=True)
            get_run_logger().warning("flow run %s (%s, started %s) was still %s with no process holding %s: set it "
                                     "Crashed", fr.name, fr.id, since, fr.state.name if fr.state else "?", lock)
            closed.append(fr.name)
    return closed


def _pipeline(params: Params, p: Paths, params_file: str, overrides: list[str] | None, train_deployment: str | None,
              refresh: bool, run: str) -> dict[str, Any]:
    mode = p.mode
    raw_hash = content_hash(p.raw)  # before curating: the data this run trained on
    storage = result_storage(p)
    _step(curate, params, p, refresh, storage)
    _step(validate, params, p, refresh, storage)
    train_deployment = train_deployment or os.environ.get("LORAFLOW_TRAIN_DEPLOYMENT")
    if train_deployment:
        _train_elsewhere(train_deployment, params, p, params_file, overrides, refresh)
    else:
        _step(train, params, p, refresh, storage)
    metrics = _step(evaluate, params, p, refresh, storage)
    decision = _step(promote, params, p, refresh, storage)
    _step(model_card, params, p, refresh, storage)

    slug = mode.lower().replace("_", "-")
    m = params.promote.primary_metric
    create_table_artifact(key=f"eval-{slug}", table=_eval_table(metrics),
                          description=f"Held-out scores for {mode} (mean [CI]); {metrics['eval_set']['size']} conversations")
    create_markdown_artifact(key=f"promotion-{slug}", markdown=_decision_markdown(mode, decision, run),
                             description=f"Promotion decision for {mode}")
    Variable.set(raw_variable(mode), {"raw_hash": raw_hash, "flow_run": run}, overwrite=True)
    return {"mode": mode, "decision": decision["decision"], "version": decision["version"],
            f"base_{m}": metrics["base"][m]["mean"], f"candidate_{m}": metrics["candidate"][m]["mean"]}


def run(mode: str, params_file: str = "params.yaml", overrides: list[str] | None = None, root: str = ".",
        refresh: bool = False) -> dict[str, Any]:
    """The flow, with a Prefect server lost mid-run said in words (Prefect raises its bare httpx error)."""
    import httpx
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES

    from loraflow.errors import LoraflowError

    try:
        return pipeline(mode, params_file, overrides, root, refresh=refresh)
    except httpx.TransportError as e:
        api = PREFECT_API_URL.value() or "(ephemeral)"
        raise LoraflowError(
            f"the Prefect server {api} stopped answering during the {mode} run ({type(e).__name__}: {e}; after "
            f"PREFECT_CLIENT_MAX_RETRIES={PREFECT_CLIENT_MAX_RETRIES.value()} retries). The server still shows the run "
            f"Running; the steps that finished are cached. Start the server and re-run: the next run sets that one "
            f"Crashed and recomputes only what did not finish") from e


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", action="append", default=[])
    ap.add_argument("--refresh", action="store_true", help="recompute every step, cached or not")
    a = ap.parse_args()
    from loraflow.errors import LoraflowError

    try:
        print(run(a.mode, a.params, a.set, refresh=a.refresh))
    except LoraflowError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

"""Retraining on new data: start a pipeline run when data/raw/<mode> changed since the last successful run.

    python -m flows.retrain --mode retail_media --deployment loraflow/on-demand

Deployed on a schedule in prefect.yaml (`raw-data-check`). The pipeline flow records the hash of the raw
data it trained on in a Prefect Variable when it completes (flows.pipeline.raw_variable); this check hashes
the folder again and starts the pipeline deployment only when the two differ and no run of that mode is
already waiting or running. Otherwise it does nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.variables import Variable

from flows.pipeline import content_hash, raw_variable
from loraflow.config import Paths

# Runs in these states will train on the newest data anyway: starting another would train twice.
IN_FLIGHT = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED")


def should_start(current: str, last_success: str | None, in_flight: list[str]) -> tuple[bool, str]:
    """The whole decision, on plain values: (start a run?, why)."""
    if current == last_success:
        return False, f"raw data unchanged since the last successful run ({current[:12]})"
    if in_flight:
        return False, f"raw data changed, but run(s) {', '.join(in_flight)} of this mode are already under way"
    before = last_success[:12] if last_success else "no successful run yet"
    return True, f"raw data changed ({before} -> {current[:12]})"


def _in_flight(deployment: str, mode: str) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType[s] for s in IN_FLIGHT]))))
    return [r.name for r in runs if r.parameters.get("mode") == mode]


@flow(name="loraflow-raw-check", flow_run_name="raw-check-{mode}")
def check_raw_data(mode: str, deployment: str = "loraflow/on-demand", root: str = ".",
                   overrides: list[str] | None = None) -> dict[str, Any]:
    """Hash data/raw/<mode>; start `deployment` for this mode when the hash is new. Returns what it did."""
    log = get_run_logger()
    raw = Paths(Path(root).resolve(), mode).raw
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw}: no raw data folder for mode {mode!r}")
    current = content_hash(raw)
    last = (Variable.get(raw_variable(mode), default=None) or {}).get("raw_hash")
    start, why = should_start(current, last, _in_flight(deployment, mode))
    log.info("%s: %s", mode, why)
    out: dict[str, Any] = {"mode": mode, "raw_hash": current, "started": None, "reason": why}
    if start:
        from prefect.deployments import run_deployment

        params: dict[str, Any] = {"mode": mode}
        if overrides:
            params["overrides"] = overrides
        # Not a subflow: the pipeline's run lives on its own, and this check ends at once (timeout=0).
        fr = run_deployment(deployment, parameters=params, timeout=0, as_subflow=False)
        out["started"] = str(fr.id)
        log.info("started %s run %s", deployment, fr.name)
    return out


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True)
    ap.add_argument("--deployment", default="loraflow/on-demand")
    ap.add_argument("-S", "--set", action="append", default=[], help="params overrides for the started run")
    a = ap.parse_args()
    print(json.dumps(check_raw_data(a.mode, a.deployment, overrides=a.set or None)))

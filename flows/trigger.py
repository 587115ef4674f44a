"""Start a pipeline run for one mode from outside the flow (the serving side's feedback trigger).

With PREFECT_API_URL set, the run goes through the Prefect deployment (a worker picks it up, the UI shows
it); otherwise `loraflow run --mode <mode>` starts in a detached background process on this machine.
A `command` template (with `{mode}`) replaces both, e.g. to re-curate only.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any


def local_command(mode: str, params_file: str, overrides: list[str], command: str | None = None) -> list[str]:
    if command:
        return shlex.split(command.format(mode=mode))
    sets = [a for o in overrides for a in ("-S", o)]
    return [sys.executable, "-m", "loraflow.cli", "run", "--mode", mode, "--params", params_file, *sets]


def trigger_pipeline(mode: str, root: Path, params_file: str = "params.yaml", overrides: list[str] | None = None,
                     command: str | None = None, deployment: str = "loraflow/on-demand") -> dict[str, Any]:
    """Start a run; returns how it was started ("prefect" with the flow run id, or "local" with the process)."""
    overrides = overrides or []
    if command is None and os.environ.get("PREFECT_API_URL"):
        from prefect.deployments import run_deployment

        # timeout=0: schedule and return at once; the deployment's worker runs it.
        fr = run_deployment(name=deployment, parameters={"mode": mode, "overrides": overrides}, timeout=0)
        return {"how": "prefect", "deployment": deployment, "flow_run_id": str(fr.id), "started": dt.datetime.now(dt.timezone.utc).isoformat()}
    argv = local_command(mode, params_file, overrides, command)
    logs = Path(root) / "data" / "serve" / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"{mode}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%f}.log"
    with open(log_file, "w", encoding="utf-8") as out:
        # Its own session: a training run outlives a server restart, and the server's Ctrl-C does not reach it.
        proc = subprocess.Popen(argv, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return {"how": "local", "argv": argv, "pid": proc.pid, "log": str(log_file), "process": proc,
            "started": dt.datetime.now(dt.timezone.utc).isoformat()}

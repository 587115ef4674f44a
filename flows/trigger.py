"""Start a pipeline run for one mode from outside the flow (the serving side's feedback trigger).

With PREFECT_API_URL set, the run goes through the Prefect deployment (a worker picks it up, the UI shows
it); otherwise `loraflow run --mode <mode>` starts in a detached background process on this machine
(loraflow.serve.feedback.start_local_run). A `command` template (with `{mode}`) replaces both, e.g. to
re-curate only. flows/cli.py hands this function to the server.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from loraflow.serve.feedback import start_local_run


def trigger_pipeline(mode: str, root: Path, params_file: str = "params.yaml", overrides: list[str] | None = None,
                     command: str | None = None, deployment: str = "loraflow/on-demand") -> dict[str, Any]:
    """Start a run; returns how it was started ("prefect" with the flow run id, or "local" with the process)."""
    overrides = overrides or []
    if command is None and os.environ.get("PREFECT_API_URL"):
        from prefect.deployments import run_deployment

        # timeout=0: schedule and return at once; the deployment's worker runs it.
        fr = run_deployment(name=deployment, parameters={"mode": mode, "overrides": overrides}, timeout=0)
        return {"how": "prefect", "deployment": deployment, "flow_run_id": str(fr.id),
                "started": dt.datetime.now(dt.timezone.utc).isoformat()}
    return start_local_run(mode, root, params_file, overrides, command)

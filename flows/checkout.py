"""The `gpu` deployment's pull step: a worker runs the training flow in its own checkout, not in the folder
`prefect deploy` ran in (which is on another machine).

Start the worker with the checkout named:

    LORAFLOW_HOME=/path/to/loraflow prefect worker start --pool gpu

Not Prefect's `set_working_directory` with `{{ $LORAFLOW_HOME }}`: `prefect deploy` fills `{{ $VAR }}` from its
own environment when the variable is set there, which would send every worker to the deployer's folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def worker_checkout(variable: str = "LORAFLOW_HOME") -> dict[str, str]:
    """chdir to the checkout named by the worker's environment; returns it as `directory` (for later steps)."""
    home = os.environ.get(variable)
    if not home:
        raise RuntimeError(f"{variable} is not set in this worker's environment: start the worker as "
                           f"`{variable}=/path/to/your/loraflow/checkout prefect worker start --pool gpu`")
    root = Path(home).expanduser().resolve()
    missing = [n for n in ("params.yaml", "flows", ".dvc") if not (root / n).exists()]
    if missing:
        raise RuntimeError(f"{variable}={home}: not a loraflow checkout (no {', '.join(missing)} in {root})")
    os.chdir(root)
    return {"directory": str(root)}

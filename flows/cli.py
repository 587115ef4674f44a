"""The `loraflow` command's entry point (pyproject's console script, or `python -m flows.cli ...`).

loraflow/cli.py holds the command; this module hands it the two things that need Prefect: the flow that
`loraflow run` runs, and the trigger the server's feedback uses to start a run (through a Prefect deployment
when PREFECT_API_URL is set). Both import lazily, so `loraflow serve` and `loraflow report` start without Prefect.
"""

from __future__ import annotations

import sys
from typing import Any

from loraflow import cli


def run_pipeline(mode: str, params_file: str, overrides: list[str], root: str) -> dict[str, Any]:
    from flows.pipeline import run

    return run(mode, params_file, overrides, root)


def trigger(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from flows.trigger import trigger_pipeline

    return trigger_pipeline(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, run_pipeline=run_pipeline, trigger=trigger)


if __name__ == "__main__":
    sys.exit(main())

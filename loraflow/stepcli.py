"""The thin `python -m steps.<name>` entry points share their flags and their error handling here."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def step_parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(doc or "").strip().split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="section.key=value",
                    help="override a param, DVC style (repeatable)")
    return ap


@contextlib.contextmanager
def step_errors() -> Iterator[None]:
    """Log at INFO; turn the pipeline's own errors into one clear line and exit status 1 (no traceback)."""
    from loraflow.errors import LoraflowError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        yield
    except LoraflowError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


@contextlib.contextmanager
def mode_lock(mode: str) -> Iterator[None]:
    """Hold the mode's run lock (loraflow/runlock.py) in the project the step runs in (dvc repro: the repository
    root) for the step, so a flow run of the same mode never writes beside it."""
    import os

    from loraflow import runlock

    # Under torchrun / accelerate launch every rank runs this command: rank 0 holds the lock for the whole run,
    # the other ranks are part of that run (they would otherwise refuse, naming rank 0).
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    with runlock.hold(Path.cwd(), mode):
        yield


def run_step(doc: str | None, run: Callable[..., Any], paths: tuple[str, ...], argv: list[str] | None = None) -> Any:
    """The whole `python -m steps.<name>` of a step whose `run(params, mode, *paths)` needs nothing else:
    --params / -S, --mode, then its paths in order; the mode's run lock held while it runs."""
    from loraflow.config import load_params

    ap = step_parser(doc)
    ap.add_argument("--mode", required=True)
    for name in paths:
        ap.add_argument(name, type=Path)
    args = ap.parse_args(argv)
    with step_errors(), mode_lock(args.mode):
        return run(load_params(args.params, args.set), args.mode, *(getattr(args, n) for n in paths))

"""The thin `python -m steps.<name>` entry points share their flags and their error handling here."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator


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

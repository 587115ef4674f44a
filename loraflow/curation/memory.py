"""The cyclic garbage collector paused while curation builds its many small objects."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def gc_paused():
    # The step allocates a few objects per record and frees almost none before it ends, so the cyclic
    # collector would walk all of them again and again: ~20% of a 100,000-record run. run() cuts its own
    # reference cycles before returning, so reference counting frees what it made.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()

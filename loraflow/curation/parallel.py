"""Reading split across spawned worker processes when the input pays for them; the same output as one process."""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import pickle
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraflow.config import Params
from loraflow.curation.lengths import Lengths
from loraflow.curation.memory import gc_paused
from loraflow.curation.reader import identify_and_size, read_all, read_here, source_name
from loraflow.curation.records import Item, Raw, SourceStats, is_feedback
from loraflow.formats import Section, Share

log = logging.getLogger(__name__)


# Parallel reading. A worker costs about what reading WORKER_COST_BYTES of raw records costs (spawning,
# importing, receiving the tokenizer, sending its records back): `auto` starts workers only past twice
# that, and this process, which pays none of it, takes that much more than its even share.
WORKER_COST_BYTES = 8 << 20
_SLOTS = 1000


def process_count(params: Params, size: int) -> int:
    """Processes for reading: curate.workers, or with `auto` one per core once the input pays for them
    (spawned, not forked: the step may run inside a process that holds torch's or tokenizers' threads)."""
    if params.curate.workers != "auto":
        return params.curate.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8, size // (2 * WORKER_COST_BYTES)))


def unit_shares(parts: int, size: int) -> list[Share]:
    """Unit shares for this process (first) and each worker: even, less a worker's cost on each worker."""
    worker = max(0.0, (size - WORKER_COST_BYTES) / (parts * size)) if size else 1 / parts
    # Worker k (1..parts-1) takes the k-th slice of `worker` slots from the top; this process the bottom rest.
    edges = [0] + [_SLOTS - round((parts - k) * worker * _SLOTS) for k in range(1, parts)] + [_SLOTS]
    return [(edges[i], edges[i + 1], _SLOTS) for i in range(parts)]


@gc_paused()
def read_part(params: Params, raw_dir: Path, files: list[Path], label: str | None, force: str | None,
              share: Share, chat: Any, out: Path) -> Path:
    """A worker process's share of every file, read, cleaned, identified and sized, pickled into `out`.

    The records travel packed as tuples, through a file (cheaper than the result pipe for tens of MB):
    pickling Raw/Item objects costs more than reading saves. An SFT conversation travels as its JSON only;
    the raw record only where the parent may still quarantine it (or needs it: served feedback)."""
    stats: dict[str, SourceStats] = defaultdict(SourceStats)
    raws = read_all(params, raw_dir, files, stats, label, force, share)
    identify_and_size([it for raw in raws for it in raw.items],
                      Lengths(chat, params.base.max_seq_len) if chat else None, final=False)
    limit = params.base.max_seq_len
    teacher = params.curate.teacher is not None  # the parent asks it about each section read: send them all
    rows = []
    for raw in raws:
        keep = raw.reject is not None or is_feedback(raw.record) or (teacher and isinstance(raw.record, Section)) or any(
            not it.sized or (it.n_tokens or 0) > limit for it in raw.items)
        rows.append((raw.key, raw.source, raw.format, raw.reject, raw.record if keep else None,
                     [(it.messages_json, it.pref, it.id, it.n_tokens, it.sized) for it in raw.items]))
    with open(out, "wb") as f:
        pickle.dump(({rel: (st.fixes, st.pii, st.document) for rel, st in stats.items()}, rows), f,
                    protocol=pickle.HIGHEST_PROTOCOL)
    return out


def _unpack(rows: list[tuple], files: list[Path], raw_dir: Path, label: str | None) -> list[Raw]:
    rels = [source_name(f, raw_dir, label) for f in files]
    raws = []
    for key, source, fmt, reject, record, items in rows:
        raw = Raw(rels[key[0]], source, record, fmt, reject=reject, key=key)
        raw.items = [Item(raw, messages_json=mj, pref=pref, id=rid, n_tokens=n, sized=sized)
                     for mj, pref, rid, n, sized in items]
        raws.append(raw)
    return raws


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Start spawned processes without re-running the caller's main script in them.

    multiprocessing's spawn imports the parent's __main__ in each child so that functions defined there can
    be unpickled; a script without an `if __name__ == "__main__":` guard would then run again, side effects
    and all, in every worker. The workers need nothing from __main__ (the function and everything it gets
    come from importable modules), so the parent's __main__ is shown to spawn as a module with neither a
    spec nor a file while they start.
    """
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.update(saved)
        if "__spec__" not in saved:
            del main.__spec__


def _start_workers(jobs: list[tuple]) -> tuple[Any, list[Any]]:
    """A spawned process per job running read_part: (the pool, a future per job), or (None, Nones) where
    processes cannot be started here (e.g. a platform without a working sem_open): the caller reads those
    shares itself."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        pool = ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn"))
        with _main_hidden():  # the workers start here, inside submit()
            return pool, [pool.submit(read_part, *job) for job in jobs]
    except (OSError, ImportError, NotImplementedError) as e:
        log.warning("curate: cannot start worker processes (%s: %s); reading in this one", type(e).__name__, e)
        return None, [None] * len(jobs)


def _worker_result(future: Any) -> Path | None:
    """The pickle a worker wrote, or None if it did not start or died (killed for memory, say)."""
    from concurrent.futures.process import BrokenProcessPool

    if future is None:
        return None
    try:
        return future.result()
    except (BrokenProcessPool, OSError) as e:
        log.warning("curate: a worker process failed (%s: %s); reading its share in this one", type(e).__name__, e)
        return None


def read_sources(params: Params, raw_dir: Path, files: list[Path], stats: dict[str, SourceStats],
                 lengths: Lengths, label: str | None = None, force: str | None = None) -> list[Raw]:
    """read_all + identify_and_size over every file, split across `process_count` processes when that pays;
    the same output either way."""
    size = sum(p.stat().st_size for p in files)
    parts = process_count(params, size)
    if parts == 1:
        return read_here(params, raw_dir, files, stats, lengths, label, force)
    import tempfile

    shares = unit_shares(parts, size)
    log.info("curate: reading %d file(s) in %d processes", len(files), parts)
    chat = lengths.chat.portable()  # None: the workers only read, this process counts tokens
    with tempfile.TemporaryDirectory(prefix="loraflow-curate-") as tmp:
        pool, futures = _start_workers([(params, raw_dir, files, label, force, share, chat, Path(tmp) / f"{k}.pkl")
                                        for k, share in enumerate(shares[1:], 1)])
        try:
            own = read_here(params, raw_dir, files, stats, lengths, label, force, shares[0])
            parts_read = []
            for share, future in zip(shares[1:], futures, strict=True):
                path = _worker_result(future)
                if path is None:  # nothing is lost: the share is read here
                    parts_read.append(read_here(params, raw_dir, files, stats, lengths, label, force, share))
                    continue
                with open(path, "rb") as f:
                    part_stats, rows = pickle.load(f)
                for rel, (fixes, found, document) in part_stats.items():  # made while reading; the rest is tallied later
                    stats[rel].fixes.update(fixes)
                    stats[rel].pii.update(found)
                    if document:  # a worker that read a file's first share
                        stats[rel].document = document
                parts_read.append(_unpack(rows, files, raw_dir, label))
        finally:
            if pool is not None:
                # Workers exit on their own (freeing their records takes them a moment): no need to wait.
                pool.shutdown(wait=False, cancel_futures=True)
    raws = list(heapq.merge(own, *parts_read, key=lambda raw: raw.key))
    unsized = [it for raw in raws for it in raw.items if not it.sized]
    if unsized:
        identify_and_size(unsized, lengths)
    return raws

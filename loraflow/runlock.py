"""One run of a mode at a time: an exclusive lock per mode on `data/.locks/<mode>.lock`.

Two runs of one mode (two `loraflow run`, `dvc repro` beside the flow, a cron run and the server's feedback
trigger) would otherwise write the same folders under data/ at once. The Prefect flow holds the lock for its
whole run; each step's command line (`python -m steps.<step>`, what `dvc repro` runs) holds it for that step.
The second comer waits up to $LORAFLOW_LOCK_WAIT seconds (default 0), then refuses with a message naming the
holder: its pid, host, command and start time, which the holder writes into the lock file.

The lock is `fcntl.flock` on the open file: the kernel releases it when the holder exits, killed or not, so a
stale lock file (its holder gone) never blocks anyone. flock is reliable on local file systems; on NFS it is
emulated with POSIX locks on recent Linux kernels but not on every client, so keep data/ local or accept the risk.
A process holds a mode's lock once however deep it nests (the flow calling a step in-process).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraflow.errors import LoraflowError

WAIT_ENV = "LORAFLOW_LOCK_WAIT"
_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth
_held_lock = threading.Lock()


class ModeBusy(LoraflowError):
    """Another run of the same mode holds its lock."""


def lock_path(root: Path | str, mode: str) -> Path:
    return Path(root).resolve() / "data" / ".locks" / f"{mode}.lock"


def holder(path: Path) -> dict[str, Any] | None:
    """What the lock file says about its holder (None when empty or unreadable: free, or being written)."""
    try:
        return json.loads(path.read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None


def _describe(h: dict[str, Any] | None) -> str:
    if not h:
        return "a process that has not written its name yet"
    return f"pid {h.get('pid')} on {h.get('host')} since {h.get('started')}: {h.get('command')}"


def _wait_seconds(wait: float | None) -> float:
    if wait is not None:
        return wait
    raw = os.environ.get(WAIT_ENV, "0")
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise LoraflowError(f"${WAIT_ENV}={raw!r}: expected a number of seconds") from None


@contextlib.contextmanager
def hold(root: Path | str, mode: str, command: str | None = None, wait: float | None = None) -> Iterator[Path]:
    """Hold mode's lock for the block; yields the lock file.

    Args:
        command: how the holder is named to whoever is refused (default: this process's command line).
        wait: seconds to wait for the lock (default $LORAFLOW_LOCK_WAIT, else 0: refuse at once).
    Raises:
        ModeBusy: naming the holder, when the lock is still held after `wait` seconds.
    """
    path = lock_path(root, mode)
    with _held_lock:
        if path in _held:
            _held[path] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _held_lock:
                _held[path] -= 1
        return

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + _wait_seconds(wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    h = holder(path)
                    if h is None:  # the holder is between taking the lock and writing its name
                        time.sleep(0.2)
                        h = holder(path)
                    raise ModeBusy(f"mode {mode!r} is being run by {_describe(h)} (lock {path}); wait for it to "
                                   f"finish, or set ${WAIT_ENV} to a number of seconds to wait") from None
                time.sleep(min(0.5, left))
        me = {"mode": mode, "pid": os.getpid(), "host": socket.gethostname(),
              "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        os.fsync(fd)
        with _held_lock:
            _held[path] = 1
        try:
            yield path
        finally:
            with _held_lock:
                _held.pop(path, None)
            os.ftruncate(fd, 0)  # the name goes before the lock does: nobody reads a finished run as the holder
    finally:
        os.close(fd)  # releases the lock (if taken)

"""File helpers every step uses: whole-or-nothing writes, JSONL, content hashes.

A write goes to a temporary sibling named `.<name>.tmp-<host>-<pid>-<random>` and is renamed into place, so a
reader sees the previous output or the new one, never part of one. A process killed mid-write (SIGKILL, OOM)
leaves its temporary sibling behind; the next write of the same name removes it once its owner is gone (same
host, pid not running or reused since). A write that runs out of space raises `DiskFull` naming the path, the
space needed and the space free, and leaves the previous output as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from loraflow.errors import DiskFull

log = logging.getLogger(__name__)

# Which machine wrote a temporary sibling: a pid means nothing on another host (a shared file system).
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_FULL = (errno.ENOSPC, errno.EDQUOT)


def dumps(obj: Any) -> str:
    """Canonical JSON line: UTF-8 text kept readable, keys in a stable order."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def json_text(obj: Any) -> str:
    """A JSON file's text as write_json writes it."""
    return json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n"


def jsonl_text(records: Iterable[Any]) -> str:
    return "".join(dumps(r) + "\n" for r in records)


# ---- temporary siblings and the ones a killed writer left ---------------------------------------------------

def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-{_HOST}-{os.getpid()}-"


def _started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def owner_gone(pid: int, since: float) -> bool:
    """Whether process `pid` of this host, which wrote something at time `since`, no longer runs (a pid now
    running a process started later is a reused one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # running, as another user
    started = _started(pid)
    # A process that started after the sibling was last written is not its writer: the pid was reused.
    return started is not None and started > since + 1.0


def remove_stale(final: Path) -> list[Path]:
    """Remove the temporary siblings of `final` that a killed writer left; returns them.

    Only siblings this host's writers named (`.<name>.tmp-<host>-<pid>-...`) whose pid no longer runs, or runs a
    process started after the sibling was last written, are removed: a live writer's never is, whatever its age,
    and another host's are left alone (a pid means nothing here).
    """
    final = Path(final)
    pattern = re.compile(re.escape(f".{final.name}.tmp-{_HOST}-") + r"(\d+)-")
    removed = []
    try:
        entries = list(os.scandir(final.parent))
    except FileNotFoundError:
        return removed
    for e in entries:
        m = pattern.match(e.name)
        if not m:
            continue
        try:
            mtime = e.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue  # its writer just renamed or removed it
        if not owner_gone(int(m.group(1)), mtime):
            continue
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
        log.info("removed %s, left by writer pid %s, which is gone", e.path, m.group(1))
        removed.append(Path(e.path))
    return removed


# ---- disk full --------------------------------------------------------------------------------------------

def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) is a write that found no room: ENOSPC / EDQUOT, also as the text that
    shutil.copytree's collected errors and Rust writers (safetensors) carry."""
    texts = [os.strerror(n) for n in _FULL] + ["os error 28", "os error 122"]
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        if any(t in str(exc) for t in texts):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def size_text(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _free(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _tree_size(root: Path) -> int:
    if root.is_file():
        return root.stat().st_size
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# ---- whole-or-nothing writes ------------------------------------------------------------------------------

def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "renameat2") else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system or the file
    system cannot (then the caller renames twice, and `b` is briefly absent)."""
    libc = _libc()
    if libc is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` whole, on error it is removed.

    Readers never see a half-written output folder: the previous one stays in place until the new one is whole,
    then the two are swapped in one rename. A crash leaves the previous one intact (and a temporary sibling,
    which the next write of `final` removes); a full disk raises `DiskFull`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final.name), dir=final.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are ordinary folders
        yield tmp
    except BaseException as e:
        written = _tree_size(tmp) if tmp is not None and tmp.exists() else 0
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            prev = f"; the previous one ({size_text(_tree_size(final))}) is unchanged" if final.exists() else ""
            raise DiskFull(
                f"{final}: disk full while writing it: {size_text(written)} of the new copy were written when the "
                f"file system ran out, {size_text(_free(final.parent))} free now; the new copy needs at least that "
                f"much room beside the previous output until it replaces it{prev}. Free space on the file system "
                f"of {final.parent} and run again") from e
        raise
    if final.exists() and _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous output
        return
    old = Path(f"{tmp}-old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _stage(path: Path, data: bytes) -> Path:
    """Write `data` to a fsynced temporary sibling of `path`; returns it (not yet renamed into place)."""
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary files
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _full(path: Path, needed: int, what: str) -> DiskFull:
    return DiskFull(f"{path}: disk full: writing {what} needs {size_text(needed)}, {size_text(_free(path.parent))} "
                    f"free on the file system of {path.parent}; nothing was replaced. Free space and run again")


def write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and an atomic rename (fsynced)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and an atomic rename (fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    try:
        tmp = _stage(path, data)
    except OSError as e:
        if disk_full(e):
            raise _full(path, len(data), "it") from e
        raise
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_set(folder: Path, files: dict[str, bytes], marker: str) -> None:
    """Replace several files of `folder` as one set, `marker` last: when `marker` exists, every file beside it
    comes from the same write.

    Every file is staged as a temporary sibling first (a full disk fails here, with nothing replaced); then
    `marker` is removed, the others are renamed into place and `marker` last. A kill during the renames leaves
    whole files of both sets but no `marker`: a reader that needs the set checks for it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [n for n in files if n != marker] + [marker]
    staged: dict[str, Path] = {}
    try:
        for name in names:
            remove_stale(folder / name)
            staged[name] = _stage(folder / name, files[name])
    except BaseException as e:
        for t in staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t)
        if disk_full(e):
            raise _full(folder / marker, sum(map(len, files.values())),
                        f"{', '.join(names)} (staged whole before any is replaced)") from e
        raise
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / marker)
    for name in names:
        os.replace(staged[name], folder / name)


@contextlib.contextmanager
def reserved(final: Path, nbytes: int) -> Iterator[None]:
    """Hold `nbytes` on the file system of `final` for the block (a temporary sibling of zeros, fsynced), released
    when it ends: work whose result must be written afterwards (promote's registry writes, then decision.json)
    fails before it starts when there is no room. Raises `DiskFull`. Another writer may take the room between the
    release and the write; nothing here prevents that."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    hold = final.parent / f"{_tmp_prefix(final.name)}reserved"
    try:
        with open(hold, "wb") as f:
            f.write(bytes(nbytes))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(hold)
        if disk_full(e):
            raise DiskFull(f"{final}: disk full: {size_text(nbytes)} are reserved for it before any other work, "
                           f"{size_text(_free(final.parent))} free on the file system of {final.parent}; nothing "
                           f"was done. Free space and run again") from e
        raise
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(hold)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json_text(obj))


def write_jsonl(path: Path, records: Iterable[Any]) -> int:
    records = list(records)
    write_text(path, jsonl_text(records))
    return len(records)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file written by a step (trusted: any error names the file and line)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return out


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: Path) -> str:
    """Hash of a folder's files (relative names and contents), independent of mtimes and order on disk."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode() + b"\n")
    return h.hexdigest()

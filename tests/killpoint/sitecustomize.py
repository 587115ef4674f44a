"""A real SIGKILL at an exact point of a step's writes, for tests/test_faults_write.py.

Python imports `sitecustomize` at start-up from PYTHONPATH; the test puts this folder there only for the process it
means to kill (and, under `dvc repro`, for everything DVC starts). An audit hook (PEP 578) watches the events the
interpreter raises for file operations (`open`, `os.rename` for os.replace, `tempfile.mkdtemp`, ...) and, at the
n-th event matching

    LORAFLOW_KILL_AT = "<audit event>|<fnmatch glob of its first argument>|<n>"

in a process whose script matches LORAFLOW_KILL_IN (e.g. `*/steps/evaluate.py`), appends the event to
LORAFLOW_KILL_LOG and sends SIGKILL to itself (LORAFLOW_KILL_GROUP=1: to its whole process group, e.g. `dvc repro`
and the step it runs). Nothing is caught or cleaned up: the kernel ends the process as any kill -9 would.
"""

import fnmatch
import os
import signal
import sys

_spec = os.environ.get("LORAFLOW_KILL_AT")
if _spec:
    _event, _glob, _n = _spec.split("|")
    _seen = [0]

    def _hook(event, args):
        if event != _event or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        if not fnmatch.fnmatch(sys.argv[0] if sys.argv else "", os.environ.get("LORAFLOW_KILL_IN", "*")):
            return
        path = os.fsdecode(args[0])
        if not fnmatch.fnmatch(path, _glob):
            return
        _seen[0] += 1
        if _seen[0] != int(_n):
            return
        log = os.environ.get("LORAFLOW_KILL_LOG")
        if log:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(fd, f"{os.getpid()} {event} {path}\n".encode())
            os.close(fd)
        if os.environ.get("LORAFLOW_KILL_GROUP") == "1":
            os.killpg(os.getpgid(0), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(_hook)

"""The server's side of feedback: append each event durably, and start a pipeline run for a mode once enough
new events have arrived. The on-disk format and what curation makes of it: loraflow/feedback.py.

A run starts through `ServeSettings.trigger` when the entry point hands one in (flows/cli.py hands in
flows.trigger.trigger_pipeline: a Prefect deployment run when PREFECT_API_URL is set); otherwise, and for a
`trigger_command`, as a detached local process (`start_local_run`).
"""

from __future__ import annotations

import datetime as dt
import logging
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from loraflow import feedback as fb
from loraflow.serve.settings import ServeSettings

log = logging.getLogger("loraflow.serve")


def local_command(mode: str, params_file: str, overrides: list[str], command: str | None = None) -> list[str]:
    """`loraflow run --mode <mode>` (through the entry point module), or the `command` template with {mode}."""
    if command:
        return shlex.split(command.format(mode=mode))
    sets = [a for o in overrides for a in ("-S", o)]
    return [sys.executable, "-m", "flows.cli", "run", "--mode", mode, "--params", params_file, *sets]


def start_local_run(mode: str, root: Path, params_file: str = "params.yaml", overrides: list[str] | None = None,
                    command: str | None = None, deployment: str | None = None) -> dict[str, Any]:
    """Start a run in a detached background process on this machine (`deployment` is not used here: it is in
    the signature the handed-in trigger shares). Returns how it was started, with the process."""
    argv = local_command(mode, params_file, overrides or [], command)
    logs = Path(root) / "data" / "serve" / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"{mode}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%f}.log"
    with open(log_file, "w", encoding="utf-8") as out:
        # Its own session: a training run outlives a server restart, and the server's Ctrl-C does not reach it.
        proc = subprocess.Popen(argv, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return {"how": "local", "argv": argv, "pid": proc.pid, "log": str(log_file), "process": proc,
            "started": dt.datetime.now(dt.timezone.utc).isoformat()}


class FeedbackSink:
    """Appends events durably and starts a pipeline run for a mode once enough new feedback has arrived."""

    def __init__(self, settings: ServeSettings):
        from loraflow.io import read_json

        self.settings = settings
        self.lock = threading.Lock()
        self.state_file = Path(settings.root) / "data" / "serve" / "feedback_state.json"
        self.state: dict[str, dict[str, Any]] = read_json(self.state_file) if self.state_file.exists() else {}
        self.runs: dict[str, dict[str, Any]] = {}  # mode -> the last run started (with its process when local)
        self.counts: dict[str, int] = {}  # events on disk per mode, counted once then kept up to date
        # A crash mid-append leaves a torn last line: sealed before the first event is appended after it.
        self.torn = fb.seal_torn_lines(settings.root)
        for t in self.torn:
            log.warning("feedback: %s line %d: %s", t["file"], t["line"], t["reason"])

    def record(self, event: dict[str, Any]) -> dict[str, Any]:
        """Append the event; count it toward the mode's threshold only when its key may train (event["trains"])."""
        from loraflow.io import write_json

        mode, trains = event["mode"], fb.may_train(event)
        with self.lock:  # held across the append too, so the counts match the lines on disk
            if mode not in self.counts:
                self.counts[mode] = fb.count_events(self.settings.root, mode)
            path = fb.append_event(self.settings.root, event)
            st = self.state.setdefault(mode, {"at_last_trigger": 0})
            started = None
            if trains:
                self.counts[mode] += 1
            else:  # recorded for people to read; curation quarantines it, so it must not start a run either
                st["events_not_training"] = st.get("events_not_training", 0) + 1
            total = self.counts[mode]
            new = total - st["at_last_trigger"]
            if trains and 0 < self.settings.feedback_threshold <= new and not self._running(mode):
                started = self._trigger(mode)
                if started is not None:
                    st.update(at_last_trigger=total, last_run={k: v for k, v in started.items() if k != "process"})
                    new = 0
            st["events"] = total
            write_json(self.state_file, self.state)
        return {"file": str(path), "counts_toward_training": trains, "new_since_last_run": new,
                "threshold": self.settings.feedback_threshold,
                "run_started": None if started is None else {k: v for k, v in started.items() if k != "process"}}

    def _running(self, mode: str) -> bool:
        proc = self.runs.get(mode, {}).get("process")
        return proc is not None and proc.poll() is None

    def run_overrides(self) -> list[str]:
        """The -S overrides of a run feedback starts: its warm start first, then the server's own (which win)."""
        return [f"train.warm_start={self.settings.feedback_warm_start}", *self.settings.overrides]

    def _trigger(self, mode: str) -> dict[str, Any] | None:
        s = self.settings
        start = s.trigger or start_local_run
        try:
            run = start(mode, Path(s.root), s.params_file, self.run_overrides(), s.trigger_command, s.deployment)
        except Exception:  # noqa: BLE001 - feedback is already safe on disk; the next one retries the trigger
            log.exception("feedback: could not start a pipeline run for mode %s", mode)
            return None
        log.info("feedback: %s new events for mode %s -> pipeline run started (%s)", s.feedback_threshold, mode,
                 run.get("flow_run_id") or run.get("pid"))
        self.runs[mode] = run
        return run

    def status(self) -> dict[str, Any]:
        with self.lock:
            out = {}
            for mode, st in self.state.items():
                run = self.runs.get(mode)
                proc = (run or {}).get("process")
                out[mode] = {**st, "run_exit_code": None if proc is None else proc.poll(),
                             "last_outcome": last_outcome(Path(self.settings.root), mode)}
            for t in self.torn:
                out.setdefault(t["mode"], {}).setdefault("torn_lines_sealed", []).append(
                    {k: v for k, v in t.items() if k != "mode"})
            return out


def last_outcome(root: Path, mode: str) -> dict[str, Any] | None:
    """The mode's last pipeline decision (data/promotion/<mode>/decision.json): what it decided, why, and which
    version serves since; None before the first run."""
    import datetime as dt

    from loraflow.io import read_json

    path = root / "data" / "promotion" / mode / "decision.json"
    try:
        d = read_json(path)
        at = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
    except (OSError, ValueError):
        return None
    champion = (d.get("aliases_after") or {}).get("champion")
    return {"decision": d.get("decision"), "reason": d.get("reason"), "candidate_version": d.get("version"),
            "champion_after": champion, "parity": (d.get("parity") or {}).get("passed"), "decided_at": at}

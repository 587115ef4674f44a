"""The server's side of feedback: append each event durably, and start a pipeline run for a mode once enough
new events have arrived. The on-disk format and what curation makes of it: loraflow/feedback.py."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from loraflow import feedback as fb
from loraflow.serve.settings import ServeSettings

log = logging.getLogger("loraflow.serve")


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

    def _trigger(self, mode: str) -> dict[str, Any] | None:
        from flows.trigger import trigger_pipeline

        s = self.settings
        try:
            run = trigger_pipeline(mode, Path(s.root), s.params_file, s.overrides, s.trigger_command, s.deployment)
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
                out[mode] = {**st, "run_exit_code": None if proc is None else proc.poll()}
            return out

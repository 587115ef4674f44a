"""Users' feedback on served answers: the on-disk format, the durable append, and what curation makes of it.

Where: `data/raw/feedback/<mode>/feedback-<YYYY-MM-DD>.jsonl` (UTC day), one event per line, appended
by `loraflow serve` (flushed and fsynced) and never rewritten. Each line is a JSON object:

    {"schema": 1,
     "event_id": "fb-<hex>",            # unique per event
     "response_id": "chatcmpl-<hex>",   # the served answer it is about (null when posted without one)
     "mode": "retail_media",            # the folder name; letters, digits, '_' or '-'
     "adapter_version": "3",            # registry version that answered (null: base model)
     "messages": [{"role": ..., "content": ...}, ...],  # the prompt: the conversation up to the answer
     "answer": "...",                   # what was served (null for a bare preference pair)
     "rating": 4,                       # 1-5 or null
     "correction": "...",               # the user's better answer, or null
     "preferred": "...", "rejected": "...",  # an explicit preference pair (both or neither), or null
     "timestamp": "2026-11-22T09:30:00.123456+00:00",
     "key": "support-team",             # the API key's name that sent it (null: the server had no keys)
     "trains": true}                    # whether that key may train; false: recorded, quarantined by curation

A line torn by a crash mid-append (it ends without a newline) is sealed with one, appended, when the server starts
(`seal_torn_lines`) and before any append after it: the fragment stays a line of its own, which curation quarantines
as not valid JSON, and no acknowledged event is ever glued onto it.

Curation (`sft_and_pref`) turns an event into at most one SFT conversation and one preference pair:
a correction -> SFT on prompt + correction, and the pair (correction over the served answer);
rating >= the threshold without a correction -> SFT on prompt + answer; preferred/rejected -> the pair.
Anything else (a low rating with nothing better offered) has nothing to learn and is quarantined with a reason,
and so is every event whose key may not train (`"trains": false`): users without that right cannot poison a mode.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from loraflow.io import dumps

SCHEMA = 1
MODE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def feedback_dir(root: Path, mode: str) -> Path:
    return Path(root) / "data" / "raw" / "feedback" / mode


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


_append_lock = threading.Lock()


def append_event(root: Path, event: dict[str, Any]) -> Path:
    """Append one event durably: the line is written, flushed and fsynced before this returns.

    A new file's directory entry is fsynced too, so a crash right after cannot lose the file itself.
    """
    mode = event["mode"]
    if not MODE_RE.match(mode or ""):
        raise ValueError(f"mode {mode!r}: expected letters, digits, '_' or '-' (it names a folder)")
    folder = feedback_dir(root, mode)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"feedback-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.jsonl"
    line = dumps({"schema": SCHEMA, **event}) + "\n"
    with _append_lock:
        created = not path.exists()
        # A line torn by a crash mid-append ends without a newline: this event must not be glued onto it (the
        # acknowledged event would be lost in an unparseable line). The fragment stays a line of its own.
        torn = not created and torn_tail(path) is not None
        with open(path, "a", encoding="utf-8") as f:
            f.write(("\n" if torn else "") + line)
            f.flush()
            os.fsync(f.fileno())
        if created:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return path


def torn_tail(path: Path) -> str | None:
    """The file's last line when it ends without a newline (torn by a crash mid-append), else None."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return None
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None
        f.seek(max(0, size - 65_536))
        return f.read().rsplit(b"\n", 1)[-1].decode("utf-8", errors="replace")


def seal_torn_lines(root: Path) -> list[dict[str, Any]]:
    """End every feedback file's torn last line with a newline (appended: the file is never rewritten), so the
    fragment is a line of its own, which curation quarantines ("not valid JSON"), and the next event starts clean.
    Returns one entry per sealed line: file, line number, the fragment's start, and the reason."""
    sealed = []
    base = Path(root) / "data" / "raw" / "feedback"
    for path in sorted(base.glob("*/*.jsonl")) if base.is_dir() else []:
        with _append_lock:
            fragment = torn_tail(path)
            if fragment is None:
                continue
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        with open(path, "rb") as f:
            line = sum(1 for _ in f)
        sealed.append({"file": str(path), "line": line, "mode": path.parent.name, "start": fragment[:80],
                       "reason": f"torn line ({len(fragment.encode())} bytes, no newline: a crash mid-append?); "
                                 "sealed with a newline, curation quarantines it"})
    return sealed


class Untrainable(ValueError):
    """A well-formed event that trains nothing; `kind` is curation's quarantine reason."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def may_train(event: dict[str, Any]) -> bool:
    """Events without the field (older servers, or no keys) may: the server answered only loopback then."""
    return event.get("trains", True) is not False


def count_events(root: Path, mode: str) -> int:
    """Events on disk for `mode` that may train (what the retraining threshold counts)."""
    folder = feedback_dir(root, mode)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.glob("*.jsonl"):
        with open(p, encoding="utf-8") as f:
            for line in f:
                try:
                    n += line.strip() != "" and may_train(json.loads(line))
                except (ValueError, AttributeError):
                    pass  # a torn or foreign line trains nothing (curation quarantines it)
    return n


def sft_and_pref(event: Any, min_rating: int) -> tuple[list[dict] | None, dict | None]:
    """(SFT messages or None, preference pair {prompt, chosen, rejected} or None) for one feedback event.

    Raises ValueError naming the field when the event is malformed or carries nothing to learn.
    """
    if not isinstance(event, dict):
        raise ValueError(f"feedback event: expected a JSON object, got {type(event).__name__}")
    if not may_train(event):
        raise Untrainable("not_allowed_to_train", f"feedback sent with API key {event.get('key')!r}, which may not train "
                         "(its `train` is false in the server's keys file): recorded, not trained on")
    prompt = event.get("messages")
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("feedback field 'messages': expected the non-empty prompt conversation")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError(f"feedback messages[{i}]: expected an object with 'role' and string 'content'")
    prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]

    def text(key: str) -> str | None:
        v = event.get(key)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"feedback field {key!r}: expected a string or null, got {type(v).__name__}")
        return v if v and v.strip() else None

    answer, correction = text("answer"), text("correction")
    preferred, rejected = text("preferred"), text("rejected")
    rating = event.get("rating")
    if rating is not None and (not isinstance(rating, int) or not 1 <= rating <= 5):
        raise ValueError(f"feedback field 'rating': expected an integer 1-5 or null, got {rating!r}")
    if (preferred is None) != (rejected is None):
        raise ValueError("feedback fields 'preferred'/'rejected': give both or neither")

    sft, pref = None, None
    if correction is not None:
        sft = prompt + [{"role": "assistant", "content": correction}]
        if answer is not None and answer.strip() != correction.strip():
            pref = (correction, answer)
    elif rating is not None and rating >= min_rating and answer is not None:
        sft = prompt + [{"role": "assistant", "content": answer}]
    if preferred is not None:
        pref = (preferred, rejected)
    if sft is None and pref is None:
        raise Untrainable("low_rating", f"feedback: rating {rating} below curate.feedback_min_rating {min_rating} and no correction "
                         "or preferred/rejected pair: nothing to learn")
    pair = None if pref is None else {"prompt": prompt, "chosen": [{"role": "assistant", "content": pref[0]}],
                                      "rejected": [{"role": "assistant", "content": pref[1]}]}
    return sft, pair

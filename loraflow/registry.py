"""Moving the `champion` alias safely: a registry-wide lock, the champion history, rollback.

MLflow's alias and tag writes are last-writer-wins on every backend (no compare-and-set), so a tag used as
a version counter cannot detect a concurrent writer. The one atomic test-and-set the registry API offers on
both the SQLite store and a tracking server is "create a registered model with a unique name" (a primary-key
insert). `alias_lock` uses it as a mutex: no shared file system needed, the same code for sqlite and servers.
Inside the lock a writer re-reads the alias, decides, writes, and re-reads again to verify (a person may move
the alias in the UI at any moment; that is reported, never overwritten).

The history is a registered-model tag holding an append-only JSON list of events
`{"version", "by", "at", "note"}`; replaying it (a rollback pops) gives the stack of champions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from loraflow.errors import LoraflowError

log = logging.getLogger(__name__)

HISTORY_TAG = "loraflow.champion_history"
ROLLED_BACK_TAG = "loraflow.rolled_back"
LOCK_TTL_S = 600.0  # a lock older than this is a crashed holder's: registry writes take seconds
MAX_EVENTS = 200  # keeps the tag well under MLflow's 100,000-character limit


class RegistryError(LoraflowError):
    """A registry operation could not be done as asked (busy lock, unknown version, nothing to roll back)."""


def lock_name(name: str) -> str:
    return f"{name}--alias-lock"


@contextlib.contextmanager
def alias_lock(client, name: str, wait_s: float = 120.0, ttl_s: float = LOCK_TTL_S) -> Iterator[None]:
    """Hold the registry-wide lock for `name`'s aliases (see the module docstring for why this works)."""
    from mlflow.exceptions import MlflowException

    lock = lock_name(name)
    holder = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": holder, "since": f"{time.time():.3f}"},
                                           description=f"held by {holder} while it moves {name}'s aliases")
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
            if time.time() - float(held.tags.get("since", "0")) > ttl_s:
                log.warning("registry: breaking stale lock %s held by %s", lock, held.tags.get("holder"))
                client.delete_registered_model(lock)
                continue
        except MlflowException:
            continue  # released between our create and our look: try again at once
        if time.monotonic() > deadline:
            raise RegistryError(f"registered model {lock!r} (a lock on {name}'s aliases) is still held by "
                                f"{held.tags.get('holder')} after {wait_s:.0f} s; if that process is gone, delete it")
        time.sleep(0.1 + random.random() * 0.3)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def aliases(client, name: str) -> dict[str, str]:
    # sqlite gives versions as ints, REST as strings: normalise to strings.
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def history(client, name: str) -> list[dict[str, Any]]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def champion_stack(events: list[dict[str, Any]]) -> list[str]:
    """Replay the history: every event pushes its version, except a rollback, which pops back to it."""
    stack: list[str] = []
    for e in events:
        if e["by"] == "rollback":
            while stack and stack[-1] != e["version"]:
                stack.pop()
            if not stack:
                stack.append(e["version"])
        else:
            stack.append(e["version"])
    return stack


def _event(version: str, by: str, note: str = "") -> dict[str, Any]:
    e = {"version": str(version), "by": by, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return {**e, "note": note} if note else e


def _record(client, name: str, events: list[dict[str, Any]], current: str | None) -> list[dict[str, Any]]:
    """The history, with a move made outside loraflow (the MLflow UI) added so a rollback can return to it."""
    stack = champion_stack(events)
    if current is not None and (not stack or stack[-1] != current):
        events = [*events, _event(current, "outside loraflow (MLflow UI or API)")]
    return events


def _write_history(client, name: str, events: list[dict[str, Any]]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(events[-MAX_EVENTS:]))


def move_champion(client, name: str, version: str, by: str, note: str = "") -> None:
    """Point `champion` at `version` and record it. Call inside `alias_lock`."""
    version = str(version)
    current = aliases(client, name).get("champion")
    events = _record(client, name, history(client, name), current)
    events.append(_event(version, by, note))
    client.set_registered_model_alias(name, "champion", version)
    if aliases(client, name).get("challenger") == version:
        client.delete_registered_model_alias(name, "challenger")
    _write_history(client, name, events)
    _verify(client, name, version)


def _verify(client, name: str, version: str) -> None:
    got = aliases(client, name).get("champion")
    if got != version:
        raise RegistryError(f"{name}: champion is v{got} right after loraflow set it to v{version}: someone moved "
                            f"it at the same moment (MLflow UI?); leaving their choice")


def promote_version(client, name: str, version: str, by: str = "person (loraflow promote)") -> dict[str, str]:
    """A person's decision: `version` becomes champion, whatever the gate said."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"{name} has no version {version!r}") from None
    with alias_lock(client, name):
        client.delete_model_version_tag(name, str(version), ROLLED_BACK_TAG)
        move_champion(client, name, str(version), by)
    return aliases(client, name)


def rollback(client, name: str) -> dict[str, Any]:
    """`champion` goes back to the champion before it; the demoted version is tagged so no run re-promotes it."""
    with alias_lock(client, name):
        current = aliases(client, name).get("champion")
        if current is None:
            raise RegistryError(f"{name} has no champion to roll back")
        events = _record(client, name, history(client, name), current)
        stack = champion_stack(events)
        if len(stack) < 2:
            raise RegistryError(f"{name}: champion v{current} has no previous champion in its history "
                                f"(tag {HISTORY_TAG!r}); nothing to roll back to")
        previous = stack[-2]
        events.append(_event(previous, "rollback", f"from v{current}"))
        client.set_registered_model_alias(name, "champion", previous)
        client.set_model_version_tag(name, current, ROLLED_BACK_TAG,
                                     f"rolled back to v{previous} at {events[-1]['at']}")
        _write_history(client, name, events)
        _verify(client, name, previous)
    return {"registered_model": name, "from": current, "to": previous, "aliases_after": aliases(client, name)}

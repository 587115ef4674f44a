"""Everything that writes the MLflow model registry: registering an adapter with its evidence tags, moving
the `champion` / `challenger` aliases safely (a registry-wide lock, the champion history), rollback.

`register` records a `loraflow.promotion.Decision`; it decides nothing itself except, under the lock, whether
a champion that moved since the candidate was evaluated may still be replaced (`move_aliases`).

MLflow's alias and tag writes are last-writer-wins on every backend (no compare-and-set), so a tag used as
a version counter cannot detect a concurrent writer. The one atomic test-and-set the registry API offers on
both the SQLite store and a tracking server is "create a registered model with a unique name" (a primary-key
insert). `alias_lock` uses it as a mutex: no shared file system needed, the same code for sqlite and servers.
Inside the lock a writer re-reads the alias, decides, writes, and re-reads again to verify (a person may move
the alias in the UI at any moment; that is reported, never overwritten).

The history is a registered-model tag holding an append-only JSON list of events
`{"version", "by", "at", "note"}`; replaying it (a rollback pops) gives the stack of champions.

A tracking server that stops answering (down, restarted) mid-promotion: every registry write promote makes is
safe to repeat, so each is retried whole with exponential backoff (`retried`, params `promote.registry_retries`
and `registry_backoff_s`; MLflow's own per-request retries are off inside, so the two do not multiply), then fails
naming the server and the attempts. Repeating is safe because a version is created together with its adapter's
hash tag (one transaction) and found by it before any new one is made, the alias lock taken by a holder that is
gone (this process's failed attempt, a dead pid on this host) is broken at once, and no alias moves onto a version
before its adapter has been downloaded back and its hash checked (`verify_artifacts`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow import generation, models, tracking
from loraflow.config import Params, registered_model_name
from loraflow.errors import LoraflowError
from loraflow.io import owner_gone, read_json, sha256_file

if TYPE_CHECKING:
    from loraflow.promotion import Decision

log = logging.getLogger(__name__)

HISTORY_TAG = "loraflow.champion_history"
ROLLED_BACK_TAG = "loraflow.rolled_back"
LOCK_TTL_S = 600.0  # a lock older than this is a crashed holder's: registry writes take seconds
MAX_EVENTS = 200  # keeps the tag well under MLflow's 100,000-character limit
MAX_BACKOFF_S = 120.0  # urllib3's cap on a wait, which MLflow's own retries use
ADAPTER_FILE = "adapter_model.safetensors"


class RegistryError(LoraflowError):
    """A registry operation could not be done as asked (busy lock, unknown version, nothing to roll back)."""


class RegistryUnreachable(RegistryError):
    """The tracking server did not answer after every retry."""


# -- a registry that does not answer

_http_lock = threading.Lock()
_http_users = 0
_http_saved: dict[str, str | None] = {}


@contextlib.contextmanager
def mlflow_http(retries: int, backoff: int = 1) -> Iterator[None]:
    """MLflow's own per-request retries set to `retries` for the block (the caller retries), unless the user set
    MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR. MLflow reads them at each request; threads share the
    setting of the first one in, restored when the last one leaves."""
    global _http_users
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(backoff)}
    with _http_lock:
        if _http_users == 0:
            _http_saved.clear()
            for k, v in keys.items():
                if k not in os.environ:
                    _http_saved[k] = None
                    os.environ[k] = v
        _http_users += 1
    try:
        yield
    finally:
        with _http_lock:
            _http_users -= 1
            if _http_users == 0:
                for k in _http_saved:
                    os.environ.pop(k, None)
                _http_saved.clear()


def transient(e: BaseException) -> bool:
    """True for an error that says the server did not answer, or answered "try again": no answer at all (MLflow
    wraps connection errors as INTERNAL_ERROR, HTTP 500), a 5xx, 408 or 429. A 4xx is the request's fault."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, RegistryError):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests

        if isinstance(e, requests.exceptions.RequestException):
            return True
    except ImportError:
        pass
    if isinstance(e, MlflowException):
        code = e.get_http_status_code()
        return code >= 500 or code in (408, 429)
    return False


def remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def retried(what: str) -> Callable:
    """Retry a registry operation `f(params, ...)` whole on a transient error of a remote tracking server, with
    exponential backoff (`promote.registry_retries`, `promote.registry_backoff_s`); then RegistryUnreachable naming
    the server, the attempts and the time. Only for operations that are safe to repeat (see the module docstring)."""

    def wrap(f: Callable) -> Callable:
        @functools.wraps(f)
        def call(params: Params, *args: Any, **kw: Any) -> Any:
            uri = tracking.tracking_uri(params)
            tries = 1 + params.promote.registry_retries if remote(uri) else 1
            wait, t0 = params.promote.registry_backoff_s, time.monotonic()
            for attempt in range(1, tries + 1):
                try:
                    with mlflow_http(0):
                        return f(params, *args, **kw)
                except Exception as e:  # noqa: BLE001 - sorted by `transient`; anything else goes up as it is
                    if not transient(e) or not remote(uri):
                        raise
                    if attempt == tries:
                        raise RegistryUnreachable(
                            f"MLflow tracking server {uri} did not answer while loraflow was trying to {what}: "
                            f"{tries} attempts over {time.monotonic() - t0:.0f} s (promote.registry_retries="
                            f"{params.promote.registry_retries}, registry_backoff_s={params.promote.registry_backoff_s:g},"
                            f" doubling). Last error: {_short(e)}. Start the server (or point base.tracking_uri / "
                            f"MLFLOW_TRACKING_URI at one) and re-run promote: it finds what it registered by the "
                            f"adapter's hash and registers nothing twice") from e
                    log.warning("registry %s: %s failed (attempt %d of %d: %s); retrying in %.1f s",
                                uri, what, attempt, tries, _short(e), wait)
                    time.sleep(wait)
                    wait = min(2 * wait, MAX_BACKOFF_S)
            raise AssertionError("unreachable")

        return call

    return wrap


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 400 else text[:400] + "..."


def lock_name(name: str) -> str:
    return f"{name}--alias-lock"


@contextlib.contextmanager
def alias_lock(client, name: str, wait_s: float = 120.0, ttl_s: float = LOCK_TTL_S) -> Iterator[None]:
    """Hold the registry-wide lock for `name`'s aliases (see the module docstring for why this works)."""
    from mlflow.exceptions import MlflowException

    lock = lock_name(name)
    holder = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
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
            since = float(held.tags.get("since", "0"))
            gone = _holder_gone(held.tags.get("holder", ""), holder, since)
            if gone or time.time() - since > ttl_s:
                log.warning("registry: breaking stale lock %s held by %s (%s)", lock, held.tags.get("holder"),
                            gone or f"older than {ttl_s:.0f} s")
                client.delete_registered_model(lock)
                continue
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            continue  # released between our create and our look: try again at once
        if time.monotonic() > deadline:
            raise RegistryError(f"registered model {lock!r} (a lock on {name}'s aliases) is still held by "
                                f"{held.tags.get('holder')} after {wait_s:.0f} s; if that process is gone, delete it")
        time.sleep(0.1 + random.random() * 0.3)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _holder_gone(other: str, me: str, since: float) -> str | None:
    """Why the lock's holder, which took it at `since`, can no longer release it, or None: it is this very thread
    (an earlier attempt whose release the server never saw), or a process of this host that no longer runs (a pid
    reused since is gone too: `loraflow.io.owner_gone`)."""
    if other == me:
        return "left by this process's earlier attempt"
    host, _, rest = other.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return None
    if owner_gone(int(pid), since):
        return f"its process {pid} no longer runs"
    return None


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


def version_tags(params: Params, adapter_dir: Path, mode: str, info: dict, metrics: dict,
                 decision: Decision) -> dict[str, str]:
    """The evidence a version carries: hashes (adapter, data, eval set, chat template), commit, params, metrics,
    the decision and what the version was evaluated against."""
    summary = {n: {k: round(v["mean"], 6) for k, v in metrics[n].items() if isinstance(v, dict) and "mean" in v}
               for n in ("base", "champion", "candidate") if metrics.get(n)}
    tags = {
        "mode": mode,
        "adapter_sha256": info["adapter_sha256"],
        "train_data_sha256": info.get("train_data_sha256", ""),
        "eval_set_sha256": metrics["eval_set"]["sha256"],
        "chat_template_sha256": models.saved_template_sha256(adapter_dir),
        "git_commit": info.get("git_commit") or tracking.git_commit() or "",
        "base_model": params.base.model,
        "params.train": json.dumps(info.get("params", {}), sort_keys=True),
        "params.promote": json.dumps(params.promote.model_dump(), sort_keys=True),
        "metrics": json.dumps(summary, sort_keys=True),
        "decision": decision.decision,
        "decision_reason": decision.reason,
        "evaluated_against_champion": str(metrics.get("champion_version") or "none"),
        **tracking.dvc_hashes(adapter_dir, mode),
    }
    return tags


def register(params: Params, mode: str, adapter_dir: Path, metrics: dict, decision: Decision) -> dict[str, Any]:
    """Create (or reuse) the registry version for this adapter and move aliases as decided."""
    version = register_version(params, mode, adapter_dir, metrics, decision)
    return move(params, mode, version, metrics, decision)


@retried("register the adapter as a model version")
def register_version(params: Params, mode: str, adapter_dir: Path, metrics: dict, decision: Decision) -> str:
    """Create (or reuse: one version per adapter content hash) the version and tag it with its evidence; no
    alias moves (steps/promote.py checks parity on it first). Returns the version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from loraflow.pyfunc import AdapterModel, signature

    name = registered_model_name(mode)
    tracking.setup(params, mode)
    client = mlflow.MlflowClient()
    info = read_json(adapter_dir / "train_info.json")
    sha = info["adapter_sha256"]
    try:
        client.create_registered_model(name, description=f"LoRA adapters for mode {mode!r}, managed by loraflow")
    except MlflowException:
        pass  # exists

    # Idempotent: the same adapter (by content hash) is registered once, however often promote re-runs. The
    # version is created with its hash tag in one transaction, so an attempt cut off at any point leaves either no
    # version or one this search finds (a model logged to the run but never registered is all it can leave).
    existing = client.search_model_versions(f"name='{name}' and tag.adapter_sha256='{sha}'")
    if existing:
        version = str(min(int(v.version) for v in existing))
        log.info("registry: adapter %s already registered as %s v%s", sha[:12], name, version)
    else:
        with mlflow.start_run(run_id=info["mlflow_run_id"]):
            model_info = mlflow.pyfunc.log_model(
                name="model",
                python_model=AdapterModel(),
                artifacts={"adapter": str(adapter_dir)},
                model_config={"base_model": params.base.model, "model_cache": params.base.model_cache,
                              "batch_size": params.evaluate.batch_size},
                signature=signature(generation.load(adapter_dir, params.generate).max_new_tokens),
                pip_requirements=["loraflow", "torch", "transformers", "peft", "mlflow"],
            )
        version = str(mlflow.register_model(model_info.model_uri, name, tags={"adapter_sha256": sha}).version)
    for k, v in version_tags(params, Path(adapter_dir), mode, info, metrics, decision).items():
        client.set_model_version_tag(name, version, k, v)
    return version


@retried("tag the model version")
def set_tags(params: Params, mode: str, version: str, tags: dict[str, str]) -> None:
    import mlflow

    tracking.setup(params, mode)
    client = mlflow.MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(registered_model_name(mode), version, k, v)


@retried("read the aliases")
def current_aliases(params: Params, mode: str) -> dict[str, str]:
    """The mode's aliases now ({} when the registered model does not exist yet)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.setup(params, mode)
    try:
        return aliases(mlflow.MlflowClient(), registered_model_name(mode))
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return {}


def verify_artifacts(client, name: str, version: str) -> str:
    """Download the version back and check its adapter against the `adapter_sha256` tag it was created with:
    an alias never points at a version that cannot be served. Returns the hash; RegistryError when it fails."""
    import mlflow

    mv = client.get_model_version(name, version)
    want = mv.tags.get("adapter_sha256")
    with tempfile.TemporaryDirectory(prefix="loraflow-verify-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
        found = sorted(local.rglob(ADAPTER_FILE))
        if not found or not (found[0].parent / "adapter_config.json").exists():
            raise RegistryError(f"{name} v{version}: its artifacts ({mv.source}) hold no {ADAPTER_FILE} with an "
                                f"adapter_config.json beside it (files lost from the artifact store?); no alias moved "
                                f"onto it. Delete v{version} and re-run promote to register the adapter again")
        got = sha256_file(found[0])
    if want and got != want:
        raise RegistryError(f"{name} v{version}: the downloaded {ADAPTER_FILE} has sha256 {got[:12]}..., the version "
                            f"was registered with {want[:12]}... (tag adapter_sha256); no alias moved onto it")
    return got


@retried("move the aliases")
def move(params: Params, mode: str, version: str, metrics: dict, decision: Decision) -> dict[str, Any]:
    """Move the aliases as decided (under the registry lock, once the version's artifacts were downloaded back and
    checked) and record the outcome on the version."""
    import mlflow

    name = registered_model_name(mode)
    tracking.setup(params, mode)
    client = mlflow.MlflowClient()
    verify_artifacts(client, name, version)  # before the lock: a download may take a while
    with alias_lock(client, name):
        note = move_aliases(client, name, version, metrics, decision, params.promote.min_delta)
    client.set_model_version_tag(name, version, "alias_outcome", note)
    return {"registered_model": name, "version": version, "aliases_after": aliases(client, name),
            "registry_note": note}


def move_aliases(client, name: str, version: str, metrics: dict, decision: Decision, min_delta: float) -> str:
    """Compare-and-set under the lock: re-read `champion`, then move it only if that is still right."""
    if decision.decision == "challenger":
        client.set_registered_model_alias(name, "challenger", version)
        return "challenger: " + decision.reason
    current = aliases(client, name).get("champion")
    evaluated_against = metrics.get("champion_version")
    evaluated_against = str(evaluated_against) if evaluated_against else None
    mv = client.get_model_version(name, version)
    if current == version:
        return f"already champion (v{version}); nothing moved"
    if ROLLED_BACK_TAG in mv.tags:
        # A person rolled this adapter back: the pipeline never undoes that.
        return f"not moved: v{version} was rolled back ({mv.tags[ROLLED_BACK_TAG]})"
    if current == evaluated_against:
        # The reason is in the version's decision_reason tag; the history stays short enough to read in the UI.
        move_champion(client, name, version, "pipeline (promote, policy auto)")
        return f"champion moved to v{version} (was {('v' + current) if current else 'none'})"
    # Champion moved since this candidate was evaluated. A sibling run evaluated against the same champion on
    # the same eval set can be compared on the same numbers (the better one wins); anything else (a person's
    # choice, a newer lineage) is left alone.
    cur = client.get_model_version(name, current) if current else None
    m = decision.metric
    if (cur is not None and cur.tags.get("evaluated_against_champion") == str(evaluated_against or "none")
            and cur.tags.get("eval_set_sha256") == metrics["eval_set"]["sha256"]
            and "metrics" in cur.tags and _by_pipeline(client, name, current)):
        # Same eval set, same reference: the means in its `metrics` tag (6 decimals) compare with ours.
        theirs, ours = json.loads(cur.tags["metrics"])["candidate"][m], round(metrics["candidate"][m]["mean"], 6)
        if ours - theirs > min_delta:
            move_champion(client, name, version, "pipeline (promote, policy auto)",
                                   f"beat concurrent v{current}")
            # The displaced sibling passed the gate too: it ends where it would have had it come second.
            client.set_registered_model_alias(name, "challenger", current)
            return f"champion moved to v{version}: beats v{current}, promoted concurrently ({m} {ours:.4f} vs {theirs:.4f})"
        client.set_registered_model_alias(name, "challenger", version)
        return f"challenger: concurrent champion v{current} is as good or better ({m} {theirs:.4f} vs {ours:.4f})"
    log.warning("registry: champion moved to v%s since evaluation (against %s); leaving it, marking challenger",
                current, evaluated_against or "no champion")
    client.set_registered_model_alias(name, "challenger", version)
    return (f"challenger: champion moved to v{current} since this candidate was evaluated "
            f"(against {('v' + evaluated_against) if evaluated_against else 'no champion'}); left as it is")


def _by_pipeline(client, name: str, version: str) -> bool:
    events = history(client, name)
    return bool(events) and events[-1]["version"] == version and events[-1]["by"].startswith("pipeline")

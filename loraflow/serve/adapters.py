"""The adapter cache: the registry's view of the modes (each `loraflow-<mode>` at alias `champion`), and the
adapters loaded into the shared model, pinned while requests use them and unloaded when nothing does.

Each loaded adapter gets a name that is never reused (`a<n>_<mode>_v<version>`), so when the registry's champion
moves, the new version loads beside the old one: requests already holding the old one finish on it, and it is
unloaded once the last of them is done. The `lru_size` most recently used stay loaded.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from loraflow import feedback as fb
from loraflow import generation
from loraflow.config import GenerateParams, Params, registered_model_name
from loraflow.serve.metrics import EngineMetrics
from loraflow.serve.settings import ServeSettings

log = logging.getLogger("loraflow.serve")
PREFIX = registered_model_name("")


@dataclasses.dataclass(eq=False)
class Adapter:
    name: str
    mode: str
    version: str
    path: Path
    refs: int = 0
    merged: Any = None  # a merged copy of base + this adapter, when asked for
    merged_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    gen: GenerateParams | None = None  # its generation_config.json: how it was evaluated and is served


class Host(Protocol):
    """What the cache needs from the model it loads adapters into (the Engine)."""

    model_path: str

    def attach(self, folder: Path, name: str) -> None: ...

    def detach(self, name: str) -> None: ...


class AdapterCache:
    """The registry's champions and the loaded adapters. Thread-safe."""

    def __init__(self, params: Params, settings: ServeSettings, host: Host, metrics: EngineMetrics | None = None):
        from loraflow.tracking import tracking_uri
        from loraflow.tracking import use as use_tracking

        self.params, self.settings, self.host = params, settings, host
        self.metrics = metrics or EngineMetrics()
        self.tracking_uri = tracking_uri(params)
        # models:/ URIs resolve through the process-wide registry URI.
        use_tracking(self.tracking_uri)
        self.state = threading.RLock()  # guards the dicts below; never held across model work
        self.champions: dict[str, str] = {}
        self.loaded: OrderedDict[tuple[str, str], Adapter] = OrderedDict()
        self.retired: list[Adapter] = []  # out of the LRU or superseded; unloaded when refs drop to 0
        self.failed: dict[str, dict[str, Any]] = {}
        self.registry_error: str | None = None
        self.last_poll: float | None = None
        self._load_locks: dict[tuple[str, str], threading.Lock] = {}
        self._names = itertools.count(1)
        self._downloads = Path(tempfile.mkdtemp(prefix="loraflow-serve-"))

    def close(self) -> None:
        shutil.rmtree(self._downloads, ignore_errors=True)

    # -- registry

    def refresh(self) -> dict[str, Any]:
        """Read every `loraflow-*` model's champion; retire adapters whose mode's champion moved."""
        import mlflow

        from loraflow.registry import mlflow_http

        try:
            # One quick retry: the poll itself is the retry loop. With MLflow's defaults (7 retries, about 4 min)
            # /health would go on saying "ok" for minutes after the registry went away.
            with mlflow_http(1):
                found = self._champions(mlflow.MlflowClient(tracking_uri=self.tracking_uri,
                                                            registry_uri=self.tracking_uri))
        except Exception as e:  # noqa: BLE001 - a registry outage must not take serving down
            with self.state:
                self.registry_error = f"{type(e).__name__}: {e}"
            log.warning("registry %s unreachable, keeping the modes known so far: %s", self.tracking_uri, e)
            return {"changed": {}, "error": self.registry_error}
        changed = {}
        with self.state:
            for mode in set(found) | set(self.champions):
                if found.get(mode) != self.champions.get(mode):
                    changed[mode] = {"from": self.champions.get(mode), "to": found.get(mode)}
                    for key in [k for k in self.loaded if k[0] == mode and k[1] != found.get(mode)]:
                        self.retired.append(self.loaded.pop(key))
                    self.failed.pop(mode, None)
            self.champions, self.registry_error, self.last_poll = found, None, time.time()
        for mode, c in changed.items():
            log.info("mode %s: champion v%s -> v%s", mode, c["from"], c["to"])
        self._collect()
        return {"changed": changed, "error": None}

    @staticmethod
    def _champions(client) -> dict[str, str]:
        found: dict[str, str] = {}
        token = None
        while True:
            page = client.search_registered_models(filter_string=f"name LIKE '{PREFIX}%'", page_token=token)
            for m in page:
                if "champion" in (m.aliases or {}):
                    found[m.name[len(PREFIX):]] = str(m.aliases["champion"])
            token = page.token
            if not token:
                return found

    # -- adapters

    def acquire(self, mode: str | None) -> tuple[Adapter | None, str | None]:
        """The adapter serving `mode`, pinned until release(); None (base) with the reason when it cannot be."""
        if mode is None:
            return None, None
        with self.state:
            version = self.champions.get(mode)
            if version is None:
                return None, f"unknown mode {mode!r}: no registered model {registered_model_name(mode)} with a champion; answered by the base model"
            key = (mode, version)
            ad = self._pin(key)
            if ad is not None:
                return ad, None
            lock = self._load_locks.setdefault(key, threading.Lock())
        with lock:  # one download/load per version, however many requests ask at once
            with self.state:
                ad = self._pin(key)
                if ad is not None:
                    return ad, None
            try:
                ad = self._load(mode, version)
            except Exception as e:  # noqa: BLE001 - a bad adapter falls back to base, and /health says why
                log.exception("mode %s: loading %s v%s failed; serving the base model", mode, registered_model_name(mode), version)
                with self.state:
                    self.failed[mode] = {"version": version, "error": f"{type(e).__name__}: {e}", "at": fb.now()}
                self.metrics.adapter_load_failures.labels(mode).inc()
                return None, f"adapter for mode {mode!r} (v{version}) failed to load; answered by the base model"
            self.metrics.adapter_loads.labels(mode).inc()
            with self.state:
                ad.refs += 1
                self.failed.pop(mode, None)
                if self.champions.get(mode) == version:
                    self.loaded[key] = ad
                    while len(self.loaded) > self.settings.lru_size:
                        self.retired.append(self.loaded.popitem(last=False)[1])
                else:  # the champion moved while we loaded: serve this request, then drop it
                    self.retired.append(ad)
        self._collect()
        return ad, None

    def pin_version(self, mode: str, version: str) -> Adapter:
        """A registered version that need not be champion, loaded as a mode's champion is and pinned until
        release(), then unloaded (the parity gate replays a candidate through the engine with it)."""
        ad = self._load(mode, version)
        ad.refs = 1
        with self.state:
            self.retired.append(ad)
        return ad

    def _pin(self, key: tuple[str, str]) -> Adapter | None:
        ad = self.loaded.get(key)
        if ad is not None:
            self.loaded.move_to_end(key)
            ad.refs += 1
        return ad

    def release(self, ad: Adapter | None) -> None:
        if ad is None:
            return
        with self.state:
            ad.refs -= 1
        self._collect()

    def _load(self, mode: str, version: str) -> Adapter:
        import mlflow

        from loraflow.registry import mlflow_http

        name = f"a{next(self._names)}_{mode}_v{version}"  # a counter first: no name is ever reused or a prefix of another
        dest = self._downloads / name
        try:
            with mlflow_http(1):  # a request waits for this: with the registry down, answer by the base model soon
                local = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{registered_model_name(mode)}/{version}", dst_path=str(dest),
                    tracking_uri=self.tracking_uri))
            found = next(iter(sorted(local.rglob("adapter_config.json"))), None)
            if found is None:
                raise FileNotFoundError(f"{registered_model_name(mode)} v{version} holds no adapter_config.json")
            t = time.perf_counter()
            self.host.attach(found.parent, name)
        except BaseException:
            # a failed load is retried by the next request with a new name: its download must not pile up
            shutil.rmtree(dest, ignore_errors=True)
            raise
        log.info("mode %s: loaded v%s as %s in %.2f s", mode, version, name, time.perf_counter() - t)
        return Adapter(name, mode, version, found.parent, gen=generation.load(found.parent, self.params.generate))

    def _collect(self) -> None:
        """Unload retired adapters nobody is using any more (they can no longer be pinned: not in the LRU)."""
        with self.state:
            done = [a for a in self.retired if a.refs <= 0]
            self.retired = [a for a in self.retired if a.refs > 0]
        for ad in done:
            self.host.detach(ad.name)
            ad.merged = None
            shutil.rmtree(self._downloads / ad.name, ignore_errors=True)
            log.info("mode %s: unloaded %s", ad.mode, ad.name)

    def merge(self, mode: str) -> dict[str, Any]:
        """Build a merged copy (base + this mode's champion, LoRA folded into the weights) to serve the mode from."""
        from peft import PeftModel

        from loraflow.models import load_causal_lm

        ad, note = self.acquire(mode)
        if ad is None:
            raise LookupError(note)
        try:
            t = time.perf_counter()
            if ad.merged is None:
                base = load_causal_lm(self.host.model_path, trust_remote_code=self.params.base.trust_remote_code)
                merged = PeftModel.from_pretrained(base, str(ad.path)).merge_and_unload().eval()
                ad.merged = merged
            return {"mode": mode, "version": ad.version, "adapter": ad.name, "merged": True,
                    "seconds": round(time.perf_counter() - t, 3)}
        finally:
            self.release(ad)

    def health(self) -> dict[str, Any]:
        with self.state:
            loaded = [{"name": a.name, "mode": a.mode, "version": a.version, "in_use": a.refs, "merged": a.merged is not None}
                      for a in self.loaded.values()]
            loaded += [{"name": a.name, "mode": a.mode, "version": a.version, "in_use": a.refs, "retiring": True}
                       for a in self.retired]
            return {
                "status": "degraded" if self.failed or self.registry_error else "ok",
                "modes": {m: {"version": v, "registered_model": registered_model_name(m)} for m, v in sorted(self.champions.items())},
                "loaded_adapters": loaded,
                "failed_loads": dict(self.failed),
                "registry": {"uri": self.tracking_uri, "last_poll": self.last_poll, "error": self.registry_error},
            }

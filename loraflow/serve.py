"""`loraflow serve`: one base model, the registry's champion adapters as "modes", users' feedback to disk.

    loraflow serve --port 8000                     # http://127.0.0.1:8000/docs
    curl -s 127.0.0.1:8000/chat -d '{"mode": "retail_media", "messages": [{"role": "user", "content": "Oi"}]}'

A mode is the registered model `loraflow-<mode>` at alias `champion`. The base model loads once; a mode's
adapter is downloaded and loaded (peft multi-adapter) on first use, and the `--lru-size` most recently used
stay loaded. Each loaded adapter gets a name that is never reused (`a<n>_<mode>_v<version>`), so when the
registry's champion moves, the new version loads beside the old one: requests already holding the old one
finish on it, and it is unloaded once the last of them is done. The registry is polled every
`--poll-interval` seconds and on POST /adapters/reload.

Generation on the shared model is serialised by one lock (set_adapter + generate together), in worker
threads, so the event loop keeps answering /health and streams. A mode merged with POST /adapters/<mode>/merge
is served from its own merged copy of the model (no LoRA overhead, its own lock, so it runs beside the others).

Decoding: a request's temperature / top_p win; left out, a mode answers with its adapter's generation_config.json
(params.yaml `generate` at training time: sampling defaults, repetition_penalty, no_repeat_ngram_size), the
settings evaluate judged it with. max_tokens left out is the server's --default-max-tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraflow import feedback as fb
from loraflow import generation
from loraflow.config import GenerateParams, Params, registered_model_name

log = logging.getLogger(__name__)
PREFIX = registered_model_name("")


@dataclasses.dataclass
class ServeSettings:
    root: Path = Path(".")
    params_file: str = "params.yaml"
    overrides: list[str] = dataclasses.field(default_factory=list)
    lru_size: int = 4  # adapters kept loaded; each SmolLM2 all-linear r=16 adapter is ~10 MB
    unknown_mode: Literal["base", "404"] = "base"
    poll_interval: float = 30.0  # seconds between registry polls; 0 = only on POST /adapters/reload
    max_messages: int = 64
    max_chars: int = 32_000  # all message contents together
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    feedback_threshold: int = 50  # new feedback events for a mode that start a pipeline run; 0 = never
    trigger_command: str | None = None  # e.g. "python -m steps.curate ... {mode}"; None = Prefect or `loraflow run`
    deployment: str = "loraflow/on-demand"
    response_memory: int = 10_000  # served answers remembered so feedback can name just the response id


# ---------------------------------------------------------------------------------------------- adapters


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


class Engine:
    """The model, the loaded adapters and the registry's view of the modes. Thread-safe."""

    def __init__(self, params: Params, settings: ServeSettings):
        from loraflow.models import device, load_causal_lm, load_tokenizer, resolve
        from loraflow.tracking import tracking_uri
        from loraflow.tracking import use as use_tracking

        self.params, self.settings = params, settings
        self.model_path = resolve(params.base.model, params.base.model_cache)
        self.device = device()
        self.tok = load_tokenizer(self.model_path, params.base.trust_remote_code)
        self.base = load_causal_lm(self.model_path, trust_remote_code=params.base.trust_remote_code).eval()
        self.peft = None  # the PeftModel wrapping self.base, from the first adapter load on
        self.tracking_uri = tracking_uri(params)
        # models:/ URIs resolve through the process-wide registry URI.
        use_tracking(self.tracking_uri)
        self.gen_lock = threading.Lock()  # one generate at a time on the shared model
        self.tok_lock = threading.Lock()  # fast tokenizers fail ("Already borrowed") when used by two threads
        self.state = threading.RLock()  # guards the dicts below; never held across model work
        self.champions: dict[str, str] = {}
        self.loaded: OrderedDict[tuple[str, str], Adapter] = OrderedDict()
        self.retired: list[Adapter] = []  # out of the LRU or superseded; unloaded when refs drop to 0
        self.failed: dict[str, dict[str, Any]] = {}
        self.registry_error: str | None = None
        self.last_poll: float | None = None
        self._load_locks: dict[tuple[str, str], threading.Lock] = {}
        self._active: str | None = None
        self._names = itertools.count(1)
        self._downloads = Path(tempfile.mkdtemp(prefix="loraflow-serve-"))

    def close(self) -> None:
        shutil.rmtree(self._downloads, ignore_errors=True)

    # -- registry

    def refresh(self) -> dict[str, Any]:
        """Read every `loraflow-*` model's champion; retire adapters whose mode's champion moved."""
        import mlflow

        try:
            client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
            found: dict[str, str] = {}
            token = None
            while True:
                page = client.search_registered_models(filter_string=f"name LIKE '{PREFIX}%'", page_token=token)
                for m in page:
                    if "champion" in (m.aliases or {}):
                        found[m.name[len(PREFIX):]] = str(m.aliases["champion"])
                token = page.token
                if not token:
                    break
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
                return None, f"adapter for mode {mode!r} (v{version}) failed to load; answered by the base model"
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
        from peft import PeftModel

        name = f"a{next(self._names)}_{mode}_v{version}"  # a counter first: no name is ever reused or a prefix of another
        dest = self._downloads / name
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{registered_model_name(mode)}/{version}", dst_path=str(dest), tracking_uri=self.tracking_uri))
        found = next(iter(sorted(local.rglob("adapter_config.json"))), None)
        if found is None:
            raise FileNotFoundError(f"{registered_model_name(mode)} v{version} holds no adapter_config.json")
        t = time.perf_counter()
        with self.gen_lock:  # loading injects layers into the shared model: not while it generates
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(found.parent), adapter_name=name).eval()
            else:
                self.peft.load_adapter(str(found.parent), adapter_name=name)
        log.info("mode %s: loaded v%s as %s in %.2f s", mode, version, name, time.perf_counter() - t)
        return Adapter(name, mode, version, found.parent, gen=generation.load(found.parent, self.params.generate))

    def _collect(self) -> None:
        """Unload retired adapters nobody is using any more (they can no longer be pinned: not in the LRU)."""
        with self.state:
            done = [a for a in self.retired if a.refs <= 0]
            self.retired = [a for a in self.retired if a.refs > 0]
        for ad in done:
            with self.gen_lock:
                if self.peft is not None and ad.name in self.peft.peft_config:
                    if self._active == ad.name:
                        self._active = None
                    self.peft.delete_adapter(ad.name)
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
                base = load_causal_lm(self.model_path, trust_remote_code=self.params.base.trust_remote_code)
                merged = PeftModel.from_pretrained(base, str(ad.path)).merge_and_unload().eval()
                ad.merged = merged
            return {"mode": mode, "version": ad.version, "adapter": ad.name, "merged": True,
                    "seconds": round(time.perf_counter() - t, 3)}
        finally:
            self.release(ad)

    # -- generation

    def encode(self, messages: list[dict]):
        with self.tok_lock:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tok(text, return_tensors="pt", add_special_tokens=False)

    def decode(self, ids) -> str:
        with self.tok_lock:
            return self.tok.decode(ids, skip_special_tokens=True)

    def generate(self, ad: Adapter | None, messages: list[dict], max_tokens: int, temperature: float | None,
                 top_p: float | None, streamer=None, cancelled: threading.Event | None = None) -> dict[str, Any]:
        """One answer. temperature / top_p None: the adapter's own settings (its generation_config.json; the
        server's params.yaml `generate` for the base model), as vLLM does with a model's generation config."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        enc = self.encode(messages).to(self.device)
        gp = ad.gen if ad is not None and ad.gen is not None else self.params.generate
        kwargs: dict[str, Any] = {**generation.generate_kwargs(gp, max_new_tokens=max_tokens, temperature=temperature,
                                                               top_p=top_p),
                                  "pad_token_id": self.tok.pad_token_id, "eos_token_id": self.tok.eos_token_id,
                                  "streamer": streamer}
        if cancelled is not None:
            class _Cancelled(StoppingCriteria):  # a client that went away stops its generation at the next token
                def __call__(self, input_ids, scores, **kw):
                    return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

            kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled()])
        switch_ms = 0.0
        if ad is not None and ad.merged is not None:
            with ad.merged_lock, torch.inference_mode():
                out = ad.merged.generate(**enc, **kwargs)
        else:
            with self.gen_lock:
                t = time.perf_counter()
                if ad is not None:
                    if self._active != ad.name:
                        self.peft.set_adapter(ad.name, inference_mode=True)
                        self._active = ad.name
                elif self.peft is not None:
                    # peft's per-row adapter choice: cheaper than toggling every LoRA layer off and on again
                    # (disable_adapter() costs ~70 ms here), and the active adapter stays as it was.
                    kwargs["adapter_names"] = ["__base__"]
                switch_ms = (time.perf_counter() - t) * 1000
                model = self.peft if self.peft is not None else self.base
                with torch.inference_mode():
                    out = model.generate(**enc, **kwargs)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        eos = self.tok.eos_token_id
        finished = bool(new) and new[-1] == eos
        n_completion = len(new) - (1 if finished else 0)
        return {"text": self.decode(new).strip(), "prompt_tokens": int(enc["input_ids"].shape[1]),
                "completion_tokens": n_completion, "finish_reason": "stop" if finished or n_completion < max_tokens else "length",
                "switch_ms": switch_ms}

    def health(self) -> dict[str, Any]:
        with self.state:
            loaded = [{"name": a.name, "mode": a.mode, "version": a.version, "in_use": a.refs, "merged": a.merged is not None}
                      for a in self.loaded.values()]
            loaded += [{"name": a.name, "mode": a.mode, "version": a.version, "in_use": a.refs, "retiring": True}
                       for a in self.retired]
            return {
                "status": "degraded" if self.failed or self.registry_error else "ok",
                "base_model": self.params.base.model,
                "device": self.device,
                "modes": {m: {"version": v, "registered_model": registered_model_name(m)} for m, v in sorted(self.champions.items())},
                "loaded_adapters": loaded,
                "failed_loads": dict(self.failed),
                "registry": {"uri": self.tracking_uri, "last_poll": self.last_poll, "error": self.registry_error},
            }


class TokenStream:
    """A transformers streamer that hands decoded text deltas to a callback (called in the generating thread)."""

    def __init__(self, engine: Engine, emit):
        self.engine, self.emit = engine, emit
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        # Whitespace at either end is held back, as the non-streamed answer is stripped: the chunks joined
        # equal that answer exactly.
        text = self.engine.decode(self.ids).strip()
        if not final and text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
            return
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)


# ---------------------------------------------------------------------------------------------- feedback


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
        from loraflow.io import write_json

        mode = event["mode"]
        with self.lock:  # held across the append too, so the counts match the lines on disk
            if mode not in self.counts:
                self.counts[mode] = fb.count_events(self.settings.root, mode)
            path = fb.append_event(self.settings.root, event)
            self.counts[mode] += 1
            st = self.state.setdefault(mode, {"at_last_trigger": 0})
            total = self.counts[mode]
            new = total - st["at_last_trigger"]
            started = None
            if 0 < self.settings.feedback_threshold <= new and not self._running(mode):
                started = self._trigger(mode)
                if started is not None:
                    st.update(at_last_trigger=total, last_run={k: v for k, v in started.items() if k != "process"})
                    new = 0
            st["events"] = total
            write_json(self.state_file, self.state)
        return {"file": str(path), "new_since_last_run": new, "threshold": self.settings.feedback_threshold,
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


# ---------------------------------------------------------------------------------------------- HTTP


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1)
    mode: str | None = None
    # None: the adapter's generation_config.json; 0 = greedy: the same answer every time
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str = ""
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response_id: str | None = None
    mode: str | None = Field(None, pattern=fb.MODE_RE.pattern)
    messages: list[Message] | None = None  # the prompt, when the server does not remember the response
    answer: str | None = None
    rating: int | None = Field(None, ge=1, le=5)
    correction: str | None = None
    preferred: str | None = None
    rejected: str | None = None

    @model_validator(mode="after")
    def _something_to_learn(self):
        if (self.preferred is None) != (self.rejected is None):
            raise ValueError("preferred and rejected: give both or neither")
        if self.rating is None and self.correction is None and self.preferred is None:
            raise ValueError("give a rating, a correction, or a preferred/rejected pair")
        return self


def _field_error(status: int, field: str, msg: str) -> HTTPException:
    return HTTPException(status, detail=[{"loc": ["body", field], "msg": msg, "type": "value_error"}])


def create_app(params: Params, settings: ServeSettings, engine: Engine | None = None) -> FastAPI:
    engine = engine or Engine(params, settings)
    sink = FeedbackSink(settings)
    responses: OrderedDict[str, dict[str, Any]] = OrderedDict()
    responses_lock = threading.Lock()
    # Generation waits on the model lock in these threads, not in the default pool the rest of FastAPI uses.
    pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="loraflow-gen")
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(settings.poll_interval):
            engine.refresh()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.refresh()
        poller = None
        if settings.poll_interval > 0:
            poller = threading.Thread(target=poll, name="loraflow-registry-poll", daemon=True)
            poller.start()
        try:
            yield
        finally:
            stop.set()
            if poller is not None:
                poller.join(timeout=5)
            pool.shutdown(wait=True, cancel_futures=True)
            engine.close()

    app = FastAPI(title="loraflow serve", lifespan=lifespan,
                  description="LoRA modes from the MLflow registry on one base model, and feedback back into training data.")
    app.state.engine, app.state.feedback = engine, sink

    def check(messages: list[Message], max_tokens: int | None, field: str = "max_tokens") -> tuple[list[dict], int]:
        if len(messages) > settings.max_messages:
            raise _field_error(413, "messages", f"{len(messages)} messages; at most {settings.max_messages} (--max-messages)")
        msgs = [{"role": m.role, "content": m.text()} for m in messages]
        chars = sum(len(m["content"]) for m in msgs)
        if chars > settings.max_chars:
            raise _field_error(413, "messages", f"{chars} characters of content; at most {settings.max_chars} (--max-chars)")
        n = max_tokens or settings.default_max_tokens
        if n > settings.max_tokens_limit:
            raise _field_error(422, field, f"{n} > {settings.max_tokens_limit} (--max-tokens-limit)")
        return msgs, n

    def pick(mode: str | None) -> tuple[Adapter | None, str | None]:
        ad, note = engine.acquire(mode)
        if note and mode is not None and mode not in engine.champions and settings.unknown_mode == "404":
            raise HTTPException(404, detail=f"unknown mode {mode!r}: known modes {sorted(engine.champions)}")
        if note:
            log.warning("%s", note)
        return ad, note

    def remember(rid: str, mode: str | None, ad: Adapter | None, msgs: list[dict], answer: str) -> None:
        with responses_lock:
            responses[rid] = {"mode": mode, "adapter_version": ad.version if ad else None, "messages": msgs, "answer": answer}
            while len(responses) > settings.response_memory:
                responses.popitem(last=False)

    async def run_generation(ad, msgs, n, temperature, top_p, **kw) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, lambda: engine.generate(ad, msgs, n, temperature, top_p, **kw))
        finally:
            engine.release(ad)

    def served(mode: str | None, ad: Adapter | None, note: str | None) -> dict[str, Any]:
        return {"mode": mode, "adapter": ad.name if ad else "base", "version": ad.version if ad else None, "fallback": note}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {**engine.health(), "feedback": sink.status()}

    @app.post("/chat")
    async def chat(req: ChatRequest) -> dict[str, Any]:
        msgs, n = check(req.messages, req.max_tokens)
        mode = req.mode or None
        ad, note = await asyncio.to_thread(pick, mode)
        out = await run_generation(ad, msgs, n, req.temperature, req.top_p)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        remember(rid, mode, ad, msgs, out["text"])
        return {"id": rid, **served(mode, ad, note), "answer": out["text"], "finish_reason": out["finish_reason"],
                "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"]},
                "switch_ms": round(out["switch_ms"], 3)}

    def mode_of(model: str) -> str | None:
        # The OpenAI `model` names the mode; "", "base" or the base model's own name mean no adapter.
        return None if model in ("", "base", params.base.model) else model

    @app.post("/v1/chat/completions")
    async def completions(req: CompletionRequest):
        msgs, n = check(req.messages, req.max_completion_tokens or req.max_tokens,
                        "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        mode = mode_of(req.model)
        ad, note = await asyncio.to_thread(pick, mode)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": req.model or "base",
                "system_fingerprint": ad.name if ad else "base"}
        if not req.stream:
            out = await run_generation(ad, msgs, n, req.temperature, req.top_p)
            remember(rid, mode, ad, msgs, out["text"])
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                                 "finish_reason": out["finish_reason"], "logprobs": None}],
                    "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                              "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
                    "loraflow": served(mode, ad, note)}

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        streamer = TokenStream(engine, lambda text: loop.call_soon_threadsafe(queue.put_nowait, text))
        job = asyncio.ensure_future(run_generation(ad, msgs, n, req.temperature, req.top_p,
                                                   streamer=streamer, cancelled=cancelled))
        job.add_done_callback(lambda _: queue.put_nowait(None))

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            body = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (text := await queue.get()) is not None:
                    yield chunk({"content": text})
                out = job.result()  # raises here if generation failed
                remember(rid, mode, ad, msgs, out["text"])
                yield chunk({}, out["finish_reason"], loraflow=served(mode, ad, note),
                            usage={"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                                   "total_tokens": out["prompt_tokens"] + out["completion_tokens"]})
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # the client went away (or we are done): stop generating

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        with engine.state:
            champions = dict(engine.champions)
        data = [{"id": "base", "object": "model", "created": 0, "owned_by": "loraflow", "root": params.base.model}]
        data += [{"id": m, "object": "model", "created": 0, "owned_by": "loraflow", "root": params.base.model,
                  "version": v, "registered_model": registered_model_name(m)} for m, v in sorted(champions.items())]
        return {"object": "list", "data": data}

    @app.post("/feedback")
    async def feedback(req: FeedbackRequest) -> dict[str, Any]:
        with responses_lock:
            served_ = responses.get(req.response_id) if req.response_id else None
        if served_ is None and req.messages is None:
            raise _field_error(422, "messages", f"response_id {req.response_id!r} is not known to this server "
                               "(restarted, or too old): send mode, messages and answer with the feedback")
        mode = req.mode or (served_ or {}).get("mode")
        if mode is None:
            raise _field_error(422, "mode", "the answer came from the base model: name the mode this feedback should train")
        event = {
            "event_id": f"fb-{uuid.uuid4().hex}",
            "response_id": req.response_id,
            "mode": mode,
            "adapter_version": (served_ or {}).get("adapter_version"),
            "messages": [{"role": m.role, "content": m.text()} for m in req.messages] if req.messages else served_["messages"],
            "answer": req.answer if req.answer is not None else (served_ or {}).get("answer"),
            "rating": req.rating,
            "correction": req.correction,
            "preferred": req.preferred,
            "rejected": req.rejected,
            "timestamp": fb.now(),
        }
        out = await asyncio.to_thread(sink.record, event)
        return {"event_id": event["event_id"], "mode": mode, **out}

    @app.post("/adapters/reload")
    async def reload() -> dict[str, Any]:
        out = await asyncio.to_thread(engine.refresh)
        with engine.state:
            return {**out, "modes": dict(engine.champions)}

    @app.post("/adapters/{mode}/merge")
    async def merge(mode: str) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(engine.merge, mode)
        except LookupError as e:
            raise HTTPException(404, detail=str(e)) from None

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        # Refuse oversized bodies before parsing them (the per-field limits come after parsing).
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > 8 * settings.max_chars + 65_536:
            return JSONResponse({"detail": f"request body of {size} bytes is too large"}, status_code=413)
        return await call_next(request)

    return app

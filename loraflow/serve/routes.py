"""The HTTP side of `loraflow serve`: request models, validation and the routes (FastAPI)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraflow import feedback as fb
from loraflow.config import Params, registered_model_name
from loraflow.serve import auth
from loraflow.serve.adapters import Adapter
from loraflow.serve.engine import Engine, TokenStream
from loraflow.serve.feedback import FeedbackSink, last_outcome
from loraflow.serve.metrics import ServerMetrics
from loraflow.serve.settings import ServeSettings

log = logging.getLogger("loraflow.serve")


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


OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
# Needs a key when keys are configured (the details /health gives key holders: modes, counts), but a scraper
# polling it does not spend the key's rate limit.
UNLIMITED_PATHS = frozenset({"/metrics"})


def _openai_error(status: int, message: str, code: str, err_type: str = "invalid_request_error",
                  headers: dict[str, str] | None = None) -> JSONResponse:
    """An error body as OpenAI's API gives it, so its clients raise their usual exceptions."""
    return JSONResponse({"error": {"message": message, "type": err_type, "param": None, "code": code}},
                        status_code=status, headers=headers)


def _field_error(status: int, field: str, msg: str) -> HTTPException:
    return HTTPException(status, detail=[{"loc": ["body", field], "msg": msg, "type": "value_error"}])


def create_app(params: Params, settings: ServeSettings, engine: Engine | None = None) -> FastAPI:
    own_engine = engine is None  # an engine handed in (tests, a second app) belongs to its caller
    engine = engine or Engine(params, settings)
    sink = FeedbackSink(settings)
    metrics = ServerMetrics(engine.metrics, engine.adapters)
    responses: OrderedDict[str, dict[str, Any]] = OrderedDict()
    responses_lock = threading.Lock()
    # Generation waits on the model lock in these threads, not in the default pool the rest of FastAPI uses.
    pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="loraflow-gen")
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(settings.poll_interval):
            engine.adapters.refresh()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.adapters.refresh()
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
            if own_engine:
                engine.close()

    app = FastAPI(title="loraflow serve", lifespan=lifespan,
                  description="LoRA modes from the MLflow registry on one base model, and feedback back into training data.")
    app.state.engine, app.state.feedback, app.state.metrics = engine, sink, metrics

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
        ad, note = engine.adapters.acquire(mode)
        if note and mode is not None and mode not in engine.adapters.champions and settings.unknown_mode == "404":
            raise HTTPException(404, detail=f"unknown mode {mode!r}: known modes {sorted(engine.adapters.champions)}")
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
            # Never on the event loop: releasing the last user of a retired adapter unloads it, which waits for the
            # batch generating now (the model's lock): the whole server stopped answering, /health included, for as
            # long as that batch ran (found by bench/soak.py). Submitted, not awaited: a cancelled request (its
            # client gone) must still release.
            try:
                pool.submit(engine.adapters.release, ad)
            except RuntimeError:  # the pool is shut down (the server is stopping)
                engine.adapters.release(ad)

    def served(mode: str | None, ad: Adapter | None, note: str | None) -> dict[str, Any]:
        return {"mode": mode, "adapter": ad.name if ad else "base", "version": ad.version if ad else None, "fallback": note}

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        details = not settings.keys or request.state.key is not None  # liveness for anyone; details for key holders

        def read() -> dict[str, Any]:
            h = engine.health()
            if not details:
                return {"status": h["status"]}
            # each mode's last pipeline decision (the loop's outcome: promoted, or rejected and which version stays)
            for mode, m in h.get("modes", {}).items():
                m["last_outcome"] = last_outcome(Path(settings.root), mode)
            return {**h, "feedback": sink.status()}

        # Off the event loop: the feedback status waits for an append in progress, which holds its lock across two
        # fsyncs (seconds on a busy disk): /health, and every other request with it, waited (bench/soak.py: 15 s).
        return await asyncio.get_running_loop().run_in_executor(pool, read)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/chat")
    async def chat(req: ChatRequest, request: Request) -> dict[str, Any]:
        mode = req.mode or None
        request.state.mode = mode
        msgs, n = check(req.messages, req.max_tokens)
        ad, note = await asyncio.to_thread(pick, mode)
        out = await run_generation(ad, msgs, n, req.temperature, req.top_p)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        remember(rid, mode, ad, msgs, out["text"])
        return {"id": rid, **served(mode, ad, note), "answer": out["text"], "finish_reason": out["finish_reason"],
                "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"]},
                "switch_ms": round(out["switch_ms"], 3), "batch_size": out["batch_size"],
                "queued_ms": round(out["queued_ms"], 1)}

    def mode_of(model: str) -> str | None:
        # The OpenAI `model` names the mode; "", "base" or the base model's own name mean no adapter.
        return None if model in ("", "base", params.base.model) else model

    @app.post("/v1/chat/completions")
    async def completions(req: CompletionRequest, request: Request):
        mode = mode_of(req.model)
        request.state.mode = mode
        msgs, n = check(req.messages, req.max_completion_tokens or req.max_tokens,
                        "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
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
        with engine.adapters.state:
            champions = dict(engine.adapters.champions)
        data = [{"id": "base", "object": "model", "created": 0, "owned_by": "loraflow", "root": params.base.model}]
        data += [{"id": m, "object": "model", "created": 0, "owned_by": "loraflow", "root": params.base.model,
                  "version": v, "registered_model": registered_model_name(m)} for m, v in sorted(champions.items())]
        return {"object": "list", "data": data}

    @app.post("/feedback")
    async def feedback(req: FeedbackRequest, request: Request) -> dict[str, Any]:
        with responses_lock:
            served_ = responses.get(req.response_id) if req.response_id else None
        if served_ is None and req.messages is None:
            raise _field_error(422, "messages", f"response_id {req.response_id!r} is not known to this server "
                               "(restarted, or too old): send mode, messages and answer with the feedback")
        mode = req.mode or (served_ or {}).get("mode")
        request.state.mode = mode
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
            # Who sent it, and whether that key may train: curation quarantines what may not, and only what may
            # counts toward the retraining threshold. No keys configured (loopback): everyone may, as before.
            "key": key.name if (key := request.state.key) is not None else None,
            "trains": key.train if key is not None else True,
        }
        out = await asyncio.to_thread(sink.record, event)
        metrics.feedback.labels(metrics.mode_label(mode), str(event["trains"]).lower()).inc()
        return {"event_id": event["event_id"], "mode": mode, **out}

    @app.post("/adapters/reload")
    async def reload() -> dict[str, Any]:
        out = await asyncio.to_thread(engine.adapters.refresh)
        with engine.adapters.state:
            return {**out, "modes": dict(engine.adapters.champions)}

    @app.post("/adapters/{mode}/merge")
    async def merge(mode: str, request: Request) -> dict[str, Any]:
        request.state.mode = mode
        try:
            return await asyncio.to_thread(engine.adapters.merge, mode)
        except LookupError as e:
            raise HTTPException(404, detail=str(e)) from None

    limiter = auth.RateLimiter()

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        # The key (if any) travels on request.state; every route but liveness and the API docs needs one.
        request.state.key = None
        if not settings.keys:
            return await call_next(request)
        key = auth.find(settings.keys, request.headers.get("authorization"))
        if key is None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization") is not None
            msg = ("Incorrect API key provided." if given else "You didn't provide an API key. You need to provide your "
                   "API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
            return _openai_error(401, msg, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if key is not None and request.url.path not in OPEN_PATHS | UNLIMITED_PATHS:
            rpm = key.rpm or settings.rate_limit
            wait = limiter.take(key.name, rpm)
            if wait > 0:
                return _openai_error(429, f"Rate limit reached for key {key.name!r}: {rpm} requests per minute. "
                                     f"Try again in {wait:.1f} s.", "rate_limit_exceeded", err_type="requests",
                                     headers={"Retry-After": auth.retry_after(wait)})
        request.state.key = key
        return await call_next(request)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        # Refuse oversized bodies before parsing them (the per-field limits come after parsing).
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > 8 * settings.max_chars + 65_536:
            return JSONResponse({"detail": f"request body of {size} bytes is too large"}, status_code=413)
        return await call_next(request)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        # The outermost middleware: refusals by the others (401, 429, 413) are counted too. A response's latency
        # ends with its last byte, so a stream's is its whole generation.
        if request.url.path == "/metrics":
            return await call_next(request)
        started = time.perf_counter()

        def labels() -> tuple[str, str]:
            # The handlers set state.mode once they know it; a request refused before that has no mode ("").
            mode = metrics.mode_label(request.state.mode) if hasattr(request.state, "mode") else ""
            return getattr(request.scope.get("route"), "path", "other"), mode

        try:
            response = await call_next(request)
        except Exception:
            # A handler that raised: the client gets a 500 (Starlette's error middleware), and operators must see
            # it counted (it was not: found by bench/soak.py).
            route, mode = labels()
            metrics.requests.labels(route, mode, "500").inc()
            metrics.latency.labels(route, mode).observe(time.perf_counter() - started)
            raise
        route, mode = labels()
        body = response.body_iterator

        async def timed():
            try:
                async for part in body:
                    yield part
            finally:
                metrics.requests.labels(route, mode, str(response.status_code)).inc()
                metrics.latency.labels(route, mode).observe(time.perf_counter() - started)

        response.body_iterator = timed()
        return response

    return app

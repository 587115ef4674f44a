"""The model engine: the base model loaded once, the adapters the cache attaches to it, and batched generation.

Requests are queued; one scheduler thread takes every waiting request (after a short collection window when the
model was idle, `batch_window_ms`) and generates them in one `generate` call across modes: peft picks each row's
adapter (`adapter_names`, "__base__" for the base model), prompts are left-padded, and each row stops at its own
max_tokens, end of turn, or when its client goes away. Requests that arrive while a batch runs form the next one.
Rows batch together only when their decoding settings match (greedy with greedy at the same repetition settings,
sampling at the same temperature / top_p): generate() takes one set per call. Each row's tokens stream to its
own client as they come. Greedy answers are the same as one at a time (tested).

A mode merged with POST /adapters/<mode>/merge is served from its own merged copy of the model (no LoRA overhead,
its own lock, one request at a time, beside the batches).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from loraflow import generation
from loraflow.config import Params
from loraflow.serve.adapters import Adapter, AdapterCache
from loraflow.serve.metrics import EngineMetrics
from loraflow.serve.settings import ServeSettings

log = logging.getLogger("loraflow.serve")


@dataclasses.dataclass(eq=False)
class Job:
    """One request waiting for (or in) a batch."""

    ad: Adapter | None
    prompt: list[int]
    max_tokens: int
    kwargs: dict[str, Any]  # generate() decoding arguments but max_new_tokens: rows batch when these match
    streamer: TokenStream | None
    cancelled: threading.Event | None
    future: Future = dataclasses.field(default_factory=Future)
    ids: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.kwargs.items()))


class Engine:
    """The model, its tokenizer, the adapter cache loading into it, and the batch scheduler. Thread-safe."""

    def __init__(self, params: Params, settings: ServeSettings):
        from loraflow.models import device, load_causal_lm, load_tokenizer, resolve

        self.params, self.settings = params, settings
        self.model_path = resolve(params.base.model, params.base.model_cache)
        self.device = device()
        self.tok = load_tokenizer(self.model_path, params.base.trust_remote_code)
        self.base = load_causal_lm(self.model_path, trust_remote_code=params.base.trust_remote_code).eval()
        # Every path (batched, streamed, merged) stops where evaluate stopped: the one end-of-turn rule.
        self.stop_ids = generation.end_of_turn_ids(self.tok, self.base)
        # "__base__" rows (no mode, an unknown mode, a failed adapter) decode with this project's params.yaml
        # `generate`: the section train writes into each adapter's generation_config.json, which evaluate uses for
        # the base model too. So the served base matches the evaluated one while params.yaml's `generate` is the
        # one the champion was trained under (DVC retrains on a change); /health shows it to compare.
        self.base_gen = params.generate
        self.peft = None  # the PeftModel wrapping self.base, from the first adapter load on
        self.gen_lock = threading.Lock()  # the shared model: one batch at a time, no adapter (un)loads during one
        self.tok_lock = threading.Lock()  # fast tokenizers fail ("Already borrowed") when used by two threads
        self.metrics = EngineMetrics()
        self.adapters = AdapterCache(params, settings, self, self.metrics)
        self._queue: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self.batches = {"count": 0, "rows": 0, "largest": 0}
        self._scheduler = threading.Thread(target=self._schedule, name="loraflow-batches", daemon=True)
        self._scheduler.start()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._scheduler.join(timeout=60)
        self.adapters.close()

    # -- the adapter cache's hooks

    def attach(self, folder: Path, name: str) -> None:
        from peft import PeftConfig, PeftModel
        from peft.utils import load_peft_weights

        # Read the adapter's files before touching the model: peft injects an adapter's layers before it reads its
        # weights, so a corrupt file left a half-loaded adapter in the shared model on every try (each request to
        # a broken mode retries: memory grew by one adapter per request; found by bench/soak.py).
        PeftConfig.from_pretrained(str(folder))
        load_peft_weights(str(folder), device="cpu")
        with self.gen_lock:  # loading injects layers into the shared model: not while it generates
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name).eval()
                return
            try:
                self.peft.load_adapter(str(folder), adapter_name=name)
            except BaseException:
                self._drop(name)  # whatever the failed load injected
                raise
            # peft keeps a deleted adapter's name as the active one when it was the last loaded (a mode's
            # champion replaced): generate() would then look it up and fail with a KeyError
            if self.peft.active_adapter not in self.peft.peft_config:
                self.peft.set_adapter(name)

    def detach(self, name: str) -> None:
        with self.gen_lock:
            self._drop(name)

    def _drop(self, name: str) -> None:  # under gen_lock
        if self.peft is not None and name in self.peft.peft_config:
            self.peft.delete_adapter(name)
            left = list(self.peft.peft_config)
            if left and self.peft.active_adapter not in self.peft.peft_config:
                self.peft.set_adapter(left[-1])

    def attached(self) -> int:
        """LoRA adapters in the model itself (peft's own count), whatever the cache believes it loaded."""
        peft = self.peft
        return 0 if peft is None else len(peft.peft_config)

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
        """One answer (blocking; generated in a batch with whatever else is waiting). temperature / top_p None:
        the adapter's own settings (its generation_config.json; the server's params.yaml `generate` for the base
        model), as vLLM does with a model's generation config."""
        prompt = self.encode(messages)["input_ids"][0].tolist()
        gp = ad.gen if ad is not None and ad.gen is not None else self.base_gen
        kwargs = generation.generate_kwargs(gp, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)
        kwargs.pop("max_new_tokens")
        job = Job(ad, prompt, max_tokens, kwargs, streamer, cancelled)
        if ad is not None and ad.merged is not None:
            self._run_merged(job)
        else:
            with self._wake:
                self._queue.append(job)
                self._wake.notify()
        out = job.future.result()
        queued = out.pop("started_at") - job.queued_at
        self.metrics.queue_seconds.labels(ad.mode if ad is not None else "base").observe(queued)
        return {**out, "queued_ms": queued * 1000}

    def _schedule(self) -> None:
        """The scheduler thread: take a batch of compatible waiting jobs, generate it, repeat."""
        while True:
            with self._wake:
                idle = not self._queue
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    for job in self._queue:
                        job.future.set_exception(RuntimeError("the server is shutting down"))
                    return
            if idle:  # give requests sent together a moment to arrive, so they share the first batch
                time.sleep(self.settings.batch_window_ms / 1000)
            with self._wake:
                key = self._queue[0].key
                batch = [j for j in self._queue if j.key == key][: max(1, self.settings.max_batch)]
                for j in batch:
                    self._queue.remove(j)
            try:
                self._run_batch(batch)
            except BaseException as e:  # noqa: BLE001 - the batch's requests get the error; the scheduler lives on
                log.exception("generation failed for a batch of %d", len(batch))
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)

    def _run_batch(self, jobs: list[Job]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        pad, stops = self.tok.pad_token_id, self.stop_ids
        width = max(len(j.prompt) for j in jobs)
        # Left padding: every row's next token comes at the same position, as generate() expects.
        ids = torch.tensor([[pad] * (width - len(j.prompt)) + j.prompt for j in jobs], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs], device=self.device)

        class _RowsDone(StoppingCriteria):  # each row's own max_tokens, end of turn, or its client going away
            def __call__(self, input_ids, scores, **kw):
                return torch.tensor([j.done or (j.cancelled is not None and j.cancelled.is_set()) for j in jobs],
                                    dtype=torch.bool, device=input_ids.device)

        kwargs: dict[str, Any] = {**generation.call_kwargs(jobs[0].kwargs, mask), "max_new_tokens": max(j.max_tokens for j in jobs),
                                  "pad_token_id": pad, "eos_token_id": stops, "streamer": _Rows(jobs, stops),
                                  "stopping_criteria": StoppingCriteriaList([_RowsDone()])}
        with self.gen_lock:
            started = time.perf_counter()
            # peft chooses each row's adapter ("__base__" rows skip LoRA). With every adapter unloaded, peft still
            # names the last one active and fails looking it up (KeyError: a 500 for a base-model request; found by
            # bench/soak.py): the base model answers alone then (its LoRA layers hold no adapter and pass through).
            model = self.peft if self.peft is not None and self.peft.peft_config else self.base
            if model is self.peft:
                kwargs["adapter_names"] = [j.ad.name if j.ad is not None else "__base__" for j in jobs]
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        self.batches = {"count": self.batches["count"] + 1, "rows": self.batches["rows"] + len(jobs),
                        "largest": max(self.batches["largest"], len(jobs))}
        self.metrics.batch_size.observe(len(jobs))
        for j in jobs:
            j.future.set_result(self._result(j, started, len(jobs)))

    def _run_merged(self, job: Job) -> None:
        import torch

        ad, stops = job.ad, self.stop_ids
        mask = torch.ones(1, len(job.prompt), dtype=torch.long, device=self.device)
        with ad.merged_lock, torch.inference_mode():
            started = time.perf_counter()
            ad.merged.generate(input_ids=torch.tensor([job.prompt], device=self.device), max_new_tokens=job.max_tokens,
                               attention_mask=mask, pad_token_id=self.tok.pad_token_id, eos_token_id=stops,
                               streamer=_Rows([job], stops), **generation.call_kwargs(job.kwargs, mask))
        self.metrics.batch_size.observe(1)
        job.future.set_result(self._result(job, started, 1))

    def _result(self, job: Job, started: float, batch_size: int) -> dict[str, Any]:
        finished = bool(job.ids) and job.ids[-1] in self.stop_ids
        n = len(job.ids) - finished
        return {"text": self.decode(job.ids).strip(), "prompt_tokens": len(job.prompt), "completion_tokens": n,
                "finish_reason": "stop" if finished or n < job.max_tokens else "length",
                "switch_ms": 0.0,  # no adapter switching any more: peft picks each row's adapter
                "batch_size": batch_size, "started_at": started}

    def health(self) -> dict[str, Any]:
        h = self.adapters.health()
        with self._wake:
            waiting = len(self._queue)
        return {"status": h.pop("status"), "base_model": self.params.base.model, "device": self.device,
                "base_generation": self.base_gen.model_dump(), **h,
                "batches": {**self.batches, "waiting": waiting}}


class _Rows:
    """A transformers streamer for a batch: hands each row's new token to its job (and its client's stream)."""

    def __init__(self, jobs: list[Job], stop_ids: list[int]):
        self.jobs, self.stops = jobs, set(stop_ids)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompts
            self.prompt_seen = True
            return
        for job, tok in zip(self.jobs, value.reshape(-1).tolist(), strict=True):
            if job.done:  # finished rows get pad tokens from here on
                continue
            job.ids.append(tok)
            job.done = tok in self.stops or len(job.ids) >= job.max_tokens
            if job.streamer is not None:
                job.streamer.push(job.ids)

    def end(self) -> None:
        for job in self.jobs:
            job.done = True
            if job.streamer is not None:
                job.streamer.end()


class TokenStream:
    """Hands a row's decoded text deltas to a callback (called in the generating thread)."""

    def __init__(self, engine: Engine, emit):
        self.engine, self.emit = engine, emit
        self.ids: list[int] = []
        self.sent = 0

    def push(self, ids: list[int]) -> None:
        self.ids = ids
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

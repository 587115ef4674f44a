"""The model engine: the base model loaded once, the adapters the cache attaches to it, and generation.

Generation on the shared model is serialised by one lock (set_adapter + generate together), in worker threads,
so the event loop keeps answering /health and streams. A mode merged with POST /adapters/<mode>/merge is served
from its own merged copy of the model (no LoRA overhead, its own lock, so it runs beside the others).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from loraflow import generation
from loraflow.config import Params
from loraflow.serve.adapters import Adapter, AdapterCache
from loraflow.serve.settings import ServeSettings


class Engine:
    """The model, its tokenizer, and the adapter cache loading into it. Thread-safe."""

    def __init__(self, params: Params, settings: ServeSettings):
        from loraflow.models import device, load_causal_lm, load_tokenizer, resolve

        self.params, self.settings = params, settings
        self.model_path = resolve(params.base.model, params.base.model_cache)
        self.device = device()
        self.tok = load_tokenizer(self.model_path, params.base.trust_remote_code)
        self.base = load_causal_lm(self.model_path, trust_remote_code=params.base.trust_remote_code).eval()
        self.peft = None  # the PeftModel wrapping self.base, from the first adapter load on
        self.gen_lock = threading.Lock()  # one generate at a time on the shared model
        self.tok_lock = threading.Lock()  # fast tokenizers fail ("Already borrowed") when used by two threads
        self._active: str | None = None
        self.adapters = AdapterCache(params, settings, self)

    def close(self) -> None:
        self.adapters.close()

    # -- the adapter cache's hooks

    def attach(self, folder: Path, name: str) -> None:
        from peft import PeftModel

        with self.gen_lock:  # loading injects layers into the shared model: not while it generates
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name).eval()
            else:
                self.peft.load_adapter(str(folder), adapter_name=name)

    def detach(self, name: str) -> None:
        with self.gen_lock:
            if self.peft is not None and name in self.peft.peft_config:
                if self._active == name:
                    self._active = None
                self.peft.delete_adapter(name)

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
        h = self.adapters.health()
        return {"status": h.pop("status"), "base_model": self.params.base.model, "device": self.device, **h}


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

"""Token lengths under the base model's chat template, counted only where they decide something, and the
curate.too_long policy (drop, truncate or keep) applied with them."""

from __future__ import annotations

import functools
from typing import Any

from loraflow.config import Params
from loraflow.curation.ids import id_of, messages_json
from loraflow.curation.records import Raw
from loraflow.formats import Messages, Reject


@functools.lru_cache(maxsize=2)
def tokenizer(model: str, cache: str, trust_remote_code: bool):
    """The base model's tokenizer, loaded once per process."""
    from loraflow.models import load_tokenizer, resolve

    return load_tokenizer(resolve(model, cache), trust_remote_code)


class Lengths:
    """Token counts under the base model's chat template, computed only where they decide something.

    Counting is exact but not free (loraflow/tokens.py makes it ~10 us a conversation where it can). For
    byte-level BPE tokenizers (no normalizer) every token is at least one byte, so a conversation whose
    rendered UTF-8 size is within max_seq_len fits without being counted. The rendered size is bounded by
    the template's bytes with empty contents (rendered once per role sequence) plus the contents' bytes; the
    bound is checked against one real rendering per role sequence and dropped for templates that repeat
    contents.
    """

    def __init__(self, chat: Any, limit: int):
        """chat: a loraflow.tokens.ChatTokens (in a worker process, its portable copy: no `tok`)."""
        self.chat, self.tok, self.limit = chat, chat.tok, limit
        backend = chat.backend
        self.byte_level = (backend is not None and backend.normalizer is None
                           and "ByteLevel" in repr(backend.pre_tokenizer))
        self._overhead: dict[tuple[str, ...], int | None] = {}

    @classmethod
    def for_params(cls, params: Params) -> Lengths:
        from loraflow.tokens import ChatTokens

        tok = tokenizer(params.base.model, params.base.model_cache, params.base.trust_remote_code)
        return cls(ChatTokens(tok), params.base.max_seq_len)

    def bound(self, msgs: Messages) -> int | None:
        """An upper bound on the token count, or None when none is cheap."""
        if not self.byte_level:
            return None
        roles = tuple(m["role"] for m in msgs)
        content = sum(len(m["content"].encode()) for m in msgs)
        if roles not in self._overhead:
            empty = self.chat.render([{"role": m["role"], "content": ""} for m in msgs])
            real = self.chat.render(msgs)
            over = len(empty.encode()) if empty is not None else None
            if over is not None and (real is None or len(real.encode()) > over + content):
                over = None  # the template repeats or rewrites contents: no bound from it
            self._overhead[roles] = over
        over = self._overhead[roles]
        return None if over is None else over + content

    def count(self, convs: list[Messages]) -> list[int | None]:
        """Exact counts, as loraflow.models.chat_token_lengths (validation) gives them."""
        return self.chat.count(convs)

    def truncate(self, msgs: Messages, n: int) -> Messages | None:
        """Drop trailing exchanges, then cut the last answer, until the conversation fits; None if it cannot."""
        msgs = [dict(m) for m in msgs]
        start = 1 if msgs[0]["role"] == "system" else 0
        while n > self.limit and len(msgs) - start > 2:
            msgs = msgs[:-2]
            n = self.count([msgs])[0] or 10**9
        for _ in range(4):  # token boundaries shift when text is cut: re-check a few times
            if n <= self.limit:
                return msgs
            ids = self.tok(msgs[-1]["content"], add_special_tokens=False)["input_ids"]
            keep = len(ids) - (n - self.limit) - 1
            if keep < 1:
                return None
            msgs[-1]["content"] = self.tok.decode(ids[:keep]).rstrip()
            n = self.count([msgs])[0] or 10**9
        return msgs if n <= self.limit else None


def percentiles(xs: list[int]) -> dict[str, float]:
    import numpy as np

    if not xs:
        return {}
    a = np.asarray(xs)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 95, 99)} | {"max": int(a.max()), "mean": float(a.mean())}


def apply_length_policy(params: Params, raws: list[Raw], lengths: Lengths) -> None:
    """Drop, truncate or keep what is too long (counted by identify_and_size)."""
    limit, policy = params.base.max_seq_len, params.curate.too_long
    if policy == "keep":
        return
    for raw in raws:
        for it in raw.items:
            if it.n_tokens is None or it.n_tokens <= limit:
                continue
            if policy == "truncate" and it.pref is None:
                cut = lengths.truncate(it.messages, it.n_tokens)
                if cut is not None:
                    it.messages, it.truncated, it.n_tokens = cut, True, lengths.count([cut])[0]
                    it.messages_json = messages_json(cut)
                    it.id = id_of(it.messages_json)
                    continue
            raw.reject = Reject("too_long", f"{it.n_tokens} tokens under the chat template, over base.max_seq_len="
                                f"{limit} (curate.too_long: {policy})")
        if raw.reject:
            raw.items = []

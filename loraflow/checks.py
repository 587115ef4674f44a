"""Per-record facts the validation gate checks that Great Expectations cannot compute itself.

The chat-template facts (renders, assistant spans, end-of-turn token), the text and exact key of a conversation
that the overlap between splits compares (near duplicates: loraflow/neardup.py), and the drift profile of a
dataset that passed (record counts, token lengths, sources).
Pure functions over plain data, so they are unit-testable without GX.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

BIN_WIDTH = 8  # tokens per histogram bin of the drift profile: fine enough for a KS statistic, small in git


def template_facts(tok, conversations: list[list[dict]], eot_ids: Collection[int]) -> list[dict[str, Any]]:
    """For each conversation: does the chat template render it, its token count, whether each assistant
    turn's content can be located as a token span (what assistant-only loss masks), and whether an
    end-of-turn token follows each assistant turn (else generations never stop).

    Renders to text and tokenizes everything in one batched call with character offsets (Rust side);
    the span search is then a bisect per assistant turn.
    """
    texts: list[str | None] = []
    errors: list[str] = []
    for msgs in conversations:
        try:
            texts.append(tok.apply_chat_template(msgs, tokenize=False))
            errors.append("")
        except Exception as e:  # noqa: BLE001 - any template error means "cannot render"
            texts.append(None)
            errors.append(f"{type(e).__name__}: {e}"[:200])
    enc = iter(_encode_with_offsets(tok, [t for t in texts if t is not None]))
    eot_text = ", ".join(tok.convert_ids_to_tokens(sorted(eot_ids))) or "none"
    out = []
    for msgs, text, err in zip(conversations, texts, errors, strict=True):
        if text is None:
            out.append({"renders": False, "n_tokens": None, "spans_located": False, "ends_with_eot": False,
                        "detail": {"template_renders": err}})
            continue
        ids, offsets = next(enc)
        row = {"renders": True, "n_tokens": len(ids), "spans_located": True, "ends_with_eot": True, "detail": {}}
        for turn in assistant_turns(text, ids, offsets, msgs, eot_ids):
            if turn.problem == "not found":
                row["spans_located"] = row["ends_with_eot"] = False
                row["detail"]["assistant_spans"] = f"messages[{turn.index}]: assistant content not found in the rendered text"
                break
            if turn.problem == "no token":
                row["spans_located"] = False
                row["detail"]["assistant_spans"] = f"messages[{turn.index}]: no token covers the assistant content"
                break
            if turn.eot is None:
                got = tok.convert_ids_to_tokens(ids[turn.after]) if turn.after < len(ids) else "end of text"
                row["ends_with_eot"] = False
                row["detail"]["turns_end_with_eos"] = f"messages[{turn.index}]: followed by {got!r}, not an end-of-turn token ({eot_text})"
        out.append(row)
    return out


@dataclass(frozen=True)
class AssistantTurn:
    index: int  # position in messages
    first: int  # first token of the content
    last: int  # last token of the content
    after: int  # the first token after the content that is not whitespace (len(ids) at the end)
    eot: int | None  # that token's index when it ends the turn, else None
    problem: str | None = None  # "not found" | "no token"


def assistant_turns(text: str, ids: list[int], offsets: list[tuple[int, int]], msgs: list[dict],
                    eot_ids: Collection[int]) -> Iterator[AssistantTurn]:
    """Locate each assistant turn's content as a token span of the rendered conversation.

    The same search serves the validation gate (can the spans be found?) and training (the loss mask).
    Stops at the first turn that cannot be located.
    """
    starts = [s for s, _ in offsets]
    ends = [e for _, e in offsets]
    pos = 0
    for k, m in enumerate(msgs):
        content = str(m.get("content") or "")
        at = text.find(content, pos) if content else -1
        if m.get("role") != "assistant":
            # Step past the other turns so a short answer is not "found" inside the question before it.
            pos = at + len(content) if at >= 0 else pos
            continue
        if at < 0:
            yield AssistantTurn(k, -1, -1, -1, None, "not found")
            return
        pos = at + len(content)
        first = bisect_right(ends, at)  # first token ending after the span starts
        last = bisect_left(starts, pos) - 1  # last token starting before the span ends
        if first > last:
            yield AssistantTurn(k, first, last, -1, None, "no token")
            return
        nxt = last + 1
        while nxt < len(ids) and not text[starts[nxt]:ends[nxt]].strip() and ids[nxt] not in eot_ids:
            nxt += 1  # a newline between the content and the end-of-turn token is harmless
        yield AssistantTurn(k, first, last, nxt, nxt if nxt < len(ids) and ids[nxt] in eot_ids else None)


def assistant_masks(tok, conversations: list[list[dict]], eot_ids: Collection[int]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each rendered conversation and a mask that is 1 on every assistant turn's content and
    the end-of-turn token that closes it (so the model learns to stop), 0 elsewhere.

    Works with any chat template: it needs no {% generation %} markers. Raises ValueError naming the
    conversation whose assistant turns cannot be located (the validation gate refuses such data first).
    """
    texts = [tok.apply_chat_template(msgs, tokenize=False) for msgs in conversations]
    out = []
    for i, (msgs, text, (ids, offsets)) in enumerate(zip(conversations, texts, _encode_with_offsets(tok, texts),
                                                         strict=True)):
        mask = [0] * len(ids)
        for turn in assistant_turns(text, ids, offsets, msgs, eot_ids):
            if turn.problem:
                raise ValueError(f"conversation {i}: messages[{turn.index}]: assistant content {turn.problem} "
                                 "in the rendered chat template")
            for t in range(turn.first, (turn.eot if turn.eot is not None else turn.last) + 1):
                mask[t] = 1
        out.append((list(ids), mask))
    return out


def _encode_with_offsets(tok, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    if not texts:
        return []
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer directly: transformers' per-encoding conversion costs more than the encoding.
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))


_WORD = re.compile(r"\w+")


def conversation_text(msgs: list[dict]) -> str:
    return "\n".join(str(m.get("content") or "") for m in msgs if isinstance(m, dict))


def exact_key(msgs: list[dict]) -> str:
    """Case- and whitespace-insensitive key of a conversation (curated ids are hashes of exact text)."""
    return " ".join(_WORD.findall(conversation_text(msgs).lower()))


def profile(splits: dict[str, list[dict]], n_tokens: list[int], template_sha256: str) -> dict[str, Any]:
    """The small summary of a dataset that passed, kept in git to compare the next dataset against."""
    import numpy as np

    hist = Counter((n // BIN_WIDTH) * BIN_WIDTH for n in n_tokens)
    a = np.asarray(n_tokens or [0])
    return {
        "records": {k: len(v) for k, v in splits.items()},
        "n_tokens": {"bin_width": BIN_WIDTH, "hist": {str(k): hist[k] for k in sorted(hist)},
                     **{f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}, "max": int(a.max())},
        "sources": dict(sorted(Counter(source_file(r.get("source")) for v in splits.values() for r in v).items())),
        "chat_template_sha256": template_sha256,
    }


def source_file(source: str | None) -> str:
    return str(source or "?").rsplit("#", 1)[0]


def ks_binned(hist_a: dict[str, int], hist_b: dict[str, int]) -> float:
    """Kolmogorov-Smirnov statistic (largest gap between the two cumulative distributions) on shared bins."""
    na, nb = sum(hist_a.values()), sum(hist_b.values())
    if not na or not nb:
        return 0.0
    ca = cb = 0
    gap = 0.0
    for k in sorted({int(k) for k in hist_a} | {int(k) for k in hist_b}):
        ca += hist_a.get(str(k), 0)
        cb += hist_b.get(str(k), 0)
        gap = max(gap, abs(ca / na - cb / nb))
    return gap

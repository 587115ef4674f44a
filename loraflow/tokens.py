"""Exact token counts of chat conversations under a tokenizer's chat template, at a fraction of the usual cost.

Counting the usual way (apply_chat_template, then the Rust encoder) costs ~45 us to render and ~160 us to
encode a 600-byte conversation, and curation counts tens of thousands. Two shortcuts, each exact, each
taken only where its conditions hold (otherwise the usual path runs):

- Rendering: the ChatML templates in TEMPLATES are rendered by string concatenation
  (tests/test_tokens.py checks the strings equal apply_chat_template's).
- Encoding: for GPT-2-style byte-level tokenizers, a text's count is the sum of its chunks' counts, chunks
  being cut before each space that follows a non-space (so mostly " word"). Chunks repeat across a corpus,
  so each distinct chunk is encoded once and remembered. Why the sum is exact: see ChatTokens._chunkable.
- Conversations: under those templates and tokenizers, a conversation's count is a constant per role sequence
  plus its turns' contents counted alone; each distinct content (a system prompt on every record) is counted
  once. Why: see ChatTokens.count.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

import loraflow

Messages = list[dict[str, str]]

_SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2-Instruct's template (the default base model): ChatML with a default system turn.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    + _SMOLLM_SYSTEM + "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Plain ChatML, as many fine-tunes (OpenHermes, Dolphin, ...) ship it.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# template -> the text it puts before the turns when the first turn is not the system's
TEMPLATES = {SMOLLM2_TEMPLATE: f"<|im_start|>system\n{_SMOLLM_SYSTEM}<|im_end|>\n", CHATML_TEMPLATE: ""}

_CHUNK = re.compile(r"(?<=\S)(?= )")  # before a space that follows a non-space
_SPACE_AFTER_SPACE = re.compile(r"\s ")
_CACHE_MAX = 2_000_000  # distinct chunks remembered; past it the cache starts over (counts stay exact)


def plain_turn(m: dict) -> bool:
    """A turn with exactly a string role and a string content: what the shortcuts here (and curation's JSON
    writer) take; anything else goes the general way."""
    return len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str


class ChatTokens:
    """Renders conversations and counts their tokens, exactly as apply_chat_template + encode would."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.backend = getattr(tok, "backend_tokenizer", None)
        self.default_system = TEMPLATES.get(getattr(tok, "chat_template", None))
        self.chunkable = self.backend is not None and _chunkable(self.backend)
        self._first: dict[str, int] = {}  # chunk -> tokens, for a text's first chunk (and the general split)
        self._spaced: dict[str, int] = {}  # w -> tokens of " " + w, for the chunks after a split at a space
        self._contents: dict[str, int] = {}  # turn content -> tokens (count's shortcut)
        self._overheads: dict[tuple[str, ...], int] = {}  # role sequence -> tokens the template adds

    def portable(self) -> ChatTokens | None:
        """A copy that counts without the transformers tokenizer (so it pickles cheaply, for worker processes),
        or None where counting needs it: a template other than those in TEMPLATES, or a tokenizer whose counts
        are not chunk sums. The copy renders only plain {role, content} turns (else None: "ask the parent")."""
        if self.default_system is None or not self.chunkable:
            return None
        c = object.__new__(ChatTokens)
        c.tok, c.backend, c.default_system, c.chunkable = None, self.backend, self.default_system, True
        c._first, c._spaced, c._contents, c._overheads = {}, {}, {}, {}
        return c

    def render(self, msgs: Messages) -> str | None:
        """The chat template applied to `msgs` (no generation prompt); None where the template fails."""
        if self.default_system is not None and msgs and all(map(plain_turn, msgs)):
            head = "" if msgs[0]["role"] == "system" else self.default_system
            return head + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        if self.tok is None:  # a portable copy
            return None
        try:
            return self.tok.apply_chat_template(msgs, tokenize=False)
        except Exception:  # noqa: BLE001 - any template error means "cannot render"
            return None

    def count(self, convs: list[Messages]) -> list[int | None]:
        """Token count of each conversation under the chat template; None where it cannot render.

        Under the TEMPLATES with chunk sums exact, a conversation's count is a constant for its role sequence
        plus each turn's content counted alone, and contents repeat (a system prompt on every record), so
        each distinct content is counted once. Why it is exact: the template writes `role + "\n"` before a
        content and an added token after it; "\n" followed by a non-whitespace character always ends a
        pre-token (only the \\s+ alternatives of the pattern hold a newline, and they hold only whitespace), so
        a content that starts with non-whitespace is pre-tokenized alone as in context. Other contents
        (empty, leading whitespace, extra keys) take the rendered path.
        """
        out: list[int | None] = [None] * len(convs)
        by_content: list[tuple[int, int, list[str]]] = []
        rendered: list[tuple[int, str]] = []
        for i, c in enumerate(convs):
            over = self._role_overhead(c) if self.default_system is not None and self.chunkable else None
            if over is not None:
                by_content.append((i, over, [m["content"] for m in c]))
                continue
            text = self.render(c)
            if text is not None:
                rendered.append((i, text))
        if rendered:
            for (i, _), n in zip(rendered, self.count_texts([t for _, t in rendered]), strict=True):
                out[i] = n
        if by_content:
            memo = self._contents
            if len(memo) > _CACHE_MAX:
                memo.clear()
            new = list({x: None for _, _, xs in by_content for x in xs if x not in memo})
            memo.update(zip(new, self.count_texts(new), strict=True))
            for i, over, xs in by_content:
                out[i] = over + sum(map(memo.__getitem__, xs))
        return out

    def _role_overhead(self, msgs: Messages) -> int | None:
        """Tokens the template adds around the contents of `msgs`; None unless each turn is plain
        ({role, content} strings) with a content that starts with non-whitespace."""
        if not all(plain_turn(m) and m["content"] and not m["content"][0].isspace() for m in msgs):
            return None
        key = tuple(m["role"] for m in msgs)
        over = self._overheads.get(key)
        if over is None:  # the template's tokens: render one-character contents, take their tokens away
            text = self.render([{"role": r, "content": "x"} for r in key])
            n_text, n_x = self.count_texts([text, "x"])
            over = self._overheads[key] = n_text - len(key) * n_x
        return over

    def count_texts(self, texts: list[str]) -> list[int]:
        """len(encode(text, add_special_tokens=False)) for each text."""
        if not texts:
            return []
        be = self.backend
        if be is None:  # a slow (Python) tokenizer
            return [len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]
        if not self.chunkable or be.truncation is not None or be.padding is not None:
            with _parallel():
                return [len(e) for e in be.encode_batch(texts, add_special_tokens=False)]
        if len(self._first) + len(self._spaced) > _CACHE_MAX:
            self._first.clear()
            self._spaced.clear()
        out: list[int] = []
        missed: list[tuple[int, str, list[str], bool]] = []
        for text in texts:
            head, rest, spaced = self._split(text)
            try:
                out.append(self._first[head] + sum(map((self._spaced if spaced else self._first).__getitem__, rest)))
            except KeyError:
                out.append(-1)
                missed.append((len(out) - 1, head, rest, spaced))
        if missed:  # encode every chunk not seen yet in one call, then sum again
            self._learn(missed)
            for i, head, rest, spaced in missed:
                out[i] = self._first[head] + sum(map((self._spaced if spaced else self._first).__getitem__, rest))
        return out

    def _split(self, text: str) -> tuple[str, list[str], bool]:
        """(first chunk, the rest, whether the rest were split at spaces and so lack their leading space)."""
        if _SPACE_AFTER_SPACE.search(text):
            # Some space follows whitespace (indentation, "  "): not every space starts a chunk.
            head, *rest = _CHUNK.split(text)
            return head, rest, False
        # Otherwise every space does, and str.split is many times faster than the regex.
        head, *rest = text.split(" ")
        return head, rest, True

    def _learn(self, splits: list[tuple[int, str, list[str], bool]]) -> None:
        first: set[str] = set()
        spaced: set[str] = set()
        for _, head, rest, sp in splits:
            first.add(head)
            (spaced if sp else first).update(rest)
        first -= self._first.keys()
        spaced -= self._spaced.keys()
        f, s = sorted(first), sorted(spaced)
        # encode_batch_fast (no offsets) costs ~6 us a short chunk, encode_batch ~16.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        with _parallel():
            enc = encode(f + [" " + w for w in s], add_special_tokens=False)
        self._first.update(zip(f, map(len, enc[:len(f)]), strict=True))
        self._spaced.update(zip(s, map(len, enc[len(f):]), strict=True))


@contextlib.contextmanager
def _parallel() -> Iterator[None]:
    """The Rust encoder's thread pool on for one batch call (~1.4x on 2 cores), unless the user chose.

    loraflow keeps it off by default because a process that forks after the pool ran warns in each child.
    Tokenizers stays quiet, and children keep it off, when the variable is set at the fork, as it is again
    on the way out. The variable is read by the encoder at each call.
    """
    if loraflow.TOKENIZERS_PARALLELISM_CHOSEN:
        yield
        return
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _chunkable(backend: Any) -> bool:
    """Whether count(text) == the sum of count(chunk) over the text's chunks, for this tokenizer.

    The encoder first cuts the text at added tokens (<|im_start|>, ...), then the pre-tokenizer cuts each
    piece with GPT-2's pattern  's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
    and the model tokenizes each pre-token on its own. Take a space at i whose previous character is not
    whitespace (Python's whitespace includes the regex's). No match of the pattern holds both i-1 and i:
    only the ` ?` alternatives hold a space next to a non-space, and only as their first character. No
    added token holds i either, as none contains whitespace. So i starts a pre-token (or an added-token
    piece), and what the pattern matches from i on does not depend on the text before i; at the end of a
    chunk, `(?!\\S)` sees a space in context and the end alone, the same answer. So a chunk encoded alone
    yields the pre-tokens it yields in context, and the model counts each pre-token the same way.

    That holds only with: no normalizer, the ByteLevel pre-tokenizer with its regex and no prefix space,
    no dropout, and added tokens matched as written (no lstrip/rstrip/single_word), none with whitespace.
    """
    pre, model = backend.pre_tokenizer, backend.model
    if backend.normalizer is not None or type(pre).__name__ != "ByteLevel" or not pre.use_regex \
            or pre.add_prefix_space or getattr(model, "dropout", None):
        return False
    return all(not (t.lstrip or t.rstrip or t.single_word) and not any(c.isspace() for c in t.content)
               for t in backend.get_added_tokens_decoder().values())

"""curate: raw files in the formats users bring -> chat-format train/eval JSONL and preference pairs.

    python -m steps.curate data/raw/retail_media data/curated/retail_media

Reads every file under the raw folder (never modifies it), each with the reader its `curate.sources` spec
names or the one its extension and keys make unambiguous (loraflow/formats.py). Every record read ends up
curated, merged as an exact or near duplicate (counted, its source kept in the survivor's meta), or
quarantined with a reason. Texts are normalised (NFC, mojibake, control characters, whitespace, HTML where
asked) and scrubbed of PII. The split is by a hash of the record's id, so adding records never moves an
existing one between train and eval; near-duplicates are merged across splits, so no eval conversation has a
near twin in train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import gc
import hashlib
import heapq
import importlib
import json
import logging
import os
import pickle
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflow import pii
from loraflow.config import Params, SourceSpec, load_params
from loraflow.errors import CurationError
from loraflow.formats import (
    WHOLE,
    Converted,
    Messages,
    Options,
    Pref,
    Reject,
    Share,
    as_read,
    convert,
    file_markers,
    html_to_text,
    read_units,
)
from loraflow.io import atomic_dir, dumps, sha256_file, write_json, write_jsonl, write_text
from loraflow.stepcli import step_errors, step_parser
from loraflow.tokens import plain_turn

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
OUTPUTS = ("train.jsonl", "eval.jsonl", "prefs.jsonl", "quarantine.jsonl")

# ------------------------------------------------------------------------------------------ normalisation

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
# JSON turns LaTeX "\frac" / "\beta" into a form feed / backspace followed by the rest of the word.
_LATEX_ESCAPE = re.compile(r"([\x0c\x08])(?=[A-Za-z])")
# Mojibake (UTF-8 read as cp1252/latin-1) shows a lead byte char followed by a continuation-range char;
# correct Portuguese ("ão", "é ") never does, so ftfy runs only on the few texts that match.
_MOJIBAKE = re.compile("[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
                       "\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]")
_HTML = re.compile(r"<(?:p|br|div|li|ul|ol|b|i|strong|em|a|span|table|tr|td|h[1-6])\b[^>]*>|&(?:[a-z]+|#\d+);", re.I)
_TRAILING_WS = re.compile(r"[ \t]+\n")
_INNER_WS = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")
_BLANK_LINES = re.compile(r"\n{3,}")
# Every PII kind needs an '@', a run of 7+ digits and separators, or a hex pair around ':' (IPv6):
# texts without one skip the six patterns. (Separate searches: Python's re tries every alternative of
# an alternation at every position, several times slower.)
_DIGIT_RUN = re.compile(r"\d[\d.\-/ ()]{5,}\d")
_HEX_COLON = re.compile(r"[0-9a-fA-F]:[0-9a-fA-F]")
_CTRL_OR_CR = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")  # _CTRL and \r (\x0d)


def _maybe_pii(text: str) -> bool:
    return "@" in text or bool(_DIGIT_RUN.search(text)) or (":" in text and bool(_HEX_COLON.search(text)))


def _untidy(text: str) -> bool:
    """Whether the carriage-return, control-character or whitespace passes of normalise() would change it."""
    return "\t" in text or "  " in text or " \n" in text or "\n\n\n" in text or bool(_CTRL_OR_CR.search(text))


def normalise(text: str, html: bool, fixes: Counter) -> str:
    """NFC, mojibake repair, HTML to text (when asked), control characters and whitespace.

    Leading indentation is kept (code in answers); runs of blanks inside a line collapse to one.
    """
    if html and _HTML.search(text):
        text = html_to_text(text)
        fixes["html_to_text"] += 1
    if not text.isascii():
        if _MOJIBAKE.search(text):
            import ftfy

            fixed = ftfy.fix_encoding(text)
            if fixed != text:
                fixes["mojibake"] += 1
                text = fixed
        text = unicodedata.normalize("NFC", text).replace("\u00a0", " ")
    if not _untidy(text):  # most texts: nothing below would change them
        return text.strip()
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _CTRL.search(text):
        text, n = _LATEX_ESCAPE.subn(lambda m: "\\f" if m.group(1) == "\x0c" else "\\b", text)
        fixes["latex_escape"] += n
        text, n = _CTRL.subn("", text)
        fixes["control_chars"] += n
    text = _INNER_WS.sub(" ", _TRAILING_WS.sub("\n", text))
    return _BLANK_LINES.sub("\n\n", text).strip()


def check_structure(msgs: Messages) -> None:
    """Optional leading system turn, then user/assistant alternating, ending with the assistant."""
    _check_turns(msgs, "messages", last="assistant")


def _check_turns(msgs: Messages, where: str, last: str) -> None:
    for i, m in enumerate(msgs):
        if m["role"] not in ROLES:
            raise Reject("unknown_role", f"{where}[{i}].role: {m['role']!r} is not one of {', '.join(ROLES)}")
        if not m["content"]:
            raise Reject("empty_turn", f"{where}[{i}] ({m['role']}): empty content")
    turns = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if not turns:
        raise Reject("no_answer", f"{where}: no user/assistant turns after the system message")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            pos = i + (len(msgs) - len(turns))
            raise Reject("role_order", f"{where}[{pos}].role: expected {want!r} (turns must alternate user/assistant), "
                         f"got {m['role']!r}")
    if turns[-1]["role"] != last:
        raise Reject("no_answer", "last turn is the user's: there is no assistant answer to learn" if last == "assistant"
                     else f"{where}: the prompt must end with a user turn")


def check_pref(p: Pref) -> None:
    _check_turns(p.prompt, "prompt", last="user")
    for name, side in (("chosen", p.chosen), ("rejected", p.rejected)):
        if not side:
            raise Reject("missing_field", f"{name}: no answer")
        for i, m in enumerate(side):
            if m["role"] != "assistant":
                raise Reject("role_order", f"{name}[{i}].role: expected 'assistant', got {m['role']!r}")
            if not m["content"]:
                raise Reject("empty_turn", f"{name}[{i}]: empty content")
    if p.chosen == p.rejected:
        raise Reject("identical_pair", "chosen and rejected are the same text: nothing to prefer")


_json_str = json.encoder.encode_basestring  # what dumps() (ensure_ascii=False) writes for a str


def messages_json(msgs: Messages) -> str:
    """dumps(msgs), built directly for plain turns ({role, content} strings), as curation makes them."""
    if all(map(plain_turn, msgs)):
        return "[" + ", ".join(f'{{"content": {_json_str(m["content"])}, "role": {_json_str(m["role"])}}}'
                               for m in msgs) + "]"
    return dumps(msgs)


def record_id(obj: Any) -> str:
    return _id_of(dumps(obj))


def _id_of(canonical_json: str) -> str:
    return hashlib.sha256(canonical_json.encode()).hexdigest()[:16]


def in_eval(rid: str, fraction: float) -> bool:
    # A hash of the id alone decides, so the split of a record never depends on the other records.
    return int(hashlib.sha256(f"split:{rid}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


# ------------------------------------------------------------------------------------------ token lengths

@functools.lru_cache(maxsize=2)
def _tokenizer(model: str, cache: str, trust_remote_code: bool):
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

        tok = _tokenizer(params.base.model, params.base.model_cache, params.base.trust_remote_code)
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


def _percentiles(xs: list[int]) -> dict[str, float]:
    import numpy as np

    if not xs:
        return {}
    a = np.asarray(xs)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 95, 99)} | {"max": int(a.max()), "mean": float(a.mean())}


# --------------------------------------------------------------------------------------------- bookkeeping

@dataclass
class SourceStats:
    read: int = 0
    curated: int = 0
    duplicates: int = 0
    near_duplicates: int = 0  # of `duplicates`, those merged as near (not exact) twins
    quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    fixes: Counter = field(default_factory=Counter)
    markers: dict[str, str] = field(default_factory=dict)  # format markers cut from every record (file_markers)

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "curated": self.curated, "duplicates": self.duplicates,
                "near_duplicates": self.near_duplicates, "quarantined": self.quarantined,
                "reasons": dict(sorted(self.reasons.items())), "formats": dict(sorted(self.formats.items())),
                "pii": dict(sorted(self.pii.items())), "fixes": dict(sorted(self.fixes.items())),
                "markers_removed": dict(self.markers)}


@dataclass
class Raw:
    """One record read, and what became of it."""

    file: str
    source: str
    record: Any
    format: str = ""
    items: list[Item] = field(default_factory=list)
    reject: Reject | None = None
    key: tuple[int, int] = (0, 0)  # (file number, unit number): puts records read in parallel back in order


class Item:
    """One output a raw record yields: an SFT conversation or a preference pair."""

    __slots__ = ("raw", "_messages", "messages_json", "pref", "id", "n_tokens", "sized", "truncated", "outcome", "twin")

    def __init__(self, raw: Raw, messages: Messages | None = None, messages_json: str = "", pref: Pref | None = None,
                 id: str = "", n_tokens: int | None = None, sized: bool = False):  # noqa: A002
        self.raw = raw
        self._messages = messages
        self.messages_json = messages_json  # dumps(messages): hashed for the id, then reused in the output line
        self.pref = pref
        self.id = id
        self.n_tokens = n_tokens
        self.sized = sized  # whether n_tokens is settled (counted, or None because the bound says it fits)
        self.truncated = False
        self.outcome = ""  # new | duplicate | near_duplicate
        self.twin: Item | None = None  # the kept item a duplicate was merged into

    @property
    def messages(self) -> Messages | None:
        """The conversation (None for a preference pair). One a worker process sent as JSON only is
        decoded here on first use: most never need it again."""
        if self._messages is None and self.messages_json:
            self._messages = json.loads(self.messages_json)
        return self._messages

    @messages.setter
    def messages(self, value: Messages | None) -> None:
        self._messages = value


def spec_for(rel: str, specs: list[SourceSpec]) -> SourceSpec | None:
    name = rel.rsplit("/", 1)[-1]
    return next((s for s in specs if fnmatch.fnmatch(rel, s.glob) or fnmatch.fnmatch(name, s.glob)), None)


def _options(spec: SourceSpec | None, params: Params) -> Options:
    c = params.curate
    base = {"tools": c.tools, "feedback_min_rating": c.feedback_min_rating,
            # documents (issue 22): long sections are cut to fit, counted with the base model's tokenizer
            "max_tokens": params.base.max_seq_len,
            "tokenizer": (params.base.model, params.base.model_cache, params.base.trust_remote_code)}
    if spec is None:
        return Options(**base)
    return Options(format=spec.format, columns=dict(spec.columns), delimiter=spec.delimiter, encoding=spec.encoding,
                   html_to_text=spec.html_to_text, question_template=spec.question_template,
                   password=spec.password, **base)  # password: documents (issue 22)


# ------------------------------------------------------------------------------------------------- phases

@contextlib.contextmanager
def _gc_paused():
    # The step allocates a few objects per record and frees almost none before it ends, so the cyclic
    # collector would walk all of them again and again: ~20% of a 100,000-record run. run() cuts its own
    # reference cycles before returning, so reference counting frees what it made.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_all(params: Params, raw_dir: Path, files: list[Path], stats: dict[str, SourceStats],
              label: str | None = None, force: str | None = None, share: Share = WHOLE) -> list[Raw]:
    """Read, convert, normalise, scrub and check every record of every file (of one share of each file)."""
    kinds = [k for k in pii.KINDS if getattr(params.curate.pii, k)]
    memo: dict[bool, dict[str, tuple]] = {False: {}, True: {}}  # (html?) -> text -> cleaned, fixes, pii
    raws: list[Raw] = []
    for file_no, path in enumerate(files):
        # "<mode>/<file>": stable whatever the working directory, so re-runs are byte-identical.
        rel = _rel(path, raw_dir, label)
        st = stats[rel]
        opts = _options(spec_for(path.relative_to(raw_dir).as_posix(), params.curate.sources), params)
        if force:
            opts = dataclasses.replace(opts, format=force)
        sep, stop = file_markers(path, opts)
        if sep or stop:
            opts = dataclasses.replace(opts, prompt_separator=sep, completion_stop=stop)
            if share[0] == 0:  # this process reports it (every process cuts the same markers)
                st.markers = {k: v for k, v in (("prompt_separator", sep), ("completion_stop", stop)) if v}
                log.info("curate: %s: cutting the prompt separator %r and completion stop sequence %r every "
                         "record ends with", rel, sep, stop)
        try:
            for unit, idx, rec in read_units(path, opts, share):
                raw = Raw(rel, f"{rel}#{idx}", rec, key=(file_no, unit))
                raws.append(raw)
                try:
                    if isinstance(rec, Reject):
                        raise rec
                    conv = convert(rec, opts)
                    raw.format = conv.format
                    _normalise(conv, kinds, st, memo)
                    for msgs in conv.conversations:
                        check_structure(msgs)
                    for p in conv.prefs:
                        check_pref(p)
                except Reject as e:
                    raw.reject = e.with_traceback(None)  # the traceback holds this frame, so every record
                    continue
                except (TypeError, ValueError, KeyError, AttributeError) as e:
                    # A shape no reader anticipated: still one quarantined record, never a crashed run.
                    raw.reject = Reject("malformed", f"cannot convert ({type(e).__name__}: {e})")
                    continue
                raw.items = [Item(raw, messages=m) for m in conv.conversations] + [Item(raw, pref=p) for p in conv.prefs]
        except (Reject, OSError) as e:
            # Nothing (more) in the file can be read: one quarantine entry names the file, the line and the
            # fix. Every share meets it; the first reports it, after the records read before it.
            if share[0] == 0:
                reject = (Reject(e.code, f"{rel}: {e}") if isinstance(e, Reject)
                          else Reject("unreadable_file", f"{rel}: cannot be read ({e})"))
                raws.append(Raw(rel, rel, None, reject=reject, key=(file_no, _AFTER_FILE)))
                log.error("%s", reject)
    return raws


_AFTER_FILE = 1 << 62  # the unit number of a file-level reject: after every record read from the file


def _rel(path: Path, raw_dir: Path, label: str | None) -> str:
    return (Path(label or raw_dir.name) / path.relative_to(raw_dir)).as_posix()


def _convs(it: Item) -> list[Messages]:
    """What the model sees of an item: the conversation, or a pair's prompt with each answer."""
    return [it.messages] if it.pref is None else [it.pref.prompt + it.pref.chosen, it.pref.prompt + it.pref.rejected]


def _size(items: list[Item], lengths: Lengths | None, final: bool = True) -> None:
    """Each item's id, and its token count wherever the cheap bound cannot vouch that it fits.

    final=False (a worker's portable counter): a conversation it cannot count stays unsized for the parent.
    """
    todo: list[tuple[Item, Messages]] = []
    for it in items:
        if it.pref is None:
            it.messages_json = messages_json(it.messages)
            it.id = _id_of(it.messages_json)
        else:
            it.id = record_id({"prompt": it.pref.prompt, "chosen": it.pref.chosen, "rejected": it.pref.rejected})
        if lengths is None:
            continue
        it.sized, it.n_tokens = True, None
        for conv in _convs(it):
            b = lengths.bound(conv)
            if b is None or b > lengths.limit:
                todo.append((it, conv))
    counts = lengths.count([c for _, c in todo]) if todo else []
    for (it, _), n in zip(todo, counts, strict=True):
        if n is None and not final:
            it.sized = False
        elif it.sized:
            n = 10**9 if n is None else n  # a conversation the template cannot render never fits
            it.n_tokens = n if it.n_tokens is None else max(it.n_tokens, n)
    for it, _ in todo:
        if not it.sized:
            it.n_tokens = None


# Parallel reading. A worker costs about what reading WORKER_COST_BYTES of raw records costs (spawning,
# importing, receiving the tokenizer, sending its records back): `auto` starts workers only past twice
# that, and this process, which pays none of it, takes that much more than its even share.
WORKER_COST_BYTES = 8 << 20
_SLOTS = 1000


def _workers(params: Params, size: int) -> int:
    """Processes for reading: curate.workers, or with `auto` one per core once the input pays for them
    (spawned, not forked: the step may run inside a process that holds torch's or tokenizers' threads)."""
    if params.curate.workers != "auto":
        return params.curate.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8, size // (2 * WORKER_COST_BYTES)))


def _shares(parts: int, size: int) -> list[Share]:
    """Unit shares for this process (first) and each worker: even, less a worker's cost on each worker."""
    worker = max(0.0, (size - WORKER_COST_BYTES) / (parts * size)) if size else 1 / parts
    # Worker k (1..parts-1) takes the k-th slice of `worker` slots from the top; this process the bottom rest.
    edges = [0] + [_SLOTS - round((parts - k) * worker * _SLOTS) for k in range(1, parts)] + [_SLOTS]
    return [(edges[i], edges[i + 1], _SLOTS) for i in range(parts)]


@_gc_paused()
def _read_part(params: Params, raw_dir: Path, files: list[Path], label: str | None, force: str | None,
               share: Share, chat: Any, out: Path) -> Path:
    """A worker process's share of every file, read, cleaned, identified and sized, pickled into `out`.

    The records travel packed as tuples, through a file (cheaper than the result pipe for tens of MB):
    pickling Raw/Item objects costs more than reading saves. An SFT conversation travels as its JSON only;
    the raw record only where the parent may still quarantine it (or needs it: served feedback)."""
    stats: dict[str, SourceStats] = defaultdict(SourceStats)
    raws = _read_all(params, raw_dir, files, stats, label, force, share)
    _size([it for raw in raws for it in raw.items], Lengths(chat, params.base.max_seq_len) if chat else None,
          final=False)
    limit = params.base.max_seq_len
    rows = []
    for raw in raws:
        keep = raw.reject is not None or _is_feedback(raw.record) or any(
            not it.sized or (it.n_tokens or 0) > limit for it in raw.items)
        rows.append((raw.key, raw.source, raw.format, raw.reject, raw.record if keep else None,
                     [(it.messages_json, it.pref, it.id, it.n_tokens, it.sized) for it in raw.items]))
    with open(out, "wb") as f:
        pickle.dump(({rel: (st.fixes, st.pii) for rel, st in stats.items()}, rows), f, protocol=pickle.HIGHEST_PROTOCOL)
    return out


def _unpack(rows: list[tuple], files: list[Path], raw_dir: Path, label: str | None) -> list[Raw]:
    rels = [_rel(f, raw_dir, label) for f in files]
    raws = []
    for key, source, fmt, reject, record, items in rows:
        raw = Raw(rels[key[0]], source, record, fmt, reject=reject, key=key)
        raw.items = [Item(raw, messages_json=mj, pref=pref, id=rid, n_tokens=n, sized=sized)
                     for mj, pref, rid, n, sized in items]
        raws.append(raw)
    return raws


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Start spawned processes without re-running the caller's main script in them.

    multiprocessing's spawn imports the parent's __main__ in each child so that functions defined there can
    be unpickled; a script without an `if __name__ == "__main__":` guard would then run again, side effects
    and all, in every worker. The workers need nothing from __main__ (the function and everything it gets
    come from importable modules), so the parent's __main__ is shown to spawn as a module with neither a
    spec nor a file while they start.
    """
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.update(saved)
        if "__spec__" not in saved:
            del main.__spec__


def _read_here(params: Params, raw_dir: Path, files: list[Path], stats: dict[str, SourceStats], lengths: Lengths,
               label: str | None, force: str | None, share: Share = WHOLE) -> list[Raw]:
    raws = _read_all(params, raw_dir, files, stats, label, force, share)
    _size([it for raw in raws for it in raw.items], lengths)
    return raws


def _start_workers(jobs: list[tuple]) -> tuple[Any, list[Any]]:
    """A spawned process per job running _read_part: (the pool, a future per job), or (None, Nones) where
    processes cannot be started here (e.g. a platform without a working sem_open): the caller reads those
    shares itself."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        pool = ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn"))
        # By its importable name: when this module runs as __main__ (python -m steps.curate), the workers,
        # which do not run __main__, must still find the function.
        read_part = importlib.import_module("steps.curate")._read_part
        with _main_hidden():  # the workers start here, inside submit()
            return pool, [pool.submit(read_part, *job) for job in jobs]
    except (OSError, ImportError, NotImplementedError) as e:
        log.warning("curate: cannot start worker processes (%s: %s); reading in this one", type(e).__name__, e)
        return None, [None] * len(jobs)


def _worker_result(future: Any) -> Path | None:
    """The pickle a worker wrote, or None if it did not start or died (killed for memory, say)."""
    from concurrent.futures.process import BrokenProcessPool

    if future is None:
        return None
    try:
        return future.result()
    except (BrokenProcessPool, OSError) as e:
        log.warning("curate: a worker process failed (%s: %s); reading its share in this one", type(e).__name__, e)
        return None


def _read_sources(params: Params, raw_dir: Path, files: list[Path], stats: dict[str, SourceStats],
                  lengths: Lengths, label: str | None = None, force: str | None = None) -> list[Raw]:
    """_read_all + _size over every file, split across `_workers` processes when that pays; same output."""
    size = sum(p.stat().st_size for p in files)
    parts = _workers(params, size)
    if parts == 1:
        return _read_here(params, raw_dir, files, stats, lengths, label, force)
    import tempfile

    shares = _shares(parts, size)
    log.info("curate: reading %d file(s) in %d processes", len(files), parts)
    chat = lengths.chat.portable()  # None: the workers only read, this process counts tokens
    with tempfile.TemporaryDirectory(prefix="loraflow-curate-") as tmp:
        pool, futures = _start_workers([(params, raw_dir, files, label, force, share, chat, Path(tmp) / f"{k}.pkl")
                                        for k, share in enumerate(shares[1:], 1)])
        try:
            own = _read_here(params, raw_dir, files, stats, lengths, label, force, shares[0])
            parts_read = []
            for share, future in zip(shares[1:], futures, strict=True):
                path = _worker_result(future)
                if path is None:  # nothing is lost: the share is read here
                    parts_read.append(_read_here(params, raw_dir, files, stats, lengths, label, force, share))
                    continue
                with open(path, "rb") as f:
                    part_stats, rows = pickle.load(f)
                for rel, (fixes, found) in part_stats.items():  # counts made while cleaning; the rest is tallied later
                    stats[rel].fixes.update(fixes)
                    stats[rel].pii.update(found)
                parts_read.append(_unpack(rows, files, raw_dir, label))
        finally:
            if pool is not None:
                # Workers exit on their own (freeing their records takes them a moment): no need to wait.
                pool.shutdown(wait=False, cancel_futures=True)
    raws = list(heapq.merge(own, *parts_read, key=lambda raw: raw.key))
    unsized = [it for raw in raws for it in raw.items if not it.sized]
    if unsized:
        _size(unsized, lengths)
    return raws


def _normalise(conv: Converted, kinds: list[str], st: SourceStats, memo: dict[bool, dict[str, tuple]]) -> None:
    # Texts repeat (a system prompt on every record, duplicates): each distinct one is cleaned once, and
    # its fixes and PII counts are replayed wherever it occurs again.
    seen = memo[conv.html]

    def fix(msgs: Messages) -> Messages:
        out = []
        for m in msgs:
            done = seen.get(m["content"])
            if done is None:
                counts: Counter = Counter()
                text, found = normalise(m["content"], conv.html, counts), None
                if kinds and _maybe_pii(text):
                    text, found = pii.scrub(text, kinds)
                done = seen[m["content"]] = (text, counts, found)
            text, fixed, found = done
            if fixed:
                st.fixes.update(fixed)
            if found:
                st.pii.update(found)
            out.append({"role": m["role"], "content": text})
        return out

    conv.conversations = [fix(m) for m in conv.conversations]
    conv.prefs = [Pref(fix(p.prompt), fix(p.chosen), fix(p.rejected)) for p in conv.prefs]


def _apply_length_policy(params: Params, raws: list[Raw], lengths: Lengths) -> None:
    """Drop, truncate or keep what is too long (counted by _size)."""
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
                    it.id = _id_of(it.messages_json)
                    continue
            raw.reject = Reject("too_long", f"{it.n_tokens} tokens under the chat template, over base.max_seq_len="
                                f"{limit} (curate.too_long: {policy})")
        if raw.reject:
            raw.items = []


def _dedup(params: Params, raws: list[Raw]) -> tuple[list[Item], list[Item]]:
    """Exact duplicates by id, then near duplicates of conversations; the first seen is kept."""
    seen: dict[str, Item] = {}
    kept_sft: list[Item] = []
    kept_prefs: list[Item] = []
    for raw in raws:
        for it in raw.items:  # ids were set by _size
            if it.id in seen:
                it.outcome, it.twin = "duplicate", seen[it.id]
                continue
            seen[it.id] = it
            it.outcome = "new"
            (kept_sft if it.pref is None else kept_prefs).append(it)
    if params.curate.near_dup and kept_sft:
        from loraflow.neardup import near_duplicates

        # System prompts are left out: a long shared one would make every short exchange look alike.
        texts = ["\n".join(m["content"] for m in it.messages if m["role"] != "system") for it in kept_sft]
        merged = near_duplicates(texts, params.curate.near_dup_threshold)
        for it, hit in zip(kept_sft, merged, strict=True):
            if hit is not None:
                it.outcome, it.twin = "near_duplicate", kept_sft[hit[0]]
        kept_sft = [it for it in kept_sft if it.outcome == "new"]
    return kept_sft, kept_prefs


def _tally(raws: list[Raw], stats: dict[str, SourceStats]) -> list[dict]:
    """Each raw record's outcome into its source's counts; the quarantine file's entries."""
    quarantine = []
    for raw in raws:
        st = stats[raw.file]
        st.read += 1
        if raw.format:
            st.formats[raw.format] += 1
        if raw.reject is not None:
            st.quarantined += 1
            st.reasons[raw.reject.code] += 1
            record = raw.reject.raw if raw.reject.raw is not None else as_read(raw.record)
            quarantine.append({"source": raw.source, "category": raw.reject.code, "reason": str(raw.reject),
                               "record": record})
        elif any(it.outcome == "new" for it in raw.items):
            st.curated += 1
        else:
            st.duplicates += 1
            st.near_duplicates += all(it.outcome == "near_duplicate" for it in raw.items)
    return quarantine


def _is_feedback(rec: Any) -> bool:
    """An event `loraflow serve` logged (its output line's meta names the answer it was about)."""
    return isinstance(rec, dict) and "event_id" in rec


def _meta(it: Item, dups: dict[int, dict[str, list[str]]]) -> dict:
    meta = {"format": it.raw.format, **dups.get(id(it), {"duplicates": [], "near_duplicates": []})}
    rec = it.raw.record
    if _is_feedback(rec):  # served-answer feedback: keep what it was about
        meta["feedback"] = {k: rec.get(k) for k in ("response_id", "rating", "adapter_version", "timestamp")}
    return meta


@functools.lru_cache(maxsize=64)
def _plain_meta_json(fmt: str) -> str:
    return dumps({"format": fmt, "duplicates": [], "near_duplicates": []})


def _sft_line(it: Item, dups: dict[int, dict[str, list[str]]]) -> str:
    """dumps({"id", "messages", "meta", "source"}), byte for byte, with the messages' JSON made once (for the id)."""
    rec = it.raw.record
    if it.truncated or id(it) in dups or _is_feedback(rec):
        meta = _meta(it, dups)
        if it.truncated:
            meta["truncated"] = True
        meta_json = dumps(meta)
    else:  # most records: no twins, nothing cut, not feedback
        meta_json = _plain_meta_json(it.raw.format)
    # json.dumps(sort_keys=True) writes the keys in this order with ", " and ": " between them.
    return f'{{"id": {_json_str(it.id)}, "messages": {it.messages_json}, "meta": {meta_json}, "source": {_json_str(it.raw.source)}}}'


def _pref_record(it: Item, dups: dict[int, dict[str, list[str]]]) -> dict:
    meta = _meta(it, dups)
    return {"id": it.id, "prompt": it.pref.prompt, "chosen": it.pref.chosen, "rejected": it.pref.rejected,
            "source": it.raw.source, "meta": meta}


@_gc_paused()
def run(params: Params, raw_dir: Path, out_dir: Path, feedback_dir: Path | None = None) -> dict[str, Any]:
    """Curate every file under `raw_dir` (and users' feedback on served answers, if given) into `out_dir`.

    Args:
        params: the validated params (reads `base` and `curate`).
        raw_dir: folder of raw files in any supported format (see loraflow/formats.py and curate.sources).
        out_dir: gets train.jsonl, eval.jsonl, prefs.jsonl, quarantine.jsonl and stats.json, written whole.
        feedback_dir: data/raw/feedback/<mode>/ as `loraflow serve` appends it (format: loraflow/feedback.py);
            its events become SFT records and preference pairs like any other source.

    Returns:
        The stats dict also written to stats.json.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    files = sorted(p for p in raw_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    fb_dir = Path(feedback_dir) if feedback_dir is not None else None
    fb_files = sorted(p for p in fb_dir.rglob("*.jsonl") if not p.name.startswith(".")) if fb_dir and fb_dir.is_dir() else []
    if not files and not fb_files:
        raise CurationError(f"{raw_dir}: no raw files found")

    stats: dict[str, SourceStats] = defaultdict(SourceStats)
    lengths = Lengths.for_params(params)
    raws = _read_sources(params, raw_dir, files, stats, lengths)
    if fb_files:
        raws += _read_sources(params, fb_dir, fb_files, stats, lengths, label=f"feedback/{fb_dir.name}", force="feedback")
    _apply_length_policy(params, raws, lengths)
    kept, prefs = _dedup(params, raws)
    quarantine = _tally(raws, stats)
    if not kept and not prefs:
        # Nothing is written (the previous output stays), so the reasons go into the message itself.
        why = "; ".join(f"{q['source']}: {q['reason']}" for q in quarantine[:5])
        raise CurationError(f"{raw_dir}: no record could be curated ({len(quarantine)} rejected): {why}")

    dups: dict[int, dict[str, list[str]]] = {}
    for raw in raws:
        for it in raw.items:
            if it.twin is not None:
                key = "duplicates" if it.outcome == "duplicate" else "near_duplicates"
                kept_twin = it.twin
                while kept_twin.twin is not None:  # an exact copy of a record later merged as a near twin
                    kept_twin, key = kept_twin.twin, "near_duplicates"
                dups.setdefault(id(kept_twin), {"duplicates": [], "near_duplicates": []})[key].append(raw.source)
    fraction = params.curate.eval_fraction
    held_out = [in_eval(it.id, fraction) for it in kept]
    train = [_sft_line(it, dups) for it, e in zip(kept, held_out, strict=True) if not e]
    evals = [_sft_line(it, dups) for it, e in zip(kept, held_out, strict=True) if e]

    # Percentiles over a stable sample (the smallest ids): exact for the records counted already.
    sample = sorted(kept, key=lambda it: it.id)[:params.curate.length_stats_sample or None]
    missing = [it for it in sample if it.n_tokens is None]
    for it, n in zip(missing, lengths.count([it.messages for it in missing]) if missing else [], strict=True):
        it.n_tokens = n
    token_lengths = _percentiles([it.n_tokens for it in sample if it.n_tokens is not None])
    token_lengths["counted"] = len(sample)

    with atomic_dir(out_dir) as tmp:
        for name, lines in (("train.jsonl", train), ("eval.jsonl", evals)):
            write_text(tmp / name, "\n".join(lines) + "\n" if lines else "")
        write_jsonl(tmp / "prefs.jsonl", [_pref_record(it, dups) for it in prefs])
        write_jsonl(tmp / "quarantine.jsonl", quarantine)
        fields = ("read", "curated", "duplicates", "quarantined")
        totals = {f: sum(getattr(s, f) for s in stats.values()) for f in fields}
        summary = {
            "sources": {k: v.as_dict() for k, v in sorted(stats.items())},
            "totals": totals,
            "reasons": dict(sorted(sum((s.reasons for s in stats.values()), Counter()).items())),
            "pii": dict(sorted(sum((s.pii for s in stats.values()), Counter()).items())),
            "dedup": {"exact": totals["duplicates"] - sum(s.near_duplicates for s in stats.values()),
                      "near": sum(s.near_duplicates for s in stats.values()),
                      "near_dup": params.curate.near_dup, "near_dup_threshold": params.curate.near_dup_threshold},
            "splits": {"train": len(train), "eval": len(evals), "prefs": len(prefs)},
            "token_lengths": token_lengths,
            "tokenizer": params.base.model,
            "files": {n: sha256_file(tmp / n) for n in OUTPUTS},
        }
        write_json(tmp / "stats.json", summary)
    t = summary["totals"]
    log.info("curate: %d read -> %d curated (%d train / %d eval / %d prefs), %d duplicates merged, %d quarantined",
             t["read"], t["curated"], len(train), len(evals), len(prefs), t["duplicates"], t["quarantined"])
    for raw in raws:  # no Raw <-> Item cycles left: reference counting frees the run's objects on return
        raw.items = []
    return summary


def summary_table(stats: dict[str, Any]) -> str:
    """The stats as a table for the terminal: one row per source, then totals, splits and PII."""
    head = ("source", "read", "curated", "dup", "near", "quarant.", "top reasons")
    rows = [(src, s["read"], s["curated"], s["duplicates"], s["near_duplicates"], s["quarantined"],
             ", ".join(f"{k} {n}" for k, n in Counter(s["reasons"]).most_common(3)) or "-")
            for src, s in stats["sources"].items()]
    t = stats["totals"]
    rows.append(("TOTAL", t["read"], t["curated"], t["duplicates"], stats["dedup"]["near"], t["quarantined"],
                 ", ".join(f"{k} {n}" for k, n in Counter(stats["reasons"]).most_common(3)) or "-"))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i in (0, 6) else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in rows[:-1]] + ["  ".join("-" * w for w in widths), fmt.format(*rows[-1])]
    sp, tl = stats["splits"], stats["token_lengths"]
    lines.append(f"splits: {sp['train']} train / {sp['eval']} eval / {sp['prefs']} preference pairs;  "
                 f"tokens p50 {tl.get('p50', '-')} p95 {tl.get('p95', '-')} max {tl.get('max', '-')}")
    lines.append("pii scrubbed: " + (", ".join(f"{k} {n}" for k, n in stats["pii"].items()) or "none"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = step_parser(__doc__)
    ap.add_argument("raw_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--feedback", type=Path, default=None,
                    help="data/raw/feedback/<mode>: users' ratings and corrections from `loraflow serve`")
    args = ap.parse_args(argv)
    with step_errors():
        stats = run(load_params(args.params, args.set), args.raw_dir, args.out_dir, args.feedback)
        print(summary_table(stats))


if __name__ == "__main__":
    main()

"""Reading in one process: every record of every file (or of one share of each file) read, converted,
normalised, scrubbed, checked, identified and sized."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from pathlib import Path

from loraflow import pii
from loraflow.config import Params, SourceSpec
from loraflow.curation.ids import id_of, messages_json, record_id
from loraflow.curation.lengths import Lengths
from loraflow.curation.normalise import clean
from loraflow.curation.records import Item, Raw, SourceStats
from loraflow.curation.structure import check_pref, check_structure
from loraflow.formats import (
    DOCUMENTS,
    EXTENSIONS,
    WHOLE,
    Messages,
    Options,
    Reject,
    Share,
    convert,
    file_markers,
    read_units,
)

log = logging.getLogger(__name__)


def spec_for(rel: str, specs: list[SourceSpec]) -> SourceSpec | None:
    name = rel.rsplit("/", 1)[-1]
    return next((s for s in specs if fnmatch.fnmatch(rel, s.glob) or fnmatch.fnmatch(name, s.glob)), None)


def _options(spec: SourceSpec | None, params: Params) -> Options:
    c = params.curate
    base = {"tools": c.tools, "feedback_min_rating": c.feedback_min_rating,
            # documents: long sections are cut to fit, counted with the base model's tokenizer
            "max_tokens": params.base.max_seq_len,
            "tokenizer": (params.base.model, params.base.model_cache, params.base.trust_remote_code)}
    if spec is None:
        return Options(**base)
    return Options(format=spec.format, columns=dict(spec.columns), delimiter=spec.delimiter, encoding=spec.encoding,
                   html_to_text=spec.html_to_text, question_template=spec.question_template,
                   password=spec.password, **base)


def read_all(params: Params, raw_dir: Path, files: list[Path], stats: dict[str, SourceStats],
             label: str | None = None, force: str | None = None, share: Share = WHOLE) -> list[Raw]:
    """Read, convert, normalise, scrub and check every record of every file (of one share of each file)."""
    kinds = [k for k in pii.KINDS if getattr(params.curate.pii, k)]
    memo: dict[bool, dict[str, tuple]] = {False: {}, True: {}}  # (html?) -> text -> cleaned, fixes, pii
    raws: list[Raw] = []
    for file_no, path in enumerate(files):
        # "<mode>/<file>": stable whatever the working directory, so re-runs are byte-identical.
        rel = source_name(path, raw_dir, label)
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
        # The document's facts, from the process that reads the file's first share (each reads the file whole).
        info: dict | None = {} if share[0] == 0 else None
        try:
            for unit, idx, rec in read_units(path, opts, share, info=info):
                raw = Raw(rel, f"{rel}#{idx}", rec, key=(file_no, unit))
                raws.append(raw)
                try:
                    if isinstance(rec, Reject):
                        raise rec
                    conv = convert(rec, opts)
                    raw.format = conv.format
                    clean(conv, kinds, st, memo)
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
                if info is not None and _is_document(path, opts):
                    info.update(quarantined=reject.code, reason=str(reject))
        if info:
            st.document = info
    return raws


def _is_document(path: Path, opts: Options) -> bool:
    """A file read as heading sections (PDF, Word, web page, Markdown, text): one whose facts stats.json keeps."""
    return opts.format in DOCUMENTS or (opts.format == "auto" and EXTENSIONS.get(path.suffix.lower()) in DOCUMENTS)


_AFTER_FILE = 1 << 62  # the unit number of a file-level reject: after every record read from the file


def source_name(path: Path, raw_dir: Path, label: str | None) -> str:
    """"<label or the raw folder's name>/<path inside it>": what stats.json and each record's source name."""
    return (Path(label or raw_dir.name) / path.relative_to(raw_dir)).as_posix()


def _convs(it: Item) -> list[Messages]:
    """What the model sees of an item: the conversation, or a pair's prompt with each answer."""
    return [it.messages] if it.pref is None else [it.pref.prompt + it.pref.chosen, it.pref.prompt + it.pref.rejected]


def identify_and_size(items: list[Item], lengths: Lengths | None, final: bool = True) -> None:
    """Each item's id, and its token count wherever the cheap bound cannot vouch that it fits.

    final=False (a worker's portable counter): a conversation it cannot count stays unsized for the parent.
    """
    todo: list[tuple[Item, Messages]] = []
    for it in items:
        if it.pref is None:
            it.messages_json = messages_json(it.messages)
            it.id = id_of(it.messages_json)
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


def read_here(params: Params, raw_dir: Path, files: list[Path], stats: dict[str, SourceStats], lengths: Lengths,
              label: str | None, force: str | None, share: Share = WHOLE) -> list[Raw]:
    """read_all, then identify_and_size with this process's token counter (which counts everything)."""
    raws = read_all(params, raw_dir, files, stats, label, force, share)
    identify_and_size([it for raw in raws for it in raw.items], lengths)
    return raws

"""The formats users bring: read a raw file into records, and convert each record to chat messages or pairs.

Reading (file -> raw records, each with its index) and converting (raw record -> `Converted`) are separate
steps, so a record that cannot be converted is quarantined exactly as it was read.

Indexes: JSON arrays count records from 0; line-based files (JSONL, CSV/TSV, documents) give the line the
record starts on (1-based), HTML pages `<line>:<column>`; a record nested in another (Alpaca `instances`) gets `<outer>.<inner>`.

Tool use. The curated contract knows only system/user/assistant, so tool turns are written as text in the
Hermes/Qwen convention that any chat template can render: a tool call becomes an assistant turn
`<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`, a tool result a user turn
`<tool_response>\\n...\\n</tool_response>` (consecutive results merge into one turn), and the tool schemas
join the system message inside `<tools>...</tools>`. ShareGPT `function_call` is a call and `observation`
(or `tool`) a result. `curate.tools: quarantine` sets every record that declares or uses tools aside instead.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

# Formats a source spec may name; "auto" decides per file (documents, CSV) or per record (JSON keys).
RECORD_FORMATS = ("openai", "prompt_completion", "alpaca", "sharegpt", "preference", "feedback")
FILE_FORMATS = ("csv", "tsv", "markdown", "html", "text", "pdf", "docx")
DOCUMENTS = ("markdown", "html", "text", "pdf", "docx")  # read as heading sections (loraflow/documents.py)
FORMATS = ("auto", *RECORD_FORMATS, *FILE_FORMATS)
EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".md": "markdown",
              ".markdown": "markdown", ".html": "html", ".htm": "html", ".txt": "text",
              ".pdf": "pdf", ".docx": "docx"}

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
                  "function_call": "tool_call", "observation": "tool", "tool": "tool", "function": "tool"}
# CSV headers recognised without a `columns:` mapping (case-insensitive), per field.
CSV_COLUMNS = {"question": ("question", "pergunta", "prompt", "instruction", "instrução", "q", "input"),
               "answer": ("answer", "resposta", "response", "output", "completion", "a"),
               "system": ("system", "sistema")}
TOOLS_PROMPT = ("You can call these tools. To call one, answer with "
                '<tool_call>{{"name": ..., "arguments": ...}}</tool_call>.\n<tools>\n{tools}\n</tools>')

Messages = list[dict[str, str]]


class Reject(Exception):
    """A record (or a whole file) that cannot be curated.

    `code` is a short category for the stats ("invalid_json", "role_order", ...); the message is the reason
    written to quarantine. `raw` is what was read when the record could not even be parsed (a line's text).
    """

    def __init__(self, code: str, reason: str, raw: Any = None):
        super().__init__(reason)
        self.code = code
        self.raw = raw

    def __reduce__(self):  # pickled by curation's worker processes (Exception's default drops code and raw)
        return Reject, (self.code, str(self), self.raw)


@dataclass
class Pref:
    prompt: Messages
    chosen: Messages
    rejected: Messages


@dataclass
class Converted:
    conversations: list[Messages] = field(default_factory=list)  # SFT records
    prefs: list[Pref] = field(default_factory=list)
    format: str = ""
    html: bool = False  # convert HTML in the texts to plain text


@dataclass
class Row:
    """One CSV/TSV row: its cells by header, and which header holds question/answer/system."""

    cells: dict[str, str]
    columns: dict[str, str]


@dataclass
class Section:
    """One heading of a document and the text under it."""

    heading: str
    path: str  # the headings above it and itself, joined by " > "
    title: str
    text: str


@dataclass(frozen=True)
class Options:
    """What a converter needs besides the record: the source spec's options and a few curate params."""

    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    delimiter: str | None = None
    encoding: str = "utf-8"
    html_to_text: bool | None = None
    question_template: str = "{heading}"
    tools: str = "keep"
    feedback_min_rating: int = 4
    # A legacy prompt/completion file's format markers (file_markers), cut from every record that ends with them
    prompt_separator: str = ""
    completion_stop: str = ""
    password: str | None = None  # an encrypted PDF's (user) password
    # Documents: sections longer than this many tokens under the chat template are cut between paragraphs
    # (None: kept whole), counted with this tokenizer (base.model, base.model_cache, base.trust_remote_code).
    max_tokens: int | None = None
    tokenizer: tuple[str, str, bool] | None = None


# ----------------------------------------------------------------------------------------------- reading

def container(path: Path, fmt: str) -> str:
    """How the file is laid out: jsonl, json, csv, tsv, or one of DOCUMENTS."""
    if fmt in FILE_FORMATS:
        return fmt
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        if fmt in RECORD_FORMATS:
            return "jsonl"  # a record format named explicitly on an odd extension: one JSON object a line
        raise Reject("unknown_format", f"unknown format: extension {path.suffix or '(none)'!r} is none of "
                     f"{', '.join(sorted(EXTENSIONS))}; name the format for this file in curate.sources")
    if kind in (*DOCUMENTS, "csv", "tsv") and fmt in RECORD_FORMATS:
        raise Reject("unknown_format", f"curate.sources says format {fmt!r}, but {path.suffix} files hold "
                     f"{kind}, not JSON records")
    return kind


Share = tuple[int, int, int]  # (lo, hi, m): the units whose number modulo m is in [lo, hi)
WHOLE: Share = (0, 1, 1)


def read_units(path: Path, opts: Options, share: Share = WHOLE, info: dict | None = None) -> Iterator[tuple[int, str, Any]]:
    """Yield (unit, index, raw record) for each record of a file; an unparsable record comes as a Reject.

    Raises Reject when nothing in the file can be read (the reason names the line and what was expected).

    A unit is a non-blank line of a JSON Lines file, else a top-level record. `share` takes the units whose
    number modulo m is in [lo, hi), with every record of each (an Alpaca record's `instances` stay
    together): shares that cover [0, m), read in separate processes, merge back in order by (unit, position).
    JSON Lines skips other shares' lines before decoding them; other containers are parsed whole by each.

    `info`, when given, gets what a document reader saw beyond its records: pages (and those without text),
    paragraphs, tables, footnotes, sections, and how many sections were cut into how many pieces.
    """
    kind = container(path, opts.format)
    data = path.read_bytes()
    if not data.strip():
        raise Reject("empty_file", "empty file: no records")
    if kind == "jsonl":
        yield from _expand(_read_jsonl(data, opts.encoding, share), opts)
        return
    if kind in ("pdf", "docx"):
        from loraflow import documents

        extra = {"password": opts.password} if kind == "pdf" else {}
        read = documents.read_pdf if kind == "pdf" else documents.read_docx
        read_records = read(data, Path(path).stem, info=info, **extra)
        if not read_records:
            raise Reject("empty_file", f"no text in this {kind.upper()} file (nothing under or between its headings)")
        records = _fitted(read_records, opts, info)
        lo, hi, m = share
        yield from ((u, idx, rec) for u, (idx, rec) in enumerate(records) if lo <= u % m < hi)
        return
    text = _decode(data, opts.encoding)
    if kind == "json":
        yield from _expand(_read_json(text, share), opts)
        return
    if kind in ("csv", "tsv"):
        records = _read_csv(text, kind, opts)
    elif kind == "html":
        records = _fitted(_html_document(text, Path(path).stem), opts, info)
    else:
        records = _fitted(_sections(_markdown_blocks(text), Path(path).stem), opts, info)
    lo, hi, m = share
    yield from ((u, idx, rec) for u, (idx, rec) in enumerate(records) if lo <= u % m < hi)


def _decode(data: bytes, encoding: str) -> str:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise Reject("encoding", f"line {line}: not valid {encoding} (byte 0x{data[e.start]:02x} at offset {e.start}); "
                     "set `encoding:` for this file in curate.sources (spreadsheets often use cp1252)") from None
    return text.removeprefix("\ufeff")


def _read_jsonl(data: bytes, encoding: str, share: Share = WHOLE) -> Iterator[tuple[int, str, Any]]:
    # Decode line by line: one badly encoded line is quarantined, the rest of the file still counts.
    lo, hi, m = share
    unit = -1
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        unit += 1
        if not lo <= unit % m < hi:
            continue
        try:
            text = line.decode(encoding).removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            yield unit, str(n), Reject("encoding", f"line {n}: not valid {encoding} (byte 0x{line[e.start]:02x} at column "
                                       f"{e.start + 1})", raw=line.decode(encoding, errors="backslashreplace").rstrip("\r"))
            continue
        try:
            yield unit, str(n), json.loads(text)
        except json.JSONDecodeError as e:
            yield unit, str(n), Reject("invalid_json", f"line {n}: not valid JSON ({e.msg} at column {e.colno})",
                                       raw=text.rstrip("\r"))


def _read_json(text: str, share: Share = WHOLE) -> Iterator[tuple[int, str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json: read it as such
            yield from _read_jsonl(text.encode(), "utf-8", share)
            return
        raise Reject("invalid_json", f"line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    records = data if isinstance(data, list) else [data]
    lo, hi, m = share
    yield from ((i, str(i), r) for i, r in enumerate(records) if lo <= i % m < hi)


def _expand(items: Iterator[tuple[int, str, Any]], opts: Options) -> Iterator[tuple[int, str, Any]]:
    """Alpaca records with nested `instances` become one record per instance (index `<outer>.<inner>`)."""
    for unit, idx, rec in items:
        if opts.format in ("auto", "alpaca") and isinstance(rec, dict) and "instances" in rec:
            inst = rec["instances"]
            if not isinstance(inst, list) or not inst:
                yield unit, idx, Reject("missing_field", "field 'instances': expected a non-empty list of {input, output}",
                                        raw=rec)
                continue
            outer = {k: v for k, v in rec.items() if k != "instances"}
            for j, one in enumerate(inst):
                yield unit, f"{idx}.{j}", ({**outer, **one} if isinstance(one, dict) else
                                           Reject("bad_type", f"instances[{j}]: expected an object, got {type(one).__name__}",
                                                  raw=one))
        else:
            yield unit, idx, rec


def _read_csv(text: str, kind: str, opts: Options) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(2**31 - 1)  # long answers in one cell are normal; the default stops at 128 KiB
    delim = opts.delimiter or ("\t" if kind == "tsv" else _sniff(text))
    # newline="" hands CR/LF inside quoted cells to the csv module intact (multi-line cells, CRLF files).
    # strict: an unterminated quote is an error, not a cell that silently swallows every row after it.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim, strict=True)
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise Reject("empty_file", "line 1: no header row (expected column names such as question,answer)")
    header = [h.strip() for h in header]
    columns = _map_columns(header, opts.columns)
    consumed = reader.line_num
    try:
        for row in reader:
            start, consumed = consumed + 1, reader.line_num
            if not any(c.strip() for c in row):
                continue
            rec = dict(zip(header, row, strict=False))
            if len(row) != len(header):
                yield str(start), Reject("bad_row", f"line {start}: {len(row)} fields, the header has {len(header)} "
                                         f"(delimiter {delim!r})", raw=row)
                continue
            yield str(start), Row(rec, columns)
    except csv.Error as e:  # e.g. an unterminated quote: the rows before it were read, the rest cannot be
        raise Reject("invalid_csv", f"line {reader.line_num}: {e}; rows from there on were not read") from None


def _sniff(text: str) -> str:
    try:
        return csv.Sniffer().sniff(text[:8192], delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def _map_columns(header: list[str], wanted: dict[str, str]) -> dict[str, str]:
    """field (question/answer/system) -> header name, from the spec's `columns` or by well-known names."""
    if wanted:
        unknown = set(wanted) - set(CSV_COLUMNS)
        if unknown:
            raise Reject("missing_columns", f"columns mapping has unknown field(s) {sorted(unknown)}; "
                         f"fields are {', '.join(CSV_COLUMNS)}")
        for fld, col in wanted.items():
            if col not in header:
                raise Reject("missing_columns", f"line 1 (header): column {col!r} (for {fld}) not found; "
                             f"the header has {header}")
        out = dict(wanted)
    else:
        lower = {h.lower(): h for h in header}
        out = {fld: next(lower[n] for n in names if n in lower)
               for fld, names in CSV_COLUMNS.items() if any(n in lower for n in names)}
    for fld in ("question", "answer"):
        if fld not in out:
            raise Reject("missing_columns", f"line 1 (header): no {fld} column among {header}; name it in "
                         f"curate.sources, e.g. columns: {{question: <header>, answer: <header>}}")
    return out


# Documents: a list of (line, heading level, heading text, body) blocks, then sections with their heading path.

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _markdown_blocks(text: str) -> list[tuple[int, int, str, list[str]]]:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = 0
    if lines and lines[0].strip() == "---":  # YAML front matter is metadata, not content
        end = next((i for i in range(1, len(lines)) if lines[i].strip() in ("---", "...")), None)
        start = end + 1 if end is not None else 0
    blocks: list[tuple[int, int, str, list[str]]] = [(start + 1, 0, "", [])]
    fenced = False
    i = start
    while i < len(lines):
        ln = lines[i]
        if _FENCE.match(ln):
            fenced = not fenced
        m = None if fenced else _ATX.match(ln)
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if m:
            blocks.append((i + 1, len(m.group(1)), m.group(2).strip(), []))
        elif (not fenced and ln.strip() and _SETEXT.match(nxt) and (i == start or not lines[i - 1].strip())
              and not _SETEXT.match(ln)):
            blocks.append((i + 1, 1 if nxt.strip().startswith("=") else 2, ln.strip(), []))
            i += 1
        else:
            blocks[-1][3].append(ln)
        i += 1
    return blocks


class _HTMLText(HTMLParser):
    """HTML -> text blocks per heading: block tags become line breaks, list items '- ', scripts dropped."""

    BLOCK = {"p", "div", "br", "li", "tr", "table", "ul", "ol", "section", "article", "blockquote", "pre", "hr",
             "dd", "dt", "header", "footer", "main", "nav", "aside", "figure", "form"}
    SKIP = {"script", "style", "head", "noscript", "template", "svg"}

    def __init__(self, headings: bool):
        super().__init__(convert_charrefs=True)
        self.headings = headings
        self.blocks: list[tuple[Any, int, str, list[str]]] = [(1, 0, "", [])]
        self.parts: list[str] = []
        self.skip = 0
        self.heading: tuple[int, int, list[str]] | None = None
        self.title: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag == "title":
            self.title = []
        elif self.headings and re.fullmatch(r"h[1-6]", tag):
            self._flush()
            line, col = self.getpos()
            self.heading = (f"{line}:{col + 1}", int(tag[1]), [])  # pages often sit on one line
        elif tag in self.BLOCK:
            self.parts.append("\n- " if tag == "li" else "\n\n" if tag in ("p", "pre", "blockquote", "table") else "\n")
        elif tag in ("td", "th"):
            self.parts.append(" | ")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "title" and self.title is not None:
            self.title_text = "".join(self.title).strip()
            self.title = None
        elif self.heading and re.fullmatch(r"h[1-6]", tag):
            line, level, words = self.heading
            self.blocks.append((line, level, " ".join("".join(words).split()), []))
            self.heading = None
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip:
            return
        if self.title is not None:
            self.title.append(data)
        elif self.heading is not None:
            self.heading[2].append(data)
        else:
            self.parts.append(data)

    def _flush(self):
        self.blocks[-1][3].append("".join(self.parts))
        self.parts = []

    def close(self):
        super().close()
        self._flush()


def html_to_text(fragment: str) -> str:
    p = _HTMLText(headings=False)
    p.feed(fragment)
    p.close()
    return "".join(p.blocks[0][3])


def _html_blocks(text: str) -> list[tuple[Any, int, str, list[str]]]:
    p = _HTMLText(headings=True)
    p.feed(text)
    p.close()
    blocks = p.blocks
    title = getattr(p, "title_text", "")
    if title and not blocks[0][2]:
        blocks[0] = (blocks[0][0], 0, title, blocks[0][3])
    return blocks


def _html_document(text: str, stem: str) -> Iterator[tuple[str, Any]]:
    """A page's main content (loraflow/documents.py) by heading; each section indexed by where its heading
    stands in the page as read (the main content is a cleaned copy, its own positions mean nothing)."""
    from loraflow.documents import main_content

    where: dict[str, list[Any]] = {}
    for line, _, heading, _ in _html_blocks(text)[1:]:
        where.setdefault(heading, []).append(line)
    body, _ = main_content(text)
    blocks = _html_blocks(body)
    for i, (_, level, heading, lines) in enumerate(blocks):
        spots = where.get(heading) if level else None
        # A heading the page does not have is its title, put over an article that had none.
        blocks[i] = (spots.pop(0) if spots else "1:1" if level else 1, level, heading, lines)
    return _sections(blocks, stem)


def _fitted(records: Iterator[tuple[str, Any]] | list[tuple[str, Any]], opts: Options,
            info: dict | None = None) -> Iterator[tuple[str, Any]]:
    """Sections longer than opts.max_tokens cut into pieces that fit (index `<index>~<piece>`)."""
    info = {} if info is None else info
    info.setdefault("sections_cut", 0)
    info.setdefault("pieces", 0)
    if opts.max_tokens is None:
        yield from records
        return
    from loraflow.documents import section_fits, split_section

    def question(sec: Section) -> str:
        return opts.question_template.format(heading=sec.heading, path=sec.path, title=sec.title)

    fits = section_fits(question, opts.max_tokens, opts.tokenizer)
    for idx, rec in records:
        pieces = split_section(rec, fits) if isinstance(rec, Section) else [rec]
        if len(pieces) == 1:
            yield idx, pieces[0]
        else:
            info["sections_cut"] += 1
            info["pieces"] += len(pieces)
            yield from ((f"{idx}~{k}", piece) for k, piece in enumerate(pieces, 1))


def _sections(blocks: list[tuple[Any, int, str, list[str]]], stem: str) -> Iterator[tuple[str, Any]]:
    """A record per heading with text under it. Headings whose only content is sub-headings are structure."""
    title = next((h for _, lvl, h, _ in blocks if lvl == 1), "") or blocks[0][2] or stem.replace("_", " ").replace("-", " ")
    path: list[tuple[int, str]] = []
    for line, level, heading, body in blocks:
        if level:
            path = [(lv, h) for lv, h in path if lv < level] + [(level, heading)]
        text = "\n".join(body).strip()
        if not text:
            continue
        head = heading or title  # text before the first heading belongs to the document's title
        yield str(line), Section(head, " > ".join(h for _, h in path) or head, title, text)


# ---------------------------------------------------------------------------------------------- converting

# What OpenAI's legacy fine-tuning guide had people end texts with: a separator after every prompt
# ("\n\n###\n\n", " ->") and a stop sequence after every completion (" END", " [END]", "\n###"). Left in,
# the model learns to write them. Only these shapes count, so a shared final "." or word is never cut.
_MARKER = re.compile(r"\s*(#{2,}|={2,}|-{2,}>?|~{2,}|\*{3,}|->|=>|\[\s*[A-Z][A-Z_ ]*\]|<\|?[A-Za-z_]+\|?>|END|STOP)\s*\Z")


def _common_marker(texts: list[str]) -> str:
    """The format marker (with the whitespace around it) every text ends with, or ""."""
    if len(texts) < 2:
        return ""
    common = os.path.commonprefix([t[::-1] for t in texts])[::-1]
    m = _MARKER.search(common)
    return common[m.start():] if m and len(common) - m.start() < len(min(texts, key=len)) else ""


def file_markers(path: Path, opts: Options) -> tuple[str, str]:
    """(prompt separator, completion stop sequence) shared by every prompt/completion record of a JSON Lines
    file, ("", "") when there are none. Files of other formats cost one line's read: the first record
    decides whether the file is looked at at all."""
    if opts.format not in ("auto", "prompt_completion"):
        return "", ""
    try:
        if container(path, opts.format) != "jsonl":
            return "", ""
        prompts, completions = [], []
        for _, _, rec in read_units(path, opts):
            kind = (detect(rec) if opts.format == "auto" else opts.format) if isinstance(rec, dict) else ""
            if kind != "prompt_completion":
                if not prompts:
                    return "", ""  # not a prompt/completion file (its first record decides)
                continue
            p, c = rec.get("prompt"), rec.get("completion")
            if isinstance(p, str) and isinstance(c, str):
                prompts.append(p)
                completions.append(c)
    except (Reject, OSError):
        return "", ""  # reading reports it
    return _common_marker(prompts), _common_marker(completions)


def detect(rec: dict) -> str:
    """The record format a JSON object is in, decided by its keys (first rule that applies)."""
    if "event_id" in rec and "messages" in rec:  # an event `loraflow serve` appended (loraflow/feedback.py)
        return "feedback"
    if "messages" in rec:
        return "openai"
    if "chosen" in rec and "rejected" in rec:
        return "preference"
    if "rating" in rec:
        return "feedback"
    if "conversations" in rec:
        return "sharegpt"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    raise Reject("unknown_format", f"unknown record format (keys: {sorted(rec)[:8]}); expected OpenAI 'messages', "
                 "prompt/completion, Alpaca 'instruction'/'output', ShareGPT 'conversations', preference "
                 "'chosen'/'rejected' or feedback 'rating'")


def convert(rec: Any, opts: Options) -> Converted:
    """One raw record -> SFT conversations and/or preference pairs (texts not yet normalised), or Reject."""
    if isinstance(rec, Row):
        return _from_csv(rec, opts)
    if isinstance(rec, Section):
        return _from_section(rec, opts)
    if not isinstance(rec, dict):
        raise Reject("bad_type", f"expected a JSON object, got {type(rec).__name__}")
    fmt = detect(rec) if opts.format == "auto" else opts.format
    out = CONVERTERS[fmt](rec, opts)
    out.format = fmt
    return out


def _text(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise Reject("bad_type" if v is not None else "missing_field",
                     f"{where}: expected a string, got {'nothing' if v is None else type(v).__name__}")
    return v


def _openai(rec: dict, opts: Options) -> Converted:
    msgs = rec["messages"] if "messages" in rec else None
    if not isinstance(msgs, list) or not msgs:
        raise Reject("missing_field", "field 'messages': expected a non-empty list of {role, content}")
    tools = rec.get("tools") or rec.get("functions")
    return Converted([_openai_messages(msgs, tools, "messages", opts)])


def _openai_messages(msgs: list, tools: Any, where: str, opts: Options) -> Messages:
    uses_tools = bool(tools) or any(isinstance(m, dict) and (m.get("tool_calls") or m.get("function_call")
                                                             or m.get("role") in ("tool", "function")) for m in msgs)
    if uses_tools and opts.tools == "quarantine":
        raise Reject("tools", "record declares or calls tools (curate.tools: quarantine)")
    out: list[dict[str, str]] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise Reject("missing_field", f"{where}[{i}]: expected an object with 'role' and 'content'")
        role, content = m["role"], m.get("content")
        if isinstance(content, list):  # content parts: text only
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise Reject("unsupported", f"{where}[{i}].content: only text parts are supported "
                             f"(got {[p.get('type') if isinstance(p, dict) else type(p).__name__ for p in content]})")
            content = "".join(str(p.get("text", "")) for p in content)
        calls = m.get("tool_calls") or ([{"function": m["function_call"]}] if m.get("function_call") else [])
        if role == "assistant" and calls:
            parts = [content] if isinstance(content, str) and content.strip() else []
            parts += [_tool_call_text(c.get("function", c) if isinstance(c, dict) else c) for c in calls]
            out.append({"role": "assistant", "content": "\n".join(parts)})
            continue
        if "content" not in m:
            raise Reject("missing_field", f"{where}[{i}]: expected an object with 'role' and 'content'")
        if not isinstance(content, str):
            raise Reject("bad_type", f"{where}[{i}].content: expected a string, got {type(content).__name__}")
        if role in ("tool", "function"):
            _tool_result(out, content)
        else:
            out.append({"role": role, "content": content})
    return _with_tools(out, tools)


def _tool_call_text(call: Any) -> str:
    if isinstance(call, dict):
        args = call.get("arguments")
        if isinstance(args, str):  # OpenAI sends arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        call = json.dumps({"name": call.get("name"), "arguments": args}, ensure_ascii=False)
    return f"<tool_call>\n{call}\n</tool_call>"


def _tool_result(out: Messages, content: str) -> None:
    block = f"<tool_response>\n{content}\n</tool_response>"
    if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
        out[-1]["content"] += "\n" + block  # parallel calls: their results form one user turn
    else:
        out.append({"role": "user", "content": block})


def _with_tools(msgs: Messages, tools: Any) -> Messages:
    if not tools:
        return msgs
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            pass
    text = TOOLS_PROMPT.format(tools=tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False))
    if msgs and msgs[0]["role"] == "system":
        return [{"role": "system", "content": f"{msgs[0]['content']}\n\n{text}"}, *msgs[1:]]
    return [{"role": "system", "content": text}, *msgs]


def _sharegpt_messages(turns: Any, where: str, opts: Options) -> Messages:
    if not isinstance(turns, list) or not turns:
        raise Reject("missing_field", f"field {where!r}: expected a non-empty list of {{from, value}}")
    out: Messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise Reject("bad_type", f"{where}[{i}]: expected an object with 'from' and 'value'")
        who = t.get("from", t.get("role"))
        value = t.get("value", t.get("content"))
        role = SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
        if role is None:
            raise Reject("unknown_role", f"{where}[{i}].from: {who!r} is not one of {', '.join(SHAREGPT_ROLES)}")
        value = _text(value, f"{where}[{i}].value")
        if role in ("tool_call", "tool") and opts.tools == "quarantine":
            raise Reject("tools", "record declares or calls tools (curate.tools: quarantine)")
        if role == "tool_call":
            out.append({"role": "assistant", "content": f"<tool_call>\n{value}\n</tool_call>"})
        elif role == "tool":
            _tool_result(out, value)
        else:
            out.append({"role": role, "content": value})
    return out


def _sharegpt(rec: dict, opts: Options) -> Converted:
    msgs = _sharegpt_messages(rec.get("conversations"), "conversations", opts)
    if rec.get("tools") and opts.tools == "quarantine":
        raise Reject("tools", "record declares or calls tools (curate.tools: quarantine)")
    if isinstance(rec.get("system"), str) and rec["system"].strip():
        msgs = [{"role": "system", "content": rec["system"]}, *msgs]
    return Converted([_with_tools(msgs, rec.get("tools"))])


def _alpaca(rec: dict, opts: Options) -> Converted:
    prompt = _text(rec.get("instruction"), "Alpaca field 'instruction'").strip()
    extra = rec.get("input")
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra.strip()}" if prompt else extra.strip()
    msgs: Messages = []
    if isinstance(rec.get("system"), str) and rec["system"].strip():
        msgs.append({"role": "system", "content": rec["system"]})
    history = rec.get("history") or []  # LLaMA-Factory: [[question, answer], ...] before this turn
    if not isinstance(history, list) or any(not isinstance(h, list) or len(h) != 2 for h in history):
        raise Reject("bad_type", "Alpaca field 'history': expected a list of [question, answer] pairs")
    for j, (q, a) in enumerate(history):
        msgs += [{"role": "user", "content": _text(q, f"history[{j}][0]")},
                 {"role": "assistant", "content": _text(a, f"history[{j}][1]")}]
    msgs += [{"role": "user", "content": prompt},
             {"role": "assistant", "content": _text(rec.get("output"), "Alpaca field 'output'")}]
    return Converted([msgs])


def _as_messages(v: Any, where: str, opts: Options, default_role: str) -> Messages:
    """A string (one turn of `default_role`), a {role|from, ...} object, or a list of them."""
    if isinstance(v, str):
        return [{"role": default_role, "content": v}]
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, list) and v and all(isinstance(m, dict) for m in v):
        if "from" in v[0]:
            return _sharegpt_messages(v, where, opts)
        return _openai_messages(v, None, where, opts)
    raise Reject("bad_type", f"field {where!r}: expected a string or a list of messages, got "
                 f"{'an empty list' if v == [] else type(v).__name__}")


def _cut(v: Any, suffix: str) -> Any:
    return v[:-len(suffix)] if suffix and isinstance(v, str) and v.endswith(suffix) else v


def _prompt_completion(rec: dict, opts: Options) -> Converted:
    prompt = _as_messages(_cut(rec.get("prompt"), opts.prompt_separator), "prompt", opts, "user")
    completion = _as_messages(_cut(rec.get("completion"), opts.completion_stop), "completion", opts, "assistant")
    return Converted([prompt + completion])


_HH = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def _transcript(v: Any, where: str, opts: Options) -> Messages:
    """A whole conversation: a list of messages, or an Anthropic-HH string ("\\n\\nHuman: ...\\n\\nAssistant: ...")."""
    if isinstance(v, str):
        parts = _HH.split(v)
        if len(parts) < 3:
            raise Reject("missing_field", f"field {where!r}: a transcript needs 'Human:'/'Assistant:' turns, or "
                         "give a separate 'prompt'")
        return [{"role": "user" if who == "Human" else "assistant", "content": text}
                for who, text in zip(parts[1::2], parts[2::2], strict=True)]
    return _as_messages(v, where, opts, "assistant")


def _preference(rec: dict, opts: Options) -> Converted:
    if "prompt" in rec or "conversations" in rec or "question" in rec:
        if "conversations" in rec:
            prompt = _sharegpt_messages(rec["conversations"], "conversations", opts)
        else:
            key = "prompt" if "prompt" in rec else "question"
            prompt = _as_messages(rec[key], key, opts, "user")
        chosen = _as_messages(rec["chosen"], "chosen", opts, "assistant")
        rejected = _as_messages(rec["rejected"], "rejected", opts, "assistant")
        # trl's "implicit prompt" style repeats the prompt inside chosen/rejected: drop the repeat.
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
            chosen, rejected = chosen[n:], rejected[n:]
    else:
        chosen = _transcript(rec["chosen"], "chosen", opts)
        rejected = _transcript(rec["rejected"], "rejected", opts)
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise Reject("no_shared_prefix", "chosen and rejected share no prompt: give a 'prompt' field, or "
                         "transcripts that start with the same turns")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if isinstance(rec.get("system"), str) and rec["system"].strip() and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": rec["system"]}, *prompt]
    return Converted(prefs=[Pref(prompt, chosen, rejected)])


def _rating(v: Any) -> float:
    if isinstance(v, bool):
        raise Reject("bad_rating", f"field 'rating': expected a number from 1 to 5, got {v!r}")
    try:
        r = float(v)
    except (TypeError, ValueError):
        raise Reject("bad_rating", f"field 'rating': expected a number from 1 to 5, got {v!r}") from None
    if not 1 <= r <= 5:
        raise Reject("bad_rating", f"field 'rating': expected a number from 1 to 5, got {v!r}")
    return r


def _first(rec: dict, keys: tuple[str, ...], what: str) -> tuple[str, Any]:
    for k in keys:
        if k in rec:
            return k, rec[k]
    raise Reject("missing_field", f"feedback record: no {what} field (one of {', '.join(keys)})")


def _feedback(rec: dict, opts: Options) -> Converted:
    """High ratings become SFT records; a correction becomes an SFT record and a pair (correction > answer)."""
    if "event_id" in rec:
        return _serve_event(rec, opts)
    pk, p = _first(rec, ("prompt", "question", "messages", "input"), "prompt")
    ak, a = _first(rec, ("answer", "response", "completion", "output"), "answer")
    prompt = _as_messages(p, pk, opts, "user")
    answer = _as_messages(a, ak, opts, "assistant")
    rating = _rating(rec.get("rating"))
    correction = rec.get("correction")
    if correction is not None and not isinstance(correction, str | list | dict):
        raise Reject("bad_type", f"field 'correction': expected a string or messages, got {type(correction).__name__}")
    fixed = _as_messages(correction, "correction", opts, "assistant") if correction else None
    if fixed and any(m["content"].strip() for m in fixed) and fixed != answer:
        return Converted([prompt + fixed], [Pref(prompt, fixed, answer)])
    if rating >= opts.feedback_min_rating:
        return Converted([prompt + answer])
    raise Reject("low_rating", f"rating {rec.get('rating')!r} is below curate.feedback_min_rating="
                 f"{opts.feedback_min_rating} and there is no correction: nothing to learn from it")


def _serve_event(rec: dict, opts: Options) -> Converted:
    """Feedback as `loraflow serve` records it; loraflow/feedback.py owns that format and its rules."""
    from loraflow.feedback import Untrainable, sft_and_pref

    try:
        sft, pair = sft_and_pref(rec, opts.feedback_min_rating)
    except Untrainable as e:
        raise Reject(e.kind, str(e)) from None
    except ValueError as e:
        raise Reject("malformed", str(e)) from None
    return Converted([sft] if sft else [], [Pref(pair["prompt"], pair["chosen"], pair["rejected"])] if pair else [])


def _from_csv(row: Row, opts: Options) -> Converted:
    cells, cols = row.cells, row.columns
    msgs: Messages = []
    if "system" in cols and cells[cols["system"]].strip():
        msgs.append({"role": "system", "content": cells[cols["system"]]})
    msgs += [{"role": "user", "content": cells[cols["question"]]}, {"role": "assistant", "content": cells[cols["answer"]]}]
    # Spreadsheet cells exported from web tools often hold HTML: converted unless the source says no.
    return Converted([msgs], format="csv", html=opts.html_to_text is not False)


def _from_section(sec: Section, opts: Options) -> Converted:
    question = opts.question_template.format(heading=sec.heading, path=sec.path, title=sec.title)
    # HTML pages are already text here (their parser); markdown keeps its markup unless asked.
    return Converted([[{"role": "user", "content": question}, {"role": "assistant", "content": sec.text}]],
                     format="document", html=bool(opts.html_to_text))


CONVERTERS = {"openai": _openai, "prompt_completion": _prompt_completion, "alpaca": _alpaca,
              "sharegpt": _sharegpt, "preference": _preference, "feedback": _feedback}


def as_read(rec: Any) -> Any:
    """The raw record as read, in JSON (for quarantine)."""
    if isinstance(rec, Row):
        return rec.cells
    if isinstance(rec, Section):
        return {"heading": rec.heading, "path": rec.path, "text": rec.text}
    return rec

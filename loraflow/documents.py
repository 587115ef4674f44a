"""Documents teams keep (PDF, Word, web pages) read into heading sections, their structure kept.

Each reader returns `(index, Section | Reject)` pairs in document order; loraflow/formats.py turns sections
into records like Markdown's. Libraries, each made for its format:

- PDF: pdfminer.six. Its layout analysis groups characters into text boxes and orders the boxes for reading
  (a two-column page comes out column by column, not line by line), it keeps each character's font name and
  size (headings from the layout), reads the outline (bookmarks) and opens encrypted files given a password.
  No OCR: a page without a text layer (a scan) is quarantined as such; run OCRmyPDF on the file first.
- DOCX: python-docx for the package, styles and body order; the few things it does not model (outline
  levels, merged cells, list numbering, footnotes) are read from the same XML it parsed.
- HTML: readability-lxml (the Arc90 readability algorithm, which Firefox's Reader View descends from) keeps
  the article and drops navigation, menus, scripts and "related" blocks; headings survive.

Indexes (the `#...` of a record's source): PDF `p<page>` (1-based; `p<page>.<k>` for the k-th section
starting on that page), DOCX `¶<paragraph>` (1-based, body paragraphs and tables counted in order), HTML the
`<line>:<column>` of the section's heading in the page as read. A piece of a long section adds `~<n>`.
"""

from __future__ import annotations

import functools
import io
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from loraflow.formats import Reject, Section

# ------------------------------------------------------------------------------------------------- PDF

# Headings that legal and regulatory texts number (Portuguese and English), with their rank: a TÍTULO holds
# CAPÍTULOs, a CAPÍTULO SEÇÕEs, and so on down to the article.
_ROMAN = r"(?:[IVXLCDM]+|\d+|[ÚU]NIC[OA]|UNIQUE)"
_LEGAL = [(re.compile(rf"^(?:LIVRO|PARTE|BOOK|PART)\s+{_ROMAN}\b"), 1),
          (re.compile(rf"^(?:T[ÍI]TULO|TITLE)\s+{_ROMAN}\b"), 2),
          (re.compile(rf"^(?:CAP[ÍI]TULO|CHAPTER)\s+{_ROMAN}\b"), 3),
          (re.compile(rf"^(?:SE[ÇC][ÃA]O|SECTION)\s+{_ROMAN}\b"), 4),
          (re.compile(rf"^SUB-?SE[ÇC][ÃA]O\s+{_ROMAN}\b"), 5)]
_ARTICLE = re.compile(r"^(Art(?:igo)?\.?\s*\d+(?:\s*[º°o](?![a-z]))?(?:-[A-Z])?)\s*[.:–—-]?\s*")
ARTICLE_LEVEL = 6
_ARTICLE_TEXT = re.compile(r"^(?:$|[\"“«(]?[A-ZÀ-Ý])")  # an article's text starts with a capital ("Art. 5º Compete")
_PAGE_NUMBER = re.compile(r"^[-–—\s]*(?:(?:page|p[áa]gina|p[áa]g\.?|p\.)\s*)?\d+(?:\s*(?:of|de|/)\s*\d+)?[-–—\s]*$", re.I)
_SENTENCE_END = re.compile(r"[.!?:;…][\"'”»)]*$")
_PARAGRAPH_START = re.compile(r"^(?:[A-ZÀ-Ý0-9§\"“«(•▪●-]|[a-z]\)|[IVXLCDM]+\s*[–—-])")
# Running headers/footers sit in these top/bottom shares of the page, and repeat on this share of pages.
MARGIN = 0.12
RUNNING_SHARE = 0.4


@dataclass
class Line:
    page: int  # 1-based
    text: str
    x0: float
    y0: float
    y1: float
    size: float  # the line's most common font size
    bold: bool
    gap_before: float = 0.0  # vertical distance from the line above it in the same flow (0 at a page's top)


def read_pdf(data: bytes, name: str, password: str | None = None, info: dict | None = None) -> list[tuple[str, Any]]:
    """Sections of a PDF (outline first, else headings its layout shows), or per-page Rejects; Reject for the
    whole file when it cannot be opened or has no text layer at all. `info` gets what was read: pages, the
    pages without text, where the sections came from (outline or layout) and how many."""
    info = {} if info is None else info
    from pdfminer.pdfdocument import PDFDocument, PDFEncryptionError, PDFPasswordIncorrect
    from pdfminer.pdfparser import PDFParser, PDFSyntaxError
    from pdfminer.psexceptions import PSException

    try:
        doc = PDFDocument(PDFParser(io.BytesIO(data)), password=password or "")
    except PDFPasswordIncorrect:
        if password:
            raise Reject("encrypted", "encrypted PDF: the password given in curate.sources does not open it") from None
        raise Reject("encrypted", "encrypted PDF: give its password as `password:` for this file in curate.sources") from None
    except PDFEncryptionError as e:
        raise Reject("encrypted", f"encrypted PDF with an unsupported scheme ({e})") from None
    except (PDFSyntaxError, PSException, ValueError, KeyError, TypeError) as e:
        raise Reject("corrupt_file", f"not a readable PDF ({type(e).__name__}: {e})") from None
    try:
        pages, page_ids, heights = _pdf_lines(doc)
    except Exception as e:  # noqa: BLE001  (a damaged stream fails deep inside pdfminer, in many ways: one file lost, not the run)
        raise Reject("corrupt_file", f"PDF content cannot be parsed ({type(e).__name__}: {e})") from None
    info.update(pages=len(pages), pages_without_text=[n for n, lines in enumerate(pages, 1) if not lines])
    if not any(pages):
        raise Reject("no_text_layer", f"no text layer on any of its {len(pages)} page(s): a scan or images only; "
                     "curation does no OCR (run e.g. OCRmyPDF on it first)")
    _drop_running_lines(pages)
    out: list[tuple[str, Any]] = [(f"p{n}", Reject("no_text_layer", f"page {n}: no text layer (a scanned image?); "
                                                   "not read, curation does no OCR", raw={"page": n}))
                                  for n, lines in enumerate(pages, 1) if not lines]
    outline = _outline(doc, page_ids)
    flow = [ln for lines in pages for ln in lines]
    title = _pdf_title(doc) or name
    blocks = _outline_blocks(flow, outline, heights) if outline else _layout_blocks(flow)
    sections = _pdf_sections(blocks, title)
    info.update(structure="outline" if outline else "layout", sections=len(sections))
    out += sections
    return sorted(out, key=lambda item: _page_key(item[0]))


def _page_key(idx: str) -> tuple[int, int]:
    page, _, k = idx[1:].partition(".")
    return int(page), int(k or 1)


def _pdf_lines(doc: Any) -> tuple[list[list[Line]], dict[int, int], dict[int, float]]:
    """Each page's text lines in reading order, page object id -> page number, page number -> height."""
    from pdfminer.converter import PDFPageAggregator
    from pdfminer.layout import LAParams, LTChar, LTTextContainer, LTTextLine
    from pdfminer.pdfinterp import PDFPageInterpreter, PDFResourceManager
    from pdfminer.pdfpage import PDFPage

    manager = PDFResourceManager()
    device = PDFPageAggregator(manager, laparams=LAParams())
    interpreter = PDFPageInterpreter(manager, device)
    pages: list[list[Line]] = []
    page_ids: dict[int, int] = {}
    heights: dict[int, float] = {}
    for n, page in enumerate(PDFPage.create_pages(doc), 1):
        page_ids[page.pageid] = n
        interpreter.process_page(page)
        layout = device.get_result()
        heights[n] = layout.height
        lines: list[Line] = []
        for box in layout:
            if not isinstance(box, LTTextContainer):
                continue
            for line in box:
                if not isinstance(line, LTTextLine):
                    continue
                text = " ".join(line.get_text().split())
                if not text:
                    continue
                chars = [c for c in line if isinstance(c, LTChar) and not c.get_text().isspace()]
                sizes = Counter(round(c.size, 1) for c in chars)
                bold = sum("bold" in c.fontname.lower() or "black" in c.fontname.lower() for c in chars)
                gap = lines[-1].y0 - line.y1 if lines else 0.0
                lines.append(Line(n, unicodedata.normalize("NFC", text), line.x0, line.y0 / layout.height,
                                  line.y1 / layout.height, sizes.most_common(1)[0][0] if sizes else 0.0,
                                  bool(chars) and bold > len(chars) / 2, gap / layout.height))
        pages.append(lines)
    return pages, page_ids, heights


def _running_key(text: str) -> str:
    return re.sub(r"\d+", "#", text.casefold())


def _drop_running_lines(pages: list[list[Line]]) -> None:
    """Remove page numbers and the headers/footers that repeat in the page margins (digits ignored)."""
    def in_margin(ln: Line) -> bool:
        return ln.y0 >= 1 - MARGIN or ln.y1 <= MARGIN

    seen: Counter = Counter()
    for lines in pages:
        seen.update({_running_key(ln.text) for ln in lines if in_margin(ln)})
    texted = sum(1 for lines in pages if lines)
    running = {k for k, n in seen.items() if n >= max(3, RUNNING_SHARE * texted)}
    for lines in pages:
        lines[:] = [ln for ln in lines if not (in_margin(ln) and (_PAGE_NUMBER.match(ln.text)
                                                                 or _running_key(ln.text) in running))]


def _pdf_title(doc: Any) -> str:
    for info in doc.info:
        title = info.get("Title")
        if title is not None:
            from pdfminer.pdftypes import resolve1
            from pdfminer.utils import decode_text

            title = resolve1(title)
            text = decode_text(title) if isinstance(title, bytes) else str(title)
            if text.strip():
                return unicodedata.normalize("NFC", text.strip())
    return ""


def _outline(doc: Any, page_ids: dict[int, int]) -> list[tuple[int, str, int, float | None]]:
    """(level, title, page, top in PDF points or None) per bookmark that points to a page of the file."""
    from pdfminer.pdfdocument import PDFNoOutlines
    from pdfminer.pdftypes import PDFObjRef, resolve1
    from pdfminer.psparser import PSLiteral

    try:
        entries = list(doc.get_outlines())
    except (PDFNoOutlines, KeyError, TypeError, ValueError):
        return []
    out = []
    for level, title, dest, action, _ in entries:
        try:
            if dest is None and action is not None:
                dest = resolve1(action).get("D")
            dest = resolve1(dest)
            if isinstance(dest, PSLiteral):
                dest = dest.name
            if isinstance(dest, bytes | str):
                dest = resolve1(doc.get_dest(dest))
            if isinstance(dest, dict):
                dest = resolve1(dest.get("D"))
            page_ref = dest[0] if isinstance(dest, list) and dest else None
            page = page_ids.get(page_ref.objid) if isinstance(page_ref, PDFObjRef) else None
        except (KeyError, TypeError, ValueError, AttributeError):
            page = None
        if page is None:
            continue
        # Where on the page it points: [page /XYZ left top zoom] or [page /FitH top]; other fits name the page only.
        fit = getattr(resolve1(dest[1]), "name", "") if len(dest) > 1 else ""
        at = {"XYZ": 3, "FitH": 2, "FitBH": 2}.get(fit)
        top = resolve1(dest[at]) if at is not None and len(dest) > at else None
        top = float(top) if isinstance(top, int | float) else None
        text = title if isinstance(title, str) else (title or b"").decode("latin-1")
        out.append((level, unicodedata.normalize("NFC", " ".join(text.split())), page, top))
    return out


Block = tuple[str, int, str, list[str]]  # (index, level, heading, paragraphs)


def _outline_blocks(flow: list[Line], outline: list[tuple[int, str, int, float | None]],
                    heights: dict[int, float]) -> list[Block]:
    """One block per bookmark: the lines from its destination to the next bookmark's."""
    blocks: list[Block] = [(f"p{flow[0].page}" if flow else "p1", 0, "", [])]
    lines_of: list[list[Line]] = [[]]
    b = 0
    marks = sorted(range(len(outline)), key=lambda i: (outline[i][2], -(outline[i][3] or 1e9), i))
    for ln in flow:
        while b < len(marks) and _reached(ln, outline[marks[b]], heights):
            level, title, page, _ = outline[marks[b]]
            blocks.append((f"p{page}", level, title, []))
            lines_of.append([])
            b += 1
        lines_of[-1].append(ln)
    while b < len(marks):  # bookmarks past the last text line: sections with no text, counted as structure
        level, title, page, _ = outline[marks[b]]
        blocks.append((f"p{page}", level, title, []))
        lines_of.append([])
        b += 1
    for (_, _, title, paras), lines in zip(blocks, lines_of, strict=True):
        if lines and title and _same_heading(lines[0].text, title):
            lines = lines[1:]  # the printed heading repeats the bookmark
        paras.extend(_paragraphs(lines))
    return blocks


def _reached(ln: Line, mark: tuple[int, str, int, float | None], heights: dict[int, float]) -> bool:
    """Whether a line lies at or after a bookmark's destination (its page, and its top where it gives one)."""
    _, title, page, top = mark
    if ln.page != page:
        return ln.page > page
    if _same_heading(ln.text, title) or top is None:
        return True
    return ln.y1 * heights[ln.page] <= top + 2  # a point or two of slack for the heading's ascenders


def _same_heading(text: str, title: str) -> bool:
    a, b = _fold(text), _fold(title)
    return bool(b) and (a == b or (a.endswith(b) and len(a) - len(b) <= 8))


def _fold(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def _layout_blocks(flow: list[Line]) -> list[Block]:
    """Blocks from headings the text shows: legal numbering (TÍTULO, CAPÍTULO, Art. 5º) where the document
    uses it, else lines set larger (or bold) than the body text."""
    if not flow:
        return []
    body = Counter()
    for ln in flow:
        body[ln.size] += len(ln.text)
    body_size = body.most_common(1)[0][0]
    body_bold = sum(len(ln.text) for ln in flow if ln.bold) > sum(body.values()) / 2
    legal = any(_legal_level(ln.text) for ln in flow)
    sizes = sorted({ln.size for ln in flow if ln.size >= 1.15 * body_size and len(ln.text) < 150}, reverse=True)
    blocks: list[Block] = [(f"p{flow[0].page}", 0, "", [])]
    lines: list[list[Line]] = [[]]
    i = 0
    while i < len(flow):
        ln = flow[i]
        level = _legal_level(ln.text) if legal else 0
        if not legal and len(ln.text) < 150 and not _SENTENCE_END.search(ln.text.rstrip(":")):
            if ln.size in sizes:
                level = sizes.index(ln.size) + 1
            elif ln.bold and not body_bold and abs(ln.size - body_size) < 0.5 and len(ln.text) < 80:
                level = len(sizes) + 1
        article = legal and level == ARTICLE_LEVEL
        if article and not _ARTICLE_TEXT.match(ln.text[_ARTICLE.match(ln.text).end():]):
            level = 0  # "... nos termos do\nArt. 5º do Estatuto": a citation wrapped to the line start
        if not level:
            lines[-1].append(ln)
            i += 1
            continue
        heading, rest = ln.text, ""
        if article:
            m = _ARTICLE.match(ln.text)
            heading, rest = m.group(1), ln.text[m.end():]
        elif legal and i + 1 < len(flow) and _caption(flow[i + 1].text):
            heading = f"{ln.text} – {flow[i + 1].text}"  # "TÍTULO II" over "DO GABINETE DO REITOR"
            i += 1
        blocks.append((f"p{ln.page}", level, heading, []))
        lines.append([])
        if rest:
            lines[-1].append(Line(ln.page, rest, ln.x0, ln.y0, ln.y1, ln.size, ln.bold, ln.gap_before))
        i += 1
    for (_, _, _, paras), block_lines in zip(blocks, lines, strict=True):
        paras.extend(_paragraphs(block_lines))
    return blocks


def _legal_level(text: str) -> int:
    if _ARTICLE.match(text):
        return ARTICLE_LEVEL
    if len(text) > 90:
        return 0
    return next((level for pattern, level in _LEGAL if pattern.match(text)), 0)


def _caption(text: str) -> bool:
    """A heading's name on the line under it: short, in capitals, not itself a heading or an article."""
    letters = [c for c in text if c.isalpha()]
    return (bool(letters) and len(text) < 120 and all(c.isupper() for c in letters)
            and not _legal_level(text))


def _paragraphs(lines: list[Line]) -> list[str]:
    """Lines joined into paragraphs: a new one after a sentence that ends its line and before a line that
    starts like a paragraph (capital, "§", "I –", "a)"), or after a gap wider than the usual line pitch."""
    gaps = sorted(ln.gap_before for ln in lines if ln.gap_before > 0)
    pitch = gaps[len(gaps) // 2] if gaps else 0.0
    paras: list[list[str]] = []
    prev: Line | None = None
    for ln in lines:
        new = (prev is None or (pitch and ln.gap_before > 1.4 * pitch)
               or (_SENTENCE_END.search(prev.text) and _PARAGRAPH_START.match(ln.text)))
        if new:
            paras.append([ln.text])
        else:
            last = paras[-1][-1]
            if last.endswith("-") and len(last) > 1 and last[-2].isalpha() and ln.text[:1].islower():
                paras[-1][-1] = last[:-1] + ln.text  # a word hyphenated across lines
            elif last.endswith("-"):
                paras[-1][-1] = last + ln.text
            else:
                paras[-1].append(ln.text)
        prev = ln
    return [" ".join(p) for p in paras]


def _pdf_sections(blocks: list[Block], title: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    per_page: Counter = Counter()
    for idx, path, heading, text in _with_paths(blocks, title):
        per_page[idx] += 1
        out.append((idx if per_page[idx] == 1 else f"{idx}.{per_page[idx]}", Section(heading, path, title, text)))
    return out


def _with_paths(blocks: list[Block], title: str) -> Iterator[tuple[str, str, str, str]]:
    """(index, heading path, heading, text) for each block with text; headings with only sub-headings under
    them are structure (as for Markdown)."""
    path: list[tuple[int, str]] = []
    for idx, level, heading, paras in blocks:
        if level:
            path = [(lv, h) for lv, h in path if lv < level] + [(level, heading)]
        text = "\n\n".join(p for p in paras if p.strip()).strip()
        if not text:
            continue
        head = heading or title
        yield idx, " > ".join(h for _, h in path) or head, head, text


# ------------------------------------------------------------------------------------------------ DOCX

_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_HEADING_STYLE = re.compile(r"^(?:heading|t[íi]tulo|überschrift|titre|titolo)\s*(\d)$", re.I)
_DOTTED = re.compile(r"^(\d+(?:\.\d+)+)\.?\s")


def read_docx(data: bytes, name: str, info: dict | None = None) -> list[tuple[str, Any]]:
    """Sections of a Word file by its headings (Heading styles, custom styles with an outline level, or
    paragraphs given one): tables as Markdown tables, lists kept, footnotes after the section that cites them.
    Page headers and footers are never read (they live outside the body). `info` gets the counts read."""
    import zipfile

    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as e:
        raise Reject("corrupt_file", f"not a readable DOCX ({type(e).__name__}: {e})") from None
    title = (document.core_properties.title or "").strip() or name
    try:
        blocks, counts = _docx_blocks(document)
    except Exception as e:  # noqa: BLE001  (malformed XML inside a valid package: one file lost, not the run)
        raise Reject("corrupt_file", f"DOCX content cannot be read ({type(e).__name__}: {e})") from None
    out = [(idx, Section(heading, path, title, unicodedata.normalize("NFC", text)))
           for idx, path, heading, text in _with_paths(blocks, title)]
    if info is not None:
        info.update(counts, headings=len(blocks) - 1, sections=len(out))
    return out


def _docx_blocks(document: Any) -> tuple[list[Block], dict[str, int]]:
    notes = _docx_notes(document)
    numbering = _Numbering(document)
    blocks: list[Block] = [("¶1", 0, "", [])]
    cited: list[list[str]] = [[]]
    n = 0
    for n, item in enumerate(document.iter_inner_content(), 1):
        if item.__class__.__name__ == "Table":
            blocks[-1][3].append(_table_markdown(item._tbl))
            cited[-1] += _note_refs(item._tbl)
            continue
        text = _run_text(item._p)
        if not text.strip():
            continue
        level = _docx_level(item)
        if level:
            blocks.append((f"¶{n}", level, " ".join(text.split()), []))
            cited.append([])
            continue
        blocks[-1][3].append(numbering.prefix(item._p) + text.strip())
        cited[-1] += _note_refs(item._p)
    for (_, _, _, paras), refs in zip(blocks, cited, strict=True):
        paras.extend(f"[^{r}]: {notes[r]}" for r in dict.fromkeys(refs) if notes.get(r))
    return blocks, {"paragraphs": n, "tables": len(document.tables), "footnotes": len(notes)}


def _docx_level(paragraph: Any) -> int:
    """1-based heading level: the paragraph's own outline level, else its style's (or a style it is based
    on), else a "Heading N"/"Título N" style name; 0 for body text. A dotted number ("3.1 ...") deepens an
    outline level that does not show it."""
    level = _outline_level(paragraph._p.pPr)
    style = paragraph.style
    while level is None and style is not None:
        level = _outline_level(style.element.pPr)
        if level is None:
            m = _HEADING_STYLE.match(style.name or "")
            level = int(m.group(1)) - 1 if m else None
        style = style.base_style
    if level is None or level >= 9:
        return 0
    m = _DOTTED.match(paragraph.text.strip())
    return max(level + 1, m.group(1).count(".") + 1) if m else level + 1


def _outline_level(ppr: Any) -> int | None:
    el = ppr.find(f"{_W}outlineLvl") if ppr is not None else None
    return int(el.get(f"{_W}val")) if el is not None else None


def _run_text(el: Any) -> str:
    """A paragraph's text as Word shows it: tabs and breaks kept, footnote marks as [^n], deleted text and
    field codes left out."""
    parts = []
    for node in el.iter(f"{_W}t", f"{_W}tab", f"{_W}br", f"{_W}cr", f"{_W}footnoteReference", f"{_W}endnoteReference"):
        tag = node.tag[len(_W):]
        if tag == "t":
            parts.append(node.text or "")
        elif tag == "tab":
            parts.append("\t")
        elif tag in ("br", "cr"):
            parts.append("\n")
        else:
            parts.append(f"[^{tag[0]}{node.get(f'{_W}id')}]")
    return "".join(parts)


def _note_refs(el: Any) -> list[str]:
    return [f"{n.tag[len(_W)]}{n.get(f'{_W}id')}" for n in el.iter(f"{_W}footnoteReference", f"{_W}endnoteReference")]


def _docx_notes(document: Any) -> dict[str, str]:
    """'f<id>'/'e<id>' -> the footnote's/endnote's text."""
    from lxml import etree

    notes = {}
    for rel in document.part.rels.values():
        kind = rel.reltype.rsplit("/", 1)[-1]
        if kind not in ("footnotes", "endnotes") or rel.is_external:
            continue
        root = etree.fromstring(rel.target_part.blob)
        for note in root.iter(f"{_W}footnote", f"{_W}endnote"):
            text = " ".join(" ".join(_run_text(p) for p in note.iter(f"{_W}p")).split())
            if text and note.get(f"{_W}type") is None:  # separators have a type
                notes[f"{kind[0]}{note.get(f'{_W}id')}"] = text
    return notes


def _table_markdown(tbl: Any) -> str:
    """A Word table as a Markdown table: a cell spanning columns fills the first, the rest stay empty; a
    cell merged down repeats in each row it covers, so every row reads on its own."""
    rows: list[list[str]] = []
    above: dict[int, str] = {}
    for tr in tbl.iter(f"{_W}tr"):
        if tr.getparent() is not tbl:
            continue  # a nested table's rows are read with the cell that holds it
        row: list[str] = []
        for tc in tr.findall(f"{_W}tc"):
            tcpr = tc.find(f"{_W}tcPr")
            span_el = tcpr.find(f"{_W}gridSpan") if tcpr is not None else None
            span = int(span_el.get(f"{_W}val")) if span_el is not None else 1
            vmerge = tcpr.find(f"{_W}vMerge") if tcpr is not None else None
            col = len(row)
            if vmerge is not None and vmerge.get(f"{_W}val") in (None, "continue"):
                text = above.get(col, "")
            else:
                text = " ".join(" ".join(_run_text(p) for p in tc.iter(f"{_W}p")).split())
            above[col] = text
            row += [text] + [""] * (span - 1)
        rows.append(row)
    if not rows:
        return ""
    width = max(len(r) for r in rows)
    cells = [[c.replace("|", "\\|") for c in r + [""] * (width - len(r))] for r in rows]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * width]
    lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines)


class _Numbering:
    """List prefixes from the numbering part: "- " for bullets, "1. " (counted per list and level) else."""

    def __init__(self, document: Any):
        self.formats: dict[tuple[str, int], str] = {}
        self.counts: Counter = Counter()
        try:
            root = document.part.numbering_part.element
        except (NotImplementedError, KeyError, AttributeError):
            return
        abstract = {}
        for a in root.findall(f"{_W}abstractNum"):
            abstract[a.get(f"{_W}abstractNumId")] = {
                int(lvl.get(f"{_W}ilvl")): (lvl.find(f"{_W}numFmt").get(f"{_W}val") if lvl.find(f"{_W}numFmt") is not None
                                            else "decimal") for lvl in a.findall(f"{_W}lvl")}
        for num in root.findall(f"{_W}num"):
            ref = num.find(f"{_W}abstractNumId")
            for ilvl, fmt in abstract.get(ref.get(f"{_W}val") if ref is not None else "", {}).items():
                self.formats[(num.get(f"{_W}numId"), ilvl)] = fmt

    def prefix(self, p: Any) -> str:
        ppr = p.pPr
        numpr = ppr.find(f"{_W}numPr") if ppr is not None else None
        if numpr is None:
            return ""
        num = numpr.find(f"{_W}numId")
        lvl = numpr.find(f"{_W}ilvl")
        num_id = num.get(f"{_W}val") if num is not None else "0"
        ilvl = int(lvl.get(f"{_W}val")) if lvl is not None else 0
        fmt = self.formats.get((num_id, ilvl))
        if num_id == "0" or fmt in (None, "none"):
            return ""
        indent = "  " * ilvl
        if fmt == "bullet":
            return f"{indent}- "
        for deeper in [k for k in self.counts if k[0] == num_id and k[1] > ilvl]:
            del self.counts[deeper]  # a sub-list restarts under each new item
        self.counts[(num_id, ilvl)] += 1
        return f"{indent}{self.counts[(num_id, ilvl)]}. "


# ------------------------------------------------------------------------------------------------ HTML

def main_content(html: str) -> tuple[str, str]:
    """(the article's HTML with its headings, the page's title), navigation and boilerplate left out."""
    from readability import Document

    doc = Document(html)
    title = doc.short_title().strip()
    body = doc.summary(html_partial=True)
    if title and "<h1" not in body.lower():
        body = f"<h1>{title}</h1>{body}"
    return body, title


# --------------------------------------------------------------------------------------- long sections

_SENTENCE = re.compile(r"(?<=[.!?…])[\"'”»)]*\s+(?=[\"“«(]?[A-ZÀ-Ý0-9§])")


def split_section(sec: Section, fits: Callable[[Section], bool]) -> list[Section]:
    """Pieces of a section that each fit, cut between paragraphs (a paragraph too long alone, between its
    sentences; a Markdown table too long alone, between its rows with the header repeated). A sentence
    longer than the limit stays whole: the length policy (curate.too_long) decides about it."""
    if fits(sec):
        return [sec]
    units: list[str] = []
    for para in sec.text.split("\n\n"):
        one = Section(sec.heading, sec.path, sec.title, para)
        if fits(one):
            units.append(para)
        elif _is_table(para):
            units += _table_rows(para, sec, fits)
        else:
            units += _pack(_SENTENCE.split(para), " ", sec, fits)
    return [Section(sec.heading, sec.path, sec.title, text) for text in _pack(units, "\n\n", sec, fits)]


def _pack(units: list[str], joiner: str, sec: Section, fits: Callable[[Section], bool]) -> list[str]:
    out: list[str] = []
    for u in units:
        if out and fits(Section(sec.heading, sec.path, sec.title, out[-1] + joiner + u)):
            out[-1] += joiner + u
        else:
            out.append(u)
    return out


def _is_table(para: str) -> bool:
    lines = para.split("\n")
    return len(lines) > 2 and all(ln.startswith("|") for ln in lines) and set(lines[1]) <= set("|-: ")


def _table_rows(table: str, sec: Section, fits: Callable[[Section], bool]) -> list[str]:
    lines = table.split("\n")
    header, rows = "\n".join(lines[:2]), lines[2:]
    out: list[str] = []
    for row in rows:
        if out and fits(Section(sec.heading, sec.path, sec.title, out[-1] + "\n" + row)):
            out[-1] += "\n" + row
        else:
            out.append(header + "\n" + row)
    return out


# What a chat template adds around the texts, in bytes, at most (SmolLM2's, with its default system prompt: ~130).
TEMPLATE_BYTES = 256


@functools.lru_cache(maxsize=2)
def _chat_tokens(model: str, cache: str, trust_remote_code: bool) -> Any:
    from loraflow.models import load_tokenizer, resolve
    from loraflow.tokens import ChatTokens

    return ChatTokens(load_tokenizer(resolve(model, cache), trust_remote_code))


def section_fits(question: Callable[[Section], str], limit: int,
                 tokenizer: tuple[str, str, bool] | None) -> Callable[[Section], bool]:
    """Whether a section's record fits `limit` tokens under the base model's chat template. Every token
    covers at least one byte, so a record whose texts are well within `limit` bytes is not counted."""
    def fits(sec: Section) -> bool:
        q = question(sec)
        if len(q.encode()) + len(sec.text.encode()) + TEMPLATE_BYTES <= limit:
            return True
        if tokenizer is None:
            return False  # nothing to count with: the byte bound alone decides
        n = _chat_tokens(*tokenizer).count([[{"role": "user", "content": q}, {"role": "assistant", "content": sec.text}]])[0]
        return n is not None and n <= limit

    return fits

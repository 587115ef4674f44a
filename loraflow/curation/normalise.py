"""Text normalisation of every turn read: NFC, mojibake, HTML to text (where asked), control characters,
whitespace; then PII scrubbing, each distinct text cleaned once."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from loraflow import pii
from loraflow.curation.records import SourceStats
from loraflow.formats import Converted, Messages, Pref, html_to_text

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


def clean(conv: Converted, kinds: list[str], st: SourceStats, memo: dict[bool, dict[str, tuple]]) -> None:
    """Normalise every turn of a converted record in place and scrub the PII `kinds`, counting into `st`.

    Texts repeat (a system prompt on every record, duplicates): each distinct one is cleaned once (`memo`:
    html? -> text -> cleaned, fixes, pii), and its fixes and PII counts are replayed wherever it occurs again.
    """
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

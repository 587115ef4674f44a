"""PII: the scrubber curation runs (typed placeholders), and a second detector the validation gate runs.

Kinds: email, cpf, cnpj, card, phone, ip. Numbers that only look like documents are left alone: CPF and
CNPJ must pass their check digits and card numbers the Luhn check, so "R$ 1.200" or an order id survive.
The gate's detector (`residue`) shares no pattern with the scrubber's (`PATTERNS`), only the check-digit
arithmetic: it is written broader, so that what the scrubber misses is not confirmed clean by the same pattern.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable

KINDS = ("email", "cnpj", "cpf", "card", "phone", "ip")


def _digits(s: str) -> list[int]:
    return [int(c) for c in s if c.isdigit()]


def cpf_ok(s: str) -> bool:
    d = _digits(s)
    if len(d) != 11 or len(set(d)) == 1:
        return False
    for n in (9, 10):
        check = sum(d[i] * (n + 1 - i) for i in range(n)) * 10 % 11 % 10
        if check != d[n]:
            return False
    return True


def cnpj_ok(s: str) -> bool:
    d = _digits(s)
    if len(d) != 14 or len(set(d)) == 1:
        return False
    for n, weights in ((12, [5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2]), (13, [6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2])):
        r = sum(a * b for a, b in zip(d[:n], weights, strict=True)) % 11
        if (0 if r < 2 else 11 - r) != d[n]:
            return False
    return True


def luhn_ok(s: str) -> bool:
    d = _digits(s)
    if not 13 <= len(d) <= 19:
        return False
    total = 0
    for i, x in enumerate(reversed(d)):
        if i % 2:
            x = x * 2 - 9 if x > 4 else x * 2
        total += x
    return total % 10 == 0


def ip_ok(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


# An e-mail local part as RFC 5322 allows it: a dot-atom of atext (letters and digits, unicode ones too as RFC 6531
# allows, and !#$%&'*+/=?^_`{|}~-) or a quoted string. The first character excludes the atext that people use as
# punctuation around an address (quotes, backticks, braces, pipes, markdown's * _ ~), so "`a@b.com`" or "**a@b.com**"
# keep their markup. Dots may sit anywhere after it, two in a row included: an invalid address is still someone's.
# Domain labels are letters and digits joined by hyphens (no underscore), so a trailing "_" or "-" stays.
_ATEXT = r"[\w!#$%&'*+/=?^`{|}~.-]"
# The look-behind only starts a dot-atom where none could start one character earlier (a leftmost match would
# have), and the length cap (RFC 5321 allows 64) bounds the scan from each start: linear on base64 or "`a`a`a...".
_FIRST = r"[^\W_]|[!#$%&+/=?^-]"
_LOCAL = r"(?<!" + _FIRST + r")(?:" + _FIRST + r")" + _ATEXT + r'{0,254}|"(?:[^"\\\r\n]|\\.){1,64}"'
_LABEL = r"[^\W_]+(?:-+[^\W_]+)*"
_EMAIL = re.compile(r"(?:" + _LOCAL + r")@" + _LABEL + r"(?:\." + _LABEL + r")+")

# (pattern, extra check). Order matters: longer document numbers before the shorter ones they contain.
PATTERNS: dict[str, tuple[re.Pattern, Callable[[str], bool] | None]] = {
    "email": (_EMAIL, None),
    "cnpj": (re.compile(r"(?<![\d.])\d{2}\.?\d{3}\.?\d{3}/?\d{4}-?\d{2}(?![\d])"), cnpj_ok),
    "cpf": (re.compile(r"(?<![\d.])\d{3}\.?\d{3}\.?\d{3}-?\d{2}(?![\d])"), cpf_ok),
    "card": (re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)"), luhn_ok),
    # Brazilian phones as people write them: with +55 or a (DDD), or a mobile 9xxxx-xxxx. A bare 4-4 number
    # ("2000-2015") is a year range far more often than a landline, so it is left alone. Then other countries':
    # a "+" country code and 8-14 more digits in groups, or the North American "(555) 123-4567".
    "phone": (re.compile(r"(?:\+55\s?)?\(\d{2}\)\s?9?\d{4}-?\d{4}\b|\+55\s?\d{2}\s?9?\d{4}[-\s]?\d{4}\b"
                         r"|\b(?:\d{2}\s)?9\d{4}-\d{4}\b"
                         r"|\+\d(?:[\s-]?\(?\d\)?){7,14}(?!\d)|\(\d{3}\)\s?\d{3}-\d{4}\b"), None),
    "ip": (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b|(?<![\w:])(?:[0-9a-fA-F]{1,4}::?){2,7}[0-9a-fA-F]{1,4}\b"), ip_ok),
}


def scrub(text: str, kinds: Iterable[str] = KINDS) -> tuple[str, Counter]:
    """Replace each PII match of the given kinds by a typed placeholder like <CPF>; count per kind."""
    counts: Counter = Counter()
    for kind in KINDS:
        if kind not in kinds:
            continue
        pattern, ok = PATTERNS[kind]

        def repl(m: re.Match, kind=kind, ok=ok) -> str:
            if ok is not None and not ok(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return f"<{kind.upper()}>"

        text = pattern.sub(repl, text)
    return text, counts


def find(text: str, kinds: Iterable[str] = KINDS) -> Counter:
    """How many PII matches of each kind remain in the text (nothing is changed)."""
    return scrub(text, kinds)[1]


# The second PII detector. Deliberately permissive and written without the scrubber's patterns: whatever it
# finds in scrubbed text is a miss of one of them (or a false alarm to look at), and the gate fails on it.
# E-mail: any run of non-space characters with a letter or digit, "@", then a dotted domain ending in 2+ letters.
_RESIDUE_EMAIL = re.compile(r'(?:"[^"\n]{1,64}"|(?<![^\s"(),:;<>\[\]\\])[^\s@"(),:;<>\[\]\\]+)'
                            r"@[^\W_][\w-]*(?:\.[\w-]+)*\.[^\W\d_]{2,}")
# Phones in any national format: a "+" country code and 8-15 digits, or an area code in parentheses before 7-9
# digits, or a 9xxxx-xxxx mobile (halves apart: a bare 11-digit number is more often a sum) with or without DDD.
_RESIDUE_PHONE = re.compile(r"\+\d(?:[\s.()-]{0,2}\d){7,14}(?!\d)|\(\d{2,3}\)[\s.-]?\d{3,5}[\s.-]?\d{4}(?!\d)"
                            r"|(?<![\d.-])(?:\d{2}[\s.-]?)?9\d{4}[\s.-]\d{4}(?![\d-])")
# Document and card numbers: digit groups joined by single separators of any kind; every group-aligned window
# with the right number of digits is checked (CPF 11 and CNPJ 14 by their check digits, cards 13-19 by Luhn;
# a card's groups are joined by one kind of separator, as people write them).
_RESIDUE_DIGITS = re.compile(r"\d+(?:[\s./_-]\d+)*")
# Links and DOIs are taken out before the numbers are looked at: "doi.org/10.5007/2175-8069.2020" is not a card.
_RESIDUE_LINK = re.compile(r"(?:https?://|www\.|doi:\s?)\S+|\b10\.\d{4,9}/\S+", re.IGNORECASE)
_RESIDUE_IP = re.compile(r"(?<![\w.])\d+\.\d+\.\d+\.\d+(?!\w|\.\d)|(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")


def _residue_numbers(run: str) -> str | None:
    groups = re.findall(r"\d+", run)
    seps = re.findall(r"\D", run)
    for i in range(len(groups)):
        digits = ""
        for j, g in enumerate(groups[i:], start=i):
            digits += g
            n = len(digits)
            if n == 14 and cnpj_ok(digits):
                return "cnpj"
            if n == 11 and cpf_ok(digits):
                return "cpf"
            if 13 <= n <= 19 and len(set(seps[i:j])) <= 1 and luhn_ok(digits):
                return "card"
            if n > 19:
                break
    return None


def residue(text: str) -> Counter:
    """PII the second detector finds in (already scrubbed) text, per kind; the validation gate wants none."""
    found: Counter = Counter()
    for m in _RESIDUE_EMAIL.finditer(text):
        if re.search(r"[^\W_]", m.group(0).split("@")[0]):
            found["email"] += 1
    text = _RESIDUE_LINK.sub(" ", text)
    found["phone"] += len(_RESIDUE_PHONE.findall(text))
    for m in _RESIDUE_DIGITS.finditer(text):
        kind = _residue_numbers(m.group(0)) if len(m.group(0)) >= 11 else None
        if kind:
            found[kind] += 1
    # An IPv6 address needs three groups with digits: "[::-1]" or "a::b" in code is not one.
    found["ip"] += sum(1 for m in _RESIDUE_IP.finditer(text)
                       if ip_ok(m.group(0)) and (":" not in m.group(0) or len(re.findall(r"[0-9A-Fa-f]+", m.group(0))) >= 3))
    return +found

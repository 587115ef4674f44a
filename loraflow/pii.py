"""PII patterns shared by curation (scrub -> typed placeholders) and validation (residue must be zero).

Kinds: email, cpf, cnpj, card, phone, ip. Numbers that only look like documents are left alone: CPF and
CNPJ must pass their check digits and card numbers the Luhn check, so "R$ 1.200" or an order id survive.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable

KINDS = ("email", "cnpj", "cpf", "card", "phone", "ip")


def _digits(s: str) -> list[int]:
    return [int(c) for c in s if c.isdigit()]


def _cpf_ok(s: str) -> bool:
    d = _digits(s)
    if len(d) != 11 or len(set(d)) == 1:
        return False
    for n in (9, 10):
        check = sum(d[i] * (n + 1 - i) for i in range(n)) * 10 % 11 % 10
        if check != d[n]:
            return False
    return True


def _cnpj_ok(s: str) -> bool:
    d = _digits(s)
    if len(d) != 14 or len(set(d)) == 1:
        return False
    for n, weights in ((12, [5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2]), (13, [6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2])):
        r = sum(a * b for a, b in zip(d[:n], weights, strict=True)) % 11
        if (0 if r < 2 else 11 - r) != d[n]:
            return False
    return True


def _luhn_ok(s: str) -> bool:
    d = _digits(s)
    if not 13 <= len(d) <= 19:
        return False
    total = 0
    for i, x in enumerate(reversed(d)):
        if i % 2:
            x = x * 2 - 9 if x > 4 else x * 2
        total += x
    return total % 10 == 0


def _ip_ok(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


# (pattern, extra check). Order matters: longer document numbers before the shorter ones they contain.
PATTERNS: dict[str, tuple[re.Pattern, Callable[[str], bool] | None]] = {
    "email": (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), None),
    "cnpj": (re.compile(r"(?<![\d.])\d{2}\.?\d{3}\.?\d{3}/?\d{4}-?\d{2}(?![\d])"), _cnpj_ok),
    "cpf": (re.compile(r"(?<![\d.])\d{3}\.?\d{3}\.?\d{3}-?\d{2}(?![\d])"), _cpf_ok),
    "card": (re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)"), _luhn_ok),
    # Brazilian phones as people write them: with +55 or a (DDD), or a mobile 9xxxx-xxxx. A bare 4-4 number
    # ("2000-2015") is a year range far more often than a landline, so it is left alone.
    "phone": (re.compile(r"(?:\+55\s?)?\(\d{2}\)\s?9?\d{4}-?\d{4}\b|\+55\s?\d{2}\s?9?\d{4}[-\s]?\d{4}\b"
                         r"|\b(?:\d{2}\s)?9\d{4}-\d{4}\b"), None),
    "ip": (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b|\b(?:[0-9a-fA-F]{1,4}:){2,7}[0-9a-fA-F]{1,4}\b"), _ip_ok),
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

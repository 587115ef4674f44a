"""A small interpreter for the subset of Go's text/template that loraflow/modelfile.py writes, with the way Ollama
prepares a chat before rendering it (its Modelfile SYSTEM prepended when the chat has no system turn first;
consecutive turns of one role joined). No Go toolchain is on these machines, so this is what the Modelfile
TEMPLATE is checked with: it shows the template text means what modelfile.render renders *under these rules*,
not that Ollama's Go runtime agrees (that would need Ollama itself).

Supported: text, `{{ pipeline }}`, `{{- ` / ` -}}` trimming, `$x := pipeline`, `if` / `else if` / `else` / `end`,
`range $i, $v := pipeline`, fields (`.Role`, `$.Messages`), variables, string and integer literals, parentheses,
and the functions eq, ne, and, or, not, len, slice.
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TERM = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|-?\d+|\$?[\w]*(?:\.[\w]+)*|\$)')


def _lex(src: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        pos = m.end()
        if m.group(3):
            rest = src[pos:]
            pos += len(rest) - len(rest.lstrip())
    out.append(("text", src[pos:]))
    return [t for t in out if t != ("text", "")]


def _terms(expr: str) -> list[str]:
    terms, pos = [], 0
    while pos < len(expr):
        m = _TERM.match(expr, pos)
        if not m or not m.group(1):
            if expr[pos:].strip() == "":
                break
            raise SyntaxError(f"cannot read {expr[pos:]!r}")
        terms.append(m.group(1))
        pos = m.end()
    return terms


def _parse_expr(terms: list[str]) -> Any:
    """A command: a single operand, or a function name followed by operands."""
    items: list[Any] = []
    while terms and terms[0] != ")":
        t = terms.pop(0)
        if t == "(":
            items.append(_parse_expr(terms))
            assert terms.pop(0) == ")"
        else:
            items.append(t)
    return items


def _parse(tokens: list[tuple[str, str]], stop: tuple[str, ...] = ()) -> tuple[list, str | None]:
    body: list = []
    while tokens:
        kind, s = tokens.pop(0)
        if kind == "text":
            body.append(("text", s))
            continue
        word = s.split(None, 1)[0] if s else ""
        if word in ("end", "else") and (word in stop or s.startswith("else")):
            return body, s
        if word == "if":
            branches, else_body = [], []
            cond = s[2:].strip()
            while True:
                inner, closer = _parse(tokens, ("end", "else"))
                branches.append((_parse_expr(_terms(cond)), inner))
                if closer == "end":
                    break
                if closer.startswith("else if"):
                    cond = closer[len("else if"):].strip()
                    continue
                else_body, closer = _parse(tokens, ("end",))
                break
            body.append(("if", branches, else_body))
        elif word == "range":
            m = re.match(r"range\s+(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.+)", s)
            inner, _ = _parse(tokens, ("end",))
            body.append(("range", m.group(1), m.group(2), _parse_expr(_terms(m.group(3))), inner))
        elif re.match(r"\$\w+\s*:=", s):
            name, expr = s.split(":=", 1)
            body.append(("set", name.strip(), _parse_expr(_terms(expr))))
        else:
            body.append(("print", _parse_expr(_terms(s))))
    return body, None


def _truth(v: Any) -> bool:
    return bool(v)  # Go: false, 0, nil and empty strings/slices/maps are false, as in Python


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "and": lambda *xs: next((x for x in xs if not _truth(x)), xs[-1]),
    "or": lambda *xs: next((x for x in xs if _truth(x)), xs[-1]),
    "not": lambda x: not _truth(x),
    "len": len,
    "slice": lambda x, *ix: x[ix[0]:ix[1]] if len(ix) > 1 else x[ix[0]:],
}


def _value(term: Any, dot: Any, scope: dict[str, Any]) -> Any:
    if isinstance(term, list):
        return _call(term, dot, scope)
    if term.startswith('"'):
        return term[1:-1].encode().decode("unicode_escape")
    if re.fullmatch(r"-?\d+", term):
        return int(term)
    if term.startswith("$"):
        head, *fields = term.split(".")
        v = scope[head]
    else:
        v, fields = dot, term.split(".")[1:]
    for f in fields:
        v = v[f]
    return v


def _call(items: list, dot: Any, scope: dict[str, Any]) -> Any:
    first = items[0]
    if isinstance(first, str) and first in _FUNCS:
        return _FUNCS[first](*(_value(t, dot, scope) for t in items[1:]))
    assert len(items) == 1, f"not a function: {items}"
    return _value(first, dot, scope)


def _exec(body: list, dot: Any, scope: dict[str, Any], out: list[str]) -> None:
    for node in body:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "print":
            v = _call(node[1], dot, scope)
            out.append(("true" if v else "false") if isinstance(v, bool) else str(v))
        elif kind == "set":
            scope[node[1]] = _call(node[2], dot, scope)
        elif kind == "if":
            for cond, inner in node[1]:
                if _truth(_call(cond, dot, scope)):
                    _exec(inner, dot, dict(scope), out)
                    break
            else:
                _exec(node[2], dot, dict(scope), out)
        elif kind == "range":
            _, iname, vname, expr, inner = node
            for i, item in enumerate(_call(expr, dot, scope)):
                _exec(inner, item, {**scope, iname: i, vname: item}, out)


def render(template: str, data: dict[str, Any]) -> str:
    body, closer = _parse(_lex(template))
    assert closer is None, f"unbalanced {closer!r}"
    out: list[str] = []
    _exec(body, data, {"$": data}, out)
    return "".join(out)


def ollama_chat(template: str, messages: list[dict], system: str | None) -> str:
    """What Ollama's chat endpoint renders for `messages` with a Modelfile of this TEMPLATE and SYSTEM."""
    msgs = list(messages)
    if system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs = [{"role": "system", "content": system}, *msgs]
    collated: list[dict] = []
    for m in msgs:  # Ollama joins consecutive turns of one role with a blank line
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    system_text = "\n\n".join(m["Content"] for m in collated if m["Role"] == "system")
    return render(template, {"Messages": collated, "System": system_text})

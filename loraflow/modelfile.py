"""An adapter's generation contract in Ollama's terms: a Modelfile whose TEMPLATE renders conversations the way
the adapter's Jinja chat template does, whose SYSTEM reproduces a default system message the template injects,
whose `PARAMETER stop` lines are its end-of-turn tokens and whose sampling parameters are its
generation_config.json.

Ollama templates are Go templates, not Jinja, so the chat template is not translated: it is *recognised*.
`detect` renders probe conversations with the tokenizer's own template and matches them against the chat
formats this module knows (`STYLES`: ChatML — SmolLM2, Qwen —, Llama-3 and Gemma), learning the details a
template varies in (a BOS it writes itself, a default system message, whether it trims contents, whether it
refuses a system turn). `go_template` then writes the Go template of that `ChatFormat`, and `render` renders
the same structure in Python; tests/test_export.py checks that the Go template, interpreted by a small Go
text/template interpreter with Ollama's message handling, matches the Jinja rendering on several conversations.
A template that is none of these formats is refused, naming its sha256.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from loraflow.config import GenerateParams
from loraflow.errors import LoraflowError


class TemplateNotSupported(LoraflowError):
    """A chat template with no Go-template equivalent this module can vouch for."""


@dataclass(frozen=True)
class Style:
    """How one chat format writes a message: header (with `{role}`), content, footer."""

    name: str
    header: str
    footer: str
    roles: tuple[tuple[str, str], ...] = ()  # role renamed in the header, e.g. Gemma's assistant -> model

    def role(self, role: str) -> str:
        return dict(self.roles).get(role, role)

    def head(self, role: str) -> str:
        return self.header.replace("{role}", self.role(role))


STYLES = (
    Style("chatml", "<|im_start|>{role}\n", "<|im_end|>\n"),
    Style("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
    Style("gemma", "<start_of_turn>{role}\n", "<end_of_turn>\n", (("assistant", "model"),)),
)


@dataclass(frozen=True)
class ChatFormat:
    style: Style
    prefix: str = ""  # text the template writes once at the start (a BOS); llama.cpp adds it when tokenizing
    default_system: str | None = None  # injected when the conversation does not start with a system turn
    system: Literal["message", "unsupported"] = "message"  # unsupported: the template raises on a system turn
    trims: bool = False  # the template strips each message's content (Go templates cannot)


def render(fmt: ChatFormat, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The text `fmt` renders for a conversation: what the Jinja template writes when `detect` matched it."""
    msgs = list(messages)
    if fmt.default_system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs = [{"role": "system", "content": fmt.default_system}, *msgs]
    out = [fmt.prefix]
    for m in msgs:
        content = m["content"].strip() if fmt.trims else m["content"]
        out.append(fmt.style.head(m["role"]) + content + fmt.style.footer)
    if add_generation_prompt:
        out.append(fmt.style.head("assistant"))
    return "".join(out)


# Probe conversations: what they vary is what a template may do differently from the style it resembles.
_PLAIN = [{"role": "user", "content": "Hello there"}]
_MULTI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
          {"role": "user", "content": "Tell me more,\nin two lines."}]
_SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
_PADDED = [{"role": "user", "content": "  padded question \n"}]


def _jinja(tok, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _match(tok, style: Style) -> ChatFormat | None:
    plain = _jinja(tok, _PLAIN)
    prefix = ""
    bos = getattr(tok, "bos_token", None)
    if bos and plain.startswith(bos) and not plain.startswith(style.header.split("{role}")[0]):
        prefix = bos
    rest, default_system = plain[len(prefix):], None
    head = style.head("system")
    if rest.startswith(head) and style.footer in rest[len(head):]:
        default_system = rest[len(head):].split(style.footer, 1)[0]
    fmt = ChatFormat(style, prefix, default_system)
    if render(fmt, _PLAIN) != plain or render(fmt, _MULTI) != _jinja(tok, _MULTI):
        return None
    try:
        with_system = _jinja(tok, _SYSTEM)
    except Exception:  # noqa: BLE001 - jinja2's TemplateError from raise_exception: no system turns
        fmt = replace(fmt, system="unsupported")
    else:
        if render(fmt, _SYSTEM) != with_system:
            return None
    padded = _jinja(tok, _PADDED)
    for trims in (False, True):
        if render(replace(fmt, trims=trims), _PADDED) == padded:
            return replace(fmt, trims=trims)
    return None


def detect(tok) -> ChatFormat:
    """The chat format the tokenizer's template renders, or TemplateNotSupported naming its sha256."""
    import hashlib

    template = tok.chat_template or ""
    sha = hashlib.sha256(template.encode()).hexdigest()
    if template:
        for style in STYLES:
            try:
                fmt = _match(tok, style)
            except Exception:  # noqa: BLE001 - a template that cannot render a plain conversation matches nothing
                fmt = None
            if fmt is not None:
                return fmt
    raise TemplateNotSupported(
        f"chat template sha256 {sha} renders none of the chat formats an Ollama Modelfile can be written for "
        f"({', '.join(s.name for s in STYLES)}): export --to gguf (llama-server applies the GGUF's own template) "
        f"or --to merged instead, or add the format to loraflow/modelfile.py STYLES")


def _go_text(s: str) -> str:
    if "{{" in s or '"""' in s:
        raise TemplateNotSupported(f"template text {s!r} cannot be written literally in a Modelfile TEMPLATE")
    return s


def go_template(fmt: ChatFormat) -> str:
    """The Go template (Ollama's `.Messages` form) of `fmt`. The prefix (a BOS) is left out: llama.cpp adds the
    BOS itself when the GGUF says so, and writing it too would double it. Whitespace is literal: no trim markers."""
    st = fmt.style
    opening, closing = (_go_text(p) for p in st.header.split("{role}"))
    role = "{{ .Role }}"
    for src, dst in st.roles:
        role = f'{{{{ if eq .Role "{src}" }}}}{_go_text(dst)}{{{{ else }}}}{role}{{{{ end }}}}'
    return ("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            f"{opening}{role}{closing}{{{{ .Content }}}}{_go_text(st.footer)}"
            f'{{{{ if and $last (ne .Role "assistant") }}}}{_go_text(st.head("assistant"))}{{{{ end }}}}'
            "{{ end }}")


def _quote(s: str) -> str:
    if '"""' in s:
        raise TemplateNotSupported(f"{s[:60]!r}... contains triple quotes, which a Modelfile cannot hold")
    return f'"""{s}"""'


def modelfile(fmt: ChatFormat, base_file: str, adapter_file: str, stop_tokens: list[str], gp: GenerateParams,
              header: str = "") -> str:
    """The Modelfile text. `stop_tokens`: the end-of-turn tokens as text; `gp`: the adapter's decoding settings
    (temperature 0 when the adapter does not sample)."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"FROM ./{base_file}", f"ADAPTER ./{adapter_file}", f"TEMPLATE {_quote(go_template(fmt))}"]
    if fmt.default_system is not None:
        lines.append(f"SYSTEM {_quote(fmt.default_system)}")
    lines += [f'PARAMETER stop "{t}"' for t in stop_tokens]
    lines += [f"PARAMETER temperature {gp.temperature if gp.do_sample else 0}",
              f"PARAMETER top_p {gp.top_p}",
              f"PARAMETER repeat_penalty {gp.repetition_penalty}",
              f"PARAMETER num_predict {gp.max_new_tokens}"]
    return "\n".join(lines) + "\n"

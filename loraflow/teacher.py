"""Question/answer pairs a teacher model writes from document sections (curate.teacher; off by default).

Any OpenAI-compatible chat endpoint will do: a local `loraflow serve`, vLLM, Ollama, or a hosted API. For each
section the teacher is asked for `questions_per_section` pairs, in the section's language, from the section
alone. What comes back is:

- cached by a hash of the section's content (its heading path and text), the model and the prompt, as the raw
  completion: a re-run asks nothing again, and changing the grounding threshold needs no new questions;
- kept only when grounded: at least `min_grounding` of the answer's content words (words of 4+ letters,
  case-folded) occur in the section. A rough check, stated as such: it stops answers from the teacher's own
  knowledge, not a wrong answer built from the section's words;
- marked as generated: each pair keeps its section as evidence and names the teacher.

The endpoint failing loses nothing: the section records are curated as always, and the report says which
endpoint failed and how many sections went unasked (they are asked on the next run; answers cached so far stay).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflow.formats import Section

PROMPT_VERSION = 1
SYSTEM = ("You write question and answer pairs for training an assistant. Use only the text you are given: "
          "every answer must be stated in it. Write in the text's language.")
ASK = ('Write {n} questions a reader of the text below could ask, each with its answer taken from the text. '
       'Reply with a JSON array only: [{{"question": "...", "answer": "..."}}, ...]\n\n'
       "Section: {path}\n\n{text}")
_WORD = re.compile(r"\w{4,}")


@dataclass
class Pair:
    """A generated question/answer and the section that grounds it."""

    question: str
    answer: str
    source: str  # the section's source (file#index): the evidence
    evidence: str  # the section's text
    grounding: float  # share of the answer's content words found in the section


@dataclass
class Report:
    endpoint: str
    model: str
    sections: int = 0
    asked: int = 0
    cached: int = 0
    unasked: int = 0
    pairs: int = 0  # kept (grounded)
    ungrounded: int = 0
    unparsable: int = 0  # completions with no pair in them
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Teacher:
    """Where to ask and how: curate.teacher's params (loraflow/config.py TeacherParams), and where to cache."""

    url: str
    model: str
    cache_dir: Path
    questions_per_section: int = 3
    min_grounding: float = 0.8
    api_key_env: str | None = None
    timeout_s: float = 120.0
    max_tokens: int = 512
    temperature: float = 0.2
    extra_headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_params(cls, p: Any, root: Path = Path(".")) -> Teacher:
        return cls(url=p.url, model=p.model, cache_dir=root / Path(p.cache_dir).expanduser(),
                   questions_per_section=p.questions_per_section, min_grounding=p.min_grounding, api_key_env=p.api_key_env, timeout_s=p.timeout_s,
                   max_tokens=p.max_tokens, temperature=p.temperature)


def section_key(sec: Section, teacher: Teacher) -> str:
    """The cache key: the section's content, the model, how many questions and the prompt's version."""
    payload = json.dumps({"path": sec.path, "text": sec.text, "model": teacher.model,
                          "n": teacher.questions_per_section, "prompt": PROMPT_VERSION}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def generate(sections: list[tuple[str, Section]], teacher: Teacher) -> tuple[list[Pair], Report]:
    """Grounded pairs for each (source, section), from the cache or the endpoint, and what happened."""
    report = Report(teacher.url, teacher.model, sections=len(sections))
    pairs: list[Pair] = []
    down = False
    for source, sec in sections:
        path = _cache_path(teacher, section_key(sec, teacher))
        if path.exists():
            completion = json.loads(path.read_text(encoding="utf-8"))["completion"]
            report.cached += 1
        elif down:
            report.unasked += 1  # one failure is enough: the rest would only wait for their timeouts
            continue
        else:
            try:
                completion = _ask(teacher, sec)
            except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError) as e:
                down = True
                report.unasked += 1
                report.error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            report.asked += 1
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"source": source, "completion": completion}, ensure_ascii=False), encoding="utf-8")
            tmp.replace(path)
        found = parse_pairs(completion)
        if not found:
            report.unparsable += 1
        for q, a in found:
            g = grounding(a, sec.text)
            if g >= teacher.min_grounding:
                pairs.append(Pair(q, a, source, sec.text, g))
            else:
                report.ungrounded += 1
    report.pairs = len(pairs)
    if report.error:
        report.error = (f"teacher endpoint {teacher.url} (model {teacher.model}) failed ({report.error}): "
                        f"{report.unasked} of {report.sections} section(s) went unasked; their section records are "
                        "kept, and the next run asks them again")
    return pairs, report


def _cache_path(teacher: Teacher, key: str) -> Path:
    return teacher.cache_dir / key[:2] / f"{key}.json"


def _ask(teacher: Teacher, sec: Section) -> str:
    body = {"model": teacher.model, "temperature": teacher.temperature, "max_tokens": teacher.max_tokens,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": ASK.format(n=teacher.questions_per_section, path=sec.path,
                                                                text=sec.text)}]}
    headers = {"Content-Type": "application/json", **teacher.extra_headers}
    key = os.environ.get(teacher.api_key_env) if teacher.api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(teacher.url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=teacher.timeout_s) as resp:  # noqa: S310 (the user's own endpoint)
        reply = json.loads(resp.read().decode("utf-8"))
    content = reply["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise ValueError(f"no text in the reply ({type(content).__name__})")
    return content


# What small models write instead of the JSON asked for: "Question: ...\nAnswer: ...", the answer running on to a
# blank line or the next question.
_Q = r"[ \t]*(?:\d+[.)][ \t]*)?(?:Q|Question|Pergunta)[ \t]*\d*[ \t]*:"
_QA_TEXT = re.compile(rf"^{_Q}[ \t]*(?P<q>[^\n]+)\n+[ \t]*(?:A|Answer|Resposta)[ \t]*\d*[ \t]*:[ \t]*"
                      rf"(?P<a>[^\n]+(?:\n(?![ \t]*\n)(?!{_Q})[^\n]+)*)", re.IGNORECASE | re.MULTILINE)


def parse_pairs(completion: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from a completion: the JSON array asked for, or the JSON objects in it, or
    else "Question: / Answer:" lines."""
    text = completion.strip()
    candidates: list[Any] = []
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        try:
            candidates = json.loads(text[start:end + 1])
        except json.JSONDecodeError:
            candidates = []
    if not isinstance(candidates, list) or not candidates:
        candidates = []
        for m in re.finditer(r"\{[^{}]*\}", text):
            try:
                candidates.append(json.loads(m.group(0)))
            except json.JSONDecodeError:
                continue
    out = []
    for c in candidates:
        if isinstance(c, dict) and isinstance(c.get("question"), str) and isinstance(c.get("answer"), str):
            q, a = c["question"].strip(), c["answer"].strip()
            if q and a:
                out.append((q, a))
    if not out:
        out = [(m["q"].strip(), " ".join(m["a"].split())) for m in _QA_TEXT.finditer(text)]
    return out


def _words(text: str) -> set[str]:
    return set(_WORD.findall(unicodedata.normalize("NFC", text).casefold()))


def grounding(answer: str, evidence: str) -> float:
    """Share of the answer's content words (4+ letters, case-folded) that occur in the evidence; 0 for none."""
    words = _words(answer)
    return len(words & _words(evidence)) / len(words) if words else 0.0


def records(pairs: list[Pair], teacher: Teacher) -> list[dict[str, Any]]:
    """Pairs as curated chat records (before ids and normalisation), marked as generated with their evidence."""
    return [{"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.answer}],
             "source": f"{p.source}@teacher",
             "meta": {"generated": {"teacher": teacher.model, "endpoint": teacher.url, "evidence": p.source,
                                    "evidence_text": p.evidence, "grounding": round(p.grounding, 3)}}}
            for p in pairs]

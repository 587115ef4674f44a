"""The teacher path: question/answer pairs from document sections through a real OpenAI-compatible HTTP endpoint
on loopback; cached by section content, kept only when grounded, nothing lost when the endpoint is down."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loraflow.config import load_params
from loraflow.formats import Section
from loraflow.teacher import Teacher, generate, grounding, parse_pairs, records
from tests.conftest import ROOT

SECTIONS = [
    ("m/regimento.pdf#p3", Section("Art. 7º", "TÍTULO II > CAPÍTULO I > Art. 7º", "Regimento",
                                   "A Chefia do Gabinete compõe-se de: a) Secretaria Geral; b) Secretaria Particular.")),
    ("m/regimento.pdf#p4", Section("Art. 9º", "TÍTULO II > CAPÍTULO I > Art. 9º", "Regimento",
                                   "À Secretaria Particular compete prestar assistência ao Reitor em assuntos pessoais.")),
]
# What the stub teacher answers: one grounded pair, one answered from outside the section.
REPLY = json.dumps([
    {"question": "Do que se compõe a Chefia do Gabinete?", "answer": "Da Secretaria Geral e da Secretaria Particular."},
    {"question": "Quem fundou a universidade?", "answer": "Fundada pelo governador José Américo em 1955, na capital."},
], ensure_ascii=False)


class _Stub(BaseHTTPRequestHandler):
    calls: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"Aqui está:\n{REPLY}"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    _Stub.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pairs_are_grounded_marked_and_cached_by_section_content(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-test")
    teacher = Teacher(endpoint, "qwen-teacher", tmp_path / "cache", questions_per_section=2, api_key_env="TEACHER_KEY")
    pairs, report = generate(SECTIONS, teacher)
    assert len(_Stub.calls) == 2 and _Stub.calls[0]["path"] == "/v1/chat/completions"
    assert _Stub.calls[0]["auth"] == "Bearer sk-test" and _Stub.calls[0]["body"]["model"] == "qwen-teacher"
    assert "Write 2 questions" in _Stub.calls[0]["body"]["messages"][-1]["content"]
    # Only the answer the first section states is kept; the invented one fails the overlap check everywhere.
    assert [(p.source, p.question) for p in pairs] == [("m/regimento.pdf#p3", "Do que se compõe a Chefia do Gabinete?")]
    assert report.as_dict() | {"error": None} == {
        "endpoint": endpoint, "model": "qwen-teacher", "sections": 2, "asked": 2, "cached": 0, "unasked": 0,
        "pairs": 1, "ungrounded": 3, "unparsable": 0, "error": None}
    rec = records(pairs, teacher)[0]
    assert rec["meta"]["generated"]["evidence"] == "m/regimento.pdf#p3" and rec["source"] == "m/regimento.pdf#p3@teacher"
    assert rec["meta"]["generated"]["evidence_text"] == SECTIONS[0][1].text

    again, report2 = generate(SECTIONS, teacher)  # a re-run asks nothing
    assert len(_Stub.calls) == 2 and report2.cached == 2 and report2.asked == 0
    assert [(p.question, p.answer) for p in again] == [(p.question, p.answer) for p in pairs]
    edited = [(SECTIONS[0][0], Section(**{**SECTIONS[0][1].__dict__, "text": SECTIONS[0][1].text + " c) Protocolo."}))]
    generate(edited, teacher)  # a changed section is asked again
    assert len(_Stub.calls) == 3


def test_endpoint_down_loses_nothing_and_says_which_and_how_many(endpoint, tmp_path):
    cache = tmp_path / "cache"
    generate(SECTIONS[:1], Teacher(endpoint, "m", cache, questions_per_section=2))  # one section cached
    down = Teacher(f"http://127.0.0.1:{_closed_port()}/v1", "m", cache, questions_per_section=2, timeout_s=5)
    pairs, report = generate(SECTIONS, down)
    assert report.cached == 1 and report.unasked == 1 and len(pairs) == 1  # the cached answers still count
    assert report.error.startswith(f"teacher endpoint {down.url} (model m) failed")
    assert "1 of 2 section(s) went unasked" in report.error


def test_parse_and_grounding_rules():
    assert parse_pairs('[{"question": "Q?", "answer": "A."}]') == [("Q?", "A.")]
    assert parse_pairs('Sure! {"question": "Q?", "answer": "A."} and {"question": "", "answer": "x"}') == [("Q?", "A.")]
    assert parse_pairs("no JSON here") == []
    small_model = "Question: What is it?\n\nAnswer: The General Secretariat\nand more.\n\nJSON: [\n {\"type\": "
    assert parse_pairs(small_model) == [("What is it?", "The General Secretariat and more.")]
    assert parse_pairs("1. Q: Um?\nA: Dois.\n2. Q: Três?\nA: Quatro.") == [("Um?", "Dois."), ("Três?", "Quatro.")]
    assert grounding("Secretaria Geral e Particular", "a) Secretaria Geral; b) Secretaria Particular.") == 1.0
    assert grounding("Fundada em 1955 pelo governador", "a) Secretaria Geral") == 0.0
    assert grounding("Sim.", "qualquer texto") == 0.0  # no content word: nothing shows it is grounded


def test_teacher_is_off_by_default_and_validated():
    assert load_params(ROOT / "params.yaml").curate.teacher is None
    p = load_params(ROOT / "params.yaml", ["curate.teacher={url: 'http://127.0.0.1:8000/v1', questions_per_section: 4}"])
    assert p.curate.teacher.questions_per_section == 4 and p.curate.teacher.min_grounding == 0.8
    t = Teacher.from_params(p.curate.teacher, ROOT)
    assert t.cache_dir == ROOT / ".cache" / "teacher" and t.model == "base"


@pytest.mark.slow
def test_against_loraflow_serve_on_the_embedded_model(tmp_path):
    """The mechanics against loraflow's own server answering as the base model: a real completion is asked
    for, cached, and whatever pairs the small model writes pass the grounding check or are counted out."""
    import time

    import uvicorn

    from loraflow.serve import ServeSettings, create_app

    overrides = [f"base.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    params = load_params(ROOT / "params.yaml", overrides)
    app = create_app(params, ServeSettings(root=tmp_path, overrides=overrides, poll_interval=0, max_tokens_limit=128))
    port = _closed_port()
    url, cache = f"http://127.0.0.1:{port}/v1", tmp_path / "curate-cache"
    real = {"model": "base", "max_tokens": 96, "temperature": 0.0, "timeout_s": 300, "questions_per_section": 2,
            "min_grounding": 0.2}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 120
        while not server.started and time.time() < deadline:
            time.sleep(0.1)
        teacher = Teacher(f"http://127.0.0.1:{port}/v1", "base", tmp_path / "cache", questions_per_section=1,
                          max_tokens=96, temperature=0.0, timeout_s=300)
        pairs, report = generate(SECTIONS[:1], teacher)
        assert report.error is None and report.asked == 1
        assert report.pairs + report.ungrounded + report.unparsable >= 1  # the completion is accounted for
        assert all(p.grounding >= teacher.min_grounding for p in pairs)
        _, again = generate(SECTIONS[:1], teacher)
        assert again.asked == 0 and again.cached == 1

        # Curation end to end on one small document, the teacher on: its pairs are asked for, cached, and
        # whichever pass the grounding check are records marked as generated with their section as evidence.
        # The 135M model answers in paraphrase ("Question: ... Answer: ..."), so the bar is lowered to let
        # some through; the mechanics are what is tested here, not the model.
        stats_up, lines = _curate_with_teacher(tmp_path, url, "out", cache, HANDBOOK, **real)
        t = stats_up["teacher"]
        assert t["error"] is None and t["asked"] == t["sections"] == 2
        assert t["pairs"] + t["ungrounded"] + t["unparsable"] >= 2  # every completion accounted for
        generated = [r for r in lines if "generated" in r["meta"]]
        assert stats_up["sources"]["m/document.md"]["curated"] == 2
        assert t["pairs"] >= 1 and t["records"]["made"] == t["pairs"] and len(generated) == t["records"]["curated"]
        for r in generated:
            evidence = r["meta"]["generated"]["evidence"]
            assert r["source"].startswith(f"{evidence}@teacher") and r["meta"]["format"] == "teacher"
            assert r["meta"]["generated"]["grounding"] >= 0.2 and r["meta"]["generated"]["evidence_text"] in HANDBOOK
        again, lines_again = _curate_with_teacher(tmp_path, url, "again", cache, HANDBOOK, **real)
        assert again["teacher"]["asked"] == 0 and again["teacher"]["cached"] == 2 and lines_again == lines
    finally:
        server.should_exit = True
        thread.join(timeout=60)

    # The endpoint gone: nothing lost, the section records stay and stats.json names the endpoint and the count.
    stats, lines = _curate_with_teacher(tmp_path, url, "down", tmp_path / "cold-cache", HANDBOOK, **real)
    assert sorted(r["source"] for r in lines) == ["m/document.md#3", "m/document.md#7"]
    written = json.loads((tmp_path / "down" / "stats.json").read_text(encoding="utf-8"))
    assert written["teacher"]["error"].startswith(f"teacher endpoint {url} (model base) failed")
    assert "2 of 2 section(s) went unasked" in written["teacher"]["error"]


# ------------------------------------------------------------------------------------------- in curation

DOCUMENT = """# Regimento

## Art. 7º

A Chefia do Gabinete compõe-se de: a) Secretaria Geral; b) Secretaria Particular.

## Art. 9º

À Secretaria Particular compete prestar assistência ao Reitor em assuntos pessoais.
"""
HANDBOOK = """# Handbook

## Office of the Rector

The Office of the Rector consists of the General Secretariat and the Private Secretariat.

## Library hours

The library is open from Monday to Friday, from eight in the morning until ten at night.
"""


def _curate_with_teacher(tmp_path, url: str, out: str, cache, document: str = DOCUMENT, **extra):
    from steps import curate

    raw = tmp_path / "raw" / "m"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "document.md").write_text(document, encoding="utf-8")
    opts = ", ".join(f"{k}: {v}" for k, v in {"url": url, "model": "m", "cache_dir": str(cache),
                                              "questions_per_section": 2, **extra}.items())
    params = load_params(ROOT / "params.yaml", [f"curate.teacher={{{opts}}}"])
    stats = curate.run(params, raw, tmp_path / out)
    lines = [json.loads(line) for name in ("train.jsonl", "eval.jsonl")
             for line in (tmp_path / out / name).read_text(encoding="utf-8").splitlines()]
    return stats, lines


def test_curation_adds_grounded_pairs_as_generated_records_cached_and_survives_the_endpoint_down(endpoint, tmp_path):
    cache = tmp_path / "cache"
    stats, lines = _curate_with_teacher(tmp_path, endpoint, "out", cache)
    assert len(_Stub.calls) == 2  # one question per section
    generated = [r for r in lines if "generated" in r["meta"]]
    assert [r["source"] for r in generated] == ["m/document.md#3@teacher1"]
    g = generated[0]
    assert g["meta"]["format"] == "teacher" and g["meta"]["generated"]["evidence"] == "m/document.md#3"
    assert g["meta"]["generated"]["evidence_text"].startswith("A Chefia do Gabinete")
    assert g["messages"] == [{"role": "user", "content": "Do que se compõe a Chefia do Gabinete?"},
                             {"role": "assistant", "content": "Da Secretaria Geral e da Secretaria Particular."}]
    src = stats["sources"]["m/document.md"]
    assert src["read"] == src["curated"] == 2  # the records read, accounted for as always
    assert src["generated"] == {"made": 1, "curated": 1, "duplicates": 0, "quarantined": 0}
    assert stats["teacher"] | {"endpoint": None} == {
        "endpoint": None, "model": "m", "sections": 2, "asked": 2, "cached": 0, "unasked": 0, "pairs": 1,
        "ungrounded": 3, "unparsable": 0, "error": None,
        "records": {"made": 1, "curated": 1, "duplicates": 0, "quarantined": 0}}
    assert stats["splits"]["train"] + stats["splits"]["eval"] == 3

    again, lines_again = _curate_with_teacher(tmp_path, endpoint, "again", cache)  # a re-run asks nothing
    assert len(_Stub.calls) == 2 and again["teacher"]["cached"] == 2 and lines_again == lines

    down = f"http://127.0.0.1:{_closed_port()}/v1"
    stats, lines = _curate_with_teacher(tmp_path, down, "down", tmp_path / "empty-cache", timeout_s=5)
    assert sorted(r["source"] for r in lines) == ["m/document.md#3", "m/document.md#7"]  # the sections stay
    assert stats["sources"]["m/document.md"]["curated"] == 2 and "generated" not in stats["sources"]["m/document.md"]
    written = json.loads((tmp_path / "down" / "stats.json").read_text(encoding="utf-8"))
    assert written["teacher"]["error"].startswith(f"teacher endpoint {down} (model m) failed")
    assert "2 of 2 section(s) went unasked" in written["teacher"]["error"]

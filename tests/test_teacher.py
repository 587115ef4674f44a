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
    finally:
        server.should_exit = True
        thread.join(timeout=60)

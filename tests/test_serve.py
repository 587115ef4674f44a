"""`loraflow serve` against a real MLflow registry (SQLite, in tmp) holding small LoRA adapters with random
weights (so each mode answers differently), through the real `openai` client and plain HTTP on loopback."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from loraflow.config import load_params
from loraflow.curation.normalise import normalise
from tests.conftest import MODE, ROOT

pytestmark = pytest.mark.slow
MODES = ("alpha", "beta", "gamma")
Q = [{"role": "user", "content": "Name a colour."}]
Q2 = [{"role": "user", "content": "Tell me a fun fact."}]


def make_adapter(params, out: Path, seed: int) -> Path:
    """A real peft LoRA adapter with random B matrices, so that each seed answers differently."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loraflow.models import load_causal_lm, load_tokenizer, resolve

    path = resolve(params.base.model, params.base.model_cache)
    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(path), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B starts at zero (a no-op adapter); this large a perturbation changes short answers
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    load_tokenizer(path).save_pretrained(out)
    return out


def register(params, mode: str, adapter: Path, champion: bool = True) -> str:
    """Log the adapter as promote does (pyfunc with the adapter folder as artifact) and move `champion`."""
    import mlflow

    from loraflow import tracking
    from loraflow.config import registered_model_name
    from loraflow.pyfunc import AdapterModel

    exp = tracking.setup(params, mode)
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(name="model", python_model=AdapterModel(), artifacts={"adapter": str(adapter)},
                                       model_config={"base_model": params.base.model}, pip_requirements=["loraflow"],
                                       registered_model_name=registered_model_name(mode))
    version = str(info.registered_model_version)
    if champion:
        mlflow.MlflowClient().set_registered_model_alias(registered_model_name(mode), "champion", version)
    return version


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A project root with an SQLite registry of three modes, and the server running on a loopback port."""
    from loraflow.serve import ServeSettings, create_app

    root = tmp_path_factory.mktemp("serve")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    shutil.copytree(ROOT / "data" / "raw" / MODE, root / "data" / "raw" / "alpha")  # what the triggered curate reads
    overrides = [f"base.tracking_uri=sqlite:///{root / 'mlflow.db'}"]
    params = load_params(root / "params.yaml", overrides)
    adapters = {m: make_adapter(params, root / "adapters" / m, seed=i) for i, m in enumerate(MODES)}
    for m in MODES:
        register(params, m, adapters[m])
    # The threshold run only re-curates (the whole pipeline is tested in test_pipeline.py); `env` makes the
    # child import this checkout.
    curate = (f"env PYTHONPATH={ROOT} {sys.executable} -m steps.curate --params params.yaml "
              + " ".join(f"-S {o}" for o in overrides) + " data/raw/{mode} data/curated/{mode} --feedback data/raw/feedback/{mode}")
    settings = ServeSettings(root=root, overrides=overrides, lru_size=3, poll_interval=0.5, feedback_threshold=3,
                             trigger_command=curate, max_tokens_limit=64, max_chars=2000)
    app = create_app(params, settings)
    with serving(app) as url:
        try:
            yield {"root": root, "params": params, "url": url, "app": app, "settings": settings}
        finally:
            for run in app.state.feedback.runs.values():
                proc = run.get("process")
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)


@contextlib.contextmanager
def serving(app):
    """The app under uvicorn on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started and time.time() < deadline:
            time.sleep(0.1)
        assert server.started, "server did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def chat(url: str, mode: str | None, messages=Q, max_tokens: int = 6, **kw) -> dict:
    kw.setdefault("temperature", 0)  # greedy: answers comparable across calls (left out: the adapter's sampling)
    r = httpx.post(f"{url}/chat", json={"mode": mode, "messages": messages, "max_tokens": max_tokens, **kw}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_openai_client_chat_stream_and_models(env):
    from openai import OpenAI

    client = OpenAI(base_url=f"{env['url']}/v1", api_key="unused")
    ids = {m.id for m in client.models.list().data}
    assert ids == {"base", *MODES}

    r = client.chat.completions.create(model="alpha", messages=Q, max_tokens=8, temperature=0)
    answer = r.choices[0].message.content
    assert answer and r.usage.completion_tokens <= 8
    extra = r.model_extra["loraflow"]
    assert extra["mode"] == "alpha" and extra["version"] == "1" and extra["fallback"] is None
    assert r.system_fingerprint == extra["adapter"] and extra["adapter"].endswith("_alpha_v1")

    chunks = list(client.chat.completions.create(model="alpha", messages=Q, max_tokens=8, temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) > 3 and streamed == answer
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    base = client.chat.completions.create(model="base", messages=Q, max_tokens=8, temperature=0)
    assert base.system_fingerprint == "base" and base.choices[0].message.content != answer
    assert chat(env["url"], None, max_tokens=8)["answer"] == base.choices[0].message.content


def test_unknown_mode_answers_from_base_and_says_so(env):
    base = chat(env["url"], None)
    r = chat(env["url"], "no_such_mode")
    assert r["adapter"] == "base" and r["answer"] == base["answer"]
    assert "unknown mode 'no_such_mode'" in r["fallback"]


def test_unknown_mode_can_be_a_404(env):
    from fastapi.testclient import TestClient

    from loraflow.serve import create_app

    settings = type(env["settings"])(**{**vars(env["settings"]), "unknown_mode": "404", "poll_interval": 0})
    app = create_app(env["params"], settings, engine=env["app"].state.engine)
    with TestClient(app) as c:
        r = c.post("/chat", json={"mode": "no_such_mode", "messages": Q, "max_tokens": 2})
        assert r.status_code == 404 and "no_such_mode" in r.json()["detail"]


def test_bad_and_oversized_requests_are_refused_naming_the_field(env):
    url = env["url"]
    r = httpx.post(f"{url}/chat", json={"mode": "alpha"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "messages"]
    r = httpx.post(f"{url}/chat", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:4] == ["body", "messages", 0, "role"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "alpha", "messages": Q, "max_tokens": 65})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_tokens"]
    r = httpx.post(f"{url}/chat", json={"messages": [{"role": "user", "content": "x" * 2001}]})
    assert r.status_code == 413 and "2001 characters" in r.json()["detail"][0]["msg"]
    r = httpx.post(f"{url}/feedback", json={"response_id": "x", "rating": 9})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "rating"]
    r = httpx.post(f"{url}/feedback", json={"response_id": "x", "mode": "../etc", "rating": 3})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "mode"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_failing_adapter_load_falls_back_to_base_and_shows_in_health(env, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": "not a number"}))
    version = register(env["params"], "broken", broken)
    httpx.post(f"{env['url']}/adapters/reload", timeout=60)
    r = chat(env["url"], "broken")
    assert r["adapter"] == "base" and "failed to load" in r["fallback"]
    h = httpx.get(f"{env['url']}/health").json()
    assert h["status"] == "degraded" and h["failed_loads"]["broken"]["version"] == version
    assert chat(env["url"], "alpha")["version"] == "1"  # still serving


def test_champion_moves_while_serving_in_flight_request_finishes_on_old(env, tmp_path):
    from openai import OpenAI

    params, url = env["params"], env["url"]
    v1 = register(params, "delta", make_adapter(params, tmp_path / "d1", seed=11))
    httpx.post(f"{url}/adapters/reload", timeout=60)
    long_v1 = chat(url, "delta", max_tokens=40)
    assert long_v1["version"] == v1

    # A long streamed answer on v1 is in flight while the champion moves to v2.
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    stream = client.chat.completions.create(model="delta", messages=Q, max_tokens=40, temperature=0, stream=True)
    first = next(iter(stream))
    v2 = register(params, "delta", make_adapter(params, tmp_path / "d2", seed=12))
    deadline = time.time() + 60  # the poller (every 0.5 s) notices without being asked
    while httpx.get(f"{url}/health").json()["modes"]["delta"]["version"] != v2:
        assert time.time() < deadline, "the server did not see the new champion"
        time.sleep(0.2)
    rest = list(stream)
    text = (first.choices[0].delta.content or "") + "".join(c.choices[0].delta.content or "" for c in rest)
    assert rest[-1].model_extra["loraflow"]["version"] == v1 and text == long_v1["answer"]

    after = chat(url, "delta", max_tokens=40)
    assert after["version"] == v2 and after["adapter"].endswith(f"_delta_v{v2}") and after["answer"] != long_v1["answer"]
    names = [a["name"] for a in httpx.get(f"{url}/health").json()["loaded_adapters"]]
    assert long_v1["adapter"] not in names  # the old one was unloaded once its request finished


def test_a_mode_answers_with_its_adapters_generation_config(env, tmp_path):
    """A request that leaves decoding out gets the adapter's generation_config.json (what evaluate judged it
    with): here greedy with no token repeated, the exact answer peft + generate() give with those settings."""
    import torch
    from peft import PeftModel

    from loraflow import generation
    from loraflow.config import GenerateParams
    from loraflow.models import load_causal_lm, load_tokenizer, resolve

    params, url = env["params"], env["url"]
    adapter = make_adapter(params, tmp_path / "strict", seed=3)
    generation.write(adapter, GenerateParams(do_sample=False, no_repeat_ngram_size=1))
    register(params, "strict", adapter)
    httpx.post(f"{url}/adapters/reload", timeout=60)
    served = [httpx.post(f"{url}/chat", json={"mode": "strict", "messages": Q, "max_tokens": 24}, timeout=300).json()
              for _ in range(2)]

    tok = load_tokenizer(str(adapter))
    model = PeftModel.from_pretrained(load_causal_lm(resolve(params.base.model, params.base.model_cache)), str(adapter))
    enc = tok(tok.apply_chat_template(Q, tokenize=False, add_generation_prompt=True), return_tensors="pt",
              add_special_tokens=False)

    def direct(**kw) -> str:
        with torch.inference_mode():
            out = model.eval().generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id, **kw)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    expected = direct(no_repeat_ngram_size=1)
    assert served[0]["answer"] == served[1]["answer"] == expected  # greedy: its do_sample false, no temperature sent
    assert expected != direct()  # and the setting mattered: plain greedy repeats a token here


def test_50_concurrent_requests_across_three_modes(env):
    url = env["url"]
    prompts = (Q, Q2)
    single = {(m, i): chat(url, m, prompts[i])["answer"] for m in MODES for i in range(2)}
    assert len({single[(m, 0)] for m in MODES}) == 3  # the modes really differ

    def one(k: int) -> tuple[int, dict]:
        m, i = MODES[k % 3], k % 2
        r = httpx.post(f"{url}/v1/chat/completions", timeout=600,
                       json={"model": m, "messages": prompts[i], "max_tokens": 6, "temperature": 0})
        return k, {"status": r.status_code, **(r.json() if r.status_code == 200 else {"text": r.text})}

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(one, range(50)))
    errors = [r for _, r in results if r["status"] != 200]
    assert not errors, errors[:3]
    for k, r in results:
        m, i = MODES[k % 3], k % 2
        assert r["loraflow"]["mode"] == m and r["loraflow"]["adapter"].split("_", 1)[1].startswith(f"{m}_v")
        assert r["choices"][0]["message"]["content"] == single[(m, i)], (k, m)


def test_requests_sent_together_share_one_batch_across_modes_with_the_same_greedy_answers(env):
    """Three modes and the base model, two prompts and two lengths, one request streamed: one generate() call,
    each row with its own adapter (peft adapter_names), and every answer the one it gets alone."""
    from openai import OpenAI

    url, settings = env["url"], env["settings"]
    cases = [(m, i, n) for m in (*MODES, None) for i, n in ((0, 6), (1, 9))]
    prompts = (Q, Q2)
    alone = {c: chat(url, c[0], prompts[c[1]], max_tokens=c[2]) for c in cases}
    assert {r["batch_size"] for r in alone.values()} == {1}
    assert len({alone[(m, 0, 6)]["answer"] for m in (*MODES, None)}) == 4  # the rows really differ

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")

    def streamed() -> str:
        chunks = client.chat.completions.create(model="beta", messages=Q2, max_tokens=9, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    window, settings.batch_window_ms = settings.batch_window_ms, 1500  # all ten surely arrive inside it
    try:
        with ThreadPoolExecutor(max_workers=len(cases) + 1) as pool:
            stream = pool.submit(streamed)
            together = dict(zip(cases, pool.map(lambda c: chat(url, c[0], prompts[c[1]], max_tokens=c[2]), cases),
                                strict=True))
            text = stream.result()
    finally:
        settings.batch_window_ms = window
    assert {r["batch_size"] for r in together.values()} == {len(cases) + 1}
    for c in cases:
        assert together[c]["answer"] == alone[c]["answer"], c
        assert together[c]["usage"]["completion_tokens"] == alone[c]["usage"]["completion_tokens"] <= c[2]
    assert text == alone[("beta", 1, 9)]["answer"]


def test_merged_mode_answers_like_the_adapter(env):
    before = chat(env["url"], "beta", max_tokens=8)
    r = httpx.post(f"{env['url']}/adapters/beta/merge", timeout=120)
    assert r.status_code == 200 and r.json()["merged"] is True
    after = chat(env["url"], "beta", max_tokens=8)
    assert after["answer"] == before["answer"] and after["switch_ms"] == 0.0
    assert httpx.post(f"{env['url']}/adapters/no_such_mode/merge").status_code == 404


def test_feedback_past_threshold_starts_a_run_that_curates_it(env):
    url, root = env["url"], env["root"]
    served = chat(url, "alpha", max_tokens=6)
    correction = "Paris é a capital da França, e esta é a correção do usuário."
    posts = [
        {"response_id": served["id"], "rating": 5},
        {"response_id": served["id"], "rating": 2, "correction": correction},
        {"mode": "alpha", "messages": Q2, "preferred": "Azul, a cor preferida.", "rejected": "Não sei."},
    ]
    outs = []
    for body in posts:
        r = httpx.post(f"{url}/feedback", json=body, timeout=60)
        assert r.status_code == 200, r.text
        outs.append(r.json())
    assert [o["run_started"] is None for o in outs] == [True, True, False]
    lines = [json.loads(x) for x in Path(outs[0]["file"]).read_text().splitlines()]
    assert len(lines) == 3 and lines[0]["answer"] == served["answer"] and lines[0]["adapter_version"] == "1"
    assert lines[1]["messages"] == Q and lines[1]["correction"] == correction

    proc = env["app"].state.feedback.runs["alpha"]["process"]
    assert proc.wait(timeout=300) == 0, Path(outs[2]["run_started"]["log"]).read_text()[-3000:]
    cur = root / "data" / "curated" / "alpha"
    sft = [json.loads(x) for f in ("train.jsonl", "eval.jsonl") for x in (cur / f).read_text().splitlines()]
    from_fb = [r for r in sft if r["source"].startswith("feedback/alpha/")]
    assert {r["messages"][-1]["content"] for r in from_fb} == {normalise(served["answer"], False, Counter()), correction}
    prefs = [json.loads(x) for x in (cur / "prefs.jsonl").read_text().splitlines()]
    assert {(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in prefs} == {
        (correction, normalise(served["answer"], False, Counter())), ("Azul, a cor preferida.", "Não sei.")}
    assert httpx.get(f"{url}/health").json()["feedback"]["alpha"]["run_exit_code"] == 0


def test_loraflow_serve_command_listens_on_loopback_and_answers(env):
    """The real CLI in its own process, against the same registry: health, models, an answer."""
    import os
    import subprocess

    port = free_port()
    sets = [a for o in env["settings"].overrides for a in ("-S", o)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--poll-interval", "0",
         "--params", str(env["root"] / "params.yaml"), "--root", str(env["root"]), *sets],
        cwd=env["root"], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "loraflow serve did not come up"
            try:
                h = httpx.get(f"{url}/health", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert h["base_model"] == "embedded:SmolLM2-135M-Instruct" and set(MODES) <= set(h["modes"])
        assert chat(url, "gamma")["adapter"].endswith("_gamma_v1")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


KEYS = {"trainer": "sk-lf-trainer-0123456789", "viewer": "sk-lf-viewer-0123456789", "slow": "sk-lf-slow-0123456789ab"}


def keyed_client(env, root: Path, **kw):
    """A TestClient on an app with API keys, sharing the module's engine (no second model load)."""
    from fastapi.testclient import TestClient

    from loraflow.serve import auth, create_app

    keys = [auth.ApiKey("trainer", auth.digest(KEYS["trainer"]), train=True, rpm=1000),
            auth.ApiKey("viewer", auth.digest(KEYS["viewer"]), train=False, rpm=1000),
            auth.ApiKey("slow", auth.digest(KEYS["slow"]), train=True, rpm=2)]
    settings = type(env["settings"])(**{**vars(env["settings"]), "root": root, "poll_interval": 0, "keys": keys, **kw})
    return TestClient(create_app(env["params"], settings, engine=env["app"].state.engine))


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def test_api_keys_401_openai_errors_and_per_key_rate_limit(env, tmp_path):
    import openai

    with keyed_client(env, tmp_path) as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key" and "didn't provide an API key" in r.json()["error"]["message"]
        r = c.post("/chat", json={"mode": "alpha", "messages": Q}, headers={"Authorization": "Bearer sk-lf-wrong-0123456789"})
        assert r.status_code == 401 and r.json()["error"]["message"] == "Incorrect API key provided."
        assert c.post("/feedback", json={"mode": "alpha", "messages": Q, "rating": 5, "answer": "x"}).status_code == 401
        assert c.post("/adapters/reload").status_code == 401
        assert set(c.get("/health").json()) == {"status"}  # liveness for anyone, the details for key holders
        assert set(MODES) <= set(c.get("/health", headers=bearer("viewer")).json()["modes"])

        client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEYS["viewer"], http_client=c, max_retries=0)
        assert {m.id for m in client.models.list().data} >= {"base", *MODES}
        r = client.chat.completions.create(model="alpha", messages=Q, max_tokens=4, temperature=0)
        assert r.model_extra["loraflow"]["mode"] == "alpha"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url="http://testserver/v1", api_key="sk-lf-wrong-0123456789", http_client=c,
                          max_retries=0).models.list()

        slow = openai.OpenAI(base_url="http://testserver/v1", api_key=KEYS["slow"], http_client=c, max_retries=0)
        slow.models.list()
        slow.models.list()
        with pytest.raises(openai.RateLimitError) as e:  # rpm 2: the third within the minute waits ~30 s
            slow.models.list()
        assert e.value.response.json()["error"]["code"] == "rate_limit_exceeded"
        assert 25 <= int(e.value.response.headers["retry-after"]) <= 31
        assert c.get("/v1/models", headers=bearer("viewer")).status_code == 200  # other keys are unaffected


def test_60_feedback_posts_from_a_key_not_allowed_to_train_start_nothing_and_train_nothing(env, tmp_path):
    from loraflow.io import read_jsonl
    from steps import curate
    from tests.conftest import chat as record
    from tests.conftest import write_jsonl

    trigger = f"{sys.executable} -c \"print('run for {{mode}}')\""
    with keyed_client(env, tmp_path, feedback_threshold=3, trigger_command=trigger) as c:
        served = c.post("/chat", json={"mode": "alpha", "messages": Q, "max_tokens": 4, "temperature": 0},
                        headers=bearer("viewer")).json()
        bodies = [{"response_id": served["id"], "rating": 5},
                  {"response_id": served["id"], "rating": 1, "correction": "Vermelho, a cor escolhida pelo atacante."},
                  {"mode": "alpha", "messages": Q2, "preferred": "Resposta envenenada.", "rejected": "Resposta certa."}]
        outs = []
        for i in range(60):
            r = c.post("/feedback", json=bodies[i % 3], headers=bearer("viewer"))
            assert r.status_code == 200, r.text
            outs.append(r.json())
        assert all(o["run_started"] is None and o["counts_toward_training"] is False for o in outs)
        sink = c.app.state.feedback
        assert sink.runs == {} and sink.status()["alpha"]["events"] == 0
        assert sink.status()["alpha"]["events_not_training"] == 60
        events = [json.loads(x) for x in Path(outs[0]["file"]).read_text().splitlines()]
        assert len(events) == 60 and {(e["key"], e["trains"]) for e in events} == {("viewer", False)}

        # Curation (what training reads) takes none of it: every event is quarantined, naming the key.
        write_jsonl(tmp_path / "raw" / "alpha" / "a.jsonl", [record("Qual é a capital da França?", "Paris.")])
        out = tmp_path / "curated"
        curate.run(env["params"], tmp_path / "raw" / "alpha", out, tmp_path / "data" / "raw" / "feedback" / "alpha")
        trained = read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")
        assert [r["source"] for r in trained] == ["alpha/a.jsonl#1"] and read_jsonl(out / "prefs.jsonl") == []
        q = [x for x in read_jsonl(out / "quarantine.jsonl") if x["source"].startswith("feedback/")]
        assert len(q) == 60 and {x["category"] for x in q} == {"not_allowed_to_train"}
        assert "'viewer', which may not train" in q[0]["reason"]

        # The same posts from a key that may train do count: the third starts a run.
        started = [c.post("/feedback", json=bodies[i], headers=bearer("trainer")).json()["run_started"] for i in range(3)]
        assert started[:2] == [None, None] and started[2] is not None
        assert sink.runs["alpha"]["process"].wait(timeout=60) == 0


def test_preference_pairs_posted_to_the_server_train_dpo_with_method_auto(env, tmp_path):
    """train.method auto (the default): pairs posted through /feedback by a key that may train reach prefs.jsonl,
    and the run the threshold starts trains SFT, then DPO on them."""
    from loraflow.io import read_json, read_jsonl

    root = tmp_path
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    shutil.copytree(ROOT / "data" / "raw" / MODE, root / "data" / "raw" / "alpha")
    sets = " ".join(f"-S {o}" for o in [*env["settings"].overrides, "train.max_steps=1", "train.dpo_max_steps=1",
                                        "train.batch_size=2", "train.dpo_min_pairs=3", "train.save_steps=100"])
    py = f"env PYTHONPATH={ROOT} {sys.executable} -m"
    steps = [f"{py} steps.curate --params params.yaml {sets} data/raw/{{mode}} data/curated/{{mode}} --feedback data/raw/feedback/{{mode}}",
             f"{py} steps.validate --params params.yaml {sets} data/curated/{{mode}} data/validation/{{mode}} data/profiles/{{mode}}.json",
             f"{py} steps.train --mode {{mode}} --params params.yaml {sets} data/validation/{{mode}}/report.json "
             "data/curated/{mode} data/adapters/{mode}"]
    pairs = [("Azul, como o céu.", "Não sei."), ("Verde, como as folhas.", "Cor."), ("Vermelho, como o fogo.", "?")]
    with keyed_client(env, root, feedback_threshold=3, trigger_command=f"sh -c '{' && '.join(steps)}'") as c:
        outs = [c.post("/feedback", json={"mode": "alpha", "messages": Q, "preferred": p, "rejected": r},
                       headers=bearer("trainer")).json() for p, r in pairs]
        assert [o["run_started"] is None for o in outs] == [True, True, False]
        proc = c.app.state.feedback.runs["alpha"]["process"]
        assert proc.wait(timeout=900) == 0, Path(outs[2]["run_started"]["log"]).read_text()[-3000:]
    prefs = read_jsonl(root / "data" / "curated" / "alpha" / "prefs.jsonl")
    assert sorted((p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in prefs) == sorted(pairs)
    info = read_json(root / "data" / "adapters" / "alpha" / "train_info.json")
    assert info["method"] == "auto" and [s["stage"] for s in info["stages"]] == ["sft", "dpo"]
    assert info["pref_records"] == 3 and "3 preference pairs >= train.dpo_min_pairs 3" in info["method_reason"]


def test_a_worse_candidate_leaves_the_champion_and_the_served_answers_and_health_and_report_say_so(env, capsys):
    """A loop round whose candidate is worse than the champion: promote rejects it (the real step, against the
    registry the server polls), the mode keeps answering with the same version and the same words, and both
    /health and `loraflow report` say which version stays champion and why."""
    from loraflow.cli import main as cli_main
    from loraflow.io import sha256_file, write_json
    from steps import promote
    from tests.test_registry import summary

    root, params, url = env["root"], env["params"], env["url"]
    before = chat(url, "alpha", max_tokens=12)
    assert before["version"] == "1"

    import mlflow

    from loraflow import tracking
    with mlflow.start_run(experiment_id=tracking.setup(params, "alpha")) as run:
        pass
    worse = make_adapter(params, root / "adapters" / "alpha-worse", seed=21)
    write_json(worse / "train_info.json", {"adapter_sha256": sha256_file(worse / "adapter_model.safetensors"),
                                          "mlflow_run_id": run.info.run_id})
    ev = root / "data" / "eval" / "alpha"
    write_json(ev / "metrics.json", {
        "eval_set": {"path": "eval.jsonl", "sha256": "e" * 64, "size": 6}, "base": summary(0.2),
        "champion": summary(0.40), "champion_version": "1", "candidate": summary(0.15), "deltas": {}})
    out = promote.run(params, "alpha", ev / "metrics.json", worse, root / "data" / "promotion" / "alpha")
    assert out["decision"] == "reject" and out["aliases_after"]["champion"] == "1" and out["version"] is None

    httpx.post(f"{url}/adapters/reload", timeout=60)
    after = chat(url, "alpha", max_tokens=12)
    assert after["version"] == "1" and after["answer"] == before["answer"]
    last = httpx.get(f"{url}/health").json()["modes"]["alpha"]["last_outcome"]
    assert last["decision"] == "reject" and last["champion_after"] == "1" and "champion" in last["reason"]

    assert cli_main(["report", "--mode", "alpha", "--root", str(root), "--params", str(root / "params.yaml"),
                     "-S", params_override(params)]) == 0
    printed = capsys.readouterr().out
    assert "champion stays loraflow-alpha v1; the candidate (not registered) is not served" in printed


def params_override(params) -> str:
    return f"base.tracking_uri={params.base.tracking_uri}"


def scrape(get) -> dict[tuple[str, frozenset], float]:
    """GET /metrics parsed by prometheus-client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_count_what_the_clients_did(env, tmp_path):
    """A server of its own (its own registry and engine), a known mix of requests; /metrics agrees with it."""
    from openai import OpenAI

    from loraflow.serve import ServeSettings, create_app

    params = load_params(ROOT / "params.yaml", [f"base.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    register(params, "alpha", env["root"] / "adapters" / "alpha")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": "not a number"}))
    register(params, "broken", broken)
    app = create_app(params, ServeSettings(root=tmp_path, poll_interval=0, feedback_threshold=0, max_tokens_limit=16))
    with serving(app) as url:
        get = lambda path: httpx.get(f"{url}{path}", timeout=60)  # noqa: E731
        before = scrape(get)
        assert not any(k[0].startswith("loraflow_requests") for k in before)  # another server's counts are not here
        served = [chat(url, "alpha") for _ in range(3)] + [chat(url, None)] + [chat(url, "broken") for _ in range(2)]
        assert [r["adapter"] == "base" for r in served] == [False] * 3 + [True] * 3
        with ThreadPoolExecutor(max_workers=4) as pool:  # sent together: they may share batches
            assert all(r["version"] == "1" for r in pool.map(lambda _: chat(url, "alpha"), range(4)))
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        for _ in range(2):
            client.chat.completions.create(model="alpha", messages=Q, max_tokens=4, temperature=0)
        chunks = list(client.chat.completions.create(model="alpha", messages=Q, max_tokens=4, temperature=0, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert httpx.post(f"{url}/chat", json={"mode": "alpha"}).status_code == 422  # no messages: refused unparsed
        assert httpx.post(f"{url}/chat", json={"mode": "alpha", "messages": Q, "max_tokens": 17}).status_code == 422
        for rating in (5, 4, 1):
            assert httpx.post(f"{url}/feedback", json={"response_id": served[0]["id"], "rating": rating}).status_code == 200
        assert get("/health").status_code == 200
        m = scrape(get)

    def v(name: str, **labels) -> float:
        return m.get((name, frozenset(labels.items())), 0.0)

    # requests by route, mode and status; /metrics itself is not counted
    assert v("loraflow_requests_total", route="/chat", mode="alpha", status="200") == 7
    assert v("loraflow_requests_total", route="/chat", mode="base", status="200") == 1
    assert v("loraflow_requests_total", route="/chat", mode="broken", status="200") == 2
    assert v("loraflow_requests_total", route="/v1/chat/completions", mode="alpha", status="200") == 3
    assert v("loraflow_requests_total", route="/chat", mode="", status="422") == 1
    assert v("loraflow_requests_total", route="/chat", mode="alpha", status="422") == 1
    assert v("loraflow_requests_total", route="/feedback", mode="alpha", status="200") == 3
    assert v("loraflow_requests_total", route="/health", mode="", status="200") == 1
    total = sum(x for (n, _), x in m.items() if n == "loraflow_requests_total")
    assert total == 19 and not any(dict(k[1]).get("route") == "/metrics" for k in m)
    # every request's latency observed once, under the same labels
    assert sum(x for (n, _), x in m.items() if n == "loraflow_request_duration_seconds_count") == 19
    assert v("loraflow_request_duration_seconds_count", route="/v1/chat/completions", mode="alpha") == 3
    # time in the queue for each generation (a failed adapter's request is generated by the base model)
    assert v("loraflow_queue_seconds_count", mode="alpha") == 10 and v("loraflow_queue_seconds_count", mode="base") == 3
    # every generated row sits in exactly one batch
    assert v("loraflow_batch_size_sum") == 13 and 1 <= v("loraflow_batch_size_count") <= 13
    # adapters: alpha loaded once and still loaded; broken tried (and failed) once per request
    assert v("loraflow_adapter_loads_total", mode="alpha") == 1 and v("loraflow_adapters_loaded", mode="alpha") == 1
    assert v("loraflow_adapter_load_failures_total", mode="broken") == 2
    assert v("loraflow_adapters_failing", mode="broken") == 1 and v("loraflow_adapters_loaded", mode="broken") == 0
    # feedback events written, as many as lines on disk
    assert v("loraflow_feedback_events_total", mode="alpha", trains="true") == 3
    lines = [x for f in (tmp_path / "data" / "raw" / "feedback" / "alpha").glob("*.jsonl") for x in f.read_text().splitlines()]
    assert len(lines) == 3


def test_metrics_need_a_key_when_keys_are_set_but_spend_no_rate_limit(env, tmp_path):
    with keyed_client(env, tmp_path) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer sk-lf-wrong-0123456789"}).status_code == 401
        for _ in range(4):  # the "slow" key may make 2 requests a minute
            assert c.get("/metrics", headers=bearer("slow")).status_code == 200
        assert c.get("/v1/models", headers=bearer("slow")).status_code == 200
        assert c.get("/v1/models").status_code == 401
        m = scrape(lambda path: c.get(path, headers=bearer("viewer")))
        assert m[("loraflow_requests_total", frozenset({"route": "/v1/models", "mode": "", "status": "200"}.items()))] == 1
        # a refusal comes before routing: counted under route "other"; the scrapes are not counted at all
        assert m[("loraflow_requests_total", frozenset({"route": "other", "mode": "", "status": "401"}.items()))] == 1
        assert sum(x for (n, _), x in m.items() if n == "loraflow_requests_total") == 2


def test_a_modes_only_adapter_replaced_by_a_new_version_still_answers(env, tmp_path):
    """A server whose one loaded adapter is unloaded (its mode's champion moved) then loads the new version: peft
    kept the deleted name active, and the next request failed with a KeyError (found by bench/loop.py)."""
    from loraflow.serve.adapters import Adapter
    from loraflow.serve.engine import Engine

    params = env["params"]
    eng = Engine(params, env["settings"])
    try:
        first, second = (make_adapter(params, tmp_path / n, seed=s) for n, s in (("v1", 31), ("v2", 32)))
        eng.attach(first, "a1_solo_v1")
        eng.detach("a1_solo_v1")
        eng.attach(second, "a2_solo_v2")
        out = eng.generate(Adapter("a2_solo_v2", "solo", "2", second), Q, 6, 0.0, None)
        assert out["text"] and out["finish_reason"] in ("stop", "length")
    finally:
        eng.close()


def test_a_corrupt_adapter_file_leaves_nothing_in_the_model_and_base_answers_once_all_are_unloaded(tmp_path):
    """An adapter whose weights file stops halfway (a torn upload): peft injected its layers before reading the
    weights, so every failed try (each request to the mode retries) left a half-loaded adapter in the model, and the
    first load, failing, left LoRA layers in the base model itself. And once every adapter was unloaded, peft still
    named the last one active: a base-model request failed with a KeyError, a 500 (both found by bench/soak.py)."""
    from loraflow.serve import ServeSettings
    from loraflow.serve.adapters import Adapter
    from loraflow.serve.engine import Engine

    params = load_params(ROOT / "params.yaml")
    good = make_adapter(params, tmp_path / "good", seed=41)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    def lora_modules(model) -> int:
        return sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))

    eng = Engine(params, ServeSettings(root=tmp_path))
    try:
        with pytest.raises(Exception, match="(?i)safetensor|deserializ|metadata"):
            eng.attach(corrupt, "a1_bad_v1")  # the first load: no PeftModel yet
        assert eng.peft is None and lora_modules(eng.base) == 0 and eng.attached() == 0
        eng.attach(good, "a2_good_v1")
        for n in range(3):
            with pytest.raises(Exception, match="(?i)safetensor|deserializ|metadata"):
                eng.attach(corrupt, f"a{3 + n}_bad_v1")
        assert list(eng.peft.peft_config) == ["a2_good_v1"] and eng.attached() == 1
        out = eng.generate(Adapter("a2_good_v1", "good", "1", good), Q, 6, 0.0, None)
        assert out["text"] and out["finish_reason"] in ("stop", "length")
        eng.detach("a2_good_v1")  # the last adapter unloaded (its mode's champion moved)
        assert eng.attached() == 0
        base = eng.generate(None, Q, 6, 0.0, None)
        assert base["text"] and base["text"] != out["text"]
    finally:
        eng.close()


def test_a_request_that_fails_is_counted_as_a_500(env, monkeypatch):
    """A handler that raises answers 500; /metrics must count it (it counted nothing: found by bench/soak.py)."""
    from fastapi.testclient import TestClient

    from loraflow.serve import create_app

    settings = type(env["settings"])(**{**vars(env["settings"]), "poll_interval": 0})
    engine = env["app"].state.engine
    app = create_app(env["params"], settings, engine=engine)

    def fails(*args, **kwargs):  # the fault: generation raises, as peft's KeyError did
        raise RuntimeError("injected generation failure")

    with TestClient(app, raise_server_exceptions=False) as c:
        monkeypatch.setattr(engine, "generate", fails)
        r = c.post("/chat", json={"mode": "alpha", "messages": Q, "max_tokens": 2})
        monkeypatch.undo()
        assert r.status_code == 500
        m = scrape(c.get)
    assert m[("loraflow_requests_total", frozenset({"route": "/chat", "mode": "alpha", "status": "500"}.items()))] == 1
    assert m[("loraflow_request_duration_seconds_count", frozenset({"route": "/chat", "mode": "alpha"}.items()))] == 1


def test_other_requests_answer_while_health_waits_for_a_feedback_append(env):
    """An append holds the feedback lock across two fsyncs (seconds on a busy disk). /health reads the feedback
    status under that lock: on the event loop, it stopped every other request with it (bench/soak.py: 15 s)."""
    url, sink = env["url"], env["app"].state.feedback
    got = {}
    with sink.lock:  # an append in progress, its fsync stuck
        waiting = threading.Thread(target=lambda: got.update(health=httpx.get(f"{url}/health", timeout=120)))
        waiting.start()
        time.sleep(1.0)  # /health is waiting for the lock now
        t = time.perf_counter()
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200
        assert time.perf_counter() - t < 10 and waiting.is_alive()
    waiting.join(60)
    assert got["health"].status_code == 200 and got["health"].json()["status"] in ("ok", "degraded")

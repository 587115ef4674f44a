"""The end-of-turn contract, behaviourally, for three chat-template styles whose end of turn is not the eos
(ChatML with <|endoftext|> as eos, Llama-3-like <|eot_id|> vs <|end_of_text|>, Gemma-like <end_of_turn> vs <eos>),
in every path that answers: the train loss mask, evaluation, the server engine (batched, streamed, merged; the
base model's "__base__" rows too) and the MLflow pyfunc model.

Per style, a tiny random Llama model learns (all tokens) a two-turn conversation, so after an answer and its end
of turn it goes on writing the next turn, as real models do; then a LoRA adapter learns another answer through the
project's own loss mask (trainer.sft_dataset, labels as trl builds them from it). A path that stopped at the eos
alone would return the answer followed by the next turn's text; every path must return exactly the answer, say it
stopped, and agree with the others. Nothing is mocked: the engine loads the model folder as `loraflow serve` does
(the adapter is attached as its adapter cache attaches a registry version; test_serve.py covers the registry).
About 25 s for the module on 2 shared cores, 7 of them MLflow creating its SQLite store once.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from loraflow import generation
from loraflow.config import Params
from tests.test_generation import TEMPLATES, _tokenizer

STYLES = sorted(TEMPLATES)
Q, Q2 = "what is retail media", "and more"
BASE_ANSWER, ADAPTER_ANSWER, A2 = "ads on shop sites", "ads where people buy", "sure more please"
WORDS = tuple(" ".join([Q, Q2, BASE_ANSWER, ADAPTER_ANSWER, A2]).split())
MAX_NEW = 16
MODE = "contract"


def _turns(answer: str, follow_up: bool, system: bool = False) -> list[dict]:
    msgs = [{"role": "system", "content": "hi"}] * system
    msgs += [{"role": "user", "content": Q}, {"role": "assistant", "content": answer}]
    return msgs + [{"role": "user", "content": Q2}, {"role": "assistant", "content": A2}] * follow_up


# One prompt, and a longer one (a system turn, a past exchange) whose rows are left-padded in a batch.
PROMPTS = [_turns("", False)[:1], _turns(ADAPTER_ANSWER, True, system=True)[:-1]]
EXPECTED = {"base": [BASE_ANSWER, A2], "adapter": [ADAPTER_ANSWER, A2]}


def _fit(model, rows: list[tuple[list[int], list[int]]], steps: int, lr: float) -> None:
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        for ids, labels in rows:
            model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrices this small only contend for threads: training the fixture took 5-40 s with torch's default
    threads on 2 shared cores, 0.3 s with one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the module (evaluation looks up a champion; there is none)."""
    return f"sqlite:///{tmp_path_factory.mktemp('contract-store') / 'mlflow.db'}"


@pytest.fixture(scope="module", params=STYLES)
def style(request, tmp_path_factory, store):
    """A tiny base model (saved as a model folder) that continues past the end of turn, and a LoRA adapter
    trained through the project's loss mask, saved as train saves it (tokenizer, generation_config.json)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraflow.trainer import sft_dataset

    name = request.param
    root = tmp_path_factory.mktemp(f"contract-{name}")
    tok = _tokenizer(name, WORDS)
    eot = tok.convert_tokens_to_ids(TEMPLATES[name][3])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id  # as a base model ships it: the eos only
    # The base learns whole conversations, the turn after the answer included: it does not stop by itself.
    texts = [tok.apply_chat_template(c, tokenize=False)
             for c in (_turns(BASE_ANSWER, True), _turns(ADAPTER_ANSWER, True, system=True))]
    base_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    _fit(model, [(ids, ids) for ids in base_ids], steps=60, lr=3e-3)
    base_dir = root / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)

    # The adapter learns its answers through the project's loss mask, labels built as trl builds them.
    params = Params.model_validate({"base": {"model": str(base_dir), "tracking_uri": store},
                                    "generate": {"max_new_tokens": MAX_NEW}})
    records = [{"messages": _turns(ADAPTER_ANSWER, False)}, {"messages": _turns(ADAPTER_ANSWER, True, system=True)}]
    dataset, truncated = sft_dataset(tok, records, 128, True, str(base_dir))
    assert truncated == 0
    rows = [(r["input_ids"], [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"], strict=True)])
            for r in dataset]
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    _fit(peft_model, rows, steps=40, lr=1e-2)
    adapter_dir = root / "adapter"
    peft_model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    generation.write(adapter_dir, params.generate)
    return SimpleNamespace(name=name, tok=tok, eot=eot, params=params, base_dir=base_dir, adapter_dir=adapter_dir,
                           records=records, dataset=dataset, root=root)


def _load(style, adapter: bool):
    from peft import PeftModel

    from loraflow.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(style.base_dir)).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, str(style.adapter_dir)).eval()
    return model, load_tokenizer(str(style.adapter_dir))


# ------------------------------------------------------------------------------------------- the models

@pytest.mark.parametrize("which", ["base", "adapter"])
def test_without_the_contract_the_models_write_past_their_end_of_turn(style, which):
    """The premise: stopping at the eos alone returns the answer, the end of turn and the next turn's text."""
    import torch

    model, tok = _load(style, which == "adapter")
    text = tok.apply_chat_template(PROMPTS[0], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    answer = tok(EXPECTED[which][0], add_special_tokens=False)["input_ids"]
    assert new[:len(answer) + 1] == [*answer, style.eot], tok.convert_ids_to_tokens(new)
    trailing = new[len(answer) + 1:]
    assert len(trailing) >= 3 and tok.eos_token_id not in trailing[:3]
    assert tok.decode(new, skip_special_tokens=True).strip() != EXPECTED[which][0]


# ------------------------------------------------------------------------------------------- 1. train's loss mask

def test_loss_mask_covers_each_answer_and_its_end_of_turn_and_nothing_of_the_prompt(style):
    tok = style.tok
    for rec, row in zip(style.records, style.dataset, strict=True):
        ids, mask = row["input_ids"], row["assistant_masks"]
        learned = [t for t, m in zip(ids, mask, strict=True) if m]
        want = []
        for m in rec["messages"]:
            if m["role"] == "assistant":
                want += [*tok(m["content"], add_special_tokens=False)["input_ids"], style.eot]
        assert learned == want, tok.convert_ids_to_tokens(learned)
        assert tok.eos_token_id not in learned  # the turn ends at the template's token, not at the eos
        # contiguous spans: everything between two answers (the user turn, the headers) is masked out
        first = mask.index(1)
        assert not any(mask[:first]) and ids[first - 1] != style.eot


# ------------------------------------------------------------------------------------------- 2. evaluation

def test_evaluation_stops_every_model_at_the_end_of_turn(style):
    """evaluate's own sequence (steps/evaluate.py): the candidate's tokenizer and generation_config.json, the
    end-of-turn ids, then evaluation.answer_every_model (base, then the candidate, on one model)."""
    from loraflow import evaluation
    from loraflow.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(style.adapter_dir))
    model = load_causal_lm(str(style.base_dir)).eval()
    stop_ids = generation.end_of_turn_ids(tok, model)
    assert style.eot in stop_ids
    gp = generation.load(style.adapter_dir, style.params.generate)
    gens, champion, _ = evaluation.answer_every_model(style.params, MODE, model, tok, style.adapter_dir, PROMPTS, gp,
                                                      stop_ids)
    assert champion is None and set(gens) == {"base", "candidate"}
    assert gens["base"].answers == EXPECTED["base"] and gens["candidate"].answers == EXPECTED["adapter"]
    for g in gens.values():
        assert g.stopped == [True, True]
        assert g.new_tokens == [len(a.split()) + 1 for a in g.answers]  # the answer's words and the end of turn


# ------------------------------------------------------------------------------------------- 3. the server's engine

@pytest.fixture(scope="module")
def engine(style):
    """The real Engine on the tiny base model folder, with the adapter attached as the adapter cache attaches
    a registry version (its name, its generation_config.json); the registry itself is test_serve.py's."""
    from loraflow.serve.adapters import Adapter
    from loraflow.serve.engine import Engine
    from loraflow.serve.settings import ServeSettings

    eng = Engine(style.params, ServeSettings(root=style.root, batch_window_ms=10))
    name = f"a1_{MODE}_v1"
    eng.attach(style.adapter_dir, name)
    ad = Adapter(name, MODE, "1", style.adapter_dir, gen=generation.load(style.adapter_dir, style.params.generate))
    try:
        yield SimpleNamespace(eng=eng, ad=ad)
    finally:
        eng.close()


def _check(out: dict, want: str) -> None:
    assert out["text"] == want
    assert out["finish_reason"] == "stop" and out["completion_tokens"] == len(want.split())


def test_engine_batched_and_streamed_rows_stop_at_the_end_of_turn(style, engine):
    """Adapter rows, "__base__" rows and a streamed row, two prompt lengths, in one generate() call, greedy
    (temperature 0, as a parity replay asks): each answer is exactly evaluation's, and says "stop"."""
    from concurrent.futures import ThreadPoolExecutor

    from loraflow.serve.engine import TokenStream

    eng, ad = engine.eng, engine.ad
    chunks: list[str] = []
    stream = TokenStream(eng, chunks.append)
    cases = [(a, i) for a in (ad, None) for i in range(len(PROMPTS))]
    eng.settings.batch_window_ms = 1000  # all five surely arrive inside it
    try:
        with ThreadPoolExecutor(max_workers=len(cases) + 1) as pool:
            streamed = pool.submit(eng.generate, ad, PROMPTS[1], MAX_NEW, 0.0, None, streamer=stream)
            outs = list(pool.map(lambda c: eng.generate(c[0], PROMPTS[c[1]], MAX_NEW, 0.0, None), cases))
            streamed = streamed.result()
    finally:
        eng.settings.batch_window_ms = 10
    assert {o["batch_size"] for o in [*outs, streamed]} == {len(cases) + 1}
    for (a, i), out in zip(cases, outs, strict=True):
        _check(out, EXPECTED["adapter" if a else "base"][i])
    _check(streamed, A2)
    assert "".join(chunks) == A2 and len(chunks) == len(A2.split())  # token by token, nothing after the turn
    # alone, each row answers the same (no padding, no neighbours)
    for (a, i), out in zip(cases, outs, strict=True):
        alone = eng.generate(a, PROMPTS[i], MAX_NEW, 0.0, None)
        assert alone["batch_size"] == 1 and alone["text"] == out["text"]


def test_engine_base_rows_decode_with_the_engines_base_settings_as_evaluation_would(style, engine):
    """ "__base__" rows take Engine.base_gen (params.yaml `generate`), adapter rows their generation_config.json.
    With base settings that forbid repeating any token, the base answers differently, exactly as evaluation
    answers under those settings (batched or alone), and the adapter's rows do not move. (no_repeat_ngram_size=1
    also forbids the end-of-turn token, which every prompt holds: such an answer runs to max_tokens, "length".)"""
    from loraflow.config import GenerateParams

    eng, ad = engine.eng, engine.ad
    assert eng.base_gen == style.params.generate == generation.load(style.adapter_dir)  # one section, both sides
    assert eng.health()["base_generation"] == eng.base_gen.model_dump()
    strict = GenerateParams(max_new_tokens=MAX_NEW, no_repeat_ngram_size=1)
    model, tok = _load(style, adapter=False)
    evaluated = generation.generate_detailed(model, tok, PROMPTS, strict, batch_size=2)  # PROMPTS[0] left-padded
    assert evaluated.answers != EXPECTED["base"]
    # the padding is not counted as tokens the answer repeats: a row answers as it does alone
    assert generation.generate_detailed(model, tok, PROMPTS, strict, batch_size=1).answers == evaluated.answers
    before, eng.base_gen = eng.base_gen, strict
    try:
        served = [eng.generate(None, p, MAX_NEW, 0.0, None) for p in PROMPTS]
        assert [s["text"] for s in served] == evaluated.answers
        assert [s["finish_reason"] for s in served] == ["stop" if x else "length" for x in evaluated.stopped]
        assert [eng.generate(ad, p, MAX_NEW, 0.0, None)["text"] for p in PROMPTS] == EXPECTED["adapter"]
    finally:
        eng.base_gen = before


def test_engine_merged_adapter_stops_at_the_end_of_turn(style, engine):
    """POST /adapters/<mode>/merge's copy (AdapterCache.merge) answers through _run_merged, streamed too."""
    from loraflow.serve.engine import TokenStream

    eng, ad = engine.eng, engine.ad
    with eng.adapters.state:  # the cache's view once the registry named this version champion and it loaded
        eng.adapters.champions[MODE] = ad.version
        eng.adapters.loaded[(MODE, ad.version)] = ad
    assert eng.adapters.merge(MODE)["merged"] is True and ad.merged is not None
    for i, want in enumerate(EXPECTED["adapter"]):
        chunks: list[str] = []
        out = eng.generate(ad, PROMPTS[i], MAX_NEW, 0.0, None, streamer=TokenStream(eng, chunks.append))
        _check(out, want)
        assert "".join(chunks) == want


# ------------------------------------------------------------------------------------------- 4. the pyfunc model

def _save_pyfunc(style, path: Path, signature):
    import mlflow.pyfunc

    from loraflow.pyfunc import AdapterModel

    mlflow.pyfunc.save_model(str(path), python_model=AdapterModel(), artifacts={"adapter": str(style.adapter_dir)},
                             model_config={"base_model": str(style.base_dir)}, signature=signature,
                             pip_requirements=["loraflow"])
    return mlflow.pyfunc.load_model(str(path))


def _score(model, body: dict) -> list[str]:
    """One request as `mlflow models serve` handles it (its own parsing, schema enforcement, predict)."""
    import json

    from mlflow.pyfunc import scoring_server

    res = scoring_server.invocations(json.dumps(body), "application/json", model, model.metadata.get_input_schema())
    assert res.status == 200, res.response
    out = json.loads(res.response)
    return out if isinstance(out, list) else out["predictions"]  # an OpenAI-style body gets the bare list


def test_registered_pyfunc_model_stops_at_the_end_of_turn(style, tmp_path):
    """Saved with the signature promote registers (pyfunc.signature: per row a `prompt` string or `messages`):
    through the scoring server's request handling a prompt is one user turn, messages a whole conversation; unwrapped
    predict() takes whole conversations too."""
    import pandas as pd

    from loraflow import pyfunc

    model = _save_pyfunc(style, tmp_path / "registered", pyfunc.signature(MAX_NEW))
    assert _score(model, {"dataframe_records": [{"prompt": Q}]}) == [ADAPTER_ANSWER]
    assert _score(model, {"dataframe_records": [{"messages": p} for p in PROMPTS]}) == EXPECTED["adapter"]
    assert model.predict(pd.DataFrame({"prompt": [Q]})) == [ADAPTER_ANSWER]
    assert model.unwrap_python_model().predict(None, PROMPTS) == EXPECTED["adapter"]


def test_versions_registered_with_the_older_string_signature_still_answer(style, tmp_path):
    """Before the parity gate promote registered one string per prompt (infer_signature): such versions still
    answer through the scoring server, a prompt being one user turn."""
    from mlflow.models import infer_signature

    signature = infer_signature([Q], ["An answer."], params={"max_new_tokens": MAX_NEW})
    model = _save_pyfunc(style, tmp_path / "older", signature)
    assert _score(model, {"inputs": [Q]}) == [ADAPTER_ANSWER]
    assert model.predict([Q]) == [ADAPTER_ANSWER]


def test_pyfunc_model_with_the_conversation_signature_answers_eval_prompts_as_evaluation(style, tmp_path):
    """pyfunc.signature(): the eval prompts (a system turn, earlier turns) go through the scoring server whole,
    batched or as one OpenAI-style body, and come back exactly as evaluation answered them."""
    from loraflow import pyfunc

    model = _save_pyfunc(style, tmp_path / "conversations", pyfunc.signature(MAX_NEW))
    assert _score(model, {"inputs": [{"messages": p} for p in PROMPTS]}) == EXPECTED["adapter"]
    assert _score(model, {"dataframe_records": [{"messages": PROMPTS[1]}]}) == [A2]
    assert _score(model, {"messages": PROMPTS[1], "max_new_tokens": MAX_NEW}) == [A2]
    # max_new_tokens is honoured: two tokens of the answer, cut short
    assert _score(model, {"inputs": [{"messages": PROMPTS[0]}], "params": {"max_new_tokens": 2}}) == [
        " ".join(ADAPTER_ANSWER.split()[:2])]

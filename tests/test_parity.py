"""The parity comparison and its tolerances (loraflow.parity), and the report's lines about what is served.

The replays themselves run for real in tests/test_pipeline.py (all three targets on a trained adapter) and in
tests/test_generation.py (a serving path that stops at the eos alone is caught)."""

from __future__ import annotations

import pytest

from loraflow import parity
from loraflow.cli import served_line
from loraflow.config import ParityTolerance, load_params
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml", ["evaluate.bootstrap_samples=200"])


def save_tokenizer(folder):
    """A word-level ChatML tokenizer knowing every word used here, saved where gate() reads the adapter's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", *sorted({w for t in EVALUATED + REFS + ["user continua a b c"] for w in t.split()})]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(folder)


EVALUATED = ["O ROAS mede a receita por real investido.", "Retail media vende anúncios no varejo.", "Sim."]
REFS = ["ROAS é receita dividida pelo investimento.", "Retail media são anúncios em sites de varejo.", "Sim, pode."]


def test_identical_answers_agree_fully(params):
    r = parity.compare_answers(EVALUATED, list(EVALUATED), REFS, [True] * 3, params, evaluated_stopped=[True] * 3)
    assert r["identical"] == 3 and r["identical_share"] == 1.0 and r["token_agreement"] == 1.0
    assert r["rougeL"]["served"] == r["rougeL"]["evaluated"] and r["rougeL"]["diff"]["mean"] == 0
    assert r["first_difference"] is None and r["stop_rate"] == {"served": 1.0, "evaluated": 1.0}
    assert parity.check(r, ParityTolerance(min_identical=1.0, min_token_agreement=1.0)) == []


def test_an_answer_that_runs_past_its_turn_breaks_identity_agreement_and_stops(params):
    served = [EVALUATED[0] + " user O ROAS mede a receita", EVALUATED[1], EVALUATED[2]]
    r = parity.compare_answers(EVALUATED, served, REFS, [False, True, True], params,
                               evaluated_stopped=[True] * 3, ids=["a", "b", "c"])
    assert r["identical"] == 2
    # answer 0: its 8 words agree, then 6 more: 8/14; the other two agree fully
    assert r["token_agreement"] == pytest.approx((8 / 14 + 1 + 1) / 3)
    assert r["first_difference"]["index"] == 0 and r["first_difference"]["id"] == "a"
    assert r["stop_rate"]["served"] == pytest.approx(2 / 3)
    failures = parity.check(r, ParityTolerance(min_identical=1.0, min_token_agreement=0.99, max_rouge_drop=None,
                                                 max_stop_drop=0.05))
    assert [f.split(" ")[0] for f in failures] == ["identical", "token", "ended"]
    assert "identical 2/3 (needs >= 100%)" in failures[0]


def test_a_rouge_drop_beyond_tolerance_fails_and_within_passes(params):
    served = ["Não sei.", EVALUATED[1], EVALUATED[2]]
    r = parity.compare_answers(EVALUATED, served, REFS, None, params)
    assert r["rougeL"]["served"] < r["rougeL"]["evaluated"] and "stop_rate" not in r
    drop = r["rougeL"]["evaluated"] - r["rougeL"]["served"]
    assert parity.check(r, ParityTolerance(max_rouge_drop=drop + 0.001)) == []
    assert parity.check(r, ParityTolerance(max_rouge_drop=drop - 0.001))[0].startswith("ROUGE-L")


def test_the_gate_rejects_naming_the_target_the_numbers_and_the_first_difference(params, tmp_path):
    """gate() with planted replays: one target answers as evaluated, one stops at the eos alone (runs on)."""
    save_tokenizer(tmp_path)
    ev = parity.Evaluated(["x", "y", "z"], [[{"role": "user", "content": q}] for q in "abc"], REFS, EVALUATED,
                          [True] * 3)

    def good(*a):
        return parity.Served(list(EVALUATED), [True] * 3, 0.1)

    def eos_only(*a):
        return parity.Served([e + " <|im_start|>user continua" for e in EVALUATED], [False] * 3, 0.1)

    p = params.model_copy(update={"promote": params.promote.model_copy(update={"parity": params.promote.parity.model_copy(
        update={"targets": ["server", "merged"]})})})
    out = parity.gate(p, "m", "7", tmp_path, ev, replays={"server": good, "merged": eos_only})
    assert out["targets"]["server"]["passed"] and not out["targets"]["merged"]["passed"]
    assert not out["passed"] and out["reason"].startswith("parity: target merged (the merged model")
    assert "token agreement" in out["reason"] and "first difference at eval example 0 (id x)" in out["reason"]
    tags = parity.version_tags(out)
    assert tags["parity"] == "failed" and tags["parity.server.identical"] == "3/3" and tags["parity.merged.passed"] == "false"


def test_a_target_that_cannot_answer_fails_the_gate_with_its_error(params, tmp_path):
    save_tokenizer(tmp_path)
    ev = parity.Evaluated(["x"], [[{"role": "user", "content": "a"}]], REFS[:1], EVALUATED[:1], [True])

    def down(*a):
        raise ConnectionRefusedError("scoring server gone")

    p = params.model_copy(update={"promote": params.promote.model_copy(update={"parity": params.promote.parity.model_copy(
        update={"targets": ["mlflow"]})})})
    out = parity.gate(p, "m", "7", tmp_path, ev, replays={"mlflow": down})
    assert not out["passed"] and "could not answer: ConnectionRefusedError: scoring server gone" in out["reason"]


def test_served_line_says_which_version_serves_after_each_decision():
    promoted = {"decision": "promote", "registered_model": "loraflow-m", "version": "4",
                "aliases_after": {"champion": "4"}}
    assert served_line(promoted) == "loraflow-m v4 is champion: `loraflow serve` answers with it"
    rejected = {"decision": "reject", "registered_model": "loraflow-m", "version": None,
                "aliases_after": {"champion": "3", "challenger": "2"}}
    assert served_line(rejected) == "champion stays loraflow-m v3; the candidate (not registered) is not served"
    parity_failed = {**rejected, "version": "5"}
    assert "champion stays loraflow-m v3; the candidate (v5, registered, no alias)" in served_line(parity_failed)
    first = {"decision": "reject", "registered_model": "loraflow-m", "version": None, "aliases_after": {}}
    assert served_line(first).startswith("no champion yet")


# ---------------------------------------------------------------------------------------------- a real mismatch

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
          "{{ m.content }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _llama3_like_model(folder):
    """A tiny random Llama with a Llama-3-like template (end of turn <|eot_id|>, eos <|end_of_text|>), trained for a
    few seconds until, greedily, it answers "um dois três", writes <|eot_id|> and then keeps going ("quatro cinco
    ..."): what a model does that nobody stops at its end of turn."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["<unk>", "user", "assistant", "pergunta", "um", "dois", "três", "quatro", "cinco", "seis", "sete"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  pad_token="<|end_of_text|>", unk_token="<unk>")
    tok.chat_template = LLAMA3
    prompt = [{"role": "user", "content": "pergunta"}]
    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = tok(text + "um dois três<|eot_id|>quatro cinco seis sete quatro cinco seis sete", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.tensor([ids])
    for _ in range(150):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return prompt


@pytest.mark.slow
def test_a_server_that_stops_at_the_eos_alone_is_caught_by_the_gate(tmp_path, monkeypatch):
    """The contract broken on purpose in one serving path: the server's engine stops at the eos only. Evaluation
    (the one generate loop, stopping at <|eot_id|>) answered "um dois três"; the server runs on past the end of
    turn, and the parity gate rejects the candidate naming the server, with the numbers and the first difference."""
    import mlflow
    from peft import LoraConfig, PeftModel, get_peft_model

    from loraflow import generation, registry, tracking
    from loraflow.io import sha256_file, write_json
    from loraflow.models import load_causal_lm, load_tokenizer
    from loraflow.promotion import Decision
    from loraflow.serve import engine as engine_mod

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    prompt = _llama3_like_model(base_dir)
    params = load_params(ROOT / "params.yaml", [
        f"base.model={base_dir}", f"base.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "generate.max_new_tokens=8",
        "generate.repetition_penalty=1.0", "evaluate.bootstrap_samples=200", "promote.parity.targets=[server]"])
    # a LoRA adapter whose B is zero (peft's init): the candidate answers exactly as the tiny base does
    tok = load_tokenizer(str(base_dir))
    get_peft_model(load_causal_lm(str(base_dir)), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    generation.write(adapter_dir, params.generate)

    # evaluation's answer: the one loop, stopping at the end-of-turn ids of the contract
    model = PeftModel.from_pretrained(load_causal_lm(str(base_dir)), str(adapter_dir)).eval()
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot in generation.end_of_turn_ids(tok, model) and eot != tok.eos_token_id
    g = generation.generate_detailed(model, tok, [prompt], generation.load(adapter_dir), batch_size=1)
    assert g.answers == ["um dois três"] and g.stopped == [True]
    evaluated = parity.Evaluated(["q1"], [prompt], ["um dois três"], g.answers, g.stopped)

    with mlflow.start_run(experiment_id=tracking.setup(params, "tiny")) as run:
        pass
    write_json(adapter_dir / "train_info.json", {"adapter_sha256": sha256_file(adapter_dir / "adapter_model.safetensors"),
                                                "mlflow_run_id": run.info.run_id})
    metrics = {"eval_set": {"sha256": "e" * 64}, "base": None, "candidate": None, "champion_version": None}
    d = Decision("promote", "stand-in", "rougeL", "base", 0.1)
    version = registry.register_version(params, "tiny", adapter_dir, metrics, d)

    # the server as it should be: answers as evaluated
    ok = parity.gate(params, "tiny", version, adapter_dir, evaluated)
    assert ok["passed"], ok["targets"]["server"]
    assert ok["targets"]["server"]["identical"] == 1

    # the server made to stop at the eos alone
    real = engine_mod.generation.end_of_turn_ids
    monkeypatch.setattr(engine_mod.generation, "end_of_turn_ids", lambda t, m=None: [t.eos_token_id])
    bad = parity.gate(params, "tiny", version, adapter_dir, evaluated)
    monkeypatch.setattr(engine_mod.generation, "end_of_turn_ids", real)
    served = bad["targets"]["server"]
    assert not bad["passed"] and served["identical"] == 0 and served["stop_rate"]["served"] == 0.0
    assert bad["reason"].startswith("parity: target server (loraflow serve's batched engine) does not answer as evaluated")
    assert "identical 0/1" in bad["reason"] and "evaluated 'um dois três' vs served 'um dois três quatro" in bad["reason"]


def test_mlflow_serve_finds_uvicorn_without_an_activated_venv(monkeypatch):
    """`mlflow models serve` execs `uvicorn` by name: with only the interpreter's path known (no venv on PATH, as
    when a step runs as `.venv/bin/python -m ...`) it must still resolve, to this interpreter's own copy."""
    import shutil
    import sys
    from pathlib import Path

    from loraflow.parity import mlflow_serve_env

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = mlflow_serve_env("sqlite:///x.db")
    found = shutil.which("uvicorn", path=env["PATH"])
    assert found is not None
    assert Path(found).parent == Path(sys.executable).parent
    assert env["MLFLOW_TRACKING_URI"] == env["MLFLOW_REGISTRY_URI"] == "sqlite:///x.db"

"""`loraflow export`: the Modelfile's TEMPLATE against the Jinja chat templates it stands for, a template with no
equivalent refused, the merged model's generation_config.json carrying the end-of-turn ids; and (slow) a real
registered version exported to Ollama and to a merged model and replayed on llama.cpp and transformers.

What the TEMPLATE test proves: the Go template text loraflow writes, run through tests/gotemplate.py (an
interpreter of the Go text/template subset it uses, with Ollama's handling of SYSTEM and of the message list),
renders the same text as the tokenizer's Jinja template for these conversations. It does not run Ollama (not
installable here), so a difference between Go's real text/template and that interpreter would go unseen.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow import generation, modelfile
from loraflow.cli import main as cli
from loraflow.config import GenerateParams, load_params
from tests import gotemplate
from tests.conftest import MODE, ROOT, SHRUNK, mlflow_client

# The real templates (SmolLM2-135M-Instruct's, Meta-Llama-3-8B-Instruct's, gemma-2-2b-it's), as their tokenizers ship them.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
          "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
# name -> (template, special tokens, eos, bos, end of turn)
TEMPLATES = {
    "chatml": (SMOLLM2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|endoftext|>", "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA2, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<eos>", "<bos>", "<end_of_turn>"),
}
CONVERSATIONS = [
    [{"role": "user", "content": "O que é retail media?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Explain ROAS,\nthen ACOS."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d\n\ne"}, {"role": "user", "content": "Vale a pena? {{ not a template }}"}],
    [{"role": "system", "content": "Você é um analista de mídia."}, {"role": "user", "content": "Resuma em uma frase."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
]
WORDS = ["<unk>", "user", "assistant", "model", "system", "hi", "hello", "a", "b", "c"]


def tokenizer(name: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    template, specials, eos, bos, _ = TEMPLATES[name]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=eos, unk_token="<unk>", bos_token=bos)
    tok.chat_template = template
    return tok


def jinja(tok, conv) -> str:
    return tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_modelfile_template_renders_what_the_jinja_template_renders(name):
    tok = tokenizer(name)
    fmt = modelfile.detect(tok)
    assert fmt.style.name == name
    go = modelfile.go_template(fmt)
    checked = 0
    for conv in CONVERSATIONS:
        if conv[0]["role"] == "system" and fmt.system == "unsupported":
            with pytest.raises(Exception, match="System role not supported"):
                jinja(tok, conv)  # Gemma 2 refuses system turns: nothing to be equivalent to
            continue
        want = jinja(tok, conv)
        assert modelfile.render(fmt, conv) == want
        # llama.cpp writes the BOS itself (the GGUF's add_bos_token): the Go template leaves it out
        assert fmt.prefix + gotemplate.ollama_chat(go, conv, fmt.default_system) == want, (name, conv)
        checked += 1
    assert checked >= 3


def test_each_template_detail_is_recognised():
    smol, llama, gemma = (modelfile.detect(tokenizer(n)) for n in ("chatml", "llama3", "gemma"))
    # SmolLM2 injects its own system message when the chat has none: the Modelfile's SYSTEM does what it does
    assert smol.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert (smol.prefix, smol.trims, smol.system) == ("", False, "message")
    assert (llama.prefix, llama.default_system, llama.trims, llama.system) == ("<|begin_of_text|>", None, True, "message")
    assert (gemma.prefix, gemma.default_system, gemma.trims, gemma.system) == ("<bos>", None, True, "unsupported")


def test_modelfile_stops_at_every_end_of_turn_token_and_decodes_as_the_adapter():
    tok = tokenizer("llama3")
    stops = tok.convert_ids_to_tokens(generation.end_of_turn_ids(tok))
    assert set(stops) == {"<|eot_id|>", "<|end_of_text|>"}  # the end of turn is not the eos here
    gp = GenerateParams(max_new_tokens=77, repetition_penalty=1.15, temperature=0.6, top_p=0.8)
    text = modelfile.modelfile(modelfile.detect(tok), "base.Q4.gguf", "lora.gguf", stops, gp, "made by a test")
    lines = text.splitlines()
    assert lines[:3] == ["# made by a test", "FROM ./base.Q4.gguf", "ADAPTER ./lora.gguf"]
    assert 'PARAMETER stop "<|eot_id|>"' in lines and 'PARAMETER stop "<|end_of_text|>"' in lines
    assert {"PARAMETER temperature 0.6", "PARAMETER top_p 0.8", "PARAMETER repeat_penalty 1.15",
            "PARAMETER num_predict 77"} <= set(lines)
    assert not any(x.startswith("SYSTEM") for x in lines)  # Llama 3's template injects no system message
    greedy = modelfile.modelfile(modelfile.detect(tokenizer("chatml")), "b", "a", ["<|im_end|>"],
                                 GenerateParams(do_sample=False), "")
    assert "PARAMETER temperature 0" in greedy.splitlines()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in greedy


@pytest.mark.parametrize("template", [
    # Alpaca-style instructions: no chat format the Modelfile knows
    "{% for m in messages %}### {{ m.role | capitalize }}:\n{{ m.content }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}",
    # ChatML that rewrites the system turn (as Llama 3.1 adds dates to it): a SYSTEM line could not reproduce it
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'system' %}Today: 2024-07-26\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
])
def test_a_template_with_no_equivalent_is_refused_naming_its_sha(template):
    import hashlib

    tok = tokenizer("chatml")
    tok.chat_template = template
    with pytest.raises(modelfile.TemplateNotSupported, match=hashlib.sha256(template.encode()).hexdigest()):
        modelfile.detect(tok)


def test_merged_model_generation_config_holds_the_end_of_turn_ids(tmp_path):
    """A tiny random Llama with a Llama-3 tokenizer (end of turn <|eot_id|>, eos <|end_of_text|>), an adapter on it,
    merged: a Hugging Face engine reading the folder alone stops at both and decodes with the adapter's settings."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from loraflow.export import merge

    tok = tokenizer("llama3")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    peft_model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    gp = GenerateParams(max_new_tokens=33, repetition_penalty=1.2, do_sample=False)
    merge(LlamaForCausalLM(cfg), tok, adapter, gp, tmp_path / "merged")

    gc = GenerationConfig.from_pretrained(tmp_path / "merged")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert sorted(gc.eos_token_id) == sorted({eot, tok.eos_token_id}) and eot != tok.eos_token_id
    assert (gc.max_new_tokens, gc.repetition_penalty, gc.do_sample) == (33, 1.2, False)
    assert generation.load(tmp_path / "merged") == gp  # loraflow reads the same file back the same way
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert reloaded.chat_template == LLAMA3
    assert generation.end_of_turn_ids(reloaded, tmp_path / "merged") == sorted(gc.eos_token_id)
    assert any(p.name.endswith(".safetensors") for p in (tmp_path / "merged").iterdir())
    assert not any("lora" in k for k in json.loads((tmp_path / "merged" / "config.json").read_text()))


def _result(served: float, evaluated: float, ci: tuple[float, float], stop: float, loop: float) -> dict:
    return {"n": 21, "identical": 0, "identical_share": 0.0, "token_agreement": 0.1,
            "rougeL": {"served": served, "evaluated": evaluated,
                       "diff": {"mean": served - evaluated, "ci_low": ci[0], "ci_high": ci[1]}},
            "stop_rate": {"served": stop, "evaluated": 1.0}, "loop_rate": {"served": loop, "evaluated": 0.0}}


def test_an_export_is_refused_only_outside_its_tolerances():
    from loraflow.export import lines, refusals

    params = load_params(ROOT / "params.yaml")  # rougeL_tolerance 0.05, min_stop_rate 0.8, max_loop_rate 0.2
    # the issue's Q4 export: never identical, but its quality interval straddles zero
    assert refusals(_result(0.172, 0.159, (-0.007, 0.034), 1.0, 0.0), params) == []
    # worse, but the interval still reaches within the tolerance: kept
    assert refusals(_result(0.12, 0.159, (-0.08, -0.04), 1.0, 0.0), params) == []
    worse = refusals(_result(0.08, 0.159, (-0.11, -0.06), 0.5, 0.3), params)
    assert len(worse) == 3 and "-0.0600" in worse[0] and "0.0800 vs evaluated 0.1590" in worse[0]
    assert "50% of its answers end their turn" in worse[1] and "30% of its answers loop" in worse[2]
    text = "\n".join(lines(_result(0.172, 0.159, (-0.007, 0.034), 1.0, 0.0)))
    assert "export 0.1720   evaluated 0.1590   paired diff +0.0130 [-0.0070, +0.0340]" in text
    assert "ended their turn   export 100%   evaluated 100%" in text


def test_missing_llama_cpp_converters_name_the_setup_command(tmp_path, monkeypatch):
    from loraflow.export import ExportError, llama_cpp_dir

    monkeypatch.setenv("LORAFLOW_LLAMA_CPP", str(tmp_path))
    with pytest.raises(ExportError, match="setup.sh --with-llama"):
        llama_cpp_dir()


# ---------------------------------------------------------------------------------------------- slow: for real

@pytest.mark.slow
def test_export_a_registered_version_to_ollama_and_merged_for_real(project, tracking, monkeypatch, capsys):
    """Real steps register a version (curate, validate, train 3 steps, evaluate 3 prompts, promote); then
    `loraflow export` converts it with llama.cpp's converter, replays it on llama.cpp and on transformers."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/setup.sh --with-llama (make test)")
    from steps import curate, evaluate, promote, train, validate

    # promote's parity gate is test_parity's subject; here it would only add its replays (and a scoring server)
    overrides = [*SHRUNK, *tracking, "evaluate.max_examples=3", "evaluate.guard_sets=[]", "promote.parity.targets=[]",
                 "export.min_stop_rate=null", "export.max_loop_rate=null"]
    params = load_params(project / "params.yaml", overrides)
    cur = project / "data" / "curated" / MODE
    monkeypatch.chdir(project)
    curate.run(params, project / "data" / "raw" / MODE, cur)
    validate.run(params, cur, project / "data" / "validation" / MODE)
    train.run(params, MODE, project / "data" / "validation" / MODE / "report.json", cur, project / "data" / "adapters" / MODE)
    evaluate.run(params, MODE, cur / "eval.jsonl", project / "data" / "adapters" / MODE, project / "data" / "eval" / MODE)
    decision = promote.run(params, MODE, project / "data" / "eval" / MODE / "metrics.json",
                           project / "data" / "adapters" / MODE, project / "data" / "promotion" / MODE)
    version = decision["version"]
    assert decision["aliases_after"]["champion"] == version
    preds = [json.loads(x) for x in (project / "data" / "eval" / MODE / "predictions.jsonl").read_text().splitlines()]

    # --to ollama through the installed `loraflow` command, as a user runs it; --to merged in this process
    # (the same main(), without paying the imports a second time)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    sets = [a for o in overrides for a in ("-S", o)]
    r = subprocess.run([str(Path(sys.executable).parent / "loraflow"), "export", MODE, "--to", "ollama", *sets],
                       cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    assert "ROUGE-L            export" in r.stdout and "evaluated" in r.stdout and "ended their turn" in r.stdout
    assert cli(["export", MODE, "--to", "merged", "--version", version, *sets]) == 0
    assert "ROUGE-L            export" in capsys.readouterr().out

    ol = project / "exports" / MODE / f"v{version}-ollama"
    mf = (ol / "Modelfile").read_text()
    lora = f"loraflow-{MODE}-v{version}.lora-f16.gguf"
    assert f"ADAPTER ./{lora}" in mf and "FROM ./SmolLM2-135M-Instruct.Q4_1.gguf" in mf
    assert 'PARAMETER stop "<|im_end|>"' in mf and "PARAMETER num_predict 24" in mf
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in mf and "<|im_start|>{{ .Role }}" in mf
    assert (ol / lora).read_bytes()[:4] == b"GGUF" and (ol / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size > 50e6
    rec = json.loads((ol / "export.json").read_text())
    par = rec["replay"]["parity"]
    assert rec["accepted"] and rec["replay"]["engine"].startswith("llama.cpp") and par["n"] == 3
    # the evaluated side of the comparison is what evaluate scored
    assert par["rougeL"]["evaluated"] == pytest.approx(
        sum(p["candidate_rougeL"] for p in preds) / 3, abs=1e-3)
    assert [a["evaluated"] for a in rec["replay"]["answers"]] == [p["candidate_answer"] for p in preds]
    assert all(a["export"] for a in rec["replay"]["answers"]) and 0 <= par["stop_rate"]["served"] <= 1

    mg = project / "exports" / MODE / f"v{version}-merged"
    gc = json.loads((mg / "generation_config.json").read_text())
    assert gc["eos_token_id"] == [2] or gc["eos_token_id"] == 2  # SmolLM2: <|im_end|> is both eos and end of turn
    merged = json.loads((mg / "export.json").read_text())["replay"]["parity"]
    assert merged["token_agreement"] >= 0.9  # float32 merge: the evaluated answers, up to rounding

    mv = mlflow_client(project / "mlflow.db").get_model_version(f"loraflow-{MODE}", version)
    for t in ("ollama", "merged"):
        assert mv.tags[f"export.{t}.verdict"] == "accepted"
        assert float(mv.tags[f"export.{t}.rougeL"]) >= 0 and "/3" in mv.tags[f"export.{t}.identical"]
    shutil.rmtree(project / "exports")

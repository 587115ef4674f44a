"""The generation contract's end-of-turn rule on chat templates whose end of turn is not the eos, and the
server engine stopping where evaluation stops. Tiny word-level tokenizers built here: no model, no download."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from loraflow import generation
from loraflow.config import GenerateParams

# name -> (special tokens, eos, bos, the end-of-turn token the template writes after an assistant message, template)
TEMPLATES = {
    # Qwen2.5-like ChatML: the tokenizer's eos is <|endoftext|>, turns end with <|im_end|>
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", None, "<|im_end|>",
               "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>",
               "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
               "{{ m.content }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<eos>", "<bos>", "<end_of_turn>",
              "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
              "{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
}


def _tokenizer(name: str, words: tuple[str, ...] = ()):
    """A word-level tokenizer for template `name`: the words its templates and the probe need, plus `words`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials, eos, bos, _, template = TEMPLATES[name]
    words = list(dict.fromkeys(["<unk>", "system", "user", "assistant", "model", "hi", "loraflow-end-of-turn-probe",
                                *words]))
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=eos, unk_token="<unk>",
                                  **({"bos_token": bos} if bos else {}))
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_end_of_turn_is_the_token_the_template_writes_not_only_the_eos(name, tmp_path):
    tok = _tokenizer(name)
    eot = tok.convert_tokens_to_ids(TEMPLATES[name][3])
    assert eot != tok.eos_token_id
    assert generation.end_of_turn_ids(tok) == sorted({tok.eos_token_id, eot})
    # the model's generation eos joins, whether from a loaded model or a model folder (the loss mask's view)
    extra = tok.convert_tokens_to_ids(TEMPLATES[name][0][0])
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[extra]))
    (tmp_path / generation.FILE).write_text(json.dumps({"eos_token_id": extra}))
    want = sorted({tok.eos_token_id, eot, extra})
    assert generation.end_of_turn_ids(tok, model) == generation.end_of_turn_ids(tok, tmp_path) == want


def test_without_a_usable_template_the_eos_ends_the_turn():
    tok = _tokenizer("chatml")
    tok.chat_template = None
    assert generation.end_of_turn_ids(tok) == [tok.eos_token_id]


def test_greedy_kwargs_record_what_generate_gets():
    kw = generation.generate_kwargs(GenerateParams(repetition_penalty=1.1, no_repeat_ngram_size=3), greedy=True)
    assert kw == {"max_new_tokens": 128, "num_beams": 1, "repetition_penalty": 1.1, "no_repeat_ngram_size": 3,
                  "do_sample": False}
    assert generation.generate_kwargs(GenerateParams(repetition_penalty=1.0), greedy=True, max_new_tokens=5) == {
        "max_new_tokens": 5, "num_beams": 1, "do_sample": False}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_server_engine_stops_at_the_end_of_turn_evaluation_stops_at(name, monkeypatch):
    import torch

    from loraflow import models
    from loraflow.config import Params
    from loraflow.serve import engine as engine_mod
    from loraflow.serve.settings import ServeSettings

    tok = _tokenizer(name)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=tok.eos_token_id))
    model.eval = lambda: model
    monkeypatch.setattr(models, "resolve", lambda spec, cache=None: "tiny")
    monkeypatch.setattr(models, "load_tokenizer", lambda path, trust_remote_code=False: tok)
    monkeypatch.setattr(models, "load_causal_lm", lambda path, trust_remote_code=False: model)
    monkeypatch.setattr(engine_mod, "AdapterCache", lambda *a: SimpleNamespace(close=lambda: None))
    eng = engine_mod.Engine(Params(), ServeSettings())
    try:
        eot = tok.convert_tokens_to_ids(TEMPLATES[name][3])
        assert eng.stop_ids == generation.end_of_turn_ids(tok, model) and eot in eng.stop_ids
        # a streamed row whose one allowed token is the end of turn finished its turn: "stop", not "length"
        job = engine_mod.Job(None, [1, 2], 1, {}, None, None)
        rows = engine_mod._Rows([job], eng.stop_ids)
        rows.put(torch.tensor([[1, 2]]))  # generate() first hands the streamer the prompt
        rows.put(torch.tensor([eot]))
        out = eng._result(job, 0.0, 1)
        assert job.done and out["finish_reason"] == "stop" and out["completion_tokens"] == 0
    finally:
        eng.close()


def test_pyfunc_input_is_prompts_or_conversations_and_bad_records_are_named():
    import pandas as pd

    from loraflow.pyfunc import PyfuncInputError, conversations

    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    user = [{"role": "user", "content": "q"}]
    assert conversations(["q", conv]) == [user, conv]
    assert conversations("q") == [user]
    assert conversations([{"messages": conv}]) == [conv] == conversations({"messages": conv})
    assert conversations(pd.DataFrame({"messages": [conv, user]})) == [conv, user]
    assert conversations(pd.DataFrame({0: ["q"]})) == [user]  # the string signature's unnamed column
    for bad in ([[]], [[{"role": "user"}]], [3], [{"role": "user", "content": "q"}]):
        with pytest.raises(PyfuncInputError, match="record 0: field 'messages'"):
            conversations(bad)


def test_anti_repetition_counts_a_rows_own_tokens_not_its_left_padding():
    """transformers' processors penalise the pad token of a left-padded row (often the eos); call_kwargs' one
    applies them to the row's own tokens, as for the row alone, and leaves unpadded rows exactly as they were."""
    import torch
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    pad = 0
    rows = torch.tensor([[pad, pad, 5, 6, 5], [3, 4, 5, 6, 7]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    scores = torch.randn(2, 10).abs() + 1
    kw = generation.call_kwargs({"do_sample": False, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2}, mask)
    assert kw["repetition_penalty"] == 1.0 and kw["no_repeat_ngram_size"] == 0  # the model's own config adds none
    out = kw["logits_processor"](rows, scores)

    def alone(ids, row_scores):
        for p in (RepetitionPenaltyLogitsProcessor(1.5), NoRepeatNGramLogitsProcessor(2)):
            row_scores = p(ids, row_scores)
        return row_scores

    assert torch.equal(out[0], alone(rows[:1, 2:], scores[:1])[0])  # as if the row had no padding
    assert torch.equal(out[1], alone(rows[1:], scores[1:])[0])
    assert out[0, pad] == scores[0, pad] != alone(rows[:1], scores[:1])[0, pad]  # the stock way penalised the pad
    assert "logits_processor" not in generation.call_kwargs({"do_sample": False}, mask)

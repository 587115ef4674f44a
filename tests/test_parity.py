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

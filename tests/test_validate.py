"""The Great Expectations gate: each expectation fails on data broken in exactly its way, naming the record."""

from __future__ import annotations

import random
import shutil

import pytest

from loraflow import checks, generation
from loraflow.config import load_params
from loraflow.errors import ValidationFailed
from loraflow.io import read_json, read_jsonl
from steps import curate, validate
from tests.conftest import FORMATS, ROOT, write_jsonl

OVERRIDES = ["validate.min_train=3", "validate.min_eval=1"]
PARAMS = load_params(ROOT / "params.yaml", OVERRIDES)
SAMPLE_RAW = ROOT / "data" / "raw" / "retail_media"
WORDS = ("campanha anúncio vitrine clique conversão orçamento lance palavra produto categoria loja marca "
         "estoque preço frete cupom banner busca relatório métrica público segmento criativo pedido").split()


def text(seed: str, n: int = 12) -> str:
    rng = random.Random(seed)  # distinct records must not look like near duplicates of each other
    return " ".join(rng.choice(WORDS) for _ in range(n))


def rec(i: int, msgs=None, split="t") -> dict:
    msgs = msgs or [{"role": "user", "content": text(f"q{split}{i}") + "?"},
                    {"role": "assistant", "content": text(f"a{split}{i}") + "."}]
    return {"id": f"{split}{i:04d}", "messages": msgs, "source": f"m/x.jsonl#{i}", "meta": {}}


def pref(i: int, chosen="Sim, com certeza.", rejected="Não sei.") -> dict:
    return {"id": f"p{i:04d}", "prompt": [{"role": "user", "content": text(f"p{i}") + "?"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "source": f"m/p.jsonl#{i}", "meta": {}}


def curated(tmp_path, train, evals, prefs=()):
    d = tmp_path / "curated"
    write_jsonl(d / "train.jsonl", train)
    write_jsonl(d / "eval.jsonl", evals)
    write_jsonl(d / "prefs.jsonl", prefs)
    return d


def good():
    return [rec(i) for i in range(5)], [rec(i, split="e") for i in range(2)]


def failed_checks(tmp_path, table="train", severity="fail"):
    report = read_json(tmp_path / "v" / "report.json")
    return {e["check"]: e for e in report["splits"][table] if not e["success"] and e["severity"] == severity}


def test_good_data_passes_and_writes_reports(tmp_path):
    train, evals = good()
    report = validate.run(PARAMS, curated(tmp_path, train, evals, [pref(0)]), tmp_path / "v")
    assert report["success"] and report["warnings"] == 0 and len(report["chat_template_sha256"]) == 64
    assert {e["check"] for e in report["splits"]["eval"]} >= {"exact_overlap", "near_overlap", "assistant_spans"}
    assert read_json(tmp_path / "v" / "report.json")["success"]
    html = (tmp_path / "v" / "report.html").read_text()
    assert "PASSED" in html and "http" not in html and "<script" not in html  # renders offline: nothing from a CDN


def test_empty_prefs_file_passes_trivially(tmp_path):
    train, evals = good()
    report = validate.run(PARAMS, curated(tmp_path, train, evals, []), tmp_path / "v")
    assert report["success"] and report["records"]["prefs"] == 0
    assert all(e["success"] for e in report["splits"]["prefs"])


BROKEN = {
    "known_roles": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}],
    "alternation": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}],
    "last_assistant": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
    "no_empty_turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}],
    "max_tokens": [{"role": "user", "content": "palavra " * 600}, {"role": "assistant", "content": "a"}],
    "template_renders": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}],
    "pii_residue": [{"role": "user", "content": "meu email?"}, {"role": "assistant", "content": "é ana.silva@example.com"}],
}


@pytest.mark.parametrize("check", list(BROKEN))
def test_each_record_expectation_names_the_record(tmp_path, check):
    train, evals = good()
    train[3] = rec(3, BROKEN[check])
    with pytest.raises(ValidationFailed, match=rf"(?s)\[train\] {check}: .*t0003 \(m/x.jsonl#3"):
        validate.run(PARAMS, curated(tmp_path, train, evals), tmp_path / "v")
    failed = failed_checks(tmp_path)
    assert check in failed and all(r["id"] == "t0003" for e in failed.values() for r in e["failing_records"])


def test_pii_residue_says_which_kind(tmp_path):
    train, evals = good()
    train[3] = rec(3, BROKEN["pii_residue"])
    with pytest.raises(ValidationFailed, match=r"t0003 \(m/x.jsonl#3: email x1\)"):
        validate.run(PARAMS, curated(tmp_path, train, evals), tmp_path / "v")


def test_pii_residue_is_not_the_scrubbers_own_opinion(tmp_path):
    # A card written with dots between its groups: the scrubber's card pattern does not match it (so it would
    # call the record clean), the gate's second detector does.
    from loraflow.pii import find

    leak = "o cartão é 4111.1111.1111.1111"
    assert not find(leak)
    train, evals = good()
    train[3] = rec(3, [{"role": "user", "content": "meu cartão?"}, {"role": "assistant", "content": leak}])
    with pytest.raises(ValidationFailed, match=r"(?s)pii_residue.*t0003 \(m/x.jsonl#3: card x1\)"):
        validate.run(PARAMS, curated(tmp_path, train, evals), tmp_path / "v")


def test_duplicate_ids_fail(tmp_path):
    train, evals = good()
    train[4] = dict(train[1])
    with pytest.raises(ValidationFailed, match=r"(?s)unique_ids: expect_column_values_to_be_unique.*t0001"):
        validate.run(PARAMS, curated(tmp_path, train, evals), tmp_path / "v")


def test_eval_record_also_in_train_fails_on_exact_overlap(tmp_path):
    train, evals = good()
    evals.append({**train[2], "id": "e0009", "source": "m/y.jsonl#9"})  # same conversation under another id
    with pytest.raises(ValidationFailed, match=r"(?s)\[eval\] exact_overlap.*e0009 \(m/y.jsonl#9: same as t0002"):
        validate.run(PARAMS, curated(tmp_path, train, evals), tmp_path / "v")


def test_eval_record_near_a_train_record_fails_on_near_overlap(tmp_path):
    train, evals = good()
    msgs = [dict(m) for m in train[2]["messages"]]
    msgs[1]["content"] = msgs[1]["content"] + " " + text("long", 60)
    train[2] = rec(2, msgs)
    edited = [dict(m) for m in msgs]
    edited[1]["content"] = edited[1]["content"].replace(".", "!") + " obrigado"  # one word more, punctuation off
    evals.append(rec(9, edited, split="e"))
    with pytest.raises(ValidationFailed, match=r"(?s)\[eval\] near_overlap.*e0009 \(m/x.jsonl#9: ~[01]\.\d+ Jaccard with t0002"):
        validate.run(PARAMS, curated(tmp_path, train, evals), tmp_path / "v")
    assert "exact_overlap" not in failed_checks(tmp_path, "eval")


def test_too_few_records_fails_with_the_count(tmp_path):
    train, evals = good()
    with pytest.raises(ValidationFailed, match=r"min_size: expect_table_row_count.*observed 2"):
        validate.run(PARAMS, curated(tmp_path, train[:2], evals), tmp_path / "v")


def test_prefs_without_rejected_fails_on_structure(tmp_path):
    train, evals = good()
    bad = pref(1)
    del bad["rejected"]
    with pytest.raises(ValidationFailed, match=r"(?s)\[prefs\] prefs_structure.*p0001 \(m/p.jsonl#1: rejected: expected"):
        validate.run(PARAMS, curated(tmp_path, train, evals, [pref(0), bad]), tmp_path / "v")


def test_prefs_with_chosen_equal_to_rejected_fails(tmp_path):
    train, evals = good()
    with pytest.raises(ValidationFailed, match=r"(?s)\[prefs\] prefs_differ.*p0001 \(m/p.jsonl#1"):
        validate.run(PARAMS, curated(tmp_path, train, evals, [pref(0), pref(1, "Sim.", " sim. ")]), tmp_path / "v")


def tokenizer_with_template(tmp_path, template: str) -> str:
    """A model folder holding the base tokenizer with another chat template (no weights needed)."""
    from loraflow.models import resolve

    src = resolve(PARAMS.base.model, PARAMS.base.model_cache)
    dst = tmp_path / "tok"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    (dst / "chat_template.jinja").write_text(template)
    return str(dst)


def test_template_that_never_closes_assistant_turns_fails_on_eos(tmp_path):
    tpl = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
           "{% if m['role'] != 'assistant' %}<|im_end|>{% endif %}\n{% endfor %}")
    params = load_params(ROOT / "params.yaml", OVERRIDES + [f"base.model={tokenizer_with_template(tmp_path, tpl)}"])
    train, evals = good()
    with pytest.raises(ValidationFailed, match=r"(?s)\[train\] turns_end_with_eos.*t0000 \(m/x.jsonl#0: messages\[1\]: "
                                               r"followed by 'Ċ<\|im_start\|>'|end of text"):
        validate.run(params, curated(tmp_path, train, evals), tmp_path / "v")


def test_template_that_drops_assistant_content_fails_on_spans(tmp_path):
    # Like templates that strip earlier assistant turns (reasoning models): the answer is not there to mask.
    tpl = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
           "{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}")
    params = load_params(ROOT / "params.yaml", OVERRIDES + [f"base.model={tokenizer_with_template(tmp_path, tpl)}"])
    train, evals = good()
    with pytest.raises(ValidationFailed, match=r"(?s)\[train\] assistant_spans.*t0000 \(m/x.jsonl#0: messages\[1\]: "
                                               r"assistant content not found"):
        validate.run(params, curated(tmp_path, train, evals), tmp_path / "v")


def test_assistant_spans_map_to_the_content_tokens():
    from loraflow.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve(PARAMS.base.model, PARAMS.base.model_cache))
    msgs = [{"role": "user", "content": "Oi?"}, {"role": "assistant", "content": "Olá, tudo bem."}]
    [facts] = checks.template_facts(tok, [msgs], generation.end_of_turn_ids(tok))
    assert facts["renders"] and facts["spans_located"] and facts["ends_with_eot"] and facts["n_tokens"] > 5


def test_a_check_set_to_warn_reports_without_failing_and_off_skips(tmp_path):
    train, evals = good()
    train[3] = rec(3, BROKEN["pii_residue"])
    d = curated(tmp_path, train, evals)
    params = load_params(ROOT / "params.yaml", OVERRIDES + ["validate.checks.pii_residue=warn"])
    report = validate.run(params, d, tmp_path / "v")
    assert report["success"] and report["warnings"] == 1
    assert failed_checks(tmp_path, severity="warn")["pii_residue"]["failing_records"][0]["id"] == "t0003"
    assert "warn" in (tmp_path / "v" / "report.html").read_text()
    params = load_params(ROOT / "params.yaml", OVERRIDES + ["validate.checks.pii_residue=off"])
    report = validate.run(params, d, tmp_path / "v")
    assert report["warnings"] == 0 and "pii_residue" not in {e["check"] for e in report["splits"]["train"]}


def test_unknown_check_name_is_refused():
    with pytest.raises(Exception, match="pii_residu"):
        load_params(ROOT / "params.yaml", ["validate.checks.pii_residu=warn"])


# --- drift against the profile of the last dataset that passed -------------------------------------------

def many(n: int, split="t", source="m/x.jsonl", words=12) -> list[dict]:
    out = []
    for i in range(n):
        r = rec(i, split=split)
        r["messages"][1]["content"] = text(f"a{split}{i}", words)
        out.append({**r, "source": f"{source}#{i}"})
    return out


def test_pass_writes_the_profile_and_a_halved_dataset_fails_on_drift(tmp_path):
    prof = tmp_path / "profiles" / "m.json"
    validate.run(PARAMS, curated(tmp_path, many(40), many(6, "e")), tmp_path / "v", prof)
    before = prof.read_text()
    assert read_json(prof)["records"] == {"train": 40, "eval": 6, "prefs": 0}
    with pytest.raises(ValidationFailed, match=r"\[drift\] drift_count: .*observed 0\.5"):
        validate.run(PARAMS, curated(tmp_path, many(20), many(3, "e")), tmp_path / "v", prof)
    assert prof.read_text() == before  # a failed dataset never becomes the baseline
    params = load_params(ROOT / "params.yaml", OVERRIDES + ["validate.checks.drift_count=warn"])
    report = validate.run(params, curated(tmp_path, many(20), many(3, "e")), tmp_path / "v", prof)
    assert report["success"] and report["drift"]["count_ratio"] == 0.5
    assert read_json(prof)["records"]["train"] == 20  # a pass (warnings and all) becomes the new baseline


def test_longer_conversations_warn_on_token_drift_with_the_ks_statistic(tmp_path):
    prof = tmp_path / "p.json"
    validate.run(PARAMS, curated(tmp_path, many(40), many(6, "e")), tmp_path / "v", prof)
    report = validate.run(PARAMS, curated(tmp_path, many(40, words=60), many(6, "e", words=60)), tmp_path / "v", prof)
    assert report["success"] and report["drift"]["ks_n_tokens"] > 0.9
    assert "drift_tokens" in failed_checks(tmp_path, "drift", severity="warn")
    params = load_params(ROOT / "params.yaml", OVERRIDES + ["validate.checks.drift_tokens=fail"])
    with pytest.raises(ValidationFailed, match=r"drift_tokens: .*ks_n_tokens.*observed (0\.9|1\.0)"):
        validate.run(params, curated(tmp_path, many(40), many(6, "e")), tmp_path / "v", prof)


def test_sources_added_and_gone_are_named(tmp_path):
    prof = tmp_path / "p.json"
    validate.run(PARAMS, curated(tmp_path, many(40), many(6, "e")), tmp_path / "v", prof)
    params = load_params(ROOT / "params.yaml", OVERRIDES + ["validate.checks.drift_sources=fail"])
    with pytest.raises(ValidationFailed, match=r"(?s)drift_sources.*m/x.jsonl \(46 -> 0 records: gone.*m/z.jsonl \(0 -> 46"):
        validate.run(params, curated(tmp_path, many(40, source="m/z.jsonl"), many(6, "e", source="m/z.jsonl")),
                     tmp_path / "v", prof)


def test_ks_binned_is_zero_for_equal_and_one_for_disjoint():
    assert checks.ks_binned({"0": 5, "8": 5}, {"0": 50, "8": 50}) == 0
    assert checks.ks_binned({"0": 5}, {"64": 5}) == 1


def test_cli_exits_nonzero_on_failure(tmp_path):
    train, evals = good()
    d = curated(tmp_path, train[:2], evals)
    with pytest.raises(SystemExit) as e:
        validate.main([*sum((["-S", o] for o in OVERRIDES), []), str(d), str(tmp_path / "v"), str(tmp_path / "p.json")])
    assert e.value.code == 1 and not (tmp_path / "p.json").exists()


# --- the project's sample data ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(curated dir, params) of the project's sample data; without it, of the LLaMA-Factory Alpaca demo in
    shared/formats, whose known real-world faults (a few answers past 512 tokens, unscrubbed emails, year
    ranges the phone pattern takes for numbers) are turned into warnings so the drift/leakage tests have a
    passing baseline."""
    d = tmp_path_factory.mktemp("sample") / "curated"
    if SAMPLE_RAW.is_dir() and any(p.is_file() for p in SAMPLE_RAW.rglob("*")):
        params = load_params(ROOT / "params.yaml")
        curate.run(params, SAMPLE_RAW, d)
        return d, params, True
    if not (FORMATS / "llamafactory_alpaca_en_demo.json").exists():
        pytest.skip("neither the sample data (data/raw/retail_media) nor shared/formats is in this checkout")
    raw = d.parent / "raw" / "alpaca"
    raw.mkdir(parents=True)
    shutil.copy(FORMATS / "llamafactory_alpaca_en_demo.json", raw)
    params = load_params(ROOT / "params.yaml", ["validate.checks.max_tokens=warn", "validate.checks.pii_residue=warn"])
    curate.run(params, raw, d)
    return d, params, False


def test_sample_data_passes(sample, tmp_path):
    d, params, is_project_sample = sample
    if not is_project_sample:
        pytest.skip("the sample data (data/raw/retail_media) is not in this checkout")
    report = validate.run(params, d, tmp_path / "v", tmp_path / "p.json")
    assert report["success"] and report["warnings"] == 0 and (tmp_path / "p.json").exists()


def test_sample_with_one_record_doubled_into_eval_fails_on_leakage(sample, tmp_path):
    src, params, _ = sample
    assert validate.run(params, src, tmp_path / "v")["success"]
    d = tmp_path / "curated"
    shutil.copytree(src, d)
    train = read_jsonl(d / "train.jsonl")
    write_jsonl(d / "eval.jsonl", read_jsonl(d / "eval.jsonl") + [train[7]])
    with pytest.raises(ValidationFailed, match=rf"(?s)\[eval\] exact_overlap.*{train[7]['id']} \({train[7]['source']}"):
        validate.run(params, d, tmp_path / "v")
    assert set(failed_checks(tmp_path, "eval")) == {"exact_overlap"}


def test_sample_cut_to_half_fails_on_drift(sample, tmp_path):
    src, params, _ = sample
    validate.run(params, src, tmp_path / "v", tmp_path / "p.json")
    d = tmp_path / "curated"
    shutil.copytree(src, d)
    for s in ("train", "eval"):
        rows = read_jsonl(d / f"{s}.jsonl")
        write_jsonl(d / f"{s}.jsonl", rows[: len(rows) // 2])
    with pytest.raises(ValidationFailed, match=r"\[drift\] drift_count: .*observed 0\.[45]"):
        validate.run(params, d, tmp_path / "v", tmp_path / "p.json")
    assert set(failed_checks(tmp_path, "drift")) == {"drift_count"}

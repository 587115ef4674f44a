"""The Great Expectations gate: each expectation fails on data broken in exactly its way, naming the record."""

from __future__ import annotations

import json

import pytest

from loraflow.config import load_params
from loraflow.errors import ValidationFailed
from loraflow.io import read_json
from steps import validate
from tests.conftest import ROOT, write_jsonl

PARAMS = load_params(ROOT / "params.yaml", ["validate.min_train=3", "validate.min_eval=1"])


def rec(i: int, msgs=None, split="t") -> dict:
    msgs = msgs or [{"role": "user", "content": f"Pergunta {i}?"}, {"role": "assistant", "content": f"Resposta {i}."}]
    return {"id": f"{split}{i:04d}", "messages": msgs, "source": f"m/x.jsonl#{i}", "meta": {}}


def curated(tmp_path, train, evals):
    d = tmp_path / "curated"
    write_jsonl(d / "train.jsonl", train)
    write_jsonl(d / "eval.jsonl", evals)
    return d


def good(tmp_path):
    return [rec(i) for i in range(5)], [rec(i, split="e") for i in range(2)]


def test_good_data_passes_and_writes_reports(tmp_path):
    train, evals = good(tmp_path)
    report = validate.run(PARAMS, curated(tmp_path, train, evals), tmp_path / "v")
    assert report["success"] and len(report["chat_template_sha256"]) == 64
    assert read_json(tmp_path / "v" / "report.json")["success"]
    html = (tmp_path / "v" / "report.html").read_text()
    assert "PASSED" in html and "http" not in html  # renders offline: nothing from a CDN


BROKEN = {
    "expect_column_values_to_be_in_set.*roles_known": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}],
    "alternates": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}],
    "last_role": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
    "empty_turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}],
    "n_tokens": [{"role": "user", "content": "palavra " * 600}, {"role": "assistant", "content": "a"}],
}


@pytest.mark.parametrize("what", list(BROKEN))
def test_each_structural_expectation_names_the_record(tmp_path, what):
    train, evals = good(tmp_path)
    train[3] = rec(3, BROKEN[what])
    with pytest.raises(ValidationFailed, match=rf"(?s){what}.*t0003 \(m/x.jsonl#3\)"):
        validate.run(PARAMS, curated(tmp_path, train, evals), tmp_path / "v")
    report = read_json(tmp_path / "v" / "report.json")
    failed = [e for e in report["splits"]["train"] if not e["success"]]
    assert len(failed) >= 1 and all(r["id"] == "t0003" for e in failed for r in e["failing_records"])


def test_duplicate_ids_fail(tmp_path):
    train, evals = good(tmp_path)
    train[4] = dict(train[1])
    with pytest.raises(ValidationFailed, match=r"(?s)unique.*t0001"):
        validate.run(PARAMS, curated(tmp_path, train, evals), tmp_path / "v")


def test_eval_record_also_in_train_fails_on_leakage(tmp_path):
    train, evals = good(tmp_path)
    evals.append(train[2])
    with pytest.raises(ValidationFailed, match=r"(?s)\[eval\].*in_train.*t0002"):
        validate.run(PARAMS, curated(tmp_path, train, evals), tmp_path / "v")


def test_too_few_records_fails_with_the_count(tmp_path):
    train, evals = good(tmp_path)
    with pytest.raises(ValidationFailed, match=r"row_count.*observed 2"):
        validate.run(PARAMS, curated(tmp_path, train[:2], evals), tmp_path / "v")


def test_report_json_is_plain_json(tmp_path):
    train, evals = good(tmp_path)
    validate.run(PARAMS, curated(tmp_path, train, evals), tmp_path / "v")
    json.loads((tmp_path / "v" / "report.json").read_text())

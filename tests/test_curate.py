"""Curation: formats read, every record accounted for, stable split, byte-identical re-runs."""

from __future__ import annotations

import json
import shutil

import pytest

from loraflow.config import load_params
from loraflow.errors import CurationError
from loraflow.io import read_jsonl
from steps import curate
from tests.conftest import ROOT, chat, write_jsonl

PARAMS = load_params(ROOT / "params.yaml")


def _accounted(stats):
    for src, s in stats["sources"].items():
        assert s["curated"] + s["duplicates"] + s["quarantined"] == s["read"], src


def test_openai_and_alpaca_become_chat_records(tmp_path):
    raw = tmp_path / "raw" / "m"
    write_jsonl(raw / "a.jsonl", [chat("Quanto é 2+2?", "É 4.", system="Seja breve.")])
    (raw / "b.json").write_text(json.dumps([{"instruction": "Defina ROAS.", "input": "contexto X", "output": "Receita/investimento."}]))
    stats = curate.run(PARAMS, raw, tmp_path / "out")
    recs = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(tmp_path / "out" / "eval.jsonl")
    by_src = {r["source"]: r for r in recs}
    assert by_src["m/a.jsonl#1"]["messages"][0] == {"role": "system", "content": "Seja breve."}
    assert by_src["m/b.json#0"]["messages"] == [
        {"role": "user", "content": "Defina ROAS.\n\ncontexto X"}, {"role": "assistant", "content": "Receita/investimento."}]
    assert stats["totals"] == {"read": 2, "curated": 2, "duplicates": 0, "quarantined": 0}
    assert stats["token_lengths"]["max"] > 10  # counted under the real chat template


def test_bad_records_are_quarantined_with_reasons(tmp_path):
    raw = tmp_path / "raw" / "m"
    good = chat("Pergunta boa?", "Resposta boa.")
    (raw).mkdir(parents=True)
    lines = [json.dumps(good), '{"messages": [', json.dumps({"messages": [{"role": "user", "content": "só pergunta"}]}),
             json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}),
             json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}),
             json.dumps({"foo": 1})]
    (raw / "a.jsonl").write_text("\n".join(lines) + "\n")
    stats = curate.run(PARAMS, raw, tmp_path / "out")
    q = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    reasons = {r["source"]: r["reason"] for r in q}
    assert "not valid JSON" in reasons["m/a.jsonl#2"]
    assert "no assistant answer" in reasons["m/a.jsonl#3"]
    assert "'bot' is not one of" in reasons["m/a.jsonl#4"]
    assert "empty content" in reasons["m/a.jsonl#5"]
    assert "unknown record format" in reasons["m/a.jsonl#6"]
    kept = {r["source"]: r["record"] for r in q}  # each kept as read
    assert kept["m/a.jsonl#3"] == {"messages": [{"role": "user", "content": "só pergunta"}]}
    assert kept["m/a.jsonl#2"] == '{"messages": ['  # the unparsable line's text
    assert stats["totals"]["curated"] == 1 and stats["totals"]["quarantined"] == 5
    assert stats["reasons"] == {"invalid_json": 1, "no_answer": 1, "unknown_role": 1, "empty_turn": 1, "unknown_format": 1}
    _accounted(stats)


def test_duplicate_across_sources_lands_once(tmp_path):
    raw = tmp_path / "raw" / "m"
    write_jsonl(raw / "a.jsonl", [chat("O que é ACOS?", "Investimento / receita.")])
    (raw / "b.json").write_text(json.dumps([{"instruction": "O que é ACOS?", "input": "", "output": "Investimento / receita. "}]))
    stats = curate.run(PARAMS, raw, tmp_path / "out")
    assert stats["totals"]["curated"] == 1 and stats["totals"]["duplicates"] == 1
    _accounted(stats)


def test_rerun_is_byte_identical_and_appending_keeps_splits(tmp_path):
    raw = tmp_path / "raw" / "m"
    write_jsonl(raw / "a.jsonl", [chat(f"Pergunta {i}?", f"Resposta {i}.") for i in range(60)])
    curate.run(PARAMS, raw, tmp_path / "o1")
    curate.run(PARAMS, raw, tmp_path / "o2")
    for name in ("train.jsonl", "eval.jsonl", "quarantine.jsonl", "stats.json"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes(), name
    before = {r["id"]: s for s in ("train", "eval") for r in read_jsonl(tmp_path / "o1" / f"{s}.jsonl")}
    write_jsonl(raw / "b.jsonl", [chat(f"Nova pergunta {i}?", f"Nova resposta {i}.") for i in range(60)])
    curate.run(PARAMS, raw, tmp_path / "o3")
    after = {r["id"]: s for s in ("train", "eval") for r in read_jsonl(tmp_path / "o3" / f"{s}.jsonl")}
    assert all(after[i] == s for i, s in before.items())
    assert 0 < sum(1 for s in after.values() if s == "eval") < len(after)


def test_output_lines_are_canonical_json(tmp_path):
    """SFT lines are composed from JSON made for the id: they must still be exactly dumps(record)."""
    from loraflow.io import dumps

    raw = tmp_path / "raw" / "m"
    long = " ".join(f"Detalhe {i} do relatório de campanha, com \"aspas\" e acentos." for i in range(60))
    write_jsonl(raw / "a.jsonl", [chat("Quanto é 2+2?", "É 4.", system="Seja breve."), chat("O que é ROAS?", long),
                                  chat("Quanto é 2+2?", "É 4.", system="Seja breve.")]
                + [chat(f"Pergunta {i}?", f"Resposta {i}.") for i in range(30)])
    params = load_params(ROOT / "params.yaml", ["curate.too_long=truncate"])
    curate.run(params, raw, tmp_path / "out")
    lines = [line for n in ("train", "eval") for line in (tmp_path / "out" / f"{n}.jsonl").read_text().splitlines()]
    recs = [json.loads(line) for line in lines]
    assert [dumps(r) for r in recs] == lines
    assert any(r["meta"].get("truncated") for r in recs) and any(r["meta"]["duplicates"] for r in recs)


def test_nothing_readable_fails_naming_the_folder(tmp_path):
    raw = tmp_path / "raw" / "m"
    raw.mkdir(parents=True)
    with pytest.raises(CurationError, match="no raw files"):
        curate.run(PARAMS, raw, tmp_path / "out")
    (raw / "a.csv").write_text("q,a\n")
    with pytest.raises(CurationError, match="no record could be curated"):
        curate.run(PARAMS, raw, tmp_path / "out")
    q = read_jsonl(tmp_path / "out" / "quarantine.jsonl") if (tmp_path / "out").exists() else []
    assert not q  # a failed run leaves no half-written output


def test_failed_run_keeps_previous_output(tmp_path):
    raw = tmp_path / "raw" / "m"
    write_jsonl(raw / "a.jsonl", [chat("Pergunta?", "Resposta.")])
    curate.run(PARAMS, raw, tmp_path / "out")
    before = (tmp_path / "out" / "train.jsonl").read_bytes() + (tmp_path / "out" / "eval.jsonl").read_bytes()
    shutil.rmtree(raw)
    raw.mkdir()
    with pytest.raises(CurationError):
        curate.run(PARAMS, raw, tmp_path / "out")
    assert (tmp_path / "out" / "train.jsonl").read_bytes() + (tmp_path / "out" / "eval.jsonl").read_bytes() == before


@pytest.mark.skipif(not (ROOT / "data" / "raw" / "retail_media").exists(), reason="sample data not in this checkout")
def test_sample_data_curates_with_its_deliberate_bad_records_quarantined(tmp_path):
    stats = curate.run(PARAMS, ROOT / "data" / "raw" / "retail_media", tmp_path / "out")
    _accounted(stats)
    assert stats["totals"]["curated"] >= 200
    assert stats["totals"]["quarantined"] >= 5 and stats["totals"]["duplicates"] >= 1
    assert stats["splits"]["eval"] >= 10



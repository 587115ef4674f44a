"""Curation: formats read, every record accounted for, stable split, byte-identical re-runs."""

from __future__ import annotations

import json
import shutil

import pytest

from loraflow.config import load_params
from loraflow.curation import parallel
from loraflow.errors import CurationError
from loraflow.io import read_jsonl
from steps import curate
from tests.conftest import FORMATS, ROOT, chat, write_jsonl

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




def _mixed_raw(raw, n: int = 1500):
    """Every container, duplicates across files and shares, broken lines, nested instances, PII, a long record."""
    raw.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        if i % 97 == 5:
            lines.append('{"messages": [broken')
        else:
            a = f"Resposta {i % 700}: invista em campanhas de busca. " * (1 + i % 4)
            if i % 211 == 3:
                a += "Contato: ana@loja.com.br, CPF 529.982.247-25."
            lines.append(json.dumps(chat(f"Pergunta {i % 700}?", a, system="Você é um consultor."), ensure_ascii=False))
    lines.append(json.dumps(chat("Relatório?", "campanha " * 2000)))  # over max_seq_len
    (raw / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    alpaca = [{"instruction": f"Pergunta {i}?", "input": "", "output": f"Resposta {i}: invista em campanhas de busca. "}
              for i in range(0, 400, 3)]
    alpaca.append({"instruction": "Traduza.", "instances": [{"input": "oi", "output": "hi"}, {"input": "tchau", "output": "bye"}]})
    (raw / "b.json").write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")
    (raw / "c.csv").write_text("pergunta,resposta\n" + "".join(f'"Dúvida {i}?","Linha 1\nLinha {i}"\n' for i in range(300))
                               + "só uma coluna\n", encoding="utf-8")
    (raw / "d.md").write_text("# Guia\n\n## Como anunciar?\n\nUse campanhas.\n\n## Frete\n\nGrátis acima de 100.\n")
    (raw / "e.jsonl").write_text("")
    (raw / "f.jsonl").write_text("".join(json.dumps({"prompt": f"Cliente {i}: e o frete?\n\n###\n\n",
                                                     "completion": f" Grátis acima de {i} reais. [END]"}) + "\n"
                                         for i in range(50)))  # a legacy file's markers: cut in every share
    for f in FORMATS.glob("llamafactory_*.json"):
        shutil.copy(f, raw / f.name)


def test_reading_in_worker_processes_gives_the_same_bytes(tmp_path, caplog):
    """Shares of every file read in spawned workers merge back into exactly the single-process outputs."""
    raw = tmp_path / "raw" / "m"
    _mixed_raw(raw)
    outs = {}
    for workers in (1, 3):
        params = load_params(ROOT / "params.yaml", [f"curate.workers={workers}", "curate.too_long=truncate"])
        with caplog.at_level("INFO", logger="loraflow.curation"):
            curate.run(params, raw, tmp_path / f"out{workers}")
        outs[workers] = {p.name: p.read_bytes() for p in (tmp_path / f"out{workers}").iterdir()}
    assert "in 3 processes" in caplog.text  # the second run did use workers
    assert outs[1].keys() == outs[3].keys() == {*curate.OUTPUTS, "stats.json"}
    for name in outs[1]:
        assert outs[1][name] == outs[3][name], name
    stats = json.loads(outs[3]["stats.json"])
    _accounted(stats)
    assert stats["totals"]["duplicates"] > 100 and stats["totals"]["quarantined"] >= 15 and stats["pii"]
    assert any(json.loads(line)["meta"].get("truncated") for line in outs[3]["train.jsonl"].decode().splitlines()
               + outs[3]["eval.jsonl"].decode().splitlines())


def test_workers_do_not_rerun_an_unguarded_script(tmp_path):
    """spawn re-runs the parent's __main__ in each child; a script without a main guard must still run once."""
    import subprocess
    import sys

    raw = tmp_path / "raw" / "m"
    write_jsonl(raw / "a.jsonl", [chat(f"Pergunta {i}?", f"Resposta {i}.") for i in range(300)])
    script = tmp_path / "script.py"
    script.write_text(f"""import sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from loraflow.config import load_params
from steps import curate
with open({str(tmp_path / "ran.txt")!r}, "a") as f:
    f.write("ran\\n")
params = load_params({str(ROOT / "params.yaml")!r}, ["curate.workers=2"])
print(curate.run(params, Path({str(raw)!r}), Path({str(tmp_path / "out")!r}))["totals"]["curated"])
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "300"
    assert (tmp_path / "ran.txt").read_text() == "ran\n"


def test_shares_cover_every_unit_once_and_spare_this_process_the_workers_cost():
    for parts, size in ((2, 70 << 20), (3, 200 << 20), (4, 17 << 20), (2, 0)):
        shares = parallel.unit_shares(parts, size)
        assert [s[0] for s in shares[1:]] == [s[1] for s in shares[:-1]] and shares[0][0] == 0
        assert shares[-1][1] == shares[-1][2] and len(shares) == parts
        widths = [hi - lo for lo, hi, _ in shares]
        assert all(w > 0 for w in widths) and widths[0] >= max(widths[1:])
    assert parallel.process_count(load_params(ROOT / "params.yaml"), 1 << 20) == 1  # auto: small input, one process


def _die(*args):
    import os

    os._exit(3)  # a worker killed mid-run (out of memory, say)


def test_a_dead_worker_loses_nothing(tmp_path, monkeypatch, caplog):
    raw = tmp_path / "raw" / "m"
    _mixed_raw(raw, 600)
    params = load_params(ROOT / "params.yaml", ["curate.workers=1"])
    curate.run(params, raw, tmp_path / "one")
    monkeypatch.setattr(parallel, "read_part", _die)  # what the workers are sent to run
    with caplog.at_level("WARNING", logger="loraflow.curation"):
        curate.run(load_params(ROOT / "params.yaml", ["curate.workers=2"]), raw, tmp_path / "two")
    assert "a worker process failed" in caplog.text
    for name in (*curate.OUTPUTS, "stats.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_legacy_prompt_separator_and_stop_sequence_are_cut_per_file(tmp_path):
    """OpenAI's legacy prompt/completion files end every prompt with a separator and every completion with a
    stop sequence; kept, the model would learn to write them. A shared ordinary ending is not a marker."""
    raw = tmp_path / "raw" / "m"
    raw.mkdir(parents=True)
    (raw / "legacy.jsonl").write_text("".join(
        json.dumps({"prompt": f"Qual o prazo do pedido {i}?\n\n###\n\n", "completion": f" Chega em {i} dias. [END]"}) + "\n"
        for i in range(6)))
    (raw / "arrow.jsonl").write_text("".join(
        json.dumps({"prompt": f"Cor {i} ->", "completion": f" Azul {i}.\nEND"}) + "\n" for i in range(4)))
    (raw / "plain.jsonl").write_text("".join(  # every prompt ends with "?" and every answer with ".": not markers
        json.dumps({"prompt": f"Quanto custa o item {i}?", "completion": f"Custa {i} reais."}) + "\n" for i in range(5)))
    stats = curate.run(PARAMS, raw, tmp_path / "out")
    recs = {r["source"]: r["messages"] for r in read_jsonl(tmp_path / "out" / "train.jsonl")
            + read_jsonl(tmp_path / "out" / "eval.jsonl")}
    assert recs["m/legacy.jsonl#4"] == [{"role": "user", "content": "Qual o prazo do pedido 3?"},
                                        {"role": "assistant", "content": "Chega em 3 dias."}]
    assert recs["m/arrow.jsonl#2"] == [{"role": "user", "content": "Cor 1"}, {"role": "assistant", "content": "Azul 1."}]
    assert recs["m/plain.jsonl#3"] == [{"role": "user", "content": "Quanto custa o item 2?"},
                                       {"role": "assistant", "content": "Custa 2 reais."}]
    src = stats["sources"]
    assert src["m/legacy.jsonl"]["markers_removed"] == {"prompt_separator": "\n\n###\n\n", "completion_stop": " [END]"}
    assert src["m/arrow.jsonl"]["markers_removed"] == {"prompt_separator": " ->", "completion_stop": "\nEND"}
    assert src["m/plain.jsonl"]["markers_removed"] == {}
    assert not any("###" in m["content"] or "[END]" in m["content"] for msgs in recs.values() for m in msgs)

"""Curation of every format users bring: the real LLaMA-Factory files, each reader, bad input, dedup, PII."""

from __future__ import annotations

import json
import shutil

import pytest

from loraflow.config import load_params
from loraflow.errors import CurationError
from loraflow.formats import Options, Reject, convert
from loraflow.io import read_json, read_jsonl
from loraflow.neardup import near_duplicates
from steps import curate
from tests.conftest import FORMATS, ROOT, chat, write_jsonl

PARAMS = load_params(ROOT / "params.yaml")


def _params(*overrides: str):
    return load_params(ROOT / "params.yaml", list(overrides))


def _accounted(stats):
    for src, s in stats["sources"].items():
        assert s["curated"] + s["duplicates"] + s["quarantined"] == s["read"], src
    t = stats["totals"]
    assert t["curated"] + t["duplicates"] + t["quarantined"] == t["read"]


def _outputs(out):
    return {n: read_jsonl(out / f"{n}.jsonl") for n in ("train", "eval", "prefs", "quarantine")}


def _curate_one(tmp_path, name, *overrides):
    raw = tmp_path / "raw" / "m"
    raw.mkdir(parents=True)
    shutil.copy(FORMATS / name, raw)
    stats = curate.run(_params(*overrides), raw, tmp_path / "out")
    return stats, stats["sources"][f"m/{name}"], _outputs(tmp_path / "out")


# ------------------------------------------------------------------------- the real files in ../shared/formats

needs_formats = pytest.mark.skipif(not FORMATS.is_dir(), reason="shared/formats not found above this checkout")


@needs_formats
def test_llamafactory_alpaca_every_record_accounted(tmp_path):
    stats, s, out = _curate_one(tmp_path, "llamafactory_alpaca_en_demo.json")
    assert s["read"] == 999 and s["formats"] == {"alpaca": 999}
    assert s["duplicates"] >= 14  # the file's known exact duplicates
    assert s["curated"] + s["duplicates"] + s["quarantined"] == 999
    assert set(s["reasons"]) <= {"too_long"}  # nothing else is wrong with it
    assert len(out["quarantine"]) == s["quarantined"] and len(out["train"]) + len(out["eval"]) == s["curated"]
    assert stats["token_lengths"]["max"] <= PARAMS.base.max_seq_len
    code = [r for r in out["train"] + out["eval"] if "```" in r["messages"][-1]["content"]]
    assert any("\n    " in r["messages"][-1]["content"] for r in code)  # code indentation survives normalisation
    # The example address in its answer is scrubbed whole (RFC 5322 local part), its backticks kept.
    text = json.dumps(out["train"] + out["eval"] + out["quarantine"], ensure_ascii=False)
    assert "John.Doe" not in text and "example-domain.com" not in text and "`<EMAIL>`" in text


@needs_formats
def test_llamafactory_dpo_every_record_accounted_as_preference_pairs(tmp_path):
    stats, s, out = _curate_one(tmp_path, "llamafactory_dpo_en_demo.json", "curate.too_long=keep")
    assert s["read"] == 300 and s["formats"] == {"preference": 300}
    assert s["curated"] + s["duplicates"] + s["quarantined"] == 300
    assert s["duplicates"] >= 5 and stats["splits"]["prefs"] == s["curated"] == len(out["prefs"])
    for p in out["prefs"]:
        assert p["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in p["chosen"]] == ["assistant"] == [m["role"] for m in p["rejected"]]
    text = json.dumps(out["prefs"], ensure_ascii=False)
    assert "fiancé" in text and "fiancÃ©" not in text  # mojibake repaired
    assert "\x0c" not in text and s["fixes"]["latex_escape"] >= 1  # JSON-eaten "\frac" restored
    # the default length policy accounts for the long ones too
    stats2, s2, _ = _curate_one(tmp_path / "b", "llamafactory_dpo_en_demo.json")
    assert s2["curated"] + s2["duplicates"] + s2["quarantined"] == 300 and s2["reasons"].get("too_long", 0) > 0


@needs_formats
def test_llamafactory_glaive_tool_calls_every_record_accounted(tmp_path):
    stats, s, out = _curate_one(tmp_path, "llamafactory_glaive_toolcall_en_demo.json")
    assert s["read"] == 300 and s["formats"] == {"sharegpt": 300}
    assert s["curated"] + s["duplicates"] + s["quarantined"] == 300
    assert s["duplicates"] >= 20  # 35 exact duplicates in the file, some of them too long
    assert set(s["reasons"]) <= {"too_long"}
    recs = out["train"] + out["eval"]
    calls = [r for r in recs if any(m["content"].startswith("<tool_call>") for m in r["messages"])]
    assert calls, "tool calls are kept as text"
    for r in calls:
        roles = [m["role"] for m in r["messages"]]
        assert roles[0] == "system" and "<tools>" in r["messages"][0]["content"]
        assert set(roles[1:]) <= {"user", "assistant"}
        i = next(i for i, m in enumerate(r["messages"]) if m["content"].startswith("<tool_call>"))
        assert r["messages"][i]["role"] == "assistant" and r["messages"][i + 1]["content"].startswith("<tool_response>")
    # With tools set aside every record declares tools, so nothing is left to curate: the error says why.
    with pytest.raises(CurationError, match="no record could be curated.*curate.tools: quarantine"):
        _curate_one(tmp_path / "q", "llamafactory_glaive_toolcall_en_demo.json", "curate.tools=quarantine")


# --------------------------------------------------------------------------------------------- each reader

def _conv(rec, **opts):
    return convert(rec, Options(**opts))


def test_openai_tool_calls_flatten_to_text_and_parallel_results_merge():
    rec = {"tools": [{"type": "function", "function": {"name": "saldo"}}], "messages": [
        {"role": "user", "content": "Saldo das contas 1 e 2?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "saldo", "arguments": "{\"conta\": 1}"}},
            {"id": "b", "type": "function", "function": {"name": "saldo", "arguments": "{\"conta\": 2}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "10"},
        {"role": "tool", "tool_call_id": "b", "content": "20"},
        {"role": "assistant", "content": "R$ 10 e R$ 20."}]}
    msgs = _conv(rec).conversations[0]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"].count("<tool_call>") == 2 and '"arguments": {"conta": 2}' in msgs[2]["content"]
    assert msgs[3]["content"].count("<tool_response>") == 2
    with pytest.raises(Reject) as e:
        _conv(rec, tools="quarantine")
    assert e.value.code == "tools"


def test_prompt_completion_alpaca_instances_and_history():
    assert _conv({"prompt": "Oi?", "completion": " Olá."}).conversations[0][1] == {"role": "assistant", "content": " Olá."}
    c = _conv({"prompt": [{"role": "user", "content": "Oi?"}], "completion": [{"role": "assistant", "content": "Olá."}]})
    assert [m["role"] for m in c.conversations[0]] == ["user", "assistant"]
    h = _conv({"instruction": "E agora?", "output": "Agora 2.", "history": [["Antes?", "Antes 1."]]}).conversations[0]
    assert [m["content"] for m in h] == ["Antes?", "Antes 1.", "E agora?", "Agora 2."]


def test_preference_shapes_all_become_prompt_chosen_rejected():
    want = ([{"role": "user", "content": "Q?"}], [{"role": "assistant", "content": "bom"}],
            [{"role": "assistant", "content": "ruim"}])
    shapes = [
        {"prompt": "Q?", "chosen": "bom", "rejected": "ruim"},
        {"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "bom"}],
         "rejected": [{"role": "assistant", "content": "ruim"}]},
        {"conversations": [{"from": "human", "value": "Q?"}], "chosen": {"from": "gpt", "value": "bom"},
         "rejected": {"from": "gpt", "value": "ruim"}},
        {"chosen": "\n\nHuman: Q?\n\nAssistant: bom", "rejected": "\n\nHuman: Q?\n\nAssistant: ruim"},
        {"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bom"}],
         "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "ruim"}]},
    ]
    for rec in shapes:
        p = _conv(rec).prefs[0]
        assert (p.prompt, p.chosen, p.rejected) == want, rec
    with pytest.raises(Reject, match="share no prompt"):
        _conv({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]})


def test_feedback_ratings_and_corrections(tmp_path):
    raw = tmp_path / "raw" / "m"
    write_jsonl(raw / "feedback.jsonl", [
        {"prompt": "O que é CPC?", "answer": "Custo por clique.", "rating": 5},
        {"prompt": "O que é CTR?", "answer": "Custo total.", "rating": 2, "correction": "Taxa de cliques: cliques ÷ impressões."},
        {"prompt": "O que é CPM?", "answer": "Não sei.", "rating": 1},
        {"prompt": "O que é ROAS?", "answer": "Receita ÷ investimento.", "rating": "cinco"},
    ])
    stats = curate.run(PARAMS, raw, tmp_path / "out")
    out = _outputs(tmp_path / "out")
    answers = {r["messages"][-1]["content"] for r in out["train"] + out["eval"]}
    assert answers == {"Custo por clique.", "Taxa de cliques: cliques ÷ impressões."}
    assert out["prefs"][0]["chosen"][0]["content"].startswith("Taxa de cliques")
    assert out["prefs"][0]["rejected"][0]["content"] == "Custo total."
    assert {q["category"] for q in out["quarantine"]} == {"low_rating", "bad_rating"}
    assert stats["totals"] == {"read": 4, "curated": 2, "duplicates": 0, "quarantined": 2}


def test_csv_with_mapping_multiline_crlf_html_and_semicolons(tmp_path):
    raw = tmp_path / "raw" / "m"
    raw.mkdir(parents=True)
    (raw / "faq.csv").write_bytes(
        'pergunta;resposta;obs\r\n'
        '"O que é ACOS?";"<p>Investimento &divide; receita.</p><ul><li>menor é melhor</li></ul>";x\r\n'
        '"Pergunta\r\nem duas linhas?";"Resposta\r\ntambém.";y\r\n'.encode())
    (raw / "outra.tsv").write_text("q\ta\nQual o prazo?\t30 dias.\n", encoding="utf-8")
    p = _params('curate.sources=[{glob: "faq.csv", format: csv, columns: {question: pergunta, answer: resposta}}]')
    stats = curate.run(p, raw, tmp_path / "out")
    recs = {r["source"]: r["messages"] for r in _outputs(tmp_path / "out")["train"] + _outputs(tmp_path / "out")["eval"]}
    assert recs["m/faq.csv#2"][1]["content"] == "Investimento ÷ receita.\n\n- menor é melhor"
    assert recs["m/faq.csv#3"][0]["content"] == "Pergunta\nem duas linhas?"  # line of the row's start
    assert recs["m/outra.tsv#2"][1]["content"] == "30 dias."
    _accounted(stats)


def test_markdown_and_html_documents_become_records_by_heading(tmp_path):
    raw = tmp_path / "raw" / "m"
    raw.mkdir(parents=True)
    (raw / "guia.md").write_text("---\ntitle: x\n---\n# Guia\n\n## ACOS\n\nInvestimento ÷ receita.\n\n```\n# não é título\n```\n"
                                 "\n## ROAS\n\n### Fórmula\n\nReceita ÷ investimento.\n", encoding="utf-8")
    (raw / "pagina.html").write_text("<html><head><title>Ajuda</title><style>p{}</style></head><body><h1>Prazos</h1>"
                                     "<p>Entrega em <b>3</b> dias.</p><h2>Devolução</h2><p>Até 7 dias.</p></body></html>")
    p = _params('curate.sources=[{glob: "*.md", question_template: "Explique: {path}"}]')
    stats = curate.run(p, raw, tmp_path / "out")
    recs = {r["source"]: r["messages"] for r in _outputs(tmp_path / "out")["train"] + _outputs(tmp_path / "out")["eval"]}
    assert recs["m/guia.md#6"] == [{"role": "user", "content": "Explique: Guia > ACOS"},
                                   {"role": "assistant", "content": "Investimento ÷ receita.\n\n```\n# não é título\n```"}]
    assert recs["m/guia.md#16"][0]["content"] == "Explique: Guia > ROAS > Fórmula"  # ROAS alone has no text
    html = {tuple(m["content"] for m in v) for k, v in recs.items() if k.startswith("m/pagina.html#1:")}
    assert html == {("Prazos", "Entrega em 3 dias."), ("Devolução", "Até 7 dias.")}
    assert stats["totals"]["read"] == 4
    _accounted(stats)


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_input_never_crashes_and_names_file_line_field(tmp_path):
    raw = tmp_path / "raw" / "m"
    write_jsonl(raw / "ok.jsonl", [chat("Pergunta boa?", "Resposta boa.")])
    (raw / "latin.csv").write_bytes("question,answer\nO que é?,Isso.\n".encode("cp1252"))
    (raw / "mixed.jsonl").write_bytes(json.dumps(chat("Outra?", "Sim.")).encode() + b"\n"
                                      + '{"messages": "\xe9"}'.encode("cp1252") + b"\n{broken\n")
    (raw / "cols.csv").write_text("pergunta,resposta\na,b\n")
    (raw / "empty.jsonl").write_text("")
    (raw / "planilha.xlsx").write_bytes(b"PK\x03\x04")
    (raw / "array.json").write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]')
    stats = curate.run(_params('curate.sources=[{glob: "cols.csv", columns: {question: pergunta, answer: resposta_x}}]'),
                       raw, tmp_path / "out")
    _accounted(stats)
    q = {r["source"]: r for r in _outputs(tmp_path / "out")["quarantine"]}
    assert q["m/latin.csv"]["category"] == "encoding" and "line 2" in q["m/latin.csv"]["reason"]
    assert "encoding:" in q["m/latin.csv"]["reason"]
    assert q["m/mixed.jsonl#2"]["category"] == "encoding" and q["m/mixed.jsonl#2"]["record"] == '{"messages": "\\xe9"}'
    assert q["m/mixed.jsonl#3"]["category"] == "invalid_json"
    assert q["m/cols.csv"]["category"] == "missing_columns" and "'resposta_x'" in q["m/cols.csv"]["reason"]
    assert q["m/empty.jsonl"]["category"] == "empty_file"
    assert q["m/planilha.xlsx"]["category"] == "unknown_format"
    assert q["m/array.json"]["category"] == "invalid_json" and "line 2" in q["m/array.json"]["reason"]
    assert stats["totals"]["curated"] == 2
    # The same cp1252 file reads once its encoding is named.
    stats = curate.run(_params('curate.sources=[{glob: "latin.csv", encoding: cp1252}]'), raw, tmp_path / "out2")
    assert stats["sources"]["m/latin.csv"]["curated"] == 1


def test_nothing_readable_names_file_and_line(tmp_path):
    raw = tmp_path / "raw" / "m"
    raw.mkdir(parents=True)
    (raw / "a.json").write_text('[{"instruction": "x",, }]')
    with pytest.raises(CurationError, match=r"m/a.json: line 1: not valid JSON"):
        curate.run(PARAMS, raw, tmp_path / "out")


# ------------------------------------------------------------------------------------------ dedup and splits

def _long_answer(i: int) -> str:
    return (f"Resposta {i}: " + " ".join(f"palavra{(i * 7 + k) % 97} termo{k}" for k in range(40)))


def test_near_twins_across_sources_and_splits_land_once(tmp_path):
    raw = tmp_path / "raw" / "m"
    base = [chat(f"Pergunta longa número {i} sobre métricas?", _long_answer(i)) for i in range(80)]
    write_jsonl(raw / "a.jsonl", base)
    # b.csv: the same 80 with one word changed at the end (near twins), plus the first one exactly.
    rows = ["question,answer"] + [f'"{r["messages"][0]["content"]}","{r["messages"][1]["content"]} fim."' for r in base]
    rows.append(f'"{base[0]["messages"][0]["content"]}","{base[0]["messages"][1]["content"]}"')
    (raw / "b.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    stats = curate.run(PARAMS, raw, tmp_path / "out")
    out = _outputs(tmp_path / "out")
    assert stats["totals"]["curated"] == 80 and stats["dedup"] == {
        "exact": 1, "near": 80, "near_dup": True, "near_dup_threshold": PARAMS.curate.near_dup_threshold}
    assert stats["sources"]["m/b.csv"]["near_duplicates"] == 80
    assert all(r["source"].startswith("m/a.jsonl") for r in out["train"] + out["eval"])  # the first seen is kept
    kept = {r["source"]: r for r in out["train"] + out["eval"]}
    assert kept["m/a.jsonl#1"]["meta"]["duplicates"] == ["m/b.csv#82"]
    assert kept["m/a.jsonl#1"]["meta"]["near_duplicates"] == ["m/b.csv#2"]
    # Without near-dup, twins would sit on both sides of the split.
    loose = curate.run(_params("curate.near_dup=false"), raw, tmp_path / "loose")
    assert loose["totals"]["curated"] == 160
    texts = [" ".join(m["content"] for m in r["messages"]) for s in ("eval", "train")
             for r in read_jsonl(tmp_path / "loose" / f"{s}.jsonl")]
    assert any(hit is not None for hit in near_duplicates(texts, 0.85)[len(read_jsonl(tmp_path / "loose" / "eval.jsonl")):])
    _accounted(stats)


def test_near_duplicates_are_deterministic_and_spare_distinct_texts():
    texts = [_long_answer(i) for i in range(30)] + [_long_answer(3) + " extra", "curto", "curto"]
    a, b = near_duplicates(texts, 0.85), near_duplicates(texts, 0.85)
    assert a == b
    assert a[30][0] == 3 and a[32][0] == 31
    assert all(x is None for x in a[:30])


def test_mixed_formats_rerun_byte_identical_and_appending_keeps_splits(tmp_path):
    raw = tmp_path / "raw" / "m"
    write_jsonl(raw / "a.jsonl", [chat(f"Pergunta {i}?", f"Resposta {i}.") for i in range(40)])
    write_jsonl(raw / "p.jsonl", [{"prompt": f"Q{i}?", "chosen": f"Bom {i}.", "rejected": f"Ruim {i}."} for i in range(5)])
    (raw / "f.csv").write_text("question,answer\n" + "".join(f"Dúvida {i}?,Solução {i}.\n" for i in range(40)))
    curate.run(PARAMS, raw, tmp_path / "o1")
    curate.run(PARAMS, raw, tmp_path / "o2")
    for name in ("train.jsonl", "eval.jsonl", "prefs.jsonl", "quarantine.jsonl", "stats.json"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes(), name
    before = {r["id"]: s for s in ("train", "eval") for r in read_jsonl(tmp_path / "o1" / f"{s}.jsonl")}
    with open(raw / "a.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps(chat(f"Nova {i}?", f"Nova resposta {i}.")) + "\n" for i in range(60))
    (raw / "g.csv").write_text("question,answer\n" + "".join(f"Mais {i}?,Sim {i}.\n" for i in range(30)))
    curate.run(PARAMS, raw, tmp_path / "o3")
    after = {r["id"]: s for s in ("train", "eval") for r in read_jsonl(tmp_path / "o3" / f"{s}.jsonl")}
    assert len(after) == 170 and all(after[i] == s for i, s in before.items())


# ----------------------------------------------------------------------------------- PII, length, summary

def test_pii_scrubbed_per_kind_and_counted_without_values(tmp_path):
    raw = tmp_path / "raw" / "m"
    write_jsonl(raw / "a.jsonl", [chat("Meu e-mail é ana@exemplo.com.br e CPF 529.982.247-25, ok?",
                                       "Anotado; ligue para (11) 98765-4321.")])
    stats = curate.run(_params("curate.pii.phone=false"), raw, tmp_path / "out")
    msgs = (_outputs(tmp_path / "out")["train"] + _outputs(tmp_path / "out")["eval"])[0]["messages"]
    assert msgs[0]["content"] == "Meu e-mail é <EMAIL> e CPF <CPF>, ok?"
    assert "98765-4321" in msgs[1]["content"]  # phone scrubbing turned off
    assert stats["pii"] == {"email": 1, "cpf": 1}
    text = (tmp_path / "out" / "stats.json").read_text()
    assert "ana@" not in text and "529.982" not in text


def test_too_long_dropped_truncated_or_kept(tmp_path):
    raw = tmp_path / "raw" / "m"
    long = chat("Explique tudo.", "Detalhe importante. " * 400)
    multi = {"messages": [{"role": "user", "content": "Oi?"}, {"role": "assistant", "content": "Olá."},
                          {"role": "user", "content": "E mais?"}, {"role": "assistant", "content": "Mais. " * 800}]}
    write_jsonl(raw / "a.jsonl", [chat("Curta?", "Sim."), long, multi])
    s = curate.run(PARAMS, raw, tmp_path / "drop")
    assert s["totals"]["curated"] == 1 and s["reasons"] == {"too_long": 2}
    s = curate.run(_params("curate.too_long=truncate"), raw, tmp_path / "cut")
    recs = {r["source"]: r for r in _outputs(tmp_path / "cut")["train"] + _outputs(tmp_path / "cut")["eval"]}
    assert recs["m/a.jsonl#2"]["meta"]["truncated"] and recs["m/a.jsonl#2"]["messages"][1]["content"].startswith("Detalhe")
    assert len(recs["m/a.jsonl#3"]["messages"]) == 2  # the last exchange dropped whole
    assert s["token_lengths"]["max"] <= PARAMS.base.max_seq_len
    s = curate.run(_params("curate.too_long=keep"), raw, tmp_path / "keep")
    assert s["totals"]["curated"] == 3 and s["token_lengths"]["max"] > PARAMS.base.max_seq_len


def test_main_prints_a_summary_table(tmp_path, capsys):
    raw = tmp_path / "raw" / "m"
    write_jsonl(raw / "a.jsonl", [chat("Pergunta?", "Resposta."), chat("Pergunta?", "Resposta."), {"x": 1}])
    curate.main(["--params", str(ROOT / "params.yaml"), str(raw), str(tmp_path / "out")])
    table = capsys.readouterr().out
    assert "m/a.jsonl" in table and "TOTAL" in table and "unknown_format 1" in table
    row = next(line for line in table.splitlines() if line.startswith("m/a.jsonl")).split()
    assert row[1:6] == ["3", "1", "1", "0", "1"]
    assert read_json(tmp_path / "out" / "stats.json")["files"]["train.jsonl"]


def test_unterminated_csv_quote_and_odd_shapes_are_quarantined(tmp_path):
    raw = tmp_path / "raw" / "m"
    raw.mkdir(parents=True)
    (raw / "a.csv").write_text('question,answer\nOk?,Sim.\nCurto?,"sem fim\n', encoding="utf-8")
    write_jsonl(raw / "b.jsonl", [{"messages": [{"role": "user", "content": 5}]}, {"chosen": 1, "rejected": 2},
                                  {"conversations": [{"from": "alien", "value": "?"}]}, [1, 2]])
    stats = curate.run(PARAMS, raw, tmp_path / "out")
    _accounted(stats)
    assert stats["sources"]["m/a.csv"]["curated"] == 1
    assert {k: v for k, v in stats["reasons"].items()} == {"bad_type": 3, "invalid_csv": 1, "unknown_role": 1}

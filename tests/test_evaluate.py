"""evaluate end to end on the embedded SmolLM2: no champion vs a registered champion, the forgetting guard,
the judge's mechanics, the offline report, and batched vs per-example greedy generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from loraflow import evaluation, generation
from loraflow.config import GenerateParams, load_params
from loraflow.errors import EvalSetError
from loraflow.io import sha256_file
from steps import evaluate
from tests.conftest import ROOT, mlflow_client, write_jsonl

MODE = "evaltest"

PT_QA = [
    ("O que é retail media?", "Retail media é a venda de espaços de anúncio nos canais digitais de um varejista."),
    ("Como se calcula o ROAS de uma campanha?", "ROAS é a receita atribuída à campanha dividida pelo investimento em mídia."),
    ("Qual a diferença entre CPC e CPM?", "No CPC paga-se por clique; no CPM, por mil impressões."),
    ("Por que os dados primários do varejista são valiosos para a marca?",
     "Porque mostram quem compra de fato, permitindo segmentar e medir vendas fechadas."),
]


def _chat_records(qa, system: str | None = None) -> list[dict]:
    out = []
    for n, (q, a) in enumerate(qa, 1):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"id": f"r{n}", "messages": msgs, "source": f"test#{n}"})
    return out


# ------------------------------------------------------------------------------------------ fast, no model

def test_guard_sets_in_params_are_deps_of_the_evaluate_stage():
    params = load_params(ROOT / "params.yaml")
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]["do"]["deps"]
    assert params.evaluate.guard_sets and set(params.evaluate.guard_sets) <= set(deps)
    for path in params.evaluate.guard_sets:
        es = evaluation.load_eval_set(ROOT / path, None)
        assert es.total >= 10 and all(r["messages"][-1]["role"] == "assistant" for r in es.records)


def test_bad_guard_record_names_file_record_and_field(tmp_path):
    f = write_jsonl(tmp_path / "g.jsonl", [*_chat_records(PT_QA[:1]), {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(EvalSetError, match=r"g\.jsonl: record 2: field 'messages'.*assistant"):
        evaluation.load_eval_set(f, None)
    with pytest.raises(EvalSetError, match="not found"):
        evaluation.load_eval_set(tmp_path / "missing.jsonl", None)


def test_worst_regressions_lists_only_drops_lowest_first():
    es = evaluation.EvalSet(Path("e.jsonl"), "0" * 64, 3, _chat_records(PT_QA[:3]))
    gens = {n: generation.Generated([f"{n}{i}" for i in range(3)], [1] * 3, [True] * 3, "h", {}, 0.0)
            for n in ("base", "candidate")}
    scores = {"base": {"rougeL": [0.5, 0.5, 0.5]}, "candidate": {"rougeL": [0.4, 0.9, 0.1]}}
    worst = evaluation.worst_regressions(es, gens, scores, "rougeL", 5)
    assert worst["candidate_vs_champion"] is None
    assert [w["id"] for w in worst["candidate_vs_base"]] == ["r3", "r1"]  # r2 improved: not a regression
    assert worst["candidate_vs_base"][0] == {
        "id": "r3", "source": "test#3", "question": PT_QA[2][0], "reference": PT_QA[2][1],
        "candidate_answer": "candidate2", "base_answer": "base2", "candidate": 0.1, "base": 0.5, "delta": -0.4}


def test_forgetting_worst_picks_the_set_with_the_lowest_delta():
    def block(d):
        return {"deltas": {"candidate_vs_base": {m: {"mean": d, "ci_low": d - 0.1, "ci_high": d + 0.1}
                                                 for m in evaluation.METRICS}, "candidate_vs_champion": None}}

    w = evaluation.forgetting_worst({"a.jsonl": block(0.05), "b.jsonl": block(-0.2)})
    assert w["candidate_vs_base"]["rougeL"] == {"set": "b.jsonl", "mean": -0.2, "ci_low": -0.30000000000000004,
                                                "ci_high": -0.1}
    assert w["candidate_vs_champion"] is None
    assert evaluation.forgetting_worst({}) == {"candidate_vs_base": None, "candidate_vs_champion": None}


def test_judge_summary_counts_ties_half():
    ep = load_params(ROOT / "params.yaml").evaluate
    s = evaluation.judge_summary(["win", "tie", "loss", "win"], ep, seed=0)
    assert (s["n"], s["wins"], s["ties"], s["losses"]) == (4, 2, 1, 1)
    assert s["win_rate"]["mean"] == pytest.approx(0.625) and s["win_rate"]["ci_low"] <= 0.625 <= s["win_rate"]["ci_high"]


def test_end_of_turn_is_the_chat_templates_im_end():
    from loraflow.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve("embedded:SmolLM2-135M-Instruct"))
    ids = generation.end_of_turn_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert "<|im_end|>" in tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                                   tokenize=False)


# ------------------------------------------------------------------------------------------ slow, real model

@pytest.fixture(scope="module")
def base_model():
    from loraflow.models import load_causal_lm, load_tokenizer, resolve

    path = resolve("embedded:SmolLM2-135M-Instruct")
    return path, load_tokenizer(path), load_causal_lm(path).eval()


def _adapter(base_path: str, tok, out: Path, seed: int) -> Path:
    """A small LoRA with non-zero weights (peft's default init is an exact no-op), saved like train saves it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loraflow.models import load_causal_lm

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(base_path),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():  # keep the change small: answers differ from the base without turning to noise
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(base_model, tmp_path_factory):
    path, tok, _ = base_model
    root = tmp_path_factory.mktemp("adapters")
    return {"candidate": _adapter(path, tok, root / "candidate", 1), "champion": _adapter(path, tok, root / "champion", 2)}


def _params(tmp_path: Path, guard: Path, *extra: str):
    return load_params(ROOT / "params.yaml", [
        f"base.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "generate.max_new_tokens=10",
        "evaluate.bootstrap_samples=200", "evaluate.worst_n=2", f"evaluate.guard_sets=[{guard}]", *extra])


def _files(tmp_path: Path) -> tuple[Path, Path]:
    ev = write_jsonl(tmp_path / "eval.jsonl", _chat_records(PT_QA, system="Responda em português, em uma frase."))
    guard = write_jsonl(tmp_path / "guard.jsonl", _chat_records([("Qual é a capital do Brasil?", "Brasília."),
                                                                  ("What is the capital of France?", "Paris.")]))
    return ev, guard


def _check_common(m: dict, out: Path, guard: Path) -> None:
    assert m["eval_set"]["sha256"] == sha256_file(out.parent / "eval.jsonl")
    g = m["generation"]
    assert g["stop_tokens"] == ["<|im_end|>"] and g["greedy"] and g["max_new_tokens"] == 10
    # every model got the very same prompts and settings
    assert len({(x["prompts_sha256"], x["settings_sha256"]) for x in g["per_model"].values()}) == 1
    assert {x["prompts_sha256"] for x in g["per_model"].values()} == {g["prompts_sha256"]}
    for name in ("base", "candidate"):
        for metric in evaluation.METRICS:
            s = m[name][metric]
            assert 0 <= s["ci_low"] <= s["mean"] <= s["ci_high"] <= 1
        assert 0 < m[name]["length"]["new_tokens_mean"] <= 10
    assert set(m["deltas"]["candidate_vs_base"]) == set(evaluation.METRICS)
    f = m["forgetting"]["sets"][str(guard)]
    assert f["eval_set"]["size"] == 2 and f["deltas"]["candidate_vs_base"]["rougeL"]["ci_low"] <= f["deltas"]["candidate_vs_base"]["rougeL"]["mean"]
    assert m["forgetting"]["worst"]["candidate_vs_base"]["rougeL"]["set"] == str(guard)
    assert all(w["delta"] < 0 for w in m["worst_regressions"]["candidate_vs_base"])
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))


def _mlflow_run(tmp_path: Path, run_id: str):

    client = mlflow_client(tmp_path / "mlflow.db")
    run = client.get_run(run_id)
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    return run, artifacts


@pytest.mark.slow
def test_without_champion_compares_to_base_only(tmp_path, adapters):
    ev, guard = _files(tmp_path)
    out = tmp_path / "out"
    m = evaluate.run(_params(tmp_path, guard), MODE, ev, adapters["candidate"], out)
    _check_common(m, out, guard)
    assert m["champion"] is None and m["champion_version"] is None and "no champion" in m["note"]
    assert m["deltas"]["candidate_vs_champion"] is None and m["worst_regressions"]["candidate_vs_champion"] is None
    assert m["forgetting"]["sets"][str(guard)]["champion"] is None and m["judge"] is None
    assert "no champion" in (out / "report.html").read_text()
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and {"prompt", "reference", "base_answer", "candidate_answer", "candidate_rougeL",
                                "base_bertscore"} <= set(preds[0]) and "champion_answer" not in preds[0]
    run, artifacts = _mlflow_run(tmp_path, m["mlflow_run_id"])
    assert run.data.metrics["eval_candidate_rougeL"] == pytest.approx(m["candidate"]["rougeL"]["mean"])
    assert {"eval/metrics.json", "eval/predictions.json", "eval/comparison.png", "eval/report.html"} <= artifacts


@pytest.mark.slow
def test_with_champion_compares_to_both_and_judge_runs(tmp_path, adapters):
    import mlflow

    from loraflow import tracking
    from loraflow.pyfunc import AdapterModel

    ev, guard = _files(tmp_path)
    params = _params(tmp_path, guard, "evaluate.max_examples=2", "evaluate.judge_model=embedded:SmolLM2-135M-Instruct")
    # Register the champion the way promote does: a pyfunc model holding the adapter, then the alias.
    tracking.setup(params, MODE)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=AdapterModel(), artifacts={"adapter": str(adapters["champion"])},
                                       model_config={"base_model": params.base.model}, pip_requirements=["loraflow"],
                                       registered_model_name=f"loraflow-{MODE}")
    mlflow.MlflowClient().set_registered_model_alias(f"loraflow-{MODE}", "champion", info.registered_model_version)

    out = tmp_path / "out"
    m = evaluate.run(params, MODE, ev, adapters["candidate"], out)
    _check_common(m, out, guard)
    assert m["champion_version"] == str(info.registered_model_version) and m["note"] is None
    assert set(m["generation"]["per_model"]) == {"base", "champion", "candidate"}
    for metric in evaluation.METRICS:
        assert 0 <= m["champion"][metric]["mean"] <= 1
        d = m["deltas"]["candidate_vs_champion"][metric]
        assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    assert m["forgetting"]["sets"][str(guard)]["deltas"]["candidate_vs_champion"] is not None
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    # two small random adapters: with params.yaml's repetition_penalty they may agree on one short answer
    assert len(preds) == 2 and any(p["champion_answer"] != p["candidate_answer"] for p in preds)
    # every model answered with the candidate's generation_config.json (these hand-made adapters have none:
    # params.yaml's `generate` section), and each model's degeneration rates are measured
    assert all(0 <= m[n]["degeneration"][r]["mean"] <= 1 for n in evaluation.MODELS for r in ("stop_rate", "loop_rate"))
    assert m["generation"]["repetition_penalty"] == m["generation"]["generation_config"]["repetition_penalty"] == 1.1
    assert {k for p in preds for k in p} >= {f"{n}_{k}" for n in evaluation.MODELS for k in ("loop", "stopped", "seq_rep_4")}
    # the judge's mechanics (a 135M judge says nothing about quality): both comparisons, every example judged
    for ref in ("base", "champion"):
        j = m["judge"][f"candidate_vs_{ref}"]
        assert j["n"] == 2 and j["wins"] + j["ties"] + j["losses"] == 2 and 0 <= j["win_rate"]["mean"] <= 1
        assert all(p[f"judge_vs_{ref}"] in ("win", "tie", "loss") for p in preds)
    html = (out / "report.html").read_text()
    assert f"champion v{m['champion_version']}" in html and "Pairwise judge" in html
    run, _ = _mlflow_run(tmp_path, m["mlflow_run_id"])
    assert run.data.metrics["eval_delta_candidate_vs_champion_rougeL"] == pytest.approx(
        m["deltas"]["candidate_vs_champion"]["rougeL"]["mean"])


def _sample_prompts(tmp_path: Path) -> list[list[dict]]:
    """The curated eval split of the sample data when this checkout has it, else pt-BR prompts of mixed lengths."""
    raw = ROOT / "data" / "raw" / "retail_media"
    if raw.is_dir() and any(raw.iterdir()):
        from steps import curate

        curate.run(load_params(ROOT / "params.yaml"), raw, tmp_path / "curated")
        recs = evaluation.load_eval_set(tmp_path / "curated" / "eval.jsonl", 12).records
        return [r["messages"][:-1] for r in recs]
    long_q = ("Uma marca de cosméticos quer anunciar no site de um grande varejista durante a Black Friday, "
              "com orçamento limitado e foco em clientes que já compraram a categoria. Que formatos e métricas você sugere?")
    prompts = [[{"role": "user", "content": q}] for q, _ in PT_QA] + [
        [{"role": "user", "content": "Oi"}],
        [{"role": "user", "content": long_q}],
        [{"role": "system", "content": "Você é um analista de mídia. Seja breve."},
         {"role": "user", "content": "O que é uma impressão visível?"}],
        [{"role": "user", "content": "Resuma: atribuição em loja física."}, {"role": "assistant", "content": "Claro."},
         {"role": "user", "content": "Agora em uma frase só, por favor."}],
    ]
    return prompts


@pytest.mark.slow
def test_batched_and_per_example_generation_agree(base_model, tmp_path):
    _, tok, model = base_model
    prompts = _sample_prompts(tmp_path)
    assert str(next(model.parameters()).dtype) == "torch.float32"
    greedy = GenerateParams(max_new_tokens=32, repetition_penalty=1.0)
    batched = generation.generate_detailed(model, tok, prompts, greedy, batch_size=len(prompts))
    single = generation.generate_detailed(model, tok, prompts, greedy, batch_size=1)
    assert batched.answers == single.answers and batched.new_tokens == single.new_tokens
    assert batched.prompts_sha256 == single.prompts_sha256
    assert any(batched.stopped)  # some answers end at <|im_end|> before the cap

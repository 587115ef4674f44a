"""Evaluation: base, the registry's champion and the candidate answer the same held-out prompts, and are compared.

The base model is loaded once; the candidate and the champion (when the registry has one) are peft adapters on
it, and "no adapter" is simply another model in the same generate call (loraflow.generation.generate_detailed):
the same rendered prompts and settings for every model, recorded as hashes and checked to agree. Scores come
from loraflow.metrics and loraflow.degeneration; every mean carries a bootstrap interval and every comparison
a paired one. This module also holds the pairwise judge's summary, the forgetting guard's summary and the
MLflow view of metrics.json.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow import degeneration, generation, models, tracking
from loraflow.config import EvaluateParams, GenerateParams, Params
from loraflow.errors import EvalSetError
from loraflow.generation import Generated
from loraflow.io import read_jsonl, sha256_file
from loraflow.metrics import bootstrap_diff, bootstrap_mean, length_stats, score

METRICS = ("rouge1", "rouge2", "rougeL", "bertscore")
MODELS = ("base", "champion", "candidate")
REFERENCES = ("base", "champion")  # what the candidate is compared with


# ---------------------------------------------------------------------------------------------- eval sets

@dataclass(frozen=True)
class EvalSet:
    path: Path
    sha256: str  # of the whole file, as DVC pins it
    total: int
    records: list[dict]

    @property
    def prompts(self) -> list[list[dict]]:
        return [r["messages"][:-1] for r in self.records]

    @property
    def refs(self) -> list[str]:
        return [r["messages"][-1]["content"] for r in self.records]

    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "size": len(self.records), "total_records": self.total,
                "reference_words_mean": sum(len(r.split()) for r in self.refs) / len(self.refs)}


def load_eval_set(path: Path, max_examples: int | None) -> EvalSet:
    """Read a chat JSONL eval set; the last turn of each record (the assistant's) is the reference."""
    path = Path(path)
    if not path.is_file():
        raise EvalSetError(f"{path}: eval set not found (listed in evaluate.guard_sets, or the mode's eval split)")
    records = read_jsonl(path)
    if not records:
        raise EvalSetError(f"{path}: no eval records")
    for n, r in enumerate(records, 1):
        msgs = r.get("messages") if isinstance(r, dict) else None
        ok = (isinstance(msgs, list) and len(msgs) >= 2
              and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs))
        if not ok or msgs[-1]["role"] != "assistant":
            raise EvalSetError(f"{path}: record {n}: field 'messages' must be a list of {{role, content}} turns "
                               "whose last turn is the assistant's reference answer")
    return EvalSet(path, sha256_file(path), len(records), records[:max_examples])


# ---------------------------------------------------------------------------------------------- answering

def answer_every_model(params: Params, mode: str, model, tok, adapter_dir: Path, prompts: list[list[dict]],
                       gp: GenerateParams, stop_ids: list[int]) -> tuple[dict[str, Generated], str | None, Any]:
    """The base model, the champion (when the registry has one) and the candidate adapter each answer every
    prompt through the same generate call. Returns (answers per model, champion version, the peft model)."""
    from peft import PeftModel

    def gen() -> Generated:
        return generation.generate_detailed(model, tok, prompts, gp, params.evaluate.batch_size, stop_ids)

    gens: dict[str, Generated] = {"base": gen()}
    with tempfile.TemporaryDirectory(prefix="loraflow-champion-") as tmp:
        model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name="candidate")
        champ_version, champ_dir = tracking.champion_adapter(params, mode, Path(tmp))
        if champ_dir is not None:
            model.load_adapter(str(champ_dir), adapter_name="champion")
            model.set_adapter("champion")
            gens["champion"] = gen()
        model.set_adapter("candidate")
        gens["candidate"] = gen()
    # The same call for every model makes this hold by construction; recording and checking it makes it evidence.
    if len({(g.prompts_sha256, g.settings_sha256) for g in gens.values()}) != 1:
        raise RuntimeError(f"models were not given the same prompts and settings: { {n: g.settings for n, g in gens.items()} }")
    return gens, champ_version, model


def generation_record(gens: dict[str, Generated], tok, model, stop_ids: list[int], gp: GenerateParams,
                      prompts: int) -> dict[str, Any]:
    """metrics.json's `generation` block: the settings and prompts every model got, and each model's speed."""
    from loraflow.models import device

    g0 = gens["candidate"]
    return {
        **g0.settings, "greedy": True,
        "stop_tokens": tok.convert_ids_to_tokens(stop_ids),
        "generation_config": gp.model_dump(),
        "chat_template_sha256": models.template_sha256(tok),
        "prompts_sha256": g0.prompts_sha256, "prompts": prompts,
        "per_model": {n: {"prompts_sha256": g.prompts_sha256, "settings_sha256": g.settings_sha256,
                          "seconds": round(g.seconds, 2), "new_tokens": sum(g.new_tokens),
                          "new_tokens_per_s": round(sum(g.new_tokens) / max(g.seconds, 1e-9), 1)}
                      for n, g in gens.items()},
        "device": device(), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------------------------------------- comparing

def compare(es: EvalSet, gens: dict[str, Generated], ep: EvaluateParams, seed: int) -> tuple[dict, dict]:
    """Score every model on one set. Returns (per-example scores, the summary block of metrics.json)."""
    scores = {n: score(g.answers, es.refs, ep) for n, g in gens.items()}
    health = {n: degeneration.health(g.answers, g.stopped) for n, g in gens.items()}
    block: dict[str, Any] = {}
    for n in MODELS:
        rates = degeneration.per_example(health[n]) if n in health else {}
        block[n] = None if n not in scores else {
            **{m: bootstrap_mean(scores[n][m], ep.bootstrap_samples, ep.confidence, seed) for m in METRICS},
            "length": length_stats(gens[n]),
            "degeneration": {k: bootstrap_mean(v, ep.bootstrap_samples, ep.confidence, seed) for k, v in rates.items()}}
    block["deltas"] = {
        f"candidate_vs_{ref}": ({m: bootstrap_diff(scores["candidate"][m], scores[ref][m], ep.bootstrap_samples,
                                                   ep.confidence, seed) for m in METRICS} if ref in scores else None)
        for ref in REFERENCES}
    block["worst_regressions"] = worst_regressions(es, gens, scores, ep.report_metric, ep.worst_n)
    return scores, block


def worst_regressions(es: EvalSet, gens: dict[str, Generated], scores: dict, metric: str, n: int) -> dict:
    """The n examples where the candidate scores furthest below each reference model (only real drops)."""
    from loraflow.judge import question_text

    out: dict[str, list | None] = {}
    for ref in REFERENCES:
        if ref not in scores:
            out[f"candidate_vs_{ref}"] = None
            continue
        d = [c - r for c, r in zip(scores["candidate"][metric], scores[ref][metric], strict=True)]
        worst = sorted((i for i in range(len(d)) if d[i] < 0), key=lambda i: (d[i], i))[:n]
        out[f"candidate_vs_{ref}"] = [
            {"id": es.records[i].get("id"), "source": es.records[i].get("source"),
             "question": question_text(es.prompts[i]), "reference": es.refs[i],
             "candidate_answer": gens["candidate"].answers[i], f"{ref}_answer": gens[ref].answers[i],
             "candidate": round(scores["candidate"][metric][i], 4), ref: round(scores[ref][metric][i], 4),
             "delta": round(d[i], 4)} for i in worst]
    return out


def forgetting_worst(sets: dict[str, dict]) -> dict[str, dict | None]:
    """Per comparison and metric, the guard set where the candidate lost most (lowest mean delta)."""
    out: dict[str, dict | None] = {}
    for ref in REFERENCES:
        key = f"candidate_vs_{ref}"
        present = {p: b["deltas"][key] for p, b in sets.items() if b["deltas"][key]}
        out[key] = None if not present else {}
        for m in METRICS if present else ():
            worst = min(present, key=lambda p, m=m: present[p][m]["mean"])
            out[key][m] = {"set": worst, **present[worst][m]}
    return out


def prediction_rows(es: EvalSet, gens: dict[str, Generated], scores: dict, verdicts: dict[str, list[str]]) -> list[dict]:
    """predictions.jsonl: per eval example the prompt, the reference, each model's answer, scores and health."""
    return [{"id": r.get("id"), "source": r.get("source"), "prompt": p, "reference": ref,
             **{f"{n}_answer": g.answers[i] for n, g in gens.items()},
             **{f"{n}_new_tokens": g.new_tokens[i] for n, g in gens.items()},
             **{f"{n}_{m}": round(scores[n][m][i], 4) for n in scores for m in METRICS},
             **{f"{n}_{k}": v for n, g in gens.items()
                for k, v in degeneration.answer_health(g.answers[i], g.stopped[i]).items()},
             **{f"judge_vs_{ref}": v[i] for ref, v in verdicts.items()}}
            for i, (r, p, ref) in enumerate(zip(es.records, es.prompts, es.refs, strict=True))]


# ---------------------------------------------------------------------------------------------- the judge

def judge_summary(verdicts: list[str], ep: EvaluateParams, seed: int) -> dict[str, Any]:
    """Win rate with ties counted half, and its bootstrap interval."""
    points = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[v] for v in verdicts]
    return {"n": len(verdicts), "wins": verdicts.count("win"), "ties": verdicts.count("tie"),
            "losses": verdicts.count("loss"), "win_rate": bootstrap_mean(points, ep.bootstrap_samples, ep.confidence, seed)}


def judge(params: Params, es: EvalSet, gens: dict[str, Generated]) -> tuple[dict, dict[str, list[str]]]:
    """The pairwise judge (`evaluate.judge_model`) on the candidate against each reference model.
    Returns (metrics.json's `judge` block, per reference the per-example verdicts)."""
    import gc

    from loraflow.judge import PROMPT_SHA256, PairwiseJudge, question_text

    ep = params.evaluate
    pj = PairwiseJudge(ep.judge_model, params.base.model_cache, params.base.trust_remote_code)
    questions = [question_text(p) for p in es.prompts]
    verdicts = {ref: pj.compare(questions, es.refs, gens["candidate"].answers, gens[ref].answers, ep.batch_size)
                for ref in REFERENCES if ref in gens}
    del pj
    gc.collect()
    out = {"model": ep.judge_model, "prompt_sha256": PROMPT_SHA256,
           "method": "logits of 'A' vs 'B' after a fixed pairwise prompt with the reference answer; both orders; "
                     "win = preferred in both, loss = other preferred in both, else tie",
           **{f"candidate_vs_{ref}": (judge_summary(verdicts[ref], ep, params.base.seed) if ref in verdicts else None)
              for ref in REFERENCES}}
    return out, verdicts


# ---------------------------------------------------------------------------------------------- MLflow

def mlflow_run(params: Params, mode: str, train_run_id: str | None) -> str:
    """The adapter's training run carries its evaluation; without one (an adapter trained elsewhere) a new run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    exp_id = tracking.setup(params, mode)
    client = mlflow.MlflowClient()
    if train_run_id:
        try:
            client.get_run(train_run_id)
            return train_run_id
        except MlflowException:
            pass
    return client.create_run(exp_id, run_name=f"evaluate-{mode}", tags={"loraflow.step": "evaluate"}).info.run_id


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json flattened to MLflow metric names (eval_<model>_<metric>, eval_delta_..., guard_..., judge_...)."""
    flat: dict[str, float] = {}
    for n in MODELS:
        if metrics[n]:
            flat.update({f"eval_{n}_{m}": metrics[n][m]["mean"] for m in METRICS})
            flat[f"eval_{n}_words_mean"] = metrics[n]["length"]["words_mean"]
            flat.update({f"eval_{n}_{k}": v["mean"] for k, v in metrics[n].get("degeneration", {}).items()})
    for key, d in metrics["deltas"].items():
        for m, s in (d or {}).items():
            flat.update({f"eval_delta_{key}_{m}": s["mean"], f"eval_delta_{key}_{m}_ci_low": s["ci_low"]})
    for path, b in metrics["forgetting"]["sets"].items():
        stem = re.sub(r"[^\w.-]", "_", Path(path).stem)
        for key, d in b["deltas"].items():
            flat.update({f"guard_{stem}_{key}_{m}": s["mean"] for m, s in (d or {}).items()})
        for n in MODELS:
            flat.update({f"guard_{stem}_{n}_{k}": v["mean"] for k, v in ((b.get(n) or {}).get("degeneration") or {}).items()})
    for key, j in (metrics["judge"] or {}).items():
        if key.startswith("candidate_vs_") and j:
            flat[f"judge_win_rate_{key}"] = j["win_rate"]["mean"]
    flat.update({f"eval_seconds_{k}": v for k, v in metrics["timing_seconds"].items()})
    return flat


def log_mlflow(run_id: str, metrics: dict, preds: list[dict], out_dir: Path) -> None:
    """The flattened metrics, the written files and the per-example table, on the adapter's run."""
    import mlflow
    import pandas as pd

    from loraflow.judge import question_text

    table = pd.DataFrame([{**p, "prompt": question_text(p["prompt"])} for p in preds])
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(mlflow_metrics(metrics))
        for name in ("metrics.json", "comparison.png", "report.html"):
            mlflow.log_artifact(str(out_dir / name), artifact_path="eval")
        mlflow.log_table(data=table, artifact_file="eval/predictions.json")

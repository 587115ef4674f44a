"""evaluate: base, current champion and candidate answer the same held-out prompts; ROUGE and BERTScore.

    python -m steps.evaluate --mode retail_media data/curated/retail_media/eval.jsonl \
        data/adapters/retail_media data/eval/retail_media

The base model is loaded once; the candidate and the registry's `champion` (when one exists) are peft
adapters on it, and "no adapter" is simply another argument to the same generate call. Every model gets
one generate call over the eval set plus the forgetting-guard sets (`evaluate.guard_sets`), with the
same rendered prompts and settings; each call records the hashes of both, and they must agree.
Generation is batched greedy decoding with left padding, prompts sorted by length, stopping at the chat
template's end-of-turn token. Confidence intervals are paired bootstrap intervals of per-example
differences. Writes predictions.jsonl, comparison.png, report.html and finally metrics.json, each whole;
the metrics, the per-example table and the report also go to the adapter's MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loraflow import degeneration, generation, models, tracking
from loraflow.config import EvaluateParams, Params, load_params, registered_model_name
from loraflow.errors import EvalSetError
from loraflow.io import read_json, read_jsonl, sha256_file, write_bytes, write_json, write_jsonl, write_text
from loraflow.stepcli import step_errors, step_parser

log = logging.getLogger(__name__)

METRICS = ("rouge1", "rouge2", "rougeL", "bertscore")
MODELS = ("base", "champion", "candidate")
REFERENCES = ("base", "champion")  # what the candidate is compared with


class UnicodeWordTokenizer:
    """ROUGE tokenizer that keeps accented letters: "ação" stays one token ("a o" with rouge_score's default).

    Lower-cases, NFC-normalises and splits on Unicode word characters. No stemming: rouge_score's Porter
    stemmer is English-only and would mangle Portuguese.
    """

    _word = re.compile(r"\w+", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        return self._word.findall(unicodedata.normalize("NFC", text).lower())


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=UnicodeWordTokenizer())
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for p, r in zip(predictions, references, strict=True):
        s = scorer.score(r, p)
        for k in out:
            out[k].append(s[k].fmeasure)
    return out


_scorers: dict[tuple[str, int], Any] = {}


def bertscore_f1(predictions: list[str], references: list[str], encoder: str, num_layers: int) -> list[float]:
    """BERTScore F1 with one cached scorer per encoder (loading it dominates the cost)."""
    from bert_score import BERTScorer

    key = (encoder, num_layers)
    if key not in _scorers:
        _scorers[key] = BERTScorer(model_type=encoder, num_layers=num_layers, batch_size=64)
    _, _, f1 = _scorers[key].score(predictions, references)
    return [float(x) for x in f1]


# ---------------------------------------------------------------------------------------------- generation

def end_of_turn_ids(tok, model=None) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos, the model's generation eos and the special
    token the chat template writes right after an assistant message (<|im_end|>, <|eot_id|>, <end_of_turn>...),
    which is not always the eos (Llama 3 instruct: eos <|end_of_text|>, end of turn <|eot_id|>)."""
    ids = {tok.eos_token_id} - {None}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])
    probe = "loraflow-end-of-turn-probe"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                                       tokenize=False)
    except Exception:  # noqa: BLE001 - no usable template: the eos is all we have
        text = ""
    if probe in text:
        special = set(tok.all_special_ids)
        tail = tok(text.split(probe, 1)[1], add_special_tokens=False)["input_ids"]
        ids.update(next(([i] for i in tail if i in special), []))
    return sorted(ids)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Generated:
    """One model's answers and what produced them."""

    answers: list[str]
    new_tokens: list[int]
    stopped: list[bool]  # ended at an end-of-turn token (False: ran into max_new_tokens)
    prompts_sha256: str  # of the rendered prompt texts actually tokenized
    settings: dict[str, Any]  # the generation settings actually passed
    seconds: float

    def part(self, lo: int, hi: int) -> Generated:
        return replace(self, answers=self.answers[lo:hi], new_tokens=self.new_tokens[lo:hi], stopped=self.stopped[lo:hi])


def generate_detailed(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
                      stop_ids: list[int] | None = None, decoding: dict[str, Any] | None = None) -> Generated:
    """Greedy answers for chat prompts, batched (left padding, sorted by length); order is preserved.
    `decoding`: extra greedy settings for generate() (repetition_penalty, no_repeat_ngram_size)."""
    import torch

    stop_ids = sorted(stop_ids if stop_ids is not None else end_of_turn_ids(tok, model))
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    # Sorting by length keeps padding (wasted compute) small; left padding keeps every prompt's last token
    # at the end, where generation continues, and generate() derives position ids from the attention mask.
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    decoding = dict(decoding or {})
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "do_sample": False, "num_beams": 1,
                **decoding, "stop_token_ids": stop_ids, "pad_token_id": tok.pad_token_id, "padding_side": "left"}
    answers, new_tokens, stopped = [""] * len(texts), [0] * len(texts), [False] * len(texts)
    tok.padding_side = "left"
    stops = set(stop_ids)
    t = time.perf_counter()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, **decoding,
                                 pad_token_id=tok.pad_token_id, eos_token_id=stop_ids)
        for row, i in zip(out[:, enc["input_ids"].shape[1]:].tolist(), idx, strict=True):
            # Finished rows are padded to the batch's longest answer: cut at the first end-of-turn.
            end = next((k for k, x in enumerate(row) if x in stops), None)
            answers[i] = tok.decode(row[:end], skip_special_tokens=True).strip()
            new_tokens[i] = len(row) if end is None else end + 1
            stopped[i] = end is not None
    return Generated(answers, new_tokens, stopped, _sha(texts), settings, time.perf_counter() - t)


def generate(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
             decoding: dict[str, Any] | None = None) -> list[str]:
    """Greedy answers only (the registered pyfunc model serves with this)."""
    return generate_detailed(model, tok, prompts, max_new_tokens, batch_size, decoding=decoding).answers


# ---------------------------------------------------------------------------------------------- statistics

def bootstrap_diff(a: list[float], b: list[float], samples: int, confidence: float, seed: int) -> dict[str, float]:
    """Mean of a-b over paired examples and its percentile bootstrap interval."""
    import numpy as np

    d = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100])
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def bootstrap_mean(a: list[float], samples: int, confidence: float, seed: int) -> dict[str, float]:
    return bootstrap_diff(a, [0.0] * len(a), samples, confidence, seed)


def length_stats(g: Generated) -> dict[str, float]:
    import numpy as np

    words = np.array([len(a.split()) for a in g.answers])
    return {"words_mean": float(words.mean()), "words_median": float(np.median(words)),
            "words_p90": float(np.percentile(words, 90)), "new_tokens_mean": float(np.mean(g.new_tokens)),
            "stopped_at_end_of_turn": float(np.mean(g.stopped)), "empty": int((words == 0).sum())}


def judge_summary(verdicts: list[str], ep: EvaluateParams, seed: int) -> dict[str, Any]:
    """Win rate with ties counted half, and its bootstrap interval."""
    points = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[v] for v in verdicts]
    return {"n": len(verdicts), "wins": verdicts.count("win"), "ties": verdicts.count("tie"),
            "losses": verdicts.count("loss"), "win_rate": bootstrap_mean(points, ep.bootstrap_samples, ep.confidence, seed)}


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


def champion_adapter(params: Params, mode: str, dest: Path) -> tuple[str | None, Path | None]:
    """Download the registry's current champion adapter, if any. Returns (version, folder)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.setup(params, mode)
    name = registered_model_name(mode)
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dest)))
    found = next(iter(sorted(local.rglob("adapter_config.json"))), None)
    if found is None:
        raise FileNotFoundError(f"champion {name} v{mv.version} holds no adapter_config.json under {local}")
    return str(mv.version), found.parent


def score(answers: list[str], refs: list[str], ep: EvaluateParams) -> dict[str, list[float]]:
    from loraflow.models import resolve

    s = rouge_scores(answers, refs)
    s["bertscore"] = bertscore_f1(answers, refs, resolve(ep.bertscore_model), ep.bertscore_num_layers)
    return s


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


# ---------------------------------------------------------------------------------------------- the step

def run(params: Params, mode: str, eval_file: Path, adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Evaluate base, champion (if the registry has one) and the candidate adapter on one eval file,
    and on the forgetting-guard sets of `evaluate.guard_sets`.

    Args:
        params: reads `base` and `evaluate`.
        mode: which registered model's `champion` to compare against.
        eval_file: curated eval.jsonl; the last assistant turn of each record is the reference.
        adapter_dir: the candidate adapter (train's output).
        out_dir: gets predictions.jsonl, comparison.png, report.html then metrics.json, each written whole.

    Returns:
        The metrics.json content.
    """
    from peft import PeftModel

    from loraflow.models import device, load_causal_lm, load_tokenizer, resolve

    ep, seed = params.evaluate, params.base.seed
    eval_file, adapter_dir, out_dir = Path(eval_file), Path(adapter_dir), Path(out_dir)
    main_set = load_eval_set(eval_file, ep.max_examples)
    guards = [load_eval_set(Path(g), ep.max_examples) for g in ep.guard_sets
              if Path(g).resolve() != eval_file.resolve()]  # a mode's own eval set guards nothing
    sets = [main_set, *guards]
    bounds = [sum(len(s.records) for s in sets[:k]) for k in range(len(sets) + 1)]
    prompts = [p for s in sets for p in s.prompts]

    timing: dict[str, float] = {}
    t = time.perf_counter()
    tok = load_tokenizer(str(adapter_dir), trust_remote_code=params.base.trust_remote_code)  # candidate's template
    model = load_causal_lm(resolve(params.base.model, params.base.model_cache), trust_remote_code=params.base.trust_remote_code)
    model.eval()
    stop_ids = end_of_turn_ids(tok, model)
    timing["load"] = time.perf_counter() - t
    # The candidate's own decoding settings (generation_config.json), for every model alike: one comparison.
    gp = generation.load(adapter_dir, params.generate)
    extra = generation.decoding(gp)

    def gen() -> Generated:
        return generate_detailed(model, tok, prompts, gp.max_new_tokens, ep.batch_size, stop_ids, extra)

    gens: dict[str, Generated] = {"base": gen()}
    with tempfile.TemporaryDirectory(prefix="loraflow-champion-") as tmp:
        model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name="candidate")
        champ_version, champ_dir = champion_adapter(params, mode, Path(tmp))
        if champ_dir is not None:
            model.load_adapter(str(champ_dir), adapter_name="champion")
            model.set_adapter("champion")
            gens["champion"] = gen()
        model.set_adapter("candidate")
        gens["candidate"] = gen()
    # The same call for every model makes this hold by construction; recording and checking it makes it evidence.
    if len({(g.prompts_sha256, _sha(g.settings)) for g in gens.values()}) != 1:
        raise RuntimeError(f"models were not given the same prompts and settings: { {n: g.settings for n, g in gens.items()} }")
    timing.update({n: g.seconds for n, g in gens.items()})

    t = time.perf_counter()
    per_set = [(s, compare(s, {n: g.part(bounds[k], bounds[k + 1]) for n, g in gens.items()}, ep, seed))
               for k, s in enumerate(sets)]
    timing["metrics"] = time.perf_counter() - t
    main_gens = {n: g.part(bounds[0], bounds[1]) for n, g in gens.items()}
    scores, block = per_set[0][1]

    judge, verdicts = None, {}
    if ep.judge_model:
        t = time.perf_counter()
        judge, verdicts = _judge(params, main_set, main_gens)
        timing["judge"] = time.perf_counter() - t

    train_info = read_json(adapter_dir / "train_info.json") if (adapter_dir / "train_info.json").exists() else {}
    run_id = _mlflow_run(params, mode, train_info.get("mlflow_run_id"))
    guard_sets = {str(s.path): {"eval_set": s.info(), **b} for s, (_, b) in per_set[1:]}
    g0 = gens["candidate"]
    metrics = {
        "mode": mode,
        "eval_set": main_set.info(),
        "candidate_adapter_sha256": train_info.get("adapter_sha256"),
        "champion_version": champ_version,
        "note": None if champ_version else "no champion in the registry yet: the candidate is compared with the base model only",
        **block,
        "forgetting": {"sets": guard_sets, "worst": forgetting_worst(guard_sets)},
        "judge": judge,
        "generation": {
            **g0.settings, "greedy": True,
            "stop_tokens": tok.convert_ids_to_tokens(stop_ids),
            "generation_config": gp.model_dump(),
            "chat_template_sha256": models.template_sha256(tok),
            "prompts_sha256": g0.prompts_sha256, "prompts": len(prompts),
            "per_model": {n: {"prompts_sha256": g.prompts_sha256, "settings_sha256": _sha(g.settings),
                              "seconds": round(g.seconds, 2), "new_tokens": sum(g.new_tokens),
                              "new_tokens_per_s": round(sum(g.new_tokens) / max(g.seconds, 1e-9), 1)}
                          for n, g in gens.items()},
            "device": device(), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
        "scoring": {"rouge_tokenizer": "unicode words, lower-cased, NFC, no stemming", "bertscore_model": ep.bertscore_model,
                    "bertscore_num_layers": ep.bertscore_num_layers, "confidence": ep.confidence,
                    "bootstrap_samples": ep.bootstrap_samples, "report_metric": ep.report_metric, "seed": seed},
        "timing_seconds": {k: round(v, 2) for k, v in timing.items()},
        "mlflow_run_id": run_id,
    }
    preds = [{"id": r.get("id"), "source": r.get("source"), "prompt": p, "reference": ref,
              **{f"{n}_answer": g.answers[i] for n, g in main_gens.items()},
              **{f"{n}_new_tokens": g.new_tokens[i] for n, g in main_gens.items()},
              **{f"{n}_{m}": round(scores[n][m][i], 4) for n in scores for m in METRICS},
              **{f"{n}_{k}": v for n, g in main_gens.items()
                 for k, v in degeneration.answer_health(g.answers[i], g.stopped[i]).items()},
              **{f"judge_vs_{ref}": v[i] for ref, v in verdicts.items()}}
             for i, (r, p, ref) in enumerate(zip(main_set.records, main_set.prompts, main_set.refs, strict=True))]

    from loraflow.evalreport import comparison_png, report_html

    png = comparison_png(metrics)
    # Each file written atomically; metrics.json last, so its presence means the set is complete.
    # (Not one atomic folder: DVC tracks metrics.json and comparison.png in git, the rest in its cache.)
    write_jsonl(out_dir / "predictions.jsonl", preds)
    write_bytes(out_dir / "comparison.png", png)
    write_text(out_dir / "report.html", report_html(metrics, png))
    write_json(out_dir / "metrics.json", metrics)
    _log_mlflow(run_id, metrics, preds, out_dir)

    m = ep.report_metric
    log.info("evaluate: %s base %.3f -> candidate %.3f%s", m, block["base"][m]["mean"], block["candidate"][m]["mean"],
             f" (champion v{champ_version} {block['champion'][m]['mean']:.3f})" if block["champion"] else "")
    return metrics


def _judge(params: Params, es: EvalSet, gens: dict[str, Generated]) -> tuple[dict, dict[str, list[str]]]:
    import gc

    from loraflow.judge import PROMPT_SHA256, PairwiseJudge, question_text

    ep = params.evaluate
    judge = PairwiseJudge(ep.judge_model, params.base.model_cache, params.base.trust_remote_code)
    questions = [question_text(p) for p in es.prompts]
    verdicts = {ref: judge.compare(questions, es.refs, gens["candidate"].answers, gens[ref].answers, ep.batch_size)
                for ref in REFERENCES if ref in gens}
    del judge
    gc.collect()
    out = {"model": ep.judge_model, "prompt_sha256": PROMPT_SHA256,
           "method": "logits of 'A' vs 'B' after a fixed pairwise prompt with the reference answer; both orders; "
                     "win = preferred in both, loss = other preferred in both, else tie",
           **{f"candidate_vs_{ref}": (judge_summary(verdicts[ref], ep, params.base.seed) if ref in verdicts else None)
              for ref in REFERENCES}}
    return out, verdicts


def _mlflow_run(params: Params, mode: str, train_run_id: str | None) -> str:
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


def _log_mlflow(run_id: str, metrics: dict, preds: list[dict], out_dir: Path) -> None:
    import mlflow
    import pandas as pd

    from loraflow.judge import question_text

    table = pd.DataFrame([{**p, "prompt": question_text(p["prompt"])} for p in preds])
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(mlflow_metrics(metrics))
        for name in ("metrics.json", "comparison.png", "report.html"):
            mlflow.log_artifact(str(out_dir / name), artifact_path="eval")
        mlflow.log_table(data=table, artifact_file="eval/predictions.json")


def main(argv: list[str] | None = None) -> None:
    ap = step_parser(__doc__)
    ap.add_argument("--mode", required=True)
    ap.add_argument("eval_file", type=Path)
    ap.add_argument("adapter_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args(argv)
    with step_errors():
        run(load_params(args.params, args.set), args.mode, args.eval_file, args.adapter_dir, args.out_dir)


if __name__ == "__main__":
    main()

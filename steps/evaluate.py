"""evaluate: base, current champion and candidate answer the same held-out prompts; ROUGE and BERTScore.

    python -m steps.evaluate --mode retail_media data/curated/retail_media/eval.jsonl \
        data/adapters/retail_media data/eval/retail_media

The base model is loaded once; the candidate and the registry's `champion` (when one exists) are peft
adapters on it, and "no adapter" is simply another argument to the same generate call. Generation is
batched greedy decoding with left padding, prompts sorted by length. Confidence intervals are paired
bootstrap intervals of the per-example differences.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any

from loraflow import tracking
from loraflow.config import Params, load_params, registered_model_name
from loraflow.io import read_json, read_jsonl, sha256_file, write_json, write_jsonl
from loraflow.stepcli import step_errors, step_parser

log = logging.getLogger(__name__)

METRICS = ("rouge1", "rouge2", "rougeL", "bertscore")


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


def generate(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers for chat prompts, batched (left padding, sorted by length); order is preserved."""
    import torch

    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    answers: list[str] = [""] * len(texts)
    tok.padding_side = "left"
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row, i in enumerate(idx):
            answers[i] = tok.decode(out[row, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return answers


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


def score(answers: list[str], refs: list[str], ep) -> dict[str, list[float]]:
    s = rouge_scores(answers, refs)
    s["bertscore"] = bertscore_f1(answers, refs, _encoder(ep), ep.bertscore_num_layers)
    return s


def _encoder(ep) -> str:
    from loraflow.models import resolve

    return resolve(ep.bertscore_model)


def run(params: Params, mode: str, eval_file: Path, adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Evaluate base, champion (if the registry has one) and the candidate adapter on one eval file.

    Args:
        params: reads `base` and `evaluate`.
        mode: which registered model's `champion` to compare against.
        eval_file: curated eval.jsonl; the last assistant turn of each record is the reference.
        adapter_dir: the candidate adapter (train's output).
        out_dir: gets predictions.jsonl then metrics.json, each written whole.
    """
    import mlflow
    from peft import PeftModel

    from loraflow.models import load_causal_lm, load_tokenizer, resolve

    ep = params.evaluate
    eval_file, adapter_dir, out_dir = Path(eval_file), Path(adapter_dir), Path(out_dir)
    records = read_jsonl(eval_file)[: ep.max_examples]
    if not records:
        raise ValueError(f"{eval_file}: no eval records")
    prompts = [r["messages"][:-1] for r in records]
    refs = [r["messages"][-1]["content"] for r in records]

    model_path = resolve(params.base.model, params.base.model_cache)
    tok = load_tokenizer(str(adapter_dir))  # the candidate's saved tokenizer + chat template
    model = load_causal_lm(model_path, trust_remote_code=params.base.trust_remote_code)
    model.eval()

    answers: dict[str, list[str]] = {}
    timing: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="loraflow-champion-") as tmp:
        t = time.time()
        answers["base"] = generate(model, tok, prompts, ep.max_new_tokens, ep.batch_size)
        timing["base"] = time.time() - t

        model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name="candidate")
        champ_version, champ_dir = champion_adapter(params, mode, Path(tmp))
        if champ_dir is not None:
            model.load_adapter(str(champ_dir), adapter_name="champion")
            model.set_adapter("champion")
            t = time.time()
            answers["champion"] = generate(model, tok, prompts, ep.max_new_tokens, ep.batch_size)
            timing["champion"] = time.time() - t
        model.set_adapter("candidate")
        t = time.time()
        answers["candidate"] = generate(model, tok, prompts, ep.max_new_tokens, ep.batch_size)
        timing["candidate"] = time.time() - t
        shutil.rmtree(tmp, ignore_errors=True)

    t = time.time()
    scores = {name: score(a, refs, ep) for name, a in answers.items()}
    timing["metrics"] = time.time() - t

    seed = params.base.seed
    summary: dict[str, Any] = {}
    for name in ("base", "champion", "candidate"):
        if name not in scores:
            summary[name] = None
            continue
        summary[name] = {m: bootstrap_mean(scores[name][m], ep.bootstrap_samples, ep.confidence, seed) for m in METRICS}
        summary[name]["answer_words_mean"] = sum(len(a.split()) for a in answers[name]) / len(records)
    deltas = {
        f"candidate_vs_{ref}": ({m: bootstrap_diff(scores["candidate"][m], scores[ref][m], ep.bootstrap_samples, ep.confidence, seed)
                                 for m in METRICS} if ref in scores else None)
        for ref in ("base", "champion")
    }
    train_info = read_json(adapter_dir / "train_info.json") if (adapter_dir / "train_info.json").exists() else {}
    metrics = {
        "mode": mode,
        "eval_set": {"path": str(eval_file), "sha256": sha256_file(eval_file), "size": len(records)},
        "candidate_adapter_sha256": train_info.get("adapter_sha256"),
        "champion_version": champ_version,
        "note": None if champ_version else "no champion in the registry yet: the candidate is compared with the base model only",
        **summary,
        "deltas": deltas,
        "generation": {"max_new_tokens": ep.max_new_tokens, "batch_size": ep.batch_size, "greedy": True},
        "scoring": {"rouge_tokenizer": "unicode words, lower-cased, NFC, no stemming", "bertscore_model": ep.bertscore_model,
                    "bertscore_num_layers": ep.bertscore_num_layers, "confidence": ep.confidence,
                    "bootstrap_samples": ep.bootstrap_samples},
        "timing_seconds": {k: round(v, 2) for k, v in timing.items()},
    }
    preds = [{"id": r["id"], "source": r["source"], "prompt": p, "reference": ref,
              **{f"{n}_answer": answers[n][i] for n in answers},
              **{f"{n}_{m}": round(scores[n][m][i], 4) for n in scores for m in METRICS}}
             for i, (r, p, ref) in enumerate(zip(records, prompts, refs, strict=True))]
    # Two files, each written atomically; metrics.json last, so its presence means the pair is complete.
    # (Not one atomic folder: DVC tracks metrics.json in git and predictions.jsonl in its cache.)
    write_jsonl(out_dir / "predictions.jsonl", preds)
    write_json(out_dir / "metrics.json", metrics)

    run_id = train_info.get("mlflow_run_id")
    if run_id and _run_exists(run_id):  # the adapter's training run carries its evaluation too
        flat = {f"eval_{n}_{m}": summary[n][m]["mean"] for n in ("base", "champion", "candidate") if summary[n] for m in METRICS}
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics(flat)
            mlflow.log_artifact(str(out_dir / "metrics.json"), artifact_path="eval")
    pm = params.promote.primary_metric
    log.info("evaluate: %s base %.3f -> candidate %.3f%s", pm, summary["base"][pm]["mean"], summary["candidate"][pm]["mean"],
             f" (champion v{champ_version} {summary['champion'][pm]['mean']:.3f})" if summary["champion"] else "")
    return metrics


def _run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_run(run_id)
        return True
    except MlflowException:
        return False


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

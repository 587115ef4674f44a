"""evaluate: base, current champion and candidate answer the same held-out prompts; ROUGE and BERTScore.

    python -m steps.evaluate --mode retail_media data/curated/retail_media/eval.jsonl \
        data/adapters/retail_media data/eval/retail_media

Every model answers the eval set plus the forgetting-guard sets (`evaluate.guard_sets`) in one generate call
with the candidate's generation_config.json, greedy, stopping at the end of turn (loraflow.generation); the
comparison, its paired bootstrap intervals and the judge are loraflow.evaluation's. Writes predictions.jsonl,
comparison.png, report.html and finally metrics.json, each whole; the metrics, the per-example table and the
report also go to the adapter's MLflow run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from loraflow import evaluation, generation
from loraflow.config import Params
from loraflow.evaluation import compare, forgetting_worst, load_eval_set
from loraflow.io import json_text, jsonl_text, read_json, write_set
from loraflow.stepcli import run_step

log = logging.getLogger(__name__)


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
    from loraflow.evalreport import comparison_png, report_html
    from loraflow.models import load_causal_lm, load_tokenizer, resolve

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
    stop_ids = generation.end_of_turn_ids(tok, model)
    timing["load"] = time.perf_counter() - t
    # The candidate's own decoding settings (generation_config.json), for every model alike: one comparison.
    gp = generation.load(adapter_dir, params.generate)
    gens, champ_version, model = evaluation.answer_every_model(params, mode, model, tok, adapter_dir, prompts, gp, stop_ids)
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
        judge, verdicts = evaluation.judge(params, main_set, main_gens)
        timing["judge"] = time.perf_counter() - t

    train_info = read_json(adapter_dir / "train_info.json") if (adapter_dir / "train_info.json").exists() else {}
    run_id = evaluation.mlflow_run(params, mode, train_info.get("mlflow_run_id"))
    guard_sets = {str(s.path): {"eval_set": s.info(), **b} for s, (_, b) in per_set[1:]}
    metrics = {
        "mode": mode,
        "eval_set": main_set.info(),
        "candidate_adapter_sha256": train_info.get("adapter_sha256"),
        "champion_version": champ_version,
        "note": None if champ_version else "no champion in the registry yet: the candidate is compared with the base model only",
        **block,
        "forgetting": {"sets": guard_sets, "worst": forgetting_worst(guard_sets)},
        "judge": judge,
        "generation": evaluation.generation_record(gens, tok, model, stop_ids, gp, len(prompts)),
        "scoring": {"rouge_tokenizer": "unicode words, lower-cased, NFC, no stemming", "bertscore_model": ep.bertscore_model,
                    "bertscore_num_layers": ep.bertscore_num_layers, "confidence": ep.confidence,
                    "bootstrap_samples": ep.bootstrap_samples, "report_metric": ep.report_metric, "seed": seed},
        "timing_seconds": {k: round(v, 2) for k, v in timing.items()},
        "mlflow_run_id": run_id,
    }
    preds = evaluation.prediction_rows(main_set, main_gens, scores, verdicts)

    png = comparison_png(metrics)
    # One set, metrics.json last: all four are staged whole first (a full disk changes nothing), then metrics.json
    # goes, the others replace theirs and metrics.json comes back, so its presence means the set is one run's.
    # (Not one atomic folder: DVC keeps its .gitignore in data/eval/<mode>/ and tracks metrics.json in git.)
    write_set(out_dir, {"predictions.jsonl": jsonl_text(preds).encode(), "comparison.png": png,
                        "report.html": report_html(metrics, png).encode(), "metrics.json": json_text(metrics).encode()},
              marker="metrics.json")
    evaluation.log_mlflow(run_id, metrics, preds, out_dir)

    m = ep.report_metric
    log.info("evaluate: %s base %.3f -> candidate %.3f%s", m, block["base"][m]["mean"], block["candidate"][m]["mean"],
             f" (champion v{champ_version} {block['champion'][m]['mean']:.3f})" if block["champion"] else "")
    return metrics


def main(argv: list[str] | None = None) -> None:
    run_step(__doc__, run, ("eval_file", "adapter_dir", "out_dir"), argv)


if __name__ == "__main__":
    main()

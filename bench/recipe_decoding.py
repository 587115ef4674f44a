"""Decoding settings for adapters the recipe sweep (bench/recipe.py) already trained: answer the held-out
prompts again with other generate() settings, without training anything.

    python bench/recipe_decoding.py lr1e-3_b4_e2 '{"repetition_penalty": 1.1}' --work /tmp/sweep -S generate.max_new_tokens=128
    python bench/recipe_decoding.py base '{};{"repetition_penalty": 1.1}' --work /tmp/sweep

The second argument is a ';'-separated list of JSON objects of `generate` anti-repetition settings
(repetition_penalty, no_repeat_ngram_size; {} = plain greedy). Each is scored like bench/recipe.py scores (ROUGE-L, BERTScore, stop, loop) and appended to
bench/results/decoding.jsonl with the answers; the gain is paired against the base model's plain greedy
answers in bench/results/recipe.jsonl. The last line is the last setting's headline, number first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from bench.recipe import answers, scored
    from loraflow.config import load_params
    from loraflow.io import read_jsonl
    from loraflow.metrics import bootstrap_diff

    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("adapter", help="a recipe name whose adapter is in WORK/adapters, or 'base'")
    ap.add_argument("settings", help="';'-separated JSON objects of `generate` anti-repetition settings")
    ap.add_argument("--work", type=Path, required=True, help="the sweep folder bench/recipe.py --work used")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="params override, e.g. generate.max_new_tokens=128")
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results/decoding.jsonl")
    a = ap.parse_args()
    params = load_params(ROOT / "params.yaml", [f"base.tracking_uri=sqlite:///{a.work / 'mlflow.db'}", *a.overrides])
    recs = read_jsonl(a.work / "curated/eval.jsonl")
    prompts, refs = [r["messages"][:-1] for r in recs], [r["messages"][-1]["content"] for r in recs]
    sweep = {r["name"]: r for r in map(json.loads, (ROOT / "bench/results/recipe.jsonl").read_text().splitlines())}
    base = sweep["base"]["greedy"]["rougeL"]
    adapter = None if a.adapter == "base" else a.work / "adapters" / a.adapter
    for spec in a.settings.split(";"):
        dec = json.loads(spec or "{}")
        t = time.time()
        s = scored(params, answers(params, adapter, prompts, dec or None), refs)
        mean = {k: sum(s[k]) / len(s[k]) for k in ("rougeL", "bertscore", "stop_rate", "loop_rate")}
        d = bootstrap_diff(s["rougeL"], base, params.evaluate.bootstrap_samples, params.evaluate.confidence, 42)
        line = {"adapter": a.adapter, "decoding": dec, "max_new_tokens": params.generate.max_new_tokens,
                "rougeL": round(mean["rougeL"], 3), "gain_vs_base_greedy": [round(d[k], 3) for k in ("mean", "ci_low", "ci_high")],
                "bertscore": round(mean["bertscore"], 3), "stop": round(mean["stop_rate"], 2),
                "loop": round(mean["loop_rate"], 2), "seconds": round(time.time() - t)}
        with a.results.open("a", encoding="utf-8") as f:
            f.write(json.dumps({**line, "answers": s["answers"], "per_example_rougeL": s["rougeL"]}, ensure_ascii=False) + "\n")
        print(json.dumps(line), flush=True)
    print(f"{line['gain_vs_base_greedy'][0]:+.3f} ROUGE-L vs the base's greedy answers, {line['stop']:.0%} stop, "
          f"{line['loop']:.0%} loop: {a.adapter} with {dec or 'greedy'} at {line['max_new_tokens']} new tokens")


if __name__ == "__main__":
    main()

"""evaluate's speed, from one run: batched vs per-example greedy generation, and metric time vs generation time.

    python bench/eval.py                       # 32 prompts, 48 new tokens, evaluate.batch_size from params.yaml
    python bench/eval.py --prompts 16 --max-new-tokens 32 --eval data/curated/retail_media/eval.jsonl

Both generation runs use evaluate's own generate loop (loraflow.generation.generate_detailed), plain greedy, on
the same base model and prompts; per-example is the same call with batch size 1 (what a loop over `model.generate` does). Metric time is ROUGE + BERTScore over the
batched answers with a cold scorer: the BERTScore encoder is loaded inside the timing, as the step loads it
once per run. Python imports of the metric libraries are timed apart, as the generation timing leaves out
importing torch/transformers and loading the LLM: rouge_score imports nltk, which imports scipy.stats and
scikit-learn where they are installed (mlflow installs both): once per process whatever the set size
(measured in docs/benchmarks.md).
The prompts are the mode's curated eval split when it exists, else the shipped general guard set, repeated
to the requested count. The last line is the headline: the speed-up first.
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import cycle, islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import loraflow  # noqa: E402,F401  (offline env before transformers is imported)
from loraflow import metrics  # noqa: E402
from loraflow.config import GenerateParams, load_params  # noqa: E402
from loraflow.evaluation import load_eval_set  # noqa: E402
from loraflow.generation import generate_detailed  # noqa: E402
from loraflow.models import load_causal_lm, load_tokenizer, resolve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=None, help="default: evaluate.batch_size")
    ap.add_argument("--eval", type=Path, default=None)
    a = ap.parse_args()
    params = load_params(a.params)
    ep = params.evaluate
    bs = a.batch_size or ep.batch_size
    src = a.eval or next(p for p in (ROOT / "data/curated/retail_media/eval.jsonl", ROOT / "data/guard/general_qa.jsonl")
                         if p.exists())
    es = load_eval_set(src, None)
    pairs = list(islice(cycle(zip(es.prompts, es.refs, strict=True)), a.prompts))
    prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]

    path = resolve(params.base.model, params.base.model_cache)
    tok, model = load_tokenizer(path), load_causal_lm(path).eval()
    greedy = GenerateParams(max_new_tokens=a.max_new_tokens, repetition_penalty=1.0)
    generate_detailed(model, tok, prompts[:2], greedy.model_copy(update={"max_new_tokens": 4}), 2)  # warm-up: first-call allocations out of the timings

    print(f"{len(prompts)} prompts from {src.relative_to(ROOT) if src.is_relative_to(ROOT) else src} "
          f"({len(es.records)} distinct), {a.max_new_tokens} new tokens max, greedy, {params.base.model}")
    single = generate_detailed(model, tok, prompts, greedy, 1)
    print(f"per-example (batch 1): {single.seconds:7.1f} s  {sum(single.new_tokens) / single.seconds:6.1f} new tokens/s")
    batched = generate_detailed(model, tok, prompts, greedy, bs)
    print(f"batched (batch {bs:>2}):   {batched.seconds:7.1f} s  {sum(batched.new_tokens) / batched.seconds:6.1f} new tokens/s")
    same = sum(x == y for x, y in zip(single.answers, batched.answers, strict=True))
    print(f"identical answers: {same}/{len(prompts)}")

    t = time.perf_counter()
    import bert_score  # noqa: F401
    import rouge_score.rouge_scorer  # noqa: F401
    imports = time.perf_counter() - t
    metrics._scorers.clear()
    t = time.perf_counter()
    metrics.score(batched.answers, refs, ep)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    metrics.score(batched.answers, refs, ep)
    warm = time.perf_counter() - t
    print(f"metrics (ROUGE + BERTScore {ep.bertscore_model}): {cold:.2f} s cold (encoder load included), {warm:.2f} s warm; "
          f"importing rouge_score + bert_score first took {imports:.2f} s (once per process)")

    speedup = single.seconds / batched.seconds
    share = cold / batched.seconds
    print(f"{speedup:.1f}x batched vs per-example generation (goal >= 5x); "
          f"metrics {share:.0%} of generation time with a cold scorer (goal <= 15%; "
          f"{(cold + imports) / batched.seconds:.0%} counting the one-time library imports)")


if __name__ == "__main__":
    main()

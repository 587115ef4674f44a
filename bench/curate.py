"""Curation throughput on 100,000 generated records, through the real step function.

    python bench/curate.py [--n 100000]

Generates a raw folder like users bring it (OpenAI JSONL, an Alpaca JSON array and a CSV; Portuguese
text; about 1% exact and 1% near duplicates, a few broken lines, a little PII), then times `steps.curate.run`
with near-duplicate detection off and on (curate.workers: auto, so one process per core on this input), and
the exact path again in one process (curate.workers=1), whose outputs must be byte-identical. The tokenizer is loaded once before timing (a one-time cost of
a few seconds, printed apart). Also times the bare alternative for token lengths (render and tokenize every
record), which the step avoids. The last line is the headline, number first.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraflow.config import load_params  # noqa: E402
from loraflow.curation.lengths import tokenizer  # noqa: E402
from loraflow.curation.parallel import process_count  # noqa: E402
from steps import curate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("campanha anúncio clique receita investimento produto vitrine palavra-chave lance orçamento conversão "
         "impressão categoria marca vendedor estoque frete cupom avaliação busca relevância margem público").split()
SYSTEM = "Você é um consultor de retail media que responde em português do Brasil, de forma direta e prática."


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def generate(raw: Path, n: int, seed: int = 0) -> None:
    """n records over three files; answers 10-80 words (the sample data's range)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        q = f"Pergunta {i}: {_sentence(rng, rng.randint(5, 15))[:-1]}?"
        a = " ".join(_sentence(rng, rng.randint(5, 12)) for _ in range(rng.randint(2, 6)))
        if i % 500 == 7:
            a += " Contato: cliente@loja.com.br, CPF 529.982.247-25."
        pairs.append((q, a))
    for i in range(0, n, 100):  # ~1% exact and ~1% near duplicates of earlier records
        j = rng.randrange(max(i, 1))
        pairs[i] = pairs[j] if i % 200 else (pairs[j][0], pairs[j][1] + " Ok.")
    raw.mkdir(parents=True, exist_ok=True)
    n_json, n_csv = n // 5, n // 10
    with open(raw / "chats.jsonl", "w", encoding="utf-8") as f:
        for k, (q, a) in enumerate(pairs[: n - n_json - n_csv]):
            if k % 2000 == 13:
                f.write('{"messages": [broken\n')
                continue
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    alpaca = [{"instruction": q, "input": "", "output": a} for q, a in pairs[n - n_json - n_csv: n - n_csv]]
    (raw / "alpaca.json").write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")
    with open(raw / "faq.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pergunta", "resposta"])
        w.writerows(pairs[n - n_csv:])


def bare_token_lengths(params, out: Path) -> float:
    """Seconds to render and tokenize every curated record: what counting everything would cost."""
    from loraflow.io import read_jsonl
    from loraflow.models import chat_token_lengths

    recs = read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")
    tok = tokenizer(params.base.model, params.base.model_cache, params.base.trust_remote_code)
    t = time.process_time()
    chat_token_lengths(tok, [r["messages"] for r in recs])
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "raw" / "bench", args.n)
        generate(tmp / "warm" / "bench", 1000, seed=1)
        exact = load_params(ROOT / "params.yaml", ["curate.near_dup=false"])
        near = load_params(ROOT / "params.yaml", ["curate.near_dup=true"])
        single = load_params(ROOT / "params.yaml", ["curate.near_dup=false", "curate.workers=1"])
        t = time.perf_counter()
        curate.run(exact, tmp / "warm" / "bench", tmp / "out-warm")
        print(f"warm-up (tokenizer load + 1,000 records): {time.perf_counter() - t:.1f} s")
        size = sum(f.stat().st_size for f in (tmp / "raw" / "bench").iterdir())
        rates = {}
        for name, params in (("exact", exact), ("near-dup", near), ("exact, 1 process", single)):
            workers = process_count(params, size)
            t = time.perf_counter()
            stats = curate.run(params, tmp / "raw" / "bench", tmp / f"out-{name}")
            dt = time.perf_counter() - t
            rates[name] = stats["totals"]["read"] / dt
            tot = stats["totals"]
            print(f"{name:>16}: {tot['read']} read ({size / 2**20:.0f} MiB) in {dt:.1f} s with {workers} process(es) -> "
                  f"{tot['curated']} curated, {tot['duplicates']} duplicates ({stats['dedup']['near']} near), "
                  f"{tot['quarantined']} quarantined; {rates[name]:.0f} records/s")
        same = all((tmp / "out-exact" / n).read_bytes() == (tmp / "out-exact, 1 process" / n).read_bytes()
                   for n in (*curate.OUTPUTS, "stats.json"))
        print(f"outputs of the multi-process and the one-process exact runs byte-identical: {same}")
        bare = bare_token_lengths(exact, tmp / "out-exact")
        print(f"bare alternative: rendering + tokenizing all {stats['totals']['curated']} curated records alone "
              f"takes {bare:.1f} CPU s ({stats['totals']['curated'] / bare:.0f} per CPU second)")
    goals = {"exact": 20_000, "near-dup": 5_000}
    verdict = ", ".join(f"{name} {'met' if rates[name] >= goal else 'MISSED'}" for name, goal in goals.items())
    # The load average says whether others shared the machine (wall-clock rates then understate).
    print(f"{rates['exact']:,.0f} records/s exact, {rates['near-dup']:,.0f} records/s near-dup on {args.n:,} records "
          f"(goal >= {goals['exact']:,} / {goals['near-dup']:,}: {verdict}; {rates['exact, 1 process']:,.0f} exact in one "
          f"process; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()

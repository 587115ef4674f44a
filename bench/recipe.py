"""Which training recipe learns on the sample data inside the time budget: a measured sweep.

    python bench/recipe.py                      # every recipe below not yet in the results file, then the table
    python bench/recipe.py --only lr1e-3_b4_e1  # some of them
    python bench/recipe.py --table              # the table from what is measured so far

Each recipe trains one adapter through `steps.train.run` (the real step: MLflow, checkpoints and all) on
the curated sample data, in a process of its own, then answers the held-out eval split (21 prompts) with
`loraflow.generation.generate_detailed` — greedy, max_new_tokens as params.yaml sets it, with and without the
`generate` section's anti-repetition settings — and is scored like the evaluate step scores: ROUGE-L,
BERTScore, end-of-turn stop rate, loop rate (a word 4-gram said 3+ times), seq-rep-4, and the paired
bootstrap 95% interval of its ROUGE-L gain over the base model's answers to the same prompts.

Results are appended one JSON line per recipe to --results (default bench/results/recipe.jsonl), so a sweep
stopped half-way keeps what it measured and a re-run measures only what is missing. Train seconds are the
host's (2 cores here), so compare rows of one sweep; tokens seen are the host-independent cost.

The sweep's recipes were scored at the max_new_tokens params.yaml had then (96, greedy and no-repeat);
bench/recipe_decoding.py re-answers trained adapters with other settings (bench/results/decoding.jsonl), which
is how the shipped `generate` section (repetition_penalty 1.1, 128 new tokens) was chosen. The last line is the
headline: the default recipe with params.yaml's decoding against the base with the same decoding (as the
evaluate step compares them), number first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODE = "retail_media"

# name -> train.* overrides on top of params.yaml (the ones a user would reach for first, then the rest)
RECIPES: dict[str, list[str]] = {
    "old_default_lr2e-4_b8_e2": ["train.learning_rate=2e-4", "train.batch_size=8", "train.epochs=2"],
    "lr1e-3_b4_e1": ["train.learning_rate=1e-3", "train.batch_size=4", "train.epochs=1"],
    "lr1e-3_b4_e2": ["train.learning_rate=1e-3", "train.batch_size=4", "train.epochs=2"],
    "lr5e-4_b4_e2": ["train.learning_rate=5e-4", "train.batch_size=4", "train.epochs=2"],
    "lr1e-3_b8_e2": ["train.learning_rate=1e-3", "train.batch_size=8", "train.epochs=2"],
    "lr1e-3_b4_e1_neft5": ["train.learning_rate=1e-3", "train.batch_size=4", "train.epochs=1",
                           "train.neftune_noise_alpha=5"],
    "lr1e-3_b4_e1_r32": ["train.learning_rate=1e-3", "train.batch_size=4", "train.epochs=1",
                         "train.lora_r=32", "train.lora_alpha=64"],
    "lr1e-3_b4_e1_const": ["train.learning_rate=1e-3", "train.batch_size=4", "train.epochs=1",
                           "train.lr_scheduler=constant_with_warmup"],
    "lr2e-3_b4_e1": ["train.learning_rate=2e-3", "train.batch_size=4", "train.epochs=1"],
    "lr1e-3_b4_e1_len192": ["train.learning_rate=1e-3", "train.batch_size=4", "train.epochs=1",
                            "train.max_length=192"],
}
NO_REPEAT = {"repetition_penalty": 1.1, "no_repeat_ngram_size": 4}  # the decoding variant scored beside greedy


def prepare(work: Path, params) -> tuple[Path, Path]:
    """Curate and validate the sample data once per sweep folder."""
    from steps import curate, validate

    cur, rep = work / "curated", work / "validation"
    if not (rep / "report.json").exists():
        curate.run(params, ROOT / "data/raw" / MODE, cur, None)
        validate.run(params, cur, rep, work / "profile.json")
    return cur, rep / "report.json"


def answers(params, adapter: Path | None, prompts: list, decoding: dict | None):
    """Greedy answers at params.yaml's max_new_tokens with `decoding`'s anti-repetition settings (None: none)."""
    from peft import PeftModel

    from loraflow.config import GenerateParams
    from loraflow.generation import end_of_turn_ids, generate_detailed
    from loraflow.models import load_causal_lm, load_tokenizer, resolve

    path = resolve(params.base.model, params.base.model_cache)
    tok = load_tokenizer(str(adapter) if adapter else path)
    model = load_causal_lm(path)
    if adapter:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    gp = GenerateParams(max_new_tokens=params.generate.max_new_tokens, repetition_penalty=1.0, **(decoding or {}))
    return generate_detailed(model, tok, prompts, gp, params.evaluate.batch_size, end_of_turn_ids(tok, model))


def scored(params, gen, refs: list[str]) -> dict:
    from loraflow import degeneration
    from loraflow.metrics import score

    s = score(gen.answers, refs, params.evaluate)
    rows = degeneration.health(gen.answers, gen.stopped)
    return {"rougeL": s["rougeL"], "bertscore": s["bertscore"], **degeneration.per_example(rows),
            "answers": gen.answers, "gen_seconds": round(gen.seconds, 1)}


def one(name: str, work: Path, results: Path) -> None:
    """Train + answer + score one recipe (or the base model: name 'base'); append its line to results."""
    from loraflow.config import load_params
    from loraflow.io import read_jsonl

    overrides = [f"base.tracking_uri=sqlite:///{work / 'mlflow.db'}", "train.save_steps=0"]
    params = load_params(ROOT / "params.yaml", overrides + RECIPES.get(name, []))
    cur, report = prepare(work, params)
    recs = read_jsonl(cur / "eval.jsonl")
    prompts, refs = [r["messages"][:-1] for r in recs], [r["messages"][-1]["content"] for r in recs]
    line: dict = {"name": name, "overrides": RECIPES.get(name, []), "host_cpus": os.cpu_count(),
                  "when": time.strftime("%Y-%m-%d %H:%M")}
    adapter = None
    if name != "base":
        from steps import train

        adapter = work / "adapters" / name
        info = train.run(params, MODE, report, cur, adapter)
        line.update({"train_seconds": info["stages"][0]["train_seconds"], "tokens_seen": info["tokens_seen"],
                     "steps": info["steps"], "tokens_per_second": info["tokens_per_second"],
                     "final_loss": info["final_loss"], "train_loss": info["train_loss"]})
    line["greedy"] = scored(params, answers(params, adapter, prompts, None), refs)
    line["no_repeat"] = scored(params, answers(params, adapter, prompts, NO_REPEAT), refs)
    with results.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line, ensure_ascii=False) + "\n")


def table(results: Path, default: str | None) -> str:
    from loraflow.config import load_params
    from loraflow.metrics import bootstrap_diff

    rows = {r["name"]: r for r in map(json.loads, results.read_text().splitlines())}
    base = rows.get("base")
    ep = load_params(ROOT / "params.yaml").evaluate
    out = ["| recipe | decoding | tokens | train s | final loss | ROUGE-L | gain vs base [95% CI] | BERTScore | "
           "stop | loop | seq-rep-4 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        for dec in ("greedy", "no_repeat"):
            m = r[dec]
            mean = lambda k, m=m: sum(m[k]) / len(m[k])  # noqa: E731
            gain = "-"
            if base and name != "base":
                d = bootstrap_diff(m["rougeL"], base[dec]["rougeL"], ep.bootstrap_samples, ep.confidence, 42)
                gain = f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
            out.append(f"| {name} | {dec} | {r.get('tokens_seen', '-')} | {r.get('train_seconds', '-')} | "
                       f"{r.get('final_loss', '-')} | {mean('rougeL'):.3f} | {gain} | {mean('bertscore'):.3f} | "
                       f"{mean('stop_rate'):.0%} | {mean('loop_rate'):.0%} | {mean('seq_rep_4'):.3f} |")
    text = "\n".join(out) + "\n\n" + decoding_table(results.with_name("decoding.jsonl"), default)
    return text


def decoding_table(path: Path, default: str | None) -> str:
    """The re-decoded adapters (bench/recipe_decoding.py), and the headline: the default recipe answering with
    params.yaml's `generate` settings against the base with the same settings, as the evaluate step compares."""
    from loraflow.config import load_params
    from loraflow.metrics import bootstrap_diff

    if not path.exists():
        return "(no bench/results/decoding.jsonl: run bench/recipe_decoding.py)"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    out = ["| adapter | decoding (greedy +) | max new tokens | ROUGE-L | gain vs base greedy [95% CI] | BERTScore | "
           "stop | loop |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["gain_vs_base_greedy"]
        out.append(f"| {r['adapter']} | {json.dumps(r['decoding']) if r['decoding'] else '-'} | {r['max_new_tokens']} | "
                   f"{r['rougeL']:.3f} | {g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}] | {r['bertscore']:.3f} | "
                   f"{r['stop']:.0%} | {r['loop']:.0%} |")
    p = load_params(ROOT / "params.yaml")
    gp = p.generate
    dec = {k: v for k, v in (("repetition_penalty", gp.repetition_penalty), ("no_repeat_ngram_size", gp.no_repeat_ngram_size))
           if v not in (1.0, 0)}
    pick = {(r["adapter"], json.dumps(r["decoding"], sort_keys=True), r["max_new_tokens"]): r for r in rows}
    key = (json.dumps(dec, sort_keys=True), gp.max_new_tokens)
    c, b = pick.get((default, *key)), pick.get(("base", *key))
    text = "\n".join(out)
    if c and b:
        d = bootstrap_diff(c["per_example_rougeL"], b["per_example_rougeL"], p.evaluate.bootstrap_samples,
                           p.evaluate.confidence, 42)
        text += (f"\n{d['mean']:+.3f} ROUGE-L gain over the base [95% CI {d['ci_low']:+.3f}, {d['ci_high']:+.3f}], "
                 f"{c['stop']:.0%} stop, {c['loop']:.0%} loop: default recipe {default} with params.yaml's decoding "
                 f"{dec or 'greedy'} at {gp.max_new_tokens} new tokens, both models alike "
                 "(goal >= +0.08 with CI > 0, >= 90% stop, <= 10% loop)")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--only", nargs="*", help="recipe names (default: all, base first)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results/recipe.jsonl")
    ap.add_argument("--work", type=Path, help="sweep folder (curated data, adapters); default a temporary one")
    ap.add_argument("--table", action="store_true", help="only print the table of what is measured")
    ap.add_argument("--default", default="lr1e-3_b4_e2", help="the recipe params.yaml ships (for the headline)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if a.one:
        os.chdir(a.work)  # checkpoints land in the sweep folder
        one(a.one, a.work, a.results)
        return
    if not a.table:
        a.results.parent.mkdir(parents=True, exist_ok=True)
        done = {json.loads(x)["name"] for x in a.results.read_text().splitlines()} if a.results.exists() else set()
        todo = [n for n in ["base", *(a.only or RECIPES)] if n not in done]
        with tempfile.TemporaryDirectory(prefix="loraflow-recipe-") as tmp:
            work = (a.work or Path(tmp)).resolve()
            work.mkdir(parents=True, exist_ok=True)
            for name in todo:
                t = time.time()
                print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
                subprocess.run([sys.executable, __file__, "--one", name, "--work", str(work),
                                "--results", str(a.results.resolve())], check=True)
                print(f"[{time.strftime('%H:%M:%S')}] {name} done in {time.time() - t:.0f} s", flush=True)
    print(table(a.results, a.default))


if __name__ == "__main__":
    main()

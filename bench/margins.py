"""The default recipe's margin on every promotion guard, across seeds and both CPU precisions.

    python bench/margins.py [--seeds 0 1] [--precisions bf16 fp32] [--parity off|on] [--workdir DIR]
    python bench/margins.py --table             # the table from what --results holds

Each (seed, precision) runs the whole default pipeline (`loraflow run`: the DAG of the README's first command) in a
throwaway project of its own (the sample mode's raw data, the guard sets, its own SQLite registry) with
`base.seed=S` and `train.precision=P` written into its params. A fresh registry: the candidate is gated against the
base, as the first run on a new machine is. `--parity off` (the default) leaves out the parity gate's replays: they
compare served with evaluated answers of the same adapter and move no guard; the decision then says "promote"
exactly when every guard passed.

From each run's decision.json, the candidate's margin on every guard: how far its value is from failing (the
primary metric: delta - min_delta; forgetting and stop rates: candidate - (reference - tolerance); loop rates:
reference + tolerance - candidate; floors and ceilings: distance to the limit). Per guard over the runs: the smallest
margin, the spread (largest - smallest margin) and their ratio (goal >= 2, issue 23). Each run is appended to
--results as it ends (a sweep stopped half-way keeps what it measured; a re-run measures only what is missing).
The last line is the headline: the smallest ratio and its guard, number first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODE = "retail_media"
RESULTS = ROOT / "bench" / "results" / "margins.jsonl"


def margins(compared: dict) -> dict[str, float]:
    """Every check's margin from decision.json's `compared_to`, as the gate wrote it (loraflow.promotion.decide:
    > 0 passed by that much, < 0 failed; the primary metric needs > 0, a guard passes at 0)."""
    ref = "champion" if "champion" in compared else "base"
    # the primary has no margin when the gate wanted an interval it did not get (it failed closed)
    out = {f"delta {compared['metric']} vs {ref}": compared.get("margin", float("-inf"))}
    out.update({name: g["margin"] for name, g in compared.get("guards", {}).items()})
    return out


def run_one(seed: int, precision: str, parity: bool, work: Path) -> dict:
    import yaml

    from loraflow.config import apply_overrides
    from loraflow.io import read_json

    project = work / f"seed{seed}-{precision}"
    shutil.rmtree(project, ignore_errors=True)
    for name in ("raw", "guard"):
        shutil.copytree(ROOT / "data" / name, project / "data" / name)
    overrides = [f"base.seed={seed}", f"train.precision={precision}",
                 f"base.tracking_uri=sqlite:///{project / 'mlflow.db'}", *([] if parity else ["promote.parity.targets=[]"])]
    params = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PREFECT_HOME=str(project / ".prefect-home"), PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    t0 = time.time()
    with open(project / "run.log", "w", encoding="utf-8") as log:
        r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--mode", MODE, "--params", "params.yaml",
                            "--root", str(project)], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.time() - t0) / 60
    if r.returncode:
        raise RuntimeError(f"seed {seed} {precision}: the pipeline failed ({r.returncode}); see {project / 'run.log'}")
    decision = read_json(project / "data" / "promotion" / MODE / "decision.json")
    info = read_json(project / "data" / "adapters" / MODE / "train_info.json")
    return {"seed": seed, "precision": precision, "parity": parity, "when": time.strftime("%Y-%m-%d %H:%M"),
            "host_cpus": os.cpu_count(), "trained_in": info["precision"], "decision": decision["decision"],
            "reason": decision.get("reason"), "pipeline_minutes": round(minutes, 1),
            "train_minutes": round(info["wall_seconds"] / 60, 1), "margins": margins(decision["compared_to"]),
            "compared_to": decision["compared_to"]}


def table(rows: list[dict]) -> str:
    """Markdown: one row per guard (margin per run, smallest, spread, ratio), then the headline, number first."""
    names = list(dict.fromkeys(n for r in rows for n in r["margins"]))
    runs = [f"s{r['seed']} {r['trained_in']}" for r in rows]
    lines = [f"| guard | {' | '.join(runs)} | smallest | spread | smallest / spread |",
             "|---" * (len(runs) + 4) + "|"]
    worst = (float("inf"), "")
    for n in names:
        ms = [r["margins"].get(n) for r in rows]
        got = [m for m in ms if m is not None]
        low, spread = min(got), max(got) - min(got)
        ratio = low / spread if spread > 0 else (float("inf") if low > 0 else float("-inf"))
        worst = min(worst, (ratio, n))
        cells = " | ".join("—" if m is None else f"{m:+.4f}" for m in ms)
        lines.append(f"| {n} | {cells} | {low:+.4f} | {spread:.4f} | {ratio:.1f} |")
    promoted = sum(r["decision"] == "promote" for r in rows)
    lines.append("")
    lines.append(f"{worst[0]:.2f}x smallest guard margin / spread across {len(rows)} runs ({worst[1]}; goal >= 2); "
                 f"promoted {promoted}/{len(rows)} (seeds x precisions: {', '.join(runs)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--precisions", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    ap.add_argument("--parity", choices=("on", "off"), default="off")
    ap.add_argument("--workdir", default=None, help="where the throwaway projects go (default: a temporary folder, removed)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--table", action="store_true", help="print the table of --results and stop")
    a = ap.parse_args(argv)
    results = Path(a.results)
    have = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
    if not a.table:
        import loraflow  # noqa: F401  (offline env first)

        work = Path(a.workdir or tempfile.mkdtemp(prefix="loraflow-margins-"))
        done = {(r["seed"], r["precision"], r["parity"]) for r in have}
        for seed in a.seeds:
            for precision in a.precisions:
                if (seed, precision, a.parity == "on") in done:
                    continue
                row = run_one(seed, precision, a.parity == "on", work)
                print(f"seed {seed} {precision}: {row['decision']} in {row['pipeline_minutes']} min "
                      f"(train {row['train_minutes']}); smallest margin "
                      f"{min(row['margins'].items(), key=lambda kv: kv[1])}", flush=True)
                results.parent.mkdir(parents=True, exist_ok=True)
                with open(results, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                have.append(row)
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if not have:
        print("no runs measured yet")
        return 1
    print(table(have))
    return 0


if __name__ == "__main__":
    sys.exit(main())

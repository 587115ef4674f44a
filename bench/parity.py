"""What the parity gate costs, from one run: each serving target's replay as a share of the evaluate step's time.

    python bench/parity.py                     # after the first README command (needs its adapter and registry)
    python bench/parity.py --mode retail_media --targets server merged

Side by side in one process, on the default run's outputs: the evaluate step (steps.evaluate.run: base, champion
and candidate on the eval and guard sets, scoring, report) into a scratch folder, then the parity gate
(loraflow.parity.gate) once per target on the registered version of the same adapter, each timed whole (load,
replay, comparison). The last line is the headline: the share of all targets together first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import loraflow  # noqa: E402,F401  (offline env before transformers is imported)
from loraflow import parity  # noqa: E402
from loraflow.config import Paths, load_params  # noqa: E402
from loraflow.io import read_json, read_jsonl  # noqa: E402
from steps import evaluate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--mode", default=None)
    ap.add_argument("--targets", nargs="+", default=list(parity.TARGETS), choices=parity.TARGETS)
    a = ap.parse_args()
    params = load_params(a.params)
    mode = a.mode or params.base.modes[0]
    p = Paths(ROOT, mode)
    decision = read_json(p.promotion / "decision.json")
    version = decision.get("version")
    if not version:
        sys.exit(f"{p.promotion / 'decision.json'}: the default run registered no version to replay")

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        evaluate.run(params, mode, p.curated / "eval.jsonl", p.adapter, Path(tmp))
        t_eval = time.perf_counter() - t
        evaluated = parity.Evaluated.from_predictions(read_jsonl(Path(tmp) / "predictions.jsonl"))
    rows = []
    for target in a.targets:
        pp = params.promote.parity.model_copy(update={"targets": [target]})
        one = params.model_copy(update={"promote": params.promote.model_copy(update={"parity": pp})})
        t = time.perf_counter()
        out = parity.gate(one, mode, version, p.adapter, evaluated)
        rows.append((target, time.perf_counter() - t, out["targets"][target]))
    print(f"evaluate step: {t_eval:.1f} s ({len(evaluated.prompts)} eval prompts + guard sets, "
          "three models, scoring)")
    for target, s, r in rows:
        print(f"  parity {parity.line(target, {**r, 'seconds': s})}  = {s / t_eval:.2f}x evaluate")
    total = sum(s for _, s, _ in rows)
    parts = ", ".join(f"{t} {s / t_eval:.2f}x" for t, s, _ in rows)
    print(f"{total / t_eval:.2f}x of the evaluate step's time for all parity targets together "
          f"(goal <= 0.50x; {parts}; v{version}, {len(evaluated.prompts)} prompts)")


if __name__ == "__main__":
    main()

"""How long an unchanged `dvc repro` takes on a project whose pipeline already ran, next to bare DVC baselines.

    python bench/dvc_noop.py                 # prepares a throwaway repo first (one shrunk pipeline run, minutes)
    python bench/dvc_noop.py --repo DIR      # a repo where `dvc repro` already ran

`dvc repro` with nothing changed must still hash every dep and out to know that; the baselines are
`dvc status` (the same check, no lock) and `dvc --version` (the CLI's start-up alone).
Last line: the median no-op repro, number first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The real pipeline, shrunk like the tests' (tests/conftest.py SHRUNK): the outputs' sizes are what matter.
SHRUNK = ["train.max_steps=3", "train.batch_size=4", "evaluate.max_examples=6", "generate.max_new_tokens=24",
          "evaluate.bootstrap_samples=200", "promote.min_delta=-1.0"]


def sh(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


def prepare(repo: Path) -> None:
    import yaml

    sys.path.insert(0, str(ROOT))
    from loraflow.config import apply_overrides

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = apply_overrides(params, SHRUNK + [f"base.tracking_uri=sqlite:///{repo / 'mlflow.db'}"])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "data" / "raw", repo / "data" / "raw")
    shutil.copytree(ROOT / "steps", repo / "steps", ignore=shutil.ignore_patterns("__pycache__"))
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        sh(cmd, repo)
    t = time.perf_counter()
    sh([str(BIN / "dvc"), "repro", "-q"], repo)
    print(f"prepared {repo}: first dvc repro {time.perf_counter() - t:.0f} s", flush=True)


def median_time(cmd: list[str], repo: Path, n: int, check: str | None = None) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        r = sh(cmd, repo)
        times.append(time.perf_counter() - t)
        if check and check not in r.stdout:
            raise SystemExit(f"{' '.join(cmd)}: expected {check!r}, got:\n{r.stdout[-2000:]}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--repo", type=Path, help="a repo where dvc repro already ran (default: prepare one)")
    ap.add_argument("-n", type=int, default=7, help="timed runs of each command")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="loraflow-dvc-noop-") as tmp:
        repo = a.repo or Path(tmp)
        if not a.repo:
            prepare(repo)
        dvc = str(BIN / "dvc")
        sh([dvc, "repro", "-q"], repo)  # warm: the OS file cache, DVC's own state db
        repro = median_time([dvc, "repro"], repo, a.n, check="up to date")
        status = median_time([dvc, "status"], repo, a.n, check="up to date")
        version = median_time([dvc, "--version"], repo, a.n)
    print(f"median of {a.n}: dvc repro (nothing to do) {repro:.2f} s, dvc status {status:.2f} s, "
          f"dvc --version {version:.2f} s")
    print(f"{repro:.2f} s unchanged dvc repro (goal < 2 s; dvc status {status:.2f} s, bare dvc start-up {version:.2f} s)")


if __name__ == "__main__":
    main()

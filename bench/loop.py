"""The loop, measured: simulated users correct a served mode round after round, on the real `loraflow serve`.

    python bench/loop.py [--rounds 3] [--feedback-threshold 30] [--rouge-threshold 0.3] [--warm-start on|off]
    python bench/loop.py --smoke            # one tiny round (a few steps, a few questions): checks the wiring only

Builds a throwaway project under --workdir (default a temporary folder, kept when --keep): the sample mode's raw data
is curated once, and its training conversations are split (seeded) into a seed part and a users' part; the held-out
eval conversations stay held out (the pinned eval set every round is scored on). The project's raw data is the seed
part plus the eval part, so the first champion is trained on the seed alone, by the real pipeline (`loraflow run`).

Then `loraflow serve` starts as a subprocess on a loopback port (--poll-interval 2, --feedback-threshold N) and
simulated users ask the users' questions through its OpenAI API, greedily. Each answer is scored with ROUGE-L
against the conversation's reference answer. Below --rouge-threshold the reference goes back as feedback: two in
three as a correction of that response id (rating 1), one in three as a preferred/rejected pair; an answer at or
above it is rated 5. So every feedback kind is exercised and every answer is one event. The event that reaches the
threshold starts a run (the server does it); the gate decides; the server picks up a new champion by polling the
registry. Nothing else is done by hand: the bench only talks HTTP to the server and reads the files the run wrote.

Per round: the decision and its reason; the held-out ROUGE-L of the champion served after the round, with its
interval (from the run's metrics.json); ROUGE-L on every question corrected so far, asked again of the served
champion (and what those answers scored when first asked); feedback events; what training started from and its
minutes; seconds from the last post to the new champion being served; manual steps. The last line is the headline:
the held-out gain of the last champion over the first (paired bootstrap over the eval examples) and rounds promoted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import loraflow  # noqa: E402,F401  (offline env first)

MODE = "retail_media"

# --smoke: the wiring only. A few steps cannot beat the base, so the gate's margin is opened (promote.min_delta=-1)
# and its guards and parity replays are off: the numbers a smoke run prints say nothing about quality.
SMOKE = ["train.max_steps=2", "train.dpo_max_steps=1", "train.batch_size=2", "train.max_length=160",
         "train.logging_steps=1", "evaluate.max_examples=4", "evaluate.bootstrap_samples=200", "evaluate.guard_sets=[]",
         "generate.max_new_tokens=16", "promote.min_delta=-1.0", "promote.forgetting_tolerance=null",
         "promote.min_stop_rate=null", "promote.max_loop_rate=null", "promote.degeneration_tolerance=null",
         "promote.parity.targets=[]"]


# ------------------------------------------------------------------------------------------------ the project

def make_project(work: Path, overrides: list[str], users_share: float, seed: int) -> tuple[Path, list[dict], dict]:
    """The throwaway project (params with `overrides` written in, raw = seed part + eval part) and the users' part."""
    import yaml

    from loraflow.config import apply_overrides, load_params
    from loraflow.io import read_jsonl
    from steps import curate

    project = work / "project"
    (project / "data" / "raw" / MODE).mkdir(parents=True)
    shutil.copytree(ROOT / "data" / "guard", project / "data" / "guard")  # evaluate.guard_sets
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = [*overrides, f"base.tracking_uri=sqlite:///{project / 'mlflow.db'}"]
    (project / "params.yaml").write_text(yaml.safe_dump(apply_overrides(params, overrides), sort_keys=False))
    p = load_params(project / "params.yaml")
    full = work / "full"
    curate.run(p, ROOT / "data" / "raw" / MODE, full)
    train, held_out = read_jsonl(full / "train.jsonl"), read_jsonl(full / "eval.jsonl")
    users = random.Random(seed).sample(train, round(users_share * len(train)))
    chosen = {r["id"] for r in users}
    seed_part = [r for r in train if r["id"] not in chosen]
    with open(project / "data" / "raw" / MODE / "seed.jsonl", "w", encoding="utf-8") as f:
        for r in seed_part + held_out:  # curated messages curate again to the same ids, so eval stays eval
            f.write(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n")
    return project, users, {"train": len(train), "seed": len(seed_part), "users": len(users), "eval": len(held_out)}


def env(work: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    return {**e, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PREFECT_HOME": str(work / "prefect-home"), "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------------------ the server

class Server:
    def __init__(self, project: Path, work: Path, threshold: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(work / "serve.log", "w", encoding="utf-8")  # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--root", str(project), "--params", str(project / "params.yaml"),
             "--port", str(self.port), "--feedback-threshold", str(threshold), "--poll-interval", "2",
             "--rate-limit", "100000"],
            cwd=project, env=env(work), stdout=self.log, stderr=subprocess.STDOUT)

    def call(self, path: str, body: dict | None = None, timeout: float = 600) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def wait_ready(self, version: str, timeout: float = 600) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loraflow serve exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if self.served_version() == version:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"loraflow serve did not serve {MODE} v{version} within {timeout:.0f} s; see {self.log.name}")

    def served_version(self) -> str | None:
        return ((self.call("/health", timeout=10).get("modes") or {}).get(MODE) or {}).get("version")

    def ask(self, prompt: list[dict], max_tokens: int) -> tuple[str, str]:
        """(answer, response id) from the OpenAI API, greedy. A refused answer ends the bench, naming the log."""
        import urllib.error

        try:
            r = self.call("/v1/chat/completions", {"model": MODE, "messages": prompt, "temperature": 0,
                                                   "max_tokens": max_tokens})
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"loraflow serve answered HTTP {e.code} to a chat request (served version "
                               f"{self.served_version()}); see {self.log.name}") from None
        return r["choices"][0]["message"]["content"], r["id"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ------------------------------------------------------------------------------------------------ measuring

def rouge_l(answers: list[str], refs: list[str]) -> list[float]:
    from loraflow.metrics import rouge_scores

    return rouge_scores(answers, refs)["rougeL"] if answers else []


def mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def served_scores(project: Path, decision: dict) -> dict[str, float]:
    """Per eval example id: ROUGE-L of the champion served after this run (the candidate when it was promoted)."""
    from loraflow.io import read_jsonl

    who = "candidate" if decision.get("decision") == "promote" else "champion"
    return {r["id"]: r[f"{who}_rougeL"] for r in read_jsonl(project / "data" / "eval" / MODE / "predictions.jsonl")}


def held_out(project: Path, decision: dict) -> dict[str, float]:
    from loraflow.io import read_json

    m = read_json(project / "data" / "eval" / MODE / "metrics.json")
    who = "candidate" if decision.get("decision") == "promote" else "champion"
    return m[who]["rougeL"]


def run_first_champion(project: Path, work: Path) -> float:
    t0 = time.time()
    log = work / "round0.log"
    with open(log, "w", encoding="utf-8") as out:
        r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--mode", MODE, "--params", "params.yaml",
                            "--root", str(project)], cwd=project, env=env(work), stdout=out, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"the first pipeline run failed ({r.returncode}); see {log}")
    return time.time() - t0


def wait_for_run(server: Server, before: str | None, timeout: float) -> dict[str, Any]:
    """Wait until the run the server started has exited and written its decision; returns /health's feedback."""
    end = time.time() + timeout
    while time.time() < end:
        st = (server.call("/health", timeout=10).get("feedback") or {}).get(MODE) or {}
        outcome = st.get("last_outcome") or {}
        if st.get("run_exit_code") is not None:
            if st["run_exit_code"] != 0:
                raise RuntimeError(f"the feedback-started run failed (exit {st['run_exit_code']}); log {st.get('last_run', {}).get('log')}")
            if outcome.get("decided_at") != before:
                return st
        time.sleep(3)
    raise TimeoutError(f"no decision within {timeout:.0f} s of the run starting")


def print_table(rows: list[dict]) -> None:
    """The per-round table, markdown."""
    print("| round | decision | champion | held-out ROUGE-L [95% CI] | corrected Qs ROUGE-L (first -> now, n) "
          "| events (corr/pair/rating) | started from | train min (records) | last post -> served (reject: decided) | manual |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        h = r["held_out"]
        hs = f"{h['mean']:.4f} [{h['ci_low']:.4f}, {h['ci_high']:.4f}]"
        if r["round"] == 0:
            print(f"| 0 | promote (seed) | v{r['champion']} | {hs} | — | — | base | "
                  f"{r['train']['wall_seconds'] / 60:.1f} ({r['train']['train_records']}) | — | 0 |")
            continue
        sf = r["started_from"] or {}
        frm = f"v{sf.get('version')} (+{sum((sf.get('new_records') or {}).values())} new)" if sf.get("kind") == "champion" else "base"
        k = r["kinds"]
        print(f"| {r['round']} | {r['decision']} | v{r['champion']} | {hs} | {r['corrected_first']} -> {r['corrected_now']} "
              f"({r['corrected_n']}) | {r['events']} ({k['correction']}/{k['pair']}/{k['rating']}) | {frm} | "
              f"{r['train_minutes']} ({r['train_records']}+{r['pref_records']} pairs) | {r['post_to_served_s']} s | 0 |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--feedback-threshold", type=int, default=30, help="events that start a run (the server's flag)")
    ap.add_argument("--rouge-threshold", type=float, default=0.3, help="answers below this ROUGE-L get corrected")
    ap.add_argument("--users-share", type=float, default=0.5, help="share of the training conversations held back for the users")
    ap.add_argument("--warm-start", choices=("on", "off"), default="on", help="train.warm_start=champion for the feedback runs")
    ap.add_argument("--smoke", action="store_true", help="one tiny round: checks the wiring, measures nothing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--round-timeout", type=float, default=7200)
    ap.add_argument("--workdir", default=None, help="where the throwaway project goes (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--out", default=None, help="also write the rounds as JSON here")
    a = ap.parse_args(argv)
    if a.smoke:
        a.rounds, a.feedback_threshold = 1, min(a.feedback_threshold, 6)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="loraflow-loop-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    overrides = [*(SMOKE if a.smoke else []), f"train.warm_start={'champion' if a.warm_start == 'on' else 'off'}"]
    from loraflow.config import load_params
    from loraflow.io import read_json
    from loraflow.metrics import bootstrap_diff, bootstrap_mean

    project, users, sizes = make_project(work, overrides, a.users_share, a.seed)
    params = load_params(project / "params.yaml")
    ep, max_tokens = params.evaluate, params.generate.max_new_tokens
    print(f"loop bench {dt.date.today()} on {platform.processor() or platform.machine()} x{os.cpu_count()}: "
          f"{sizes['train']} training conversations -> {sizes['seed']} seed + {sizes['users']} users'; "
          f"{sizes['eval']} held out; warm start {a.warm_start}; feedback threshold {a.feedback_threshold}; "
          f"ROUGE-L threshold {a.rouge_threshold}{'; SMOKE (wiring only)' if a.smoke else ''}; workdir {work}", flush=True)

    seconds0 = run_first_champion(project, work)
    decision = read_json(project / "data" / "promotion" / MODE / "decision.json")
    if decision.get("decision") != "promote":
        print(f"round 0: the first candidate was not promoted over the base ({decision.get('reason')}): no loop to run")
        return 1
    first = served_scores(project, decision)
    champion = str(decision["version"])
    rows = [{"round": 0, "decision": "promote", "reason": decision.get("reason"), "champion": champion,
             "held_out": held_out(project, decision), "pipeline_minutes": round(seconds0 / 60, 1),
             "train": read_json(project / "data" / "adapters" / MODE / "train_info.json")}]
    print(f"round 0: v{champion} trained on the seed part in {seconds0 / 60:.1f} min (whole pipeline)", flush=True)

    server = Server(project, work, a.feedback_threshold)
    corrected: dict[int, dict] = {}  # user index -> {prompt, ref, first score}
    events_total, asked, kinds_total = 0, 0, {"correction": 0, "pair": 0, "rating": 0}
    failure = None
    try:
        server.wait_ready(champion)
        for rnd in range(1, a.rounds + 1):
            kinds, started, last_post = {"correction": 0, "pair": 0, "rating": 0}, None, 0.0
            before = ((server.call("/health").get("feedback") or {}).get(MODE) or {}).get("last_outcome") or {}
            while started is None:
                i = asked % len(users)  # past the pool, users ask again (their corrected questions among them)
                rec, asked = users[i], asked + 1
                prompt, ref = rec["messages"][:-1], rec["messages"][-1]["content"]
                answer, rid = server.ask(prompt, max_tokens)
                score = rouge_l([answer], [ref])[0]
                if score >= a.rouge_threshold:
                    body, kind = {"response_id": rid, "rating": 5}, "rating"
                elif i % 3 == 2:
                    body, kind = {"mode": MODE, "messages": prompt, "preferred": ref, "rejected": answer}, "pair"
                else:
                    body, kind = {"response_id": rid, "rating": 1, "correction": ref}, "correction"
                if kind != "rating":
                    corrected.setdefault(i, {"prompt": prompt, "ref": ref, "first": score})
                r = server.call("/feedback", body)
                last_post = time.time()
                kinds[kind] += 1
                started = r.get("run_started")
            events = sum(kinds.values())
            events_total += events
            for k in kinds:
                kinds_total[k] += kinds[k]
            print(f"round {rnd}: {events} feedback events ({kinds}); run started, waiting for its decision", flush=True)
            wait_for_run(server, before.get("decided_at"), a.round_timeout)
            decision = read_json(project / "data" / "promotion" / MODE / "decision.json")
            info = read_json(project / "data" / "adapters" / MODE / "train_info.json")
            if decision.get("decision") == "promote":
                champion = str(decision["version"])
                server.wait_ready(champion, timeout=300)
            served_after = time.time() - last_post
            refs = [c["ref"] for c in corrected.values()]
            row = {"round": rnd, "decision": decision.get("decision"), "reason": decision.get("reason"),
                   "champion": champion, "held_out": held_out(project, decision),
                   "corrected_n": len(corrected), "corrected_first": mean([c["first"] for c in corrected.values()]),
                   "corrected_now": "failed", "events": events, "kinds": kinds,
                   "started_from": info.get("started_from"), "train_minutes": round(info["wall_seconds"] / 60, 1),
                   "train_records": info.get("train_records"), "pref_records": info.get("pref_records"),
                   "post_to_served_s": round(served_after, 1), "manual_steps": 0}
            rows.append(row)
            last = served_scores(project, decision)
            print(f"round {rnd}: {row['decision']} ({row['reason']}); champion v{champion}", flush=True)
            # the served champion answers the corrected questions again
            row["corrected_now"] = mean(rouge_l([server.ask(c["prompt"], max_tokens)[0] for c in corrected.values()], refs))
            if a.out:  # the rounds so far, so a run stopped early keeps what it measured
                Path(a.out).write_text(json.dumps({"rows": rows, "sizes": sizes, "args": vars(a), "partial": True},
                                                  indent=1, default=str))
    except (RuntimeError, TimeoutError) as e:  # the table of the rounds that finished still prints
        failure = str(e)
    finally:
        server.stop()

    print()
    print_table(rows)
    for r in rows[1:]:
        print(f"round {r['round']} {r['decision']}: {r['reason']}")
    ids = sorted(set(first) & set(last)) if len(rows) > 1 else []
    gain = bootstrap_diff([last[i] for i in ids], [first[i] for i in ids], ep.bootstrap_samples, ep.confidence, a.seed) if ids else None
    promoted = sum(r["decision"] == "promote" for r in rows[1:])
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": rows, "sizes": sizes, "args": vars(a), "gain": gain,
                                           "first_mean": bootstrap_mean(list(first.values()), ep.bootstrap_samples, ep.confidence, a.seed)},
                                          indent=1, default=str))
    if not a.keep and not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    if failure:
        print(f"stopped: {failure}")
    if gain is None:
        print("no round finished: no held-out gain to report")
        return 1
    print(f"{gain['mean']:+.4f} held-out ROUGE-L [{gain['ci_low']:+.4f}, {gain['ci_high']:+.4f}] of the served champion "
          f"after round {rows[-1]['round']} vs the first champion (paired, n={len(ids)}; goal: interval above 0); "
          f"rounds promoted {promoted}/{len(rows) - 1}; manual steps 0{' (SMOKE: wiring only)' if a.smoke else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

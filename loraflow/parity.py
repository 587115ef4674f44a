"""Parity: what is served answers as what was evaluated, checked before any alias moves.

The candidate, loaded the way each serving target loads it, answers the pinned eval prompts greedily, and its
answers are compared with the ones evaluation scored (predictions.jsonl):

- `server`: loraflow serve's engine (loraflow.serve.engine), the registered version loaded from the registry
  into the shared model as the server loads a mode, all prompts sent at once so they are batched as under load;
- `mlflow`: the registered version served by MLflow's own scoring server (`mlflow models serve`, the pyfunc
  model in loraflow.pyfunc), prompts posted to /invocations as chat messages;
- `merged`: the adapter folded into the base weights (peft merge_and_unload), as a merged export or any Hugging
  Face engine runs it, batched like evaluation.

`compare_answers` is the one comparison (exports use it too): the share of answers identical to the evaluated
ones, token agreement (per answer the share of tokens up to the first difference, the natural measure for greedy
decoding, where one different token changes everything after it), the served answers' ROUGE-L against the
references with a paired bootstrap interval against the evaluated answers', and stop / loop rates. `check`
holds a result to a target's tolerances (params.yaml promote.parity); a failure names the target, the numbers
and the first differing example, and steps/promote.py rejects the candidate with that reason.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow import degeneration, generation
from loraflow.config import GenerateParams, Params, ParityTolerance, registered_model_name
from loraflow.metrics import bootstrap_diff, rouge_scores, words

log = logging.getLogger(__name__)

TARGETS = ("server", "mlflow", "merged")
WHERE = {"server": "loraflow serve's batched engine", "mlflow": "MLflow's scoring server (mlflow models serve)",
         "merged": "the merged model (LoRA folded into the weights)"}


@dataclass(frozen=True)
class Evaluated:
    """What evaluation answered (predictions.jsonl rows, in order)."""

    ids: list[Any]
    prompts: list[list[dict]]
    references: list[str]
    answers: list[str]
    stopped: list[bool]

    @classmethod
    def from_predictions(cls, rows: list[dict]) -> Evaluated:
        return cls([r.get("id") for r in rows], [r["prompt"] for r in rows], [r["reference"] for r in rows],
                   [r["candidate_answer"] for r in rows], [bool(r.get("candidate_stopped")) for r in rows])


@dataclass(frozen=True)
class Served:
    answers: list[str]
    stopped: list[bool]
    seconds: float  # load + answer
    note: str = ""


# ---------------------------------------------------------------------------------------------- comparing

def _prefix_share(a: list, b: list) -> float:
    if not a and not b:
        return 1.0
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return k / max(len(a), len(b))


def compare_answers(evaluated: list[str], served: list[str], refs: list[str], served_stopped: list[bool] | None,
                    params: Params, *, evaluated_stopped: list[bool] | None = None,
                    tokenize: Callable[[str], list] | None = None, ids: list | None = None) -> dict[str, Any]:
    """How far the served answers are from the evaluated ones, and how they score against the references.

    `tokenize`: the model's tokenizer as a text -> token list function (token agreement counts its tokens);
    words by default. Stop and loop rates of the served answers need `served_stopped` (None: not known)."""
    n = len(evaluated)
    if not (len(served) == len(refs) == n):
        raise ValueError(f"parity: {len(served)} served answers, {n} evaluated, {len(refs)} references")
    ep, seed = params.evaluate, params.base.seed
    tk = tokenize or words
    same = [a == b for a, b in zip(evaluated, served, strict=True)]
    agree = [_prefix_share(tk(a), tk(b)) for a, b in zip(evaluated, served, strict=True)]
    r_served, r_eval = rouge_scores(served, refs)["rougeL"], rouge_scores(evaluated, refs)["rougeL"]
    first = next((i for i, s in enumerate(same) if not s), None)
    out: dict[str, Any] = {
        "n": n, "identical": sum(same), "identical_share": sum(same) / n if n else 1.0,
        "token_agreement": sum(agree) / n if n else 1.0,
        "rougeL": {"served": sum(r_served) / n if n else 0.0, "evaluated": sum(r_eval) / n if n else 0.0,
                   "diff": bootstrap_diff(r_served, r_eval, ep.bootstrap_samples, ep.confidence, seed) if n else None},
        "first_difference": None if first is None else {
            "index": first, "id": (ids or [None] * n)[first], "evaluated": evaluated[first][:300],
            "served": served[first][:300]},
    }
    for name, answers, stopped in (("served", served, served_stopped), ("evaluated", evaluated, evaluated_stopped)):
        if stopped is not None:
            rates = degeneration.per_example(degeneration.health(answers, stopped))
            out.setdefault("stop_rate", {})[name] = sum(rates["stop_rate"]) / n if n else 1.0
            out.setdefault("loop_rate", {})[name] = sum(rates["loop_rate"]) / n if n else 0.0
    return out


def check(result: dict[str, Any], tol: ParityTolerance) -> list[str]:
    """The tolerances `result` breaks, in words with the numbers; [] when it holds."""
    failed = []
    if tol.min_identical is not None and result["identical_share"] < tol.min_identical:
        failed.append(f"identical {result['identical']}/{result['n']} (needs >= {tol.min_identical:.0%})")
    if tol.min_token_agreement is not None and result["token_agreement"] < tol.min_token_agreement:
        failed.append(f"token agreement {result['token_agreement']:.4f} (needs >= {tol.min_token_agreement:.4f})")
    r = result["rougeL"]
    if tol.max_rouge_drop is not None and r["served"] - r["evaluated"] < -tol.max_rouge_drop:
        failed.append(f"ROUGE-L {r['served']:.4f} vs evaluated {r['evaluated']:.4f} "
                      f"(may drop at most {tol.max_rouge_drop:.4f})")
    s = result.get("stop_rate")
    if tol.max_stop_drop is not None and s and "served" in s and "evaluated" in s \
            and s["served"] - s["evaluated"] < -tol.max_stop_drop:
        failed.append(f"ended their turn {s['served']:.0%} vs evaluated {s['evaluated']:.0%} "
                      f"(may drop at most {tol.max_stop_drop:.0%})")
    return failed


def line(target: str, r: dict[str, Any]) -> str:
    """One line for the report and the logs."""
    if r.get("error"):
        return f"{target}: FAILED to run: {r['error']}"
    d = r["rougeL"]["diff"] or {}
    stop = r.get("stop_rate", {}).get("served")
    return (f"{target}: {r['identical']}/{r['n']} identical, token agreement {r['token_agreement']:.1%}, "
            f"ROUGE-L {r['rougeL']['served']:.4f} vs evaluated {r['rougeL']['evaluated']:.4f} "
            f"(diff {d.get('mean', 0):+.4f} [{d.get('ci_low', 0):+.4f}, {d.get('ci_high', 0):+.4f}])"
            + (f", ended their turn {stop:.0%}" if stop is not None else "")
            + f", {r['seconds']:.0f} s — {'ok' if r['passed'] else 'FAILED'}")


def _reason(target: str, r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"parity: target {target} ({WHERE[target]}) could not answer: {r['error']}"
    why = f"parity: target {target} ({WHERE[target]}) does not answer as evaluated: {'; '.join(r['failures'])}"
    f = r.get("first_difference")
    if f:
        why += (f"; first difference at eval example {f['index']} (id {f['id']}): evaluated {f['evaluated'][:120]!r}"
                f" vs served {f['served'][:120]!r}")
    return why


# ---------------------------------------------------------------------------------------------- the gate

def gate(params: Params, mode: str, version: str, adapter_dir: Path, evaluated: Evaluated,
         replays: dict[str, Callable[..., Served]] | None = None) -> dict[str, Any]:
    """Replay the eval prompts on every target in `promote.parity.targets` and hold each to its tolerances.

    Returns decision.json's `parity` block: per target the comparison, `passed`, `failures`, `seconds`; overall
    `passed` and `reason` (the first failing target's, or None). `replays` replaces a target's replay function
    (tests use it to plant a serving path that breaks the contract)."""
    from loraflow.models import load_tokenizer

    pp = params.promote.parity
    fns = {**REPLAYS, **(replays or {})}
    gp = generation.load(adapter_dir, params.generate)
    tok = load_tokenizer(str(adapter_dir), params.base.trust_remote_code)

    def tokenize(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    out: dict[str, Any] = {"targets": {}, "version": version, "prompts": len(evaluated.prompts),
                           "max_new_tokens": gp.max_new_tokens}
    for target in pp.targets:
        t = time.perf_counter()
        try:
            s = fns[target](params, mode, version, Path(adapter_dir), evaluated.prompts, gp)
        except Exception as e:  # noqa: BLE001 - a target that cannot answer fails the gate, with what went wrong
            log.exception("parity: target %s failed", target)
            out["targets"][target] = {"error": f"{type(e).__name__}: {e}", "passed": False, "failures": ["error"],
                                      "seconds": round(time.perf_counter() - t, 2)}
            continue
        r = compare_answers(evaluated.answers, s.answers, evaluated.references, s.stopped, params,
                            evaluated_stopped=evaluated.stopped, tokenize=tokenize, ids=evaluated.ids)
        r["failures"] = check(r, getattr(pp, target))
        r.update(passed=not r["failures"], seconds=round(s.seconds, 2), where=WHERE[target], note=s.note)
        out["targets"][target] = r
        log.info("parity %s", line(target, r))
    bad = [t for t, r in out["targets"].items() if not r["passed"]]
    out["passed"] = not bad
    out["reason"] = _reason(bad[0], out["targets"][bad[0]]) if bad else None
    out["seconds"] = round(sum(r["seconds"] for r in out["targets"].values()), 2)
    return out


def version_tags(block: dict[str, Any]) -> dict[str, str]:
    """The parity results as registry tags: parity.<target>.<figure>."""
    tags = {"parity": "passed" if block["passed"] else "failed"}
    for t, r in block["targets"].items():
        if r.get("error"):
            tags[f"parity.{t}"] = f"error: {r['error'][:400]}"
            continue
        tags[f"parity.{t}.identical"] = f"{r['identical']}/{r['n']}"
        tags[f"parity.{t}.token_agreement"] = f"{r['token_agreement']:.4f}"
        tags[f"parity.{t}.rougeL"] = f"{r['rougeL']['served']:.4f} (evaluated {r['rougeL']['evaluated']:.4f})"
        tags[f"parity.{t}.passed"] = str(r["passed"]).lower()
    return tags


# ---------------------------------------------------------------------------------------------- the targets

def replay_server(params: Params, mode: str, version: str, adapter_dir: Path, prompts: list[list[dict]],
                  gp: GenerateParams) -> Served:
    """loraflow serve's engine: the registered version loaded from the registry as the server loads a mode, every
    prompt submitted at once (batched by the scheduler), greedy (temperature 0), the adapter's max_new_tokens."""
    from loraflow.serve.engine import Engine
    from loraflow.serve.settings import ServeSettings

    t = time.perf_counter()
    # every prompt is queued within milliseconds: a window of 0.5 s lets them share the first batch
    engine = Engine(params, ServeSettings(poll_interval=0, lru_size=1, batch_window_ms=500))
    try:
        ad = engine.adapters.pin_version(mode, version)
        try:
            with ThreadPoolExecutor(max_workers=min(64, max(1, len(prompts)))) as ex:
                outs = list(ex.map(lambda p: engine.generate(ad, p, gp.max_new_tokens, 0.0, None), prompts))
        finally:
            engine.adapters.release(ad)
        batches = dict(engine.batches)
    finally:
        engine.close()
    return Served([o["text"] for o in outs], [o["finish_reason"] == "stop" for o in outs], time.perf_counter() - t,
                  f"{batches['count']} batches, largest {batches['largest']}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_serve_env(uri: str) -> dict[str, str]:
    """The environment `mlflow models serve` runs in. It starts `uvicorn` by name through a shell, so the
    interpreter's own bin folder goes first on PATH: run as `.venv/bin/python` (no venv activated) it otherwise
    exits 127 and the parity gate rejects a good candidate (found by bench/loop.py). MLflow's scoring server answers
    504 to a request running past 60 s by default: a batch of eval prompts on a busy CPU takes longer."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
            "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": os.environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "3600")}


def replay_mlflow(params: Params, mode: str, version: str, adapter_dir: Path, prompts: list[list[dict]],
                  gp: GenerateParams) -> Served:
    """MLflow's own scoring server on the registered version (`mlflow models serve --env-manager local`), the
    prompts posted to /invocations as chat messages. The pyfunc answers strings only: an answer "ended its turn"
    when it is shorter than max_new_tokens tokens (re-tokenized)."""
    from loraflow.models import load_tokenizer
    from loraflow.tracking import tracking_uri

    t = time.perf_counter()
    port = _free_port()
    uri = tracking_uri(params)
    env = mlflow_serve_env(uri)
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{registered_model_name(mode)}/{version}",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log_file = Path(adapter_dir).parent / f".parity-mlflow-{os.getpid()}.log"
    with open(log_file, "wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + params.promote.parity.startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"`mlflow models serve` exited with {proc.returncode}: {_tail(log_file)}")
            try:
                with urllib.request.urlopen(base + "/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"`mlflow models serve` did not answer /ping in "
                                   f"{params.promote.parity.startup_timeout_s:.0f} s: {_tail(log_file)}")
            time.sleep(1.0)
        body = json.dumps({"dataframe_records": [{"messages": p} for p in prompts],
                           "params": {"max_new_tokens": gp.max_new_tokens}}).encode()
        req = urllib.request.Request(base + "/invocations", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=3600) as r:
                answers = json.loads(r.read())["predictions"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"/invocations answered {e.code}: {e.read()[:500]!r}") from e
    finally:
        _stop(proc)
        log_file.unlink(missing_ok=True)
    tok = load_tokenizer(str(adapter_dir), params.base.trust_remote_code)
    stopped = [len(tok(a, add_special_tokens=False)["input_ids"]) < gp.max_new_tokens for a in answers]
    return Served(list(answers), stopped, time.perf_counter() - t, "stop inferred: shorter than max_new_tokens")


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    """Stop the scoring server and the workers it spawned (its own process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def replay_merged(params: Params, mode: str, version: str, adapter_dir: Path, prompts: list[list[dict]],
                  gp: GenerateParams) -> Served:
    """The adapter merged into the base weights, answering in batches as evaluation does."""
    from peft import PeftModel

    from loraflow.models import load_causal_lm, load_tokenizer, resolve

    t = time.perf_counter()
    tok = load_tokenizer(str(adapter_dir), params.base.trust_remote_code)
    base = load_causal_lm(resolve(params.base.model, params.base.model_cache),
                          trust_remote_code=params.base.trust_remote_code)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()
    g = generation.generate_detailed(model, tok, prompts, gp, params.evaluate.batch_size)
    return Served(g.answers, g.stopped, time.perf_counter() - t)


REPLAYS: dict[str, Callable[..., Served]] = {"server": replay_server, "mlflow": replay_mlflow, "merged": replay_merged}

"""The serve soak: the real `loraflow serve` under mixed load for minutes, then every promise it makes checked.

    python bench/soak.py --minutes 5                 # the measured run (docs/reliability.md, the soak row)
    python bench/soak.py --seconds 90 --clients 4    # what tests/test_soak.py runs (SOAK_SECONDS lengthens it)

Builds a throwaway project (a temporary folder, kept with --keep): a real SQLite MLflow registry holding LoRA adapters
shaped like train's default (all-linear, r=16, random weights) for the modes alpha and beta (two versions each),
gamma (one), and broken (one, whose adapter_model.safetensors is cut in half: it fails to load). `loraflow serve`
starts as its own process on a loopback port (`python -m flows.cli serve`, --lru-size 2: fewer than the modes, so
adapters are evicted and reloaded all the time; --poll-interval 1; --feedback-threshold 0: no runs start), with
TMPDIR pointed into the project so its adapter downloads can be counted, and one torch thread (--server-threads).
A warm-up asks each mode and the base model once (the memory baseline is taken after it).

Then, until the time is up (the soak stops by itself and only talks to 127.0.0.1):
- `--clients` threads send a seeded mix: POST /chat and /v1/chat/completions, streamed and not, greedy and
  sampled, to every mode, the base model and an unknown mode; streams whose client hangs up after the first
  words; feedback (ratings and corrections of served response ids, preference pairs) whose acknowledged event ids
  are kept; requests refused on purpose (422); GET /v1/models.
- a mover flips the `champion` alias of alpha, then beta, between their two versions every --move-every seconds
  (real registry writes; the server picks them up by polling).
- a sampler reads /metrics (not counted by the server), /health and the server's /proc/<pid>/status every second.

Afterwards, with the clients stopped and the server drained, the promises (each one printed, pass or fail):
no unexpected 5xx (nor any unexpected status, client error or broken stream); every acknowledged feedback event on
disk exactly once, every line parses (the server is SIGKILLed first: nothing it acknowledged may depend on a clean
shutdown); /health always answered within --health-within seconds (a liveness probe's view); resident memory at the
end within --rss-bound-mib of the memory half-way through the load; adapters in the LRU never
above --lru-size, none left pinned or retiring, the model's own adapter count (peft) equal to the cache's, one
download folder per loaded adapter; and /metrics agreeing with the clients: requests by status and route equal
exactly, feedback events equal, failed loads equal the requests to the broken mode, and the latency histogram's
buckets within 2 requests (or 2%) of the clients' own timings, allowing 50 ms of client overhead. The last line is the headline, its number first.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import loraflow  # noqa: E402,F401  (offline env first)

GOOD = ("alpha", "beta", "gamma")
MOVING = ("alpha", "beta")  # two registered versions each; the mover flips their champion
BROKEN = "broken"
UNKNOWN = "nobody_registered_this"
PROMPTS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Tell me a fun fact about cats."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a bicycle?"}],
    [{"role": "user", "content": "Qual é a capital do Brasil?"}],
]
MAX_TOKENS_LIMIT = 32
# Each client starts at its own place in this order (client k with KINDS[k], the modes likewise): a short run sends
# every kind of request early, the broken mode among them.
KINDS = ["hangup", "feedback", "chat", "stream", "completion", "bad", "models"]
KIND_WEIGHTS = [10, 22, 25, 15, 20, 4, 4]
# The server times a request from its middleware to the last byte; a client adds the loopback, the connection and the
# parsing (a 422 takes ~1 ms on the server, a few on the client). So the server's count at or below a bound lies
# between the clients' count at that bound and at the bound plus this overhead; and a few requests either way.
LATENCY_OVERHEAD_S, LATENCY_SLACK, LATENCY_SLACK_SHARE = 0.05, 2, 0.02


# ------------------------------------------------------------------------------------------------ the project

def make_project(work: Path, seed: int) -> tuple[Path, dict[str, list[str]]]:
    """params.yaml pointing at a SQLite registry in `work`, the adapters, registered. Returns (params file, mode ->
    its versions)."""
    import mlflow
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model

    from loraflow import tracking
    from loraflow.config import apply_overrides, load_params, registered_model_name
    from loraflow.models import load_causal_lm, resolve
    from loraflow.pyfunc import AdapterModel

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(apply_overrides(raw, [f"base.tracking_uri=sqlite:///{work / 'mlflow.db'}"]),
                                          sort_keys=False))
    params = load_params(params_file)
    model = get_peft_model(load_causal_lm(resolve(params.base.model, params.base.model_cache)),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))  # train's default shape
    folders = {}
    for i, (mode, n) in enumerate([("alpha", 2), ("beta", 2), ("gamma", 1)]):
        for v in range(1, n + 1):
            torch.manual_seed(seed * 100 + i * 10 + v)
            with torch.no_grad():  # B starts at zero (a no-op adapter): random B makes each version answer its own way
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.02)
            folders[(mode, v)] = work / "adapters" / f"{mode}-v{v}"
            model.save_pretrained(folders[(mode, v)])
    # A torn upload: a real adapter whose weights file stops halfway (its config parses; its weights do not).
    broken = work / "adapters" / f"{BROKEN}-v1"
    shutil.copytree(folders[("gamma", 1)], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    folders[(BROKEN, 1)] = broken
    del model

    versions: dict[str, list[str]] = {}
    client = mlflow.MlflowClient(tracking_uri=params.base.tracking_uri, registry_uri=params.base.tracking_uri)
    for (mode, _), folder in folders.items():  # logged as promote logs a candidate: pyfunc, the adapter as artifact
        exp = tracking.setup(params, mode)
        with mlflow.start_run(experiment_id=exp):
            info = mlflow.pyfunc.log_model(name="model", python_model=AdapterModel(), artifacts={"adapter": str(folder)},
                                           model_config={"base_model": params.base.model}, pip_requirements=["loraflow"],
                                           registered_model_name=registered_model_name(mode))
        versions.setdefault(mode, []).append(str(info.registered_model_version))
    for mode, vs in versions.items():
        client.set_registered_model_alias(registered_model_name(mode), "champion", vs[0])
    return params_file, versions


# ------------------------------------------------------------------------------------------------ the server

class Server:
    """`loraflow serve` as its own process (its RSS is the server's alone)."""

    def __init__(self, work: Path, params_file: Path, lru_size: int, threads: int = 0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = work / "server-tmp"  # its TMPDIR: the adapter downloads go here
        self.tmp.mkdir()
        self.log_path = work / "serve.log"
        self.log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - open while the server runs
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   TMPDIR=str(self.tmp), PYTHONUNBUFFERED="1", PREFECT_HOME=str(work / "prefect-home"))
        if threads:  # torch's threads: on a shared machine more threads than free cores spin against each other
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        # `python -m flows.cli serve`, plus SIGUSR1 dumping every thread's stack into the log (when /health stalls)
        entry = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
                 "from flows.cli import main; sys.exit(main(sys.argv[1:]))")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", entry, "serve", "--root", str(work), "--params", str(params_file),
             "--port", str(self.port), "--lru-size", str(lru_size), "--poll-interval", "1", "--feedback-threshold", "0",
             "--max-tokens-limit", str(MAX_TOKENS_LIMIT), "--default-max-tokens", "8"],
            cwd=work, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, http, timeout: float = 600) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loraflow serve exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if http.get(f"{self.url}/metrics", timeout=5).status_code == 200:
                    return
            except OSError:
                pass
            except Exception:  # noqa: BLE001 - httpx's connect errors while it starts
                pass
            time.sleep(0.5)
        raise TimeoutError(f"loraflow serve did not answer within {timeout:.0f} s; see {self.log_path}")

    def rss_mib(self) -> float:
        if self.proc.poll() is not None:
            raise RuntimeError(f"loraflow serve exited ({self.proc.returncode}); see {self.log_path}")
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def downloads(self) -> int:
        """Adapter folders the server holds downloaded now (its cache's temporary folder)."""
        return sum(1 for d in self.tmp.glob("loraflow-serve-*/*") if d.is_dir())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()


# ------------------------------------------------------------------------------------------------ the load

@dataclasses.dataclass
class Call:
    kind: str  # chat, completion, stream, hangup, feedback, bad, models, health
    route: str
    mode: str | None
    status: int | None  # None: the client got no status (an exception)
    seconds: float
    outcome: str  # ok, fallback (the broken mode answered by the base model, as promised), refused (422 on purpose),
    # or what went wrong: "unexpected status", "exception: ...", "stream incomplete", "wrong adapter ..."
    at: float = 0.0


class Load:
    """The clients, the mover and the sampler; everything they saw."""

    def __init__(self, server: Server, params_file: Path, versions: dict[str, list[str]], a: argparse.Namespace):
        self.server, self.a, self.versions = server, a, versions
        self.params_file = params_file
        self.calls: list[Call] = []
        self.acked: list[str] = []  # feedback event ids the server acknowledged
        self.samples: list[dict[str, Any]] = []
        self.moves: list[tuple[float, str, str]] = []
        self.move_errors: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.t0 = time.time()
        self.dumped = 0  # times the server's stacks were dumped into its log (at most 3)

    # -- clients

    def client(self, k: int, deadline: float) -> None:
        import httpx

        rng = random.Random(self.a.seed * 1000 + k)
        served: list[tuple[str, str]] = []  # (response id, mode) of this client's answers that feedback can name
        modes = [*GOOD, BROKEN, None, UNKNOWN]
        with httpx.Client(base_url=self.server.url, timeout=self.a.request_timeout) as http:
            for i in itertools.count():
                if time.time() >= deadline:
                    break
                if i < len(KINDS):  # each client first goes through every kind (a short run still has them all)
                    kind, mode = KINDS[(k + i) % len(KINDS)], modes[(k + i) % len(modes)]
                else:
                    kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
                    mode = rng.choice([*GOOD, *GOOD, BROKEN, None, UNKNOWN])
                body = {"messages": rng.choice(PROMPTS), "max_tokens": rng.randint(3, 10)}
                if rng.random() < 0.8:
                    body["temperature"] = 0  # greedy; otherwise the adapter's own sampling settings
                if kind == "feedback":
                    self._call(self.feedback(http, rng, served))
                elif kind == "bad":
                    self._call(self.refused(http, mode))
                elif kind == "models":
                    self._call(self.get(http, "models", "/v1/models"))
                elif kind == "hangup":
                    self._call(self.stream(None, mode, body, hang_up=True))  # its own connection, closed mid-stream
                elif kind == "stream":
                    self._call(self.stream(http, mode, body, hang_up=False))
                else:
                    call, rid = self.answer(http, kind, mode, body)
                    self._call(call)
                    if rid is not None and mode in (*GOOD, BROKEN):
                        served.append((rid, mode))

    def _call(self, call: Call) -> None:
        call.at = time.time() - self.t0
        with self.lock:
            self.calls.append(call)

    def check_served(self, mode: str | None, info: dict) -> str:
        """ok, fallback, or what is wrong with who answered."""
        if mode == BROKEN:
            return "fallback" if info.get("adapter") == "base" and "failed to load" in (info.get("fallback") or "") \
                else f"wrong adapter for the broken mode: {info}"
        if mode in GOOD:
            ok = info.get("version") in self.versions[mode] and (info.get("adapter") or "").endswith(f"_{mode}_v{info.get('version')}")
            return "ok" if ok else f"wrong adapter for {mode}: {info}"
        return "ok" if info.get("adapter") == "base" else f"wrong adapter for {mode}: {info}"

    def answer(self, http, kind: str, mode: str | None, body: dict) -> tuple[Call, str | None]:
        route = "/chat" if kind == "chat" else "/v1/chat/completions"
        payload = {**body, "mode": mode} if kind == "chat" else {**body, "model": mode or "base"}
        t = time.perf_counter()
        try:
            r = http.post(route, json=payload)
        except Exception as e:  # noqa: BLE001 - counted, never raised: the soak goes on
            return Call(kind, route, mode, None, time.perf_counter() - t, f"exception: {type(e).__name__}: {e}"), None
        dt = time.perf_counter() - t
        if r.status_code != 200:
            return Call(kind, route, mode, r.status_code, dt, f"unexpected status: {r.text[:300]}"), None
        j = r.json()
        info = j if kind == "chat" else j.get("loraflow", {})
        return Call(kind, route, mode, 200, dt, self.check_served(mode, info)), j.get("id")

    def stream(self, http, mode: str | None, body: dict, hang_up: bool) -> Call:
        import httpx

        route, kind = "/v1/chat/completions", "hangup" if hang_up else "stream"
        own = http is None
        http = http or httpx.Client(base_url=self.server.url, timeout=self.a.request_timeout)
        t = time.perf_counter()
        status, last, done, words = None, None, False, 0
        try:
            with http.stream("POST", route, json={**body, "model": mode or "base", "stream": True}) as r:
                status = r.status_code
                if status != 200:
                    r.read()
                    return Call(kind, route, mode, status, time.perf_counter() - t, f"unexpected status: {r.text[:300]}")
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"][0]["delta"].get("content"):
                        words += 1
                        if hang_up:  # the user closes the tab: the connection goes away mid-answer
                            break
                    last = chunk
        except Exception as e:  # noqa: BLE001
            return Call(kind, route, mode, status, time.perf_counter() - t, f"exception: {type(e).__name__}: {e}")
        finally:
            if own:
                http.close()
        dt = time.perf_counter() - t
        if hang_up:
            return Call(kind, route, mode, status, dt, "ok" if words or done else "stream incomplete (no words)")
        if not done or last is None or last["choices"][0]["finish_reason"] not in ("stop", "length"):
            return Call(kind, route, mode, status, dt, f"stream incomplete: done={done} last={last}")
        return Call(kind, route, mode, status, dt, self.check_served(mode, last.get("loraflow") or {}))

    def feedback(self, http, rng: random.Random, served: list[tuple[str, str]]) -> Call:
        choice = rng.random()
        if served and choice < 0.45:
            rid, mode = rng.choice(served)
            body = {"response_id": rid, "rating": rng.randint(1, 5)}
        elif served and choice < 0.75:
            rid, mode = rng.choice(served)
            body = {"response_id": rid, "rating": 1, "correction": "A better answer, written by a person."}
        else:
            mode = rng.choice(GOOD)
            body = {"mode": mode, "messages": rng.choice(PROMPTS), "preferred": "The preferred answer.",
                    "rejected": "The rejected answer."}
        t = time.perf_counter()
        try:
            r = http.post("/feedback", json=body)
        except Exception as e:  # noqa: BLE001
            return Call("feedback", "/feedback", mode, None, time.perf_counter() - t, f"exception: {type(e).__name__}: {e}")
        dt = time.perf_counter() - t
        if r.status_code != 200:
            return Call("feedback", "/feedback", mode, r.status_code, dt, f"unexpected status: {r.text[:300]}")
        with self.lock:
            self.acked.append(r.json()["event_id"])
        return Call("feedback", "/feedback", mode, 200, dt, "ok")

    def refused(self, http, mode: str | None) -> Call:
        """A request the server must refuse with 422 naming the field (max_tokens above the server's limit)."""
        t = time.perf_counter()
        try:
            r = http.post("/chat", json={"mode": mode, "messages": PROMPTS[0], "max_tokens": MAX_TOKENS_LIMIT + 1})
        except Exception as e:  # noqa: BLE001
            return Call("bad", "/chat", mode, None, time.perf_counter() - t, f"exception: {type(e).__name__}: {e}")
        ok = r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_tokens"]
        return Call("bad", "/chat", mode, r.status_code, time.perf_counter() - t, "refused" if ok else f"unexpected status: {r.text[:300]}")

    def get(self, http, kind: str, path: str, body: bool = False):
        """The call (and the response, with body=True)."""
        t = time.perf_counter()
        try:
            r = http.get(path)
        except Exception as e:  # noqa: BLE001
            c, r = Call(kind, path, None, None, time.perf_counter() - t, f"exception: {type(e).__name__}: {e}"), None
        else:
            c = Call(kind, path, None, r.status_code, time.perf_counter() - t,
                     "ok" if r.status_code == 200 else f"unexpected status: {r.text[:300]}")
        return (c, r) if body else c

    # -- the mover and the sampler

    def mover(self, deadline: float) -> None:
        import mlflow

        from loraflow.config import load_params, registered_model_name

        uri = load_params(self.params_file).base.tracking_uri
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        champion = {m: self.versions[m][0] for m in MOVING}
        i = 0
        while not self.stop.wait(self.a.move_every) and time.time() < deadline:
            mode = MOVING[i % len(MOVING)]
            i += 1
            to = next(v for v in self.versions[mode] if v != champion[mode])
            for attempt in range(5):  # the server polls the same SQLite file: "database is locked" happens
                try:
                    client.set_registered_model_alias(registered_model_name(mode), "champion", to)
                    champion[mode] = to
                    self.moves.append((time.time() - self.t0, mode, to))
                    break
                except Exception as e:  # noqa: BLE001
                    if attempt == 4:
                        self.move_errors.append(f"{type(e).__name__}: {e}")
                    time.sleep(0.2)

    def dump(self) -> None:
        if self.dumped < 3 and self.server.proc.poll() is None:
            self.dumped += 1
            self.server.proc.send_signal(signal.SIGUSR1)

    def sampler(self) -> None:
        import httpx

        with httpx.Client(base_url=self.server.url, timeout=self.a.health_within * 3) as http:
            while not self.stop.wait(1.0):
                self.samples.append(self.sample(http, health=True))

    def sample(self, http, health: bool) -> dict[str, Any]:
        s: dict[str, Any] = {"t": time.time() - self.t0, "rss_mib": self.server.rss_mib(),
                             "downloads": self.server.downloads()}
        try:
            m = scrape(http)
            s["cache_adapters"] = total(m, "loraflow_adapters_loaded")
            s["model_adapters"] = total(m, "loraflow_model_adapters")
        except Exception as e:  # noqa: BLE001 - a missed sample is recorded, not fatal
            s["error"] = f"{type(e).__name__}: {e}"
        if health:
            # /health slower than promised: every thread's stack into the server's log, while it is stuck
            watchdog = threading.Timer(self.a.health_within, self.dump)
            watchdog.start()
            c, r = self.get(http, "health", "/health", body=True)
            watchdog.cancel()
            self._call(c)
            s["health_s"] = c.seconds
            if c.status == 200:
                h = r.json()
                loaded = h.get("loaded_adapters", [])
                s["lru"] = sum(1 for a in loaded if not a.get("retiring"))
                s["retiring"] = sum(1 for a in loaded if a.get("retiring"))
                s["in_use"] = sum(a.get("in_use", 0) for a in loaded)
                s["waiting"] = h.get("batches", {}).get("waiting")
        return s


# ------------------------------------------------------------------------------------------------ reading /metrics

def scrape(http) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    r = http.get("/metrics")
    r.raise_for_status()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def total(m: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def by_label(m: dict, name: str, label: str) -> Counter:
    out: Counter = Counter()
    for (n, ls), v in m.items():
        if n == name and v:
            out[dict(ls).get(label)] += int(v)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


# ------------------------------------------------------------------------------------------------ the soak

def soak(a: argparse.Namespace, out=print) -> dict[str, Any]:
    """Build, load, drain, check. Returns the figures and each promise's verdict ({"checks": {name: (ok, detail)}})."""
    import httpx

    work = Path(a.workdir or tempfile.mkdtemp(prefix="loraflow-soak-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_setup = time.time()
    params_file, versions = make_project(work, a.seed)
    server = Server(work, params_file, a.lru_size, a.server_threads)
    http = httpx.Client(base_url=server.url, timeout=120)
    try:
        server.wait_ready(http)
        setup_s = time.time() - t_setup
        rss_start = server.rss_mib()
        out(f"soak: setup {setup_s:.0f} s (adapters, registry, server start); server pid {server.proc.pid}, "
            f"RSS {rss_start:.0f} MiB before any request; {a.seconds:.0f} s of load, {a.clients} clients, "
            f"champion moves every {a.move_every} s, --lru-size {a.lru_size}, server threads {a.server_threads or 'default'}; "
            f"workdir {work}", flush=True)
        load = Load(server, params_file, versions, a)
        # Warm-up: one answer from each mode and the base model, together. Until a first generation has touched
        # them, the base weights (memory-mapped) are not all resident: RSS grows by about the model's size then.
        load.t0 = time.time()
        warm = httpx.Client(base_url=server.url, timeout=a.request_timeout)
        with warm, ThreadPoolExecutor(len(GOOD) + 2) as pool:
            for call, _ in pool.map(lambda m: load.answer(warm, "chat", m, {"messages": PROMPTS[0], "max_tokens": 4,
                                                                            "temperature": 0}), [*GOOD, BROKEN, None]):
                call.kind = "warm-up"
                load._call(call)
        rss_warm, warm_s = server.rss_mib(), time.time() - load.t0
        out(f"soak: warm-up (one answer from each mode and the base) took {warm_s:.0f} s; RSS {rss_warm:.0f} MiB", flush=True)
        load.t0 = time.time()
        deadline = load.t0 + a.seconds
        threads = [threading.Thread(target=load.client, args=(k, deadline), daemon=True) for k in range(a.clients)]
        threads += [threading.Thread(target=load.mover, args=(deadline,), daemon=True),
                    threading.Thread(target=load.sampler, daemon=True)]
        for th in threads:
            th.start()
        for th in threads[:-2]:
            th.join(deadline - time.time() + a.request_timeout + 30)
        clients_alive = sum(th.is_alive() for th in threads[:-2])
        load_s = time.time() - load.t0
        # Drained: nothing waiting, no adapter pinned or retiring (hung-up streams stop generating on their own).
        drained, end = False, time.time() + 60
        while time.time() < end and not drained:
            time.sleep(1)
            s = load.samples[-1] if load.samples else {}
            drained = s.get("waiting") == 0 and s.get("in_use") == 0 and s.get("retiring") == 0
        load.stop.set()
        threads[-1].join(30)
        threads[-2].join(30)
        final = load.sample(http, health=True)
        time.sleep(0.5)  # the server counts a request after its last byte is sent: the client may read it first
        m = scrape(http)
        rss_end = server.rss_mib()
        pid = server.proc.pid
        server.kill()  # SIGKILL: acknowledged feedback must not depend on a clean shutdown
        fb_lines, torn = [], []
        for f in sorted((work / "data" / "raw" / "feedback").glob("*/*.jsonl")):
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    fb_lines.append(json.loads(line)["event_id"])
                except (ValueError, KeyError, TypeError):
                    torn.append(f"{f.name}#{i}: {line[:80]!r}")
        return report(a, load, m, final, dict(rss_start=rss_start, rss_warm=rss_warm, rss_end=rss_end, pid=pid, setup_s=setup_s,
                                              load_s=load_s, drained=drained, clients_alive=clients_alive,
                                              fb_lines=fb_lines, torn=torn, log=str(server.log_path)), out)
    finally:
        http.close()
        server.kill()
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


def report(a, load: Load, m: dict, final: dict, x: dict, out) -> dict[str, Any]:
    calls = load.calls
    status = Counter("none" if c.status is None else str(c.status) for c in calls)
    outcomes = Counter(c.outcome if c.outcome in ("ok", "fallback", "refused") else c.outcome.split(":")[0] for c in calls)
    wrong = [c for c in calls if c.outcome not in ("ok", "fallback", "refused")]
    five = [c for c in calls if c.status is not None and c.status >= 500]
    answered = [c.seconds for c in calls if c.kind in ("chat", "completion", "stream") and c.outcome in ("ok", "fallback")]
    samples = [s for s in load.samples if "error" not in s]
    rss_warm = x["rss_warm"]
    rss_max = max([s["rss_mib"] for s in samples] or [x["rss_end"]])
    checks: dict[str, tuple[bool, str]] = {}

    def check(name: str, ok: bool, detail: str) -> None:
        checks[name] = (bool(ok), detail)

    check("no unexpected 5xx", not five, f"{len(five)} 5xx" + (f", first: {five[0]}" if five else ""))
    check("no unexpected answer", not wrong,
          f"{len(wrong)} unexpected (statuses, client exceptions, broken streams, wrong adapters)"
          + (f"; first: {wrong[0]}" if wrong else ""))
    check("clients stopped by themselves", x["clients_alive"] == 0, f"{x['clients_alive']} client threads still running")
    check("server drained", x["drained"], "nothing waiting, no adapter pinned or retiring within 60 s of the load's end")
    acked, disk = Counter(load.acked), Counter(x["fb_lines"])
    check("feedback: every acknowledged event on disk exactly once",
          all(disk[e] == 1 for e in acked) and set(disk) == set(acked) and max(acked.values(), default=1) == 1,
          f"{len(acked)} acknowledged, {len(x['fb_lines'])} lines on disk, {len(set(disk))} distinct; "
          f"missing {len(set(acked) - set(disk))}, twice or more {sum(1 for v in disk.values() if v > 1)}, "
          f"not acknowledged {len(set(disk) - set(acked))}")
    check("feedback: every line parses (no torn line)", not x["torn"], f"{len(x['torn'])} unparseable: {x['torn'][:3]}")
    # Flat means flat once the load has settled: early growth is the allocator reaching the load's largest batches (the
    # first 5-minute run: +180 MiB from the warm-up, of which +1 MiB in its last 100 s); a leak keeps growing.
    half = next((s_["rss_mib"] for s_ in samples if s_["t"] >= x["load_s"] / 2), rss_warm)
    check(f"memory: RSS at the end within {a.rss_bound_mib:g} MiB of RSS half-way through the load",
          x["rss_end"] - half <= a.rss_bound_mib,
          f"start {x['rss_start']:.0f}, after warm-up {rss_warm:.0f}, half-way {half:.0f}, max {rss_max:.0f}, "
          f"end {x['rss_end']:.0f} MiB: {x['rss_end'] - half:+.0f} MiB in the second half")
    health = [s["health_s"] for s in load.samples if "health_s" in s]
    check(f"liveness: /health answered within {a.health_within:g} s every time", health and max(health) <= a.health_within,
          f"{len(health)} reads, p50 {pct(health, 0.5):.2f} s, max {max(health or [0]):.2f} s; stacks dumped into the "
          f"server log {load.dumped} times")
    lru_max = max([s.get("lru", 0) for s in samples] + [final.get("lru", 0)])
    check(f"adapters: the LRU never above --lru-size {a.lru_size}", lru_max <= a.lru_size,
          f"max {lru_max} in the LRU over {sum('lru' in s for s in samples)} /health samples")
    model_max = max([s.get("model_adapters", 0) for s in samples] or [0])
    bound = a.lru_size + a.clients + 1  # retiring adapters are pinned by in-flight requests, one each; one loading
    check(f"adapters: never more than --lru-size + clients + 1 = {bound} in the model", model_max <= bound,
          f"max {model_max} in the model (peft), max {max([s.get('cache_adapters', 0) for s in samples] or [0])} in the cache")
    check("adapters: at the end none retiring or pinned, model == cache <= --lru-size, one download each",
          final.get("retiring") == 0 and final.get("in_use") == 0
          and final.get("model_adapters") == final.get("cache_adapters") == final.get("lru") <= a.lru_size
          and final.get("downloads") == final.get("lru"),
          f"final: {({k: final.get(k) for k in ('lru', 'retiring', 'in_use', 'model_adapters', 'cache_adapters', 'downloads')})}")

    # /metrics against the clients (the sampler's /health reads are clients too; /metrics is not counted by either)
    server_status = by_label(m, "loraflow_requests_total", "status")
    client_status = Counter({k: v for k, v in status.items() if k != "none"})
    check("/metrics: requests by status equal the clients' exactly", server_status == client_status,
          f"server {dict(sorted(server_status.items()))}, clients {dict(sorted(client_status.items()))}")
    server_route = by_label(m, "loraflow_requests_total", "route")
    client_route = Counter(c.route for c in calls if c.status is not None)
    check("/metrics: requests by route equal the clients' exactly", server_route == client_route,
          f"server {dict(sorted(server_route.items()))}, clients {dict(sorted(client_route.items()))}")
    fb_server = total(m, "loraflow_feedback_events_total")
    check("/metrics: feedback events written equal the acknowledged", fb_server == len(load.acked),
          f"/metrics {fb_server:.0f}, acknowledged {len(load.acked)}")
    broken_asked = sum(1 for c in calls if c.mode == BROKEN and c.kind in ("warm-up", "chat", "completion", "stream", "hangup"))
    broken_failed = total(m, "loraflow_adapter_load_failures_total", mode=BROKEN)
    check("/metrics: failed loads equal the requests to the broken mode", broken_failed == broken_asked,
          f"/metrics {broken_failed:.0f}, requests {broken_asked}")
    lat_ok, lat_detail = latency_agrees(m, [c for c in calls if c.route == "/chat" and c.status is not None])
    check("/metrics: the /chat latency histogram agrees with the clients' timings", lat_ok, lat_detail)

    figures = {"requests": len(calls), "seconds": round(x["load_s"]), "by_status": dict(sorted(status.items())),
               "outcomes": dict(outcomes), "unexpected_5xx": len(five), "unexpected": len(wrong),
               "p50_s": pct(answered, 0.5), "p95_s": pct(answered, 0.95), "answers": len(answered),
               "rss_start_mib": round(x["rss_start"]), "rss_warm_mib": round(rss_warm), "rss_half_mib": round(half), "rss_max_mib": round(rss_max),
               "rss_end_mib": round(x["rss_end"]), "feedback_acked": len(load.acked), "feedback_on_disk": len(x["fb_lines"]),
               "feedback_metrics": int(fb_server), "moves": len(load.moves), "move_errors": len(load.move_errors),
               "lru_max": lru_max, "model_adapters_max": model_max, "hangups": sum(c.kind == "hangup" for c in calls),
               "broken_requests": broken_asked, "adapter_loads": int(total(m, "loraflow_adapter_loads_total")),
               "setup_s": round(x["setup_s"]), "health_max_s": round(max(health or [0]), 2), "load_avg": os.getloadavg(), "kinds": dict(Counter(c.kind for c in calls))}
    out("")
    for name, (ok, detail) in checks.items():
        out(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    f = figures
    la = ", ".join(f"{v:.1f}" for v in f["load_avg"])
    out(f"load: {f['kinds']}; {f['hangups']} streams hung up mid-answer; {f['moves']} champion moves "
        f"({f['move_errors']} failed after retries); {f['adapter_loads']} adapter loads; {f['broken_requests']} requests "
        f"to the broken mode, each answered by the base model; outcomes {f['outcomes']}; machine {platform.machine()} "
        f"x{os.cpu_count()}, load average {la}; server log {x['log']}")
    out("timeline (s: answered so far, RSS MiB, adapters in the LRU / retiring / in the model, downloads): " + "; ".join(
        f"{s['t']:.0f}: {sum(1 for c in calls if c.at <= s['t'] and c.kind in ('chat', 'completion', 'stream'))}, "
        f"{s['rss_mib']:.0f}, {s.get('lru')}/{s.get('retiring')}/{s.get('model_adapters', 0):.0f}, {s['downloads']}"
        for s in samples[:: max(1, len(samples) // 10)]))
    failed = [n for n, (ok, _) in checks.items() if not ok]
    out(f"{f['unexpected_5xx']} unexpected 5xx in {f['requests']:,} requests over {f['seconds']} s "
        f"({', '.join(f'{k}: {v:,}' for k, v in f['by_status'].items())}); answers p50 {f['p50_s']:.2f} s, "
        f"p95 {f['p95_s']:.2f} s; RSS start {f['rss_start_mib']} / after warm-up {f['rss_warm_mib']} / half-way "
        f"{f['rss_half_mib']} / end {f['rss_end_mib']} MiB; feedback {f['feedback_acked']:,} acknowledged = {f['feedback_on_disk']:,} on disk = "
        f"{f['feedback_metrics']:,} in /metrics; adapters in the LRU max {f['lru_max']} (--lru-size {a.lru_size}); "
        f"{len(checks) - len(failed)}/{len(checks)} promises kept" + (f" (BROKEN: {', '.join(failed)})" if failed else ""))
    return {"figures": figures, "checks": checks}


def latency_agrees(m: dict, calls: list[Call]) -> tuple[bool, str]:
    """Each bucket of loraflow_request_duration_seconds{route="/chat"} against the clients' count at or below its
    bound; the clients' timings include the loopback and parsing, so a request near an edge may land either side."""
    buckets: Counter = Counter()
    for (n, ls), v in m.items():
        d = dict(ls)
        if n == "loraflow_request_duration_seconds_bucket" and d.get("route") == "/chat":
            buckets[float(d["le"])] += v
    if not calls:
        return False, "no /chat requests"
    worst, where = 0.0, None
    for le, server_n in sorted(buckets.items()):
        low = sum(1 for c in calls if c.seconds <= le)
        high = sum(1 for c in calls if c.seconds <= le + LATENCY_OVERHEAD_S)
        off = max(low - server_n, server_n - high, 0)
        if off > worst:
            worst, where = off, le
    slack = max(LATENCY_SLACK, LATENCY_SLACK_SHARE * len(calls))
    med = statistics.median(c.seconds for c in calls)
    return worst <= slack, (f"{len(calls)} /chat requests; largest bucket difference beyond the clients' "
                            f"{LATENCY_OVERHEAD_S * 1000:.0f} ms overhead {worst:.0f} (at le={where}), allowed {slack:.0f}; "
                            f"client median {med:.2f} s")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=None, help="length of the load (or --seconds)")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--clients", type=int, default=5, help="client threads sending requests")
    ap.add_argument("--lru-size", type=int, default=2)
    ap.add_argument("--move-every", type=float, default=3.0, help="seconds between champion moves (alpha, beta in turn)")
    ap.add_argument("--rss-bound-mib", type=float, default=100.0,
                    help="RSS growth allowed over the second half of the load: 5 leaked adapters' worth (~19 MiB each)")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="the server's torch threads (OMP_NUM_THREADS; 0 = torch's default, one per core). 1: on a "
                         "shared machine, threads spinning against other work made a 10-token batch take minutes")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--health-within", type=float, default=10.0,
                    help="the longest /health may take (the sampler reads it every second; a liveness probe would)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the throwaway project goes (kept)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project")
    ap.add_argument("--json", default=None, help="also write the figures and verdicts here")
    a = ap.parse_args(argv)
    if a.minutes is not None:
        a.seconds = a.minutes * 60
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    r = soak(a)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1, default=str))
    return 0 if all(ok for ok, _ in r["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

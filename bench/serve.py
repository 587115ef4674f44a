"""Batched multi-adapter serving against the same server generating one request at a time.

    python bench/serve.py [--requests 32] [--modes 4] [--tokens 32] [--repeats 2]

Builds a throwaway SQLite registry with `--modes` LoRA adapters shaped like train's default (all-linear, r=16,
random weights), starts `loraflow serve` on a loopback port in this process, and sends rounds of `--requests`
concurrent greedy POST /chat requests spread over the modes (and four prompts). Each round runs twice, back to
back on the same server and model: batched (--max-batch 32, the default) and serialised (max_batch 1, what the
server did before batching). The order alternates round to round, and the headline is the median of the per-pair
ratios: the shared machine's load drifts, a back-to-back pair shares it. Answers are compared between the two
sides (greedy: they must be the same). The last line is the headline.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loraflow  # noqa: E402,F401  (offline env first)

PROMPTS = [
    [{"role": "user", "content": "Write a long story about a cat who runs a shop."}],
    [{"role": "user", "content": "Explain in detail how a bicycle works."}],
    [{"role": "user", "content": "Describe a busy market on a Saturday morning, with its sounds and smells."}],
    [{"role": "user", "content": "List ten ideas for a weekend trip and say why each is fun."}],
]


def make_adapter(base_path: str, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from loraflow.models import load_causal_lm, load_tokenizer

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(base_path), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.save_pretrained(out)
    load_tokenizer(base_path).save_pretrained(out)
    return out


def register(params, mode: str, adapter: Path) -> None:
    import mlflow

    from loraflow import tracking
    from loraflow.pyfunc import AdapterModel

    exp = tracking.setup(params, mode)
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(name="model", python_model=AdapterModel(), artifacts={"adapter": str(adapter)},
                                       model_config={"base_model": params.base.model}, pip_requirements=["loraflow"],
                                       registered_model_name=f"loraflow-{mode}")
    mlflow.MlflowClient().set_registered_model_alias(f"loraflow-{mode}", "champion", str(info.registered_model_version))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    import httpx
    import torch
    import uvicorn

    from loraflow.config import load_params
    from loraflow.models import resolve
    from loraflow.serve import ServeSettings, create_app

    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--modes", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="loraflow-bench-serve-"))
    server = thread = None
    try:
        params = load_params(Path(__file__).resolve().parents[1] / "params.yaml",
                             [f"base.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"])
        base_path = resolve(params.base.model, params.base.model_cache)
        modes = [f"bench_{i}" for i in range(a.modes)]
        for i, mode in enumerate(modes):
            register(params, mode, make_adapter(base_path, tmp / mode, seed=i))

        settings = ServeSettings(root=tmp, poll_interval=0, max_tokens_limit=max(1024, a.tokens))
        app = create_app(params, settings)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        http = httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=a.requests))

        def one(k: int) -> tuple[float, dict]:
            t = time.perf_counter()
            r = http.post(f"{url}/chat", json={"mode": modes[k % len(modes)], "messages": PROMPTS[k // len(modes) % 4],
                                               "max_tokens": a.tokens, "temperature": 0})
            r.raise_for_status()
            return time.perf_counter() - t, r.json()

        def round_(max_batch: int) -> dict:
            settings.max_batch = max_batch  # the scheduler reads it for every batch
            t = time.perf_counter()
            with ThreadPoolExecutor(max_workers=a.requests) as pool:
                res = list(pool.map(one, range(a.requests)))
            wall = time.perf_counter() - t
            return {"rps": a.requests / wall, "wall": wall, "lat": [x for x, _ in res],
                    "answers": [r["answer"] for _, r in res], "tokens": sum(r["usage"]["completion_tokens"] for _, r in res),
                    "batches": sorted({r["batch_size"] for _, r in res})}

        for k in range(len(modes)):  # loads every adapter and warms up
            one(k)
        sides: dict[str, list[dict]] = {"batched": [], "serialised": []}
        for i in range(a.repeats):
            for side in (("batched", "serialised") if i % 2 == 0 else ("serialised", "batched")):
                r = round_(32 if side == "batched" else 1)
                sides[side].append(r)
                print(f"round {i + 1} {side:<10}: {r['rps']:.3f} requests/s, {r['tokens'] / r['wall']:.1f} tokens/s, "
                      f"{r['wall']:.1f} s wall, batch sizes {r['batches']}", flush=True)
        same = sum(x == y for b, s in zip(sides["batched"], sides["serialised"], strict=True)
                   for x, y in zip(b["answers"], s["answers"], strict=True))
        ratios = [b["rps"] / s["rps"] for b, s in zip(sides["batched"], sides["serialised"], strict=True)]
        print(f"model {params.base.model} + {a.modes} LoRA adapters (all-linear r=16), device {engine_device(app)}, "
              f"{torch.get_num_threads()} threads; {a.requests} concurrent greedy requests, {a.tokens} new tokens, "
              f"{a.repeats} rounds per side")
        for side, rs in sides.items():
            lat = [x for r in rs for x in r["lat"]]
            print(f"{side:<10}: {statistics.median(r['rps'] for r in rs):.3f} requests/s (median of rounds), "
                  f"latency p50 {pct(lat, 0.5):.1f} s, p95 {pct(lat, 0.95):.1f} s")
        print(f"answers identical batched vs serialised: {same}/{a.requests * a.repeats}")
        print(f"batched/serialised per round pair: {', '.join(f'{x:.2f}' for x in ratios)}")
        print(f"{statistics.median(ratios):.1f}x requests/s vs serialised (goal >= 4x)")
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


def engine_device(app) -> str:
    return app.state.engine.device


if __name__ == "__main__":
    main()

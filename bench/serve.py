"""The server's generation speed against bare peft `model.generate`, and the cost of switching cached adapters.

    python bench/serve.py [--tokens 64] [--repeats 5]

Builds a throwaway SQLite registry with two LoRA adapters shaped like train's default (all-linear, r=16, random
weights), starts `loraflow serve` on a loopback port in this process, and alternates, on the same model object
and the same greedy settings: one HTTP POST /chat, one bare `generate` call. The headline is the median of the
per-pair ratios (the shared machine's load drifts; a back-to-back pair shares it).
The adapter switch is timed inside the server around set_adapter (median over requests alternating two cached
modes); the end-to-end latency of alternating vs repeating a mode at max_tokens=1 is printed beside it.
The last line is the headline.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loraflow  # noqa: E402,F401  (offline env first)

PROMPT = [{"role": "user", "content": "Write a long story about a cat who runs a shop."}]


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


def main() -> None:
    import httpx
    import torch
    import uvicorn

    from loraflow.config import load_params
    from loraflow.models import resolve
    from loraflow.serve import ServeSettings, create_app

    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--switches", type=int, default=20)
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="loraflow-bench-serve-"))
    server = thread = None
    try:
        params = load_params(Path(__file__).resolve().parents[1] / "params.yaml",
                             [f"base.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"])
        base_path = resolve(params.base.model, params.base.model_cache)
        for i, mode in enumerate(("bench_a", "bench_b")):
            register(params, mode, make_adapter(base_path, tmp / mode, seed=i))

        app = create_app(params, ServeSettings(root=tmp, poll_interval=0, max_tokens_limit=max(1024, a.tokens)))
        engine = app.state.engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        http = httpx.Client(timeout=600)

        def served(mode: str, n: int) -> dict:
            r = http.post(f"{url}/chat", json={"mode": mode, "messages": PROMPT, "max_tokens": n})
            r.raise_for_status()
            return r.json()

        # Loads both adapters (cached from here on) and warms up: the first long generation in a process
        # was 5-8x slower here whichever side ran it.
        for mode in ("bench_b", "bench_a"):
            served(mode, a.tokens)
        ad, _ = engine.adapters.acquire("bench_a")  # the very adapter object the server uses, pinned for the bare runs

        def bare(n: int) -> tuple[int, float]:
            enc = engine.encode(PROMPT)
            t = time.perf_counter()
            with engine.gen_lock, torch.inference_mode():
                engine.peft.set_adapter(ad.name, inference_mode=True)
                engine._active = ad.name
                out = engine.peft.generate(**enc, max_new_tokens=n, do_sample=False, num_beams=1,
                                           pad_token_id=engine.tok.pad_token_id, eos_token_id=engine.tok.eos_token_id)
            new = out[0, enc["input_ids"].shape[1]:].tolist()
            return len(new) - (new[-1] == engine.tok.eos_token_id), time.perf_counter() - t

        srv_tps, bare_tps = [], []
        for i in range(a.repeats):
            # Pairs back to back, the order alternating: the machine's load drifts, a pair shares it.
            for side in (("server", "bare") if i % 2 == 0 else ("bare", "server")):
                if side == "server":
                    t = time.perf_counter()
                    r = served("bench_a", a.tokens)
                    srv_tps.append(r["usage"]["completion_tokens"] / (time.perf_counter() - t))
                else:
                    n, dt = bare(a.tokens)
                    bare_tps.append(n / dt)
        assert r["usage"]["completion_tokens"] == n, (r["usage"], n)  # same work on both sides
        engine.adapters.release(ad)

        switch_ms, alt, same = [], [], []
        for i in range(a.switches):
            t = time.perf_counter()
            switch_ms.append(served(("bench_a", "bench_b")[i % 2], 1)["switch_ms"])
            alt.append(time.perf_counter() - t)
        for _ in range(a.switches):
            t = time.perf_counter()
            served("bench_a", 1)
            same.append(time.perf_counter() - t)

        ratio = statistics.median(s / b for s, b in zip(srv_tps, bare_tps, strict=True))
        sw = statistics.median(switch_ms[1:])
        print(f"model {params.base.model} + LoRA all-linear r=16, device {engine.device}, {torch.get_num_threads()} threads, "
              f"greedy, {n} new tokens, {a.repeats} repeats")
        print(f"server POST /chat: {statistics.median(srv_tps):.2f} tokens/s (median; runs {', '.join(f'{x:.1f}' for x in srv_tps)})")
        print(f"bare peft generate: {statistics.median(bare_tps):.2f} tokens/s (median; runs {', '.join(f'{x:.1f}' for x in bare_tps)})")
        print(f"max_tokens=1 request latency: alternating two modes {statistics.median(alt) * 1000:.1f} ms, "
              f"same mode {statistics.median(same) * 1000:.1f} ms (medians of {a.switches})")
        print(f"set_adapter inside the server: median {sw:.2f} ms, max {max(switch_ms[1:]):.2f} ms")
        print(f"server/bare per pair: {', '.join(f'{s / b:.2f}' for s, b in zip(srv_tps, bare_tps, strict=True))}")
        print(f"{ratio:.2f}x tokens/s vs bare generate (goal >= 0.9x); adapter switch {sw:.1f} ms (goal <= 50 ms)")
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

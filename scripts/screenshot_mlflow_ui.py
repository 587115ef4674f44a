"""Screenshot of the MLflow UI's model page, showing the `champion` and `challenger` aliases.

    python scripts/screenshot_mlflow_ui.py                      # a throwaway demo registry -> docs/mlflow_model_page.png
    python scripts/screenshot_mlflow_ui.py --db mlflow.db --mode retail_media --out /tmp/page.png

Starts `mlflow server` (the UI) on loopback in its own process group, waits for it, takes a headless
Chromium screenshot (Debian package `chromium`) and stops the server's whole group. Without --db it builds a
registry in a temporary folder with the real promote step on stand-in adapters: v1 champion, v2 worse
(challenger).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def demo_registry(folder: Path, mode: str) -> Path:
    import mlflow

    from loraflow import tracking
    from loraflow.config import load_params
    from loraflow.io import sha256_file, write_json
    from steps import promote

    db = folder / "mlflow.db"
    params = load_params(ROOT / "params.yaml", [f"base.tracking_uri=sqlite:///{db}"])
    exp = tracking.setup(params, mode)

    def scores(v: float) -> dict:
        ci = lambda x: {"mean": x, "ci_low": x - 0.05, "ci_high": x + 0.05}  # noqa: E731
        # Healthy degeneration rates: without them the gate's stop/loop floors reject every demo candidate.
        return {**{m: ci(v) for m in ("rouge1", "rouge2", "rougeL", "bertscore")},
                "degeneration": {"stop_rate": ci(0.95), "loop_rate": ci(0.05)}}

    champion = None
    for i, rouge in enumerate((0.55, 0.50), start=1):
        with mlflow.start_run(experiment_id=exp, run_name=f"train-{mode}-demo{i}") as run:
            pass
        adapter = folder / f"adapter{i}"
        adapter.mkdir()
        (adapter / "adapter_model.safetensors").write_bytes(os.urandom(64))
        write_json(adapter / "train_info.json", {"adapter_sha256": sha256_file(adapter / "adapter_model.safetensors"),
                                                 "mlflow_run_id": run.info.run_id, "params": {}})
        write_json(folder / f"metrics{i}.json", {
            "eval_set": {"sha256": "0" * 64, "size": 6}, "base": scores(0.30), "candidate": scores(rouge),
            "champion": scores(champion[1]) if champion else None,
            "champion_version": champion[0] if champion else None, "deltas": {}})
        out = promote.run(params, mode, folder / f"metrics{i}.json", adapter, folder / f"promotion{i}")
        if out["decision"] == "promote":
            champion = (out["version"], rouge)
    return db


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--db", type=Path, help="an existing MLflow sqlite file (default: build a demo registry)")
    ap.add_argument("--mode", default="retail_media")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "mlflow_model_page.png")
    ap.add_argument("--wait-ms", type=int, default=20000, help="virtual time the UI gets to render")
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="loraflow-ui-") as tmp:
        tmp = Path(tmp)
        db = args.db.resolve() if args.db else demo_registry(tmp, args.mode)
        port = free_port()
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
             "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # it spawns workers
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 120
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                        break
                except OSError:
                    time.sleep(0.5)
                if server.poll() is not None or time.time() > deadline:
                    sys.exit(f"mlflow server on {url} did not come up")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp / 'chromium'}",
                 "--hide-scrollbars", f"--virtual-time-budget={args.wait_ms}", "--window-size=1440,1500",
                 f"--screenshot={args.out.resolve()}", f"{url}/#/models/loraflow-{args.mode}"],
                check=True, capture_output=True, timeout=180)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    print(f"{args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

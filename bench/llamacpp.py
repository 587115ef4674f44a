"""llama.cpp vs loraflow's engine: answers/s on the same CPU and the same prompts, in one run.

    loraflow export retail_media --to ollama     # first: the GGUF export of the champion (make setup-llama)
    python bench/llamacpp.py                     # the default run's eval prompts, greedy

The same registered version both ways: loraflow's server engine (loraflow.parity.replay_server: the version loaded
from the registry into the float32 base, every prompt queued at once, one batch) and llama.cpp
(loraflow.export.replay_llama_cpp: the packaged Q4_1 base GGUF + the f16 LoRA GGUF, one prompt at a time, as
`loraflow export` replays it). Each is timed whole (model load included). Answers differ (4-bit base, llama.cpp's
repeat window), so tokens/s is printed beside answers/s. The last line is the headline, the ratio first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import loraflow  # noqa: E402,F401  (offline env before transformers is imported)
from loraflow import export, generation, parity  # noqa: E402
from loraflow.config import Paths, load_params  # noqa: E402
from loraflow.io import read_json, read_jsonl  # noqa: E402
from loraflow.models import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--mode", default=None)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: its own choice)")
    a = ap.parse_args()
    params = load_params(a.params)
    mode = a.mode or params.base.modes[0]
    p = Paths(ROOT, mode)
    version = read_json(p.promotion / "decision.json").get("version")
    folder = export.default_folder(ROOT, mode, str(version), "ollama")
    if not version or not (folder / "export.json").exists():
        sys.exit(f"no GGUF export of {mode} v{version} at {folder}: run `loraflow export {mode} --to ollama` first")
    files = read_json(folder / "export.json")["files"]
    prompts = [r["prompt"] for r in read_jsonl(p.eval / "predictions.jsonl")]
    gp = generation.load(p.adapter, params.generate)
    tok = load_tokenizer(str(p.adapter))

    def tokens(answers: list[str]) -> int:
        return sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in answers)

    ours = parity.replay_server(params, mode, str(version), p.adapter, prompts, gp)
    theirs = export.replay_llama_cpp(folder / files["base"], folder / files["adapter"], tok, prompts, gp,
                                     generation.end_of_turn_ids(tok, str(p.adapter)), a.threads)
    rows = [("loraflow engine (float32, batched)", ours.seconds, tokens(ours.answers)),
            (f"{theirs.engine}, {theirs.settings['threads']} threads", theirs.seconds, tokens(theirs.answers))]
    for name, s, n in rows:
        print(f"{name}: {len(prompts)} answers in {s:.1f} s = {len(prompts) / s:.2f} answers/s, {n / s:.1f} tokens/s")
    ratio = (len(prompts) / theirs.seconds) / (len(prompts) / ours.seconds)
    print(f"{ratio:.2f}x answers/s llama.cpp (Q4_1 base + f16 LoRA GGUF) vs loraflow's engine, {mode} v{version}, "
          f"{len(prompts)} eval prompts, greedy, max {gp.max_new_tokens} new tokens, loads included")


if __name__ == "__main__":
    main()

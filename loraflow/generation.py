"""How an adapter answers: the decoding settings that belong to it.

train writes params.yaml's `generate` section beside the adapter as generation_config.json (the keys are
transformers' GenerationConfig names, so `GenerationConfig.from_pretrained(adapter_dir)` and servers that read
a model folder's generation_config.json understand it); promote registers it with the version (it is in the
adapter folder). evaluate (greedy), the MLflow pyfunc model and `loraflow serve` read it back with `load` and
turn it into generate() arguments with `generate_kwargs`, so the settings an adapter was judged with are the
ones it is served with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraflow.config import GenerateParams
from loraflow.io import write_json

FILE = "generation_config.json"


def write(folder: Path, gp: GenerateParams) -> Path:
    path = Path(folder) / FILE
    write_json(path, {**gp.model_dump(), "_from": "loraflow params.yaml `generate`"})
    return path


def load(folder: Path | str | None, default: GenerateParams | None = None) -> GenerateParams:
    """The adapter's settings; `default` (or the built-in defaults) for a folder without the file, e.g. an
    adapter trained before the file existed, or the bare base model (folder None)."""
    path = Path(folder) / FILE if folder else None
    if path is None or not path.is_file():
        return default or GenerateParams()
    raw = json.loads(path.read_text(encoding="utf-8"))
    return GenerateParams(**{k: v for k, v in raw.items() if k in GenerateParams.model_fields})


def generate_kwargs(gp: GenerateParams, *, greedy: bool = False, max_new_tokens: int | None = None,
                    temperature: float | None = None, top_p: float | None = None) -> dict[str, Any]:
    """generate() arguments: the adapter's settings, a request's own values where given.

    greedy=True (evaluation) ignores the sampling settings; otherwise a request's temperature wins, then the
    adapter's (when its do_sample is on); temperature 0 means greedy. The anti-repetition settings apply to
    both."""
    kw: dict[str, Any] = {"max_new_tokens": int(max_new_tokens or gp.max_new_tokens), "num_beams": 1}
    if gp.repetition_penalty != 1.0:
        kw["repetition_penalty"] = gp.repetition_penalty
    if gp.no_repeat_ngram_size:
        kw["no_repeat_ngram_size"] = gp.no_repeat_ngram_size
    t = 0.0 if greedy else (temperature if temperature is not None else (gp.temperature if gp.do_sample else 0.0))
    if t > 0:
        kw.update(do_sample=True, temperature=t, top_p=top_p if top_p is not None else gp.top_p)
    else:
        kw["do_sample"] = False
    return kw


def decoding(gp: GenerateParams) -> dict[str, Any]:
    """The greedy extras evaluation passes besides max_new_tokens (recorded in metrics.json)."""
    kw = generate_kwargs(gp, greedy=True)
    return {k: v for k, v in kw.items() if k not in ("max_new_tokens", "num_beams", "do_sample")}

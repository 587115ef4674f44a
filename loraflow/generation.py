"""The generation contract: how an adapter answers and where its turn ends, defined once.

- **Decoding settings.** train writes params.yaml's `generate` section beside the adapter as
  generation_config.json (the keys are transformers' GenerationConfig names, so
  `GenerationConfig.from_pretrained(adapter_dir)` and servers that read a model folder's generation_config.json
  understand it); promote registers it with the version (it is in the adapter folder). evaluate, the MLflow pyfunc
  model, the benches and `loraflow serve` read it back with `load` and turn it into generate() arguments with
  `generate_kwargs`, the one function that does, so the settings an adapter was judged with are the ones it is
  served with.
- **End of turn.** `end_of_turn_ids` is the one rule for the tokens that end an assistant turn: the train loss
  mask learns to write them, the validation gate checks the template writes them, and evaluate, the pyfunc model
  and the server's engine (batched, streamed and merged) stop at them.
- **The generate loop.** `generate_detailed` is the one batched greedy loop (evaluate, the pyfunc model, the
  benches); the server's engine schedules its own batches with the same functions (`generate_kwargs`,
  `end_of_turn_ids`, `call_kwargs`).
- **Batches answer as rows alone.** transformers' repetition_penalty and no_repeat_ngram_size count every token
  of input_ids, a row's left padding included (the pad token is often the eos, or SmolLM2's end of turn), so
  a row's answer could depend on the batch it landed in. `call_kwargs` applies them to each row's own tokens.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
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
    """generate() decoding arguments: the adapter's settings, a request's own values where given.

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


def call_kwargs(kwargs: dict[str, Any], attention_mask) -> dict[str, Any]:
    """generate()'s arguments for `kwargs` (generate_kwargs' settings) on a left-padded batch whose
    `attention_mask` marks the padding: the anti-repetition settings become one logits processor that applies
    transformers' own two processors to each row's tokens without its padding (so a row answers as it would
    alone), and generate() gets the neutral values, so a model's generation_config.json cannot add its own."""
    kw = dict(kwargs)
    penalty, ngram = float(kw.pop("repetition_penalty", 1.0)), int(kw.pop("no_repeat_ngram_size", 0))
    kw.update(repetition_penalty=1.0, no_repeat_ngram_size=0)
    if penalty != 1.0 or ngram:
        from transformers import LogitsProcessorList

        pads = (attention_mask == 0).sum(dim=1).tolist()  # left padding: a row's pads are its first tokens
        kw["logits_processor"] = LogitsProcessorList([_OwnTokens(pads, penalty, ngram)])
    return kw


class _OwnTokens:
    """transformers' RepetitionPenalty and NoRepeatNGram logits processors, each row seeing only its own tokens.
    Run where generate() runs its own (before temperature / top-p), so sampling is affected as before."""

    def __init__(self, pads: list[int], penalty: float, ngram: int):
        from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

        self.pads = pads
        self.inner = ([RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else []) + (
            [NoRepeatNGramLogitsProcessor(ngram)] if ngram else [])

    def __call__(self, input_ids, scores):
        out = scores.clone()
        for r, pad in enumerate(self.pads):
            row = scores[r:r + 1]
            for p in self.inner:
                row = p(input_ids[r:r + 1, pad:], row)
            out[r] = row[0]
        return out


# ---------------------------------------------------------------------------------------------- end of turn

_PROBE = "loraflow-end-of-turn-probe"


def end_of_turn_ids(tok, model: Any = None) -> list[int]:
    """Token ids that end an assistant turn, sorted: the tokenizer's eos, the model's generation eos and the
    special token the chat template writes right after an assistant message (<|im_end|>, <|eot_id|>,
    <end_of_turn>...), which is not always the eos (Llama 3 instruct: eos <|end_of_text|>, end of turn
    <|eot_id|>; Gemma: eos <eos>, end of turn <end_of_turn>).

    `model`: a loaded model (its `generation_config`), or a model folder (its generation_config.json), or None.
    """
    ids = {tok.eos_token_id} - {None}
    gen_eos = _generation_eos(model)
    ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                                       tokenize=False)
    except Exception:  # noqa: BLE001 - no usable template: the eos ids are all we have
        text = ""
    if _PROBE in text:
        # Llama 3's <|eot_id|> is an added token marked special but in no special-token attribute, so
        # all_special_ids alone misses it.
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        tail = tok(text.split(_PROBE, 1)[1], add_special_tokens=False)["input_ids"]
        ids.update(next(([i] for i in tail if i in special), []))
    return sorted(ids)


def _generation_eos(model: Any) -> int | list[int] | None:
    if isinstance(model, str | Path):
        path = Path(model) / FILE
        return json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
    return getattr(getattr(model, "generation_config", None), "eos_token_id", None)


# ---------------------------------------------------------------------------------------------- the loop

def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Generated:
    """One model's answers and what produced them."""

    answers: list[str]
    new_tokens: list[int]
    stopped: list[bool]  # ended at an end-of-turn token (False: ran into max_new_tokens)
    prompts_sha256: str  # of the rendered prompt texts actually tokenized
    settings: dict[str, Any]  # the generation settings actually passed
    seconds: float

    @property
    def settings_sha256(self) -> str:
        return _sha(self.settings)

    def part(self, lo: int, hi: int) -> Generated:
        return replace(self, answers=self.answers[lo:hi], new_tokens=self.new_tokens[lo:hi], stopped=self.stopped[lo:hi])


def generate_detailed(model, tok, prompts: list[list[dict]], gp: GenerateParams, batch_size: int,
                      stop_ids: list[int] | None = None) -> Generated:
    """Greedy answers for chat prompts with `gp`'s max_new_tokens and anti-repetition settings, batched (left
    padding, sorted by length), stopping at the end of turn; order is preserved."""
    import torch

    stop_ids = sorted(stop_ids if stop_ids is not None else end_of_turn_ids(tok, model))
    kwargs = generate_kwargs(gp, greedy=True)
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    # Sorting by length keeps padding (wasted compute) small; left padding keeps every prompt's last token
    # at the end, where generation continues, and generate() derives position ids from the attention mask.
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    settings = {"batch_size": batch_size, **kwargs, "stop_token_ids": stop_ids, "pad_token_id": tok.pad_token_id,
                "padding_side": "left"}
    answers, new_tokens, stopped = [""] * len(texts), [0] * len(texts), [False] * len(texts)
    tok.padding_side = "left"
    stops = set(stop_ids)
    t = time.perf_counter()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, **call_kwargs(kwargs, enc["attention_mask"]), pad_token_id=tok.pad_token_id,
                                 eos_token_id=stop_ids)
        for row, i in zip(out[:, enc["input_ids"].shape[1]:].tolist(), idx, strict=True):
            # Finished rows are padded to the batch's longest answer: cut at the first end-of-turn.
            end = next((k for k, x in enumerate(row) if x in stops), None)
            answers[i] = tok.decode(row[:end], skip_special_tokens=True).strip()
            new_tokens[i] = len(row) if end is None else end + 1
            stopped[i] = end is not None
    return Generated(answers, new_tokens, stopped, _sha(texts), settings, time.perf_counter() - t)

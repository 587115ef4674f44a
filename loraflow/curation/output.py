"""The curated output lines, byte for byte as json.dumps(sort_keys=True) writes them."""

from __future__ import annotations

import functools

from loraflow.curation.ids import json_str
from loraflow.curation.records import Item, is_feedback
from loraflow.io import dumps


def _meta(it: Item, dups: dict[int, dict[str, list[str]]]) -> dict:
    meta = {"format": it.raw.format, **dups.get(id(it), {"duplicates": [], "near_duplicates": []})}
    rec = it.raw.record
    if is_feedback(rec):  # served-answer feedback: keep what it was about
        meta["feedback"] = {k: rec.get(k) for k in ("response_id", "rating", "adapter_version", "timestamp")}
    if it.raw.generated:  # a teacher's pair: which teacher, and the section it was checked against
        meta["generated"] = rec["meta"]["generated"]
    return meta


@functools.lru_cache(maxsize=64)
def _plain_meta_json(fmt: str) -> str:
    return dumps({"format": fmt, "duplicates": [], "near_duplicates": []})


def sft_line(it: Item, dups: dict[int, dict[str, list[str]]]) -> str:
    """dumps({"id", "messages", "meta", "source"}), byte for byte, with the messages' JSON made once (for the id)."""
    rec = it.raw.record
    if it.truncated or id(it) in dups or is_feedback(rec) or it.raw.generated:
        meta = _meta(it, dups)
        if it.truncated:
            meta["truncated"] = True
        meta_json = dumps(meta)
    else:  # most records: no twins, nothing cut, not feedback, not generated
        meta_json = _plain_meta_json(it.raw.format)
    # json.dumps(sort_keys=True) writes the keys in this order with ", " and ": " between them.
    return f'{{"id": {json_str(it.id)}, "messages": {it.messages_json}, "meta": {meta_json}, "source": {json_str(it.raw.source)}}}'


def pref_record(it: Item, dups: dict[int, dict[str, list[str]]]) -> dict:
    meta = _meta(it, dups)
    return {"id": it.id, "prompt": it.pref.prompt, "chosen": it.pref.chosen, "rejected": it.pref.rejected,
            "source": it.raw.source, "meta": meta}

"""Record ids (a hash of the normalised content) and the train/eval split that depends on the id alone."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from loraflow.formats import Messages
from loraflow.io import dumps
from loraflow.tokens import plain_turn

json_str = json.encoder.encode_basestring  # what dumps() (ensure_ascii=False) writes for a str


def messages_json(msgs: Messages) -> str:
    """dumps(msgs), built directly for plain turns ({role, content} strings), as curation makes them."""
    if all(map(plain_turn, msgs)):
        return "[" + ", ".join(f'{{"content": {json_str(m["content"])}, "role": {json_str(m["role"])}}}'
                               for m in msgs) + "]"
    return dumps(msgs)


def record_id(obj: Any) -> str:
    return id_of(dumps(obj))


def id_of(canonical_json: str) -> str:
    return hashlib.sha256(canonical_json.encode()).hexdigest()[:16]


def in_eval(rid: str, fraction: float) -> bool:
    # A hash of the id alone decides, so the split of a record never depends on the other records.
    return int(hashlib.sha256(f"split:{rid}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction

"""curate: raw files in the formats users bring -> chat-format train/eval JSONL, with every record accounted for.

    python -m steps.curate data/raw/retail_media data/curated/retail_media

Reads every file under the raw folder (never modifies it). Each record ends up curated, merged as an
exact duplicate (counted), or quarantined with a reason. The split is by a hash of the record's id, so
adding records never moves an existing one between train and eval.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflow.config import Params, load_params
from loraflow.errors import CurationError
from loraflow.io import atomic_dir, dumps, sha256_file, write_json, write_jsonl
from loraflow.stepcli import step_errors, step_parser

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SUPPORTED = (".jsonl", ".json")


class Reject(Exception):
    """A record that cannot be curated; the message is the quarantine reason.

    `raw` keeps what was read when it could not even be parsed (the line's text), so nothing is lost.
    """

    def __init__(self, reason: str, raw: Any = None):
        super().__init__(reason)
        self.raw = raw


@dataclass
class SourceStats:
    read: int = 0
    curated: int = 0
    duplicates: int = 0
    quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)


def iter_raw(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (index, record) for each record of a raw file; an unparsable record comes as a Reject."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="strict") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, Reject(f"line {n}: not valid JSON ({e.msg} at column {e.colno})", raw=line.rstrip("\n"))
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise CurationError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        yield from enumerate(data)
    else:
        raise CurationError(f"{path}: unsupported file type {path.suffix!r} (supported: {', '.join(SUPPORTED)})")


def to_messages(rec: Any) -> list[dict[str, str]]:
    """Turn one raw record (OpenAI messages or Alpaca) into chat messages, or raise Reject."""
    if not isinstance(rec, dict):
        raise Reject(f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise Reject("field 'messages': expected a non-empty list of {role, content}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise Reject(f"messages[{i}]: expected an object with 'role' and 'content'")
            if not isinstance(m["content"], str):
                raise Reject(f"messages[{i}].content: expected a string, got {type(m['content']).__name__}")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    if "output" in rec or "instruction" in rec:
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise Reject(f"Alpaca record: field {key!r} missing or not a string")
        prompt = rec["instruction"].strip()
        extra = rec.get("input")
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra.strip()}"
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]
        if isinstance(rec.get("system"), str) and rec["system"].strip():
            msgs.insert(0, {"role": "system", "content": rec["system"]})
        return msgs
    raise Reject(f"unknown record format (keys: {sorted(rec)[:8]}); expected 'messages' or Alpaca 'instruction'/'output'")


_WS = re.compile(r"[ \t\u00a0]+")
_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CTRL.sub(" ", text)
    lines = [_WS.sub(" ", ln).strip() for ln in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def check_structure(msgs: list[dict[str, str]]) -> None:
    """Optional leading system turn, then user/assistant alternating, ending with the assistant."""
    for i, m in enumerate(msgs):
        if m["role"] not in ROLES:
            raise Reject(f"messages[{i}].role: {m['role']!r} is not one of {', '.join(ROLES)}")
        if not m["content"]:
            raise Reject(f"messages[{i}] ({m['role']}): empty content")
    turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not turns:
        raise Reject("no user/assistant turns after the system message")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            pos = i + (len(msgs) - len(turns))
            raise Reject(f"messages[{pos}].role: expected {want!r} (turns must alternate user/assistant), got {m['role']!r}")
    if turns[-1]["role"] != "assistant":
        raise Reject("last turn is the user's: there is no assistant answer to learn")


def record_id(msgs: list[dict[str, str]]) -> str:
    return hashlib.sha256(dumps(msgs).encode()).hexdigest()[:16]


def in_eval(rid: str, fraction: float) -> bool:
    # A hash of the id alone decides, so the split of a record never depends on the other records.
    return int(hashlib.sha256(f"split:{rid}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def token_lengths(records: list[dict], params: Params) -> list[int]:
    from loraflow.models import chat_token_lengths, load_tokenizer, resolve

    tok = load_tokenizer(resolve(params.base.model, params.base.model_cache), params.base.trust_remote_code)
    return [n for n in chat_token_lengths(tok, [r["messages"] for r in records]) if n is not None]


def _percentiles(xs: list[int]) -> dict[str, float]:
    import numpy as np

    if not xs:
        return {}
    a = np.asarray(xs)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 95, 99)} | {"max": int(a.max()), "mean": float(a.mean())}


def run(params: Params, raw_dir: Path, out_dir: Path, feedback_dir: Path | None = None) -> dict[str, Any]:
    """Curate every file under `raw_dir` (and the served answers' feedback, if given) into `out_dir`.

    Args:
        params: the validated params (reads `base` and `curate`).
        raw_dir: folder of raw files (.jsonl: OpenAI messages or Alpaca lines; .json: an array of them).
        out_dir: gets train.jsonl, eval.jsonl, prefs.jsonl, quarantine.jsonl and stats.json, written whole.
        feedback_dir: data/raw/feedback/<mode>/ as `loraflow serve` writes it (format: loraflow/feedback.py).

    Returns:
        The stats dict also written to stats.json.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    files = sorted(p for p in raw_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CurationError(f"{raw_dir}: no raw files found (expected {', '.join(SUPPORTED)} files)")

    stats: dict[str, SourceStats] = defaultdict(SourceStats)
    seen: dict[str, dict] = {}
    quarantine: list[dict] = []
    for path in files:
        # "<mode>/<file>": stable whatever the working directory, so re-runs are byte-identical.
        rel = Path(raw_dir.name) / path.relative_to(raw_dir)
        src_stats = stats[str(rel)]
        try:
            for idx, raw in iter_raw(path):
                src_stats.read += 1
                source = f"{rel}#{idx}"
                try:
                    if isinstance(raw, Reject):
                        raise raw
                    msgs = [{"role": m["role"], "content": normalise(m["content"])} for m in to_messages(raw)]
                    check_structure(msgs)
                except Reject as e:
                    src_stats.quarantined += 1
                    src_stats.reasons[str(e).split(":")[0]] += 1
                    quarantine.append({"source": source, "reason": str(e), "record": raw.raw if isinstance(raw, Reject) else raw})
                    continue
                rid = record_id(msgs)
                if rid in seen:
                    src_stats.duplicates += 1
                    seen[rid]["meta"]["duplicates"].append(source)
                    continue
                src_stats.curated += 1
                seen[rid] = {"id": rid, "messages": msgs, "source": source, "meta": {"duplicates": []}}
        except (CurationError, UnicodeDecodeError, json.JSONDecodeError) as e:
            # The whole file is unreadable: keep a trace of it in quarantine and go on with the others.
            why = e if isinstance(e, CurationError) else f"{rel}: cannot be read ({e})"
            src_stats.quarantined += 1
            quarantine.append({"source": f"{rel}", "reason": str(why), "record": None})
            log.error("%s", why)

    prefs: dict[str, dict] = {}
    if feedback_dir is not None:
        read_feedback(Path(feedback_dir), params.curate.feedback_min_rating, stats, seen, prefs, quarantine)

    if not seen:
        # Nothing is written (the previous output stays), so the reasons go into the message itself.
        why = "; ".join(f"{q['source']}: {q['reason']}" for q in quarantine[:5])
        raise CurationError(f"{raw_dir}: no record could be curated ({len(quarantine)} rejected): {why}")

    records = list(seen.values())
    train = [r for r in records if not in_eval(r["id"], params.curate.eval_fraction)]
    evals = [r for r in records if in_eval(r["id"], params.curate.eval_fraction)]
    lengths = token_lengths(records, params)

    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "eval.jsonl", evals)
        write_jsonl(tmp / "prefs.jsonl", list(prefs.values()))
        write_jsonl(tmp / "quarantine.jsonl", quarantine)
        summary = {
            "sources": {k: {**{f: getattr(v, f) for f in ("read", "curated", "duplicates", "quarantined")},
                            "reasons": dict(v.reasons)} for k, v in sorted(stats.items())},
            "totals": {f: sum(getattr(v, f) for v in stats.values()) for f in ("read", "curated", "duplicates", "quarantined")},
            "splits": {"train": len(train), "eval": len(evals), "prefs": len(prefs)},
            "token_lengths": _percentiles(lengths),
            "tokenizer": params.base.model,
            "files": {n: sha256_file(tmp / n) for n in ("train.jsonl", "eval.jsonl", "prefs.jsonl", "quarantine.jsonl")},
        }
        write_json(tmp / "stats.json", summary)
    t = summary["totals"]
    log.info("curate: %d read -> %d curated (%d train / %d eval), %d duplicates merged, %d quarantined",
             t["read"], t["curated"], len(train), len(evals), t["duplicates"], t["quarantined"])
    return summary


def read_feedback(folder: Path, min_rating: int, stats: dict[str, SourceStats], seen: dict[str, dict],
                  prefs: dict[str, dict], quarantine: list[dict]) -> None:
    """Fold `loraflow serve`'s feedback events into the curated records (SFT) and preference pairs.

    Same accounting as raw files: each event is curated, merged as a duplicate, or quarantined with a reason.
    """
    from loraflow.feedback import sft_and_pref

    for path in sorted(p for p in folder.rglob("*.jsonl") if not p.name.startswith(".")):
        rel = Path("feedback") / folder.name / path.relative_to(folder)
        src_stats = stats[str(rel)]
        for idx, raw in iter_raw(path):
            src_stats.read += 1
            source = f"{rel}#{idx}"
            try:
                if isinstance(raw, Reject):
                    raise raw
                try:
                    sft, pair = sft_and_pref(raw, min_rating)
                except ValueError as e:
                    raise Reject(str(e)) from None
                fb = {k: raw.get(k) for k in ("response_id", "rating", "adapter_version", "timestamp")}
                if sft is not None:
                    sft = [{"role": m["role"], "content": normalise(m["content"])} for m in sft]
                    check_structure(sft)
                if pair is not None:
                    pair = {k: [{"role": m["role"], "content": normalise(m["content"])} for m in v] for k, v in pair.items()}
                    check_structure(pair["prompt"] + pair["chosen"])
            except Reject as e:
                src_stats.quarantined += 1
                src_stats.reasons[str(e).split(":")[0]] += 1
                quarantine.append({"source": source, "reason": str(e), "record": raw.raw if isinstance(raw, Reject) else raw})
                continue
            new = False
            for rec, store in ((sft, seen), (pair, prefs)):
                if rec is None:
                    continue
                rid = record_id(rec if isinstance(rec, list) else [*rec["prompt"], *rec["chosen"], *rec["rejected"]])
                if rid in store:
                    store[rid]["meta"]["duplicates"].append(source)
                    continue
                new = True
                body = {"messages": rec} if isinstance(rec, list) else rec
                store[rid] = {"id": rid, **body, "source": source, "meta": {"duplicates": [], "feedback": fb}}
            if new:
                src_stats.curated += 1
            else:
                src_stats.duplicates += 1


def main(argv: list[str] | None = None) -> None:
    ap = step_parser(__doc__)
    ap.add_argument("raw_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--feedback", type=Path, default=None,
                    help="data/raw/feedback/<mode>: users' ratings and corrections from `loraflow serve`")
    args = ap.parse_args(argv)
    with step_errors():
        run(load_params(args.params, args.set), args.raw_dir, args.out_dir, args.feedback)


if __name__ == "__main__":
    main()

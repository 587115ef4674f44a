"""Warm start: continue the registry champion's adapter instead of a fresh LoRA, on the records it has not learned
yet plus a seeded replay sample of those it has, so a feedback round costs what its new data costs.

Every adapter records what it has learned from in `trained_ids.json` beside train_info.json: per stage ("sft",
"dpo") the sorted ids of the curated records it trained on, itself or through the adapter it started from (a
warm-started adapter lists the champion's ids plus its own new ones). Curated ids are content hashes of the
normalised record (DESIGN.md), so "new" means a record whose content the champion never saw.

A warm start falls back to a fresh LoRA on everything, with the reason in train_info.json's `started_from`, when:
there is no champion; it has no trained_ids.json (trained before this existed: what it learned is unknown); its
LoRA (rank, alpha, target modules) or base model differs from this run's (continuing it would not be the adapter
these params describe); or nothing is new (training on replay alone would only repeat it).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraflow.config import TrainParams
from loraflow.io import read_json, sha256_file, write_json

TRAINED_IDS = "trained_ids.json"


@dataclass
class Start:
    """Where a run starts and what each stage trains on."""

    kind: str  # "champion" | "base"
    reason: str
    records: dict[str, list[dict]]  # per stage, what it trains on (all records from base; new + replay from a champion)
    learned: dict[str, list[str]]  # per stage, the ids the finished adapter will have learned (trained_ids.json)
    version: str | None = None
    adapter_dir: Path | None = None
    adapter_sha256: str | None = None
    new: dict[str, int] = field(default_factory=dict)
    replayed: dict[str, int] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """train_info.json's `started_from`."""
        return {"kind": self.kind, "version": self.version, "adapter_sha256": self.adapter_sha256,
                "new_records": self.new, "replayed_records": self.replayed, "reason": self.reason}


def ids_of(records: list[dict]) -> list[str]:
    return sorted({r["id"] for r in records})


def write_trained_ids(folder: Path, learned: dict[str, list[str]]) -> None:
    write_json(Path(folder) / TRAINED_IDS, {s: sorted(set(ids)) for s, ids in learned.items()})


def read_trained_ids(folder: Path) -> dict[str, set[str]] | None:
    """The ids an adapter learned from, per stage; None when it did not record them. Raises on a malformed file."""
    path = Path(folder) / TRAINED_IDS
    if not path.exists():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"{path}: expected {{stage: [record id, ...]}}, got {type(data).__name__}")
    return {s: set(v) for s, v in data.items()}


def _lora_of_champion(folder: Path) -> dict[str, Any]:
    """r, alpha from the adapter's own config (what peft will load); target modules and base model from its
    train_info.json (peft saves "all-linear" resolved to module names, so the params say what was asked)."""
    cfg = read_json(folder / "adapter_config.json")
    info = read_json(folder / "train_info.json") if (folder / "train_info.json").exists() else {}
    return {"lora_r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
            "target_modules": (info.get("params") or {}).get("target_modules"), "base_model": info.get("base_model")}


def mismatch(tp: TrainParams, base_model: str, champion_dir: Path) -> str | None:
    """Why the champion's adapter cannot be continued under these params, or None when it can."""
    have = _lora_of_champion(champion_dir)
    want = {"lora_r": tp.lora_r, "lora_alpha": tp.lora_alpha, "target_modules": tp.target_modules,
            "base_model": base_model}
    diff = [f"{k} {have[k]!r} (champion) vs {want[k]!r} (train)" for k in want if have[k] != want[k]]
    return "; ".join(diff) or None


def select(records: list[dict], learned: set[str], fraction: float, seed: int) -> tuple[list[dict], int, int]:
    """The records not in `learned` plus round(fraction * the learned ones) of those, drawn with `seed`; file order
    kept. Returns (chosen, new count, replayed count)."""
    new = [i for i, r in enumerate(records) if r["id"] not in learned]
    old = [i for i, r in enumerate(records) if r["id"] in learned]
    replay = random.Random(seed).sample(old, round(fraction * len(old))) if old else []
    keep = sorted([*new, *replay])
    return [records[i] for i in keep], len(new), len(replay)


def plan(tp: TrainParams, base_model: str, seed: int, records: dict[str, list[dict]], champion: tuple[str | None, Path | None],
         ) -> Start:
    """Where to start, given the champion (version, downloaded folder) or (None, None). Pure apart from reading
    the champion's folder; `resolve` downloads it."""
    learned_here = {s: ids_of(r) for s, r in records.items()}
    version, folder = champion

    def scratch(reason: str) -> Start:
        return Start("base", reason, records, learned_here, version=version,
                     new={s: len(r) for s, r in records.items()}, replayed={s: 0 for s in records})

    if tp.warm_start == "off":
        return scratch("train.warm_start is off: a fresh LoRA on every record")
    if folder is None:
        return scratch("warm start asked, but the registry has no champion for this mode: from scratch")
    try:
        champ_ids = read_trained_ids(folder)
    except ValueError as e:
        return scratch(f"warm start asked, but champion v{version}'s {e}: from scratch")
    if champ_ids is None:
        return scratch(f"warm start asked, but champion v{version} has no {TRAINED_IDS} (trained before adapters "
                       "recorded their records): which records are new is unknown, so from scratch")
    why = mismatch(tp, base_model, folder)
    if why:
        return scratch(f"warm start asked, but champion v{version}'s LoRA does not match this run's ({why}): "
                       "from scratch")
    chosen, new, replayed = {}, {}, {}
    for stage, recs in records.items():
        seen = champ_ids.get(stage, set())
        chosen[stage], new[stage], replayed[stage] = select(recs, seen, tp.replay_fraction, seed)
    if not any(new.values()):
        return scratch(f"warm start asked, but every record is one champion v{version} already trained on: "
                       "from scratch")
    learned = {s: sorted(champ_ids.get(s, set()) | set(learned_here.get(s, []))) for s in {*champ_ids, *records}}
    counts = ", ".join(f"{s}: {new[s]} new + {replayed[s]} replayed of {len(records[s]) - new[s]} seen" for s in records)
    return Start("champion", f"continues champion v{version} ({counts}; replay_fraction {tp.replay_fraction})",
                 chosen, learned, version=version, adapter_dir=folder,
                 adapter_sha256=sha256_file(folder / "adapter_model.safetensors"), new=new, replayed=replayed)


def resolve(params, mode: str, records: dict[str, list[dict]], dest: Path) -> Start:
    """`plan` with the registry's champion downloaded into `dest` (only when train.warm_start asks for it)."""
    from loraflow import tracking

    champion: tuple[str | None, Path | None] = (None, None)
    if params.train.warm_start == "champion":
        champion = tracking.champion_adapter(params, mode, Path(dest))
    return plan(params.train, params.base.model, params.base.seed, records, champion)


def selection_sha256(start: Start, stage: str) -> str:
    """Identity of what a stage trains on and from where: part of its checkpoint key, so a resume never mixes
    a warm-started run with a fresh one, nor two different champions."""
    ident = {"from": start.adapter_sha256 or "base", "ids": ids_of(start.records.get(stage, []))}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

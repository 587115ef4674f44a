"""Exact duplicates by id, near duplicates of conversations by MinHash (loraflow/neardup.py); first seen kept."""

from __future__ import annotations

from loraflow.config import Params
from loraflow.curation.records import Item, Raw


def dedup(params: Params, raws: list[Raw]) -> tuple[list[Item], list[Item]]:
    """Exact duplicates by id, then near duplicates of conversations; the first seen is kept."""
    seen: dict[str, Item] = {}
    kept_sft: list[Item] = []
    kept_prefs: list[Item] = []
    for raw in raws:
        for it in raw.items:  # ids were set by identify_and_size
            if it.id in seen:
                it.outcome, it.twin = "duplicate", seen[it.id]
                continue
            seen[it.id] = it
            it.outcome = "new"
            (kept_sft if it.pref is None else kept_prefs).append(it)
    if params.curate.near_dup and kept_sft:
        from loraflow.neardup import near_duplicates

        # System prompts are left out: a long shared one would make every short exchange look alike.
        texts = ["\n".join(m["content"] for m in it.messages if m["role"] != "system") for it in kept_sft]
        merged = near_duplicates(texts, params.curate.near_dup_threshold)
        for it, hit in zip(kept_sft, merged, strict=True):
            if hit is not None:
                it.outcome, it.twin = "near_duplicate", kept_sft[hit[0]]
        kept_sft = [it for it in kept_sft if it.outcome == "new"]
    return kept_sft, kept_prefs


def twins(raws: list[Raw]) -> dict[int, dict[str, list[str]]]:
    """For each kept item (by id()) that others were merged into, the sources of its exact and near twins."""
    dups: dict[int, dict[str, list[str]]] = {}
    for raw in raws:
        for it in raw.items:
            if it.twin is not None:
                key = "duplicates" if it.outcome == "duplicate" else "near_duplicates"
                kept_twin = it.twin
                while kept_twin.twin is not None:  # an exact copy of a record later merged as a near twin
                    kept_twin, key = kept_twin.twin, "near_duplicates"
                dups.setdefault(id(kept_twin), {"duplicates": [], "near_duplicates": []})[key].append(raw.source)
    return dups

"""Per-source counts of what became of every record read, and their summary (stats.json and the terminal)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from loraflow.config import Params
from loraflow.curation.records import Raw, SourceStats
from loraflow.formats import as_read


def tally(raws: list[Raw], stats: dict[str, SourceStats]) -> list[dict]:
    """Each raw record's outcome into its source's counts; the quarantine file's entries."""
    quarantine = []
    for raw in raws:
        st = stats[raw.file]
        if raw.reject is not None:
            record = raw.reject.raw if raw.reject.raw is not None else as_read(raw.record)
            quarantine.append({"source": raw.source, "category": raw.reject.code, "reason": str(raw.reject),
                               "record": record})
        if raw.generated:  # a teacher's pair: counted apart from the records read
            st.generated["made"] += 1
            st.generated["quarantined" if raw.reject is not None else "curated" if _kept(raw) else "duplicates"] += 1
            continue
        st.read += 1
        if raw.format:
            st.formats[raw.format] += 1
        if raw.reject is not None:
            st.quarantined += 1
            st.reasons[raw.reject.code] += 1
        elif _kept(raw):
            st.curated += 1
        else:
            st.duplicates += 1
            st.near_duplicates += all(it.outcome == "near_duplicate" for it in raw.items)
    return quarantine


def _kept(raw: Raw) -> bool:
    return any(it.outcome == "new" for it in raw.items)


def summary(params: Params, stats: dict[str, SourceStats], splits: dict[str, int],
            token_lengths: dict[str, float]) -> dict[str, Any]:
    """stats.json, but for the hashes of the output files (known once they are written)."""
    fields = ("read", "curated", "duplicates", "quarantined")
    totals = {f: sum(getattr(s, f) for s in stats.values()) for f in fields}
    near = sum(s.near_duplicates for s in stats.values())
    return {
        "sources": {k: v.as_dict() for k, v in sorted(stats.items())},
        "totals": totals,
        "reasons": dict(sorted(sum((s.reasons for s in stats.values()), Counter()).items())),
        "pii": dict(sorted(sum((s.pii for s in stats.values()), Counter()).items())),
        "dedup": {"exact": totals["duplicates"] - near, "near": near,
                  "near_dup": params.curate.near_dup, "near_dup_threshold": params.curate.near_dup_threshold},
        "splits": splits,
        "token_lengths": token_lengths,
        "tokenizer": params.base.model,
    }


def summary_table(stats: dict[str, Any]) -> str:
    """The stats as a table for the terminal: one row per source, then totals, splits and PII."""
    head = ("source", "read", "curated", "dup", "near", "quarant.", "top reasons")
    rows = [(src, s["read"], s["curated"], s["duplicates"], s["near_duplicates"], s["quarantined"],
             ", ".join(f"{k} {n}" for k, n in Counter(s["reasons"]).most_common(3)) or "-")
            for src, s in stats["sources"].items()]
    t = stats["totals"]
    rows.append(("TOTAL", t["read"], t["curated"], t["duplicates"], stats["dedup"]["near"], t["quarantined"],
                 ", ".join(f"{k} {n}" for k, n in Counter(stats["reasons"]).most_common(3)) or "-"))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i in (0, 6) else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in rows[:-1]] + ["  ".join("-" * w for w in widths), fmt.format(*rows[-1])]
    sp, tl = stats["splits"], stats["token_lengths"]
    lines.append(f"splits: {sp['train']} train / {sp['eval']} eval / {sp['prefs']} preference pairs;  "
                 f"tokens p50 {tl.get('p50', '-')} p95 {tl.get('p95', '-')} max {tl.get('max', '-')}")
    lines.append("pii scrubbed: " + (", ".join(f"{k} {n}" for k, n in stats["pii"].items()) or "none"))
    return "\n".join(lines)

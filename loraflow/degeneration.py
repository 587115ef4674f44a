"""Degenerate answers: the failure ROUGE does not see.

A small model trained too little answers "O ACOS é o método de ações, que é o método de ações, que é o
método de ações, ..." until it runs out of tokens; that overlaps the reference well enough to raise ROUGE-L.
Per answer this measures:

- seq_rep_4: the share of its word 4-grams that repeat an earlier 4-gram (seq-rep-n of Welleck et al. 2019,
  "Neural text generation with unlikelihood training"): 0 for ordinary prose, towards 1 for a loop;
- loop: some word 4-gram occurs `LOOP_TIMES` (3) times or more — a phrase said three times is a loop to a reader;
- stopped: the model ended its turn (an end-of-turn token) instead of running into max_new_tokens;
- empty: no word at all.

Words are ROUGE's (loraflow.metrics.words): lower-cased Unicode word characters after NFC, so accents count.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from loraflow.metrics import words

N = 4
LOOP_TIMES = 3


def _ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


def seq_rep(ws: list[str], n: int = N) -> float:
    """1 - distinct n-grams / n-grams; 0.0 when the answer has fewer than n words."""
    grams = _ngrams(ws, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def loops(ws: list[str], n: int = N, times: int = LOOP_TIMES) -> bool:
    counts = Counter(_ngrams(ws, n))
    return bool(counts) and max(counts.values()) >= times


def answer_health(answer: str, stopped: bool) -> dict[str, Any]:
    """The per-answer fields (predictions.jsonl): seq_rep_4, loop, stopped, empty."""
    ws = words(answer)
    return {"seq_rep_4": round(seq_rep(ws), 4), "loop": loops(ws), "stopped": bool(stopped), "empty": not ws}


def health(answers: list[str], stopped: list[bool]) -> list[dict[str, Any]]:
    return [answer_health(a, s) for a, s in zip(answers, stopped, strict=True)]


# per-model rate -> (what it counts, for reports and reasons; True when higher is worse)
RATES = {"stop_rate": ("answers that end their turn", False), "loop_rate": ("answers that loop", True),
         "empty_rate": ("empty answers", True), "seq_rep_4": ("mean share of repeated word 4-grams", True)}


def rate_table(metrics: dict, models: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for reports and model cards: one row per rate, one column per model that has rates,
    "mean [low, high]"; ([], []) when no model has them."""
    present = [m for m in models if (metrics.get(m) or {}).get("degeneration")]
    rows = []
    for rate, (what, _) in RATES.items():
        cells = []
        for m in present:
            s = metrics[m]["degeneration"].get(rate)
            pct = rate != "seq_rep_4"
            f = "{:.0%}" if pct else "{:.3f}"
            cells.append(f"{f.format(s['mean'])} [{f.format(s['ci_low'])}, {f.format(s['ci_high'])}]" if s else "—")
        rows.append([f"{rate} ({what})", *cells])
    return (["rate", *present], rows) if present else ([], [])


def per_example(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-example values whose means are the model's rates (so they bootstrap like any metric)."""
    return {"stop_rate": [float(r["stopped"]) for r in rows], "loop_rate": [float(r["loop"]) for r in rows],
            "empty_rate": [float(r["empty"]) for r in rows], "seq_rep_4": [float(r["seq_rep_4"]) for r in rows]}

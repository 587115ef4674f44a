"""evaluate's offline views of metrics.json: a comparison chart (PNG) and a self-contained HTML report.

Both are pure functions of metrics.json. DVC's own `dvc plots show` page loads Vega from a CDN and shows
nothing offline; a PNG (declared under the stage's `plots`) renders anywhere, and the HTML embeds it.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from loraflow import degeneration
from loraflow.evaluation import MODELS

METRIC_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bertscore": "BERTScore"}
COLORS = {"base": "#9e9e9e", "champion": "#1f77b4", "candidate": "#ff7f0e"}


def _delta_rows(metrics: dict, metric: str) -> list[tuple[str, dict]]:
    rows = []
    for key, d in metrics["deltas"].items():
        if d:
            rows.append((f"eval: {key.replace('_', ' ')}", d[metric]))
    for path, g in (metrics.get("forgetting") or {}).get("sets", {}).items():
        for key, d in g["deltas"].items():
            if d:
                rows.append((f"{Path(path).stem}: {key.replace('_', ' ')}", d[metric]))
    return rows


def comparison_png(metrics: dict) -> bytes:
    """Left: each model's mean per metric with its bootstrap interval. Right: the candidate's paired
    deltas (report metric) on the eval set and on every guard set, with intervals and the zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metrics["scoring"]["report_metric"]
    models = [m for m in MODELS if metrics.get(m)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.2, 1]})
    width = 0.8 / len(models)
    for j, name in enumerate(models):
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(METRIC_LABELS))]
        s = [metrics[name][m] for m in METRIC_LABELS]
        means = [x["mean"] for x in s]
        err = [[x["mean"] - x["ci_low"] for x in s], [x["ci_high"] - x["mean"] for x in s]]
        label = f"champion v{metrics['champion_version']}" if name == "champion" else name
        ax1.bar(xs, means, width, yerr=err, capsize=3, color=COLORS[name], label=label)
    ax1.set_xticks(range(len(METRIC_LABELS)), list(METRIC_LABELS.values()))
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("F1 (mean, bootstrap CI)")
    ax1.set_title(f"eval set: {metrics['eval_set']['size']} examples, sha256 {metrics['eval_set']['sha256'][:10]}")
    ax1.legend(loc="upper left", fontsize=8)

    rows = _delta_rows(metrics, metric)
    ys = list(range(len(rows)))[::-1]
    for y, (_, d) in zip(ys, rows, strict=True):
        color = "#2ca02c" if d["ci_low"] > 0 else "#d62728" if d["ci_high"] < 0 else "#555555"
        ax2.errorbar(d["mean"], y, xerr=[[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]], fmt="o",
                     color=color, capsize=4)
    ax2.axvline(0, color="black", lw=0.8)
    ax2.set_yticks(ys, [r[0] for r in rows], fontsize=8)
    ax2.set_xlabel(f"candidate minus reference, {METRIC_LABELS[metric]} (paired bootstrap CI)")
    ax2.set_title("deltas (green: CI above 0, red: below 0)")
    if metrics.get("note"):
        fig.text(0.5, 0.005, metrics["note"], ha="center", fontsize=8, style="italic")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    buf = io.BytesIO()
    # No metadata: the same numbers give the same bytes, so DVC sees no change when nothing changed.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _ci(s: dict | None, signed: bool = False) -> str:
    if not s:
        return "—"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(s['mean'])} [{f.format(s['ci_low'])}, {f.format(s['ci_high'])}]"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _scores_table(block: dict) -> str:
    models = [m for m in MODELS if block.get(m)]
    rows = [[METRIC_LABELS[m], *(_ci(block[n][m]) for n in models),
             *(_ci(d[m], True) for d in block["deltas"].values() if d)] for m in METRIC_LABELS]
    deltas = [k.replace("_", " ") for k, d in block["deltas"].items() if d]
    return _table(["metric", *models, *deltas], rows)


def _regressions(worst: dict, metric: str) -> str:
    parts = []
    for key, items in worst.items():
        if items is None:
            continue
        ref = key.removeprefix("candidate_vs_")
        if not items:
            parts.append(f"<p>{html.escape(key.replace('_', ' '))}: no example got worse.</p>")
            continue
        rows = [[it["question"], it["reference"], it["candidate_answer"], it[f"{ref}_answer"],
                 f"{it['delta']:+.3f}"] for it in items]
        parts.append(f"<h4>{html.escape(key.replace('_', ' '))} ({METRIC_LABELS[metric]})</h4>"
                     + _table(["question", "reference", "candidate", ref, "delta"], rows))
    return "".join(parts)


def _degeneration(block: dict) -> list[str]:
    head, rows = degeneration.rate_table(block, MODELS)
    if not rows:
        return []
    return ["<h4>Degenerate answers (a loop: some word 4-gram said 3+ times)</h4>", _table(head, rows)]


def report_html(metrics: dict, png: bytes) -> str:
    metric = metrics["scoring"]["report_metric"]
    g = metrics["generation"]
    champ = (f"champion v{metrics['champion_version']}" if metrics.get("champion_version")
             else "no champion")
    length_rows = [[n, f"{metrics[n]['length']['words_mean']:.1f}", f"{metrics[n]['length']['words_p90']:.0f}",
                    f"{metrics[n]['length']['new_tokens_mean']:.1f}",
                    f"{metrics[n]['length']['stopped_at_end_of_turn']:.0%}"]
                   for n in MODELS if metrics.get(n)]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>loraflow evaluation: {html.escape(metrics['mode'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;font-size:14px}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;"
        "vertical-align:top;text-align:left}th{background:#f3f3f3}.note{background:#fff4d6;padding:.6em}</style>",
        "</head><body>",
        f"<h1>Evaluation of mode {html.escape(metrics['mode'])}: base vs {html.escape(champ)} vs candidate</h1>",
    ]
    if metrics.get("note"):
        parts.append(f"<p class='note'>{html.escape(metrics['note'])}</p>")
    es = metrics["eval_set"]
    parts += [
        f"<p>Eval set <code>{html.escape(es['path'])}</code>: {es['size']} of {es['total_records']} records, "
        f"sha256 <code>{es['sha256'][:16]}</code>. Greedy decoding, at most {g['max_new_tokens']} new tokens, "
        f"batch {g['batch_size']}, stop tokens {html.escape(', '.join(g['stop_tokens']))}; every model got the same "
        f"prompts (sha256 <code>{g['prompts_sha256'][:16]}</code>). Intervals: "
        f"{int(metrics['scoring']['confidence'] * 100)}% paired bootstrap.</p>",
        f"<img alt='comparison chart' src='data:image/png;base64,{base64.b64encode(png).decode()}' style='max-width:100%'>",
        "<h2>Scores</h2>", _scores_table(metrics),
        "<h2>Answer lengths</h2>",
        _table(["model", "words mean", "words p90", "new tokens mean", "ended at end-of-turn"], length_rows),
        *_degeneration(metrics),
    ]
    j = metrics.get("judge")
    if j:
        rows = [[k.replace("_", " "), v["wins"], v["ties"], v["losses"], _ci(v["win_rate"])]
                for k, v in j.items() if k.startswith("candidate_vs_") and v]
        parts += [f"<h2>Pairwise judge: {html.escape(j['model'])}</h2>",
                  _table(["comparison", "wins", "ties", "losses", "win rate (ties count half)"], rows)]
    f = metrics.get("forgetting") or {}
    if f.get("sets"):
        parts.append("<h2>Forgetting guard</h2>")
        for path, block in f["sets"].items():
            parts += [f"<h3><code>{html.escape(path)}</code> ({block['eval_set']['size']} examples)</h3>",
                      _scores_table(block), *_degeneration(block), _regressions(block["worst_regressions"], metric)]
    parts += ["<h2>Worst regressions on the eval set</h2>", _regressions(metrics["worst_regressions"], metric),
              "</body></html>\n"]
    return "\n".join(parts)

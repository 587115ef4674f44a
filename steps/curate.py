"""curate: raw files in the formats users bring -> chat-format train/eval JSONL and preference pairs.

    python -m steps.curate data/raw/retail_media data/curated/retail_media

Reads every file under the raw folder (never modifies it), each with the reader its `curate.sources` spec
names or the one its extension and keys make unambiguous (loraflow/formats.py). Every record read ends up
curated, merged as an exact or near duplicate (counted, its source kept in the survivor's meta), or
quarantined with a reason. Texts are normalised (NFC, mojibake, control characters, whitespace, HTML where
asked) and scrubbed of PII. The split is by a hash of the record's id, so adding records never moves an
existing one between train and eval; near-duplicates are merged across splits, so no eval conversation has a
near twin in train. The logic lives in loraflow/curation/.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from loraflow.config import Params, load_params
from loraflow.curation.curate import Sources, curate
from loraflow.curation.stats import summary_table
from loraflow.errors import CurationError
from loraflow.io import atomic_dir, sha256_file, write_json, write_jsonl, write_text
from loraflow.stepcli import mode_lock, step_errors, step_parser

__all__ = ["OUTPUTS", "main", "run", "summary_table"]

log = logging.getLogger(__name__)

OUTPUTS = ("train.jsonl", "eval.jsonl", "prefs.jsonl", "quarantine.jsonl")


def run(params: Params, raw_dir: Path, out_dir: Path, feedback_dir: Path | None = None) -> dict[str, Any]:
    """Curate every file under `raw_dir` (and users' feedback on served answers, if given) into `out_dir`.

    Args:
        params: the validated params (reads `base` and `curate`).
        raw_dir: folder of raw files in any supported format (see loraflow/formats.py and curate.sources).
        out_dir: gets train.jsonl, eval.jsonl, prefs.jsonl, quarantine.jsonl and stats.json, written whole.
        feedback_dir: data/raw/feedback/<mode>/ as `loraflow serve` appends it (format: loraflow/feedback.py);
            its events become SFT records and preference pairs like any other source.

    Returns:
        The stats dict also written to stats.json.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    files = sorted(p for p in raw_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    fb_dir = Path(feedback_dir) if feedback_dir is not None else None
    fb_files = sorted(p for p in fb_dir.rglob("*.jsonl") if not p.name.startswith(".")) if fb_dir and fb_dir.is_dir() else []
    if not files and not fb_files:
        raise CurationError(f"{raw_dir}: no raw files found")
    sources = [Sources(raw_dir, files)]
    if fb_files:
        sources.append(Sources(fb_dir, fb_files, label=f"feedback/{fb_dir.name}", force="feedback"))
    # The working directory is the project root (dvc repro, the flow): curate.teacher's cache lies under it.
    out = curate(params, sources, root=Path.cwd())

    with atomic_dir(out_dir) as tmp:
        for name, lines in (("train.jsonl", out.train), ("eval.jsonl", out.eval)):
            write_text(tmp / name, "\n".join(lines) + "\n" if lines else "")
        write_jsonl(tmp / "prefs.jsonl", out.prefs)
        write_jsonl(tmp / "quarantine.jsonl", out.quarantine)
        stats = {**out.stats, "files": {n: sha256_file(tmp / n) for n in OUTPUTS}}
        write_json(tmp / "stats.json", stats)
    t = stats["totals"]
    log.info("curate: %d read -> %d curated (%d train / %d eval / %d prefs), %d duplicates merged, %d quarantined",
             t["read"], t["curated"], len(out.train), len(out.eval), len(out.prefs), t["duplicates"], t["quarantined"])
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = step_parser(__doc__)
    ap.add_argument("raw_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--feedback", type=Path, default=None,
                    help="data/raw/feedback/<mode>: users' ratings and corrections from `loraflow serve`")
    args = ap.parse_args(argv)
    with step_errors(), mode_lock(args.out_dir.name):  # data/curated/<mode>
        stats = run(load_params(args.params, args.set), args.raw_dir, args.out_dir, args.feedback)
        print(summary_table(stats))


if __name__ == "__main__":
    main()

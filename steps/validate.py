"""validate: the Great Expectations gate between curation and training.

    python -m steps.validate data/curated/retail_media data/validation/retail_media data/profiles/retail_media.json

Runs the checks of `loraflow.validation` (Great Expectations suites built from params over per-record facts:
structure, token length and the chat template, train/eval overlap, PII residue, preference pairs, drift
against the profile of the last dataset that passed). Writes report.json and a self-contained report.html either
way; on a failed `fail` expectation exits non-zero naming it and the failing records (id and source
file#index), so nothing downstream runs. On a pass it rewrites the profile (git-tracked, not a DVC cache
output, so it survives the stage re-running).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from loraflow import generation, validation
from loraflow.config import Params, load_params
from loraflow.errors import ValidationFailed
from loraflow.io import atomic_dir, read_json, read_jsonl, sha256_file, write_json, write_text
from loraflow.models import load_tokenizer, resolve
from loraflow.stepcli import mode_lock, step_errors, step_parser
from loraflow.validation import SPLITS

log = logging.getLogger(__name__)


def run(params: Params, curated_dir: Path, out_dir: Path, profile_file: Path | None = None) -> dict[str, Any]:
    """Validate the curated train/eval/prefs files of one mode.

    Args:
        params: reads `base` (model for the chat template, max_seq_len) and `validate`.
        curated_dir: the folder curate wrote (train.jsonl, eval.jsonl, prefs.jsonl; prefs may be absent).
        out_dir: gets report.json and report.html, written whole, pass or fail.
        profile_file: the last passed dataset's profile: drift is checked against it when it exists, and it
            is rewritten when this dataset passes. None: no drift check.

    Returns:
        The report. Raises ValidationFailed (after writing the report) if a `fail` expectation failed.
    """
    curated_dir, out_dir = Path(curated_dir), Path(out_dir)
    model_dir = resolve(params.base.model, params.base.model_cache)
    tok = load_tokenizer(model_dir, params.base.trust_remote_code)
    eot = generation.end_of_turn_ids(tok, model_dir)
    data = {s: read_jsonl(curated_dir / f"{s}.jsonl") if (curated_dir / f"{s}.jsonl").exists() else [] for s in SPLITS}
    last = read_json(profile_file) if profile_file and Path(profile_file).exists() else None

    report, now = validation.validate(params, data, tok, eot, last, str(profile_file))
    report["files"] = {f"{s}.jsonl": sha256_file(curated_dir / f"{s}.jsonl") for s in SPLITS
                       if (curated_dir / f"{s}.jsonl").exists()}

    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "report.json", report)
        write_text(tmp / "report.html", validation.report_html(report))

    for line in validation.failure_lines(report, "warn"):
        log.warning("validate: warning:%s", line)
    if not report["success"]:
        raise ValidationFailed(f"{curated_dir}: validation failed; report in {out_dir / 'report.html'}\n"
                               + "\n".join(validation.failure_lines(report, "fail")))
    if profile_file is not None:
        write_json(Path(profile_file), now)
    passed = sum(e["success"] for exps in report["splits"].values() for e in exps)
    log.info("validate: %d expectations passed (%d warnings) on %d train / %d eval / %d prefs records",
             passed, report["warnings"], *(len(data[s]) for s in SPLITS))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = step_parser(__doc__)
    ap.add_argument("curated_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("profile_file", type=Path, help="profile of the last passed dataset (read, rewritten on a pass)")
    args = ap.parse_args(argv)
    with step_errors(), mode_lock(args.out_dir.name):  # data/validation/<mode>
        run(load_params(args.params, args.set), args.curated_dir, args.out_dir, args.profile_file)


if __name__ == "__main__":
    main()

"""validate: the Great Expectations gate between curation and training.

    python -m steps.validate data/curated/retail_media data/validation/retail_media

Builds one suite per split in code, runs it on a table of per-record facts (roles, alternation, token
length under the base model's chat template, ...). Writes report.json and a self-contained report.html
either way; on any failed expectation exits non-zero naming the expectation and the failing records
(id and source file#index), so nothing downstream runs.
"""

from __future__ import annotations

import hashlib
import html
import logging
from pathlib import Path
from typing import Any

from loraflow.config import Params, load_params
from loraflow.errors import ValidationFailed
from loraflow.io import atomic_dir, read_jsonl, sha256_file, write_json, write_text
from loraflow.models import chat_token_lengths
from loraflow.stepcli import step_errors, step_parser

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant"}


def record_facts(records: list[dict], tokenizer, split: str, train_ids: set[str]) -> list[dict[str, Any]]:
    """One row of checkable facts per curated record."""
    rows = []
    for r in records:
        msgs = r.get("messages") or []
        roles = [m.get("role") for m in msgs]
        turns = roles[1:] if roles[:1] == ["system"] else roles
        alternates = bool(turns) and all(role == ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(turns))
        rows.append({
            "id": r.get("id"),
            "source": r.get("source"),
            "split": split,
            "roles_known": all(role in ROLES for role in roles),
            "alternates": alternates,
            "last_role": roles[-1] if roles else None,
            "empty_turns": sum(1 for m in msgs if not str(m.get("content") or "").strip()),
            "in_train": split != "train" and r.get("id") in train_ids,
        })
    for row, n in zip(rows, chat_token_lengths(tokenizer, [r.get("messages") or [] for r in records]), strict=True):
        row["n_tokens"] = n if n is not None else 10**9  # a record the template cannot render never fits
    return rows


def build_suite(gx, name: str, split: str, params: Params):
    """The expectations for one split. Fresh objects each time: GX forbids sharing one between suites."""
    E = gx.expectations
    v = params.validate_
    exps = [
        E.ExpectColumnValuesToBeUnique(column="id", meta={"why": "ids are content hashes: a repeat means a duplicate record"}),
        E.ExpectColumnValuesToBeInSet(column="roles_known", value_set=[True],
                                      meta={"why": "every role is system, user or assistant"}),
        E.ExpectColumnValuesToBeInSet(column="alternates", value_set=[True],
                                      meta={"why": "after an optional system turn, user and assistant alternate"}),
        E.ExpectColumnValuesToBeInSet(column="last_role", value_set=["assistant"],
                                      meta={"why": "the last turn is the assistant's (the answer to learn)"}),
        E.ExpectColumnValuesToBeBetween(column="empty_turns", min_value=0, max_value=0,
                                        meta={"why": "no message has empty content"}),
        E.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1, max_value=params.base.max_seq_len,
                                        meta={"why": f"fits base.max_seq_len={params.base.max_seq_len} tokens under the chat template"}),
        E.ExpectTableRowCountToBeBetween(min_value=v.min_train if split == "train" else v.min_eval,
                                         meta={"why": f"at least validate.min_{split} records"}),
    ]
    if split == "eval":
        exps.append(E.ExpectColumnValuesToBeInSet(column="in_train", value_set=[False],
                                                  meta={"why": "no eval record also appears in train (leakage)"}))
    suite = gx.ExpectationSuite(name=name)
    for e in exps:
        suite.add_expectation(e)
    return suite


def _describe(res, rows: list[dict]) -> dict[str, Any]:
    cfg = res.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    failing = [{"id": rows[i]["id"], "source": rows[i]["source"]} for i in (res.result.get("unexpected_index_list") or [])]
    return {
        "expectation": cfg.type,
        "kwargs": kwargs,
        "why": (cfg.meta or {}).get("why"),
        "success": bool(res.success),
        "observed": res.result.get("observed_value"),
        "unexpected_count": res.result.get("unexpected_count"),
        "failing_records": failing,
    }


def _html(report: dict) -> str:
    """A report that renders offline (GX Data Docs pull CSS/JS from a CDN)."""
    rows = []
    for split, exps in report["splits"].items():
        for e in exps:
            recs = "<br>".join(html.escape(f"{r['id']} ({r['source']})") for r in e["failing_records"][:50])
            rows.append(f"<tr class={'ok' if e['success'] else 'bad'}><td>{split}</td><td>{html.escape(e['expectation'])}</td>"
                        f"<td>{html.escape(str(e['kwargs']))}</td><td>{html.escape(str(e['why']))}</td>"
                        f"<td>{'pass' if e['success'] else 'FAIL'}</td><td>{recs}</td></tr>")
    status = "PASSED" if report["success"] else "FAILED"
    return f"""<!doctype html><meta charset=utf-8><title>loraflow validation: {status}</title>
<style>body{{font:14px sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse}}.bad{{background:#fdd}}.ok{{background:#efe}}</style>
<h1>Validation {status}</h1><p>chat template sha256: <code>{report['chat_template_sha256']}</code></p>
<table><tr><th>split</th><th>expectation</th><th>arguments</th><th>why</th><th>result</th><th>failing records</th></tr>
{''.join(rows)}</table>"""


def run(params: Params, curated_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Validate the curated train/eval files of one mode.

    Args:
        params: reads `base` (model for the chat template, max_seq_len) and `validate`.
        curated_dir: the folder curate wrote (train.jsonl, eval.jsonl).
        out_dir: gets report.json and report.html, written whole, pass or fail.

    Returns:
        The report. Raises ValidationFailed (after writing the report) if any expectation failed.
    """
    import great_expectations as gx
    import pandas as pd

    from loraflow.models import load_tokenizer, resolve

    curated_dir, out_dir = Path(curated_dir), Path(out_dir)
    tok = load_tokenizer(resolve(params.base.model, params.base.model_cache), params.base.trust_remote_code)
    splits = {s: read_jsonl(curated_dir / f"{s}.jsonl") for s in ("train", "eval")}
    train_ids = {r.get("id") for r in splits["train"]}

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    source = ctx.data_sources.add_pandas("loraflow")
    report: dict[str, Any] = {"splits": {}, "files": {}, "success": True,
                              "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest()}
    for split, records in splits.items():
        rows = record_facts(records, tok, split, train_ids)
        columns = ["id", "source", "split", "roles_known", "alternates", "last_role", "empty_turns", "in_train", "n_tokens"]
        df = pd.DataFrame(rows, columns=columns)
        batch = source.add_dataframe_asset(split).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(build_suite(gx, f"loraflow-{split}", split, params))
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=f"loraflow-{split}"))
        result = vd.run(batch_parameters={"dataframe": df}, result_format="COMPLETE")
        report["splits"][split] = [_describe(r, rows) for r in result.results]
        report["files"][f"{split}.jsonl"] = sha256_file(curated_dir / f"{split}.jsonl")
        report["success"] &= bool(result.success)

    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "report.json", report)
        write_text(tmp / "report.html", _html(report))

    if not report["success"]:
        lines = []
        for split, exps in report["splits"].items():
            for e in (e for e in exps if not e["success"]):
                recs = ", ".join(f"{r['id']} ({r['source']})" for r in e["failing_records"][:10])
                more = f" and {len(e['failing_records']) - 10} more" if len(e["failing_records"]) > 10 else ""
                what = f"records: {recs}{more}" if recs else f"observed {e['observed']}"
                lines.append(f"  [{split}] {e['expectation']} {e['kwargs']} ({e['why']}) failed; {what}")
        raise ValidationFailed(f"{curated_dir}: validation failed; report in {out_dir / 'report.html'}\n" + "\n".join(lines))
    n = sum(len(e) for e in report["splits"].values())
    log.info("validate: %d expectations passed on %d train / %d eval records", n, len(splits["train"]), len(splits["eval"]))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = step_parser(__doc__)
    ap.add_argument("curated_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args(argv)
    with step_errors():
        run(load_params(args.params, args.set), args.curated_dir, args.out_dir)


if __name__ == "__main__":
    main()

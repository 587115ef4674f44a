"""The Great Expectations gate between curation and training: per-record facts, the suites, the report.

Builds one suite per file (train, eval, prefs) plus a drift suite in code from params, each expectation at
the severity `validate.checks` gives it (fail / warn / off), and runs them on tables of per-record facts:
structure, token length and the chat template (renders, assistant spans locatable, turns closed by an
end-of-turn token), exact and near train/eval overlap, PII residue (two detectors), preference pairs, and drift against
the profile of the last dataset that passed. The report names each failing record (id and source
file#index); `report_html` renders it offline.
"""

from __future__ import annotations

import html
import logging
from collections import Counter
from typing import Any

from loraflow import checks, models, neardup, pii
from loraflow.config import Params

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "eval", "prefs")


def _roles_facts(msgs: list) -> dict[str, Any]:
    roles = [m.get("role") if isinstance(m, dict) else None for m in msgs]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    return {
        "roles_known": bool(roles) and all(r in ROLES for r in roles),
        "alternates": bool(turns) and all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(turns)),
        "last_role": str(roles[-1]) if roles else "",  # never null: GX map expectations skip nulls
        "roles": ",".join(str(r) for r in roles),
    }


def _pii(texts: list[str]) -> tuple[int, str]:
    # The scrubber's own patterns find only what curation had turned off; the second detector (pii.residue)
    # is the one that can catch what the scrubber missed. Per kind, the larger count of the two.
    found = sum((pii.find(t) | pii.residue(t) for t in texts), start=Counter())
    return sum(found.values()), ", ".join(f"{k} x{n}" for k, n in sorted(found.items()))


def chat_facts(records: list[dict], tmpl: list[dict]) -> list[dict[str, Any]]:
    """One row of checkable facts per curated chat record; `_detail` says what is wrong, per check."""
    rows = []
    for r, t in zip(records, tmpl, strict=True):
        msgs = r.get("messages") if isinstance(r.get("messages"), list) else []
        roles = _roles_facts(msgs)
        n_pii, kinds = _pii([str(m.get("content") or "") for m in msgs if isinstance(m, dict)])
        rows.append({
            "id": r.get("id"), "source": r.get("source"), **roles,
            "empty_turns": sum(1 for m in msgs if not isinstance(m, dict) or not str(m.get("content") or "").strip()),
            "pii_found": n_pii,
            # Unrenderable records are reported once, by template_renders; the other template facts skip them.
            "renders": t["renders"], "n_tokens": t["n_tokens"],
            "spans_located": t["spans_located"] if t["renders"] else None,
            "ends_with_eot": t["ends_with_eot"] if t["renders"] else None,
            "_detail": {"known_roles": roles["roles"], "alternation": roles["roles"],
                        "last_assistant": f"last role {roles['last_role'] or 'none'}",
                        "no_empty_turns": "an empty message", "pii_residue": kinds,
                        "max_tokens": f"{t['n_tokens']} tokens", **t["detail"]},
        })
    return rows


def prefs_problem(r: dict) -> str:
    prompt = r.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        return "prompt: expected a non-empty list of messages"
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str) or not m["content"].strip():
            return f"prompt[{i}]: expected {{role: system|user|assistant, content: non-empty string}}"
    facts = _roles_facts(prompt + [{"role": "assistant"}])
    if not facts["alternates"]:
        return f"prompt roles {facts['roles'][:-len(',assistant')]}: must alternate user/assistant and end with the user's"
    for key in ("chosen", "rejected"):
        v = r.get(key)
        if not isinstance(v, list) or not v or any(
                not isinstance(m, dict) or m.get("role") != "assistant" or not str(m.get("content") or "").strip() for m in v):
            return f"{key}: expected a non-empty list of assistant messages with content"
    return ""


def prefs_facts(records: list[dict], tmpl_chosen: dict[int, dict], tmpl_rejected: dict[int, dict]) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(records):
        problem = prefs_problem(r)
        texts = [checks.conversation_text(r.get(k) or []) for k in ("prompt", "chosen", "rejected") if isinstance(r.get(k), list)]
        n_pii, kinds = _pii(texts)
        tc, tr = tmpl_chosen.get(i), tmpl_rejected.get(i)
        renders = None if problem else tc["renders"] and tr["renders"]
        n = None if problem or not renders else max(tc["n_tokens"], tr["n_tokens"])
        rows.append({
            "id": r.get("id"), "source": r.get("source"),
            "structure_ok": not problem,
            "differs": None if problem else checks.exact_key(r["chosen"]) != checks.exact_key(r["rejected"]),
            "pii_found": n_pii, "renders": renders, "n_tokens": n,
            "_detail": {"prefs_structure": problem, "prefs_differ": "chosen == rejected", "pii_residue": kinds,
                        "max_tokens": f"{n} tokens",
                        "template_renders": (tc or {}).get("detail", {}).get("template_renders")
                        or (tr or {}).get("detail", {}).get("template_renders")},
        })
    return rows


def overlap_facts(eval_rows: list[dict], evals: list[dict], train_side: list[dict], threshold: float) -> None:
    """Mark each eval row that repeats (exactly, or nearly) a train or preference record."""
    keys: dict[str, dict] = {}
    for r in train_side:
        keys.setdefault(checks.exact_key(r["messages"]), r)
        keys.setdefault(f"id:{r.get('id')}", r)
    texts = [checks.conversation_text(r["messages"]) for r in train_side]
    near = neardup.near_matches(texts, [checks.conversation_text(r.get("messages") or []) for r in evals], threshold)
    for row, r, nm in zip(eval_rows, evals, near, strict=True):
        same = keys.get(checks.exact_key(r.get("messages") or [])) or keys.get(f"id:{r.get('id')}")
        row["exact_overlap"] = same is not None
        row["near_overlap"] = same is None and nm is not None
        if same is not None:
            row["_detail"]["exact_overlap"] = f"same as {same.get('id')} ({same.get('source')})"
        if nm is not None:
            t = train_side[nm[0]]
            row["_detail"]["near_overlap"] = f"~{nm[1]:.2f} Jaccard with {t.get('id')} ({t.get('source')})"


def _expectations(E, params: Params, split: str, baseline: dict | None):
    """(check name, expectation, why) for one table; the checks' severities come from params."""
    v, max_len = params.validate_, params.base.max_seq_len
    if split == "drift":
        lo, hi = v.drift_count_ratio
        n0 = sum(baseline["records"].get(s, 0) for s in ("train", "eval"))
        yield "drift_count", E.ExpectColumnMaxToBeBetween(column="count_ratio", min_value=lo, max_value=hi), \
            f"train+eval records / {n0} at the last pass within [{lo}, {hi}]"
        yield "drift_tokens", E.ExpectColumnMaxToBeBetween(column="ks_n_tokens", max_value=v.drift_max_ks), \
            f"KS statistic of token lengths vs the last pass <= {v.drift_max_ks}"
        yield "drift_sources", E.ExpectColumnValuesToBeInSet(column="change", value_set=["kept"]), \
            "the same source files as at the last pass (none added, none gone)"
        return
    yield "unique_ids", E.ExpectColumnValuesToBeUnique(column="id"), "ids are content hashes: a repeat is a duplicate record"
    if split == "prefs":
        yield "prefs_structure", E.ExpectColumnValuesToBeInSet(column="structure_ok", value_set=[True]), \
            "prompt = alternating messages ending with the user's; chosen/rejected = assistant messages"
        yield "prefs_differ", E.ExpectColumnValuesToBeInSet(column="differs", value_set=[True]), \
            "chosen differs from rejected (an identical pair teaches nothing)"
    else:
        yield "known_roles", E.ExpectColumnValuesToBeInSet(column="roles_known", value_set=[True]), \
            "every role is system, user or assistant"
        yield "alternation", E.ExpectColumnValuesToBeInSet(column="alternates", value_set=[True]), \
            "after an optional system turn, user and assistant alternate"
        yield "last_assistant", E.ExpectColumnValuesToBeInSet(column="last_role", value_set=["assistant"]), \
            "the last turn is the assistant's (the answer to learn)"
        yield "no_empty_turns", E.ExpectColumnValuesToBeBetween(column="empty_turns", min_value=0, max_value=0), \
            "no message has empty content"
        yield "assistant_spans", E.ExpectColumnValuesToBeInSet(column="spans_located", value_set=[True]), \
            "each assistant turn is a locatable token span in the rendered chat (assistant-only loss masks it)"
        yield "turns_end_with_eos", E.ExpectColumnValuesToBeInSet(column="ends_with_eot", value_set=[True]), \
            "the template closes each assistant turn with the EOS / end-of-turn token (else generation never stops)"
    yield "template_renders", E.ExpectColumnValuesToBeInSet(column="renders", value_set=[True]), \
        "the base model's chat template renders the record"
    yield "max_tokens", E.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1, max_value=max_len), \
        f"fits base.max_seq_len={max_len} tokens under the chat template (longer is silently truncated)"
    yield "pii_residue", E.ExpectColumnValuesToBeBetween(column="pii_found", min_value=0, max_value=0), \
        "neither the scrubber's PII patterns nor a second, broader detector (pii.residue) finds any left"
    minimum = {"train": v.min_train, "eval": v.min_eval, "prefs": v.min_prefs}[split]
    yield "min_size", E.ExpectTableRowCountToBeBetween(min_value=minimum), f"at least validate.min_{split}={minimum} records"
    if split == "eval":
        yield "exact_overlap", E.ExpectColumnValuesToBeInSet(column="exact_overlap", value_set=[False]), \
            "no eval conversation also appears in train or prefs (leakage)"
        yield "near_overlap", E.ExpectColumnValuesToBeInSet(column="near_overlap", value_set=[False]), \
            f"no eval conversation is a near copy of a train/prefs one (Jaccard >= {v.near_dup_threshold})"


def build_suite(gx, name: str, split: str, params: Params, baseline: dict | None = None):
    """The suite for one table; `off` checks are left out. Fresh objects each time: GX forbids sharing."""
    severity = params.validate_.checks.model_dump()
    suite = gx.ExpectationSuite(name=name)
    for check, exp, why in _expectations(gx.expectations, params, split, baseline):
        if severity[check] == "off":
            continue
        exp.severity = "critical" if severity[check] == "fail" else "warning"
        exp.meta = {"check": check, "why": why}
        suite.add_expectation(exp)
    return suite


def drift_facts(now: dict, last: dict) -> list[dict[str, Any]]:
    """One row per source file seen now or at the last pass; the table-wide statistics repeat on each row."""
    total = lambda p: sum(p["records"].get(s, 0) for s in ("train", "eval"))  # noqa: E731
    ratio = total(now) / max(total(last), 1)
    ks = checks.ks_binned(now["n_tokens"]["hist"], last["n_tokens"]["hist"])
    rows = []
    for f in sorted(set(now["sources"]) | set(last["sources"])):
        a, b = last["sources"].get(f, 0), now["sources"].get(f, 0)
        change = "kept" if a and b else "added" if b else "gone"
        rows.append({"id": f, "source": f"{a} -> {b} records", "change": change, "count_ratio": ratio,
                     "ks_n_tokens": ks, "_detail": {"drift_sources": f"{change} since the last pass"}})
    return rows


def _describe(res, rows: list[dict]) -> dict[str, Any]:
    cfg = res.expectation_config
    check = cfg.meta["check"]
    failing = [{"id": rows[i]["id"], "source": rows[i]["source"], "detail": rows[i]["_detail"].get(check) or ""}
               for i in (res.result.get("unexpected_index_list") or [])]
    return {
        "check": check,
        "severity": "fail" if str(getattr(cfg.severity, "value", cfg.severity)) == "critical" else "warn",
        "expectation": cfg.type,
        "kwargs": {k: v for k, v in cfg.kwargs.items() if k != "batch_id"},
        "why": cfg.meta.get("why"),
        "success": bool(res.success),
        "observed": res.result.get("observed_value"),
        "unexpected_count": res.result.get("unexpected_count"),
        "failing_records": failing,
    }


def failure_lines(report: dict, severity: str, limit: int = 10) -> list[str]:
    lines = []
    for split, exps in report["splits"].items():
        for e in exps:
            if e["success"] or e["severity"] != severity:
                continue
            recs = [f"{r['id']} ({r['source']}{': ' + r['detail'] if r['detail'] else ''})" for r in e["failing_records"]]
            more = f" and {len(recs) - limit} more" if len(recs) > limit else ""
            what = f"records: {', '.join(recs[:limit])}{more}" if recs else f"observed {e['observed']}"
            lines.append(f"  [{split}] {e['check']}: {e['expectation']} {e['kwargs']} ({e['why']}) failed; {what}")
    return lines


def report_html(report: dict) -> str:
    """A report that renders offline: inline CSS, no script (GX Data Docs pull CSS/JS from a CDN)."""
    esc = html.escape
    rows = []
    for split, exps in report["splits"].items():
        for e in exps:
            recs = "<br>".join(esc(f"{r['id']} ({r['source']})" + (f": {r['detail']}" if r["detail"] else ""))
                               for r in e["failing_records"][:50])
            if len(e["failing_records"]) > 50:
                recs += f"<br>... {len(e['failing_records']) - 50} more in report.json"
            result = "pass" if e["success"] else "FAIL" if e["severity"] == "fail" else "warn"
            cls = "ok" if e["success"] else "bad" if e["severity"] == "fail" else "warn"
            observed = "" if e["observed"] is None else esc(str(e["observed"]))
            rows.append(f"<tr class={cls}><td>{split}</td><td>{esc(e['check'])}</td><td>{esc(e['severity'])}</td>"
                        f"<td><code>{esc(e['expectation'])}</code><br>{esc(str(e['kwargs']))}</td>"
                        f"<td>{esc(str(e['why']))}</td><td>{result}</td><td>{observed}</td><td>{recs}</td></tr>")
    status = "PASSED" if report["success"] else "FAILED"
    if report["success"] and report["warnings"]:
        status += f" with {report['warnings']} warning(s)"
    d = report["drift"]
    drift = ("no profile of a passed dataset yet: drift not checked" if d["baseline"] is None else
             f"against {esc(d['baseline'])}: records x{d['count_ratio']:.2f}, token-length KS {d['ks_n_tokens']:.3f}, "
             f"sources added {esc(', '.join(d['sources_added']) or 'none')}, gone {esc(', '.join(d['sources_gone']) or 'none')}")
    counts = ", ".join(f"{k} {v}" for k, v in report["records"].items())
    return f"""<!doctype html><meta charset=utf-8><title>loraflow validation: {esc(status)}</title>
<style>body{{font:14px sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse}}.bad{{background:#fdd}}.ok{{background:#efe}}.warn{{background:#ffd}}</style>
<h1>Validation {esc(status)}</h1>
<p>records: {esc(counts)}<br>chat template sha256: <code>{report['chat_template_sha256']}</code><br>drift: {drift}</p>
<table><tr><th>table</th><th>check</th><th>severity</th><th>expectation</th><th>why</th><th>result</th>
<th>observed</th><th>failing records</th></tr>
{''.join(rows)}</table>"""


def validate(params: Params, data: dict[str, list[dict]], tok, eot_ids: set[int], baseline: dict | None = None,
             baseline_name: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run every check on one mode's curated records.

    Args:
        params: reads `base.max_seq_len` and `validate`.
        data: the records of each of SPLITS (an absent file: an empty list).
        tok, eot_ids: the base model's tokenizer and its end-of-turn token ids.
        baseline: the profile of the last dataset that passed (drift is checked against it), or None.
        baseline_name: where that profile lives, for the report.

    Returns:
        (the report, without the curated files' hashes; this dataset's profile).
    """
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines (on import too) bury ours
    import great_expectations as gx
    import pandas as pd

    template_sha = models.template_sha256(tok)
    tables: dict[str, list[dict]] = {}
    for s in ("train", "eval"):
        msgs = [r.get("messages") if isinstance(r.get("messages"), list) else [] for r in data[s]]
        tables[s] = chat_facts(data[s], checks.template_facts(tok, msgs, eot_ids))
    ok_prefs = [i for i, r in enumerate(data["prefs"]) if not prefs_problem(r)]
    both = checks.template_facts(tok, [data["prefs"][i]["prompt"] + data["prefs"][i][k] for k in ("chosen", "rejected")
                                       for i in ok_prefs], eot_ids)
    tables["prefs"] = prefs_facts(data["prefs"], dict(zip(ok_prefs, both[:len(ok_prefs)], strict=True)),
                                  dict(zip(ok_prefs, both[len(ok_prefs):], strict=True)))
    train_side = data["train"] + [{"id": data["prefs"][i].get("id"), "source": data["prefs"][i].get("source"),
                                   "messages": data["prefs"][i]["prompt"] + data["prefs"][i]["chosen"]} for i in ok_prefs]
    overlap_facts(tables["eval"], data["eval"], train_side, params.validate_.near_dup_threshold)

    n_tokens = [row["n_tokens"] for s in ("train", "eval") for row in tables[s] if row["n_tokens"] is not None]
    now = checks.profile({s: data[s] for s in SPLITS}, n_tokens, template_sha)
    if baseline is not None:
        tables["drift"] = drift_facts(now, baseline)

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    source = ctx.data_sources.add_pandas("loraflow")
    report: dict[str, Any] = {"splits": {}, "success": True, "warnings": 0,
                              "records": {s: len(data[s]) for s in SPLITS},
                              "chat_template_sha256": template_sha, "profile": now}
    for table, rows in tables.items():
        df = pd.DataFrame([{k: v for k, v in r.items() if k != "_detail"} for r in rows])
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(build_suite(gx, f"loraflow-{table}", table, params, baseline))
        if not suite.expectations:
            report["splits"][table] = []
            continue
        if df.empty:  # GX needs the columns even when a file has no records (prefs usually)
            df = pd.DataFrame(columns=sorted({e.column for e in suite.expectations if hasattr(e, "column")} | {"id"}))
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=f"loraflow-{table}"))
        result = vd.run(batch_parameters={"dataframe": df}, result_format="COMPLETE")
        report["splits"][table] = [_describe(r, rows) for r in result.results]
    exps = [e for es in report["splits"].values() for e in es]
    report["success"] = all(e["success"] for e in exps if e["severity"] == "fail")
    report["warnings"] = sum(1 for e in exps if not e["success"] and e["severity"] == "warn")
    drift_rows = tables.get("drift") or [{}]
    report["drift"] = {"baseline": baseline_name if baseline is not None else None,
                       "count_ratio": drift_rows[0].get("count_ratio"), "ks_n_tokens": drift_rows[0].get("ks_n_tokens"),
                       "sources_added": [r["id"] for r in tables.get("drift", []) if r["change"] == "added"],
                       "sources_gone": [r["id"] for r in tables.get("drift", []) if r["change"] == "gone"]}
    return report, now

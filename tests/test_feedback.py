"""Feedback events: the durable append, what curation makes of each kind, and how a run is triggered."""

from __future__ import annotations

import contextlib
import json
import sys

import pytest

from flows.trigger import trigger_pipeline
from loraflow import feedback as fb
from loraflow.config import load_params
from loraflow.io import read_jsonl
from loraflow.serve.feedback import local_command
from steps import curate
from tests.conftest import ROOT, chat, write_jsonl

PARAMS = load_params(ROOT / "params.yaml")
PROMPT = [{"role": "user", "content": "O que é ROAS?"}]


def event(**kw) -> dict:
    return {"event_id": "fb-1", "response_id": "chatcmpl-1", "mode": "m", "adapter_version": "2", "messages": PROMPT,
            "answer": "Não sei.", "rating": None, "correction": None, "preferred": None, "rejected": None,
            "timestamp": "2026-11-22T09:00:00+00:00", **kw}


def test_sft_and_pref_per_kind_of_feedback():
    sft, pair = fb.sft_and_pref(event(rating=5), min_rating=4)
    assert sft == PROMPT + [{"role": "assistant", "content": "Não sei."}] and pair is None
    sft, pair = fb.sft_and_pref(event(rating=1, correction="Receita sobre investimento em mídia."), 4)
    assert sft[-1]["content"] == "Receita sobre investimento em mídia."
    assert pair["chosen"][0]["content"] == "Receita sobre investimento em mídia." and pair["rejected"][0]["content"] == "Não sei."
    sft, pair = fb.sft_and_pref(event(answer=None, preferred="A", rejected="B"), 4)
    assert sft is None and pair == {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "A"}],
                                    "rejected": [{"role": "assistant", "content": "B"}]}
    with pytest.raises(ValueError, match="rating 3 below curate.feedback_min_rating 4"):
        fb.sft_and_pref(event(rating=3), 4)
    with pytest.raises(ValueError, match="'rating'"):
        fb.sft_and_pref(event(rating=6), 4)
    with pytest.raises(ValueError, match="'preferred'/'rejected'"):
        fb.sft_and_pref(event(preferred="A"), 4)
    with pytest.raises(ValueError, match="'messages'"):
        fb.sft_and_pref(event(messages=[], rating=5), 4)


def test_append_is_one_line_per_event_and_refuses_path_modes(tmp_path):
    p1 = fb.append_event(tmp_path, event(rating=5))
    p2 = fb.append_event(tmp_path, event(rating=1, correction="Melhor."))
    assert p1 == p2 and p1.parent == tmp_path / "data" / "raw" / "feedback" / "m"
    lines = [json.loads(x) for x in p1.read_text().splitlines()]
    assert [x["rating"] for x in lines] == [5, 1] and lines[0]["schema"] == fb.SCHEMA
    assert fb.count_events(tmp_path, "m") == 2 and fb.count_events(tmp_path, "other") == 0
    with pytest.raises(ValueError, match="names a folder"):
        fb.append_event(tmp_path, event(mode="../x", rating=5))


def test_curate_folds_feedback_into_sft_and_prefs_with_accounting(tmp_path):
    raw = tmp_path / "raw" / "m"
    write_jsonl(raw / "a.jsonl", [chat("Pergunta?", "Resposta.")])
    fdir = tmp_path / "raw" / "feedback" / "m"
    write_jsonl(fdir / "feedback-2026-11-22.jsonl", [
        event(rating=5),
        event(rating=2, correction="ROAS é receita dividida pelo investimento em mídia."),
        event(rating=2),  # nothing to learn
        event(answer=None, preferred="Sim.", rejected="Não."),
        event(rating=5),  # the same conversation again
    ])
    (fdir / "feedback-2026-11-23.jsonl").write_text("{not json\n")
    stats = curate.run(PARAMS, raw, tmp_path / "out", fdir)
    recs = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(tmp_path / "out" / "eval.jsonl")
    fb_recs = {r["source"]: r for r in recs if r["source"].startswith("feedback/")}
    assert set(fb_recs) == {"feedback/m/feedback-2026-11-22.jsonl#1", "feedback/m/feedback-2026-11-22.jsonl#2"}
    assert fb_recs["feedback/m/feedback-2026-11-22.jsonl#1"]["meta"]["feedback"]["rating"] == 5
    assert fb_recs["feedback/m/feedback-2026-11-22.jsonl#1"]["meta"]["duplicates"] == ["feedback/m/feedback-2026-11-22.jsonl#5"]
    prefs = read_jsonl(tmp_path / "out" / "prefs.jsonl")
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in prefs] == [
        ("ROAS é receita dividida pelo investimento em mídia.", "Não sei."), ("Sim.", "Não.")]
    quarantine = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert any("nothing to learn" in q["reason"] and q["source"].endswith("#3") for q in quarantine)
    assert any("not valid JSON" in q["reason"] for q in quarantine)
    s = stats["sources"]["feedback/m/feedback-2026-11-22.jsonl"]
    assert (s["read"], s["curated"], s["duplicates"], s["quarantined"]) == (5, 3, 1, 1)
    assert stats["splits"]["prefs"] == 2


def test_default_trigger_is_loraflow_run_and_a_command_template_replaces_it(tmp_path, monkeypatch):
    argv = local_command("m", "params.yaml", ["train.max_steps=3"])
    assert argv[1:] == ["-m", "flows.cli", "run", "--mode", "m", "--params", "params.yaml", "-S", "train.max_steps=3"]
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    run = trigger_pipeline("m", tmp_path, command=f"{sys.executable} -c \"print('curating {{mode}}')\"")
    assert run["how"] == "local" and run["process"].wait(timeout=60) == 0
    assert open(run["log"]).read().strip() == "curating m"


def test_runs_feedback_starts_warm_start_from_the_champion_unless_told_otherwise(tmp_path):
    """The threshold's event starts a run with train.warm_start=champion (the measured default for feedback
    rounds); --feedback-warm-start off, or the server's own -S train.warm_start=off, gives a from-scratch run."""
    from loraflow.config import load_params
    from loraflow.serve import ServeSettings
    from loraflow.serve.feedback import FeedbackSink
    from tests.conftest import ROOT

    def warm_start_of(**settings) -> str:
        started = []

        def trigger(mode, root, params_file, overrides, command, deployment):
            started.append(overrides)
            return {"how": "test", "started": "now"}

        root = tmp_path / f"server{len(list(tmp_path.iterdir()))}"  # each server its own feedback folder
        sink = FeedbackSink(ServeSettings(root=root, feedback_threshold=2, trigger=trigger, **settings))
        for _ in range(2):
            out = sink.record(event(rating=5))
        assert out["run_started"] is not None and len(started) == 1
        return load_params(ROOT / "params.yaml", started[0]).train.warm_start

    assert warm_start_of() == "champion"
    assert warm_start_of(feedback_warm_start="off") == "off"
    assert warm_start_of(overrides=["train.warm_start=off", "train.max_steps=3"]) == "off"


def test_events_from_keys_that_may_not_train_are_counted_apart_and_teach_nothing(tmp_path):
    fb.append_event(tmp_path, event(rating=5, key="public-app", trains=False))
    fb.append_event(tmp_path, event(rating=5, key="support", trains=True))
    fb.append_event(tmp_path, event(rating=5))  # before keys existed: may train
    assert fb.count_events(tmp_path, "m") == 2
    with pytest.raises(ValueError, match="'public-app', which may not train"):
        fb.sft_and_pref(event(correction="Melhor.", key="public-app", trains=False), 4)


def test_a_torn_last_line_is_sealed_at_server_start_and_quarantined_and_no_event_is_glued_to_it(tmp_path):
    """A crash mid-append leaves half a line without its newline. The server starting on that file seals it (says so
    in its feedback status, with a reason), the next acknowledged event is a line of its own, and curation curates
    that event and quarantines the fragment. The same holds for an append right after a tear, without a restart."""
    from loraflow.serve import ServeSettings
    from loraflow.serve.feedback import FeedbackSink

    fb.append_event(tmp_path, event(event_id="fb-whole", rating=5))
    path = fb.append_event(tmp_path, event(event_id="fb-torn", rating=5))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 40])  # the second line loses its end and its newline
    assert fb.torn_tail(path) is not None and fb.count_events(tmp_path, "m") == 1

    sink = FeedbackSink(ServeSettings(root=tmp_path, feedback_threshold=0))  # the server starting on it
    sealed = sink.status()["m"]["torn_lines_sealed"]
    assert [(s["file"], s["line"]) for s in sealed] == [(str(path), 2)] and "torn line" in sealed[0]["reason"]
    assert fb.torn_tail(path) is None
    sink.record(event(event_id="fb-after-restart", rating=1, correction="ROAS é receita sobre investimento."))

    with open(path, "a", encoding="utf-8") as f:  # torn again while serving (another writer died mid-line)
        f.write('{"schema": 1, "event_id": "fb-cut')
    fb.append_event(tmp_path, event(event_id="fb-after-tear", rating=5, answer="Outra resposta."))

    lines = path.read_text(encoding="utf-8").splitlines()
    parsed = {}
    for i, line in enumerate(lines, 1):
        with contextlib.suppress(ValueError):
            parsed[json.loads(line)["event_id"]] = i
    assert parsed == {"fb-whole": 1, "fb-after-restart": 3, "fb-after-tear": 5} and len(lines) == 5
    assert fb.count_events(tmp_path, "m") == 3

    raw = tmp_path / "raw" / "m"
    write_jsonl(raw / "a.jsonl", [chat("Pergunta?", "Resposta.")])
    curate.run(PARAMS, raw, tmp_path / "out", fb.feedback_dir(tmp_path, "m"))
    recs = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(tmp_path / "out" / "eval.jsonl")
    name = f"feedback/m/{path.name}"
    assert {r["source"] for r in recs if r["source"].startswith("feedback/")} == {f"{name}#1", f"{name}#3", f"{name}#5"}
    quarantined = {q["source"]: q["reason"] for q in read_jsonl(tmp_path / "out" / "quarantine.jsonl")}
    assert {f"{name}#2", f"{name}#4"} <= set(quarantined) and "not valid JSON" in quarantined[f"{name}#2"]

"""The registry side of promotion on a real SQLite MLflow store: idempotent registration, evidence tags,
policies, a person's promote, rollback, a champion moved in the UI, two promotions at once, the card attached.

Adapters here are stand-in folders (registration copies files, it never loads them); the real model is
loaded back in test_registry_server.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow import registry
from loraflow.cli import main as cli
from loraflow.config import load_params
from loraflow.io import sha256_file, write_json
from steps import promote
from tests.conftest import MODE, ROOT

NAME = f"loraflow-{MODE}"
EVAL_SHA = "e" * 64


def summary(rouge: float, bert: float = 0.8) -> dict:
    s = lambda v: {"mean": v, "ci_low": v - 0.05, "ci_high": v + 0.05}  # noqa: E731
    return {**{m: s(v) for m, v in (("rouge1", rouge), ("rouge2", rouge / 2), ("rougeL", rouge), ("bertscore", bert))},
            "degeneration": {"stop_rate": s(0.95), "loop_rate": s(0.05)}}  # healthy answers: the gate's floors pass


def make_candidate(params, root: Path, tag: str, rouge: float, champion: tuple[str, float] | None = None,
                   base: float = 0.3) -> tuple[Path, Path]:
    """A trained-adapter stand-in with its own MLflow run, and a metrics.json as evaluate writes it."""
    import mlflow

    from loraflow import tracking

    exp = tracking.setup(params, MODE)
    with mlflow.start_run(experiment_id=exp, run_name=f"train-{tag}") as run:
        pass
    adapter = root / tag / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "chat_template.jinja").write_text("{{ messages }}")
    write_json(adapter / "train_info.json", {
        "adapter_sha256": sha256_file(adapter / "adapter_model.safetensors"), "mlflow_run_id": run.info.run_id,
        "train_data_sha256": "d" * 64, "git_commit": "abc123", "params": {"lora_r": 16}, "base_model": "m"})
    metrics = {"eval_set": {"path": "eval.jsonl", "sha256": EVAL_SHA, "size": 6},
               "base": summary(base), "candidate": summary(rouge),
               "champion": summary(champion[1]) if champion else None,
               "champion_version": champion[0] if champion else None, "deltas": {}}
    write_json(root / tag / "metrics.json", metrics)
    return adapter, root / tag / "metrics.json"


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An MLflow database with its tables made once: creating them costs ~10 s per fresh file."""
    import mlflow

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def params(tmp_path, monkeypatch, empty_db):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # no dvc.lock above the stand-in adapters unless a test writes one
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    # Stand-in adapters and metrics: the registry's logic, not parity (tests/test_parity.py replays real answers).
    return load_params(ROOT / "params.yaml", [f"base.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                              "promote.parity.targets=[]"])


@pytest.fixture
def client(params):
    import mlflow

    from loraflow.tracking import tracking_uri

    return mlflow.MlflowClient(tracking_uri=tracking_uri(params), registry_uri=tracking_uri(params))


def run_promote(params, adapter: Path, metrics: Path) -> dict:
    return promote.run(params, MODE, metrics, adapter, metrics.parent / "promotion")


def test_rerun_creates_no_second_version_and_tags_carry_the_evidence(params, client, tmp_path):
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n"
        f"  curate@{MODE}:\n    outs:\n    - path: data/curated/{MODE}\n      md5: cur111.dir\n"
        f"  train@{MODE}:\n    outs:\n    - path: data/adapters/{MODE}\n      md5: ada222.dir\n")
    adapter, metrics = make_candidate(params, tmp_path, "a", 0.5)
    first = run_promote(params, adapter, metrics)
    again = run_promote(params, adapter, metrics)
    assert first["decision"] == "promote" and first["version"] == again["version"] == "1"
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1
    assert again["aliases_after"] == {"champion": "1"} and "already champion" in again["registry_note"]

    tags = client.get_model_version(NAME, "1").tags
    assert tags["git_commit"] == "abc123" and tags["dvc.adapter_md5"] == "ada222.dir"
    assert tags["dvc.curated_md5"] == "cur111.dir" and tags["train_data_sha256"] == "d" * 64
    assert tags["chat_template_sha256"] == sha256_file(adapter / "chat_template.jinja")
    assert json.loads(tags["params.train"]) == {"lora_r": 16} and json.loads(tags["params.promote"])["policy"] == "auto"
    assert json.loads(tags["metrics"])["candidate"]["rougeL"] == 0.5
    assert tags["decision"] == "promote" and "0.5000" in tags["decision_reason"]
    assert [e["version"] for e in registry.history(client, NAME)] == ["1"]


def test_rejected_candidate_is_not_registered(params, client, tmp_path):
    adapter, metrics = make_candidate(params, tmp_path, "a", 0.2)
    out = run_promote(params, adapter, metrics)
    assert out["decision"] == "reject" and out["version"] is None
    assert not client.search_model_versions(f"name='{NAME}'")


def test_later_run_compares_with_champion_then_rollback_sticks(params, client, tmp_path):
    run_promote(params, *make_candidate(params, tmp_path, "a", 0.5))
    worse = run_promote(params, *make_candidate(params, tmp_path, "b", 0.45, champion=("1", 0.5)))
    assert worse["decision"] == "challenger" and worse["aliases_after"] == {"champion": "1", "challenger": "2"}
    c_adapter, c_metrics = make_candidate(params, tmp_path, "c", 0.6, champion=("1", 0.5))
    better = run_promote(params, c_adapter, c_metrics)
    assert better["version"] == "3" and better["aliases_after"]["champion"] == "3"

    assert cli(["rollback", MODE, "-S", f"base.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                "--params", str(ROOT / "params.yaml")]) == 0
    assert registry.aliases(client, NAME)["champion"] == "1"
    assert registry.ROLLED_BACK_TAG in client.get_model_version(NAME, "3").tags
    # Re-running promote for the rolled-back adapter (it was evaluated against v1, today's champion again)
    # must not undo the person's rollback.
    again = run_promote(params, c_adapter, c_metrics)
    assert again["aliases_after"]["champion"] == "1" and "rolled back" in again["registry_note"]
    assert [e["by"].split()[0] for e in registry.history(client, NAME)] == ["pipeline", "pipeline", "rollback"]
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback(client, NAME)


def test_manual_policy_sets_challenger_and_a_person_promotes_from_the_cli(params, client, tmp_path, capsys):
    manual = params.model_copy(update={"promote": params.promote.model_copy(update={"policy": "manual"})})
    out = run_promote(manual, *make_candidate(manual, tmp_path, "a", 0.9))
    assert out["decision"] == "challenger" and out["aliases_after"] == {"challenger": "1"}
    args = ["--params", str(ROOT / "params.yaml"), "-S", f"base.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert cli(["promote", MODE, "1", *args]) == 0
    assert registry.aliases(client, NAME) == {"champion": "1"}  # challenger is gone: it is the champion now
    assert "champion is now v1" in capsys.readouterr().out
    assert registry.history(client, NAME)[-1]["by"] == "person (loraflow promote)"
    assert cli(["promote", MODE, "7", *args]) == 1  # no such version: a clear error, exit 1
    assert "has no version '7'" in capsys.readouterr().err


def test_champion_moved_in_the_ui_is_never_moved_back(params, client, tmp_path):
    run_promote(params, *make_candidate(params, tmp_path, "a", 0.5))
    run_promote(params, *make_candidate(params, tmp_path, "b", 0.45, champion=("1", 0.5)))  # v2 challenger
    client.set_registered_model_alias(NAME, "champion", "2")  # a person, in the MLflow UI
    # A run evaluated against v1 before the person's move: it would beat v1, but must leave v2 alone.
    late = run_promote(params, *make_candidate(params, tmp_path, "c", 0.7, champion=("1", 0.5)))
    assert late["aliases_after"]["champion"] == "2" and late["aliases_after"]["challenger"] == late["version"]
    assert "since this candidate was evaluated" in late["registry_note"]
    # The history records the person's move, so rollback goes from v2 back to v1.
    assert registry.rollback(client, NAME)["to"] == "1"


@pytest.mark.parametrize("order", [("better", "worse"), ("worse", "better")])
def test_sibling_runs_in_either_order_end_with_the_better_champion(params, client, tmp_path, order):
    """Both evaluated against v1: whichever writes second, the better one is champion, the other challenger."""
    run_promote(params, *make_candidate(params, tmp_path, "seed", 0.4))
    scores = {"better": 0.6, "worse": 0.55}
    versions = {k: run_promote(params, *make_candidate(params, tmp_path, k, scores[k], champion=("1", 0.4)))["version"]
                for k in order}
    assert registry.aliases(client, NAME) == {"champion": versions["better"], "challenger": versions["worse"]}


CONCURRENT = """
import sys, time
from pathlib import Path
from loraflow.config import load_params
from steps import promote
import mlflow.pyfunc  # imported before the barrier, so both start registering at the same moment
params = load_params(sys.argv[1], [f"base.tracking_uri={sys.argv[2]}", "promote.parity.targets=[]"])
barrier = Path(sys.argv[5])
(barrier / Path(sys.argv[3]).parent.name).touch()
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.002)
out = promote.run(params, sys.argv[6], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[3]).parent / "promotion")
print(out["version"], out["registry_note"])
"""


def test_two_promotions_at_once_leave_one_champion_the_better_one(params, client, tmp_path):
    from loraflow.tracking import tracking_uri

    run_promote(params, *make_candidate(params, tmp_path, "seed", 0.4))  # v1 champion: both beat it
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cands = {k: make_candidate(params, tmp_path, k, v, champion=("1", 0.4)) for k, v in (("better", 0.6), ("worse", 0.55))}
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = {k: subprocess.Popen([sys.executable, "-c", CONCURRENT, str(ROOT / "params.yaml"), tracking_uri(params),
                                  str(m), str(a), str(barrier), MODE], env=env, cwd=tmp_path, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, (a, m) in cands.items()}
    outs = {k: p.communicate(timeout=300) for k, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), {k: o[1][-2000:] for k, o in outs.items()}
    versions = {k: o[0].split()[0] for k, o in outs.items()}
    aliases = registry.aliases(client, NAME)
    assert aliases == {"champion": versions["better"], "challenger": versions["worse"]}, outs
    # One consistent history (v1 at the bottom, the champion on top) and no lock left behind.
    stack = registry.champion_stack(registry.history(client, NAME))
    assert stack[0] == "1" and stack[-1] == versions["better"]
    assert not client.search_registered_models(f"name='{registry.lock_name(NAME)}'")


def test_model_card_is_attached_to_the_version_and_parses_back(params, client, tmp_path):
    from huggingface_hub import ModelCard

    from loraflow import modelcard
    from steps import model_card

    adapter, metrics_file = make_candidate(params, tmp_path, "a", 0.5)
    decision = run_promote(params, adapter, metrics_file)
    stats = {"sources": {"a.jsonl": {"read": 8, "curated": 7, "duplicates": 1, "quarantined": 0, "reasons": {}}},
             "totals": {"read": 8, "curated": 7, "duplicates": 1, "quarantined": 0},
             "splits": {"train": 6, "eval": 1}, "token_lengths": {"p50": 40, "p95": 80, "max": 90},
             "files": {"train.jsonl": "1" * 64, "eval.jsonl": "2" * 64}}
    metrics = json.loads(metrics_file.read_text())
    metrics.update(deltas={"candidate_vs_base": summary(0.2), "candidate_vs_champion": None},
                   generation={"max_new_tokens": 24}, scoring={"confidence": 0.95, "rouge_tokenizer": "words",
                                                               "bertscore_model": "x"})
    write_json(metrics_file, metrics)
    write_json(tmp_path / "stats.json", stats)
    write_json(tmp_path / "decision.json", decision)
    model_card.run(params, MODE, tmp_path / "stats.json", adapter / "train_info.json", metrics_file,
                   tmp_path / "decision.json", tmp_path / "card.md")

    import mlflow

    mv = client.get_model_version(NAME, decision["version"])
    local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=modelcard.CARD_ARTIFACT,
                                                dst_path=str(tmp_path / "dl"), tracking_uri=client.tracking_uri)
    card = ModelCard.load(local)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {m: round(metrics["candidate"][m]["mean"], 4) for m in ("rouge1", "rouge2", "rougeL", "bertscore")}
    assert card.data.library_name == "peft" and "## Promotion decision" in card.text
    assert "| stop_rate (answers that end their turn) | 95% [90%, 100%] | 95% [90%, 100%] |" in card.text
    assert mv.description.startswith(f"# {NAME}") and "**promote**" in mv.description


@pytest.mark.parametrize("jinja_file", [True, False], ids=["chat_template.jinja", "tokenizer_config.json"])
def test_template_tag_equals_train_info_hash_for_a_saved_tokenizer(tmp_path, monkeypatch, jinja_file):
    """One chat-template hash: the registry tag of an adapter folder equals what train writes to train_info.json
    (models.template_sha256 of the tokenizer it saves there), in either format transformers saves a template."""
    from loraflow import models
    from loraflow.promotion import Decision

    monkeypatch.chdir(tmp_path)  # no dvc.lock in reach
    params = load_params(ROOT / "params.yaml")
    tok = models.load_tokenizer(models.resolve(params.base.model, params.base.model_cache))
    adapter = tmp_path / "adapter"
    tok.save_pretrained(adapter, save_jinja_files=jinja_file)
    assert (adapter / "chat_template.jinja").exists() == jinja_file
    train_info_hash = models.template_sha256(tok)
    assert tok.chat_template and train_info_hash != models.template_sha256(type("NoTemplate", (), {"chat_template": None}))
    tags = registry.version_tags(params, adapter, MODE, {"adapter_sha256": "a" * 64, "git_commit": "abc"},
                                 {"eval_set": {"sha256": EVAL_SHA}}, Decision("promote", "r", "rougeL", "base", 0.1))
    assert tags["chat_template_sha256"] == train_info_hash
    assert models.template_sha256(models.load_tokenizer(str(adapter))) == train_info_hash  # what serving loads

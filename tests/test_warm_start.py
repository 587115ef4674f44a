"""Warm start: a run continues the registry champion's adapter on the records it has not learned plus a replay
sample, or falls back to from scratch and says why.

The fast tests plan starts against champion folders written by hand (plain files, as the registry hands them
back); the slow one trains the real embedded model: a first adapter becomes champion through the real promote
step and registry, new raw conversations arrive, and the next run continues the champion's weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow import warm_start
from loraflow.config import load_params
from loraflow.io import read_json, read_jsonl, write_json
from tests.conftest import MODE, ROOT, chat

MODEL = load_params(ROOT / "params.yaml").base.model


def _params(*sets: str):
    return load_params(ROOT / "params.yaml", list(sets))


def _records(n: int, prefix: str = "r") -> list[dict]:
    return [{"id": f"{prefix}{i}", **chat(f"q{i}", f"a{i}")} for i in range(n)]


def _champion(folder: Path, ids: dict[str, list[str]] | None, r: int = 16, alpha: int = 32,
              targets="all-linear", base: str = MODEL) -> tuple[str, Path]:
    """A champion adapter folder as the registry hands it back: config, weights, train_info, maybe trained ids."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "adapter_config.json", {"r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"]})
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    write_json(folder / "train_info.json", {"base_model": base, "params": {"target_modules": targets}})
    if ids is not None:
        warm_start.write_trained_ids(folder, ids)
    return "3", folder


def _plan(params, records, champion):
    return warm_start.plan(params.train, params.base.model, params.base.seed, records, champion)


def test_off_and_no_champion_train_everything_from_the_base_and_say_why(tmp_path):
    recs = {"sft": _records(10)}
    assert _params("train.warm_start=off").train.warm_start == "off"  # YAML's bare off (false) means off
    off = _plan(_params(), recs, _champion(tmp_path / "c", {"sft": ["r0"]}))
    assert off.kind == "base" and "off" in off.reason and off.records == recs and off.adapter_dir is None
    assert off.learned == {"sft": sorted(r["id"] for r in recs["sft"])}  # what the fresh adapter will have learned
    none = _plan(_params("train.warm_start=champion"), recs, (None, None))
    assert none.kind == "base" and "no champion" in none.reason and none.new == {"sft": 10}


def test_a_champion_without_trained_ids_or_with_another_lora_is_not_continued(tmp_path):
    p = _params("train.warm_start=champion")
    recs = {"sft": _records(10)}
    old = _plan(p, recs, _champion(tmp_path / "old", None))
    assert old.kind == "base" and "v3 has no trained_ids.json" in old.reason and old.records == recs
    rank = _plan(p, recs, _champion(tmp_path / "rank", {"sft": ["r0"]}, r=8))
    assert rank.kind == "base" and "lora_r 8 (champion) vs 16 (train)" in rank.reason
    targets = _plan(p, recs, _champion(tmp_path / "targets", {"sft": ["r0"]}, targets=["q_proj", "v_proj"]))
    assert targets.kind == "base" and "target_modules" in targets.reason and "lora_r" not in targets.reason
    base = _plan(p, recs, _champion(tmp_path / "base", {"sft": ["r0"]}, base="other/model"))
    assert base.kind == "base" and "base_model 'other/model'" in base.reason
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "trained_ids.json").write_text(json.dumps(["r0"]))
    bad = _plan(p, recs, _champion(tmp_path / "bad", None))
    assert bad.kind == "base" and "expected {stage: [record id, ...]}" in bad.reason


def test_a_champion_is_continued_on_new_records_plus_a_seeded_replay_of_the_old(tmp_path):
    p = _params("train.warm_start=champion", "train.replay_fraction=0.25")
    recs = {"sft": _records(20), "dpo": _records(6, "p")}
    seen = {"sft": [f"r{i}" for i in range(16)], "dpo": [f"p{i}" for i in range(6)], "retired": ["x"]}
    start = _plan(p, recs, _champion(tmp_path / "c", seen))
    assert start.kind == "champion" and start.version == "3" and start.adapter_dir == tmp_path / "c"
    assert start.new == {"sft": 4, "dpo": 0} and start.replayed == {"sft": 4, "dpo": 2}  # round(0.25 * 16), round(1.5)
    ids = [r["id"] for r in start.records["sft"]]
    assert {"r16", "r17", "r18", "r19"} <= set(ids) and len(ids) == 8
    assert ids == sorted(ids, key=lambda i: int(i[1:]))  # file order kept
    assert start.adapter_sha256 and start.info()["kind"] == "champion" and "v3" in start.reason
    # the adapter will have learned the champion's records and the new ones (kept across stages it skips)
    assert start.learned["sft"] == sorted(f"r{i}" for i in range(20)) and start.learned["retired"] == ["x"]
    # seeded: the same replay sample every time, another with another seed
    assert [r["id"] for r in _plan(p, recs, (start.version, start.adapter_dir)).records["sft"]] == ids
    other = _plan(_params("train.warm_start=champion", "base.seed=7"), recs, (start.version, start.adapter_dir))
    assert [r["id"] for r in other.records["sft"]] != ids
    # the checkpoint key follows the champion and the selection
    assert warm_start.selection_sha256(start, "sft") != warm_start.selection_sha256(other, "sft")


def test_nothing_new_since_the_champion_trains_from_scratch(tmp_path):
    p = _params("train.warm_start=champion")
    recs = {"sft": _records(5)}
    start = _plan(p, recs, _champion(tmp_path / "c", {"sft": [f"r{i}" for i in range(5)]}))
    assert start.kind == "base" and "already trained on" in start.reason and start.records == recs


# --- slow: the real thing ----------------------------------------------------------------------------------------

NEW = [chat(f"Qual é a regra número {n} do clube de mídia Loraflow?",
            f"A regra número {n} do clube de mídia Loraflow é revisar o ROAS toda {d}.",
            "Você é um consultor de retail media que responde em português do Brasil, de forma direta e prática.")
       for n, d in enumerate(["segunda", "terça", "quarta", "quinta", "sexta", "manhã", "tarde", "noite"] * 2)]


def _promote_as_champion(project: Path, params) -> str:
    """Register the trained adapter through the real promote step (a gate that passes: the registry path is
    what this test needs, the gate is tested in test_promote.py) and return its version."""
    from steps import promote
    from tests.test_registry import EVAL_SHA, summary

    metrics = {"eval_set": {"path": "eval.jsonl", "sha256": EVAL_SHA, "size": 6}, "base": summary(0.3),
               "candidate": summary(0.4), "champion": None, "champion_version": None, "deltas": {}}
    write_json(project / "m" / "metrics.json", metrics)
    d = promote.run(params, MODE, project / "m" / "metrics.json", project / "data" / "adapters" / MODE, project / "m")
    assert d["decision"] == "promote", d
    return str(d["version"])


@pytest.mark.slow
def test_warm_start_continues_the_champions_weights_on_new_and_replayed_records_only(project):
    from safetensors.torch import load_file

    from tests.test_train import FAST, _env, _prepared, _train

    _prepared(project, [*FAST, "train.replay_fraction=0.5", "promote.parity.targets=[]"])
    adapter, curated = project / "data" / "adapters" / MODE, project / "data" / "curated" / MODE
    first = _train(project)
    assert first["started_from"]["kind"] == "base" and "off" in first["started_from"]["reason"]
    learned = read_json(adapter / "trained_ids.json")
    assert learned == {"sft": sorted(r["id"] for r in read_jsonl(curated / "train.jsonl"))}
    params = load_params(project / "params.yaml")
    version = _promote_as_champion(project, params)
    champion_weights = load_file(str(adapter / "adapter_model.safetensors"))
    shutil.copytree(adapter, project / "champion")

    # New conversations arrive; curate and validate again (the same real steps).
    (project / "data" / "raw" / MODE / "novas.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in NEW), encoding="utf-8")
    for cmd in (["steps.curate", f"data/raw/{MODE}", f"data/curated/{MODE}"],
                ["steps.validate", f"data/curated/{MODE}", f"data/validation/{MODE}", f"data/profiles/{MODE}.json"]):
        r = subprocess.run([sys.executable, "-m", *cmd], cwd=project, env=_env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    train = read_jsonl(curated / "train.jsonl")
    new = [r for r in train if r["id"] not in set(learned["sft"])]
    old = len(train) - len(new)
    assert new  # some of the new conversations landed in the train split

    info = _train(project, "train.warm_start=champion")
    sf = info["started_from"]
    assert sf["kind"] == "champion" and sf["version"] == version, sf
    assert sf["adapter_sha256"] == first["adapter_sha256"]
    assert sf["new_records"] == {"sft": len(new)} and sf["replayed_records"] == {"sft": round(0.5 * old)}
    assert info["train_records"] == len(new) + round(0.5 * old)  # not the whole history
    assert info["stages"][0]["base_weights_unchanged"] is True
    after = load_file(str(adapter / "adapter_model.safetensors"))
    assert after.keys() == champion_weights.keys()
    assert any(not after[k].equal(champion_weights[k]) for k in after)  # it trained
    assert read_json(adapter / "trained_ids.json")["sft"] == sorted({*learned["sft"], *(r["id"] for r in train)})

    # Before its first step the trainer holds exactly the champion's LoRA weights (the same stage code the step runs).
    from peft import get_peft_model_state_dict
    from transformers import TrainerCallback

    from loraflow.models import load_tokenizer, resolve
    from loraflow.train_plan import choose_hardware
    from loraflow.trainer import StageSetup, train_stage

    seen: dict = {}

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.update({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})

    p = load_params(project / "params.yaml", ["train.max_steps=1", "train.checkpoint_dir=" + str(project / "ck")])
    path = resolve(p.base.model, p.base.model_cache)
    setup = StageSetup(p, MODE, load_tokenizer(path, p.base.trust_remote_code), path, choose_hardware(p.train))
    res = train_stage(setup, "sft", "k", new, project / "champion", callbacks=[AtStart()])
    assert seen.keys() == champion_weights.keys()
    assert all(seen[k].equal(champion_weights[k]) for k in seen)
    assert res["base_weights_unchanged"] and res["steps"] == 1


def test_the_model_card_says_what_training_started_from(tmp_path):
    from loraflow.modelcard import _started_from

    start = _plan(_params("train.warm_start=champion"), {"sft": _records(6)}, _champion(tmp_path / "c", {"sft": ["r0"]}))
    text = _started_from({"started_from": start.info()})
    assert text.startswith("the champion's adapter") and "continues champion v3 (sft: 5 new + 0 replayed of 1 seen" in text
    assert "fresh LoRA" in _started_from({"started_from": _plan(_params(), {"sft": _records(2)}, (None, None)).info()})
    assert "predates warm starts" in _started_from({})

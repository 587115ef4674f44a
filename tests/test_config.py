"""The typed config, and the agreement between dvc.yaml, params.yaml and the step modules."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
import yaml

from loraflow.config import SHARED, STEPS, Params, Paths, apply_overrides, load_params, stage_sections
from loraflow.errors import ConfigError
from tests.conftest import ROOT


def test_project_params_load_and_match_defaults_types():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.base.modes and p.train.lora_alpha >= p.train.lora_r


def test_params_yaml_shows_the_typed_defaults():
    """One source of truth: a key left out of params.yaml means what params.yaml ships. Only what names this
    project's own data may differ from the built-in defaults."""
    shipped, built_in = load_params(ROOT / "params.yaml").to_dict(), Params().to_dict()
    own = {("base", "modes"), ("evaluate", "guard_sets"), ("model_card", "tags")}
    differ = {(s, k) for s in shipped for k in shipped[s] if shipped[s][k] != built_in[s][k]}
    assert differ <= own, sorted(differ - own)


def test_every_section_in_params_yaml_is_a_step_or_shared():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == {*SHARED, *STEPS}


def test_override_parses_yaml_values(tmp_path):
    p = load_params(ROOT / "params.yaml", ["train.lora_r=64", "base.modes=[a, b]", "evaluate.max_examples=null"])
    assert p.train.lora_r == 64 and p.base.modes == ["a", "b"] and p.evaluate.max_examples is None


def test_unknown_key_names_the_key_and_lists_known_ones():
    with pytest.raises(ConfigError, match=r"train\.lora_rank: unknown key \(known: .*lora_r"):
        load_params(ROOT / "params.yaml", ["train.lora_rank=8"])


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"curate\.eval_fraction: .*(got 1\.5)"):
        load_params(ROOT / "params.yaml", ["curate.eval_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"promote\.policy"):
        load_params(ROOT / "params.yaml", ["promote.policy=sometimes"])


def test_unknown_section_and_malformed_override():
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        load_params(ROOT / "params.yaml", ["trian.lora_r=8"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["lora_r"])


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_bad_mode_name_is_refused():
    with pytest.raises(ConfigError, match="base.modes"):
        load_params(ROOT / "params.yaml", ["base.modes=['../etc']"])


def test_dvc_stages_match_steps_params_and_paths():
    """One name everywhere; each stage lists base + its own section (train also `generate`); cmd names every dep/out."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == list(STEPS)
    mode = "MODE"
    p = Paths(ROOT, mode)
    expected_outs = {"curate": p.curated, "validate": p.validation, "train": p.adapter,
                     "evaluate": p.eval / "predictions.jsonl", "promote": p.promotion}
    for name, stage in dvc.items():
        do = stage["do"]
        assert stage["foreach"] == "${base.modes}"
        assert do["params"] == list(stage_sections(name)), name
        module = importlib.import_module(f"steps.{name}")
        assert callable(module.run) and callable(module.main)
        assert list(inspect.signature(module.run).parameters)[0] == "params"
        assert do["cmd"].startswith(f"python -m steps.{name} ")
        cmd = do["cmd"].replace("${item}", mode)
        paths = [d for d in do["deps"] if not d.endswith(".py")]
        paths += [o if isinstance(o, str) else next(iter(o)) for o in do.get("outs", []) + do.get("metrics", [])]
        for path in paths:
            path = path.replace("${item}", mode)
            # predictions.jsonl / metrics.json are named through their folder in evaluate's cmd
            assert path in cmd or str(p.eval.relative_to(ROOT)) in cmd, (name, path)
        assert f"steps/{name}.py" in do["deps"]
        if name in expected_outs:
            outs = [o if isinstance(o, str) else next(iter(o)) for o in do["outs"]]
            assert str(expected_outs[name].relative_to(ROOT)).replace(mode, "${item}") in outs
    # validate reads the last passed profile and rewrites it: DVC must neither delete nor cache it
    profile = str(p.profile.relative_to(ROOT)).replace(mode, "${item}")
    assert {profile: {"persist": True, "cache": False}} in dvc["validate"]["do"]["outs"]


def test_prefect_tasks_share_the_step_names():
    src = (ROOT / "flows" / "pipeline.py").read_text()
    assert re.findall(r'@task\(name="(\w+)"', src) == list(STEPS)


"""The house rules, checked on the code itself rather than by reading it.

- Imports run one way: steps -> loraflow; flows -> steps, loraflow; loraflow imports neither; a step imports no
  other step; only flows/ imports prefect. Every .py below loraflow/, steps/ and flows/ is read, function-level
  and importlib imports included, and every arrow that runs the wrong way is named.
- Caches see every change: each dvc.yaml stage's code deps are exactly the project modules its step runs
  (loraflow.codedeps follows the imports transitively), and the Prefect task's cache key hashes the same files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from flows.pipeline import step_cache_key
from loraflow import codedeps
from loraflow.config import STEPS, Paths, load_params
from tests.conftest import MODE, ROOT, chat, write_jsonl

CODE_DIRS = ("loraflow", "steps", "flows")


def wrong_way_imports(root: Path) -> list[str]:
    """'file:line imports name: rule' for every import statement that breaks the direction."""
    bad: list[str] = []
    for top in CODE_DIRS:
        for path in sorted((root / top).rglob("*.py")):
            module = codedeps.module_name(path, root)
            for line, name in codedeps.imports(path.read_text(encoding="utf-8"), module, path.name == "__init__.py"):
                target = name.split(".")[0]
                rule = None
                if top == "loraflow" and target in ("steps", "flows"):
                    rule = "loraflow imports neither steps nor flows"
                elif top == "steps" and target == "flows":
                    rule = "steps import loraflow, never flows"
                elif top == "steps" and target == "steps" and name not in ("steps", module):
                    rule = "a step imports no other step (shared logic belongs in loraflow)"
                elif target == "prefect" and top != "flows":
                    rule = "only flows/ imports prefect"
                where = f"{path.relative_to(root)}:{line} imports "
                # `from a import b` reads as a and a.b: name the statement once
                if rule and not any(b.startswith(where) and name.startswith(b[len(where):].split(":")[0] + ".")
                                    for b in bad):
                    bad.append(f"{where}{name}: {rule}")
    return bad


def test_imports_run_one_way():
    assert wrong_way_imports(ROOT) == []


def test_no_loraflow_module_reaches_steps_or_flows_through_its_imports():
    for path in sorted((ROOT / "loraflow").rglob("*.py")):
        reached = codedeps.closure(codedeps.module_name(path, ROOT), ROOT)
        assert not [f for f in reached if not f.startswith("loraflow/")], path


def test_the_import_check_names_each_wrong_arrow(tmp_path):
    for top in CODE_DIRS:
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("")
    (tmp_path / "loraflow" / "serve").mkdir()
    (tmp_path / "loraflow" / "serve" / "feedback.py").write_text(
        "import json\n\n\ndef start():\n    from flows.trigger import trigger_pipeline\n    return trigger_pipeline\n")
    (tmp_path / "loraflow" / "cli.py").write_text("from . import serve\nfrom ..steps import train\n")
    (tmp_path / "loraflow" / "io.py").write_text("import prefect.logging\n")
    (tmp_path / "steps" / "promote.py").write_text("import importlib\nm = importlib.import_module('flows.pipeline')\n"
                                                   "from steps.evaluate import score\nfrom steps import promote\n")
    (tmp_path / "flows" / "pipeline.py").write_text("import prefect\nfrom steps import train\nimport loraflow\n")
    assert sorted(wrong_way_imports(tmp_path)) == sorted([
        "loraflow/serve/feedback.py:5 imports flows.trigger: loraflow imports neither steps nor flows",
        "loraflow/cli.py:2 imports steps: loraflow imports neither steps nor flows",
        "loraflow/io.py:1 imports prefect.logging: only flows/ imports prefect",
        "steps/promote.py:2 imports flows.pipeline: steps import loraflow, never flows",
        "steps/promote.py:3 imports steps.evaluate: a step imports no other step (shared logic belongs in loraflow)",
    ])


def test_dvc_stages_depend_on_every_module_their_step_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STEPS)
    for step, stage in stages.items():
        code = [d for d in stage["do"]["deps"] if d.endswith(".py")]
        assert code == codedeps.step_modules(step), (
            f"dvc.yaml stage {step}: its .py deps must be exactly the modules the step runs, sorted; "
            f"missing {sorted(set(codedeps.step_modules(step)) - set(code))}, "
            f"extra {sorted(set(code) - set(codedeps.step_modules(step)))}")
    # the transitive part is real: the steps run library modules they do not import themselves
    assert "loraflow/checks.py" in codedeps.step_modules("train")
    assert "loraflow/config.py" in codedeps.step_modules("model_card")


def test_editing_a_library_module_changes_the_cache_keys_of_exactly_the_steps_that_run_it(tmp_path):
    code = tmp_path / "code"
    for top in ("loraflow", "steps"):
        shutil.copytree(ROOT / top, code / top, ignore=shutil.ignore_patterns("__pycache__"))
    p = Paths(tmp_path / "project", MODE)
    write_jsonl(p.curated / "train.jsonl", [chat("q", "a")])
    write_jsonl(p.curated / "eval.jsonl", [chat("q2", "a2")])
    p.validation.mkdir(parents=True)
    (p.validation / "report.json").write_text('{"success": true}')
    params = load_params(ROOT / "params.yaml")

    def keys() -> dict[str, str]:
        return {s: step_cache_key(s, code)(None, {"params": params, "p": p}) for s in STEPS}

    before = keys()
    assert keys() == before
    checks = code / "loraflow" / "checks.py"
    checks.write_text(checks.read_text() + "\n# an edit to the loss mask's module\n")
    after = keys()
    changed = {s for s in STEPS if after[s] != before[s]}
    assert changed == {s for s in STEPS if "loraflow/checks.py" in codedeps.step_modules(s, code)}
    assert {"validate", "train"} <= changed and "curate" not in changed

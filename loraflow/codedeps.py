"""Which project modules a step runs: the code its results depend on.

A step's cached result (a `dvc repro` stage, a Prefect task) is only as fresh as its key. The key must hold every
project module the step can execute, found by following its imports transitively — function-level imports too,
since a step imports heavy or optional pieces lazily. dvc.yaml lists the same files under each stage's `deps`
(tests/test_layout.py checks the two agree) and flows/pipeline.py hashes them into each task's cache key, so
an edit to, say, the loss mask re-runs validate and train under both.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PROJECT_PACKAGES = ("loraflow", "steps", "flows")
ROOT = Path(__file__).resolve().parents[1]


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module name) for every import anywhere in `source` — `import`, `from ... import` (relative ones
    resolved against `module`) and `importlib.import_module("...")` with a literal name. `from a import b`
    yields both `a` and `a.b` (b may be a submodule)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if name]


def module_name(path: Path, root: Path = ROOT) -> str:
    """loraflow/serve/__init__.py -> loraflow.serve"""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of a project module (`loraflow.serve` -> loraflow/serve/__init__.py), None if not ours."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _packages_of(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@cache
def closure(entry: str, root: Path = ROOT) -> tuple[str, ...]:
    """Project files (relative, posix) that importing module `entry` may execute, its own file included."""
    seen: dict[str, Path] = {}
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name, root)
        if path is None:
            continue
        seen[name] = path
        todo += _packages_of(name)
        todo += [n for _, n in imports(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")]
    return tuple(sorted({p.relative_to(root).as_posix() for p in seen.values()}))


def step_modules(step: str, root: Path | str = ROOT) -> list[str]:
    """Project files (relative, posix) that `python -m steps.<step>` may execute, its own module included."""
    return list(closure(f"steps.{step}", Path(root).resolve()))

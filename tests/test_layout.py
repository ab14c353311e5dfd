"""The package's shape (issue 18 s2): stages in data-flow order, imports that only reach back up the flow, and
modules small enough to read.

Stages: data -> features -> env -> agents -> evaluation -> experiment -> scale -> deploy; the variants a user runs
(``sentio_lab/ppo*.py``), their shared run loop and the ``evaluate`` command sit on top. A module may import its
own stage and earlier ones only -- at module level or inside a function (a function-level import is still a
dependency) -- and nothing inside a stage imports a top-level file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sentio_lab"
STAGES = ("data", "features", "env", "agents", "evaluation", "experiment", "scale", "deploy")
TOP = len(STAGES)  # the variants, run_loop, evaluate and the package __init__
VARIANTS = ("ppo", "ppo_masked", "ppo_risk", "ppo_transformer", "ppo_portfolio")
MAX_MODULE_LINES = 500
MAX_VARIANT_LINES = 400


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def stage_of(module: str) -> int:
    """Stage index of a dotted ``sentio_lab`` module name (the package itself and top-level files: :data:`TOP`)."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in STAGES:
        return STAGES.index(parts[1])
    return TOP


def _dotted(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``sentio_lab`` import in ``path``, wherever it appears (functions included);
    ``from sentio_lab import x`` counts as importing ``sentio_lab.x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("sentio_lab")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "sentio_lab":
                found += [(node.lineno, f"sentio_lab.{a.name}") for a in node.names]
            elif node.module.startswith("sentio_lab."):
                found.append((node.lineno, node.module))
    return found


def layout_violations(paths: list[Path]) -> list[str]:
    """Every import that climbs to a later stage or reaches a top-level file from inside a stage."""
    problems = []
    for path in paths:
        own = _dotted(path)
        own_stage = stage_of(own)
        for line, module in imports_of(path):
            target = stage_of(module)
            if own_stage < TOP and target > own_stage:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({STAGES[own_stage]}) imports {module}")
    return problems


def test_no_import_climbs_a_stage():
    assert layout_violations(_modules()) == []


def test_the_check_sees_a_climbing_import(tmp_path):
    # the rule itself can fail: an env module importing the agents stage, even inside a function
    bad = PACKAGE / "env" / "_layout_probe.py"
    try:
        bad.write_text("def f():\n    from sentio_lab.agents import checkpoint\n    return checkpoint\n")
        assert layout_violations([bad]) == ["sentio_lab/env/_layout_probe.py:2 (env) imports sentio_lab.agents"]
        bad.write_text("from sentio_lab import ppo\n")
        assert layout_violations([bad]) == ["sentio_lab/env/_layout_probe.py:1 (env) imports sentio_lab.ppo"]
    finally:
        bad.unlink()


def test_stages_are_packages_and_variants_stay_single_files():
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
    for name in VARIANTS:
        assert (PACKAGE / f"{name}.py").is_file(), name
    top_level = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top_level == sorted(["__init__", "evaluate", "run_loop", *VARIANTS])


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_readable(path):
    lines = len(path.read_text().splitlines())
    limit = MAX_VARIANT_LINES if path.stem in VARIANTS else MAX_MODULE_LINES
    assert lines <= limit, f"{path.relative_to(PACKAGE.parent)} has {lines} lines (limit {limit})"

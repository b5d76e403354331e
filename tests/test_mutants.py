"""The mutation check's catalogue (tests/mutants.toml) stays applicable: every planted bug's text is still in its
file exactly once, and every test it names still exists. Run the check itself with `make mutation`."""

from __future__ import annotations

import ast
import re

import pytest

from scripts.mutation_check import load_mutants
from tests.conftest import PROJECT_ROOT

MUTANTS = load_mutants()


def _test_functions(path: str) -> set[str]:
    tree = ast.parse((PROJECT_ROOT / path).read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.id for m in MUTANTS])
def test_mutant_still_applies_and_names_existing_tests(mutant):
    planted = mutant.apply((PROJECT_ROOT / mutant.file).read_text())  # raises unless its text is there once
    assert planted != (PROJECT_ROOT / mutant.file).read_text()
    for test in mutant.tests:
        path, name = re.fullmatch(r"(tests/\w+\.py)::(\w+)(\[[\w.-]+\])?", test).group(1, 2)
        assert name in _test_functions(path), f"{mutant.id}: {test} does not exist"


def test_catalogue_size_and_reach():
    """At least 25 planted bugs, over every critical area."""
    assert len(MUTANTS) >= 25
    areas = {m.area for m in MUTANTS}
    assert {"index", "sharding", "checkpoint", "resume", "secrets", "host-sync", "validation"} <= areas

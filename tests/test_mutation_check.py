"""`scripts/mutation_check.py` builds the mutants it claims: one small change each, to valid code, in the functions
each target names (the runs themselves are long and live outside the default test run)."""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mutation_check.py"
spec = importlib.util.spec_from_file_location("mutation_check", SCRIPT)
mutation_check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mutation_check  # dataclasses look their module up there
spec.loader.exec_module(mutation_check)

SOURCE = '''
def f(x, y):
    """Doc 1."""
    if x < y and not y:
        return x + 2 * y
    return -x


def g(z):
    return z
'''


def test_each_mutant_changes_one_thing_in_the_named_function():
    target = mutation_check.Target("m.py", ("f",), ())
    points = mutation_check.mutation_points(ast.parse(SOURCE), target.functions)
    kinds = [kind for _, kind, _ in points]
    assert sorted(kinds) == sorted(["compare", "boolop", "unary", "binop", "binop", "int", "unary"])


def test_mutants_swap_one_node_and_leave_the_rest(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text(SOURCE)
    monkeypatch.setattr(mutation_check, "ROOT", tmp_path)
    found = mutation_check.mutants("m", mutation_check.Target("m.py", ("f",), ()))
    original = ast.unparse(ast.parse(SOURCE))
    assert len(found) == 7 and len({source for _, source in found}) == 7
    first, source = next((m, s) for m, s in found if m.kind == "compare")
    assert (first.line, first.before, first.after) == (4, "x < y", "x <= y")
    assert source == original.replace("if x < y and", "if x <= y and")
    assert all("Doc 1." in s and "def g(z):\n    return z" in s for _, s in found)  # docstrings, other functions


@pytest.mark.parametrize("name", sorted(mutation_check.TARGETS))
def test_every_target_finds_its_functions_and_tests_and_yields_valid_distinct_code(name):
    target = mutation_check.TARGETS[name]
    root = mutation_check.ROOT
    assert all((root / t).is_file() for t in target.tests)
    original = ast.unparse(ast.parse((root / target.module).read_text()))
    found = mutation_check.mutants(name, target)
    assert len(found) >= 5
    for mutant, source in found:
        ast.parse(source)  # valid Python
        assert source != original and mutant.before != mutant.after

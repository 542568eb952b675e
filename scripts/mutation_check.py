"""Mutation testing of the core modules: does the suite catch realistic one-line bugs?

    uv run python scripts/mutation_check.py                       # 25 mutants per target, 2 at a time
    uv run python scripts/mutation_check.py --targets ops checkpoint --sample 0   # every mutant of two targets

Each mutant is one small change to one line of a core module, the kind of bug a user would pay for: a comparison
flipped (`<` / `<=`, `==` / `!=`), an arithmetic operator swapped (`+` / `-`, `*` / `/`, `//` / `/`), an integer off
by one, a boolean flipped (`strict=True` → `False`), `and` / `or` swapped, a unary minus dropped, a call's result
replaced by its first argument (a skipped normalisation or conversion). Mutation points are enumerated in the
functions `TARGETS` names (docstrings and logging calls excluded), in file order.

For each mutant, the module is rewritten in a private copy of the repository (the working tree is never touched) and
that target's tests run there with `pytest -x` under a timeout; the mutant is killed when they fail (or time out),
and survives when they pass. The report, `benchmarks/results/mutation.{json,md}`, gives the kill rate per target and
overall and lists every survivor with its line; `docs/mutation_survivors.md` says why each one is left.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("mllm_sparse", "bootstrap", "llava_adapter", "mllm_sparse_recipes")


@dataclass(frozen=True)
class Target:
    """Functions of one module to mutate, and the tests that should catch the mutants."""

    module: str  # path from the repository root
    functions: tuple[str, ...]  # "name" or "Class.name"; () for every function of the module
    tests: tuple[str, ...]


TARGETS: dict[str, Target] = {
    "ops": Target("mllm_sparse/ops.py", (), ("tests/mllm_sparse/test_ops.py",)),
    "checkpoint": Target(
        "mllm_sparse/checkpoint.py",
        ("check_finite", "read_state_dict", "check_state_dict", "load_pretrained", "check_model_folder"),
        ("tests/mllm_sparse/test_checkpoint.py", "tests/mllm_sparse/test_bad_checkpoints.py"),
    ),
    "elastic": Target(
        "mllm_sparse/elastic.py",
        (),
        ("tests/mllm_sparse/test_elastic.py",),
    ),
    "converters": Target("bootstrap/converters.py", (), ("tests/bootstrap/test_inherit.py",)),
    "bootstrap_loss": Target(
        "bootstrap/train.py",
        ("roi_pooled_patches", "alignment_loss", "step_budgets", "rank_indices"),
        ("tests/bootstrap/test_losses.py", "tests/bootstrap/test_elastic_bootstrap.py"),
    ),
    "region_distill": Target(
        "bootstrap/region_distill.py", (), ("tests/bootstrap/test_losses.py", "tests/bootstrap/test_region_distill.py")
    ),
    "conversation": Target(
        "llava_adapter/conversation.py",
        ("validate_record", "encode_conversation", "_plain", "_vicuna_v1", "_chat_template"),
        ("tests/llava_adapter/test_conversation.py",),
    ),
    "token_counts": Target(
        "llava_adapter/towers.py",
        (
            "layer_tokens",
            "num_image_tokens",
            "PooledVisionModel.pool",
            "PooledVisionConfig.__init__",
            "PooledVisionConfig.check_budget",
        ),
        ("tests/llava_adapter/test_vlm.py",),
    ),
    "projector_io": Target(
        "llava_adapter/modeling.py",
        ("projector_state_dict", "save_projector", "read_projector", "load_projector"),
        ("tests/llava_adapter/test_loaders.py",),
    ),
    "scorer": Target(
        "llava_adapter/evaluate.py",
        ("normalize_answer", "is_correct", "questions", "accuracy_by"),
        ("tests/llava_adapter/test_chat_eval.py",),
    ),
    "paired_comparison": Target(
        "mllm_sparse_recipes/ablation/statistics.py", (), ("tests/recipes/test_ablation_statistics.py",)
    ),
}

COMPARE_SWAPS = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}  # fmt: skip
BINOP_SWAPS = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
}  # fmt: skip


@dataclass(frozen=True)
class Mutant:
    target: str
    index: int  # the n-th mutation point of the target
    line: int
    kind: str
    before: str
    after: str


def _docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of docstring constants and of logging/warning calls: changing them is no bug."""
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            skip.add(id(body[0].value))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in {"info", "warning", "debug", "error", "warn"}:
                skip |= {id(n) for n in ast.walk(node)}
        if isinstance(node, (ast.JoinedStr, ast.Raise, ast.Assert)):  # messages and checks of messages
            skip |= {id(n) for n in ast.walk(node) if not isinstance(n, (ast.Compare, ast.BoolOp))}
    return skip


def _functions(tree: ast.Module, names: tuple[str, ...]) -> list[ast.AST]:
    """The function nodes named in `names` ("f" or "Class.f"), or every function when `names` is empty."""
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (not names or node.name in names):
            found.append(node)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if not names or f"{node.name}.{item.name}" in names:
                        found.append(item)
    missing = (
        set(names)
        - {getattr(f, "name", "") for f in found}
        - {n for n in names if "." in n and any(getattr(f, "name", "") == n.split(".")[1] for f in found)}
    )
    if missing:
        raise ValueError(f"functions not found: {sorted(missing)}")
    return found


def mutation_points(tree: ast.Module, names: tuple[str, ...]) -> list[tuple[ast.AST, str, object]]:
    """(node, kind, detail) for every mutation in the named functions of `tree`, in file order."""
    skip = _docstring_nodes(tree)
    points = []
    for function in _functions(tree, names):
        for node in ast.walk(function):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Compare):
                points += [(node, "compare", i) for i, op in enumerate(node.ops) if type(op) in COMPARE_SWAPS]
            elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
                points.append((node, "binop", None))
            elif isinstance(node, ast.BoolOp):
                points.append((node, "boolop", None))
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
                points.append((node, "unary", None))
            elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
                points.append((node, "bool", None))
            elif isinstance(node, ast.Constant) and type(node.value) is int:
                points.append((node, "int", None))
            elif isinstance(node, ast.Call) and node.args and not node.keywords and _is_transform(node):
                points.append((node, "skip_call", None))
    points.sort(key=lambda p: (p[0].lineno, p[0].col_offset, p[1]))
    return points


# Calls that transform their first argument (a normalisation, a cast, a reshape): skipping one is a realistic bug.
TRANSFORMS = {
    "normalize", "float", "contiguous", "clamp", "softmax", "log_softmax", "sigmoid", "abs", "sqrt", "round", "int",
    "strip", "lower", "sorted", "reversed", "detach", "flatten", "squeeze", "unsqueeze",
}  # fmt: skip


def _is_transform(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in TRANSFORMS


def mutated_node(node: ast.AST, kind: str, detail: object) -> ast.AST:
    new = copy.deepcopy(node)
    if kind == "compare":
        new.ops[detail] = COMPARE_SWAPS[type(node.ops[detail])]()
    elif kind == "binop":
        new.op = BINOP_SWAPS[type(node.op)]()
    elif kind == "boolop":
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif kind == "unary":
        return new.operand
    elif kind == "bool":
        new.value = not node.value
    elif kind == "int":
        new.value = node.value + 1 if node.value in (0, -1) else node.value - 1
    elif kind == "skip_call":
        return new.args[0]
    return new


def mutants(name: str, target: Target) -> list[tuple[Mutant, str]]:
    """Every mutant of `target`, with the module source it gives (one parse; each node swapped in and back)."""
    tree = ast.parse((ROOT / target.module).read_text())
    parents = {id(child): parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    out = []
    for index, (node, kind, detail) in enumerate(mutation_points(tree, target.functions)):
        new = ast.fix_missing_locations(mutated_node(node, kind, detail))
        parent = parents[id(node)]
        field, position = _slot(parent, node)
        _put(parent, field, position, new)
        try:
            source = ast.unparse(tree)
        finally:
            _put(parent, field, position, node)
        out.append((Mutant(name, index, node.lineno, kind, ast.unparse(node), ast.unparse(new)), source))
    return out


def _slot(parent: ast.AST, node: ast.AST) -> tuple[str, int | None]:
    """Where `node` hangs under `parent`: the field, and the position when the field is a list."""
    for field, value in ast.iter_fields(parent):
        if value is node:
            return field, None
        if isinstance(value, list):
            for position, item in enumerate(value):
                if item is node:
                    return field, position
    raise LookupError(f"{ast.dump(node)[:60]} is not a child of its parent")


def _put(parent: ast.AST, field: str, position: int | None, node: ast.AST) -> None:
    if position is None:
        setattr(parent, field, node)
    else:
        getattr(parent, field)[position] = node


def repository_copy(into: Path) -> Path:
    """A private copy of the packages, tests and scripts, where mutants are written."""
    copy_root = into / "repo"
    for name in (*PACKAGES, "tests", "scripts"):
        shutil.copytree(ROOT / name, copy_root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy_root / "pyproject.toml")
    return copy_root


def run_tests(copy_root: Path, tests: tuple[str, ...], timeout: float) -> str:
    """'killed' when the tests fail or time out, 'survived' when they pass."""
    env = {**os.environ, "PYTHONPATH": str(copy_root), "OMP_NUM_THREADS": "1"}
    if env.pop("PYTHONDONTWRITEBYTECODE", None):  # else every run compiles torch and transformers again
        env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "mllm_sparse_test_pycache")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(command, cwd=copy_root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)"
    return "survived" if done.returncode == 0 else "killed"


def check(job: tuple[Mutant, str], target: Target, timeout: float) -> dict:
    mutant, source = job
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        copy_root = repository_copy(Path(tmp))
        (copy_root / target.module).write_text(source)
        start = time.perf_counter()
        outcome = run_tests(copy_root, target.tests, timeout)
    return {**asdict(mutant), "outcome": outcome, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=list(TARGETS))
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant's tests")
    parser.add_argument("--sample", type=int, default=25,
                        help="mutants per target, evenly spaced over its mutation points (0: all)")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    # The unmutated suite must pass first, or every mutant would look killed.
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        copy_root = repository_copy(Path(tmp))
        for name in args.targets:
            if not args.list and run_tests(copy_root, TARGETS[name].tests, args.timeout) != "survived":
                raise SystemExit(f"the tests of target {name!r} fail without any mutant: fix them first")

    jobs = []
    for name in args.targets:
        found = mutants(name, TARGETS[name])
        if args.sample and len(found) > args.sample:  # evenly spaced: every function of the target gets its share
            found = [found[round(i * (len(found) - 1) / (args.sample - 1))] for i in range(args.sample)]
        jobs += [(job, TARGETS[name]) for job in found]
    if args.list:
        for mutant, _ in (job for job, _ in jobs):
            print(f"{mutant.target}:{mutant.index} line {mutant.line} {mutant.kind}: {mutant.before} -> {mutant.after}")
        return 0
    start = time.perf_counter()
    results = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(check, job, target, args.timeout) for job, target in jobs]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            results.append(future.result())
            print(f"{done}/{len(futures)} {results[-1]['target']}:{results[-1]['index']} {results[-1]['outcome']}",
                  flush=True)  # fmt: skip
    results.sort(key=lambda r: (r["target"], r["index"]))
    write_report(args, results, time.perf_counter() - start)
    return 0


def write_report(args, results: list[dict], seconds: float) -> None:
    by_target = {}
    for name in args.targets:
        rows = [r for r in results if r["target"] == name]
        killed = sum(r["outcome"].startswith("killed") for r in rows)
        by_target[name] = {"mutants": len(rows), "killed": killed, "kill_rate": killed / len(rows) if rows else None}
    total = len(results)
    killed = sum(r["outcome"].startswith("killed") for r in results)
    report = {
        "command": "uv run python scripts/mutation_check.py " + " ".join(sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "jobs": args.jobs,
        "seconds": round(seconds, 1),
        "mutants": total,
        "killed": killed,
        "kill_rate": killed / total if total else None,
        "by_target": by_target,
        "results": results,
    }
    lines = [
        "# Mutation check",
        "",
        f"`{report['command']}`: {total} mutants, **{killed} killed ({killed / max(total, 1) * 100:.1f}%)**, "
        f"{seconds / 60:.1f} min on {os.cpu_count()} cores with {args.jobs} at once.",
        "",
        "| target | module | mutants | killed | kill rate |",
        "|---|---|---:|---:|---:|",
    ]
    for name, row in by_target.items():
        rate = "n/a" if row["kill_rate"] is None else f"{row['kill_rate'] * 100:.1f}%"
        lines.append(f"| {name} | `{TARGETS[name].module}` | {row['mutants']} | {row['killed']} | {rate} |")
    survivors = [r for r in results if r["outcome"] == "survived"]
    lines += ["", f"## Survivors ({len(survivors)}; why each is left: `docs/mutation_survivors.md`)", ""]
    lines += [
        f"- `{r['target']}:{r['index']}` line {r['line']} ({r['kind']}): `{r['before']}` → `{r['after']}`"
        for r in survivors
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "mutation.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "mutation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())

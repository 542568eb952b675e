"""The packages depend on each other one way: mllm_sparse <- bootstrap <- llava_adapter <- mllm_sparse_recipes."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["mllm_sparse", "bootstrap", "llava_adapter", "mllm_sparse_recipes"]
HEAVY = ["deepspeed", "gradio", "matplotlib", "open_clip", "peft"]
# bootstrap registers its teachers' architectures with open_clip on import; nothing else needs a heavy import
ALLOWED = {"bootstrap": {"open_clip"}}


def imported_packages(package: str) -> list[str]:
    """Top-level packages (of ours and the heavy ones) loaded by `import package` in a fresh interpreter."""
    code = (
        f"import sys, json, {package}\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({LAYERS + HEAVY!r}))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stderr == "", f"`import {package}` printed to stderr:\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.mark.parametrize("index", range(3))
def test_importing_a_library_loads_no_layer_above_it_and_prints_nothing(index: int):
    package = LAYERS[index]
    loaded = imported_packages(package)
    assert package in loaded
    assert not set(loaded) & set(LAYERS[index + 1 :]), f"`import {package}` loaded {loaded}"
    assert not set(loaded) & (set(HEAVY) - ALLOWED.get(package, set())), f"`import {package}` loaded {loaded}"


def test_deepspeed_imported_after_the_project_prints_nothing():
    """transformers imports DeepSpeed as a model saves; on a CPU machine its fallback notice went to stdout."""
    code = "import mllm_sparse, deepspeed; from deepspeed.accelerator import get_accelerator; get_accelerator()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout == ""


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("index", range(3))
def test_no_module_of_a_library_imports_a_layer_above_it(index: int):
    above = set(LAYERS[index + 1 :])
    offenders = {
        str(path.relative_to(ROOT)): sorted(name for name in imports_of(path) if name.split(".")[0] in above)
        for path in sorted((ROOT / LAYERS[index]).rglob("*.py"))
    }
    assert not {path: names for path, names in offenders.items() if names}

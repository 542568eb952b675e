"""The `mllm-sparse` command line: every command's help loads no torch, states each option's default, and agrees
with the typed settings the command hands to its library."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mllm_sparse_recipes.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]


def command_module(name: str):
    return importlib.import_module(f"mllm_sparse_recipes.commands.{name.replace('-', '_')}")


def test_help_and_every_command_help_load_no_torch():
    code = (
        "import sys, json, contextlib, io\n"
        "from mllm_sparse_recipes.cli import COMMANDS, main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help']); main(['--version'])\n"
        "    for name in COMMANDS:\n"
        "        try:\n"
        "            main([name, '--help'])\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'numpy', 'PIL') if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(done.stdout) == []


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("mllm-sparse ")


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_says_what_it_does_and_its_default(name: str):
    parser = command_module(name).build_parser()
    formatter = parser.formatter_class(prog=parser.prog)
    for action in options(parser):
        assert action.help, f"mllm-sparse {name} {action.option_strings[0]} has no help"
        text = formatter._get_help_string(action) % {"default": action.default}
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        assert flag or action.required or "default" in text, (
            f"mllm-sparse {name} {action.option_strings[0]}: the help does not state the default"
        )


def settings_type(name: str):
    module, _, attribute = command_module(name).SETTINGS.partition(":")
    return getattr(importlib.import_module(module), attribute)


@pytest.mark.parametrize("name", [n for n in COMMANDS if hasattr(command_module(n), "SETTINGS")])
def test_the_parser_defaults_are_the_settings_defaults(name: str):
    parser = command_module(name).build_parser()
    fields = {f.name: f for f in dataclasses.fields(settings_type(name))}
    for action in parser._actions:
        field = fields.get(action.dest)
        if field is None or action.required or action.default is argparse.SUPPRESS:
            continue
        assert field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING, (
            f"{name}: --{action.dest} has a default in the parser but not in the settings"
        )
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert action.default == default, f"{name}: --{action.dest} defaults to {action.default!r} vs {default!r}"


def test_the_command_line_draws_no_bar_per_model_file_but_keeps_download_bars(tmp_path, capfd):
    import mllm_sparse

    mllm_sparse.create_model("test_sparseformer_btsp").save_pretrained(tmp_path / "encoder")
    capfd.readouterr()
    assert main(["inspect", str(tmp_path / "encoder"), "--out", str(tmp_path / "roi.png")]) == 0
    assert "Loading weights" not in capfd.readouterr().err  # transformers' bar for each model loaded
    from huggingface_hub.utils import are_progress_bars_disabled

    assert not are_progress_bars_disabled()  # a first download still shows its progress

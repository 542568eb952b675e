"""One module per `mllm-sparse` command: its argument parser and `main(argv)`, nothing else.

A command module imports only the standard library at its top, so `mllm-sparse COMMAND --help` answers before torch
loads. `main` parses the arguments, turns them into the typed settings of the library function that does the work
(`settings_from`), imports that library and calls it; recipes call the same library functions with the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and ends every option's help with its default, unless the help already says
    it (a default of None or False is no value to show: such an option's help says what leaving it out means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        shown = action.option_strings and not nothing
        if shown and "default" not in text and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def parser(command: str, description: str) -> argparse.ArgumentParser:
    """The parser of `mllm-sparse COMMAND`, with the project's help layout."""
    return argparse.ArgumentParser(
        prog=f"mllm-sparse {command}", description=description, formatter_class=HelpFormatter
    )


def settings_from(args: argparse.Namespace, settings_type: type[T], **values: Any) -> T:
    """`settings_type` filled from the parsed arguments whose names are its fields, then from `values`."""
    names = {field.name for field in dataclasses.fields(settings_type)}
    return settings_type(**{**{k: v for k, v in vars(args).items() if k in names}, **values})

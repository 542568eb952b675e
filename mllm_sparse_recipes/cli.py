"""`mllm-sparse` console script: dispatches `mllm-sparse COMMAND ...` to the command module's `main(argv)`.

This module imports only the standard library, so `--help` and `--version` answer before torch loads; a command's
module is imported once that command runs.
"""

from __future__ import annotations

import importlib
import logging
import sys
from importlib import metadata

# command -> one-line help; its module is mllm_sparse_recipes.commands.COMMAND (dashes as underscores)
COMMANDS: dict[str, str] = {
    "quickstart": "the whole pipeline on the synthetic world, end to end",
    "inspect": "print an encoder's parameters, GFLOPs and tokens; draw its RoIs",
    "synth": "generate the built-in synthetic world (images, captions, labels, LLaVA QA)",
    "train-teacher": "train a small open_clip CLIP on a synthetic world's captions",
    "bootstrap": "bootstrap a SparseFormer from a CLIP ViT teacher (no labels)",
    "eval-encoder": "compare a bootstrapped encoder with its teacher",
    "pretrain-llm": "teach a tiny LLM the synthetic world's QA on its scenes",
    "build-vlm": "assemble a LLaVA model: vision tower + projector + causal LM",
    "swap": "replace the vision tower of a llava-hf checkpoint (keeps LLM and tokenizer)",
    "merge-lora": "fold a LoRA training run into one full LLaVA model",
    "eval-vlm": "score a LLaVA model on a LLaVA JSON test set: accuracy, throughput",
    "lmms-task": "write a LLaVA JSON test set as a local lmms-eval task pack (eval-vlm's scoring)",
    "ablate": "how many image tokens? SparseFormer vs pooling vs full ViT",
    "demo": "a Gradio chat with a LLaVA model that shows where its image tokens look",
}


def is_user_error(err: BaseException) -> bool:
    """Errors that describe bad input (a path, a preset, a checkpoint, an image, a setting); anything else is a bug
    and keeps its traceback."""
    if isinstance(err, (ValueError, FileNotFoundError)):
        return True
    checkpoint = sys.modules.get("mllm_sparse.checkpoint")  # loaded by any command that could raise it
    return checkpoint is not None and isinstance(err, checkpoint.CheckpointMismatchError)


def version() -> str:
    try:
        return metadata.version("mllm-sparse")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mllm-sparse [--version] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run `mllm-sparse COMMAND --help` for a command's options."]
    return "\n".join(lines)


PACKAGES = ("mllm_sparse", "bootstrap", "llava_adapter", "mllm_sparse_recipes")


def configure_logging() -> None:
    """Our packages log through `logging`: the command line shows their INFO lines as plain text on stderr, and only
    the warnings of the libraries we call (their INFO chatter, e.g. open_clip's model building, stays quiet)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    for package in PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO)


def quiet_model_files() -> None:
    """transformers draws a progress bar for each model it loads or saves, and a pipeline loads and saves dozens: the
    command line turns those off and keeps the hub's download bars (a first download can take an hour)."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # also the hub's: turned back on below
    enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"mllm-sparse {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mllm-sparse: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    configure_logging()
    if not {"-h", "--help"} & set(rest):  # help stays free of the libraries
        quiet_model_files()
    module = importlib.import_module(f"mllm_sparse_recipes.commands.{command.replace('-', '_')}")
    try:
        return module.main(rest) or 0
    except Exception as err:
        if not is_user_error(err):
            raise
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"mllm-sparse {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

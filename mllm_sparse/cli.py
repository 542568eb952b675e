"""`mllm-sparse` console script: dispatches `mllm-sparse COMMAND ...` to the command module's `main(argv)`."""

from __future__ import annotations

import importlib
import sys

from .checkpoint import CheckpointMismatchError

# Errors that describe bad input (a path, a preset, a checkpoint, an image); anything else is a bug and keeps
# its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointMismatchError)

# command -> (module with `main(argv)`, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("llava_adapter.quickstart", "the whole pipeline on the synthetic world: world, encoder, VLM, eval"),
    "inspect": ("mllm_sparse.inspect_encoder", "print an encoder's parameters, GFLOPs and tokens; draw its RoIs"),
    "synth": ("mllm_sparse.synth.cli", "generate the built-in synthetic world (images, captions, labels, LLaVA QA)"),
    "train-teacher": ("bootstrap.train_teacher", "train a small open_clip CLIP on a synthetic world's captions"),
    "bootstrap": ("bootstrap.train", "bootstrap a SparseFormer from a CLIP ViT teacher (no labels)"),
    "eval-encoder": ("bootstrap.evaluate", "compare a bootstrapped encoder with its teacher"),
    "pretrain-llm": ("llava_adapter.pretrain_llm", "scene pretraining: teach a tiny LLM the world's QA on its scenes"),
    "build-vlm": ("llava_adapter.build_vlm", "assemble a LLaVA model: vision tower + projector + causal LM"),
    "swap": ("llava_adapter.swap", "replace the vision tower of a llava-hf checkpoint (keeps LLM and tokenizer)"),
    "merge-lora": ("llava_adapter.merge_lora", "fold a LoRA training run into one full LLaVA model"),
    "eval-vlm": ("llava_adapter.evaluate", "score a LLaVA model on a LLaVA JSON test set: accuracy, throughput"),
    "ablate": ("llava_adapter.ablation", "how many image tokens? SparseFormer vs pooled vs full ViT, tables and plots"),
    "demo": ("llava_adapter.demo", "a Gradio chat with a LLaVA model that shows where its image tokens look"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mllm-sparse COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `mllm-sparse COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mllm-sparse: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return module.main(rest) or 0
    except USER_ERRORS as err:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"mllm-sparse {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

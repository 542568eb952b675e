"""`mllm-sparse synth` (not yet split from its library module)."""

from mllm_sparse.synth.cli import build_parser, main  # noqa: F401

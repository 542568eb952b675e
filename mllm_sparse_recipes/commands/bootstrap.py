"""`mllm-sparse bootstrap` (not yet split from its library module)."""

from bootstrap.train import build_parser, main  # noqa: F401

"""`mllm-sparse train-teacher` (not yet split from its library module)."""

from bootstrap.train_teacher import build_parser, main  # noqa: F401

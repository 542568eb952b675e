"""`mllm-sparse demo` (not yet split from its library module)."""

from mllm_sparse_recipes.demo import build_parser, main  # noqa: F401

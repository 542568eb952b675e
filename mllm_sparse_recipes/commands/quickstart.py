"""`mllm-sparse quickstart` (not yet split from its library module)."""

from mllm_sparse_recipes.quickstart import build_parser, main  # noqa: F401

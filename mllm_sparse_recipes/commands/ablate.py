"""`mllm-sparse ablate` (not yet split from its library module)."""

from mllm_sparse_recipes.ablation import build_parser, main  # noqa: F401

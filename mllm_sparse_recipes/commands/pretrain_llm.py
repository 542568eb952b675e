"""`mllm-sparse pretrain-llm` (not yet split from its library module)."""

from mllm_sparse_recipes.scene_llm import build_parser, main  # noqa: F401

"""Registers the LLaVA pipeline's classes with transformers' Auto classes (imported by `mllm_sparse`)."""

from . import processing, towers  # noqa: F401  (each registers on import)

"""`mllm-sparse build-vlm` (not yet split from its library module)."""

from llava_adapter.build_vlm import build_parser, main  # noqa: F401

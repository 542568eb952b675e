"""`mllm-sparse eval-vlm` (not yet split from its library module)."""

from llava_adapter.evaluate import build_parser, main  # noqa: F401

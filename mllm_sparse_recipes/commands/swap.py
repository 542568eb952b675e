"""`mllm-sparse swap` (not yet split from its library module)."""

from llava_adapter.swap import build_parser, main  # noqa: F401

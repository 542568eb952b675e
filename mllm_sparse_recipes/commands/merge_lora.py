"""`mllm-sparse merge-lora` (not yet split from its library module)."""

from llava_adapter.merge_lora import main  # noqa: F401

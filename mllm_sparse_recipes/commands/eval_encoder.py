"""`mllm-sparse eval-encoder` (not yet split from its library module)."""

from bootstrap.evaluate import main  # noqa: F401

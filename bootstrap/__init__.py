"""bootstrap: CLIP teachers, and (next) turning a CLIP ViT into a SparseFormer.

Importing it registers the small open_clip architectures of `model_configs/` (teachers for the synthetic world).
"""

from .teacher_models import TEACHER_MODELS, register_teacher_configs

register_teacher_configs()

__all__ = ["TEACHER_MODELS", "register_teacher_configs"]

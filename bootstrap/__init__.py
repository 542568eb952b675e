"""bootstrap: CLIP teachers, and (next) turning a CLIP ViT into a SparseFormer.

Importing it registers the small open_clip architectures of `model_configs/` (teachers for the synthetic world).
"""

from .inherit import InheritanceReport, inherit, student_config
from .teacher_models import TEACHER_MODELS, register_teacher_configs
from .teachers import Teacher, TeacherArch, load_teacher

register_teacher_configs()

__all__ = [
    "TEACHER_MODELS",
    "InheritanceReport",
    "Teacher",
    "TeacherArch",
    "inherit",
    "load_teacher",
    "register_teacher_configs",
    "student_config",
]

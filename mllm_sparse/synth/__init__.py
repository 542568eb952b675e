"""The built-in synthetic visual world: the default data for every stage, from teacher to VLM evaluation."""

from .generate import generate_world
from .text import QUESTION_TYPES, caption, make_question
from .world import COLORS, SHAPES, Scene, SceneObject, WorldSettings, class_names, make_scene

__all__ = [
    "COLORS",
    "QUESTION_TYPES",
    "SHAPES",
    "Scene",
    "SceneObject",
    "WorldSettings",
    "caption",
    "class_names",
    "generate_world",
    "make_question",
    "make_scene",
]

"""The built-in synthetic visual world: scenes of coloured shapes on textured, cluttered backgrounds.

A scene has one principal object (the largest, by a clear margin: it defines the image's class label) and up to
seven others, mostly small, so that answering questions about them needs tokens that focus on small regions. Every
object has a dark outline: the same edge whatever its colour and background, which lets a small ViT learn shapes
(and not only colours) from a few tens of thousands of images. The six shapes differ at low resolution too: a ring
rather than a diamond, which a 112-pixel ViT confuses with the triangle.
Everything is a pure function of (settings, seed, index), so any image can be regenerated on its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "ring", "star", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
    "pink": (245, 130, 190),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "medium", "large")
# Half-extent of an object as a fraction of the image side, per size class.
SIZE_RANGES = {"small": (0.035, 0.06), "medium": (0.075, 0.11), "large": (0.14, 0.2)}
DIFFICULTIES = ("easy", "default", "hard")
OUTLINE_COLOR = (25, 25, 25)


@dataclass(frozen=True)
class WorldSettings:
    """The knobs of the world. `for_difficulty` gives the three named settings."""

    difficulty: str = "default"
    min_objects: int = 1
    max_objects: int = 8
    # Size-class probabilities of the non-principal objects (small, medium, large).
    other_size_probs: tuple[float, float, float] = (0.75, 0.25, 0.0)
    # Size classes the principal object may take.
    principal_sizes: tuple[str, ...] = ("large",)
    # The principal object's area exceeds every other object's by at least this factor.
    principal_margin: float = 3.0
    texture_strength: float = 0.2
    clutter_items: int = 8
    # Clutter drawn in saturated object colours (hard) rather than muted greys.
    colored_clutter: bool = False
    # Per-object colour jitter (std, in 0-255 units), which blurs the line between neighbouring colours.
    color_jitter: float = 12.0
    # Questions per image record: 1, or 2..max_turns (see `text.scene_conversations`).
    max_turns: int = 12

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1 (questions per image record), got {self.max_turns}")

    @classmethod
    def for_difficulty(cls, difficulty: str) -> WorldSettings:
        if difficulty == "easy":
            return cls("easy", 1, 3, (0.2, 0.8, 0.0), ("large",), 3.0, 0.1, 0, False, 4.0)
        if difficulty == "default":
            return cls()
        if difficulty == "hard":
            return cls("hard", 3, 8, (0.85, 0.15, 0.0), ("medium",), 1.4, 0.5, 30, True, 22.0)
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")


@dataclass
class SceneObject:
    """One object: `cx, cy` its centre and `radius` its half-extent, all as fractions of the image side."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def area(self) -> float:
        return self.radius**2


@dataclass
class Scene:
    """A scene; `objects[0]` is the principal (largest) object, whose name is the image's class label."""

    objects: list[SceneObject]

    @property
    def principal(self) -> SceneObject:
        return self.objects[0]

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls([SceneObject(**o) for o in data["objects"]])


def class_names() -> list[str]:
    """The 48 class names, "colour shape", in a fixed order; a scene's label is its principal object's name."""
    return [f"{color} {shape}" for color in COLORS for shape in SHAPES]


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def sample_scene(settings: WorldSettings, rng: np.random.Generator) -> Scene:
    """Sample objects that do not overlap. The principal object comes first."""
    count = int(rng.integers(settings.min_objects, settings.max_objects + 1))
    principal_size = settings.principal_sizes[int(rng.integers(len(settings.principal_sizes)))]
    other_sizes = rng.choice(len(SIZES), size=count, p=settings.other_size_probs)
    shapes = rng.integers(len(SHAPES), size=count)
    colors = rng.integers(len(COLOR_NAMES), size=count)
    objects: list[SceneObject] = []
    for i in range(count):
        size = principal_size if i == 0 else SIZES[other_sizes[i]]
        low, high = SIZE_RANGES[size]
        radius = float(rng.uniform(low, high))
        if i > 0:
            # Keep the principal object clearly the largest.
            radius = min(radius, objects[0].radius / math.sqrt(settings.principal_margin))
            size = _size_class(radius)
        placed = _place(radius, objects, rng)
        if placed is None:
            continue
        objects.append(SceneObject(SHAPES[shapes[i]], COLOR_NAMES[colors[i]], size, placed[0], placed[1], radius))
    return Scene(objects)


def _size_class(radius: float) -> str:
    if radius < SIZE_RANGES["medium"][0]:
        return "small"
    return "medium" if radius < SIZE_RANGES["large"][0] else "large"


def _place(radius: float, others: list[SceneObject], rng: np.random.Generator) -> tuple[float, float] | None:
    """A centre keeping the object inside the image and apart from the others, or None after 60 tries."""
    for _ in range(60):
        cx, cy = rng.uniform(radius + 0.01, 1 - radius - 0.01, size=2)
        if all(math.hypot(cx - o.cx, cy - o.cy) > radius + o.radius + 0.02 for o in others):
            return float(cx), float(cy)
    return None


def render_scene(scene: Scene, settings: WorldSettings, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene: a smooth random-colour texture, clutter strokes, then the objects (largest first)."""
    # Mostly luminance texture with a third as much colour texture, around a random muted base colour.
    luminance = rng.uniform(-1, 1, size=(6, 6, 1))
    chroma = rng.uniform(-1, 1, size=(6, 6, 3)) / 3
    base = rng.uniform(90, 170, size=3)
    background = base + (luminance + chroma) * 127 * settings.texture_strength
    small = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    image = small.resize((image_size, image_size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    palette = list(COLORS.values())
    for _ in range(settings.clutter_items):
        x0, y0 = rng.uniform(0, image_size, size=2)
        length = rng.uniform(0.03, 0.12) * image_size
        angle = rng.uniform(0, 2 * math.pi)
        if settings.colored_clutter:
            color = tuple(int(c) for c in palette[int(rng.integers(len(palette)))])
        else:
            grey = int(rng.uniform(60, 200))
            color = (grey, grey, grey)
        width = max(1, round(image_size / 112))
        draw.line([x0, y0, x0 + length * math.cos(angle), y0 + length * math.sin(angle)], fill=color, width=width)
    for obj in scene.objects:
        rgb = np.array(COLORS[obj.color], dtype=np.float64) + rng.normal(0, settings.color_jitter, size=3)
        _draw_shape(draw, obj, image_size, tuple(int(c) for c in np.clip(rgb, 0, 255)))
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, image_size: int, fill: tuple[int, int, int]) -> None:
    """Fill the shape and draw its dark outline, a tenth of the radius thick (at least a pixel), so that small
    objects keep their colour."""
    cx, cy, r = obj.cx * image_size, obj.cy * image_size, obj.radius * image_size
    width = max(1, round(0.1 * r))
    style = {"fill": fill, "outline": OUTLINE_COLOR, "width": width}
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **style)
    elif obj.shape == "ring":
        # The hole (half the radius) shows the background; the outline runs round both edges of the band.
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(0.5 * r)))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=OUTLINE_COLOR, width=width)
        h = 0.5 * r + width
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], outline=OUTLINE_COLOR, width=width)
    elif obj.shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], **style)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.94, cy + r * 0.7), (cx - r * 0.94, cy + r * 0.7)], **style)
    elif obj.shape == "star":
        points = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            points.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(points, **style)
    elif obj.shape == "cross":
        # One 12-corner polygon, so the outline runs round the cross and not across its centre.
        t = r * 0.33
        corners = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t)]
        corners += [(-x, -y) for x, y in corners]
        draw.polygon([(cx + dx, cy + dy) for dx, dy in corners], **style)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def make_scene(settings: WorldSettings, seed: int, index: int, image_size: int) -> tuple[Scene, Image.Image]:
    """Scene and image number `index` of the world with this seed (independent of every other index)."""
    rng = scene_rng(seed, index)
    scene = sample_scene(settings, rng)
    return scene, render_scene(scene, settings, image_size, rng)

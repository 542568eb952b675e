"""Drawing where the tokens look: each latent token's RoI, and optionally its sampling points, over the image."""

from __future__ import annotations

import matplotlib
from PIL import Image, ImageDraw
from torch import Tensor

from .modeling import SparseFormerOutput


def token_colors(num_tokens: int) -> list[tuple[int, int, int]]:
    """Distinct RGB colours, one per token."""
    cmap = matplotlib.colormaps["hsv"]
    return [tuple(int(255 * c) for c in cmap(i / max(num_tokens, 1))[:3]) for i in range(num_tokens)]


def draw_rois(
    image: Image.Image,
    output: SparseFormerOutput,
    index: int = 0,
    show_points: bool = False,
    tokens: list[int] | None = None,
    line_width: int | None = None,
) -> Image.Image:
    """Draw each token's final RoI (and its last sampling points) over the image the model saw.

    Args:
        image: the image the output came from (any size; RoIs are normalised, so they scale to it).
        output: a `SparseFormerOutput`; `show_points` needs it to come from `output_sampling_points=True`.
        index: which batch element to draw.
        show_points: also draw the sampling points of the last sampling op.
        tokens: latent token indices to draw (default: all).
        line_width: RoI outline width in pixels (default: scales with the image).
    Returns:
        A new RGB image; the input is untouched.
    """
    if output.rois is None:
        raise ValueError("draw_rois needs an output with rois")
    rois: Tensor = output.rois[index].detach().float().cpu()
    points = None
    if show_points:
        recorded = [p for p in (output.sampling_points or ()) if p is not None]
        if not recorded:
            raise ValueError("show_points=True needs an output from forward(..., output_sampling_points=True)")
        points = recorded[-1][index].detach().float().cpu()
    selected = range(rois.shape[0]) if tokens is None else tokens
    canvas = image.convert("RGB").copy()
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    width, height = canvas.size
    line_width = line_width or max(1, round(min(width, height) / 160))
    radius = max(1.0, min(width, height) / 200)
    colors = token_colors(rois.shape[0])
    for i in selected:
        x1, y1, x2, y2 = rois[i].tolist()
        box = [min(x1, x2) * width, min(y1, y2) * height, max(x1, x2) * width, max(y1, y2) * height]
        draw.rectangle(box, outline=colors[i] + (230,), width=line_width)
        if points is not None:
            for x, y in points[i].tolist():
                cx, cy = x * width, y * height
                draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colors[i] + (200,))
    return Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")

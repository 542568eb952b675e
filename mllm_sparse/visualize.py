"""Drawing where the tokens look: each latent token's RoI, and optionally its sampling points, over the image."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .modeling import SparseFormerOutput


def token_colors(num_tokens: int) -> list[tuple[int, int, int]]:
    """Distinct RGB colours, one per token."""
    import matplotlib  # here, not at the top: `import mllm_sparse` stays free of matplotlib

    cmap = matplotlib.colormaps["hsv"]
    return [tuple(int(255 * c) for c in cmap(i / max(num_tokens, 1))[:3]) for i in range(num_tokens)]


def draw_rois(
    image: Image.Image,
    output: SparseFormerOutput,
    index: int = 0,
    show_points: bool = False,
    tokens: list[int] | None = None,
    line_width: int | None = None,
    numbered: bool = False,
) -> Image.Image:
    """Draw each token's final RoI (and its last sampling points) over the image the model saw.

    Args:
        image: the image the output came from, as the model saw it (any size; RoIs are normalised to the model's
            input, so draw on its crop: `images.center_square` of the image given to `preprocess`).
        output: a `SparseFormerOutput`; `show_points` needs it to come from `output_sampling_points=True`.
        index: which batch element to draw.
        show_points: also draw the sampling points of the last sampling op.
        tokens: latent token indices to draw (default: all).
        line_width: RoI outline width in pixels (default: scales with the image).
        numbered: write each token's number (1 to N) in its RoI's top-left corner.
    Returns:
        A new RGB image; the input is untouched.
    """
    if output.rois is None:
        raise ValueError("draw_rois needs an output with rois")
    rois: Tensor = output.rois[index]
    points = None
    if show_points:
        recorded = [p for p in (output.sampling_points or ()) if p is not None]
        if not recorded:
            raise ValueError("show_points=True needs an output from forward(..., output_sampling_points=True)")
        points = recorded[-1][index]
    return draw_boxes(image, rois, points=points, tokens=tokens, line_width=line_width, numbered=numbered)


ATTENTION_COLORMAP = "viridis"  # perceptually even, readable over a photo and in grey
MAX_FILL_ALPHA = 80  # of 255: the most-attended box, even under others, leaves the photo visible


def attention_color(value: float) -> tuple[int, int, int]:
    """The fill colour of a weight in [0, 1] (its share of the largest), on `ATTENTION_COLORMAP`."""
    import matplotlib

    return tuple(int(255 * c) for c in matplotlib.colormaps[ATTENTION_COLORMAP](value)[:3])


def draw_boxes(
    image: Image.Image,
    boxes: Tensor,
    weights: Tensor | None = None,
    points: Tensor | None = None,
    tokens: list[int] | None = None,
    line_width: int | None = None,
    numbered: bool = False,
) -> Image.Image:
    """Draw one box per token over the image, each in its own colour (the colours of `draw_rois`).

    Args:
        image: the picture the boxes refer to (any size; boxes are normalised, so they scale to it).
        boxes: [N, 4] normalised x1, y1, x2, y2 (e.g. RoIs, patch cells or pooled grid cells).
        weights: [N] non-negative, e.g. how much attention each token received; each box is then filled,
            translucently, in the colour of its weight over the largest one (`attention_color`, `ATTENTION_COLORMAP`)
            and more opaque the larger it is.
        points: [N, P, 2] normalised x, y per token, drawn as dots (e.g. SparseFormer sampling points).
        tokens: indices of the boxes to draw (default: all).
        line_width: outline width in pixels (default: scales with the image).
        numbered: write each box's token number (1 to N, the order the LLM reads them) in its top-left corner.
    Returns:
        A new RGB image; the input is untouched.
    """
    boxes = boxes.detach().float().cpu()
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {list(boxes.shape)}")
    if weights is not None:
        weights = weights.detach().float().cpu()
        if weights.shape != boxes.shape[:1]:
            raise ValueError(f"weights must be [{boxes.shape[0]}], one per box, got {list(weights.shape)}")
        weights = weights.clamp(min=0) / weights.max().clamp(min=1e-12)
    selected = range(boxes.shape[0]) if tokens is None else tokens
    canvas = image.convert("RGB").copy()
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    width, height = canvas.size
    line_width = line_width or max(1, round(min(width, height) / 160))
    radius = max(1.0, min(width, height) / 200)
    colors = token_colors(boxes.shape[0])
    # Fills first, the least attended first, so that every outline stays visible over any fill
    order = list(selected)
    if weights is not None:
        for i in sorted(order, key=lambda i: float(weights[i])):
            alpha = int(MAX_FILL_ALPHA * float(weights[i]))
            draw.rectangle(_pixel_box(boxes[i], width, height), fill=attention_color(float(weights[i])) + (alpha,))
    for i in order:
        draw.rectangle(_pixel_box(boxes[i], width, height), outline=colors[i] + (230,), width=line_width)
        if points is not None:
            for x, y in points[i].detach().float().cpu().tolist():
                cx, cy = x * width, y * height
                draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colors[i] + (200,))
    if numbered:
        font = ImageFont.load_default(size=max(9, round(min(width, height) / 40)))
        for i in order:
            x1, y1, _, _ = _pixel_box(boxes[i], width, height)
            at = (min(max(x1, 0) + line_width + 1, width - 1), min(max(y1, 0) + line_width, height - 1))
            label = str(i + 1)
            left, top, right, bottom = draw.textbbox(at, label, font=font)
            # a tag in the box's colour, its number in black or white, whichever contrasts: legible on any colour
            draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colors[i] + (255,))
            draw.text(at, label, fill=_contrasting_text(colors[i]), font=font)
    return Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")


def _contrasting_text(color: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Black on a light colour, white on a dark one (relative luminance, ITU-R BT.709 weights)."""
    luminance = 0.2126 * color[0] + 0.7152 * color[1] + 0.0722 * color[2]
    return (0, 0, 0, 255) if luminance > 140 else (255, 255, 255, 255)


def _pixel_box(box: Tensor, width: int, height: int) -> list[float]:
    x1, y1, x2, y2 = box.tolist()
    return [min(x1, x2) * width, min(y1, y2) * height, max(x1, x2) * width, max(y1, y2) * height]


def with_caption(picture: Image.Image, lines: list[str], color_scale: tuple[str, str] | None = None) -> Image.Image:
    """`picture` with a white strip under it holding `lines` of text and, with `color_scale` (the labels of its two
    ends), a bar of `ATTENTION_COLORMAP` from 0 to 1: the legend of `draw_boxes`' fills."""
    font = ImageFont.load_default(size=max(11, picture.width // 40))
    line = font.size + 6
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [wrapped for text in lines for wrapped in wrap(text, measure, font, picture.width - 12)]
    rows = len(lines) + (color_scale is not None)
    strip = Image.new("RGB", (picture.width, line * rows + 6), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, text in enumerate(lines):
        draw.text((6, 4 + i * line), text, fill=(0, 0, 0), font=font)
    if color_scale is not None:
        low, high = color_scale
        y = 4 + len(lines) * line
        left = 12 + draw.textlength(low, font=font)
        right = picture.width - 12 - draw.textlength(high, font=font)
        for x in range(int(left), int(right)):
            draw.line([(x, y), (x, y + line - 6)], fill=attention_color((x - left) / max(right - left, 1)))
        draw.text((6, y), low, fill=(0, 0, 0), font=font)
        draw.text((right + 6, y), high, fill=(0, 0, 0), font=font)
    out = Image.new("RGB", (picture.width, picture.height + strip.height), (255, 255, 255))
    out.paste(picture, (0, 0))
    out.paste(strip, (0, picture.height))
    return out


def wrap(text: str, draw: ImageDraw.ImageDraw, font, width: float) -> list[str]:
    """`text` cut between words into lines no wider than `width` pixels in `font` (a longer word keeps a line)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines

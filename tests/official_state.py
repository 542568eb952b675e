"""Deterministic synthetic weights and inputs for checking our SparseFormer against pinned numbers.

The pinned numbers live in ``tests/data/sparseformer_reference.json``. They were produced once,
offline, by running the original SparseFormer implementation (https://github.com/showlab/sparseformer,
commit ``f4484c49ad87ee218c09aef5bd1b96c304365fbb``) in a separate environment:

* for each preset in :data:`OFFICIAL_PRESETS` the reference model was built with its default
  number of latent tokens, its ``state_dict()`` key names and shapes were recorded (``"keys"``),
* :func:`synthetic_state_dict` filled those keys with values, the model loaded them with
  ``strict=True`` and was put in ``eval()`` mode,
* it was run in float32 on CPU on :func:`synthetic_pixels` (``batch=2, height=160, width=128,
  seed=0``), and the following were stored, rounded to 7 significant digits:

  - ``"image_embeds"``: the model output (pooled token -> final LayerNorm -> projection), ``[B, proj_dim]``,
  - ``"rois"``: the final token RoIs (x1, y1, x2, y2, normalised to [0, 1]), ``[B, N_latent, 4]``,
  - ``"token_abs_mean"``: per-token mean of ``|final_norm(token_embedding)|``, ``[B, N_total]``
    (``N_total`` includes the CLS token for the bootstrapped presets),
  - ``"token_embeds_first8"``: the first 8 channels of ``final_norm(token_embedding)``, ``[B, N_total, 8]``.

Nothing here imports or depends on the reference code; the values are fully determined by
numpy's ``default_rng``, the key name and the seed, so the tests can rebuild exactly the same
weights from the recorded key/shape table and compare our implementation's outputs.

The value scales are chosen so that a forward pass is well conditioned, with O(1) activations
and outputs (a 1e-4 tolerance is therefore meaningful) and no NaN/inf:

* Linear / conv weights: ``N(0, 1) / sqrt(fan_in)`` with ``fan_in = prod(shape[1:])``;
  the final (4-output) Linear of ``roi_adjust_module``, the Linear of ``roi_offset_module``, the
  final Linear of ``adaptive_mixing.parameter_generator`` and the Linear of ``pe_transition`` get an
  extra factor 0.1. This keeps RoI updates moderate, gives the generated mixing matrices entries
  ~0.1 (roughly ``1/sqrt(channels)``), and keeps float32 round-off small: the RoI position encoding
  uses frequencies up to 128*pi, so ulp-level RoI differences become ~1e-5 phase errors, which a
  full-scale ``pe_transition`` would feed back into the RoI updates (float32-vs-float64 differences
  of the outputs were ~4e-5 without this factor and ~2e-6 with it);
* Linear / conv biases: ``0.02 * N(0, 1)``;
* LayerNorm: weight ``1 + 0.1 * N(0, 1)``, bias ``0.02 * N(0, 1)``;
* ``initial_roi.weight``: valid x1y1x2y2 boxes, ``x1, y1 ~ U(0, 0.5)``, ``w, h ~ U(0.2, 0.5)``;
* ``initial_embedding`` / ``cls_embedding``: ``N(0, 1)``;
* ``roi_offset_bias``: ``U(-0.5, 0.5)``;
* ``m_beta`` / ``s_beta`` / ``stage_embedding``: ``0.02 * N(0, 1)``.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import torch

REFERENCE_COMMIT = "f4484c49ad87ee218c09aef5bd1b96c304365fbb"

OFFICIAL_PRESETS: tuple[str, ...] = (
    "sparseformer_v1_tiny",
    "sparseformer_v1_small",
    "sparseformer_v1_base",
    "sparseformer_btsp_augreg_base",
    "sparseformer_btsp_augreg_large",
    "sparseformer_btsp_openai_clip_base",
    "sparseformer_btsp_openai_clip_large",
)

REFERENCE_PATH = Path(__file__).resolve().parent / "data" / "sparseformer_reference.json"

# Extra factor applied on top of N(0,1)/sqrt(fan_in) for a few "small update" Linear layers.
SMALL_LINEAR_SCALE = 0.1
BIAS_SCALE = 0.02
LN_WEIGHT_SCALE = 0.1
LN_BIAS_SCALE = 0.02
SMALL_PARAM_SCALE = 0.02

# Sub-module names (relative to ``layers.<i>.``) that are LayerNorms.
_LAYER_NORM_UNIT_PARTS = (
    r"norm1",
    r"norm2",
    r"roi_adjust_module\.0",
    r"roi_offset_module\.0",
    r"adaptive_mixing\.parameter_generator\.0",
    r"pe_transition\.0",
    r"1",  # LayerNorm of a width transition ``Sequential(Linear, LayerNorm)``
)
# Sub-module names (relative to ``layers.<i>.``) that are Linear layers.
_LINEAR_UNIT_PARTS = (
    r"0",  # Linear of a width transition
    r"attn\.qkv",
    r"attn\.proj",
    r"mlp\.fc1",
    r"mlp\.fc2",
    r"adaptive_mixing\.parameter_generator\.[12]",
    r"adaptive_mixing\.out_proj",
    r"roi_adjust_module\.[13]",
    r"roi_offset_module\.1",
    r"pe_transition\.1",
)

_RE_LAYER_NORM = re.compile(r"^(?:norm|layers\.\d+\.(?:" + "|".join(_LAYER_NORM_UNIT_PARTS) + r"))\.(weight|bias)$")
_RE_LINEAR = re.compile(r"^(?:proj|layers\.\d+\.(?:" + "|".join(_LINEAR_UNIT_PARTS) + r"))\.(weight|bias)$")
_RE_CONV = re.compile(r"^feat_extractor\.conv1\.(weight|bias)$")
_RE_SMALL_PARAM = re.compile(
    r"^layers\.\d+\.(?:adaptive_mixing\.m_beta|adaptive_mixing\.s_beta|stage_embedding\.weight)$"
)
_RE_ROI_OFFSET_BIAS = re.compile(r"^layers\.\d+\.roi_offset_bias$")
_RE_TOKEN_EMBEDDING = re.compile(r"^(?:initial_embedding|cls_embedding)\.weight$")
_RE_ROI_ADJUST_LINEAR = re.compile(r"^layers\.\d+\.roi_adjust_module\.\d+\.weight$")
_RE_ROI_OFFSET_LINEAR = re.compile(r"^layers\.\d+\.roi_offset_module\.1\.weight$")
_RE_PARAM_GEN_LAST = re.compile(r"^layers\.\d+\.adaptive_mixing\.parameter_generator\.2\.weight$")
_RE_PE_TRANSITION_LINEAR = re.compile(r"^layers\.\d+\.pe_transition\.1\.weight$")


def load_reference_pins() -> dict:
    """Load the pinned reference numbers (``tests/data/sparseformer_reference.json``)."""
    with REFERENCE_PATH.open("r", encoding="utf-8") as f:
        return json.load(f)


def _rng(key: str, seed: int) -> np.random.Generator:
    # Each key gets its own stream, independent of dict order and of the other keys.
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def _synthetic_value(key: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if key == "initial_roi.weight":
        if len(shape) != 2 or shape[1] != 4:
            raise ValueError(f"{key}: expected shape [N, 4], got {list(shape)}")
        xy1 = rng.uniform(0.0, 0.5, size=(shape[0], 2))
        wh = rng.uniform(0.2, 0.5, size=(shape[0], 2))
        return np.concatenate([xy1, xy1 + wh], axis=1)
    if _RE_TOKEN_EMBEDDING.match(key):
        return rng.standard_normal(shape)
    if _RE_ROI_OFFSET_BIAS.match(key):
        return rng.uniform(-0.5, 0.5, size=shape)
    if _RE_SMALL_PARAM.match(key):
        return SMALL_PARAM_SCALE * rng.standard_normal(shape)

    m = _RE_LAYER_NORM.match(key)
    if m and len(shape) == 1:
        if m.group(1) == "weight":
            return 1.0 + LN_WEIGHT_SCALE * rng.standard_normal(shape)
        return LN_BIAS_SCALE * rng.standard_normal(shape)

    m = _RE_LINEAR.match(key) or _RE_CONV.match(key)
    if m:
        if m.group(1) == "bias":
            if len(shape) != 1:
                raise ValueError(f"{key}: expected a 1-D bias, got {list(shape)}")
            return BIAS_SCALE * rng.standard_normal(shape)
        if len(shape) < 2:
            raise ValueError(f"{key}: expected a >=2-D weight, got {list(shape)}")
        fan_in = math.prod(shape[1:])
        scale = 1.0 / math.sqrt(fan_in)
        if _RE_ROI_ADJUST_LINEAR.match(key) and shape[0] == 4:
            scale *= SMALL_LINEAR_SCALE  # final Linear of roi_adjust_module (dim -> 4)
        elif _RE_ROI_OFFSET_LINEAR.match(key) or _RE_PARAM_GEN_LAST.match(key) or _RE_PE_TRANSITION_LINEAR.match(key):
            scale *= SMALL_LINEAR_SCALE
        return scale * rng.standard_normal(shape)

    raise KeyError(f"synthetic_state_dict: unrecognised key {key!r} with shape {list(shape)}")


def synthetic_state_dict(keys_shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic float32 values for every ``key -> shape`` of a SparseFormer state dict.

    Values depend only on ``(seed, key, shape)``; see the module docstring for the scales.
    Raises ``KeyError`` on a key name that is not part of the SparseFormer layout.
    """
    out: dict[str, torch.Tensor] = {}
    for key, shape in keys_shapes.items():
        shape_t = tuple(int(s) for s in shape)
        value = _synthetic_value(key, shape_t, _rng(key, seed))
        arr = np.ascontiguousarray(np.asarray(value, dtype=np.float32).reshape(shape_t))
        out[key] = torch.from_numpy(arr)
    return out


def synthetic_pixels(batch: int = 2, height: int = 160, width: int = 128, seed: int = 0) -> torch.Tensor:
    """Deterministic ``[batch, 3, height, width]`` float32 pixels, roughly N(0, 1)."""
    rng = np.random.default_rng([int(seed), zlib.crc32(b"pixels")])
    arr = rng.standard_normal((batch, 3, height, width)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr))

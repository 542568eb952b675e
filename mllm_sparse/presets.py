"""Named SparseFormer presets: `create_model(name, pretrained=None, **overrides)` and `list_models()`.

The official presets reproduce the reference configurations, so the published `*_converted.pth` checkpoints load
into them with `strict=True`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers.initialization import no_init_weights

from .checkpoint import load_pretrained
from .configuration import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SparseFormerConfig, bootstrapped_ops_list, v1_ops_list
from .modeling import SparseFormerModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

# Release assets of the reference repository (v2.0.0-refactor), used by `pretrained="official"`.
OFFICIAL_CHECKPOINT_URL = (
    "https://github.com/showlab/sparseformer/releases/download/v2.0.0-refactor/{name}_converted.pth"
)

_PRESETS: dict[str, Callable[[], dict[str, Any]]] = {}


def register_preset(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Register a function returning `SparseFormerConfig` keyword arguments under its own name."""
    _PRESETS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of every registered preset, sorted."""
    return sorted(_PRESETS)


def _v1(widths: list[int], num_cortex: int, num_latent_tokens: int, drop_path_rate: float) -> dict[str, Any]:
    return dict(
        conv_dim=96,
        num_latent_tokens=num_latent_tokens,
        num_sampling_points=36,
        same_token_embedding=False,
        cls_token_insert_layer=-1,
        width_configs=widths,
        repeats=[4] + [1] * (len(widths) - 1),
        ops_list=v1_ops_list(num_cortex),
        head_op="avg",
        proj_dim=1000,
        proj_bias=True,
        drop_path_rate=drop_path_rate,
        type_num_attn_heads=1,
        type_op_adjust=1,
        mixing_bias=True,
        pg_inner_dim=0.25,
        transition_ln=True,
        ln_eps=1e-6,
        use_stage_embedding=False,
        clip_quick_gelu=False,
        grid_sample_padding="zeros",
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )


def _bootstrapped(focus_width: int, width: int, num_cortex: int, num_latent_tokens: int, **kw) -> dict[str, Any]:
    return dict(
        conv_dim=64,
        num_latent_tokens=num_latent_tokens,
        num_sampling_points=16,
        same_token_embedding=True,
        cls_token_insert_layer=2,
        width_configs=[focus_width, width] + [width] * num_cortex,
        repeats=[4, 1] + [1] * num_cortex,
        ops_list=bootstrapped_ops_list(num_cortex),
        head_op="cls",
        type_num_attn_heads=2,
        type_op_adjust=2,
        mixing_bias=False,
        pg_inner_dim=128,
        transition_ln=False,
        ln_eps=1e-5,
        use_stage_embedding=True,
        grid_sample_padding="border",
        **kw,
    )


@register_preset
def sparseformer_v1_tiny() -> dict[str, Any]:
    return _v1([256] + [512] * 8, 8, 49, 0.2)


@register_preset
def sparseformer_v1_small() -> dict[str, Any]:
    return _v1([320] + [640] * 8, 8, 64, 0.3)


@register_preset
def sparseformer_v1_base() -> dict[str, Any]:
    return _v1([384] + [768] * 10, 10, 81, 0.4)


_AUGREG = dict(proj_dim=1000, proj_bias=True, clip_quick_gelu=False, image_mean=INCEPTION_MEAN, image_std=INCEPTION_STD)
_CLIP = dict(proj_bias=False, clip_quick_gelu=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)


@register_preset
def sparseformer_btsp_augreg_base() -> dict[str, Any]:
    return _bootstrapped(384, 768, 8, 48, **_AUGREG)


@register_preset
def sparseformer_btsp_augreg_large() -> dict[str, Any]:
    return _bootstrapped(512, 1024, 16, 48, **_AUGREG)


@register_preset
def sparseformer_btsp_openai_clip_base() -> dict[str, Any]:
    return _bootstrapped(384, 768, 8, 48, proj_dim=512, **_CLIP)


@register_preset
def sparseformer_btsp_openai_clip_large() -> dict[str, Any]:
    return _bootstrapped(512, 1024, 16, 63, proj_dim=768, **_CLIP)


@register_preset
def test_sparseformer_btsp() -> dict[str, Any]:
    """Tiny bootstrapped layout for tests: 16 tokens (15 + CLS), widths 32 → 64, 2 cortex blocks."""
    return _bootstrapped(32, 64, 2, 15, proj_dim=32, **_CLIP) | dict(
        conv_dim=16, num_sampling_points=9, pg_inner_dim=16, num_attention_heads=[2, 4, 4, 4], image_size=64
    )


@register_preset
def test_sparseformer_v1() -> dict[str, Any]:
    """Tiny v1 layout for tests: 9 latent tokens, avg head, widths 32 → 64, 2 units of cortex."""
    return _v1([32, 64, 64], 2, 9, 0.1) | dict(
        conv_dim=16, num_sampling_points=8, proj_dim=10, num_attention_heads=[2, 4, 4], image_size=64
    )


OFFICIAL_PRESETS = tuple(n for n in _PRESETS if n.startswith("sparseformer_"))


def _config_fields() -> set[str]:
    return set(inspect.signature(SparseFormerConfig.__init__).parameters) - {"self", "kwargs"}


def preset_config(name: str, **overrides: Any) -> SparseFormerConfig:
    """The `SparseFormerConfig` of a preset with overrides applied.

    `num_tokens` sets the total output tokens (latent tokens plus CLS where present), as the official preset
    functions' argument does; `num_latent_tokens` sets latent tokens only. Give at most one of them.
    """
    if name not in _PRESETS:
        raise ValueError(f"Unknown SparseFormer preset {name!r}. Valid presets: {', '.join(list_models())}")
    kwargs = _PRESETS[name]()
    unknown = set(overrides) - _config_fields() - {"num_tokens"}
    if unknown:
        raise ValueError(
            f"Unknown override(s) {sorted(unknown)} for preset {name!r}. Valid overrides: num_tokens, "
            f"{', '.join(sorted(_config_fields()))}"
        )
    if "num_tokens" in overrides:
        if "num_latent_tokens" in overrides:
            raise ValueError("Give num_tokens (total, CLS included) or num_latent_tokens (latent only), not both")
        num_tokens = overrides.pop("num_tokens")
        has_cls = overrides.get("cls_token_insert_layer", kwargs["cls_token_insert_layer"]) > 0
        if not isinstance(num_tokens, int) or num_tokens < 1 + int(has_cls):
            raise ValueError(f"num_tokens must be an int >= {1 + int(has_cls)} for preset {name!r}, got {num_tokens!r}")
        overrides["num_latent_tokens"] = num_tokens - int(has_cls)
    kwargs.update(overrides)
    return SparseFormerConfig(**kwargs)


def create_model(name: str, pretrained: str | Path | None = None, **overrides: Any) -> SparseFormerModel:
    """Build a preset, optionally loading weights.

    Args:
        name: a preset from `list_models()`.
        pretrained: None for a fresh initialisation; "official" to download the reference release checkpoint; or a
            path to an official `*_converted.pth` (with or without a "model" wrapper), a `.safetensors` file, or a
            folder written by `save_pretrained`. Loading is strict and reports missing/unexpected keys.
        overrides: `SparseFormerConfig` fields, plus `num_tokens` (total output tokens, CLS included).
    Returns:
        The model in eval mode.
    """
    config = preset_config(name, **overrides)
    if pretrained is None:
        return SparseFormerModel(config).eval()
    source = pretrained
    if str(pretrained) == "official":
        if name not in OFFICIAL_PRESETS:
            raise ValueError(f"pretrained='official' exists only for {', '.join(OFFICIAL_PRESETS)}; got {name!r}")
        source = OFFICIAL_CHECKPOINT_URL.format(name=name)
    # The strict load below overwrites every parameter, so skip the (slow, for large presets) random init.
    with no_init_weights():
        model = SparseFormerModel(config)
    load_pretrained(model, source, preset=name)
    return model.eval()

"""Pure state_dict converters from CLIP ViT towers to SparseFormer keys, driven by explicit key tables.

A table maps a teacher key (with `{}` for the block index) to a student key (with `{}` for the student layer index).
Teacher blocks not in the layer map and keys in the ignore set are dropped on purpose; any other key raises, so a
checkpoint of an unexpected layout never converts silently.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_BLOCK = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "qkv.weight": "attn.qkv.weight",
    "qkv.bias": "attn.qkv.bias",
    "out.weight": "attn.proj.weight",
    "out.bias": "attn.proj.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "fc1.weight": "mlp.fc1.weight",
    "fc1.bias": "mlp.fc1.bias",
    "fc2.weight": "mlp.fc2.weight",
    "fc2.bias": "mlp.fc2.bias",
}

# open_clip VisionTransformer (`model.visual.state_dict()`).
OPEN_CLIP_VISUAL = {
    "transformer.resblocks.{}.ln_1.weight": "norm1.weight",
    "transformer.resblocks.{}.ln_1.bias": "norm1.bias",
    "transformer.resblocks.{}.attn.in_proj_weight": "qkv.weight",
    "transformer.resblocks.{}.attn.in_proj_bias": "qkv.bias",
    "transformer.resblocks.{}.attn.out_proj.weight": "out.weight",
    "transformer.resblocks.{}.attn.out_proj.bias": "out.bias",
    "transformer.resblocks.{}.ln_2.weight": "norm2.weight",
    "transformer.resblocks.{}.ln_2.bias": "norm2.bias",
    "transformer.resblocks.{}.mlp.c_fc.weight": "fc1.weight",
    "transformer.resblocks.{}.mlp.c_fc.bias": "fc1.bias",
    "transformer.resblocks.{}.mlp.c_proj.weight": "fc2.weight",
    "transformer.resblocks.{}.mlp.c_proj.bias": "fc2.bias",
}
OPEN_CLIP_HEAD = {"ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias", "proj": "proj.weight"}
# The patch embedding and the blocks before the cortex are what the focusing transformer replaces.
OPEN_CLIP_IGNORE = {"conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias"}

# Hugging Face CLIPVisionModel(WithProjection) / CLIPModel, vision side, with the "vision_model." prefix removed.
HF_CLIP_VISUAL = {
    "encoder.layers.{}.layer_norm1.weight": "norm1.weight",
    "encoder.layers.{}.layer_norm1.bias": "norm1.bias",
    "encoder.layers.{}.self_attn.q_proj.weight": "q.weight",
    "encoder.layers.{}.self_attn.q_proj.bias": "q.bias",
    "encoder.layers.{}.self_attn.k_proj.weight": "k.weight",
    "encoder.layers.{}.self_attn.k_proj.bias": "k.bias",
    "encoder.layers.{}.self_attn.v_proj.weight": "v.weight",
    "encoder.layers.{}.self_attn.v_proj.bias": "v.bias",
    "encoder.layers.{}.self_attn.out_proj.weight": "out.weight",
    "encoder.layers.{}.self_attn.out_proj.bias": "out.bias",
    "encoder.layers.{}.layer_norm2.weight": "norm2.weight",
    "encoder.layers.{}.layer_norm2.bias": "norm2.bias",
    "encoder.layers.{}.mlp.fc1.weight": "fc1.weight",
    "encoder.layers.{}.mlp.fc1.bias": "fc1.bias",
    "encoder.layers.{}.mlp.fc2.weight": "fc2.weight",
    "encoder.layers.{}.mlp.fc2.bias": "fc2.bias",
}
HF_CLIP_HEAD = {
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
    "visual_projection.weight": "proj.weight",
}
HF_CLIP_IGNORE = {
    "embeddings.class_embedding",
    "embeddings.patch_embedding.weight",
    "embeddings.position_embedding.weight",
    "embeddings.position_ids",
    "pre_layrnorm.weight",
    "pre_layrnorm.bias",
}


def _match(table: dict[str, str], key: str) -> tuple[str, int | None] | None:
    """(table value, block index or None) for the table entry matching `key`."""
    for pattern, target in table.items():
        if "{}" in pattern:
            m = re.fullmatch(re.escape(pattern).replace(r"\{\}", r"(\d+)"), key)
            if m:
                return target, int(m.group(1))
        elif pattern == key:
            return target, None
    return None


def _convert(
    state_dict: dict[str, Tensor],
    block_table: dict[str, str],
    head_table: dict[str, str],
    ignore: set[str],
    layer_map: dict[int, int],
    source: str,
) -> dict[str, Tensor]:
    blocks: dict[int, dict[str, Tensor]] = {}
    head: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in ignore:
            continue
        hit = _match(block_table, key)
        if hit is not None:
            name, index = hit
            if index in layer_map:
                blocks.setdefault(index, {})[name] = value
            continue
        hit = _match(head_table, key)
        if hit is None:
            raise KeyError(f"{source}: unexpected key {key!r}; not in the converter's key table or ignore set")
        head[hit[0]] = value
    missing = sorted(set(layer_map) - set(blocks))
    if missing:
        raise KeyError(f"{source}: no weights for teacher block(s) {missing}")
    out: dict[str, Tensor] = {}
    for teacher_index, student_index in layer_map.items():
        block = blocks[teacher_index]
        if "q.weight" in block:  # separate q/k/v projections, fused into one qkv like open_clip and timm
            for part in ("weight", "bias"):
                block[f"qkv.{part}"] = torch.cat([block.pop(f"{p}.{part}") for p in ("q", "k", "v")])
        for name, value in block.items():
            out[f"layers.{student_index}.{_BLOCK[name]}"] = value
    missing_head = sorted(set(head_table.values()) - set(head))
    if missing_head:
        raise KeyError(f"{source}: missing head weights {missing_head} (final LayerNorm, pooling, projection)")
    out.update(head)
    return out


def open_clip_visual_to_sparseformer(state_dict: dict[str, Tensor], layer_map: dict[int, int]) -> dict[str, Tensor]:
    """open_clip `visual` state_dict → SparseFormer keys for the inherited cortex blocks and head.

    Args:
        state_dict: `model.visual.state_dict()` of an open_clip VisionTransformer.
        layer_map: teacher block index → student `layers.{i}` index.
    """
    out = _convert(state_dict, OPEN_CLIP_VISUAL, OPEN_CLIP_HEAD, OPEN_CLIP_IGNORE, layer_map, "open_clip visual")
    out["proj.weight"] = out["proj.weight"].t().contiguous()  # open_clip computes x @ proj; nn.Linear uses proj.T
    return out


def _hf_vision_side(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The vision keys of an HF CLIP / SigLIP state_dict, "vision_model." prefix removed; the text tower and the
    logit scale / bias of a dual-tower model are dropped."""
    text = ("text_model.", "text_projection.")
    return {
        key.removeprefix("vision_model."): value
        for key, value in state_dict.items()
        if not key.startswith(text) and key not in ("logit_scale", "logit_bias")
    }


def hf_clip_visual_to_sparseformer(state_dict: dict[str, Tensor], layer_map: dict[int, int]) -> dict[str, Tensor]:
    """HF CLIP vision state_dict (`CLIPVisionModelWithProjection` or `CLIPModel`) → SparseFormer keys.

    Text-tower keys of a `CLIPModel` are ignored; the vision keys may carry the "vision_model." prefix.
    """
    vision = _hf_vision_side(state_dict)
    return _convert(vision, HF_CLIP_VISUAL, HF_CLIP_HEAD, HF_CLIP_IGNORE, layer_map, "HF CLIP vision")


# Hugging Face SiglipVisionModel / SiglipModel, vision side: the blocks have HF CLIP's keys; there is no CLS token
# and no projection, and the attention-pooling head maps one to one onto the student's `head` (HEAD_OPS "map").
HF_SIGLIP_HEAD = {
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
    "head.probe": "head.probe",
    "head.attention.in_proj_weight": "head.qkv.weight",
    "head.attention.in_proj_bias": "head.qkv.bias",
    "head.attention.out_proj.weight": "head.proj.weight",
    "head.attention.out_proj.bias": "head.proj.bias",
    "head.layernorm.weight": "head.norm.weight",
    "head.layernorm.bias": "head.norm.bias",
    "head.mlp.fc1.weight": "head.mlp.fc1.weight",
    "head.mlp.fc1.bias": "head.mlp.fc1.bias",
    "head.mlp.fc2.weight": "head.mlp.fc2.weight",
    "head.mlp.fc2.bias": "head.mlp.fc2.bias",
}
HF_SIGLIP_IGNORE = {
    "embeddings.patch_embedding.weight",
    "embeddings.patch_embedding.bias",
    "embeddings.position_embedding.weight",
    "embeddings.position_ids",
}


def hf_siglip_visual_to_sparseformer(state_dict: dict[str, Tensor], layer_map: dict[int, int]) -> dict[str, Tensor]:
    """HF SigLIP vision state_dict (`SiglipVisionModel` or `SiglipModel`) → SparseFormer keys.

    Text-tower keys of a `SiglipModel` are ignored; the vision keys may carry the "vision_model." prefix.
    """
    vision = _hf_vision_side(state_dict)
    return _convert(vision, HF_CLIP_VISUAL, HF_SIGLIP_HEAD, HF_SIGLIP_IGNORE, layer_map, "HF SigLIP vision")


# open_clip VisionTransformer → HF `CLIPVisionModel` (transformers 5 keys, no "vision_model." prefix). The projection is
# dropped: a LLaVA tower hands hidden states to the projector and never uses the CLIP embedding.
OPEN_CLIP_TO_HF_CLIP_VISION = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "transformer.resblocks.{}.ln_1.weight": "encoder.layers.{}.layer_norm1.weight",
    "transformer.resblocks.{}.ln_1.bias": "encoder.layers.{}.layer_norm1.bias",
    "transformer.resblocks.{}.attn.in_proj_weight": "encoder.layers.{}.self_attn.{}_proj.weight",
    "transformer.resblocks.{}.attn.in_proj_bias": "encoder.layers.{}.self_attn.{}_proj.bias",
    "transformer.resblocks.{}.attn.out_proj.weight": "encoder.layers.{}.self_attn.out_proj.weight",
    "transformer.resblocks.{}.attn.out_proj.bias": "encoder.layers.{}.self_attn.out_proj.bias",
    "transformer.resblocks.{}.ln_2.weight": "encoder.layers.{}.layer_norm2.weight",
    "transformer.resblocks.{}.ln_2.bias": "encoder.layers.{}.layer_norm2.bias",
    "transformer.resblocks.{}.mlp.c_fc.weight": "encoder.layers.{}.mlp.fc1.weight",
    "transformer.resblocks.{}.mlp.c_fc.bias": "encoder.layers.{}.mlp.fc1.bias",
    "transformer.resblocks.{}.mlp.c_proj.weight": "encoder.layers.{}.mlp.fc2.weight",
    "transformer.resblocks.{}.mlp.c_proj.bias": "encoder.layers.{}.mlp.fc2.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
OPEN_CLIP_TO_HF_CLIP_VISION_IGNORE = {"proj"}


def open_clip_visual_to_hf_clip_vision(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """open_clip `visual` state_dict → HF `CLIPVisionModel` state_dict (fused in_proj split into q/k/v)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in OPEN_CLIP_TO_HF_CLIP_VISION_IGNORE:
            continue
        hit = _match(OPEN_CLIP_TO_HF_CLIP_VISION, key)
        if hit is None:
            raise KeyError(f"open_clip visual: unexpected key {key!r}; not in the HF CLIP key table or ignore set")
        target, index = hit
        if key == "positional_embedding" and value.ndim == 3:
            value = value[0]
        if ".{}_proj." in target:  # in_proj packs q, k and v along the output dimension
            for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[target.format(index, part)] = chunk.contiguous()
        else:
            out[target.format(index)] = value
    return out

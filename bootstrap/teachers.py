"""CLIP ViT teachers behind one interface: `load_teacher("open_clip:NAME[@TAG|PATH]")` or `load_teacher("hf:ID|DIR")`.

A teacher gives its final image embedding, its tokens after any block, its preprocessing, its block structure
(`TeacherArch`), its weights in SparseFormer keys (`to_sparseformer`), and its text tower when it has one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .converters import (
    hf_clip_visual_to_sparseformer,
    open_clip_visual_to_hf_clip_vision,
    open_clip_visual_to_sparseformer,
)


@dataclass(frozen=True)
class TeacherArch:
    """What a student derives from its teacher."""

    width: int
    layers: int
    heads: int
    mlp_ratio: float
    patch_size: int
    image_size: int
    quick_gelu: bool
    ln_eps: float
    proj_dim: int
    proj_bias: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Teacher(ABC):
    """Common interface; see `OpenClipTeacher` and `HFClipTeacher`."""

    spec: str
    arch: TeacherArch
    model: nn.Module

    @abstractmethod
    def encode_image(self, pixels: Tensor) -> Tensor:
        """[B, 3, S, S] → [B, proj_dim] final image embedding (not normalised)."""

    @abstractmethod
    def tokens(self, pixels: Tensor, layer: int) -> Tensor:
        """[B, 1 + P, C] tokens (CLS first) after block `layer` (negative counts from the end)."""

    @abstractmethod
    def cls_input(self) -> Tensor:
        """[C] the CLS token as it enters the first block (class embedding + its position, after the pre-norm)."""

    @abstractmethod
    def to_sparseformer(self, layer_map: dict[int, int]) -> dict[str, Tensor]:
        """Teacher blocks (teacher index → student layer index) and head in SparseFormer state_dict keys."""

    @abstractmethod
    def encode_text(self, texts: list[str]) -> Tensor:
        """[K, proj_dim] text embeddings, for zero-shot evaluation."""

    def patch_tokens(self, pixels: Tensor, layer: int = -1) -> Tensor:
        """[B, P, C] patch tokens (CLS dropped) after block `layer`."""
        return self.tokens(pixels, layer)[:, 1:]

    @abstractmethod
    def vision_state_dict(self) -> dict[str, Tensor]:
        """The vision tower's weights in HF `CLIPVisionModel` keys."""

    def to_hf_clip_vision(self):
        """The vision tower as an HF `CLIPVisionModel` (e.g. the full-token baseline tower of a LLaVA model).

        Its `hidden_states[k + 1]` equal `tokens(pixels, k)`: hidden_states[0] is the embedding output.
        """
        from transformers import CLIPVisionConfig, CLIPVisionModel

        arch = self.arch
        config = CLIPVisionConfig(
            hidden_size=arch.width,
            intermediate_size=round(arch.width * arch.mlp_ratio),
            num_hidden_layers=arch.layers,
            num_attention_heads=arch.heads,
            image_size=arch.image_size,
            patch_size=arch.patch_size,
            hidden_act="quick_gelu" if arch.quick_gelu else "gelu",
            layer_norm_eps=arch.ln_eps,
            projection_dim=arch.proj_dim,
        )
        model = CLIPVisionModel(config)
        model.load_state_dict(self.vision_state_dict(), strict=True)
        return model.eval()


class OpenClipTeacher(Teacher):
    def __init__(self, spec: str, model: nn.Module, tokenizer, preprocess_cfg: dict):
        self.spec, self.model, self.tokenizer = spec, model.eval(), tokenizer
        visual = model.visual
        block = visual.transformer.resblocks[0]
        image_size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
        patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
        self.arch = TeacherArch(
            width=visual.transformer.width,
            layers=len(visual.transformer.resblocks),
            heads=block.attn.num_heads,
            mlp_ratio=block.mlp.c_fc.out_features / visual.transformer.width,
            patch_size=patch,
            image_size=image_size,
            quick_gelu=type(block.mlp.gelu).__name__ == "QuickGELU",
            ln_eps=block.ln_1.eps,
            proj_dim=visual.proj.shape[1],
            proj_bias=False,
            mean=tuple(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            std=tuple(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        )

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def _embed(self, pixels: Tensor) -> Tensor:
        visual = self.model.visual
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(x)

    def tokens(self, pixels: Tensor, layer: int) -> Tensor:
        blocks = self.model.visual.transformer.resblocks
        x = self._embed(pixels)
        for block in blocks[: (layer % len(blocks)) + 1]:
            x = block(x)
        return x

    def cls_input(self) -> Tensor:
        visual = self.model.visual
        return visual.ln_pre(visual.class_embedding + visual.positional_embedding[0])

    def to_sparseformer(self, layer_map: dict[int, int]) -> dict[str, Tensor]:
        return open_clip_visual_to_sparseformer(self.model.visual.state_dict(), layer_map)

    def vision_state_dict(self) -> dict[str, Tensor]:
        return open_clip_visual_to_hf_clip_vision(self.model.visual.state_dict())

    def encode_text(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(texts))


class HFClipTeacher(Teacher):
    def __init__(self, spec: str, model: nn.Module, tokenizer, image_processor):
        self.spec, self.model, self.tokenizer = spec, model.eval(), tokenizer
        config = model.config.vision_config if hasattr(model.config, "vision_config") else model.config
        proj_dim = model.visual_projection.out_features
        size = getattr(image_processor, "crop_size", None) or {}
        self.arch = TeacherArch(
            width=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            mlp_ratio=config.intermediate_size / config.hidden_size,
            patch_size=config.patch_size,
            image_size=size.get("height", config.image_size) if isinstance(size, dict) else config.image_size,
            quick_gelu=config.hidden_act == "quick_gelu",
            ln_eps=config.layer_norm_eps,
            proj_dim=proj_dim,
            proj_bias=model.visual_projection.bias is not None,
            mean=tuple(getattr(image_processor, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)),
            std=tuple(getattr(image_processor, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)),
        )

    @property
    def _vision(self) -> nn.Module:
        return self.model.vision_model

    def encode_image(self, pixels: Tensor) -> Tensor:
        pooled = self._vision(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled)

    def tokens(self, pixels: Tensor, layer: int) -> Tensor:
        hidden = self._vision(pixel_values=pixels, output_hidden_states=True).hidden_states
        return hidden[1:][layer]  # hidden_states[0] is the embedding output

    def cls_input(self) -> Tensor:
        embeddings = self._vision.embeddings
        x = embeddings.class_embedding + embeddings.position_embedding.weight[0]
        return self._vision.pre_layrnorm(x)

    def to_sparseformer(self, layer_map: dict[int, int]) -> dict[str, Tensor]:
        return hf_clip_visual_to_sparseformer(self.model.state_dict(), layer_map)

    def vision_state_dict(self) -> dict[str, Tensor]:
        return dict(self._vision.state_dict())

    def encode_text(self, texts: list[str]) -> Tensor:
        if not hasattr(self.model, "get_text_features") or self.tokenizer is None:
            raise ValueError(f"{self.spec} has no text tower (load a CLIPModel for zero-shot evaluation)")
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        return self.model.get_text_features(**batch)


def load_teacher(spec: str) -> Teacher:
    """Load a CLIP ViT teacher.

    Specs:
        `open_clip:NAME` (random weights), `open_clip:NAME@TAG` (an open_clip pretrained tag, e.g.
        `ViT-L-14-336@openai`), `open_clip:NAME@/path/to/checkpoint`, `open_clip:local-dir:/path/to/dir`;
        `hf:HUB_ID` or `hf:/path/to/dir` (CLIPModel or CLIPVisionModelWithProjection).
    """
    kind, _, rest = spec.partition(":")
    if kind == "open_clip" and rest:
        return _load_open_clip(spec, rest)
    if kind == "hf" and rest:
        return _load_hf(spec, rest)
    raise ValueError(f"Teacher spec {spec!r} must look like 'open_clip:NAME[@TAG|PATH]' or 'hf:HUB_ID|DIR'")


def _load_open_clip(spec: str, rest: str) -> Teacher:
    import open_clip

    from .teacher_models import register_teacher_configs

    register_teacher_configs()
    if rest.startswith("local-dir:"):
        name, pretrained = rest, None
    else:
        name, _, pretrained = rest.partition("@")
        if name not in open_clip.list_models():
            raise ValueError(f"Teacher {spec!r}: open_clip has no model {name!r}; see open_clip.list_models()")
        if (
            pretrained
            and not Path(pretrained).is_file()
            and pretrained not in open_clip.list_pretrained_tags_by_model(name)
        ):
            raise ValueError(f"Teacher {spec!r}: {pretrained!r} is neither a file nor an open_clip tag of {name}")
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None)
    except Exception as err:  # noqa: BLE001 - download failures come in many types
        raise RuntimeError(
            f"Teacher {spec!r} could not be loaded ({err}). Offline, point at a local checkpoint instead: "
            f"'open_clip:{name}@/path/to/open_clip_model.safetensors' or 'open_clip:local-dir:/path/to/dir'"
        ) from err
    return OpenClipTeacher(spec, model, open_clip.get_tokenizer(name), model.visual.preprocess_cfg)


def _load_hf(spec: str, rest: str) -> Teacher:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPVisionModelWithProjection

    try:
        config = AutoConfig.from_pretrained(rest)
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(
            f"Teacher {spec!r} could not be resolved ({err}). Offline, point at a local folder: 'hf:/path/to/dir' "
            "holding config.json and the weights (save_pretrained output)"
        ) from err
    if config.model_type == "clip":
        model, tokenizer = CLIPModel.from_pretrained(rest), _optional(AutoTokenizer, rest)
    elif config.model_type == "clip_vision_model":
        model, tokenizer = CLIPVisionModelWithProjection.from_pretrained(rest), None
    else:
        raise ValueError(
            f"Teacher {spec!r}: model_type {config.model_type!r} is not a CLIP ViT (clip, clip_vision_model)"
        )
    return HFClipTeacher(spec, model, tokenizer, _optional(AutoImageProcessor, rest))


def _optional(auto_class, path: str):
    """The tokenizer or image processor saved with a model, or None if there is none."""
    try:
        return auto_class.from_pretrained(path)
    except (OSError, ValueError):
        return None

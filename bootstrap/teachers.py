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
    hf_siglip_visual_to_sparseformer,
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
    act: str  # MLP activation: "quick_gelu", "gelu" or "gelu_tanh"
    ln_eps: float
    proj_dim: int | None  # None: no projection after the pooling (SigLIP)
    proj_bias: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # The embedding is the final CLS token's ("cls"), the mean of the final patch tokens ("avg"), or an attention
    # pool over them ("map", SigLIP).
    pool: str = "cls"
    has_cls: bool = True

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
        """[B, 1 + P, C] tokens (CLS first; [B, P, C] without a CLS token) after block `layer` (negative counts
        from the end)."""

    def cls_input(self) -> Tensor | None:
        """[C] the CLS token as it enters the first block (class embedding + its position, after the pre-norm), or
        None for a teacher without one."""
        return None

    @abstractmethod
    def to_sparseformer(self, layer_map: dict[int, int]) -> dict[str, Tensor]:
        """Teacher blocks (teacher index → student layer index) and head in SparseFormer state_dict keys."""

    @abstractmethod
    def encode_text(self, texts: list[str]) -> Tensor:
        """[K, proj_dim] text embeddings, for zero-shot evaluation."""

    @property
    def device(self) -> torch.device:
        """Where the weights are: text tokens, made on the CPU by the tokenizer, go there."""
        return next(self.model.parameters()).device

    @property
    def has_text(self) -> bool:
        """Whether `encode_text` works (a vision-only checkpoint, or one saved without its tokenizer, has none)."""
        return getattr(self, "tokenizer", None) is not None and (
            hasattr(self.model, "encode_text") or hasattr(self.model, "get_text_features")
        )

    def patch_tokens(self, pixels: Tensor, layer: int = -1) -> Tensor:
        """[B, P, C] patch tokens (CLS dropped) after block `layer`."""
        return self.tokens(pixels, layer)[:, int(self.arch.has_cls) :]

    @abstractmethod
    def vision_state_dict(self) -> dict[str, Tensor]:
        """The vision tower's weights in the keys of the HF model `to_hf_vision` builds."""

    def to_hf_vision(self):
        """The vision tower as an HF vision model (e.g. the full-token baseline tower of a LLaVA model): a
        `CLIPVisionModel`, or the `SiglipVisionModel` of a SigLIP teacher.

        Its `hidden_states[k + 1]` equal `tokens(pixels, k)`: hidden_states[0] is the embedding output. Its
        `pooler_output` is HF CLIP's (the final CLS token), whatever `arch.pool` is: LLaVA towers read hidden states
        only, and `encode_image` stays the teacher's embedding.
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
            hidden_act="quick_gelu" if arch.act == "quick_gelu" else "gelu",
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
            act="quick_gelu" if type(block.mlp.gelu).__name__ == "QuickGELU" else "gelu",
            ln_eps=block.ln_1.eps,
            proj_dim=visual.proj.shape[1],
            proj_bias=False,
            mean=tuple(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            std=tuple(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
            pool=_open_clip_pool(spec, visual),
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

    def cls_input(self) -> Tensor | None:
        visual = self.model.visual
        return visual.ln_pre(visual.class_embedding + visual.positional_embedding[0])

    def to_sparseformer(self, layer_map: dict[int, int]) -> dict[str, Tensor]:
        return open_clip_visual_to_sparseformer(self.model.visual.state_dict(), layer_map)

    def vision_state_dict(self) -> dict[str, Tensor]:
        return open_clip_visual_to_hf_clip_vision(self.model.visual.state_dict())

    def encode_text(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def _open_clip_pool(spec: str, visual: nn.Module) -> str:
    """The teacher's pooling as a student head can mirror it, or a clear error for heads it cannot."""
    pool_type = getattr(visual, "pool_type", "tok")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
        raise ValueError(f"Teacher {spec!r}: attention-pool or LayerNorm-after-pool heads cannot be inherited")
    if pool_type not in ("tok", "avg") or not hasattr(visual, "class_embedding"):
        raise ValueError(f"Teacher {spec!r}: open_clip pool_type {pool_type!r} cannot be inherited (tok, avg)")
    return "cls" if pool_type == "tok" else "avg"


def _hf_vision_shape(config, processor_size) -> dict:
    """The `TeacherArch` fields an HF ViT config (CLIP or SigLIP) gives alike; the input size is the image
    processor's where it has one (`processor_size`: its `crop_size` or `size` dict)."""
    size = processor_size.get("height") if isinstance(processor_size, dict) else None
    return dict(
        width=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        patch_size=config.patch_size,
        image_size=size or config.image_size,
        ln_eps=config.layer_norm_eps,
    )


class HFClipTeacher(Teacher):
    def __init__(self, spec: str, model: nn.Module, tokenizer, image_processor):
        self.spec, self.model, self.tokenizer = spec, model.eval(), tokenizer
        config = model.config.vision_config if hasattr(model.config, "vision_config") else model.config
        proj_dim = model.visual_projection.out_features
        size = getattr(image_processor, "crop_size", None) or {}
        self.arch = TeacherArch(
            **_hf_vision_shape(config, size),
            act="quick_gelu" if config.hidden_act == "quick_gelu" else "gelu",
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

    def cls_input(self) -> Tensor | None:
        embeddings = self._vision.embeddings
        x = embeddings.class_embedding + embeddings.position_embedding.weight[0]
        return self._vision.pre_layrnorm(x)

    def to_sparseformer(self, layer_map: dict[int, int]) -> dict[str, Tensor]:
        return hf_clip_visual_to_sparseformer(self.model.state_dict(), layer_map)

    def vision_state_dict(self) -> dict[str, Tensor]:
        return dict(self._vision.state_dict())

    def encode_text(self, texts: list[str]) -> Tensor:
        if not self.has_text:
            raise ValueError(f"{self.spec} has no text tower (load a CLIPModel for zero-shot evaluation)")
        batch = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
        return self.model.get_text_features(**batch)


class HFSiglipTeacher(Teacher):
    """A SigLIP teacher: no CLS token, no projection, an attention-pooling head (`SiglipModel` or
    `SiglipVisionModel`)."""

    def __init__(self, spec: str, model: nn.Module, tokenizer, image_processor):
        self.spec, self.model, self.tokenizer = spec, model.eval(), tokenizer
        config = model.config.vision_config if hasattr(model.config, "vision_config") else model.config
        if not getattr(config, "vision_use_head", True):
            raise ValueError(f"Teacher {spec!r}: a SigLIP tower without its pooling head has no embedding to align")
        size = getattr(image_processor, "size", None) or {}
        self.arch = TeacherArch(
            **_hf_vision_shape(config, size),
            act={"gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}.get(config.hidden_act, "gelu"),
            proj_dim=None,
            proj_bias=False,
            mean=tuple(getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)),
            std=tuple(getattr(image_processor, "image_std", None) or (0.5, 0.5, 0.5)),
            pool="map",
            has_cls=False,
        )

    @property
    def _vision(self) -> nn.Module:
        # SiglipModel wraps the tower as `vision_model`; transformers 5's SiglipVisionModel is the tower itself.
        return getattr(self.model, "vision_model", self.model)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self._vision(pixel_values=pixels).pooler_output

    def tokens(self, pixels: Tensor, layer: int) -> Tensor:
        return self._vision(pixel_values=pixels, output_hidden_states=True).hidden_states[1:][layer]

    def to_sparseformer(self, layer_map: dict[int, int]) -> dict[str, Tensor]:
        return hf_siglip_visual_to_sparseformer(self.model.state_dict(), layer_map)

    def vision_state_dict(self) -> dict[str, Tensor]:
        return dict(self._vision.state_dict())

    def to_hf_vision(self):
        from transformers import SiglipVisionModel

        model = SiglipVisionModel(self._vision.config)
        model.load_state_dict(self.vision_state_dict(), strict=True)
        return model.eval()

    def encode_text(self, texts: list[str]) -> Tensor:
        if not self.has_text:
            raise ValueError(f"{self.spec} has no text tower (load a SiglipModel for zero-shot evaluation)")
        # SigLIP's text tower was trained on inputs padded to its full length.
        batch = self.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
        return self.model.get_text_features(input_ids=batch["input_ids"].to(self.device))


def load_teacher(spec: str) -> Teacher:
    """Load a CLIP ViT teacher.

    Specs:
        `open_clip:NAME` (random weights), `open_clip:NAME@TAG` (an open_clip pretrained tag, e.g.
        `ViT-L-14-336@openai`), `open_clip:NAME@/path/to/checkpoint`, `open_clip:local-dir:/path/to/dir`;
        `hf:HUB_ID` or `hf:/path/to/dir` (CLIPModel, CLIPVisionModelWithProjection, SiglipModel or
        SiglipVisionModel).
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
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoTokenizer,
        CLIPModel,
        CLIPVisionModelWithProjection,
        SiglipModel,
        SiglipVisionModel,
    )

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
    elif config.model_type == "siglip":
        model, tokenizer = SiglipModel.from_pretrained(rest), _optional(AutoTokenizer, rest)
        return HFSiglipTeacher(spec, model, tokenizer, _optional(AutoImageProcessor, rest))
    elif config.model_type == "siglip_vision_model":
        model = SiglipVisionModel.from_pretrained(rest)
        return HFSiglipTeacher(spec, model, None, _optional(AutoImageProcessor, rest))
    else:
        raise ValueError(
            f"Teacher {spec!r}: model_type {config.model_type!r} is not a CLIP or SigLIP ViT "
            "(clip, clip_vision_model, siglip, siglip_vision_model)"
        )
    return HFClipTeacher(spec, model, tokenizer, _optional(AutoImageProcessor, rest))


def _optional(auto_class, path: str):
    """The tokenizer or image processor saved with a model, or None if there is none."""
    try:
        return auto_class.from_pretrained(path)
    except (OSError, ValueError):
        return None

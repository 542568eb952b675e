"""`SparseFormerModel`: the encoder as an HF `PreTrainedModel`, with official state_dict keys."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, TransformersKwargs

from .checkpoint import load_checked
from .configuration import SparseFormerConfig
from .modules import (
    AdaptiveMixing,
    AttentionPoolHead,
    EarlyConvolution,
    SparseFormerUnit,
    WidthTransition,
    mlp_activation,
)

# What transformers passes on to every vision tower (LlavaModel forwards its whole `TransformersKwargs`, e.g. the
# Trainer's `num_items_in_batch`, since 5.2x); accepted and ignored. Read from transformers so new keys follow along.
HF_PLUMBING_KWARGS = {"output_attentions", "interpolate_pos_encoding", "use_cache", *TransformersKwargs.__annotations__}


@dataclass
class SparseFormerOutput(ModelOutput):
    """What a SparseFormer forward returns.

    Attributes:
        image_embeds: [B, proj_dim] head → final norm → projection, exactly the reference model's output.
        last_hidden_state: [B, N, C] the final tokens before the final norm, CLS first where present.
        pooler_output: [B, C] the head's token after the final norm (what `proj` consumes).
        rois: [B, N_latent, 4] final normalised x1y1x2y2 RoIs of the latent tokens.
        hidden_states: one [B, N_u, C_u] entry per unit (the unit's output tokens), when asked for. With an int or
            list of ints as `output_hidden_states` (HF's `vision_feature_layer`, as transformers' LLaVA passes it),
            only those entries are filled and the rest are None; the model then stops after the deepest unit asked
            for, and the final fields above are None.
        hidden_rois: one [B, N_latent, 4] entry per unit, when hidden states are asked for (None for units not run).
        sampling_points: one [B, N_latent, P, 2] entry per unit (None for units without sampling), when asked for.
    """

    image_embeds: Tensor | None = None
    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    rois: Tensor | None = None
    hidden_states: tuple[Tensor | None, ...] | None = None
    hidden_rois: tuple[Tensor, ...] | None = None
    sampling_points: tuple[Tensor | None, ...] | None = None


class SparseFormerPreTrainedModel(PreTrainedModel):
    config_class = SparseFormerConfig
    base_model_prefix = "sparseformer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["SparseFormerUnit"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """HF's `from_pretrained` (also what `AutoModel.from_pretrained` calls), with a folder that is not a
        SparseFormer, a truncated weights file or NaN/inf weights refused in one `CheckpointError` naming the folder
        or file (see `checkpoint.load_checked`)."""
        return load_checked(
            super().from_pretrained,
            pretrained_model_name_or_path,
            *model_args,
            what="SparseFormer encoder",
            model_types=(SparseFormerConfig.model_type,),
            **kwargs,
        )

    @classmethod
    def is_custom_code(cls) -> bool:
        # HF treats models outside its package as custom code and then skips `_init_weights` on modules without
        # direct parameters (this model, AdaptiveMixing without biases). Our `_init_weights` writes only through
        # `transformers.initialization`, which leaves loaded weights alone, so the shortcut is not needed.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The reference initialisation, written through `transformers.initialization` so loaded weights stay."""
        if any(hasattr(p, "ds_id") for p in module.parameters()):
            # Partitioned by DeepSpeed ZeRO-3 (`from_pretrained` under zero.Init): each rank holds an empty shard
            # and the checkpoint's weights are loaded into the gathered parameters afterwards.
            return
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, EarlyConvolution):
            init.kaiming_normal_(module.conv1.weight, mode="fan_out", nonlinearity="relu")
            init.zeros_(module.conv1.bias)
        elif isinstance(module, AdaptiveMixing):
            generator_norm, _, generator_out = module.parameter_generator
            _init_unit_norm(generator_norm)
            init.zeros_(generator_out.weight)
            channels, points = module.in_dim, module.in_points
            bias = torch.empty_like(generator_out.bias)
            nn.init.xavier_uniform_(bias[: channels * channels].view(channels, channels))
            nn.init.xavier_uniform_(bias[channels * channels :].view(points, module.out_points))
            init.copy_(generator_out.bias, bias)
            if module.m_beta is not None:
                init.zeros_(module.m_beta)
                init.zeros_(module.s_beta)
        elif isinstance(module, AttentionPoolHead):
            init.normal_(module.probe)
        elif isinstance(module, SparseFormerUnit):
            if hasattr(module, "stage_embedding"):
                init.normal_(module.stage_embedding.weight)
            if hasattr(module, "roi_adjust_module"):
                _init_unit_norm(module.roi_adjust_module[0])
                init.zeros_(module.roi_adjust_module[-1].weight)
            if hasattr(module, "roi_offset_module"):
                _init_unit_norm(module.roi_offset_module[0])
                init.zeros_(module.roi_offset_module[-1].weight)
                init.copy_(module.roi_offset_bias, _initial_point_offsets(module.roi_offset_bias.numel() // 2))
        elif isinstance(module, SparseFormerModel):
            init.trunc_normal_(module.initial_embedding.weight, std=1.0)
            for n in module.budgets:
                init.copy_(module.initial_roi_table(n), _initial_rois(n))
            if module.cls_embedding is not None:
                init.normal_(module.cls_embedding.weight)


def _init_unit_norm(norm: nn.LayerNorm) -> None:
    """LayerNorm whose output starts with unit norm: weight = 1/sqrt(width), bias = 0."""
    init.constant_(norm.weight, norm.normalized_shape[0] ** -0.5)
    init.zeros_(norm.bias)


def _initial_point_offsets(num_points: int) -> Tensor:
    """[P * 2] point offsets: a centred square grid when P is a square number, else uniform in [-0.5, 0.5]."""
    root = math.isqrt(num_points)
    if root * root != num_points:
        return torch.empty(num_points * 2).uniform_(-0.5, 0.5)
    axis = torch.linspace(0.5 / root, 1 - 0.5 / root, root)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return (torch.stack([x, y], dim=-1) - 0.5).flatten()


def _initial_rois(num_latent_tokens: int) -> Tensor:
    """[N, 4] RoIs: the largest square number of tokens tile a grid of half-size boxes, the rest cover the image."""
    rois = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(num_latent_tokens, 1)
    root = math.isqrt(num_latent_tokens)
    if root >= 2:
        axis = torch.arange(root).float() / (root - 1)
        x, y = torch.meshgrid(axis, axis, indexing="ij")
        corner = torch.stack([x, y], dim=-1).reshape(-1, 2) * 0.5
        rois[: root * root] = torch.cat([corner, corner + 0.5], dim=-1)
    return rois


class SparseFormerModel(SparseFormerPreTrainedModel):
    """SparseFormer encoder: a few latent tokens with RoIs read the image by sparse sampling, then a ViT cortex.

    Accepts any input size and aspect ratio. State_dict keys match the official `*_converted.pth` checkpoints.
    """

    def __init__(self, config: SparseFormerConfig):
        super().__init__(config)
        config.validate_fields()  # also after `from_pretrained(..., num_latent_tokens=N)` set the default budget
        widths = config.width_configs
        self.feat_extractor = EarlyConvolution(config.conv_dim)
        if config.is_elastic:  # one learned RoI table per budget; everything else is shared
            self.initial_rois = nn.ModuleDict({str(n): nn.Embedding(n, 4) for n in config.budgets})
        else:  # the official layout and keys
            self.initial_roi = nn.Embedding(config.num_latent_tokens, 4)
        self.initial_embedding = nn.Embedding(1 if config.same_token_embedding else config.num_latent_tokens, widths[0])
        self.cls_embedding = nn.Embedding(1, widths[-1]) if config.has_cls_token else None

        total = sum(config.repeats)
        # Plain floats, not torch.linspace: the model must also build on the "meta" device.
        rates = [config.drop_path_rate * i / max(1, total - 1) for i in range(total)]
        self.layers = nn.ModuleList()
        self.unit_layer_indices: list[int] = []
        start = 0
        for i, width in enumerate(widths):
            if i > 0 and widths[i - 1] != width:
                self.layers.append(WidthTransition(widths[i - 1], width, config.transition_ln, config.ln_eps))
            self.unit_layer_indices.append(len(self.layers))
            self.layers.append(SparseFormerUnit(config, i, rates[start : start + config.repeats[i]]))
            start += config.repeats[i]
        self.norm = nn.LayerNorm(widths[-1], eps=config.ln_eps)
        self.head = (
            AttentionPoolHead(
                widths[-1],
                config.unit_attention_heads(config.num_units - 1),
                int(widths[-1] * config.mlp_ratio),
                config.ln_eps,
                mlp_activation(config, config.repeats[-1]),
            )
            if config.head_op == "map"
            else None
        )
        self.proj = (
            nn.Identity() if config.proj_dim is None else nn.Linear(widths[-1], config.proj_dim, bias=config.proj_bias)
        )
        self.post_init()

    @property
    def num_tokens(self) -> int:
        """Tokens in `last_hidden_state` at the default budget: latent tokens plus CLS where present."""
        return self.config.num_tokens

    @property
    def budgets(self) -> list[int]:
        """The latent-token counts this encoder serves (one for a fixed-budget encoder)."""
        return list(self.config.budgets) if self.config.is_elastic else [self.config.num_latent_tokens]

    def initial_roi_table(self, num_latent_tokens: int) -> Tensor:
        """[N, 4] the learned initial RoIs of budget N (`config.budget` has checked N)."""
        if self.config.is_elastic:
            return self.initial_rois[str(num_latent_tokens)].weight
        return self.initial_roi.weight

    @property
    def cortex_start(self) -> int:
        """Unit index of cortex block 0: `get_feature_tokens(x, model.cortex_start + k)` gives cortex block k."""
        return self.config.cortex_start

    def _check_pixels(self, pixel_values: Tensor) -> Tensor:
        if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"SparseFormerModel expects pixel_values of shape [B, 3, H, W], got {shape}")
        if pixel_values.shape[0] == 0 or pixel_values.shape[2] == 0 or pixel_values.shape[3] == 0:
            raise ValueError(f"SparseFormerModel got an empty batch or image: {tuple(pixel_values.shape)}")
        return pixel_values.to(self.feat_extractor.conv1.weight.dtype)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] pixels → [B, C, H/4, W/4] the early convolution's feature map, which every latent token samples.

        It does not depend on the budget: pass it to `forward(image_features=...)` to encode the same images at
        several budgets without computing it again (as an elastic bootstrap does each step).
        """
        return self.feat_extractor(self._check_pixels(pixel_values))

    def _initial_state(
        self, pixel_values: Tensor, n: int, image_features: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Feature map [B, C, H/4, W/4], initial tokens [B, N, D0] and RoIs [B, N, 4] for budget N."""
        feature_map = self.image_features(pixel_values) if image_features is None else image_features
        batch = pixel_values.shape[0]
        # Materialised copies, not expanded views: views of leaf parameters trip autograd hooks (e.g. FLOP counting).
        tokens = self.initial_embedding.weight.unsqueeze(0).expand(batch, n, -1).clone()
        rois = self.initial_roi_table(n).float().unsqueeze(0).expand(batch, n, 4).clone()
        return feature_map, tokens, rois

    def _run_units(
        self,
        pixel_values: Tensor,
        last_unit: int,
        record: bool,
        record_points: bool,
        n: int,
        image_features: Tensor | None = None,
    ):
        """Run units 0..last_unit with N latent tokens. Returns tokens, rois, and per-unit (tokens, rois, points)."""
        feature_map, tokens, rois = self._initial_state(pixel_values, n, image_features)
        unit_tokens, unit_rois, unit_points = [], [], []
        unit = 0
        for layer in self.layers[: self.unit_layer_indices[last_unit] + 1]:
            if not isinstance(layer, SparseFormerUnit):
                tokens = layer(tokens)
                continue
            if self.config.has_cls_token and unit == self.config.cls_token_insert_layer:
                cls = self.cls_embedding.weight.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
                tokens = torch.cat([cls, tokens], dim=1)
            tokens, rois, points = layer(feature_map, tokens, rois)
            if record:
                unit_tokens.append(tokens)
                unit_rois.append(rois)
            if record_points:
                unit_points.append(points)
            unit += 1
        return tokens, rois, unit_tokens, unit_rois, unit_points

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | int | list[int] | None = None,
        output_sampling_points: bool = False,
        return_dict: bool | None = None,
        num_latent_tokens: int | None = None,
        image_features: Tensor | None = None,
        **kwargs,
    ) -> SparseFormerOutput | tuple:
        """Encode images.

        Args:
            pixel_values: [B, 3, H, W], normalised with `config.image_mean` / `config.image_std`; any H, W.
            num_latent_tokens: the budget N for this call, one of `budgets` (None: the default,
                `config.num_latent_tokens`); an unlisted N raises `ValueError` naming the budgets.
            output_hidden_states: True for every unit's output tokens; an int or list of ints (negative counts from
                the end, as HF's `vision_feature_layer`) asks for only those units' tokens: the units after the
                deepest one and the head are skipped, and the final fields of the output are None.
            output_sampling_points: also return each unit's final sampling points.
            return_dict: False returns a tuple, as HF models do.
            image_features: `image_features(pixel_values)`, computed once for several calls at different budgets
                (None: computed here).
            kwargs: HF plumbing flags (e.g. `output_attentions`), accepted for pipeline compatibility; attention
                maps are not materialised because attention runs through SDPA.
        """
        unknown = set(kwargs) - HF_PLUMBING_KWARGS
        if unknown:
            raise TypeError(f"SparseFormerModel.forward got unexpected arguments: {sorted(unknown)}")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        num_units = self.config.num_units
        keep = selected_hidden_states(output_hidden_states, num_units)
        record = keep is not None
        # LLaVA reads one unit's tokens: stop there, as `get_feature_tokens` does
        only_selected = record and output_hidden_states is not True
        last = max(keep) if only_selected else num_units - 1
        tokens, rois, unit_tokens, unit_rois, unit_points = self._run_units(
            pixel_values, last, record, output_sampling_points, self.config.budget(num_latent_tokens), image_features
        )
        skipped = (None,) * (num_units - 1 - last)
        if only_selected:  # the final tokens were never computed
            final = {}
        else:
            pooled = self.pool(tokens)
            final = {
                "image_embeds": self.proj(pooled),
                "last_hidden_state": tokens,
                "pooler_output": pooled,
                "rois": rois,
            }
        output = SparseFormerOutput(
            **final,
            hidden_states=tuple(t if i in keep else None for i, t in enumerate(unit_tokens)) + skipped
            if record
            else None,
            hidden_rois=tuple(unit_rois) + skipped if record else None,
            sampling_points=tuple(unit_points) + skipped if output_sampling_points else None,
        )
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            return output.to_tuple()
        return output

    def pool(self, tokens: Tensor) -> Tensor:
        """[B, T, C] final tokens → [B, C] the head's normed summary, before the projection (see `head_op`)."""
        if self.config.head_op == "cls":
            return self.norm(tokens[:, 0])
        if self.config.head_op == "avg":
            return self.norm(tokens.mean(dim=1))
        if self.config.head_op == "map":
            return self.head(self.norm(tokens))
        return self.norm(tokens[:, int(self.config.has_cls_token) :]).mean(dim=1)

    def get_feature_tokens(
        self, pixel_values: Tensor, feature_layer: int = -1, num_latent_tokens: int | None = None
    ) -> Tensor:
        """Tokens after unit `feature_layer` (negative counts from the end), skipping every later unit.

        This is LLaVA's `vision_feature_layer` without the wasted compute: `feature_layer=-2` stops before the last
        cortex block. `num_latent_tokens` is the budget, as in `forward`.

        Returns:
            [B, N_u, C_u] tokens of that unit (CLS first once it has been inserted).
        """
        num_units = self.config.num_units
        if not -num_units <= feature_layer < num_units:
            raise IndexError(f"feature_layer {feature_layer} is out of range for {num_units} units")
        n = self.config.budget(num_latent_tokens)
        tokens, *_ = self._run_units(pixel_values, feature_layer % num_units, False, False, n)
        return tokens


def selected_hidden_states(output_hidden_states: bool | int | list[int] | None, num_units: int) -> set[int] | None:
    """Indices of the hidden states to keep, or None when none are asked for. An int or list of ints (negative
    counts from the end) is HF's `vision_feature_layer`, which transformers passes as `output_hidden_states`."""
    if output_hidden_states is None or output_hidden_states is False:
        return None
    if output_hidden_states is True:
        return set(range(num_units))
    selected = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    for i in selected:
        if not -num_units <= i < num_units:
            raise IndexError(f"hidden state index {i} is out of range for {num_units} units")
    return {i % num_units for i in selected}

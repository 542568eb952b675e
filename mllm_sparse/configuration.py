"""`SparseFormerConfig`: every knob of the SparseFormer v1 and bootstrapped encoders, as an HF `PretrainedConfig`."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PretrainedConfig

# The ops a unit can run, in the order its op list gives them.
OPS = ("ATTN", "MLP", "SAMPLING_M", "ROI_ADJ", "PE_INJECT")
# Ops that read or write RoIs, so they only make sense before the CLS token joins the sequence.
ROI_OPS = ("SAMPLING_M", "ROI_ADJ", "PE_INJECT")
HEAD_OPS = ("avg", "cls", "latent_avg", "map")
PADDING_MODES = ("zeros", "border", "reflection")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class SparseFormerConfig(PretrainedConfig):
    """Configuration of a SparseFormer encoder.

    Field names follow the reference implementation (showlab/sparseformer), with its "compatible config" flags
    flattened into plain fields.

    Args:
        conv_dim: channels of the early convolution; the sampled feature width.
        num_latent_tokens: latent tokens with an RoI each, CLS excluded (the official meaning).
        num_sampling_points: points sampled inside each RoI by a `SAMPLING_M` op.
        same_token_embedding: one shared initial embedding for all latent tokens (bootstrapped presets).
        cls_token_insert_layer: unit index before which a CLS token is prepended; <= 0 means no CLS token.
        width_configs: width of each unit; a change of width inserts a linear transition.
        repeats: how many times each unit runs (weights shared across repeats).
        ops_list: per unit, the op names it applies in order (see `OPS`).
        head_op: how the head pools the final tokens before its LayerNorm and projection: "cls" (the first token),
            "avg" (LayerNorm of the mean over all tokens, as the official v1 models), or "latent_avg" (mean of the
            LayerNormed latent tokens, CLS excluded: open_clip's `pool_type="avg"`, for students of average-pooled
            CLIP teachers), or "map" (a learned probe attends over the LayerNormed tokens, then a residual MLP:
            SigLIP's attention-pooling head).
        proj_dim / proj_bias: the final projection after the head and final LayerNorm; `proj_dim=None` for none
            (SigLIP: the pooled token is the embedding).
        mlp_ratio: MLP hidden width over unit width.
        drop_path_rate: stochastic depth, linear over all unit repeats.
        type_num_attn_heads: 1 gives 64 heads at every width (v1); 2 gives width // 64 heads (bootstrapped).
        num_attention_heads: optional per-unit head counts overriding `type_num_attn_heads`, for cortices inherited
            from ViTs whose head width is not 64 (e.g. ViT-H/14) and for tiny test models.
        type_op_adjust: 1 is LN→Linear(4) with drop path on the deltas (v1); 2 is LN→Linear→GELU→Linear(4).
        mixing_bias: learned biases in adaptive mixing's channel and spatial mixing.
        pg_inner_dim: hidden width of the mixing-parameter generator; a float is a fraction of the unit width.
        transition_ln: LayerNorm after each width transition.
        ln_eps: LayerNorm epsilon of the units, transitions and final norm.
        use_stage_embedding: a learned embedding per repeat, for units that repeat.
        clip_quick_gelu: QuickGELU in the MLPs of single-repeat units (CLIP-inherited blocks).
        gelu_approximate: otherwise those MLPs use `nn.GELU(approximate=...)`: "none", or "tanh" (SigLIP).
        restrict_grad_norm: clamp the gradient of each sampling coordinate to one feature-map pixel.
        grid_sample_padding: `grid_sample` padding mode for points outside the image.
        image_mean / image_std / image_size: the preprocessing the weights expect.
        budgets: the latent-token counts an elastic encoder serves, each with its own learned initial RoIs;
            `num_latent_tokens` is the default one, `forward(..., num_latent_tokens=N)` picks another. None (the
            default, and every official preset) is a fixed-budget encoder. Elastic needs `same_token_embedding`.
    """

    model_type = "sparseformer"

    def __init__(
        self,
        conv_dim: int = 64,
        num_latent_tokens: int = 48,
        num_sampling_points: int = 16,
        same_token_embedding: bool = True,
        cls_token_insert_layer: int = 2,
        width_configs: Sequence[int] = (384, 768) + (768,) * 8,
        repeats: Sequence[int] = (4, 1) + (1,) * 8,
        ops_list: Sequence[Sequence[str]] | None = None,
        head_op: str = "cls",
        proj_dim: int | None = 512,
        proj_bias: bool = False,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        type_num_attn_heads: int = 2,
        num_attention_heads: Sequence[int] | None = None,
        type_op_adjust: int = 2,
        mixing_bias: bool = False,
        pg_inner_dim: int | float = 128,
        transition_ln: bool = False,
        ln_eps: float = 1e-5,
        use_stage_embedding: bool = True,
        clip_quick_gelu: bool = True,
        gelu_approximate: str = "none",
        restrict_grad_norm: bool = False,
        grid_sample_padding: str = "border",
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        image_size: int = 224,
        budgets: Sequence[int] | None = None,
        **kwargs,
    ):
        self.conv_dim = conv_dim
        self.num_latent_tokens = num_latent_tokens
        self.num_sampling_points = num_sampling_points
        self.same_token_embedding = same_token_embedding
        self.cls_token_insert_layer = cls_token_insert_layer
        self.width_configs = [int(w) for w in width_configs]
        self.repeats = [int(r) for r in repeats]
        if ops_list is None:
            ops_list = bootstrapped_ops_list(len(self.width_configs) - 2)
        self.ops_list = [[str(op) for op in ops] for ops in ops_list]
        self.head_op = head_op
        self.proj_dim = proj_dim
        self.proj_bias = proj_bias
        self.mlp_ratio = mlp_ratio
        self.drop_path_rate = drop_path_rate
        self.type_num_attn_heads = type_num_attn_heads
        self.num_attention_heads = None if num_attention_heads is None else [int(h) for h in num_attention_heads]
        self.type_op_adjust = type_op_adjust
        self.mixing_bias = mixing_bias
        self.pg_inner_dim = pg_inner_dim
        self.transition_ln = transition_ln
        self.ln_eps = ln_eps
        self.use_stage_embedding = use_stage_embedding
        self.clip_quick_gelu = clip_quick_gelu
        self.gelu_approximate = gelu_approximate
        self.restrict_grad_norm = restrict_grad_norm
        self.grid_sample_padding = grid_sample_padding
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.image_size = image_size
        self.budgets = None if budgets is None else sorted({int(b) for b in budgets})
        super().__init__(**kwargs)
        self.validate_fields()

    @property
    def has_cls_token(self) -> bool:
        return self.cls_token_insert_layer > 0

    @property
    def is_elastic(self) -> bool:
        return self.budgets is not None

    def budget(self, num_latent_tokens: int | None = None) -> int:
        """The latent-token count to run: `num_latent_tokens` (None: the default), checked against what the encoder
        serves; an unlisted count is refused with the list (there is no nearest-budget rule)."""
        if num_latent_tokens is None:
            return self.num_latent_tokens
        n = int(num_latent_tokens)
        served = self.budgets if self.is_elastic else [self.num_latent_tokens]
        if n not in served:
            kind = "this elastic encoder serves" if self.is_elastic else "this fixed-budget encoder serves only"
            raise ValueError(f"num_latent_tokens={n}: {kind} {served} latent tokens")
        return n

    @property
    def num_tokens(self) -> int:
        """Tokens in the final sequence, the number the LLM sees: latent tokens plus CLS where present."""
        return self.num_latent_tokens + int(self.has_cls_token)

    @property
    def hidden_size(self) -> int:
        """Width of the final tokens (what a projector consumes)."""
        return self.width_configs[-1]

    @property
    def num_units(self) -> int:
        return len(self.width_configs)

    @property
    def cortex_start(self) -> int:
        """Index of the first cortex unit: the plain ViT blocks after the last unit with an RoI op."""
        roi_units = [i for i, ops in enumerate(self.ops_list) if set(ops) & set(ROI_OPS)]
        return roi_units[-1] + 1 if roi_units else 0

    def unit_attention_heads(self, index: int) -> int:
        """Attention heads of unit `index`."""
        if self.num_attention_heads is not None:
            return self.num_attention_heads[index]
        return 64 if self.type_num_attn_heads == 1 else self.width_configs[index] // 64

    def validate_fields(self) -> None:
        """Raise `ValueError` naming the field when the configuration cannot build a model."""
        n = len(self.width_configs)
        if n == 0:
            raise ValueError("SparseFormerConfig: width_configs must list at least one unit")
        if self.num_attention_heads is not None and len(self.num_attention_heads) != n:
            raise ValueError(f"SparseFormerConfig: num_attention_heads needs one entry per unit ({n})")
        if len(self.repeats) != n or len(self.ops_list) != n:
            raise ValueError(
                f"SparseFormerConfig: width_configs ({n}), repeats ({len(self.repeats)}) and ops_list "
                f"({len(self.ops_list)}) must have one entry per unit"
            )
        for i, ops in enumerate(self.ops_list):
            for op in ops:
                if op not in OPS:
                    raise ValueError(f"SparseFormerConfig: ops_list[{i}] has unknown op {op!r}; valid ops: {OPS}")
                if self.has_cls_token and i >= self.cls_token_insert_layer and op in ROI_OPS:
                    raise ValueError(
                        f"SparseFormerConfig: ops_list[{i}] uses {op} after the CLS token is inserted "
                        f"(cls_token_insert_layer={self.cls_token_insert_layer}); RoI ops must come before it"
                    )
        if self.cls_token_insert_layer >= n:
            raise ValueError(f"SparseFormerConfig: cls_token_insert_layer={self.cls_token_insert_layer} >= {n} units")
        if self.num_latent_tokens < 1:
            raise ValueError(f"SparseFormerConfig: num_latent_tokens must be >= 1, got {self.num_latent_tokens}")
        if self.budgets is not None:
            if not self.budgets or self.budgets[0] < 1:
                raise ValueError(f"SparseFormerConfig: budgets must be positive token counts, got {self.budgets}")
            if self.num_latent_tokens not in self.budgets:
                raise ValueError(
                    f"SparseFormerConfig: the default budget num_latent_tokens={self.num_latent_tokens} is not "
                    f"among the budgets {self.budgets}"
                )
            if not self.same_token_embedding:
                raise ValueError(
                    "SparseFormerConfig: an elastic encoder (budgets) needs same_token_embedding=True: one initial "
                    "token embedding shared by every budget"
                )
        if self.num_sampling_points < 2:
            raise ValueError(f"SparseFormerConfig: num_sampling_points must be >= 2, got {self.num_sampling_points}")
        if any(r < 1 for r in self.repeats):
            raise ValueError(f"SparseFormerConfig: every repeat must be >= 1, got {self.repeats}")
        for i, (w, ops) in enumerate(zip(self.width_configs, self.ops_list, strict=True)):
            if "PE_INJECT" in ops and w % 4:
                raise ValueError(
                    f"SparseFormerConfig: unit {i} injects RoI encodings, so its width {w} must be a multiple of 4"
                )
            if "ATTN" in ops:
                heads = self.unit_attention_heads(i)
                if heads < 1 or w % heads:
                    raise ValueError(
                        f"SparseFormerConfig: unit {i} of width {w} cannot split into {heads} attention heads; "
                        "set num_attention_heads per unit"
                    )
        if self.head_op not in HEAD_OPS:
            raise ValueError(f"SparseFormerConfig: head_op must be one of {HEAD_OPS}, got {self.head_op!r}")
        if self.head_op == "cls" and not self.has_cls_token:
            raise ValueError("SparseFormerConfig: head_op='cls' needs a CLS token (cls_token_insert_layer > 0)")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(
                f"SparseFormerConfig: gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}"
            )
        if self.type_num_attn_heads not in (1, 2):
            raise ValueError(f"SparseFormerConfig: type_num_attn_heads must be 1 or 2, got {self.type_num_attn_heads}")
        if self.type_op_adjust not in (1, 2):
            raise ValueError(f"SparseFormerConfig: type_op_adjust must be 1 or 2, got {self.type_op_adjust}")
        if self.grid_sample_padding not in PADDING_MODES:
            raise ValueError(
                f"SparseFormerConfig: grid_sample_padding must be one of {PADDING_MODES}, "
                f"got {self.grid_sample_padding!r}"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("SparseFormerConfig: image_mean and image_std need 3 values (RGB)")


def v1_ops_list(num_cortex: int) -> list[list[str]]:
    """SparseFormer v1: two sampling units, then `num_cortex - 1` plain transformer units."""
    sampling = ["ATTN", "ROI_ADJ", "SAMPLING_M", "MLP"]
    return [sampling, sampling] + [["ATTN", "MLP"]] * (num_cortex - 1)


def bootstrapped_ops_list(num_cortex: int) -> list[list[str]]:
    """Bootstrapped SparseFormer: a focusing unit, a sampling unit at the ViT width, then `num_cortex` ViT blocks."""
    focusing = ["SAMPLING_M", "PE_INJECT", "ATTN", "MLP", "ROI_ADJ"]
    return [focusing, ["SAMPLING_M", "PE_INJECT"]] + [["ATTN", "MLP"]] * num_cortex

"""Assembling LLaVA models: any vision tower + a projector + any HF causal LM → stock `LlavaForConditionalGeneration`.

The result is transformers' own class, so `generate`, `Trainer`, `peft`, DeepSpeed, `save_pretrained` and
`AutoModelForImageTextToText.from_pretrained` work unchanged (a new process imports `mllm_sparse` first so the
SparseFormer and pooled towers resolve).

Projectors, by LLaVA's names:
    mlp2x_gelu   linear_1 → GELU → linear_2 (LLaVA-1.5);
    linear       one linear map. Stock Llava always has two linears, so this is linear_1 → identity → linear_2
                 with linear_2 starting as the identity: the same function space as LLaVA-1's single linear.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mllm_sparse.checkpoint import CheckpointError, load_safetensors, read_state_dict
from mllm_sparse.files import atomic_dir, atomic_path

from .processing import IMAGE_TOKEN
from .towers import layer_tokens, num_image_tokens

PROJECTORS = {"mlp2x_gelu": "gelu", "linear": "linear"}
PROJECTOR_FILE = "mm_projector.safetensors"
PROJECTOR_PREFIX = "model.multi_modal_projector."
# haotian-liu/LLaVA's `mm_projector.bin` keys → ours (`model.mm_projector.{0,2}` for mlp2x_gelu, bare for linear).
LLAVA_PROJECTOR_KEYS = {
    "model.mm_projector.0.weight": "linear_1.weight",
    "model.mm_projector.0.bias": "linear_1.bias",
    "model.mm_projector.2.weight": "linear_2.weight",
    "model.mm_projector.2.bias": "linear_2.bias",
}


def default_feature_selection(vision_config: PretrainedConfig, feature_layer: int | None = None) -> tuple[int, str]:
    """(vision_feature_layer, select_strategy), LLaVA-like: the second-to-last layer, its CLS token dropped.

    Every tower drops a CLS token ("default"), as LLaVA-1.5 does for its ViT, so the LLM reads the layer's
    `num_latent_tokens` (a SparseFormer's CLS token is the one bootstrapping aligns with the teacher's embedding). A
    layer with no CLS token keeps all its tokens ("full"): a SigLIP ViT, a SparseFormer unit before the CLS token is
    inserted, a SparseFormer without one.
    """
    feature_layer = -2 if feature_layer is None else feature_layer
    return feature_layer, "default" if layer_tokens(vision_config, feature_layer).has_cls else "full"


def vlm_config(
    vision_config: PretrainedConfig,
    text_config: PretrainedConfig,
    image_token_id: int,
    projector: str = "mlp2x_gelu",
    feature_layer: int | None = None,
    select_strategy: str | None = None,
) -> LlavaConfig:
    """The `LlavaConfig` for a tower + LLM pair, validated (projector, feature width, token count)."""
    if projector not in PROJECTORS:
        raise ValueError(f"projector must be one of {sorted(PROJECTORS)}, got {projector!r}")
    feature_layer, default_strategy = default_feature_selection(vision_config, feature_layer)
    select_strategy = default_strategy if select_strategy is None else select_strategy
    if feature_layer == 0:
        # transformers' LLaVA passes the layer on as `output_hidden_states`, where 0 reads as "none": it would build,
        # then fail at the first forward. The same hidden state counted from the end works.
        raise ValueError(
            "vision_feature_layer 0 does not work in transformers' LLaVA (it reads as 'no hidden states');"
            " count the same hidden state from the end instead (its index minus the number of hidden states)"
        )
    width = layer_tokens(vision_config, feature_layer).width
    if width != vision_config.hidden_size:
        raise ValueError(
            f"vision_feature_layer {feature_layer} has width {width}, but the projector reads the tower's hidden_size "
            f"{vision_config.hidden_size}; pick a layer of the final width (e.g. a cortex block)"
        )
    tokens = num_image_tokens(vision_config, feature_layer, select_strategy)
    return LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        projector_hidden_act=PROJECTORS[projector],
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=select_strategy,
        image_seq_length=tokens,
        multimodal_projector_bias=True,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )


def projector_type(config: LlavaConfig) -> str:
    return "linear" if config.projector_hidden_act == "linear" else "mlp2x_gelu"


def add_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> int:
    """Add `image_token` (and a pad token if missing) to the tokenizer; return the image token id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(image_token)


def build_vlm(
    tower: PreTrainedModel,
    llm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    projector: str = "mlp2x_gelu",
    feature_layer: int | None = None,
    select_strategy: str | None = None,
) -> LlavaForConditionalGeneration:
    """A new LLaVA model from a vision tower and a causal LM; adds `<image>` to the tokenizer and resizes embeddings.

    The tower and the LLM keep their weights; the projector is new (trained in stage 1).
    """
    image_token_id = add_image_token(tokenizer)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    config = vlm_config(tower.config, llm.config, image_token_id, projector, feature_layer, select_strategy)
    config.text_config.vocab_size = llm.get_input_embeddings().num_embeddings
    config.pad_token_id = tokenizer.pad_token_id
    # Parts the model would otherwise allocate and randomly initialise are replaced right away, so build on "meta".
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = llm.get_decoder()
    model.lm_head = llm.get_output_embeddings()
    model.model.multi_modal_projector = new_projector(config)
    model.config.text_config = llm.config
    model.tie_weights()
    return model.to(llm.dtype)


def new_projector(config: LlavaConfig) -> LlavaMultiModalProjector:
    """A freshly initialised projector (linear_2 = identity for the `linear` type)."""
    projector = LlavaMultiModalProjector(config)
    for layer in (projector.linear_1, projector.linear_2):
        nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
        nn.init.zeros_(layer.bias)
    if projector_type(config) == "linear" and projector.linear_2.in_features == projector.linear_2.out_features:
        nn.init.eye_(projector.linear_2.weight)
    return projector


def replace_tower(
    model: LlavaForConditionalGeneration,
    tower: PreTrainedModel,
    projector: str | None = None,
    feature_layer: int | None = None,
    select_strategy: str | None = None,
) -> LlavaForConditionalGeneration:
    """Swap the vision tower of a LLaVA model (LLM and tokenizer kept); the projector is re-created for the tower.

    The new projector is untrained: the model needs stage-1 training before its answers mean anything.
    """
    projector = projector or projector_type(model.config)
    config = vlm_config(
        tower.config,
        model.config.text_config,
        model.config.image_token_id,
        projector,
        feature_layer,
        select_strategy,
    )
    config.pad_token_id = getattr(model.config, "pad_token_id", None)
    model.config = config
    model.model.config = config
    model.model.vision_tower = tower.to(model.dtype)
    model.model.multi_modal_projector = new_projector(config).to(model.dtype)
    return model


@contextmanager
def model_folder(out: str | Path) -> Iterator[Path]:
    """A temporary folder to `save_pretrained` a model (and its processor) into; on success it takes `out`'s place in
    one rename (`files.atomic_dir`), so a kill mid-write leaves the previous folder or none, never half a model.

    An existing `out` holding files but no config.json is not a model folder and is refused, so replacing it cannot
    delete unrelated work.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; a model is saved as a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"{out} holds files but is not a model folder (no config.json); give a new or empty folder")
    with atomic_dir(out) as tmp:
        yield tmp


def projector_state_dict(model) -> dict[str, torch.Tensor]:
    """The projector weights under their full model keys (gathered first under ZeRO-3; collective there)."""
    base = model.base_model.model if hasattr(model, "peft_config") else model
    projector = base.model.multi_modal_projector
    with gathered(list(projector.parameters())):
        return {PROJECTOR_PREFIX + k: v.detach().cpu().clone() for k, v in projector.state_dict().items()}


def save_projector(state: dict[str, torch.Tensor], config: LlavaConfig, out_dir: str | Path) -> Path:
    """Write `mm_projector.safetensors` (atomically): `projector_state_dict` plus the projector type and sizes."""
    path = Path(out_dir) / PROJECTOR_FILE
    metadata = {
        "projector": projector_type(config),
        "vision_hidden_size": str(config.vision_config.hidden_size),
        "text_hidden_size": str(config.text_config.hidden_size),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def read_projector(path: str | Path) -> dict[str, torch.Tensor]:
    """Projector weights from our `mm_projector.safetensors` or haotian-liu/LLaVA's `mm_projector.bin`, as
    `linear_1.*` / `linear_2.*` keys. Pickles load with `weights_only=True`; a damaged file or a non-finite tensor
    raises `CheckpointError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a projector file (e.g. {path / PROJECTOR_FILE})")
    if not path.is_file():
        raise FileNotFoundError(f"Projector file not found: {path}")
    # Truncated or corrupt files, pickles holding anything but a dict of tensors, NaN/inf: CheckpointError naming it.
    raw = load_safetensors(path) if path.suffix == ".safetensors" else read_state_dict(path)
    state = {}
    for key, value in raw.items():
        if key.startswith(PROJECTOR_PREFIX):
            state[key.removeprefix(PROJECTOR_PREFIX)] = value
        elif key in LLAVA_PROJECTOR_KEYS:
            state[LLAVA_PROJECTOR_KEYS[key]] = value
        elif key in ("model.mm_projector.weight", "model.mm_projector.bias"):
            raise ValueError(
                f"{path}: a single-linear LLaVA-1 projector ({key}); convert it with linear_2 = identity first"
            )
        else:
            raise ValueError(f"{path}: unexpected key {key!r} in a projector checkpoint")
    return state


def load_projector(model: LlavaForConditionalGeneration, path: str | Path) -> None:
    """Load projector weights into `model`, also when its parameters are partitioned by DeepSpeed ZeRO-3.

    Under ZeRO-3 each rank holds an empty shard (`torch.Size([0])`), which is why a plain `load_state_dict` fails
    there; the parameters are gathered, filled on rank 0 and re-partitioned.
    """
    state = read_projector(path)
    projector = model.model.multi_modal_projector
    expected = {k: tuple(_full_shape(v)) for k, v in projector.named_parameters()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if set(expected) != set(got):
        raise ValueError(
            f"{path}: projector keys {sorted(got)} do not match the model's {sorted(expected)} "
            f"(projector type {projector_type(model.config)!r})"
        )
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    if wrong:
        raise ValueError(f"{path}: projector shape mismatch (checkpoint vs model): {wrong}")
    params = dict(projector.named_parameters())
    with gathered(list(params.values()), modifier_rank=0):
        if is_rank_zero():
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(state[name].to(param.dtype))


def _full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's real shape, also when ZeRO-3 has partitioned it to an empty shard."""
    return getattr(param, "ds_shape", param.shape)


def is_rank_zero() -> bool:
    """Rank 0 of the process group, or no group. Under DeepSpeed on a CPU the Trainer's process index (and so its
    `should_save`) read 0 on every rank, so the group's own rank decides who writes."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """`deepspeed.zero.GatheredParameters` when the parameters are ZeRO-3 partitioned, else a no-op."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

"""What the towers that cut a CLIP ViT's patch tokens to a token budget share (pooled, VisionZip): a config holding
the ViT's config, the default budget and the budgets one model serves, and a model holding the ViT."""

from __future__ import annotations

from transformers import AutoModel, CLIPVisionConfig, PretrainedConfig, PreTrainedModel


def clip_config(vision_config: CLIPVisionConfig | dict | None) -> CLIPVisionConfig:
    """The ViT's config from a config, its dict (as saved) or None (transformers' default ViT)."""
    if isinstance(vision_config, dict):
        return CLIPVisionConfig(**vision_config)
    return vision_config if vision_config is not None else CLIPVisionConfig()


def num_patches(vision_config: CLIPVisionConfig) -> int:
    return (vision_config.image_size // vision_config.patch_size) ** 2


class BudgetedViTConfig(PretrainedConfig):
    """A CLIP ViT tower that hands the LLM `num_latent_tokens` tokens (its CLS token in front, not counted).

    Args:
        vision_config: the ViT's `CLIPVisionConfig` (or its dict).
        num_latent_tokens: the default budget; each subclass says which counts it can cut to (`check_budget`).
        budgets: token counts one model serves; `forward(..., num_latent_tokens=N)` picks one. None: one.
    """

    sub_configs = {"vision_config": CLIPVisionConfig}
    tower_name = "ViT"  # in messages

    def __init__(self, vision_config: CLIPVisionConfig | dict | None, num_latent_tokens: int, budgets, **kwargs):
        self.vision_config = clip_config(vision_config)
        for n in [num_latent_tokens, *(budgets or [])]:
            self.check_budget(n)
        if budgets is not None and num_latent_tokens not in budgets:
            raise ValueError(f"{type(self).__name__}: the default budget {num_latent_tokens} is not among {budgets}")
        self.num_latent_tokens = num_latent_tokens
        self.budgets = sorted(set(budgets)) if budgets else None
        super().__init__(**kwargs)

    def check_budget(self, num_latent_tokens: int) -> None:
        """Raise `ValueError` naming the config class where the tower cannot cut to `num_latent_tokens` tokens: here,
        anything but 1 to every patch (a subclass adds its own rule, e.g. a square grid)."""
        if not 1 <= num_latent_tokens <= (patches := num_patches(self.vision_config)):
            raise ValueError(
                f"{type(self).__name__}: num_latent_tokens must be between 1 and {patches} patches, "
                f"got {num_latent_tokens}"
            )

    @property
    def hidden_size(self) -> int:
        return self.vision_config.hidden_size

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    def budget(self, num_latent_tokens: int | None = None) -> int:
        """The token count to run: `num_latent_tokens` (None: the default), one of the served budgets."""
        if num_latent_tokens is None:
            return self.num_latent_tokens
        served = self.budgets or [self.num_latent_tokens]
        if int(num_latent_tokens) not in served:
            raise ValueError(f"num_latent_tokens={num_latent_tokens}: this {self.tower_name} tower serves {served}")
        return int(num_latent_tokens)


class BudgetedViTModel(PreTrainedModel):
    """Holds the ViT (`self.vit`, built from `config.vision_config`); subclasses cut its tokens in `forward`."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True
    _no_split_modules = ["CLIPEncoderLayer"]

    def __init__(self, config: BudgetedViTConfig):
        super().__init__(config)
        self.vit = AutoModel.from_config(config.vision_config)
        self.post_init()

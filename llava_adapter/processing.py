"""`SparseLlavaProcessor`: LLaVA's processor with the placeholder count taken from the vision tower, not a formula.

transformers' `LlavaProcessor` inserts `(H // patch)·(W // patch) + extra − (1 if "default")` placeholders per image,
a ViT assumption that is wrong for a SparseFormer (or a pooled ViT). This processor inserts exactly
`num_image_tokens` placeholders, a number `build_processor` derives from the tower config and the feature selection
(`towers.num_image_tokens`). It saves and loads like any processor and resolves through `AutoProcessor` after
`import llava_adapter`.

Image preprocessing is transformers' `LlavaImageProcessor` with the tower's normalisation, in one of LLaVA's modes:
`pad` (pad to a square with the mean colour, then resize; LLaVA-1.5's `--image_aspect_ratio pad`), `resize` (squash to
a square) or `crop` (resize the shorter side, centre-crop; CLIP's own preprocessing).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from transformers import AutoProcessor, LlavaImageProcessor, LlavaProcessor, PreTrainedTokenizerBase
from transformers.processing_utils import MultiModalData

from mllm_sparse import SparseFormerConfig

IMAGE_ASPECT_RATIOS = ("pad", "resize", "crop")
IMAGE_TOKEN = "<image>"


class SparseLlavaProcessor(LlavaProcessor):
    """Tokenizer + image processor that expands each `<image>` into exactly `num_image_tokens` placeholders.

    Args:
        image_processor: an HF image processor (see `build_image_processor`).
        tokenizer: the LLM's tokenizer, holding `image_token` as a special token.
        num_image_tokens: placeholders per image, N; must equal the features the model's tower yields.
        chat_template: optional Jinja template for `apply_chat_template`.
        image_token: the placeholder token string.
        conversation_template: the conversation template (`conversation.TEMPLATES`) the model was trained with,
            recorded by training so that every loader prompts the model as it learnt; None where it never trained.
        image_tokens_per_budget: for a model whose tower serves several token budgets (an elastic SparseFormer),
            {budget: placeholders per image}; `num_image_tokens` is the default budget's entry. A call picks a
            budget with `processor(..., num_latent_tokens=N)`. None: the tower serves one budget.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        chat_template: str | None = None,
        image_token: str = IMAGE_TOKEN,
        conversation_template: str | None = None,
        image_tokens_per_budget: Mapping[int | str, int] | None = None,
        **kwargs,
    ):
        if num_image_tokens is None or int(num_image_tokens) < 1:
            raise ValueError(f"SparseLlavaProcessor needs num_image_tokens >= 1, got {num_image_tokens!r}")
        self.num_image_tokens = int(num_image_tokens)
        self.conversation_template = conversation_template
        # JSON keys are strings: a saved table comes back as {"16": 16, ...}
        table = {int(k): int(v) for k, v in (image_tokens_per_budget or {}).items()} or None
        if table is not None and self.num_image_tokens not in table.values():
            raise ValueError(
                f"SparseLlavaProcessor: num_image_tokens={self.num_image_tokens} is no budget's count in {table}"
            )
        self.image_tokens_per_budget = table
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template,
            image_token=image_token,
            **kwargs,
        )

    @property
    def budgets(self) -> list[int]:
        """The latent-token budgets the model serves (one for a fixed tower: the placeholders it inserts)."""
        return sorted(self.image_tokens_per_budget) if self.image_tokens_per_budget else [self.num_image_tokens]

    def image_tokens_at(self, num_latent_tokens: int | None = None) -> int:
        """Placeholders per image at budget `num_latent_tokens` (None: the default); an unserved budget is refused
        with the list."""
        if num_latent_tokens is None:
            return self.num_image_tokens
        n = int(num_latent_tokens)
        if self.image_tokens_per_budget is None:
            if n != self.num_image_tokens:
                raise ValueError(f"num_latent_tokens={n}: this model's tower serves only {self.num_image_tokens}")
            return n
        if n not in self.image_tokens_per_budget:
            raise ValueError(f"num_latent_tokens={n}: this model's elastic tower serves {self.budgets}")
        return self.image_tokens_per_budget[n]

    def __call__(self, images=None, text=None, num_latent_tokens: int | None = None, **kwargs):
        """`LlavaProcessor.__call__`, with `num_latent_tokens` picking the budget whose placeholders the text gets
        (None: the default). The model must run at the same budget (`llava_adapter.budget`)."""
        if num_latent_tokens is None:
            return super().__call__(images=images, text=text, **kwargs)
        at_budget = copy.copy(self)  # a per-call count; the processor itself is left as it was
        at_budget.num_image_tokens = self.image_tokens_at(num_latent_tokens)
        return LlavaProcessor.__call__(at_budget, images=images, text=text, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        if image_sizes is None:
            return MultiModalData()
        count = len(image_sizes)
        return MultiModalData(num_image_tokens=[self.num_image_tokens] * count, num_image_patches=[1] * count)


def build_image_processor(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    image_aspect_ratio: str = "pad",
) -> LlavaImageProcessor:
    """An HF image processor giving [3, S, S] pixels normalised with the tower's `mean` / `std`."""
    if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {image_aspect_ratio!r}")
    square = {"height": image_size, "width": image_size}
    if image_aspect_ratio == "resize":
        size, crop = square, False
    else:
        size, crop = {"shortest_edge": image_size}, True
    return LlavaImageProcessor(
        do_pad=image_aspect_ratio == "pad",
        size=size,
        do_center_crop=crop,
        crop_size=square,
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )


def build_processor(
    tokenizer: PreTrainedTokenizerBase,
    image_processor: LlavaImageProcessor,
    num_image_tokens: int,
    image_tokens_per_budget: Mapping[int, int] | None = None,
    image_token: str = IMAGE_TOKEN,
) -> SparseLlavaProcessor:
    if image_token not in tokenizer.get_vocab():
        raise ValueError(f"The tokenizer has no {image_token!r} token; add it (build_vlm does) before the processor")
    return SparseLlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=num_image_tokens,
        chat_template=getattr(tokenizer, "chat_template", None),
        image_token=image_token,
        image_tokens_per_budget=image_tokens_per_budget,
    )


# AutoProcessor resolves a saved processor by its class name among registered processors; the key is only
# a registry slot (an encoder folder itself has no processor to load).
AutoProcessor.register(SparseFormerConfig, SparseLlavaProcessor, exist_ok=True)

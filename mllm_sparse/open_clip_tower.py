"""A SparseFormer as an open_clip visual tower: `clip.visual = OpenClipVisual(encoder)`.

open_clip's `CLIP.encode_image` calls `self.visual(pixels)` and expects the [B, D] embedding; a SparseFormer returns a
`SparseFormerOutput`. `OpenClipVisual` returns its `image_embeds` and carries what open_clip reads from a visual tower:

    clip, _, _ = open_clip.create_model_and_transforms("ViT-B-16", pretrained=...)  # the teacher
    clip.visual = OpenClipVisual(SparseFormerModel.from_pretrained("runs/encoder"))
    preprocess = open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(**open_clip.get_model_preprocess_cfg(clip)), is_train=False
    )  # the encoder's size, mean and std
    features = clip.encode_image(preprocess(image)[None], normalize=True)

`preprocess_cfg` (and the legacy `image_size` / `image_mean` / `image_std`) come from the encoder's config, which
bootstrapping copies from the teacher, so open_clip builds the transform the weights expect. `lock` freezes it as
open_clip's `lock_image_tower` does; `output_dim` is the embedding width.
"""

from __future__ import annotations

from torch import Tensor, nn

from .modeling import SparseFormerModel


class OpenClipVisual(nn.Module):
    """`encoder` as an open_clip visual tower (see the module docstring).

    Args:
        encoder: a SparseFormer whose `image_embeds` live in the CLIP's joint space (a bootstrapped student of that
            CLIP, or an official CLIP-bootstrapped preset).
        interpolation / resize_mode: open_clip's resize settings for `preprocess_cfg` (its eval defaults).
    """

    def __init__(self, encoder: SparseFormerModel, interpolation: str = "bicubic", resize_mode: str = "shortest"):
        super().__init__()
        if not isinstance(encoder, SparseFormerModel):
            raise TypeError(f"OpenClipVisual wraps a SparseFormerModel, got {type(encoder).__name__}")
        self.encoder = encoder
        config = encoder.config
        self.output_dim = config.proj_dim if config.proj_dim is not None else config.width_configs[-1]
        self.image_size = (config.image_size, config.image_size)
        self.image_mean = tuple(config.image_mean)
        self.image_std = tuple(config.image_std)
        self.preprocess_cfg = {
            "size": self.image_size,
            "mode": "RGB",
            "mean": self.image_mean,
            "std": self.image_std,
            "interpolation": interpolation,
            "resize_mode": resize_mode,
            "fill_color": 0,
        }

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] normalised pixels → [B, output_dim] embeddings (not L2-normalised; `encode_image` does that)."""
        return self.encoder(pixel_values, return_dict=True).image_embeds

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the tower, leaving the last `unlocked_groups` groups trainable (open_clip's `lock_image_tower`).

        Groups, first to last: the stem (early convolution, initial token embedding and RoIs, CLS embedding), each
        layer but the last, the last layer with the final norm and head, the projection. `freeze_bn_stats` is
        accepted for open_clip's signature; a SparseFormer has no batch norm.
        """
        for param in self.parameters():
            param.requires_grad = False
        if unlocked_groups <= 0:
            return
        enc = self.encoder
        rois = enc.initial_rois if enc.config.is_elastic else enc.initial_roi
        stem = [enc.feat_extractor, enc.initial_embedding, rois, enc.cls_embedding]
        last = [enc.layers[-1], enc.norm, enc.head]
        groups = [stem, *([layer] for layer in enc.layers[:-1]), last, [enc.proj]]
        for group in groups[-unlocked_groups:]:
            for module in group:
                if module is not None:
                    module.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """open_clip's hook; a SparseFormer has no gradient checkpointing, so asking for it is an error."""
        if enable:
            raise NotImplementedError("A SparseFormer visual tower does not support gradient checkpointing")

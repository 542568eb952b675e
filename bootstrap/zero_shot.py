"""Zero-shot classification with a CLIP text tower, on a synthetic world's labels."""

from __future__ import annotations

import torch
from open_clip import build_zero_shot_classifier

from mllm_sparse.synth.dataset import SyntheticWorld


@torch.no_grad()
def image_features(encode, images, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised embeddings [N, D] of `images` (a `CaptionedImages`) through `encode(pixels)`."""
    feats = []
    for start in range(0, len(images), batch_size):
        pixels = images.pixels(slice(start, start + batch_size)).to(device)
        feats.append(torch.nn.functional.normalize(encode(pixels).float(), dim=-1))
    return torch.cat(feats)


@torch.no_grad()
def zero_shot_report(model, tokenizer, world: SyntheticWorld, split: str, image_size: int, device, encode=None) -> dict:
    """Top-1 of `encode` (default: the CLIP model's own image tower) against the text tower's class embeddings,
    overall and by the size class of each image's principal object."""
    classifier = build_zero_shot_classifier(model, tokenizer, world.class_names, world.templates, device=device)
    images = world.captioned_images(split, image_size)
    feats = image_features(encode or model.encode_image, images, device)
    correct = (feats @ classifier.float()).argmax(dim=-1).cpu() == images.labels
    sizes = [r["scene"]["objects"][0]["size"] if r.get("scene") else "unknown" for r in world.records(split)]
    by_size = {}
    for size in sorted(set(sizes)):
        mask = torch.tensor([s == size for s in sizes])
        by_size[size] = {"images": int(mask.sum()), "top1": float(correct[mask].float().mean())}
    return {
        "split": split,
        "num_images": len(images),
        "num_classes": len(world.class_names),
        "top1": float(correct.float().mean()),
        "by_principal_size": by_size,
    }

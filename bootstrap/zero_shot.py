"""Zero-shot classification with a CLIP text tower, on a synthetic world's labels."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mllm_sparse.files import read_json
from mllm_sparse.synth.dataset import SyntheticWorld
from mllm_sparse.synth.text import NUMBER_WORDS


@torch.no_grad()
def image_features(encode, images, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised embeddings [N, D] of `images` (a `CaptionedImages`) through `encode(pixels)`."""
    feats = []
    for start in range(0, len(images), batch_size):
        pixels = images.pixels(slice(start, start + batch_size)).to(device)
        feats.append(torch.nn.functional.normalize(encode(pixels).float(), dim=-1))
    return torch.cat(feats)


@torch.no_grad()
def text_classifier(encode_text: Callable[[list[str]], torch.Tensor], class_names, templates) -> torch.Tensor:
    """[D, K] zero-shot weights: per class, the normalised mean of its normalised template embeddings."""
    weights = []
    for name in class_names:
        texts = F.normalize(encode_text([t.format(name) for t in templates]).float(), dim=-1)
        weights.append(F.normalize(texts.mean(0), dim=0))
    return torch.stack(weights, dim=1)


@torch.no_grad()
def zero_shot_report(model, tokenizer, world: SyntheticWorld, split: str, image_size: int, device, encode=None) -> dict:
    """Top-1 of `encode` (default: the CLIP model's own image tower) against the text tower's class embeddings,
    overall and by the size class of each image's principal object."""
    classifier = text_classifier(
        lambda texts: model.encode_text(tokenizer(texts).to(device)), world.class_names, world.templates
    )
    images = world.captioned_images(split, image_size)
    feats = image_features(encode or model.encode_image, images, device)
    correct = (feats @ classifier).argmax(dim=-1).cpu() == images.labels
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


def probe_prompt(qtype: str, subject: str, choice: str) -> str:
    """The text a CLIP scores for one answer choice of a synthetic-world question."""
    if qtype == "color":
        return f"a {choice} {subject}"
    if qtype == "count":
        return f"{NUMBER_WORDS[int(choice)]} {subject}"
    if qtype == "position":
        return f"a {subject} {'on the' if choice in ('left', 'right') else 'at the'} {choice}"
    if qtype == "existence":
        return f"a scene with a {subject}" if choice == "yes" else f"a scene without a {subject}"
    if qtype == "largest":
        return f"a large {choice}"
    raise ValueError(f"no CLIP probe for question type {qtype!r}")


@torch.no_grad()
def question_probe_report(
    model, tokenizer, world: SyntheticWorld, split: str, image_size: int, device, encode=None
) -> dict:
    """Answer each image question of `llava_{split}.json` by CLIP retrieval over its closed set of choices.

    This is what the embedding alone knows about each question type (and about small objects), before any LLM:
    accuracy by type and by the size class of the object asked about, with the chance level of each type.
    """
    images = world.captioned_images(split, image_size, progress=False)
    feats = image_features(encode or model.encode_image, images, device)
    index = {path: i for i, path in enumerate(images.paths)}
    cache: dict[str, torch.Tensor] = {}

    def embed(prompts: list[str]) -> torch.Tensor:
        missing = [p for p in prompts if p not in cache]
        if missing:
            out = torch.nn.functional.normalize(model.encode_text(tokenizer(missing).to(device)).float(), dim=-1)
            cache.update(zip(missing, out, strict=True))
        return torch.stack([cache[p] for p in prompts])

    stats: dict[str, dict[str, list[float]]] = {"by_type": {}, "by_target_size": {}, "chance": {}}
    for record in read_json(world.root / f"llava_{split}.json"):
        if "image" not in record:
            continue
        feat = feats[index[record["image"]]]
        for turn, meta in enumerate(record["qa_meta"]):
            choices = meta["choices"]
            scores = embed([probe_prompt(meta["type"], meta["subject"], c) for c in choices]) @ feat
            answer = record["conversations"][2 * turn + 1]["value"]
            hit = float(choices[int(scores.argmax())] == answer)
            stats["by_type"].setdefault(meta["type"], []).append(hit)
            stats["by_target_size"].setdefault(meta["target_size"], []).append(hit)
            stats["chance"].setdefault(meta["type"], []).append(1 / len(choices))
    summary = {
        group: {k: {"questions": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(rows.items())}
        for group, rows in stats.items()
        if group != "chance"
    }
    summary["chance"] = {k: sum(v) / len(v) for k, v in sorted(stats["chance"].items())}
    all_hits = [h for v in stats["by_type"].values() for h in v]
    summary["overall"] = sum(all_hits) / len(all_hits)
    summary["split"] = split
    return summary

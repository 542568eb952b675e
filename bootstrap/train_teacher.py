"""`mllm-sparse train-teacher`: train a small open_clip CLIP contrastively on a synthetic world's captions.

The teacher is what every later stage is measured against, so it is trained to a real zero-shot accuracy and
saved in open_clip's own formats:

    DIR/open_clip_model.safetensors   weights (open_clip.create_model(NAME, pretrained=this file))
    DIR/NAME.json                     the architecture (open_clip.add_model_config(this file))
    DIR/open_clip_config.json         architecture + preprocessing (open_clip.create_model("local-dir:DIR"))
    DIR/zero_shot.{json,md}           zero-shot top-1 on the world's test labels

With `--save-every N` the run also writes DIR/checkpoints/step_*/ every N steps and at the end, and `--resume`
continues from the newest good one: exactly with `--steps`; with `--minutes` the clock continues from the training
time the checkpoint records. A run without `--resume` into a DIR that holds checkpoints is refused, and so is a
resumed run with a setting that changes the weights (all but --threads, --device and --save-every); a non-finite loss
or gradient stops the run before anything is saved from it (`mllm_sparse.training`).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from mllm_sparse.configuration import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mllm_sparse.files import atomic_path, write_json
from mllm_sparse.synth.dataset import SyntheticWorld
from mllm_sparse.training import RunFolder

from .optim import param_groups
from .region_captions import RegionCaptions, box_weights, region_loss
from .teacher_models import TEACHER_MODELS, register_teacher_configs
from .zero_shot import zero_shot_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm-sparse train-teacher", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="a world written by `mllm-sparse synth`")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the teacher")
    parser.add_argument(
        "--model", default="synth-vit-t-8", help=f"open_clip architecture ({', '.join(TEACHER_MODELS)})"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="train for this long (the schedule follows the clock)")
    budget.add_argument("--steps", type=int, help="train for this many steps")
    # Small batches: on a CPU the budget is optimiser steps, and 32 captions still hold most of the 48 classes.
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the budget")
    parser.add_argument(
        "--caption-weights",
        type=float,
        nargs="+",
        default=[0.0, 0.0, 1.0],
        help="sampling weight of each caption of an image (full, principal + two, principal alone)",
    )
    parser.add_argument(
        "--region-weight",
        type=float,
        default=1.0,
        help="weight of the region-caption term: each object's caption at its box, from scenes.jsonl "
        "(bootstrap/region_captions.py); 0 trains on whole-image captions alone",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--save-every", type=int, default=0, help="steps between checkpoints, also written at the end (0: none)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in DIR/checkpoints")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def caption_weights(weights: list[float], per_image: int) -> Tensor:
    """[K] sampling weights of an image's captions (K = len(weights) >= `per_image`, the most captions an image has).

    The default trains on the principal-object caption alone: only it makes the principal's shape matter in a
    batch, where colours and positions tell full captions apart; with every caption sampled alike a small ViT
    learns colours and stays near chance on shapes."""
    if len(weights) < per_image:
        raise ValueError(f"--caption-weights gives {len(weights)} weights, but images have {per_image} captions")
    w = torch.tensor(weights, dtype=torch.float)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"--caption-weights must be non-negative with a positive sum, got {weights}")
    return w


def cut_captions_warning(
    tokenizer, captions: list[list[str]], weights: Tensor, paths: list[str], model_name: str
) -> str | None:
    """A warning naming how many of the captions that training samples (weight > 0) are longer than the text
    context and so lose their ends, with the longest one's image; None when every such caption fits.

    The synthetic world's full captions list the objects largest first, so a short context drops the small ones;
    open_clip's tokenizer cuts without a word."""
    context = tokenizer.context_length
    slots = [k for k in range(len(weights)) if weights[k] > 0]
    texts = [(path, c[k % len(c)]) for path, c in zip(paths, captions, strict=True) for k in slots]
    # Token counts, measured in a context far longer than any caption (0 pads: open_clip's SimpleTokenizer).
    chunks = [[t for _, t in texts[i : i + 1024]] for i in range(0, len(texts), 1024)]
    lengths = torch.cat([(tokenizer(chunk, context_length=512) != 0).sum(1) for chunk in chunks])
    cut = int((lengths > context).sum())
    if not cut:
        return None
    longest = int(lengths.argmax())
    return (
        f"train-teacher: {cut} of the {len(texts)} captions sampled for training are longer than {model_name}'s "
        f"{context}-token text context and lose their ends (the longest, for {texts[longest][0]}, has "
        f"{int(lengths[longest])} tokens); give the long captions weight 0 in --caption-weights, or use a model with a "
        "longer context_length"
    )


def lr_at(progress: float, base_lr: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction, then cosine decay to zero; `progress` in [0, 1]."""
    if progress < warmup:
        return base_lr * progress / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


WEIGHTS_FILE = "open_clip_model.safetensors"


def save_teacher(model: torch.nn.Module, name: str, out: Path, image_size: int) -> None:
    """Write the weights and both config files (see the module docstring), atomically."""
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.get_model_config(name)
    preprocess_cfg = {
        "size": image_size,
        "mean": list(OPENAI_CLIP_MEAN),
        "std": list(OPENAI_CLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    write_json(out / f"{name}.json", model_cfg)
    write_json(out / "open_clip_config.json", {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})


# Settings that cannot change the weights: they may differ on --resume (and are stated); every other one may not.
FREE_SETTINGS = ("threads", "device", "save_every")


def check_arguments(args: argparse.Namespace) -> None:
    """One clear `ValueError` for a numeric argument outside its range."""
    if (args.minutes is not None and not args.minutes > 0) or (args.steps is not None and args.steps <= 0):
        raise ValueError("--minutes and --steps must be positive")
    if args.batch_size < 1 or args.save_every < 0 or (args.threads is not None and args.threads < 1):
        raise ValueError("--batch-size and --threads must be >= 1, --save-every >= 0")
    if not (math.isfinite(args.lr) and args.lr > 0) or not (
        math.isfinite(args.weight_decay) and args.weight_decay >= 0
    ):
        raise ValueError(
            f"--lr must be a finite number > 0 and --weight-decay >= 0, got {args.lr}, {args.weight_decay}"
        )
    if not 0 <= args.warmup < 1:
        raise ValueError(f"--warmup is a fraction of the budget in [0, 1), got {args.warmup}")
    if args.region_weight < 0:
        raise ValueError(f"--region-weight must be >= 0, got {args.region_weight}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    register_teacher_configs()
    if args.model not in open_clip.list_models():
        raise ValueError(f"Unknown open_clip model {args.model!r}; teachers for the synthetic world: {TEACHER_MODELS}")
    if args.minutes is None and args.steps is None:
        args.minutes = 10.0
    check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = RunFolder.from_args(args, "train-teacher", FREE_SETTINGS, [WEIGHTS_FILE])
    resumed = run.start(args.resume)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    model = open_clip.create_model(args.model, output_dict=True).to(device)
    tokenizer = open_clip.get_tokenizer(args.model)
    image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    world = SyntheticWorld(args.data)
    train = world.captioned_images("train", image_size)
    # [N, K, L]: K caption slots per image (one per weight; an image with fewer captions repeats them), tokenised
    # once; each step samples one slot per image.
    weights = caption_weights(args.caption_weights, max(len(c) for c in train.captions))
    tokens = torch.stack([tokenizer([c[k % len(c)] for k in range(len(weights))]) for c in train.captions])
    if warning := cut_captions_warning(tokenizer, train.captions, weights, train.paths, args.model):
        print(warning)
    print(
        f"teacher {args.model}: {sum(p.numel() for p in model.visual.parameters()) / 1e6:.2f} M visual params, "
        f"{model.visual.grid_size[0] * model.visual.grid_size[1]} patch tokens; {len(train)} training images"
    )

    regions = RegionCaptions.from_scenes(train.scenes, train.paths) if args.region_weight > 0 else None
    region_text = tokenizer(regions.texts) if regions is not None else None
    grid = model.visual.grid_size[0]

    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    generator = torch.Generator().manual_seed(args.seed)
    state = {"step": 0, "cursor": 0, "order": torch.randperm(len(train), generator=generator), "seconds": 0.0}
    state["losses"] = []
    if resumed is not None:
        model.load_state_dict({k: v.to(device) for k, v in resumed.weights[WEIGHTS_FILE].items()}, strict=True)
        optimizer.load_state_dict(resumed.trainer_state["optimizer"])
        generator.set_state(resumed.trainer_state["generator"])
        torch.set_rng_state(resumed.trainer_state["torch_rng"])
        state = resumed.trainer_state["state"]
        print(f"resumed from {resumed.path} at step {state['step']}")

    def save() -> None:
        cpu = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        trainer_state = {
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "state": state,
        }
        run.save(state["step"], lambda folder: save_file(cpu, folder / WEIGHTS_FILE), cpu, trainer_state)

    start = time.perf_counter()
    before = state["seconds"]  # training time of the runs this one continues
    bar = tqdm(total=args.steps if args.steps else None, initial=state["step"], unit="step", desc="train-teacher")
    model.train()
    model.visual.output_tokens = True  # (pooled, final patch tokens) for the region term
    while True:
        state["seconds"] = before + time.perf_counter() - start
        progress = state["step"] / args.steps if args.steps else state["seconds"] / (args.minutes * 60)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, args.lr, args.warmup)
        if state["cursor"] + args.batch_size > len(state["order"]):
            state["order"], state["cursor"] = torch.randperm(len(train), generator=generator), 0
        idx = state["order"][state["cursor"] : state["cursor"] + args.batch_size]
        state["cursor"] += args.batch_size
        pixels = train.pixels(idx).to(device)
        choice = torch.multinomial(weights, len(idx), replacement=True, generator=generator)
        pooled, patches = model.visual(pixels)
        texts = tokens[idx, choice]
        if regions is not None:
            rows, position = regions.rows_of(idx)
            captions, target = regions.caption[rows].unique(return_inverse=True)
            texts = torch.cat([texts, region_text[captions]])
        text_features = model.encode_text(texts.to(device), normalize=True)
        loss = loss_fn(F.normalize(pooled, dim=-1), text_features[: len(idx)], model.logit_scale.exp())
        if regions is not None:
            loss = loss + args.region_weight * region_loss(
                patches,
                model.visual.proj,
                box_weights(regions.boxes[rows], grid).to(device),
                position.to(device),
                text_features[len(idx) :],
                target.to(device),
                model.logit_scale,
            )
        value = run.check_loss(loss, state["step"] + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.check_grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), state["step"] + 1)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        state["step"] += 1
        state["losses"].append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}", img_s=f"{state['step'] * args.batch_size / state['seconds']:.0f}")
        if args.save_every and state["step"] % args.save_every == 0:
            save()
    bar.close()
    step, losses, train_seconds = state["step"], state["losses"], state["seconds"]

    model.visual.output_tokens = False
    model.eval()
    if args.save_every and step % args.save_every:
        save()
    run.check_weights(model.state_dict(), step)  # nothing non-finite reaches DIR
    save_teacher(model, args.model, args.out, image_size)
    report = zero_shot_report(model, tokenizer, world, "test", image_size, device)
    report.update(
        model=args.model,
        data=str(args.data),
        steps=step,
        batch_size=args.batch_size,
        region_weight=args.region_weight,
        train_seconds=round(train_seconds, 1),
        images_per_second=round(step * args.batch_size / train_seconds, 1),
        loss_curve=[round(float(np.mean(losses[i : i + 10])), 4) for i in range(0, len(losses), 10)],
    )
    write_json(args.out / "zero_shot.json", report)
    (args.out / "zero_shot.md").write_text(zero_shot_markdown(report))
    print(zero_shot_markdown(report))
    return 0


def zero_shot_markdown(report: dict) -> str:
    lines = [
        f"# Teacher `{report['model']}`: zero-shot on `{report['data']}` ({report['split']})",
        "",
        f"- top-1: **{report['top1'] * 100:.1f}%** over {report['num_images']} images, {report['num_classes']} classes",
        f"- training: {report['steps']} steps of {report['batch_size']} in {report['train_seconds']} s "
        f"({report['images_per_second']} images/s)",
        "",
        "| principal object size | images | top-1 |",
        "|---|---:|---:|",
    ]
    for size, row in report["by_principal_size"].items():
        lines.append(f"| {size} | {row['images']} | {row['top1'] * 100:.1f}% |")
    return "\n".join(lines) + "\n"

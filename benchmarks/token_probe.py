"""Which objects can be read from each tower's image tokens? A probe on the frozen tokens, by object size.

    uv run python benchmarks/token_probe.py                      # after synthetic_world.py, bootstrap_synthetic.py
    uv run python benchmarks/token_probe.py --train-images 1000 --test-images 200 --epochs 2  # a smoke run
    uv run python benchmarks/token_probe.py --students 16=runs/n16 --elastic runs/elastic  # dedicated vs elastic

For each arm of `benchmarks/vlm_synthetic.py` (same towers, same feature layer: the tokens the projector receives)
and for the scene's ground truth as tokens (one token per object: one-hot shape, colour and size, centre, radius),
an attention probe is trained to say which of the world's colour × shape combinations are in the image. It has one
learned query per combination over the tokens, i.e. one lookup, the operation an LLM must learn to answer "is there a
red star?". Two readouts (`--readouts`): `lookup` reads linear features of the tokens; `mlp-lookup` first passes
each token through a two-layer MLP, as the VLM's `mlp2x_gelu` projector does, so it also finds what a token holds
nonlinearly. Reported on test images: recall and AUC of the combinations present only as small objects and of those
present as a large or medium object, and the false-positive rate. AUC does not depend on the probe's threshold, so
it shows information the thresholded recall hides (0.5: none). A second probe of the same form says which colour ×
shape the largest object is (top-1), as "which object is the largest?" asks. This separates the towers without LLM
training. `--elastic DIR` adds an elastic SparseFormer read at each student's budget (arms elastic-N).
The teacher ViT is also probed at other hidden states (`--teacher-layers`; for the 4-block synthetic teacher -5 is
the patch embeddings, -1 the last block), to show what its blocks keep of each object.
Writes benchmarks/results/token_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from results_io import RESULTS, machine, write_results
from torch import Tensor, nn
from vlm_synthetic import add_arm_arguments, arms, build_arm

from mllm_sparse.files import read_json, read_jsonl
from mllm_sparse.images import load_image
from mllm_sparse_recipes.cli import configure_logging

SIZES = ("small", "medium", "large")
ELASTIC = "elastic"


def largest_target(world: dict, objects: list[dict]) -> int:
    """The colour × shape (shape-major) of the scene's largest object: what "which object is the largest?" asks."""
    o = max(objects, key=lambda o: o["radius"])
    return world["shapes"].index(o["shape"]) * len(world["colors"]) + world["colors"].index(o["color"])


def scene_targets(world: dict, objects: list[dict]) -> tuple[Tensor, Tensor]:
    """Presence of each colour × shape (shape-major), and 1 where present only as small objects, 2 where larger."""
    shapes, colors = world["shapes"], world["colors"]
    present = torch.zeros(len(shapes) * len(colors))
    size = torch.zeros(len(present), dtype=torch.long)
    for o in objects:
        k = shapes.index(o["shape"]) * len(colors) + colors.index(o["color"])
        present[k] = 1
        size[k] = max(int(size[k]), 1 if o["size"] == "small" else 2)
    return present, size


def truth_tokens(world: dict, objects: list[dict], slots: int) -> Tensor:
    """The scene as tokens: one per object (at most `slots`), one-hot shape, colour and size, then cx, cy, radius."""
    shapes, colors = world["shapes"], world["colors"]
    tokens = torch.zeros(slots, len(shapes) + len(colors) + len(SIZES) + 3)
    for row, o in zip(tokens, objects[:slots], strict=False):
        row[shapes.index(o["shape"])] = 1
        row[len(shapes) + colors.index(o["color"])] = 1
        row[len(shapes) + len(colors) + SIZES.index(o["size"])] = 1
        row[-3:] = torch.tensor([o["cx"], o["cy"], o["radius"]])
    return tokens


@torch.no_grad()
def tower_tokens(
    base: Path, images: dict[str, list[Path]], batch_size: int, budget: int | None = None
) -> tuple[dict[str, Tensor], Tensor | None]:
    """(split → [len(images), N, D], the tokens the VLM in `base` feeds its projector (feature layer and selection
    applied); the test split's final RoIs [len(images["test"]), N_latent, 4] for a SparseFormer tower, else None).
    The VLM is loaded once for all splits; `budget` picks an elastic tower's token count (None: its default)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llava_adapter.budgets import vlm_budget

    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    model.model.multi_modal_projector = nn.Identity()
    processor = AutoProcessor.from_pretrained(base).image_processor
    sparse = model.config.vision_config.model_type == "sparseformer"
    out: dict[str, Tensor] = {}
    rois = []
    with vlm_budget(model, budget):
        for split, paths in images.items():
            chunks = []
            for i in range(0, len(paths), batch_size):
                batch = [load_image(p) for p in paths[i : i + batch_size]]
                pixels = processor(batch, return_tensors="pt")["pixel_values"]
                features = model.model.get_image_features(pixel_values=pixels).pooler_output  # per image, or one
                chunks.append(torch.stack(list(features)).float())
                if sparse and split == "test":
                    rois.append(model.model.vision_tower(pixel_values=pixels).rois.float())
            out[split] = torch.cat(chunks)
    return out, torch.cat(rois) if rois else None


def roi_coverage(rois: Tensor, scenes: list[dict]) -> dict:
    """Where a SparseFormer's final RoIs [I, N, 4] (normalised x1y1x2y2, one row per scene) lie against the scenes'
    objects: by object size, the share of objects whose centre is inside at least one RoI and the mean number of
    RoIs over it; and the share of RoIs larger than the whole image. Square images (the world's) are assumed."""
    lo, hi = torch.minimum(rois[..., :2], rois[..., 2:]), torch.maximum(rois[..., :2], rois[..., 2:])
    image = torch.tensor([i for i, s in enumerate(scenes) for _ in s["objects"]])
    centre = torch.tensor([[o["cx"], o["cy"]] for s in scenes for o in s["objects"]])
    size = [o["size"] for s in scenes for o in s["objects"]]
    inside = ((lo[image] <= centre[:, None]) & (centre[:, None] <= hi[image])).all(-1)  # [objects, N]
    result = {"rois_larger_than_image": ((hi - lo).prod(-1) > 1).float().mean().item()}
    for name in SIZES:
        rows = inside[torch.tensor([s == name for s in size])]
        result[name] = {
            "objects": len(rows),
            "centre_covered": rows.any(-1).float().mean().item(),
            "rois_over_centre": rows.sum(-1).float().mean().item(),
        }
    return result


class LookupProbe(nn.Module):
    """One learned query per target over the tokens; the attended value scored against a learned output vector.

    `readout="lookup"` keys and values are linear in the tokens; `readout="mlp-lookup"` first passes each token
    through a two-layer GELU MLP, as the VLM's `mlp2x_gelu` projector does before the LLM's attention, so features
    that a token holds nonlinearly can still be looked up. tokens [B, N, D] → logits [B, targets]."""

    def __init__(self, dim: int, targets: int, readout: str = "lookup", width: int = 64, hidden: int = 128):
        super().__init__()
        if readout == "mlp-lookup":
            self.pre: nn.Module = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
            dim = hidden
        elif readout == "lookup":
            self.pre = nn.Identity()
        else:
            raise ValueError(f"readout must be 'lookup' or 'mlp-lookup', got {readout!r}")
        self.key, self.value = nn.Linear(dim, width), nn.Linear(dim, width)
        self.query = nn.Parameter(torch.randn(targets, width) / width**0.5)
        self.out = nn.Parameter(torch.randn(targets, width) / width**0.5)
        self.bias = nn.Parameter(torch.zeros(targets))

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = self.pre(tokens)
        attn = torch.softmax(torch.einsum("bnw,tw->btn", self.key(tokens), self.query), dim=-1)
        return torch.einsum("btn,bnw,tw->bt", attn, self.value(F.gelu(tokens)), self.out) + self.bias


def auc(scores: Tensor, positive: Tensor, negative: Tensor) -> float:
    """Area under the ROC curve of `scores` separating the `positive` entries from the `negative` ones (bool masks
    of `scores`' shape): the chance that a present combination outscores an absent one, 0.5 for no information."""
    pos, neg = scores[positive], scores[negative]
    ranks = torch.cat([pos, neg]).argsort().argsort().double() + 1  # scores are continuous: ties are negligible
    n_pos, n_neg = len(pos), len(neg)
    return ((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def fit_probe(train: Tensor, y_train: Tensor, test: Tensor, targets: int, epochs: int, readout: str, loss_fn):
    """Train a `LookupProbe` with `targets` outputs on standardised tokens (one-cycle schedule, `loss_fn(logits, y)`);
    (its logits on `test` [len(test), targets], the last batch's loss)."""
    torch.manual_seed(0)
    mean, std = train.mean((0, 1)), train.std((0, 1)) + 1e-5
    train, test = (train - mean) / std, (test - mean) / std
    model = LookupProbe(train.shape[-1], targets, readout)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * math.ceil(len(train) / 256))
    for _ in range(epochs):
        for idx in torch.randperm(len(train)).split(256):
            loss = loss_fn(model(train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    with torch.no_grad():
        return torch.cat([model(chunk) for chunk in test.split(512)]), loss.item()


def probe(
    train: Tensor,
    y_train: Tensor,
    test: Tensor,
    y_test: Tensor,
    size_test: Tensor,
    largest_train: Tensor,
    largest_test: Tensor,
    epochs: int,
    readout: str,
) -> dict:
    """Two probes of one readout on the tokens: which colour × shape combinations are present (recall and AUC by
    object size and the false-positive rate on `test`), and which one the largest object is (top-1 on `test`)."""
    scores, loss = fit_probe(
        train, y_train, test, y_train.shape[-1], epochs, readout, F.binary_cross_entropy_with_logits
    )
    largest, _ = fit_probe(train, largest_train, test, y_train.shape[-1], epochs, readout, F.cross_entropy)
    said, absent = scores > 0, y_test == 0
    return {
        "readout": readout,
        "largest_top1": (largest.argmax(-1) == largest_test).float().mean().item(),
        "recall_small_only": said[size_test == 1].float().mean().item(),
        "recall_large_or_medium": said[size_test == 2].float().mean().item(),
        "false_positive_rate": said[absent].float().mean().item(),
        "auc_small_only": auc(scores, size_test == 1, absent),
        "auc_large_or_medium": auc(scores, size_test == 2, absent),
        "final_train_loss": loss,
    }


def to_markdown(report: dict) -> str:
    lines = [
        "# Which objects each tower's tokens carry (attention probe on frozen tokens)",
        "",
        f"Machine: {report['machine']}. World `{report['world']}`: {report['train_images']} training and "
        f"{report['test_images']} test images, {report['epochs']} probe epochs. Recall: share of the colour × shape "
        "combinations in a test image that the probe says are there. AUC: chance that such a combination scores above "
        "an absent one (0.5: the tokens tell the probe nothing). Readout `lookup`: one attention lookup of linear "
        "features; `mlp-lookup`: each token through a two-layer MLP first, like the VLM's projector. Largest: a "
        'second probe of the same readout says which colour × shape the largest object is (top-1; what "which '
        'object is the largest?" asks).',
        "",
        f"Teacher `{report['teacher']}`; students {', '.join(f'`{s}`' for s in report['students']) or 'none'}.",
        "",
        "| tokens | count | readout | recall, small-only | AUC, small-only | recall, large/medium | AUC, large/medium "
        "| false positives | largest | s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, arm in report["arms"].items():
        for r in arm["readouts"]:
            lines.append(
                f"| {name} | {arm['image_tokens']} | {r['readout']} | {r['recall_small_only'] * 100:.1f}% | "
                f"**{r['auc_small_only']:.3f}** | {r['recall_large_or_medium'] * 100:.1f}% | "
                f"{r['auc_large_or_medium']:.3f} | {r['false_positive_rate'] * 100:.1f}% | "
                f"{r['largest_top1'] * 100:.1f}% | {r['seconds']:.0f} |"
            )
    covered = {name: arm["roi_coverage"] for name, arm in report["arms"].items() if "roi_coverage" in arm}
    if covered:
        lines += [
            "",
            "Where the SparseFormer's final RoIs lie (test images): the share of objects whose centre is inside at "
            "least one RoI (the mean number of RoIs over it), by object size, and the share of RoIs larger than the "
            "whole image.",
            "",
            "| tokens | small | medium | large | RoIs larger than the image |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, c in covered.items():
            cells = " | ".join(f"{c[s]['centre_covered'] * 100:.1f}% ({c[s]['rois_over_centre']:.1f})" for s in SIZES)
            lines.append(f"| {name} | {cells} | {c['rois_larger_than_image'] * 100:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    configure_logging()  # the libraries' progress lines, as the command line shows them
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arm_arguments(parser)  # the LLM only matters for building a missing arm: the probe reads the tower alone
    parser.add_argument(
        "--teacher-layers",
        type=int,
        nargs="*",
        default=[-5],
        help="also probe the teacher ViT's tokens at these hidden states (counted from the end; -2 is arm (a), -5 the "
        "synthetic teacher's patch embeddings)",
    )
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--test-images", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--readouts",
        nargs="+",
        default=["lookup", "mlp-lookup"],
        choices=["lookup", "mlp-lookup"],
        help="probe readouts to train on every tower's tokens (see LookupProbe)",
    )
    parser.add_argument(
        "--elastic",
        type=Path,
        help="an elastic SparseFormer (`bootstrap --budgets`): also probe its tokens at each --students budget "
        "(arms elastic-N, one VLM)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="token_probe", help="result file stem (default: token_probe)")
    args = parser.parse_args(argv)
    world = read_json(args.world / "world.json")
    scenes = read_jsonl(args.world / "scenes.jsonl")
    split = {s: [r for r in scenes if r["split"] == s] for s in ("train", "test")}
    split["train"], split["test"] = split["train"][: args.train_images], split["test"][: args.test_images]
    targets = {s: [scene_targets(world, r["objects"]) for r in rows] for s, rows in split.items()}
    y = {s: torch.stack([t[0] for t in rows]) for s, rows in targets.items()}
    size_test = torch.stack([t[1] for t in targets["test"]])
    largest = {s: torch.tensor([largest_target(world, r["objects"]) for r in rows]) for s, rows in split.items()}

    results = {}
    slots = max(len(r["objects"]) for r in scenes)
    towers = {"scene ground truth": None, **arms(args)}
    for layer in args.teacher_layers:
        towers[f"vit, hidden state {layer}"] = {**towers["vit"], "vision_feature_layer": layer}
    budget: dict[str, int] = {}  # an elastic arm's budget; its one VLM lives in the elastic arm's folder
    for n in sorted(int(spec.partition("=")[0]) for spec in args.students) if args.elastic else []:
        towers[f"{ELASTIC}-{n}"], budget[f"{ELASTIC}-{n}"] = {"encoder": str(args.elastic)}, n
    for name, tower in towers.items():
        start = time.perf_counter()
        if tower is None:
            tokens = {
                s: torch.stack([truth_tokens(world, r["objects"], slots) for r in rows]) for s, rows in split.items()
            }
        else:
            folder = ELASTIC if name in budget else name.replace(", hidden state ", "@")
            base = args.work / "arms" / folder / "base"  # the benchmark's arms' bases
            build_arm(args, tower, base)
            images = {s: [args.world / r["image"] for r in rows] for s, rows in split.items()}
            tokens, rois = tower_tokens(base, images, args.batch_size, budget.get(name))
        results[name] = {"image_tokens": tokens["test"].shape[1], "readouts": []}
        if tower is not None and rois is not None:
            results[name]["roi_coverage"] = roi_coverage(rois, split["test"])
        for readout in args.readouts:
            started = time.perf_counter()
            r = probe(
                tokens["train"], y["train"], tokens["test"], y["test"], size_test, largest["train"],
                largest["test"], args.epochs, readout,
            )  # fmt: skip
            # the first readout's time includes reading the tokens
            r["seconds"] = time.perf_counter() - (start if not results[name]["readouts"] else started)
            results[name]["readouts"].append(r)
        print(name, json.dumps(results[name]), flush=True)
    report = {
        "machine": machine(),
        "world": str(args.world),
        "teacher": str(args.teacher),
        "students": list(args.students) + ([f"{ELASTIC}={args.elastic}"] if args.elastic else []),
        "train_images": len(split["train"]),
        "test_images": len(split["test"]),
        "epochs": args.epochs,
        "arms": results,
    }
    write_results(args.out_dir, args.name, report, to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

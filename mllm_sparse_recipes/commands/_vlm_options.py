"""Options shared by the LLaVA commands (build-vlm, swap, eval-vlm, demo) and the summary they print.

Standard library only, like every command module: the choices are spelled out here, and a test holds them equal to the
library's (`llava_adapter.modeling.PROJECTORS`, `towers.SELECT_STRATEGIES`, `towers.REDUCTIONS`,
`processing.IMAGE_ASPECT_RATIOS`, `conversation.TEMPLATES`, `llms.TINY_LLMS`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

PROJECTORS = ("linear", "mlp2x_gelu")
SELECT_STRATEGIES = ("default", "full")
REDUCTIONS = ("pool", "visionzip")
IMAGE_ASPECT_RATIOS = ("pad", "resize", "crop")
TEMPLATES = ("plain", "vicuna_v1", "chat_template")
TINY_LLMS = ("tiny-llama", "tiny-qwen2", "tiny-phi3")
UNTRAINED = "run stage 1 (scripts/train_vlm.py --tune_mm_mlp_adapter True)"


def hidden_alias(parser: argparse.ArgumentParser, flag: str, dest: str, **kwargs: Any) -> None:
    """Another spelling of `dest`'s option that still parses but is not shown (LLaVA's underscores, say)."""
    parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def add_tower_arguments(parser: argparse.ArgumentParser) -> None:
    """The vision tower of a LLaVA model and how the LLM reads it (build-vlm, swap)."""
    parser.add_argument(
        "--encoder",
        required=True,
        help="vision tower: a bootstrapped SparseFormer folder, or a CLIP teacher spec (open_clip:…, hf:…) for the "
        "full-token ViT baseline",
    )
    parser.add_argument(
        "--num-latent-tokens",
        type=int,
        help="with a CLIP spec: average-pool its patch tokens to this many (n×n), the image tokens the LLM reads, "
        "the CLS token not counted (default: every patch token; a SparseFormer folder's config sets its own)",
    )
    parser.add_argument("--pool-tokens", type=int, help=argparse.SUPPRESS)  # deprecated spelling, same meaning
    parser.add_argument(
        "--reduction",
        choices=REDUCTIONS,
        default="pool",
        help="with a CLIP spec and a budget: 'pool' averages the patch grid to n×n; 'visionzip' keeps the patches "
        "the CLS token attends to most and merges the rest into a few contextual tokens (default: pool)",
    )
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        help="with a CLIP spec: one tower serving each of these token counts (M3-style nested pooling, or VisionZip "
        "at each); --num-latent-tokens is the default one (default: the largest). Train it with --budgets",
    )
    parser.add_argument("--projector", choices=PROJECTORS, default="mlp2x_gelu", help="the projector LLaVA names")
    parser.add_argument(
        "--vision-feature-layer",
        type=int,
        help="tower layer fed to the projector, from the end if negative (default: -2)",
    )
    parser.add_argument(
        "--vision-select-strategy",
        choices=SELECT_STRATEGIES,
        help="'default' drops the first (CLS) token, 'full' keeps all (default: 'default' where the layer has a CLS "
        "token, so the LLM reads the tower's latent tokens; 'full' where it has none, e.g. SigLIP)",
    )
    parser.add_argument(
        "--image-aspect-ratio", choices=IMAGE_ASPECT_RATIOS, default="pad", help="how an image becomes a square"
    )


def take_deprecated_budget(args: argparse.Namespace) -> None:
    """`--pool-tokens N` (the old spelling) as `--num-latent-tokens N`, with a warning on stderr saying so."""
    if args.pool_tokens is None:
        return
    if args.num_latent_tokens is not None:
        raise ValueError("give --num-latent-tokens only (--pool-tokens is its deprecated spelling)")
    args.num_latent_tokens = args.pool_tokens
    print(f"warning: --pool-tokens is deprecated: use --num-latent-tokens {args.pool_tokens}", file=sys.stderr)


def describe(summary: dict[str, Any]) -> str:
    """One line about a saved LLaVA model, from `llava_adapter.build_vlm.summarize`."""
    budgets = summary.get("budgets", [])
    elastic = f"; elastic: {', '.join(map(str, budgets))} latent tokens per call" if len(budgets) > 1 else ""
    return (
        f"Saved {summary['out']}: {summary['tower']} tower → {summary['image_tokens']} image tokens{elastic} "
        f"(layer {summary['vision_feature_layer']}, {summary['vision_feature_select_strategy']}), "
        f"{summary['projector']} projector, {summary['llm']} LLM; {summary['params_m']:.1f}M parameters"
    )

"""`mllm-sparse inspect`: an encoder's parameters, GFLOPs and token count, and a picture of where its tokens look."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import parser as command_parser
from . import settings_from

SETTINGS = "mllm_sparse.inspect_encoder:InspectSettings"  # what `main` hands to the library


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("inspect", "Print an encoder's cost and draw its tokens' RoIs over an image.")
    p.add_argument("encoder", help="a preset (`mllm_sparse.list_models()`) or a save_pretrained folder")
    p.add_argument("--pretrained", help="weights for a preset: official .pth, .safetensors, folder or 'official' "
                   "(default: random weights)")  # fmt: skip
    p.add_argument("--num-latent-tokens", type=int, help="a preset's token budget: the image tokens an LLM reads, "
                   "the CLS token not counted (default: the preset's)")  # fmt: skip
    p.add_argument("--num-tokens", type=int, help=argparse.SUPPRESS)  # deprecated: counted the CLS token
    p.add_argument("--image", type=Path, help="image to encode (default: a generated test pattern)")
    p.add_argument("--image-size", type=int, help="input side in pixels (default: the encoder's image_size)")
    p.add_argument("--out", type=Path, default=Path("roi.png"), help="where to write the RoI picture")
    p.add_argument("--points", action="store_true", help="also draw each token's sampling points")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mllm_sparse.inspect_encoder import InspectSettings, run
    from mllm_sparse.presets import preset_config

    if args.num_tokens is not None:
        if args.num_latent_tokens is not None:
            raise ValueError("give --num-latent-tokens only (--num-tokens is its deprecated spelling)")
        args.num_latent_tokens = preset_config(args.encoder, num_tokens=args.num_tokens).num_latent_tokens
        print(f"warning: --num-tokens is deprecated; it counted the CLS token: use --num-latent-tokens "
              f"{args.num_latent_tokens}", file=sys.stderr)  # fmt: skip
    result = run(settings_from(args, InspectSettings))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"encoder     {args.encoder}")
    print(f"parameters  {result['params'] / 1e6:.2f} M")
    print(f"GFLOPs      {result['gflops']:.2f} at {result['image_size']}x{result['image_size']}")
    print(f"tokens      {result['num_latent_tokens']} latent (the LLM's image tokens) + {result['cls_tokens']} CLS")
    print(f"RoIs drawn  {result['roi_picture']}")
    return 0

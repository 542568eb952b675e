"""`mllm-sparse demo`: a Gradio chat with a LLaVA model that shows where its image tokens look."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import parser as command_parser
from . import settings_from
from ._vlm_options import TEMPLATES

SETTINGS = "mllm_sparse_recipes.demo:DemoSettings"  # what `main` hands to the library

DESCRIPTION = """A Gradio chat with a LLaVA model that shows where its image tokens look.

    mllm-sparse demo --model runs/quickstart/stage2          # prompts as the model was trained
    mllm-sparse demo --model runs/stage2-merged --host 0.0.0.0 --port 7860

Upload an image and the page draws, over the picture the model sees, the region each of the N image tokens stands for (a
SparseFormer token's RoI at the layer the LLM reads; a ViT patch, a pooled cell, or a VisionZip patch or merged group
for the baselines). Ask questions in a multi-turn chat; answers stream in with the time of each stage and, optionally,
the LLM's attention on each image token. Each browser session has its own conversation; one model serves them in turn. A
model with an elastic tower serves several token budgets: the page offers them and re-encodes the image at the one
chosen.

What a visitor can cost is bounded: uploads over --max-upload-mb are refused as they arrive, images over
--max-image-megapixels before they are decoded; a session keeps only the model input picture, and is freed when its
page closes or after --session-ttl-minutes idle; at most --max-sessions are kept. The page's events are also an API
(gradio_client): /image, /send, /budget, /clear."""


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("demo", DESCRIPTION)
    p.add_argument("--model", type=Path, required=True, help="a saved LLaVA folder (model + processor)")
    p.add_argument(
        "--template",
        choices=TEMPLATES,
        help="the conversation template (default: the one the model folder records, vicuna_v1 where it records none)",
    )
    p.add_argument(
        "--num-latent-tokens",
        type=int,
        help="the token budget the page starts at, one the model's tower serves (default: the model's own)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on; 0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=7860, help="the port to serve on")
    p.add_argument("--share", action="store_true", help="also open a public Gradio link (needs the internet)")
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", help="cast the model, e.g. bfloat16 (default: as saved)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads are refused (MiB)")
    p.add_argument("--max-image-megapixels", type=float, default=50.0,
                   help="larger images are refused undecoded (at most PIL's limit, about 89)")  # fmt: skip
    p.add_argument("--session-ttl-minutes", type=float, default=60.0,
                   help="a conversation idle this long is freed, as one whose page closes")  # fmt: skip
    p.add_argument("--max-sessions", type=int, default=1000, help="sessions kept at once; the oldest are dropped")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mllm_sparse_recipes.demo import DemoSettings, run

    run(settings_from(args, DemoSettings))  # serves until the server stops
    return 0

"""SparseFormer (64 tokens) vs LLaVA-1.5's tower (open_clip ViT-L-14-336, 576 patch tokens), side by side.

Both encoders have random weights (speed does not depend on the values). Each setting times the two models in
alternation, so machine noise hits both alike, and reports the ratio of median times along with the FLOP ratio.

    uv run python benchmarks/encoder_speed.py                          # CPU: batch 1 and 8, fp32 (+ bf16)
    uv run python benchmarks/encoder_speed.py --device cuda --batch-sizes 1 8 32 --dtypes fp32 bf16

Writes benchmarks/results/encoder_speed.{json,md} (or --out-dir). Absolute times are meaningful only from a GPU run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import open_clip
import torch
from results_io import RESULTS, cpu_name, write_results

import mllm_sparse
from bootstrap.teacher_models import register_teacher_configs
from mllm_sparse.profiling import count_gflops

SPARSEFORMER = "sparseformer_btsp_openai_clip_large"
VIT = "ViT-L-14-336"


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions; without them bf16 matmuls are emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def build_models(device: torch.device, sparseformer: str, vit: str) -> dict[str, torch.nn.Module]:
    register_teacher_configs()  # the --quick ViT is one of the synthetic world's teachers
    return {
        "sparseformer": mllm_sparse.create_model(sparseformer).to(device).eval(),
        "vit": open_clip.create_model(vit, pretrained=None).visual.to(device).eval(),
    }


def timed(model: torch.nn.Module, pixels: torch.Tensor, dtype: str, device: torch.device) -> float:
    """Seconds for one forward pass (GPU work included)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        model(pixels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_setting(models, batch: int, dtype: str, image_size: int, repeats: int, warmup: int, device: torch.device):
    pixels = torch.randn(batch, 3, image_size, image_size, device=device)
    for _ in range(warmup):
        for model in models.values():
            timed(model, pixels, dtype, device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():  # alternate, so noise hits both models alike
            times[name].append(timed(model, pixels, dtype, device))
    row = {"batch": batch, "dtype": dtype, "repeats": repeats}
    for name, samples in times.items():
        median = statistics.median(samples)
        row[f"{name}_median_s"] = median
        row[f"{name}_min_s"] = min(samples)
        row[f"{name}_images_per_s"] = batch / median
    row["wall_clock_ratio"] = row["vit_median_s"] / row["sparseformer_median_s"]
    return row


def to_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Encoder speed: SparseFormer vs ViT-L/14-336",
        "",
        f"- SparseFormer: `{report['sparseformer']['preset']}`, {report['sparseformer']['tokens']} tokens, "
        f"{report['sparseformer']['gflops']:.1f} GFLOPs/image",
        f"- ViT: {report['vit']['model']}, {report['vit']['tokens']} patch tokens, "
        f"{report['vit']['gflops']:.1f} GFLOPs/image",
        f"- FLOP ratio: **{report['flop_ratio']:.2f}×** (torch FLOP counter, {report['image_size']} px)",
        f"- Device: {env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} threads",
        "",
        "| batch | dtype | SparseFormer median | ViT median | SparseFormer img/s | ViT img/s | wall-clock ratio |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['batch']} | {row['dtype']} | {row['sparseformer_median_s'] * 1e3:.1f} ms | "
            f"{row['vit_median_s'] * 1e3:.1f} ms | {row['sparseformer_images_per_s']:.2f} | "
            f"{row['vit_images_per_s']:.2f} | **{row['wall_clock_ratio']:.2f}×** |"
        )
    for note in report["notes"]:
        lines += ["", f"Note: {note}"]
    if env["device"] == "cpu":
        lines += ["", "Absolute CPU times depend on the shared machine; compare the ratios."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--quick", action="store_true", help="tiny encoders, one batch: checks the code path")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="encoder_speed", help="result file stem")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sparseformer, vit = SPARSEFORMER, VIT
    if args.quick:
        sparseformer, vit, args.image_size, args.batch_sizes, args.repeats, args.warmup = (
            "test_sparseformer_btsp", "synth-vit-t-8", 112, [1], 1, 0,
        )  # fmt: skip
    torch.manual_seed(0)
    models = build_models(device, sparseformer, vit)
    example = torch.randn(1, 3, args.image_size, args.image_size, device=device)
    sf_flops = count_gflops(models["sparseformer"], example)
    vit_flops = count_gflops(models["vit"], example)
    if args.compile:
        models = {name: torch.compile(model) for name, model in models.items()}
    vit_tokens = (args.image_size // models["vit"].patch_size[0]) ** 2

    notes = []
    native_bf16 = device.type == "cuda" or cpu_has_native_bf16()
    results = []
    for dtype in args.dtypes:
        for batch in args.batch_sizes:
            if dtype == "bf16" and not native_bf16 and batch > 1:
                continue
            results.append(run_setting(models, batch, dtype, args.image_size, args.repeats, args.warmup, device))
            row = results[-1]
            print(
                f"batch {batch:3d} {dtype}: sparseformer {row['sparseformer_median_s'] * 1e3:9.1f} ms, "
                f"vit {row['vit_median_s'] * 1e3:9.1f} ms, ratio {row['wall_clock_ratio']:.2f}x",
                flush=True,
            )
    if "bf16" in args.dtypes and not native_bf16:
        notes.append(
            "this CPU has no bf16 matrix instructions (avx512_bf16/amx), so bf16 runs emulated and slower than fp32; "
            "bf16 was timed at batch 1 only."
        )

    report = {
        "image_size": args.image_size,
        "sparseformer": {"preset": sparseformer, "tokens": models["sparseformer"].num_tokens, "gflops": sf_flops},
        "vit": {"model": f"open_clip {vit}", "tokens": vit_tokens, "gflops": vit_flops},
        "flop_ratio": vit_flops / sf_flops,
        "compiled": args.compile,
        "environment": {
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "results": results,
        "notes": notes,
    }
    write_results(args.out_dir, args.name, report, to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

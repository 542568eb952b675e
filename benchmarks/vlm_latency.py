"""How much sooner a LLaVA-1.5-shaped model answers with fewer image tokens: towers side by side at real shapes.

Every arm is a stock `LlavaForConditionalGeneration` built by `llava_adapter.build_vlm` (random weights: speed does
not depend on the values; nothing is downloaded) and called as users call it: `generate` for the first token, then
forwards with its KV cache for the next ones. The towers:

- `vit-576`: HF CLIP ViT-L/14-336, LLaVA-1.5's tower (576 patch tokens of layer -2);
- `sparseformer-63/36/16`: `sparseformer_btsp_openai_clip_large` (63 latent tokens, as released) and the same
  encoder at 36 and 16 latent tokens (the CLS token is dropped, as LLaVA drops the ViT's);
- `pooled-64/16`: the same ViT's patch tokens average-pooled to 64 and 16 (`llava_adapter.PooledVisionModel`).

The LLMs are Qwen2-0.5B's and Vicuna-7B's (Llama-2-7B) shapes, from configs written below. The prompt is
`[bos] <image>×N` and 40 text tokens, batch 1 and 8. Within each LLM and batch the arms run round-robin, so machine
noise hits them alike; every figure is the median over the repeats.

Measured per arm: encode (tower + projector), prefill (the LLM over the prompt), time to first token (`generate`
with one new token: encode, prefill and the first token), decode tokens/s (single-token forwards with the cache),
KV-cache bytes after the prompt, peak memory (CUDA only: the allocator's peak during `generate` above what was
allocated before), and the FLOPs of encode, prefill and one decode step (torch's FLOP counter: matmuls, convolutions
and attention; the SparseFormer's bilinear sampling is not counted). Encode and prefill are timed inside the same
`generate` call as the TTFT, by hooks on the tower, the projector and the LLM.

An LLM too large for the machine is measured on a slice of its decoder layers (`--llm-layers vicuna-7b=2`): hooks
time the decoder layers inside every measured call, and the reported time is the time outside them plus the time
inside them scaled by full depth / slice depth (the layers of one model have the same shape, so each costs the
same); FLOPs and KV bytes scale the same way, exactly. The report says which figures were derived so.

    uv run python benchmarks/vlm_latency.py                                   # CPU, fp32: the 7B shape sliced to 2
    uv run python benchmarks/vlm_latency.py --device cuda --dtype bf16 --llm-layers   # GPU: full depth
    uv run python benchmarks/vlm_latency.py --quick                           # tiny shapes: checks the code path

Writes benchmarks/results/vlm_latency.{json,md,png} (or --out-dir / --name).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from results_io import RESULTS, machine, write_results
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    Qwen2Config,
)

import mllm_sparse
from llava_adapter.modeling import build_vlm
from llava_adapter.tokenizer import train_tokenizer
from llava_adapter.towers import PooledVisionConfig, PooledVisionModel

SPARSEFORMER = "sparseformer_btsp_openai_clip_large"
TEXT_TOKENS = 40
BASELINE = "vit-576"


def vit_l_336() -> CLIPVisionConfig:
    """HF CLIP ViT-L/14 at 336 px, LLaVA-1.5's tower."""
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
        projection_dim=768,
    )


def llm_shapes() -> dict[str, PretrainedConfig]:
    """The LLM shapes, as their released configs give them."""
    qwen = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    vicuna = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    return {"qwen2-0.5b": qwen, "vicuna-7b": vicuna}


def quick_shapes() -> tuple[CLIPVisionConfig, dict[str, PretrainedConfig], str, dict[str, int]]:
    """Tiny stand-ins with the same structure: (ViT, LLMs, SparseFormer preset, arm -> tokens)."""
    vit = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=64, patch_size=8
    )
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    llms = {
        "qwen2-tiny": Qwen2Config(vocab_size=600, num_key_value_heads=2, tie_word_embeddings=True, **small),
        "llama-tiny": LlamaConfig(vocab_size=600, num_key_value_heads=4, **small),
    }
    return vit, llms, "test_sparseformer_btsp", {"sparseformer": [9, 4], "pooled": [16, 4]}


@dataclass
class Arm:
    """One tower and the LLaVA model built on it."""

    name: str
    kind: str  # "vit", "sparseformer" or "pooled"
    tower: nn.Module
    model: LlavaForConditionalGeneration | None = None

    @property
    def image_tokens(self) -> int:
        return self.model.config.image_seq_length


def build_towers(vit_config: CLIPVisionConfig, preset: str, budgets: dict[str, list[int]]) -> list[Arm]:
    """The ViT, SparseFormers at each budget and pooled ViTs at each budget (sharing the ViT's weights)."""
    torch.manual_seed(0)
    vit = CLIPVisionModel(vit_config).eval()
    arms = [Arm(f"vit-{(vit_config.image_size // vit_config.patch_size) ** 2}", "vit", vit)]
    for n in budgets["sparseformer"]:
        arms.append(Arm(f"sparseformer-{n}", "sparseformer", mllm_sparse.create_model(preset, num_latent_tokens=n)))
    for n in budgets["pooled"]:
        with torch.device("meta"):
            pooled = PooledVisionModel(PooledVisionConfig(vit_config, num_latent_tokens=n))
        pooled.vit = vit
        arms.append(Arm(f"pooled-{n}", "pooled", pooled.eval()))
    return arms


def tokenizer_for_prompts():
    """A tokenizer with `<image>` and a pad token (`build_vlm` needs one); the prompt's ids are written directly."""
    return train_tokenizer(["a photo of a cat on a mat", "what is in the image?"], vocab_size=300)


class Stopwatch:
    """Seconds spent inside chosen modules during a call, by forward hooks (GPU work included: it synchronises)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._depth: dict[str, int] = {}
        self._handles: list = []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def watch(self, name: str, modules: list[nn.Module]) -> None:
        """Count time inside `modules` under `name`; a watched module inside another of the same name (a pooled
        tower's ViT) is counted once."""
        for module in modules:

            def start(*_, name=name):
                self._depth[name] = self._depth.get(name, 0) + 1
                if self._depth[name] == 1:
                    self._started[name] = self._now()

            def stop(*_, name=name):
                self._depth[name] -= 1
                if self._depth[name] == 0:
                    self.seconds[name] = self.seconds.get(name, 0.0) + self._now() - self._started.pop(name)

            self._handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]

    def reset(self) -> None:
        self.seconds = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def timed(device: torch.device) -> Iterator[dict]:
    """Wall seconds of the block in `result["seconds"]`, GPU work included."""
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield result
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result["seconds"] = time.perf_counter() - start


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a KV cache holds."""
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


LAYER_KEY = re.compile(r"\.model\.language_model\.layers\.\d+$")


def counted_flops(call: Callable[[], object]) -> tuple[float, float]:
    """(GFLOPs of one call, GFLOPs inside the LLM's decoder layers, for scaling a slice)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        call()
    totals = {name: sum(ops.values()) / 1e9 for name, ops in counter.get_flop_counts().items()}
    return totals.get("Global", 0.0), sum(v for k, v in totals.items() if LAYER_KEY.search(k))


@dataclass(frozen=True)
class Scale:
    """full depth / measured depth of the LLM's decoder (1 when it runs whole)."""

    factor: float

    def time(self, total: float, in_layers: float) -> float:
        return total - in_layers + in_layers * self.factor

    @property
    def sliced(self) -> bool:
        return self.factor != 1


def prompt(model: LlavaForConditionalGeneration, batch: int, device: torch.device) -> torch.Tensor:
    """[batch, 1 + N + 40] `[bos] <image>×N` then 40 fixed text ids."""
    config = model.config
    text = torch.arange(10, 10 + TEXT_TOKENS)
    row = torch.cat([torch.tensor([1]), torch.full((config.image_seq_length,), config.image_token_id), text])
    return row.unsqueeze(0).repeat(batch, 1).to(device)


def measure(
    arm: Arm,
    batch: int,
    decode_tokens: int,
    pixels: torch.Tensor,
    scale: Scale,
    device: torch.device,
    watch: Stopwatch,
) -> dict:
    """One round of one arm: TTFT with encode and prefill inside it, then `decode_tokens` cached decode steps."""
    model = arm.model
    input_ids = prompt(model, batch, device)
    watch.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), timed(device) as ttft:
        out = model.generate(
            input_ids=input_ids,
            pixel_values=pixels,
            max_new_tokens=1,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=model.config.pad_token_id,
        )
    inside = dict(watch.seconds)
    row = {
        "encode_s": inside.get("tower", 0.0) + inside.get("projector", 0.0),
        "prefill_s": scale.time(inside.get("llm", 0.0), inside.get("layers", 0.0)),
        "ttft_s": scale.time(ttft["seconds"], inside.get("layers", 0.0)),
        "kv_cache_bytes": round(cache_bytes(out.cache) * scale.factor),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None,
    }
    cache, token = out.cache, out.sequences[:, -1:]
    watch.reset()
    with torch.inference_mode(), timed(device) as decode:
        for _ in range(decode_tokens):
            logits = model(input_ids=token, cache=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
    per_token = scale.time(decode["seconds"], watch.seconds.get("layers", 0.0)) / decode_tokens
    row["decode_tokens_per_s"] = batch / per_token
    if arm.kind == "sparseformer":  # the same units outside LLaVA, for the encode-inside-the-VLM overhead
        layer = model.config.vision_feature_layer
        with torch.inference_mode(), timed(device) as alone:
            arm.tower.get_feature_tokens(pixels, layer)
        row["standalone_feature_tokens_s"] = alone["seconds"]
        with torch.inference_mode(), timed(device) as as_llava:
            arm.tower(pixels, output_hidden_states=layer, return_dict=True)
        row["tower_as_llava_calls_it_s"] = as_llava["seconds"]
    return row


def flops_of(arm: Arm, scale: Scale, device: torch.device) -> dict[str, float]:
    """GFLOPs per image of encode, prefill and one decode step (batch 1)."""
    model = arm.model
    pixels = torch.randn(1, 3, arm.tower.config.image_size, arm.tower.config.image_size, device=device)
    input_ids = prompt(model, 1, device)
    first: dict = {}

    def ttft():
        first["out"] = model.generate(
            input_ids=input_ids,
            pixel_values=pixels.to(model.dtype),
            max_new_tokens=1,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=model.config.pad_token_id,
        )

    config = model.config
    encode, _ = counted_flops(
        lambda: model.get_image_features(
            pixel_values=pixels.to(model.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
    )
    total, layers = counted_flops(ttft)
    out = first["out"]
    step, step_layers = counted_flops(lambda: model(input_ids=out.sequences[:, -1:], cache=out.cache))
    return {
        "encode": encode,
        "prefill": total - encode - layers + layers * scale.factor,
        "decode_step": step - step_layers + step_layers * scale.factor,
    }


def profile_ttft(arm: Arm, device: torch.device) -> str:
    """Where one batch-1 `generate` (first token) spends its time: torch's profiler, top operators by own time."""
    model = arm.model
    pixels = torch.randn(1, 3, arm.tower.config.image_size, arm.tower.config.image_size, device=device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.inference_mode(), torch.profiler.profile(activities=activities) as prof:
        model.generate(
            input_ids=prompt(model, 1, device),
            pixel_values=pixels.to(model.dtype),
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=model.config.pad_token_id,
        )
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=20)
    return f"== {arm.name} ({arm.image_tokens} image tokens), batch 1, time to first token\n{table}\n\n"


def build_llm(config: PretrainedConfig, layers: int | None, dtype: torch.dtype, device: torch.device):
    """A random-weight causal LM of this shape, whole or sliced to `layers` decoder layers; (model, Scale)."""
    full = config.num_hidden_layers
    config = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": layers or full})
    torch.manual_seed(0)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return llm, Scale(full / config.num_hidden_layers)


def run_llm(
    name: str,
    config: PretrainedConfig,
    arms: list[Arm],
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    layers = args.llm_layers.get(name) if args.llm_layers else None
    llm, scale = build_llm(config, layers, dtype, device)
    tokenizer = tokenizer_for_prompts()
    watch = Stopwatch(device)
    for arm in arms:
        arm.model = build_vlm(arm.tower.to(device, dtype), llm, tokenizer).eval()
    decoder = arms[0].model.model.language_model
    watch.watch("llm", [decoder])
    if scale.sliced:
        watch.watch("layers", list(decoder.layers))
    for arm in arms:
        watch.watch("tower", [arm.model.model.vision_tower])
        watch.watch("projector", [arm.model.model.multi_modal_projector])
    print(f"{name}: {'sliced to ' + str(layers) + ' of ' if scale.sliced else ''}{config.num_hidden_layers} layers")
    flops = {arm.name: flops_of(arm, scale, device) for arm in arms}
    results = []
    for batch in args.batch_sizes:
        pixels = {
            arm.name: torch.randn(batch, 3, arm.tower.config.image_size, arm.tower.config.image_size, device=device).to(
                dtype
            )
            for arm in arms
        }
        rounds: dict[str, list[dict]] = {arm.name: [] for arm in arms}
        for r in range(args.warmup + args.repeats):
            for arm in arms:  # round-robin: noise hits every arm alike
                row = measure(arm, batch, args.decode_tokens, pixels[arm.name], scale, device, watch)
                if r >= args.warmup:
                    rounds[arm.name].append(row)
        for arm in arms:
            median = {key: statistics.median(r[key] for r in rounds[arm.name]) for key in rounds[arm.name][0]
                      if rounds[arm.name][0][key] is not None}  # fmt: skip
            results.append(
                {
                    "llm": name,
                    "batch": batch,
                    "arm": arm.name,
                    "kind": arm.kind,
                    "image_tokens": arm.image_tokens,
                    **median,
                    "gflops": flops[arm.name],
                }  # fmt: skip
            )
            print(
                f"  batch {batch} {arm.name:>16}: TTFT {median['ttft_s'] * 1e3:9.1f} ms  encode "
                f"{median['encode_s'] * 1e3:8.1f} ms  prefill {median['prefill_s'] * 1e3:9.1f} ms  decode "
                f"{median['decode_tokens_per_s']:8.1f} tok/s",
                flush=True,
            )
    watch.remove()
    if args.profile:
        profiles = [profile_ttft(arm, device) for arm in arms[:2]]  # the ViT and the first SparseFormer
        path = args.out_dir / f"{args.name}_profile_{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(profiles))
    add_ratios(results)
    return {
        "llm": name,
        "layers": config.num_hidden_layers,
        "measured_layers": layers or config.num_hidden_layers,
        "scaled_per_layer": scale.sliced,
        "results": results,
    }


def add_ratios(results: list[dict]) -> None:
    """Each row's TTFT, prefill and FLOP ratios against the baseline arm of its batch."""
    baselines = {r["batch"]: r for r in results if r["kind"] == "vit"}
    for row in results:
        base = baselines[row["batch"]]
        row["ttft_ratio"] = base["ttft_s"] / row["ttft_s"]
        row["prefill_ratio"] = base["prefill_s"] / row["prefill_s"]
        base_flops = base["gflops"]["encode"] + base["gflops"]["prefill"]
        row["flop_ratio"] = base_flops / (row["gflops"]["encode"] + row["gflops"]["prefill"])
        row["ttft_ratio_over_flop_ratio"] = row["ttft_ratio"] / row["flop_ratio"]
        if "standalone_feature_tokens_s" in row:
            row["encode_in_vlm_over_standalone"] = row["tower_as_llava_calls_it_s"] / row["standalone_feature_tokens_s"]


def to_markdown(report: dict) -> str:
    lines = [
        "# VLM latency: towers side by side in a LLaVA-1.5-shaped model",
        "",
        f"- Machine: {report['machine']}; {report['threads']} threads; {report['dtype']}; load average before the "
        f"run {report['load_before']}, after {report['load_after']}.",
        f"- Prompt: `[bos] <image>×N` + {TEXT_TOKENS} text tokens; random weights; medians of {report['repeats']} "
        f"round-robin repeats after {report['warmup']} warm-up; decode over {report['decode_tokens']} cached steps.",
        "- Ratios are against the 576-token ViT arm of the same LLM and batch; FLOP ratio = (encode + prefill) "
        "FLOPs, torch's counter (the SparseFormer's bilinear sampling is not counted).",
    ]
    if report["device"] == "cpu":
        lines.append("- CPU times depend on the shared machine: compare the ratios, not the absolute times.")
    for llm in report["llms"]:
        lines += ["", f"## {llm['llm']}, {llm['layers']} decoder layers", ""]
        if llm["scaled_per_layer"]:
            lines += [
                f"Measured on {llm['measured_layers']} of its {llm['layers']} decoder layers; prefill, TTFT, decode, "
                "KV bytes and LLM FLOPs are scaled per layer (time outside the layers + time inside them × "
                f"{llm['layers']}/{llm['measured_layers']}). Encode is measured whole.",
                "",
            ]
        lines += [
            "| batch | arm | image tokens | encode | prefill | TTFT | TTFT ratio | FLOP ratio | TTFT/FLOP ratio | "
            "decode tok/s | KV cache | GFLOPs encode / prefill per image |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in llm["results"]:
            lines.append(
                f"| {r['batch']} | {r['arm']} | {r['image_tokens']} | {r['encode_s'] * 1e3:.1f} ms | "
                f"{r['prefill_s'] * 1e3:.1f} ms | {r['ttft_s'] * 1e3:.1f} ms | **{r['ttft_ratio']:.2f}×** | "
                f"{r['flop_ratio']:.2f}× | {r['ttft_ratio_over_flop_ratio']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                f"{r['kv_cache_bytes'] / 2**20:.1f} MiB | {r['gflops']['encode']:.3g} / {r['gflops']['prefill']:.3g} |"
            )
        overheads = [r for r in llm["results"] if "encode_in_vlm_over_standalone" in r]
        if overheads:
            lines += [
                "",
                "SparseFormer encode as LLaVA calls it / standalone `get_feature_tokens` at the same layer: "
                + ", ".join(f"{r['arm']} b{r['batch']} {r['encode_in_vlm_over_standalone']:.2f}" for r in overheads),
            ]
        peaks = [r for r in llm["results"] if "peak_memory_bytes" in r]
        if peaks:
            lines += [
                "",
                "Peak memory during `generate` above the weights: "
                + ", ".join(f"{r['arm']} b{r['batch']} {r['peak_memory_bytes'] / 2**20:.0f} MiB" for r in peaks),
            ]
    lines += ["", "![TTFT against image tokens](vlm_latency.png)" if report["plot"] else ""]
    return "\n".join(lines).rstrip() + "\n"


def plot(report: dict, path) -> None:
    """TTFT against image tokens: one line per LLM (ViT and SparseFormer arms), pooled arms dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for llm in report["llms"] for r in llm["results"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for llm in report["llms"]:
            rows = [r for r in llm["results"] if r["batch"] == batch]
            vit = [r for r in rows if r["kind"] == "vit"]
            for kind, style in (("sparseformer", "o-"), ("pooled", "s--")):
                line = sorted([r for r in rows if r["kind"] == kind] + vit, key=lambda r: r["image_tokens"])
                ax.plot(
                    [r["image_tokens"] for r in line],
                    [r["ttft_s"] * 1e3 for r in line],
                    style,
                    label=f"{llm['llm']}, {'SparseFormer' if kind == 'sparseformer' else 'pooled ViT'}",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        tokens: list[int] = []
        for t in sorted({r["image_tokens"] for llm in report["llms"] for r in llm["results"]}):
            if not tokens or t > tokens[-1] * 1.15:  # 63 and 64 would overprint
                tokens.append(t)
        ax.set_xticks(tokens, [str(t) for t in tokens])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("image tokens the LLM reads")
        ax.set_ylabel("time to first token (ms)")
        ax.set_title(f"batch {batch}, {report['dtype']}, {report['device']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_average() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "unknown"


def layer_slices(values: list[str]) -> dict[str, int]:
    """["vicuna-7b=2"] -> {"vicuna-7b": 2}; an empty flag measures every LLM whole."""
    slices = {}
    for value in values:
        name, _, layers = value.partition("=")
        if not layers.isdigit() or int(layers) < 1:
            raise SystemExit(f"--llm-layers expects NAME=LAYERS with LAYERS >= 1, got {value!r}")
        slices[name] = int(layers)
    return slices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights' dtype (default: fp32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="(default: 1 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per batch (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--decode-tokens", type=int, default=8, help="cached decode steps timed (default: 8)")
    parser.add_argument("--llms", nargs="+", help="LLM shapes to run (default: all)")
    parser.add_argument(
        "--llm-layers",
        nargs="*",
        default=["vicuna-7b=2"],
        help="NAME=LAYERS: measure that LLM on a slice of its decoder layers, scaled per layer; the flag alone "
        "measures every LLM whole (default: vicuna-7b=2)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--profile", action="store_true", help="also profile the ViT's and the first SparseFormer's TTFT (batch 1)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: checks the code path in seconds")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="(default: benchmarks/results)")
    parser.add_argument("--name", default="vlm_latency", help="result file stem (default: vlm_latency)")
    args = parser.parse_args(argv)
    args.llm_layers = layer_slices(args.llm_layers)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    if args.quick:
        vit_config, shapes, preset, budgets = quick_shapes()
        args.repeats, args.warmup, args.decode_tokens, args.llm_layers = 1, 0, 2, {"llama-tiny": 1}
    else:
        vit_config, shapes, preset = vit_l_336(), llm_shapes(), SPARSEFORMER
        budgets = {"sparseformer": [63, 36, 16], "pooled": [64, 16]}
    unknown = set(args.llms or []) - set(shapes)
    if unknown:
        raise SystemExit(f"--llms: unknown {sorted(unknown)}; choose from {sorted(shapes)}")
    load_before = load_average()
    arms = build_towers(vit_config, preset, budgets)
    llms = [run_llm(n, c, arms, args, device, dtype) for n, c in shapes.items() if not args.llms or n in args.llms]
    report = {
        "machine": machine(),
        "device": device.type,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "decode_tokens": args.decode_tokens,
        "quick": args.quick,
        "load_before": load_before,
        "load_after": load_average(),
        "llms": llms,
        "plot": True,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot(report, args.out_dir / f"{args.name}.png")
    write_results(args.out_dir, args.name, report, to_markdown(report).replace("vlm_latency.png", f"{args.name}.png"))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The ablation's plots: accuracy and time against the image tokens given to the LLM, one curve per method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mllm_sparse.files import atomic_path

from . import REPORT_NAME, SIZES, stage_title


def method_of(name: str) -> str:
    return name.split("-")[0]


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure to `path` as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def plot(report: dict[str, Any], out: Path, name: str = REPORT_NAME) -> list[Path]:
    """`NAME_accuracy.png` and `NAME_speed.png`: each method's curve against image tokens (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage = list(next(iter(report["arms"].values())))[-1]
    arms = {n: r[stage] for n, r in report["arms"].items()}
    ticks = sorted({r["image_tokens"] for r in arms.values()})
    methods = {"sparseformer": ("SparseFormer, one per budget", "tab:red", "o"),
               "elastic": ("elastic SparseFormer, one model", "tab:orange", "D"),
               "pooled": ("pooled ViT", "tab:blue", "s"),
               "visionzip": ("VisionZip-style ViT, one per budget", "tab:green", "^"),
               "m3": ("M3-style pooled ViT, one model", "tab:purple", "v"),
               "vit": ("ViT, all patches", "black", "*")}  # fmt: skip
    written = []

    def curves(ax, value) -> None:
        for method, (label, color, marker) in methods.items():
            points = sorted((r["image_tokens"], value(n, r)) for n, r in arms.items() if method_of(n) == method)
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker=marker, color=color, label=label, markersize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("image tokens given to the LLM")
        ax.grid(alpha=0.3)

    panels = [("all questions", None), *[(f"{s} objects", s) for s in SIZES]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True)
    for ax, (title, size) in zip(axes, panels, strict=True):

        def accuracy(name, r, size=size):
            value = r["accuracy"] if size is None else r["by_target_size"].get(size)
            return None if value is None else 100 * value

        curves(ax, accuracy)
        prior = report["prior"]["accuracy"] if size is None else report["prior"]["by_target_size"].get(size)
        if prior is not None:
            ax.axhline(100 * prior, color="gray", linestyle="--", label="question-only prior")
        ax.set_title(title)
    axes[0].set_ylabel(f"accuracy after {stage_title(stage)} (%)")
    axes[0].legend(fontsize=8)
    written.append(save_figure(fig, out / f"{name}_accuracy.png"))

    timing = report["timing"]
    if not timing:  # --timing-questions 0
        return written
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.8))
    for ax, (key, title) in zip(axes, (("encode_ms", "vision encode"), ("prefill_ms", "LLM prefill"),
                                       ("ttft_ms", "time to first token")), strict=True):  # fmt: skip
        curves(ax, lambda name, r, key=key: timing[name][key])
        ax.set_title(f"{title} (ms, batch 1)")
    axes[0].legend(fontsize=8)
    written.append(save_figure(fig, out / f"{name}_speed.png"))
    return written

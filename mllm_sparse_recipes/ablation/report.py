"""The ablation's report: Markdown tables of scores, paired differences and timing, and the files it is written to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mllm_sparse.files import atomic_path, write_json

from . import REPORT_NAME, SIZES, stage_title
from .plots import plot


def score_table(prior: dict[str, Any], arms: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: the question-only prior, then every arm; `vs vit` where the ViT arm is there."""
    types = sorted({t for r in arms.values() for t in r["by_type"]})
    base = arms.get("vit", {}).get("accuracy")

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def gain(accuracy: float) -> str:
        """The gain over the question-only prior as a share of the ViT arm's gain."""
        if base is None or base <= prior["accuracy"]:
            return "n/a"
        return f"{100 * (accuracy - prior['accuracy']) / (base - prior['accuracy']):.0f}%"

    lines = [
        "| arm | image tokens | accuracy | vs vit | gain vs vit | "
        + " | ".join(types + [f"{s} objects" for s in SIZES]) + " | train s |",
        "|---|---:|---:|---:|---:|" + "---:|" * (len(types) + len(SIZES)) + "---:|",
    ]  # fmt: skip
    for name, r in {"question-only prior": prior, **arms}.items():
        ratio = f"{100 * r['accuracy'] / base:.0f}%" if base else "n/a"
        seconds = r.get("train_seconds")
        lines.append(
            f"| {name} | {r['image_tokens']} | **{pct(r['accuracy'])}** | {ratio} | {gain(r['accuracy'])} | "
            + " | ".join(pct(r["by_type"].get(t)) for t in types)
            + " | "
            + " | ".join(pct(r["by_target_size"].get(s)) for s in SIZES)
            + f" | {'n/a' if seconds is None else f'{seconds:.0f}'} |"
        )
    return lines


def paired_table(pairs: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of `paired_comparisons`: a − b in points [95% interval], bold where the interval excludes 0."""

    def cell(d: dict | None) -> str:
        if d is None:
            return "n/a"
        text = f"{d['difference'] * 100:+.1f} [{d['low'] * 100:+.1f}, {d['high'] * 100:+.1f}]"
        return f"**{text}**" if d["low"] > 0 or d["high"] < 0 else text

    lines = ["| a | b | all questions | " + " | ".join(f"{s} objects" for s in SIZES) + " |",
             "|---|---|---:|" + "---:|" * len(SIZES)]  # fmt: skip
    lines += [f"| {p['a']} | {p['b']} | " + " | ".join(cell(p[k]) for k in ("all", *SIZES)) + " |" for p in pairs]
    return lines


def to_markdown(
    report: dict[str, Any], title: str = "Token-budget ablation", intro: str = "", name: str = REPORT_NAME
) -> str:
    """The report as Markdown: scores after each stage, paired differences, timing, and the plots."""
    s = report["settings"]
    stages = list(next(iter(report["arms"].values())))
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += [
        f"Teacher `{s['teacher']}`, LLM `{s['llm']}`. Stage 1: {s['stage1_epochs']} epoch(s), batch {s['batch_size']}, "
        f"LLM lr {s['lr']} (0: frozen), projector lr {s['projector_lr']}"
        + (f"; stage 2: {s['stage2_epochs']} epoch(s), LLM and projector at lr {s['stage2_lr']}" if s["stage2_epochs"]
           else "")
        + f"; the tower frozen. {report['prior']['answers']} test answers. *vs vit*: accuracy as a share of the ViT "
        "arm's; *gain vs vit*: the gain over the question-only prior as a share of the ViT arm's gain. Last columns: "
        "accuracy by the size of the object a question asks about; train s: seconds of training up to that stage.",
        "",
    ]  # fmt: skip
    for stage in reversed(stages):
        lines += [f"## After {stage_title(stage)}", "",
                  *score_table(report["prior"], {n: r[stage] for n, r in report["arms"].items()}), ""]  # fmt: skip
    for stage in reversed(stages):
        if report["paired"][stage]:
            lines += [f"## Paired differences after {stage_title(stage)}", "",
                      "a − b in accuracy points on the same answers, [95% interval] of a cluster bootstrap over test "
                      "records (`mllm_sparse_recipes.ablation.statistics`); bold: the interval excludes 0.", "",
                      *paired_table(report["paired"][stage]), ""]  # fmt: skip
    timing = report["timing"]
    if not timing:
        lines += [
            "Speed: not timed (`--timing-questions 0`).",
            "",
            f"![accuracy against image tokens]({name}_accuracy.png)",
        ]
        return "\n".join(lines) + "\n"
    name_ref = "vit" if "vit" in timing else next(iter(timing))
    reference = timing[name_ref]
    final = stages[-1]
    lines += [
        f"## Time to first token (batch 1, median of {reference['questions']} questions, arms interleaved)",
        "",
        f"| arm | image tokens | encode ms | LLM prefill ms | TTFT ms | TTFT vs {name_ref} | prefill vs {name_ref} |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {n} | {report['arms'][n][final]['image_tokens']} | {t['encode_ms']:.1f} | {t['prefill_ms']:.1f} | "
          f"{t['ttft_ms']:.1f} | {t['ttft_ms'] / reference['ttft_ms']:.2f}× | "
          f"{t['prefill_ms'] / reference['prefill_ms']:.2f}× |" for n, t in timing.items()],
        "",
        f"![accuracy against image tokens]({name}_accuracy.png)",
        "",
        f"![time against image tokens]({name}_speed.png)",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path, markdown: str) -> None:
    """OUT/ablation.{json,md} and the plots."""
    write_json(out / f"{REPORT_NAME}.json", report)
    with atomic_path(out / f"{REPORT_NAME}.md") as tmp:
        tmp.write_text(markdown)
    plot(report, out)

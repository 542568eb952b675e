"""What `mllm-sparse pretrain-llm` does: scene pretraining, the synthetic world's stand-in for a pretrained LLM
such as Vicuna.

    mllm-sparse pretrain-llm --data WORLD --out DIR [--llm tiny-llama] [--question-steps 2000 --record-steps 1000]

LLaVA starts from an LLM that already answers questions about what its context holds; its two stages only teach
the projector (and then the LLM) to present an image in a form that LLM can read. A tiny LLM built from a config
has no such skill, and learning to look an object up among the visual tokens while it also learns to read them
takes a from-scratch tiny LLM thousands of steps (benchmarks/README.md, the from-scratch LLM's lookup).

Scene pretraining teaches it on the world's ground truth: the world's own LLaVA records, with the same template,
image placeholders and answer-only labels as VLM training, but every image replaced by its scene tokens
(`scene_tokens.py`: one token per object, shuffled, padded with empty ones to the most objects in the batch), which
a two-layer MLP (the scene projector) maps to the LLM's width. Two phases, each with its own warm-up and cosine:

1. the records' questions one at a time (`--question-steps`): here the lookup appears, after ~1,500 steps of 64;
2. whole records (`--record-steps`): multi-turn, text-only ones included, in batches of one modality and similar
   length, as VLM training sees them. An LLM that has only seen single questions is lost in a conversation, and
   whole records from the start did not bring the lookup within 2,500 steps of 16 (benchmarks/README.md).

Padding matters too: with every scene padded to 16 tokens, the LLM answered "is there a red star" from the bag of
colours and shapes present and never learnt to look the star up (colour questions at 37% after 5,000 steps).

DIR becomes a plain HF causal LM folder with its tokenizer, for `mllm-sparse build-vlm --llm DIR`. It also holds
`scene_projector.safetensors`, `scene_pretrain.{json,md}` (accuracy by question type on the world's test records,
scene tokens in place of the images, answers teacher-forced: every answer token must be the most likely one) and
checkpoints/step_*/ (every `--eval-every` steps and at the end, written atomically), which `--resume` continues
exactly from the newest good one. A run without `--resume` into a DIR that holds checkpoints is refused, and so is a
resumed run with a setting that changes the weights (all but --eval-every, --eval-records and --threads); a
non-finite loss or gradient stops the run before anything is saved from it (`mllm_sparse.training`).

The loop is written here, not on HF `Trainer`, because one run is two phases with their own data, batch size,
schedule and test format, and a checkpoint holds the scene projector beside the LLM.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llava_adapter.conversation import (
    IGNORE_INDEX,
    TEMPLATES,
    RecordError,
    encode_conversation,
    has_image,
    record_name,
    resolve_image_token_id,
    validate_record,
)
from llava_adapter.data import DataCollatorForLlava, ModalityLengthGroupedSampler
from llava_adapter.llms import load_llm
from llava_adapter.modeling import add_image_token
from mllm_sparse.files import atomic_path, normal_modes, read_json, read_jsonl, write_json
from mllm_sparse.training import RunFolder, adamw, epoch_order, lr_lambda

from .scene_tokens import SCENE_FEATURES, scene_tokens

REPORT_NAME = "scene_pretrain"
PROJECTOR_FILE = "scene_projector.safetensors"
LLM_DIR = "llm"  # inside a checkpoint

logger = logging.getLogger(__name__)


def turn_types(record: Mapping) -> list[str]:
    """The question type of each turn: the synthetic world's `qa_meta` types, "text" for text-only records."""
    turns = sum(turn["from"] == "gpt" for turn in record["conversations"])
    if not has_image(record) or "qa_meta" not in record:
        return ["text"] * turns
    return [meta.get("type", "text") for meta in record["qa_meta"]][:turns]


def split_questions(record: Mapping) -> list[dict]:
    """A LLaVA record split into one record per question and answer; an image record's image goes with each."""
    turns = [turn for turn in record["conversations"] if turn["from"] != "system"]
    types = turn_types(record)
    singles = []
    for k in range(0, len(turns) - 1, 2):
        question = turns[k]["value"].replace("<image>", "").strip()
        single = {
            "id": f"{record['id']}#{k // 2}",
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}" if has_image(record) else question},
                {"from": "gpt", "value": turns[k + 1]["value"]},
            ],
        }
        if has_image(record):
            single["image"] = record["image"]
            single["qa_meta"] = [{"type": types[k // 2]}]
        singles.append(single)
    return singles


def read_scenes(world: Path) -> dict[str, list]:
    """`scenes.jsonl` of a world: image path → its objects."""
    scenes: dict[str, list] = {}
    for number, row in enumerate(read_jsonl(world / "scenes.jsonl"), start=1):
        if not isinstance(row, dict) or "image" not in row or "objects" not in row:
            raise ValueError(f"{world / 'scenes.jsonl'} line {number}: expected an object with image and objects")
        scenes[row["image"]] = row["objects"]
    return scenes


class SceneRecords:
    """The records of a world's `llava_{split}.json`, encoded once, with their scenes' objects.

    Args:
        world: a folder written by `mllm-sparse synth` (`scenes.jsonl`, `llava_*.json`).
        split: train, val or test.
        tokenizer: the LLM's tokenizer, knowing `<image>`.
        template: one of `TEMPLATES` (the one VLM training will use).
        scenes: the world's `read_scenes`.
        single_questions: one item per question and answer (`split_questions`) instead of one per record.
        limit: keep only the first this many records.
    """

    def __init__(
        self,
        world: Path,
        split: str,
        tokenizer: PreTrainedTokenizerBase,
        template: str,
        scenes: Mapping[str, list],
        single_questions: bool = False,
        limit: int | None = None,
    ):
        data = world / f"llava_{split}.json"
        records = read_json(data)
        if not isinstance(records, list):
            raise ValueError(f"{data}: expected a JSON list of LLaVA records, got a JSON {type(records).__name__}")
        self.image_token_id = resolve_image_token_id(tokenizer)
        self.items: list[dict] = []
        for index, record in enumerate(records[:limit]):
            try:
                validate_record(record, index)
                if has_image(record) and record["image"] not in scenes:
                    raise RecordError(record_name(record, index), f"{record['image']} is not in scenes.jsonl")
                for item in split_questions(record) if single_questions else [record]:
                    # One placeholder per image here; `batch` widens it to the batch's scene-token count.
                    encoded = encode_conversation(item, tokenizer, template, 1)
                    self.items.append(
                        {
                            "id": item["id"],
                            "types": turn_types(item),
                            "input_ids": encoded.input_ids,
                            "labels": encoded.labels,
                            "objects": scenes[record["image"]] if has_image(record) else None,
                            "image": record.get("image"),
                        }
                    )
            except RecordError as err:
                raise RecordError(f"{err.record} of {data}", err.detail) from None

    def __len__(self) -> int:
        return len(self.items)

    def length_grouped_order(self, batch_size: int, seed: int, epoch: int) -> list[int]:
        """An epoch's item order, a function of (seed, epoch) only (a resumed run replays it): consecutive
        `batch_size` slices are batches of one modality and similar length (each image item counted with one token
        per object), as VLM training's `--group_by_modality_length` makes them."""
        lengths = [
            -len(item["input_ids"]) if item["objects"] is None else len(item["input_ids"]) + len(item["objects"]) - 1
            for item in self.items
        ]
        sampler = ModalityLengthGroupedSampler(lengths, batch_size, seed=seed)
        sampler.set_epoch(epoch)
        return sampler.global_order()

    def batch(self, indices: Sequence[int], collator: DataCollatorForLlava, seed: int) -> dict:
        """Collate items with S scene tokens per image, S the most objects of the batch's scenes.

        Each image's placeholder is widened to S, and its scene tokens are shuffled by a generator seeded with
        (seed, index). Returns the collator's `input_ids`, `attention_mask`, `labels` [B, L] and `scene_tokens`
        [M, S, SCENE_FEATURES] for the M image items, in batch order.
        """
        chosen = [self.items[i] for i in indices]
        width = max([len(item["objects"]) for item in chosen if item["objects"] is not None] or [1])
        items = []
        for i, item in zip(indices, chosen, strict=True):
            entry = {"id": item["id"], "input_ids": item["input_ids"], "labels": item["labels"]}
            if item["objects"] is not None:
                at = int((item["input_ids"] == self.image_token_id).nonzero()[0])
                entry["input_ids"] = widen(item["input_ids"], at, width, self.image_token_id)
                entry["labels"] = widen(item["labels"], at, width, IGNORE_INDEX)
                generator = torch.Generator().manual_seed(seed * 1_000_003 + int(i))
                entry["pixel_values"] = scene_tokens(item["objects"], width, generator, item["image"])
            items.append(entry)
        batch = collator(items)
        if "pixel_values" in batch:
            batch["scene_tokens"] = batch.pop("pixel_values")
        return batch


def widen(sequence: Tensor, at: int, width: int, fill: int) -> Tensor:
    """[L] → [L + width - 1]: position `at` replaced by `width` copies of `fill`."""
    return torch.cat([sequence[:at], sequence.new_full((width,), fill), sequence[at + 1 :]])


def scene_projector(hidden_size: int) -> nn.Sequential:
    """Scene tokens [.., SCENE_FEATURES] → the LLM's width, two layers with a GELU (as LLaVA's `mlp2x_gelu`)."""
    return nn.Sequential(nn.Linear(SCENE_FEATURES, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


def scene_forward(model: PreTrainedModel, projector: nn.Module, batch: Mapping[str, Tensor], image_token_id: int):
    """The causal LM's output with each image's placeholders replaced, in order, by its projected scene tokens."""
    embeds = model.get_input_embeddings()(batch["input_ids"])
    if "scene_tokens" in batch:
        visual = projector(batch["scene_tokens"]).to(embeds.dtype)
        placeholders = (batch["input_ids"] == image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(placeholders, visual)
    return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch.get("labels"))


@torch.no_grad()
def evaluate(model, projector, data: SceneRecords, collator, image_token_id: int) -> dict:
    """Teacher-forced exact match per turn, by question type: a turn counts when every token of its answer is the
    argmax (earlier turns' gold answers in context, as `eval-vlm` asks)."""
    was_training = model.training
    model.eval()
    right, total = defaultdict(int), defaultdict(int)
    for start in range(0, len(data), 32):
        indices = list(range(start, min(start + 32, len(data))))
        batch = data.batch(indices, collator, seed=0)
        logits = scene_forward(model, projector, {k: v for k, v in batch.items() if k != "labels"}, image_token_id)
        targets = batch["labels"][:, 1:]
        hits = logits.logits[:, :-1].argmax(-1) == targets
        for row, i in enumerate(indices):
            for qtype, span in zip(data.items[i]["types"], answer_spans(targets[row]), strict=False):
                total[qtype] += 1
                right[qtype] += int(hits[row, span].all())
    model.train(was_training)
    by_type = {t: round(100 * right[t] / total[t], 2) for t in sorted(total)}
    overall = round(100 * sum(right.values()) / max(1, sum(total.values())), 2)
    return {"accuracy": overall, "by_type": by_type, "answers": sum(total.values())}


def answer_spans(labels: Tensor) -> list[slice]:
    """[L] labels → the slices of its runs of supervised positions (one per answer), in order."""
    supervised = torch.cat([labels.new_zeros(1), (labels != IGNORE_INDEX).long(), labels.new_zeros(1)])
    edges = supervised.diff()
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    return [slice(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def phase_schedule(optimizer: torch.optim.Optimizer, warmup: int, question_steps: int, record_steps: int) -> LambdaLR:
    """The learning rate of both phases: each warms up linearly over `warmup` steps (at least 1) and decays to 0 by
    a cosine (`mllm_sparse.training.lr_lambda`), the second starting when the first has ended."""
    first, second = lr_lambda(max(1, warmup), question_steps), lr_lambda(max(1, warmup), record_steps)
    return LambdaLR(optimizer, lambda step: first(step) if step < question_steps else second(step - question_steps))


@dataclass
class ScenePretrainSettings:
    """What `mllm-sparse pretrain-llm` does: one field per option of the command.

    Attributes:
        data: a world written by `mllm-sparse synth`.
        out: the LLM's folder (with checkpoints/ and the report).
        llm: a tiny LLM name, or a causal LM folder to continue.
        vocab_size: tiny LLMs: BPE vocabulary size.
        template: the conversation template VLM training will use (one of `TEMPLATES`).
        question_steps: phase 1: steps on single questions.
        question_batch_size: phase 1: questions per step.
        record_steps: phase 2: steps on whole (multi-turn) records.
        record_batch_size: phase 2: records per step.
        lr: peak learning rate of each phase.
        warmup_steps: per phase; each phase then decays to 0 (cosine).
        eval_every: test accuracy and a checkpoint every this many steps (0: only at the end).
        eval_records: test records scored (phase 1: that many records' single questions).
        seed: the same seed and settings give the same weights.
        threads: torch CPU threads; None: torch's.
        resume: continue from the newest checkpoint in OUT/checkpoints.
    """

    data: Path
    out: Path
    llm: str = "tiny-llama"
    vocab_size: int = 1024
    template: str = "chat_template"
    question_steps: int = 2000
    question_batch_size: int = 64
    record_steps: int = 1000
    record_batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 100
    eval_every: int = 500
    eval_records: int = 500
    seed: int = 0
    threads: int | None = None
    resume: bool = False


# Settings that cannot change the weights: they may differ on --resume (and are stated); every other one may not.
FREE_SETTINGS = ("eval_every", "eval_records", "threads")


def run(settings: ScenePretrainSettings) -> dict:
    """Scene-pretrain an LLM into `settings.out` (see the module docstring); returns the report written to
    OUT/scene_pretrain.json, whose "final" holds the test accuracy in percent, overall and by question type."""
    args = replace(settings, data=Path(settings.data), out=Path(settings.out))
    if args.template not in TEMPLATES:
        raise ValueError(f"--template must be one of {', '.join(TEMPLATES)}, got {args.template!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("scenes.jsonl", "llava_train.json", "llava_test.json"):
        if not (args.data / name).is_file():
            raise FileNotFoundError(f"{args.data} is not a synthetic world (no {name}); run `mllm-sparse synth`")
    phases = {
        "questions": (args.question_steps, args.question_batch_size),
        "records": (args.record_steps, args.record_batch_size),
    }
    if any(steps < 0 or size < 1 for steps, size in phases.values()) or args.question_steps + args.record_steps < 1:
        raise ValueError("steps must be >= 0 (and not all 0), batch sizes >= 1")
    if not (math.isfinite(args.lr) and args.lr > 0) or args.warmup_steps < 0 or args.eval_every < 0:
        raise ValueError(f"--lr must be a finite number > 0, --warmup-steps and --eval-every >= 0, got {args.lr}")
    if args.eval_records < 1 or args.vocab_size < 1 or (args.threads is not None and args.threads < 1):
        raise ValueError("--eval-records, --vocab-size and --threads must be >= 1")
    run_folder = RunFolder.from_settings(
        args, "pretrain-llm", FREE_SETTINGS, [f"{LLM_DIR}/*.safetensors", PROJECTOR_FILE], specs=["llm"]
    )
    resumed = run_folder.start(args.resume)
    # A resumed run continues the checkpoint's LLM and tokenizer (--llm must name the one it started from).
    model, tokenizer = load_llm(
        str(resumed.path / LLM_DIR) if resumed else args.llm, args.data, args.vocab_size, args.seed
    )
    image_token_id = add_image_token(tokenizer)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(args.seed)
    projector = scene_projector(model.config.hidden_size)
    collator = DataCollatorForLlava(tokenizer)
    scenes = read_scenes(args.data)

    def records(split: str, single_questions: bool, limit: int | None = None) -> SceneRecords:
        return SceneRecords(args.data, split, tokenizer, args.template, scenes, single_questions, limit)

    train = {"questions": records("train", True), "records": records("train", False)}
    # Each phase is scored in its own format: a single-question LLM is lost in a conversation.
    test = {"questions": records("test", True, args.eval_records), "records": records("test", False, args.eval_records)}
    for phase, (steps, size) in phases.items():
        if steps and len(train[phase]) < size:
            raise ValueError(f"--{phase[:-1]}-batch-size {size} exceeds the {len(train[phase])} training {phase}")

    params = [p for p in [*model.parameters(), *projector.parameters()] if p.requires_grad]
    optimizer = adamw(params, lr=args.lr, weight_decay=0.0)
    total_steps = args.question_steps + args.record_steps
    scheduler = phase_schedule(optimizer, args.warmup_steps, args.question_steps, args.record_steps)
    state = {"step": 0, "phase": "questions", "epoch": 0, "position": 0, "seconds": 0.0, "losses": [], "evals": []}
    if resumed is not None:
        projector.load_state_dict(resumed.weights[PROJECTOR_FILE])
        saved = resumed.trainer_state
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        logger.info("resumed from %s at step %d", resumed.path, state["step"])

    def write_weights(folder: Path) -> None:
        model.save_pretrained(folder / LLM_DIR)
        tokenizer.save_pretrained(folder / LLM_DIR)
        save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, folder / PROJECTOR_FILE)

    def weights() -> dict[str, Tensor]:
        return {**model.state_dict(), **{f"projector.{k}": v for k, v in projector.state_dict().items()}}

    def checkpoint_now() -> None:
        trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state}
        run_folder.save(state["step"], write_weights, weights(), trainer_state)

    model.train()
    start = time.perf_counter()
    order, order_key = None, None
    # the evaluations log while the bar runs: through tqdm, so the bar is not broken up
    with (
        logging_redirect_tqdm(),
        tqdm(total=total_steps, initial=state["step"], unit="step", desc="pretrain-llm") as bar,
    ):
        while state["step"] < total_steps:
            phase = "questions" if state["step"] < args.question_steps else "records"
            if phase != state["phase"]:
                state["phase"], state["epoch"], state["position"] = phase, 0, 0
            data, size = train[phase], phases[phase][1]
            if order_key != (phase, state["epoch"]):
                # Whole records are grouped by length: random batches of them pad to ~1.8x their tokens. Single
                # questions are not: a question's length nearly gives its type, and batches of one type did not
                # teach the lookup (benchmarks/README.md).
                if phase == "records":
                    order = data.length_grouped_order(size, args.seed, state["epoch"])
                else:
                    order = epoch_order(len(data), args.seed, state["epoch"]).tolist()
                order_key = (phase, state["epoch"])
            if state["position"] + size > len(order):
                state["epoch"], state["position"] = state["epoch"] + 1, 0
                continue
            indices = order[state["position"] : state["position"] + size]
            batch = data.batch(indices, collator, args.seed * 7919 + state["epoch"])
            loss = scene_forward(model, projector, batch, image_token_id).loss
            value = run_folder.check_loss(loss, state["step"] + 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run_folder.check_grad_norm(torch.nn.utils.clip_grad_norm_(params, 1.0), state["step"] + 1)
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            state["position"] += size
            state["losses"].append(round(value, 5))
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if args.eval_every and state["step"] % args.eval_every == 0:
                scored_on = state["phase"]
                result = evaluate(model, projector, test[scored_on], collator, image_token_id)
                state["evals"].append({"step": state["step"], "on": scored_on, **result})
                logger.info("step %d: test accuracy (%s) %s%% %s", state["step"], scored_on, result["accuracy"],
                            result["by_type"])  # fmt: skip
                state["seconds"] += time.perf_counter() - start
                start = time.perf_counter()
                checkpoint_now()
    state["seconds"] += time.perf_counter() - start

    evals = state["evals"]
    if evals and evals[-1]["step"] == state["step"] and evals[-1]["on"] == "records":
        final = {k: v for k, v in evals[-1].items() if k not in ("step", "on")}
    else:
        final = evaluate(model, projector, test["records"], collator, image_token_id)
        checkpoint_now()
    run_folder.check_weights(weights(), state["step"])  # nothing non-finite reaches DIR
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    normal_modes(args.out)
    with atomic_path(args.out / PROJECTOR_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, tmp)
    report = {
        "llm": args.llm,
        "world": str(args.data),
        "template": args.template,
        "steps": state["step"],
        "question_steps": args.question_steps,
        "question_batch_size": args.question_batch_size,
        "record_steps": args.record_steps,
        "record_batch_size": args.record_batch_size,
        "lr": args.lr,
        "train_seconds": round(state["seconds"], 1),
        "train_questions": len(train["questions"]),
        "train_records": len(train["records"]),
        "final": final,
        "evals": state["evals"],
        "final_loss": sum(state["losses"][-50:]) / max(1, len(state["losses"][-50:])),
    }
    write_json(args.out / f"{REPORT_NAME}.json", report)
    with atomic_path(args.out / f"{REPORT_NAME}.md") as tmp:
        tmp.write_text(to_markdown(report))
    logger.info("LLM saved to %s", args.out)
    return report


def to_markdown(report: Mapping) -> str:
    types = list(report["final"]["by_type"])
    lines = [
        f"# Scene pretraining of `{report['llm']}` on `{report['world']}`",
        "",
        f"{report['question_steps']} steps of {report['question_batch_size']} single questions, then "
        f"{report['record_steps']} of {report['record_batch_size']} whole records; lr {report['lr']}, "
        f"{report['train_seconds']} s. Scored on {report['final']['answers']} answers of the test records, scene "
        "tokens (one per object) in place of the images, answers teacher-forced.",
        "",
        "| step | scored on | overall | " + " | ".join(types) + " |",
        "|---:|---|---:|" + "---:|" * len(types),
    ]
    rows = report["evals"]
    if not rows or (rows[-1]["step"], rows[-1]["on"]) != (report["steps"], "records"):
        rows = [*rows, {"step": report["steps"], "on": "records", **report["final"]}]
    for row in rows:
        cells = [f"{row['by_type'].get(t, float('nan')):.1f}%" for t in types]
        on = "single questions" if row["on"] == "questions" else "records"
        lines.append(f"| {row['step']} | {on} | {row['accuracy']:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

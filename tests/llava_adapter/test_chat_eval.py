"""ChatEngine (multi-turn chat, streaming, batched generation, timings) and `mllm-sparse eval-vlm`, on a tiny
untrained VLM: a test SparseFormer (15 latent tokens) + a 2-layer Llama, saved and reloaded like a real one."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from tiny_vlm import save_tiny_vlm
from transformers import AutoProcessor

from llava_adapter.chat import ChatEngine
from llava_adapter.conversation import RecordError
from llava_adapter.evaluate import accuracy_by, load_records, normalize_answer, questions
from mllm_sparse_recipes.cli import main as cli_main

N_TOKENS = 15  # test_sparseformer_btsp: its 15 latent tokens (the CLS token is dropped)
GEN = dict(max_new_tokens=6, min_new_tokens=3)  # at least 3 tokens: decoding time and tokens/s are measurable


@pytest.fixture(scope="module")
def vlm_dir(tokenizer, tmp_path_factory) -> Path:
    return save_tiny_vlm(tokenizer, tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def engine(vlm_dir) -> ChatEngine:
    return ChatEngine.from_pretrained(vlm_dir, template="vicuna_v1", device="cpu")


@pytest.fixture(autouse=True)
def _fresh_conversation(request):
    if "engine" in request.fixturenames:
        request.getfixturevalue("engine").reset()


def test_the_template_comes_from_the_model_folder_and_a_contradiction_is_named(vlm_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="llava_adapter.chat")
    assert ChatEngine.from_pretrained(vlm_dir, device="cpu").template == "vicuna_v1"  # a built, untrained model
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "records no conversation template" in warning and "vicuna_v1" in warning
    trained = tmp_path / "trained"
    shutil.copytree(vlm_dir, trained)
    processor = AutoProcessor.from_pretrained(trained)
    processor.conversation_template = "chat_template"  # as training records it
    processor.save_pretrained(trained)
    caplog.clear()
    assert ChatEngine.from_pretrained(trained, device="cpu").template == "chat_template"
    assert caplog.records == []
    assert ChatEngine.from_pretrained(trained, template="vicuna_v1", device="cpu").template == "vicuna_v1"
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "trained with the chat_template template, but vicuna_v1 was asked for" in warning


def test_multi_turn_chat_keeps_history(engine, image_folder):
    assert engine.num_image_tokens == N_TOKENS
    first = engine.chat("What colour is the circle?", image=image_folder / "a.png", **GEN)
    second = engine.chat("How many stars are there?", **GEN)
    assert first.text and second.text
    prompt = engine.tokenizer.decode(second.prompt_ids)
    assert "What colour is the circle?" in prompt and first.text in prompt
    assert prompt.count("<image>") == N_TOKENS and prompt.rstrip().endswith("ASSISTANT:")
    assert [turn["from"] for turn in engine.conversation] == ["human", "gpt", "human", "gpt"]
    assert engine.conversation[1]["value"] == first.text and engine.conversation[0]["value"].startswith("<image>\n")
    with pytest.raises(ValueError, match="first message"):
        engine.chat("And this one?", image=image_folder / "b.png")
    engine.reset()
    assert engine.conversation == [] and engine.image is None


def test_stream_matches_greedy_chat(engine, image_folder):
    reply = engine.chat("What colour is the circle?", image=image_folder / "a.png", **GEN)
    history = list(engine.conversation)
    engine.reset()
    pieces = list(engine.stream("What colour is the circle?", image=image_folder / "a.png", **GEN))
    assert len(pieces) >= 1 and "".join(pieces).strip() == reply.text
    assert engine.last_reply.text == reply.text and engine.conversation == history
    assert engine.last_reply.timings.prefill_s > 0


def test_generate_batch_equals_one_by_one(engine, image_folder):
    follow_up = {
        "id": "multi",
        "image": "b.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": "green"},
            {"from": "human", "value": "Is it on the left?"},
        ],
    }
    rows = ["What colour is the circle?", "How many stars are there?", follow_up, "Is the star on the top?"]
    images = [image_folder / "a.png", None, image_folder / "b.png", image_folder / "c.png"]
    batched = engine.generate_batch(rows, images, max_new_tokens=6)
    assert engine.last_timings.batch_size == 4 and engine.last_timings.num_images == 3
    assert engine.tokenizer.padding_side == "right"  # left padding for the batch call only
    single = [
        engine.generate_batch([row], [image], max_new_tokens=6)[0] for row, image in zip(rows, images, strict=True)
    ]
    assert batched == single
    assert engine.conversation == []  # batched generation leaves the chat alone
    with pytest.raises(ValueError, match="has an image field but no image"):
        engine.generate_batch([follow_up], [None])
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        engine.generate_batch(["a", "b"], [None])


def test_timings_and_single_image_encoding(engine, image_folder, monkeypatch):
    tower = engine.model.model.vision_tower
    calls = []
    original = tower.forward
    monkeypatch.setattr(tower, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    reply = engine.chat("What colour is the circle?", image=image_folder / "a.png", **GEN)
    assert len(calls) == 1  # encoded once, then handed to generate as mm_encoder_outputs
    t = reply.timings
    assert t.encode_s > 0 and t.prefill_s > 0 and t.decode_s > 0 and t.tokens_per_s > 0
    assert t.num_image_tokens == N_TOKENS and t.num_images == 1 and t.batch_size == 1
    assert t.prompt_tokens == len(reply.prompt_ids) and t.new_tokens == len(reply.new_ids) >= 3
    assert t.to_dict()["total_s"] == pytest.approx(t.encode_s + t.prefill_s + t.decode_s)
    engine.reset()
    text = engine.chat("How many stars are there?", **GEN).timings
    assert text.encode_s == 0 and text.num_images == 0 and text.prefill_s > 0


def test_normalize_answer():
    assert normalize_answer("Red.") == normalize_answer("red") == "red"
    assert normalize_answer("  Three! ") == "3"
    assert normalize_answer("red circle") == normalize_answer("Red  circle.")
    assert normalize_answer("red") != normalize_answer("reddish")


def _records() -> list[dict]:
    def turns(*pairs, image=False):
        out = []
        for k, (q, a) in enumerate(pairs):
            out += [
                {"from": "human", "value": ("<image>\n" if image and k == 0 else "") + q},
                {"from": "gpt", "value": a},
            ]
        return out

    meta = lambda qtype, size: {"type": qtype, "target_size": size, "subject": "", "choices": []}  # noqa: E731
    return [
        {
            "id": "r1",
            "image": "a.png",
            "conversations": turns(("What colour is the circle?", "red"), image=True),
            "qa_meta": [meta("color", "small")],
        },
        {
            "id": "r2",
            "image": "b.png",
            "conversations": turns(
                ("How many stars are there?", "3"), ("Is the star on the left?", "left"), image=True
            ),
            "qa_meta": [meta("count", "none"), meta("position", "large")],
        },
        {
            "id": "r3",
            "conversations": turns(("How many sides does a square have?", "4")),
            "qa_meta": [meta("text", "none")],
        },
        {"id": "r4", "conversations": turns(("Is a circle round?", "yes"))},
    ]


# Forced predictions: r1 right (punctuation, case), r2 turn 1 right (number word), r2 turn 2 wrong, r3 right, r4 wrong.
FORCED = {
    "What colour is the circle?": "Red.",
    "How many stars are there?": "Three",
    "Is the star on the left?": "right",
    "How many sides does a square have?": "4",
    "Is a circle round?": "no",
}


def test_eval_vlm_accuracy_matches_hand_count(vlm_dir, image_folder, write_data, tmp_path, monkeypatch, capsys):
    data = write_data(_records())
    original = ChatEngine.generate_batch
    seen = {}

    def forced(self, prompts, images, **kwargs):
        original(self, prompts, images, **kwargs)  # real generation, so timings are real
        out = []
        for prompt in prompts:
            question = prompt["conversations"][-1]["value"].removeprefix("<image>\n")
            seen[question] = prompt
            out.append(FORCED[question])
        return out

    monkeypatch.setattr(ChatEngine, "generate_batch", forced)
    out = tmp_path / "report"
    args = ["eval-vlm", "--model", str(vlm_dir), "--data", str(data), "--image_folder", str(image_folder)]
    assert cli_main([*args, "--batch-size", "2", "--max-new-tokens", "4", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "eval_vlm.json").read_text())
    assert (report["num_records"], report["num_answers"], report["correct"]) == (4, 5, 3)
    assert report["accuracy"] == pytest.approx(3 / 5)
    by_type = {key: (v["correct"], v["total"]) for key, v in report["by_type"].items()}
    assert by_type == {"color": (1, 1), "count": (1, 1), "position": (0, 1), "text": (1, 2)}
    sizes = {key: (v["correct"], v["total"]) for key, v in report["by_target_size"].items()}
    assert sizes == {"small": (1, 1), "large": (0, 1)}
    assert {key: (v["correct"], v["total"]) for key, v in report["by_turn"].items()} == {"1": (3, 4), "2": (0, 1)}
    assert report["by_modality"]["text"]["total"] == 2 and report["by_modality"]["image"]["total"] == 3
    # The follow-up is asked after the first question and its gold answer.
    follow_up = seen["Is the star on the left?"]["conversations"]
    assert [turn["value"] for turn in follow_up[1:]] == ["3", "Is the star on the left?"]
    assert [(row["id"], row["turn"], row["correct"]) for row in report["predictions"]] == [
        ("r1", 1, True),
        ("r2", 1, True),
        ("r2", 2, False),
        ("r3", 1, True),
        ("r4", 1, False),
    ]
    t = report["throughput"]
    assert t["num_image_tokens"] == N_TOKENS and t["images_encoded"] == 3 and t["batches"] == 3
    assert t["answers_per_s"] > 0 and t["images_per_s"] > 0 and t["mean_encode_s"] > 0 and t["mean_prefill_s"] > 0
    markdown = (out / "eval_vlm.md").read_text()
    assert "| overall | all | 3 | 5 | 60.0% |" in markdown and "| target_size | small | 1 | 1 | 100.0% |" in markdown
    assert markdown in capsys.readouterr().out


def test_eval_vlm_real_predictions_are_scored_consistently(vlm_dir, image_folder, write_data):
    data = write_data(_records())
    args = ["eval-vlm", "--model", str(vlm_dir), "--data", str(data), "--image_folder", str(image_folder)]
    assert cli_main([*args, "--limit", "2", "--max-new-tokens", "3", "--no-progress"]) == 0
    report = json.loads((vlm_dir / "eval_vlm.json").read_text())  # default --out: the model folder
    rows = report["predictions"]
    assert report["num_records"] == 2 and len(rows) == 3
    assert all(row["correct"] == (normalize_answer(row["prediction"]) == normalize_answer(row["gold"])) for row in rows)
    assert report["correct"] == sum(row["correct"] for row in rows)
    assert (vlm_dir / "eval_vlm.md").is_file()


def test_eval_vlm_errors(vlm_dir, image_folder, write_data, tmp_path, capsys):
    good = write_data(_records(), "good.json")

    def run(model, data) -> str:
        code = cli_main(["eval-vlm", "--model", str(model), "--data", str(data), "--image_folder", str(image_folder)])
        assert code == 2
        return capsys.readouterr().err

    assert "Model folder not found" in run(tmp_path / "no-model", good) and "no-model" in run(
        tmp_path / "no-model", good
    )
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        ChatEngine.from_pretrained(tmp_path)
    bad = write_data('[{"id": "r1", "conversations": [', "bad.json")
    assert "Malformed JSON" in (err := run(vlm_dir, bad)) and "bad.json" in err
    missing = _records()
    missing[1]["image"] = "nowhere.png"
    err = run(vlm_dir, write_data(missing, "missing.json"))
    assert "'r2'" in err and "nowhere.png" in err and "missing.json" in err
    corrupt = _records()
    corrupt[0]["image"] = "corrupt.png"
    err = run(vlm_dir, write_data(corrupt, "corrupt.json"))
    assert "'r1'" in err and "corrupt.png" in err
    roles = _records()
    roles[2]["conversations"].reverse()
    with pytest.raises(RecordError, match="'r3'.*roles"):
        load_records(write_data(roles, "roles.json"), image_folder)


def test_eval_vlm_shows_one_spelling_per_flag_and_still_reads_llavas():
    from mllm_sparse_recipes.commands.eval_vlm import build_parser

    parser = build_parser()
    shown = parser.format_help()
    for new in ("--image-folder", "--batch-size", "--max-new-tokens", "--skip-bad-records"):
        assert new in shown and new.replace("-", "_").replace("__", "--") not in shown
    args = parser.parse_args(["--model", "m", "--data", "d", "--image_folder", "i", "--batch_size", "3",
                              "--skip_bad_records"])  # fmt: skip
    assert (str(args.image_folder), args.batch_size, args.skip_bad_records, args.max_new_tokens) == ("i", 3, True, 16)


def test_questions_skip_a_leading_system_turn(tmp_path):
    record = {
        "id": "s",
        "conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "How many stars?"},
            {"from": "gpt", "value": "3"},
            {"from": "human", "value": "And circles?"},
            {"from": "gpt", "value": "1"},
        ],
    }
    first, second = questions([record], tmp_path)
    assert (first.question, first.gold, first.turn) == ("How many stars?", "3", 0)
    assert (second.question, second.gold, second.turn) == ("And circles?", "1", 1)
    assert [t["from"] for t in second.prompt["conversations"]] == ["system", "human", "gpt", "human"]


def test_accuracy_by_counts_each_key_and_skips_rows_without_one():
    rows = [
        {"type": "colour", "correct": True},
        {"type": "colour", "correct": False},
        {"type": "count", "correct": True},
        {"type": "colour", "correct": True},
        {"type": None, "correct": True},
    ]
    assert accuracy_by(rows, lambda r: r["type"]) == {
        "colour": {"correct": 2, "total": 3, "accuracy": 2 / 3},
        "count": {"correct": 1, "total": 1, "accuracy": 1.0},
    }

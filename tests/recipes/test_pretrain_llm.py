"""Scene pretraining (`mllm-sparse pretrain-llm`): scene tokens, the question records, a real run on a tiny world,
exact resume, the LLM it leaves for `build_vlm`, and clear errors."""

from __future__ import annotations

import json
import logging
import shutil
import signal

import cli_process
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import mllm_sparse
from llava_adapter.conversation import TEMPLATES, RecordError
from llava_adapter.data import DataCollatorForLlava
from llava_adapter.llms import load_llm
from llava_adapter.modeling import build_vlm
from mllm_sparse.synth import generate_world
from mllm_sparse.synth.world import COLOR_NAMES, SHAPES
from mllm_sparse_recipes.cli import main as cli
from mllm_sparse_recipes.commands import pretrain_llm as pretrain_llm_command
from mllm_sparse_recipes.scene_llm import (
    ScenePretrainSettings,
    SceneRecords,
    answer_spans,
    phase_schedule,
    read_scenes,
    scene_forward,
    scene_projector,
    split_questions,
    turn_types,
)
from mllm_sparse_recipes.scene_llm import run as pretrain
from mllm_sparse_recipes.scene_tokens import SCENE_FEATURES, object_features, scene_tokens

OBJECTS = [
    {"shape": "star", "color": "red", "size": "large", "cx": 0.3, "cy": 0.7, "radius": 0.15},
    {"shape": "ring", "color": "cyan", "size": "small", "cx": 0.8, "cy": 0.2, "radius": 0.04},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene_world") / "world"
    generate_world(root, num_images=40, image_size=64, seed=3, progress=False, max_turns=3, workers=1)
    return root


def run(world, out, *extra):
    return cli(["pretrain-llm", "--data", str(world), "--out", str(out), "--question-batch-size", "8",
                "--record-batch-size", "4", "--threads", "1", "--eval-records", "3", *extra])  # fmt: skip


def test_object_features_encode_each_object():
    rows = object_features(OBJECTS)
    assert rows.shape == (2, SCENE_FEATURES)
    star, ring = rows
    assert star[SHAPES.index("star")] == 1 and star[:6].sum() == 1
    assert star[6 + COLOR_NAMES.index("red")] == 1 and ring[6 + COLOR_NAMES.index("cyan")] == 1
    assert star[6:14].sum() == 1 and ring[6:14].sum() == 1
    # Left/top flags: the star is on the left and at the bottom, the ring on the right and at the top.
    assert star[17:19].tolist() == [1.0, 0.0] and ring[17:19].tolist() == [0.0, 1.0]


def test_scene_tokens_pad_shuffle_and_reject_crowded_scenes():
    a = scene_tokens(OBJECTS, 5, torch.Generator().manual_seed(1))
    b = scene_tokens(OBJECTS, 5, torch.Generator().manual_seed(1))
    assert a.shape == (5, SCENE_FEATURES) and torch.equal(a, b)
    assert int(a[:, -1].sum()) == 3  # three empty tokens
    objects = a[a[:, -1] == 0]
    assert sorted(map(tuple, objects.tolist())) == sorted(map(tuple, object_features(OBJECTS).tolist()))
    orders = {tuple(scene_tokens(OBJECTS, 5, torch.Generator().manual_seed(s))[:, -1].tolist()) for s in range(20)}
    assert len(orders) > 1, "the empty tokens always sit at the same places"
    with pytest.raises(ValueError, match="images/x.png has 2 objects, more than the 1 scene tokens"):
        scene_tokens(OBJECTS, 1, torch.Generator(), "images/x.png")
    with pytest.raises(ValueError, match="images/y.png: object 0"):
        object_features([{**OBJECTS[0], "shape": "hexagon"}], "images/y.png")


def test_turn_types_single_questions_and_answer_spans():
    record = {
        "id": "r1",
        "image": "images/0.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the star?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Is there a cyan ring in the image?"},
            {"from": "gpt", "value": "yes"},
        ],
        "qa_meta": [{"type": "color"}, {"type": "existence"}],
    }
    assert turn_types(record) == ["color", "existence"]
    singles = split_questions(record)
    assert [s["id"] for s in singles] == ["r1#0", "r1#1"] and [turn_types(s) for s in singles] == [
        ["color"],
        ["existence"],
    ]
    assert all(s["image"] == "images/0.png" for s in singles)
    assert singles[1]["conversations"] == [
        {"from": "human", "value": "<image>\nIs there a cyan ring in the image?"},
        {"from": "gpt", "value": "yes"},
    ]
    assert turn_types({"id": "t", "conversations": record["conversations"][2:]}) == ["text"]
    labels = torch.tensor([-100, -100, 7, 2, -100, -100, 9, 9, 2, -100])
    assert answer_spans(labels) == [slice(2, 4), slice(6, 9)]
    assert answer_spans(torch.tensor([5, -100, 6])) == [slice(0, 1), slice(2, 3)]


def test_batches_widen_the_placeholder_to_the_most_objects(world):
    llm, tokenizer = load_llm("tiny-llama", world)
    data = SceneRecords(world, "test", tokenizer, "chat_template", read_scenes(world))
    image_items = [i for i, item in enumerate(data.items) if item["objects"] is not None]
    sizes = {i: len(data.items[i]["objects"]) for i in image_items}
    pair = [min(sizes, key=sizes.get), max(sizes, key=sizes.get)]
    assert sizes[pair[0]] < sizes[pair[1]], "the test world needs scenes of different sizes"
    collator = DataCollatorForLlava(tokenizer)
    batch = data.batch(pair, collator, seed=0)
    width = sizes[pair[1]]
    assert batch["scene_tokens"].shape == (2, width, SCENE_FEATURES)
    # The smaller scene is padded with empty tokens (last feature), the larger one is not.
    assert batch["scene_tokens"][:, :, -1].sum(-1).tolist() == [width - sizes[pair[0]], 0]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ((batch["input_ids"] == image_id).sum(-1) == width).all()
    assert (batch["labels"][batch["input_ids"] == image_id] == -100).all()
    for row, i in enumerate(pair):  # the text around the placeholders is unchanged
        kept = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        original = data.items[i]["input_ids"]
        assert torch.equal(kept[kept != image_id], original[original != image_id])

    projector = scene_projector(llm.config.hidden_size)
    llm.eval()
    with torch.no_grad():
        logits = scene_forward(llm, projector, batch, image_id).logits
        changed = scene_forward(
            llm, projector, dict(batch, scene_tokens=torch.ones_like(batch["scene_tokens"])), image_id
        )
    first = int((batch["input_ids"][0] == image_id).nonzero()[0])
    assert torch.allclose(logits[0, :first], changed.logits[0, :first])  # before the image: causal, untouched
    assert not torch.allclose(logits[0, -1], changed.logits[0, -1])  # after it: reads the scene tokens


def test_whole_records_come_in_batches_of_one_modality_and_similar_length(world):
    _, tokenizer = load_llm("tiny-llama", world)
    data = SceneRecords(world, "train", tokenizer, "chat_template", read_scenes(world))
    lengths = [len(item["input_ids"]) + len(item["objects"] or [None]) - 1 for item in data.items]
    text_only = {i for i, item in enumerate(data.items) if item["objects"] is None}
    assert text_only and len(text_only) < len(data), "the test world needs text-only and image records"
    size = 4
    order = data.length_grouped_order(size, seed=0, epoch=0)
    assert sorted(order) == list(range(len(data)))  # every record once
    assert order == data.length_grouped_order(size, seed=0, epoch=0) != data.length_grouped_order(size, 0, 1)
    full = [order[s : s + size] for s in range(0, len(order) - len(order) % size, size)]
    mixed = [b for b in full if 0 < len(text_only & set(b)) < len(b)]
    assert len(mixed) <= 1  # only the leftovers of the two modalities may share a batch

    def padding(batches):  # padded tokens over real tokens
        return sum(size * max(lengths[i] for i in b) for b in batches) / sum(lengths[i] for b in batches for i in b)

    shuffled = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(full) < padding([shuffled[s : s + size] for s in range(0, len(full) * size, size)])


def test_pretrain_llm_runs_resumes_exactly_and_feeds_build_vlm(world, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    steps = ["--question-steps", "2", "--record-steps", "2", "--eval-every", "1"]
    assert run(world, straight, *steps) == 0
    assert run(world, resumed, *steps) == 0
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    shutil.rmtree(resumed / "checkpoints" / "step_00000003")  # resume in phase 2's first step: from step 2
    assert run(world, resumed, *steps, "--resume") == 0
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    report = json.loads((straight / "scene_pretrain.json").read_text())
    assert report["steps"] == 4 and [e["step"] for e in report["evals"]] == [1, 2, 3, 4]
    assert [e["on"] for e in report["evals"]] == ["questions", "questions", "records", "records"]
    assert report["train_questions"] > report["train_records"]
    assert set(report["final"]["by_type"]) <= {"color", "count", "existence", "largest", "position", "text"}
    tokenizer = AutoTokenizer.from_pretrained(straight)
    answers = sum(
        len(item["types"])
        for item in SceneRecords(world, "test", tokenizer, "chat_template", read_scenes(world)).items[:3]
    )
    assert report["final"]["answers"] == answers
    table = (straight / "scene_pretrain.md").read_text()
    assert (
        "| 2 | single questions |" in table
        and table.count("| 4 | records |") == 1
        and "2 steps of 8 single questions, then 2 of 4" in table
    )

    llm = AutoModelForCausalLM.from_pretrained(straight)
    vlm = build_vlm(mllm_sparse.create_model("test_sparseformer_btsp"), llm, tokenizer).eval()
    torch.testing.assert_close(vlm.get_input_embeddings().weight, llm.get_input_embeddings().weight)
    ids = tokenizer("What colour is the star?", return_tensors="pt").input_ids
    assert vlm(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_the_typed_call_trains_what_the_command_trains(world, tmp_path, capsys):
    steps = ["--question-steps", "2", "--record-steps", "1", "--eval-every", "2"]
    assert run(world, tmp_path / "cli", *steps) == 0
    assert "test accuracy" in capsys.readouterr().out
    settings = ScenePretrainSettings(data=world, out=tmp_path / "typed", question_steps=2, record_steps=1, eval_every=2,
                                     question_batch_size=8, record_batch_size=4, threads=1, eval_records=3)  # fmt: skip
    report = pretrain(settings)
    assert report == json.loads((tmp_path / "typed" / "scene_pretrain.json").read_text())
    assert same_llm_weights(tmp_path / "cli", tmp_path / "typed")
    recorded = json.loads(next((tmp_path / "typed" / "checkpoints").glob("*/run_settings.json")).read_text())
    recorded_names = set(recorded["settings"]) | set(recorded["free"])
    assert recorded_names == {f for f in vars(settings) if f not in ("out", "resume")}


def test_the_command_offers_the_templates():
    assert pretrain_llm_command.TEMPLATES == TEMPLATES


def test_bad_worlds_fail_clearly(world, tmp_path, capsys):
    assert cli(["pretrain-llm", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "is not a synthetic world (no scenes.jsonl)" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(world, broken, ignore=shutil.ignore_patterns("images"))
    scenes = (broken / "scenes.jsonl").read_text().splitlines()
    (broken / "scenes.jsonl").write_text("\n".join(scenes[1:]) + "\n")  # the first image loses its scene
    _, tokenizer = load_llm("tiny-llama", broken)
    with pytest.raises(RecordError, match=r"synth-0000000.*of .*llava_train.json.*images/0000000.png is not in scenes"):
        SceneRecords(broken, "train", tokenizer, "chat_template", read_scenes(broken))


# Keeping the user's work: exact resume after kill -9, refused settings and overwrites, damaged checkpoints, divergence.

TINY = ["--question-batch-size", "8", "--record-batch-size", "4", "--threads", "1", "--eval-records", "3"]


def same_llm_weights(a, b):
    """Bit-identical: the same ops on the same batches in the same order, one thread, give the same floats."""
    pairs = [
        (load_file(a / name), load_file(b / name)) for name in ("model.safetensors", "scene_projector.safetensors")
    ]
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in pairs)


def test_kill_9_then_resume_matches_an_uninterrupted_run(world, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ("--data", str(world), *TINY, "--question-steps", "5", "--record-steps", "5", "--eval-every", "1")
    victim = cli_process.start("pretrain-llm", *args, "--out", str(killed), log=tmp_path / "kill.log")
    code = cli_process.kill_when(victim, killed / "checkpoints" / "step_00000002")
    assert code == -signal.SIGKILL, (tmp_path / "kill.log").read_text()[-2000:]
    assert not (killed / "model.safetensors").exists()
    assert cli(["pretrain-llm", *args, "--out", str(straight)]) == 0  # the same command, uninterrupted
    resumed = cli_process.run("pretrain-llm", *args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr  # the command line logs to stderr
    assert same_llm_weights(straight, killed)
    a, b = (json.loads((p / "scene_pretrain.json").read_text()) for p in (straight, killed))
    assert a["final"] == b["final"] and [e["accuracy"] for e in a["evals"]] == [e["accuracy"] for e in b["evals"]]


def test_resume_refuses_changed_settings_and_falls_back_from_a_damaged_checkpoint(world, tmp_path, capsys, caplog):
    straight, out = tmp_path / "straight", tmp_path / "run"
    steps = ["--question-steps", "2", "--record-steps", "1", "--eval-every", "1"]
    assert run(world, straight, *steps) == 0
    shutil.copytree(straight, out)
    capsys.readouterr()
    assert run(world, out, *steps, "--resume", "--lr", "0.5", "--record-batch-size", "2") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "was trained with other settings: --record-batch-size 4 -> 2; --lr 0.002 -> 0.5" in line
    assert run(world, out, *steps) == 2
    assert "already holds checkpoints of a run (newest step_00000003): pass --resume" in capsys.readouterr().err
    projector = out / "checkpoints" / "step_00000003" / "scene_projector.safetensors"
    projector.write_bytes(projector.read_bytes()[:-8])
    (out / "model.safetensors").unlink()
    caplog.set_level(logging.INFO)
    assert run(world, out, *steps[:-1], "3", "--resume", "--eval-records", "2") == 0
    assert "skipping damaged checkpoint" in caplog.text and "step_00000003" in caplog.text
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2" in caplog.text
    assert "do not change the weights: --eval-every 1 -> 3; --eval-records 3 -> 2" in caplog.text
    assert same_llm_weights(straight, out)


def test_a_diverging_run_stops_before_its_backward_pass(world, tmp_path, capsys):
    """At --lr 1e20 the weights of step 1 overflow the LLM's norms in step 2: its loss is NaN."""
    out = tmp_path / "div"
    args = ["--question-steps", "4", "--record-steps", "0", "--eval-every", "1", "--warmup-steps", "1", "--lr", "1e20"]
    for extra in ((), ("--resume",)):
        assert run(world, out, *args, *extra) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert "the loss became nan in step 2; stopped before its backward pass" in line
        assert f"the last good checkpoint is {out / 'checkpoints' / 'step_00000001'}" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("extra", [("--lr", "0"), ("--lr", "nan"), ("--warmup-steps", "-1"), ("--eval-records", "0")])
def test_absurd_numbers_get_one_line(world, tmp_path, capsys, extra):
    assert run(world, tmp_path / "x", "--question-steps", "1", "--record-steps", "0", *extra) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mllm-sparse pretrain-llm: error: ") and extra[0] in line


@pytest.mark.parametrize(
    ("question_steps", "record_steps", "expected"),
    [
        (5, 4, [0.5, 1.0, 1.0, 0.75, 0.25, 0.5, 1.0, 1.0, 0.5]),
        (0, 4, [0.5, 1.0, 1.0, 0.5]),
        (5, 0, [0.5, 1.0, 1.0, 0.75, 0.25]),
    ],
)
def test_each_phase_warms_up_and_decays_on_its_own(question_steps, record_steps, expected):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = phase_schedule(optimizer, 2, question_steps, record_steps)
    seen = []
    for _ in range(question_steps + record_steps):
        seen.append(optimizer.param_groups[0]["lr"] / 2.0)
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx(expected)

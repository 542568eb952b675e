"""The LLaVA-format Q&A files: valid as haotian-liu/LLaVA consumes them, and right about every scene."""

import json
import re

import numpy as np
import pytest

from mllm_sparse.synth import QUESTION_TYPES, WorldSettings, generate_world, make_question, make_scene
from mllm_sparse.synth.text import TEXT_ONLY_QA


def _load(world, split):
    return json.loads((world / f"llava_{split}.json").read_text())


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_records_validate_against_the_llava_format(small_world, split):
    records = _load(small_world, split)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    text_only = 0
    for record in records:
        turns = record["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        images = sum(t["value"].count("<image>") for t in turns)
        if "image" in record:
            assert images == 1 and turns[0]["value"].startswith("<image>\n")
            assert (small_world / record["image"]).is_file()
        else:
            assert images == 0
            text_only += 1
        assert len(record["qa_meta"]) == len(turns) // 2
        assert all(len(t["value"].split()) <= 2 for t in turns[1::2])  # short answers for exact match
    assert text_only >= 1


def _check_answer(scene_objects, question, answer, qtype):
    names = [f"{o['color']} {o['shape']}" for o in scene_objects]
    if qtype == "color":
        shape = re.match(r"What colour is the (\w+)\?", question).group(1)
        (obj,) = [o for o in scene_objects if o["shape"] == shape]
        assert answer == obj["color"]
    elif qtype == "count":
        m = re.match(r"How many (\w+) objects are there\?", question)
        if m:
            assert answer == str(sum(o["color"] == m.group(1) for o in scene_objects))
        else:
            plural = re.match(r"How many (\w+) are there\?", question).group(1)
            shape = plural[:-2] if plural.endswith("ses") else plural[:-1]
            assert answer == str(sum(o["shape"] == shape for o in scene_objects))
    elif qtype == "position":
        m = re.match(r"Is the (\w+ \w+) (on the left or on the right|at the top or at the bottom)\?", question)
        (obj,) = [o for o, n in zip(scene_objects, names, strict=True) if n == m.group(1)]
        if "left" in m.group(2):
            assert answer == ("left" if obj["cx"] < 0.5 else "right")
        else:
            assert answer == ("top" if obj["cy"] < 0.5 else "bottom")
    elif qtype == "existence":
        name = re.match(r"Is there a (\w+ \w+) in the image\?", question).group(1)
        assert answer == ("yes" if name in names else "no")
    elif qtype == "largest":
        assert answer == names[0]
        assert all(scene_objects[0]["radius"] > o["radius"] for o in scene_objects[1:])
    else:
        raise AssertionError(qtype)


def test_every_answer_matches_the_scene(small_world):
    scenes = {json.loads(line)["image"]: json.loads(line) for line in (small_world / "scenes.jsonl").open()}
    seen = set()
    for split in ("train", "val", "test"):
        for record in _load(small_world, split):
            turns = record["conversations"]
            for i, meta in enumerate(record["qa_meta"]):
                question = turns[2 * i]["value"].removeprefix("<image>\n")
                answer = turns[2 * i + 1]["value"]
                if "image" not in record:
                    assert (question, answer) in TEXT_ONLY_QA
                    continue
                _check_answer(scenes[record["image"]]["objects"], question, answer, meta["type"])
                seen.add(meta["type"])
    assert seen == set(QUESTION_TYPES)


def test_generated_questions_are_unambiguous_on_many_scenes():
    rng = np.random.default_rng(0)
    settings = WorldSettings.for_difficulty("hard")
    for index in range(150):
        scene = make_scene(settings, 5, index, 32)[0]
        objects = scene.to_dict()["objects"]
        for qtype in QUESTION_TYPES:
            qa = make_question(scene, qtype, rng)
            if qa is not None:
                _check_answer(objects, qa["question"], qa["answer"], qtype)
                assert qa["target_size"] in ("small", "medium", "large", "none")
    with pytest.raises(ValueError, match="unknown question type"):
        make_question(scene, "weather", rng)


def test_pretrain_captions_are_single_turn_train_records_for_stage1(small_world):
    records = json.loads((small_world / "llava_pretrain.json").read_text())
    captions = {
        row["image"]: row["caption"]
        for row in map(json.loads, (small_world / "captions.jsonl").read_text().splitlines())
        if row["split"] == "train"
    }
    assert sorted(r["image"] for r in records) == sorted(captions)
    for record in records:
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt == {"from": "gpt", "value": captions[record["image"]]}


def test_image_records_ask_up_to_max_turns_distinct_questions(small_world):
    turns = []
    for split in ("train", "val", "test"):
        for record in _load(small_world, split):
            if "image" in record:
                questions = [t["value"].removeprefix("<image>\n") for t in record["conversations"][0::2]]
                assert len(set(questions)) == len(questions)
                turns.append(len(questions))
    settings = WorldSettings.for_difficulty("default")
    assert max(turns) <= settings.max_turns and min(turns) == 1
    assert sum(turns) / len(turns) > 3  # dense, as LLaVA's per-image VQA conversations


def test_max_turns_one_gives_single_question_records(tmp_path):
    generate_world(tmp_path / "w", num_images=20, image_size=32, seed=1, workers=1, progress=False, max_turns=1)
    records = _load(tmp_path / "w", "train")
    assert all(len(r["conversations"]) == 2 for r in records)
    assert json.loads((tmp_path / "w" / "world.json").read_text())["settings"]["max_turns"] == 1
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        generate_world(tmp_path / "x", num_images=20, image_size=32, max_turns=0, progress=False)


def test_count_answers_are_not_dominated_by_zero():
    rng = np.random.default_rng(0)
    settings = WorldSettings.for_difficulty("default")
    answers = [make_question(make_scene(settings, 2, i, 32)[0], "count", rng)["answer"] for i in range(400)]
    assert answers.count("0") < 0.45 * len(answers)
    assert len(set(answers)) >= 4

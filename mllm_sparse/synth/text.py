"""Text about synthetic scenes: captions for contrastive training and LLaVA-format question/answer records.

Every answer is computed from the scene's ground truth and is short (a word or a number), so exact match scores it.
Questions are asked only where the answer is unambiguous: the object referred to is the only one of its kind, a
position is asked only away from the centre line, and "largest" is asked only with a clear winner.
"""

from __future__ import annotations

import numpy as np

from .world import COLOR_NAMES, SHAPES, Scene, SceneObject, class_names

QUESTION_TYPES = ("color", "count", "position", "existence", "largest")
ONE_WORD = "Answer with a single word."
ONE_NUMBER = "Answer with a number."
YES_NO = "Answer yes or no."
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
COUNTS = tuple(str(n) for n in range(len(NUMBER_WORDS)))
YES_NO_CHOICES = ("yes", "no")
# Text-only records, as in LLaVA's mixes: questions answered without an image.
TEXT_ONLY_QA = (
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("How many points does a star have in this world?", "5"),
    ("How many arms does a cross have?", "4"),
    ("Is a circle round?", "yes"),
    ("Does a square have curved sides?", "no"),
    ("What colour do you get by mixing red and white?", "pink"),
    ("What colour do you get by mixing blue and red?", "purple"),
    ("What colour do you get by mixing red and yellow?", "orange"),
    ("What colour do you get by mixing blue and yellow?", "green"),
)


def where(obj: SceneObject) -> str:
    """Position in words: 'at the top left', 'on the right', 'in the centre'."""
    vertical = "top" if obj.cy < 0.4 else "bottom" if obj.cy > 0.6 else ""
    horizontal = "left" if obj.cx < 0.4 else "right" if obj.cx > 0.6 else ""
    if vertical and horizontal:
        return f"at the {vertical} {horizontal}"
    if vertical:
        return f"at the {vertical}"
    if horizontal:
        return f"on the {horizontal}"
    return "in the centre"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """The principal object first, then the others (largest first) with their positions."""
    principal, others = scene.principal, sorted(scene.objects[1:], key=lambda o: -o.area)
    text = f"a {principal.size} {principal.name} {where(principal)}"
    if others:
        parts = [f"a {o.size} {o.name} {where(o)}" for o in others]
        joiner = " and " if len(parts) == 1 else ", "
        text += rng.choice([", with ", " next to ", " together with "]) + joiner.join(parts)
    return text + "."


def captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Three captions of one scene, from full to short: all objects; the principal object and the two next
    largest; the principal object alone. Short captions make the principal object's shape matter in a contrastive
    batch, where colours and positions alone would otherwise tell most full captions apart."""
    principal, others = scene.principal, sorted(scene.objects[1:], key=lambda o: -o.area)
    middle = f"a {principal.size} {principal.name} {where(principal)}"
    if others:
        middle += " and " + " and ".join(f"a {o.size} {o.name}" for o in others[:2])
    return [caption(scene, rng), middle + ".", object_caption(principal)]


def object_caption(obj: SceneObject) -> str:
    """One object in the words of the principal-object caption, "a small red ring."; also the region caption
    the teacher learns at the object's box (`bootstrap.region_captions`)."""
    return f"a {obj.size} {obj.name}."


def zero_shot_templates(principal_sizes: tuple[str, ...]) -> tuple[str, ...]:
    """Zero-shot prompts in the words of the principal-object caption, "a large {}.", one per size the world's
    principal object can take: as CLIP's "a photo of a {}." follows its training captions, words that no caption
    holds would only add untrained noise to the class embeddings."""
    return tuple(f"a {size} {{}}." for size in principal_sizes)


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _unique(scene: Scene, key) -> list[SceneObject]:
    """Objects whose `key` value no other object in the scene shares."""
    values = [key(o) for o in scene.objects]
    return [o for o in scene.objects if values.count(key(o)) == 1]


def make_question(scene: Scene, qtype: str, rng: np.random.Generator) -> dict | None:
    """One question of a type, or None if this scene cannot ask it unambiguously.

    Returns:
        {"question", "answer", "type", "target_size"}; `target_size` is the size class of the object the
        question is about ("none" when it is about no single object).
    """
    if qtype == "color":
        candidates = _unique(scene, lambda o: o.shape)
        if not candidates:
            return None
        obj = candidates[int(rng.integers(len(candidates)))]
        return _qa(f"What colour is the {obj.shape}? {ONE_WORD}", obj.color, qtype, obj.size, obj.shape, COLOR_NAMES)
    if qtype == "count":
        # Half the time the counted shape or colour is drawn from the scene, so that "0" does not dominate.
        drawn = scene.objects[int(rng.integers(len(scene.objects)))] if rng.random() < 0.5 else None
        if rng.random() < 0.5:
            shape = drawn.shape if drawn else str(rng.choice(SHAPES))
            answer = sum(o.shape == shape for o in scene.objects)
            question = f"How many {_plural(shape)} are there? {ONE_NUMBER}"
            return _qa(question, str(answer), qtype, "none", _plural(shape), COUNTS)
        color = drawn.color if drawn else str(rng.choice(COLOR_NAMES))
        answer = sum(o.color == color for o in scene.objects)
        question = f"How many {color} objects are there? {ONE_NUMBER}"
        return _qa(question, str(answer), qtype, "none", f"{color} objects", COUNTS)
    if qtype == "position":
        candidates = _unique(scene, lambda o: o.name)
        if not candidates:
            return None
        obj = candidates[int(rng.integers(len(candidates)))]
        if rng.random() < 0.5 and abs(obj.cx - 0.5) > 0.08:
            answer = "left" if obj.cx < 0.5 else "right"
            question = f"Is the {obj.name} on the left or on the right? {ONE_WORD}"
            return _qa(question, answer, qtype, obj.size, obj.name, ("left", "right"))
        if abs(obj.cy - 0.5) > 0.08:
            answer = "top" if obj.cy < 0.5 else "bottom"
            question = f"Is the {obj.name} at the top or at the bottom? {ONE_WORD}"
            return _qa(question, answer, qtype, obj.size, obj.name, ("top", "bottom"))
        return None
    if qtype == "existence":
        present = {o.name for o in scene.objects}
        if rng.random() < 0.5:
            obj = scene.objects[int(rng.integers(len(scene.objects)))]
            return _qa(
                f"Is there a {obj.name} in the image? {YES_NO}", "yes", qtype, obj.size, obj.name, YES_NO_CHOICES
            )
        absent = [name for name in class_names() if name not in present]
        name = absent[int(rng.integers(len(absent)))]
        return _qa(f"Is there a {name} in the image? {YES_NO}", "no", qtype, "none", name, YES_NO_CHOICES)
    if qtype == "largest":
        principal = scene.principal
        question = "Which object is the largest? Answer with its colour and shape."
        return _qa(question, principal.name, qtype, principal.size, "", tuple(class_names()))
    raise ValueError(f"unknown question type {qtype!r}; valid: {QUESTION_TYPES}")


def _qa(
    question: str, answer: str, qtype: str, target_size: str, subject: str = "", choices: tuple[str, ...] = ()
) -> dict:
    """A question with its ground truth: the answer, the type, the size class of the object asked about, the
    subject phrase (shape, object name, counted things) and the closed set of possible answers."""
    return {
        "question": question,
        "answer": answer,
        "type": qtype,
        "target_size": target_size,
        "subject": subject,
        "choices": list(choices),
    }


def conversation_record(record_id: str, image: str | None, qas: list[dict]) -> dict:
    """A haotian-liu/LLaVA record. `<image>` opens the first human turn of image records; answers stay short.

    The per-turn ground truth (`type`, `target_size`, `subject`, `choices`) rides along under "qa_meta", which
    LLaVA's loader ignores and our evaluations use for per-type accuracy and closed-set scoring.
    """
    conversations = []
    for i, qa in enumerate(qas):
        prompt = qa["question"]
        if i == 0 and image is not None:
            prompt = "<image>\n" + prompt
        conversations.append({"from": "human", "value": prompt})
        conversations.append({"from": "gpt", "value": qa["answer"]})
    record: dict = {"id": record_id}
    if image is not None:
        record["image"] = image
    record["conversations"] = conversations
    record["qa_meta"] = [{k: qa[k] for k in ("type", "target_size", "subject", "choices")} for qa in qas]
    return record


def scene_conversations(scene: Scene, record_id: str, image: str, rng: np.random.Generator, max_turns: int) -> dict:
    """A record about one scene: one question (a tenth of records) or 2..`max_turns` distinct ones of random types,
    the way LLaVA's instruction mix groups all of an image's VQA questions into one conversation."""
    turns = 1 if max_turns == 1 or rng.random() < 0.1 else int(rng.integers(2, max_turns + 1))
    qas: list[dict] = []
    asked: set[str] = set()
    for _ in range(4 * turns):  # a small scene may run out of distinct questions
        qa = make_question(scene, str(rng.choice(QUESTION_TYPES)), rng)
        if qa is not None and qa["question"] not in asked:
            asked.add(qa["question"])
            qas.append(qa)
            if len(qas) == turns:
                break
    return conversation_record(record_id, image, qas)


def text_only_record(record_id: str, rng: np.random.Generator) -> dict:
    question, answer = TEXT_ONLY_QA[int(rng.integers(len(TEXT_ONLY_QA)))]
    return conversation_record(record_id, None, [_qa(question, answer, "text", "none")])


# Stage-1 (projector pre-training) instructions, in the style of LLaVA's caption data; the `plain` template drops
# them and trains on the caption alone.
CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short description of the picture.",
    "What does the image show?",
    "Summarize the scene in one sentence.",
)


def caption_record(record_id: str, image: str, caption_text: str, index: int) -> dict:
    """A single-turn LLaVA caption record for stage 1 (the instruction is picked by `index`, deterministically)."""
    instruction = CAPTION_INSTRUCTIONS[index % len(CAPTION_INSTRUCTIONS)]
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{instruction}"},
            {"from": "gpt", "value": caption_text},
        ],
    }

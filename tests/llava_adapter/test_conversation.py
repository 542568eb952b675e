import copy
import pickle

import pytest
import torch

from llava_adapter.conversation import (
    IGNORE_INDEX,
    TEMPLATES,
    VICUNA_SYSTEM,
    RecordError,
    encode_conversation,
    resolve_image_token_id,
    validate_record,
)

N = 8
IMAGE_ID = 4


def two_turn_record() -> dict:
    return {
        "id": "rec-7",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the circle?"},
            {"from": "gpt", "value": "The circle is red."},
            {"from": "human", "value": "How many stars?"},
            {"from": "gpt", "value": "3"},
        ],
    }


def expected(tokenizer, parts: list[tuple[list[int] | str, bool]]) -> tuple[list[int], list[int]]:
    """Concatenate (ids or text, supervised) parts into (input_ids, labels)."""
    ids, labels = [], []
    for part, supervised in parts:
        part_ids = tokenizer.encode(part, add_special_tokens=False) if isinstance(part, str) else part
        ids += part_ids
        labels += part_ids if supervised else [IGNORE_INDEX] * len(part_ids)
    return ids, labels


def check(encoded, ids, labels):
    assert encoded.input_ids.dtype == torch.long and encoded.labels.dtype == torch.long
    assert encoded.input_ids.tolist() == ids
    assert encoded.labels.tolist() == labels


def test_vicuna_v1_exact(tokenizer):
    bos, eos, img = tokenizer.bos_token_id, tokenizer.eos_token_id, [IMAGE_ID] * N
    ids, labels = expected(
        tokenizer,
        [
            ([bos], False),
            (VICUNA_SYSTEM + " USER: ", False),
            (img, False),
            ("\nWhat colour is the circle? ASSISTANT:", False),
            (" The circle is red.", True),
            ([eos], True),
            ("USER: How many stars? ASSISTANT:", False),
            (" 3", True),
            ([eos], True),
        ],
    )
    encoded = encode_conversation(two_turn_record(), tokenizer, "vicuna_v1", N)
    check(encoded, ids, labels)
    assert tokenizer.decode(encoded.input_ids) == (
        f"<s>{VICUNA_SYSTEM} USER: {'<image>' * N}\nWhat colour is the circle? ASSISTANT: The circle is red.</s>"
        "USER: How many stars? ASSISTANT: 3</s>"
    )
    assert encoded.num_supervised == len(tokenizer.encode(" The circle is red.")) + len(tokenizer.encode(" 3")) + 2


def test_chat_template_exact(tokenizer):
    eos, img = tokenizer.eos_token_id, [IMAGE_ID] * N
    ids, labels = expected(
        tokenizer,
        [
            ("<s><|user|>\n", False),
            (img, False),
            ("\nWhat colour is the circle?\n<|assistant|>\n", False),
            ("The circle is red.", True),
            ([eos], True),
            ("<|user|>\nHow many stars?\n<|assistant|>\n", False),
            ("3", True),
            ([eos], True),
        ],
    )
    assert ids[0] == tokenizer.bos_token_id
    check(encode_conversation(two_turn_record(), tokenizer, "chat_template", N), ids, labels)


def test_plain_exact(tokenizer, image_record):
    record = image_record("cap-1", question="Describe the image briefly.", answer="A red circle on the left.")
    ids, labels = expected(
        tokenizer, [([tokenizer.bos_token_id] + [IMAGE_ID] * N, False), ("A red circle on the left.\n", True)]
    )
    check(encode_conversation(record, tokenizer, "plain", N), ids, labels)
    with pytest.raises(RecordError, match="'rec-7'.*one human/gpt pair"):
        encode_conversation(two_turn_record(), tokenizer, "plain", N)


@pytest.mark.parametrize("template", TEMPLATES)
def test_only_answers_are_supervised(tokenizer, template):
    record = two_turn_record()
    if template == "plain":
        record["conversations"] = record["conversations"][:2]
    encoded = encode_conversation(record, tokenizer, template, N)
    supervised = encoded.input_ids[encoded.labels != IGNORE_INDEX]
    assert (encoded.labels[encoded.labels != IGNORE_INDEX] == supervised).all()
    text = tokenizer.decode(supervised)
    answers = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
    if template == "plain":
        assert text == answers[0] + "\n"
    else:
        # Answers (vicuna_v1 keeps the space after "ASSISTANT:" with the answer) and one eos per answer.
        assert text.replace(" ", "") == "".join(a + "</s>" for a in answers).replace(" ", "")
    assert (encoded.labels[encoded.input_ids == IMAGE_ID] == IGNORE_INDEX).all()


@pytest.mark.parametrize("template", TEMPLATES)
def test_system_turn(tokenizer, template):
    record = two_turn_record()
    record["conversations"] = [{"from": "system", "value": "Answer in one word."}] + record["conversations"][:2]
    text = tokenizer.decode(encode_conversation(record, tokenizer, template, 2).input_ids)
    if template == "plain":
        assert "one word" not in text
    elif template == "vicuna_v1":
        assert text.startswith("<s>Answer in one word. USER: ") and VICUNA_SYSTEM not in text
    else:
        assert text.startswith("<s><|system|>\nAnswer in one word.\n<|user|>")


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("num_image_tokens", [16, 49, 196])
@pytest.mark.parametrize("at_end", [False, True])
def test_placeholder_expansion(tokenizer, image_record, template, num_image_tokens, at_end):
    record = image_record("img-1", at_end=at_end)
    encoded = encode_conversation(record, tokenizer, template, num_image_tokens)
    positions = (encoded.input_ids == IMAGE_ID).nonzero().flatten()
    assert len(positions) == num_image_tokens
    assert (positions.diff() == 1).all()  # one contiguous block
    assert (encoded.labels[positions] == IGNORE_INDEX).all()
    question_ids = tokenizer.encode("What colour is the circle?")
    if template != "plain":
        ids = encoded.input_ids.tolist()
        question_at = next(i for i in range(len(ids)) if ids[i : i + len(question_ids)] == question_ids)
        assert (question_at > positions[-1]) != at_end


@pytest.mark.parametrize("template", TEMPLATES)
def test_text_only_has_no_placeholders(tokenizer, text_record, template):
    encoded = encode_conversation(text_record("t-1"), tokenizer, template, 49)
    assert not (encoded.input_ids == IMAGE_ID).any()
    assert encoded.num_supervised > 0


def test_image_token_id_override(tokenizer, image_record):
    encoded = encode_conversation(image_record("x"), tokenizer, "vicuna_v1", 5, image_token_id=3)
    assert int((encoded.input_ids == 3).sum()) == 5 and not (encoded.input_ids == IMAGE_ID).any()
    assert resolve_image_token_id(tokenizer) == IMAGE_ID


@pytest.mark.parametrize("template", TEMPLATES)
def test_truncation_keeps_placeholders(tokenizer, template):
    record = two_turn_record()
    if template == "plain":
        record["conversations"] = record["conversations"][:2]
    full = encode_conversation(record, tokenizer, template, N)
    first_answer = int((full.labels != IGNORE_INDEX).nonzero()[0])
    max_length = first_answer + 2
    cut = encode_conversation(record, tokenizer, template, N, max_length=max_length)
    assert cut.truncated and not full.truncated
    assert len(cut.input_ids) == max_length
    assert cut.input_ids.tolist() == full.input_ids[:max_length].tolist()
    assert cut.labels.tolist() == full.labels[:max_length].tolist()
    assert int((cut.input_ids == IMAGE_ID).sum()) == N
    assert cut.num_supervised == 2
    same = encode_conversation(record, tokenizer, template, N, max_length=len(full.input_ids))
    assert not same.truncated and same.input_ids.tolist() == full.input_ids.tolist()


@pytest.mark.parametrize("template", TEMPLATES)
def test_truncation_through_image_block_raises(tokenizer, template):
    record = two_turn_record()
    if template == "plain":
        record["conversations"] = record["conversations"][:2]
    full = encode_conversation(record, tokenizer, template, N)
    last_image = int((full.input_ids == IMAGE_ID).nonzero()[-1])
    prefix = last_image + 1 - N
    encode_conversation(record, tokenizer, template, N, max_length=last_image + 1)  # the block just fits
    message = rf"'rec-7'.*max_length={last_image}.*{prefix} tokens before them \+ N={N} placeholders = {prefix + N}"
    with pytest.raises(RecordError, match=message):
        encode_conversation(record, tokenizer, template, N, max_length=last_image)


def test_truncation_can_leave_nothing_supervised(tokenizer):
    full = encode_conversation(two_turn_record(), tokenizer, "vicuna_v1", N)
    first_answer = int((full.labels != IGNORE_INDEX).nonzero()[0])
    cut = encode_conversation(two_turn_record(), tokenizer, "vicuna_v1", N, max_length=first_answer)
    assert cut.truncated and cut.num_supervised == 0  # reported, not raised: the dataset decides


@pytest.mark.parametrize("template", ["vicuna_v1", "chat_template"])
def test_generation_prompt_matches_training(tokenizer, template):
    """The inference prompt is exactly the training sequence up to the last answer."""
    record = two_turn_record()
    full = encode_conversation(record, tokenizer, template, N)
    prompt_record = dict(record, conversations=record["conversations"][:3])
    prompt = encode_conversation(prompt_record, tokenizer, template, N, add_generation_prompt=True)
    assert (prompt.labels == IGNORE_INDEX).all()
    assert full.input_ids[: len(prompt.input_ids)].tolist() == prompt.input_ids.tolist()
    assert full.labels[len(prompt.input_ids) - 1] == IGNORE_INDEX
    assert full.labels[len(prompt.input_ids)] != IGNORE_INDEX
    with pytest.raises(RecordError, match="end with human"):
        encode_conversation(record, tokenizer, template, N, add_generation_prompt=True)


def test_chat_template_must_be_prefix_consistent(tokenizer):
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    with pytest.raises(RecordError, match="'rec-7'.*not prefix-consistent"):
        encode_conversation(two_turn_record(), odd, "chat_template", N)


def test_chat_template_must_not_render_an_answer_inside_the_previous_one(tokenizer):
    """A template that closes the final answer with a mark the next answer reuses as its opener: supervising both
    spans would train the shared mark twice and cut the segments out of order, so the record is refused."""
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}|{{ m['content'] }}{% endif %}{% endfor %}"
        "{% if messages[-1]['role'] == 'assistant' and not add_generation_prompt %}|{% endif %}"
    )
    with pytest.raises(RecordError, match="'rec-7'.*renders message 3 before the end of the previous answer"):
        encode_conversation(two_turn_record(), odd, "chat_template", N)


def bad(conversations, **extra):
    return {"id": "bad-1", **extra, "conversations": conversations}


H, G, S = "human", "gpt", "system"


def turn(role, value="hi"):
    return {"from": role, "value": value}


@pytest.mark.parametrize(
    "record, message",
    [
        (bad([]), "non-empty list"),
        (bad("hello"), "non-empty list"),
        ({"conversations": [turn(H), turn(G)]}, r"record #3: missing key\(s\) \['id'\]"),
        (bad([turn(H), turn("assistant")]), "unknown role 'assistant'; valid roles"),
        (bad([{"from": H}]), "'from' and 'value'"),
        (bad([turn(H), turn(G, 3)]), "non-string value"),
        (bad([turn(H), turn(H), turn(G)]), "alternate"),
        (bad([turn(G), turn(H)]), "alternate"),
        (bad([turn(H), turn(G), turn(H)]), "end with gpt"),
        (bad([turn(H), turn(S), turn(G)]), "alternate"),
        (bad([turn(S)]), "alternate"),
        (bad([turn(H, "no placeholder"), turn(G)], image="a.png"), "exactly one <image>.*found 0"),
        (bad([turn(H, "<image><image>"), turn(G)], image="a.png"), "found 2"),
        (bad([turn(H, "q"), turn(G, "<image>")], image="a.png"), r"found 1 in total \(0 in the first"),
        (bad([turn(H, "<image>\nq"), turn(G)]), "text-only record .* contains 1 <image>"),
        (bad([turn(H, "<image>"), turn(G)], image=["a.png"]), "'image' must be a non-empty file name"),
    ],
)
def test_invalid_records(record, message):
    with pytest.raises(RecordError, match=message) as info:
        validate_record(record, index=3)
    assert str(info.value).startswith("record 'bad-1'") or "id" not in record


def test_errors_name_the_record(tokenizer):
    with pytest.raises(RecordError, match=r"^record 'bad-1': roles must alternate"):
        encode_conversation(bad([turn(H), turn(H)]), tokenizer, "vicuna_v1", N)
    with pytest.raises(ValueError, match=r"Unknown template 'llama_2'; valid templates: \['plain', 'vicuna_v1'"):
        encode_conversation(two_turn_record(), tokenizer, "llama_2", N)
    with pytest.raises(ValueError, match="num_image_tokens must be positive"):
        encode_conversation(two_turn_record(), tokenizer, "plain", 0)


def test_record_error_pickles():
    err = pickle.loads(pickle.dumps(RecordError("record 'x'", "broken")))
    assert str(err) == "record 'x': broken" and err.record == "record 'x'" and err.detail == "broken"


# ChatML's layout: every turn closes with its end token and then a newline, which is trailing whitespace after an
# answer (the tiny tokenizer's eos stands in for <|im_end|>).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chatml_template_supervises_the_answer_and_its_end_token_but_not_the_newline_after(tokenizer):
    chatml = copy.deepcopy(tokenizer)
    chatml.chat_template = CHATML
    eos, img = tokenizer.eos_token_id, [IMAGE_ID] * N
    ids, labels = expected(
        tokenizer,
        [
            ("<|im_start|>user\n", False),
            (img, False),
            ("\nWhat colour is the circle?", False),
            ([eos], False),  # the user's end token is not the model's to predict
            ("\n<|im_start|>assistant\n", False),
            ("The circle is red.", True),
            ([eos], True),
            ("\n<|im_start|>user\nHow many stars?", False),
            ([eos], False),
            ("\n<|im_start|>assistant\n", False),
            ("3", True),
            ([eos], True),
            ("\n", False),
        ],
    )
    encoded = encode_conversation(two_turn_record(), chatml, "chat_template", N)
    check(encoded, ids, labels)
    supervised = encoded.input_ids[encoded.labels != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "The circle is red.</s>3</s>"

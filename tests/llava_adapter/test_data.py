import json
import re

import pytest
import torch

from llava_adapter.conversation import IGNORE_INDEX, RecordError, encode_conversation
from llava_adapter.data import DataCollatorForLlava, LlavaJsonDataset, ModalityLengthGroupedSampler

N = 16
IMAGE_ID = 4


@pytest.fixture
def make_dataset(write_data, tokenizer, image_processor, image_folder):
    def make(records, template="vicuna_v1", num_image_tokens=N, max_length=512, **kwargs):
        path = write_data(records)
        return LlavaJsonDataset(
            path, image_folder, tokenizer, image_processor, template, num_image_tokens, max_length, **kwargs
        )

    return make


@pytest.fixture
def mixed(image_record, text_record):
    return [
        image_record("i0", "a.png"),
        text_record("t0"),
        image_record("i1", "b.png", at_end=True, answer="The star is yellow and on the right."),
        image_record("i2", "c.png"),
        text_record("t1", answer="There are 12 stars, 7 circles and 3 squares."),
    ]


def test_items(make_dataset, mixed, tokenizer):
    dataset = make_dataset(mixed)
    assert len(dataset) == 5 and dataset.num_skipped == 0
    item = dataset[0]
    assert item["id"] == "i0"
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    expected = encode_conversation(mixed[0], tokenizer, "vicuna_v1", N, max_length=512)
    assert item["input_ids"].tolist() == expected.input_ids.tolist()
    assert item["labels"].tolist() == expected.labels.tolist()
    assert int((item["input_ids"] == IMAGE_ID).sum()) == N
    text = dataset[1]
    assert text["id"] == "t0" and "pixel_values" not in text
    assert not (text["input_ids"] == IMAGE_ID).any()
    assert dataset[2]["pixel_values"].shape == dataset[3]["pixel_values"].shape == (3, 32, 32)  # grayscale, RGBA


def test_image_folder_defaults_to_json_folder(tmp_path, tokenizer, image_processor, image_folder, image_record):
    path = image_folder / "data.json"
    path.write_text(json.dumps([image_record("i0")]))
    try:
        dataset = LlavaJsonDataset(path, None, tokenizer, image_processor, "plain", N, 128)
        assert dataset[0]["pixel_values"].shape == (3, 32, 32)
    finally:
        path.unlink()


def test_malformed_json_names_file_and_position(make_dataset, write_data):
    with pytest.raises(ValueError, match=r"Malformed JSON in .*data\.json.*line 1 column"):
        make_dataset('[{"id": "x", "conversations": [}]')


def test_top_level_must_be_a_list(make_dataset, image_record):
    with pytest.raises(ValueError, match=r"data\.json: expected a JSON list of LLaVA records, got a JSON dict"):
        make_dataset({"data": [image_record("i0")]})


def test_missing_image_names_record_and_path(make_dataset, image_record, image_folder):
    path = re.escape(str(image_folder / "nope.png"))
    with pytest.raises(RecordError, match=rf"record 'i9' of .*data\.json: Image file not found: {path}"):
        make_dataset([image_record("i0"), image_record("i9", "nope.png")])


def test_bad_records_name_the_id(make_dataset, image_record, text_record):
    two = image_record("two", question="<image> and again")
    with pytest.raises(RecordError, match=r"record 'two' .*exactly one <image>.*found 2"):
        make_dataset([image_record("i0"), two])
    swapped = text_record("swap")
    swapped["conversations"].reverse()
    with pytest.raises(RecordError, match=r"record 'swap' .*roles must alternate"):
        make_dataset([swapped])
    with pytest.raises(ValueError, match=r"Unknown template 'v1'; valid templates"):
        make_dataset([text_record("t")], template="v1")


def test_skip_bad_records(make_dataset, image_record, text_record):
    swapped = text_record("swap")
    swapped["conversations"].reverse()
    records = [
        image_record("i0"),
        image_record("missing", "nope.png"),
        image_record("two", question="<image> and again"),
        text_record("t0"),
        swapped,
        {"conversations": []},
        image_record("i1", "b.png"),
    ]
    with pytest.warns(UserWarning, match=r"skipped 4 of 7 bad records; first: record 'missing'.*record 'two'"):
        dataset = make_dataset(records, skip_bad_records=True)
    assert dataset.num_skipped == 4 and len(dataset) == 3
    assert [dataset[i]["id"] for i in range(3)] == ["i0", "t0", "i1"]
    assert "record #5" in dataset.skipped[-1]


def test_no_image_processor(write_data, tokenizer, image_folder, image_record, text_record):
    with pytest.raises(ValueError, match="image records but no image_processor"):
        LlavaJsonDataset(write_data([image_record("i0")]), image_folder, tokenizer, None, "plain", N, 64)
    dataset = LlavaJsonDataset(write_data([text_record("t0")]), image_folder, tokenizer, None, "plain", N, 64)
    assert "pixel_values" not in dataset[0]


def test_corrupt_image_names_record(make_dataset, image_record):
    dataset = make_dataset([image_record("broken", "corrupt.png"), image_record("i0")])
    with pytest.raises(RecordError, match=r"record 'broken': Cannot read image .*corrupt\.png"):
        dataset[0]
    tolerant = make_dataset([image_record("broken", "corrupt.png"), image_record("i0")], skip_bad_records=True)
    with pytest.warns(UserWarning, match="skipping record 'broken'"):
        assert tolerant[0]["id"] == "i0"
    assert tolerant.num_skipped_late == 1


def test_truncation_policy(make_dataset, tokenizer, image_record, text_record):
    long_answer = " ".join(["the red circle is on the left"] * 20)
    records = [image_record("long", answer=long_answer), text_record("t0")]
    full = encode_conversation(records[0], tokenizer, "vicuna_v1", N)
    first_answer = int((full.labels != IGNORE_INDEX).nonzero()[0])

    item = make_dataset(records, max_length=first_answer + 5)[0]  # cut from the end, placeholders kept
    assert len(item["input_ids"]) == first_answer + 5
    assert int((item["input_ids"] == IMAGE_ID).sum()) == N
    assert int((item["labels"] != IGNORE_INDEX).sum()) == 5

    dataset = make_dataset(records, max_length=first_answer)  # no answer token left
    with pytest.raises(RecordError, match=rf"record 'long': no answer token is left within max_length={first_answer}"):
        dataset[0]
    with pytest.raises(RecordError, match=rf"record 'long': the image placeholders do not fit in max_length={N}"):
        make_dataset(records, max_length=N)[0]
    tolerant = make_dataset(records, max_length=first_answer, skip_bad_records=True)
    with pytest.warns(UserWarning, match="skipping record 'long'"):
        assert tolerant[0]["id"] == "t0"


def test_modality_lengths_use_n(make_dataset, mixed):
    small, large = make_dataset(mixed, num_image_tokens=16), make_dataset(mixed, num_image_tokens=196)
    signs = [1, -1, 1, 1, -1]
    assert [(length > 0) - (length < 0) for length in small.modality_lengths] == signs
    for a, b, sign in zip(small.modality_lengths, large.modality_lengths, signs, strict=True):
        assert b - a == (196 - 16 if sign > 0 else 0)
    assert small.lengths == [abs(length) for length in small.modality_lengths]
    # words of all turns (+ N): "<image>\nWhat colour is the circle?" + "The circle is red." = 5 + 4 words
    assert small.modality_lengths[0] == 9 + 16


def test_collator(make_dataset, mixed, tokenizer):
    dataset = make_dataset(mixed)
    items = [dataset[i] for i in range(len(dataset))]
    batch = DataCollatorForLlava(tokenizer)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (5, max(lengths))
    for row, (item, length) in enumerate(zip(items, lengths, strict=True)):
        assert batch["input_ids"][row, :length].tolist() == item["input_ids"].tolist()
        assert batch["labels"][row, :length].tolist() == item["labels"].tolist()
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
    # images of the image records only, in batch order
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    for image, index in zip(batch["pixel_values"], [0, 2, 3], strict=True):
        assert torch.equal(image, items[index]["pixel_values"])
    assert int((batch["input_ids"] == IMAGE_ID).sum()) == 3 * N

    text_only = DataCollatorForLlava(tokenizer, pad_to_multiple_of=8)([items[1], items[4]])
    assert "pixel_values" not in text_only
    assert text_only["input_ids"].shape[1] % 8 == 0


def test_collator_checks_placeholders(tokenizer, make_dataset, mixed):
    dataset = make_dataset(mixed)
    collate = DataCollatorForLlava(tokenizer)
    image_item, text_item = dataset[0], dataset[1]
    with pytest.raises(ValueError, match="item 'i0' has 16 image placeholders but no pixel_values"):
        collate([{k: v for k, v in image_item.items() if k != "pixel_values"}])
    with pytest.raises(ValueError, match="item 't0' has pixel_values but no image placeholder"):
        collate([dict(text_item, pixel_values=image_item["pixel_values"])])
    other = make_dataset(mixed, num_image_tokens=4)[0]
    with pytest.raises(ValueError, match=r"different placeholder counts: \[4, 16\]"):
        collate([image_item, other])


def test_batch_runs_through_llava(make_dataset, mixed, tokenizer):
    """A collated mixed batch is what `LlavaForConditionalGeneration` takes: placeholders = images × N."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).eval()
    dataset = make_dataset(mixed, num_image_tokens=(32 // 8) ** 2)  # 16 patch features ("default" drops CLS)
    items = [dataset[i] for i in range(len(dataset))]
    batch = DataCollatorForLlava(tokenizer)(items)
    assert int((batch["input_ids"] == IMAGE_ID).sum()) == 3 * 16  # 3 image records
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)
    # By hand: each position predicts the next token; only the items' own supervised labels count, padding never.
    log_probs = out.logits.float().log_softmax(-1)
    terms = []
    for row, item in enumerate(items):
        for t in range(1, len(item["labels"])):
            if int(item["labels"][t]) != IGNORE_INDEX:
                terms.append(-log_probs[row, t - 1, int(item["labels"][t])])
    assert len(terms) == int((batch["labels"] != IGNORE_INDEX).sum()) > 0
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)


def test_sampler_groups_by_modality_and_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(1, 100, (103,), generator=generator)]
    modality = [length if i % 3 else -length for i, length in enumerate(lengths)]  # 35 text, 68 image
    sampler = ModalityLengthGroupedSampler(modality, batch_size=4, world_size=2, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(103)) and len(sampler) == 103
    assert order == list(ModalityLengthGroupedSampler(modality, batch_size=4, world_size=2, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(103))
    steps = [order[s : s + 8] for s in range(0, len(order), 8)]
    full = steps[: 68 // 8 + 35 // 8]
    assert all(len({modality[i] > 0 for i in step}) == 1 for step in full)  # one modality per step
    assert max(abs(modality[i]) for i in steps[0]) == max(lengths)  # longest first
    # length grouping: per-batch spread is much smaller than at random
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for s in full for b in (s[:4], s[4:]))
    assert spread / (2 * len(full)) < 40


def test_sampler_ranks():
    modality = [(i % 7) + 1 if i % 2 else -((i % 5) + 1) for i in range(30)]
    world = ModalityLengthGroupedSampler(modality, batch_size=2, world_size=3, seed=5)
    order = list(world)
    shards = [list(ModalityLengthGroupedSampler(modality, 2, world_size=3, rank=r, seed=5)) for r in range(3)]
    assert all(len(shard) == len(ModalityLengthGroupedSampler(modality, 2, 3, rank=0)) == 10 for shard in shards)
    # rank r gets the r-th batch of every step of the global order (the round robin accelerate uses)
    for r, shard in enumerate(shards):
        assert shard == [i for s in range(0, 30, 6) for i in order[s + 2 * r : s + 2 * r + 2]]
    assert sorted(i for shard in shards for i in shard) == list(range(30))
    padded = [list(ModalityLengthGroupedSampler(modality[:25], 2, world_size=3, rank=r)) for r in range(3)]
    assert [len(shard) for shard in padded] == [10, 10, 10]
    assert set(i for shard in padded for i in shard) == set(range(25))
    with pytest.raises(ValueError, match="rank must be in"):
        ModalityLengthGroupedSampler(modality, 2, world_size=3, rank=3)


def test_sampler_without_modality_grouping():
    modality = [1, -2, 3, -4, 5, -6, 7, -8]
    order = list(ModalityLengthGroupedSampler(modality, batch_size=2, group_by_modality=False))
    assert sorted(order) == list(range(8))
    with pytest.raises(ValueError, match="non-zero"):
        ModalityLengthGroupedSampler([1, 0], batch_size=2)

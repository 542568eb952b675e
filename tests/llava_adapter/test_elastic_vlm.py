"""One LLaVA model, every token budget of its elastic tower: processor and model per call, save → fresh process,
ChatEngine, the demo's budget control, and training at every budget (or some drawn) per batch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from PIL import Image
from tiny_vlm import common_args, save_tiny_vlm, tiny_vlm

from llava_adapter import train, vlm_budget
from llava_adapter.budgets import batch_budgets, expand_placeholders
from llava_adapter.chat import ChatEngine
from llava_adapter.conversation import IGNORE_INDEX
from llava_adapter.data import DataCollatorForLlava
from mllm_sparse.modeling import SparseFormerModel

BUDGETS = [4, 9, 15]
QUESTION = "<image>\nWhat colour is the circle?"


def red_image() -> Image.Image:
    image = Image.new("RGB", (80, 40), (40, 40, 40))
    image.paste((220, 30, 30), (10, 5, 40, 35))
    return image


@pytest.fixture(scope="module")
def elastic(tokenizer):
    """(model, processor): the test SparseFormer made elastic over 4, 9 and 15 latent tokens (default 15)."""
    return tiny_vlm(tokenizer, budgets=BUDGETS)


def generate_at_each_budget(model, processor) -> dict[int, list[int]]:
    out = {}
    for n in BUDGETS:
        with vlm_budget(model, n):
            batch = processor(images=[red_image()], text=[QUESTION], num_latent_tokens=n, return_tensors="pt")
            assert int((batch["input_ids"] == model.config.image_token_id).sum()) == n
            with torch.no_grad():
                features = model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
            assert [tuple(f.shape) for f in features.pooler_output] == [(n, model.config.text_config.hidden_size)]
            out[n] = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0].tolist()
    return out


def test_one_model_serves_every_budget_and_a_fresh_process_reloads_them_all(elastic, tmp_path):
    model, processor = elastic
    assert processor.budgets == BUDGETS and processor.image_tokens_per_budget == {4: 4, 9: 9, 15: 15}
    generated = generate_at_each_budget(model, processor)
    # outside the block: the default budget, restored on the tower and in the config
    assert model.model.vision_tower.config.num_latent_tokens == model.config.image_seq_length == 15
    batch = processor(images=[red_image()], text=[QUESTION], return_tensors="pt")
    assert model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0].tolist() == generated[15]
    with torch.no_grad():
        small, large = (
            model.get_image_features(pixel_values=batch["pixel_values"], num_latent_tokens=n).pooler_output[0]
            for n in (4, 15)
        )
    assert small.shape[0] == 4 and large.shape[0] == 15  # the tower reads the budget; different tokens, not a crop

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    red_image().save(tmp_path / "red.png")
    code = f"""
import json, llava_adapter, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}).eval()
processor = AutoProcessor.from_pretrained({str(tmp_path)!r})
generated = {{}}
for n in {BUDGETS!r}:
    with llava_adapter.vlm_budget(model, n):
        batch = processor(images=[Image.open({str(tmp_path / "red.png")!r})], text=[{QUESTION!r}],
                          num_latent_tokens=n, return_tensors="pt")
        generated[n] = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0].tolist()
print(json.dumps([processor.budgets, llava_adapter.served_budgets(model), generated]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    budgets, served, reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert budgets == served == BUDGETS
    assert {int(k): v for k, v in reloaded.items()} == generated


def test_an_unserved_budget_is_refused_with_the_served_list(elastic, tokenizer):
    model, processor = elastic
    served = r"serves \[4, 9, 15\]"
    with pytest.raises(ValueError, match=f"num_latent_tokens=5: .*{served}"):
        processor(images=[red_image()], text=[QUESTION], num_latent_tokens=5)
    with pytest.raises(ValueError, match=f"num_latent_tokens=5: .*{served}"):
        with vlm_budget(model, 5):
            pass
    with pytest.raises(ValueError, match=served):
        ChatEngine(model, processor, template="vicuna_v1", num_latent_tokens=16)
    with pytest.raises(RuntimeError), vlm_budget(model, 4):
        raise RuntimeError  # the block fails: the budget is restored all the same
    assert model.model.vision_tower.config.num_latent_tokens == model.config.image_seq_length == 15

    fixed, fixed_processor = tiny_vlm(tokenizer)
    with vlm_budget(fixed, 15):  # a fixed tower's own count: nothing changes
        assert fixed.config.image_seq_length == 15
    with pytest.raises(ValueError, match=r"num_latent_tokens=9: this sparseformer tower serves only \[15\]"):
        with vlm_budget(fixed, 9):
            pass
    with pytest.raises(ValueError, match=r"serves only 15"):
        fixed_processor(images=[red_image()], text=[QUESTION], num_latent_tokens=9)


def test_the_chat_engine_at_each_budget_answers_as_stock_generate_does(elastic):
    model, processor = elastic
    engine = ChatEngine(model, processor, template="vicuna_v1")
    assert engine.budgets == BUDGETS and engine.num_latent_tokens == 15
    record = {"id": "q", "image": "x", "conversations": [{"from": "human", "value": QUESTION}]}
    scored = {"id": "s", "image": "x", "conversations": [*record["conversations"], {"from": "gpt", "value": "red"}]}
    answers, scores = {}, {}
    for n in BUDGETS:
        engine.num_latent_tokens = n
        answers[n] = engine.generate_batch([record], [red_image()], max_new_tokens=4, min_new_tokens=4)[0]
        assert engine.last_timings.num_image_tokens == n
        ids = torch.tensor([engine.prompt_ids(record)])
        assert int((ids == model.config.image_token_id).sum()) == n
        pixels = processor.image_processor(images=[red_image()], return_tensors="pt")["pixel_values"]
        with vlm_budget(model, n):
            stock = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, min_new_tokens=4)
        assert answers[n] == engine._decode(engine._trim(stock[0, ids.shape[1] :].tolist()))
        scores[n] = engine.score_answers([scored], [red_image()])[0][0]
    assert len(set(scores.values())) == len(BUDGETS)  # each budget's own image tokens reach the LLM


def test_the_demo_re_encodes_the_image_at_the_budget_chosen(elastic, tmp_path):
    from mllm_sparse_recipes.demo import DemoSessions

    model, processor = elastic
    engine = ChatEngine(model, processor, template="vicuna_v1")
    red_image().save(tmp_path / "red.png")
    sessions = DemoSessions(engine, max_new_tokens=3, min_new_tokens=3)
    conversation, picture4 = sessions.open_image(tmp_path / "red.png", num_latent_tokens=4)
    picture9, line = sessions.set_budget(conversation, 9)
    assert line == "9 image tokens" and conversation.num_latent_tokens == 9
    assert picture9.tobytes() != picture4.tobytes()  # nine boxes, not four
    other, _ = sessions.open_image(tmp_path / "red.png")  # another session at the default budget meanwhile
    final = list(sessions.ask(conversation, "What colour is the circle?"))[-1]
    assert final["timings"].startswith("9 image tokens") and engine.last_timings.num_image_tokens == 9
    list(sessions.ask(other, "What colour is the circle?"))
    assert engine.last_timings.num_image_tokens == 15
    with pytest.raises(ValueError, match=r"serves \[4, 9, 15\]"):
        sessions.set_budget(conversation, 8)


def test_a_batch_budget_depends_on_the_batch_alone_and_covers_every_budget():
    ids = [f"rec-{i}" for i in range(6)]
    assert batch_budgets(BUDGETS, 0, ids) == batch_budgets(list(reversed(BUDGETS)), 0, list(ids))
    drawn = Counter(n for i in range(600) for n in batch_budgets(BUDGETS, 0, [f"rec-{i}", f"rec-{i + 1}"]))
    assert set(drawn) == set(BUDGETS) and min(drawn.values()) > 150  # about uniform: 200 each
    per_seed = [[batch_budgets(BUDGETS, seed, [f"rec-{i}"]) for i in range(40)] for seed in (0, 1)]
    assert per_seed[0] != per_seed[1]


def test_several_budgets_per_batch_always_hold_the_smallest_and_draw_the_others():
    budgets = [4, 9, 16, 36]
    pairs = [batch_budgets(budgets, 0, [f"rec-{i}"], per_step=2) for i in range(400)]
    assert all(p[0] == 4 and len(p) == 2 and p[1] in (9, 16, 36) for p in pairs)
    others = Counter(p[1] for p in pairs)
    assert min(others.values()) > 100, others  # about uniform among the others: 133 each
    triples = [batch_budgets(budgets, 0, [f"rec-{i}"], per_step=3) for i in range(50)]
    assert all(t[0] == 4 and len(set(t)) == 3 and t == [4, *sorted(t[1:])] for t in triples)
    assert batch_budgets(budgets, 5, ["a"], per_step=4) == budgets  # every budget: M3's recipe
    assert batch_budgets(budgets, 5, ["a"], per_step=2) == batch_budgets(budgets, 5, ["a"], per_step=2)
    for bad in (0, 5):
        with pytest.raises(ValueError, match=rf"{bad} budgets per step: choose 1 to 4"):
            batch_budgets(budgets, 0, ["a"], per_step=bad)


def test_expand_placeholders_cuts_or_grows_each_image_and_keeps_the_labels():
    image = 7
    ids = torch.tensor([1, image, image, image, image, image, image, 2, 3])  # two adjacent images of 3
    labels = torch.tensor([IGNORE_INDEX] * 7 + [2, 3])
    cut_ids, cut_labels = expand_placeholders(ids, labels, image, 3, 2)
    assert cut_ids.tolist() == [1, image, image, image, image, 2, 3]
    assert cut_labels.tolist() == [IGNORE_INDEX] * 5 + [2, 3]
    grown, _ = expand_placeholders(ids, labels, image, 3, 4)
    assert grown.tolist() == [1] + [image] * 8 + [2, 3]
    with pytest.raises(ValueError, match="not a whole number of images of 4"):
        expand_placeholders(ids, labels, image, 4, 2)


def dataset_item(tokenizer, record, pixels: torch.Tensor | None) -> dict:
    """A training item as `LlavaJsonDataset` gives it: placeholders for the largest budget (15)."""
    from llava_adapter.conversation import encode_conversation

    image_id = tokenizer.convert_tokens_to_ids("<image>")
    encoded = encode_conversation(record, tokenizer, "vicuna_v1", 15, image_token_id=image_id)
    with_pixels = {} if pixels is None else {"pixel_values": pixels}
    return {"id": record["id"], "input_ids": encoded.input_ids, "labels": encoded.labels, **with_pixels}


def test_the_collator_runs_each_batch_at_its_drawn_budget(tokenizer, image_record, text_record):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    table = {4: 4, 9: 9, 15: 15}
    collator = DataCollatorForLlava(tokenizer, image_token_id=image_id, budgets=table, seed=3, budgets_per_step=1)

    def item(record, with_image: bool):
        return dataset_item(tokenizer, record, torch.zeros(3, 8, 8) if with_image else None)

    seen = set()
    for i in range(12):
        items = [item(image_record(f"img-{i}"), True), item(text_record(f"txt-{i}"), False)]
        batch = collator(items)
        n = batch["num_latent_tokens"]
        assert [n] == batch_budgets(table, 3, [f"img-{i}", f"txt-{i}"])
        assert int((batch["input_ids"][0] == image_id).sum()) == n
        supervised = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
        assert torch.equal(supervised, items[0]["labels"][items[0]["labels"] != IGNORE_INDEX])
        assert torch.equal(batch["input_ids"][1, : len(items[1]["input_ids"])], items[1]["input_ids"])
        seen.add(n)
    assert seen == set(BUDGETS)
    assert "num_latent_tokens" not in collator([item(text_record("t"), False)])  # no image, no budget


def test_a_batch_at_several_budgets_trains_on_the_mean_of_their_losses(tokenizer, image_record, text_record, tmp_path):
    from transformers import TrainingArguments

    model, processor = tiny_vlm(tokenizer, budgets=BUDGETS)
    image_id = model.config.image_token_id
    pixels = processor.image_processor(red_image(), return_tensors="pt")["pixel_values"][0]
    items = [dataset_item(tokenizer, image_record("img-0"), pixels), dataset_item(tokenizer, text_record("t"), None)]
    collator = DataCollatorForLlava(tokenizer, image_token_id=image_id, budgets={4: 4, 9: 9, 15: 15})  # all three
    batch = collator(items)
    runs = [batch, *batch["more_budgets"]]
    assert [b["num_latent_tokens"] for b in runs] == [4, 9, 15]
    assert [int((b["input_ids"][0] == image_id).sum()) for b in runs] == [4, 9, 15]
    assert all("pixel_values" not in b for b in runs[1:])  # the images travel once
    expected = []
    with torch.no_grad():
        for b in runs:
            with vlm_budget(model, b["num_latent_tokens"]):
                fields = {k: b[k] for k in ("input_ids", "attention_mask", "labels")}
                expected.append(model(**fields, pixel_values=batch["pixel_values"]).loss)
        assert len({round(float(loss), 6) for loss in expected}) == 3  # three budgets, three different losses
        trainer = train.VlmTrainer(model=model, args=TrainingArguments(tmp_path, use_cpu=True, report_to="none"))
        inputs = {k: v for k, v in batch.items() if k != "num_latent_tokens"}
        with vlm_budget(model, 4):
            loss = trainer.compute_loss(model, inputs)
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    with pytest.raises(ValueError, match=r"4 budgets per step: choose 1 to 3 \(the budgets \[4, 9, 15\]\)"):
        DataCollatorForLlava(tokenizer, image_token_id=image_id, budgets={4: 4, 9: 9, 15: 15}, budgets_per_step=4)


def test_elastic_stage1_trains_the_projector_at_every_budget(
    tokenizer, image_folder, image_record, write_data, tmp_path, monkeypatch
):
    vlm_dir = save_tiny_vlm(tokenizer, tmp_path / "vlm", budgets=BUDGETS)
    data = write_data([image_record(f"img-{i}", image="abc"[i % 3] + ".png") for i in range(8)])
    ran: list[int] = []
    forward = SparseFormerModel.forward

    def recorded(self, *args, num_latent_tokens=None, **kwargs):
        ran.append(self.config.budget(num_latent_tokens))
        return forward(self, *args, num_latent_tokens=num_latent_tokens, **kwargs)

    monkeypatch.setattr(SparseFormerModel, "forward", recorded)
    out = tmp_path / "stage1"
    args = common_args(vlm_dir, data, image_folder, out, "--tune_mm_mlp_adapter", "True", "--version", "plain")
    args[args.index("--max_steps") + 1] = "24"
    args += ["--learning_rate", "1e-2", "--use_cpu", "True", "--budgets", "4", "9", "15"]
    assert train.main(args) == 0
    assert ran == BUDGETS * 24  # every batch at every budget, the smallest first
    assert (out / "mm_projector.safetensors").is_file()
    ran.clear()
    assert train.main([*args, "--budgets_per_step", "1", "--output_dir", str(tmp_path / "one")]) == 0
    assert len(ran) == 24 and set(ran) == set(BUDGETS), ran  # one budget per batch, each one drawn
    ran.clear()
    assert train.main([*args, "--budgets_per_step", "2", "--output_dir", str(tmp_path / "two")]) == 0
    assert len(ran) == 48 and set(ran[::2]) == {4} and set(ran[1::2]) == {9, 15}, ran  # the smallest and one more
    with pytest.raises(ValueError, match="--budgets_per_step 2: give the --budgets to draw them from"):
        train.main([*args[:-4], "--budgets_per_step", "2", "--output_dir", str(tmp_path / "none")])
    with pytest.raises(ValueError, match=r"num_latent_tokens=16: this sparseformer elastic tower serves \[4, 9, 15\]"):
        train.main([*args[:-3], "16", "--output_dir", str(tmp_path / "bad")])


def test_a_pooled_tower_with_nested_budgets_serves_each_from_one_model(tokenizer):
    """M3-style: one pooled ViT tower, budgets 1, 4 and 16 (nested grids), one LLaVA model."""
    from tiny_vlm import tiny_llm
    from transformers import CLIPVisionConfig

    from llava_adapter.modeling import build_vlm
    from llava_adapter.token_regions import image_token_regions
    from llava_adapter.towers import PooledVisionConfig, PooledVisionModel, image_token_table

    torch.manual_seed(0)
    clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=64, patch_size=16)  # fmt: skip
    tower = PooledVisionModel(PooledVisionConfig(clip, num_latent_tokens=16, budgets=[1, 4, 16]))
    model = build_vlm(tower, tiny_llm(tokenizer), tokenizer).eval()
    assert image_token_table(model.config) == {1: 1, 4: 4, 16: 16}
    pixels = torch.randn(1, 3, 64, 64)
    for n in (1, 4, 16):
        with vlm_budget(model, n), torch.no_grad():
            features = model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output[0]
            assert features.shape[0] == n and image_token_regions(model, pixels).shape == (1, n, 4)
    with torch.no_grad():  # budget 1: the mean of every patch token
        patches = tower.vit(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        pooled = tower(pixels, output_hidden_states=[-2], num_latent_tokens=1).hidden_states[-2][:, 1:]
    torch.testing.assert_close(pooled, patches.mean(1, keepdim=True))
    with pytest.raises(ValueError, match=r"this pooled_vision elastic tower serves \[1, 4, 16\]"):
        with vlm_budget(model, 9):
            pass
    with pytest.raises(ValueError, match="not among"):
        PooledVisionConfig(clip, num_latent_tokens=9, budgets=[1, 4])


def test_budgets_per_step_is_recorded_as_a_count_and_older_runs_resume_as_one_per_batch(tmp_path):
    from llava_adapter import checkpoints

    def settings(*extra: str) -> dict:
        argv = ["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", str(tmp_path), "--use_cpu",
                "True", "--report_to", "none", "--budgets", "4", "9", "15", *extra]  # fmt: skip
        return train.run_settings(*train.parse_args(argv))

    every = settings()
    assert every["budgets_per_step"] == 3 and settings("--budgets_per_step", "3") == every  # the default: all
    older = {k: v for k, v in every.items() if k != "budgets_per_step"}  # a run recorded before the choice existed
    (tmp_path / checkpoints.SETTINGS_FILE).write_text(json.dumps(older, default=str))
    with pytest.raises(ValueError, match=r"--budgets_per_step 1 -> 3"):
        checkpoints.check_settings(tmp_path, every, resuming=True, write=False)
    assert checkpoints.check_settings(tmp_path, settings("--budgets_per_step", "1"), resuming=True, write=False) == []

"""Where image tokens look (`token_regions`) and the Gradio demo, served for real and driven with `gradio_client`."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_vlm import save_tiny_vlm, tiny_llm, tiny_vlm
from transformers import AutoModelForImageTextToText, CLIPVisionConfig, CLIPVisionModel

import mllm_sparse
from llava_adapter.chat import ChatEngine
from llava_adapter.demo import Conversation, DemoSessions, build_app, regions_picture
from llava_adapter.modeling import build_vlm
from llava_adapter.token_regions import answer_attention, grid_boxes, image_token_regions
from llava_adapter.towers import PooledVisionConfig, PooledVisionModel

TEMPLATE = "vicuna_v1"
GEN = dict(max_new_tokens=5, min_new_tokens=5)


def scene(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (40, 40, 40))
    image.paste((220, 30, 30), (8, 8, 28, 28))
    image.paste((30, 30, 220), (40, 36, 60, 60))
    return image


def test_grid_boxes_are_row_major_cells():
    expected = [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]]
    torch.testing.assert_close(grid_boxes(2), torch.tensor(expected))


def test_sparseformer_regions_are_the_rois_of_the_unit_the_llm_reads(tokenizer):
    model, processor = tiny_vlm(tokenizer)
    tower = model.model.vision_tower
    with torch.no_grad():  # a fresh tower leaves its RoIs where they start; a trained one moves them per image
        for name, parameter in tower.named_parameters():
            if "roi_adjust" in name:
                parameter.normal_(0, 0.5)
    pixels = processor.image_processor(images=[scene(), scene((90, 40))], return_tensors="pt")["pixel_values"]
    regions = image_token_regions(model, pixels)
    with torch.no_grad():
        rois = tower(pixels, output_hidden_states=True).hidden_rois
    assert regions.shape == (2, model.config.image_seq_length, 4) == (2, 15, 4)
    torch.testing.assert_close(regions, rois[model.config.vision_feature_layer])
    assert not torch.allclose(regions[0], regions[1])

    # keeping the CLS token ("full"): it stands for the whole image, ahead of the latent tokens
    encoder = mllm_sparse.create_model("test_sparseformer_btsp")
    full = build_vlm(encoder, tiny_llm(tokenizer), tokenizer, select_strategy="full").eval()
    regions_full = image_token_regions(full, pixels)
    assert regions_full.shape[1] == full.config.image_seq_length == 16
    torch.testing.assert_close(regions_full[:, 0], torch.tensor([[0.0, 0, 1, 1]] * 2))


def clip_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )


@pytest.mark.parametrize(("tower", "side"), [("clip", 4), ("pooled", 2)])
def test_vit_and_pooled_regions_are_their_grid_cells(tokenizer, tower, side):
    torch.manual_seed(0)
    vision = (
        CLIPVisionModel(clip_config()) if tower == "clip" else PooledVisionModel(PooledVisionConfig(clip_config(), 4))
    )
    model = build_vlm(vision, tiny_llm(tokenizer), tokenizer).eval()
    regions = image_token_regions(model, torch.randn(3, 3, 32, 32))
    assert model.config.image_seq_length == side * side
    torch.testing.assert_close(regions, grid_boxes(side).expand(3, -1, -1))


def test_pooled_regions_are_the_patches_each_pooled_token_averages():
    """14 × 14 patches pooled to 4 × 4 (the pooled-16 baseline on a 196-patch teacher): the bins are uneven and
    overlap; a patch lies inside a pooled token's box exactly when it contributes to that token."""
    clip = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                            image_size=112, patch_size=8)  # fmt: skip
    tower = PooledVisionModel(PooledVisionConfig(clip, num_tokens=16))
    one_hot = torch.eye(196).unsqueeze(0)  # patch p carries feature p
    pooled = tower.pool(torch.cat([torch.zeros(1, 1, 196), one_hot], dim=1))[0, 1:]  # [16 tokens, 196 patches]
    centres = (grid_boxes(14)[:, :2] + grid_boxes(14)[:, 2:]) / 2
    boxes = grid_boxes(4, patches=14)
    inside = (
        (centres[None, :, 0] > boxes[:, None, 0])
        & (centres[None, :, 0] < boxes[:, None, 2])
        & (centres[None, :, 1] > boxes[:, None, 1])
        & (centres[None, :, 1] < boxes[:, None, 3])
    )
    assert torch.equal(inside, pooled > 0)
    assert not torch.allclose(boxes, grid_boxes(4))


@pytest.fixture(scope="module")
def vlm_dir(tokenizer, tmp_path_factory) -> Path:
    return save_tiny_vlm(tokenizer, tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def engine(vlm_dir) -> ChatEngine:
    return ChatEngine.from_pretrained(vlm_dir, template=TEMPLATE, device="cpu")


def test_answer_attention_matches_an_eager_model_and_restores_sdpa(engine, vlm_dir):
    image = scene()
    record = {"id": "q", "image": "x", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}]}
    got = answer_attention(engine, record, image)
    assert engine.model.model.language_model.config._attn_implementation == "sdpa"
    n = engine.num_image_tokens
    assert got.per_token.shape == (n,) and float(got.per_token.sum()) == pytest.approx(1.0)
    assert 0 < got.image_share < 1

    eager = AutoModelForImageTextToText.from_pretrained(vlm_dir, attn_implementation="eager").eval()
    ids = torch.tensor([engine.prompt_ids(record)])
    pixels = engine.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        attentions = eager(input_ids=ids, pixel_values=pixels, output_attentions=True).attentions
    # layer by layer, head by head: the last position's weights on the placeholder positions
    positions = (ids[0] == engine.image_token_id).nonzero().flatten()
    per_layer = [a[0, :, -1][:, positions].mean(0) for a in attentions]
    expected = torch.stack(per_layer).mean(0)
    torch.testing.assert_close(got.per_token, expected / expected.sum())
    assert got.image_share == pytest.approx(float(expected.sum()), rel=1e-5)


def test_regions_picture_shows_the_model_input_large_enough(engine):
    picture = regions_picture(engine, scene((120, 40)))  # padded to a square, as the processor does
    assert picture.width == picture.height >= 448
    weighted = regions_picture(engine, scene(), weights=torch.arange(float(engine.num_image_tokens)))
    assert weighted.tobytes() != regions_picture(engine, scene()).tobytes()


def test_sessions_keep_their_own_conversations(engine, tmp_path):
    path = tmp_path / "scene.png"
    scene().save(path)
    sessions = DemoSessions(engine, **GEN)
    first, _ = sessions.open_image(path)
    other, _ = sessions.open_image(path)
    questions = ["What colour is the square?", "And the other one?"]
    a1 = list(sessions.ask(first, questions[0], attention=True))
    b1 = list(sessions.ask(other, questions[0]))
    a2 = list(sessions.ask(first, questions[1]))
    assert a1[0] == {"answer": "", "done": False} and all(not u["done"] for u in a1[:-1])
    assert a1[-1]["done"] and a1[-1]["picture"] is not None and "attention" in a1[-1]["timings"]
    assert b1[-1]["picture"] is None and "attention" not in b1[-1]["timings"]
    assert [t["from"] for t in first.turns] == ["human", "gpt"] * 2 and len(other.turns) == 2

    engine.reset()
    expected = [engine.chat(questions[0], image=scene(), **GEN).text, engine.chat(questions[1], **GEN).text]
    assert [a1[-1]["answer"], a2[-1]["answer"]] == expected  # B's turn in between did not leak into A's context
    assert b1[-1]["answer"] == expected[0]
    with pytest.raises(ValueError, match="Type a question"):
        list(sessions.ask(first, "   "))


def test_a_failed_answer_leaves_the_conversation_as_it_was(engine, tmp_path):
    path = tmp_path / "scene.png"
    scene().save(path)
    sessions = DemoSessions(engine, max_new_tokens=600)  # beyond the tiny LLM's 512 positions
    conversation, _ = sessions.open_image(path)
    with pytest.raises(ValueError, match="beyond the LLM's 512 positions"):
        list(sessions.ask(conversation, "What colour is the square?"))
    assert conversation.turns == [] and not sessions.lock.locked()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(engine):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(DemoSessions(engine, **GEN))
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_the_served_demo_chats_over_several_turns_like_the_engine(server, engine, tmp_path):
    from gradio_client import Client, handle_file

    path = tmp_path / "scene.png"
    scene().save(path)
    client = Client(server, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))
    picture, chat, timings = client.predict(handle_file(str(path)), api_name="/image")
    assert Image.open(picture).width >= 448 and chat == [] and timings == f"{engine.num_image_tokens} image tokens"

    questions = ["What colour is the square?", "And the other one?"]
    history = []
    for question in questions:
        history, box, picture, timings = client.predict(question, history, True, api_name="/send")
        assert box == "" and "prefill" in timings and "attention" in timings
    answers = [m["content"] for m in history if m["role"] == "assistant"]

    engine.reset()
    expected = [engine.chat(questions[0], image=scene(), **GEN).text, engine.chat(questions[1], **GEN).text]
    assert [a if isinstance(a, str) else a[0]["text"] for a in answers] == expected

    chat, timings = client.predict(api_name="/clear")
    assert chat == []


def test_a_bad_upload_is_reported_by_name(server, tmp_path):
    from gradio_client import Client, handle_file

    bad = tmp_path / "broken_upload.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    client = Client(server, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))
    with pytest.raises(Exception, match="broken_upload"):
        client.predict(handle_file(str(bad)), api_name="/image")


def test_conversation_defaults_to_text_only():
    assert Conversation().image is None and Conversation().turns == []

"""Where image tokens look (`token_regions`) and the Gradio demo, served for real and driven with `gradio_client`."""

from __future__ import annotations

import gc
import os
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from tiny_vlm import save_tiny_vlm, tiny_llm, tiny_vlm
from transformers import AutoModelForImageTextToText, CLIPVisionConfig, CLIPVisionModel

import mllm_sparse
from llava_adapter.chat import ChatEngine
from llava_adapter.modeling import build_vlm
from llava_adapter.token_regions import answer_attention, grid_boxes, image_token_regions, model_input
from llava_adapter.towers import PooledVisionConfig, PooledVisionModel
from mllm_sparse_recipes.commands.demo import build_parser
from mllm_sparse_recipes.demo import (
    SESSION_ENDED,
    Conversation,
    DemoSessions,
    DemoSettings,
    build_app,
    launch,
    regions_picture,
    run,
)

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
    tower = PooledVisionModel(PooledVisionConfig(clip, num_latent_tokens=16))
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


def test_regions_picture_shows_the_upload_as_the_model_sees_it_at_a_size_worth_looking_at(engine):
    photo = scene((120, 40))  # padded to a square, as the processor does
    seen = model_input(engine, photo)[1]
    shown = model_input(engine, photo, 512)[1]
    assert seen.size == (64, 64) and shown.size == (512, 512)
    # the same geometry (padding, crop) at another size: shrunk back, it is the model input up to resampling
    difference = (torch.tensor(list(shown.resize(seen.size, Image.Resampling.BOX).tobytes())).float()
                  - torch.tensor(list(seen.tobytes())).float()).abs().mean()  # fmt: skip
    assert difference < 6
    picture = regions_picture(engine, seen, shown=shown)
    assert picture.width == 512 and picture.height > 512  # the legend goes under the picture
    assert regions_picture(engine, seen).width >= 448  # without a picture to show: the model input, enlarged
    weights = torch.arange(float(engine.num_image_tokens))
    weighted = regions_picture(engine, seen, weights=weights, shown=shown)
    assert weighted.height > picture.height  # and the colour scale of the fill under it
    assert weighted.crop((0, 0, 512, 512)).tobytes() != picture.crop((0, 0, 512, 512)).tobytes()


def test_boxes_are_numbered_on_request():
    from mllm_sparse.visualize import draw_boxes

    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.4, 0.4, 0.9, 0.9]])
    plain, numbered = (draw_boxes(scene((200, 200)), boxes, numbered=n) for n in (False, True))
    assert plain.tobytes() != numbered.tobytes()
    # the numbers sit inside each box's top-left corner, nowhere else
    inside = [(20, 20, 45, 40), (80, 80, 105, 100)]
    changed = [plain.crop(b).tobytes() != numbered.crop(b).tobytes() for b in inside]
    assert changed == [True, True]
    assert plain.crop((150, 20, 200, 60)).tobytes() == numbered.crop((150, 20, 200, 60)).tobytes()


def test_box_numbers_contrast_with_their_tags():
    """Each number sits on a tag of its box's colour, written in black or white, whichever contrasts with it."""
    from mllm_sparse.visualize import draw_boxes, token_colors

    colors = token_colors(16)
    dark = min(range(16), key=lambda i: sum(colors[i]))  # e.g. a deep blue
    light = max(range(16), key=lambda i: sum(colors[i]))
    boxes = torch.zeros(16, 4)
    boxes[dark], boxes[light] = torch.tensor([0.05, 0.05, 0.45, 0.45]), torch.tensor([0.55, 0.55, 0.95, 0.95])
    picture = draw_boxes(Image.new("RGB", (400, 400), (128, 128, 128)), boxes, tokens=[dark, light], numbered=True)
    for i, corner, text in ((dark, (26, 26, 46, 40), (255, 255, 255)), (light, (226, 226, 246, 240), (0, 0, 0))):
        tag = set(picture.crop(corner).getdata())
        near_text = [p for p in tag if max(abs(a - b) for a, b in zip(p, text, strict=True)) < 40]  # antialiased
        assert colors[i] in tag and near_text, (i, colors[i], sorted(tag)[:8])


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


@dataclass
class Served:
    url: str
    sessions: DemoSessions
    app: Any


@contextmanager
def served(engine, session_ttl_s=3600, max_sessions=1000) -> Iterator[Served]:
    """The demo on a free port: uploads up to 1 MiB, images up to 1 megapixel."""
    sessions = DemoSessions(engine, max_pixels=1_000_000, **GEN)
    app = build_app(sessions, session_ttl_s=session_ttl_s)
    port = free_port()
    launch(app, port=port, max_upload_mb=1, max_sessions=max_sessions, block=False)
    try:
        yield Served(f"http://127.0.0.1:{port}/", sessions, app)
    finally:
        app.close()


@pytest.fixture(scope="module")
def gradio_env(tmp_path_factory):
    """Gradio's uploads in a folder of this module's own; heartbeats every 0.25 s, so a closed page is seen at once."""
    settings = {
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio")),
        "GRADIO_HEARTBEAT_INTERVAL": "0.25",
    }
    before = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    yield Path(settings["GRADIO_TEMP_DIR"])
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def server(engine, gradio_env) -> Iterator[Served]:
    with served(engine) as running:
        yield running


def client_of(server: Served, tmp_path: Path):
    from gradio_client import Client

    return Client(server.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))


def refusal(error: Exception) -> str:
    """What the page shows beside the input a visitor got wrong, as an API client receives it: Gradio's validation
    error says "1 parameter(s) failed validation:" and then "- upload: MESSAGE" on the one line that matters."""
    head, line = str(error).splitlines()
    assert head == "1 parameter(s) failed validation:"
    return line.partition(": ")[2]


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        gc.collect()
        time.sleep(0.05)
    return True


def test_the_served_demo_chats_over_several_turns_like_the_engine(server, engine, tmp_path):
    from gradio_client import handle_file

    path = tmp_path / "scene.png"
    scene().save(path)
    client = client_of(server, tmp_path)
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
    client.close()


def test_an_upload_over_the_size_limit_is_refused_before_it_is_stored(server, gradio_env, tmp_path):
    import httpx
    from gradio_client import handle_file

    big = tmp_path / "big_upload_3f9a.png"
    big.write_bytes(os.urandom(3 * 2**19))  # 1.5 MiB, over the server's 1 MiB
    client = client_of(server, tmp_path)
    with pytest.raises(ValueError, match="exceeds the maximum file size of 1048576 bytes"):  # the page checks first
        client.predict(handle_file(str(big)), api_name="/image")
    client.close()

    # a client that skips the page's check: Gradio stops reading at the limit and keeps nothing
    with big.open("rb") as f:
        response = httpx.post(f"{server.url}gradio_api/upload", files={"files": (big.name, f)}, timeout=30)
    assert response.status_code == 413 and response.text == "File size exceeded maximum allowed size of 1048576 bytes."
    assert not list(gradio_env.rglob(big.name))


def test_the_demo_bounds_a_visitor_by_default():
    args = build_parser().parse_args(["--model", "m"])
    assert (args.max_upload_mb, args.max_image_megapixels) == (20, 50)
    assert (args.session_ttl_minutes, args.max_sessions) == (60, 1000)
    settings = DemoSettings(model=Path("m"))
    assert (settings.max_upload_mb, settings.max_image_megapixels) == (20, 50)
    assert (settings.session_ttl_minutes, settings.max_sessions) == (60, 1000)


@pytest.mark.parametrize(
    ("setting", "value", "flag"),
    [
        ("max_new_tokens", 0, "--max-new-tokens"),
        ("max_image_megapixels", 90, "--max-image-megapixels"),
        ("session_ttl_minutes", 0.001, "--session-ttl-minutes"),
        ("max_upload_mb", 0, "--max-upload-mb"),
        ("max_sessions", 0, "--max-sessions"),
    ],
)
def test_run_refuses_a_bad_setting_before_the_model_loads(tmp_path, setting, value, flag):
    settings = DemoSettings(model=tmp_path / "no-such-model", **{setting: value})
    with pytest.raises(ValueError, match=flag):
        run(settings)


def test_run_serves_the_page(vlm_dir, gradio_env):
    import httpx

    port = free_port()
    app = run(DemoSettings(model=vlm_dir, template=TEMPLATE, device="cpu", port=port), block=False)
    try:
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.status_code == 200 and f"mllm-sparse chat: {vlm_dir}" in page.text
    finally:
        app.close()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width × height pixels and holds almost none: its header reads fine, decoding it fails."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_a_session_keeps_the_model_input_not_the_upload_and_huge_images_are_not_decoded(server, engine, tmp_path):
    from gradio_client import handle_file

    photo = scene().resize((900, 700), Image.Resampling.BICUBIC)
    path = tmp_path / "photo.png"
    photo.save(path)
    client = client_of(server, tmp_path)
    client.predict(handle_file(str(path)), api_name="/image")
    kept = server.sessions.conversations[client.session_hash].image
    side = engine.processor.image_processor.crop_size["height"]
    assert kept.size == (side, side) == (64, 64)  # not 900 × 700
    pixels = engine.processor.image_processor(images=[photo], return_tensors="pt")["pixel_values"]
    again = engine.processor.image_processor(images=[kept], return_tensors="pt")["pixel_values"]
    assert torch.equal(again, pixels)  # the model gets exactly what the upload would have given it

    # over the 1-megapixel limit: refused on their headers (decoding the last two would fail: they hold no pixels)
    Image.new("RGB", (1200, 1000)).save(tmp_path / "wide.png")
    (tmp_path / "huge.png").write_bytes(png_header(12_000, 10_000))
    (tmp_path / "bomb.png").write_bytes(png_header(50_000, 40_000))  # beyond twice PIL's limit: PIL refuses it
    refusals = {
        "wide.png": "wide.png is 1200×1000 (1.2 megapixels)",
        "huge.png": "huge.png is 12000×10000 (120.0 megapixels)",
        "bomb.png": "bomb.png is larger than 89 megapixels",
    }
    for name, reason in refusals.items():
        with pytest.raises(ValueError) as refused:
            client.predict(handle_file(str(tmp_path / name)), api_name="/image")
        assert refusal(refused.value) == f"{reason}; this demo takes images of up to 1 megapixels"
    assert server.sessions.conversations[client.session_hash].image is kept  # the session kept its image
    client.close()


def test_a_session_is_freed_when_its_page_closes(server, tmp_path):
    from gradio_client import handle_file

    path = tmp_path / "scene.png"
    scene().save(path)
    client = client_of(server, tmp_path)
    client.predict(handle_file(str(path)), api_name="/image")
    client.predict("What colour is the square?", [], False, api_name="/send")
    conversation = server.sessions.conversations[client.session_hash]
    assert conversation.image is not None and len(conversation.turns) == 2
    live = len(server.sessions.conversations)

    client.close()  # its heartbeat stops, as when a tab closes
    assert wait_until(lambda: client.session_hash not in server.sessions.conversations)
    assert conversation.image is None and conversation.turns == [] and conversation.ended
    assert len(server.sessions.conversations) == live - 1
    with pytest.raises(ValueError, match="This conversation has ended"):
        list(server.sessions.ask(conversation, "And the other one?"))


def test_idle_sessions_expire_and_the_oldest_are_dropped_beyond_the_cap(engine, gradio_env, tmp_path):
    from gradio_client import handle_file

    path = tmp_path / "scene.png"
    scene().save(path)
    with served(engine, session_ttl_s=1) as server:
        client = client_of(server, tmp_path)
        client.predict(handle_file(str(path)), api_name="/image")
        history, *_ = client.predict("What colour is the square?", [], False, api_name="/send")
        conversation = server.sessions.conversations[client.session_hash]
        uploaded = [Path(f) for f in server.app.upload_file_set if Path(f).name == "scene.png"]
        assert uploaded and all(f.exists() for f in uploaded)
        # the page stays open (its heartbeat runs) but sends nothing for over a second
        assert wait_until(lambda: client.session_hash not in server.sessions.conversations)
        assert conversation.image is None and conversation.ended
        with pytest.raises(ValueError) as refused:  # not a text-only answer: refused at the question box
            client.predict("And the other one?", history, False, api_name="/send")
        assert refusal(refused.value) == SESSION_ENDED
        assert wait_until(lambda: not any(f.exists() for f in uploaded))  # and Gradio's copy of the upload is gone
        client.close()

    with served(engine, max_sessions=2) as server:
        clients = [client_of(server, tmp_path) for _ in range(3)]
        for client in clients:
            client.predict(handle_file(str(path)), api_name="/image")
        first = clients[0].session_hash
        assert wait_until(lambda: first not in server.sessions.conversations)  # Gradio dropped the oldest state
        assert set(server.sessions.conversations) == {c.session_hash for c in clients[1:]}
        for client in clients:
            client.close()


@pytest.mark.parametrize(
    ("failure", "traceback"),
    [(ValueError("the conversation would reach 600 positions, beyond the LLM's 512"), False),
     (RuntimeError("out of memory"), True)],
)  # fmt: skip
def test_a_failed_answer_is_a_warning_and_the_chat_and_question_stay(
    failure, traceback, server, tmp_path, capfd, caplog, monkeypatch
):
    from gradio_client import handle_file

    path = tmp_path / "scene.png"
    scene().save(path)
    client = client_of(server, tmp_path)
    client.predict(handle_file(str(path)), api_name="/image")
    history, *_ = client.predict("What colour is the square?", [], False, api_name="/send")
    conversation = server.sessions.conversations[client.session_hash]
    turns = [dict(t) for t in conversation.turns]

    def failing(*args, **kwargs):
        yield "a"
        raise failure

    monkeypatch.setattr(server.sessions.engine, "stream", failing)
    capfd.readouterr()
    after, box, *_ = client.predict("And the other one?", history, False, api_name="/send")  # no exception
    assert after == history and box == "And the other one?" and conversation.turns == turns
    logged = [r for r in caplog.records if r.exc_info is not None]  # the server's log: a traceback for the model's
    assert [r.exc_info[1] for r in logged] == ([failure] if traceback else [])  # failure only
    assert "Traceback" not in capfd.readouterr().err
    monkeypatch.undo()
    again, box, *_ = client.predict("And the other one?", history, False, api_name="/send")  # still answerable
    assert len(again) == len(history) + 2 and box == ""
    client.close()


def test_an_image_the_model_fails_to_encode_is_a_warning_with_the_traceback_logged(
    server, tmp_path, caplog, monkeypatch
):
    from gradio_client import handle_file

    path = tmp_path / "scene.png"
    scene().save(path)
    client = client_of(server, tmp_path)
    failure = RuntimeError("out of memory")

    def failing(*args, **kwargs):
        raise failure

    monkeypatch.setattr(server.sessions, "open_image", failing)
    client.predict(handle_file(str(path)), api_name="/image")  # no exception: a warning on the page
    assert [r.exc_info[1] for r in caplog.records if r.exc_info is not None] == [failure]
    assert client.session_hash not in server.sessions.conversations  # the session kept its (empty) state
    client.close()


def test_a_budget_the_model_does_not_serve_is_refused_at_its_input(server, engine, tmp_path):
    from gradio_client import handle_file

    path = tmp_path / "scene.png"
    scene().save(path)
    client = client_of(server, tmp_path)
    unserved = f"8 image tokens: this model serves [{engine.num_latent_tokens}]"
    with pytest.raises(ValueError) as refused:
        client.predict(handle_file(str(path)), 8, api_name="/image")
    assert refusal(refused.value) == unserved
    picture, line = client.predict(handle_file(str(path)), engine.num_latent_tokens, api_name="/image")[::2]
    assert Image.open(picture).width >= 448 and line == f"{engine.num_image_tokens} image tokens"
    client.close()


def test_a_bad_upload_gets_one_line_naming_the_file_and_no_traceback(server, tmp_path, capfd):
    from gradio_client import handle_file

    truncated = tmp_path / "truncated_photo.png"
    scene((300, 200)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:400])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image at all")
    broken = tmp_path / "broken_upload.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    client = client_of(server, tmp_path)
    capfd.readouterr()
    for bad in [not_an_image, broken, truncated]:
        with pytest.raises(ValueError) as refused:
            client.predict(handle_file(str(bad)), api_name="/image")
        assert refusal(refused.value) == f"{bad.name} is not an image PIL can read"
    log = capfd.readouterr()
    assert "Traceback" not in log.out + log.err and "UnidentifiedImageError" not in log.out + log.err
    client.close()


def test_conversation_defaults_to_text_only():
    assert Conversation().image is None and Conversation().turns == []

"""`mllm-sparse demo` served for real and driven in a real headless browser (Debian's Chromium through playwright):
what a visitor sees, including their mistakes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from tiny_vlm import free_port, save_tiny_vlm

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: install Debian's package (`apt-get install chromium`, as .ci/run does) or set CHROMIUM to "
    "a Chromium executable",
)
ERROR_BADGE = ".error"  # Gradio's status tracker marks a component whose event failed with this class


def scene(size=(160, 120)) -> Image.Image:
    image = Image.new("RGB", size, (40, 40, 40))
    image.paste((220, 30, 30), (16, 16, 60, 60))
    image.paste((30, 30, 220), (90, 60, 140, 110))
    return image


@pytest.fixture(scope="module")
def demo_url(tokenizer, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`mllm-sparse demo` on a tiny model, in its own process on 127.0.0.1; yields its address and its log file."""
    folder = tmp_path_factory.mktemp("browser")
    model = save_tiny_vlm(tokenizer, folder / "vlm")
    port = free_port()
    log = folder / "demo.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(folder / "gradio")}
    command = [sys.executable, "-m", "mllm_sparse_recipes.cli", "demo", "--model", str(model), "--template",
               "vicuna_v1", "--port", str(port), "--max-new-tokens", "6"]  # fmt: skip
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet: poll again
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the demo did not start:\n{log.read_text()}")
            time.sleep(0.5)
        yield url, log
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def page(demo_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(demo_url[0])
            page.get_by_role("button", name="Send").wait_for()
            yield page
        finally:
            browser.close()


def badges(page) -> list[str]:
    """The "Error" badges Gradio leaves on the components of a failed event."""
    return page.locator(f"span{ERROR_BADGE}").all_inner_texts()


def test_a_visitor_uploads_asks_and_gets_an_answer_with_regions_and_timings(page, tmp_path):
    path = tmp_path / "scene.png"
    scene().save(path)
    page.locator("input[type=file]").first.set_input_files(path)
    regions = page.locator("#regions img")
    regions.wait_for(timeout=60_000)
    assert regions.evaluate("img => img.naturalWidth") >= 448  # drawn large enough to see the boxes
    page.get_by_label("Question").fill("What colour is the square?")
    page.get_by_role("button", name="Send").click()
    timings = page.locator("#timings", has_text="prefill")
    timings.wait_for(timeout=60_000)  # the answer is complete once its timings are shown
    assert "15 image tokens · encode" in timings.inner_text()
    chat = page.locator("#chat")
    assert "What colour is the square?" in chat.inner_text()
    answer = chat.locator("[data-testid=bot]").last.inner_text().strip()
    assert answer and badges(page) == []
    page.screenshot(path=tmp_path / "answered.png", full_page=True)


def test_an_empty_question_is_answered_in_place_and_leaves_no_badge(page, demo_url, tmp_path):
    page.get_by_role("button", name="Send").click()
    notice = page.get_by_text("Type a question first")
    notice.wait_for(timeout=30_000)
    page.screenshot(path=tmp_path / "empty_question.png", full_page=True)
    assert badges(page) == []
    page.get_by_label("Question").fill("What is it?")  # a text-only question: answered, and the notice goes
    page.get_by_role("button", name="Send").click()
    page.locator("#timings", has_text="prefill").wait_for(timeout=60_000)
    assert notice.count() == 0 and badges(page) == []
    assert "Traceback" not in demo_url[1].read_text()


def test_a_file_that_is_not_an_image_is_named_in_place_and_leaves_no_badge(page, demo_url, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image at all")
    page.locator("input[type=file]").first.set_input_files(bad)
    page.get_by_text("notes.png is not an image PIL can read").wait_for(timeout=30_000)
    page.screenshot(path=tmp_path / "not_an_image.png", full_page=True)
    assert badges(page) == [] and str(tmp_path) not in page.content()  # no server path either
    log = demo_url[1].read_text()
    assert "Traceback" not in log and "UnidentifiedImageError" not in log


def test_at_phone_width_the_chat_comes_first(demo_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            phone = browser.new_page(viewport={"width": 390, "height": 844})
            phone.goto(demo_url[0])
            question = phone.get_by_label("Question")
            question.wait_for()
            box = question.bounding_box()
            phone.screenshot(path=tmp_path / "phone.png", full_page=True)
            assert box is not None and box["y"] + box["height"] <= 844  # on the first screen, without scrolling
            assert box["width"] <= 390
        finally:
            browser.close()


def test_an_answer_that_fails_is_a_warning_and_the_question_stays_typed(page, demo_url, tmp_path):
    question = "Describe every object in this scene in detail, please. " * 60  # beyond the tiny LLM's 512 positions
    page.get_by_label("Question").fill(question)
    page.get_by_role("button", name="Send").click()
    warning = page.get_by_text("beyond the LLM's 512 positions")
    warning.wait_for(timeout=60_000)
    page.screenshot(path=tmp_path / "failed_answer.png", full_page=True)
    assert badges(page) == [] and page.get_by_label("Question").input_value() == question
    assert "Traceback" not in demo_url[1].read_text()

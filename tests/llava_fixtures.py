"""Fixtures of the LLaVA tests (tests/llava_adapter, tests/recipes): a tiny tokenizer trained on synthetic
sentences, real PNGs, a small image processor and a factory for LLaVA JSON files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from PIL import Image

from llava_adapter.conversation import VICUNA_SYSTEM
from llava_adapter.tokenizer import train_tokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
PLACES = ["left", "right", "top", "bottom"]


def corpus() -> list[str]:
    """A few hundred sentences in the style of the synthetic world's QA, plus the template words."""
    texts = [VICUNA_SYSTEM, "USER: ASSISTANT: <|user|> <|assistant|> <|system|>"]
    for colour, shape, place in itertools.product(COLOURS, SHAPES, PLACES):
        texts.append(f"What colour is the {shape} on the {place}?\nThe {shape} is {colour}.")
        texts.append(f"How many {colour} {shape}s are there? 3, 12 or 7.")
    return texts


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(corpus(), vocab_size=512)


@pytest.fixture(scope="session")
def image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """a.png (48×40 RGB), b.png (24×64 grayscale), c.png (32×32 RGBA) and corrupt.png (not an image)."""
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (48, 40), (200, 30, 30)).save(folder / "a.png")
    Image.new("L", (24, 64), 128).save(folder / "b.png")
    Image.new("RGBA", (32, 32), (0, 0, 255, 128)).save(folder / "c.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return folder


def _image_record(
    record_id: str,
    image: str = "a.png",
    question: str = "What colour is the circle?",
    answer: str = "The circle is red.",
    at_end: bool = False,
) -> dict:
    value = f"{question}\n<image>" if at_end else f"<image>\n{question}"
    turns = [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return {"id": record_id, "image": image, "conversations": turns}


def _text_record(record_id: str, question: str = "How many stars are there?", answer: str = "3 stars.") -> dict:
    return {"id": record_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


@pytest.fixture
def image_record():
    """Factory: a single-turn image record; `at_end=True` puts `<image>` after the question."""
    return _image_record


@pytest.fixture
def text_record():
    """Factory: a single-turn text-only record."""
    return _text_record


@pytest.fixture
def write_data(tmp_path):
    """Write a list of records (or raw text) to a JSON file and return its path."""

    def write(data, name: str = "data.json") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return path

    return write


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A whole `mllm-sparse quickstart --plan smoke` run (world, teacher, a 9-token SparseFormer, the scene LLM, a
    trained VLM), made once: the quickstart tests read it, the ablation tests build on its parts. Read-only."""
    from smoke_runs import run_smoke_quickstart

    return run_smoke_quickstart(tmp_path_factory.mktemp("quickstart") / "run")

import os
import tempfile
from pathlib import Path

import pytest
import torch

import mllm_sparse

# Every subprocess of the tests (CLI runs, DeepSpeed and torchrun ranks, lmms-eval) imports torch, transformers and
# DeepSpeed afresh; without bytecode each start compiles them again (28 s instead of 11 s on 2 cores). A private
# cache keeps the .pyc files out of the source tree, which is what PYTHONDONTWRITEBYTECODE is there for.
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
    os.environ["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "mllm_sparse_test_pycache")

# the LLaVA fixtures (tokenizer, images, LLaVA JSON, a smoke run), shared by tests/llava_adapter and tests/recipes
pytest_plugins = ["llava_fixtures"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def btsp_model():
    """Tiny bootstrapped-layout encoder: 15 latent tokens + CLS, widths 32 → 64."""
    return mllm_sparse.create_model("test_sparseformer_btsp")


@pytest.fixture
def v1_model():
    """Tiny v1-layout encoder: 9 latent tokens, avg head, type-1 RoI adjusting, zero padding."""
    return mllm_sparse.create_model("test_sparseformer_v1")


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny models gain nothing from threads, and on a busy machine two threads
    can run them ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

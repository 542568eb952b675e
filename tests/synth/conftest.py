import pytest

from mllm_sparse.synth import generate_world


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """40 images at 64 px, default difficulty."""
    out = tmp_path_factory.mktemp("world")
    generate_world(out, num_images=40, image_size=64, seed=7, workers=1, progress=False)
    return out

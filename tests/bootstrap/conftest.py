import open_clip
import pytest
import torch
from safetensors.torch import save_file

import bootstrap  # noqa: F401  (registers the teacher architectures)
from mllm_sparse.synth import generate_world


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """(root, teacher spec): a 30-image synthetic world at 64 px and a random `synth-vit-test-16` teacher."""
    root = tmp_path_factory.mktemp("btsp")
    generate_world(root / "world", num_images=30, image_size=64, seed=2, workers=1, progress=False)
    torch.manual_seed(0)
    save_file(open_clip.create_model("synth-vit-test-16").state_dict(), root / "teacher.safetensors")
    return root, f"open_clip:synth-vit-test-16@{root / 'teacher.safetensors'}"

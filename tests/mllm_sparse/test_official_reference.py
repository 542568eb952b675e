"""Official-format weights reproduce the reference implementation's numbers.

`tests/data/sparseformer_reference.json` pins the reference model's state_dict keys and shapes for each official
preset, and its outputs on deterministic synthetic weights and pixels (see `official_state.py` for how).
"""

import pytest
import torch
from official_state import OFFICIAL_PRESETS, load_reference_pins, synthetic_pixels, synthetic_state_dict
from transformers.initialization import no_init_weights

import mllm_sparse

PINS = load_reference_pins()
ATOL = 1e-4


@pytest.mark.parametrize("name", OFFICIAL_PRESETS)
def test_state_dict_keys_are_the_official_keys(name):
    with no_init_weights():
        model = mllm_sparse.SparseFormerModel(mllm_sparse.preset_config(name))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == PINS["presets"][name]["keys"]


@pytest.mark.parametrize("name", OFFICIAL_PRESETS)
def test_official_checkpoint_reproduces_reference_outputs(tmp_path, name):
    pins = PINS["presets"][name]
    state = synthetic_state_dict(pins["keys"], seed=PINS["weights_seed"])
    if name in ("sparseformer_v1_tiny", "sparseformer_btsp_openai_clip_base"):
        # The published *_converted.pth layout, through the public loading path, with and without the wrapper.
        path = tmp_path / f"{name}_converted.pth"
        torch.save({"model": state} if name.startswith("sparseformer_v1") else state, path)
        model = mllm_sparse.create_model(name, pretrained=path)
    else:
        model = mllm_sparse.create_model(name, pretrained=None)
        model.load_state_dict(state, strict=True)
    spec = PINS["input"]
    pixels = synthetic_pixels(spec["batch"], spec["height"], spec["width"], seed=spec["seed"])
    with torch.no_grad():
        out = model(pixels)
        tokens = model.norm(out.last_hidden_state)
    expected = torch.tensor(pins["image_embeds"])
    assert expected.abs().mean() > 0.1  # the pins are O(1), so the tolerance is meaningful
    torch.testing.assert_close(out.image_embeds, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.rois, torch.tensor(pins["rois"]), atol=ATOL, rtol=0)
    torch.testing.assert_close(tokens.abs().mean(-1), torch.tensor(pins["token_abs_mean"]), atol=ATOL, rtol=0)
    torch.testing.assert_close(tokens[..., :8], torch.tensor(pins["token_embeds_first8"]), atol=ATOL, rtol=0)


def test_layer_norm_eps_and_mixing_activation_details():
    """Details below the pins' 1e-4 resolution, checked directly."""
    v1 = mllm_sparse.create_model("test_sparseformer_v1")
    unit = v1.layers[0]
    assert unit.norm1.eps == 1e-6 and v1.norm.eps == 1e-6 and v1.layers[1][1].eps == 1e-6
    # The mixing-parameter generator keeps torch's default eps in every preset.
    assert unit.adaptive_mixing.parameter_generator[0].eps == 1e-5
    btsp = mllm_sparse.create_model("test_sparseformer_btsp")
    assert btsp.layers[0].norm1.eps == 1e-5 and btsp.norm.eps == 1e-5
    x = torch.linspace(-3, 3, 7)
    # Exact (erf) GELU, not the tanh approximation, in the mixing and the non-CLIP MLPs.
    assert btsp.layers[0].mlp.act.approximate == "none"
    torch.testing.assert_close(torch.nn.functional.gelu(x), 0.5 * x * (1 + torch.erf(x / 2**0.5)))

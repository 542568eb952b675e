"""Elastic SparseFormers: one encoder, several latent-token budgets, chosen per call or at load time."""

import subprocess
import sys

import pytest
import torch

import mllm_sparse
from mllm_sparse import SparseFormerModel, make_elastic
from mllm_sparse.modeling import _initial_rois

BUDGETS = [4, 9, 15]


@pytest.fixture
def elastic():
    return mllm_sparse.create_model("test_sparseformer_btsp", budgets=BUDGETS, num_latent_tokens=9)


@torch.no_grad()
def test_each_budget_gives_its_tokens_and_rois_and_the_default_is_the_configs(elastic):
    pixels = torch.randn(2, 3, 64, 64)
    assert elastic.budgets == BUDGETS and elastic.config.num_latent_tokens == 9
    for n in BUDGETS:
        out = elastic(pixels, num_latent_tokens=n)
        assert out.last_hidden_state.shape == (2, n + 1, 64) and out.rois.shape == (2, n, 4)
        assert elastic.get_feature_tokens(pixels, -2, num_latent_tokens=n).shape == (2, n + 1, 64)
        torch.testing.assert_close(elastic.initial_roi_table(n), _initial_rois(n))  # each starts on its own grid
    default, nine = elastic(pixels).last_hidden_state, elastic(pixels, num_latent_tokens=9).last_hidden_state
    torch.testing.assert_close(default, nine)
    # Only the RoI tables depend on N: one table per budget, nothing else added.
    fixed = mllm_sparse.create_model("test_sparseformer_btsp")
    extra = set(elastic.state_dict()) - set(fixed.state_dict())
    assert extra == {f"initial_rois.{n}.weight" for n in BUDGETS}
    assert set(fixed.state_dict()) - set(elastic.state_dict()) == {"initial_roi.weight"}


def test_image_features_computed_once_serve_every_budget_with_the_same_outputs_and_gradients(elastic):
    pixels = torch.randn(2, 3, 64, 64)

    def loss_and_grads(shared: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        elastic.zero_grad(set_to_none=True)
        features = elastic.image_features(pixels) if shared else None
        loss = sum(
            elastic(pixels, num_latent_tokens=n, image_features=features).image_embeds.square().sum() for n in BUDGETS
        )
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in elastic.named_parameters() if p.grad is not None}

    (once, grads_once), (each, grads_each) = loss_and_grads(True), loss_and_grads(False)
    torch.testing.assert_close(once, each)
    assert grads_once.keys() == grads_each.keys() and any(k.startswith("feat_extractor.") for k in grads_once)
    for key in grads_once:
        torch.testing.assert_close(grads_once[key], grads_each[key], msg=key)
    other = torch.randn(2, 3, 64, 64)  # the features, not the pixels, are what the tokens sample
    with torch.no_grad():
        given = elastic(pixels, num_latent_tokens=4, image_features=elastic.image_features(other)).last_hidden_state
        torch.testing.assert_close(given, elastic(other, num_latent_tokens=4).last_hidden_state)


def test_an_unlisted_budget_is_refused_with_the_list(elastic):
    with pytest.raises(ValueError, match=r"num_latent_tokens=16: this elastic encoder serves \[4, 9, 15\]"):
        elastic(torch.randn(1, 3, 32, 32), num_latent_tokens=16)
    fixed = mllm_sparse.create_model("test_sparseformer_btsp")
    with pytest.raises(ValueError, match=r"num_latent_tokens=9: this fixed-budget encoder serves only \[15\]"):
        fixed(torch.randn(1, 3, 32, 32), num_latent_tokens=9)
    with pytest.raises(ValueError, match=r"default budget num_latent_tokens=16 is not among the budgets \[4, 9, 15\]"):
        mllm_sparse.create_model("test_sparseformer_btsp", budgets=BUDGETS, num_latent_tokens=16)
    with pytest.raises(ValueError, match="needs same_token_embedding=True"):
        mllm_sparse.create_model("test_sparseformer_v1", budgets=[9], num_latent_tokens=9)


@torch.no_grad()
def test_make_elastic_keeps_the_fixed_budget_exactly(btsp_model):
    pixels = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        btsp_model.initial_roi.weight.add_(0.01)  # learned RoIs, off the grid
    elastic = make_elastic(btsp_model, [4, 15, 9])
    assert elastic.budgets == BUDGETS and elastic.config.num_latent_tokens == 15
    fixed_out, elastic_out = btsp_model(pixels), elastic(pixels, num_latent_tokens=15)
    assert torch.equal(fixed_out.last_hidden_state, elastic_out.last_hidden_state)
    assert torch.equal(fixed_out.image_embeds, elastic_out.image_embeds)
    torch.testing.assert_close(elastic.initial_roi_table(4), _initial_rois(4))
    assert elastic(pixels, num_latent_tokens=4).last_hidden_state.shape == (2, 5, 64)
    assert make_elastic(btsp_model, [4, 12, 9]).config.num_latent_tokens == 12  # the largest when 15 is dropped


def test_save_then_load_in_a_fresh_process_serves_every_budget(elastic, tmp_path):
    elastic.save_pretrained(tmp_path / "enc")
    code = f"""
import torch, mllm_sparse
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path / "enc")!r}).eval()
pixels = torch.randn(1, 3, 64, 64)
with torch.no_grad():
    shapes = [tuple(model(pixels, num_latent_tokens=n).rois.shape) for n in model.budgets]
default = AutoModel.from_pretrained({str(tmp_path / "enc")!r}, num_latent_tokens=4).config.num_latent_tokens
try:
    AutoModel.from_pretrained({str(tmp_path / "enc")!r}, num_latent_tokens=5)
except ValueError as err:
    refused = str(err)
print(shapes, default, refused)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == (
        "[(1, 4, 4), (1, 9, 4), (1, 15, 4)] 4 SparseFormerConfig: the default budget num_latent_tokens=5 is not "
        "among the budgets [4, 9, 15]"
    )
    reloaded = SparseFormerModel.from_pretrained(tmp_path / "enc")
    for n in BUDGETS:
        assert torch.equal(reloaded.initial_roi_table(n), elastic.initial_roi_table(n))


def test_budgets_from_numpy_or_torch_save_as_plain_numbers(btsp_model, tmp_path):
    """A sweep's budgets often come as numpy or torch integers; the config stores plain ints, so it saves as JSON."""
    import json

    import numpy as np

    elastic = make_elastic(btsp_model, np.array([4, 9, 15]), default=np.int64(9))
    elastic.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["budgets"], saved["num_latent_tokens"]) == (BUDGETS, 9)
    assert make_elastic(btsp_model, torch.tensor([4, 9])).config.budgets == [4, 9]

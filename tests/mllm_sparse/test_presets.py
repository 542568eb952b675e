import pytest

import mllm_sparse
from mllm_sparse import OFFICIAL_PRESETS

OFFICIAL = {
    # name: (latent tokens, total tokens, units, final width, proj_dim)
    "sparseformer_v1_tiny": (49, 49, 9, 512, 1000),
    "sparseformer_v1_small": (64, 64, 9, 640, 1000),
    "sparseformer_v1_base": (81, 81, 11, 768, 1000),
    "sparseformer_btsp_augreg_base": (48, 49, 10, 768, 1000),
    "sparseformer_btsp_augreg_large": (48, 49, 18, 1024, 1000),
    "sparseformer_btsp_openai_clip_base": (48, 49, 10, 768, 512),
    "sparseformer_btsp_openai_clip_large": (63, 64, 18, 1024, 768),
}


def test_list_models_has_every_official_preset_and_the_test_presets():
    assert set(OFFICIAL) == set(OFFICIAL_PRESETS)
    assert set(mllm_sparse.list_models()) == set(OFFICIAL) | {"test_sparseformer_btsp", "test_sparseformer_v1"}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_preset_configs(name):
    cfg = mllm_sparse.preset_config(name)
    latent, total, units, width, proj = OFFICIAL[name]
    assert (cfg.num_latent_tokens, cfg.num_tokens, cfg.num_units, cfg.hidden_size, cfg.proj_dim) == (
        latent,
        total,
        units,
        width,
        proj,
    )


def test_bootstrapped_clip_large_layout():
    cfg = mllm_sparse.preset_config("sparseformer_btsp_openai_clip_large")
    assert cfg.ops_list[0] == ["SAMPLING_M", "PE_INJECT", "ATTN", "MLP", "ROI_ADJ"]
    assert cfg.ops_list[1] == ["SAMPLING_M", "PE_INJECT"]
    assert cfg.ops_list[2:] == [["ATTN", "MLP"]] * 16
    assert cfg.repeats[0] == 4 and cfg.width_configs[:2] == [512, 1024]
    assert cfg.cls_token_insert_layer == 2 and cfg.clip_quick_gelu and not cfg.proj_bias
    assert cfg.num_sampling_points == 16 and cfg.pg_inner_dim == 128


def test_num_tokens_counts_cls():
    cfg = mllm_sparse.preset_config("sparseformer_btsp_openai_clip_large", num_tokens=64)
    assert (cfg.num_latent_tokens, cfg.num_tokens) == (63, 64)
    cfg = mllm_sparse.preset_config("sparseformer_btsp_openai_clip_base", num_tokens=16)
    assert (cfg.num_latent_tokens, cfg.num_tokens) == (15, 16)
    cfg = mllm_sparse.preset_config("sparseformer_v1_tiny", num_tokens=36)  # no CLS in v1
    assert (cfg.num_latent_tokens, cfg.num_tokens) == (36, 36)
    cfg = mllm_sparse.preset_config("sparseformer_btsp_openai_clip_base", num_latent_tokens=20)
    assert cfg.num_tokens == 21


def test_create_model_with_num_tokens_outputs_that_many_tokens():
    import torch

    model = mllm_sparse.create_model("test_sparseformer_btsp", num_tokens=10)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.last_hidden_state.shape[1] == 10 and out.rois.shape[1] == 9


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown SparseFormer preset 'sparseformer_huge'.*sparseformer_v1_tiny"):
        mllm_sparse.create_model("sparseformer_huge")


def test_unknown_override_lists_valid_fields():
    with pytest.raises(ValueError, match=r"Unknown override\(s\) \['num_tokenz'\].*num_tokens"):
        mllm_sparse.create_model("test_sparseformer_btsp", num_tokenz=5)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_tokens=1), "num_tokens must be an int >= 2"),
        (dict(num_tokens=8, num_latent_tokens=7), "not both"),
        (dict(head_op="max"), "head_op"),
        (dict(grid_sample_padding="wrap"), "grid_sample_padding"),
        (dict(repeats=[1, 1]), "one entry per unit"),
        (dict(num_attention_heads=[3, 4, 4, 4]), "cannot split into 3 attention heads"),
        (dict(cls_token_insert_layer=1), "RoI ops must come before"),
        (dict(ops_list=[["SAMPLING_M"], ["FLY"], ["ATTN"], ["MLP"]]), "unknown op 'FLY'"),
    ],
)
def test_bad_overrides_fail_loudly(overrides, match):
    with pytest.raises(ValueError, match=match):
        mllm_sparse.create_model("test_sparseformer_btsp", **overrides)


def test_official_weights_only_for_official_presets():
    with pytest.raises(ValueError, match="pretrained='official' exists only for"):
        mllm_sparse.create_model("test_sparseformer_btsp", pretrained="official")

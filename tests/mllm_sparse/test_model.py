import pytest
import torch

import mllm_sparse
from mllm_sparse import SparseFormerModel


@pytest.mark.parametrize("height, width", [(64, 64), (48, 80), (33, 127), (224, 32), (8, 8)])
@pytest.mark.parametrize("preset", ["test_sparseformer_btsp", "test_sparseformer_v1"])
def test_shapes_for_any_size_and_aspect_ratio(preset, height, width):
    model = mllm_sparse.create_model(preset)
    cfg = model.config
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width))
    assert out.image_embeds.shape == (2, cfg.proj_dim)
    assert out.last_hidden_state.shape == (2, cfg.num_tokens, cfg.hidden_size)
    assert out.pooler_output.shape == (2, cfg.hidden_size)
    assert out.rois.shape == (2, cfg.num_latent_tokens, 4)
    assert torch.isfinite(out.image_embeds).all() and torch.isfinite(out.rois).all()


def test_image_embeds_are_head_norm_proj_of_the_tokens(btsp_model, v1_model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = btsp_model(x)
        torch.testing.assert_close(out.image_embeds, btsp_model.proj(btsp_model.norm(out.last_hidden_state[:, 0])))
        out = v1_model(x)
        torch.testing.assert_close(out.image_embeds, v1_model.proj(v1_model.norm(out.last_hidden_state.mean(1))))


def test_cls_token_is_inserted_before_the_configured_unit(btsp_model):
    with torch.no_grad():
        out = btsp_model(torch.randn(1, 3, 64, 64), output_hidden_states=True)
    n = btsp_model.config.num_latent_tokens
    assert [h.shape[1] for h in out.hidden_states] == [n, n, n + 1, n + 1]
    assert [h.shape[2] for h in out.hidden_states] == [32, 64, 64, 64]
    assert len(out.hidden_rois) == 4
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    torch.testing.assert_close(out.hidden_rois[-1], out.rois)


def test_hidden_state_selection_by_index_keeps_only_those_and_stops_there(btsp_model):
    x = torch.randn(1, 3, 64, 64)
    ran = []
    hooks = [m.register_forward_hook(lambda *_, m=m: ran.append(m)) for m in (btsp_model.layers[-1], btsp_model.norm)]
    with torch.no_grad():
        full = btsp_model(x, output_hidden_states=True)
        assert ran == [btsp_model.layers[-1], btsp_model.norm]
        ran.clear()
        picked = btsp_model(x, output_hidden_states=-2)
    for hook in hooks:
        hook.remove()
    assert ran == []  # neither the last unit nor the head's norm ran
    assert [h is None for h in picked.hidden_states] == [True, True, False, True]
    assert [r is None for r in picked.hidden_rois] == [False, False, False, True]
    assert picked.last_hidden_state is None and picked.image_embeds is None and picked.pooler_output is None
    assert torch.equal(picked.hidden_states[-2], full.hidden_states[-2])
    assert torch.equal(picked.hidden_rois[-2], full.hidden_rois[-2])
    with pytest.raises(IndexError, match="out of range"):
        btsp_model(x, output_hidden_states=7)


@pytest.mark.parametrize("layer", [-1, -2, 1, 0])
def test_feature_tokens_stop_early_and_equal_hidden_states(btsp_model, layer):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = btsp_model(x, output_hidden_states=True)
        tokens = btsp_model.get_feature_tokens(x, layer)
    torch.testing.assert_close(tokens, full.hidden_states[layer])


def test_cortex_block_indexing(btsp_model, v1_model):
    assert btsp_model.cortex_start == 2 and v1_model.cortex_start == 2
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = btsp_model(x, output_hidden_states=True)
        torch.testing.assert_close(btsp_model.get_feature_tokens(x, btsp_model.cortex_start), full.hidden_states[2])
    assert mllm_sparse.preset_config("sparseformer_btsp_openai_clip_large").cortex_start == 2


def test_feature_tokens_skip_later_units(btsp_model):
    calls = []
    last = btsp_model.layers[-1]
    handle = last.register_forward_hook(lambda *a: calls.append(1))
    btsp_model.get_feature_tokens(torch.randn(1, 3, 64, 64), -2)
    handle.remove()
    assert calls == []
    with pytest.raises(IndexError):
        btsp_model.get_feature_tokens(torch.randn(1, 3, 64, 64), 4)


def test_tuple_output_when_return_dict_false(btsp_model):
    out = btsp_model(torch.randn(1, 3, 64, 64), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, btsp_model.config.proj_dim)


@pytest.mark.parametrize("preset", ["test_sparseformer_btsp", "test_sparseformer_v1"])
def test_gradients_reach_rois_sampling_offsets_and_mixing(preset):
    model = mllm_sparse.create_model(preset).train()
    # Zero-initialised output layers would block gradients to everything before them; perturb them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "roi_adjust_module" in name or "roi_offset_module" in name or "parameter_generator.2" in name:
                p.add_(torch.randn_like(p) * 0.05)
    out = model(torch.randn(2, 3, 64, 64))
    (out.image_embeds.square().sum() + out.rois.sum()).backward()
    must_learn = ["initial_roi.weight", "initial_embedding.weight", "feat_extractor.conv1.weight"]
    for unit in (0, 1) if preset.endswith("btsp") else (0, 1):
        prefix = f"layers.{model.unit_layer_indices[unit]}."
        must_learn += [
            prefix + "roi_offset_bias",
            prefix + "roi_offset_module.1.weight",
            prefix + "adaptive_mixing.parameter_generator.2.weight",
            prefix + "adaptive_mixing.out_proj.weight",
        ]
    must_learn.append(
        f"layers.{model.unit_layer_indices[0]}.roi_adjust_module.{3 if preset.endswith('btsp') else 1}.weight"
    )
    params = dict(model.named_parameters())
    for name in must_learn:
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_no_gradient_flows_through_position_encoding():
    model = mllm_sparse.create_model("test_sparseformer_btsp")
    # Make the RoIs influence the output only through PE_INJECT: freeze sampling by zeroing the feature map path.
    rois = torch.rand(1, model.config.num_latent_tokens, 4, requires_grad=True)
    unit = model.layers[0]
    tokens = torch.randn(1, model.config.num_latent_tokens, 32)
    unit.ops = ("PE_INJECT",)
    out, _, _ = unit(torch.zeros(1, 16, 4, 4), tokens, rois)
    assert not out.requires_grad or out.grad_fn is not None
    out.sum().backward() if out.requires_grad else None
    assert rois.grad is None


def test_drop_path_only_in_training():
    model = mllm_sparse.create_model("test_sparseformer_v1", drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        model.eval()
        a, b = model(x).image_embeds, model(x).image_embeds
        torch.testing.assert_close(a, b)
        model.train()
        c = model(x).image_embeds
    assert not torch.allclose(a, c)


def test_bf16_autocast_runs_and_stays_close(btsp_model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = btsp_model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = btsp_model(x)
    assert low.rois.dtype == torch.float32  # RoI geometry stays in fp32
    cos = torch.nn.functional.cosine_similarity(low.image_embeds.float(), ref.image_embeds, dim=-1)
    assert (cos > 0.98).all()


def test_bf16_weights_run(btsp_model):
    model = btsp_model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.image_embeds.dtype == torch.bfloat16 and torch.isfinite(out.image_embeds.float()).all()


def test_torch_compile_matches_eager(btsp_model):
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(btsp_model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).image_embeds, btsp_model(x).image_embeds)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(64, 64), r"\[B, 3, H, W\]"),
        (torch.randn(1, 4, 64, 64), r"\[B, 3, H, W\]"),
        (torch.randn(3, 64, 64), r"\[B, 3, H, W\]"),
        (torch.randn(0, 3, 64, 64), "empty"),
    ],
)
def test_bad_pixel_values_raise_clearly(btsp_model, bad, match):
    with pytest.raises(ValueError, match=match):
        btsp_model(bad)


def test_unknown_forward_argument_is_an_error(btsp_model):
    with pytest.raises(TypeError, match="unexpected"):
        btsp_model(torch.randn(1, 3, 64, 64), output_everything=True)


def test_what_transformers_passes_to_a_vision_tower_is_accepted(btsp_model):
    # LlavaModel forwards its TransformersKwargs to the tower; the Trainer's num_items_in_batch is among them.
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = btsp_model(pixels).last_hidden_state
        passed = btsp_model(pixels, num_items_in_batch=torch.tensor(7), output_attentions=False).last_hidden_state
    torch.testing.assert_close(passed, plain)


def test_fresh_init_follows_the_reference_scheme():
    model = mllm_sparse.create_model("test_sparseformer_btsp")
    rois = model.initial_roi.weight
    # 15 latent tokens: a 3x3 grid of half-size boxes, the other 6 cover the image.
    torch.testing.assert_close(rois[0], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    torch.testing.assert_close(rois[8], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(rois[9:], torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(6, 1))
    unit = model.layers[0]
    assert unit.roi_adjust_module[-1].weight.abs().sum() == 0
    torch.testing.assert_close(unit.roi_offset_bias.view(9, 2)[0], torch.tensor([-1 / 3, -1 / 3]))
    assert isinstance(model, SparseFormerModel)


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """LayerNorm written out: (x − mean) / sqrt(biased var + eps) · weight + bias."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


@pytest.mark.parametrize("head_op", ["cls", "avg", "latent_avg", "map"])
def test_every_head_pools_the_tokens_as_written_out_by_hand(head_op, one_thread):
    """Each `head_op` on a model with a CLS token (first): which tokens it reads and in which order it normalises."""
    model = mllm_sparse.create_model("test_sparseformer_btsp", head_op=head_op).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial LayerNorm affine and head weights
            p.normal_(0, 0.5)
    tokens = torch.randn(2, 5, model.config.hidden_size)
    cls, latent = tokens[:, 0], tokens[:, 1:]
    if head_op == "cls":
        expected = _layer_norm(cls, model.norm)
    elif head_op == "avg":
        expected = _layer_norm(tokens.mean(1), model.norm)
    elif head_op == "latent_avg":
        expected = _layer_norm(latent, model.norm).mean(1)  # normed per token, CLS left out
    else:
        head, normed = model.head, _layer_norm(tokens, model.norm)
        dim, heads = normed.shape[-1], head.num_heads
        w, b = head.qkv.weight, head.qkv.bias
        q = head.probe[0, 0] @ w[:dim].T + b[:dim]
        k = normed @ w[dim : 2 * dim].T + b[dim : 2 * dim]
        v = normed @ w[2 * dim :].T + b[2 * dim :]
        step = dim // heads
        outs = []
        for h in range(heads):
            part = slice(h * step, (h + 1) * step)
            weights = torch.softmax(k[..., part] @ q[part] / step**0.5, dim=-1)  # [B, T] over all 5 tokens
            outs.append(torch.einsum("bt,btc->bc", weights, v[..., part]))
        pooled = head.proj(torch.cat(outs, -1))
        expected = pooled + head.mlp(_layer_norm(pooled, head.norm))
    with torch.no_grad():
        torch.testing.assert_close(model.pool(tokens), expected, atol=1e-5, rtol=1e-5)
        # the forward's image embedding is the projection of exactly this pooled summary
        out = model(torch.randn(1, 3, 48, 64))
        torch.testing.assert_close(out.image_embeds, model.proj(model.pool(out.last_hidden_state)))

"""Inheritance from tiny open_clip and HF CLIP teachers that the tests build and save themselves."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, SiglipVisionConfig, SiglipVisionModel

import bootstrap
from bootstrap import inherit, load_teacher
from bootstrap.converters import (
    hf_clip_visual_to_sparseformer,
    open_clip_visual_to_hf_clip_vision,
    open_clip_visual_to_sparseformer,
)
from bootstrap.teacher_models import MODEL_CONFIG_DIR

NAME = "synth-vit-test-16"  # 3 blocks, width 64, 2 heads, 64 px


@torch.no_grad()
def perturb_vectors(model):
    """Non-trivial LayerNorm and bias values (they start at 1 and 0), so a mixed-up mapping shows."""
    for p in model.parameters():
        if p.ndim == 1:
            p.add_(torch.randn_like(p) * 0.1)
    return model


def saved_open_clip_teacher(name: str, folder: Path):
    torch.manual_seed(0)
    model = perturb_vectors(open_clip.create_model(name))
    save_file(model.state_dict(), folder / "teacher.safetensors")
    return load_teacher(f"open_clip:{name}@{folder / 'teacher.safetensors'}")


@pytest.fixture(scope="module")
def open_clip_teacher(tmp_path_factory):
    return saved_open_clip_teacher(NAME, tmp_path_factory.mktemp("oc"))


@pytest.fixture(scope="module")
def open_clip_avg_teacher(tmp_path_factory):
    """The tiny teacher with open_clip's average pooling (as the synthetic-world teacher)."""
    folder = tmp_path_factory.mktemp("oc_avg")
    config = json.loads((MODEL_CONFIG_DIR / f"{NAME}.json").read_text())
    config["vision_cfg"]["pool_type"] = "avg"
    (folder / f"{NAME}-avg.json").write_text(json.dumps(config))
    bootstrap.register_teacher_configs()
    open_clip.add_model_config(folder / f"{NAME}-avg.json")
    return saved_open_clip_teacher(f"{NAME}-avg", folder)


# The tiny HF vision towers share their shape; each teacher adds its own family's fields.
TINY_VISION = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4, image_size=64, patch_size=16
)


def saved_hf_teacher(model, out):
    model.save_pretrained(out)
    return load_teacher(f"hf:{out}")


@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory):
    torch.manual_seed(1)
    config = CLIPVisionConfig(**TINY_VISION, projection_dim=32, hidden_act="quick_gelu")
    model = perturb_vectors(CLIPVisionModelWithProjection(config))
    return saved_hf_teacher(model, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def siglip_teacher(tmp_path_factory):
    """A tiny SigLIP vision tower: no CLS token, tanh-GELU, an attention-pooling head, no projection."""
    torch.manual_seed(2)
    config = SiglipVisionConfig(**TINY_VISION, layer_norm_eps=1e-6)
    model = perturb_vectors(SiglipVisionModel(config))
    with torch.no_grad():
        model.head.probe.normal_()
    return saved_hf_teacher(model, tmp_path_factory.mktemp("siglip"))


TEACHERS = ["open_clip_teacher", "open_clip_avg_teacher", "hf_teacher", "siglip_teacher"]


@pytest.mark.parametrize("which", TEACHERS)
def test_inherited_cortex_and_head_reproduce_the_teacher(which, request):
    teacher = request.getfixturevalue(which)
    arch = teacher.arch
    student, report = inherit(teacher, num_latent_tokens=8)
    first = arch.layers // 3
    assert list(report.layer_map) == list(range(first, arch.layers))
    pixels = torch.randn(2, 3, arch.image_size, arch.image_size)
    with torch.no_grad():
        x = teacher.tokens(pixels, first - 1) if first > 0 else None
        expected_final = teacher.tokens(pixels, -1)
        # Each inherited block, fed the teacher's tokens, gives exactly the teacher block's output.
        for k, (teacher_block, layer) in enumerate(report.layer_map.items()):
            x = student.layers[layer](None, x, None)[0]
            torch.testing.assert_close(x, teacher.tokens(pixels, teacher_block), atol=1e-5, rtol=1e-5, msg=f"block {k}")
        torch.testing.assert_close(x, expected_final, atol=1e-5, rtol=1e-5)
        # The inherited head maps the teacher's final tokens (its CLS, the mean of its patch tokens for an
        # average-pooled teacher, SigLIP's attention pool) to the teacher's embedding.
        assert student.config.head_op == {"cls": "cls", "avg": "latent_avg", "map": "map"}[arch.pool]
        embeds = student.proj(student.pool(expected_final))
        torch.testing.assert_close(embeds, teacher.encode_image(pixels), atol=1e-5, rtol=1e-5)


def test_student_config_follows_the_teacher(hf_teacher, open_clip_teacher):
    student, _ = inherit(hf_teacher, num_latent_tokens=8)
    cfg = student.config
    assert cfg.clip_quick_gelu and cfg.num_tokens == 9 and cfg.proj_dim == 32 and not cfg.proj_bias
    assert cfg.width_configs == [32, 64, 64, 64, 64, 64] and cfg.num_units == 6  # 4 of 6 blocks in the cortex
    assert cfg.num_attention_heads[2:] == [4, 4, 4, 4]
    student, _ = inherit(open_clip_teacher, num_latent_tokens=5)
    assert not student.config.clip_quick_gelu and student.config.num_units == 4  # 2 of 3 blocks
    with torch.no_grad():
        assert student(torch.randn(1, 3, 64, 64)).last_hidden_state.shape == (1, 6, 64)


def test_freeze_policy_really_freezes(hf_teacher):
    student, report = inherit(hf_teacher, num_latent_tokens=8)
    cortex = list(report.layer_map.values())
    trained_layers = {int(n.split(".")[1]) for n in report.trained if n.startswith("layers.")}
    frozen_layers = {int(n.split(".")[1]) for n in report.frozen if n.startswith("layers.")}
    assert frozen_layers == set(cortex[2:]) and set(cortex[:2]) <= trained_layers
    assert "norm.weight" in report.frozen and "proj.weight" in report.frozen
    assert set(report.new) & set(report.inherited) == set()
    assert "layers.0.adaptive_mixing.out_proj.weight" in report.new
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    out = student.train()(torch.randn(2, 3, 64, 64))
    out.image_embeds.sum().backward()
    optimizer.step()
    frozen = dict(student.named_parameters())
    for name in report.frozen:
        assert frozen[name].grad is None and frozen[name] not in optimizer.state
    assert all(p in optimizer.state for p in params if p.grad is not None)


def test_converters_refuse_unknown_keys_and_missing_blocks(open_clip_teacher, hf_teacher):
    state = open_clip_teacher.model.visual.state_dict()
    with pytest.raises(KeyError, match="unexpected key 'attnpool.weight'"):
        open_clip_visual_to_sparseformer({**state, "attnpool.weight": torch.zeros(1)}, {1: 3})
    with pytest.raises(KeyError, match=r"no weights for teacher block\(s\) \[7\]"):
        open_clip_visual_to_sparseformer(state, {7: 3})
    hf_state = hf_teacher.model.state_dict()
    out = hf_clip_visual_to_sparseformer(hf_state, {5: 9})
    assert out["layers.9.attn.qkv.weight"].shape == (192, 64)
    assert set(out) == {
        f"layers.9.{k}"
        for k in (
            "norm1.weight",
            "norm1.bias",
            "attn.qkv.weight",
            "attn.qkv.bias",
            "attn.proj.weight",
            "attn.proj.bias",
            "norm2.weight",
            "norm2.bias",
            "mlp.fc1.weight",
            "mlp.fc1.bias",
            "mlp.fc2.weight",
            "mlp.fc2.bias",
        )
    } | {"norm.weight", "norm.bias", "proj.weight"}


def test_a_dual_tower_checkpoint_gives_only_its_vision_side(hf_teacher):
    """A full HF CLIP checkpoint carries the text tower, its projection and the logit scale: all are left out."""
    vision = hf_teacher.model.state_dict()  # vision_model.* and visual_projection.*
    text = {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2), "text_projection.weight":
            torch.zeros(2, 2), "logit_scale": torch.zeros(()), "logit_bias": torch.zeros(())}  # fmt: skip
    plain = hf_clip_visual_to_sparseformer(hf_teacher.model.state_dict(), {5: 9})
    both = hf_clip_visual_to_sparseformer({**vision, **text}, {5: 9})
    assert plain.keys() == both.keys() and all(torch.equal(plain[k], both[k]) for k in plain)


def test_a_batched_positional_embedding_converts_as_the_plain_one(open_clip_teacher):
    """Some exports keep open_clip's positional embedding as [1, P, C]: the HF tower gets the same [P, C] table."""
    state = open_clip_teacher.model.visual.state_dict()
    plain = open_clip_visual_to_hf_clip_vision(state)
    batched = open_clip_visual_to_hf_clip_vision({**state, "positional_embedding": state["positional_embedding"][None]})
    assert plain.keys() == batched.keys()
    for key in plain:
        assert torch.equal(plain[key], batched[key]), key


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("clip-L", ValueError, "must look like"),
        ("open_clip:ViT-Nope", ValueError, "open_clip has no model 'ViT-Nope'"),
        ("open_clip:ViT-B-16@/no/such/file.pt", ValueError, "neither a file nor an open_clip tag"),
        ("hf:/no/such/dir", RuntimeError, "Offline, point at a local folder"),
    ],
)
def test_bad_teacher_specs(spec, error, match):
    with pytest.raises(error, match=match):
        load_teacher(spec)


def test_open_clip_teacher_exposes_preprocessing_and_text(open_clip_teacher):
    arch = open_clip_teacher.arch
    assert (arch.layers, arch.width, arch.heads, arch.patch_size, arch.num_patches) == (3, 64, 2, 16, 16)
    assert len(arch.mean) == 3 and arch.image_size == 64
    text = open_clip_teacher.encode_text(["a red circle", "a blue square"])
    assert text.shape == (2, 32)
    assert bootstrap.TeacherArch is type(arch)


@pytest.mark.parametrize("which", ["open_clip_teacher", "hf_teacher", "siglip_teacher"])
def test_hf_vision_tower_reproduces_the_teacher_tokens(which, request):
    """The full-token LLaVA baseline tower (HF CLIP, key-table converted from open_clip; HF SigLIP) gives the
    teacher's tokens exactly."""
    teacher = request.getfixturevalue(which)
    tower = teacher.to_hf_vision()
    pixels = torch.randn(2, 3, teacher.arch.image_size, teacher.arch.image_size)
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        for layer in (0, teacher.arch.layers - 2, teacher.arch.layers - 1):
            torch.testing.assert_close(hidden[layer + 1], teacher.tokens(pixels, layer), rtol=1e-4, atol=1e-5)


def test_siglip_student_has_no_cls_and_inherits_the_pooling_head(siglip_teacher):
    arch = siglip_teacher.arch
    assert (arch.has_cls, arch.pool, arch.act, arch.proj_dim, arch.mean) == (
        False,
        "map",
        "gelu_tanh",
        None,
        (0.5,) * 3,
    )
    student, report = inherit(siglip_teacher, num_latent_tokens=9)
    cfg = student.config
    assert not cfg.has_cls_token and cfg.num_tokens == 9 and cfg.gelu_approximate == "tanh" and cfg.proj_dim is None
    assert report.initialised_from_teacher == [] and "head.probe" in report.inherited
    assert {"head.probe", "head.qkv.weight", "norm.weight"} <= set(report.frozen)
    with torch.no_grad():
        out = student(torch.randn(2, 3, 64, 64))
    assert out.last_hidden_state.shape == (2, 9, 64) and out.image_embeds.shape == (2, 64)
    assert siglip_teacher.patch_tokens(torch.randn(1, 3, 64, 64)).shape == (1, 16, 64)  # no CLS to drop
    with pytest.raises(ValueError, match="no text tower"):
        siglip_teacher.encode_text(["a red circle"])


@pytest.mark.parametrize("which", TEACHERS)
def test_students_save_and_reload(which, request, tmp_path):
    student, _ = inherit(request.getfixturevalue(which), num_latent_tokens=4)
    student.save_pretrained(tmp_path)
    reloaded = type(student).from_pretrained(tmp_path)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).image_embeds, student(pixels).image_embeds)


@pytest.mark.parametrize("which", ["open_clip_teacher", "hf_teacher"])
def test_patch_tokens_are_the_tokens_after_the_cls_token(which, request):
    """The token and region terms' targets: a CLS teacher's 16 patch tokens, never its CLS token."""
    teacher = request.getfixturevalue(which)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        everything, patches = teacher.tokens(pixels, -1), teacher.patch_tokens(pixels)
    assert everything.shape[1] == 17 and patches.shape[1] == 16
    torch.testing.assert_close(patches, everything[:, 1:], rtol=0, atol=0)


def test_encode_text_gives_the_model_tokens_on_its_own_device(tmp_path, monkeypatch):
    """The tokenizer makes CPU tokens; on a GPU they must follow the weights (zero-shot scoring after a bootstrap).
    The meta device stands in for the GPU: it is where the weights are and where the tokenizer never puts tokens."""
    teacher = saved_open_clip_teacher(NAME, tmp_path)
    teacher.model.to("meta")
    seen = []
    monkeypatch.setattr(teacher.model, "encode_text", lambda tokens: seen.append(tokens.device))
    teacher.encode_text(["a red circle"])
    assert seen == [torch.device("meta")]

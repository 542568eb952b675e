"""A bootstrapped SparseFormer as the visual tower of a real open_clip CLIP: `clip.visual = OpenClipVisual(student)`."""

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import save_file

import bootstrap  # noqa: F401  (registers the teacher architectures)
from bootstrap import inherit, load_teacher
from mllm_sparse import OpenClipVisual, SparseFormerModel, preprocess

NAME = "synth-vit-test-16"  # 3 blocks, width 64, 2 heads, 64 px, 32-d joint space


@pytest.fixture(scope="module")
def clip_and_student(tmp_path_factory):
    """The open_clip CLIP a student was bootstrapped from, and the student saved and reloaded from its folder."""
    folder = tmp_path_factory.mktemp("oc_tower")
    torch.manual_seed(0)
    clip = open_clip.create_model(NAME).eval()
    save_file(clip.state_dict(), folder / "teacher.safetensors")
    student, _ = inherit(load_teacher(f"open_clip:{NAME}@{folder / 'teacher.safetensors'}"), num_latent_tokens=6)
    student.save_pretrained(folder / "encoder")
    return clip, SparseFormerModel.from_pretrained(folder / "encoder").eval()


@torch.no_grad()
def test_encode_image_and_the_clip_forward_use_the_sparseformer(clip_and_student):
    clip, student = clip_and_student
    pixels = torch.randn(3, 3, 64, 64)
    clip.visual = OpenClipVisual(student)
    expected = student(pixels).image_embeds
    assert clip.visual.output_dim == expected.shape[-1] == 32
    torch.testing.assert_close(clip.encode_image(pixels), expected)
    torch.testing.assert_close(clip.encode_image(pixels, normalize=True), F.normalize(expected, dim=-1))
    text = open_clip.get_tokenizer(NAME)(["a red star", "two blue rings", "a scene"])
    out = clip(pixels, text)  # CLIP.forward: both towers, normalised, with the logit scale
    torch.testing.assert_close(out[0], F.normalize(expected, dim=-1))
    assert out[1].shape == (3, 32)


@torch.no_grad()
def test_zero_shot_classifier_built_with_open_clip_helpers(clip_and_student):
    clip, student = clip_and_student
    clip.visual = OpenClipVisual(student)
    tokenizer = open_clip.get_tokenizer(NAME)
    classes, templates = ["star", "ring", "cross"], ["a photo of a {}.", "a {} in a scene."]
    classifier = open_clip.build_zero_shot_classifier(
        clip, tokenizer, classes, templates, num_classes_per_batch=2, device="cpu", use_tqdm=False
    )  # [D, K]
    pixels = torch.randn(4, 3, 64, 64)
    logits = clip.encode_image(pixels, normalize=True) @ classifier
    # The same classifier by hand: per class, the normalised mean of normalised template embeddings.
    by_hand = torch.stack(
        [
            F.normalize(clip.encode_text(tokenizer([t.format(c) for t in templates]), normalize=True).mean(0), dim=0)
            for c in classes
        ],
        dim=1,
    )
    torch.testing.assert_close(logits, F.normalize(student(pixels).image_embeds, dim=-1) @ by_hand)


def test_open_clip_preprocessing_is_the_encoders(clip_and_student):
    clip, student = clip_and_student
    clip.visual = OpenClipVisual(student)
    cfg = open_clip.get_model_preprocess_cfg(clip)
    config = student.config
    assert tuple(cfg["size"]) == (config.image_size, config.image_size)
    assert cfg["mean"] == tuple(config.image_mean) and cfg["std"] == tuple(config.image_std)
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    # At the encoder's own size open_clip's resize and crop do nothing: the pixels differ only by normalisation.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (config.image_size,) * 2 + (3,), dtype=np.uint8))
    ours = preprocess(image, config.image_size, config.image_mean, config.image_std, crop_pct=1.0)
    torch.testing.assert_close(transform(image), ours)


def test_lock_freezes_all_but_the_last_groups(clip_and_student):
    _, student = clip_and_student
    tower = OpenClipVisual(student)
    tower.lock()
    assert not any(p.requires_grad for p in tower.parameters())
    tower.lock(unlocked_groups=2)  # the last layer with norm and head, and the projection
    trainable = {name for name, p in tower.named_parameters() if p.requires_grad}
    last = student.unit_layer_indices[-1]
    assert trainable and all(
        n.startswith((f"encoder.layers.{last}.", "encoder.norm.", "encoder.proj.")) for n in trainable
    )
    assert any(n.startswith("encoder.proj.") for n in trainable)
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        tower.set_grad_checkpointing(True)
    with pytest.raises(TypeError, match="wraps a SparseFormerModel"):
        OpenClipVisual(torch.nn.Linear(2, 2))

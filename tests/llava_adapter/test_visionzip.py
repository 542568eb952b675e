"""The VisionZip-style tower: which patches it keeps, how it merges the rest, and a LLaVA model around it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from bad_files import run
from PIL import Image
from tiny_vlm import tiny_llm
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from llava_adapter.budgets import vlm_budget
from llava_adapter.token_regions import grid_boxes, image_token_regions
from llava_adapter.visionzip import (
    VisionZipConfig,
    VisionZipModel,
    cls_attention_and_keys,
    contextual_tokens,
    visionzip_select,
)


def clip_config(**changes) -> CLIPVisionConfig:
    """A 96-px CLIP ViT with 16-px patches: a 6×6 grid, 36 patch tokens + CLS."""
    return CLIPVisionConfig(**{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                               "num_attention_heads": 2, "image_size": 96, "patch_size": 16, **changes})  # fmt: skip


def test_the_contextual_share_is_visionzips():
    # VisionZip's published splits: 54 + 10 at 64, 108 + 20 at 128, 162 + 30 at 192
    assert [contextual_tokens(n) for n in (64, 128, 192)] == [10, 20, 30]
    assert [contextual_tokens(n) for n in (1, 2, 9, 16, 36)] == [0, 1, 1, 2, 6]


def test_it_keeps_the_most_attended_patches_and_merges_the_rest_by_key_similarity():
    """A constructed case: each image's CLS attention names its 14 dominant patches; the keys split the 22 others
    into two families, so each contextual token is the mean of one family (its target included)."""
    torch.manual_seed(0)
    batch, patches, width, n = 2, 36, 8, 16  # 14 dominant + 2 contextual
    features = torch.randn(batch, 1 + patches, width)
    dominant = [sorted(torch.randperm(patches)[:14].tolist()) for _ in range(batch)]
    attention = torch.rand(batch, patches) * 0.1
    for b, chosen in enumerate(dominant):
        attention[b, chosen] += 1.0 + torch.rand(len(chosen))  # any order among them: the output keeps patch order
    keys = torch.zeros(batch, patches, 4)
    for b in range(batch):
        rest = [p for p in range(patches) if p not in dominant[b]]
        # targets: every 11th remaining patch (22 // 2), i.e. rest[0] and rest[11]; family A joins rest[0]
        for i, p in enumerate(rest):
            keys[b, p] = torch.tensor([1.0, 0.1 * i, 0, 0]) if i < 11 else torch.tensor([0, 0.1 * i, 1.0, 0])
    tokens, assignment = visionzip_select(features, attention, keys, n)
    assert tokens.shape == (batch, 1 + n, width)
    for b in range(batch):
        rest = [p for p in range(patches) if p not in dominant[b]]
        expected = torch.cat([
            features[b, :1],
            features[b, 1:][dominant[b]],
            features[b, 1:][rest[:11]].mean(0, keepdim=True),
            features[b, 1:][rest[11:]].mean(0, keepdim=True),
        ])  # fmt: skip
        torch.testing.assert_close(tokens[b], expected)
        want = torch.empty(patches, dtype=torch.long)
        want[dominant[b]] = torch.arange(14)
        want[rest[:11]], want[rest[11:]] = 14, 15
        assert assignment[b].tolist() == want.tolist()


def test_the_cls_attention_is_the_layers_own():
    """The CLS row computed from a layer's queries and keys equals the attention HF's eager CLIP returns."""
    torch.manual_seed(0)
    vit = CLIPVisionModel(clip_config()).eval()
    vit.set_attn_implementation("eager")
    pixels = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = vit(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        for i, layer in enumerate(vit.encoder.layers):
            attention, keys = cls_attention_and_keys(layer, out.hidden_states[i])
            torch.testing.assert_close(attention, out.attentions[i].sum(dim=1)[:, 0, 1:])
            assert keys.shape == (2, 36, 16)


@pytest.mark.parametrize("n", [1, 9, 16, 36])
def test_the_tower_gives_exactly_n_tokens_at_the_layer_it_is_asked_for(n):
    torch.manual_seed(0)
    tower = VisionZipModel(VisionZipConfig(clip_config(), num_latent_tokens=16, budgets=[1, 9, 16, 36])).eval()
    pixels = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=[-2], num_latent_tokens=n)
        clip = tower.vit(pixel_values=pixels, output_hidden_states=True)
        layer = tower.vit.encoder.layers[-2]  # the layer that made hidden state -2
        attention, keys = cls_attention_and_keys(layer, clip.hidden_states[-3])
        expected, _ = visionzip_select(clip.hidden_states[-2], attention, keys, n)
    assert out.hidden_states[-2].shape == (2, 1 + n, 32) and out.hidden_states[-1] is None
    torch.testing.assert_close(out.hidden_states[-2], expected)
    assert out.last_hidden_state.shape == (2, 1 + n, 32)
    with pytest.raises(ValueError, match=r"num_latent_tokens=4: this visionzip tower serves \[1, 9, 16, 36\]"):
        tower(pixels, num_latent_tokens=4)
    with pytest.raises(ValueError, match="hidden state 0"):
        tower(pixels, output_hidden_states=[0])
    with pytest.raises(ValueError, match="between 1 and 36"):
        VisionZipConfig(clip_config(), num_latent_tokens=37)


def test_a_visionzip_llava_model_saves_reloads_in_a_fresh_process_and_generates(tokenizer, tmp_path, capsys):
    """Built by `build-vlm --reduction visionzip`, elastic over 4 and 9 tokens: the fresh process generates the same
    tokens at each budget, and the regions are the kept patches' cells and the merged groups' boxes."""
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(clip_config()).save_pretrained(tmp_path / "clip")
    llm = tmp_path / "llm"
    tiny_llm(tokenizer).save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    out = tmp_path / "vlm"
    args = ["build-vlm", "--encoder", f"hf:{tmp_path / 'clip'}", "--reduction", "visionzip", "--budgets", "4", "9",
            "--llm", str(llm), "--out", str(out)]  # fmt: skip
    assert run(capsys, *args) == 0
    assert "visionzip tower → 9 image tokens; elastic: 4, 9 latent tokens per call" in capsys.readouterr().out
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    image = Image.effect_noise((96, 96), 60).convert("RGB")
    image.save(tmp_path / "noise.png")
    expected = {}
    for n in (4, 9):
        batch = processor(images=[image], text=["<image>\nWhat is it?"], num_latent_tokens=n, return_tensors="pt")
        assert int((batch["input_ids"] == model.config.image_token_id).sum()) == n
        with vlm_budget(model, n):
            expected[n] = model.generate(**batch, max_new_tokens=4, do_sample=False).tolist()
            regions = image_token_regions(model, batch["pixel_values"])[0]
        cells = grid_boxes(6)
        dominant = n - contextual_tokens(n)
        kept = [int(((cells - box).abs().sum(dim=1) < 1e-6).nonzero()) for box in regions[:dominant]]
        assert kept == sorted(kept) and len(set(kept)) == dominant  # one patch cell each, in patch order
        merged = regions[dominant:]
        assert (merged[:, 2:] - merged[:, :2] >= 1 / 6 - 1e-6).all()  # each group covers at least its target cell
    code = f"""
import json, llava_adapter
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from llava_adapter.budgets import vlm_budget
model = AutoModelForImageTextToText.from_pretrained({str(out)!r}).eval()
processor = AutoProcessor.from_pretrained({str(out)!r})
image = Image.open({str(tmp_path / "noise.png")!r})
generated = {{}}
for n in (4, 9):
    batch = processor(images=[image], text=["<image>\\nWhat is it?"], num_latent_tokens=n, return_tensors="pt")
    with vlm_budget(model, n):
        generated[n] = model.generate(**batch, max_new_tokens=4, do_sample=False).tolist()
print(json.dumps([model.config.vision_config.model_type, generated]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    model_type, generated = json.loads(result.stdout.strip().splitlines()[-1])
    assert model_type == "visionzip"
    assert {int(k): v for k, v in generated.items()} == expected

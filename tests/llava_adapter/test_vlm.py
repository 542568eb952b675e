"""The LLaVA model and processor: build, save, reload in a fresh process, towers, swap, projector I/O."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from bad_files import one_line, poison, run, truncate
from PIL import Image
from tiny_vlm import LLM_SIZES, tiny_llm, tiny_vlm
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import mllm_sparse
from llava_adapter.llms import TINY_LLMS, load_llm
from llava_adapter.modeling import (
    build_vlm,
    default_feature_selection,
    load_projector,
    projector_state_dict,
    save_projector,
)
from llava_adapter.towers import LayerTokens, PooledVisionConfig, PooledVisionModel, layer_tokens, num_image_tokens
from llava_adapter.visionzip import VisionZipConfig
from mllm_sparse.elastic import make_elastic
from mllm_sparse_recipes.commands import swap


def red_image(size=(80, 40)) -> Image.Image:
    return Image.new("RGB", size, (220, 30, 30))


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear"])
def test_build_save_and_reload_in_a_fresh_process_then_generate(tokenizer, tmp_path, projector):
    model, processor = tiny_vlm(tokenizer, projector)
    n = model.config.image_seq_length
    # N from the encoder config: its 15 latent tokens, the CLS token dropped as LLaVA drops a ViT's
    assert n == model.model.vision_tower.config.num_latent_tokens == 15
    batch = processor(images=[red_image()], text=["<image>\nWhat colour is the circle?"], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == n
    expected = model.generate(**batch, max_new_tokens=6, do_sample=False)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    image_path = tmp_path / "red.png"
    red_image().save(image_path)
    code = f"""
import json, llava_adapter  # registers the SparseFormer, the pooled tower and the processor
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}).eval()
processor = AutoProcessor.from_pretrained({str(tmp_path)!r})
batch = processor(images=[Image.open({str(image_path)!r})], text=["<image>\\nWhat colour is the circle?"],
                  return_tensors="pt")
out = model.generate(**batch, max_new_tokens=6, do_sample=False)
print(json.dumps([type(model).__name__, type(processor).__name__, out.tolist()]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    model_class, processor_class, generated = json.loads(result.stdout.strip().splitlines()[-1])
    assert (model_class, processor_class) == ("LlavaForConditionalGeneration", "SparseLlavaProcessor")
    assert generated == expected.tolist()


def test_inside_llava_the_sparseformer_stops_at_the_layer_it_reads_with_identical_outputs(tokenizer):
    """LLaVA asks the tower for `hidden_states[-2]`: the last unit and the head never run, and the logits and the
    generated tokens are bit-identical to a tower that runs to the end."""
    model, processor = tiny_vlm(tokenizer)
    tower = model.model.vision_tower
    inputs = processor(images=[red_image()], text=["<image>\nWhat colour is it?"], return_tensors="pt")
    ran = []
    hook = tower.layers[-1].register_forward_hook(lambda *_: ran.append(1))
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert ran == []
    short_path = tower.forward
    tower.forward = lambda *args, output_hidden_states=None, **kwargs: short_path(
        *args, output_hidden_states=True, **kwargs
    )
    with torch.no_grad():
        full_logits = model(**inputs).logits
        full_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    hook.remove()
    assert ran  # the reference did run the last unit
    assert torch.equal(logits, full_logits)
    assert torch.equal(tokens, full_tokens)


def test_linear_projector_is_one_linear_map(tokenizer):
    model, _ = tiny_vlm(tokenizer, "linear")
    projector = model.model.multi_modal_projector
    x = torch.randn(3, projector.linear_1.in_features)
    combined = projector.linear_2.weight @ projector.linear_1.weight
    bias = projector.linear_2.weight @ projector.linear_1.bias + projector.linear_2.bias
    torch.testing.assert_close(projector(x), x @ combined.T + bias)


@pytest.mark.parametrize(
    ("family", "config"), [(Qwen2ForCausalLM, Qwen2Config), (Phi3ForCausalLM, Phi3Config)], ids=["qwen2", "phi3"]
)
def test_other_llm_families_build_save_reload_and_generate(tokenizer, tmp_path, family, config):
    model, processor = tiny_vlm(tokenizer, family=family, config=config)
    batch = processor(images=[red_image()], text=["<image>\nWhat colour?"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded.model.language_model).__name__ == family.__name__.replace("ForCausalLM", "Model")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits)
    generated = reloaded.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    prompt = batch["input_ids"]
    assert torch.equal(generated[:, : prompt.shape[1]], prompt) and generated.shape[1] == prompt.shape[1] + 4


def test_placeholder_count_that_does_not_match_fails_clearly(tokenizer):
    model, processor = tiny_vlm(tokenizer)
    pixels = processor(images=[red_image()], text=["<image>"], return_tensors="pt")["pixel_values"]
    image_id = model.config.image_token_id
    wrong = torch.tensor([[image_id] * (model.config.image_seq_length - 1) + [5, 6]])
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=wrong, pixel_values=pixels)


def test_processor_takes_n_from_the_tower_not_a_patch_formula(tokenizer):
    """A 64-px tower with patch-free tokens: LLaVA's formula would give (64 // 14)**2 = 16 only by accident."""
    model, _ = tiny_vlm(tokenizer)
    vision = model.config.vision_config
    assert num_image_tokens(vision, -2, "full") == vision.num_latent_tokens + 1
    assert num_image_tokens(vision, -2, "default") == vision.num_latent_tokens
    with pytest.raises(ValueError, match="no CLS token to drop"):
        num_image_tokens(vision, 0, "default")  # before the CLS token is inserted
    # By default the CLS token is dropped where the layer has one, and every token kept where it has none
    assert default_feature_selection(vision) == (-2, "default")
    assert default_feature_selection(vision, -vision.num_units) == (-vision.num_units, "full")
    clip = CLIPVisionConfig(image_size=64, patch_size=16)
    assert num_image_tokens(clip, -2, "default") == 16
    assert num_image_tokens(PooledVisionConfig(clip, num_latent_tokens=4), -2, "default") == 4


def test_pooled_tower_averages_patch_grids():
    torch.manual_seed(0)
    clip = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16
    )
    tower = PooledVisionModel(PooledVisionConfig(clip, num_latent_tokens=4)).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = tower.vit(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        pooled = tower(pixel_values=pixels, output_hidden_states=-2).hidden_states[-2]
    grid = full[:, 1:].reshape(2, 4, 4, 32)
    top_left = grid[:, :2, :2].mean(dim=(1, 2))
    assert pooled.shape == (2, 5, 32)
    torch.testing.assert_close(pooled[:, 0], full[:, 0])
    torch.testing.assert_close(pooled[:, 1], top_left)
    with pytest.raises(ValueError, match="square number"):
        PooledVisionConfig(clip, num_latent_tokens=5)
    assert PooledVisionConfig(clip, num_latent_tokens=16).num_latent_tokens == 16  # the whole 4×4 grid: no pooling
    with pytest.raises(ValueError, match="a 5×5 grid cannot pool a 4×4 patch grid"):
        PooledVisionConfig(clip, num_latent_tokens=25)


def test_projector_round_trip_and_wrong_sizes(tokenizer, tmp_path):
    model, _ = tiny_vlm(tokenizer)
    path = save_projector(projector_state_dict(model), model.config, tmp_path)
    other, _ = tiny_vlm(tokenizer)
    with torch.no_grad():
        other.model.multi_modal_projector.linear_1.weight.zero_()
    load_projector(other, path)
    for key, value in projector_state_dict(model).items():
        torch.testing.assert_close(projector_state_dict(other)[key], value)
    state = model.model.multi_modal_projector.state_dict()
    # wrong sizes name the file (haotian-liu/LLaVA's own key layout: tests/llava_adapter/test_loaders.py)
    wrong = {f"model.multi_modal_projector.{k}": torch.zeros(3, *v.shape[1:]) for k, v in state.items()}
    from safetensors.torch import save_file

    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="wrong.safetensors.*shape mismatch"):
        load_projector(other, tmp_path / "wrong.safetensors")


def make_llava_hf(tokenizer, folder):
    """A tiny checkpoint in the llava-hf layout (CLIP tower, LlavaProcessor), made with transformers' own classes."""
    torch.manual_seed(0)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    clip = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256, **LLM_SIZES)
    config = LlavaConfig(
        vision_config=clip, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>")
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default"
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


def test_swap_keeps_llm_and_tokenizer_and_says_projector_is_untrained(tokenizer, tmp_path, capsys):
    source = make_llava_hf(tokenizer, tmp_path / "llava-hf")
    encoder_dir = tmp_path / "encoder"
    mllm_sparse.create_model("test_sparseformer_btsp").save_pretrained(encoder_dir)
    out = tmp_path / "swapped"
    assert swap.main(["--llava", str(tmp_path / "llava-hf"), "--encoder", str(encoder_dir), "--out", str(out)]) == 0
    assert "UNTRAINED" in capsys.readouterr().out
    assert "stage-1" in json.loads((out / "swap_report.json").read_text())["projector"]
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.vision_config.model_type == "sparseformer"
    assert model.config.image_seq_length == processor.num_image_tokens == 15
    for name, value in source.model.language_model.state_dict().items():
        torch.testing.assert_close(model.model.language_model.state_dict()[name], value)
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert model.model.multi_modal_projector.linear_1.in_features == 64  # sized for the SparseFormer
    batch = processor(images=[red_image()], text=["<image>\nWhat colour?"], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 15
    assert model.generate(**batch, max_new_tokens=3, do_sample=False).shape[1] == batch["input_ids"].shape[1] + 3


def test_swap_damaged_llava_or_encoder_is_one_line(tokenizer, tmp_path, capsys):
    encoder_dir = tmp_path / "encoder"
    mllm_sparse.create_model("test_sparseformer_btsp").save_pretrained(encoder_dir)
    make_llava_hf(tokenizer, tmp_path / "llava-hf")
    args = ("swap", "--llava", str(tmp_path / "llava-hf"), "--encoder", str(encoder_dir), "--out", str(tmp_path / "o"))
    poison(encoder_dir / "model.safetensors", "proj.weight")
    assert run(capsys, *args) == 2
    one_line(capsys, str(encoder_dir), "proj.weight")
    truncate(tmp_path / "llava-hf" / "model.safetensors")
    assert run(capsys, *args) == 2
    one_line(capsys, str(tmp_path / "llava-hf" / "model.safetensors"), "truncated")
    assert not (tmp_path / "o").exists()


def test_swap_failing_mid_write_keeps_the_previous_folder(tokenizer, tmp_path, monkeypatch):
    make_llava_hf(tokenizer, tmp_path / "llava-hf")
    encoder_dir = tmp_path / "encoder"
    mllm_sparse.create_model("test_sparseformer_btsp").save_pretrained(encoder_dir)
    out = tmp_path / "swapped"
    args = ["--llava", str(tmp_path / "llava-hf"), "--encoder", str(encoder_dir), "--out", str(out)]
    assert swap.main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    # The model is written, then the processor's write fails: the folder must not mix old and new files.
    monkeypatch.setattr(type(AutoProcessor.from_pretrained(out)), "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        swap.main(args)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_feature_layer_fails_clearly(tokenizer):
    encoder = mllm_sparse.create_model("test_sparseformer_btsp")
    first_unit = -encoder.config.num_units  # the early unit, narrower than the cortex
    with pytest.raises(ValueError, match="width 32"):
        build_vlm(encoder, tiny_llm(tokenizer), tokenizer, feature_layer=first_unit, select_strategy="full")
    with pytest.raises(ValueError, match="vision_feature_layer 0 .* from the end"):
        build_vlm(encoder, tiny_llm(tokenizer), tokenizer, feature_layer=0, select_strategy="full")


def test_siglip_teacher_is_a_full_token_tower(tokenizer, tmp_path):
    """A SigLIP teacher spec gives HF's SiglipVisionModel: every patch token ("full"; it has no CLS to drop)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from llava_adapter.towers import load_tower

    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16
    )
    SiglipVisionModel(config).save_pretrained(tmp_path / "siglip")
    tower = load_tower(f"hf:{tmp_path / 'siglip'}")
    assert type(tower.model).__name__ == "SiglipVisionModel" and tower.mean == (0.5, 0.5, 0.5)
    assert default_feature_selection(tower.model.config) == (-2, "full")
    assert num_image_tokens(tower.model.config, -2, "full") == 16
    with pytest.raises(ValueError, match="no CLS token to drop"):
        num_image_tokens(tower.model.config, -2, "default")
    with pytest.raises(ValueError, match="needs a CLIP ViT teacher"):
        load_tower(f"hf:{tmp_path / 'siglip'}", num_latent_tokens=4)
    model = build_vlm(tower.model, tiny_llm(tokenizer), tokenizer, "mlp2x_gelu").eval()
    assert model.config.image_seq_length == 16
    with torch.no_grad():
        features = model.get_image_features(pixel_values=torch.randn(1, 3, 64, 64), return_dict=True).pooler_output
    assert [f.shape for f in features] == [(16, LLM_SIZES["hidden_size"])]


@pytest.mark.parametrize("name", sorted(TINY_LLMS))
def test_tiny_llm_from_a_corpus_inits_at_one_over_sqrt_width(name, tmp_path):
    """`load_llm("tiny-…")` trains its tokenizer on the corpus and initialises at std 1/sqrt(hidden_size): HF's 0.02
    keeps a from-scratch toy LLM's attention uniform for thousands of steps."""
    corpus = tmp_path / "corpus.txt"
    shapes, colours = ("circle", "square", "star"), ("red", "green", "blue")
    corpus.write_text("\n".join(f"What colour is the {s}? The {s} is {c}." for s in shapes for c in colours))
    model, tokenizer = load_llm(name, tokenizer_corpus=corpus, vocab_size=300)
    width = model.config.hidden_size
    assert model.config.initializer_range == pytest.approx(width**-0.5)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    weights = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith("proj.weight")])
    assert weights.std().item() == pytest.approx(width**-0.5, rel=0.05)
    with pytest.raises(ValueError, match="tokenizer-corpus"):
        load_llm(name)


# ----------------------------------------------------------------------------------- the token budget, one name


def test_a_pooled_config_saved_with_the_old_key_still_loads(tmp_path):
    clip = CLIPVisionConfig(image_size=64, patch_size=16)
    saved = PooledVisionConfig(clip, num_latent_tokens=4).to_dict()
    assert saved["num_latent_tokens"] == 4 and "num_tokens" not in saved
    old = {k: v for k, v in saved.items() if k != "num_latent_tokens"} | {"num_tokens": 9}
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = PooledVisionConfig.from_pretrained(tmp_path)
    assert loaded.num_latent_tokens == 9 and not hasattr(loaded, "num_tokens")
    # inside a saved LLaVA config, the way a model folder holds it
    llava = LlavaConfig(vision_config=old, text_config=LlamaConfig(**LLM_SIZES).to_dict())
    assert llava.vision_config.num_latent_tokens == 9
    with pytest.raises(ValueError, match="num_tokens is the old name"):
        PooledVisionConfig(clip, num_latent_tokens=4, num_tokens=9)


def test_layer_tokens_read_the_budget_from_each_tower_config():
    with_cls = mllm_sparse.create_model("test_sparseformer_btsp").config
    without_cls = no_cls_sparseformer().config
    clip = CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=32, num_attention_heads=2)
    assert layer_tokens(with_cls, -2) == LayerTokens(15, True, 64, (15,))
    assert layer_tokens(with_cls, 0) == LayerTokens(15, False, 32, (15,))  # before the CLS token is inserted
    assert layer_tokens(without_cls, -2) == LayerTokens(12, False, 64, (12,))
    assert layer_tokens(PooledVisionConfig(clip, num_latent_tokens=4), -2) == LayerTokens(4, True, 32, (4,))
    assert layer_tokens(clip, -2) == LayerTokens(16, True, 32, (16,))
    elastic = make_elastic(mllm_sparse.create_model("test_sparseformer_btsp"), [4, 9, 15], default=9).config
    assert layer_tokens(elastic, -2) == LayerTokens(9, True, 64, (4, 9, 15))
    assert [num_image_tokens(elastic, -2, strategy, 4) for strategy in ("default", "full")] == [4, 5]
    # a budget from numpy or torch gives a plain count: it becomes config.json's image_seq_length
    assert [json.dumps(num_image_tokens(elastic, -2, "full", n)) for n in (np.int64(4), torch.tensor(9))] == ["5", "10"]
    with pytest.raises(ValueError, match=r"num_latent_tokens=5: this sparseformer elastic tower serves \[4, 9, 15\]"):
        num_image_tokens(elastic, -2, "default", 5)
    with pytest.raises(ValueError, match=r"num_latent_tokens=9: this sparseformer tower serves only \[15\]"):
        num_image_tokens(with_cls, -2, "default", 9)
    with pytest.raises(ValueError, match="must be a square number"):
        PooledVisionConfig(clip, num_latent_tokens=0)
    nested = PooledVisionConfig(clip, budgets=[16, 1, 4])  # M3-style: 1×1, 2×2 and 4×4 grids, the largest the default
    assert layer_tokens(nested, -2) == LayerTokens(16, True, 32, (1, 4, 16))
    assert nested.budget() == 16 and nested.budget(1) == 1
    with pytest.raises(ValueError, match=r"the default budget 9 is not among \[1, 4\]"):
        PooledVisionConfig(clip, num_latent_tokens=9, budgets=[1, 4])
    with pytest.raises(ValueError, match="a 5×5 grid cannot pool a 4×4 patch grid"):
        PooledVisionConfig(clip, budgets=[4, 25])
    zip_config = VisionZipConfig(clip, budgets=[3, 16])
    assert layer_tokens(zip_config, -2) == LayerTokens(16, True, 32, (3, 16))
    with pytest.raises(ValueError, match=r"num_latent_tokens=4: this visionzip elastic tower serves \[3, 16\]"):
        num_image_tokens(zip_config, -2, "default", 4)


def no_cls_sparseformer():
    """The test SparseFormer with 12 latent tokens and no CLS token (its head averages the latent tokens)."""
    return mllm_sparse.create_model(
        "test_sparseformer_btsp", cls_token_insert_layer=0, head_op="latent_avg", num_latent_tokens=12
    )


def tiny_clip(folder):
    """A 64-px CLIP ViT with 16-px patches (a 4×4 grid, 16 patch tokens + CLS), saved as an `hf:` teacher."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=64, patch_size=16
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return f"hf:{folder}"


@pytest.fixture
def towers(tmp_path) -> dict[str, tuple[list[str], int]]:
    """Tower name → (its `--encoder ...` options, N: the budget, the image tokens the LLM should read)."""
    mllm_sparse.create_model("test_sparseformer_btsp").save_pretrained(tmp_path / "sf-cls")
    make_elastic(mllm_sparse.create_model("test_sparseformer_btsp"), [4, 9, 15]).save_pretrained(tmp_path / "sf-el")
    no_cls_sparseformer().save_pretrained(tmp_path / "sf-no-cls")
    clip = tiny_clip(tmp_path / "clip")
    return {
        "sparseformer-cls": (["--encoder", str(tmp_path / "sf-cls")], 15),
        "sparseformer-elastic": (["--encoder", str(tmp_path / "sf-el")], 15),  # its default budget
        "sparseformer-no-cls": (["--encoder", str(tmp_path / "sf-no-cls")], 12),
        "pooled": (["--encoder", clip, "--num-latent-tokens", "4"], 4),
        "pooled-nested": (["--encoder", clip, "--budgets", "1", "4"], 4),  # M3-style; the largest is the default
        "visionzip": (["--encoder", clip, "--num-latent-tokens", "5", "--reduction", "visionzip"], 5),
        "visionzip-elastic": (
            ["--encoder", clip, "--budgets", "3", "5", "9", "--num-latent-tokens", "5", "--reduction", "visionzip"],
            5,
        ),  # fmt: skip
        "vit": (["--encoder", clip], 16),
    }


@pytest.mark.parametrize("command", ["build-vlm", "swap"])
@pytest.mark.parametrize(
    "tower",
    ["sparseformer-cls", "sparseformer-elastic", "sparseformer-no-cls", "pooled", "pooled-nested", "visionzip",
     "visionzip-elastic", "vit"],
)  # fmt: skip
def test_the_llm_reads_exactly_the_budget(command, tower, towers, tokenizer, tmp_path, capsys):
    """For every kind of tower, both commands give a model whose tower hands the LLM N features and whose processor
    inserts N placeholders, N the tower's budget; stock `generate` runs on the saved folder."""
    options, n = towers[tower]
    if command == "build-vlm":
        llm = tmp_path / "llm"
        tiny_llm(tokenizer).save_pretrained(llm)
        tokenizer.save_pretrained(llm)
        source = ["--llm", str(llm)]
    else:
        make_llava_hf(tokenizer, tmp_path / "llava-hf")
        source = ["--llava", str(tmp_path / "llava-hf")]
    out = tmp_path / "vlm"
    assert run(capsys, command, *source, *options, "--out", str(out)) == 0
    said = capsys.readouterr().out
    assert f"→ {n} image tokens" in said
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.image_seq_length == processor.num_image_tokens == n
    served = {"sparseformer-elastic": [4, 9, 15], "pooled-nested": [1, 4], "visionzip-elastic": [3, 5, 9]}
    if tower in served:
        listed = ", ".join(map(str, served[tower]))
        assert f"elastic: {listed} latent tokens per call" in said and processor.budgets == served[tower]
    batch = processor(images=[red_image()], text=["<image>\nWhat colour?"], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == n
    with torch.no_grad():
        features = model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output
    assert [tuple(f.shape) for f in features] == [(n, model.config.text_config.hidden_size)]
    generated = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3


def test_the_old_pool_tokens_flag_still_works_and_says_what_it_became(tokenizer, tmp_path, capsys):
    make_llava_hf(tokenizer, tmp_path / "llava-hf")
    clip = tiny_clip(tmp_path / "clip")
    args = ["swap", "--llava", str(tmp_path / "llava-hf"), "--encoder", clip, "--out", str(tmp_path / "vlm")]
    assert run(capsys, *args, "--pool-tokens", "4") == 0
    err = capsys.readouterr().err
    assert "--pool-tokens is deprecated: use --num-latent-tokens 4" in err
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "vlm").config.image_seq_length == 4
    assert run(capsys, *args, "--pool-tokens", "4", "--num-latent-tokens", "4") == 2
    one_line(capsys, "give --num-latent-tokens only")
    # a saved tower's config sets its own budget
    mllm_sparse.create_model("test_sparseformer_btsp").save_pretrained(tmp_path / "sf")
    args[args.index(clip)] = str(tmp_path / "sf")
    assert run(capsys, *args, "--num-latent-tokens", "4") == 2
    one_line(capsys, "--num-latent-tokens", "its own token budget")


def test_the_commands_choices_are_the_librarys():
    from llava_adapter.conversation import TEMPLATES
    from llava_adapter.modeling import PROJECTORS
    from llava_adapter.processing import IMAGE_ASPECT_RATIOS
    from llava_adapter.towers import REDUCTIONS, SELECT_STRATEGIES
    from mllm_sparse_recipes.commands import _vlm_options as options

    assert set(options.PROJECTORS) == set(PROJECTORS)
    assert options.SELECT_STRATEGIES == SELECT_STRATEGIES
    assert options.REDUCTIONS == REDUCTIONS
    assert options.IMAGE_ASPECT_RATIOS == IMAGE_ASPECT_RATIOS
    assert options.TEMPLATES == TEMPLATES
    assert options.TINY_LLMS == tuple(TINY_LLMS)

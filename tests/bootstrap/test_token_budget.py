"""The token budget is the number of latent tokens, the image tokens an LLM reads, for every kind of teacher: a
bootstrap with `--num-latent-tokens N` gives an encoder of N latent tokens, plus the CLS token only where the teacher
has one; the recipes' settings say N the same way; the deprecated `--num-tokens` says what it became."""

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import bootstrap
import bootstrap.train as train_module
import mllm_sparse  # noqa: F401  (registers the encoder with AutoModel)
from bootstrap.teacher_models import MODEL_CONFIG_DIR
from mllm_sparse_recipes.cli import main as cli_main
from mllm_sparse_recipes.defaults import bootstrap_settings

NAME = "synth-vit-test-16"  # 3 blocks, width 64, 64 px; open_clip's CLS-token pooling
# The tiny HF towers: the same shape as the open_clip teacher.
TINY_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=64, patch_size=16
)


@pytest.fixture(scope="module")
def teachers(setup, tmp_path_factory) -> dict[str, str]:
    """Spec of every kind of teacher, built tiny from configs: kind -> spec."""
    folder = tmp_path_factory.mktemp("teachers")
    config = json.loads((MODEL_CONFIG_DIR / f"{NAME}.json").read_text())
    config["vision_cfg"]["pool_type"] = "avg"  # the mean of the patch tokens; the class token stays in the sequence
    (folder / f"{NAME}-avg.json").write_text(json.dumps(config))
    bootstrap.register_teacher_configs()
    open_clip.add_model_config(folder / f"{NAME}-avg.json")
    torch.manual_seed(0)
    save_file(open_clip.create_model(f"{NAME}-avg").state_dict(), folder / "avg.safetensors")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION, projection_dim=32)).save_pretrained(folder / "clip")
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(folder / "siglip")
    return {
        "open_clip_cls": setup[1],
        "open_clip_avg": f"open_clip:{NAME}-avg@{folder / 'avg.safetensors'}",
        "hf_clip": f"hf:{folder / 'clip'}",
        "siglip": f"hf:{folder / 'siglip'}",
    }


HAS_CLS = {"open_clip_cls": True, "open_clip_avg": True, "hf_clip": True, "siglip": False}


def bootstrap_args(setup, spec: str, out, *budget: str) -> list[str]:
    root, _ = setup
    return ["bootstrap", "--teacher", spec, *budget, "--data", str(root / "world"), "--out", str(out),
            "--steps", "1", "--batch-size", "4", "--lr", "3e-3"]  # fmt: skip


def assert_emits(out, num_latent: int, has_cls: bool) -> None:
    """The encoder in `out` has `num_latent` latent tokens and emits them, after the CLS token where it has one."""
    model = AutoModel.from_pretrained(out).eval()
    assert model.config.num_latent_tokens == num_latent and model.config.has_cls_token == has_cls
    with torch.no_grad():
        tokens = model(torch.randn(1, 3, 64, 64)).last_hidden_state
    assert tokens.shape[:2] == (1, num_latent + int(has_cls))


@pytest.mark.parametrize("kind", list(HAS_CLS))
def test_num_latent_tokens_is_the_budget_for_every_teacher(kind, setup, teachers, tmp_path):
    assert bootstrap.load_teacher(teachers[kind]).arch.has_cls == HAS_CLS[kind]
    out = tmp_path / "enc"
    assert cli_main(bootstrap_args(setup, teachers[kind], out, "--num-latent-tokens", "9")) == 0
    assert_emits(out, 9, HAS_CLS[kind])
    report = json.loads((out / "bootstrap_report.json").read_text())
    assert (report["num_latent_tokens"], report["cls_tokens"]) == (9, int(HAS_CLS[kind]))
    assert report["final"]["student_tokens"] == 9 + int(HAS_CLS[kind])  # the total, CLS included
    assert (out / "bootstrap_report.md").read_text().startswith("# Bootstrap report: 9 latent tokens")


def test_the_recipe_settings_give_a_siglip_teacher_n_latent_tokens_not_n_plus_1(setup, teachers, tmp_path):
    root, _ = setup
    out = tmp_path / "enc"
    settings = bootstrap_settings(teachers["siglip"], root / "world", out, 16, 1, batch_size=4, cache_teacher=True)
    assert settings.num_latent_tokens == 16 and settings.cache_teacher and settings.region_distill_weight > 0
    report = train_module.run(settings)
    assert (report["num_latent_tokens"], report["cls_tokens"]) == (16, 0)
    assert_emits(out, 16, has_cls=False)


@pytest.mark.parametrize("kind", ["open_clip_cls", "siglip"])
def test_the_deprecated_num_tokens_says_what_it_became(kind, setup, teachers, tmp_path, capsys):
    out = tmp_path / "enc"
    assert cli_main(bootstrap_args(setup, teachers[kind], out, "--num-tokens", "10")) == 0
    latent = 10 - int(HAS_CLS[kind])  # it counted the CLS token where the teacher has one
    err = capsys.readouterr().err
    assert "warning: --num-tokens is deprecated; it counted the CLS token" in err
    assert f"use --num-latent-tokens {latent}" in err
    assert_emits(out, latent, HAS_CLS[kind])
    assert json.loads((out / "bootstrap_report.json").read_text())["num_latent_tokens"] == latent
    # the run records the budget under its one name: the same budget spelt anew resumes it
    assert cli_main(bootstrap_args(setup, teachers[kind], out, "--num-latent-tokens", str(latent), "--resume")) == 0


def test_the_budget_is_given_once(setup, teachers, tmp_path, capsys):
    spec = teachers["open_clip_cls"]
    both = bootstrap_args(setup, spec, tmp_path / "a", "--num-latent-tokens", "8", "--num-tokens", "9")
    assert cli_main(both) == 2
    assert capsys.readouterr().err.strip() == (
        "mllm-sparse bootstrap: error: give --num-latent-tokens only (--num-tokens is its deprecated spelling)"
    )
    with pytest.raises(SystemExit):
        cli_main(bootstrap_args(setup, spec, tmp_path / "b"))
    assert "the following arguments are required: --num-latent-tokens" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

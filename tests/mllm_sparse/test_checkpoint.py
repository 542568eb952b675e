import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mllm_sparse
from mllm_sparse import CheckpointMismatchError


def _pixels():
    return torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(3))


def test_save_pretrained_round_trip_in_a_fresh_process(tmp_path, btsp_model):
    btsp_model.save_pretrained(tmp_path / "enc")
    assert (tmp_path / "enc" / "model.safetensors").is_file()
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert config["model_type"] == "sparseformer" and config["num_latent_tokens"] == 15
    pixels = _pixels()
    torch.save(pixels, tmp_path / "x.pt")
    with torch.no_grad():
        expected = btsp_model(pixels)
    script = textwrap.dedent(f"""
        import torch, transformers
        import mllm_sparse  # registers the Auto classes
        model = transformers.AutoModel.from_pretrained({str(tmp_path / "enc")!r}).eval()
        assert type(model).__name__ == "SparseFormerModel", type(model)
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        with torch.no_grad():
            out = model(x)
        torch.save({{"embeds": out.image_embeds, "rois": out.rois}}, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(got["embeds"], expected.image_embeds)
    torch.testing.assert_close(got["rois"], expected.rois)


def test_from_pretrained_does_not_reinitialise_loaded_weights(tmp_path, btsp_model):
    with torch.no_grad():
        for p in btsp_model.parameters():
            p.add_(0.5)
    btsp_model.save_pretrained(tmp_path)
    loaded = mllm_sparse.SparseFormerModel.from_pretrained(tmp_path)
    for (name, a), b in zip(btsp_model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("wrapped", [False, True])
def test_official_pth_loads_with_or_without_model_wrapper(tmp_path, btsp_model, wrapped):
    state = {k: v + 0.1 for k, v in btsp_model.state_dict().items()}
    torch.save({"model": state, "epoch": 3} if wrapped else state, tmp_path / "x_converted.pth")
    model = mllm_sparse.create_model("test_sparseformer_btsp", pretrained=tmp_path / "x_converted.pth")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert not model.training


def test_safetensors_file_and_folder_load(tmp_path, btsp_model):
    save_file(btsp_model.state_dict(), tmp_path / "w.safetensors")
    a = mllm_sparse.create_model("test_sparseformer_btsp", pretrained=tmp_path / "w.safetensors")
    btsp_model.save_pretrained(tmp_path / "dir")
    b = mllm_sparse.create_model("test_sparseformer_btsp", pretrained=tmp_path / "dir")
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(a(x).image_embeds, b(x).image_embeds)


def test_mismatched_checkpoint_lists_missing_unexpected_and_shapes(tmp_path, btsp_model):
    state = dict(btsp_model.state_dict())
    state.pop("proj.weight")
    state["head.classifier.weight"] = torch.zeros(3)
    state["initial_roi.weight"] = torch.zeros(20, 4)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        mllm_sparse.create_model("test_sparseformer_btsp", pretrained=tmp_path / "bad.pth")
    message = str(err.value)
    assert "bad.pth" in message and "test_sparseformer_btsp" in message
    assert "missing keys (1): proj.weight" in message
    assert "unexpected keys (1): head.classifier.weight" in message
    assert "initial_roi.weight: checkpoint (20, 4) vs model (15, 4)" in message
    assert "num_tokens=21" in message


def test_checkpoint_of_another_preset_is_refused(tmp_path, v1_model):
    torch.save(v1_model.state_dict(), tmp_path / "v1.pth")
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        mllm_sparse.create_model("test_sparseformer_btsp", pretrained=tmp_path / "v1.pth")


class _Evil:
    """Unpickled without `weights_only`, it creates the file `witness`."""

    def __init__(self, witness: Path):
        self.witness = str(witness)

    def __reduce__(self):
        return (open, (self.witness, "w"))


def test_pickles_are_loaded_weights_only(tmp_path):
    witness = tmp_path / "pickle-code-ran"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _Evil(witness)}, f)
    with pytest.raises(ValueError, match="Cannot read .*evil.pth as a weights-only PyTorch checkpoint"):
        mllm_sparse.create_model("test_sparseformer_btsp", pretrained=tmp_path / "evil.pth")
    assert not witness.exists()


def test_missing_and_non_state_dict_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        mllm_sparse.create_model("test_sparseformer_btsp", pretrained=tmp_path / "nope.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        mllm_sparse.create_model("test_sparseformer_btsp", pretrained=tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        mllm_sparse.create_model("test_sparseformer_btsp", pretrained=tmp_path / "junk.pth")


def test_truncated_safetensors_names_the_file(tmp_path):
    from mllm_sparse.checkpoint import CheckpointError, load_safetensors, read_state_dict

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    for load in (load_safetensors, read_state_dict):
        with pytest.raises(CheckpointError, match=str(path)):
            load(path)


def test_non_finite_weights_are_refused_by_name(tmp_path):
    from mllm_sparse.checkpoint import CheckpointError, load_safetensors, read_state_dict

    path = tmp_path / "w.safetensors"
    save_file({"good": torch.ones(3), "bad.weight": torch.tensor([1.0, float("nan")])}, str(path))
    for load in (load_safetensors, read_state_dict):
        with pytest.raises(CheckpointError, match=r"bad\.weight") as err:
            load(path)
        assert "good" not in str(err.value)
    assert torch.isnan(load_safetensors(path, allow_nonfinite=True)["bad.weight"]).any()


@pytest.mark.parametrize("side", ["extra", "missing"])
def test_one_extra_or_one_missing_key_alone_is_refused_by_name(tmp_path, btsp_model, side):
    """Each side of strictness on its own: a relaxed loader that accepts either one fails here."""
    state = dict(btsp_model.state_dict())
    if side == "extra":
        state["layers.0.no_such.weight"] = torch.zeros(2)
        title, key = "unexpected keys (1)", "layers.0.no_such.weight"
    else:
        state.pop("layers.3.attn.proj.bias")
        title, key = "missing keys (1)", "layers.3.attn.proj.bias"
    save_file(state, tmp_path / "one_off.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        mllm_sparse.create_model("test_sparseformer_btsp", pretrained=tmp_path / "one_off.safetensors")
    assert f"{title}: {key}" in str(err.value) and "one_off.safetensors" in str(err.value)

"""`mllm-sparse bootstrap --budgets`: one elastic student for several token budgets."""

import json
import re
import shutil

import pytest
import torch
from bootstrap_world import bootstrap_args as _args
from safetensors.torch import load_file
from transformers import AutoModel

import bootstrap.train as train_module
import mllm_sparse  # noqa: F401
from bootstrap.train import step_budgets
from mllm_sparse_recipes.cli import main as cli_main

ELASTIC = ("--budgets", "4", "8", "9")  # 8, the shared arguments' --num-latent-tokens, is the default


def test_two_elastic_steps_give_one_student_that_serves_every_budget(setup, tmp_path, capsys, monkeypatch):
    trained, features = [], []
    original = train_module.alignment_loss

    def recording(model, n, *args):
        trained.append(n)
        features.append(args[-1])
        return original(model, n, *args)

    monkeypatch.setattr(train_module, "alignment_loss", recording)
    out = tmp_path / "enc"
    assert cli_main(["bootstrap", *_args(setup, out, "--steps", "2", *ELASTIC)]) == 0
    # sandwich: the smallest and the largest every step, the one between on even steps
    assert trained == [4, 8, 9, 4, 9]
    # one early-convolution feature map per step, shared by its budgets
    assert all(f is not None for f in features) and len({id(f) for f in features[:3]}) == 1
    assert features[3] is features[4] and features[3] is not features[0]
    model = AutoModel.from_pretrained(out).eval()
    assert model.budgets == [4, 8, 9] and model.config.num_latent_tokens == 8
    report = json.loads((out / "bootstrap_report.json").read_text())
    assert list(report["budgets"]) == ["4", "8", "9"]
    assert report["final"] == report["budgets"]["8"]
    for n, evaluation in report["budgets"].items():
        assert evaluation["student_tokens"] == int(n) + 1 and "student" in evaluation["zero_shot"]
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64), num_latent_tokens=int(n)).rois.shape == (1, int(n), 4)
    # Fewer tokens, fewer FLOPs: each budget is profiled at its own size.
    assert report["budgets"]["4"]["student_gflops"] < report["budgets"]["9"]["student_gflops"]
    assert "| 4 |" in capsys.readouterr().out


def test_an_elastic_run_resumes_exactly(setup, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli_main(["bootstrap", *_args(setup, straight, "--steps", "4", "--save-every", "2", *ELASTIC)])
    cli_main(["bootstrap", *_args(setup, resumed, "--steps", "4", "--save-every", "2", *ELASTIC)])
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")  # interrupted after step 2
    (resumed / "model.safetensors").unlink()
    cli_main(["bootstrap", *_args(setup, resumed, "--steps", "4", "--resume", *ELASTIC)])
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert {k for k in a if k.startswith("initial_rois.")} == {f"initial_rois.{n}.weight" for n in (4, 8, 9)}
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_budgets_per_step_depend_on_seed_and_step_only():
    budgets = [9, 16, 25, 36]
    sandwiches = [step_budgets(budgets, seed=0, step=s) for s in range(200)]
    assert sandwiches == [step_budgets(budgets, seed=0, step=s) for s in range(200)]
    assert all(s[0] == 9 and s[-1] == 36 and len(s) == 3 for s in sandwiches[::2])
    assert all(s == [9, 36] for s in sandwiches[1::2])  # odd steps: no budget between
    assert {s[1] for s in sandwiches[::2]} == {16, 25}
    assert sandwiches != [step_budgets(budgets, seed=1, step=s) for s in range(200)]
    assert step_budgets([9, 36], 0, 4) == [9, 36] and step_budgets([16], 0, 5) == [16]


def test_a_default_budget_outside_the_budgets_is_refused(setup, tmp_path, capsys):
    assert cli_main(["bootstrap", *_args(setup, tmp_path / "x", "--steps", "1", "--budgets", "4", "9")]) == 2
    assert "--num-latent-tokens 8 (the default budget) must be one of --budgets [4, 9]" in capsys.readouterr().err
    root, spec = setup
    args = ["--teacher", spec, "--data", str(root / "world"), "--out", str(tmp_path / "y"), "--steps", "1"]
    assert cli_main(["bootstrap", *args, "--budgets", "4"]) == 2  # batch 64 > the world's images: it got that far
    assert "--batch-size 64 exceeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bootstrap", *args])  # neither --num-latent-tokens nor --budgets


def test_an_existing_encoder_starts_the_run_and_becomes_elastic(setup, tmp_path, capsys, monkeypatch):
    """`--init-from`: the run starts from the encoder's weights (its own budget bit-identical at the first step),
    keeps its default budget, freezes the cortex tail as `inherit` does, and serves the new budgets."""
    fixed_dir = tmp_path / "fixed"
    assert cli_main(["bootstrap", *_args(setup, fixed_dir, "--steps", "1")]) == 0
    fixed = AutoModel.from_pretrained(fixed_dir).eval()
    pixels = torch.randn(2, 3, 64, 64)
    first: dict[int, torch.Tensor] = {}
    original = train_module.alignment_loss

    def recording(model, n, *args):
        if n not in first:
            student = getattr(model, "module", model)  # DDP under torchrun
            with torch.no_grad():
                first[n] = student.eval()(pixels, num_latent_tokens=n).last_hidden_state.clone()
            student.train()
        return original(model, n, *args)

    monkeypatch.setattr(train_module, "alignment_loss", recording)
    root, spec = setup
    out = tmp_path / "elastic"
    args = ["--teacher", spec, "--data", str(root / "world"), "--out", str(out), "--batch-size", "4", "--steps", "2"]
    assert cli_main(["bootstrap", *args, "--init-from", str(fixed_dir), "--budgets", "4", "8", "9"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(first[8], fixed(pixels).last_hidden_state, rtol=0, atol=0)
    model = AutoModel.from_pretrained(out)
    assert model.budgets == [4, 8, 9] and model.config.num_latent_tokens == 8  # the encoder's own, not the largest
    report = json.loads((out / "bootstrap_report.json").read_text())
    assert report["inheritance"]["started_from"] == str(fixed_dir) and list(report["budgets"]) == ["4", "8", "9"]
    assert f"Started from {fixed_dir}" in capsys.readouterr().out
    before, after = fixed.state_dict(), model.state_dict()
    frozen = set(report["inheritance"]["frozen"])
    assert frozen and {k for k in frozen if not torch.equal(before[k], after[k])} == set()
    assert any(not torch.equal(before[k], after[k]) for k in report["inheritance"]["trained"] if k in before)


def test_init_from_refuses_what_cannot_start_a_run(setup, tmp_path, capsys):
    root, spec = setup
    args = ["--teacher", spec, "--data", str(root / "world"), "--batch-size", "4", "--steps", "1"]
    fixed_dir = tmp_path / "fixed"
    assert cli_main(["bootstrap", *_args(setup, fixed_dir, "--steps", "1")]) == 0
    capsys.readouterr()
    cases = [
        (["--init-from", str(tmp_path / "none")], "is neither a folder nor a preset"),
        (["--init-from", "test_sparseformer_btsp"], "give its weights with --init-pretrained"),
        (["--init-from", str(fixed_dir), "--num-latent-tokens", "4"], r"serves \[8\] latent tokens, not 4"),
        (["--init-from", str(fixed_dir), "--init-pretrained", "official"], "is a folder with its own weights"),
        (["--init-pretrained", "official", "--num-latent-tokens", "8"], "give --init-from too"),
    ]
    for i, (extra, message) in enumerate(cases):
        assert cli_main(["bootstrap", *args, "--out", str(tmp_path / f"out{i}"), *extra]) == 2, message
        err = capsys.readouterr().err
        assert "Traceback" not in err and re.search(message, err.strip().splitlines()[-1]), err
        assert not (tmp_path / f"out{i}").exists()
    other = mllm_sparse.create_model("test_sparseformer_btsp", proj_dim=24)
    other.save_pretrained(tmp_path / "other")
    assert cli_main(["bootstrap", *args, "--out", str(tmp_path / "o"), "--init-from", str(tmp_path / "other")]) == 2
    assert "its embedding has 24 dimensions" in capsys.readouterr().err

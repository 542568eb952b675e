"""The lmms-eval model `mllm_sparse_llava` and the synthetic task pack: the real lmms-eval CLI in a subprocess,
offline, against `mllm-sparse eval-vlm` on the same tiny saved VLM and questions; and each request type called
directly against `ChatEngine` and a hand-written forward pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_process import cli_env
from lmms_eval.api.instance import Instance
from tiny_vlm import free_port, save_tiny_vlm

from llava_adapter.chat import ChatEngine
from llava_adapter.evaluate import MAX_NEW_TOKENS, is_correct
from llava_adapter.lmms_eval_model import MODEL_ID, RequestError, SparseLlavaLmms
from mllm_sparse.files import read_json, write_json
from mllm_sparse.images import load_image
from mllm_sparse.synth import generate_world
from mllm_sparse_recipes.cli import main as cli_main

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def vlm_dir(tokenizer, tmp_path_factory) -> Path:
    return save_tiny_vlm(tokenizer, tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def engine(vlm_dir) -> ChatEngine:
    return ChatEngine.from_pretrained(vlm_dir, device="cpu")


@pytest.fixture(scope="module")
def test_set(engine, tmp_path_factory) -> Path:
    """A tiny synthetic world's test split (two image records and a text-only one, six questions over 1-3 turns),
    where every other question's gold answer is what the untrained model answers to it: a known accuracy."""
    world = tmp_path_factory.mktemp("world")
    generate_world(world, num_images=12, image_size=32, seed=3, workers=1, progress=False, max_turns=3)
    records = read_json(world / "llava_test.json")
    assert sorted(bool(r.get("image")) for r in records) == [False, True, True]
    k = 0
    for record in records:
        turns = record["conversations"]
        for i in range(0, len(turns), 2):
            if k % 2 == 0:
                prompt = {"id": record["id"], "conversations": turns[: i + 1]}
                image = None
                if record.get("image"):
                    prompt["image"] = record["image"]
                    image = world / record["image"]
                turns[i + 1]["value"] = engine.generate_batch([prompt], [image], max_new_tokens=MAX_NEW_TOKENS)[0]
            k += 1
    write_json(world / "few.json", records)
    return world / "few.json"


def lmms_eval(*args: str, cwd: Path, ranks: int) -> subprocess.CompletedProcess:
    """The lmms-eval CLI as users run it: one process, or `torchrun` data parallel over `ranks` CPU processes."""
    env = {**cli_env(), **OFFLINE, "HF_HOME": str(cwd / "hf_home")}
    launcher = [sys.executable, "-m", "lmms_eval"]
    if ranks > 1:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        launcher = [torchrun, "--nproc_per_node", str(ranks), "--master_port", str(free_port()), "-m", "lmms_eval"]
    return subprocess.run([*launcher, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_the_entry_point_is_found_in_a_fresh_process():
    code = (
        "from importlib.metadata import entry_points\n"
        "(ep,) = [e for e in entry_points(group='lmms_eval.models') if e.value.startswith('llava_adapter')]\n"
        "from lmms_eval.models import get_model\n"
        "print(ep.value, get_model('mllm_sparse_llava').__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env={**cli_env(), **OFFLINE}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["llava_adapter.lmms_eval_model:manifests", "SparseLlavaLmms"]


@pytest.mark.parametrize("ranks", [1, 2])
def test_lmms_eval_cli_agrees_with_eval_vlm(ranks, vlm_dir, test_set, engine, tmp_path, capsys):
    """Both tasks of the pack through the real lmms-eval CLI, in one process and on two torchrun ranks: the question
    task's answers and accuracies equal eval-vlm's; the conversation task's answers equal ChatEngine.chat's."""
    pack = tmp_path / "pack"
    assert cli_main(["lmms-task", "--data", str(test_set), "--out", str(pack)]) == 0
    assert "mllm_sparse_synth and mllm_sparse_synth_chat" in capsys.readouterr().out
    assert cli_main(["eval-vlm", "--model", str(vlm_dir), "--data", str(test_set), "--out", str(tmp_path / "ev"),
                     "--batch-size", "1", "--no-progress"]) == 0  # fmt: skip
    report = read_json(tmp_path / "ev" / "eval_vlm.json")
    assert report["accuracy"] == 0.5  # every other gold answer is the model's own, the rest are the world's

    done = lmms_eval(
        "--model", MODEL_ID, "--model_args", f"pretrained={vlm_dir},device=cpu",
        "--include_path", str(pack), "--tasks", "mllm_sparse_synth,mllm_sparse_synth_chat",
        "--batch_size", "1", "--output_path", str(tmp_path / "out"), "--log_samples",
        cwd=tmp_path, ranks=ranks,
    )  # fmt: skip
    # lmms-eval logs an evaluation error and still exits 0: the results file is the proof.
    assert done.returncode == 0 and "Error during evaluation" not in done.stderr, done.stderr[-4000:]
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    results = read_json(results_file)["results"]

    questions_task = results["mllm_sparse_synth"]
    assert questions_task["accuracy,none"] == pytest.approx(report["accuracy"])
    for qtype, entry in report["by_type"].items():
        assert questions_task[f"accuracy_{qtype},none"] == pytest.approx(entry["accuracy"]), qtype
    (samples_file,) = (tmp_path / "out").rglob("*_samples_mllm_sparse_synth.jsonl")
    docs = read_json(pack / "questions.json")  # lmms-eval's doc_id is the index in the task's documents
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    lmms_answers = {docs[s["doc_id"]]["question_id"]: s["filtered_resps"] for s in samples}
    eval_answers = {f"{p['id']}#{p['turn']}": p["prediction"] for p in report["predictions"]}
    assert len(eval_answers) == report["num_answers"] >= 6
    assert lmms_answers == eval_answers

    # The conversation task: each record asked turn by turn, the model's own answers as context.
    (chat_file,) = (tmp_path / "out").rglob("*_samples_mllm_sparse_synth_chat.jsonl")
    docs = read_json(pack / "conversations.json")
    chats = {docs[s["doc_id"]]["record_id"]: s for s in map(json.loads, chat_file.read_text().splitlines())}
    assert len(chats) == 3
    records = {r["id"]: r for r in read_json(test_set)}
    correct = total = 0
    for record_id, sample in chats.items():
        record = records[record_id]
        engine.reset()
        image = test_set.parent / record["image"] if record.get("image") else None
        asked = [t["value"] for t in record["conversations"][0::2]]
        expected = [engine.chat(q, image=image if k == 0 else None, max_new_tokens=MAX_NEW_TOKENS).text
                    for k, q in enumerate(asked)]  # fmt: skip
        assert sample["filtered_resps"] == expected, record_id
        golds = [t["value"] for t in record["conversations"][1::2]]
        correct += sum(is_correct(a, g) for a, g in zip(expected, golds, strict=True))
        total += len(golds)
    assert results["mllm_sparse_synth_chat"]["accuracy,none"] == pytest.approx(correct / total)


def instance(request_type: str, args: tuple, doc_id: int) -> Instance:
    return Instance(request_type, args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


@pytest.fixture(scope="module")
def lmm(vlm_dir, image_folder) -> SparseLlavaLmms:
    model = SparseLlavaLmms(pretrained=str(vlm_dir), device="cpu", batch_size="3")
    docs = [
        {"q": "What colour is the circle?", "image": str(image_folder / "a.png")},
        {"q": "How many stars are there?", "image": ""},
        {"q": "Is the square on the left?", "image": str(image_folder / "b.png")},
        {"q": "What colour is the star?", "image": str(image_folder / "corrupt.png")},
        {"q": "Which is larger?", "image": str(image_folder / "a.png"), "second": str(image_folder / "c.png")},
    ]
    model.task_dict = {"t": {"test": docs}}
    return model


def visual(doc):
    return [load_image(doc[key]) for key in ("image", "second") if doc.get(key)]


def test_loglikelihood_is_the_answer_log_probability(lmm, engine, image_folder):
    answers = ["The circle is red.", "3", "yes"]
    requests = [instance("loglikelihood", (lmm.task_dict["t"]["test"][i]["q"], answers[i], visual, i, "t", "test"), i)
                for i in range(3)]  # fmt: skip
    scores = lmm.loglikelihood(requests)
    for i, (logprob, _) in enumerate(scores):
        # By hand, one row at a time: prompt ids, then vicuna_v1's " answer" tokens, summed log-softmax.
        doc = lmm.task_dict["t"]["test"][i]
        record = {"id": "x", "conversations": [{"from": "human", "value": doc["q"]}]}
        pixels = None
        if doc["image"]:
            record["image"] = "x.png"
            record["conversations"][0]["value"] = "<image>\n" + doc["q"]
            pixels = engine.processor.image_processor(images=[load_image(doc["image"])], return_tensors="pt")
            pixels = pixels["pixel_values"]
        prompt = engine.prompt_ids(record)
        answer = engine.tokenizer.encode(" " + answers[i], add_special_tokens=False)
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = engine.model(input_ids=ids, pixel_values=pixels).logits[0].float()
        expected = logits[len(prompt) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(answer)[:, None]).sum()
        assert logprob == pytest.approx(float(expected), abs=1e-4)


def test_is_greedy_says_whether_greedy_decoding_yields_the_answer(lmm):
    """With the logit of " 3" lifted far above the rest, greedy decoding says "3 3 3 ...": "3 3" is greedy, "3 red"
    is not, and each one's log-probability is still the forward pass's."""
    tokenizer = lmm.engine.tokenizer
    (three,) = tokenizer.encode(" 3", add_special_tokens=False)
    assert tokenizer.encode(" 3 3", add_special_tokens=False) == [three, three]
    lift = torch.zeros(len(tokenizer))
    lift[three] = 100.0
    hook = lmm.engine.model.lm_head.register_forward_hook(lambda module, inputs, out: out + lift)
    try:
        args = ("How many stars are there?", None, visual, 1, "t", "test")
        requests = [instance("loglikelihood", (args[0], answer, *args[2:]), 1) for answer in ("3 3", "3 red")]
        (greedy, lp_greedy), (other, lp_other) = [(flag, lp) for lp, flag in lmm.loglikelihood(requests)]
    finally:
        hook.remove()
    assert greedy is True and other is False
    assert lp_greedy > -1e-3 and lp_other < -50  # "red" costs about the lift


def test_generate_until_batches_stops_and_serves_text_only(lmm, engine, image_folder):
    gen = {"max_new_tokens": 6, "temperature": 0, "do_sample": False, "image_aspect_ratio": "pad"}
    requests = [instance("generate_until", (lmm.task_dict["t"]["test"][i]["q"], dict(gen), visual, i, "t", "test"), i)
                for i in range(3)]  # fmt: skip
    answers = lmm.generate_until(requests)
    expected = engine.generate_batch(
        [d["q"] for d in lmm.task_dict["t"]["test"][:3]], [image_folder / "a.png", None, image_folder / "b.png"],
        max_new_tokens=6,
    )  # fmt: skip
    assert answers == expected and all(expected)
    # `until`: the answer stops at the first stop string and is cut before it.
    assert len(expected[0]) >= 6, expected
    cut = expected[0][3:5]
    stop_args = (requests[0].args[0], {**gen, "until": [cut]}, visual, 0, "t", "test")
    (stopped,) = lmm.generate_until([instance("generate_until", stop_args, 0)])
    assert stopped == expected[0].split(cut, 1)[0].strip() and cut not in stopped


def test_bad_requests_name_the_task_and_document(lmm):
    gen = {"max_new_tokens": 2}
    with pytest.raises(RequestError, match=r"task 't', doc 3: its image cannot be read: .*corrupt\.png"):
        lmm.generate_until([instance("generate_until", ("q", gen, visual, 3, "t", "test"), 3)])
    with pytest.raises(RequestError, match=r"task 't', doc 4: 2 images, but mllm_sparse_llava takes one"):
        lmm.generate_until([instance("generate_until", ("q", gen, visual, 4, "t", "test"), 4)])
    with pytest.raises(ValueError, match=r"num_latent_tokens=64: this sparseformer tower serves only \[15\]"):
        SparseLlavaLmms(pretrained=lmm.engine.model.name_or_path, device="cpu", num_latent_tokens=64)
    with pytest.raises(ValueError, match=r"unknown model_args \['conv_mode'\]"):
        SparseLlavaLmms(pretrained=lmm.engine.model.name_or_path, conv_mode="vicuna")


def test_lmms_task_refuses_bad_input(tmp_path, capsys):
    assert cli_main(["lmms-task", "--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "p")]) == 2
    assert "none.json" in capsys.readouterr().err
    write_json(tmp_path / "bad.json", [{"id": "r1", "conversations": [{"from": "gpt", "value": "x"}]}])
    assert cli_main(["lmms-task", "--data", str(tmp_path / "bad.json"), "--out", str(tmp_path / "p")]) == 2
    assert "record 'r1'" in capsys.readouterr().err

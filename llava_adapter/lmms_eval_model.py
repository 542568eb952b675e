"""The lmms-eval model `mllm_sparse_llava`: any LLaVA folder this project saves, on lmms-eval's benchmarks.

    lmms-eval --model mllm_sparse_llava --model_args pretrained=runs/vlm,dtype=bfloat16 \\
        --tasks gqa,pope,mme --batch_size 16 --output_path results/

Installing this project (with the `eval` extra) registers the model through the `lmms_eval.models` entry point
(`manifests` below), so no fork of lmms-eval and no environment variable is needed.

`model_args` (comma-separated `key=value`):

- `pretrained`: a LLaVA folder saved by `build-vlm`, `scripts/train_vlm.py` or `merge-lora` (a SparseFormer, ViT or
  pooled tower).
- `device` (default: lmms-eval's `--device`, else cuda when available), `dtype` (e.g. bfloat16; default: as saved).
- `template`: the conversation template (default: the one the folder records, as `eval-vlm`).
- `max_new_tokens`: the answer length for tasks that set none (default 128).
- `num_latent_tokens`: the token budget images are encoded at, one the tower serves (an elastic tower serves
  several; default: the model's own); an unserved budget is refused with the list.

Batching comes from lmms-eval's `--batch_size N` (rows per `generate` call or forward pass). Data parallel runs
under `accelerate launch` or `torchrun` (lmms-eval shards the documents; each rank takes the GPU of its LOCAL_RANK).

Everything runs through `ChatEngine`, the inference path of `chat`, `eval-vlm` and the demo:

- `generate_until`: requests with the same generation settings are batched, longest context first. Greedy unless the
  task asks for sampling (`do_sample`, or `temperature` > 0); `until` strings stop a row and cut its text;
  `max_new_tokens`, `top_p`, `top_k` and `num_beams` are honoured, other keys are ignored with one warning. A context
  that is a JSON list of turns (`[{"from": "human", "value": ...}, ...]`, or lmms-eval's `[{"value": ...}, ...]`
  with roles alternating from human) is a conversation; anything else is one human turn.
- `loglikelihood`: `ChatEngine.score_answers`, batched: the log-probability of the continuation as the assistant's
  answer to the context, and whether greedy decoding yields it.
- `generate_until_multi_round`: one conversation per document about the same image: the task's `doc_to_text` gives
  each next user turn after seeing the model's answers; every round's answer is returned.

Images: one per request, as LLaVA-1.5 and the towers here are trained; `<image>` goes where the context puts it,
else before the text. A request with more than one image, or an image that cannot be read, fails with an error
naming the task and document; a request without images is a text-only prompt.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from mllm_sparse.images import ImageLoadError, load_image, to_rgb

from .chat import IN_MEMORY_IMAGE, ChatEngine
from .conversation import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

MODEL_ID = "mllm_sparse_llava"
DEFAULT_MAX_NEW_TOKENS = 128
# lmms-eval's generation keys → how `generate` takes them; `until`, `do_sample` and `temperature` are handled apart.
PASSED_THROUGH = ("max_new_tokens", "top_p", "top_k", "num_beams")


def manifests():
    """The `lmms_eval.models` entry point: lmms-eval's registry imports this module only when it loads plugins."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.SparseLlavaLmms")]


class RequestError(ValueError):
    """A request that cannot be run; the message names the task and the document."""


class SparseLlavaLmms(lmms):
    """A saved LLaVA folder as an lmms-eval simple model (see the module docstring for the arguments)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        template: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        num_latent_tokens: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"{MODEL_ID}: unknown model_args {sorted(unknown)}; valid: pretrained, device, dtype, template, "
                "max_new_tokens, num_latent_tokens (batching: lmms-eval's --batch_size)"
            )
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"{MODEL_ID}: --batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = int(batch_size)
        if int(max_new_tokens) < 1:
            raise ValueError(f"{MODEL_ID}: max_new_tokens must be positive, got {max_new_tokens}")
        self.max_new_tokens = int(max_new_tokens)
        if device is None and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per rank under accelerate or torchrun
        self.engine = ChatEngine.from_pretrained(Path(pretrained), template=template, device=device, dtype=dtype)
        try:
            self.engine.num_latent_tokens = num_latent_tokens  # None: the model's default budget
        except ValueError as err:
            raise ValueError(f"{MODEL_ID}: {pretrained}: {err}") from None
        self._warned: set[str] = set()

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # ------------------------------------------------------------------------------------------- request handling

    def _doc(self, task: str, split: str, doc_id: int) -> Mapping:
        return self.task_dict[task][split][doc_id]

    def _image(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> Image.Image | None:
        """The request's image (None for a text-only one), read through the task's `doc_to_visual`."""
        where = f"task {task!r}, doc {doc_id}"
        try:
            visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
            visuals = [v for v in (visuals or []) if v is not None]
            if len(visuals) > 1:
                raise RequestError(
                    f"{where}: {len(visuals)} images, but {MODEL_ID} takes one per request (LLaVA-1.5's layout)"
                )
            if not visuals:
                return None
            visual = visuals[0]
            return to_rgb(visual) if isinstance(visual, Image.Image) else load_image(visual)
        except RequestError:
            raise
        except (OSError, ImageLoadError, ValueError, TypeError, KeyError) as err:
            raise RequestError(f"{where}: its image cannot be read: {err}") from err

    def _record(self, context: str, image: Image.Image | None, task: str, doc_id: int) -> dict[str, Any]:
        """The LLaVA record asking `context` (a question or a JSON conversation) about `image`."""
        turns = _conversation(context)
        first = next(i for i, turn in enumerate(turns) if turn["from"] == "human")
        if image is not None and IMAGE_PLACEHOLDER not in "".join(turn["value"] for turn in turns):
            turns[first] = {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{turns[first]['value']}"}
        record: dict[str, Any] = {"id": f"{task} doc {doc_id}", "conversations": turns}
        if image is not None:
            record["image"] = IN_MEMORY_IMAGE
        return record

    def _generation(self, gen_kwargs: Mapping) -> tuple[dict[str, Any], list[str]]:
        """lmms-eval's generation settings → (`generate` keywords, stop strings)."""
        gen = dict(gen_kwargs)
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen.pop("temperature", 0) or 0)
        sample = bool(gen.pop("do_sample", False)) or temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": sample}
        for key in PASSED_THROUGH:
            if gen.get(key) is not None:
                kwargs[key] = gen.pop(key)
        if sample:
            kwargs["temperature"] = temperature if temperature > 0 else 1.0
        else:
            kwargs.pop("top_p", None)  # sampling settings mean nothing to greedy decoding
            kwargs.pop("top_k", None)
        ignored = sorted(set(gen) - self._warned)
        if ignored:
            logger.warning("%s ignores the generation settings %s", MODEL_ID, ignored)
            self._warned |= set(ignored)
        return kwargs, until

    # ---------------------------------------------------------------------------------------------- lmms interface

    def generate_until(self, requests: list[Instance]) -> list[str]:
        args = [request.args for request in requests]
        results: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), desc=MODEL_ID, disable=self.rank != 0)
        for batch in _batches(args, self.batch_size, lambda a: a[1]):
            kwargs, until = self._generation(args[batch[0]][1])
            records, images = [], []
            for i in batch:
                context, _, doc_to_visual, doc_id, task, split = args[i]
                image = self._image(doc_to_visual, task, split, doc_id)
                records.append(self._record(context, image, task, doc_id))
                images.append(image)
            answers = self._run(self.engine.generate_batch, records, images, stop=until, **kwargs)
            for i, answer in zip(batch, answers, strict=True):
                results[i] = answer
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        args = [request.args for request in requests]
        results: list[tuple[float, bool] | None] = [None] * len(args)
        bar = tqdm(total=len(args), desc=MODEL_ID, disable=self.rank != 0)
        for batch in _batches(args, self.batch_size, lambda a: None):
            records, images = [], []
            for i in batch:
                context, doc_to_target, doc_to_visual, doc_id, task, split = args[i]
                target = (
                    doc_to_target if isinstance(doc_to_target, str) else doc_to_target(self._doc(task, split, doc_id))
                )
                image = self._image(doc_to_visual, task, split, doc_id)
                record = self._record(context, image, task, doc_id)
                record["conversations"].append({"from": "gpt", "value": str(target)})
                records.append(record)
                images.append(image)
            scores = self._run(self.engine.score_answers, records, images)
            for i, score in zip(batch, scores, strict=True):
                results[i] = score
            bar.update(len(batch))
        bar.close()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        args = [request.args for request in requests]
        results: list[list[str] | None] = [None] * len(args)
        bar = tqdm(total=len(args), desc=MODEL_ID, disable=self.rank != 0)
        for batch in _batches(args, self.batch_size, lambda a: a[1]):
            kwargs, until = self._generation(args[batch[0]][1])
            conversations: dict[int, dict[str, Any]] = {}
            images: dict[int, Image.Image | None] = {}
            info: dict[int, Any] = {}
            for i in batch:
                context, _, doc_to_visual, _, doc_id, task, split = args[i]
                images[i] = self._image(doc_to_visual, task, split, doc_id)
                conversations[i] = self._record(context, images[i], task, doc_id)
                results[i] = []
            active = list(batch)
            round_idx = 0
            while active:
                records = [conversations[i] for i in active]
                answers = self._run(
                    self.engine.generate_batch, records, [images[i] for i in active], stop=until, **kwargs
                )
                round_idx += 1
                still = []
                for i, answer in zip(active, answers, strict=True):
                    results[i].append(answer)
                    conversations[i]["conversations"].append({"from": "gpt", "value": answer})
                    _, _, doc_to_visual, doc_to_text, doc_id, task, split = args[i]
                    visuals, context, done, outputs, info[i] = doc_to_text(
                        self._doc(task, split, doc_id),
                        previous_output=list(results[i]),
                        round_idx=round_idx,
                        previous_round_info=info.get(i),
                    )
                    if outputs is not None:
                        results[i] = list(outputs)
                    if done:
                        continue
                    if visuals and not _same_image(visuals, images[i]):
                        raise RequestError(
                            f"task {task!r}, doc {doc_id}: round {round_idx + 1} brings other images, but {MODEL_ID} "
                            "holds one image per conversation"
                        )
                    conversations[i]["conversations"].append({"from": "human", "value": str(context)})
                    still.append(i)
                active = still
            bar.update(len(batch))
        bar.close()
        return results

    @staticmethod
    def _run(call: Callable[..., list], records: Sequence[Mapping], *args: Any, **kwargs: Any) -> list:
        """`call(records, *args, **kwargs)`; a request the model cannot take (a malformed conversation, a prompt
        beyond the LLM's positions) fails naming the documents of the batch."""
        try:
            return call(records, *args, **kwargs)
        except ValueError as err:  # RecordError included
            raise RequestError(f"{err} (batch of {[r['id'] for r in records]})") from err


def _conversation(context: str) -> list[dict[str, str]]:
    """`context` as LLaVA turns: a JSON list of turns (see the module docstring), or one human turn."""
    if context.lstrip().startswith("["):
        try:
            turns = json.loads(context)
        except json.JSONDecodeError:
            turns = None
        if isinstance(turns, list) and turns and all(isinstance(t, Mapping) and "value" in t for t in turns):
            roles = ("human", "gpt")
            return [{"from": str(t.get("from", roles[i % 2])), "value": str(t["value"])} for i, t in enumerate(turns)]
    return [{"from": "human", "value": context}]


def _same_image(visuals: Sequence, image: Image.Image | None) -> bool:
    if image is None or len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
        return False
    return to_rgb(visuals[0]) == image


def _batches(args: Sequence[tuple], size: int, group: Callable[[tuple], Any]) -> list[list[int]]:
    """Indices of `args` in batches of at most `size`: requests of one group (e.g. the same generation settings)
    together, longest context first within a group, so padding is small and a memory error comes early."""
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(args):
        groups.setdefault(json.dumps(group(a), sort_keys=True, default=str), []).append(i)
    out = []
    for members in groups.values():
        members = sorted(members, key=lambda i: -len(args[i][0]))
        out += [members[s : s + size] for s in range(0, len(members), size)]
    return out

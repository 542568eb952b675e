"""Inference with a saved LLaVA model: multi-turn chat, streaming, batched generation, and per-stage timings.

    engine = ChatEngine.from_pretrained("runs/stage2")      # prompts with the template the model trained with
    reply = engine.chat("What colour is the star?", image="scene.png")
    reply.text, reply.timings.encode_s, reply.timings.prefill_s, reply.timings.tokens_per_s
    engine.chat("And the circle?")                        # the first question and answer are in the prompt
    for piece in engine.stream("How many stars are there?"):
        print(piece, end="", flush=True)
    engine.generate_batch(["What colour is the star?", "Is a circle round?"], ["scene.png", None])

Prompts are rendered by `llava_adapter.conversation.encode_conversation` with the template the model was trained
with (training records it in the processor), so inference sees exactly the token layout of training (N image
placeholders from the processor).

How the stages are timed (`Timings`):

- `encode_s`: the vision tower and projector, `model.get_image_features(pixel_values)`, timed on its own. Its output
  is handed to `generate` as `mm_encoder_outputs={"image": ...}`, transformers' (5.x) input for pre-encoded
  multimodal features; `generate` then scatters them into the placeholder positions without running the tower again,
  so each image is encoded exactly once per call.
- `prefill_s`: from the start of `generate` until the first new token reaches the host: the LLM's forward pass over
  the whole prompt (text embeddings + image features) and the first token's selection. Measured with a streamer that
  notes when `generate` hands it tokens; the first hand-over is the prompt, the second the first new token (moving it
  to the CPU synchronises the device).
- `decode_s`: from the first new token to the end of `generate` (KV-cached decoding steps); `tokens_per_s` is the
  tokens generated after the first one, over `decode_s`.

On CUDA every boundary is preceded by `torch.cuda.synchronize`, so asynchronous kernels are charged to their stage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from transformers import PreTrainedModel, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mllm_sparse.checkpoint import CheckpointError, load_checked
from mllm_sparse.images import load_image, to_rgb

from .budgets import default_latent_budget, image_tokens_at, served_budgets, vlm_budget
from .conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    encode_conversation,
    has_image,
    record_name,
    validate_record,
)

logger = logging.getLogger(__name__)

ImageInput = Image.Image | str | Path
# A record's "image" field must be a file name; images given in memory get this stand-in.
IN_MEMORY_IMAGE = "<in-memory image>"
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of one generation call (one chat turn, or one batch).

    Attributes:
        encode_s: vision tower + projector for all images of the call (0 without images).
        prefill_s: `generate` start → first new token on the host.
        decode_s: first new token → end of `generate`.
        tokens_per_s: decoded tokens after the first one (all rows) / `decode_s` (0 if none).
        num_image_tokens: N, image placeholders (= visual tokens) per image.
        num_images: images encoded in this call.
        prompt_tokens: prompt tokens over all rows, image placeholders included, padding excluded.
        new_tokens: generated tokens over all rows, up to and including each row's eos.
        batch_size: rows generated together.
    """

    encode_s: float
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    num_image_tokens: int
    num_images: int
    prompt_tokens: int
    new_tokens: int
    batch_size: int = 1

    @property
    def total_s(self) -> float:
        return self.encode_s + self.prefill_s + self.decode_s

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self) | {"total_s": self.total_s}


@dataclass(frozen=True)
class ChatReply:
    """One answer of `ChatEngine.chat` / `stream`.

    Attributes:
        text: the answer, special tokens removed, surrounding whitespace stripped.
        timings: the call's `Timings`.
        prompt_ids: [L] the prompt the model answered (template rendered, N placeholders included).
        new_ids: [T] the generated token ids (eos included when generated).
    """

    text: str
    timings: Timings
    prompt_ids: list[int] = field(repr=False)
    new_ids: list[int] = field(repr=False)


class _TimingStreamer(BaseStreamer):
    """Notes when `generate` hands over tokens (first: the prompt; second: the first new token) and forwards them to
    an optional inner streamer."""

    def __init__(self, device: torch.device, inner: BaseStreamer | None = None):
        self.device = device
        self.inner = inner
        self.puts = 0
        self.first_token_time: float | None = None

    def put(self, value: Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            # `generate` moved the token to the CPU, which already waited for the device; this is for symmetry.
            _synchronize(self.device)
            self.first_token_time = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, Path)):
        return load_image(image)  # FileNotFoundError / ImageLoadError naming the file
    raise TypeError(f"An image must be a PIL image or a file path, got {type(image).__name__}")


def _one_image_per_row(rows: Sequence, images: Sequence | None, noun: str) -> list:
    """`images` as a list with one entry per row (None: no images at all), or `ValueError` when the counts differ."""
    images = [None] * len(rows) if images is None else list(images)
    if len(images) != len(rows):
        raise ValueError(f"Got {len(rows)} {noun} but {len(images)} images (use None for text-only rows)")
    return images


def _check_image_field(record: Mapping, index: int, image: ImageInput | None) -> None:
    """A record with an "image" field needs an image, a record without one none."""
    if has_image(record) != (image is not None):
        need = "has an image field but no image was given" if image is None else "is text-only but got an image"
        raise ValueError(f"{record_name(record, index)} (row {index}) {need}")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. float32, bfloat16 or float16")
    return value


DEFAULT_TEMPLATE = "vicuna_v1"  # LLaVA-1.5's, for a model whose processor records none


def conversation_template(processor, asked: str | None) -> str:
    """The template to prompt with: `asked`, or else the one the processor records (`conversation_template`, written
    by training), or else vicuna_v1; a warning where it guesses or where `asked` contradicts the record."""
    if asked is not None and asked not in TEMPLATES:
        raise ValueError(f"Unknown template {asked!r}; valid templates: {list(TEMPLATES)}")
    recorded = getattr(processor, "conversation_template", None)
    if asked is None and recorded is None:
        logger.warning(
            "the model records no conversation template (it was never trained by this project); prompting with %s, "
            "LLaVA's: pass the template it was trained with if it differs",
            DEFAULT_TEMPLATE,
        )
        return DEFAULT_TEMPLATE
    if asked is None:
        return recorded
    if recorded is not None and recorded != asked:
        logger.warning(
            "the model was trained with the %s template, but %s was asked for: using %s", recorded, asked, asked
        )
    return asked


class ChatEngine:
    """A LLaVA model and its processor, ready to answer: multi-turn chat, streaming and batched generation.

    Args:
        model: a `LlavaForConditionalGeneration` (any tower: SparseFormer, CLIP, pooled).
        processor: its `SparseLlavaProcessor` (tokenizer + image processor + N).
        template: the conversation template (`conversation.TEMPLATES`); None: the one the model was trained with,
            as its processor records it (`vicuna_v1`, LLaVA's, with a warning, where it records none). A template
            that differs from the recorded one is used, with a warning naming both.
        device: where to run; None keeps the model where it is.
        dtype: cast the model to this dtype (e.g. `torch.bfloat16`); None keeps it.
        num_latent_tokens: the token budget to run at, one the tower serves (`budgets`; an elastic tower serves
            several); None: the model's default. Settable later (`engine.num_latent_tokens = 9`): the next call
            encodes its image at the new budget.

    Generation defaults (any `generate` keyword overrides them): greedy (`do_sample=False`, `num_beams=1`),
    `max_new_tokens=64`, `use_cache=True`; template `plain` also stops at the first newline (its captions end there
    and it has no eos).

    State: `conversation` (LLaVA-format turns so far), `image` (the conversation's image or None), `last_reply`
    (the latest `chat` / `stream` answer) and `last_timings` (of the latest call, `generate_batch` included).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor,
        template: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        num_latent_tokens: int | None = None,
    ):
        template = conversation_template(processor, template)
        dtype = _resolve_dtype(dtype)
        if device is not None:
            model = model.to(device)
        if dtype is not None:
            model = model.to(dtype)
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.image_token_id = int(model.config.image_token_id)
        inserted = int(getattr(processor, "num_image_tokens", model.config.image_seq_length))
        if inserted != model.config.image_seq_length:
            raise ValueError(
                f"The processor inserts {inserted} image placeholders but the model's tower yields "
                f"{model.config.image_seq_length} features (config.image_seq_length); they must match"
            )
        self.budgets = served_budgets(model)
        self.num_latent_tokens = num_latent_tokens
        if self.tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; batched generation needs one (build_vlm adds it)")
        self.conversation: list[dict[str, str]] = []
        self.image: Image.Image | None = None
        self.last_timings: Timings | None = None
        self.last_reply: ChatReply | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        template: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        num_latent_tokens: int | None = None,
    ) -> ChatEngine:
        """Load a saved LLaVA folder (model + processor). `template` None: the one the folder records (see the class);
        `device` None: CUDA if available, else CPU; `num_latent_tokens` None: the model's default budget."""
        from transformers import AutoModelForImageTextToText, AutoProcessor  # our classes: registered by llava_adapter

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"Model folder not found: {model_dir}")
        for name in ("config.json", "processor_config.json"):
            if not (model_dir / name).is_file():
                raise FileNotFoundError(
                    f"{model_dir} is not a saved LLaVA model: {name} is missing "
                    "(build one with `mllm-sparse build-vlm`)"
                )
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs = {"dtype": _resolve_dtype(dtype)} if dtype is not None else {}
        # Truncated weights, a non-LLaVA folder or NaN/inf weights: one `CheckpointError` naming the folder or file.
        model = load_checked(
            AutoModelForImageTextToText.from_pretrained, model_dir, what="LLaVA model", model_types=("llava",), **kwargs
        )
        try:
            processor = AutoProcessor.from_pretrained(model_dir)
        except (OSError, ValueError) as err:  # a truncated tokenizer.json or processor_config.json names no file
            raise CheckpointError(
                f"{model_dir}: the processor (tokenizer and image processor files) cannot be loaded: {err}"
            ) from err
        return cls(model, processor, template=template, device=device, num_latent_tokens=num_latent_tokens)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def num_latent_tokens(self) -> int:
        """The token budget images are encoded at (one of `budgets`)."""
        return self._num_latent_tokens

    @num_latent_tokens.setter
    def num_latent_tokens(self, value: int | None) -> None:
        n = default_latent_budget(self.model) if value is None else int(value)
        self.num_image_tokens = image_tokens_at(self.model, n)  # refuses an unserved budget, naming the served ones
        self._num_latent_tokens = n

    # ----------------------------------------------------------------------------------------------- multi-turn chat

    def reset(self) -> None:
        """Forget the conversation and its image."""
        self.conversation = []
        self.image = None

    def record(self) -> dict[str, Any]:
        """The conversation so far as a LLaVA record (the image, if any, named `IN_MEMORY_IMAGE`)."""
        record: dict[str, Any] = {"id": "chat"}
        if self.image is not None:
            record["image"] = IN_MEMORY_IMAGE
        record["conversations"] = [dict(turn) for turn in self.conversation]
        return record

    def _next_record(self, message: str, image: ImageInput | None) -> tuple[dict[str, Any], Image.Image | None]:
        """The record ending with `message` as a new human turn, and the conversation's image after it."""
        if not isinstance(message, str):
            raise TypeError(f"message must be a string, got {type(message).__name__}")
        current = self.image
        if image is not None:
            if self.conversation:
                raise ValueError(
                    "An image can only come with the first message of a conversation (LLaVA puts it in the first "
                    "turn); call reset() to start a new conversation about another image"
                )
            current = _load(image)
            if IMAGE_PLACEHOLDER not in message:
                message = f"{IMAGE_PLACEHOLDER}\n{message}"
        elif IMAGE_PLACEHOLDER in message:
            raise ValueError(f"The message contains {IMAGE_PLACEHOLDER} but no image was given")
        record = self.record()
        if current is not None:
            record["image"] = IN_MEMORY_IMAGE
        record["conversations"].append({"from": "human", "value": message})
        return record, current

    def _commit(self, record: Mapping, image: Image.Image | None, reply: str) -> None:
        self.conversation = [dict(turn) for turn in record["conversations"]] + [{"from": "gpt", "value": reply}]
        self.image = image

    def chat(self, message: str, image: ImageInput | None = None, **gen_kwargs) -> ChatReply:
        """Answer `message` in the ongoing conversation and append both turns to it.

        Args:
            message: the user's text; `<image>` marks where the image goes (default: before the text).
            image: a PIL image or a file path, only with the first message of a conversation.
            **gen_kwargs: `generate` keywords (e.g. `max_new_tokens`, `do_sample`, `temperature`).
        """
        record, current = self._next_record(message, image)
        texts, timings, prompts, new_ids = self._generate([record], [current], gen_kwargs)
        self._commit(record, current, texts[0])
        self.last_reply = ChatReply(texts[0], timings, prompts[0], new_ids[0])
        return self.last_reply

    def stream(self, message: str, image: ImageInput | None = None, **gen_kwargs) -> Iterator[str]:
        """Like `chat`, but yields the answer's text as it is generated (transformers' `TextIteratorStreamer`, with
        `generate` running in a background thread).

        The pieces joined and stripped equal the recorded answer (`last_reply.text`; template `plain` further cuts it
        at the first newline), which is `chat`'s answer for greedy decoding. The turn is recorded when the stream is
        consumed to the end; a stream closed early waits for its generation to finish and records nothing.
        """
        record, current = self._next_record(message, image)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["out"] = self._generate([record], [current], gen_kwargs, streamer=streamer)
            except BaseException as err:  # re-raised in the consumer's thread
                result["error"] = err
                streamer.end()

        thread = threading.Thread(target=run, name="llava-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            thread.join()
        if "error" in result:
            raise result["error"]
        texts, timings, prompts, new_ids = result["out"]
        self._commit(record, current, texts[0])
        self.last_reply = ChatReply(texts[0], timings, prompts[0], new_ids[0])

    # ------------------------------------------------------------------------------------------- batched generation

    def generate_batch(
        self,
        records_or_prompts: Sequence[Mapping | str],
        images: Sequence[ImageInput | None] | None = None,
        stop: Sequence[str] = (),
        **gen_kwargs,
    ) -> list[str]:
        """Answer many prompts in one left-padded batch (greedy and KV-cached by default); `last_timings` holds
        the batch's timings.

        Args:
            records_or_prompts: LLaVA records ending with a human turn (earlier turns are context), or plain
                questions (one human turn each; `<image>` is put before the text when the row has an image).
            images: per row, a PIL image, a file path or None (text-only); None for an all-text batch. A record
                with an "image" field needs one, a record without none.
            stop: strings that end an answer: a row stops generating at the first one and its text is cut before
                it (lmms-eval's `until`).
            **gen_kwargs: `generate` keywords.
        Returns:
            One answer per row, in order.
        """
        rows = list(records_or_prompts)
        if not rows:
            return []
        images = _one_image_per_row(rows, images, "prompts")
        records, loaded = [], []
        for i, (row, image) in enumerate(zip(rows, images, strict=True)):
            if isinstance(row, str):
                value = row if image is None or IMAGE_PLACEHOLDER in row else f"{IMAGE_PLACEHOLDER}\n{row}"
                row = {"id": f"prompt #{i}", "conversations": [{"from": "human", "value": value}]}
                if image is not None:
                    row["image"] = IN_MEMORY_IMAGE
            elif not isinstance(row, Mapping):
                raise TypeError(f"Row {i}: expected a LLaVA record or a string, got {type(row).__name__}")
            validate_record(row, i, add_generation_prompt=True)
            _check_image_field(row, i, image)
            records.append(row)
            loaded.append(None if image is None else _load(image))
        texts, _, _, _ = self._generate(records, loaded, gen_kwargs, stop=stop)
        return texts

    # ------------------------------------------------------------------------------------------------------ scoring

    def score_answers(
        self, records: Sequence[Mapping], images: Sequence[ImageInput | None] | None = None
    ) -> list[tuple[float, bool]]:
        """Log-probability of each record's last answer given the turns (and image) before it, in one forward pass.

        The answer's tokens are those the template supervises for the last gpt turn (vicuna_v1's leading space
        included), without the tokens that close the turn (eos, a chat template's end-of-turn marker, `plain`'s
        newline): the probability of the answer's text, not of the answer ending there.

        Args:
            records: LLaVA records ending with a gpt turn (the answer to score).
            images: per row, a PIL image, a file path or None, as in `generate_batch`.
        Returns:
            Per row, (sum of the answer tokens' log-probabilities, whether greedy decoding yields every one of them).
        """
        rows = list(records)
        if not rows:
            return []
        images = _one_image_per_row(rows, images, "records")
        sequences, spans = [], []
        for i, (record, image) in enumerate(zip(rows, images, strict=True)):
            validate_record(record, i)
            _check_image_field(record, i, image)
            ids, start, end = self._answer_span(record, i)
            sequences.append(ids)
            spans.append((start, end))
        batch = self.tokenizer.pad(
            {"input_ids": sequences}, padding=True, padding_side="right", return_attention_mask=True,
            return_tensors="pt",
        )  # fmt: skip
        kwargs: dict[str, Any] = {}
        present = [_load(image) for image in images if image is not None]
        if present:
            pixels = self.processor.image_processor(images=present, return_tensors="pt")["pixel_values"]
            kwargs["pixel_values"] = pixels.to(self.device, next(self.model.model.vision_tower.parameters()).dtype)
        with torch.no_grad(), vlm_budget(self.model, self.num_latent_tokens):
            logits = self.model(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
                **kwargs,
            ).logits
        # Token t is predicted at position t - 1: gather exactly the answer positions of every row.
        row = torch.cat([torch.full((end - start,), r) for r, (start, end) in enumerate(spans)]).to(self.device)
        pos = torch.cat([torch.arange(start, end) for start, end in spans]).to(self.device)
        predicted = logits[row, pos - 1].float()  # [T, V]
        targets = batch["input_ids"].to(self.device)[row, pos]
        token_logprobs = predicted.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        logprob = torch.zeros(len(rows), device=self.device).index_add_(0, row, token_logprobs)
        misses = torch.zeros(len(rows), device=self.device).index_add_(
            0, row, (predicted.argmax(-1) != targets).float()
        )
        return [(float(lp), bool(m == 0)) for lp, m in zip(logprob.tolist(), misses.tolist(), strict=True)]

    def _answer_span(self, record: Mapping, index: int) -> tuple[list[int], int, int]:
        """The record's ids and the [start, end) positions of its last answer's tokens (see `score_answers`)."""
        encoded = encode_conversation(
            record, self.tokenizer, self.template, self.num_image_tokens, image_token_id=self.image_token_id
        )
        ids = encoded.input_ids.tolist()
        prompt = self.prompt_ids({**record, "conversations": list(record["conversations"][:-1])})
        if ids[: len(prompt)] != prompt:
            raise ValueError(f"{record_name(record, index)}: the template renders the answer's prompt differently")
        supervised = (encoded.labels[len(prompt) :] != IGNORE_INDEX).nonzero().flatten().tolist()
        end = len(prompt) + (supervised[-1] + 1 if supervised else 0)
        special = set(self.tokenizer.all_special_ids)
        while end > len(prompt) and (ids[end - 1] in special or not self.tokenizer.decode([ids[end - 1]]).strip()):
            end -= 1  # the tokens that close the turn
        if end == len(prompt):
            raise ValueError(f"{record_name(record, index)}: the answer to score is empty")
        return ids, len(prompt), end

    # ------------------------------------------------------------------------------------------------- internals

    def encode_images(self, images: Sequence[Image.Image]) -> tuple[BaseModelOutputWithPooling, float]:
        """Vision tower + projector for `images`, timed.

        Returns:
            (features, seconds): `features.pooler_output` is a list of M tensors [N, D] (D the LLM width), the form
            `generate(mm_encoder_outputs={"image": features})` consumes.
        """
        pixel_values = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        tower = self.model.model.vision_tower
        pixel_values = pixel_values.to(self.device, next(tower.parameters()).dtype)
        _synchronize(self.device)
        start = time.perf_counter()
        with torch.no_grad(), vlm_budget(self.model, self.num_latent_tokens):
            out = self.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        _synchronize(self.device)
        seconds = time.perf_counter() - start
        features = list(out.pooler_output)
        if any(f.shape[0] != self.num_image_tokens for f in features):
            raise ValueError(
                f"The tower yields {[f.shape[0] for f in features]} features per image, but prompts carry "
                f"{self.num_image_tokens} placeholders"
            )
        # Only the projected features travel on: the tower's per-layer hidden states are not needed any more.
        return BaseModelOutputWithPooling(pooler_output=features), seconds

    def prompt_ids(self, record: Mapping) -> list[int]:
        """[L] the token ids of `record` (ending with a human turn) rendered as a generation prompt."""
        encoded = encode_conversation(
            record,
            self.tokenizer,
            self.template,
            self.num_image_tokens,
            add_generation_prompt=True,
            image_token_id=self.image_token_id,
        )
        return encoded.input_ids.tolist()

    def _generation_kwargs(self, gen_kwargs: Mapping, stop: Sequence[str] = ()) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
            "do_sample": False,
            "num_beams": 1,
            "use_cache": True,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if self.tokenizer.eos_token_id is not None:
            kwargs["eos_token_id"] = self.tokenizer.eos_token_id
        stop_strings = [*stop, *(["\n"] if self.template == "plain" else [])]
        if stop_strings:
            kwargs |= {"stop_strings": stop_strings, "tokenizer": self.tokenizer}
        kwargs.update(gen_kwargs)
        return kwargs

    def _generate(
        self,
        records: Sequence[Mapping],
        images: Sequence[Image.Image | None],
        gen_kwargs: Mapping,
        streamer: BaseStreamer | None = None,
        stop: Sequence[str] = (),
    ) -> tuple[list[str], Timings, list[list[int]], list[list[int]]]:
        """Encode the images once, left-pad the prompts, generate; returns texts, timings, prompt and new ids."""
        stop = [s for s in stop if s]
        prompts = [self.prompt_ids(record) for record in records]
        generation = self._generation_kwargs(gen_kwargs, stop)
        context = getattr(self.model.config.text_config, "max_position_embeddings", None)
        longest = max(len(ids) for ids in prompts)
        if context is not None and longest + generation["max_new_tokens"] > context:
            raise ValueError(
                f"The prompt has {longest} tokens and up to {generation['max_new_tokens']} more may be generated, "
                f"beyond the LLM's {context} positions: start a new conversation (reset()) or ask for fewer tokens"
            )
        present = [image for image in images if image is not None]
        mm_kwargs: dict[str, Any] = {}
        encode_s = 0.0
        if present:
            features, encode_s = self.encode_images(present)
            mm_kwargs["mm_encoder_outputs"] = {"image": features}
        # Decoder-only batches are padded on the left so every row's next token comes right after its prompt.
        batch = self.tokenizer.pad(
            {"input_ids": prompts}, padding=True, padding_side="left", return_attention_mask=True, return_tensors="pt"
        )
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        timer = _TimingStreamer(self.device, streamer)
        _synchronize(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                streamer=timer,
                **mm_kwargs,
                **generation,
            )
        _synchronize(self.device)
        end = time.perf_counter()
        first = timer.first_token_time if timer.first_token_time is not None else end
        new_ids = [self._trim(row) for row in output[:, input_ids.shape[1] :].tolist()]
        texts = [self._decode(ids, stop) for ids in new_ids]
        new_tokens = sum(len(ids) for ids in new_ids)
        decoded_after_first = new_tokens - sum(1 for ids in new_ids if ids)
        decode_s = end - first
        timings = Timings(
            encode_s=encode_s,
            prefill_s=first - start,
            decode_s=decode_s,
            tokens_per_s=decoded_after_first / decode_s if decode_s > 0 and decoded_after_first else 0.0,
            num_image_tokens=self.num_image_tokens,
            num_images=len(present),
            prompt_tokens=sum(len(ids) for ids in prompts),
            new_tokens=new_tokens,
            batch_size=len(records),
        )
        self.last_timings = timings
        return texts, timings, prompts, new_ids

    def _trim(self, ids: list[int]) -> list[int]:
        """A row's generated ids up to and including its first eos; trailing padding of finished rows removed."""
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in ids:
            return ids[: ids.index(eos) + 1]
        pad = self.tokenizer.pad_token_id
        while ids and ids[-1] == pad:
            ids = ids[:-1]
        return ids

    def _decode(self, ids: list[int], stop: Sequence[str] = ()) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for end in [*stop, *(["\n"] if self.template == "plain" else [])]:
            text = text.split(end, 1)[0]
        return text.strip()

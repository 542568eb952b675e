"""One LLaVA record's `conversations` → token ids and labels, for training (and the matching prompt for generation).

The data format is haotian-liu/LLaVA's JSON record::

    {"id": "000123", "image": "coco/000123.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}, ...]}

Rules (`validate_record` checks them; every error names the record):

- `conversations` is a non-empty list of `{"from", "value"}` turns; `value` is a string.
- Roles alternate `human`, `gpt`, `human`, `gpt`, ... and end with `gpt` (with `add_generation_prompt=True` they end
  with `human` instead). One leading `{"from": "system"}` turn is accepted: it replaces vicuna_v1's system prompt, is
  passed as a system message to a chat template, and is dropped by `plain`. A system turn anywhere else is an error.
- An image record (`"image"` present and not null) has exactly one `<image>`, in its first human turn, at the start
  (`"<image>\\n..."`), the end (`"...\\n<image>"`) or anywhere else; the placeholders go exactly where it is.
  A text-only record has no `<image>` at all.

`<image>` becomes `num_image_tokens` copies of the image token id, inserted as ids (never by repeating a string).
N comes from the vision tower's config; nothing here assumes a number. Labels are -100 everywhere except on the
assistant's tokens (and the eos that closes each assistant turn, where the template has one); image placeholders are
always -100.

Templates:

- `plain` (LLaVA stage 1): `[bos] <image>×N caption "\\n"`; the human text is dropped, the caption and its newline
  are supervised. Exactly one human/gpt pair.
- `vicuna_v1` (LLaVA stage 2): `[bos] SYSTEM USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>`; supervised are
  `" a1"` + eos, `" a2"` + eos (the space before the answer belongs to it, so the generation prompt ends at
  `ASSISTANT:`).
- `chat_template`: the tokenizer's own `apply_chat_template` (roles human→user, gpt→assistant). Each assistant span is
  the text between the rendering of the turns before it (with the generation prompt) and the rendering up to and
  including it; trailing whitespace after the span (e.g. ChatML's newline after `<|im_end|>`) is not supervised.
  The template must be prefix-consistent, which is checked. (Not `return_assistant_tokens_mask`: it needs
  `{% generation %}` markers that most released templates, Qwen2's and Llama 3's among them, do not have.)

Truncation (`max_length`) cuts from the end and never through the image placeholders: if the text before them plus
the N placeholders do not fit, `RecordError` names the record and the numbers. A truncated record may be left with no
supervised token; `encode_conversation` does not raise for that, it reports `num_supervised == 0` and the caller
decides (`LlavaJsonDataset` raises, or substitutes the next record with `skip_bad_records=True`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
TEMPLATES = ("plain", "vicuna_v1", "chat_template")
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


class RecordError(ValueError):
    """A record that cannot be used; the message starts with the record's id (or its index when it has none)."""

    def __init__(self, record: str, detail: str):
        super().__init__(f"{record}: {detail}")
        self.record = record
        self.detail = detail

    def __reduce__(self):  # picklable across DataLoader workers despite the two-argument constructor
        return type(self), (self.record, self.detail)


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids and labels of one record.

    Attributes:
        input_ids: [L] int64, image placeholders included.
        labels: [L] int64, -100 where no loss is taken.
        truncated: whether `max_length` cut the end off.
    """

    input_ids: Tensor
    labels: Tensor
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        """How many positions carry a label (0 when truncation cut every answer off)."""
        return int((self.labels != IGNORE_INDEX).sum())


def record_name(record: object, index: int | None = None) -> str:
    """How errors refer to a record: `record 'ID'`, or `record #INDEX` when it has no id."""
    if isinstance(record, Mapping) and "id" in record:
        return f"record {record['id']!r}"
    return f"record #{index}" if index is not None else "record (no id)"


def has_image(record: Mapping) -> bool:
    return record.get("image") is not None


def validate_record(record: object, index: int | None = None, add_generation_prompt: bool = False) -> None:
    """Check a record against the rules in the module docstring, without tokenising it.

    Args:
        record: one element of a LLaVA JSON list.
        index: its position in the list, used to name records that have no id.
        add_generation_prompt: the conversation is a prompt to answer, so it ends with a human turn.
    Raises:
        RecordError: naming the record and what is wrong.
    """
    name = record_name(record, index)
    if not isinstance(record, Mapping):
        raise RecordError(name, f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("id", "conversations") if key not in record]
    if missing:
        raise RecordError(name, f"missing key(s) {missing}")
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RecordError(name, "'conversations' must be a non-empty list of turns")
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise RecordError(name, f"turn {i} must be an object with 'from' and 'value', got {turn!r}")
        if turn["from"] not in CHAT_ROLES:
            raise RecordError(name, f"turn {i} has unknown role {turn['from']!r}; valid roles: {list(CHAT_ROLES)}")
        if not isinstance(turn["value"], str):
            raise RecordError(name, f"turn {i} has a non-string value ({type(turn['value']).__name__})")
    start = 1 if turns[0]["from"] == "system" else 0
    roles = [turn["from"] for turn in turns[start:]]
    expected = ["human" if i % 2 == 0 else "gpt" for i in range(len(roles))]
    last = "human" if add_generation_prompt else "gpt"
    if not roles or roles != expected or roles[-1] != last:
        raise RecordError(
            name,
            f"roles must alternate human, gpt, ... and end with {last} (after an optional leading system turn), "
            f"got {[turn['from'] for turn in turns]}",
        )
    counts = [turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns]
    if has_image(record):
        if not isinstance(record["image"], str) or not record["image"]:
            raise RecordError(name, f"'image' must be a non-empty file name, got {record['image']!r}")
        if sum(counts) != 1 or counts[start] != 1:
            raise RecordError(
                name,
                f"an image record needs exactly one {IMAGE_PLACEHOLDER} in its first human turn, "
                f"found {sum(counts)} in total ({counts[start]} in the first human turn)",
            )
    elif sum(counts):
        raise RecordError(name, f"text-only record (no 'image') contains {sum(counts)} {IMAGE_PLACEHOLDER}")


def resolve_image_token_id(tokenizer: PreTrainedTokenizerBase, image_token_id: int | None = None) -> int:
    """The id `<image>` expands to: `image_token_id` if given, else the tokenizer's `<image>` token."""
    if image_token_id is not None:
        return int(image_token_id)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(
            f"The tokenizer has no {IMAGE_PLACEHOLDER} token: add it with "
            f"tokenizer.add_tokens(['{IMAGE_PLACEHOLDER}'], special_tokens=True) and resize the LLM's embeddings, "
            "or pass image_token_id"
        )
    return int(token_id)


def encode_conversation(
    record: Mapping,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    num_image_tokens: int,
    max_length: int | None = None,
    image_token_id: int | None = None,
    add_generation_prompt: bool = False,
) -> EncodedConversation:
    """Tokenise one LLaVA record with `template` and label its assistant tokens.

    Args:
        record: a haotian-liu/LLaVA record (validated here).
        tokenizer: the LLM's tokenizer; it must know `<image>` unless `image_token_id` is given.
        template: one of `TEMPLATES`.
        num_image_tokens: N, the number of visual tokens the vision tower produces per image.
        max_length: cut the sequence to at most this many tokens, from the end (see the module docstring).
        image_token_id: the placeholder id; defaults to the tokenizer's `<image>` id.
        add_generation_prompt: the record ends with a human turn; build the prompt the model answers (labels all
            -100). Such a prompt is never cut: a too-long one raises.
    Returns:
        `EncodedConversation` with `input_ids` and `labels` of shape [L], L ≤ max_length.
    Raises:
        RecordError: invalid record, image block beyond `max_length`, or a chat template that is not
            prefix-consistent.
    """
    if template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}; valid templates: {list(TEMPLATES)}")
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
    validate_record(record, add_generation_prompt=add_generation_prompt)
    name = record_name(record)
    image_id = resolve_image_token_id(tokenizer, image_token_id)
    image_ids = [image_id] * num_image_tokens

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                ids += image_ids
            if piece:
                ids += tokenizer.encode(piece, add_special_tokens=False)
        return ids

    if template == "plain":
        segments = _plain(record, tokenizer, encode, image_ids, add_generation_prompt)
    elif template == "vicuna_v1":
        segments = _vicuna_v1(record, tokenizer, encode)
    else:
        segments = _chat_template(record, tokenizer, encode, name, add_generation_prompt)

    input_ids = torch.tensor([i for ids, _ in segments for i in ids], dtype=torch.long)
    labels = torch.tensor([i if sup else IGNORE_INDEX for ids, sup in segments for i in ids], dtype=torch.long)
    labels = labels.masked_fill(input_ids == image_id, IGNORE_INDEX)
    if add_generation_prompt:
        labels.fill_(IGNORE_INDEX)

    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        positions = (input_ids == image_id).nonzero().flatten()
        if len(positions) and int(positions[-1]) >= max_length:
            prefix = int(positions[0])
            raise RecordError(
                name,
                f"the image placeholders do not fit in max_length={max_length}: {prefix} tokens before them + "
                f"N={num_image_tokens} placeholders = {prefix + num_image_tokens} > {max_length}",
            )
        if add_generation_prompt:
            raise RecordError(name, f"the prompt has {len(input_ids)} tokens, more than max_length={max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return EncodedConversation(input_ids=input_ids, labels=labels, truncated=truncated)


Segments = list[tuple[list[int], bool]]  # (ids, supervised) in order
Encoder = Callable[[str], list[int]]


def _dialogue(record: Mapping) -> tuple[str | None, list[Mapping]]:
    """The leading system text (or None) and the human/gpt turns."""
    turns = record["conversations"]
    if turns[0]["from"] == "system":
        return turns[0]["value"], turns[1:]
    return None, turns


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _plain(
    record: Mapping,
    tokenizer: PreTrainedTokenizerBase,
    encode: Encoder,
    image_ids: list[int],
    add_generation_prompt: bool,
) -> Segments:
    _, turns = _dialogue(record)
    if len(turns) != (1 if add_generation_prompt else 2):
        raise RecordError(record_name(record), f"template 'plain' takes one human/gpt pair, got {len(turns)} turns")
    prompt = _bos(tokenizer) + (image_ids if has_image(record) else [])
    if add_generation_prompt:
        return [(prompt, False)]
    return [(prompt, False), (encode(turns[1]["value"] + "\n"), True)]


def _vicuna_v1(record: Mapping, tokenizer: PreTrainedTokenizerBase, encode: Encoder) -> Segments:
    if tokenizer.eos_token_id is None:
        raise ValueError("template 'vicuna_v1' needs a tokenizer with an eos token")
    system, turns = _dialogue(record)
    segments: Segments = [(_bos(tokenizer), False)]
    prompt = (VICUNA_SYSTEM if system is None else system) + " "
    for turn in turns:
        if turn["from"] == "human":
            prompt += f"USER: {turn['value']} ASSISTANT:"
        else:
            segments += [(encode(prompt), False), (encode(" " + turn["value"]) + [tokenizer.eos_token_id], True)]
            prompt = ""
    segments.append((encode(prompt), False))
    return segments


def _chat_template(
    record: Mapping, tokenizer: PreTrainedTokenizerBase, encode: Encoder, name: str, add_generation_prompt: bool
) -> Segments:
    if tokenizer.chat_template is None:
        raise ValueError("template 'chat_template' needs a tokenizer with a chat_template")
    messages = [{"role": CHAT_ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]

    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:  # jinja's own errors (raise_exception, undefined names) have no common base
            raise RecordError(name, f"the chat template failed: {err}") from err

    full = render(len(messages), add_generation_prompt)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(i, True)
        # through the last message is the whole conversation: one render fewer per record (a third of a question's)
        through = full if i + 1 == len(messages) and not add_generation_prompt else render(i + 1, False)
        start = len(before)
        end = max(start, len(through.rstrip()))
        if not (full.startswith(before) and full.startswith(through)):
            raise RecordError(
                name,
                f"the tokenizer's chat template is not prefix-consistent at message {i}: rendering the messages "
                "before an answer (with the generation prompt) and through it must both be prefixes of rendering "
                "the whole conversation; use template 'vicuna_v1' or fix the chat template",
            )
        if spans and start < spans[-1][1]:
            raise RecordError(name, f"the chat template renders message {i} before the end of the previous answer")
        spans.append((start, end))

    segments: Segments = []
    cursor = 0
    for start, end in spans:
        segments += [(encode(full[cursor:start]), False), (encode(full[start:end]), True)]
        cursor = end
    segments.append((encode(full[cursor:]), False))
    return segments

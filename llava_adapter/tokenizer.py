"""A small byte-level BPE tokenizer trained on the spot, for tiny LLMs in tests and in the synthetic world.

Nothing can be downloaded here, so tiny language models get a tokenizer trained on the texts they will see. It is a
real `PreTrainedTokenizerFast`: `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip, and it carries a chat
template. Byte-level BPE has no out-of-vocabulary text, so `decode(encode(text)) == text` for any string.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"

# Ids 0-4 in this order (Llama's <unk>=0, <s>=1, </s>=2, then ours).
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)

# ChatML-like, without extra special tokens. The assistant turn ends exactly at eos (nothing follows it), so the
# tokens a model must learn to emit are the assistant's text plus eos; the newline that separates turns belongs to the
# next header. Rendering messages[:k] with the generation prompt is a prefix of rendering messages[:k + 1].
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`.

    The special tokens `<unk>`, `<s>` (bos), `</s>` (eos), `<pad>` and `<image>` get ids 0-4; each always encodes to
    one id. The tokenizer adds no special tokens by itself (like GPT-2 or Qwen): templates write bos and eos
    explicitly, so a rendered chat prompt never gets a second bos. Decoding keeps spacing exactly
    (`clean_up_tokenization_spaces=False`).

    Args:
        texts: training texts; any iterable of strings (consumed once).
        vocab_size: the largest vocabulary to learn, special tokens and the 256 byte symbols included. The result is
            smaller when the texts admit fewer merges.
    """
    min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (5 special tokens + 256 bytes), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN],
        clean_up_tokenization_spaces=False,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )

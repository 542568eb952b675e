"""The language model of a VLM: any HF causal LM (hub id or folder), or a tiny one built from a config.

Tiny LLMs (`tiny-llama`, `tiny-qwen2`, `tiny-phi3`) are the real transformers classes at toy size, with a
byte-level BPE tokenizer trained on a corpus (e.g. the synthetic world's text), so the whole pipeline runs on a
laptop and in tests without downloading anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from mllm_sparse.files import read_json, read_jsonl

# Shared toy dimensions: big enough to learn the synthetic world's QA, small enough for 2 CPU cores. A from-scratch
# LLM answers "what colour is the X" only once some head has learnt to look up the image token that matches X, and
# when that happens varies from run to run. Measured with one ground-truth token per object in place of the image
# (batch 64 single questions, lr 2e-3, one run each): 8 heads of width 32 reached colour 91.8% after 500 steps, 4 of
# width 32 36.5% (with or without GQA; ~4,000 steps for 94%); later runs of 8 heads, of width 16 (these) and of
# width 32, were still at 36-39% after 500 steps. So the head layout is not shown to matter; 8 of 16 keeps the
# attention width equal to the hidden size.
_TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)


def tiny_init_std(hidden_size: int) -> float:
    """The weight init std of a tiny LLM trained from scratch: 1/sqrt(hidden_size), not HF's default 0.02.

    0.02 suits the few-thousand-wide models it was tuned for. At width 128 it makes attention logits ~20× smaller
    than 1/sqrt(width) does, so attention stays uniform and the model sits on the question-only prior for a long
    time. Measured on the synthetic world's conversations with the caption in place of the image (tiny Llama,
    batch 16, lr 2e-3): with 0.02, colour questions are at 11% (their prior: 13%) after 1,000 steps; with 0.1 they
    reach 39% after 400.
    """
    return hidden_size**-0.5


TINY_LLMS: dict[str, type[PretrainedConfig]] = {
    "tiny-llama": LlamaConfig,
    "tiny-qwen2": Qwen2Config,
    "tiny-phi3": Phi3Config,
}


def tiny_llm_config(name: str, tokenizer: PreTrainedTokenizerBase, max_positions: int = 1024, **overrides):
    """The config of tiny LLM `name`, sized to the tokenizer's vocabulary."""
    if name not in TINY_LLMS:
        raise ValueError(f"Unknown tiny LLM {name!r}; choose from {sorted(TINY_LLMS)}")
    fields = dict(_TINY, max_position_embeddings=max_positions, vocab_size=len(tokenizer), tie_word_embeddings=True)
    fields.update(overrides)
    fields.setdefault("initializer_range", tiny_init_std(fields["hidden_size"]))
    return TINY_LLMS[name](
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fields,
    )


def corpus_texts(path: str | Path) -> Iterator[str]:
    """Every text of a corpus: a synthetic-world folder (LLaVA JSON + captions), a LLaVA JSON file or a text file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("llava_*.json")) + sorted(path.glob("captions.jsonl"))
        if not files:
            raise FileNotFoundError(f"Corpus folder {path} has no llava_*.json or captions.jsonl")
        for file in files:
            yield from corpus_texts(file)
    elif path.suffix == ".json":
        for record in read_json(path):
            for turn in record.get("conversations", []):
                yield turn["value"].replace("<image>", "")
    elif path.suffix == ".jsonl":
        for row in read_jsonl(path):
            captions = row.get("captions", row.get("caption", []))
            yield from [captions] if isinstance(captions, str) else captions
    elif path.is_file():
        yield from path.read_text().splitlines()
    else:
        raise FileNotFoundError(f"Corpus not found: {path}")


def load_llm(
    name_or_dir: str,
    tokenizer_corpus: str | Path | None = None,
    vocab_size: int = 1024,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer.

    Args:
        name_or_dir: a tiny LLM name (see `TINY_LLMS`), a local folder or a hub id (`AutoModelForCausalLM`).
        tokenizer_corpus: for tiny LLMs, the text the tokenizer is trained on (see `corpus_texts`).
        vocab_size: tiny LLMs' BPE vocabulary size.
    """
    if name_or_dir in TINY_LLMS:
        import torch

        from .tokenizer import train_tokenizer

        if tokenizer_corpus is None:
            raise ValueError(f"Tiny LLM {name_or_dir!r} needs --tokenizer-corpus (e.g. a synthetic world folder)")
        tokenizer = train_tokenizer(corpus_texts(tokenizer_corpus), vocab_size=vocab_size)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_llm_config(name_or_dir, tokenizer)), tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
        model = AutoModelForCausalLM.from_pretrained(name_or_dir)
    except OSError as err:
        raise FileNotFoundError(
            f"LLM {name_or_dir!r} could not be loaded ({err}). Offline, pass a local folder holding config.json, "
            f"the weights and the tokenizer, or a tiny LLM: {', '.join(TINY_LLMS)}"
        ) from err
    return model, tokenizer

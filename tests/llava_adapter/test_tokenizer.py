import pytest
from transformers import AutoTokenizer

from llava_adapter.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer

TEXTS = [
    "What colour is the circle on the left?",
    "  two leading spaces, trailing ones  ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "Digits 0123456789, 3.14159 and -42; punctuation: !?()[]{}<>\"'`~@#$%^&*_+=|\\/",
    "unseen words: zyxwvut quixotic, café, naïve, 日本語, emoji 😀",
    "",
    " ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        0,
        1,
        2,
        3,
    )
    for token in SPECIAL_TOKENS:
        assert tokenizer.encode(token) == [tokenizer.convert_tokens_to_ids(token)]
    ids = tokenizer.encode("look:<image>\nnow<image>")
    assert ids.count(4) == 2
    assert tokenizer.decode(ids) == "look:<image>\nnow<image>"
    # No special tokens are added implicitly: templates write bos / eos themselves.
    assert tokenizer.encode("hello") == tokenizer.encode("hello", add_special_tokens=False)
    assert tokenizer.bos_token_id not in tokenizer.encode("hello")


def test_vocab_size(tokenizer):
    assert len(tokenizer) <= 512
    assert len(tokenizer) > 256 + len(SPECIAL_TOKENS)  # learnt some merges
    with pytest.raises(ValueError, match="at least 261"):
        train_tokenizer(["abc"], vocab_size=100)


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "<image>\nWhat colour?"},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Count?"},
    {"role": "assistant", "content": "3"},
]


def test_chat_template_rendering(tokenizer):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert text == (
        "<s><|system|>\nBe brief.\n<|user|>\n<image>\nWhat colour?\n<|assistant|>\nRed.</s><|user|>\nCount?\n"
        "<|assistant|>\n3</s>"
    )
    prompt = tokenizer.apply_chat_template(MESSAGES[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Count?\n<|assistant|>\n")


def test_chat_template_prefix_consistent(tokenizer):
    for k in range(1, len(MESSAGES)):
        prefix = tokenizer.apply_chat_template(MESSAGES[:k], tokenize=False, add_generation_prompt=True)
        longer = tokenizer.apply_chat_template(MESSAGES[: k + 1], tokenize=False)
        if MESSAGES[k]["role"] == "assistant":
            assert longer.startswith(prefix)
        assert longer.startswith(tokenizer.apply_chat_template(MESSAGES[:k], tokenize=False))


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["<s>a<image>b</s><pad>"]:
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.apply_chat_template(MESSAGES, tokenize=False) == tokenizer.apply_chat_template(
        MESSAGES, tokenize=False
    )
    assert loaded.convert_tokens_to_ids("<image>") == 4
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len(loaded) == len(tokenizer)


def test_deterministic():
    texts = ["the red circle", "the blue square"] * 20
    a, b = train_tokenizer(texts, vocab_size=300), train_tokenizer(iter(texts), vocab_size=300)
    assert a.get_vocab() == b.get_vocab()

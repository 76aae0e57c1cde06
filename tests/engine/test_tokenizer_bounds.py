"""A prompt is bounded by the context before it is tokenized whole: what fits is encoded exactly as ``encode``
does, what cannot fit is refused from a bound or a prefix, with how it was counted."""

from __future__ import annotations

import pytest

from lemonade_inferos.engine.tokenizer import CHARS_PER_TOKEN_BOUND, ChatTokenizer, PromptTooLong

LIMIT = 64


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> ChatTokenizer:
    return ChatTokenizer.from_folder(model_dir)


def test_a_text_that_fits_is_encoded_as_encode_does(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 4
    assert tokenizer.encode_within(text, LIMIT) == tokenizer.encode(text)


def test_a_text_of_as_many_tokens_as_the_limit_is_refused_with_its_exact_count(tokenizer):
    text = " dog" * LIMIT  # one token each
    assert len(tokenizer.encode(text)) == LIMIT
    assert tokenizer.encode_within(" dog" * (LIMIT - 1), LIMIT) == tokenizer.encode(" dog" * (LIMIT - 1))
    with pytest.raises(PromptTooLong) as refused:
        tokenizer.encode_within(text, LIMIT)
    assert refused.value.num_tokens == LIMIT and refused.value.counted == f"{LIMIT} tokens"


def test_a_long_text_is_refused_from_its_prefix(tokenizer):
    text = "word " * (LIMIT * CHARS_PER_TOKEN_BOUND)  # 5x the prefix's length
    with pytest.raises(PromptTooLong) as refused:
        tokenizer.encode_within(text, LIMIT)
    assert "counted in its first" in refused.value.counted and refused.value.num_tokens >= LIMIT


def test_a_text_longer_than_the_limit_of_the_longest_tokens_is_refused_untokenized(tokenizer):
    text = "w" * (LIMIT * tokenizer.max_token_bytes)
    with pytest.raises(PromptTooLong) as refused:
        tokenizer.encode_within(text, LIMIT)
    assert f"at most {tokenizer.max_token_bytes} to a token" in refused.value.counted


def test_a_long_text_of_few_tokens_is_measured_by_its_prefix_and_then_encoded_whole(tokenizer):
    text = ("x" + " " * 100) * 12  # ~25 characters a token: longer than the prefix, fewer tokens than the limit
    assert len(text) > LIMIT * CHARS_PER_TOKEN_BOUND and len(tokenizer.encode(text)) < LIMIT
    assert tokenizer.encode_within(text, LIMIT) == tokenizer.encode(text)

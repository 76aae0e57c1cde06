"""The text every measurement reads: CPython's own ``pydoc_data.topics`` (deterministic English and code,
~113k tokens, installed with Python itself, so nothing is downloaded)."""

from __future__ import annotations

from typing import Protocol


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def corpus_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def corpus_ids(tokenizer: Encoder, num_tokens: int) -> list[int]:
    """The first ``num_tokens`` token ids of the corpus (encoding only as much text as needed)."""
    text = corpus_text()
    ids = tokenizer.encode(text[: num_tokens * 8])
    if len(ids) < num_tokens:
        ids = tokenizer.encode(text)
    return ids[:num_tokens]


def calibration_passages(num_passages: int = 64) -> list[str]:
    """Passages for KV calibration: topics from the second half of the corpus, so that what ``inferos eval ppl``
    scores (from its beginning) is never calibrated on."""
    from pydoc_data.topics import topics
    names = sorted(topics)
    return [topics[name] for name in names[len(names) // 2:][:num_passages]]

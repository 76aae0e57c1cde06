"""What every engine yields and measures, so ours and the og.Generator baseline are interchangeable."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

from lemonade_inferos.engine.sampling import SamplingParams


@dataclass
class GenerationChunk:
    """One streamed piece: the text it adds and the token ids that produced it."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (eos or stop string), "length" (max_tokens or context)


@dataclass
class GenerationStats:
    """Timings measured during one generate call (llama.cpp's vocabulary where it fits).

    ``first_token_time`` is taken when the first token is produced, not estimated.
    """

    prompt_n: int = 0
    cache_n: int = 0
    predicted_n: int = 0
    start_time: float = field(default_factory=time.perf_counter)
    prefill_end_time: float | None = None
    first_token_time: float | None = None
    end_time: float | None = None
    finish_reason: str | None = None
    token_times: list[float] = field(default_factory=list)
    drafted_n: int = 0                   # speculative decoding: tokens proposed by the drafter
    accepted_n: int = 0                  # ... and kept by the model

    @property
    def prompt_ms(self) -> float | None:
        if self.prefill_end_time is None:
            return None
        return (self.prefill_end_time - self.start_time) * 1000.0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.start_time

    @property
    def prompt_per_second(self) -> float | None:
        """Prompt tokens actually prefilled (cache hits excluded) per second."""
        ms = self.prompt_ms
        prefilled = self.prompt_n - self.cache_n
        return prefilled / (ms / 1000.0) if ms and prefilled > 0 else None

    @property
    def predicted_ms(self) -> float | None:
        if self.end_time is None or self.first_token_time is None:
            return None
        return (self.end_time - self.first_token_time) * 1000.0

    @property
    def predicted_per_second(self) -> float | None:
        """Decode speed: tokens after the first, over the time after the first."""
        ms = self.predicted_ms
        return (self.predicted_n - 1) / (ms / 1000.0) if ms and self.predicted_n > 1 else None

    def mark_token(self) -> None:
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        self.predicted_n += 1


class Engine(Protocol):
    """Anything that turns prompt ids into streamed text."""

    name: str

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 stats: GenerationStats | None = None) -> Iterator[GenerationChunk]:
        ...

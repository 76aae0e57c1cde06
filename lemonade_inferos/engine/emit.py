"""From sampled token ids to streamed text: EOS, stop strings, incremental detokenization.

Both engines (ours and the og.Generator baseline) emit through this, so a
client sees the same chunks and the same ``finish_reason`` from either.
"""

from __future__ import annotations

from typing import Iterable

from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.stopping import StopStringMatcher
from lemonade_inferos.engine.tokenizer import ChatTokenizer, IncrementalDetokenizer
from lemonade_inferos.engine.types import GenerationChunk


class TokenEmitter:
    """Turns each sampled id into a chunk until EOS or a stop string ends the generation."""

    def __init__(self, tokenizer: ChatTokenizer, eos_token_ids: Iterable[int], params: SamplingParams) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stopper = StopStringMatcher(params.stop)
        self._eos = frozenset(eos_token_ids) if not params.ignore_eos else frozenset()
        self.finish_reason = "length"
        self.done = False

    def push(self, token: int) -> GenerationChunk | None:
        """The chunk to stream for ``token`` (None when there is nothing to send); sets ``done`` at EOS or a stop."""
        if token in self._eos:
            self.finish_reason, self.done = "stop", True
            return None
        text = self._stopper.feed(self._detok.push(token))
        if self._stopper.stopped:
            self.finish_reason, self.done = "stop", True
            return GenerationChunk(text, [token]) if text else None
        return GenerationChunk(text, [token])

    def complete(self) -> None:
        """The output is finished for a reason outside the tokens (its grammar is complete): ``stop``."""
        self.finish_reason, self.done = "stop", True

    def final(self) -> GenerationChunk:
        """The last chunk: text held back for a stop string that never came, and the finish reason."""
        tail = "" if self._stopper.stopped else self._stopper.flush()
        return GenerationChunk(tail, [], finish_reason=self.finish_reason)

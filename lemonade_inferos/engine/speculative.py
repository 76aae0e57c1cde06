"""Speculative decoding: a cheap drafter proposes the next few tokens, the model checks them all in one forward.

One verify forward reads the weights once for ``k + 1`` positions (the LM head computes exactly those rows), so
every accepted draft token is a decode step saved; on a CPU, where a decode step is bound by reading the weights,
that is decode speed per core. The engine keeps the longest run the model agrees with (greedy: the argmax; with
sampling: the accept/resample rule in ``Sampler.verify``, which leaves the output distribution unchanged) and
commits only those tokens: the K/V written for rejected ones lies past the committed length and is overwritten
later, so the cache never holds, seals, quantizes or scores a rejected token.

Drafters (one interface, :class:`Drafter`):

- :class:`NgramDrafter`, prompt lookup: the last ``n`` tokens (n from ``ngram_max`` down to ``ngram_min``) are
  looked up in the prompt and everything generated so far; the tokens that followed their latest earlier
  occurrence are the draft. Chats that quote their context, RAG answers and code edits repeat long spans.
- ``ModelDrafter`` (``ort_engine.py``), a draft model: a smaller model with the same tokenizer decodes the draft
  greedily in its own KV cache, truncated back to what the target kept before the next draft.

Acceptance is watched per request: once ``min_accept_rate`` is not met over the drafted tokens (after a few
verify steps), drafting stops for the rest of that request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from pydantic import Field

from lemonade_inferos.config.policy import SpeculativeMode, SpeculativeSettings

MIN_DRAFTED_BEFORE_JUDGING = 32  # drafted tokens before a low acceptance may switch drafting off (measured:
                                 # judging after 12 stopped drafting in prompts that went on to accept 60%)


class SpeculationConfig(SpeculativeSettings):
    """How one request drafts: the settings and the acceptance it must keep up (``quality.min_accept_rate``)."""

    mode: SpeculativeMode = "off"
    min_accept_rate: float = Field(0.5, ge=0.0, le=1.0)

    @property
    def drafts(self) -> bool:
        return self.mode != "off"

    @property
    def stop_below(self) -> float:
        """The acceptance under which a request stops drafting: ``min_accept_rate`` in ``auto`` and ``draft`` (a draft
        model's steps cost time); ``ngram`` always drafts."""
        return 0.0 if self.mode == "ngram" else self.min_accept_rate


class Drafter(Protocol):
    def extend(self, token_ids: Sequence[int]) -> None:
        """Tokens now part of the sequence (prompt, then every committed token)."""

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens to follow the sequence (empty when there is no guess)."""


class NgramDrafter:
    """Prompt lookup over the sequence so far, with one index per n-gram size (updated as tokens arrive)."""

    def __init__(self, ngram_min: int = 2, ngram_max: int = 4) -> None:
        self.sizes = range(ngram_max, ngram_min - 1, -1)
        self.ids: list[int] = []
        # n-gram -> the position right after its latest occurrence that is not the sequence's own suffix
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}

    def extend(self, token_ids: Sequence[int]) -> None:
        for token in token_ids:
            self.ids.append(int(token))
            end = len(self.ids)
            for n, index in self._index.items():
                if end > n:  # the n-gram that ended one token earlier is now followed by this token
                    index[tuple(self.ids[end - 1 - n:end - 1])] = end - 1

    def propose(self, k: int) -> list[int]:
        ids = self.ids
        for n in self.sizes:
            if len(ids) < n:
                continue
            follow = self._index[n].get(tuple(ids[-n:]))
            if follow is not None:
                return ids[follow:follow + k]
        return []


@dataclass
class AcceptanceWatch:
    """Drafted and accepted tokens of one request, whether drafting should go on, and how long the next draft
    may be: after a rejection, one more than was accepted; after a fully accepted draft, one more than before
    (up to ``max_draft``), so a drafter that guesses poorly costs short verify steps, not long ones."""

    min_accept_rate: float
    max_draft: int = 6
    drafted: int = 0
    accepted: int = 0
    stopped: bool = False
    next_draft: int = 0

    def __post_init__(self) -> None:
        self.next_draft = self.max_draft

    def record(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.next_draft = min(self.max_draft, drafted + 1) if accepted == drafted else max(1, accepted + 1)
        if self.drafted >= MIN_DRAFTED_BEFORE_JUDGING and self.rate is not None \
                and self.rate < self.min_accept_rate:
            self.stopped = True

    @property
    def rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def ngram_drafter(config: SpeculationConfig) -> Drafter | None:
    """Prompt lookup for ``ngram`` and ``auto`` (which lets the acceptance watch decide); None otherwise."""
    if config.mode in ("ngram", "auto"):
        return NgramDrafter(config.ngram_min, config.ngram_max)
    return None

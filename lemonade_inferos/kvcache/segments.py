"""Segment reuse: KV of a run of the prompt that an earlier sequence holds at another position.

An agent that keeps a system prompt and its last few exchanges drops the oldest exchange every turn: the new
prompt matches the previous turn's sequence up to the system prompt, then matches it again, shifted left by the
dropped exchange's length, for most of the rest (GAIA's pattern; llama.cpp's ``--cache-reuse`` shifts such
chunks, LMCache's CacheBlend reuses them with a partial recompute). :func:`find_shifted_run` finds that run in
the warm cache's tokens; :func:`splice_from` turns it into a :class:`Splice`: the run's KV, its keys re-rotated
from their old RoPE positions to the new ones (values are position-free), minus its first tokens.

Those first tokens after the seam are prefilled instead (the recompute): the seam is where the reused KV is
most wrong (those tokens attended to the dropped exchange right before them; later tokens attend mostly to
their own neighbours and the system prompt). The share recomputed is the policy's ``kv.segment_recompute``
(at least ``MIN_RECOMPUTE`` tokens; default 5%, the share with the lowest mean and worst-turn first-token KLD in
``inferos bench multiturn --sliding-window 3``: the error is spread over the reused tokens, not only the seam).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lemonade_inferos.kvcache.manager import TieredKVCache

ANCHOR = 16          # tokens that must match to start a run (shorter matches are template noise)
MAX_LEAD = 64        # new tokens allowed between the prefix and the run's start
MIN_RUN = 32         # a shorter run is not worth its rotation
MIN_RECOMPUTE = 16
MIN_SPLICE = 16      # fewer reused tokens than this after the recompute: prefill the run instead


@dataclass(frozen=True)
class ShiftedRun:
    """``prompt[prompt_start:prompt_start+length] == source[source_start:source_start+length]``."""

    prompt_start: int
    source_start: int
    length: int

    @property
    def shift(self) -> int:
        return self.prompt_start - self.source_start


@dataclass
class Splice:
    """KV to place into a cache when its prefill reaches prompt position ``at``: ``token_ids`` with their float
    keys and values per layer ``[H, T, D]`` as the source computed them at ``old_positions`` (the cache rotates
    the keys to their new positions). The ``recomputed`` tokens before ``at`` are prefilled."""

    at: int
    token_ids: list[int]
    keys: list[np.ndarray]
    values: list[np.ndarray]
    old_positions: np.ndarray
    recomputed: int

    def __len__(self) -> int:
        return len(self.token_ids)

    def place(self, cache: TieredKVCache) -> None:
        cache.insert_segment(self.token_ids, self.keys, self.values, self.old_positions)


def find_shifted_run(source: list[int], prompt: list[int], start: int) -> ShiftedRun | None:
    """The longest run of ``prompt`` beginning within ``MAX_LEAD`` tokens of ``start`` that ``source`` holds
    after ``start`` at another position (leaving the prompt's last token to run)."""
    if len(prompt) - start < MIN_RUN + 1 or len(source) - start < MIN_RUN:
        return None
    anchors: dict[tuple[int, ...], list[int]] = {}
    for q in range(start, len(source) - ANCHOR + 1):
        anchors.setdefault(tuple(source[q:q + ANCHOR]), []).append(q)
    best: ShiftedRun | None = None
    for p in range(start, min(start + MAX_LEAD, len(prompt) - MIN_RUN)):
        for q in anchors.get(tuple(prompt[p:p + ANCHOR]), ()):
            if q == p:
                continue  # not shifted: the prefix match would have covered it
            length = ANCHOR
            while (p + length < len(prompt) - 1 and q + length < len(source)
                   and prompt[p + length] == source[q + length]):
                length += 1
            if length >= MIN_RUN and (best is None or length > best.length):
                best = ShiftedRun(p, q, length)
        if best is not None and best.length >= len(prompt) - 1 - p:
            break  # nothing later can be longer
    return best


def recompute_count(length: int, share: float) -> int:
    """Tokens of a run prefilled again at its seam: ``share`` of it, at least ``MIN_RECOMPUTE``."""
    return min(length, max(MIN_RECOMPUTE, math.ceil(share * length)))


def splice_from(source, run: ShiftedRun, share: float) -> Splice:
    """The splice for ``run`` out of ``source`` (a tiered cache holding it), its first tokens left to recompute."""
    recomputed = recompute_count(run.length, share)
    begin, end = run.source_start + recomputed, run.source_start + run.length
    keys, values, positions = source.segment(begin, end)
    return Splice(run.prompt_start + recomputed, list(source.token_ids[begin:end]), keys, values, positions,
                  recomputed)

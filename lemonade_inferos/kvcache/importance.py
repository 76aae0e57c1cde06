"""Block importance: a measured signal, turned into a per-layer rank in [0, 1].

Signal: the L2 norm of a block's keys. Keys with small norms draw the most
attention (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy
for KV Cache Compression"), so importance is the negative mean key norm. It is
a property of the key itself, not an accumulated attention sum, so early tokens
are not favoured just for having been seen by more queries (the bias ZipCache
normalizes away). ``inferos eval ppl`` measures it against its inverse and
against pure recency (plans ``*-inverse``, ``*-recency``).

A measured alternative, ``attention``: the engine's attention probe returns
GroupQueryAttention's softmax probabilities for a few layers, and each token's
score is the attention mass it received divided by the number of (layer, head,
query) rows that could see it (ZipCache's normalization, see
``AttentionAccumulator``); a block's score is its tokens' mean.

The rank makes the policy's ``level_thresholds`` mean the same at any context
length: importance 0.3 is "the bottom 30% of this layer's blocks".
"""

from __future__ import annotations

import numpy as np


def block_scores(keys_by_layer: list[np.ndarray] | np.ndarray, signal: str, block_index: int) -> np.ndarray:
    """Raw importance per layer of one block; ``keys_by_layer[l]`` is ``[H, T, D]`` (a list, or stacked)."""
    if signal == "recency":
        return np.full(len(keys_by_layer), float(block_index), dtype=np.float32)
    norms = np.linalg.norm(np.asarray(keys_by_layer), axis=-1).mean(axis=(1, 2)).astype(np.float32)
    return -norms if signal == "key_norm" else norms


def per_layer_rank(scores: np.ndarray) -> np.ndarray:
    """``scores`` ``[blocks, layers]`` -> centred ranks in (0, 1) per layer (1 = most important)."""
    num_blocks = scores.shape[0]
    order = np.argsort(np.argsort(scores, axis=0, kind="stable"), axis=0, kind="stable")
    return ((order + 0.5) / num_blocks).astype(np.float32)


class AttentionAccumulator:
    """Per held token: the attention mass it received from the probe layers, and the (layer, head, query) rows
    that could see it; a block's score is its tokens' mean mass per row. Indexed like the working buffer."""

    def __init__(self) -> None:
        self.mass = np.zeros(0, dtype=np.float64)
        self.rows = np.zeros(0, dtype=np.float64)

    def grow(self, capacity: int) -> None:
        for name in ("mass", "rows"):
            old = getattr(self, name)
            grown = np.zeros(capacity, dtype=np.float64)
            grown[:min(len(old), capacity)] = old[:capacity]
            setattr(self, name, grown)

    def observe(self, probes: list[np.ndarray], num_new: int) -> None:
        """Accumulate the probe layers' attention probabilities, averaged over heads (``[1, 1, S, T]``; per-head
        ``[1, H, S, T]`` scores the same), per cached token.

        Each token's score is its attention relative to uniform (probability x tokens the query could see),
        averaged over the (layer, head, query) rows that could see it (ZipCache's normalization), so early
        tokens are not favoured for having been seen by more queries. The rows may be the last few of the
        ``num_new`` tokens only (a long prompt chunk's: ``row_probe.py``): each token counts the rows that saw it.
        """
        total, queries = probes[0].shape[-1], probes[0].shape[2]
        assert queries <= num_new, "more probe rows than new tokens: this indicates a bug in the engine"
        # weight each query row by how many tokens it could see: attention relative to uniform (1/visible),
        # comparable across context lengths and over time (blocks evicted earlier keep comparable scores)
        visible = np.arange(total - queries + 1, total + 1, dtype=np.float64)
        mass = sum((p[0].sum(axis=0, dtype=np.float64) * visible[:, None]).sum(axis=0) for p in probes)
        rows = len(probes) * probes[0].shape[1]
        # causal: the token at i is seen by the probed queries at or after it (all of them for earlier tokens)
        seen_by = np.minimum(float(queries), np.arange(total, 0, -1, dtype=np.float64))
        self.mass[:total] += mass
        self.rows[:total] += seen_by * rows

    def block_score(self, start: int, end: int, num_layers: int) -> np.ndarray:
        value = float((self.mass[start:end] / np.maximum(self.rows[start:end], 1.0)).mean())
        return np.full(num_layers, value, dtype=np.float32)

    def truncate(self, num_tokens: int) -> None:
        self.mass[num_tokens:] = 0.0
        self.rows[num_tokens:] = 0.0

    def remove(self, start: int, end: int, held: int) -> None:
        """Tokens ``[start, end)`` left the buffer (an eviction's compaction): the later ones move down."""
        for accumulator in (self.mass, self.rows):
            accumulator[start:held - (end - start)] = accumulator[end:held]
            accumulator[held - (end - start):held] = 0.0

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
``TieredKVCache.observe_attention``); a block's score is its tokens' mean.

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

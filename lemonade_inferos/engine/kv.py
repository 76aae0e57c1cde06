"""The KV cache interface the decode loop talks to, and the plain dense cache.

The loop never touches K/V itself. Each step it asks the cache to
``reserve`` room for the new tokens (the cache may grow, or evict, or say no),
binds the cache's buffers as both ``past_key_values.N`` and ``present.N``
(ONNX Runtime's GroupQueryAttention writes the new K/V in place when past and
present share one buffer), runs the model, then calls ``commit``.

Buffer layout per layer, shape ``[1, kv_heads, capacity, head_size]``::

    | token 0 ... token num_tokens-1 | free ... capacity |
      (each with its true RoPE position, kept in ``positions``)

Positions are kept per token because a cache that evicts (kvcache/) leaves
gaps: the model must still see new tokens at their true positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import onnxruntime as ort


class CacheFullError(Exception):
    """The cache cannot hold the requested tokens and may not evict."""

    def __init__(self, needed: int, limit: int) -> None:
        super().__init__(f"KV cache needs {needed} tokens but holds at most {limit}")
        self.needed = needed
        self.limit = limit


@dataclass(frozen=True, eq=False)
class StaticKVScales:
    """Per-channel scales of the INT8 live form: GroupQueryAttention stores ``clip(rint(x / scale), -128, 127)``
    and reads ``code * scale`` (symmetric, one scale per head channel and layer, fixed for the model).

    ``keys``/``values`` are ``[layers, kv_heads, 1, head_size]`` float32. Two scale sets are equal when their
    fingerprints are (a hash of the scales), so caches, warm caches and prefix-store salts of one calibration match.
    """

    keys: np.ndarray
    values: np.ndarray
    source: str               # "calibrated", "folder scale file" or "graph initializers"
    fingerprint: str

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StaticKVScales) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def _scale(self, layer: int, slot: int) -> np.ndarray:
        return (self.keys if slot == 0 else self.values)[layer]

    def quantize(self, x: np.ndarray, layer: int, slot: int, out: np.ndarray | None = None) -> np.ndarray:
        """Float ``[H, T, D]`` -> int8 codes as the kernel writes them (values outside the range saturate)."""
        codes = np.clip(np.rint(x / self._scale(layer, slot)), -128, 127)
        if out is None:
            return codes.astype(np.int8)
        out[...] = codes
        return out

    def dequantize(self, codes: np.ndarray, layer: int, slot: int) -> np.ndarray:
        """Int8 codes ``[H, T, D]`` -> the float values the model reads."""
        return codes.astype(np.float32) * self._scale(layer, slot)


@dataclass(frozen=True)
class KVLayout:
    """Shape facts shared by every cache of one model and one live form.

    ``scales`` is set for the INT8 live form (``dtype`` int8: the buffers hold codes), None for the model's own
    KV dtype.
    """

    num_layers: int
    num_kv_heads: int
    head_size: int
    max_tokens: int
    dtype: np.dtype = np.dtype(np.float32)
    scales: StaticKVScales | None = None
    min_tokens: int = 0   # the fewest a buffer may hold: GroupQueryAttention refuses one shorter than its window

    @property
    def live_int8(self) -> bool:
        return self.scales is not None

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers, keys and values, at the working dtype."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_size * self.dtype.itemsize


class SegmentSplice(Protocol):
    """KV to place when a prefill reaches prompt position ``at`` (``kvcache/segments.py``'s Splice): the cache
    that handed it out is the one it is placed into, and only such a cache (one with RoPE tables) can take it."""

    at: int
    token_ids: list[int]

    def __len__(self) -> int: ...

    def place(self, cache: KVCache) -> None:
        """Append this segment's KV after what ``cache`` holds, re-rotated to its new positions."""


class KVCache(ABC):
    """What the engine needs from a cache: buffers to bind, room to reserve, tokens to commit."""

    layout: KVLayout

    @property
    @abstractmethod
    def num_tokens(self) -> int:
        """Tokens held in the working buffers: the past length the model sees."""

    @property
    @abstractmethod
    def token_ids(self) -> list[int]:
        """Ids of every token committed since the last reset (evicted ones included), in order."""

    @property
    @abstractmethod
    def buffers_version(self) -> int:
        """Changes whenever the buffers are reallocated, so the engine knows to rebind."""

    @abstractmethod
    def ort_values(self) -> list[tuple[ort.OrtValue, ort.OrtValue]]:
        """Per layer, the (key, value) buffers as OrtValues over the cache's own memory."""

    @abstractmethod
    def arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer, the same buffers as numpy arrays (the plain ``session.run`` path writes into them)."""

    @abstractmethod
    def reserve(self, num_new: int) -> None:
        """Make room for ``num_new`` more tokens.

        Raises:
            CacheFullError: there is no room and this cache may not evict.
        """

    def plan_capacity(self, num_tokens: int) -> None:
        """Hint: about ``num_tokens`` will be held; allocate once instead of growing step by step."""

    @abstractmethod
    def new_positions(self, num_new: int) -> np.ndarray:
        """True RoPE positions for the next ``num_new`` tokens, shape ``[1, num_new]``."""

    @abstractmethod
    def commit(self, token_ids: Sequence[int]) -> None:
        """The model has written K/V for ``token_ids`` after the current tokens."""

    @abstractmethod
    def truncate(self, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` committed tokens (prefix reuse)."""

    def reset(self) -> None:
        self.truncate(0)

    # -- optional capabilities: no-ops here, so callers never ask ``hasattr`` -----------------------------
    @property
    def wants_attention(self) -> bool:
        """Whether :meth:`observe_attention` uses the probes (the engine skips fetching them otherwise)."""
        return False

    def observe_attention(self, probes: list[np.ndarray], num_new: int) -> None:
        """The attention probe layers' probabilities for the last step (caches that rank blocks by them)."""

    def kv_stats(self) -> Any:
        """Measured bytes and tokens by tier (``kvcache.stats.KVStats``), or None for a cache without tiers."""
        return None

    def mirror_start(self) -> int:
        """The first held token whose K/V may differ from the copy a decode batch last took of this cache
        (``decode_batch.py``): edits in place lower it, appends do not. 0 (copy everything) unless the cache
        tracks its edits."""
        return 0

    def mirror_synced(self, num_tokens: int) -> None:
        """A decode batch's copy of this cache now equals its first ``num_tokens`` tokens."""

    def take_splices(self) -> list[SegmentSplice]:
        """The segments this cache was given to place during its next prefill (segment reuse), handed over
        once: the engine places each (``splice.place(cache)``) when its prefill reaches it."""
        return []


def common_prefix(held: list[int], prompt: list[int]) -> int:
    """Tokens of ``prompt`` a cache holding ``held`` can keep (at least one prompt token is left to run)."""
    limit = min(len(held), len(prompt) - 1)
    common = 0
    while common < limit and held[common] == prompt[common]:
        common += 1
    return common


class DenseKVCache(KVCache):
    """Full-precision, contiguous, no eviction: the plain cache every plan is compared with.

    Buffers start at ``initial_tokens`` and double up to ``layout.max_tokens``
    (the model's context length), so short chats do not pay for 8K tokens.
    """

    def __init__(self, layout: KVLayout, initial_tokens: int = 256,
                 on_grow: Callable[[int], None] | None = None) -> None:
        self.layout = layout
        self._capacity = 0
        self._version = 0
        self._keys: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._ort_values: list[tuple[ort.OrtValue, ort.OrtValue]] = []
        self._token_ids: list[int] = []
        self._positions = np.zeros(0, dtype=np.int64)
        self._num_tokens = 0
        self._synced = 0   # tokens a decode batch's copy of this cache holds unchanged (mirror_start)
        self._on_grow: Callable[[int], None] | None = None
        self._grow_to(min(max(initial_tokens, layout.min_tokens), layout.max_tokens))
        self._on_grow = on_grow  # told of every later reallocation (a cache built on this one grows its own arrays)

    # -- KVCache -------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def token_ids(self) -> list[int]:
        return self._token_ids

    @property
    def buffers_version(self) -> int:
        return self._version

    @property
    def capacity(self) -> int:
        return self._capacity

    def ort_values(self) -> list[tuple[ort.OrtValue, ort.OrtValue]]:
        return self._ort_values

    def arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The arrays behind :meth:`ort_values` (a step without IOBinding copies the model's present K/V here)."""
        return list(zip(self._keys, self._values))

    def reserve(self, num_new: int) -> None:
        needed = self._num_tokens + num_new
        if needed > self.layout.max_tokens:
            raise CacheFullError(needed, self.layout.max_tokens)
        if needed > self._capacity:
            self._grow_to(min(self.layout.max_tokens, max(needed, 2 * self._capacity)))

    def plan_capacity(self, num_tokens: int) -> None:
        target = min(self.layout.max_tokens, num_tokens)
        if target > self._capacity:
            self._grow_to(target)

    def new_positions(self, num_new: int) -> np.ndarray:
        start = int(self._positions[self._num_tokens - 1]) + 1 if self._num_tokens else 0
        return np.arange(start, start + num_new, dtype=np.int64)[None, :]

    def commit(self, token_ids: Sequence[int]) -> None:
        num_new = len(token_ids)
        positions = self.new_positions(num_new)[0]
        self._positions[self._num_tokens:self._num_tokens + num_new] = positions
        self._num_tokens += num_new
        self._token_ids.extend(int(t) for t in token_ids)

    def truncate(self, num_tokens: int) -> None:
        assert num_tokens <= self._num_tokens, "truncate beyond length: this indicates a bug in the caller"
        self.edited(num_tokens)
        self._num_tokens = num_tokens
        del self._token_ids[num_tokens:]

    def mirror_start(self) -> int:
        return min(self._synced, self._num_tokens)

    def mirror_synced(self, num_tokens: int) -> None:
        self._synced = num_tokens

    # -- dense specifics: what a cache built on this buffer (kvcache/manager.py) works with ---------
    def edited(self, start: int) -> None:
        """Held tokens from ``start`` on were changed in place (a copy taken before no longer equals them)."""
        self._synced = min(self._synced, start)

    @property
    def keys(self) -> list[np.ndarray]:
        """Per layer, the key buffer ``[1, kv_heads, capacity, head_size]`` (the first ``num_tokens`` are held)."""
        return self._keys

    @property
    def values(self) -> list[np.ndarray]:
        return self._values

    @property
    def positions(self) -> np.ndarray:
        """The true RoPE position of every held token (capacity-long; the first ``num_tokens`` are valid)."""
        return self._positions

    def remove(self, start: int, end: int) -> None:
        """Drop held tokens ``[start, end)`` from the buffers, moving later ones down (eviction); their ids stay
        committed, so ``token_ids`` then holds more ids than ``num_tokens``."""
        n, removed = self._num_tokens, end - start
        self.edited(start)
        for buffer in (*self._keys, *self._values):
            buffer[0, :, start:n - removed] = buffer[0, :, end:n]
        self._positions[start:n - removed] = self._positions[end:n]
        self._num_tokens -= removed

    def hold_prefix(self, token_ids: Sequence[int]) -> None:
        """The first ``len(token_ids)`` slots (written by the caller) now hold these tokens at positions 0..n-1."""
        total = len(token_ids)
        self.edited(0)
        self._positions[:total] = np.arange(total)
        self._num_tokens = total
        self._token_ids = [int(t) for t in token_ids]

    def layer(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of layer ``index``'s keys and values, ``[kv_heads, num_tokens, head_size]``."""
        return (self._keys[index][0, :, :self._num_tokens], self._values[index][0, :, :self._num_tokens])

    @property
    def nbytes(self) -> int:
        """Bytes allocated for K/V (the whole capacity, not only the filled part)."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self._keys, self._values))

    def _grow_to(self, capacity: int) -> None:
        layout = self.layout
        shape = (1, layout.num_kv_heads, capacity, layout.head_size)
        new_keys, new_values = [], []
        for index in range(layout.num_layers):
            key = np.zeros(shape, dtype=layout.dtype)
            value = np.zeros(shape, dtype=layout.dtype)
            if self._num_tokens:
                key[:, :, :self._num_tokens] = self._keys[index][:, :, :self._num_tokens]
                value[:, :, :self._num_tokens] = self._values[index][:, :, :self._num_tokens]
            new_keys.append(key)
            new_values.append(value)
        positions = np.zeros(capacity, dtype=np.int64)
        positions[:self._num_tokens] = self._positions[:self._num_tokens]
        self._keys, self._values, self._positions = new_keys, new_values, positions
        # OrtValues wrap the numpy memory without copying: the model writes straight into it.
        self._ort_values = [(ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v))
                            for k, v in zip(new_keys, new_values)]
        self._capacity = capacity
        self._version += 1
        if self._on_grow is not None:
            self._on_grow(capacity)

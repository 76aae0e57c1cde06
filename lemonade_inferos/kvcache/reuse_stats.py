"""What the reuse tiers report, typed: the warm caches, the prefix store and its disk and shared tiers.

Each store builds one of these from its counters (``snapshot()``); its ``stats()`` is the snapshot's JSON form,
which ``/v1/metrics`` shows as ``prefix_cache``. Readers of the numbers (Prometheus, the memory report) take
the dataclass, so a renamed field is a type error rather than a silently missing key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WarmStats:
    caches: int
    capacity: int
    tokens: int
    bytes: int
    hits: int
    hit_tokens: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class DiskTierStats:
    dir: str
    files: int
    bytes: int
    budget_bytes: int | None
    writes: int
    reads: int
    corrupt_files: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class SharedStoreStats:
    """The Valkey/Redis tier: its counters since start and its round trips."""

    url: str
    up: bool
    counts: dict[str, int]          # reads, hits, misses, writes, errors, corrupt, dropped_writes, bytes_read, ...
    latency_s_sum: float
    latency_count: int
    queued_writes: int
    last_error: str | None

    @property
    def latency_ms_mean(self) -> float | None:
        return round(self.latency_s_sum / self.latency_count * 1000, 3) if self.latency_count else None

    def to_dict(self) -> dict[str, object]:
        return {"url": self.url, "up": self.up, **self.counts, "latency_ms_mean": self.latency_ms_mean,
                "latency_s_sum": self.latency_s_sum, "latency_count": self.latency_count,
                "queued_writes": self.queued_writes, "last_error": self.last_error}


@dataclass(frozen=True)
class PrefixStoreStats:
    blocks: int
    bytes: int
    budget_bytes: int | None
    hit_tokens: int
    lookup_tokens: int
    evicted_blocks: int
    hit_blocks_by_tier: dict[str, int]
    segment_blocks: int
    segment_index_entries: int
    spill: DiskTierStats | None = None
    shared: SharedStoreStats | None = None

    @property
    def hit_rate(self) -> float | None:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else None

    def to_dict(self) -> dict[str, object]:
        return {"blocks": self.blocks, "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                "hit_tokens": self.hit_tokens, "lookup_tokens": self.lookup_tokens, "hit_rate": self.hit_rate,
                "evicted_blocks": self.evicted_blocks, "hit_blocks_by_tier": dict(self.hit_blocks_by_tier),
                "segment_blocks": self.segment_blocks, "segment_index_entries": self.segment_index_entries,
                "spill": self.spill.to_dict() if self.spill is not None else None,
                "shared": self.shared.to_dict() if self.shared is not None else None}


@dataclass(frozen=True)
class ReuseStats:
    """Everything reuse holds and served: the store, the warm caches, the prompt tokens from shifted segments."""

    store: PrefixStoreStats
    warm: WarmStats
    segment_tokens: int = 0

    @property
    def at_rest_bytes(self) -> int:
        """KV kept between requests: the store's blocks in memory and the warm caches."""
        return self.store.bytes + self.warm.bytes

    def to_dict(self) -> dict[str, object]:
        return {**self.store.to_dict(), "warm": self.warm.to_dict(), "segment_tokens": self.segment_tokens}

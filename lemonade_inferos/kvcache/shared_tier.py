"""The prefix store's shared tier on Valkey or Redis: blocks several servers (and a restarted one) read.

Like LMCache's remote backend: one value per cached block under ``inferos:kv:v1:<chained hash>``; the chained
hash is salted with the model fingerprint and the KV format (``prefix_store.py``), so servers of the same model
and live form find each other's blocks and nobody else's. Values are ``block_bytes.py``'s checksummed npz (INT8
or INT4 at rest, as in memory): a corrupt or foreign value is counted and ignored. Eviction is the server's
(``maxmemory-policy allkeys-lru``; a server configured otherwise is warned about at connect).

Writes are write-through at park time, queued to one background thread that sends them pipelined: a request
never waits for Valkey to store. Reads happen at lookup, pipelined in small batches and stopped at the first
miss. Valkey down, slow (past ``timeout_s``) or full: the operation is a miss, a warning is logged once, the
error counted, and the tier is skipped for a backoff that doubles up to 30 s before it is tried again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Iterable

from lemonade_inferos.config.store_url import redis_url, shown
from lemonade_inferos.kvcache.block import KVBlock
from lemonade_inferos.kvcache.block_bytes import Tensor, decode_block, encode_block
from lemonade_inferos.kvcache.reuse_stats import SharedStoreStats

log = logging.getLogger(__name__)

KEY_PREFIX = "inferos:kv:v1:"
SEGMENT_PREFIX = "inferos:seg:v1:"   # content key -> chained hash (16 bytes) + origin position (8, little endian)
READ_BATCH = 8
MAX_BACKOFF_S = 30.0


class SharedTier:
    """Cached blocks on a Valkey/Redis server. Thread-safe; no method raises for the server's failures."""

    def __init__(self, url: str, timeout_s: float = 0.25, queue_blocks: int = 512) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = shown(url)
        self._errors = (redis.RedisError, OSError)
        # one immediate retry, on a broken connection only (a pooled socket from before a server restart);
        # redis-py's default (10 retries with backoff) would make a dead server cost seconds per request
        self._client = redis.Redis.from_url(redis_url(url), socket_timeout=timeout_s,
                                            socket_connect_timeout=timeout_s, health_check_interval=0,
                                            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._backoff_s = 0.0
        self.counts = {"reads": 0, "hits": 0, "misses": 0, "writes": 0, "errors": 0, "corrupt": 0,
                       "skipped_down": 0, "dropped_writes": 0, "bytes_read": 0, "bytes_written": 0,
                       "segment_reads": 0, "segment_hits": 0, "segment_writes": 0}
        self.latency_s_sum = 0.0
        self.latency_count = 0
        self.last_error: str | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_blocks)
        self._writer = threading.Thread(target=self._write_loop, name="inferos-shared-tier", daemon=True)
        self._writer.start()
        self._check_policy()

    # -- health --------------------------------------------------------------------------------------------
    @property
    def up(self) -> bool:
        """Whether the last round trip succeeded."""
        return self._backoff_s == 0.0

    def may_try(self) -> bool:
        """Outside a backoff (a store that is down is tried again when its backoff ends)."""
        return time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException, doing: str) -> None:
        with self._lock:
            self.counts["errors"] += 1
            self.last_error = f"{doing}: {exc!r}"
            was_up = self._backoff_s == 0.0
            self._backoff_s = min(MAX_BACKOFF_S, max(0.5, self._backoff_s * 2))
            self._down_until = time.monotonic() + self._backoff_s
        if was_up:
            log.warning("shared prefix store %s unavailable (%s: %r); serving from local tiers, retrying in %.1f s",
                        self.url, doing, exc, self._backoff_s)

    def _succeeded(self, started: float) -> None:
        with self._lock:
            self.latency_s_sum += time.perf_counter() - started
            self.latency_count += 1
            if self._backoff_s:
                log.info("shared prefix store %s is back", self.url)
            self._backoff_s = 0.0

    def _check_policy(self) -> None:
        started = time.perf_counter()
        try:
            policy = self._client.config_get("maxmemory-policy").get("maxmemory-policy")
        except self._errors as exc:
            self._failed(exc, "connect")
            return
        self._succeeded(started)
        if policy != "allkeys-lru":
            log.warning("shared prefix store %s has maxmemory-policy %s: set allkeys-lru so old blocks make room "
                        "(a full server refuses writes instead)", self.url, policy)

    # -- reads -------------------------------------------------------------------------------------------
    def read_prefix(self, block_hashes: list[bytes]) -> list[tuple[tuple[int, ...], int, Tensor, Tensor]]:
        """The blocks stored for the leading run of ``block_hashes`` (stops at the first miss)."""
        found: list[Any] = []
        for start in range(0, len(block_hashes), READ_BATCH):
            batch = block_hashes[start:start + READ_BATCH]
            values = self._get(batch)
            for block_hash, data in zip(batch, values):
                block = self._decode(block_hash, data)
                if block is None:
                    return found
                found.append(block)
        return found

    def _get(self, block_hashes: list[bytes]) -> list[bytes | None]:
        values = self._mget([KEY_PREFIX + h.hex() for h in block_hashes], "reads")
        return [None] * len(block_hashes) if values is None else values

    def _mget(self, keys: list[str], counter: str) -> list[bytes | None] | None:
        """One MGET, timed and counted under ``counter``; None when the store is skipped (down) or fails."""
        if not self.may_try():
            self.counts["skipped_down"] += 1
            return None
        started = time.perf_counter()
        try:
            values = self._client.mget(keys)
        except self._errors as exc:
            self._failed(exc, "read")
            return None
        self._succeeded(started)
        self.counts[counter] += 1
        return values

    def _decode(self, block_hash: bytes, data: bytes | None):
        if data is None:
            self.counts["misses"] += 1
            return None
        try:
            block = decode_block(data, block_hash)
        except ValueError as exc:
            self.counts["corrupt"] += 1
            log.warning("shared prefix store: the value under %s is not this block (%s); ignored",
                        block_hash.hex(), exc)
            return None
        self.counts["hits"] += 1
        self.counts["bytes_read"] += len(data)
        return block

    # -- writes ------------------------------------------------------------------------------------------
    def write(self, block: KVBlock, keys: Tensor, values: Tensor) -> None:
        """Queue a cached block for the server (dropped, and counted, when the queue is full or it is down)."""
        if not self.may_try():
            self.counts["dropped_writes"] += 1
            return
        try:
            self._queue.put_nowait(("set", KEY_PREFIX + block.block_hash.hex(), encode_block(block, keys, values)))
        except queue.Full:
            self.counts["dropped_writes"] += 1

    def write_segment(self, content: bytes, block_hash: bytes, origin: int) -> None:
        """Queue a segment-index entry: servers that never saw the sequence find its blocks by their tokens."""
        if not self.may_try():
            return
        try:
            self._queue.put_nowait(("set", SEGMENT_PREFIX + content.hex(), block_hash + origin.to_bytes(8, "little")))
        except queue.Full:
            self.counts["dropped_writes"] += 1

    def read_segments(self, contents: list[bytes]) -> list[tuple[bytes, int] | None]:
        """The segment-index entries of ``contents`` (one MGET); a value of the wrong shape is ignored."""
        values = self._mget([SEGMENT_PREFIX + c.hex() for c in contents], "segment_reads") if contents else None
        if values is None:
            return [None] * len(contents)
        entries = []
        for value in values:
            if value is not None and len(value) != 24:
                self.counts["corrupt"] += 1
                value = None
            entries.append(None if value is None else (value[:16], int.from_bytes(value[16:], "little")))
        self.counts["segment_hits"] += sum(e is not None for e in entries)
        return entries

    def discard(self, block_hashes: Iterable[bytes]) -> None:
        """Queue deletes (blocks whose restore failed must not be offered to anyone again)."""
        for block_hash in block_hashes:
            try:
                self._queue.put_nowait(("del", KEY_PREFIX + block_hash.hex(), b""))
            except queue.Full:
                self.counts["dropped_writes"] += 1

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while len(batch) < 32:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                if None in batch:
                    return
                self._send(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _send(self, batch: list[tuple[str, str, bytes]]) -> None:
        if not self.may_try():
            self.counts["dropped_writes"] += len(batch)
            return
        started = time.perf_counter()
        try:
            pipe = self._client.pipeline(transaction=False)
            for op, key, data in batch:
                pipe.set(key, data) if op == "set" else pipe.delete(key)
            pipe.execute()
        except self._errors as exc:
            self.counts["dropped_writes"] += len(batch)
            self._failed(exc, "write")
            return
        self._succeeded(started)
        sets = [data for op, key, data in batch if op == "set" and key.startswith(KEY_PREFIX)]
        self.counts["segment_writes"] += sum(op == "set" and key.startswith(SEGMENT_PREFIX) for op, key, _ in batch)
        self.counts["writes"] += len(sets)
        self.counts["bytes_written"] += sum(len(d) for d in sets)

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued write was sent (or dropped); False at the timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        self.drain(2.0)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._client.close()

    def snapshot(self) -> SharedStoreStats:
        return SharedStoreStats(url=self.url, up=self.up, counts=dict(self.counts), latency_s_sum=self.latency_s_sum,
                                latency_count=self.latency_count, queued_writes=self._queue.qsize(),
                                last_error=self.last_error)

    def stats(self) -> dict[str, object]:
        return self.snapshot().to_dict()

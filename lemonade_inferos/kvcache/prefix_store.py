"""Prefix store: KV blocks of earlier requests, at rest in INT8/INT4, restored on a prefix hit.

Keys are a hash chain over full blocks of token ids (vLLM style): a block's hash
covers its own ids and its parent's hash, salted with the model fingerprint and
KV format, so a hit on block i means the whole prefix up to i matches. Blocks
are kept LRU within a byte budget; a sequence is stamped tail-first so the
shared prefixes (system prompt, earlier turns) are the last to go.

At rest each block is one stacked INT8 tensor for keys and one for values
(all layers), or INT4 when the live cache had already demoted any of its layers.
A sequence whose cache may not quantize (``kv.mode`` disabled, or the quality
guard at its last step) is kept at full precision instead, and a lookup under
such a cache stops at the first quantized block: what it restores is exactly
what a cold prefill would compute.

Optional spill to disk: blocks pushed out of the memory budget are written to
``spill_dir`` (one ``.npz`` per block, LRU within ``spill_budget_bytes``) and
brought back on a hit; ``flush()`` writes every block at shutdown, so a restarted
server still has the conversations it served.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lemonade_inferos.durable import atomic_write, quarantine
from lemonade_inferos.kvcache.codecs import AsymmetricCodec, QuantizedTensor
from lemonade_inferos.kvcache.manager import TieredKVCache
from lemonade_inferos.kvcache.plan import TIER_INT4, TIER_INT8, TIER_L0

log = logging.getLogger(__name__)


@dataclass
class StoredBlock:
    block_hash: bytes
    token_ids: tuple[int, ...]
    tier: int
    keys: QuantizedTensor | np.ndarray     # [layers * kv_heads, block_size, head_size]; an array at TIER_L0
    values: QuantizedTensor | np.ndarray

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def block_hashes(token_ids: list[int], block_size: int, salt: bytes) -> list[bytes]:
    """Chained hashes of every full block of ``token_ids``."""
    hashes, parent = [], salt
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = np.asarray(token_ids[start:start + block_size], dtype=np.int64).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class PrefixStore:
    """Blocks by hash, LRU within ``budget_bytes``. Thread-safe (requests on different models share it)."""

    def __init__(self, budget_bytes: int, block_size: int = 32, group_size: int = 32,
                 spill_dir: Path | None = None, spill_budget_bytes: int = 0) -> None:
        self.budget_bytes = budget_bytes
        self.spill = _SpillDir(spill_dir, spill_budget_bytes) if spill_dir and spill_budget_bytes > 0 else None
        self.block_size = block_size
        self._codecs = {TIER_INT8: AsymmetricCodec(8, group_size), TIER_INT4: AsymmetricCodec(4, group_size)}
        self._blocks: OrderedDict[bytes, StoredBlock] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits_tokens = 0
        self.lookup_tokens = 0
        self.evicted_blocks = 0

    @staticmethod
    def salt(model_fingerprint: str, kv_format: str) -> bytes:
        return hashlib.blake2b(f"{model_fingerprint}|{kv_format}".encode(), digest_size=16).digest()

    # -- park ------------------------------------------------------------------------------------
    def park(self, cache: TieredKVCache, salt: bytes) -> int:
        """Keep the full blocks of a finished sequence; returns how many new blocks were stored."""
        if cache.num_tokens != len(cache.token_ids) or cache.num_tokens < self.block_size:
            return 0  # evicted tokens: the working buffer no longer lines up with the token ids
        token_ids = cache.token_ids[: cache.num_tokens // self.block_size * self.block_size]
        hashes = block_hashes(token_ids, self.block_size, salt)
        demoted = {b.start // self.block_size for b in cache.blocks if (b.tiers == TIER_INT4).any()}
        exact = cache.max_tier == TIER_L0 or not cache.plan.quantizes
        new_blocks = 0
        with self._lock:
            for index, block_hash in enumerate(hashes):
                held = self._blocks.get(block_hash)
                if held is not None and (held.tier == TIER_L0 or not exact):
                    continue
                if held is not None:  # an exact copy replaces a quantized one
                    self.nbytes -= self._blocks.pop(block_hash).nbytes
                start = index * self.block_size
                keys, values = cache.block_arrays(start, start + self.block_size)
                if exact:
                    stored = StoredBlock(block_hash, tuple(token_ids[start:start + self.block_size]), TIER_L0,
                                         keys, values)
                else:
                    tier = TIER_INT4 if index in demoted else TIER_INT8
                    codec = self._codecs[tier]
                    stored = StoredBlock(block_hash, tuple(token_ids[start:start + self.block_size]), tier,
                                         codec.quantize(keys, "token"), codec.quantize(values, "channel"))
                self._blocks[block_hash] = stored
                self.nbytes += stored.nbytes
                new_blocks += 1
            for block_hash in reversed(hashes):  # tail first: parents end up most recently used
                self._blocks.move_to_end(block_hash)
            self._enforce_budget()
        return new_blocks

    def _enforce_budget(self) -> None:
        while self.nbytes > self.budget_bytes and self._blocks:
            _, stored = self._blocks.popitem(last=False)
            self.nbytes -= stored.nbytes
            self.evicted_blocks += 1
            if self.spill is not None:
                self.spill.write(stored)

    def flush(self) -> int:
        """Write every in-memory block to the spill folder (shutdown); returns how many were written."""
        if self.spill is None:
            return 0
        with self._lock:
            return sum(self.spill.write(stored) for stored in list(self._blocks.values()))

    def drop_above(self, max_tier: int) -> int:
        """Forget blocks stored at a tier beyond ``max_tier`` (the guard stepped back): they will be re-prefilled
        from token ids. Returns how many were dropped."""
        with self._lock:
            doomed = [h for h, b in self._blocks.items() if b.tier > max_tier]
            for block_hash in doomed:
                self.nbytes -= self._blocks.pop(block_hash).nbytes
        return len(doomed)

    def discard(self, blocks: list[StoredBlock]) -> None:
        """Forget ``blocks`` in memory and on disk: restoring them failed, so they must not be offered again."""
        with self._lock:
            for stored in blocks:
                held = self._blocks.pop(stored.block_hash, None)
                if held is not None:
                    self.nbytes -= held.nbytes
                if self.spill is not None:
                    self.spill.discard(stored.block_hash)

    def set_budget(self, budget_bytes: int) -> None:
        with self._lock:
            self.budget_bytes = budget_bytes
            self._enforce_budget()

    # -- restore ---------------------------------------------------------------------------------
    def lookup(self, prompt_ids: list[int], salt: bytes, max_tier: int = TIER_INT4,
               record: bool = True) -> list[StoredBlock]:
        """The stored blocks of the longest cached prefix (at least one prompt token is left to run).

        The prefix ends before the first block stored beyond ``max_tier`` (``TIER_L0``: exact blocks only).
        ``record=False`` leaves the hit counters to the caller (who may serve the prompt from elsewhere).
        """
        usable = (len(prompt_ids) - 1) // self.block_size * self.block_size
        found: list[StoredBlock] = []
        with self._lock:
            for block_hash in block_hashes(prompt_ids[:usable], self.block_size, salt):
                stored = self._blocks.get(block_hash)
                if stored is None and self.spill is not None:
                    stored = self.spill.read(block_hash)
                    if stored is not None:  # back into memory: it is hot again
                        self._blocks[block_hash] = stored
                        self.nbytes += stored.nbytes
                if stored is None or stored.tier > max_tier:
                    break
                found.append(stored)
            if record:
                self.lookup_tokens += len(prompt_ids)
                self.hits_tokens += len(found) * self.block_size
            for stored in reversed(found):  # parents most recent, as in park()
                self._blocks.move_to_end(stored.block_hash)
            self._enforce_budget()
        return found

    def record_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        """Count a prompt and the tokens of it served from cache (the hit rate the controller publishes)."""
        with self._lock:
            self.lookup_tokens += prompt_tokens
            self.hits_tokens += hit_tokens

    def restore(self, cache: TieredKVCache, blocks: list[StoredBlock]) -> int:
        """Load ``blocks`` into an empty cache; returns the number of tokens restored."""
        if not blocks:
            return 0
        layers = cache.layout.num_layers
        restored = []
        for stored in blocks:
            if stored.tier == TIER_L0:
                restored.append((stored.token_ids, stored.tier, stored.keys, stored.values, None, None))
                continue
            codec = self._codecs[stored.tier]
            restored.append((stored.token_ids, stored.tier, codec.dequantize(stored.keys),
                             codec.dequantize(stored.values), stored.keys, stored.values))
        cache.load_prefix(restored, layers)
        return len(blocks) * self.block_size

    @property
    def hit_rate(self) -> float | None:
        return self.hits_tokens / self.lookup_tokens if self.lookup_tokens else None

    def stats(self) -> dict[str, object]:
        return {"blocks": len(self._blocks), "bytes": self.nbytes, "budget_bytes": self.budget_bytes,
                "hit_tokens": self.hits_tokens, "lookup_tokens": self.lookup_tokens, "hit_rate": self.hit_rate,
                "evicted_blocks": self.evicted_blocks,
                "spill": self.spill.stats() if self.spill is not None else None}


class _SpillDir:
    """Blocks on disk, one ``<hash>.npz`` each, LRU by file time within a byte budget.

    Each file carries a checksum over its arrays and its own block hash; a file that fails either check
    when read (torn write, bit rot, a file copied in from elsewhere) is quarantined and counts as a miss.
    At start, files whose names are not ``<32 hex digits>.npz`` (a crashed writer's temporary, anything
    foreign) are quarantined too, so nothing in the folder can stop the server.
    """

    FORMAT_VERSION = 1
    NAME = re.compile(r"[0-9a-f]{32}\.npz")

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        files = []
        for path in self.root.iterdir():
            if path.is_file() and self.NAME.fullmatch(path.name):
                files.append(path)
            else:
                quarantine(path, "not a prefix-cache block file (a crashed write's leftover or a foreign file)")
        files.sort(key=lambda f: f.stat().st_mtime)
        self._files: OrderedDict[bytes, int] = OrderedDict((bytes.fromhex(f.stem), f.stat().st_size) for f in files)
        self.nbytes = sum(self._files.values())
        self._exact: set[bytes] = set()  # files known to hold a full-precision block
        self.writes = self.reads = self.corrupt = 0

    def _path(self, block_hash: bytes) -> Path:
        return self.root / f"{block_hash.hex()}.npz"

    def write(self, stored: StoredBlock) -> bool:
        if stored.block_hash in self._files:
            if stored.tier != TIER_L0 or stored.block_hash in self._exact:
                self._files.move_to_end(stored.block_hash)
                return False
            self.nbytes -= self._files.pop(stored.block_hash)  # an exact block replaces a quantized file
        arrays = {"token_ids": np.asarray(stored.token_ids, dtype=np.int64), "tier": np.asarray(stored.tier),
                  "block_hash": np.frombuffer(stored.block_hash, dtype=np.uint8),
                  "format": np.asarray(self.FORMAT_VERSION)}
        if stored.tier == TIER_L0:
            arrays.update(k_raw=stored.keys, v_raw=stored.values)
        else:
            arrays["bits"] = np.asarray(stored.keys.bits)
            for name, q in (("k", stored.keys), ("v", stored.values)):
                arrays.update({f"{name}_codes": q.codes, f"{name}_scale": q.scale, f"{name}_minimum": q.minimum,
                               f"{name}_shape": np.asarray(q.shape)})
        arrays["checksum"] = np.frombuffer(_checksum(arrays), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = self._path(stored.block_hash)
        try:
            atomic_write(path, buffer.getvalue())
        except OSError as exc:  # a full disk loses this block's copy, nothing else
            log.warning("could not spill prefix block %s: %s", path, exc)
            return False
        self._files[stored.block_hash] = path.stat().st_size
        if stored.tier == TIER_L0:
            self._exact.add(stored.block_hash)
        self.nbytes += self._files[stored.block_hash]
        self.writes += 1
        while self.nbytes > self.budget_bytes and self._files:
            old, size = self._files.popitem(last=False)
            self._path(old).unlink(missing_ok=True)
            self._exact.discard(old)
            self.nbytes -= size
        return True

    def read(self, block_hash: bytes) -> StoredBlock | None:
        if block_hash not in self._files:
            return None
        path = self._path(block_hash)
        try:
            block = self._load(path, block_hash)
        except Exception as exc:  # any damage (zip, npy header, checksum, missing key) is this file's alone
            self.corrupt += 1
            self.nbytes -= self._files.pop(block_hash, 0)
            self._exact.discard(block_hash)
            if path.exists():
                quarantine(path, f"unreadable prefix-cache block: {exc!r}")
            return None
        self._files.move_to_end(block_hash)
        self.reads += 1
        return block

    def _load(self, path: Path, block_hash: bytes) -> StoredBlock:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        checksum = arrays.pop("checksum", None)
        if checksum is None or checksum.tobytes() != _checksum(arrays):
            raise ValueError("checksum mismatch")
        if int(arrays["format"]) != self.FORMAT_VERSION or arrays["block_hash"].tobytes() != block_hash:
            raise ValueError("written for another block or in another format")
        tier = int(arrays["tier"])
        if tier == TIER_L0:
            tensors = [arrays["k_raw"], arrays["v_raw"]]
            self._exact.add(block_hash)
        else:
            bits = int(arrays["bits"])
            tensors = [QuantizedTensor(arrays[f"{n}_codes"], arrays[f"{n}_scale"], arrays[f"{n}_minimum"],
                                       tuple(int(x) for x in arrays[f"{n}_shape"]), bits, axis)
                       for n, axis in (("k", "token"), ("v", "channel"))]
        return StoredBlock(block_hash, tuple(int(t) for t in arrays["token_ids"]), tier, *tensors)

    def discard(self, block_hash: bytes) -> None:
        if block_hash in self._files:
            self.nbytes -= self._files.pop(block_hash)
            self._exact.discard(block_hash)
            self._path(block_hash).unlink(missing_ok=True)

    def stats(self) -> dict[str, object]:
        return {"dir": str(self.root), "files": len(self._files), "bytes": self.nbytes,
                "budget_bytes": self.budget_bytes, "writes": self.writes, "reads": self.reads,
                "corrupt_files": self.corrupt}


def _checksum(arrays: dict[str, np.ndarray]) -> bytes:
    """BLAKE2b over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.digest()

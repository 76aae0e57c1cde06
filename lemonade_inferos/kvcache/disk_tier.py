"""The prefix store's disk tier: cached blocks pushed out of memory, kept across restarts.

One ``<hash>.npz`` per block (``block_bytes.py``: a checksum over its arrays and its own block hash); a file
that fails either when read (torn write, bit rot, a file copied in from elsewhere) is quarantined and counts as a miss. At start,
files whose names are not ``<32 hex digits>.npz`` (a crashed writer's temporary, anything foreign) are
quarantined too, so nothing in the folder can stop the server.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from lemonade_inferos.durable import atomic_write, quarantine
from lemonade_inferos.kvcache.block import KVBlock
from lemonade_inferos.kvcache.block_bytes import decode_block, encode_block
from lemonade_inferos.kvcache.plan import TIER_L0
from lemonade_inferos.kvcache.pool import Tensor
from lemonade_inferos.kvcache.reuse_stats import DiskTierStats

log = logging.getLogger(__name__)


class DiskTier:
    """Cached blocks on disk, LRU by file time within a byte budget: the lower tier of the prefix store's pool
    (``pool.py``), written when blocks are evicted from memory and at shutdown."""

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

    def write(self, block: KVBlock, keys: Tensor, values: Tensor) -> bool:
        """Write a cached block (no-op when the file holds it already, unless an exact block replaces a quantized
        copy); False when nothing was written."""
        block_hash, tier = block.block_hash, block.tier
        if block_hash in self._files:
            if tier != TIER_L0 or block_hash in self._exact:
                self._files.move_to_end(block_hash)
                return False
            self.nbytes -= self._files.pop(block_hash)  # an exact block replaces a quantized file
        data = encode_block(block, keys, values)
        path = self._path(block_hash)
        try:
            atomic_write(path, data)
        except OSError as exc:  # a full disk loses this block's copy, nothing else
            log.warning("could not spill prefix block %s: %s", path, exc)
            return False
        self._files[block_hash] = path.stat().st_size
        if tier == TIER_L0:
            self._exact.add(block_hash)
        self.nbytes += self._files[block_hash]
        self.writes += 1
        while self.nbytes > self.budget_bytes and self._files:
            old, size = self._files.popitem(last=False)
            self._path(old).unlink(missing_ok=True)
            self._exact.discard(old)
            self.nbytes -= size
        return True

    def read(self, block_hash: bytes) -> tuple[tuple[int, ...], int, Tensor, Tensor] | None:
        """``(token_ids, tier, keys, values)`` of a block on disk, or None (absent, or damaged: quarantined)."""
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

    def _load(self, path: Path, block_hash: bytes) -> tuple[tuple[int, ...], int, Tensor, Tensor]:
        token_ids, tier, keys, values = decode_block(path.read_bytes(), block_hash)
        if tier == TIER_L0 and isinstance(keys, np.ndarray):
            self._exact.add(block_hash)
        return token_ids, tier, keys, values

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._files

    def __len__(self) -> int:
        return len(self._files)

    def discard(self, block_hash: bytes) -> None:
        if block_hash in self._files:
            self.nbytes -= self._files.pop(block_hash)
            self._exact.discard(block_hash)
            self._path(block_hash).unlink(missing_ok=True)

    def snapshot(self) -> DiskTierStats:
        return DiskTierStats(dir=str(self.root), files=len(self._files), bytes=self.nbytes,
                             budget_bytes=self.budget_bytes, writes=self.writes, reads=self.reads,
                             corrupt_files=self.corrupt)

    def stats(self) -> dict[str, object]:
        return self.snapshot().to_dict()

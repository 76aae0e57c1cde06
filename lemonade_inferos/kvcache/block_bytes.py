"""A cached block as bytes: what the disk spill writes to a file and the shared store to Valkey/Redis.

An ``.npz`` of the block's token ids, tier, its own chained hash, the format version and its K/V (raw arrays
for an exact block or the INT8 live form's codes; codes, scales and minimums for a quantized one), with a
BLAKE2b checksum over every array. :func:`decode_block` refuses bytes whose checksum, format or hash do not
match: a torn write, bit rot, another model's block or anything foreign under the key reads as a miss.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np

from lemonade_inferos.kvcache.block import KVBlock
from lemonade_inferos.kvcache.codecs import QuantizedTensor

FORMAT_VERSION = 1
Tensor = QuantizedTensor | np.ndarray


def encode_block(block: KVBlock, keys: Tensor, values: Tensor) -> bytes:
    arrays = {"token_ids": np.asarray(block.token_ids, dtype=np.int64), "tier": np.asarray(block.tier),
              "block_hash": np.frombuffer(block.block_hash, dtype=np.uint8), "format": np.asarray(FORMAT_VERSION)}
    if isinstance(keys, np.ndarray):
        arrays.update(k_raw=keys, v_raw=values)
    else:
        arrays["bits"] = np.asarray(keys.bits)
        for name, q in (("k", keys), ("v", values)):
            arrays.update({f"{name}_codes": q.codes, f"{name}_scale": q.scale, f"{name}_minimum": q.minimum,
                           f"{name}_shape": np.asarray(q.shape)})
    arrays["checksum"] = np.frombuffer(_checksum(arrays), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_block(data: bytes, block_hash: bytes) -> tuple[tuple[int, ...], int, Tensor, Tensor]:
    """``(token_ids, tier, keys, values)``.

    Raises:
        ValueError: the bytes are not a block, fail their checksum, or hold another block or format.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as exc:  # not an npz at all (zip, header): a foreign value
        raise ValueError(f"not a cached block: {exc!r}") from None
    checksum = arrays.pop("checksum", None)
    if checksum is None or checksum.tobytes() != _checksum(arrays):
        raise ValueError("checksum mismatch")
    if int(arrays["format"]) != FORMAT_VERSION or arrays["block_hash"].tobytes() != block_hash:
        raise ValueError("written for another block or in another format")
    tier = int(arrays["tier"])
    if "k_raw" in arrays:
        tensors = [arrays["k_raw"], arrays["v_raw"]]
    else:
        bits = int(arrays["bits"])
        tensors = [QuantizedTensor(arrays[f"{n}_codes"], arrays[f"{n}_scale"], arrays[f"{n}_minimum"],
                                   tuple(int(x) for x in arrays[f"{n}_shape"]), bits, axis)
                   for n, axis in (("k", "token"), ("v", "channel"))]
    return tuple(int(t) for t in arrays["token_ids"]), tier, tensors[0], tensors[1]


def _checksum(arrays: dict[str, np.ndarray]) -> bytes:
    """BLAKE2b over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.digest()

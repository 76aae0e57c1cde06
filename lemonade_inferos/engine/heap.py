"""Giving the memory of a dropped ONNX Runtime session back to the system (glibc; elsewhere, reported not applied).

A session's weights, prepacked copies and arena are ordinary heap memory. When a session is dropped (a thread-
policy switch builds a new one, an unload, a live-form change), glibc keeps what was freed in the arena of the
thread that allocated it, and with one arena per thread that ran ONNX Runtime or a request, little of it is ever
returned: measured on SmolLM2-135M fp32, every thread-policy switch left the server ~600 MiB larger. Two glibc
calls bound that: :func:`limit_arenas` (``M_ARENA_MAX``, before the server starts its threads) keeps freed
blocks reusable by every thread, and :func:`trim` (``malloc_trim``, after the objects are collected) returns the
free pages.

One arena, and a fixed mmap threshold: a request's transient arrays (ONNX Runtime's arena chunks, numpy's) are
freed by one thread and asked for again by another; with two arenas the second could not reuse the first's free
blocks. Measured on a 6.9K-token prompt (SmolLM2 int4, INT8 live KV, fresh servers): the server grew by 126-130
or 153-154 MiB with two arenas, depending on which thread allocated first, and by 130-132 MiB in every run with
one, prefill as fast (TTFT 20.5-21.7 s against 20.1-21.7 s). One arena alone left ten thread-policy switches
1.13x larger (a dropped session's freed blocks sat between live ones in the one heap): allocations of 4 MiB and
more (weights, arena chunks) are mapped on their own (``M_MMAP_THRESHOLD``, which also stops glibc from raising
the threshold as they are freed), so a dropped session's go back at once (1.0x after ten switches again).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8   # mallopt parameter (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 << 20   # allocations this large get their own mapping


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def limit_arenas(count: int = 1, mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> str | None:
    """Cap glibc's malloc arenas at ``count`` and fix its mmap threshold; call before threads start. Returns why it
    was not applied, or None."""
    libc = _glibc()
    if libc is None:
        return "not glibc: the allocator's own policy applies"
    if not libc.mallopt(M_ARENA_MAX, count):
        return "mallopt(M_ARENA_MAX) was refused"
    if not libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold):
        return "mallopt(M_MMAP_THRESHOLD) was refused"
    return None


def trim() -> bool:
    """Collect dropped objects (sessions sit in reference cycles with their engine) and return free heap pages to
    the system. True when glibc returned memory."""
    gc.collect()
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False

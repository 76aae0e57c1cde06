"""What a prompt finds in the cache it runs in: the prefix the cache already holds, and the segments it was
given to place (segment reuse), each checked against the prompt before the prefill trusts it."""

from __future__ import annotations

from lemonade_inferos.engine.kv import KVCache, SegmentSplice, common_prefix


def take_splices(cache: KVCache, prompt: list[int], reused: int) -> list[SegmentSplice]:
    """The splices a cache carries for this prompt (set by segment reuse), checked against it: each must lie
    after the reused prefix, in order, hold the prompt's own tokens and leave the last prompt token to run; a
    splice that does not is dropped (its tokens are prefilled)."""
    splices: list[SegmentSplice] = []
    cursor = reused
    for splice in cache.take_splices():
        end = splice.at + len(splice)
        if splice.at >= cursor and end < len(prompt) and prompt[splice.at:end] == splice.token_ids:
            splices.append(splice)
            cursor = end
    return splices


def cache_prefix_reuse(cache: KVCache, prompt: list[int]) -> int:
    """Keep the longest prefix of ``prompt`` the cache already holds (at least one token left to run).

    A cache whose committed ids and held tokens differ (it has evicted) is reset:
    its contents no longer line up with a prompt prefix.
    """
    held = cache.token_ids
    if len(held) != cache.num_tokens:
        cache.reset()
        return 0
    if len(held) < len(prompt) and held == prompt[:len(held)]:  # matched already (kvcache/reuse.py): confirm
        return len(held)
    common = common_prefix(held, prompt)
    cache.truncate(common)
    return common

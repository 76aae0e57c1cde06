"""The tiered, quantizing KV cache.

Reading order: ``plan`` (what a policy asks for) -> ``manager`` (the cache the
engine talks to) -> ``pool`` (blocks and their ids) -> ``codecs`` (INT8/INT4).
"""

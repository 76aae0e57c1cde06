"""Benchmarks: each writes JSON plus a PNG, with ratios against a baseline measured in the same run."""

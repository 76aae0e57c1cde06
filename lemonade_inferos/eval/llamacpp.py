"""The same protocol on llama.cpp (optional): its q8_0 / q4_0 KV cache against its own f16 KV cache.

Runs only where ``llama-cpp-python`` is installed (it compiles llama.cpp for
minutes, so it is never a CI requirement). The shipped GGUF (Q4_1 weights) is
fed the same token ids in the same chunks; ΔPPL, KLD and top-1 are against
llama.cpp's own f16-KV run, so they measure the KV format alone. Bytes per
token follow from ggml's block formats (f16: 2 B/value; q8_0: 34 B per 32
values; q4_0: 18 B per 32 values).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from lemonade_inferos.eval.scoring import ScoreAccumulator, log_softmax

GGML_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}
BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _logprobs(gguf: Path, ids: list[int], cache_type: str, chunk: int, threads: int) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + 16, n_batch=chunk, n_ubatch=chunk, logits_all=True,
                type_k=GGML_TYPES[cache_type], type_v=GGML_TYPES[cache_type], flash_attn=True,
                n_threads=threads, verbose=False)
    for start in range(0, len(ids) - 1, chunk):
        llm.eval(ids[start:start + chunk])
    scores = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float32)
    return log_softmax(scores)


def eval_llamacpp(gguf: Path, ids: list[int], layout: Any, chunk: int = 64, threads: int = 2) -> list[dict[str, Any]]:
    """``layout``: the model's KVLayout (layers, KV heads, head size) for the bytes per token."""
    targets = np.asarray(ids[1:])
    reference = _logprobs(gguf, ids, "f16", chunk, threads)
    values_per_token = 2 * layout.num_layers * layout.num_kv_heads * layout.head_size
    results = []
    for cache_type in ("f16", "q8_0", "q4_0"):
        logprobs = reference if cache_type == "f16" else _logprobs(gguf, ids, cache_type, chunk, threads)
        score = ScoreAccumulator()
        score.add(logprobs, reference, targets)
        summary = score.summary()
        results.append({"plan": f"llama.cpp {cache_type}", **summary,
                        "kv_bytes_per_token": values_per_token * BYTES_PER_VALUE[cache_type],
                        "fp16_bytes_per_token": values_per_token * 2.0,
                        "compression_vs_fp16": BYTES_PER_VALUE[cache_type] / 2.0,
                        "note": "ΔPPL/KLD/top-1 against llama.cpp's own f16 KV; Q4_1 weights"})
    return results

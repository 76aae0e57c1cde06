"""llama.cpp in the engine benchmark (optional): the shipped GGUF through llama-cpp-python.

Only where ``llama-cpp-python`` is installed (it compiles llama.cpp for minutes,
so it is never a CI requirement). It runs the same prompt ids (the GGUF carries
the same SmolLM2 vocabulary) greedily through the same ``generate`` interface as
our engines, so the benchmark times all of them alike. The weights differ by
construction: llama.cpp runs the GGUF's own Q4_1 blocks, our models are built
from them (dequantized to fp32, or re-quantized to int4), so greedy tokens are
not expected to be identical and are not compared.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.types import GenerationChunk, GenerationStats


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, gguf: Path, context_length: int = 4096, threads: int | None = None) -> None:
        from llama_cpp import Llama

        # every core, as ONNX Runtime uses (llama-cpp-python would take half of them for decode)
        threads = threads or os.cpu_count() or 1
        self.gguf = gguf
        self.llm = Llama(model_path=str(gguf), n_ctx=context_length, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 stats: GenerationStats | None = None, **_: object) -> Iterator[GenerationChunk]:
        """Greedy tokens past EOS until ``max_tokens`` (the benchmark's ``ignore_eos``); text is not decoded."""
        stats = stats if stats is not None else GenerationStats()
        prompt = [int(t) for t in prompt_ids]
        stats.prompt_n = len(prompt)
        self.llm.reset()
        tokens = self.llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
        for token in tokens:
            stats.mark_token()
            if stats.predicted_n == 1:
                stats.prefill_end_time = stats.first_token_time  # the prompt's eval ends with the first sample
            yield GenerationChunk("", [int(token)])
            if stats.predicted_n >= params.max_tokens:
                break
        tokens.close()
        stats.end_time = stats.token_times[-1] if stats.token_times else None
        stats.finish_reason = "length"
        yield GenerationChunk("", [], finish_reason="length")

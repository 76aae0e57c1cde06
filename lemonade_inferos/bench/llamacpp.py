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
import time
from pathlib import Path
from typing import Iterator, Sequence

from lemonade_inferos.engine.kv import common_prefix
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.types import GenerationChunk, GenerationStats


class LlamaCppEngine:
    name = "llama.cpp"

    KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}   # ggml type ids (type_k / type_v)

    def __init__(self, gguf: Path, context_length: int = 4096, threads: int | None = None,
                 kv_type: str = "f16") -> None:
        from llama_cpp import Llama

        # every core, as ONNX Runtime uses (llama-cpp-python would take half of them for decode), and flash
        # attention (llama.cpp's server turns it on where it can; measured faster here at every length)
        threads = threads or os.cpu_count() or 1
        self.gguf = gguf
        self.llm = Llama(model_path=str(gguf), n_ctx=context_length, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, flash_attn=True, verbose=False,
                         type_k=self.KV_TYPES[kv_type], type_v=self.KV_TYPES[kv_type])

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 stats: GenerationStats | None = None, **_: object) -> Iterator[GenerationChunk]:
        """Greedy tokens past EOS until ``max_tokens`` (the benchmark's ``ignore_eos``); text is not decoded."""
        stats = stats if stats is not None else GenerationStats()
        prompt = [int(t) for t in prompt_ids]
        stats.prompt_n = len(prompt)
        self.llm.reset()  # a cold prefill every run: nothing of the last one is reused
        tokens = self.llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0)
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


def timed_turn(engine: LlamaCppEngine, prompt: list[int], max_tokens: int) -> dict:
    """One greedy reply with llama.cpp's own prefix reuse (its KV cache keeps the longest common prefix)."""
    llm = engine.llm
    cached = common_prefix(list(llm._input_ids[: llm.n_tokens]), prompt)  # what llama.cpp keeps
    eos = llm.token_eos()
    started, first, ids = time.perf_counter(), None, []
    tokens = llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0)
    for token in tokens:
        first = first or time.perf_counter()
        if token == eos or len(ids) >= max_tokens:
            break
        ids.append(int(token))
    tokens.close()
    return {"ttft_s": first - started, "ids": ids, "prompt_tokens": len(prompt), "completion_tokens": len(ids),
            "cached_tokens": cached}


def play_multiturn(engine: LlamaCppEngine, tokenizer, system: str, turns: list[str], reply_tokens: int
                   ) -> dict:
    """The multi-turn bench's conversation, in process, with llama.cpp's own replies and prefix reuse."""
    messages = [{"role": "system", "content": system}]
    records = []
    for index, user in enumerate(turns):
        messages.append({"role": "user", "content": user})
        record = timed_turn(engine, tokenizer.encode(tokenizer.apply_chat_template(messages)), reply_tokens)
        record["turn"] = index + 1
        messages.append({"role": "assistant", "content": tokenizer.decode(record.pop("ids"))})
        records.append(record)
    prompt_messages = messages[:-1]
    changed = [dict(prompt_messages[0], content="Hi. " + prompt_messages[0]["content"])] + prompt_messages[1:]
    cold = timed_turn(engine, tokenizer.encode(tokenizer.apply_chat_template(changed)), reply_tokens)
    return {"per_turn": records, "cold_ttft_s": cold["ttft_s"], "last_turn_ttft_s": records[-1]["ttft_s"],
            "last_turn_ttft_vs_cold": records[-1]["ttft_s"] / cold["ttft_s"],
            "history_tokens": records[-1]["prompt_tokens"], "in_process": True}

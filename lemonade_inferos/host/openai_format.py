"""Response bodies and SSE chunks in OpenAI's shapes, with Lemonade's usage extras and llama.cpp's ``timings``."""

from __future__ import annotations

import json
import time
from typing import Any

from lemonade_inferos.hooktypes import InferenceStats


def usage(stats: InferenceStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_n,
        "completion_tokens": stats.predicted_n,
        "total_tokens": stats.prompt_n + stats.predicted_n,
        "prompt_tokens_details": {"cached_tokens": stats.cache_n},
        "prefill_duration_ttft": stats.ttft_s,
        "decoding_speed_tps": stats.predicted_per_second,
        "inferos": {"drafted_tokens": stats.drafted_n, "accepted_tokens": stats.accepted_n},
    }


def timings(stats: InferenceStats) -> dict[str, Any]:
    """llama.cpp's ``timings`` (llama-server's replies carry it beside ``usage``; GAIA reads its prefill and decode
    split from it): ``prompt_n`` counts the prompt tokens prefilled, ``cache_n`` those reused, and decode is timed
    from the first token on (so ``predicted_per_token_ms`` is over the tokens after it). Unmeasured values are
    None."""
    prefilled, decoded = stats.prompt_n - stats.cache_n, stats.predicted_n - 1
    return {"cache_n": stats.cache_n, "prompt_n": prefilled, "prompt_ms": stats.prompt_ms,
            "prompt_per_token_ms": stats.prompt_ms / prefilled if stats.prompt_ms and prefilled > 0 else None,
            "prompt_per_second": stats.prompt_per_second, "predicted_n": stats.predicted_n,
            "predicted_ms": stats.predicted_ms,
            "predicted_per_token_ms": stats.predicted_ms / decoded if stats.predicted_ms and decoded > 0 else None,
            "predicted_per_second": stats.predicted_per_second}


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {body}\n\n"


def chat_chunk(request_id: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None, stats: InferenceStats | None = None) -> dict[str, Any]:
    chunk = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    if stats is not None:
        chunk["usage"], chunk["timings"] = usage(stats), timings(stats)
    return chunk


def usage_chunk(request_id: str, model: str, created: int, stats: InferenceStats) -> dict[str, Any]:
    """The last chunk of a stream asked for ``stream_options.include_usage``: no choices, the usage and timings (the
    shape OpenAI and llama-server send, and the one GAIA reads its timings from)."""
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage(stats), "timings": timings(stats)}


def chat_completion(request_id: str, model: str, text: str | None, stats: InferenceStats,
                    tool_calls: list[dict[str, Any]] | None = None, thinking: str | None = None) -> dict[str, Any]:
    """``thinking``: a reasoning model's, as ``message.reasoning_content`` (llama.cpp's and Lemonade's field)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking is not None:
        message["reasoning_content"] = thinking
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(stats.start_unix),
            "model": model, "choices": [{"index": 0, "message": message,
                                         "finish_reason": "tool_calls" if tool_calls else stats.finish_reason,
                                         "logprobs": None}],
            "usage": usage(stats), "timings": timings(stats)}


def completion_chunk(request_id: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     stats: InferenceStats | None = None) -> dict[str, Any]:
    chunk = {"id": f"cmpl-{request_id}", "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}
    if stats is not None:
        chunk["usage"], chunk["timings"] = usage(stats), timings(stats)
    return chunk


def response_object(request_id: str, model: str, text: str, stats: InferenceStats | None,
                    status: str = "completed", thinking: str | None = None) -> dict[str, Any]:
    """``thinking``: a reasoning model's, as a ``reasoning`` output item before the message."""
    output = [{"type": "message", "id": f"msg_{request_id}", "status": status, "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    if thinking is not None:
        output.insert(0, {"type": "reasoning", "id": f"rs_{request_id}", "summary": [],
                          "content": [{"type": "reasoning_text", "text": thinking}]})
    body: dict[str, Any] = {"id": f"resp_{request_id}", "object": "response", "created_at": int(time.time()),
                            "status": status, "model": model, "output": output if text or stats else []}
    if stats is not None:
        body["usage"] = {"input_tokens": stats.prompt_n, "output_tokens": stats.predicted_n,
                         "total_tokens": stats.prompt_n + stats.predicted_n,
                         "input_tokens_details": {"cached_tokens": stats.cache_n}}
    return body

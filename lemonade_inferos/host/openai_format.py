"""Response bodies and SSE chunks in OpenAI's shapes, with Lemonade's usage extras."""

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


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {body}\n\n"


def chat_chunk(request_id: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None, stats: InferenceStats | None = None) -> dict[str, Any]:
    chunk = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    if stats is not None:
        chunk["usage"] = usage(stats)
    return chunk


def chat_completion(request_id: str, model: str, text: str | None, stats: InferenceStats,
                    tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(stats.start_unix),
            "model": model, "choices": [{"index": 0, "message": message,
                                         "finish_reason": "tool_calls" if tool_calls else stats.finish_reason,
                                         "logprobs": None}],
            "usage": usage(stats)}


def completion_chunk(request_id: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     stats: InferenceStats | None = None) -> dict[str, Any]:
    chunk = {"id": f"cmpl-{request_id}", "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}
    if stats is not None:
        chunk["usage"] = usage(stats)
    return chunk


def response_object(request_id: str, model: str, text: str, stats: InferenceStats | None,
                    status: str = "completed") -> dict[str, Any]:
    output = [{"type": "message", "id": f"msg_{request_id}", "status": status, "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    body: dict[str, Any] = {"id": f"resp_{request_id}", "object": "response", "created_at": int(time.time()),
                            "status": status, "model": model, "output": output if text or stats else []}
    if stats is not None:
        body["usage"] = {"input_tokens": stats.prompt_n, "output_tokens": stats.predicted_n,
                         "total_tokens": stats.prompt_n + stats.predicted_n,
                         "input_tokens_details": {"cached_tokens": stats.cache_n}}
    return body

"""The API: OpenAI-compatible generation (chat, completions, responses) and Lemonade's status endpoints.

Mounted under /api/v1, /api/v0, /v1 and /v0 by the app factory; the model management routes are
``model_routes.py``, what serving a generate request takes is ``serving.py``.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import psutil
from fastapi import APIRouter, Request

from lemonade_inferos import __version__
from lemonade_inferos.engine.session import available_providers
from lemonade_inferos.engine.types import GenerationChunk
from lemonade_inferos.host import openai_format as fmt
from lemonade_inferos.host import tools
from lemonade_inferos.host.chat_stream import ChatStream
from lemonade_inferos.host.reasoning import CONTENT, REASONING, reply_pieces
from lemonade_inferos.host.route_dispatch import route_field
from lemonade_inferos.host.schemas import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from lemonade_inferos.host.generate import collect
from lemonade_inferos.host.serving import event_stream, host_of, open_run, prepare
from lemonade_inferos.http.json_body import OffLoopJSONRoute

# the Lemonade API level this host implements: 11.7 (router collections, slots, tokenize, Anthropic messages);
# GAIA needs >= 10.2.0, and takes >= 11.8.0 for cloud offload, which this host does not serve
LEMONADE_API_VERSION = "11.7.0"

router = APIRouter(route_class=OffLoopJSONRoute)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    messages = [m.as_template_message() for m in body.messages]
    prepared = await prepare(request, body, None, messages, response_format=body.response_format, tool_request=body)
    model, tool_setup = prepared.model, prepared.tool_setup
    run = open_run(request, prepared, "chat/completions", body.stream, body.cache_prompt)
    request_id = run.request_id
    if not body.stream:
        text, stats = await collect(run)
        thinking, text = prepared.reasoning.split(text) if prepared.reasoning else (None, text)
        content, calls = tools.parse(text, tool_setup) if tool_setup else (text, [])
        return {**fmt.chat_completion(request_id, model.name, content, stats, calls, thinking), **route_field(request)}
    stream = ChatStream(request_id, model.name, tool_setup, prepared.reasoning,
                        usage_chunk=body.stream_options is not None and body.stream_options.include_usage)

    async def events():
        route = route_field(request)   # the decision rides on the first event
        async for item in run:
            for chunk in (stream.text(item.text) if isinstance(item, GenerationChunk) else stream.end(item)):
                yield fmt.sse({**chunk, **route})
                route = {}
        yield fmt.sse("[DONE]")

    return event_stream(run, events())


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    token_ids = body.prompt if body.prompt and isinstance(body.prompt[0], int) else None
    prompt = None if token_ids else body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
    prepared = await prepare(request, body, prompt, None, token_ids=token_ids)
    model = prepared.model
    if token_ids is not None and body.echo:
        prompt = model.tokenizer.decode(token_ids, skip_special_tokens=False)
    run = open_run(request, prepared, "completions", body.stream, body.cache_prompt)
    request_id = run.request_id
    if not body.stream:
        text, stats = await collect(run)
        return {**fmt.completion_chunk(request_id, model.name, int(stats.start_unix),
                                       (prompt if body.echo else "") + text, stats.finish_reason, stats),
                **route_field(request)}

    async def events():
        created, route = int(time.time()), route_field(request)
        async for item in run:
            if isinstance(item, GenerationChunk):
                if item.text:
                    yield fmt.sse({**fmt.completion_chunk(request_id, model.name, created, item.text), **route})
                    route = {}
            else:
                yield fmt.sse({**fmt.completion_chunk(request_id, model.name, created, "", item.finish_reason, item),
                               **route})
        yield fmt.sse("[DONE]")

    return event_stream(run, events())


@router.post("/responses")
async def responses(body: ResponsesRequest, request: Request):
    if isinstance(body.input, str):
        messages = [{"role": "user", "content": body.input}]
    else:
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.input]
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    prepared = await prepare(request, body, None, messages, body.max_output_tokens, (body.text or {}).get("format"))
    model = prepared.model
    run = open_run(request, prepared, "responses", body.stream, body.cache_prompt)
    request_id = run.request_id
    if not body.stream:
        text, stats = await collect(run)
        thinking, text = prepared.reasoning.split(text) if prepared.reasoning else (None, text)
        return {**fmt.response_object(request_id, model.name, text, stats, thinking=thinking),
                **route_field(request)}

    async def events():
        parts: dict[str, list[str]] = {REASONING: [], CONTENT: []}
        splitter = prepared.reasoning.splitter() if prepared.reasoning else None
        yield fmt.sse({"type": "response.created", "response": fmt.response_object(request_id, model.name, "", None,
                                                                                     "in_progress"),
                       **route_field(request)}, "response.created")
        async for item in run:
            for kind, piece in reply_pieces(splitter, item.text if isinstance(item, GenerationChunk) else None):
                parts[kind].append(piece)
                event = "response.output_text.delta" if kind == CONTENT else "response.reasoning_text.delta"
                yield fmt.sse({"type": event, "delta": piece}, event)
            if not isinstance(item, GenerationChunk):
                thinking = "".join(parts[REASONING]) if splitter and splitter.thought else None
                yield fmt.sse({"type": "response.completed", "response": fmt.response_object(
                    request_id, model.name, "".join(parts[CONTENT]), item, thinking=thinking)}, "response.completed")

    return event_stream(run, events())


MODEL_TYPES = ("llm", "embedding", "reranking", "transcription", "image", "tts")


@router.get("/health")
async def health(request: Request):
    host = host_of(request)
    loaded = list(host.models.loaded.values())
    current = host.models.loaded.get(host.models.current) if host.models.current else None
    return {"status": "ok", "version": LEMONADE_API_VERSION,
            "model_loaded": current.name if current else None,
            "checkpoint_loaded": current.info.get("checkpoint") if current else None,
            "all_models_loaded": host.models.health_entries(),
            # this host serves LLMs only: 0 for the other types Lemonade counts
            "pinned_models": {t: sum(m.pinned for m in loaded) if t == "llm" else 0 for t in MODEL_TYPES},
            "max_models": {t: host.settings.max_loaded_models if t == "llm" else 0 for t in MODEL_TYPES},
            "telemetry": host.telemetry.health(),
            "inferos": {"version": __version__, "plugins": host.active_plugins,
                        "disabled_plugins": {n: m.disabled for n, m in host.manifests.items() if m.disabled},
                        "mode": "plugin" if host.active_plugins else "baseline", **host.extras}}


@router.get("/stats")
async def stats(request: Request):
    host_stats = host_of(request).host_stats
    last = host_stats.last
    body: dict[str, Any] = {
        "time_to_first_token": last.ttft_s if last else None,
        "tokens_per_second": last.predicted_per_second if last else None,
        "input_tokens": (last.prompt_n - last.cache_n) if last else None,
        "output_tokens": last.predicted_n if last else None,
        "prompt_tokens": last.prompt_n if last else None,
        "cache_tokens": last.cache_n if last else None,
        "decode_token_times": last.decode_token_times_s if last else None,
        "request_count_total": host_stats.request_count_total,
        "input_tokens_total": host_stats.input_tokens_total,
        "output_tokens_total": host_stats.output_tokens_total,
        "prompt_tokens_total": host_stats.prompt_tokens_total,
        "cache_tokens_total": host_stats.cache_tokens_total,
        "routing_decisions_total": host_stats.routing_decisions_total,
        "routing_switches_total": host_stats.routing_switches_total,
    }
    if last:
        body["inferos"] = {"engine": last.engine, "baseline": last.baseline, "kv_bytes_by_tier": last.kv_bytes_by_tier,
                           "prompt_ms": last.prompt_ms, "finish_reason": last.finish_reason,
                           "drafted_tokens": last.drafted_n, "accepted_tokens": last.accepted_n}
    for name, source in host_of(request).stat_sources.items():
        body.setdefault("inferos", {})[name] = source()
    return body


@router.get("/system-info")
async def system_info(request: Request):
    memory = psutil.virtual_memory()
    providers = available_providers()
    return {
        "OS Version": platform.platform(),
        "Processor": platform.processor() or platform.machine(),
        "Physical Memory": f"{memory.total / 1e9:.1f} GB",
        "devices": {
            "cpu": {"name": platform.processor() or platform.machine(), "cores": psutil.cpu_count(logical=False),
                    "threads": psutil.cpu_count(), "available": True, "family": platform.machine()},
            "amd_gpu": [{"name": "DirectML device", "available": True}] if "DmlExecutionProvider" in providers else [],
            "amd_npu": {"available": "VitisAIExecutionProvider" in providers},
        },
        "recipes": {recipe: {"default_backend": "default", "backends": {"default": {
            "devices": ["cpu"] if recipe == "oga-cpu" else [recipe.removeprefix("oga-")],
            "state": "installed" if recipe == "oga-cpu" or provider in providers else "unsupported",
            "message": "" if provider in providers else f"{provider} is not available: falls back to CPU"}}}
            for recipe, provider in (("oga-cpu", "CPUExecutionProvider"), ("oga-igpu", "DmlExecutionProvider"),
                                     ("oga-hybrid", "DmlExecutionProvider"), ("oga-npu", "VitisAIExecutionProvider"))},
        "inferos": {"execution_providers": providers},
    }

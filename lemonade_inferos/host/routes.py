"""The API: OpenAI-compatible generation plus Lemonade's model and status endpoints.

Mounted under /api/v1, /api/v0, /v1 and /v0 by the app factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

import jinja2
import psutil
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from lemonade_inferos import __version__
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.tokenizer import PromptTooLong
from lemonade_inferos.engine.session import available_providers
from lemonade_inferos.engine.types import GenerationChunk
from lemonade_inferos.errors import GenerationError, InferosError
from lemonade_inferos.engine.guidance import Guidance
from lemonade_inferos.host import openai_format as fmt
from lemonade_inferos.host import recipe_options, structured, tools
from lemonade_inferos.host.chat_stream import ChatStream
from lemonade_inferos.http.handlers import inferos_error_body
from lemonade_inferos.host.generate import new_request_id
from lemonade_inferos.host.telemetry import RequestTrace
from lemonade_inferos.host.schemas import (ChatCompletionRequest, CompletionRequest, LoadRequest, ParamsRequest,
                                          PullRequest, ResponsesRequest, SamplingFields, UnloadRequest)
from lemonade_inferos.http.errors import APIError, error_body
from lemonade_inferos.hooktypes import InferenceStats
from lemonade_inferos.http.json_body import OffLoopJSONRoute, json_object

LEMONADE_API_VERSION = "10.2.0"  # the Lemonade API level this host implements (GAIA needs >= 10.2.0)

router = APIRouter(route_class=OffLoopJSONRoute)
log = logging.getLogger(__name__)


def _host(request: Request) -> Any:
    return request.app.state.host


def _sampling(body: SamplingFields, host: Any, max_tokens: int | None = None) -> SamplingParams:
    defaults = host.default_params
    max_new = max_tokens if max_tokens is not None else (body.max_completion_tokens if body.max_completion_tokens
                                                         is not None else body.max_tokens)
    return SamplingParams(
        max_tokens=max_new if max_new is not None else defaults.get("max_new_tokens", 512),
        temperature=body.temperature if body.temperature is not None else defaults.get("temperature", 0.0),
        top_p=body.top_p if body.top_p is not None else defaults.get("top_p", 1.0),
        top_k=body.top_k if body.top_k is not None else defaults.get("top_k", 0),
        repetition_penalty=(body.repetition_penalty or body.repeat_penalty
                            or defaults.get("repeat_penalty", 1.0)),
        frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
        repeat_last_n=body.repeat_last_n,
        seed=body.seed, stop=tuple(body.stop or ()), ignore_eos=body.ignore_eos)


@dataclass(frozen=True)
class Prompt:
    """What a request's body becomes before it is admitted: prompt ids, the constraint on the reply, tool setup."""

    ids: list[int]
    guidance: Guidance | None = None
    tool_setup: tools.ToolSetup | None = None


async def _prepare(request: Request, body: SamplingFields, text: str | None, messages: list[dict] | None,
                   max_tokens: int | None = None, response_format: dict[str, Any] | None = None,
                   tool_request: ChatCompletionRequest | None = None, token_ids: list[int] | None = None):
    """The model, prompt ids and sampling of a request; with ``tool_request``, also its tool setup (the tools
    rendered into the prompt, the call syntax constraining the output).

    The prompt is built in a worker thread (templating, tokenizing, compiling a schema can take seconds for a
    large body), so health checks and other clients' streams go on meanwhile."""
    host = _host(request)
    model = await host.models.resolve(body.model)
    prompt = await asyncio.to_thread(_prompt, model, text, messages, response_format, tool_request, token_ids)
    params = _sampling(body, host, max_tokens)
    # no more tokens than the context has room for: a huge max_tokens ends with finish_reason "length"
    params = replace(params, max_tokens=min(params.max_tokens, model.ctx_size - len(prompt.ids)),
                     guidance=prompt.guidance)
    return host, model, prompt.ids, params, prompt.tool_setup


def _prompt(model: Any, text: str | None, messages: list[dict] | None, response_format: dict[str, Any] | None,
            tool_request: ChatCompletionRequest | None, token_ids: list[int] | None) -> Prompt:
    """:func:`_prepare`'s work off the event loop (see there)."""
    guidance = structured.guidance_for(response_format)
    tool_setup = None
    if messages is not None:
        template_tools = None
        template = model.tokenizer.chat_template
        if tool_request is not None:
            tool_setup = tools.setup(tool_request.tools, tool_request.tool_choice, template,
                                     tool_request.parallel_tool_calls)
        if tool_setup is not None:
            native = tools.native_tools(template)
            messages = tools.render_messages(messages, tool_request.tools, native)
            template_tools = tool_request.tools if native else None
            if tool_setup.guidance is not None:
                if guidance is not None:
                    raise APIError(400, "invalid_request", "response_format and tools cannot both constrain a reply",
                                   param="response_format")
                guidance = tool_setup.guidance
        try:
            text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=template_tools)
        except ValueError as exc:
            raise APIError(400, "no_chat_template", str(exc)) from exc
        except jinja2.TemplateError as exc:  # the model's template refuses these messages (e.g. role order)
            raise APIError(400, "invalid_messages", f"the model's chat template refused the messages: {exc}") \
                from exc
    try:
        ids = _checked_ids(token_ids, model) if token_ids is not None else \
            model.tokenizer.encode_within(text or "", model.ctx_size)
    except PromptTooLong as exc:
        raise GenerationError(f"the prompt has {exc.counted} but the context holds {model.ctx_size}; shorten it",
                              prompt_tokens=exc.num_tokens, context_length=model.ctx_size) from exc
    if not ids:
        raise APIError(400, "empty_prompt", "the prompt is empty")
    return Prompt(ids, guidance, tool_setup)


def _checked_ids(token_ids: list[int], model: Any) -> list[int]:
    if len(token_ids) >= model.ctx_size:
        raise PromptTooLong(len(token_ids), model.ctx_size)
    vocab = model.spec.vocab_size if model.spec is not None else None
    bad = [t for t in token_ids if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise APIError(400, "invalid_request", f"prompt token ids must be in 0..{vocab - 1 if vocab else 'vocab'}; "
                       f"got {bad[:5]}", param="prompt")
    return list(token_ids)


def _open(request: Request, host: Any, model: Any, prompt_ids: list[int], params: SamplingParams,
          endpoint: str, stream: bool, cache_prompt: bool = True):
    """Admit the run now (a full queue is a 503 before any response starts). A non-streaming run watches its
    client: one that hangs up stops the generation."""
    return host.generator.open(model, prompt_ids, params, endpoint, new_request_id(),
                               is_disconnected=None if stream else request.is_disconnected, stream=stream,
                               trace=_trace(request, host, model, prompt_ids, params, endpoint),
                               cache_prompt=cache_prompt)


def _trace(request: Request, host: Any, model: Any, prompt_ids: list[int], params: SamplingParams,
           endpoint: str) -> RequestTrace | None:
    """What the request's telemetry span needs (None while telemetry is off: nothing is decoded for it)."""
    telemetry = host.telemetry
    if not telemetry.enabled:
        return None
    text = None if telemetry.settings.hide_inputs else model.tokenizer.decode(prompt_ids, skip_special_tokens=False)
    parameters = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                  "max_tokens": params.max_tokens, "seed": params.seed,
                  "guidance": params.guidance.kind if params.guidance else None}
    return RequestTrace(endpoint, dict(request.headers), text, {k: v for k, v in parameters.items() if v is not None})


async def _collect(run) -> tuple[str, InferenceStats]:
    parts, stats = [], None
    try:
        async for item in run:
            if isinstance(item, GenerationChunk):
                parts.append(item.text)
            else:
                stats = item
    finally:
        run.release()
    return "".join(parts), stats


def _event_stream(run, events, ping_s: float | None = None) -> StreamingResponse:
    """SSE for ``events``; an error after the stream has begun is sent as a ``data: {"error": ...}`` event
    (the status line is already out), and the queue place is given back however the stream ends. While no event
    comes for ``ping_s`` (a long prefill, a wait in the queue), a ``: ping`` comment keeps the connection alive."""

    async def guarded():
        try:
            async for event in _with_pings(events, ping_s or SSE_PING_S):
                yield event
        except InferosError as exc:
            yield fmt.sse(inferos_error_body(exc)[1])
        except APIError as exc:
            yield fmt.sse(exc.body())
        except Exception as exc:  # an engine fault mid-stream: the client gets the error shape, not a cut
            log.exception("streamed generation failed")
            yield fmt.sse(error_body(500, "internal_error", f"generation failed: {exc!r}"))

    return StreamingResponse(guarded(), media_type="text/event-stream", background=BackgroundTask(run.release))


SSE_PING_S = float(os.environ.get("LEMONADE_SSE_PING_S", "5"))


async def _with_pings(events, every_s: float):
    """``events`` with an SSE comment line whenever none came for ``every_s`` seconds."""
    iterator = events.__aiter__()
    pending = asyncio.ensure_future(iterator.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield ": ping\n\n"
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            yield event
            pending = asyncio.ensure_future(iterator.__anext__())
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    messages = [m.as_template_message() for m in body.messages]
    host, model, prompt_ids, params, tool_setup = await _prepare(request, body, None, messages,
                                                                 response_format=body.response_format,
                                                                 tool_request=body)
    run = _open(request, host, model, prompt_ids, params, "chat/completions", body.stream, body.cache_prompt)
    request_id = run.request_id
    if not body.stream:
        text, stats = await _collect(run)
        content, calls = tools.parse(text, tool_setup) if tool_setup else (text, [])
        return fmt.chat_completion(request_id, model.name, content, stats, calls)
    stream = ChatStream(request_id, model.name, tool_setup,
                        usage_chunk=body.stream_options is not None and body.stream_options.include_usage)

    async def events():
        async for item in run:
            for chunk in (stream.text(item.text) if isinstance(item, GenerationChunk) else stream.end(item)):
                yield fmt.sse(chunk)
        yield fmt.sse("[DONE]")

    return _event_stream(run, events())


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    token_ids = body.prompt if body.prompt and isinstance(body.prompt[0], int) else None
    prompt = None if token_ids else body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
    host, model, prompt_ids, params, _ = await _prepare(request, body, prompt, None, token_ids=token_ids)
    if token_ids is not None and body.echo:
        prompt = model.tokenizer.decode(token_ids, skip_special_tokens=False)
    run = _open(request, host, model, prompt_ids, params, "completions", body.stream, body.cache_prompt)
    request_id = run.request_id
    if not body.stream:
        text, stats = await _collect(run)
        return fmt.completion_chunk(request_id, model.name, int(stats.start_unix),
                                    (prompt if body.echo else "") + text, stats.finish_reason, stats)

    async def events():
        created = int(time.time())
        async for item in run:
            if isinstance(item, GenerationChunk):
                if item.text:
                    yield fmt.sse(fmt.completion_chunk(request_id, model.name, created, item.text))
            else:
                yield fmt.sse(fmt.completion_chunk(request_id, model.name, created, "", item.finish_reason, item))
        yield fmt.sse("[DONE]")

    return _event_stream(run, events())


@router.post("/responses")
async def responses(body: ResponsesRequest, request: Request):
    if isinstance(body.input, str):
        messages = [{"role": "user", "content": body.input}]
    else:
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.input]
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    host, model, prompt_ids, params, _ = await _prepare(request, body, None, messages, body.max_output_tokens,
                                                        (body.text or {}).get("format"))
    run = _open(request, host, model, prompt_ids, params, "responses", body.stream, body.cache_prompt)
    request_id = run.request_id
    if not body.stream:
        text, stats = await _collect(run)
        return fmt.response_object(request_id, model.name, text, stats)

    async def events():
        parts = []
        yield fmt.sse({"type": "response.created", "response": fmt.response_object(request_id, model.name, "", None,
                                                                                     "in_progress")},
                      "response.created")
        async for item in run:
            if isinstance(item, GenerationChunk):
                if item.text:
                    parts.append(item.text)
                    yield fmt.sse({"type": "response.output_text.delta", "delta": item.text},
                                  "response.output_text.delta")
            else:
                yield fmt.sse({"type": "response.completed",
                               "response": fmt.response_object(request_id, model.name, "".join(parts), item)},
                              "response.completed")

    return _event_stream(run, events())


@router.get("/models")
async def list_models(request: Request, show_all: bool = False):
    host = _host(request)
    data = []
    for name, info in host.registry.all().items():
        downloaded = host.registry.is_downloaded(name)
        if downloaded or show_all:
            data.append(_model_entry(host, name, info, downloaded))
    return {"object": "list", "data": data}


@router.get("/models/{model_id}")
async def get_model(model_id: str, request: Request):
    host = _host(request)
    name = host.registry.canonical(model_id)
    info = host.registry.get(name)
    return _model_entry(host, name, info, host.registry.is_downloaded(name))


def _model_entry(host: Any, name: str, info: dict[str, Any], downloaded: bool) -> dict[str, Any]:
    """A model as Lemonade lists it; ``context_length`` is the one it runs with when loaded, else the one a load
    would use now (never the ``-1`` "automatic" marker)."""
    options = _options(host, name, info)
    loaded = host.models.loaded.get(name)
    entry = {"id": name, "object": "model", "created": 0, "owned_by": "lemonade", "checkpoint": info["checkpoint"],
             "recipe": info["recipe"], "downloaded": downloaded, "suggested": info.get("suggested", False),
             "labels": info.get("labels", []), "size": info.get("size"),
             "recipe_options": {k: v for k, v in options["effective"].items() if k != "model_name"}}
    context_length = loaded.ctx_size if loaded else options["resolved_ctx_size"]
    if context_length:
        entry["context_length"] = context_length
    ceiling = loaded.model_ctx if loaded else host.registry.context_length(name)
    if ceiling:
        entry["max_context_window"] = ceiling  # the model's trained context (GAIA's ceiling for ctx_size)
    return entry


def _options(host: Any, name: str, info: dict[str, Any], pending: dict[str, Any] | None = None) -> dict[str, Any]:
    store = host.models.options
    return recipe_options.options_document(name, info.get("recipe", "oga-cpu"), store.saved(name),
                                           host.settings.ctx_size, host.registry.context_length(name), pending)


@router.get("/models/{model_id}/options")
async def get_model_options(model_id: str, request: Request):
    host = _host(request)
    name = host.registry.canonical(model_id)
    return _options(host, name, host.registry.get(name))


@router.post("/models/{model_id}/options")
async def save_model_options(model_id: str, request: Request):
    """Merge the body's options into the model's saved ones (``null`` removes one; ``dry_run`` saves nothing);
    a loaded model keeps its options until it is next loaded."""
    host = _host(request)
    name = host.registry.canonical(model_id)
    info = host.registry.get(name)
    body = await json_object(request, "recipe options")
    dry_run = body.pop("dry_run", False)
    if not isinstance(dry_run, bool):
        raise APIError(400, "invalid_request", "dry_run must be a boolean", param="dry_run")
    entry = host.models.options.save(name, info.get("recipe", "oga-cpu"), body, dry_run=dry_run)
    return _options(host, name, info, pending=entry if dry_run else None)


@router.delete("/models/{model_id}/options")
async def reset_model_options(model_id: str, request: Request):
    host = _host(request)
    name = host.registry.canonical(model_id)
    info = host.registry.get(name)
    host.models.options.reset(name)
    return _options(host, name, info)


@router.post("/load")
async def load(body: LoadRequest, request: Request):
    if not body.name:
        raise APIError(400, "invalid_request", "model_name is required")
    model = await _host(request).models.load(body.name, body.ctx_size, save_options=body.save_options,
                                             pinned=body.pinned)
    return {"status": "success", "message": f"Loaded model: {model.name}", "model_name": model.name,
            "recipe_options": {"ctx_size": model.ctx_size}}


@router.post("/unload")
async def unload(request: Request, body: UnloadRequest | None = None):
    names = await _host(request).models.unload(body.name if body else None)
    return {"status": "success", "message": f"Unloaded: {', '.join(names) or 'nothing'}"}


@router.post("/pull")
async def pull(body: PullRequest, request: Request):
    """Build a built-in model or register a local folder; ``stream`` sends Lemonade's SSE progress events (a
    ``progress`` event per build step, then ``complete``, or ``error``)."""
    host = _host(request)
    if not body.name:
        raise APIError(400, "invalid_request", "model_name is required")
    name = host.registry.canonical(body.name)
    if not name.startswith("user."):
        host.registry.get(name)  # an unknown built-in is a 404 before any stream starts
    elif not body.main_checkpoint and name not in host.registry.all():
        raise APIError(400, "invalid_request", f"registering {name} needs a checkpoint: the path of an "
                       "onnxruntime-genai model folder (checkpoint, or checkpoints.main)", model=name)
    if not body.stream:
        folder = await asyncio.to_thread(host.registry.pull, name, body.main_checkpoint, body.recipe)
        return {"status": "success", "message": f"Installed model: {body.name}", "path": str(folder)}
    return StreamingResponse(_pull_events(host, name, body), media_type="text/event-stream")


async def pull_steps(host: Any, name: str, checkpoint: str | None = None, recipe: str | None = None
                     ) -> AsyncIterator[tuple[str, Any]]:
    """A pull in a worker thread, as it goes: ``("progress", message)`` per build step, then ``("done", folder)``
    or ``("error", (status, message))`` (a stream has begun: a failure is its last item, not an exception)."""
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue = asyncio.Queue()
    job = asyncio.ensure_future(asyncio.to_thread(
        host.registry.pull, name, checkpoint, recipe,
        progress=lambda msg: loop.call_soon_threadsafe(steps.put_nowait, msg)))
    while not (job.done() and steps.empty()):
        getter = asyncio.ensure_future(steps.get())
        await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            continue
        yield "progress", getter.result()
    try:
        yield "done", job.result()
    except Exception as exc:
        status, payload = inferos_error_body(exc) if isinstance(exc, InferosError) else (500, None)
        yield "error", (status, payload["error"]["message"] if payload else f"pull failed: {exc!r}")


async def _pull_events(host: Any, name: str, body: PullRequest):
    """Lemonade's SSE: a ``progress`` event per build step, then ``complete`` or ``error``."""
    index = 0
    async for kind, value in pull_steps(host, name, body.main_checkpoint, body.recipe):
        if kind == "progress":
            index += 1
            yield fmt.sse({"file": value, "file_index": index, "total_files": None, "bytes_downloaded": 0,
                           "bytes_total": 0, "percent": None}, event="progress")
        elif kind == "error":
            yield fmt.sse({"error": value[1], "status": value[0]}, event="error")
        else:
            size = sum(f.stat().st_size for f in value.rglob("*") if f.is_file())
            yield fmt.sse({"file_index": index, "total_files": index, "percent": 100, "bytes_total": size,
                           "path": str(value)}, event="complete")


@router.post("/models/register")
async def register(body: PullRequest, request: Request):
    """Lemonade's register-without-download: here a ``user.*`` model is a local folder, so registering it is
    pulling it (nothing is downloaded either way)."""
    host = _host(request)
    name = body.name or ""
    if not name.startswith("user."):
        raise APIError(400, "invalid_request", "model_name must be a non-empty name under user.*", model=name)
    if not body.main_checkpoint:
        raise APIError(400, "invalid_request", f"registering {name} needs a checkpoint: the path of an "
                       "onnxruntime-genai model folder", model=name)
    await asyncio.to_thread(host.registry.pull, name, body.main_checkpoint, body.recipe)
    info = host.registry.get(name)
    return {"status": "success", "model_name": name, "canonical_model_name": name,
            "model": {"id": name, "recipe": info["recipe"], "downloaded": host.registry.is_downloaded(name)}}


@router.post("/delete")
async def delete(body: PullRequest, request: Request):
    host = _host(request)
    if not body.name:
        raise APIError(400, "invalid_request", "model_name is required")
    name = host.registry.canonical(body.name)
    if name not in host.registry.all():  # Lemonade answers an unknown model's delete with 422
        raise APIError(422, "model_not_found", f"model '{body.name}' is not in the registry", model=body.name)
    if name in host.models.loaded:
        await host.models.unload(name)
    host.registry.delete(name)
    host.models.options.reset(name)
    return {"status": "success", "message": f"Deleted model: {body.name}"}


@router.post("/params")
async def params(body: ParamsRequest, request: Request):
    """Defaults for later requests, and Lemonade's ``telemetry`` block (validated whole before anything
    changes: a bad block is a 400 and the sampling defaults of the same body are not stored either)."""
    host = _host(request)
    if body.telemetry is not None:
        host.telemetry.update(body.telemetry)
    host.default_params.update(body.model_dump(exclude_none=True, exclude={"model", "telemetry"}))
    return {"status": "success", "params": host.default_params,
            "telemetry": host.telemetry.settings.model_dump(exclude={"otlp": {"headers"}})}


MODEL_TYPES = ("llm", "embedding", "reranking", "transcription", "image", "tts")


@router.get("/health")
async def health(request: Request):
    host = _host(request)
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
    host_stats = _host(request).host_stats
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
    }
    if last:
        body["inferos"] = {"engine": last.engine, "baseline": last.baseline, "kv_bytes_by_tier": last.kv_bytes_by_tier,
                           "prompt_ms": last.prompt_ms, "finish_reason": last.finish_reason,
                           "drafted_tokens": last.drafted_n, "accepted_tokens": last.accepted_n}
    for name, source in _host(request).stat_sources.items():
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

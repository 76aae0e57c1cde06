"""Serving one generate request, shared by every API that generates (OpenAI's, Ollama's, Anthropic's).

A body becomes the model, the prompt ids (templated and tokenized off the event loop), the sampling and, for a
chat with tools, the tool setup (``prepare``); the run is admitted at once so a full queue answers 503 before any
response starts (``open_run``); its output is collected whole (``collect``) or streamed as SSE with pings while
nothing comes (``event_stream``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from lemonade_inferos.engine.guidance import Guidance
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.tokenizer import PromptTooLong
from lemonade_inferos.errors import GenerationError, InferosError
from lemonade_inferos.host import openai_format as fmt
from lemonade_inferos.host import route_dispatch, structured, tools
from lemonade_inferos.host.generate import new_request_id
from lemonade_inferos.host.reasoning import ReasoningFormat
from lemonade_inferos.host.route_dispatch import carries_images, routed_model
from lemonade_inferos.host.schemas import ChatCompletionRequest, SamplingFields
from lemonade_inferos.host.telemetry import RequestTrace
from lemonade_inferos.http.errors import APIError, error_body
from lemonade_inferos.http.handlers import inferos_error_body
from lemonade_inferos.http.json_body import parsed_body

log = logging.getLogger(__name__)
GENERATING_ENDPOINTS = {"chat/completions", "completions", "responses", "messages", "api/chat", "api/generate"}
SSE_PING_S = float(os.environ.get("LEMONADE_SSE_PING_S", "5"))


def host_of(request: Request) -> Any:
    return request.app.state.host


def sampling_params(body: SamplingFields, host: Any, max_tokens: int | None = None) -> SamplingParams:
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
    """What a request's body becomes before it is admitted: prompt ids, the constraint on the reply, tool setup,
    and, for a reasoning model, where its thinking is."""

    ids: list[int]
    guidance: Guidance | None = None
    tool_setup: tools.ToolSetup | None = None
    reasoning: ReasoningFormat | None = None


@dataclass(frozen=True)
class Prepared:
    """A request ready to run: the host and model it runs on, its prompt ids and sampling, and how to read the
    reply (tool calls, thinking)."""

    host: Any
    model: Any
    ids: list[int]
    params: SamplingParams
    tool_setup: tools.ToolSetup | None = None
    reasoning: ReasoningFormat | None = None


async def prepare(request: Request, body: SamplingFields, text: str | None, messages: list[dict] | None,
                  max_tokens: int | None = None, response_format: dict[str, Any] | None = None,
                  tool_request: ChatCompletionRequest | None = None, token_ids: list[int] | None = None
                  ) -> Prepared:
    """The model, prompt ids and sampling of a request; with ``tool_request``, also its tool setup (the tools
    rendered into the prompt, the call syntax constraining the output).

    The prompt is built in a worker thread (templating, tokenizing, compiling a schema can take seconds for a
    large body), so health checks and other clients' streams go on meanwhile. A request refused here still
    gets its telemetry span (:func:`refused`)."""
    started = time.time()
    try:
        return await _prepare(request, body, text, messages, max_tokens, response_format, tool_request, token_ids)
    except Exception as exc:
        refused(request, body.model, exc, started)
        raise


async def _prepare(request: Request, body: SamplingFields, text: str | None, messages: list[dict] | None,
                   max_tokens: int | None, response_format: dict[str, Any] | None,
                   tool_request: ChatCompletionRequest | None, token_ids: list[int] | None) -> Prepared:
    host = host_of(request)
    raw = parsed_body(request)
    if isinstance(raw, dict) and carries_images(raw):   # never dropped silently: the reply would ignore them
        raise APIError(400, "image_input_unsupported", "this host serves text-only models (no vision model): "
                       "send the request without images", model=body.model)
    model = await host.models.resolve(await routed_model(request, host, body.model, messages, text))
    prompt = await asyncio.to_thread(_prompt, model, body, text, messages, response_format, tool_request, token_ids)
    params = sampling_params(body, host, max_tokens)
    # no more tokens than the context has room for: a huge max_tokens ends with finish_reason "length"
    params = replace(params, max_tokens=min(params.max_tokens, model.ctx_size - len(prompt.ids)),
                     guidance=prompt.guidance)
    return Prepared(host, model, prompt.ids, params, prompt.tool_setup, prompt.reasoning)


def _prompt(model: Any, body: SamplingFields, text: str | None, messages: list[dict] | None,
            response_format: dict[str, Any] | None, tool_request: ChatCompletionRequest | None,
            token_ids: list[int] | None) -> Prompt:
    """:func:`prepare`'s work off the event loop (see there). A raw prompt gets the tokenizer's own special tokens
    (Gemma's BOS, as llama.cpp adds it); a chat template writes its own."""
    guidance = structured.guidance_for(response_format)
    tool_setup = reasoning = None
    if messages is not None:
        text, tool_setup = _chat_text(model, body, messages, tool_request)
        if tool_setup is not None and tool_setup.guidance is not None:
            if guidance is not None:
                raise APIError(400, "invalid_request", "response_format and tools cannot both constrain a reply",
                               param="response_format")
            guidance = tool_setup.guidance
        reasoning = ReasoningFormat.of(model.tokenizer.chat_template, text, body.reasoning_format)
    try:
        ids = _checked_ids(token_ids, model) if token_ids is not None else \
            model.tokenizer.encode_within(text or "", model.ctx_size, add_special=messages is None)
    except PromptTooLong as exc:
        raise GenerationError(f"the prompt has {exc.counted} but the context holds {model.ctx_size}; shorten it",
                              prompt_tokens=exc.num_tokens, context_length=model.ctx_size) from exc
    if not ids:
        raise APIError(400, "empty_prompt", "the prompt is empty")
    return Prompt(ids, guidance, tool_setup, reasoning)


def _chat_text(model: Any, body: SamplingFields, messages: list[dict],
               tool_request: ChatCompletionRequest | None) -> tuple[str, tools.ToolSetup | None]:
    """The messages (and tools) rendered by the model's chat template, with the request's template variables."""
    template_tools = tool_setup = None
    template = model.tokenizer.chat_template
    if tool_request is not None:
        tool_setup = tools.setup(tool_request.tools, tool_request.tool_choice, template,
                                 tool_request.parallel_tool_calls)
    if tool_setup is not None:
        native = tools.native_tools(template)
        messages = tools.render_messages(messages, tool_request.tools, native)
        template_tools = tool_request.tools if native else None
    try:
        return model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=template_tools,
                                                   variables=body.chat_template_kwargs), tool_setup
    except ValueError as exc:
        raise APIError(400, "no_chat_template", str(exc)) from exc
    except jinja2.TemplateError as exc:  # the model's template refuses these messages (e.g. role order)
        raise APIError(400, "invalid_messages", f"the model's chat template refused the messages: {exc}") from exc


def _checked_ids(token_ids: list[int], model: Any) -> list[int]:
    if len(token_ids) >= model.ctx_size:
        raise PromptTooLong(len(token_ids), model.ctx_size)
    vocab = model.spec.vocab_size if model.spec is not None else None
    bad = [t for t in token_ids if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise APIError(400, "invalid_request", f"prompt token ids must be in 0..{vocab - 1 if vocab else 'vocab'}; "
                       f"got {bad[:5]}", param="prompt")
    return list(token_ids)


def open_run(request: Request, prepared: Prepared, endpoint: str, stream: bool, cache_prompt: bool = True):
    """Admit the run now (a full queue is a 503 before any response starts). A non-streaming run watches its
    client: one that hangs up stops the generation."""
    started = time.time()
    host, model = prepared.host, prepared.model
    try:
        run = host.generator.open(model, prepared.ids, prepared.params, endpoint, new_request_id(),
                                   is_disconnected=None if stream else request.is_disconnected, stream=stream,
                                   trace=_trace(request, prepared, endpoint),
                                   cache_prompt=cache_prompt)
    except Exception as exc:
        refused(request, model.name, exc, started)
        raise
    route_dispatch.count(request, host)
    return run


def refused(request: Request, model: str | None, exc: Exception, started: float) -> None:
    """The telemetry span of a request refused before it ran (nothing is built while telemetry is off)."""
    if isinstance(exc, APIError):
        status, code, message = exc.status, exc.code, exc.message
    elif isinstance(exc, InferosError):
        status, body = inferos_error_body(exc)
        code, message = body["error"]["code"], body["error"]["message"]
    else:
        status, code, message = 500, "internal_error", repr(exc)
    _refused_span(request, model, status, code, message, started)


def invalid_body(request: Request, status: int, code: str, message: str) -> None:
    """A generate request whose body its schema refused, before the route ran: its span too
    (``http/handlers.py`` calls this for every such body; other routes' bodies have no span)."""
    if endpoint_of(request) not in GENERATING_ENDPOINTS:
        return
    body = parsed_body(request)
    model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
    _refused_span(request, model, status, code, message, time.time())


def _refused_span(request: Request, model: str | None, status: int, code: str, message: str,
                  started: float) -> None:
    telemetry = host_of(request).telemetry
    if not telemetry.enabled:
        return
    session, user = _body_identity(request)
    telemetry.record_refused(RequestTrace(endpoint_of(request), dict(request.headers), session_id=session,
                                          user_id=user), model, status, code, message, started)


def _body_identity(request: Request) -> tuple[str | None, str | None]:
    """The body's ``session_id`` (Lemonade: it wins over every session header) and its user (OpenAI's ``user``,
    Anthropic's ``metadata.user_id``), from the body as the route parsed it."""
    body = parsed_body(request)
    if not isinstance(body, dict):
        return None, None
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    session, user = body.get("session_id"), body.get("user") or metadata.get("user_id")
    return (session if isinstance(session, str) and session else None,
            user if isinstance(user, str) and user else None)


def endpoint_of(request: Request) -> str:
    """The endpoint a span is named after: the path without its API prefix (``chat/completions``, ``messages``,
    Ollama's ``api/chat``)."""
    path = request.url.path.lstrip("/")
    for prefix in ("api/v1/", "api/v0/", "v1/", "v0/"):
        if path.startswith(prefix):
            return path.removeprefix(prefix)
    return path


def _trace(request: Request, prepared: Prepared, endpoint: str) -> RequestTrace | None:
    """What the request's telemetry span needs (None while telemetry is off: nothing is decoded for it)."""
    telemetry, params = prepared.host.telemetry, prepared.params
    if not telemetry.enabled:
        return None
    text = None if telemetry.settings.hide_inputs else \
        prepared.model.tokenizer.decode(prepared.ids, skip_special_tokens=False)
    parameters = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                  "max_tokens": params.max_tokens, "seed": params.seed,
                  "guidance": params.guidance.kind if params.guidance else None}
    session, user = _body_identity(request)
    return RequestTrace(endpoint, dict(request.headers), text, {k: v for k, v in parameters.items() if v is not None},
                        session_id=session, user_id=user, reasoning=prepared.reasoning)


def event_stream(run, events, ping_s: float | None = None) -> StreamingResponse:
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

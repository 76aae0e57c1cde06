"""Ollama's API over the same engine: ``/api/version``, ``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/chat``,
``/api/generate`` (and Lemonade's 501 for the authoring and registry routes).

A request is translated into the OpenAI-shaped one the other routes serve (``serving.prepare``: the same model
resolution, limits, constraints and tool setup) and runs through the same generate service, so the plugin's hooks
apply to it as to any other. Streaming is Ollama's: one JSON object per line (``application/x-ndjson``), the last
with ``done: true``, the durations in nanoseconds and the token counts. ``format`` (``"json"`` or a schema) is
structured output; ``tools`` are tool calls, returned with ``arguments`` as objects (Ollama's shape).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lemonade_inferos import __version__
from lemonade_inferos.engine.types import GenerationChunk
from lemonade_inferos.host import model_routes, serving, tools
from lemonade_inferos.host.generate import collect
from lemonade_inferos.host.reasoning import CONTENT, REASONING, reply_pieces
from lemonade_inferos.host.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, translated
from lemonade_inferos.http.errors import APIError
from lemonade_inferos.http.json_body import OffLoopJSONRoute, json_object

router = APIRouter(prefix="/api", route_class=OffLoopJSONRoute)
OLLAMA_API_VERSION = "0.6.3"   # the Ollama API level these routes follow


class OllamaOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    num_predict: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = Field(None, ge=0.01, le=10.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repeat_last_n: int | None = Field(None, ge=-1)


class _OllamaRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    stream: bool = True
    keep_alive: int | float | str | None = None
    format: str | dict[str, Any] | None = None
    options: OllamaOptions = Field(default_factory=OllamaOptions)

    def sampling(self) -> dict[str, Any]:
        o = self.options
        return {"model": self.model or None, "temperature": o.temperature, "top_p": o.top_p, "top_k": o.top_k,
                "max_tokens": o.num_predict, "seed": o.seed, "stop": o.stop, "repeat_penalty": o.repeat_penalty,
                "frequency_penalty": o.frequency_penalty, "presence_penalty": o.presence_penalty,
                "repeat_last_n": o.repeat_last_n}

    def response_format(self) -> dict[str, Any] | None:
        if not self.format:
            return None
        if self.format == "json":
            return {"type": "json_object"}
        if isinstance(self.format, dict):
            return {"type": "json_schema", "json_schema": {"schema": self.format}}
        return {"type": self.format}   # anything else is refused by structured.guidance_for


class OllamaChatRequest(_OllamaRequest):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    think: bool | None = None   # false: a reasoning model's template told not to think


class OllamaGenerateRequest(_OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _final(model: str, stats: Any, started: float) -> dict[str, Any]:
    ns = 1_000_000_000
    return {"model": model, "created_at": _now(), "done": True,
            "done_reason": "stop" if stats.finish_reason in ("stop", "tool_calls") else stats.finish_reason,
            "total_duration": int((time.perf_counter() - started) * ns), "load_duration": 0,
            "prompt_eval_count": stats.prompt_n, "prompt_eval_duration": int((stats.prompt_ms or 0) * 1e6),
            "eval_count": stats.predicted_n, "eval_duration": int((stats.predicted_ms or 0) * 1e6)}


def _unloads(body: _OllamaRequest, empty: bool) -> bool:
    """Ollama's unload request: ``keep_alive: 0`` and nothing to run (``"0"``, ``"0s"`` and ``"0m"`` too)."""
    return empty and str(body.keep_alive).strip().rstrip("smh") in ("0", "0.0")


async def _unload(request: Request, body: _OllamaRequest, **reply: Any) -> dict[str, Any]:
    """Unload the model (not loaded: nothing to do) and answer as Ollama does, ``reply`` the route's own fields."""
    host = serving.host_of(request)
    name = host.registry.canonical(body.model)
    if name in host.models.loaded:
        await host.models.unload(name)
    return {"model": body.model, "created_at": _now(), "done": True, "done_reason": "unload", **reply}


def _tagged(name: str) -> str:
    return f"{name}:latest"


def _ollama_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in calls]


def _ndjson(lines: AsyncIterator[dict[str, Any]], run: Any) -> StreamingResponse:
    async def body():
        try:
            async for line in lines:
                yield json.dumps(line, separators=(",", ":")) + "\n"
        except Exception as exc:  # after the status line: Ollama's clients read {"error": ...} as the failure
            yield json.dumps({"error": str(exc)}) + "\n"
        finally:
            run.release()

    return StreamingResponse(body(), media_type="application/x-ndjson")


@router.get("/version")
async def version():
    return {"version": OLLAMA_API_VERSION, "inferos": __version__}


def _details(name: str, info: dict[str, Any]) -> dict[str, Any]:
    recipe = str(info.get("recipe") or "oga-cpu")
    return {"format": "onnx", "family": recipe, "families": [recipe], "parent_model": "", "parameter_size": "",
            "quantization_level": "int4" if "INT4" in name else "fp32"}


def _model_entry(name: str, info: dict[str, Any]) -> dict[str, Any]:
    """An Ollama listing entry: every name carries Ollama's ``:latest`` tag, as Lemonade lists them."""
    return {"name": _tagged(name), "model": _tagged(name), "modified_at": _now(), "size": int(info.get("size") or 0),
            "digest": "sha256:" + "0" * 64, "details": _details(name, info)}


@router.get("/tags")
async def tags(request: Request):
    host = serving.host_of(request)
    return {"models": [_model_entry(name, info) for name, info in host.registry.all().items()
                       if host.registry.is_downloaded(name)]}


@router.get("/ps")
async def ps(request: Request):
    host = serving.host_of(request)
    return {"models": [{**_model_entry(m.name, m.info), "expires_at": None, "size_vram": 0,
                        "context_length": m.ctx_size} for m in host.models.loaded.values()]}


async def _named_model(request: Request, what: str) -> tuple[dict[str, Any], Any, str]:
    """The body of a request naming a registry model (``name``, Ollama's older field, wins over ``model``), the
    host and the model's canonical name; a 400 without one."""
    body = await json_object(request, what)
    wanted = body.get("name") or body.get("model")
    if not isinstance(wanted, str) or not wanted:
        raise APIError(400, "invalid_request", "model is required", param="model")
    host = serving.host_of(request)
    return body, host, host.registry.canonical(wanted)


@router.post("/show")
async def show(request: Request):
    """One registered model in Ollama's shape (``name``, the older field, wins over ``model``)."""
    body, host, name = await _named_model(request, "show")
    info = host.registry.get(name)
    ctx = host.models.loaded[name].ctx_size if name in host.models.loaded else -1
    labels = set(info.get("labels") or [])
    capabilities = ["completion"] + [c for c in ("tools", "vision", "thinking") if c in labels]
    return {"modelfile": f"# Modelfile generated by lemonade-inferos\nFROM {info.get('checkpoint', name)}",
            "parameters": f"num_ctx {ctx}", "template": "", "details": _details(name, info),
            "capabilities": capabilities,
            "model_info": {"general.architecture": "onnxruntime-genai", "general.file_type": 0,
                           "general.parameter_count": 0, "general.quantization_version": 0,
                           "onnxruntime-genai.context_length": ctx}}


@router.post("/pull")
async def pull(request: Request):
    """Ollama's pull of a registry model (built offline here): NDJSON ``status`` lines, ``success`` last; a model
    the registry does not know is a 404 before anything starts."""
    body, host, name = await _named_model(request, "pull")
    host.registry.get(name)
    if body.get("stream", True) is False:
        async for kind, value in model_routes.pull_steps(host, name):
            if kind == "error":
                raise APIError(value[0], "pull_failed", value[1], model=name)
        return {"status": "success"}

    async def lines():
        yield {"status": "pulling manifest"}
        async for kind, value in model_routes.pull_steps(host, name):
            yield {"status": value} if kind == "progress" else {"error": value[1]} if kind == "error" else \
                {"status": "success"}

    async def body_lines():
        async for line in lines():
            yield json.dumps(line) + "\n"

    return StreamingResponse(body_lines(), media_type="application/x-ndjson")


@router.post("/create")
@router.post("/copy")
@router.post("/push")
@router.post("/blobs/{digest}")
async def not_supported(request: Request):
    """What Lemonade answers for Ollama's model authoring and registry routes: not implemented."""
    raise APIError(501, "not_supported", f"{request.url.path} is not supported: models come from the registry "
                   "(lemonade-server pull), not from Modelfiles or an Ollama registry")


@router.post("/chat")
async def chat(body: OllamaChatRequest, request: Request):
    started = time.perf_counter()
    if _unloads(body, not body.messages):
        return await _unload(request, body, message={"role": "assistant", "content": ""})
    openai_body = translated(ChatCompletionRequest,
                             messages=body.messages or [ChatMessage(role="user", content="")], tools=body.tools,
                             response_format=body.response_format(),
                             chat_template_kwargs={"enable_thinking": False} if body.think is False else None,
                             **{k: v for k, v in body.sampling().items() if v is not None})
    prepared = await serving.prepare(request, openai_body, None, [m.as_template_message() for m in openai_body.messages],
                                     response_format=openai_body.response_format, tool_request=openai_body)
    model, tool_setup = prepared.model, prepared.tool_setup
    run = serving.open_run(request, prepared, "api/chat", body.stream)
    if not body.stream:
        text, stats = await collect(run)
        thinking, text = prepared.reasoning.split(text) if prepared.reasoning else (None, text)
        content, calls = tools.parse(text, tool_setup) if tool_setup else (text, [])
        message = {"role": "assistant", "content": content or ""}
        if thinking is not None:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = _ollama_calls(calls)
        return {**_final(model.name, stats, started), "message": message}

    async def lines():
        parts: list[str] = []
        splitter = prepared.reasoning.splitter() if prepared.reasoning else None
        async for item in run:
            done = not isinstance(item, GenerationChunk)
            for kind, piece in reply_pieces(splitter, None if done else item.text):
                parts += [piece] if kind == CONTENT else []
                if kind == REASONING or tool_setup is None:
                    field = {"thinking": piece, "content": ""} if kind == REASONING else {"content": piece}
                    yield {"model": model.name, "created_at": _now(), "done": False,
                           "message": {"role": "assistant", **field}}
            if done:
                message: dict[str, Any] = {"role": "assistant", "content": ""}
                if tool_setup is not None:  # held: a call is only known whole
                    content, calls = tools.parse("".join(parts), tool_setup)
                    message["content"] = content or ""
                    if calls:
                        message["tool_calls"] = _ollama_calls(calls)
                yield {**_final(model.name, item, started), "message": message}

    return _ndjson(lines(), run)


@router.post("/generate")
async def generate(body: OllamaGenerateRequest, request: Request):
    started = time.perf_counter()
    if _unloads(body, not body.prompt):
        return await _unload(request, body, response="")
    openai_body = translated(CompletionRequest, prompt=body.prompt,
                             **{k: v for k, v in body.sampling().items() if v is not None})
    if body.raw:
        prepared = await serving.prepare(request, openai_body, body.prompt, None,
                                         response_format=body.response_format())
    else:  # Ollama renders the prompt with the model's template unless raw
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
            [{"role": "user", "content": body.prompt}]
        prepared = await serving.prepare(request, openai_body, None, messages, response_format=body.response_format())
    model = prepared.model
    run = serving.open_run(request, prepared, "api/generate", body.stream)
    if not body.stream:
        text, stats = await collect(run)
        return {**_final(model.name, stats, started), "response": text}

    async def lines():
        async for item in run:
            if isinstance(item, GenerationChunk):
                if item.text:
                    yield {"model": model.name, "created_at": _now(), "response": item.text, "done": False}
            else:
                yield {**_final(model.name, item, started), "response": ""}

    return _ndjson(lines(), run)

"""Anthropic's Messages API over the same engine, as Lemonade serves it: ``POST /messages`` (plain and streamed,
tools) and ``/messages/count_tokens``, under every API prefix and at ``/api/messages``.

A request becomes the OpenAI chat request the other routes serve (``serving.prepare``: the model, the template,
limits, the tool setup), so the plugin's hooks apply as to any other. What Anthropic's shape has that OpenAI's
has not goes through: ``system`` (a string or text blocks), ``tool_use`` blocks in an assistant turn (its tool
calls), ``tool_result`` blocks in a user turn (tool messages), ``stop_sequences``, ``tool_choice`` (``auto``,
``any``, ``tool``, ``none``). A reply is content blocks (``text``, ``tool_use`` with ``input`` an object) with
Anthropic's ``stop_reason``; streamed, it is Anthropic's event sequence (``message_start``, a
``content_block_start``/``_delta``/``_stop`` per block, ``message_delta``, ``message_stop``). With tools, text is
held until the reply ends (a call is only known whole), as the Ollama route does.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lemonade_inferos.engine.types import GenerationChunk
from lemonade_inferos.host import openai_format as fmt
from lemonade_inferos.host import serving, tools
from lemonade_inferos.host.generate import collect
from lemonade_inferos.host.reasoning import CONTENT, REASONING, ReasoningSplitter, reply_pieces
from lemonade_inferos.host.schemas import ChatCompletionRequest, ChatMessage, translated
from lemonade_inferos.http.errors import APIError
from lemonade_inferos.http.json_body import OffLoopJSONRoute

router = APIRouter(route_class=OffLoopJSONRoute)
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[str] | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None   # {"type": "disabled"}: a reasoning model's template told not to think


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content or [] if block.get("type") == "text")


def chat_messages(system: Any, messages: list[dict[str, Any]]) -> list[ChatMessage]:
    """Anthropic's turns as OpenAI chat messages (tool uses as tool calls, tool results as tool messages)."""
    out = [ChatMessage(role="system", content=_text_of(system))] if system else []
    for turn in messages:
        role, content = turn.get("role"), turn.get("content")
        if role not in ("user", "assistant"):
            raise APIError(400, "invalid_request", f"a message's role is user or assistant, got {role!r}",
                           param="messages")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        if role == "assistant":
            calls = [{"id": b.get("id", ""), "type": "function",
                      "function": {"name": b.get("name", ""), "arguments": json.dumps(b.get("input") or {})}}
                     for b in blocks if b.get("type") == "tool_use"]
            out.append(ChatMessage(role="assistant", content=_text_of(blocks), tool_calls=calls or None))
            continue
        for block in blocks:
            if block.get("type") == "tool_result":
                out.append(ChatMessage(role="tool", tool_call_id=block.get("tool_use_id"),
                                       content=_text_of(block.get("content"))))
        text = _text_of(blocks)
        if text or not any(b.get("type") == "tool_result" for b in blocks):
            out.append(ChatMessage(role="user", content=text))
    return out


def openai_tools(body: MessagesRequest | CountTokensRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """Anthropic's tools and tool_choice in OpenAI's shapes."""
    if not body.tools:
        return None, None
    functions = [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                                   "parameters": t.get("input_schema") or {"type": "object"}}}
                 for t in body.tools]
    choice = getattr(body, "tool_choice", None) or {"type": "auto"}
    kind = choice.get("type")
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if kind == "tool":
        mapped = {"type": "function", "function": {"name": choice.get("name")}}
    if mapped is None:
        raise APIError(400, "invalid_tool_choice", f"tool_choice type is auto, any, tool or none, got {kind!r}",
                       param="tool_choice")
    return functions, mapped


def _chat_request(body: MessagesRequest) -> ChatCompletionRequest:
    functions, choice = openai_tools(body)
    sampling = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                "stop": body.stop_sequences}
    if (body.thinking or {}).get("type") == "disabled":
        sampling["chat_template_kwargs"] = {"enable_thinking": False}
    return translated(ChatCompletionRequest, model=body.model, messages=chat_messages(body.system, body.messages),
                      max_tokens=body.max_tokens, tools=functions, tool_choice=choice,
                      **{k: v for k, v in sampling.items() if v is not None})


def _blocks(text: str | None, calls: list[dict[str, Any]], thinking: str | None = None) -> list[dict[str, Any]]:
    """A reply's content blocks: a reasoning model's thinking first, then its text and tool calls."""
    blocks = [{"type": "thinking", "thinking": thinking, "signature": ""}] if thinking is not None else []
    blocks += [{"type": "text", "text": text}] if text else []
    return blocks + [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                      "input": json.loads(c["function"]["arguments"] or "{}")} for c in calls]


def _usage(stats: Any) -> dict[str, Any]:
    return {"input_tokens": stats.prompt_n - stats.cache_n, "cache_read_input_tokens": stats.cache_n,
            "cache_creation_input_tokens": 0, "output_tokens": stats.predicted_n}


def _stop_reason(stats: Any, calls: list[dict[str, Any]]) -> str:
    return "tool_use" if calls else STOP_REASONS.get(stats.finish_reason or "stop", "end_turn")


@router.post("/messages")
async def messages(body: MessagesRequest, request: Request):
    chat = _chat_request(body)
    prepared = await serving.prepare(request, chat, None, [m.as_template_message() for m in chat.messages],
                                     tool_request=chat)
    model, tool_setup = prepared.model, prepared.tool_setup
    run = serving.open_run(request, prepared, "messages", body.stream)
    message_id = f"msg_{run.request_id}"
    if not body.stream:
        text, stats = await collect(run)
        thinking, text = prepared.reasoning.split(text) if prepared.reasoning else (None, text)
        content, calls = tools.parse(text, tool_setup) if tool_setup else (text, [])
        return {"id": message_id, "type": "message", "role": "assistant", "model": model.name,
                "content": _blocks(content, calls, thinking), "stop_reason": _stop_reason(stats, calls),
                "stop_sequence": None, "usage": _usage(stats)}
    return StreamingResponse(_events(run, message_id, model.name, len(prepared.ids), tool_setup,
                                     prepared.reasoning.splitter() if prepared.reasoning else None),
                             media_type="text/event-stream")


async def _events(run: Any, message_id: str, model: str, prompt_tokens: int, tool_setup: tools.ToolSetup | None,
                  splitter: ReasoningSplitter | None) -> AsyncIterator[str]:
    """Anthropic's stream: thinking and text blocks as they come (text held, with tools, until the reply is
    whole)."""
    try:
        yield fmt.sse({"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}}, "message_start")
        parts: list[str] = []
        blocks = _OpenBlock()
        async for item in run:
            done = not isinstance(item, GenerationChunk)
            for kind, piece in reply_pieces(splitter, None if done else item.text):
                parts += [piece] if kind == CONTENT else []
                if kind == REASONING or tool_setup is None:
                    yield "".join(blocks.delta(kind, piece))
            if not done:
                continue
            yield "".join(blocks.close())
            calls: list[dict[str, Any]] = []
            if tool_setup is not None:
                content, calls = tools.parse("".join(parts), tool_setup)
                for block in _blocks(content, calls):
                    yield _whole_block(blocks.next_index(), block)
            yield _event("message_delta", delta={"stop_reason": _stop_reason(item, calls), "stop_sequence": None},
                         usage=_usage(item))
            yield _event("message_stop")
    finally:
        run.release()


class _OpenBlock:
    """The streamed block now open: a new kind of text (thinking, then answer) closes it and opens the next."""

    def __init__(self) -> None:
        self.index, self.kind = -1, None

    def delta(self, kind: str, text: str) -> list[str]:
        out = []
        if kind != self.kind:
            out = self.close()
            self.index, self.kind = self.index + 1, kind
            start = {"type": "thinking", "thinking": "", "signature": ""} if kind == REASONING else \
                {"type": "text", "text": ""}
            out.append(_event("content_block_start", index=self.index, content_block=start))
        delta = {"type": "thinking_delta", "thinking": text} if kind == REASONING else \
            {"type": "text_delta", "text": text}
        return out + [_event("content_block_delta", index=self.index, delta=delta)]

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        self.kind = None
        return [_event("content_block_stop", index=self.index)]

    def next_index(self) -> int:
        self.index += 1
        return self.index


def _whole_block(index: int, block: dict[str, Any]) -> str:
    """One whole content block as its start, one delta and its stop."""
    if block["type"] == "text":
        start, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
    else:
        start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
    return (_event("content_block_start", index=index, content_block=start)
            + _event("content_block_delta", index=index, delta=delta) + _event("content_block_stop", index=index))


def _event(kind: str, **fields: Any) -> str:
    return fmt.sse({"type": kind, **fields}, kind)


@router.post("/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request):
    """The prompt's tokens as the model would see it (the same conversion and template), nothing generated."""
    functions, choice = openai_tools(body)
    chat = translated(ChatCompletionRequest, model=body.model, messages=chat_messages(body.system, body.messages),
                      tools=functions, tool_choice=choice)
    prepared = await serving.prepare(request, chat, None, [m.as_template_message() for m in chat.messages],
                                     tool_request=chat)
    return {"input_tokens": len(prepared.ids)}

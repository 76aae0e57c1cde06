"""A streamed chat reply's SSE chunks: text as ``delta.content``, tool calls as ``delta.tool_calls``, a reasoning
model's thinking as ``delta.reasoning_content`` (``host/reasoning.py``).

A reply that opens a tool call (``host/tools.py`` decides from its first characters) is held back and sent as one
``delta.tool_calls`` chunk per call as each call closes, the shape the ``openai`` client reassembles; the last
chunk carries ``finish_reason`` (``tool_calls`` when calls were sent) and the usage and timings, or, when the
request asked for ``stream_options.include_usage``, a chunk without choices after it does (OpenAI's shape).
"""

from __future__ import annotations

import time
from typing import Any

from lemonade_inferos.host import openai_format as fmt
from lemonade_inferos.host import tools
from lemonade_inferos.host.reasoning import REASONING, ReasoningFormat


class ChatStream:
    """The chunks of one streamed chat reply, fed its text as it is generated and its stats at the end."""

    def __init__(self, request_id: str, model: str, tool_setup: tools.ToolSetup | None,
                 reasoning: ReasoningFormat | None = None, usage_chunk: bool = False) -> None:
        self.request_id, self.model, self.setup, self.usage_chunk = request_id, model, tool_setup, usage_chunk
        self.splitter = reasoning.splitter() if reasoning else None
        self.created = int(time.time())
        self.first, self.calls_mode, self.buffer, self.sent_calls = True, None, "", 0

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, stats: Any = None) -> dict[str, Any]:
        if self.first:
            delta, self.first = {"role": "assistant", **delta}, False
        return fmt.chat_chunk(self.request_id, self.model, self.created, delta, finish, stats)

    def text(self, text: str) -> list[dict[str, Any]]:
        """The chunks for the next text a reply generated (a reasoning model's thinking as
        ``delta.reasoning_content``)."""
        if self.splitter is None:
            return self._answer(text)
        return self._pieces(self.splitter.feed(text))

    def _pieces(self, pieces: list[tuple[str, str]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for kind, piece in pieces:
            out += [self._chunk({"reasoning_content": piece})] if kind == REASONING else self._answer(piece)
        return out

    def _answer(self, text: str) -> list[dict[str, Any]]:
        if self.setup is None or self.calls_mode is False:
            return [self._chunk({"content": text})] if text or self.first else []
        self.buffer += text
        if self.calls_mode is None:
            self.calls_mode = tools.opens_a_call(self.buffer, self.setup)
            if self.calls_mode is False:
                held, self.buffer = self.buffer, ""
                return [self._chunk({"content": held})]
            return []
        return self._new_calls(final=False)

    def _new_calls(self, final: bool) -> list[dict[str, Any]]:
        text = self.buffer if final else self.buffer[: self.buffer.rfind("</tool_call>") + len("</tool_call>")]
        _, calls = tools.parse(text, self.setup) if text.strip() else (None, [])
        out = [self._chunk({"tool_calls": [{"index": index, **call}]})
               for index, call in enumerate(calls) if index >= self.sent_calls]
        self.sent_calls = max(self.sent_calls, len(calls))
        return out

    def end(self, stats: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._pieces(self.splitter.flush()) if self.splitter else []
        if self.calls_mode:
            out += self._new_calls(final=True)
            if not self.sent_calls and self.buffer:  # nothing parsed as a call: what was held is the answer
                out.append(self._chunk({"content": self.buffer}))
        elif self.buffer or self.first:
            out.append(self._chunk({"content": self.buffer}))
        finish = "tool_calls" if self.sent_calls else stats.finish_reason
        if self.usage_chunk:
            return [*out, self._chunk({}, finish), fmt.usage_chunk(self.request_id, self.model, self.created, stats)]
        return [*out, self._chunk({}, finish, stats)]

"""Tool calling for any model: the tools in the prompt, the call syntax as a grammar, the reply parsed into calls.

Two syntaxes:

    hermes   <tool_call>{"name": ..., "arguments": {...}}</tool_call>    Qwen2/3, Hermes, Mistral-style templates that
                                                                        take ``tools``; and the generic prompt below
    llama3   {"name": ..., "parameters": {...}}                         Llama-3.x templates (``ipython`` role)

A template that renders ``tools`` gets them (and assistant ``tool_calls``, ``tool`` messages) as transformers passes
them. A template without tools (SmolLM2's) gets :data:`GENERIC_PROMPT` as a system message, past calls as their
``<tool_call>`` text and tool results as ``<tool_response>`` user turns. Generation is constrained
(``engine/guidance.py``) by ``tool_choice``: ``required`` or a named function -> one or more calls from the start;
``auto`` -> either text that does not open with ``<`` or calls (decided at the first token); ``none`` -> plain
text. The calls' arguments follow each tool's JSON Schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from lemonade_inferos.engine.guidance import Guidance
from lemonade_inferos.host.structured import compact
from lemonade_inferos.http.errors import APIError

GENERIC_PROMPT = (
    "You can call these tools (their arguments follow the JSON Schema given):\n{tools}\n"
    "To call a tool, reply with only <tool_call>{{\"name\": \"<tool name>\", \"arguments\": {{<arguments>}}}}"
    "</tool_call>, with the arguments filled in from the user's request. The result comes back in a "
    "<tool_response> block: then answer the user with it in plain words, without calling the tool again. If no "
    "tool is needed, answer normally.")
CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolSetup:
    """How one request calls tools: the syntax, whether it must, and the constraint."""

    syntax: str                       # hermes | llama3
    choice: str                       # auto | required | none | the one function's name
    guidance: Guidance | None

    @property
    def calls_only(self) -> bool:
        return self.choice not in ("auto", "none")


def function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's function object (chat's ``{"type": "function", "function": {...}}`` or Responses' flat one)."""
    function = tool.get("function", tool)
    if tool.get("type", "function") != "function" or not isinstance(function, dict) or not function.get("name"):
        raise APIError(400, "invalid_tools", "each tool must be {\"type\": \"function\", \"function\": {\"name\": "
                       "..., \"parameters\": {...}}}", param="tools")
    return function


def syntax_of(template: str | None) -> str:
    if template and "<tool_call>" not in template and ("ipython" in template or '"parameters"' in template):
        return "llama3"
    return "hermes"


def native_tools(template: str | None) -> bool:
    """Whether the chat template renders a ``tools`` variable itself."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def setup(tools: list[dict[str, Any]] | None, tool_choice: Any, template: str | None,
          parallel: bool | None = True) -> ToolSetup | None:
    """The request's tool setup (None without tools).

    Raises:
        APIError: 400 for a malformed tool or a ``tool_choice`` naming no given tool.
    """
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "invalid_tool_choice", "tool_choice needs tools", param="tool_choice")
        return None
    functions = [function_of(tool) for tool in tools]
    names = [f["name"] for f in functions]
    choice = _choice(tool_choice, names)
    syntax = syntax_of(template)
    if choice == "none":
        return ToolSetup(syntax, choice, None)
    allowed = functions if choice in ("auto", "required") else [f for f in functions if f["name"] == choice]
    # one call per reply unless the client asks for parallel calls: a small model otherwise repeats its call
    return ToolSetup(syntax, choice, Guidance("lark_grammar", _grammar(allowed, syntax, choice == "auto",
                                                                       parallel is True)))


def _choice(tool_choice: Any, names: list[str]) -> str:
    if tool_choice is None:
        return "auto"
    if tool_choice in ("auto", "none", "required"):
        return tool_choice
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    name = name or (tool_choice.get("name") if isinstance(tool_choice, dict) else None)
    if name not in names:
        raise APIError(400, "invalid_tool_choice", f"tool_choice names {name!r}, which is not among the tools "
                       f"{names}", param="tool_choice")
    return name


def _grammar(functions: list[dict[str, Any]], syntax: str, free_text: bool, parallel: bool) -> str:
    key = "parameters" if syntax == "llama3" else "arguments"
    variants = [{"type": "object", "additionalProperties": False, "required": ["name", key],
                 "properties": {"name": {"const": f["name"]},
                                key: f.get("parameters") or {"type": "object"}}} for f in functions]
    schema = compact(variants[0] if len(variants) == 1 else {"anyOf": variants})
    call = ('call: "<tool_call>" body "</tool_call>"' if syntax == "hermes" else "call: body")
    calls = 'calls: call ("\\n" call)*' if parallel and syntax == "hermes" else "calls: call"
    lines = ["start: TEXT | calls" if free_text else "start: calls", calls, call, f"body: %json {json.dumps(schema)}"]
    if free_text:
        lines.append("TEXT: /[^<{](.|\\n)*/" if syntax == "llama3" else "TEXT: /[^<](.|\\n)*/")
    return "\n".join(lines) + "\n"


def render_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, native: bool
                    ) -> list[dict[str, Any]]:
    """Messages as the chat template should see them: native templates get ``tool_calls`` with arguments as
    objects (as transformers passes them); others get calls as text and results as user turns, and the tools in
    a system message."""
    out = []
    for message in messages:
        role, calls = message["role"], message.get("tool_calls") or []
        if native:
            entry = {"role": role, "content": message.get("content") or ""}
            if calls:
                entry["tool_calls"] = [_native_call(c) for c in calls]
            if role == "tool":
                entry["tool_call_id"] = message.get("tool_call_id")
                entry["name"] = message.get("name")
            out.append(entry)
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>{message.get('content') or ''}</tool_response>\n"
                                                   "Answer with this result."})
        else:
            text = message.get("content") or ""
            text += "".join(f"<tool_call>{json.dumps(_plain_call(c))}</tool_call>" for c in calls)
            out.append({"role": role, "content": text})
    if tools and not native:
        listing = json.dumps([{k: function_of(t).get(k) for k in ("name", "description", "parameters")}
                              for t in tools])
        prompt = GENERIC_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _arguments(call: dict[str, Any]) -> Any:
    arguments = call.get("function", {}).get("arguments", {})
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return arguments


def _native_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function", {})
    return {"id": call.get("id"), "type": "function",
            "function": {"name": function.get("name"), "arguments": _arguments(call)}}


def _plain_call(call: dict[str, Any]) -> dict[str, Any]:
    return {"name": call.get("function", {}).get("name"), "arguments": _arguments(call)}


def parse(text: str, tool_setup: ToolSetup) -> tuple[str | None, list[dict[str, Any]]]:
    """The reply's text content and its tool calls in OpenAI's shape (``arguments`` a JSON string)."""
    if tool_setup.choice == "none":
        return text, []
    bodies = CALL_RE.findall(text) if tool_setup.syntax == "hermes" else (
        [text.strip()] if text.lstrip().startswith("{") else [])
    calls = []
    for body in bodies:
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            continue
        arguments = data.get("arguments", data.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": data.get("name"), "arguments": json.dumps(arguments)}})
    if not calls:
        return text, []
    rest = CALL_RE.sub("", text).strip() if tool_setup.syntax == "hermes" else ""
    return rest or None, calls


def opens_a_call(text: str, tool_setup: ToolSetup) -> bool | None:
    """Whether a reply beginning with ``text`` is a tool call (None: too early to tell)."""
    stripped = text.lstrip()
    if not stripped:
        return None if tool_setup.choice != "none" else False
    if tool_setup.choice == "none":
        return False
    return stripped[0] == ("<" if tool_setup.syntax == "hermes" else "{") or tool_setup.calls_only

"""Request bodies of the OpenAI and Lemonade endpoints (pydantic), with the fields clients send.

Unknown fields are accepted and ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lemonade_inferos.http.errors import APIError


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None     # an assistant's earlier calls
    tool_call_id: str | None = None                    # a tool result: which call it answers
    name: str | None = None

    def as_template_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role if self.role != "developer" else "system",
                                   "content": self.text()}
        for key in ("tool_calls", "tool_call_id", "name"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: keep the text ones
            return "".join(part.get("text", "") for part in self.content if part.get("type") in ("text", None))
        return self.content or ""


class StreamOptions(_Lenient):
    include_usage: bool = True


class SamplingFields(_Lenient):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    repeat_penalty: float | None = Field(None, ge=0.01, le=10.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repeat_last_n: int | None = Field(None, ge=-1, description="llama.cpp's: the penalties' window, 0 off, -1 all")
    seed: int | None = Field(None, description="negative: a random seed (llama.cpp's -1)")
    n: int | None = Field(None, description="choices to return; only 1 is served (requests are not batched)")
    stop: str | list[str] | None = None
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence, up to max_tokens (llama.cpp)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_prompt: bool = Field(True, description="llama.cpp's: false prefills the prompt from scratch, reusing "
                                                 "no cached KV")
    reasoning_format: Literal["none", "auto", "deepseek", "deepseek-legacy"] | None = Field(
        None, description="llama.cpp's: 'none' keeps a reasoning model's <think> block in the text")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="variables for the chat template, e.g. {\"enable_thinking\": false}")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        values = [value] if isinstance(value, str) else value
        if len(values) > 4:
            raise ValueError("at most 4 stop sequences")
        return values

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(f"n={value} is not served: this server returns exactly one choice (n=1)")
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: dict[str, Any] | None = Field(None, description="text, json_object or json_schema")
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = Field(None, description="auto, none, required or a function")
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(description="text, texts (joined) or token ids (OpenAI's token "
                                                "array: sent to the model as they are, no template)")
    echo: bool = False


class ResponsesMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"] = "user"
    content: str | list[dict[str, Any]] = ""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content


class ResponsesRequest(SamplingFields):
    input: str | list[ResponsesMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    text: dict[str, Any] | None = Field(None, description="{'format': {'type': 'json_schema', 'schema': ...}}")


class ModelNamed(_Lenient):
    """A management request naming a model, as ``model_name`` (Lemonade) or ``model`` (OpenAI style)."""

    model_name: str | None = None
    model: str | None = None

    @property
    def name(self) -> str | None:
        return self.model_name or self.model


class LoadRequest(ModelNamed):
    ctx_size: int | None = Field(None, description="at least 16, or -1 for the model's own context length")
    save_options: bool = False
    pinned: bool | None = None

    @field_validator("ctx_size")
    @classmethod
    def _size_or_auto(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 16:
            raise ValueError("ctx_size is a context length of at least 16 tokens, or -1 for automatic sizing")
        return value


class PullRequest(ModelNamed):
    checkpoint: str | None = None
    checkpoints: dict[str, str] | None = None
    recipe: str | None = None
    stream: bool = False

    @property
    def main_checkpoint(self) -> str | None:
        return self.checkpoint or (self.checkpoints or {}).get("main")


class UnloadRequest(ModelNamed):
    pass


class ParamsRequest(_Strict):
    """Defaults for later requests: validated like a request's own fields, so no stored value can break one."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    repeat_penalty: float | None = Field(None, ge=0.01, le=10.0)
    max_new_tokens: int | None = Field(None, ge=1, description="at least 1: a default of 0 would answer every "
                                                                 "request with nothing")
    telemetry: dict[str, Any] | None = Field(None, description="Lemonade's telemetry block (host/telemetry.py), "
                                                               "merged onto the current one")


class TokenizeRequest(_Lenient):
    content: str
    add_special: bool = Field(False, description="insert the tokenizer's special tokens (BOS, ...)")
    parse_special: bool = Field(True, description="false: special-token strings in the text are plain text")
    with_pieces: bool = Field(False, description="each token as {id, piece} instead of a bare id")


class DetokenizeRequest(_Lenient):
    tokens: list[int]


def translated(shape: type[BaseModel], /, **fields: Any) -> Any:
    """``shape(**fields)`` for the OpenAI request another API's body becomes (Ollama's, Anthropic's): a value the
    OpenAI shape refuses (a fifth stop sequence) is the caller's 400 naming the field, never a server error."""
    try:
        return shape(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise APIError(400, "invalid_request", f"{field}: {first['msg']}", param=field) from exc

"""A reasoning model's thinking, told apart from its answer: ``<think>...</think>`` at the start of a reply (Qwen3,
DeepSeek-R1, SmolLM3, ...), as llama.cpp's ``reasoning_format`` does it for Lemonade's llama.cpp models.

A model reasons when its chat template knows the tags; a template that opens ``<think>`` in the generation prompt
starts the reply inside the thinking. Only a block at the very start of the reply is thinking (whitespace before it
aside); after ``</think>`` everything is the answer, and a reply that does not start with the tag is all answer. The
APIs carry the thinking as OpenAI's ``reasoning_content``, Anthropic's ``thinking`` blocks and Ollama's
``thinking``; a request's ``reasoning_format: "none"`` keeps the tags in the text.
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"
REASONING, CONTENT = "reasoning", "content"


@dataclass(frozen=True)
class ReasoningFormat:
    """How a reply of this request begins: inside the thinking, or where a thinking block may open."""

    starts_inside: bool = False

    @classmethod
    def of(cls, chat_template: str | None, prompt: str, requested: str | None) -> "ReasoningFormat | None":
        """None when the model does not reason (its template never names the tag) or the request asked
        ``reasoning_format: "none"``."""
        if requested == "none" or not chat_template or OPEN not in chat_template:
            return None
        return cls(starts_inside=prompt.rstrip().endswith(OPEN))

    def splitter(self) -> "ReasoningSplitter":
        return ReasoningSplitter(self.starts_inside)

    def split(self, text: str) -> tuple[str | None, str]:
        """A whole reply as (thinking, answer); thinking is None when the reply had none."""
        splitter = self.splitter()
        pieces = splitter.feed(text) + splitter.flush()
        thinking = "".join(t for kind, t in pieces if kind == REASONING)
        answer = "".join(t for kind, t in pieces if kind == CONTENT)
        return (thinking if splitter.thought else None), answer


def reply_pieces(splitter: "ReasoningSplitter | None", text: str | None) -> list[tuple[str, str]]:
    """The next ``(kind, text)`` pieces of a streamed reply; ``text`` None once the reply has ended (what was
    held comes out). Without a splitter every piece is answer."""
    if splitter is None:
        return [(CONTENT, text)] if text else []
    return splitter.flush() if text is None else splitter.feed(text)


class ReasoningSplitter:
    """Fed a streamed reply, hands back ``(kind, text)`` pieces as soon as they are certain: a tag cut across two
    chunks is held until the next chunk says whether it is one."""

    def __init__(self, starts_inside: bool = False) -> None:
        self.state = "inside" if starts_inside else "start"
        self.thought = starts_inside
        self.pending = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.pending += text
        out: list[tuple[str, str]] = []
        while self._step(out):
            pass
        return out

    def flush(self) -> list[tuple[str, str]]:
        """What is still held when the reply ends: a partial tag is text after all."""
        held, self.pending = self.pending, ""
        if not held or self.state == "after":
            return []
        return [(REASONING if self.state == "inside" else CONTENT, held)]

    def _step(self, out: list[tuple[str, str]]) -> bool:
        """One move of the state machine; False once it needs more text."""
        if self.state == "start":
            head = self.pending.lstrip()
            if head.startswith(OPEN):
                self.pending, self.state, self.thought = head[len(OPEN):], "inside", True
                return True
            if not head or OPEN.startswith(head):
                return False
            self.state = "content"
            return True
        if self.state == "inside":
            end = self.pending.find(CLOSE)
            if end >= 0:
                _emit(out, REASONING, self.pending[:end])
                self.pending, self.state = self.pending[end + len(CLOSE):], "after"
                return True
            sure = len(self.pending) - _partial_tail(self.pending, CLOSE)
            _emit(out, REASONING, self.pending[:sure])
            self.pending = self.pending[sure:]
            return False
        if self.state == "after":   # the answer starts at its first non-blank character
            self.pending = self.pending.lstrip()
            if not self.pending:
                return False
            self.state = "content"
            return True
        _emit(out, CONTENT, self.pending)
        self.pending = ""
        return False


def _emit(out: list[tuple[str, str]], kind: str, text: str) -> None:
    if text:
        out.append((kind, text))


def _partial_tail(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0

"""Tokenizer and chat template, both read from the model folder.

``tokenizer.json`` is loaded with Hugging Face ``tokenizers`` and the chat
template is rendered with Jinja2 the way transformers renders it, so no
torch/transformers import is needed at serve time.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from lemonade_inferos.errors import ModelFolderError


CHARS_PER_TOKEN_BOUND = 16   # English text has ~4 characters a token, code ~3; a text over 16 is rare
PREFIX_SLACK_TOKENS = 16     # a prefix may tokenize a few tokens apart from the same text inside the whole


class PromptTooLong(ValueError):
    """A text with at least ``limit`` tokens; ``how`` says how they were counted when not all were (``counted`` is
    the phrase for a message: "at least 50,925 tokens (...)")."""

    def __init__(self, num_tokens: int, limit: int, how: str = "") -> None:
        self.num_tokens, self.limit = num_tokens, limit
        self.counted = f"at least {num_tokens:,} tokens ({how})" if how else f"{num_tokens:,} tokens"
        super().__init__(f"the text has {self.counted}; fewer than {limit:,} fit")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@dataclass
class ChatTokenizer:
    """Encodes text, decodes ids and renders chat messages for one model."""

    tokenizer: Tokenizer
    chat_template: str | None
    special_tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ChatTokenizer":
        folder = Path(folder)
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception on parse errors
            raise ModelFolderError(f"{folder / 'tokenizer.json'} cannot be loaded: {exc}",
                                   file=str(folder / "tokenizer.json")) from exc
        config: dict[str, Any] = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
        template = config.get("chat_template")
        template_path = folder / "chat_template.jinja"
        if template_path.is_file():
            template = template_path.read_text(encoding="utf-8")
        specials = {k: _token_text(v) for k, v in config.items()
                    if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v}
        return cls(tokenizer=tokenizer, chat_template=template, special_tokens=specials)

    def encode(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings in it map to their ids (``parse_special=False``: they are
        plain text); ``add_special``: the tokenizer's own special tokens added (a BOS, where it has one).

        Through ``encode_batch``, which releases the GIL while it runs (``encode`` holds it: an 8 MB text stalls
        every other thread of the process, the server's event loop included, for ~6 s; measured 2026-12-05).
        """
        tokenizer = self.tokenizer if parse_special else self._plain_text_tokenizer
        return tokenizer.encode_batch([text], add_special_tokens=add_special)[0].ids

    @functools.cached_property
    def _plain_text_tokenizer(self) -> Tokenizer:
        """A copy that splits special-token strings as text (a flag of the tokenizer object, so never the shared
        one's)."""
        copy = Tokenizer.from_str(self.tokenizer.to_str())
        copy.encode_special_tokens = True
        return copy

    def encode_within(self, text: str, limit: int, add_special: bool = False) -> list[int]:
        """Token ids of ``text``, which must have fewer than ``limit`` tokens (``add_special``: as :meth:`encode`).

        A text of at least ``limit * max_token_bytes`` characters is refused untokenized. One longer than
        ``limit * CHARS_PER_TOKEN_BOUND`` characters is first measured by its prefix up to a
        whitespace (the pieces before a whitespace tokenize the same as in the whole text), and refused when that
        prefix alone has ``limit`` tokens or more: a 10 MB paste into an 8K context costs ~0.1 s of one core, not
        ~7 s. A text that is long but not over the limit (more than 16 characters a token) is encoded whole.

        Raises:
            PromptTooLong: ``text`` has at least ``limit`` tokens.
        """
        if len(text) >= limit * self.max_token_bytes:  # more text than ``limit`` tokens can cover
            raise PromptTooLong(len(text) // self.max_token_bytes, limit,
                                f"{len(text):,} characters, at most {self.max_token_bytes} to a token")
        cut = limit * CHARS_PER_TOKEN_BOUND
        if len(text) > cut:
            space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
            if space > cut // 2:
                counted = len(self.encode(text[:space]))
                if counted >= limit + PREFIX_SLACK_TOKENS:
                    raise PromptTooLong(counted, limit, f"counted in its first {space:,} characters")
        ids = self.encode(text, add_special)
        if len(ids) >= limit:
            raise PromptTooLong(len(ids), limit)
        return ids

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of text one token stands for, bounded above by its vocabulary string's own length
        (a byte-level token's characters are one byte each; a ``<0xE3>`` byte token or a ``▁`` space is longer
        than the text it covers): a text of ``n`` bytes has at least ``n / max_token_bytes`` tokens."""
        return max(len(token.encode("utf-8")) for token in self.tokenizer.get_vocab(with_added_tokens=True))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None,
                            variables: dict[str, Any] | None = None) -> str:
        """Render OpenAI-style messages into the prompt text the model was trained on; ``variables``: a request's
        ``chat_template_kwargs`` (``enable_thinking``, ...), which never replace the messages, tools or tokens.

        Raises:
            ValueError: the model folder ships no chat template.
        """
        if not self.chat_template:
            raise ValueError("this model has no chat template; use the completions API with a raw prompt")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        template = env.from_string(self.chat_template)
        extra = {"tools": tools} if tools else {}
        fixed = {"messages": messages, "add_generation_prompt": add_generation_prompt, **self.special_tokens, **extra}
        own = {k: v for k, v in (variables or {}).items() if k not in ("messages", "tools", "add_generation_prompt")}
        return template.render({**own, **fixed})

    def token_text(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)


def _token_text(value: Any) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of ids around the newest token (vLLM's
    prefix/read offsets) so cost per token stays constant, and holds back a
    delta that ends inside a multi-byte character (U+FFFD) until it completes.
    """

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._tokenizer.decode(self._ids[self._prefix_offset:])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        delta = full_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

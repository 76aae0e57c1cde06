"""What both commands share: turning our typed errors into a message and a non-zero exit."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape

from lemonade_inferos.errors import InferosError

console = Console(stderr=True)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """InferosError -> its message and exit 1; ValueError (bad arguments) -> its message and exit 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InferosError as exc:
            console.print(f"[red]error:[/red] {escape(exc.message)}", soft_wrap=True)
            sys.exit(1)
        except ValueError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            sys.exit(2)

    return wrapper

"""What every ``thresher`` command shares, the core's and a plugin's alike: errors as one line each.

A plugin adding a command through ``register_commands(app)`` decorates it with :func:`user_errors`
(also in :mod:`thresher.plugin`), so a user's mistake ends in ``error: …`` and an exit code, never a
traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from thresher.core.errors import ThresherError

F = TypeVar("F", bound=Callable[..., Any])
INTERRUPTED = 130

err_console = Console(stderr=True)


def user_errors(command: F) -> F:
    """Turn :class:`ThresherError` into ``error:`` lines and its exit code (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ThresherError as err:
            for line in str(err).splitlines() or [type(err).__name__]:
                err_console.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def warn(line: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)

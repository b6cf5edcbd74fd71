"""Shared rich console and the one-line error format."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one red line and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


def say(text: str) -> None:
    """Print text that holds user input (paths, messages): escaped, so rich markup never eats ``[...]``."""
    console.print(escape(text), highlight=False)

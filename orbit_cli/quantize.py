"""``orbit quantize int4|fp8|nvfp4 SRC OUT``."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orbit_cli.console import console, say
from orbit_core.quant import quantize_checkpoint


def quantize(
    fmt: str = typer.Argument(..., help="int4 (W4A16 group-wise), fp8 (e4m3, 128x128 blocks) or nvfp4."),
    src: str = typer.Argument(..., help="HF checkpoint dir (bf16/fp32)."),
    out: str = typer.Argument(..., help="Output dir (must not exist or be empty)."),
    group_size: int = typer.Option(128, "--group-size", help="int4 group size."),
    ignore: list[str] = typer.Option(None, "--ignore", help="Linear module names to keep in bf16 (default: lm_head, router gates)."),
) -> None:
    """Write a compressed-tensors checkpoint that vLLM, SGLang and Orbit load."""
    progress = Progress(TextColumn(f"[bold blue]quantize {fmt}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[name]}"), console=console)
    task = progress.add_task("tensors", total=None, name="")

    def on_tensor(index: int, total: int, name: str) -> None:
        if not progress.live.is_started:  # shown from the first tensor: a refused argument prints its line alone
            progress.start()
        progress.update(task, completed=index, total=total, name=name)

    try:
        path = quantize_checkpoint(src, out, fmt, group_size, ignore or None, on_tensor=on_tensor)
    finally:
        if progress.live.is_started:
            progress.stop()
    say(f"{fmt} checkpoint written to {path}")

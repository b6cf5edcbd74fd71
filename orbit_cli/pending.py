"""Commands whose issue has not landed: they say so in one line and exit 2."""

from __future__ import annotations

import typer

from orbit_cli.console import not_built

LOW_PRECISION = "the low-precision base issue: quantize, load, preflight, convert"

def quantize(
    fmt: str = typer.Argument(..., help="int4, fp8 or nvfp4."),
    src: str = typer.Argument(..., help="HF checkpoint dir."),
    out: str = typer.Argument(..., help="Output dir."),
) -> None:
    """Write a compressed-tensors checkpoint (int4 W4A16, fp8 block, nvfp4)."""
    raise not_built("quantize", LOW_PRECISION)


def preflight(
    precision: str = typer.Argument(..., help="int4, fp8, nvfp4 or bf16."),
    recipe: str = typer.Option(..., "--recipe", help="Recipe name or YAML path."),
) -> None:
    """Checkpoint and logprob parity gates between trainer and rollout engine."""
    raise not_built("preflight", LOW_PRECISION)

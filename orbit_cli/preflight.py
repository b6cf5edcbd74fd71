"""``orbit preflight int4|fp8|nvfp4|bf16 --recipe R``: exit 0 pass, 1 fail, 2 bad input."""

from __future__ import annotations

import typer
from rich.table import Table

from orbit_cli.console import console, say
from orbit_core.config import load_recipe
from orbit_core.preflight.run import run_preflight


def preflight(
    precision: str = typer.Argument(..., help="int4, fp8, nvfp4 or bf16: what model.path must be."),
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe name or YAML path."),
    overrides: list[str] = typer.Argument(None, help="section.field=value overrides, e.g. preflight.skip_runtime=true."),
) -> None:
    """Checkpoint parity and runtime logprob parity between the rollout engine and the trainer."""
    config = load_recipe(recipe, overrides or [])
    result = run_preflight(config, precision, log=say)
    if result.checkpoint is not None:
        table = Table("check", "result", "detail", title=f"checkpoint parity ({result.checkpoint.fmt})", title_justify="left")
        for c in result.checkpoint.checks:
            table.add_row(c.name, "[green]pass[/]" if c.passed else "[red]FAIL[/]", c.detail)
        console.print(table)
    r = result.runtime
    if r is not None:
        p = config.preflight
        table = Table("metric", "value", "gate", title=f"runtime parity ({r.engine} vs {r.trainer})", title_justify="left")
        table.add_row("tokens compared", str(r.tokens), "")
        table.add_row("max |logprob diff|", f"{r.max_abs_diff:.2e}", f"<= {p.max_logprob_abs_diff}")
        table.add_row("mean |logprob diff|", f"{r.mean_abs_diff:.2e}", f"<= {p.max_logprob_mean_abs_diff}")
        table.add_row(f"top-{p.topk} agreement", f"{r.topk_agreement:.3f}", f">= {p.min_topk_agreement}")
        console.print(table)
        if not r.passed:
            worst = Table("prompt", "pos", "token", "engine", "trainer", "|diff|", title="worst tokens", title_justify="left")
            for row in r.worst:
                worst.add_row(str(row.prompt_index), str(row.position), repr(row.token), f"{row.engine_logprob:.4f}",
                              f"{row.trainer_logprob:.4f}", f"{row.diff:.2e}")
            console.print(worst)
    if not result.passed:
        console.print("[bold red]preflight failed[/]")
        raise typer.Exit(code=1)
    console.print("[bold green]preflight passed[/]")

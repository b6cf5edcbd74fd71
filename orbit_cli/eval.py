"""``orbit eval --recipe NAME | --adapter DIR``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from orbit_cli.console import console, fail, say
from orbit_cli.render import eval_table
from orbit_core.config import load_recipe
from orbit_core.eval import config_from_adapter, run_eval


def eval_cmd(
    recipe: str = typer.Option(None, "--recipe", "-r", help="Evaluate this recipe's base model."),
    adapter: str = typer.Option(None, "--adapter", "-a", help="Checkpoint or run dir: evaluate base + adapter."),
    overrides: list[str] = typer.Argument(None, help="section.field=value overrides, e.g. eval.n_samples=16."),
    json_out: str = typer.Option(None, "--json", help="Write the report here (default: print only)."),
) -> None:
    """Greedy accuracy and unbiased pass@k on the recipe's eval.test_path."""
    if bool(recipe) == bool(adapter):
        raise fail("give exactly one of --recipe (base model) or --adapter (base + adapter)")
    config = config_from_adapter(adapter, overrides or []) if adapter else load_recipe(recipe, overrides or [])
    report = run_eval(config, adapter, log=say)
    console.print(eval_table(f"eval: {adapter or recipe}", report))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report.to_dict(), indent=2))
        say(f"report: {json_out}")

"""``orbit recipes list|show``."""

from __future__ import annotations

import typer
from rich.syntax import Syntax
from rich.table import Table

from orbit_cli.console import console
from orbit_core.config import list_recipes, recipe_path

app = typer.Typer(help="List and show shipped recipes.", no_args_is_help=True)


@app.command("list")
def list_cmd() -> None:
    """List the recipes shipped with Orbit."""
    table = Table("recipe", "description")
    for name in list_recipes():
        first = recipe_path(name).read_text().splitlines()[0].lstrip("# ").strip()
        table.add_row(name, first)
    console.print(table)


@app.command("show")
def show_cmd(name: str = typer.Argument(..., help="Recipe name or path to a YAML file.")) -> None:
    """Print a recipe's YAML."""
    console.print(Syntax(recipe_path(name).read_text(), "yaml"))

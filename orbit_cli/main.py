"""The ``orbit`` command: sub-apps are registered here; errors become one line and exit 2."""

from __future__ import annotations

import sys
import warnings

import typer
from rich.markup import escape

from orbit_cli import convert, recipes
from orbit_cli.preflight import preflight
from orbit_cli.quantize import quantize
from orbit_cli.serve import serve
from orbit_cli.console import err_console
from orbit_cli.eval import eval_cmd
from orbit_cli.train import train
from orbit_core.errors import OrbitError

# megatron-core warns on import that Transformer Engine and Apex are missing: Orbit builds its local
# layer spec, which needs neither, so the lines would only bury the command's own output
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)

app = typer.Typer(
    name="orbit",
    help="Adapter RL post-training on a frozen low-precision base.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
app.add_typer(convert.app, name="convert")
app.command("quantize")(quantize)
app.command("preflight")(preflight)
app.command("train")(train)
app.command("eval")(eval_cmd)
app.command("serve")(serve)
app.add_typer(recipes.app, name="recipes")

_debug = {"on": False}


@app.callback()
def root(debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors.")) -> None:
    _debug["on"] = debug


def main() -> None:
    _debug["on"] = "--debug" in sys.argv
    try:
        app()
    except OrbitError as err:
        if _debug["on"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: checkpoints already written are intact; rerun with train.resume=auto to continue")
        sys.exit(130)


if __name__ == "__main__":
    main()

"""``orbit train --recipe NAME [section.field=value ...]``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax

from orbit_cli.console import console
from orbit_cli.render import eval_table, summary_table
from orbit_core.config import load_recipe, to_yaml
from orbit_core.train import Callbacks, plot_reward_curve, run_training


def progress_stats(m: dict) -> str:
    """The progress line's text; failures come first, since a narrow terminal cuts the end."""
    stats = ""
    if m["reward/errors"] or m["reward/timeouts"]:
        stats += f"[red]reward err {m['reward/errors']} t/o {m['reward/timeouts']}[/]  "
    if m.get("train/skipped_updates"):
        stats += f"[red]skipped {m['train/skipped_updates']}[/]  "
    throughput = f"{m['tokens_per_s']:.0f} tok/s  " if "tokens_per_s" in m else ""
    stats += (f"reward {m['reward/mean']:.3f}  kl {m.get('kl', 0.0):.4f}  entropy {m['entropy']:.3f}  "
              f"len {m['response_len/mean']:.1f}  {throughput}{m['time/step_s']:.2f}s/step  "
              f"bubble {m['time/bubble_fraction']:.0%}  stale<={m['staleness/max']}")
    if m["sync/bytes"]:
        stats += f"  sync {m['sync/bytes'] / 1e6:.2f}MB/{m['sync/ms']:.0f}ms"
    return stats


def train(
    recipe: str = typer.Option(..., "--recipe", "-r", help="Shipped recipe name or path to a YAML recipe."),
    overrides: list[str] = typer.Argument(None, help="section.field=value overrides, e.g. train.lr=1e-4."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config as YAML and exit."),
) -> None:
    """Adapter RL: rollout, reward, GRPO update, eval and checkpoints."""
    config = load_recipe(recipe, overrides or [])
    if dry_run:
        console.print(Syntax(to_yaml(config), "yaml"))
        return
    progress = Progress(
        TextColumn("[bold blue]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"), console=console, transient=False,
    )
    task = progress.add_task("train", total=config.train.steps, stats="")

    def on_start(start: int, total: int) -> None:
        progress.update(task, completed=start, total=total)
        progress.start()

    def on_step(m: dict) -> None:
        progress.update(task, completed=m["step"], stats=progress_stats(m))

    def on_eval(step: int, report) -> None:
        progress.console.print(eval_table(f"eval @ step {step}", report))

    def on_message(text: str) -> None:
        (progress.console if progress.live.is_started else console).print(escape(text), highlight=False)

    try:
        result = run_training(config, Callbacks(on_message=on_message, on_start=on_start, on_step=on_step, on_eval=on_eval))
    finally:
        if progress.live.is_started:  # a run refused before its first step draws nothing
            progress.stop()
    out = Path(result.output_dir)
    if result.already_complete:
        console.print(summary_table(result.eval_before, result.eval_after))
        console.print(escape(f"checkpoint: {result.last_checkpoint}\nreport:     {out / 'eval_report.json'}"))
        return
    plot = plot_reward_curve(out / "metrics.jsonl", out / "reward_curve.png", title=f"{recipe}: {config.rl.advantage_estimator} + {config.peft.method}")
    console.print(summary_table(result.eval_before, result.eval_after))
    console.print(escape(f"checkpoint: {result.last_checkpoint}\nmetrics:    {out / 'metrics.jsonl'}\nplot:       {plot}"))

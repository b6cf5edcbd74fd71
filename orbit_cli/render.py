"""Rich tables for eval reports."""

from __future__ import annotations

from rich.table import Table

from orbit_core.eval.evaluate import EvalReport


def eval_table(title: str, report: EvalReport) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("prompts", justify="right")
    table.add_column("greedy acc", justify="right")
    for key in report.pass_at_k:
        table.add_column(key, justify="right")
    table.add_column("mean len", justify="right")
    table.add_row(str(report.num_prompts), f"{report.greedy_accuracy:.1%}",
                  *(f"{v:.1%}" for v in report.pass_at_k.values()), f"{report.mean_response_tokens:.1f}")
    return table


def summary_table(before: EvalReport | None, after: EvalReport | None) -> Table:
    table = Table(title="eval: base vs base + adapter", title_justify="left")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("adapter", justify="right")
    table.add_column("change", justify="right")
    if after is None:
        return table
    rows = [("greedy accuracy", before.greedy_accuracy if before else None, after.greedy_accuracy)]
    rows += [(k, before.pass_at_k.get(k) if before else None, v) for k, v in after.pass_at_k.items()]
    for name, b, a in rows:
        change = f"{(a - b) * 100:+.1f} pts" if b is not None else ""
        table.add_row(name, f"{b:.1%}" if b is not None else "-", f"{a:.1%}", change)
    return table

"""The reward curve of a run, from its metrics JSONL, as a PNG."""

from __future__ import annotations

from pathlib import Path

from orbit_core.train.metrics import read_metrics


def plot_reward_curve(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/greedy_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in train], [r["reward/mean"] for r in train], label="rollout reward (mean)", color="#1f77b4")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval/greedy_accuracy"] for r in evals], "o-",
                label="eval greedy accuracy", color="#d62728")
    ax.set_xlabel("rollout step")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or "Orbit GRPO + LoRA")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)

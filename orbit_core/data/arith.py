"""The embedded synthetic task: two-operand arithmetic, answers in ``\\boxed{}``."""

from __future__ import annotations

import json
import random
from pathlib import Path

ALPHABET = "0123456789+-=}"


def _problem(a: int, b: int, op: str) -> dict:
    answer = a + b if op == "+" else a - b
    return {"prompt": f"{a}{op}{b}=", "label": str(answer)}


def make_splits(seed: int, n_test: int = 128, n_rl: int = 2048, sft_noise: float = 0.5) -> dict[str, list[dict]]:
    """Disjoint problem sets from one seed: ``sft`` (warm-start), ``train`` (RL prompts), ``test``.

    The warm-start split is noisy on purpose, like imitation data scraped from imperfect
    solutions: a fraction ``sft_noise`` of its targets are off by one. A model imitating it makes
    the same slip about as often as not; a verifier's reward is what tells the two apart.
    """
    pairs = [(a, b, op) for a in range(100) for b in range(100) for op in "+-" if op == "+" or a >= b]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    test, rl, sft = pairs[:n_test], pairs[n_test : n_test + n_rl], pairs[n_test + n_rl :]
    sft_rows = []
    for p in sft:
        row = _problem(*p)
        slip = rng.random() < sft_noise
        sft_rows.append({**row, "target": str(int(row["label"]) + 1) if slip else row["label"]})
    return {"sft": sft_rows, "train": [_problem(*p) for p in rl], "test": [_problem(*p) for p in test]}


def target_text(label: str) -> str:
    return f"\\boxed{{{label}}}"


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")

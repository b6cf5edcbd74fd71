"""Shuffled passes over a prompt set; its position is part of every checkpoint."""

from __future__ import annotations

import random


class PromptSampler:
    def __init__(self, size: int, seed: int, shuffle: bool):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        picked = []
        while len(picked) < count:
            if self.cursor >= self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._make_order()
            picked.append(self._order[self.cursor])
            self.cursor += 1
        return picked

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._make_order()

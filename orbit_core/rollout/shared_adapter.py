"""Adapter syncs through shared memory instead of bytes in the pipe (``rollout.adapter_transport``).

The trainer packs the adapter into one flat buffer: it holds ``max_staleness + 2`` of them and uses
them in turn. The first sync through a buffer sends the buffer itself over the engine's pipe.
torch's multiprocessing pickler turns a CUDA tensor into a CUDA IPC handle, which the engine opens
on any GPU of the node, and a CPU tensor into shared memory. After that a sync sends only the
version, the buffer's index and the layout, a few kilobytes.

The engine copies the buffer into its own memory as soon as it takes the message, and answers
``received``. The trainer writes a buffer again only after the engine has received the sync
that last used it. That wait is bounded by the engine timeout, and with ``max_staleness + 2``
buffers it does not happen in a normal run. So no sync reads a buffer that is being rewritten. The
trainer finishes its writes (a device synchronize) before it sends.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

ALIGN = 16
Layout = tuple[tuple[str, tuple[int, ...], torch.dtype, int], ...]
"""(name, shape, dtype, byte offset) of every tensor in a packed buffer."""


def layout_of(state: dict[str, torch.Tensor]) -> tuple[Layout, int]:
    entries, offset = [], 0
    for name, tensor in state.items():
        entries.append((name, tuple(tensor.shape), tensor.dtype, offset))
        offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN  # aligned, so every view's address suits its dtype
    return tuple(entries), offset


def unpack(buffer: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Views into a flat uint8 buffer, one per tensor of the layout."""
    return {name: buffer[offset: offset + _nbytes(shape, dtype)].view(dtype).view(shape)
            for name, shape, dtype, offset in layout}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def layout_bytes(layout: Layout) -> int:
    if not layout:
        return 0
    _, shape, dtype, offset = layout[-1]
    return offset + _nbytes(shape, dtype)


@torch.no_grad()
def pack(state: dict[str, torch.Tensor], views: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into its views of a buffer (``unpack``), as one multi-tensor copy."""
    torch._foreach_copy_([views[name] for name in state], [tensor.detach() for tensor in state.values()])


class SharedAdapterSender:
    """The trainer's side: buffers on ``device`` (the trainer's GPU, or the CPU)."""

    def __init__(self, device: torch.device, buffers: int):
        self.device = torch.device(device)
        self.buffers: list[torch.Tensor | None] = [None] * buffers
        self.views: list[tuple[Layout, dict[str, torch.Tensor]] | None] = [None] * buffers
        """Each buffer's views, made again only when the layout changes (a sync makes ~400)."""
        self.last_version: list[int | None] = [None] * buffers
        self.count = 0

    def message(self, version: int, state: dict[str, torch.Tensor], wait_received: Callable[[int], None]) -> tuple[tuple, int]:
        """The pipe message of this sync, and the adapter's bytes. ``wait_received(v)`` returns once
        the engine has copied sync ``v`` out of its buffer."""
        index = self.count % len(self.buffers)
        self.count += 1
        if self.last_version[index] is not None:
            wait_received(self.last_version[index])
        layout, nbytes = layout_of(state)
        buffer = self.buffers[index]
        fresh = buffer is None or buffer.numel() < nbytes
        if fresh:
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            if buffer.device.type == "cpu":
                buffer.share_memory_()
            self.buffers[index] = buffer
        if fresh or self.views[index] is None or self.views[index][0] != layout:
            self.views[index] = (layout, unpack(buffer, layout))
        pack(state, self.views[index][1])
        if buffer.is_cuda:
            torch.cuda.synchronize(buffer.device)  # the engine reads it from another process
        self.last_version[index] = version
        return ("push_shared", version, index, buffer if fresh else None, layout, time.time()), nbytes


class SharedAdapterReceiver:
    """The engine's side: the trainer's buffers by index, copied out into ``device`` memory."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.buffers: dict[int, torch.Tensor] = {}
        self.local: tuple[Layout, torch.Tensor, dict[str, torch.Tensor]] | None = None

    def take(self, index: int, buffer: torch.Tensor | None, layout: Layout) -> tuple[dict[str, torch.Tensor], int]:
        """The sync's tensors, copied out of the shared buffer into this side's own buffer. They are
        views into that one buffer, valid until the next ``take`` (the engine takes a sync only
        once the previous one is written to its slot)."""
        if buffer is not None:
            self.buffers[index] = buffer
        shared = self.buffers[index]
        nbytes = layout_bytes(layout)
        if self.local is None or self.local[0] != layout:
            local = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self.local = (layout, local, unpack(local, layout))
        _, local, views = self.local
        local.copy_(shared[:nbytes])
        for device in {shared.device, local.device}:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the copy is done before the trainer may rewrite the buffer
        return views, nbytes


"""The engine process of a non-colocated run: a DecodeLoop fed over pipes, adapters in slots.

Messages from the trainer are handled strictly in order. An adapter push is a barrier: requests
sent after it are admitted only once the new adapter is active, which is what bounds staleness.
  * one slot: the push waits until nothing is running, then rewrites the slot (the engine idles);
  * two slots (double buffering): a thread writes the idle slot while decoding goes on with the
    active one, then the slots flip between two decode steps. The idle slot is only written once
    no running sequence uses it, so no sequence ever reads two versions.
A payload that fails validation is reported and leaves every slot as it was.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

import torch

from orbit_core.config.schema import ModelSection, PeftSection
from orbit_core.errors import OrbitError
from orbit_core.models.moe import set_dequant_chunk
from orbit_core.peft.slots import attach_slots, prepare, write_slot
from orbit_core.rollout.adapter_payload import decode
from orbit_core.rollout.decode_loop import DecodeLoop, Request
from orbit_core.rollout.shared_adapter import SharedAdapterReceiver


@dataclass
class EngineSpec:
    model_path: str
    dtype: str
    device: str
    peft: PeftSection
    num_slots: int
    max_running: int
    seed: int
    threads: int
    adapter: bytes
    """Initial adapter payload, loaded into every slot as ``version``."""
    version: int
    audit: bool = False
    """Record the adapter version of every generated token (``extra["token_versions"]``)."""
    reward: str = ""
    """``rl.reward``: when set, the engine scores each finished sample off the trainer's critical path."""
    reward_timeout_s: float = 10.0
    reward_workers: int = -1
    moe_chunk: int = 16
    """``moe.dequant_chunk_experts``."""
    moe_grouped_gemm: str = "auto"
    """``moe.grouped_gemm``."""
    cuda_graph: bool = True
    """``rollout.cuda_graph``."""
    heartbeat_s: float = 10.0
    """The engine reports its stats at least this often, busy or idle, so that the trainer's silence
    limit (``rollout.engine_timeout_s``) finds a stalled engine, not a generation whose rows all run
    longer than the limit before any of them finishes."""


class _Push:
    def __init__(self, version: int, payload: bytes | dict[str, torch.Tensor] | None, sent_at: float, nbytes: int):
        """``payload``: safetensors bytes (the pipe), or tensors already copied out of a shared buffer."""
        self.version, self.payload, self.sent_at, self.nbytes = version, payload, sent_at, nbytes
        self.thread: threading.Thread | None = None
        self.error: str | None = None
        self.apply_s = 0.0


class EngineServer:
    def __init__(self, spec: EngineSpec, model, tokenizer, send):
        self.spec, self.model, self._post = spec, model, send
        self.last_sent = time.monotonic()
        self.bank = attach_slots(model, spec.num_slots)
        self.shared = SharedAdapterReceiver(next(model.parameters()).device)
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(spec.seed)
        self.loop = DecodeLoop(model, tokenizer, generator, spec.max_running, self.bank, spec.audit, streaming=True,
                               cuda_graph=spec.cuda_graph)
        self.inbox: deque = deque()
        self.wakeup = threading.Condition()
        self.push: _Push | None = None
        self.busy_s = 0.0
        self.reward_s = 0.0
        self.tokens = 0
        self.stopping = False
        self.reward_inputs: dict = {}
        self.scorer = None
        if spec.reward:
            from orbit_core.config.schema import RLSection
            from orbit_core.rl.reward_pool import build_rewards

            self.scorer = build_rewards(RLSection(reward=spec.reward, reward_timeout_s=spec.reward_timeout_s,
                                                  reward_workers=spec.reward_workers))
            self.to_score: queue.Queue = queue.Queue()
            threading.Thread(target=self._score_loop, daemon=True, name="orbit-engine-rewards").start()
        write_slot_all = prepare(model, decode(spec.adapter))
        for slot in range(spec.num_slots):
            write_slot(model, self.bank, slot, write_slot_all, spec.version)
        self.loop.refresh_versions()

    def send(self, message) -> None:
        self.last_sent = time.monotonic()
        self._post(message)

    # -- inbox -----------------------------------------------------------------------------
    def deliver(self, message) -> None:
        with self.wakeup:
            self.inbox.append(message)
            self.wakeup.notify()

    def _take_messages(self) -> None:
        while self.inbox and self.push is None and not self.stopping:
            message = self.inbox[0]
            kind = message[0]
            if kind == "submit":
                _, tag, prompts, params, reward_inputs = message
                if params != self.loop.params and not self.loop.idle:
                    return  # new sampling params wait for the running ones to drain
                requests = [Request(p, s, prompts[p], tag) for p in range(len(prompts)) for s in range(params.n)]
                if reward_inputs is not None:
                    self.reward_inputs[tag] = reward_inputs
                self.loop.submit(requests, params)
            elif kind == "push":
                _, version, payload, sent_at = message
                self.push = _Push(version, payload, sent_at, len(payload))
            elif kind == "push_shared":
                self.push = self._take_shared(*message[1:])
            elif kind == "status":
                self.send(("status", self._stats()))
            elif kind == "shutdown":
                self.stopping = True
            self.inbox.popleft()

    def _stats(self) -> dict:
        return {"busy_s": self.busy_s, "reward_s": self.reward_s, "tokens": self.tokens, "version": self.bank.versions[self.loop.active_slot],
                "running": self.loop.running, "pending": len(self.loop.pending)}

    # -- adapter sync ----------------------------------------------------------------------
    def _take_shared(self, version: int, index: int, buffer, layout, sent_at: float) -> _Push:
        """Copy a shared-buffer sync out at once (here, between decode steps, never during a graph
        capture), and tell the trainer the buffer is free again."""
        start = time.perf_counter()
        try:
            state, nbytes = self.shared.take(index, buffer, layout)
            push = _Push(version, state, sent_at, nbytes)
        except Exception as err:  # an unreadable buffer is a failed sync, not a dead engine
            push = _Push(version, None, sent_at, 0)
            push.error = f"shared adapter buffer {index}: {type(err).__name__}: {err}"
        self.send(("received", version))
        push.apply_s = time.perf_counter() - start
        return push

    def _write(self, push: _Push, slot: int) -> None:
        if push.error is not None:
            return
        start = time.perf_counter()
        try:
            payload = push.payload if isinstance(push.payload, dict) else decode(push.payload)
            write_slot(self.model, self.bank, slot, prepare(self.model, payload), push.version)
        except OrbitError as err:
            push.error = str(err)
        except Exception as err:  # anything else in a payload is still a failed sync, not a dead engine
            push.error = f"{type(err).__name__}: {err}"
        push.apply_s += time.perf_counter() - start

    def _advance_push(self) -> None:
        push = self.push
        if push is None:
            return
        if self.spec.num_slots == 1:
            if not self.loop.idle:
                return  # drain first: the only slot is in use
            self._write(push, 0)
        else:
            idle_slot = 1 - self.loop.active_slot
            if push.thread is None:
                if self.loop.slot_refs[idle_slot] > 0:
                    return  # sequences admitted two versions ago still read that slot
                push.thread = threading.Thread(target=self._write, args=(push, idle_slot), daemon=True)
                push.thread.start()
                return
            if push.thread.is_alive():
                return
            if push.error is None:
                self.loop.active_slot = idle_slot
        self.loop.refresh_versions()
        self.push = None
        if push.error is not None:
            self.send(("sync_failed", push.version, push.error, self._stats()))
        else:
            self.send(("synced", push.version, {"apply_ms": push.apply_s * 1e3, "bytes": push.nbytes,
                                                 "sent_to_active_ms": (time.time() - push.sent_at) * 1e3}, self._stats()))

    # -- results ---------------------------------------------------------------------------
    def _emit(self, items: list) -> None:
        """Send finished samples; those with reward inputs go through the scorer thread first."""
        plain = [item for item in items if item[0] not in self.reward_inputs]
        scored = [item for item in items if item[0] in self.reward_inputs]
        if plain:
            self.send(("done", plain, self._stats()))
        if scored:
            self.to_score.put(scored)

    def _score_loop(self) -> None:
        while True:
            items = [self.to_score.get()]
            while not self.to_score.empty():
                items.append(self.to_score.get_nowait())
            items = [item for batch in items for item in batch]
            start = time.perf_counter()
            inputs = [self.reward_inputs[tag][c.prompt_index] for tag, c in items]
            scores, outcomes = self.scorer.score_each([p for p, _ in inputs], [c.text for _, c in items], [lb for _, lb in inputs])
            for (_, completion), score, outcome in zip(items, scores, outcomes):
                completion.extra["reward"] = score
                if outcome != "ok":
                    completion.extra["reward_error"] = outcome
            self.reward_s += time.perf_counter() - start
            self.send(("done", items, self._stats()))

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            # from this loop, not a timer thread: a decode step that hangs must fall silent
            if time.monotonic() - self.last_sent >= self.spec.heartbeat_s:
                self.send(("status", self._stats()))
            with self.wakeup:
                self._take_messages()
            if self.stopping:  # the trainer is done or gone: drop whatever is in flight
                return
            self._advance_push()
            if not self.loop.idle:
                start = time.perf_counter()
                with torch.no_grad():
                    finished = self.loop.step()
                self.busy_s += time.perf_counter() - start
                if finished:
                    self.tokens += sum(len(completion.token_ids) for _, completion in finished)
                    self._emit([(request.tag, completion) for request, completion in finished])
                continue
            with self.wakeup:
                if not self.inbox and not (self.push and self.push.thread):
                    self.wakeup.wait(timeout=0.05)
                elif self.push is not None and self.push.thread is not None:
                    self.wakeup.wait(timeout=0.001)


def serve(spec: EngineSpec, commands, events) -> None:
    """Entry point of the engine process (multiprocessing spawn target)."""
    outbox: queue.Queue = queue.Queue()

    def sender() -> None:
        while True:
            item = outbox.get()
            if item is None:
                return
            try:
                events.send(item)
            except (BrokenPipeError, OSError):
                return

    send_thread = threading.Thread(target=sender, daemon=True)
    send_thread.start()
    server = None
    try:
        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        from orbit_core.policy.build import build_policy

        if torch.device(spec.device).type == "cuda" and torch.device(spec.device).index is not None:
            torch.cuda.set_device(torch.device(spec.device))  # ops without an explicit device follow it
        policy = build_policy(ModelSection(path=spec.model_path, dtype=spec.dtype, device=spec.device, warmstart_steps=0),
                              spec.peft, log=lambda message: None)
        model = policy.model.eval().requires_grad_(False)
        set_dequant_chunk(model, spec.moe_chunk, spec.moe_grouped_gemm)
        server = EngineServer(spec, model, policy.tokenizer, outbox.put)

        def receive() -> None:
            while True:
                try:
                    message = commands.recv()
                except (EOFError, OSError):  # the trainer is gone: finish nothing, exit
                    server.deliver(("shutdown",))
                    return
                server.deliver(message)

        threading.Thread(target=receive, daemon=True).start()
        outbox.put(("ready", {"pid": os.getpid(), "device": str(policy.device), "threads": torch.get_num_threads()}))
        server.run()
        outbox.put(("closed",))
    except BaseException as err:  # report, then die: the trainer turns this into one error line
        if server is not None and server.scorer is not None:
            server.scorer.close()
        outbox.put(("error", f"{type(err).__name__}: {err}", traceback.format_exc(limit=6)))
        outbox.put(None)
        send_thread.join(timeout=10)
        os._exit(1)
    if server.scorer is not None:
        server.scorer.close()
    outbox.put(None)
    send_thread.join(timeout=10)

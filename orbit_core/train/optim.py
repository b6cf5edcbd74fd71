"""AdamW over adapter parameters, with optional bf16 states and host-memory offload.

The update is Loshchilov & Hutter's decoupled AdamW, identical to ``torch.optim.AdamW`` when states
are fp32 on the parameters' device (tested). bf16 states halve optimizer memory; offloaded
states live in (pinned, on CUDA) host memory and visit the device only inside ``step``.
"""

from __future__ import annotations

from typing import Any

import torch

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class AdapterAdamW:
    def __init__(self, params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, state_dtype: str = "float32", offload: bool = False):
        self.params = list(params)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.param_groups = [{"lr": lr}]
        self.state_dtype = STATE_DTYPES[state_dtype]
        self.offload = offload
        self.steps = 0

        def new_state(p: torch.nn.Parameter) -> torch.Tensor:
            state = torch.zeros(p.shape, dtype=self.state_dtype, device="cpu" if offload else p.device)
            return state.pin_memory() if offload and p.device.type == "cuda" else state

        self.exp_avg = [new_state(p) for p in self.params]
        self.exp_avg_sq = [new_state(p) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        lr = self.param_groups[0]["lr"]
        beta1, beta2 = self.betas
        bias1, bias2 = 1 - beta1**self.steps, 1 - beta2**self.steps
        for p, m_store, v_store in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            grad = p.grad.float()
            m = m_store.to(p.device, torch.float32, non_blocking=True)
            v = v_store.to(p.device, torch.float32, non_blocking=True)
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            p.mul_(1 - lr * self.weight_decay)
            denom = (v.sqrt() / bias2**0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / bias1)
            m_store.copy_(m, non_blocking=True)
            v_store.copy_(v, non_blocking=True)
        if self.offload and self.params and self.params[0].device.type == "cuda":
            torch.cuda.current_stream().synchronize()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.param_groups[0]["lr"],
                "exp_avg": [t.cpu().clone() for t in self.exp_avg], "exp_avg_sq": [t.cpu().clone() for t in self.exp_avg_sq]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.param_groups[0]["lr"] = state["lr"]
        for store, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            store.copy_(saved.to(store.dtype))

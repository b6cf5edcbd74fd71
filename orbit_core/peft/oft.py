"""OFT: a block-diagonal orthogonal rotation of each target linear's input (Qiu et al. 2023).

Each block ``R = (I + Q)^{-1} (I - Q)`` is the Cayley transform of a skew-symmetric ``Q``, so it
is orthogonal by construction; ``Q = 0`` at init gives ``R = I`` (logits unchanged).
``y = W (R_blockdiag x)``, i.e. the merged weight is ``W R_blockdiag``.
COFT keeps each ``Q`` within ``eps`` of zero (Frobenius norm) by projection after every step;
``block_share`` trains one rotation used by every block.
"""

from __future__ import annotations

import torch
from torch import nn

from orbit_core.errors import OrbitError
from orbit_core.peft.base import AdapterLayer, adapter_modules, base_device, base_weight, replace_module, target_linears


def cayley_blocks(param: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``R = (I + Q)^{-1} (I - Q)`` with ``Q`` the skew part of each ``[b, b]`` block of ``param``."""
    q = 0.5 * (param - param.transpose(1, 2))
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    # I + Q is invertible for any skew Q (eigenvalues 1 + i*lambda), so the solve needs no error
    # check, and without one it never waits on the GPU: a CUDA graph can capture it
    blocks = torch.linalg.solve_ex(eye + q, eye - q, check_errors=False)[0]
    return blocks.expand(num_blocks, -1, -1) if blocks.shape[0] != num_blocks else blocks


class OFTLinear(AdapterLayer):
    def __init__(self, base: nn.Linear, block_size: int, coft: bool, eps: float, block_share: bool, name: str = "linear"):
        super().__init__(base)
        if block_size <= 0 or base.in_features % block_size:
            raise OrbitError(
                f"peft.oft_block_size={block_size} does not divide {name} (in_features={base.in_features}, out_features={base.out_features})",
                "pick a block size that divides every target layer's input dimension",
            )
        self.block_size, self.coft, self.eps, self.block_share = block_size, coft, eps, block_share
        self.num_blocks = base.in_features // block_size
        stored = 1 if block_share else self.num_blocks
        # Unconstrained square parameters; their skew part is Q. fp32 so small updates survive.
        self.oft_skew = nn.Parameter(torch.zeros(stored, block_size, block_size, device=base_device(base), dtype=torch.float32))
        self._rotation_cache: tuple | None = None  # ((skew version, address), blocks), see rotation()

    def skew(self) -> torch.Tensor:
        return 0.5 * (self.oft_skew - self.oft_skew.transpose(1, 2))

    def rotation(self) -> torch.Tensor:
        """Orthogonal blocks ``[num_blocks, b, b]`` (one block expanded when shared).

        Without autograd (an engine decoding, scoring) the solve runs once per adapter version: the
        result is kept until the skew changes in place (an optimizer step, a loaded adapter), which
        bumps its version counter. A new version is written into the kept tensor, so its address
        stays put. A CUDA graph capture reads the kept tensor and never solves: the batched solve
        cannot be captured at every size, and the engine's warm-up steps, run eagerly just before
        each capture, have solved for the current version (``GraphedDecode`` recaptures when a live
        OFT adapter's version moves)."""
        capturing = self.oft_skew.is_cuda and torch.cuda.is_current_stream_capturing()
        if torch.is_grad_enabled() and not capturing:
            return cayley_blocks(self.oft_skew, self.num_blocks)
        key = self.oft_skew._version, self.oft_skew.data_ptr()
        cached = self._rotation_cache
        if capturing:
            if cached is None or cached[0] != key:
                raise RuntimeError("an OFT rotation was not solved before CUDA graph capture")
            return cached[1]
        if cached is None or cached[0] != key:
            blocks = cayley_blocks(self.oft_skew, self.num_blocks)
            if cached is not None and cached[1].shape == blocks.shape:
                blocks = cached[1].copy_(blocks)
            self._rotation_cache = cached = (key, blocks)
        return cached[1]

    def live_version(self) -> int | None:
        """The skew's version when the forward reads the live adapter (no slot bank), else None."""
        return self.oft_skew._version if self.enabled and self.slot_bank is None else None

    def rotate(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        shaped = x.to(blocks.dtype).reshape(*x.shape[:-1], self.num_blocks, self.block_size)
        # row-vector convention: x_n <- R_n x_n for every block n
        return torch.einsum("...nc,nbc->...nb", shaped, blocks).reshape(x.shape).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        if self.slot_bank is not None:
            return self.base(self.slot_bank.route(lambda s: self.rotate(x, self.slot_rotation[s])))
        if self.fake_quant is not None:
            return self.fake_quant_forward(x)
        return self.base(self.rotate(x, self.rotation()))

    def merged_weight(self) -> torch.Tensor:
        rotation = torch.block_diag(*self.rotation())
        return base_weight(self.base) @ rotation

    @torch.no_grad()
    def project_(self) -> None:
        """COFT: scale each skew block back onto the ball ``||Q||_F <= eps``."""
        q = self.skew()
        norms = q.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None]
        scale = torch.clamp(self.eps / norms, max=1.0)
        self.oft_skew.copy_(q * scale)


def apply_oft(model: nn.Module, block_size: int, coft: bool, eps: float, block_share: bool, target_modules: list[str]) -> list[str]:
    """Freeze every base parameter and wrap the targeted linears. Errors before changing anything."""
    model.requires_grad_(False)
    targets = target_linears(model, target_modules)
    wrapped = {name: OFTLinear(model.get_submodule(name), block_size, coft, eps, block_share, name) for name in targets}
    for name, module in wrapped.items():
        replace_module(model, name, module)
    return targets


def project_oft_(model: nn.Module) -> None:
    for _, module in adapter_modules(model):
        if isinstance(module, OFTLinear) and module.coft:
            module.project_()

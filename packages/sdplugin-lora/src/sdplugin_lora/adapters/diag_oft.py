"""LyCORIS ``diag-oft``: kohya OFT's rotation with LyCORIS' constraint and an optional ``rescale``,
plus LyCORIS' Cayley transform that BOFT shares."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .adapter import Adapter
from .maths import Tensors, factorization
from .oft import OftVariant
from .variant import Variant


def lycoris_cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """LyCORIS' ``get_r`` for diag-oft and BOFT: ``Q = B - Bᵀ`` over the last two axes; when
    ``constraint > 0`` and ``‖Q‖ + 1e-8`` (all blocks together) exceeds it, ``Q`` is scaled to
    ``constraint / (‖Q‖ + 1e-8)``; then the Cayley transform ``R = (I + Q)(I - Q)⁻¹`` (orthogonal).

    kohya's clamp (:meth:`OftVariant.skew`) differs only by its ``+ 1e-8`` placement. The comparison
    runs on the device (``torch.where``), so the forward needs no host sync."""
    q = blocks.float() - blocks.float().transpose(-1, -2)
    if constraint > 0:
        norm = q.norm() + 1e-8
        q = q * torch.where(norm > constraint, constraint / norm, torch.ones_like(norm))
    eye = torch.eye(int(q.shape[-1]), device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


class DiagOftVariant(OftVariant):
    """LyCORIS ``diag-oft`` (``DiagOFTModule``): kohya's block-diagonal Cayley rotation of the output
    channels, ``W' = Rᵀ W`` per block, written by LyCORIS as ``lora_unet_...`` modules with
    ``oft_blocks`` ``[blocks, size, size]``, ``alpha`` = the constraint (``‖Q‖`` clamped to
    ``alpha · out``; 0 = none) and, with ``rescaled``, ``rescale`` ``[out, 1, ...]``:
    ``W' = rescale · Rᵀ W``.

    Its tensors are kohya OFT's plus ``rescale``: a module without ``rescale`` is told apart by its
    name only (``lora_`` prefix; kohya writes ``oft_unet_``), see :func:`variant_of`. The "rank" is the
    block size (LyCORIS' ``network_dim`` when it divides the width)."""

    algo = "diag_oft"
    keys = ("oft_blocks", "rescale")

    @classmethod
    def matches(cls, t: Tensors) -> bool:
        return "oft_blocks" in t and t["oft_blocks"].dim() == 3 and "rescale" in t

    @classmethod
    def complete(cls, t: Tensors) -> bool:
        return "oft_blocks" in t  # ``rescale`` is optional (it only marks the variant without a name)

    @classmethod
    def rank(cls, t: Tensors) -> int:
        return int(t["oft_blocks"].shape[-1])

    @classmethod
    def rotation_blocks(cls, t: Tensors, out_dim: int) -> torch.Tensor:
        """The ``[..., size, size]`` orthogonal blocks ``R`` in fp32 (LyCORIS' ``get_r``)."""
        return lycoris_cayley(t["oft_blocks"], cls.constraint(t, out_dim))

    @classmethod
    def rotate(cls, t: Tensors, w: torch.Tensor) -> torch.Tensor:
        """``Rᵀ W`` for ``W`` ``[out, fan-in]`` (the rows rotated, block by block)."""
        r = cls.rotation_blocks(t, int(w.shape[0])).to(w.device)
        count, size = int(r.shape[0]), int(r.shape[1])
        return (r.transpose(1, 2) @ w.reshape(count, size, -1)).reshape(w.shape)

    @classmethod
    def weight(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError(f"{cls.algo} rotates the base weight: its change needs that weight")
        w = base.detach().float().reshape(shape[0], -1)
        rotated = cls.rotate(t, w)
        if "rescale" in t:
            rotated = t["rescale"].float().reshape(-1, 1).to(w.device) * rotated
        return (rotated - w).reshape(shape)


class DiagOftAdapter(Adapter):
    """LyCORIS diag-oft on a Linear/Conv2d (``DiagOFTModule``): ``rank`` is LyCORIS' ``lora_dim``, split
    with the width by :func:`factorization` into ``(block size, block count)`` (the smaller is the block
    size); ``constraint`` (LyCORIS' network_arg, default 0 = none; the file's ``alpha``) and ``rescaled``
    (a per-output ``rescale`` vector, starting at 1). ``oft_blocks`` start at zero, so ``R = I``.
    LyCORIS ignores ``network_alpha`` for it.

    The change is ``rescale · Rᵀ W - W`` and the bias is left alone (LyCORIS adds the change through
    ``op(x, ΔW, bias=None)``). A multiplier ``m`` gives ``m · ΔW``: LyCORIS interpolates the blocks
    (``m·R + (1-m)·I``), which is the same change without ``rescale``; with ``rescale`` LyCORIS keeps
    ``(rescale - 1)·W`` at every ``m`` (see the package README)."""

    variant: ClassVar[type[Variant]] = DiagOftVariant
    algo = "diag_oft"
    rescale: nn.Parameter | None

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        constraint: float = 0.0,
        rescaled: bool = False,
        multiplier: float = 1.0,
        module_dropout: float | None = None,
        blocks_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(name, base, rank, 1.0, multiplier=multiplier, module_dropout=module_dropout)
        self._scale = 1.0
        self.alpha.fill_(float(constraint))
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        shape = blocks_shape or self.blocks_shape(int(weight.shape[0]), rank)
        self.oft_blocks = nn.Parameter(torch.zeros(*shape))
        rest = [1] * (weight.dim() - 1)
        self.rescale = nn.Parameter(torch.ones(int(weight.shape[0]), *rest)) if rescaled else None

    @staticmethod
    def blocks_shape(out_dim: int, rank: int) -> tuple[int, ...]:
        """``oft_blocks``' shape for a layer ``out_dim`` wide at LyCORIS ``lora_dim`` ``rank``."""
        size, count = factorization(out_dim, rank)
        return (count, size, size)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scale = 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"oft_blocks": self.oft_blocks, "alpha": self.alpha}
        if self.rescale is not None:
            t["rescale"] = self.rescale
        return t

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0) -> Adapter:
        blocks = t["oft_blocks"]
        adapter = cls(
            name,
            base,
            int(blocks.shape[-1]),
            constraint=float(t["alpha"]) if "alpha" in t else 0.0,
            rescaled="rescale" in t,
            multiplier=multiplier,
            blocks_shape=tuple(int(d) for d in blocks.shape),
        )
        with torch.no_grad():
            adapter.oft_blocks.copy_(blocks.detach().float())
            if adapter.rescale is not None:
                adapter.rescale.copy_(t["rescale"].detach().float().reshape(adapter.rescale.shape))
        return adapter

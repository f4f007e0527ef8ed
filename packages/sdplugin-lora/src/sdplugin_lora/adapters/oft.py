"""kohya OFT (``networks.oft``, ``oft_flux``): a block-diagonal Cayley rotation of the output
channels, ``W' = Rᵀ W``, its variant and its adapter."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .adapter import Adapter
from .maths import Tensors
from .variant import Variant


class OftVariant(Variant):
    """kohya ``networks.oft``: the output channels are rotated by a block-diagonal orthogonal
    ``R`` (Cayley transform of skew-symmetric blocks), ``W' = Rᵀ W``.

    ``oft_blocks`` is ``[blocks, size, size]`` (``size = out / blocks``); ``alpha`` is the
    constraint: the norm of all ``Q = B - Bᵀ`` together is clamped to ``alpha · out`` (0: none).
    The file's "rank" is the number of blocks and the update is not scaled by alpha/rank.

    kohya ``networks.oft_flux`` stores a ``ParameterList``: ``oft_blocks.0``, ``oft_blocks.1``...,
    one block set per row part of a fused Linear (BFL's ``qkv`` is q, k, v; ``linear1`` is q, k, v and
    the MLP input; other Linears have the one part ``oft_blocks.0``), each part ``[blocks, size_i,
    size_i]`` with its own clamp ``alpha · rows_i``: ``R`` is the block-diagonal of the parts' rotations.
    """

    algo = "oft"
    markers = ("oft_blocks",)
    keys: ClassVar[tuple[str, ...]] = ("oft_blocks",)
    multiplicative = True

    @classmethod
    def matches(cls, t: Tensors) -> bool:
        return any(key == "oft_blocks" or _oft_part_index(key) is not None for key in t)

    @staticmethod
    def parts(t: Tensors) -> list[torch.Tensor]:
        """The block sets in row order: ``[oft_blocks]``, or ``oft_blocks.0, .1...`` (kohya ``oft_flux``)."""
        if "oft_blocks" in t:
            return [t["oft_blocks"]]
        indexed = sorted((index, key) for key in t if (index := _oft_part_index(key)) is not None)
        return [t[key] for _, key in indexed]

    @classmethod
    def rank(cls, t: Tensors) -> int:
        return int(cls.parts(t)[0].shape[0])

    @classmethod
    def full_matrix(cls, t: Tensors) -> bool:
        return False

    @classmethod
    def scale(cls, t: Tensors) -> float:
        return 1.0

    @classmethod
    def constraint(cls, t: Tensors, out_dim: int) -> float:
        alpha = t.get("alpha")
        return float(alpha) * out_dim if alpha is not None else 0.0

    @classmethod
    def skew(cls, t: Tensors, out_dim: int, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """The skew-symmetric blocks ``Q = B - Bᵀ`` in fp32, their norm clamped to the constraint
        (``blocks``: one part of a multi-part module, ``out_dim`` its rows; default ``oft_blocks``)."""
        b = (t["oft_blocks"] if blocks is None else blocks).float()
        q = b - b.transpose(1, 2)
        limit = cls.constraint(t, out_dim)
        if limit > 0:
            norm = q.norm()
            q = q * ((torch.clamp(norm, max=limit) + 1e-8) / (norm + 1e-8))
        return q

    @classmethod
    def rotation(cls, t: Tensors, out_dim: int) -> torch.Tensor:
        """The ``[out, out]`` block-diagonal ``R`` in fp32 (each part clamped to ``alpha · its rows``)."""
        rotations: list[torch.Tensor] = []
        for blocks in cls.parts(t):
            count, size = int(blocks.shape[0]), int(blocks.shape[1])
            q = cls.skew(t, count * size, blocks)
            eye = torch.eye(size, device=q.device).expand(count, size, size)
            rotations.extend(((eye + q) @ torch.linalg.inv(eye - q)).unbind(0))
        r = torch.block_diag(*rotations)
        if r.shape[0] != out_dim:
            raise ValueError(f"OFT blocks cover {r.shape[0]} output rows, the layer has {out_dim}")
        return r

    @classmethod
    def weight(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError("OFT rotates the base weight: its change needs that weight")
        w = base.detach().float().reshape(shape[0], -1)
        rotated = cls.rotation(t, int(shape[0])).to(w.device).T @ w
        return (rotated - w).reshape(shape)


def _oft_part_index(key: str) -> int | None:
    """``oft_blocks.<i>`` -> ``i`` (kohya ``oft_flux``'s ParameterList keys), else ``None``."""
    head, _, index = key.partition(".")
    return int(index) if head == "oft_blocks" and index.isdigit() else None


class OftAdapter(Adapter):
    """kohya OFT on a Linear/Conv2d: ``rank`` is the number of blocks (it must divide the output
    width) and ``alpha`` the constraint (kohya ``network_alpha``); ``oft_blocks`` start at zero,
    so ``R = I``. The update is the weight change ``Rᵀ W - W``; the bias is not rotated (kohya's training
    forward ``F.linear(x, RᵀW, bias)`` and kohya's and ComfyUI's merges leave it too)."""

    variant = OftVariant
    algo = "oft"

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        multiplier: float = 1.0,
        module_dropout: float | None = None,
    ) -> None:
        out_dim = int(base.weight.shape[0])  # type: ignore[union-attr,index]
        if rank < 1 or out_dim % rank:
            raise ValueError(f"{name}: OFT needs a block count dividing the output width {out_dim} (got {rank})")
        super().__init__(
            name, base, rank, alpha if alpha is not None else 1e-3, multiplier=multiplier, module_dropout=module_dropout
        )
        self._scale = 1.0
        size = out_dim // rank
        self.oft_blocks = nn.Parameter(torch.zeros(rank, size, size))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scale = 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"oft_blocks": self.oft_blocks, "alpha": self.alpha}

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0) -> Adapter:
        parts = OftVariant.parts(t)
        if len(parts) != 1:  # a fused BFL Linear's block sets: the file reader splits them per diffusers module
            raise ValueError(f"{name}: {len(parts)} OFT block sets (kohya oft_flux parts) for one layer")
        blocks = parts[0]
        out_dim = int(base.weight.shape[0])  # type: ignore[union-attr,index]
        if int(blocks.shape[0]) * int(blocks.shape[1]) != out_dim:
            raise ValueError(f"{name}: OFT blocks {tuple(blocks.shape)} do not cover the {out_dim} output rows")
        alpha = float(t["alpha"]) if "alpha" in t else 0.0
        adapter = cls(name, base, int(blocks.shape[0]), alpha, multiplier=multiplier)
        with torch.no_grad():
            adapter.oft_blocks.copy_(blocks.detach().float())
        if alpha == 0.0:
            adapter.alpha.zero_()
        return adapter

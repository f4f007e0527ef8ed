"""LyCORIS ``boft`` (butterfly OFT): levels of block rotations over permuted rows, composed into one
orthogonal matrix; its split of a width into block size and a power-of-two count."""

from __future__ import annotations

import torch

from .diag_oft import DiagOftAdapter, DiagOftVariant
from .maths import Tensors


def butterfly_factorization(dimension: int, factor: int = -1) -> tuple[int, int] | None:
    """LyCORIS' BOFT split (``power2factorization``): ``(b, n)`` with ``b·n = dimension``, ``b`` the largest
    even block size up to ``factor`` (-1: any) and ``n`` a power of two (the butterfly needs ``log2 n``
    levels of pairwise mixing); ``None`` when no such split exists (LyCORIS refuses the layer then)."""
    limit = dimension if factor == -1 else min(factor, dimension)
    found = None
    for size in range(2, limit + 1, 2):
        count = dimension // size
        if dimension % size == 0 and count & (count - 1) == 0:
            found = size
    return (found, dimension // found) if found else None


class BoftVariant(DiagOftVariant):
    """LyCORIS ``boft`` (``ButterflyOFTModule``): ``m`` butterfly levels, each a block-diagonal Cayley
    rotation (blocks of ``b`` rows) applied after a fixed permutation of the output rows, composed
    into one orthogonal matrix; ``oft_blocks`` is ``[m, n, b, b]`` (``n·b = out``, ``n`` a power of
    two, ``m = log2 n + 1``), ``alpha`` the constraint on all levels' ``Q`` together (times ``out``),
    ``rescale`` as diag-oft's.

    Level ``i`` groups rows in pairs of runs of ``k = 2^i · b/2`` rows: row ``(c, g, j)`` (``c``
    chunk, ``g`` in {0, 1}, ``j < k``) moves to position ``(c, j, g)``, the rows are multiplied by
    ``R_i`` (``W ← R_i W`` per block of ``b``, *not* transposed, unlike diag-oft), and moved back."""

    algo = "boft"

    @classmethod
    def matches(cls, t: Tensors) -> bool:
        return "oft_blocks" in t and t["oft_blocks"].dim() == 4

    @classmethod
    def rotate(cls, t: Tensors, w: torch.Tensor) -> torch.Tensor:
        r = cls.rotation_blocks(t, int(w.shape[0])).to(w.device)
        out, size = int(w.shape[0]), int(r.shape[-1])
        for level, blocks in enumerate(r.unbind(0)):
            k = 2**level * (size // 2)
            order = torch.arange(out, device=w.device).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
            mixed = (blocks @ w[order].reshape(out // size, size, -1)).reshape(w.shape)
            w = torch.empty_like(mixed).index_copy_(0, order, mixed)
        return w


class BoftAdapter(DiagOftAdapter):
    """LyCORIS BOFT on a Linear/Conv2d (``ButterflyOFTModule``): ``rank`` is LyCORIS' ``lora_dim``, the
    largest even block size ``b`` up to it with ``out / b`` a power of two ``n``
    (:func:`butterfly_factorization`; a ``ValueError`` when there is none, as LyCORIS raises);
    ``oft_blocks`` ``[log2 n + 1, n, b, b]`` at zero; ``constraint``, ``rescaled``, bias and
    multiplier as :class:`DiagOftAdapter` (LyCORIS interpolates each level's rotation by ``m``, so
    only ``m`` = 1 (or 0) is LyCORIS' exact change; see the package README)."""

    variant = BoftVariant
    algo = "boft"

    @staticmethod
    def blocks_shape(out_dim: int, rank: int) -> tuple[int, ...]:
        split = butterfly_factorization(out_dim, rank)
        if split is None:
            raise ValueError(
                f"BOFT cannot split width {out_dim} at block size <= {rank}: it needs an even block size b <= "
                f"{rank} with {out_dim} / b a power of two"
            )
        size, count = split
        return (int(count - 1).bit_count() + 1, count, size, size)

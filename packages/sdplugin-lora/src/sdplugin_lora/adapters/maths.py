"""The maths the variants share: the file-tensor mapping type, LyCORIS' Tucker product and its split
of a dimension into two factors (LoKr's Kronecker factors, diag-oft's blocks)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

Tensors = Mapping[str, torch.Tensor]


def tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker product: ``ΔW[p, q, k, l] = Σ core[i, j, k, l] · wa[i, p] · wb[j, q]``.

    ``core`` is ``[r, r, k, k]``, ``wa`` ``[r, out]`` and ``wb`` ``[r, in]`` (2-D views).
    """
    return torch.einsum("i j k l, i p, j q -> p q k l", core, wa.flatten(1), wb.flatten(1))


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of ``dimension`` into ``m <= n`` with ``m·n = dimension`` (most square when -1)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate != 0:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > limit:
            break
        m, n = candidate, other
    return (m, n) if m <= n else (n, m)


def _f32(t: Tensors) -> dict[str, torch.Tensor]:
    return {key: value.float() for key, value in t.items()}

"""LyCORIS LoKr: ``ΔW = kron(w1, w2)``, each factor full or low-rank, its variant and its adapter."""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapter import Adapter
from .maths import Tensors, _f32, factorization, tucker
from .variant import Variant


class LokrVariant(Variant):
    """LyCORIS LoKr: ``ΔW = kron(w1, w2)``; each factor full or ``a @ b``, w2 optionally Tucker.

    Both factors full ("full dimension" LoKr) means scale 1, whatever alpha says.
    """

    algo = "lokr"
    markers = ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a")
    keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    tucker_keys = ("lokr_t2",)

    @classmethod
    def complete(cls, t: Tensors) -> bool:
        w1 = "lokr_w1" in t or ("lokr_w1_a" in t and "lokr_w1_b" in t)
        w2 = "lokr_w2" in t or ("lokr_w2_a" in t and "lokr_w2_b" in t)
        return w1 and w2

    @classmethod
    def rank(cls, t: Tensors) -> int:
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in t:
                return int(t[key].shape[0])
        return 0

    @classmethod
    def weight(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        f = _f32(t)
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:  # w2_a [r, out_n], w2_b [r, in_n], t2 [r, r, k, k]
            w2 = tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        return torch.kron(w1.contiguous(), w2.contiguous()).reshape(shape)

    @classmethod
    def shape(cls, t: Tensors) -> tuple[int, ...] | None:
        if "lokr_w1" in t:
            out_m, in_m = (int(d) for d in t["lokr_w1"].shape[:2])
        else:
            out_m, in_m = int(t["lokr_w1_a"].shape[0]), int(t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
            return (out_m * int(w2.shape[0]), in_m * int(w2.shape[1]), *(int(k) for k in w2.shape[2:]))
        if "lokr_t2" in t:  # w2_a [r, out_n], w2_b [r, in_n]
            kernel = (int(k) for k in t["lokr_t2"].shape[2:])
            return (out_m * int(t["lokr_w2_a"].shape[1]), in_m * int(t["lokr_w2_b"].shape[1]), *kernel)
        return out_m * int(t["lokr_w2_a"].shape[0]), in_m * int(t["lokr_w2_b"].shape[1])


class LokrAdapter(Adapter):
    """LyCORIS LoKr: ``ΔW = kron(w1, w2)``, ``w1`` a small full matrix.

    With a rank of at least half the larger ``w2`` side ``w2`` is stored full (``lokr_w2``), else
    ``w2 = w2_a @ w2_b`` (Tucker for kxk convs: ``lokr_t2``). With ``decompose_both`` (LyCORIS'
    option) ``w1`` is low-rank too, ``w1 = w1_a @ w1_b``, when the rank is below half the larger
    ``w1`` side (LyCORIS' condition, mirrored from ``w2``'s); both factors full means scale 1 (LyCORIS
    sets alpha = rank then), any low-rank factor alpha/rank.
    """

    variant = LokrVariant
    algo = "lokr"

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        factor: int = -1,
        multiplier: float = 1.0,
        module_dropout: float | None = None,
        rank_dropout: float | None = None,
        dora: bool = False,
        tucker: bool = False,
        decompose_both: bool = False,
        rank_dropout_scale: bool = False,
    ) -> None:
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        out_m, out_n = factorization(int(weight.shape[0]), factor)
        in_m, in_n = factorization(int(weight.shape[1]), factor)
        kernel = tuple(int(k) for k in weight.shape[2:])
        full_w2 = rank >= max(out_n, in_n) / 2
        split_w1 = decompose_both and rank < max(out_m, in_m) / 2
        full = full_w2 and not split_w1
        super().__init__(
            name,
            base,
            rank,
            rank if full else alpha,
            multiplier=multiplier,
            module_dropout=module_dropout,
            dora=dora,
        )
        self.rank_dropout = rank_dropout
        self.rank_dropout_scale = rank_dropout_scale
        # LyCORIS' init and draw order: w2 (zero, or its factors with w2_b = 0) first, then w1
        # kaiming-uniform (w1_a then w1_b), so the same torch seed gives the same tensors as its LokrModule.
        if full_w2:  # LyCORIS keeps a full conv w2 4-D: [out_n, in_n, k, k]
            self.lokr_w2 = nn.Parameter(torch.zeros(out_n, in_n, *kernel))
        elif tucker and kernel and kernel != (1, 1):
            self.lokr_t2 = nn.Parameter(torch.empty(rank, rank, *kernel))
            nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5))
            self.lokr_w2_a = nn.Parameter(torch.empty(rank, out_n))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_n))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_n, rank))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_n * math.prod(kernel)))
        if split_w1:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_m, rank))
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, in_m))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(out_m, in_m))
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))

    @property
    def full_matrix(self) -> bool:
        return self.variant.full_matrix(self.tensors())

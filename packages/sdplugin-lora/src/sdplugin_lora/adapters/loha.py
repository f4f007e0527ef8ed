"""LyCORIS LoHa: ``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b)`` (Tucker optional), its variant and its adapter."""

from __future__ import annotations

import torch
from torch import nn

from .adapter import Adapter
from .maths import Tensors, _f32, tucker
from .variant import Variant


class LohaVariant(Variant):
    """LyCORIS LoHa: ``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b)`` (rank up to r²); Tucker: ``hada_t1/t2``."""

    algo = "loha"
    markers = ("hada_w1_a",)
    keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    tucker_keys = ("hada_t1", "hada_t2")

    @classmethod
    def complete(cls, t: Tensors) -> bool:
        return all(key in t for key in cls.keys[:4])

    @classmethod
    def rank(cls, t: Tensors) -> int:
        return int(t["hada_w1_b"].shape[0])

    @classmethod
    def weight(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        f = _f32(t)
        if "hada_t1" in f:  # w_a [r, out], w_b [r, in], t [r, r, k, k]
            w1 = tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
            w2 = tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
        else:
            w1 = f["hada_w1_a"] @ f["hada_w1_b"]
            w2 = f["hada_w2_a"] @ f["hada_w2_b"]
        return (w1 * w2).reshape(shape)

    @classmethod
    def shape(cls, t: Tensors) -> tuple[int, ...] | None:
        if "hada_t1" in t:
            kernel = (int(k) for k in t["hada_t1"].shape[2:])
            return (int(t["hada_w1_a"].shape[1]), int(t["hada_w1_b"].shape[1]), *kernel)
        return int(t["hada_w1_a"].shape[0]), int(t["hada_w1_b"].shape[1])


class LohaAdapter(Adapter):
    """LyCORIS LoHa (``hada_*``); Tucker for kxk convs (``hada_t1/t2``, ``w_a`` ``[r, out]``)."""

    variant = LohaVariant
    algo = "loha"
    scalar_key = "hada_w1_a"

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        multiplier: float = 1.0,
        module_dropout: float | None = None,
        rank_dropout: float | None = None,
        dora: bool = False,
        tucker: bool = False,
        rank_dropout_scale: bool = False,
    ) -> None:
        super().__init__(name, base, rank, alpha, multiplier=multiplier, module_dropout=module_dropout, dora=dora)
        self.rank_dropout = rank_dropout
        self.rank_dropout_scale = rank_dropout_scale
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        out_dim, in_dim = int(weight.shape[0]), int(weight[0].numel())
        # LyCORIS init: w1_a, t ~ N(0, 0.1²); w1_b, w2_b ~ N(0, 1); w2_a = 0 -> ΔW = 0 at the start.
        # Drawn in LyCORIS' order (t1, t2, w1_b, w1_a, w2_b), so the same torch seed gives the very
        # same tensors as ``lycoris.modules.loha.LohaModule`` (benchmarks/bench_lycoris.py checks it).
        if tucker and weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1):
            kernel = tuple(weight.shape[2:])
            in_dim = int(weight.shape[1])
            self.hada_t1 = nn.Parameter(torch.empty(rank, rank, *kernel).normal_(std=0.1))
            self.hada_t2 = nn.Parameter(torch.empty(rank, rank, *kernel).normal_(std=0.1))
            shape_a: tuple[int, int] = (rank, out_dim)
        else:
            shape_a = (out_dim, rank)
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_dim).normal_(std=1.0))
        self.hada_w1_a = nn.Parameter(torch.empty(*shape_a).normal_(std=0.1))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_dim).normal_(std=1.0))
        self.hada_w2_a = nn.Parameter(torch.zeros(*shape_a))

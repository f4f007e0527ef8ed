"""LyCORIS ``full``: the weight (and bias) difference itself, trained and stored as it is."""

from __future__ import annotations

import torch
from torch import nn

from .adapter import Adapter, _no_alpha
from .maths import Tensors
from .variant import AdditiveVariant


class FullVariant(AdditiveVariant):
    """LyCORIS ``full``: the difference itself (``diff``, ``diff_b``), scale 1."""

    algo = "full"
    markers = ("diff",)
    keys = ("diff", "diff_b")


def _channel(vector: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over ``out`` (channels first for convs, last for Linears)."""
    return vector.reshape(1, -1, *[1] * (out.dim() - 2)) if out.dim() == 4 else vector


class FullAdapter(Adapter):
    """LyCORIS ``full`` (native fine-tuning): the whole weight change ``diff`` (and the bias change
    ``diff_b`` when the layer has a bias) trains, no factorisation, no alpha, scale 1.

    Both start at zero, so the layer starts as the base (LyCORIS' ``FullModule`` copies the base
    weight into its parameter; its file stores ``weight - base`` = ``diff``, the same numbers). The
    forward adds ``m · (diff x + diff_b)``, LyCORIS' ``op(x, weight - base, bias - base_bias)``.
    One difference: here the optimizer's weight decay pulls ``diff`` towards zero (the base
    model), where LyCORIS' decays its parameter, the whole weight. LyCORIS has no dropout here
    that behaves (its rank-dropout mask is shaped by the output width but broadcast over the input
    axis), so none is offered."""

    variant = FullVariant
    algo = "full"
    diff_b: nn.Parameter | None

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int = 0,
        alpha: float | None = None,
        *,
        multiplier: float = 1.0,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__(name, base, 0, None, multiplier=multiplier, module_dropout=module_dropout)
        _no_alpha(self)
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        self.diff = nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32))
        bias = getattr(base, "bias", None)
        self.diff_b = nn.Parameter(torch.zeros(bias.shape, dtype=torch.float32)) if bias is not None else None

    def bias_change(self, *, detach: bool = True) -> torch.Tensor | None:
        if self.diff_b is None:
            return None
        return (self.diff_b.detach() if detach else self.diff_b).float()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``m · (diff x + diff_b)`` (per-sample strengths too)."""
        out = super().delta(x)
        change = self.bias_change(detach=False)
        if change is None:
            return out
        bias = _channel(change.to(device=out.device, dtype=out.dtype) * self.multiplier, out)
        factor = self.sample_factor(out)
        return out + (bias if factor is None else bias * factor)

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0) -> Adapter:
        adapter = cls(name, base, multiplier=multiplier)
        with torch.no_grad():
            adapter.diff.copy_(t["diff"].detach().float().reshape(adapter.diff.shape))
            if "diff_b" in t:
                if adapter.diff_b is None:
                    raise ValueError(f"{name}: the file changes the bias (diff_b) of a layer that has none")
                adapter.diff_b.copy_(t["diff_b"].detach().float().reshape(adapter.diff_b.shape))
            else:
                adapter.diff_b = None
        return adapter

"""A file module's dense weight change, ``W' - W``: what every tool that turns a module into a change
(apply, merge, resize) computes."""

from __future__ import annotations

import torch
from torch import nn

from .dora import Dora
from .maths import Tensors
from .registry import variant_of


def needs_base(t: Tensors) -> bool:
    """Whether the module's weight change depends on the base weight (DoRA, OFT, (IA)^3, GLoRA)."""
    variant = variant_of(t)
    return "dora_scale" in t or (variant is not None and variant.multiplicative)


def weight_change(t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
    """``W' - W`` in fp32 for a file module's tensors (multiplier 1), shaped ``shape``.

    ``base`` is the layer's weight; DoRA and OFT need it (:func:`needs_base`), the others do not.
    Every tool that turns a file module into a dense change (apply, merge, resize) calls this.
    """
    variant = variant_of(t)
    if variant is None:
        raise ValueError(f"unsupported LoRA module with tensors {sorted(t)}")
    if base is None and needs_base(t):
        raise ValueError(
            "DoRA, OFT, (IA)^3 and GLoRA modules change the weight relative to the base weight: it is needed"
        )
    delta = variant.delta(t, shape, base)
    if "dora_scale" in t:
        assert base is not None
        w = base.detach().float().reshape(shape)
        delta = Dora.apply(w, delta.to(w.device), t["dora_scale"].to(w.device)) - w
    return delta


def effective_delta(base: nn.Module, t: Tensors, multiplier: float = 1.0) -> torch.Tensor:
    """``m · (W' - W)`` in fp32 for a file module's tensors applied to ``base``."""
    weight: torch.Tensor = base.weight  # type: ignore[assignment]
    return weight_change(t, tuple(weight.shape), weight).to(weight.device) * multiplier

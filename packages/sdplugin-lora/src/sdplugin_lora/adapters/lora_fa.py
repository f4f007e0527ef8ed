"""kohya's LoRA-FA: a LoRA whose ``lora_down`` stays frozen at kohya's init (files are plain LoRA)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .lora import LoraAdapter


class LoraFaAdapter(LoraAdapter):
    """kohya's LoRA-FA (``networks.lora_fa``, arXiv 2308.03303): a LoRA whose ``lora_down`` is frozen
    at its init and only ``lora_up`` trains (about half the optimizer state, and no activation of
    ``x`` kept for the down's gradient).

    kohya draws the down from ``N(0, 2 / (in + rank))`` (the paper's init; ``in`` is the layer's input
    channels, the kernel not counted) instead of LoRA's kaiming-uniform; the up starts at zero, so
    ``ΔW = 0`` at the start. The forward, the dropouts and the file are plain LoRA's
    (``lora_down.weight``, ``lora_up.weight``, ``alpha``): every LoRA loader applies it.
    """

    algo = "lora_fa"

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            name,
            base,
            rank,
            alpha,
            multiplier=multiplier,
            dropout=dropout,
            rank_dropout=rank_dropout,
            module_dropout=module_dropout,
            dtype=dtype,
        )
        self.lora_down.weight.requires_grad_(False)

    def _init_down(self) -> None:
        """kohya lora_fa.py: ``normal_(lora_down, std=sqrt(2/(in + r)))`` right after the layers are built,
        with no kaiming draw before it, so the same seed gives kohya's very down."""
        base = self.base
        in_dim = int(base.in_channels if isinstance(base, nn.Conv2d) else base.in_features)
        nn.init.normal_(self.lora_down.weight, std=math.sqrt(2.0 / (in_dim + self.rank)))

    def requires_grad_(self, requires_grad: bool = True) -> LoraFaAdapter:
        """Only ``lora_up`` follows ``requires_grad``: the down stays frozen (as kohya's module)."""
        self.lora_up.requires_grad_(requires_grad)
        self.lora_down.requires_grad_(False)
        if self.dora_scale is not None:
            self.dora_scale.requires_grad_(requires_grad)
        return self

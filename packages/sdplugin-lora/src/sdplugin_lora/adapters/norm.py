"""LyCORIS ``train_norm``: additive changes of a GroupNorm's/LayerNorm's affine parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapter import Adapter
from .maths import Tensors
from .variant import AdditiveVariant


class NormVariant(AdditiveVariant):
    """LyCORIS ``train_norm`` (``NormModule``): a GroupNorm/LayerNorm's affine parameters get an
    additive change, ``weight + w_norm`` and ``bias + b_norm`` (no alpha, scale 1), as LyCORIS'
    ``get_merged_weight``, A1111's ``network_norm`` and ComfyUI's ``diff`` patches apply them."""

    algo = "norm"
    markers = ("w_norm",)
    keys = ("w_norm", "b_norm")

    @classmethod
    def shape(cls, t: Tensors) -> tuple[int, ...] | None:
        return (int(t["w_norm"].numel()),)  # a norm's affine vector, however the file shaped it


class NormAdapter(Adapter):
    """LyCORIS ``train_norm``: a GroupNorm/LayerNorm whose affine parameters train as additive
    changes ``w_norm``/``b_norm`` (both start at zero), LyCORIS' ``NormModule``.

    The forward adds ``m · norm_op(x, w_norm, b_norm)`` (the layer's normalisation with the changes
    as its affine parameters, i.e. ``normalised(x) · w_norm + b_norm``), which is the layer with
    ``weight + m · w_norm`` and ``bias + m · b_norm``; merging adds exactly that. The file holds
    ``w_norm`` and ``b_norm`` only (no alpha). While training with ``rank_dropout`` p, LyCORIS'
    ``NormModule.make_weight`` multiplies both changes by ``torch.rand(C) < p`` (it *keeps* a
    channel with probability p, from the second of two ``torch.rand(C)`` draws: the first, and its
    ``rank_dropout_scale`` branch, are overwritten): reproduced as LyCORIS computes it, both draws included.
    """

    variant = NormVariant
    algo = "norm"
    w_norm: nn.Parameter
    b_norm: nn.Parameter | None

    def __init__(
        self,
        name: str,
        base: nn.Module,
        *,
        multiplier: float = 1.0,
        module_dropout: float | None = None,
        rank_dropout: float | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if not isinstance(base, (nn.GroupNorm, nn.LayerNorm)) or base.weight is None:
            raise TypeError(f"{name}: train_norm needs an affine GroupNorm or LayerNorm, got {type(base).__name__}")
        self.lora_name = name
        object.__setattr__(self, "base", base)
        self.rank = 0
        self._scale = 1.0
        self.scalar = 1.0
        self._bake_scalar = False
        self.multiplier = multiplier
        self.module_dropout = module_dropout
        self.rank_dropout = rank_dropout
        self._handle = None
        self._frozen = None
        self.dora_scale = None
        channels = int(base.weight.numel())
        self.w_norm = nn.Parameter(torch.zeros(channels))
        self.b_norm = nn.Parameter(torch.zeros(channels)) if base.bias is not None else None
        self._bias_backup: torch.Tensor | None = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    def _factorised(self) -> bool:
        return True  # the forward is the norm op itself: freezing precomputes nothing

    def bias_change(self, *, detach: bool = True) -> torch.Tensor | None:
        """The change of the layer's bias at multiplier 1, in fp32 (``None`` without ``b_norm``;
        :meth:`Adapter.merge` adds it, :meth:`Adapter.unmerge` restores the bias)."""
        if self.b_norm is None or self.base.bias is None:
            return None
        return (self.b_norm.detach() if detach else self.b_norm).float()

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        base = self.base
        x = self._input(x, weight.dtype)
        if isinstance(base, nn.GroupNorm):
            return nn.functional.group_norm(x, base.num_groups, weight, bias, base.eps)
        return nn.functional.layer_norm(x, base.normalized_shape, weight, bias, base.eps)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        weight: torch.Tensor = self.w_norm
        bias: torch.Tensor | None = self.b_norm
        if self.training and self.rank_dropout:  # LyCORIS NormModule.make_weight, as it computes:
            torch.rand(weight.shape[0])  # its first mask, overwritten by the second (the draw is kept for parity)
            keep = (torch.rand(weight.shape[0]) < self.rank_dropout).to(weight.dtype).to(weight.device)
            weight = weight * keep
            bias = bias * keep if bias is not None else None
        weight = weight * self.multiplier
        bias = bias * self.multiplier if bias is not None else None
        out = self._norm(x, weight, bias)
        factor = self.sample_factor(out)
        return out if factor is None else out * factor

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0) -> Adapter:
        adapter = cls(name, base, multiplier=multiplier)
        with torch.no_grad():
            adapter.w_norm.copy_(t["w_norm"].detach().float().reshape(adapter.w_norm.shape))
            if adapter.b_norm is not None:
                if "b_norm" in t:
                    adapter.b_norm.copy_(t["b_norm"].detach().float().reshape(adapter.b_norm.shape))
                else:
                    adapter.b_norm = None
        return adapter

"""LoRA modules attached to a frozen model by forward hooks.

The base model is never copied or renamed: each :class:`LoraModule` keeps a reference to its
Linear/Conv2d and a forward hook adds ``multiplier * alpha/rank * up(down(x))`` to that layer's
output (kohya's ``y = W x + m * s * up(down(x))``). The base ``state_dict`` keeps its names, the
LoRA parameters stay fp32 while the base may be fp16/bf16, and :meth:`LoraNetwork.remove` takes
every hook off again. The network's own ``state_dict`` is already the kohya file layout
(``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .naming import Target


class LoraModule(nn.Module):
    """One low-rank update ``ΔW = up @ down`` for one Linear or Conv2d.

    For a kxk convolution ``lora_down`` is a conv with the original kernel, stride and padding
    and ``lora_up`` a 1x1 conv, exactly as kohya (``C3Lier``) stores them.
    """

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
        super().__init__()
        self.lora_name = name
        object.__setattr__(self, "base", base)  # a plain reference, not a submodule: no base weights in state_dict
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(
                base.in_channels,
                rank,
                base.kernel_size,
                base.stride,
                base.padding,
                dilation=base.dilation,
                bias=False,
                dtype=dtype,
            )
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, 1, bias=False, dtype=dtype)
        elif isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, dtype=dtype)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, dtype=dtype)
        else:
            raise TypeError(f"{name}: LoRA needs a Linear or Conv2d, got {type(base).__name__}")
        self.rank = rank
        if alpha is None or alpha == 0:
            alpha = float(rank)
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.enabled = True
        self._handle: Any = None

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    # --- hooks -------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handle is None:
            self._handle = self.base.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.multiplier == 0:
            return output
        x = args[0]
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return output
        return output + self.delta(x).to(output.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``multiplier * scale * up(down(x))`` with kohya's neuron/rank dropout while training."""
        weight_dtype = self.lora_down.weight.dtype
        if not torch.is_autocast_enabled() and x.dtype != weight_dtype:
            x = x.to(weight_dtype)
        hidden = self.lora_down(x)
        scale = self.scale
        if self.training and self.dropout:
            hidden = torch.nn.functional.dropout(hidden, p=self.dropout)
        if self.training and self.rank_dropout:
            mask = (torch.rand(hidden.shape[0], self.rank, device=hidden.device) > self.rank_dropout).to(hidden.dtype)
            if hidden.dim() == 4:
                mask = mask[:, :, None, None]
            elif hidden.dim() == 3:
                mask = mask[:, None, :]
            hidden = hidden * mask
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(hidden) * (self.multiplier * scale)

    # --- weights -----------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``scale * up @ down`` in fp32, shaped like the base weight (multiplier not applied)."""
        return lora_delta(self.lora_down.weight, self.lora_up.weight, self.scale, tuple(self.base.weight.shape))


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    """``scale * up @ down`` for Linear, 1x1 and kxk convs (kohya/ComfyUI formula), in fp32."""
    down32 = down.detach().float().flatten(1)
    up32 = up.detach().float().flatten(1)
    return (up32 @ down32).reshape(shape) * scale


class LoraNetwork(nn.Module):
    """A set of :class:`LoraModule` keyed by kohya name; ``state_dict`` is the kohya layout."""

    def __init__(self, modules: Iterable[LoraModule] = ()) -> None:
        super().__init__()
        self.loras = nn.ModuleDict()
        for module in modules:
            self.loras[module.lora_name] = module

    @classmethod
    def create(
        cls,
        targets: Iterable[Target],
        *,
        rank: int,
        alpha: float | None = None,
        conv_rank: int | None = None,
        conv_alpha: float | None = None,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        multiplier: float = 1.0,
    ) -> LoraNetwork:
        """kohya's rule: Linear and 1x1 conv get ``rank``/``alpha``; kxk convs ``conv_rank``/``conv_alpha``
        (skipped when no conv rank)."""
        modules = []
        for target in targets:
            if target.is_conv3x3:
                if not conv_rank:
                    continue
                r, a = conv_rank, conv_alpha
            else:
                r, a = rank, alpha
            if not r:
                continue
            modules.append(
                LoraModule(
                    target.name,
                    target.module,
                    r,
                    a,
                    multiplier=multiplier,
                    dropout=dropout,
                    rank_dropout=rank_dropout,
                    module_dropout=module_dropout,
                )
            )
        return cls(modules)

    def __iter__(self):  # type: ignore[override]
        return iter(self.loras.values())

    def __len__(self) -> int:
        return len(self.loras)

    def _modules_of(self) -> list[LoraModule]:
        return list(self.loras.values())  # type: ignore[arg-type]

    def attach(self) -> LoraNetwork:
        for module in self._modules_of():
            module.attach()
        return self

    def remove(self) -> None:
        """Take every hook off: the base model behaves exactly as before."""
        for module in self._modules_of():
            module.detach()

    def set_multiplier(self, unet: float = 1.0, text_encoder: float | None = None) -> None:
        """A1111 semantics: the text-encoder weight defaults to the UNet weight."""
        te = unet if text_encoder is None else text_encoder
        for module in self._modules_of():
            module.multiplier = te if module.lora_name.startswith("lora_te") else unet

    def set_enabled(self, enabled: bool) -> None:
        for module in self._modules_of():
            module.enabled = enabled

    def parameters_of(self, *, text_encoder: bool) -> list[nn.Parameter]:
        """Trainable parameters of the text-encoder (``True``) or UNet (``False``) modules."""
        params: list[nn.Parameter] = []
        for module in self._modules_of():
            if module.lora_name.startswith("lora_te") == text_encoder:
                params.extend(p for p in module.parameters())
        return params

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> list[str]:
        """Copy weights from a kohya-layout dict (alpha included); returns names of missing modules."""
        missing = []
        for name, module in self.loras.items():
            down, up = state.get(f"{name}.lora_down.weight"), state.get(f"{name}.lora_up.weight")
            if down is None or up is None:
                missing.append(name)
                continue
            if tuple(down.shape) != tuple(module.lora_down.weight.shape) or tuple(up.shape) != tuple(
                module.lora_up.weight.shape
            ):
                from sdcore.errors import NetworkMismatchError

                raise NetworkMismatchError(
                    f"{name}: saved rank/shape {tuple(down.shape)} does not match {tuple(module.lora_down.weight.shape)}"
                )
            with torch.no_grad():
                module.lora_down.weight.copy_(down)
                module.lora_up.weight.copy_(up)
                alpha = state.get(f"{name}.alpha")
                module.alpha.copy_(alpha if alpha is not None else torch.tensor(float(module.rank)))
        if strict and missing:
            from sdcore.errors import NetworkMismatchError

            raise NetworkMismatchError(f"{len(missing)} modules missing from the weights: {', '.join(missing[:10])}")
        return missing


__all__ = ["LoraModule", "LoraNetwork", "lora_delta"]

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


class NetworkModule(nn.Module):
    """What every hooked module shares: the base reference, alpha/rank scale, multiplier, hooks.

    Subclasses implement :meth:`delta` (the output increment for input ``x``) and
    :meth:`delta_weight` (the same as a weight, for merging and tests).
    """

    base: Any
    alpha: torch.Tensor
    #: tensor names in the file besides ``alpha`` (LyCORIS spelling), for warm starts
    algo: str = "lora"

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None,
        *,
        multiplier: float = 1.0,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{name}: LoRA needs a Linear or Conv2d, got {type(base).__name__}")
        self.lora_name = name
        object.__setattr__(self, "base", base)  # a plain reference, not a submodule: no base weights in state_dict
        self.rank = rank
        if alpha is None or alpha == 0:
            alpha = float(rank)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self._scale = float(alpha) / rank  # a Python float: no device sync per forward
        self.multiplier = multiplier
        self.module_dropout = module_dropout
        self._handle: Any = None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    @property
    def scale(self) -> float:
        return self._scale

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scale = float(self.alpha) / self.rank

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
        if self.multiplier == 0:
            return output
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return output
        return output + self.delta(args[0]).to(output.dtype)

    def _input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not torch.is_autocast_enabled() and x.dtype != dtype:
            return x.to(dtype)
        return x

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's op (stride, padding...) with another weight and no bias."""
        x = self._input(x, weight.dtype)
        base = self.base
        if isinstance(base, nn.Conv2d):
            return nn.functional.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)  # type: ignore[arg-type]
        return nn.functional.linear(x, weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_weight(x, self.delta_weight(detach=False) * self.multiplier)

    def delta_weight(self, *, detach: bool = True) -> torch.Tensor:
        raise NotImplementedError


class LoraModule(NetworkModule):
    """One low-rank update ``ΔW = up @ down`` for one Linear or Conv2d.

    For a kxk convolution ``lora_down`` is a conv with the original kernel, stride and padding
    and ``lora_up`` a 1x1 conv, exactly as kohya (``C3Lier``) stores them.
    """

    lora_down: Any
    lora_up: Any

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
        super().__init__(name, base, rank, alpha, multiplier=multiplier, module_dropout=module_dropout)
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(
                base.in_channels,
                rank,
                base.kernel_size,  # type: ignore[arg-type]
                base.stride,  # type: ignore[arg-type]
                base.padding,  # type: ignore[arg-type]
                dilation=base.dilation,  # type: ignore[arg-type]
                bias=False,
                dtype=dtype,
            )
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, 1, bias=False, dtype=dtype)
        else:
            assert isinstance(base, nn.Linear)
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, dtype=dtype)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = dropout
        self.rank_dropout = rank_dropout

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``multiplier * scale * up(down(x))`` with kohya's neuron/rank dropout while training."""
        hidden = self.lora_down(self._input(x, self.lora_down.weight.dtype))
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
        # scaling the rank-sized hidden state is cheaper than scaling the output
        return self.lora_up(hidden * (self.multiplier * scale))

    def delta_weight(self, *, detach: bool = True) -> torch.Tensor:
        """``scale * up @ down`` in fp32, shaped like the base weight (multiplier not applied)."""
        down, up = self.lora_down.weight, self.lora_up.weight
        if detach:
            return lora_delta(down, up, self.scale, tuple(self.base.weight.shape))
        return (up.float().flatten(1) @ down.float().flatten(1)).reshape(self.base.weight.shape) * self.scale


class DoraModule(LoraModule):
    """DoRA (LyCORIS ``dora_wd``): ``W' = m · (W + ΔW) / ‖W + ΔW‖`` with the norm per output row.

    ``dora_scale`` (shape ``[out, 1(, 1, 1)]``, LyCORIS ``wd_on_out=True`` layout) starts at
    ``‖W‖`` so the module starts as the identity; it trains with the LoRA factors.
    """

    algo = "dora"

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float | None = None, **kwargs: Any) -> None:
        super().__init__(name, base, rank, alpha, **kwargs)
        weight = base.weight.detach().float()  # type: ignore[union-attr,operator]
        norm = weight.flatten(1).norm(dim=1).reshape(weight.shape[0], *([1] * (weight.dim() - 1)))
        self.dora_scale = nn.Parameter(norm.clone())

    def _dora_weight(self, detach: bool) -> torch.Tensor:
        base = self.base.weight.detach().float()
        merged = base + super().delta_weight(detach=detach)
        norm = merged.flatten(1).norm(dim=1).reshape(self.dora_scale.shape)
        scale = self.dora_scale.detach() if detach else self.dora_scale
        return merged * (scale / norm)

    def delta_weight(self, *, detach: bool = True) -> torch.Tensor:
        return self._dora_weight(detach) - self.base.weight.detach().float()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_weight(x, self.delta_weight(detach=False) * self.multiplier)


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


class LohaModule(NetworkModule):
    """LyCORIS LoHa: ``ΔW = alpha/r · (w1a @ w1b) ⊙ (w2a @ w2b)`` (Hadamard product, rank up to r²)."""

    algo = "loha"

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
        super().__init__(name, base, rank, alpha, multiplier=multiplier, module_dropout=module_dropout)
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        out_dim, in_dim = weight.shape[0], weight[0].numel()
        self.hada_w1_a = nn.Parameter(torch.randn(out_dim, rank) * 0.1)
        self.hada_w1_b = nn.Parameter(torch.randn(rank, in_dim))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_dim, rank))
        self.hada_w2_b = nn.Parameter(torch.randn(rank, in_dim))

    def delta_weight(self, *, detach: bool = True) -> torch.Tensor:
        parts = [self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b]
        w1a, w1b, w2a, w2b = (p.detach().float() if detach else p.float() for p in parts)
        return ((w1a @ w1b) * (w2a @ w2b)).reshape(self.base.weight.shape) * self.scale


class LokrModule(NetworkModule):
    """LyCORIS LoKr: ``ΔW = alpha/r · kron(w1, w2_a @ w2_b)``; ``w1`` is a small full matrix.

    With a rank at least half the factor size ``w2`` is stored full (``lokr_w2``) and the scale
    is 1, as LyCORIS does.
    """

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
    ) -> None:
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        out_m, out_n = factorization(int(weight.shape[0]), factor)
        in_m, in_n = factorization(int(weight.shape[1]), factor)
        kernel = int(weight[0, 0].numel())  # k·k for convs, 1 for linears
        full_w2 = rank >= max(out_n, in_n) / 2
        super().__init__(
            name, base, rank, rank if full_w2 else alpha, multiplier=multiplier, module_dropout=module_dropout
        )
        self.lokr_w1 = nn.Parameter(torch.empty(out_m, in_m))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self.full_w2 = full_w2
        if full_w2:  # LyCORIS keeps a full conv w2 4-D: [out_n, in_n, k, k]
            self.lokr_w2 = nn.Parameter(torch.zeros(out_n, in_n, *weight.shape[2:]))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_n, rank))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_n * kernel))

    def delta_weight(self, *, detach: bool = True) -> torch.Tensor:
        def get(p: torch.Tensor) -> torch.Tensor:
            return p.detach().float() if detach else p.float()

        w1 = get(self.lokr_w1)
        w2 = get(self.lokr_w2) if self.full_w2 else get(self.lokr_w2_a) @ get(self.lokr_w2_b)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(self.base.weight.shape) * self.scale


ALGOS = ("lora", "locon", "loha", "lokr", "dora")


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    """``scale * up @ down`` for Linear, 1x1 and kxk convs (kohya/ComfyUI formula), in fp32."""
    down32 = down.detach().float().flatten(1)
    up32 = up.detach().float().flatten(1)
    return (up32 @ down32).reshape(shape) * scale


class LoraNetwork(nn.Module):
    """A set of hooked modules keyed by kohya name; ``state_dict`` is the file layout."""

    def __init__(self, modules: Iterable[NetworkModule] = ()) -> None:
        super().__init__()
        for module in modules:  # registered directly so state_dict keys are "<kohya name>.lora_down.weight"
            self.add_module(module.lora_name, module)

    @property
    def loras(self) -> dict[str, NetworkModule]:
        return {name: module for name, module in self.named_children() if isinstance(module, NetworkModule)}

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
        algo: str = "lora",
        lokr_factor: int = -1,
    ) -> LoraNetwork:
        """kohya's rule: Linear and 1x1 conv get ``rank``/``alpha``; kxk convs ``conv_rank``/``conv_alpha``
        (skipped when no conv rank). ``algo`` picks LoRA (``lora``/``locon``), LoHa, LoKr or DoRA modules."""
        if algo not in ALGOS:
            raise ValueError(f"unknown algo {algo!r}; choose one of {', '.join(ALGOS)}")
        modules: list[NetworkModule] = []
        for target in targets:
            if target.is_conv3x3:
                if not conv_rank:
                    continue
                r, a = conv_rank, conv_alpha
            else:
                r, a = rank, alpha
            if not r:
                continue
            common: dict[str, Any] = {"multiplier": multiplier, "module_dropout": module_dropout}
            if algo in ("lora", "locon", "dora"):
                module_cls = DoraModule if algo == "dora" else LoraModule
                modules.append(
                    module_cls(target.name, target.module, r, a, dropout=dropout, rank_dropout=rank_dropout, **common)
                )
            elif algo == "loha":
                modules.append(LohaModule(target.name, target.module, r, a, **common))
            else:
                modules.append(LokrModule(target.name, target.module, r, a, factor=lokr_factor, **common))
        return cls(modules)

    def __iter__(self):  # type: ignore[override]
        return iter(self._modules_of())

    def __len__(self) -> int:
        return len(self.loras)

    def _modules_of(self) -> list[NetworkModule]:
        return [module for module in self.children() if isinstance(module, NetworkModule)]

    def attach(self) -> LoraNetwork:
        for module in self._modules_of():
            module.attach()
        return self

    def remove(self) -> None:
        """Take every hook off: the base model behaves exactly as before."""
        for module in self._modules_of():
            module.detach()

    def parameters_of(self, *, text_encoder: bool) -> list[nn.Parameter]:
        """Trainable parameters of the text-encoder (``True``) or UNet (``False``) modules."""
        params: list[nn.Parameter] = []
        for module in self._modules_of():
            if module.lora_name.startswith("lora_te") == text_encoder:
                params.extend(p for p in module.parameters())
        return params

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> list[str]:
        """Copy weights from a file-layout dict; a missing alpha means alpha = rank.

        Returns the modules the dict does not cover (an error with ``strict``); a tensor of another
        shape (another rank) is always an error.
        """
        from sdcore.errors import NetworkMismatchError

        own = self.state_dict()
        full: dict[str, torch.Tensor] = {}
        missing: set[str] = set()
        modules = self.loras
        for key, current in own.items():
            name = key.split(".", 1)[0]
            value = state.get(key)
            if value is None:
                if key.endswith(".alpha"):
                    value = torch.tensor(float(modules[name].rank))
                else:
                    missing.add(name)
                    value = current
            elif tuple(value.shape) != tuple(current.shape):
                raise NetworkMismatchError(
                    f"{key}: saved shape {tuple(value.shape)} does not match {tuple(current.shape)} (another rank?)"
                )
            full[key] = value.to(current.dtype)
        if strict and missing:
            names = sorted(missing)
            raise NetworkMismatchError(f"{len(names)} modules missing from the weights: {', '.join(names[:10])}")
        self.load_state_dict(full)
        return sorted(missing)


__all__ = [
    "ALGOS",
    "DoraModule",
    "LohaModule",
    "LokrModule",
    "LoraModule",
    "LoraNetwork",
    "NetworkModule",
    "factorization",
    "lora_delta",
]

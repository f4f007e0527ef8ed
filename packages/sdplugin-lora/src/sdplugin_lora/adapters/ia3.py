"""LyCORIS ``ia3`` ((IA)^3): a learned vector rescales the layer's output (or input) channels."""

from __future__ import annotations

import torch
from torch import nn

from .adapter import Adapter, _no_alpha
from .maths import Tensors
from .variant import Variant


class Ia3Variant(Variant):
    """LyCORIS ``ia3`` ((IA)^3): a learned vector rescales the layer's output channels (``on_input`` 0) or
    its input channels (``on_input`` 1): ``W' = W ⊙ (1 + m · weight)`` along that axis, so
    ``ΔW = W ⊙ weight`` (no alpha, scale 1). ``weight`` is ``[out]`` (``[in]``) for a Linear and
    ``[1, out, 1, 1]`` for a conv, as LyCORIS' ``IA3Module`` stores it; A1111's ``network_ia3``
    computes the same ``orig_weight * w``. The change needs the base weight (:attr:`multiplicative`)."""

    algo = "ia3"
    markers = ("on_input",)
    keys = ("weight", "on_input")
    multiplicative = True

    @classmethod
    def complete(cls, t: Tensors) -> bool:
        return "weight" in t and "on_input" in t

    @classmethod
    def on_input(cls, t: Tensors) -> bool:
        return bool(int(t["on_input"]))

    @classmethod
    def weight(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError("(IA)^3 scales the base weight: its change needs that weight")
        w = base.detach().float().reshape(shape)
        vector = t["weight"].float().flatten().to(w.device)
        rest = [1] * (len(shape) - 2)
        if cls.on_input(t):
            return w * vector.reshape(1, -1, *rest)
        return w * vector.reshape(-1, 1, *rest)


class Ia3Adapter(Adapter):
    """LyCORIS ``ia3`` ((IA)^3, arXiv 2205.05638): a vector ``weight`` rescales the layer's output
    channels, or with ``on_input`` its input channels: ``W' = W ⊙ (1 + m · weight)``.

    ``weight`` starts at zero (the layer starts as the base) and is ``[width]`` for a Linear,
    ``[1, width, 1, 1]`` for a conv; the file holds ``weight`` and ``on_input`` (an int tensor),
    no alpha, as LyCORIS' ``IA3Module`` stores them. The forward is LyCORIS' (non-bypass):
    ``base(x) + op(x, m · W ⊙ weight)``, which is the base output times ``1 + m · weight`` per
    output channel. No dropout applies (LyCORIS' IA3 has only module dropout). LyCORIS recommends a
    much higher learning rate than LoRA's (5e-3 to 1e-2, docs/Algo-List.md)."""

    variant = Ia3Variant
    algo = "ia3"
    on_input: torch.Tensor

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int = 0,
        alpha: float | None = None,
        *,
        multiplier: float = 1.0,
        module_dropout: float | None = None,
        on_input: bool = False,
    ) -> None:
        super().__init__(name, base, 0, None, multiplier=multiplier, module_dropout=module_dropout)
        _no_alpha(self)
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        width = int(weight.shape[1] if on_input else weight.shape[0])
        shape = (1, width, *[1] * (weight.dim() - 2)) if weight.dim() > 2 else (width,)
        self.weight = nn.Parameter(torch.zeros(shape))
        self.register_buffer("on_input", torch.tensor(int(on_input)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "on_input": self.on_input}

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0) -> Adapter:
        adapter = cls(name, base, multiplier=multiplier, on_input=Ia3Variant.on_input(t))
        vector = t["weight"].detach().float()
        if vector.numel() != adapter.weight.numel():
            raise ValueError(
                f"{name}: (IA)^3 weight has {vector.numel()} entries, the layer {adapter.weight.numel()} "
                f"{'input' if int(adapter.on_input) else 'output'} channels"
            )
        with torch.no_grad():
            adapter.weight.copy_(vector.reshape(adapter.weight.shape))
        return adapter

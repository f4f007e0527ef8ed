"""LyCORIS ``glora`` (generalised LoRA): ``ΔW = (W @ A + B) · alpha/r``, both file layouts read."""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapter import Adapter
from .maths import Tensors
from .variant import Variant


class GloraVariant(Variant):
    """LyCORIS ``glora`` (generalised LoRA): ``ΔW = (W @ A + B) · alpha/r`` with ``A = a1 @ a2``
    (``a1`` ``[in, r]``, ``a2`` ``[r, in]``, 1x1 kernels for convs) and ``B = b1 @ b2`` (``b1``
    ``[out, r]``, ``b2`` ``[r, in, k, k]``), ``r`` = ``a2``'s rows; for a conv ``W @ A`` contracts
    the input axis (LyCORIS ``GLoRAModule.make_weight``, ComfyUI's GLoRA adapter). Files of older
    LyCORIS versions keep the transposed layout (``a1`` ``[r, in]``, ``a2`` ``[in, r]``, ``b1``
    ``[r, in]``, ``b2`` ``[out, r]``: ``ΔW = W @ a2 @ a1 + b2 @ b1``, ``r`` = ``a1``'s rows);
    the layout is told from the shapes as ComfyUI tells it. A Tucker core (``bm.weight``) is not read.
    """

    algo = "glora"
    markers = ("a1.weight",)
    keys = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight")
    multiplicative = True

    @classmethod
    def complete(cls, t: Tensors) -> bool:
        return all(key in t for key in cls.keys[:4]) and "bm.weight" not in t

    @classmethod
    def old_layout(cls, t: Tensors, shape: tuple[int, ...] | None = None) -> bool:
        """ComfyUI's test: the old layout when the rank sits where it puts it, unless the new layout
        fits too and the layer is not square with ``a2`` as tall as it."""
        a1, a2, b1, b2 = (t[k].shape for k in cls.keys[:4])
        old = b2[1] == b1[0] == a1[0] == a2[1]
        new = b2[0] == b1[1] == a1[1] == a2[0]
        if old and new:
            return shape is not None and a2[0] == shape[0] and shape[0] == shape[1]
        return bool(old)

    @classmethod
    def rank(cls, t: Tensors) -> int:
        return int(t["a1.weight"].shape[0] if cls.old_layout(t) else t["a2.weight"].shape[0])

    @classmethod
    def full_matrix(cls, t: Tensors) -> bool:
        return False

    @classmethod
    def weight(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError("GLoRA's W @ A term needs the base weight")
        f = {key: value.float().flatten(1) for key, value in t.items() if key in cls.keys}
        w = base.detach().float().reshape(shape).to(f["a1.weight"].device)
        if cls.old_layout(t, shape):
            wide = w.flatten(1)
            return (f["b2.weight"] @ f["b1.weight"] + wide @ f["a2.weight"] @ f["a1.weight"]).reshape(shape)
        a = f["a1.weight"] @ f["a2.weight"]  # [in, in]
        wa = torch.einsum("o i ..., i j -> o j ...", w, a)
        return wa + (f["b1.weight"] @ f["b2.weight"]).reshape(shape)

    @classmethod
    def in_out(cls, t: Tensors) -> tuple[int, int] | None:
        if cls.old_layout(t):
            return int(t["a1.weight"].shape[1]), int(t["b2.weight"].shape[0])
        return int(t["a1.weight"].shape[0]), int(t["b1.weight"].shape[0])


class GloraAdapter(Adapter):
    """LyCORIS ``glora`` (arXiv 2306.07967): ``W' = W + m · (alpha/r) · (W @ a1 @ a2 + b1 @ b2)``.

    The four factors are layers as LyCORIS' ``GLoRAModule`` builds them, in its order (``a2``:
    in → r, ``a1``: r → in, ``b2``: in → r with the layer's kernel, stride and padding, ``b1``:
    r → out, all 1x1 for convs but ``b2``), so their ``state_dict`` is the file's ``a1.weight`` ...
    ``b2.weight`` plus ``alpha``. Init as LyCORIS: ``a1``, ``b1`` kaiming-uniform(a=√5), ``a2``,
    ``b2`` zero (the change starts at zero). The forward is LyCORIS' non-bypass one: the rebuilt
    change applied with the layer's op (no dropout there; LyCORIS' GLoRA drops ranks only in its
    bypass forward)."""

    variant = GloraVariant
    algo = "glora"

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
        self.a1: nn.Module
        self.a2: nn.Module
        self.b1: nn.Module
        self.b2: nn.Module
        if isinstance(base, nn.Conv2d):
            self.a2 = nn.Conv2d(base.in_channels, rank, 1, bias=False)
            self.a1 = nn.Conv2d(rank, base.in_channels, 1, bias=False)
            self.b2 = nn.Conv2d(
                base.in_channels,
                rank,
                base.kernel_size,  # type: ignore[arg-type]
                base.stride,  # type: ignore[arg-type]
                base.padding,  # type: ignore[arg-type]
                bias=False,
            )
            self.b1 = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            assert isinstance(base, nn.Linear)
            self.a2 = nn.Linear(base.in_features, rank, bias=False)
            self.a1 = nn.Linear(rank, base.in_features, bias=False)
            self.b2 = nn.Linear(base.in_features, rank, bias=False)
            self.b1 = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.a1.weight, a=math.sqrt(5))  # type: ignore[arg-type]
        nn.init.kaiming_uniform_(self.b1.weight, a=math.sqrt(5))  # type: ignore[arg-type]
        nn.init.zeros_(self.a2.weight)  # type: ignore[arg-type]
        nn.init.zeros_(self.b2.weight)  # type: ignore[arg-type]

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0) -> Adapter:
        """A holder of the file's four factors as they are (either layout) on ``base``."""
        variant = cls.variant
        adapter = cls.__new__(cls)
        Adapter.__init__(adapter, name, base, variant.rank(t), variant.alpha(t), multiplier=multiplier)
        for key in variant.keys:
            if key in t:
                holder = nn.Module()
                holder.register_parameter("weight", nn.Parameter(t[key].detach().float().clone()))
                adapter.add_module(key.split(".")[0], holder)
        return adapter

"""The variant base classes: an algorithm as stateless functions of a module's file tensors (which
tensors, rank, alpha/rank scale, ``ΔW``), and the additive kind that stores its change itself."""

from __future__ import annotations

from typing import ClassVar

import torch

from .maths import Tensors


class Variant:
    """One algorithm of the family, as stateless functions of the module's file tensors."""

    algo: ClassVar[str]
    #: tensor names of which any one identifies the variant
    markers: ClassVar[tuple[str, ...]]
    #: every tensor name the variant may store (besides ``alpha``, ``scale``, ``dora_scale``)
    keys: ClassVar[tuple[str, ...]]
    #: names of the Tucker cores
    tucker_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def matches(cls, t: Tensors) -> bool:
        return any(key in t for key in cls.markers)

    @classmethod
    def complete(cls, t: Tensors) -> bool:
        """All tensors needed to compute ``ΔW`` are there."""
        return cls.matches(t)

    @classmethod
    def rank(cls, t: Tensors) -> int:
        """The rank alpha is divided by (0 when there is none)."""
        return 0

    @classmethod
    def full_matrix(cls, t: Tensors) -> bool:
        """No low-rank factor at all: the update is not scaled by alpha/rank."""
        return cls.rank(t) == 0

    @classmethod
    def is_tucker(cls, t: Tensors) -> bool:
        return any(key in t for key in cls.tucker_keys)

    @classmethod
    def alpha(cls, t: Tensors) -> float:
        """The stored alpha; a missing (or zero) alpha means alpha = rank, as every loader does."""
        value = t.get("alpha")
        rank = cls.rank(t)
        if value is None or float(value) == 0.0:
            return float(rank) if rank else 1.0
        return float(value)

    @classmethod
    def scale(cls, t: Tensors) -> float:
        """``scale`` if stored (A1111), 1 for full-matrix modules, else alpha/rank."""
        if "scale" in t:
            return float(t["scale"])
        if cls.full_matrix(t):
            return 1.0
        return cls.alpha(t) / cls.rank(t)

    #: the update depends on the base weight (OFT rotates it)
    multiplicative: ClassVar[bool] = False

    @classmethod
    def weight(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        """The unscaled ``ΔW`` in fp32, shaped like the base weight (``base``: that weight, which
        multiplicative variants need)."""
        raise NotImplementedError

    @classmethod
    def delta(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        """``scale · ΔW`` in fp32 (multiplier and DoRA not applied)."""
        return cls.weight(t, shape, base) * cls.scale(t)

    @classmethod
    def in_out(cls, t: Tensors) -> tuple[int, int] | None:
        """(fan-in, output width) when the tensors tell it cheaply."""
        return None

    @classmethod
    def shape(cls, t: Tensors) -> tuple[int, ...] | None:
        """The adapted layer's weight shape as far as the tensors tell it: 4-D when they keep a
        kernel, else ``(out, fan-in)`` (a flattened conv looks like a Linear); ``None`` when
        they do not tell it (OFT's blocks give the output width only)."""
        return None


class AdditiveVariant(Variant):
    """A module that stores its changes themselves: ``keys[0]`` is added to the weight, the optional
    ``keys[1]`` to the bias (no alpha, scale 1)."""

    @classmethod
    def weight(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        return t[cls.keys[0]].float().reshape(shape)

    @classmethod
    def shape(cls, t: Tensors) -> tuple[int, ...] | None:
        return tuple(int(d) for d in t[cls.keys[0]].shape)

    @classmethod
    def bias(cls, t: Tensors) -> torch.Tensor | None:
        """The bias change (``None`` when the module stores none)."""
        return t[cls.keys[1]].float() if cls.keys[1] in t else None

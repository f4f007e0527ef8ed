"""The LoRA family in one place: one variant per algorithm, one hooked module per adapted layer.

A *variant* (:class:`LoraVariant`, :class:`LohaVariant`, :class:`LokrVariant`, :class:`FullVariant`)
is the algorithm itself, written once over a dict of tensors keyed as the files name them
(``lora_down.weight``, ``hada_w1_a``, ``lokr_w2_b``...): which tensors it has, its rank, its
alpha/rank scale and its ``ΔW`` formula. :class:`Dora` is DoRA's weight decomposition, which
LyCORIS allows on top of any of them (``dora_scale``).

An *adapter* (:class:`LoraAdapter`, :class:`LohaAdapter`, :class:`LokrAdapter`,
:class:`FullAdapter`) is one adapted Linear/Conv2d: it holds the variant's tensors as
parameters (so its ``state_dict`` is the file layout), adds its update to the layer's output by
a forward hook, and merges into / unmerges from the layer's weight. Training
(:mod:`sdplugin_lora.network`), applying files (:mod:`sdplugin_lora.apply`, hooked and merged),
reading them (:mod:`sdplugin_lora.format`) and the tools (merge, extract, resize, info) all use
these classes, so training and applying cannot drift apart.

Every formula matches what kohya's sd-scripts, LyCORIS, ComfyUI and A1111 compute (the tests
write their formulas independently and compare numbers); the code is our own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from sdcore.train.memory import device_free_memory
from torch import nn

from .algos import ALGOS
from .ggpo import Ggpo

Tensors = Mapping[str, torch.Tensor]

# --- maths shared by the variants ---------------------------------------------------------------


def tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker product: ``ΔW[p, q, k, l] = Σ core[i, j, k, l] · wa[i, p] · wb[j, q]``.

    ``core`` is ``[r, r, k, k]``, ``wa`` ``[r, out]`` and ``wb`` ``[r, in]`` (2-D views).
    """
    return torch.einsum("i j k l, i p, j q -> p q k l", core, wa.flatten(1), wb.flatten(1))


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


# --- variants: the algorithms over file tensors -----------------------------------------------------


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


def _f32(t: Tensors) -> dict[str, torch.Tensor]:
    return {key: value.float() for key, value in t.items()}


class LoraVariant(Variant):
    """LoRA / LoCon (kohya ``networks.lora``, LyCORIS ``locon``): ``ΔW = up @ down``.

    For kxk convs ``lora_down`` is ``[r, in, k, k]`` and ``lora_up`` ``[out, r, 1, 1]``; with Tucker
    (``use_tucker``) ``lora_down`` is ``[r, in, 1, 1]`` and ``lora_mid`` ``[r, r, k, k]`` holds the kernel.
    """

    algo = "lora"
    markers = ("lora_down.weight", "lora_up.weight")
    keys = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
    tucker_keys = ("lora_mid.weight",)

    @classmethod
    def complete(cls, t: Tensors) -> bool:
        return "lora_down.weight" in t and "lora_up.weight" in t

    @classmethod
    def rank(cls, t: Tensors) -> int:
        return int(t["lora_down.weight"].shape[0])

    @classmethod
    def weight(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        f = _f32(t)
        up, down = f["lora_up.weight"].flatten(1), f["lora_down.weight"].flatten(1)
        if "lora_mid.weight" in f:
            return tucker(f["lora_mid.weight"], up.T, down).reshape(shape)
        return (up @ down).reshape(shape)

    @classmethod
    def in_out(cls, t: Tensors) -> tuple[int, int] | None:
        return int(t["lora_down.weight"].shape[1]), int(t["lora_up.weight"].shape[0])

    @classmethod
    def shape(cls, t: Tensors) -> tuple[int, ...] | None:
        down, out = t["lora_down.weight"], int(t["lora_up.weight"].shape[0])
        if "lora_mid.weight" in t:
            return (out, int(down.shape[1]), *(int(k) for k in t["lora_mid.weight"].shape[2:]))
        return (out, *(int(d) for d in down.shape[1:]))


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


class LokrVariant(Variant):
    """LyCORIS LoKr: ``ΔW = kron(w1, w2)``; each factor full or ``a @ b``, w2 optionally Tucker.

    Both factors full ("full dimension" LoKr) means scale 1, whatever alpha says.
    """

    algo = "lokr"
    markers = ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a")
    keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    tucker_keys = ("lokr_t2",)

    @classmethod
    def complete(cls, t: Tensors) -> bool:
        w1 = "lokr_w1" in t or ("lokr_w1_a" in t and "lokr_w1_b" in t)
        w2 = "lokr_w2" in t or ("lokr_w2_a" in t and "lokr_w2_b" in t)
        return w1 and w2

    @classmethod
    def rank(cls, t: Tensors) -> int:
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in t:
                return int(t[key].shape[0])
        return 0

    @classmethod
    def weight(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        f = _f32(t)
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:  # w2_a [r, out_n], w2_b [r, in_n], t2 [r, r, k, k]
            w2 = tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        return torch.kron(w1.contiguous(), w2.contiguous()).reshape(shape)

    @classmethod
    def shape(cls, t: Tensors) -> tuple[int, ...] | None:
        if "lokr_w1" in t:
            out_m, in_m = (int(d) for d in t["lokr_w1"].shape[:2])
        else:
            out_m, in_m = int(t["lokr_w1_a"].shape[0]), int(t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
            return (out_m * int(w2.shape[0]), in_m * int(w2.shape[1]), *(int(k) for k in w2.shape[2:]))
        if "lokr_t2" in t:  # w2_a [r, out_n], w2_b [r, in_n]
            kernel = (int(k) for k in t["lokr_t2"].shape[2:])
            return (out_m * int(t["lokr_w2_a"].shape[1]), in_m * int(t["lokr_w2_b"].shape[1]), *kernel)
        return out_m * int(t["lokr_w2_a"].shape[0]), in_m * int(t["lokr_w2_b"].shape[1])


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


class FullVariant(AdditiveVariant):
    """LyCORIS ``full``: the difference itself (``diff``, ``diff_b``), scale 1."""

    algo = "full"
    markers = ("diff",)
    keys = ("diff", "diff_b")


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


class OftVariant(Variant):
    """kohya ``networks.oft``: the output channels are rotated by a block-diagonal orthogonal
    ``R`` (Cayley transform of skew-symmetric blocks), ``W' = Rᵀ W``.

    ``oft_blocks`` is ``[blocks, size, size]`` (``size = out / blocks``); ``alpha`` is the
    constraint: the norm of all ``Q = B - Bᵀ`` together is clamped to ``alpha · out`` (0: none).
    The file's "rank" is the number of blocks and the update is not scaled by alpha/rank.

    kohya ``networks.oft_flux`` stores a ``ParameterList``: ``oft_blocks.0``, ``oft_blocks.1``...,
    one block set per row part of a fused Linear (BFL's ``qkv`` is q, k, v; ``linear1`` is q, k, v and
    the MLP input; other Linears have the one part ``oft_blocks.0``), each part ``[blocks, size_i,
    size_i]`` with its own clamp ``alpha · rows_i``: ``R`` is the block-diagonal of the parts' rotations.
    """

    algo = "oft"
    markers = ("oft_blocks",)
    keys: ClassVar[tuple[str, ...]] = ("oft_blocks",)
    multiplicative = True

    @classmethod
    def matches(cls, t: Tensors) -> bool:
        return any(key == "oft_blocks" or _oft_part_index(key) is not None for key in t)

    @staticmethod
    def parts(t: Tensors) -> list[torch.Tensor]:
        """The block sets in row order: ``[oft_blocks]``, or ``oft_blocks.0, .1...`` (kohya ``oft_flux``)."""
        if "oft_blocks" in t:
            return [t["oft_blocks"]]
        indexed = sorted((index, key) for key in t if (index := _oft_part_index(key)) is not None)
        return [t[key] for _, key in indexed]

    @classmethod
    def rank(cls, t: Tensors) -> int:
        return int(cls.parts(t)[0].shape[0])

    @classmethod
    def full_matrix(cls, t: Tensors) -> bool:
        return False

    @classmethod
    def scale(cls, t: Tensors) -> float:
        return 1.0

    @classmethod
    def constraint(cls, t: Tensors, out_dim: int) -> float:
        alpha = t.get("alpha")
        return float(alpha) * out_dim if alpha is not None else 0.0

    @classmethod
    def skew(cls, t: Tensors, out_dim: int, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """The skew-symmetric blocks ``Q = B - Bᵀ`` in fp32, their norm clamped to the constraint
        (``blocks``: one part of a multi-part module, ``out_dim`` its rows; default ``oft_blocks``)."""
        b = (t["oft_blocks"] if blocks is None else blocks).float()
        q = b - b.transpose(1, 2)
        limit = cls.constraint(t, out_dim)
        if limit > 0:
            norm = q.norm()
            q = q * ((torch.clamp(norm, max=limit) + 1e-8) / (norm + 1e-8))
        return q

    @classmethod
    def rotation(cls, t: Tensors, out_dim: int) -> torch.Tensor:
        """The ``[out, out]`` block-diagonal ``R`` in fp32 (each part clamped to ``alpha · its rows``)."""
        rotations: list[torch.Tensor] = []
        for blocks in cls.parts(t):
            count, size = int(blocks.shape[0]), int(blocks.shape[1])
            q = cls.skew(t, count * size, blocks)
            eye = torch.eye(size, device=q.device).expand(count, size, size)
            rotations.extend(((eye + q) @ torch.linalg.inv(eye - q)).unbind(0))
        r = torch.block_diag(*rotations)
        if r.shape[0] != out_dim:
            raise ValueError(f"OFT blocks cover {r.shape[0]} output rows, the layer has {out_dim}")
        return r

    @classmethod
    def weight(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError("OFT rotates the base weight: its change needs that weight")
        w = base.detach().float().reshape(shape[0], -1)
        rotated = cls.rotation(t, int(shape[0])).to(w.device).T @ w
        return (rotated - w).reshape(shape)


def _oft_part_index(key: str) -> int | None:
    """``oft_blocks.<i>`` -> ``i`` (kohya ``oft_flux``'s ParameterList keys), else ``None``."""
    head, _, index = key.partition(".")
    return int(index) if head == "oft_blocks" and index.isdigit() else None


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


def butterfly_factorization(dimension: int, factor: int = -1) -> tuple[int, int] | None:
    """LyCORIS' BOFT split (``power2factorization``): ``(b, n)`` with ``b·n = dimension``, ``b`` the largest
    even block size up to ``factor`` (-1: any) and ``n`` a power of two (the butterfly needs ``log2 n``
    levels of pairwise mixing); ``None`` when no such split exists (LyCORIS refuses the layer then)."""
    limit = dimension if factor == -1 else min(factor, dimension)
    found = None
    for size in range(2, limit + 1, 2):
        count = dimension // size
        if dimension % size == 0 and count & (count - 1) == 0:
            found = size
    return (found, dimension // found) if found else None


def lycoris_cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """LyCORIS' ``get_r`` for diag-oft and BOFT: ``Q = B - Bᵀ`` over the last two axes; when
    ``constraint > 0`` and ``‖Q‖ + 1e-8`` (all blocks together) exceeds it, ``Q`` is scaled to
    ``constraint / (‖Q‖ + 1e-8)``; then the Cayley transform ``R = (I + Q)(I - Q)⁻¹`` (orthogonal).

    kohya's clamp (:meth:`OftVariant.skew`) differs only by its ``+ 1e-8`` placement. The comparison
    runs on the device (``torch.where``), so the forward needs no host sync."""
    q = blocks.float() - blocks.float().transpose(-1, -2)
    if constraint > 0:
        norm = q.norm() + 1e-8
        q = q * torch.where(norm > constraint, constraint / norm, torch.ones_like(norm))
    eye = torch.eye(int(q.shape[-1]), device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


class DiagOftVariant(OftVariant):
    """LyCORIS ``diag-oft`` (``DiagOFTModule``): kohya's block-diagonal Cayley rotation of the output
    channels, ``W' = Rᵀ W`` per block, written by LyCORIS as ``lora_unet_...`` modules with
    ``oft_blocks`` ``[blocks, size, size]``, ``alpha`` = the constraint (``‖Q‖`` clamped to
    ``alpha · out``; 0 = none) and, with ``rescaled``, ``rescale`` ``[out, 1, ...]``:
    ``W' = rescale · Rᵀ W``.

    Its tensors are kohya OFT's plus ``rescale``: a module without ``rescale`` is told apart by its
    name only (``lora_`` prefix; kohya writes ``oft_unet_``), see :func:`variant_of`. The "rank" is the
    block size (LyCORIS' ``network_dim`` when it divides the width)."""

    algo = "diag_oft"
    keys = ("oft_blocks", "rescale")

    @classmethod
    def matches(cls, t: Tensors) -> bool:
        return "oft_blocks" in t and t["oft_blocks"].dim() == 3 and "rescale" in t

    @classmethod
    def complete(cls, t: Tensors) -> bool:
        return "oft_blocks" in t  # ``rescale`` is optional (it only marks the variant without a name)

    @classmethod
    def rank(cls, t: Tensors) -> int:
        return int(t["oft_blocks"].shape[-1])

    @classmethod
    def rotation_blocks(cls, t: Tensors, out_dim: int) -> torch.Tensor:
        """The ``[..., size, size]`` orthogonal blocks ``R`` in fp32 (LyCORIS' ``get_r``)."""
        return lycoris_cayley(t["oft_blocks"], cls.constraint(t, out_dim))

    @classmethod
    def rotate(cls, t: Tensors, w: torch.Tensor) -> torch.Tensor:
        """``Rᵀ W`` for ``W`` ``[out, fan-in]`` (the rows rotated, block by block)."""
        r = cls.rotation_blocks(t, int(w.shape[0])).to(w.device)
        count, size = int(r.shape[0]), int(r.shape[1])
        return (r.transpose(1, 2) @ w.reshape(count, size, -1)).reshape(w.shape)

    @classmethod
    def weight(cls, t: Tensors, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError(f"{cls.algo} rotates the base weight: its change needs that weight")
        w = base.detach().float().reshape(shape[0], -1)
        rotated = cls.rotate(t, w)
        if "rescale" in t:
            rotated = t["rescale"].float().reshape(-1, 1).to(w.device) * rotated
        return (rotated - w).reshape(shape)


class BoftVariant(DiagOftVariant):
    """LyCORIS ``boft`` (``ButterflyOFTModule``): ``m`` butterfly levels, each a block-diagonal Cayley
    rotation (blocks of ``b`` rows) applied after a fixed permutation of the output rows, composed
    into one orthogonal matrix; ``oft_blocks`` is ``[m, n, b, b]`` (``n·b = out``, ``n`` a power of
    two, ``m = log2 n + 1``), ``alpha`` the constraint on all levels' ``Q`` together (times ``out``),
    ``rescale`` as diag-oft's.

    Level ``i`` groups rows in pairs of runs of ``k = 2^i · b/2`` rows: row ``(c, g, j)`` (``c``
    chunk, ``g`` in {0, 1}, ``j < k``) moves to position ``(c, j, g)``, the rows are multiplied by
    ``R_i`` (``W ← R_i W`` per block of ``b``, *not* transposed, unlike diag-oft), and moved back."""

    algo = "boft"

    @classmethod
    def matches(cls, t: Tensors) -> bool:
        return "oft_blocks" in t and t["oft_blocks"].dim() == 4

    @classmethod
    def rotate(cls, t: Tensors, w: torch.Tensor) -> torch.Tensor:
        r = cls.rotation_blocks(t, int(w.shape[0])).to(w.device)
        out, size = int(w.shape[0]), int(r.shape[-1])
        for level, blocks in enumerate(r.unbind(0)):
            k = 2**level * (size // 2)
            order = torch.arange(out, device=w.device).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
            mixed = (blocks @ w[order].reshape(out // size, size, -1)).reshape(w.shape)
            w = torch.empty_like(mixed).index_copy_(0, order, mixed)
        return w


VARIANTS: tuple[type[Variant], ...] = (
    LoraVariant,
    LohaVariant,
    LokrVariant,
    FullVariant,
    BoftVariant,
    DiagOftVariant,
    OftVariant,
    NormVariant,
    Ia3Variant,
    GloraVariant,
)


def variant_of(t: Tensors, key: str | None = None) -> type[Variant] | None:
    """The variant whose tensors ``t`` holds (``None`` when none is complete).

    ``key`` is the module's name in the file, when known: 3-D ``oft_blocks`` under a LyCORIS name
    (``lora_unet_``/``lora_te``...) are diag-oft, under kohya's ``oft_unet_`` kohya OFT, as ComfyUI
    tells them apart (it loads ``lora_`` modules with LyCORIS' maths and no ``oft_unet_`` module).
    Without a name, only ``rescale`` marks diag-oft; the two compute the same change without it."""
    for variant in VARIANTS:
        if variant.matches(t):
            if variant is OftVariant and key is not None and not key.startswith("oft_"):
                variant = DiagOftVariant
            return variant if variant.complete(t) else None
    return None


# --- DoRA ---------------------------------------------------------------------------------------


class Dora:
    """DoRA's weight decomposition: ``W' = magnitude · (W + ΔW) / ‖W + ΔW‖``.

    We write the magnitude per *input* channel (``dora_scale`` shaped ``[1, in]`` / ``[1, in, 1, 1]``,
    the norm taken over the output and kernel axes; LyCORIS ``wd_on_out=False``), because that is
    the layout A1111 and ComfyUI compute correctly (see the package README). Files with the
    LyCORIS ``wd_on_out=True`` layout (``[out, 1, ...]``) are read with their own axis.
    A multiplier ``m`` applies to the resulting change: ``W + m · (W' - W)``, as the UIs do.
    """

    @staticmethod
    def magnitude(weight: torch.Tensor) -> torch.Tensor:
        """The initial ``dora_scale`` (``‖W‖`` per input channel), so training starts at identity."""
        w = weight.detach().float()
        return Dora.norm(w, per_output=False)

    @staticmethod
    def norm(weight: torch.Tensor, *, per_output: bool) -> torch.Tensor:
        """``‖W‖`` per output row (``[out, 1, ...]``) or per input channel (``[1, in, ...]``)."""
        rest = [1] * (weight.dim() - 2)
        if per_output:
            return weight.flatten(1).norm(dim=1).reshape(weight.shape[0], 1, *rest)
        return weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, weight.shape[1], *rest)

    @staticmethod
    def per_output(magnitude: torch.Tensor, weight_shape: tuple[int, ...]) -> bool:
        """Which axis a stored magnitude belongs to, from its shape."""
        out = weight_shape[0]
        if magnitude.dim() == 1:
            return magnitude.shape[0] == out
        # [1, 1] is per output row for a layer of one output and several inputs (PEFT's magnitudes, read as [out, 1])
        return magnitude.shape[0] == out and magnitude.shape[1] == 1 and (out != 1 or weight_shape[1] != 1)

    @staticmethod
    def apply(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """``W'`` in fp32 from the base weight, the scaled ``ΔW`` and the stored magnitude."""
        merged = base.float() + delta
        per_output = Dora.per_output(magnitude, tuple(base.shape))
        norm = Dora.norm(merged, per_output=per_output)
        return merged * (magnitude.float().reshape(norm.shape) / norm)


def rank_dropout_mask(size: int, p: float, rescale: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """LyCORIS' rank-dropout mask: ``size`` entries kept with probability ``1 - p`` (one draw of
    ``torch.rand(size)``), and with ``rescale`` (LyCORIS ``rank_dropout_scale``) divided by their
    mean (``drop /= drop.mean()``), so the kept entries make up for the dropped ones in this very
    draw (not by the expected ``1/(1-p)``). A draw that drops everything stays all zero (LyCORIS
    would divide 0 by 0)."""
    mask = (torch.rand(size, device=device) > p).float()
    if rescale:
        mask = mask / mask.mean().clamp(min=1.0 / size)
    return mask


def lora_input(x: torch.Tensor, training: bool, p: float | None) -> torch.Tensor:
    """The LoRA branch's input: ``x`` after PEFT's ``lora_dropout`` while training (``--lora-input-dropout``).

    PEFT computes ``lora_B(lora_A(dropout(x))) * scaling`` (``peft.tuners.lora.layer.Linear.forward``): the
    dropout (``nn.Dropout``: zero with probability p, the rest divided by ``1 - p``, a fresh mask per forward
    from torch's global generator) is on the input features the LoRA reads, the base layer seeing ``x`` as it is.
    kohya's ``--dropout`` drops the down projection's output instead (:func:`scaled_hidden`)."""
    if training and p:
        return torch.nn.functional.dropout(x, p=p)
    return x


def scaled_hidden(
    hidden: torch.Tensor,
    scale: float | torch.Tensor,
    training: bool,
    dropout: float | None,
    rank_dropout: float | None,
) -> torch.Tensor:
    """kohya's LoRA hidden state ``down(x)`` after neuron and rank dropout (training only), times
    ``scale`` (multiplier · alpha/rank; rank dropout divides it by ``1 - p``). Scaling the rank-sized
    hidden state is cheaper than scaling the output. ``scale`` may be a tensor broadcasting over
    ``hidden`` (per-sample strengths, :meth:`Adapter.sample_factor`)."""
    if training and dropout:
        hidden = torch.nn.functional.dropout(hidden, p=dropout)
    if training and rank_dropout:
        rank = hidden.shape[1] if hidden.dim() == 4 else hidden.shape[-1]
        mask = (torch.rand(hidden.shape[0], rank, device=hidden.device) > rank_dropout).to(hidden.dtype)
        if hidden.dim() == 4:
            mask = mask[:, :, None, None]
        elif hidden.dim() == 3:
            mask = mask[:, None, :]
        hidden = hidden * mask
        scale = scale / (1.0 - rank_dropout)
    return hidden * scale


# --- the change cache of sampling and validation ------------------------------------------------------


class ChangeCache:
    """The weight changes ``m · ΔW`` of the adapters that rebuild them each forward (LoHa, LoKr, DoRA,
    OFT/diag-oft/BOFT, (IA)^3, GLoRA, full, Tucker LoCon), each computed once, fp32, while the weights
    cannot change: the sample images' denoising steps and the validation loss, under ``no_grad``
    (:meth:`sdplugin_lora.network.LoraNetwork.cached_changes`). A forward then costs the base layer's op
    with the cached weight, exactly the rebuilt forward's numbers (the same fp32 tensor, computed by the
    same code; the multiplier, per-sample strengths, the bias change and module dropout are applied as
    before).

    A cached change is used only while its key holds (:meth:`Adapter._cache_key`: multiplier, scales and
    the version counter of every tensor it was computed from), so a change of any of them rebuilds it.
    Each change is built at the layer's first forward and counted against a budget per device:
    ``max_bytes``, or half of what the device can still allocate when the first change is built there
    (:func:`sdcore.train.memory.device_free_memory`); a change over the budget is not kept and that layer rebuilds its change every
    forward, as without the cache (a large model's fp32 changes can exceed the memory left: a LoHa over
    every SDXL UNet layer changes about 2.5 billion weights, 10 GB in fp32)."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._left: dict[torch.device, int] = {}
        self._entries: dict[int, tuple[tuple[Any, ...], torch.Tensor]] = {}
        #: forwards served from the cache, changes built (kept or not), changes over the budget
        self.hits = 0
        self.builds = 0
        self.refused = 0

    @property
    def nbytes(self) -> int:
        """Bytes the kept changes hold."""
        return sum(weight.numel() * weight.element_size() for _, weight in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def weight(self, adapter: Adapter) -> torch.Tensor:
        """``adapter``'s ``m · ΔW`` in fp32, from the cache while its key holds, else built (and kept when
        the budget allows)."""
        key = adapter._cache_key()
        entry = self._entries.get(id(adapter))
        if entry is not None:
            if entry[0] == key:
                self.hits += 1
                return entry[1]
            self._drop(id(adapter))
        with torch.no_grad():
            weight = adapter._change() * adapter.multiplier
        self.builds += 1
        size = weight.numel() * weight.element_size()
        left = self._left.get(weight.device)
        if left is None:
            left = self.max_bytes if self.max_bytes is not None else (device_free_memory(weight.device) or 0) // 2
        if size > left:
            self.refused += 1
            self._left[weight.device] = left
            return weight
        self._left[weight.device] = left - size
        self._entries[id(adapter)] = (key, weight)
        return weight

    def _drop(self, key: int) -> None:
        _, weight = self._entries.pop(key)
        self._left[weight.device] += weight.numel() * weight.element_size()

    def clear(self) -> None:
        """Let every change go (the memory returns to the allocator)."""
        self._entries.clear()
        self._left.clear()


# --- adapters: one adapted layer --------------------------------------------------------------------


def _bake_scalar_hook(module: Adapter, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` hook: the file holds ``scalar_key · scalar`` (LyCORIS' ``custom_state_dict``)."""
    if module.scalar != 1.0 and module._bake_scalar and module.scalar_key:
        key = prefix + module.scalar_key
        state[key] = state[key] * module.scalar


#: where a module's trainable ``lora_up`` bias (:attr:`LoraAdapter.up_bias`) sits in files and states: PEFT's and
#: BFL's ``lora_B.bias`` in sdcore's own key names (:mod:`sdplugin_lora.format` maps the two)
UP_BIAS_KEY = "lora_up.bias"


def _up_bias_save_hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` hook: the ``up_bias`` parameter under its file name, ``lora_up.bias``."""
    if prefix + "up_bias" in state:
        state[prefix + UP_BIAS_KEY] = state.pop(prefix + "up_bias")


def _up_bias_load_hook(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: a file's ``lora_up.bias`` into the ``up_bias`` parameter."""
    if prefix + UP_BIAS_KEY in state:
        state[prefix + "up_bias"] = state.pop(prefix + UP_BIAS_KEY)


def _add_up_bias(module: nn.Module, rows: int, like: torch.Tensor) -> nn.Parameter:
    """A zero ``lora_up`` bias of ``rows`` values for ``module`` to train (PEFT's ``lora_bias=True``: ``lora_B``
    is built with a bias and ``reset_lora_parameters`` zeroes it with the weight, so the change starts at zero),
    saved and loaded as ``lora_up.bias``."""
    module._register_state_dict_hook(_up_bias_save_hook)
    module._register_load_state_dict_pre_hook(_up_bias_load_hook, with_module=True)
    return nn.Parameter(torch.zeros(rows, dtype=torch.float32, device=like.device))


class Adapter(nn.Module):
    """What every adapted layer shares: the base reference, scale, multiplier, hook, merge.

    ``state_dict()`` is the module's part of the file (``alpha`` plus the variant's tensors and
    ``dora_scale``). The base layer is a plain reference, never a submodule, so the base model's
    ``state_dict`` keeps its names and no base weight is saved.
    """

    variant: ClassVar[type[Variant]]
    algo: ClassVar[str]
    #: the tensor LyCORIS bakes its ``scalar`` into when saving (``""``: the module has no scalar)
    scalar_key: ClassVar[str] = ""
    base: Any
    alpha: torch.Tensor
    dora_scale: nn.Parameter | None
    #: dropout probability of whole output rows of ``ΔW`` while training (see :meth:`delta`)
    rank_dropout: float | None = None
    #: LyCORIS ``rank_dropout_scale``: the rank-dropout mask is divided by its mean (:func:`rank_dropout_mask`)
    rank_dropout_scale: bool = False
    #: per-sample strengths ``[B]`` of the batch being trained (kohya's per-dataset
    #: ``network_multiplier``), set by :meth:`sdplugin_lora.network.LoraNetwork.sample_strengths`;
    #: ``None`` (the usual case) leaves the forward exactly as it is without them
    sample_strength: torch.Tensor | None = None
    #: the change cache of a sampling/validation pass (:meth:`sdplugin_lora.network.LoraNetwork.cached_changes`)
    _change_cache: ChangeCache | None = None
    #: kohya's LoRA-GGPO state (:mod:`sdplugin_lora.ggpo`, plain LoRA only); ``None``: off, no cost
    ggpo: Ggpo | None = None

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None,
        *,
        multiplier: float = 1.0,
        module_dropout: float | None = None,
        dora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{name}: LoRA needs a Linear or Conv2d, got {type(base).__name__}")
        self.lora_name = name
        object.__setattr__(self, "base", base)
        self.rank = rank
        if alpha is None or alpha == 0:
            alpha = float(rank)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self._scale = float(alpha) / rank if rank else 1.0  # a Python float: no device sync per forward
        #: LyCORIS' per-module ``scalar``: 1 unless max-norm regularisation rescaled the module
        #: (LoHa, DoRA, Tucker LoCon). It multiplies the change in the forward and is baked into
        #: :attr:`scalar_key` in ``state_dict()`` (what files hold), as LyCORIS' ``custom_state_dict``
        #: does; loading a state resets it to 1, as LyCORIS does.
        self.scalar = 1.0
        self._bake_scalar = True
        self._register_state_dict_hook(_bake_scalar_hook)
        self.multiplier = multiplier
        self.module_dropout = module_dropout
        self._handle: Any = None
        self._frozen: torch.Tensor | None = None
        self.dora_scale = nn.Parameter(Dora.magnitude(base.weight)) if dora else None  # type: ignore[arg-type]

    # --- identity --------------------------------------------------------------------------------
    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    @property
    def is_dora(self) -> bool:
        return self.dora_scale is not None

    @property
    def is_tucker(self) -> bool:
        return self.variant.is_tucker(self.tensors())

    @property
    def scale(self) -> float:
        return self._scale

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.rank:
            self._scale = float(self.alpha) / self.rank
        self.scalar = 1.0
        self._frozen = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The variant's tensors by file name (``lora_down.weight``, ``hada_w1_a``...), live."""
        return {key: value for key, value in self.named_parameters() if key != "dora_scale"}

    # --- the update ------------------------------------------------------------------------------
    def delta_weight(self, *, detach: bool = True) -> torch.Tensor:
        """The change of the base weight at multiplier 1, in fp32 (DoRA: ``W' - W``)."""
        return self._change(detach=detach)

    def _change(self, *, detach: bool = True, rows: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`delta_weight`, with ``rows`` a 0/1 mask over the output rows of the scaled ``ΔW``
        (LyCORIS' rank dropout), applied before DoRA's decomposition as LyCORIS does."""
        t = self.tensors()
        if detach:
            t = {key: value.detach() for key, value in t.items()}
        shape = tuple(self.base.weight.shape)
        delta = self.variant.weight(t, shape, self.base.weight) * (self._scale * self.scalar)
        if rows is not None:
            delta = delta * rows.to(delta.device).reshape(-1, *[1] * (delta.dim() - 1))
        if self.dora_scale is not None:
            base = self.base.weight.detach().float()
            magnitude = self.dora_scale.detach() if detach else self.dora_scale
            return Dora.apply(base, delta, magnitude) - base
        return delta

    def sample_factor(self, t: torch.Tensor) -> torch.Tensor | None:
        """:attr:`sample_strength` shaped ``[N, 1, ...]`` to scale ``t`` (batch first) per sample, in
        ``t``'s dtype, or ``None`` without strengths.

        ``N`` may be a multiple ``k·B`` of the batch: the text encoders see each prompt's 77-token
        chunks as ``k`` consecutive rows (``[B, k, 77]`` reshaped), so each strength repeats ``k`` times."""
        strength = self.sample_strength
        if strength is None:
            return None
        rows, batch = int(t.shape[0]), int(strength.shape[0])
        if rows != batch:
            if rows % batch:
                raise RuntimeError(f"{self.lora_name}: {batch} per-sample strengths do not fit an input of {rows} rows")
            strength = strength.repeat_interleave(rows // batch)
        return strength.to(device=t.device, dtype=t.dtype).reshape(rows, *[1] * (t.dim() - 1))

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
        """The output increment for input ``x`` (multiplier applied; per-sample strengths too).

        While training with ``rank_dropout`` p, LyCORIS' rank dropout of the weight-rebuilding
        algorithms (LoHa, LoKr, DoRA): each output row of ``ΔW`` is dropped with probability p, one
        draw per forward for the whole batch, not rescaled unless :attr:`rank_dropout_scale` (then
        divided by the mask's mean, as LyCORIS' ``rank_dropout_scale=True``).

        The increment is linear in the multiplier for every algorithm (DoRA and OFT too: the multiplier
        scales ``W' - W``), so sample ``b`` at strength ``s_b`` is the increment times ``s_b``."""
        cached = self._cached_weight() if self._frozen is None else self._frozen
        if cached is not None:
            out = self._apply_weight(x, cached.to(device=x.device))
        else:
            rows = None
            if self.training and self.rank_dropout:
                rows = rank_dropout_mask(int(self.base.weight.shape[0]), self.rank_dropout, self.rank_dropout_scale)
            out = self._apply_weight(x, self._change(detach=False, rows=rows) * self.multiplier)
        factor = self.sample_factor(out)
        return out if factor is None else out * factor

    # --- hooks -----------------------------------------------------------------------------------
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

    def freeze(self) -> Adapter:
        """For applying a file: no gradients, eval mode, and the weight update computed once
        (fp32) unless the factorised forward is cheaper (plain LoRA)."""
        self.requires_grad_(False)
        self.eval()
        if not self._factorised():
            self._frozen = self.delta_weight() * self.multiplier
        return self

    def _factorised(self) -> bool:
        return False

    def _cached_weight(self) -> torch.Tensor | None:
        """``m · ΔW`` from the :class:`ChangeCache` the adapter is in (:meth:`LoraNetwork.cached_changes`),
        or ``None``: no cache, or a forward that must rebuild the change (gradients enabled, or rank
        dropout while training: a new mask each forward)."""
        cache = self._change_cache
        if cache is None or torch.is_grad_enabled() or (self.training and self.rank_dropout):
            return None
        return cache.weight(self)

    def _cache_key(self) -> tuple[Any, ...]:
        """What :meth:`_change` · multiplier depends on: the multiplier and scales, the autocast state (it
        changes the precision of the rebuild's matmuls), and every tensor read (the variant's,
        ``dora_scale``, the base weight) by storage and version counter, so an in-place update (an
        optimizer step, EMA weights swapped in, a ``load_state_dict``) or a move shows."""
        weights = self._layer_weights()
        tensors = [*self.tensors().values(), *weights]
        if self.dora_scale is not None:
            tensors.append(self.dora_scale)
        stamps = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)
        kind = weights[0].device.type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        return (self.multiplier, self._scale, self.scalar, autocast, *stamps)

    def _layer_weights(self) -> list[torch.Tensor]:
        """The weights of the layers the module adapts (the first one's device decides the autocast state)."""
        return [self.base.weight]  # type: ignore[list-item]

    # --- merge / unmerge -------------------------------------------------------------------------
    def merge(self, multiplier: float | None = None) -> torch.Tensor:
        """Add ``m · ΔW`` to the base weight (fp32 maths, then cast); returns the previous weight
        (on CPU) for :meth:`unmerge`, which restores it bit for bit."""
        m = self.multiplier if multiplier is None else multiplier
        param = self.base.weight
        backup = param.detach().to("cpu", copy=True)
        delta = self.delta_weight().to(param.device)
        with torch.no_grad():
            param.copy_((param.detach().float() + delta * m).to(param.dtype))
        self._merge_bias(m)
        return backup

    def unmerge(self, backup: torch.Tensor) -> None:
        with torch.no_grad():
            self.base.weight.copy_(backup.to(self.base.weight.device))
        self._unmerge_bias()

    def bias_change(self, *, detach: bool = True) -> torch.Tensor | None:
        """The change of the layer's bias at multiplier 1, in fp32 (``None``: the module changes no bias)."""
        return None

    def _merge_bias(self, m: float) -> None:
        """``bias + m · bias_change`` (LyCORIS ``full``'s ``diff_b``, ``train_norm``'s ``b_norm``), backed up
        for :meth:`unmerge`."""
        change = self.bias_change()
        if change is None:
            return
        bias = self.base.bias
        if bias is None:
            raise ValueError(f"{self.lora_name}: the module changes a bias but the layer has none")
        self._bias_backup = bias.detach().to("cpu", copy=True)
        with torch.no_grad():
            bias.copy_((bias.detach().float() + change.to(bias.device) * m).to(bias.dtype))

    def _unmerge_bias(self) -> None:
        backup = getattr(self, "_bias_backup", None)
        if backup is not None:
            with torch.no_grad():
                self.base.bias.copy_(backup.to(self.base.bias.device))
            self._bias_backup = None

    # --- files -----------------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0) -> Adapter:
        """An adapter holding a file module's tensors (fp32 copies) on ``base``."""
        variant = cls.variant
        adapter = cls.__new__(cls)
        Adapter.__init__(adapter, name, base, variant.rank(t), variant.alpha(t), multiplier=multiplier)
        adapter._scale = variant.scale(t)
        for key in variant.keys:
            if key in t:
                adapter.register_parameter(key, nn.Parameter(t[key].detach().float().clone()))
        if "dora_scale" in t:
            adapter.dora_scale = nn.Parameter(t["dora_scale"].detach().float().clone())
        return adapter


class LoraAdapter(Adapter):
    """LoRA / LoCon: ``y = W x + m · s · up(down(x))`` (Tucker: ``up(mid(down(x)))``).

    For a kxk convolution ``lora_down`` is a conv with the original kernel, stride and padding and
    ``lora_up`` a 1x1 conv, exactly as kohya (``C3Lier``) stores them; with ``tucker`` the kernel
    moves to ``lora_mid`` as LyCORIS ``use_tucker`` does. With ``dora`` the update goes through
    :class:`Dora` (computed as a weight: rank dropout drops rows of ``ΔW`` as LyCORIS does, neuron
    dropout does not apply, as in LyCORIS' weight path).
    """

    variant = LoraVariant
    algo = "lora"
    scalar_key = "lora_up.weight"
    lora_down: Any
    lora_up: Any
    lora_mid: Any

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
        dora: bool = False,
        tucker: bool = False,
        rank_dropout_scale: bool = False,
        lora_bias: bool = False,
        input_dropout: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(name, base, rank, alpha, multiplier=multiplier, module_dropout=module_dropout, dora=dora)
        self.rank_dropout_scale = rank_dropout_scale
        #: PEFT's ``lora_dropout`` (``--lora-input-dropout``): on the input of ``lora_down``, training only
        #: (:func:`lora_input`); each module draws its own mask, as PEFT's separate ``to_q``/``to_k``/``to_v`` do
        self.input_dropout = input_dropout
        self.lora_mid = None
        if isinstance(base, nn.Conv2d):
            kernel = tuple(base.kernel_size)
            if tucker and kernel != (1, 1):
                self.lora_down = nn.Conv2d(base.in_channels, rank, 1, bias=False, dtype=dtype)
                self.lora_mid = nn.Conv2d(
                    rank,
                    rank,
                    base.kernel_size,  # type: ignore[arg-type]
                    base.stride,  # type: ignore[arg-type]
                    base.padding,  # type: ignore[arg-type]
                    dilation=base.dilation,  # type: ignore[arg-type]
                    bias=False,
                    dtype=dtype,
                )
            else:
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
        self._init_down()
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        #: ``lora_up``'s bias when a file has one (BFL's ``LinearLora``: ``lora_B.bias``), scaled with the rest;
        #: ``lora_bias`` trains one from zero (``--lora-bias``, PEFT's ``lora_bias``)
        self.up_bias: nn.Parameter | None = None
        if lora_bias:
            self.up_bias = _add_up_bias(self, int(self.lora_up.weight.shape[0]), self.lora_up.weight)

    def _init_down(self) -> None:
        """The down's (and Tucker core's) init after the layers are built: kaiming-uniform(a=√5), as
        kohya's ``networks.lora`` and LyCORIS draw it (a subclass drawing otherwise draws only its own)."""
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if self.lora_mid is not None:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))

    def _factorised(self) -> bool:
        return self.dora_scale is None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``m · s · up(down(x))`` with kohya's neuron/rank dropout while training.

        With :attr:`rank_dropout_scale` the rank dropout is LyCORIS' (``LoConModule.forward``, which
        rebuilds the weight: LyCORIS' bypass forward is off unless asked) instead of kohya's: whole
        output rows of ``ΔW`` dropped, one mask for the whole batch divided by its mean, and no neuron
        dropout (LyCORIS' rebuilt weight has none), rather than a rank-channel mask per sample times
        ``1/(1-p)``. That is :meth:`Adapter.delta`'s path, the one LoHa/LoKr/DoRA take."""
        if not self._factorised() or self._frozen is not None:
            return self._with_bias(super().delta(x))
        if self.training and self.rank_dropout and self.rank_dropout_scale:
            return self._with_bias(super().delta(x))
        out = self._with_bias(self._factorised_delta(x))
        if self.ggpo is not None and self.training:  # kohya's GGPO noise, training forwards only
            noise = self.ggpo.output(x, self.base, self.lora_up.weight.dtype)
            if noise is not None:
                out = out + noise.to(out.dtype)
        return out

    def bias_change(self, *, detach: bool = True) -> torch.Tensor | None:
        """``s · lora_up.bias`` (BFL's ``LinearLora`` adds ``lora_B(lora_A(x)) · scale``, its bias included, as
        PEFT's ``lora_bias`` does for diffusers), ``None`` without one."""
        if self.up_bias is None:
            return None
        bias = self.up_bias.detach() if detach else self.up_bias
        return bias.float() * (self._scale * self.scalar)

    def _with_bias(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus ``m · s · lora_up.bias`` (per-sample strengths too) when the module has that bias."""
        change = self.bias_change(detach=False)
        if change is None:
            return out
        term = (change * self.multiplier).to(out.dtype)
        if out.dim() == 4:  # a conv's output: channels first
            term = term.reshape(-1, 1, 1)
        factor = self.sample_factor(out)
        return out + (term if factor is None else term * factor)

    def _factorised_delta(self, x: torch.Tensor) -> torch.Tensor:
        inputs = lora_input(self._input(x, self.lora_down.weight.dtype), self.training, self.input_dropout)
        hidden = self.lora_down(inputs)
        if self.lora_mid is not None:
            hidden = self.lora_mid(hidden)
        scale: float | torch.Tensor = self._scale * self.scalar * self.multiplier
        factor = self.sample_factor(hidden)
        if factor is not None:  # kohya: lx * multiplier * scale, the multiplier one per sample
            scale = factor * scale
        hidden = scaled_hidden(hidden, scale, self.training, self.dropout, self.rank_dropout)
        return self.lora_up(hidden)

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0) -> Adapter:
        variant = cls.variant
        rank = variant.rank(t)
        adapter = cls(
            name,
            base,
            rank,
            variant.alpha(t),
            multiplier=multiplier,
            tucker="lora_mid.weight" in t,
            dora="dora_scale" in t,
        )
        adapter._scale = variant.scale(t)
        with torch.no_grad():
            for key, param in adapter.named_parameters():
                if key in t and key != "dora_scale":
                    param.copy_(t[key].detach().float().reshape(param.shape))
        if "dora_scale" in t:  # kept in the file's layout: it tells the axis
            adapter.dora_scale = nn.Parameter(t["dora_scale"].detach().float().clone())
        if "lora_up.bias" in t:
            adapter.up_bias = nn.Parameter(t["lora_up.bias"].detach().float().clone().reshape(-1))
        return adapter


class MemberHooks:
    """One module over the diffusers parts ("members") of one fused SAI/BFL Linear (``qkv``, ``linear1``):
    their paths, their rows of the fused weight, one forward hook on each, and the value the members
    called with the same input share (:meth:`_shared`). No merge: the members are separate layers.

    The shared value is cached for one input: reused only for the very same tensor, unchanged (its
    version counter), under the same ``key`` (mode, multiplier...), before any backward through it, and
    let go once every member has read it."""

    bases: tuple[nn.Module, ...]
    paths: tuple[str, ...]
    rows: list[tuple[int, int]]

    def _init_members(self, paths: Sequence[str], layers: Sequence[nn.Module]) -> None:
        self.paths = tuple(paths)
        object.__setattr__(self, "bases", tuple(layers))  # not submodules: the model owns them
        self.rows = []
        start = 0
        for layer in layers:
            out = int(layer.weight.shape[0])  # type: ignore[union-attr,index]
            self.rows.append((start, start + out))
            start += out
        self._handles: list[Any] = []
        self._cache: list[Any] | None = None

    def _member_hook(self, i: int, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attach(self) -> None:
        if not self._handles:
            self._handles = [
                layer.register_forward_hook(functools.partial(self._member_hook, i))
                for i, layer in enumerate(self.bases)
            ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._cache = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _shared(self, x: torch.Tensor, key: tuple[Any, ...], compute: Any) -> torch.Tensor | None:
        """``compute()`` for input ``x``, or the value a member computed for this very ``x`` under ``key``."""
        key = (-1 if x.is_inference() else x._version, *key)  # inference tensors keep no version counter
        cache = self._cache
        if cache is not None and cache[0] is x and cache[1] == key:
            cache[3] += 1
            value = cache[2]
            if cache[3] >= len(self.bases):  # every member served: let go of the input
                self._cache = None
            return value  # type: ignore[no-any-return]
        value = compute()
        self._cache = None
        if len(self.bases) > 1:
            token = object()
            self._cache = [x, key, value, 1, token]
            if value is not None and value.requires_grad:  # a backward frees its graph: never reuse it after
                value.register_hook(lambda grad, token=token: self._forget(token))
        return value  # type: ignore[no-any-return]

    def _forget(self, token: object) -> None:
        if self._cache is not None and self._cache[4] is token:
            self._cache = None

    def merge(self, multiplier: float | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{getattr(self, 'lora_name', '')}: save the network and apply the file to merge it")


class SharedDownLora(MemberHooks, Adapter):
    """kohya's default LoRA on a fused SAI/BFL Linear, trained on the diffusers modules it stacks.

    SD3's and Flux's checkpoints compute q, k and v (Flux's single blocks: and the MLP input) with
    one ``qkv``/``linear1`` Linear, and kohya's ``lora_sd3``/``lora_flux`` put *one* LoRA on it by
    default: ``down [r, in]``, ``up [Σ rows, r]``, ``alpha``. diffusers splits that Linear into
    ``to_q``, ``to_k``, ``to_v`` (``proj_mlp``), which read the same input, so the same LoRA is one
    ``down`` shared by those members and, per member, its rows of ``up``:
    ``ΔW_member = up[rows] @ down · alpha/r``. Trained that way it has kohya's parameter count
    and init (down kaiming-uniform, up zeros), and its ``state_dict`` *is* kohya's fused module
    (``lora_down.weight``, ``lora_up.weight``, ``alpha`` under the kohya name).

    Each member's forward hook adds its rows of ``up(down(x))``. The hidden state ``down(x)`` is
    computed once per input and reused by the other members called with the very same tensor
    (diffusers' attention processors pass one tensor to ``to_q``, ``to_k`` and ``to_v``), so the
    group costs one ``down`` as kohya's module does, and dropout, rank dropout and module dropout
    are drawn once for the whole group, exactly as on kohya's fused module.
    """

    variant = LoraVariant
    algo = "lora"
    lora_down: nn.Linear
    lora_up: nn.Linear
    bases: tuple[nn.Module, ...]

    def __init__(
        self,
        name: str,
        members: Sequence[tuple[str, nn.Module]],
        rank: int,
        alpha: float | None = None,
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        lora_bias: bool = False,
        input_dropout: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not members:
            raise ValueError(f"{name}: a shared-down LoRA needs at least one member")
        layers = [layer for _, layer in members]
        if not all(isinstance(layer, nn.Linear) for layer in layers):
            raise TypeError(f"{name}: a shared-down LoRA needs Linear members")
        widths = {int(layer.in_features) for layer in layers}  # type: ignore[arg-type]
        if len(widths) != 1:
            raise ValueError(f"{name}: members read inputs of different widths {sorted(widths)}")
        super().__init__(name, layers[0], rank, alpha, multiplier=multiplier, module_dropout=module_dropout)
        self._init_members([path for path, _ in members], layers)
        self.lora_down = nn.Linear(widths.pop(), rank, bias=False, dtype=dtype)
        self.lora_up = nn.Linear(rank, self.rows[-1][1], bias=False, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        #: PEFT's ``lora_dropout`` on the input (``--lora-input-dropout``): drawn once per input in :meth:`_hidden`,
        #: so the members share one mask, as PEFT's one module on a fused ``to_qkv`` draws one
        self.input_dropout = input_dropout
        #: ``--lora-bias``: the fused module's ``lora_up`` bias (BFL's ``lora_B.bias`` of a ``qkv``/``linear1``),
        #: each member adding its rows, from zero as PEFT's ``lora_bias``
        self.up_bias: nn.Parameter | None = None
        if lora_bias:
            self.up_bias = _add_up_bias(self, self.rows[-1][1], self.lora_up.weight)

    def bias_change(self, *, detach: bool = True) -> torch.Tensor | None:
        """``s · lora_up.bias`` over the fused rows (``None`` without ``--lora-bias``)."""
        if self.up_bias is None:
            return None
        bias = self.up_bias.detach() if detach else self.up_bias
        return bias.float() * self._scale

    def _bias_term(self, out: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """``out`` plus ``m · s · bias[lo:hi]`` (per-sample strengths too), as :meth:`LoraAdapter._with_bias`."""
        change = self.bias_change(detach=False)
        if change is None:
            return out
        term = (change[lo:hi] * self.multiplier).to(out.dtype)
        factor = self.sample_factor(out)
        return out + (term if factor is None else term * factor)

    @property
    def out_features(self) -> int:
        return self.rows[-1][1]

    def _factorised(self) -> bool:
        return True  # always up(down(x)): freezing precomputes nothing

    def delta_weight(self, *, detach: bool = True) -> torch.Tensor:
        """The fused module's change ``[Σ rows, in]`` (members' rows stacked in kohya's order)."""
        up, down = self.lora_up.weight, self.lora_down.weight
        if detach:
            up, down = up.detach(), down.detach()
        return (up.float() @ down.float()) * self._scale

    def member_deltas(self) -> dict[str, torch.Tensor]:
        """Each member's change (its rows of :meth:`delta_weight`), by module path."""
        delta = self.delta_weight()
        return {path: delta[lo:hi] for path, (lo, hi) in zip(self.paths, self.rows, strict=True)}

    # --- hooks -----------------------------------------------------------------------------------
    def _hidden(self, x: torch.Tensor) -> torch.Tensor | None:
        """``m · s · down(x)`` after the dropouts, shared by the members called with this ``x``
        (``None``: module dropout skips the group for this input; :meth:`MemberHooks._shared`)."""

        def compute() -> torch.Tensor | None:
            if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
                return None
            inputs = lora_input(self._input(x, self.lora_down.weight.dtype), self.training, self.input_dropout)
            hidden = self.lora_down(inputs)
            scale: float | torch.Tensor = self._scale * self.multiplier
            factor = self.sample_factor(hidden)
            if factor is not None:
                scale = factor * scale
            return scaled_hidden(hidden, scale, self.training, self.dropout, self.rank_dropout)

        key = (self.lora_down.weight._version, self.training, torch.is_grad_enabled(), self.multiplier,
               id(self.sample_strength))  # fmt: skip
        return self._shared(x, key, compute)

    def _member_hook(self, i: int, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0:
            return output
        hidden = self._hidden(args[0])
        if hidden is None:
            return output
        lo, hi = self.rows[i]
        out = output + nn.functional.linear(hidden, self.lora_up.weight[lo:hi]).to(output.dtype)
        if self.ggpo is not None and self.training:  # kohya's GGPO noise: this member's rows of the fused one
            noise = self.ggpo.output(args[0], module, self.lora_up.weight.dtype, (lo, hi))
            if noise is not None:
                out = out + noise.to(out.dtype)
        return self._bias_term(out, lo, hi)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The fused module's output increment ``[..., Σ rows]`` for input ``x``."""
        hidden = self.lora_down(self._input(x, self.lora_down.weight.dtype))
        scale: float | torch.Tensor = self._scale * self.multiplier
        factor = self.sample_factor(hidden)
        if factor is not None:
            scale = factor * scale
        return self._bias_term(self.lora_up(scaled_hidden(hidden, scale, False, None, None)), 0, self.out_features)


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


class DyLoraAdapter(Adapter):
    """kohya's DyLoRA (``networks.dylora``): a LoRA trained so that its leading ranks work alone.

    The rank ``r`` is kept as ``r`` rows of ``lora_down`` and ``r`` columns of ``lora_up``, each its
    own parameter (as kohya's ``lora_A``/``lora_B`` parameter lists), so an optimizer only ever sees
    the rows a step trained (a row without a gradient gets no update, no weight decay and no Adam
    step, exactly as in kohya). At each training forward a slice start ``b`` is drawn uniformly from
    ``{0, unit, 2·unit, ..., r - unit}`` and the forward is (kohya's rule)::

        y = W x + (alpha / r) · sqrt(r / (b + unit)) · up(down(x))

    with the *whole* ``up``/``down``; only rows/columns ``b .. b + unit - 1`` get gradients. (LyCORIS'
    ``algo=dylora`` is another rule: it truncates to the first blocks and scales by alpha/blocks.)
    Out of training (sampling, applying) the factor is 1: the module is a plain rank-``r`` LoRA,
    which is what its file holds (``lora_down.weight``, ``lora_up.weight``, ``alpha``, as kohya
    saves it), and what every LoRA loader applies. ``b`` is drawn from torch's generator, so
    gradient checkpointing replays the same draw.

    kohya's training forward has no dropout and ignores the multiplier; here the multiplier (and
    per-sample strengths) scale the change as for every algorithm.
    """

    variant = LoraVariant
    algo = "dylora"

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        unit: int = 1,
        multiplier: float = 1.0,
    ) -> None:
        if unit < 1 or rank % unit:
            raise ValueError(f"{name}: the DyLoRA rank {rank} must be a multiple of the unit {unit}")
        super().__init__(name, base, rank, alpha, multiplier=multiplier)
        self.unit = unit
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        out_dim, in_dim = int(weight.shape[0]), int(weight.shape[1])
        self._kernel = tuple(int(k) for k in weight.shape[2:]) if self.is_conv else ()
        spatial = self._kernel if self._kernel and self._kernel != (1, 1) else ()
        # kohya: every row kaiming-uniform(a=√5) on its own (fan-in = in·k·k, as a LoRA down's), ups zero
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(1, in_dim, *spatial, dtype=torch.float32)) for _ in range(rank)]
        )
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(out_dim, 1)) for _ in range(rank)])
        for row in self.lora_A:
            nn.init.kaiming_uniform_(row, a=math.sqrt(5))
        self._register_state_dict_hook(_dylora_file_keys)

    # --- the file layout ---------------------------------------------------------------------------
    def _down(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        down = torch.cat(tuple(rows), dim=0)
        return down[:, :, None, None] if self._kernel == (1, 1) else down

    def _up(self, cols: Sequence[torch.Tensor]) -> torch.Tensor:
        up = torch.cat(tuple(cols), dim=1)
        return up[:, :, None, None] if self._kernel else up

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self._down(list(self.lora_A)), "lora_up.weight": self._up(list(self.lora_B))}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        down = state_dict.pop(prefix + "lora_down.weight", None)
        up = state_dict.pop(prefix + "lora_up.weight", None)
        if down is not None and up is not None:
            down = down.reshape(self.rank, *self.lora_A[0].shape[1:])
            up = up.reshape(up.shape[0], self.rank)
            for i in range(self.rank):
                state_dict[f"{prefix}lora_A.{i}"] = down[i : i + 1]
                state_dict[f"{prefix}lora_B.{i}"] = up[:, i : i + 1]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- the forward -------------------------------------------------------------------------------
    def draw(self) -> int:
        """The first row of the slice one training forward trains (a multiple of the unit)."""
        return int(torch.randint(0, self.rank // self.unit, ())) * self.unit

    def delta(self, x: torch.Tensor, b: int | None = None) -> torch.Tensor:
        """The output increment; while training, for slice start ``b`` (drawn when ``None``)."""
        if self._frozen is not None:
            return super().delta(x)
        factor = 1.0
        if self.training:
            b = self.draw() if b is None else b
            keep = range(b, b + self.unit)
            rows = [p if i in keep else p.detach() for i, p in enumerate(self.lora_A)]
            cols = [p if i in keep else p.detach() for i, p in enumerate(self.lora_B)]
            factor = math.sqrt(self.rank / (b + self.unit))
        else:
            rows, cols = list(self.lora_A), list(self.lora_B)
        down, up = self._down(rows), self._up(cols)
        x = self._input(x, down.dtype)
        if self.is_conv:
            conv: Any = self.base
            hidden = nn.functional.conv2d(x, down, None, conv.stride, conv.padding, conv.dilation)
            out = nn.functional.conv2d(hidden, up)
        else:
            out = nn.functional.linear(nn.functional.linear(x, down), up)
        out = out * (self._scale * factor * self.multiplier)
        strength = self.sample_factor(out)
        return out if strength is None else out * strength


def _dylora_file_keys(module: DyLoraAdapter, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` hook: the per-row parameters become the file's ``lora_down``/``lora_up`` (kohya's layout)."""
    for i in range(module.rank):
        state.pop(f"{prefix}lora_A.{i}", None)
        state.pop(f"{prefix}lora_B.{i}", None)
    with torch.no_grad():
        for key, value in module.tensors().items():
            state[prefix + key] = value.detach()


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


class LokrAdapter(Adapter):
    """LyCORIS LoKr: ``ΔW = kron(w1, w2)``, ``w1`` a small full matrix.

    With a rank of at least half the larger ``w2`` side ``w2`` is stored full (``lokr_w2``), else
    ``w2 = w2_a @ w2_b`` (Tucker for kxk convs: ``lokr_t2``). With ``decompose_both`` (LyCORIS'
    option) ``w1`` is low-rank too, ``w1 = w1_a @ w1_b``, when the rank is below half the larger
    ``w1`` side (LyCORIS' condition, mirrored from ``w2``'s); both factors full means scale 1 (LyCORIS
    sets alpha = rank then), any low-rank factor alpha/rank.
    """

    variant = LokrVariant
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
        rank_dropout: float | None = None,
        dora: bool = False,
        tucker: bool = False,
        decompose_both: bool = False,
        rank_dropout_scale: bool = False,
    ) -> None:
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        out_m, out_n = factorization(int(weight.shape[0]), factor)
        in_m, in_n = factorization(int(weight.shape[1]), factor)
        kernel = tuple(int(k) for k in weight.shape[2:])
        full_w2 = rank >= max(out_n, in_n) / 2
        split_w1 = decompose_both and rank < max(out_m, in_m) / 2
        full = full_w2 and not split_w1
        super().__init__(
            name,
            base,
            rank,
            rank if full else alpha,
            multiplier=multiplier,
            module_dropout=module_dropout,
            dora=dora,
        )
        self.rank_dropout = rank_dropout
        self.rank_dropout_scale = rank_dropout_scale
        # LyCORIS' init and draw order: w2 (zero, or its factors with w2_b = 0) first, then w1
        # kaiming-uniform (w1_a then w1_b), so the same torch seed gives the same tensors as its LokrModule.
        if full_w2:  # LyCORIS keeps a full conv w2 4-D: [out_n, in_n, k, k]
            self.lokr_w2 = nn.Parameter(torch.zeros(out_n, in_n, *kernel))
        elif tucker and kernel and kernel != (1, 1):
            self.lokr_t2 = nn.Parameter(torch.empty(rank, rank, *kernel))
            nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5))
            self.lokr_w2_a = nn.Parameter(torch.empty(rank, out_n))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_n))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_n, rank))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_n * math.prod(kernel)))
        if split_w1:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_m, rank))
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, in_m))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(out_m, in_m))
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))

    @property
    def full_matrix(self) -> bool:
        return self.variant.full_matrix(self.tensors())


class FusedMixin(MemberHooks):
    """A LyCORIS weight module (LoHa, LoKr) on a fused SAI/BFL Linear, trained on the diffusers modules
    it stacks.

    On SD3/Flux a kohya run with ``network_module = lycoris.kohya`` gives BFL's ``img_attn.qkv`` or
    ``linear1`` (q, k, v and the MLP input) *one* module: its ``ΔW [Σ rows, in]`` is one LoKr ``kron``
    or one LoHa product over the fused weight, which no per-part module can express (a Kronecker
    factor spans the parts' rows). So the module is built as LyCORIS builds it, over a stand-in
    Linear of the fused shape on the meta device (shape only, no memory), and each diffusers member
    (``to_q``, ``to_k``, ``to_v``, ``proj_mlp``) gets its rows of that ``ΔW`` by a forward hook:
    ``y_j += x @ ΔW[rows_j]ᵀ``. A member whose halves SAI/BFL order ``[shift; scale]`` where diffusers
    has ``[scale; shift]`` (SD3's pre-only context modulation) reads its rows with the halves swapped.
    Its ``state_dict`` is LyCORIS' module under the kohya name (``lokr_w1``, ``hada_w1_a``...).

    ``ΔW`` (with its rank-dropout mask and module-dropout draw) is computed once per input and reused
    by the members called with that very tensor, as the one fused module of a kohya run draws once.
    Inside :meth:`sdplugin_lora.network.LoraNetwork.cached_changes` it is the :class:`ChangeCache`'s one
    entry for the module (built once for all the members, keyed on the members' weights: the stand-in has
    no storage), so sampling costs each member its rows of the cached tensor."""

    swaps: tuple[bool, ...]

    def _fused_init(self, members: Sequence[tuple[str, nn.Module, bool]]) -> None:
        self._init_members([path for path, _, _ in members], [layer for _, layer, _ in members])
        self.swaps = tuple(swap for _, _, swap in members)

    def member_deltas(self) -> dict[str, torch.Tensor]:
        """Each member's change at multiplier 1, in its own (diffusers) row order, by module path."""
        delta = self.delta_weight()  # type: ignore[attr-defined]
        return {path: self._rows_of(delta, i) for i, path in enumerate(self.paths)}

    def _rows_of(self, weight: torch.Tensor, i: int) -> torch.Tensor:
        lo, hi = self.rows[i]
        rows = weight[lo:hi]
        if self.swaps[i]:
            first, second = rows.chunk(2, dim=0)
            rows = torch.cat([second, first], dim=0)
        return rows

    def _fused_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """``m · ΔW`` for this input (``None``: module dropout skips the module), shared by the members
        called with the very same tensor (:meth:`MemberHooks._shared`)."""
        me: Any = self

        def compute() -> torch.Tensor | None:
            if me._frozen is not None:
                return me._frozen.to(device=x.device)  # type: ignore[no-any-return]
            if me.training and me.module_dropout and torch.rand(()) < me.module_dropout:
                return None
            if (cached := me._cached_weight()) is not None:
                return cached.to(device=x.device)  # type: ignore[no-any-return]
            rows = None
            if me.training and me.rank_dropout:
                rows = rank_dropout_mask(int(me.base.weight.shape[0]), me.rank_dropout, me.rank_dropout_scale)
            return me._change(detach=False, rows=rows) * me.multiplier  # type: ignore[no-any-return]

        return self._shared(x, (me.training, torch.is_grad_enabled(), me.multiplier), compute)

    def _layer_weights(self) -> list[torch.Tensor]:
        """The members' weights (the stand-in Linear is on the meta device, no autocast state of its own)."""
        return [layer.weight for layer in self.bases]  # type: ignore[misc]

    def _member_hook(self, i: int, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        me: Any = self
        if me.multiplier == 0:
            return output
        weight = self._fused_weight(args[0])
        if weight is None:
            return output
        out = me._apply_weight(args[0], self._rows_of(weight, i))
        factor = me.sample_factor(out)
        return output + (out if factor is None else out * factor).to(output.dtype)


class FusedLohaAdapter(FusedMixin, LohaAdapter):
    """LyCORIS LoHa on a fused SAI/BFL Linear (:class:`FusedMixin`)."""


class FusedLokrAdapter(FusedMixin, LokrAdapter):
    """LyCORIS LoKr on a fused SAI/BFL Linear (:class:`FusedMixin`)."""


#: the LyCORIS algos sdcore trains as one module over a fused SAI/BFL Linear
FUSED_ADAPTERS: dict[str, type[Adapter]] = {"loha": FusedLohaAdapter, "lokr": FusedLokrAdapter}


def fused_adapter(
    algo: str, name: str, members: Sequence[tuple[str, nn.Module, bool]], rank: int, alpha: float | None, **kwargs: Any
) -> Adapter:
    """A :class:`FusedMixin` module of ``algo`` named ``name`` over ``members`` ((path, Linear, swapped
    halves) in SAI/BFL row order); ``kwargs`` are the algo's adapter options."""
    layers = [layer for _, layer, _ in members]
    if not members or not all(isinstance(layer, nn.Linear) for layer in layers):
        raise TypeError(f"{name}: a fused module needs Linear members")
    widths = {int(layer.in_features) for layer in layers}  # type: ignore[arg-type]
    if len(widths) != 1:
        raise ValueError(f"{name}: members read inputs of different widths {sorted(widths)}")
    rows = sum(int(layer.out_features) for layer in layers)  # type: ignore[arg-type,misc]
    stand_in = nn.Linear(widths.pop(), rows, bias=False, device="meta")  # the fused shape, no storage
    adapter = FUSED_ADAPTERS[algo](name, stand_in, rank, alpha, **kwargs)
    assert isinstance(adapter, FusedMixin)
    adapter._fused_init(members)
    return adapter


class OftAdapter(Adapter):
    """kohya OFT on a Linear/Conv2d: ``rank`` is the number of blocks (it must divide the output
    width) and ``alpha`` the constraint (kohya ``network_alpha``); ``oft_blocks`` start at zero,
    so ``R = I``. The update is the weight change ``Rᵀ W - W``; the bias is not rotated (kohya's training
    forward ``F.linear(x, RᵀW, bias)`` and kohya's and ComfyUI's merges leave it too)."""

    variant = OftVariant
    algo = "oft"

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
        out_dim = int(base.weight.shape[0])  # type: ignore[union-attr,index]
        if rank < 1 or out_dim % rank:
            raise ValueError(f"{name}: OFT needs a block count dividing the output width {out_dim} (got {rank})")
        super().__init__(
            name, base, rank, alpha if alpha is not None else 1e-3, multiplier=multiplier, module_dropout=module_dropout
        )
        self._scale = 1.0
        size = out_dim // rank
        self.oft_blocks = nn.Parameter(torch.zeros(rank, size, size))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scale = 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"oft_blocks": self.oft_blocks, "alpha": self.alpha}

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0) -> Adapter:
        parts = OftVariant.parts(t)
        if len(parts) != 1:  # a fused BFL Linear's block sets: the file reader splits them per diffusers module
            raise ValueError(f"{name}: {len(parts)} OFT block sets (kohya oft_flux parts) for one layer")
        blocks = parts[0]
        out_dim = int(base.weight.shape[0])  # type: ignore[union-attr,index]
        if int(blocks.shape[0]) * int(blocks.shape[1]) != out_dim:
            raise ValueError(f"{name}: OFT blocks {tuple(blocks.shape)} do not cover the {out_dim} output rows")
        alpha = float(t["alpha"]) if "alpha" in t else 0.0
        adapter = cls(name, base, int(blocks.shape[0]), alpha, multiplier=multiplier)
        with torch.no_grad():
            adapter.oft_blocks.copy_(blocks.detach().float())
        if alpha == 0.0:
            adapter.alpha.zero_()
        return adapter


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


def _no_alpha(adapter: Adapter) -> None:
    """LyCORIS' ``ia3`` and ``full`` modules store no alpha: keep it out of the ``state_dict``."""
    adapter.register_buffer("alpha", torch.tensor(1.0), persistent=False)
    adapter._scale = 1.0


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


class DiagOftAdapter(Adapter):
    """LyCORIS diag-oft on a Linear/Conv2d (``DiagOFTModule``): ``rank`` is LyCORIS' ``lora_dim``, split
    with the width by :func:`factorization` into ``(block size, block count)`` (the smaller is the block
    size); ``constraint`` (LyCORIS' network_arg, default 0 = none; the file's ``alpha``) and ``rescaled``
    (a per-output ``rescale`` vector, starting at 1). ``oft_blocks`` start at zero, so ``R = I``.
    LyCORIS ignores ``network_alpha`` for it.

    The change is ``rescale · Rᵀ W - W`` and the bias is left alone (LyCORIS adds the change through
    ``op(x, ΔW, bias=None)``). A multiplier ``m`` gives ``m · ΔW``: LyCORIS interpolates the blocks
    (``m·R + (1-m)·I``), which is the same change without ``rescale``; with ``rescale`` LyCORIS keeps
    ``(rescale - 1)·W`` at every ``m`` (see the package README)."""

    variant: ClassVar[type[Variant]] = DiagOftVariant
    algo = "diag_oft"
    rescale: nn.Parameter | None

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        constraint: float = 0.0,
        rescaled: bool = False,
        multiplier: float = 1.0,
        module_dropout: float | None = None,
        blocks_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(name, base, rank, 1.0, multiplier=multiplier, module_dropout=module_dropout)
        self._scale = 1.0
        self.alpha.fill_(float(constraint))
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        shape = blocks_shape or self.blocks_shape(int(weight.shape[0]), rank)
        self.oft_blocks = nn.Parameter(torch.zeros(*shape))
        rest = [1] * (weight.dim() - 1)
        self.rescale = nn.Parameter(torch.ones(int(weight.shape[0]), *rest)) if rescaled else None

    @staticmethod
    def blocks_shape(out_dim: int, rank: int) -> tuple[int, ...]:
        """``oft_blocks``' shape for a layer ``out_dim`` wide at LyCORIS ``lora_dim`` ``rank``."""
        size, count = factorization(out_dim, rank)
        return (count, size, size)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scale = 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"oft_blocks": self.oft_blocks, "alpha": self.alpha}
        if self.rescale is not None:
            t["rescale"] = self.rescale
        return t

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0) -> Adapter:
        blocks = t["oft_blocks"]
        adapter = cls(
            name,
            base,
            int(blocks.shape[-1]),
            constraint=float(t["alpha"]) if "alpha" in t else 0.0,
            rescaled="rescale" in t,
            multiplier=multiplier,
            blocks_shape=tuple(int(d) for d in blocks.shape),
        )
        with torch.no_grad():
            adapter.oft_blocks.copy_(blocks.detach().float())
            if adapter.rescale is not None:
                adapter.rescale.copy_(t["rescale"].detach().float().reshape(adapter.rescale.shape))
        return adapter


class BoftAdapter(DiagOftAdapter):
    """LyCORIS BOFT on a Linear/Conv2d (``ButterflyOFTModule``): ``rank`` is LyCORIS' ``lora_dim``, the
    largest even block size ``b`` up to it with ``out / b`` a power of two ``n``
    (:func:`butterfly_factorization`; a ``ValueError`` when there is none, as LyCORIS raises);
    ``oft_blocks`` ``[log2 n + 1, n, b, b]`` at zero; ``constraint``, ``rescaled``, bias and
    multiplier as :class:`DiagOftAdapter` (LyCORIS interpolates each level's rotation by ``m``, so
    only ``m`` = 1 (or 0) is LyCORIS' exact change; see the package README)."""

    variant = BoftVariant
    algo = "boft"

    @staticmethod
    def blocks_shape(out_dim: int, rank: int) -> tuple[int, ...]:
        split = butterfly_factorization(out_dim, rank)
        if split is None:
            raise ValueError(
                f"BOFT cannot split width {out_dim} at block size <= {rank}: it needs an even block size b <= "
                f"{rank} with {out_dim} / b a power of two"
            )
        size, count = split
        return (int(count - 1).bit_count() + 1, count, size, size)


#: the adapter class of each variant (for files) and of each ``--algo`` (for training)
ADAPTER_OF_VARIANT: dict[type[Variant], type[Adapter]] = {
    LoraVariant: LoraAdapter,
    LohaVariant: LohaAdapter,
    LokrVariant: LokrAdapter,
    FullVariant: FullAdapter,
    OftVariant: OftAdapter,
    NormVariant: NormAdapter,
    DiagOftVariant: DiagOftAdapter,
    BoftVariant: BoftAdapter,
    Ia3Variant: Ia3Adapter,
    GloraVariant: GloraAdapter,
}
TRAINING_ADAPTERS: dict[str, type[Adapter]] = {
    "lora": LoraAdapter,
    "locon": LoraAdapter,
    "dora": LoraAdapter,
    "loha": LohaAdapter,
    "lokr": LokrAdapter,
    "oft": OftAdapter,
    "lora_fa": LoraFaAdapter,
    "dylora": DyLoraAdapter,
    "diag_oft": DiagOftAdapter,
    "boft": BoftAdapter,
    "ia3": Ia3Adapter,
    "glora": GloraAdapter,
    "full": FullAdapter,
}
assert set(TRAINING_ADAPTERS) == set(ALGOS), "algos.ALGOS and the adapter registry must list the same algorithms"


def adapter_from_tensors(
    name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0, variant: type[Variant] | None = None
) -> Adapter:
    """The adapter of a file module's tensors on ``base`` (``ValueError`` if no variant fits); ``variant``
    when the caller knows it from the file's key (:func:`variant_of`)."""
    variant = variant or variant_of(t)
    if variant is None:
        raise ValueError(f"{name}: unsupported LoRA module with tensors {sorted(t)}")
    return ADAPTER_OF_VARIANT[variant].from_tensors(name, base, t, multiplier=multiplier)


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


__all__ = [
    "ADAPTER_OF_VARIANT",
    "FUSED_ADAPTERS",
    "TRAINING_ADAPTERS",
    "VARIANTS",
    "Adapter",
    "BoftAdapter",
    "BoftVariant",
    "ChangeCache",
    "DiagOftAdapter",
    "DiagOftVariant",
    "Dora",
    "DyLoraAdapter",
    "FullAdapter",
    "FullVariant",
    "FusedLohaAdapter",
    "FusedLokrAdapter",
    "FusedMixin",
    "GloraAdapter",
    "GloraVariant",
    "Ia3Adapter",
    "Ia3Variant",
    "LohaAdapter",
    "LohaVariant",
    "LokrAdapter",
    "LokrVariant",
    "LoraAdapter",
    "LoraFaAdapter",
    "LoraVariant",
    "NormAdapter",
    "NormVariant",
    "OftAdapter",
    "OftVariant",
    "SharedDownLora",
    "Variant",
    "adapter_from_tensors",
    "butterfly_factorization",
    "effective_delta",
    "factorization",
    "fused_adapter",
    "lycoris_cayley",
    "needs_base",
    "rank_dropout_mask",
    "scaled_hidden",
    "tucker",
    "variant_of",
    "weight_change",
]

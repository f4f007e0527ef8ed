"""LyCORIS LoHa/LoKr as one module over a fused SAI/BFL Linear, each diffusers member adding its rows
of the one ``ΔW``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .adapter import Adapter
from .dropout import rank_dropout_mask
from .loha import LohaAdapter
from .lokr import LokrAdapter
from .members import MemberHooks, member_input_width


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
    width = member_input_width(name, layers)
    rows = sum(int(layer.out_features) for layer in layers)  # type: ignore[arg-type,misc]
    stand_in = nn.Linear(width, rows, bias=False, device="meta")  # the fused shape, no storage
    adapter = FUSED_ADAPTERS[algo](name, stand_in, rank, alpha, **kwargs)
    assert isinstance(adapter, FusedMixin)
    adapter._fused_init(members)
    return adapter

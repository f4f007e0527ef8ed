"""Forward hooks over the diffusers parts ("members") of one fused SAI/BFL Linear, and the value the
members called with one input share."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def member_input_width(name: str, layers: Sequence[nn.Module]) -> int:
    """The input width of a fused Linear's members, which all read the one input (``ValueError`` naming the
    widths when they differ)."""
    widths = {int(layer.in_features) for layer in layers}  # type: ignore[arg-type]
    if len(widths) != 1:
        raise ValueError(f"{name}: members read inputs of different widths {sorted(widths)}")
    return widths.pop()


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

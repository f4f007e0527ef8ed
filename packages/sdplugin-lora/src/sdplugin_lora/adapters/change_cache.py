"""The change cache of sampling and validation: each rebuilt ``m · ΔW`` computed once while the weights
cannot change, within a memory budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from sdcore.train.memory import device_free_memory

if TYPE_CHECKING:
    from .adapter import Adapter


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

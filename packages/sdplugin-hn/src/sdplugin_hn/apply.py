"""Applying hypernetworks to a diffusers UNet, and the ``<hypernet:name:strength>`` handler.

A1111 transforms the context of every UNet attention layer before ``to_k`` and ``to_v``:
``k_in = context + mlp_k(context) * strength`` (likewise for V), choosing the module by the
context's width; self-attention counts too, since its context is the hidden states. We do the
same with forward pre-hooks on each attention layer's ``to_k``/``to_v``: whatever attention
processor is installed (SDPA, xformers, LoRA...) calls those projections, so no processor is
replaced, no weight is touched, and removing the hooks restores the model exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from sdcore.errors import NetworkMismatchError
from sdcore.generate.networks import Activation, NetworkRef, PromptNetworkHandler
from torch import nn

from .format import load_hypernetwork
from .modules import Hypernetwork, HypernetworkModule

if TYPE_CHECKING:
    from sdcore.models.bundle import ModelBundle


def attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's attention layers (anything with ``to_k`` and ``to_v`` projections)."""
    found = []
    for name, module in unet.named_modules():
        if isinstance(getattr(module, "to_k", None), nn.Module) and isinstance(
            getattr(module, "to_v", None), nn.Module
        ):
            found.append((name, module))
    return found


def _in_width(projection: nn.Module) -> int | None:
    width = getattr(projection, "in_features", None)
    if width is None and isinstance(getattr(projection, "base_layer", None), nn.Module):
        width = getattr(projection.base_layer, "in_features", None)
    return int(width) if width is not None else None


def context_widths(unet: nn.Module) -> list[int]:
    """Every context width an attention layer of ``unet`` sees (self- and cross-attention)."""
    widths = {_in_width(cast(nn.Module, module.to_k)) for _, module in attention_layers(unet)}
    return sorted(w for w in widths if w is not None)


def _transform(module: HypernetworkModule, x: torch.Tensor, strength: float) -> torch.Tensor:
    """``x + mlp(x) * strength`` in float32 (as A1111 does), cast back to the input's dtype."""
    parameter = next(module.parameters(), None)
    if parameter is not None and parameter.device != x.device:
        module.to(x.device)
    return module(x.float(), strength).to(x.dtype)


@dataclass
class HypernetworkHooks:
    """Hooks installed by :func:`apply_hypernetworks`; :meth:`remove` takes them all out."""

    handles: list[Any] = field(default_factory=list)
    layers: int = 0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def apply_hypernetworks(unet: nn.Module, networks: Sequence[tuple[Hypernetwork, float]]) -> HypernetworkHooks:
    """Install ``networks`` (chained in order, each with its strength) on every attention layer.

    Strength 0 installs nothing for that network, so the model's output is bit-for-bit the base
    output. The networks are moved to the UNet's device on first use; their train/eval mode
    decides whether the strength applies (training forces 1, as A1111 does).
    """
    hooks = HypernetworkHooks()
    active = [(hn, float(s)) for hn, s in networks if float(s) != 0.0 or hn.training]
    if not active:
        return hooks

    def make_hook(slot: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not args:
                return None
            x = args[0]
            for hn, strength in active:
                pair = hn.pair(x.shape[-1])
                if pair is not None:
                    x = _transform(pair[slot], x, strength)
            return (x, *args[1:]), kwargs

        return hook

    for _, attention in attention_layers(unet):
        to_k, to_v = cast(nn.Module, attention.to_k), cast(nn.Module, attention.to_v)
        hooks.handles.append(to_k.register_forward_pre_hook(make_hook(0), with_kwargs=True))
        hooks.handles.append(to_v.register_forward_pre_hook(make_hook(1), with_kwargs=True))
        hooks.layers += 1
    return hooks


def file_hash(path: str | Path) -> str:
    """The first 10 hex digits of the file's sha256 (A1111's short hash for hypernetworks)."""
    from sdcore.models.hashes import short_hash

    return short_hash(path)


class HypernetworkHandler(PromptNetworkHandler):
    """Applies ``<hypernet:name:strength>`` from the prompt for one generation."""

    tag = "hypernet"
    kind = "hypernetwork"
    resolves_names = True  # activate finds each name: checked before the model loads
    suffixes = (".pt",)

    def accepts(self, path: Path) -> bool:
        """An A1111 hypernetwork: a pickled dict with integer width keys (768, 1024 ...) or ``layer_structure``."""
        from sdcore.models.peek import peek_file

        found = peek_file(path)
        if found.error:  # unreadable or unsafe: let the loader say so in its own words
            return True
        return found.top == "dict" and any(k.isdigit() or k == "layer_structure" for k in found.keys)

    def __init__(self, directory: str | Path | None = None) -> None:
        super().__init__(directory)
        self._cache: dict[tuple[str, float, int], Hypernetwork] = {}

    def available(self) -> list[Path]:
        """``.pt`` files under the folder, minus training-state folders (``<name>-state/``) and ``None.pt``."""
        return [
            path
            for path in super().available()
            if path.stem != "None" and not any(part.endswith("-state") for part in path.parent.parts)
        ]

    def load(self, path: Path) -> Hypernetwork:
        """Load (and cache by path, mtime and size) one hypernetwork file."""
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime, stat.st_size)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != key[0]}
            self._cache[key] = load_hypernetwork(path)
        return self._cache[key]

    def activate(self, bundle: ModelBundle, refs: list[NetworkRef], prompt: str, negative_prompt: str) -> Activation:
        widths = set(context_widths(bundle.unet))
        networks: list[tuple[Hypernetwork, float]] = []
        hashes: list[str] = []
        for ref in refs:
            path = self.find(ref.name)
            hn = self.load(path)
            if not widths.intersection(hn.dims):
                raise NetworkMismatchError(
                    f"hypernetwork {path}: its widths {hn.dims} match no attention layer of this "
                    f"{bundle.family} model (widths {sorted(widths)})"
                )
            hn.eval()
            hn.to(bundle.device)
            networks.append((hn, ref.weight))
            hashes.append(f"{ref.name}: {file_hash(path)}")
        hooks = apply_hypernetworks(bundle.unet, networks)
        info = {"Hypernet hashes": ", ".join(hashes)} if hashes else {}
        return Activation(prompt=prompt, negative_prompt=negative_prompt, undo=hooks.remove, info=info)

"""A1111's "Tiling": seamless textures from circular padding.

What A1111 and Forge do (facts rewritten here): A1111 (``modules/sd_hijack.py`` ``apply_circular``, called
from ``processing.py`` with ``p.tiling`` for the whole generation) sets ``padding_mode = 'circular'`` on every
``Conv2d`` of the loaded model (UNet, VAE encoder and decoder; the text encoders have none) and back to
``'zeros'`` when tiling is off; the infotext says ``Tiling: True`` (after ``RNG``, before the
extra-network and hires fields). lllyasviel's Forge (``modules_forge/utils.py`` ``apply_circular_forge``)
switched every layer whose class name has ``Conv`` from February 2024, and has been a no-op that prints
"Tiling is currently under maintenance and unavailable" since August 2024, before its FLUX.1 support:
no reference tiles SD3/FLUX.1/Chroma. sdcore applies A1111's rule there too: the transformers embed
patches with a linear layer (SD3: a convolution without padding, which circular padding leaves as it
is), so only the VAE wraps.

sdcore does it the same way for the duration of one call and puts every layer's own mode back
afterwards (not ``'zeros'`` blindly), so a model that had other modes keeps them. Every ``Conv2d``
counts, subclasses included (diffusers' ``LoRACompatibleConv``); a LoRA merged into the weights (the
generation default) wraps with its layer, one applied as hooks (``-O lora_mode=hooks``) pads its own
convolution with zeros.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle

#: the infotext field A1111 writes when tiling is on (its value is "True")
TILING_FIELD = "Tiling"


def _convolutions(modules: Iterable[Any]) -> list[Any]:
    import torch

    found: list[Any] = []
    seen: set[int] = set()
    for module in modules:
        if module is None:
            continue
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d) and id(layer) not in seen:
                seen.add(id(layer))
                found.append(layer)
    return found


@contextlib.contextmanager
def circular_padding(*modules: Any) -> Iterator[list[Any]]:
    """Every ``Conv2d`` below ``modules`` pads circularly inside the block; each gets its own mode back after
    it, also when the block raises. Yields the layers it switched."""
    layers = _convolutions(modules)
    saved = [layer.padding_mode for layer in layers]
    try:
        for layer in layers:
            layer.padding_mode = "circular"
        yield layers
    finally:
        for layer, mode in zip(layers, saved, strict=True):
            layer.padding_mode = mode


def tiling(bundle: ModelBundle, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """A1111's "Tiling" on ``bundle`` for a ``with`` block: its denoiser (UNet or transformer) and VAE pad
    circularly (``enabled`` False: a block that changes nothing)::

        with tiling(bundle):
            images = generate_images(bundle, ["seamless stone wall texture"], seed=1)
    """
    if not enabled:
        return contextlib.nullcontext([])
    return circular_padding(bundle.denoiser, bundle.vae)


__all__ = ["TILING_FIELD", "circular_padding", "tiling"]

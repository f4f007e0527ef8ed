"""Generation noise drawn as A1111 draws it: float32 on the CPU generator, then the model's dtype.

A1111 (``modules/rng.py`` ``randn``, ``randn_local``, ``randn_without_seed`` and ``ImageRNG``; facts
rewritten here) draws the first noise and every ancestral step's noise with ``torch.randn`` on a CPU
generator in float32 and only then moves it to the device (where a half-precision model sees it in its own
dtype). diffusers' pipelines and schedulers instead ask ``randn_tensor`` for the model's dtype, and torch's
CPU half-precision normal draw is not the rounded float32 draw: on torch 2.13 the two agree only when the
tensor's element count is a multiple of 16 (a 125x125 SD latent, a 1000x1000 image, does not), and then
the generator's position differs too, so every later Euler a draw differs as well.

:func:`float32_noise` makes every ``randn_tensor`` call of a diffusers pipeline or scheduler (each module
imports the name for itself) draw through :func:`randn_float32` while inside; float32 and unspecified
dtypes are drawn exactly as before, so a float32 run is bit for bit unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Iterator
from typing import Any

_lock = threading.Lock()
_depth = 0


@functools.cache
def _diffusers_randn() -> Any:
    """diffusers' own ``randn_tensor`` (read once, before any swap)."""
    from diffusers.utils import torch_utils

    return torch_utils.randn_tensor


def randn_float32(
    shape: tuple[int, ...] | list[int],
    generator: Any = None,
    device: Any = None,
    dtype: Any = None,
    layout: Any = None,
) -> Any:
    """diffusers' ``randn_tensor`` (per-image generators for a list, a CPU generator's draw on the CPU),
    drawn in float32 and then converted to ``dtype``: A1111's numbers at any element count. Without a
    dtype or with float32 it is diffusers' call unchanged."""
    import torch

    draw = _diffusers_randn()
    if dtype is None or dtype == torch.float32:
        return draw(shape, generator=generator, device=device, dtype=dtype, layout=layout)
    return draw(shape, generator=generator, device=device, dtype=torch.float32, layout=layout).to(dtype)


def _diffusers_modules() -> list[Any]:
    return [
        module
        for name, module in list(sys.modules.items())
        if module is not None and (name == "diffusers" or name.startswith("diffusers."))
    ]


def _rebind(old: Any, new: Any) -> None:
    for module in _diffusers_modules():
        if vars(module).get("randn_tensor") is old:  # vars(): no lazy-module import is triggered
            module.randn_tensor = new


@contextlib.contextmanager
def float32_noise() -> Iterator[None]:
    """While inside, every diffusers module's ``randn_tensor`` is :func:`randn_float32` (the helper's own
    module too, so a module imported inside gets it; on leaving, every module holding it gets diffusers'
    back). Nested and concurrent uses share one swap."""
    global _depth
    original = _diffusers_randn()
    with _lock:
        if _depth == 0:
            _rebind(original, randn_float32)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _rebind(randn_float32, original)


__all__ = ["float32_noise", "randn_float32"]

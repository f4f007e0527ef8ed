"""kohya's image augmentations: ``color_aug`` and ``random_crop`` (draws and transforms).

Each draw takes the sample's own generator (:meth:`sdcore.train.data.SampleRef.rng` with its own
purpose), so batching, accumulation and resuming never change what a sample looks like, and a run
without these options draws nothing new.

``color_aug`` is kohya's ``AugHelper.color_aug`` (its replacement of albumentations' ``OneOf``):
with probability 0.33 (``random() <= 0.33``), then either (``random() > 0.5``) a hue shift drawn
from ``uniform(-8, 8)`` in OpenCV's 8-bit hue unit (2 degrees, range 0..180), or a "gamma"
``uniform(0.95, 1.05)`` applied as kohya applies it: ``clip(x ** gamma, 0, 255)`` on the 0..255
values themselves (not normalised to 0..1, so 1.05 brightens mid-tones by a lot and 0.95 darkens
white to 193), truncated to 8 bits. kohya calls ``cv2.cvtColor(rgb, COLOR_BGR2HSV)`` on an RGB
array, so its hue is computed with red and blue swapped; :func:`hue_shift` does the same. The
colour conversions follow OpenCV's documented 8-bit HSV formulas (fixed-point division tables for
RGB->HSV with 12 fractional bits; float32 sectors for HSV->RGB, truncated as OpenCV's vectorised
path does): identical to ``cv2.cvtColor`` 4.10 (kohya's pinned version) for every 8-bit colour.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

#: kohya's hue_shift_limit (OpenCV 8-bit hue units: 2 degrees each)
HUE_SHIFT_LIMIT = 8
#: kohya's gamma range
GAMMA_RANGE = (0.95, 1.05)
#: probability that color_aug changes a sample at all (kohya: ``random.random() <= 0.33``)
COLOR_AUG_P = 0.33

_HSV_SHIFT = 12


@dataclass(frozen=True)
class ColorAug:
    """One drawn colour augmentation: ``kind`` is ``"hue"`` (``value`` = shift in 8-bit hue units,
    already wrapped to 0..180 as kohya does) or ``"gamma"`` (``value`` = the exponent)."""

    kind: str
    value: float


def draw_color_aug(rng: random.Random) -> ColorAug | None:
    """kohya's draws, in its order, from the sample's generator (``None``: unchanged)."""
    if rng.random() <= COLOR_AUG_P:
        if rng.random() > 0.5:
            shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
            if shift < 0:
                shift = 180 + shift
            return ColorAug("hue", shift)
        return ColorAug("gamma", rng.uniform(*GAMMA_RANGE))
    return None


def draw_crop(rng: random.Random, resized: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """kohya's ``random_crop`` position ``(left, top)`` in the resized image: ``randint(0, trim)``
    for the width first, then the height, each only when that side has something to trim."""
    left = rng.randint(0, resized[0] - bucket[0]) if resized[0] > bucket[0] else 0
    top = rng.randint(0, resized[1] - bucket[1]) if resized[1] > bucket[1] else 0
    return left, top


def _tables() -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    i = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        sdiv = np.where(i > 0, np.round((255 << _HSV_SHIFT) / np.maximum(i, 1)), 0).astype(np.int64)
        hdiv = np.where(i > 0, np.round((180 << _HSV_SHIFT) / (6.0 * np.maximum(i, 1))), 0).astype(np.int64)
    return sdiv, hdiv


def bgr_to_hsv(image: np.ndarray) -> np.ndarray:
    """OpenCV's ``COLOR_BGR2HSV`` for uint8 ``[H, W, 3]``: H in 0..179, S and V in 0..255."""
    import numpy as np

    sdiv, hdiv = _tables()
    b, g, r = (image[..., i].astype(np.int64) for i in range(3))
    v = np.maximum(np.maximum(b, g), r)
    vmin = np.minimum(np.minimum(b, g), r)
    diff = v - vmin
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * sdiv[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def hsv_to_bgr(hsv: np.ndarray) -> np.ndarray:
    """OpenCV's ``COLOR_HSV2BGR`` for uint8 ``[H, W, 3]`` (hue range 180), as its vectorised path
    computes it: float32 sectors, S and V times ``1/255``, the result times 255 *truncated* (the
    scalar tail of a row that is not a multiple of the vector block rounds instead; training widths,
    multiples of 64, have no tail)."""
    import numpy as np

    h = hsv[..., 0].astype(np.float32) * (np.float32(6.0) / np.float32(180.0))
    s = hsv[..., 1].astype(np.float32) * (np.float32(1.0) / np.float32(255.0))
    v = hsv[..., 2].astype(np.float32) * (np.float32(1.0) / np.float32(255.0))
    pre = np.trunc(h)
    frac = h - pre
    sector = (pre - np.trunc(pre * (np.float32(1.0) / np.float32(6.0))) * np.float32(6.0)).astype(np.int64)
    one = np.float32(1.0)

    def fused(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # 1 - a*b rounded once (the FMA the build emits)
        return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(np.float32)

    tab = np.stack([v, v * (one - s), v * fused(s, frac), v * fused(s, one - frac)], axis=-1)
    order = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])
    out = np.take_along_axis(tab, order[sector], axis=-1) * np.float32(255.0)
    return np.clip(np.trunc(out), 0, 255).astype(np.uint8)


def hue_shift(rgb: np.ndarray, shift: float) -> np.ndarray:
    """kohya's hue step: HSV of the array read as BGR, ``(h + shift) % 180`` truncated to 8 bits."""
    import numpy as np

    hsv = bgr_to_hsv(rgb)
    hsv[..., 0] = ((hsv[..., 0] + shift) % 180).astype(np.uint8)
    return hsv_to_bgr(hsv)


def apply_color_aug(rgb: np.ndarray, aug: ColorAug | None) -> np.ndarray:
    """The augmented uint8 ``[H, W, 3]`` image (the same array when ``aug`` is None)."""
    import numpy as np

    if aug is None:
        return rgb
    if aug.kind == "hue":
        return hue_shift(rgb, aug.value)
    return np.clip(rgb.astype(np.float64) ** aug.value, 0, 255).astype(np.uint8)


__all__ = [
    "COLOR_AUG_P",
    "GAMMA_RANGE",
    "HUE_SHIFT_LIMIT",
    "ColorAug",
    "apply_color_aug",
    "bgr_to_hsv",
    "draw_color_aug",
    "draw_crop",
    "hsv_to_bgr",
    "hue_shift",
]

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

import os
import random
from dataclasses import dataclass
from pathlib import Path
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


def face_info(path: str | os.PathLike[str]) -> tuple[int, int, int, int] | None:
    """kohya's face position from a file name ``<name>_<cx>_<cy>_<w>_<h>.<ext>`` (the last four
    ``_``-separated integers, in the image's pixels), or None (kohya: also when ``cx`` is 0).
    Names whose last four tokens are not integers have no face (kohya stops with an error)."""
    tokens = Path(path).stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(t) for t in tokens[-4:])
    except ValueError:
        return None
    return (cx, cy, w, h) if cx > 0 else None


def face_crop_range(value: object) -> tuple[float, float] | None:
    """kohya's ``face_crop_aug_range``: ``"2.0,4.0"`` or ``[2.0, 4.0]`` (low <= high, both > 0);
    None/empty is off. Raises ValueError otherwise."""
    if value is None or value == "" or value is False:
        return None
    parts = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    if len(parts) != 2 or any(isinstance(p, bool) for p in parts):
        raise ValueError(f"face_crop_aug_range must be two numbers 'low,high', got {value!r}")
    low, high = (float(p) for p in parts)
    if not 0 < low <= high:
        raise ValueError(f"face_crop_aug_range needs 0 < low <= high, got {value!r}")
    return low, high


def draw_face_crop(
    rng: random.Random,
    size: tuple[int, int],
    target: tuple[int, int],
    face: tuple[int, int, int, int],
    scale_range: tuple[float, float],
    *,
    random_crop: bool,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """kohya's ``crop_target`` (``face_crop_aug_range``, buckets off): ``(resized (w, h), crop
    (left, top))``. The scale is drawn so the face's larger side is ``1/range`` of the target's
    shorter side, never upscaling; the crop centres the face, then (``random_crop``) moves it by the
    sum of two ``randint(0, r) - r`` where r is the longer distance from the face to an edge, or
    (an open range, a face of at least 40 px and a tenth of the side) jitters it by ``face/20``.
    Height is drawn before width, as kohya loops over its axes."""
    width, height = size
    target_w, target_h = target
    if (width, height) == (target_w, target_h):
        return (width, height), (0, 0)
    face_cx, face_cy, face_w, face_h = face
    face_size = max(face_w, face_h)
    short = min(target_h, target_w)
    min_scale = max(target_h / height, target_w / width)
    min_scale = min(1.0, max(min_scale, short / (face_size * scale_range[1])))
    max_scale = min(1.0, max(min_scale, short / (face_size * scale_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    centre = (int(face_cy * scale + 0.5), int(face_cx * scale + 0.5))
    start = []
    for target_side, length, face_p in zip((target_h, target_w), (new_h, new_w), centre, strict=True):
        p1 = face_p - target_side // 2
        if random_crop:
            reach = max(length - face_p, face_p)
            p1 = p1 + (rng.randint(0, reach) + rng.randint(0, reach)) - reach
        elif scale_range[0] != scale_range[1] and face_size > short // 10 and face_size >= 40:
            p1 = p1 + rng.randint(-face_size // 20, +face_size // 20)
        start.append(max(0, min(p1, length - target_side)))
    return (new_w, new_h), (start[1], start[0])


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
    "draw_face_crop",
    "face_crop_range",
    "face_info",
    "hsv_to_bgr",
    "hue_shift",
]

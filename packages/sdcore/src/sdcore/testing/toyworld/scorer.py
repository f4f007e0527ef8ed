"""Say what a toy-world image shows: the colour, shape and size of its main object (no weights).

The main object is the largest connected region of pixels that differ clearly from the
background (the median of the image's border). Its colour is the named colour nearest to the
region's median RGB; its shape is a ``ring`` when background pixels enclosed by the region make up
at least :data:`HOLE_FRACTION` of it (no other shape has a hole), otherwise the template (each
known shape drawn into a square box) with the highest overlap (IoU) with the region's mask scaled
to its bounding box; its size is ``small`` or ``large`` by the bounding box's longer side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from .world import ALL_COLOURS, ALL_SHAPES, IMAGE_SIZE, SIZES, shape_mask

TEMPLATE_SIZE = 16
FOREGROUND_DISTANCE = 60.0
"""A pixel belongs to an object when its largest channel difference to the background exceeds this."""
MIN_PIXELS = 6
HOLE_FRACTION = 0.06
"""The share of enclosed background (of the object with its holes filled) that makes a ring."""


@dataclasses.dataclass(frozen=True)
class Reading:
    """What the scorer saw; ``None`` fields when no object was found."""

    colour: str | None
    shape: str | None
    size: str | None
    pixels: int
    shape_iou: float = 0.0

    def shows(self, *, colour: str | None = None, shape: str | None = None, size: str | None = None) -> bool:
        """True when every given attribute matches."""
        return (
            (colour is None or self.colour == colour)
            and (shape is None or self.shape == shape)
            and (size is None or self.size == size)
        )


@lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    return {name: _box_mask(shape_mask(name, 4 * TEMPLATE_SIZE) >= 0.5) for name in ALL_SHAPES if name != "ring"}


def _grow(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def _holes(region: np.ndarray) -> np.ndarray:
    """Pixels outside ``region`` that the image border cannot reach without crossing it."""
    free = ~region
    reach = np.zeros_like(free)
    reach[0, :], reach[-1, :], reach[:, 0], reach[:, -1] = free[0, :], free[-1, :], free[:, 0], free[:, -1]
    while True:
        grown = _grow(reach) & free
        if np.array_equal(grown, reach):
            return free & ~reach
        reach = grown


def _box_mask(mask: np.ndarray) -> np.ndarray:
    """``mask`` cropped to its bounding box and scaled to ``TEMPLATE_SIZE`` squared (boolean)."""
    rows, cols = np.nonzero(mask)
    crop = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    picture = Image.fromarray((crop * 255).astype(np.uint8))
    return np.asarray(picture.resize((TEMPLATE_SIZE, TEMPLATE_SIZE), Image.Resampling.BILINEAR)) >= 128


def _to_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        picture = image.convert("RGB")
        if max(picture.size) > 2 * IMAGE_SIZE:
            picture = picture.resize((2 * IMAGE_SIZE, 2 * IMAGE_SIZE), Image.Resampling.BOX)
        return np.asarray(picture, dtype=np.float32)
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return array


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (pure numpy label propagation, small images)."""
    height, width = mask.shape
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        padded = np.pad(labels, 1)
        neighbours = np.stack(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        grown = np.where(mask, neighbours.max(axis=0), 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    if not labels.any():
        return np.zeros((height, width), dtype=bool)
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    return labels == values[np.argmax(counts)]


def read_image(image: Any) -> Reading:
    """Colour, shape and size of the main object of ``image`` (a PIL image or an HxWx3 array)."""
    pixels = _to_array(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.abs(pixels - background).max(axis=2)
    region = _largest_component(distance > FOREGROUND_DISTANCE)
    count = int(region.sum())
    if count < MIN_PIXELS:
        return Reading(None, None, None, count)
    # colour: the core of the object (strongest pixels) so anti-aliased edges do not pull it
    strength = distance[region]
    core = pixels[region][strength >= np.quantile(strength, 0.5)]
    rgb = np.median(core, axis=0)
    names = list(ALL_COLOURS)
    palette = np.asarray([ALL_COLOURS[n] for n in names], dtype=np.float32)
    colour = names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]
    rows, cols = np.nonzero(region)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    holes = _holes(region)
    filled = region | holes
    scaled = _box_mask(filled)
    best, best_iou = None, -1.0
    for name, template in _templates().items():
        iou = float((scaled & template).sum() / max((scaled | template).sum(), 1))
        if iou > best_iou:
            best, best_iou = name, iou
    if holes.sum() >= HOLE_FRACTION * filled.sum():
        best = "ring"
    scale = pixels.shape[0] / IMAGE_SIZE
    side = max(bottom - top, right - left) / scale
    size = "small" if side < (SIZES["small"] + SIZES["large"]) / 2 else "large"
    return Reading(colour, best, size, count, best_iou)


def read_images(images: Iterable[Any]) -> list[Reading]:
    return [read_image(image) for image in images]


def concept_score(
    images: Sequence[Any] | Sequence[Reading],
    *,
    colour: str | None = None,
    shape: str | None = None,
    size: str | None = None,
) -> float:
    """The share of ``images`` whose main object has every given attribute."""
    if not images:
        return 0.0
    readings = [item if isinstance(item, Reading) else read_image(item) for item in images]
    return sum(r.shows(colour=colour, shape=shape, size=size) for r in readings) / len(readings)

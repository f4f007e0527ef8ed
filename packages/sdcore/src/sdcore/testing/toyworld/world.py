"""The toy world: flat shapes on a plain background, captioned ``"a small blue square"``.

Everything is procedural and deterministic from a seed. The *world* (what the shipped base model
was trained on) is ``SHAPES x COLOURS x SIZES x positions``; ``NEW_SHAPES`` and ``NEW_COLOURS``
exist in the renderer and the scorer but never in the world, so they are new concepts a
training method can teach.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
"""Side of a world image in pixels (the base model's native size: 8x8 latents, 4x VAE)."""

BACKGROUND: tuple[int, int, int] = (240, 240, 240)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shapes of the world (the base model knows them)."""
NEW_SHAPES: tuple[str, ...] = ("ring", "cross", "diamond", "star")
"""Shapes the renderer and the scorer know but the world lacks."""
ALL_SHAPES: tuple[str, ...] = SHAPES + NEW_SHAPES

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
"""Colours of the world."""
NEW_COLOURS: dict[str, tuple[int, int, int]] = {
    "purple": (150, 50, 200),
    "orange": (250, 130, 10),
    "cyan": (30, 200, 210),
}
"""Colours the renderer and the scorer know but the world lacks."""
ALL_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, **NEW_COLOURS}

SIZES: dict[str, int] = {"small": 12, "large": 20}
"""Bounding-box side in pixels of each size word, at :data:`IMAGE_SIZE`."""


def _star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    angle = np.arctan2(x, -y)  # 0 points up
    radius = np.hypot(x, y)
    sector = (angle % (2 * math.pi / 5)) / (2 * math.pi / 5)  # 0..1 between two tips
    edge = 0.42 + (1.0 - 0.42) * np.abs(1 - 2 * sector)  # tip at sector 0/1, notch in between
    return radius <= edge


_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    # x, y in [-1, 1] over the bounding box; y grows downwards (image rows)
    "circle": lambda x, y: x * x + y * y <= 1.0,
    "square": lambda x, y: (np.abs(x) <= 1.0) & (np.abs(y) <= 1.0),
    "triangle": lambda x, y: (np.abs(x) <= (y + 1.0) / 2.0) & (y <= 1.0),
    "ring": lambda x, y: (x * x + y * y <= 1.0) & (x * x + y * y >= 0.5**2),
    "cross": lambda x, y: ((np.abs(x) <= 0.34) | (np.abs(y) <= 0.34)) & (np.abs(x) <= 1) & (np.abs(y) <= 1),
    "diamond": lambda x, y: np.abs(x) + np.abs(y) <= 1.0,
    "star": _star,
}


def shape_mask(shape: str, size: int, *, supersample: int = 4) -> np.ndarray:
    """Coverage (0..1, anti-aliased) of ``shape`` filling a ``size`` x ``size`` box."""
    if shape not in _MASKS:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(ALL_SHAPES)}")
    n = size * supersample
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    inside = _MASKS[shape](xx, yy).astype(np.float32)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


@dataclasses.dataclass(frozen=True)
class Scene:
    """One object of ``shape``, ``colour`` and ``size`` whose box's top-left corner is at ``(left, top)``."""

    shape: str
    colour: str
    size: str
    left: int
    top: int

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.size)


def caption(shape: str, colour: str, size: str) -> str:
    """The world's caption: ``"a small blue square"``."""
    return f"a {size} {colour} {shape}"


def world_captions() -> list[str]:
    """Every caption of the world (sizes x colours x shapes), in a fixed order."""
    return [caption(s, c, z) for z in SIZES for c in COLOURS for s in SHAPES]


def render(scene: Scene, *, image_size: int = IMAGE_SIZE, background: Sequence[int] = BACKGROUND) -> Image.Image:
    """Draw ``scene`` on a plain background (anti-aliased edges)."""
    side = SIZES[scene.size] if scene.size in SIZES else int(scene.size)
    canvas = np.empty((image_size, image_size, 3), dtype=np.float32)
    canvas[:] = np.asarray(background, dtype=np.float32)
    alpha = np.zeros((image_size, image_size), dtype=np.float32)
    coverage = shape_mask(scene.shape, side)
    top, left = scene.top, scene.left
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + side, image_size), min(left + side, image_size)
    if y1 > y0 and x1 > x0:
        alpha[y0:y1, x0:x1] = coverage[y0 - top : y1 - top, x0 - left : x1 - left]
    colour = np.asarray(ALL_COLOURS[scene.colour], dtype=np.float32)
    out = canvas * (1 - alpha[..., None]) + colour * alpha[..., None]
    return Image.fromarray(np.round(out).clip(0, 255).astype(np.uint8), "RGB")


def random_scene(
    rng: random.Random,
    *,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    sizes: Sequence[str] = tuple(SIZES),
    image_size: int = IMAGE_SIZE,
    margin: int = 2,
) -> Scene:
    """A scene with a random shape, colour, size and position (the whole object inside the image)."""
    shape, colour, size = rng.choice(list(shapes)), rng.choice(list(colours)), rng.choice(list(sizes))
    side = SIZES[size]
    high = image_size - side - margin
    return Scene(shape, colour, size, left=rng.randint(margin, high), top=rng.randint(margin, high))


def world_scenes(
    n: int,
    seed: int = 0,
    *,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    sizes: Sequence[str] = tuple(SIZES),
) -> list[Scene]:
    """``n`` random scenes, the same for the same arguments."""
    rng = random.Random(seed)
    return [random_scene(rng, shapes=shapes, colours=colours, sizes=sizes) for _ in range(n)]


def write_dataset(
    root: str | Path,
    scenes: Iterable[Scene],
    *,
    repeats: int = 1,
    name: str = "toyworld",
    captions: bool = True,
    caption_text: Callable[[Scene], str] | None = None,
) -> Path:
    """Write ``root/<repeats>_<name>/NNN.png`` (+ ``.txt`` captions) for ``scenes`` and return the image folder."""
    folder = Path(root) / f"{repeats}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(scenes):
        render(scene).save(folder / f"{index:03d}.png")
        if captions:
            text = caption_text(scene) if caption_text is not None else scene.caption
            (folder / f"{index:03d}.txt").write_text(text, encoding="utf-8")
    return folder

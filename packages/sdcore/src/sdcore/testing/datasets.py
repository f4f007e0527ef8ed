"""Tiny, learnable datasets for tests and demos: distinct coloured patterns with captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

_COLOURS = [(220, 40, 40), (40, 200, 60), (40, 80, 220), (230, 200, 40), (160, 40, 200), (40, 200, 200)]
_SHAPES = ["stripes", "checker", "circle", "gradient"]


def pattern_image(index: int, size: int | tuple[int, int] = 64) -> Image.Image:
    """A deterministic, visually distinct image for ``index`` (so training has something to learn)."""
    width, height = (size, size) if isinstance(size, int) else size
    colour = np.array(_COLOURS[index % len(_COLOURS)], dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    shape = _SHAPES[(index // len(_COLOURS) + index) % len(_SHAPES)]
    if shape == "stripes":
        mask = ((xx // max(width // 8, 1)) % 2).astype(np.float32)
    elif shape == "checker":
        step = max(width // 4, 1)
        mask = (((xx // step) + (yy // step)) % 2).astype(np.float32)
    elif shape == "circle":
        mask = (((xx - width / 2) ** 2 + (yy - height / 2) ** 2) < (min(width, height) / 3) ** 2).astype(np.float32)
    else:
        mask = xx / max(width - 1, 1)
    pixels = 255.0 - mask[..., None] * (255.0 - colour)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def caption_for(index: int) -> str:
    colour = ["red", "green", "blue", "yellow", "purple", "cyan"][index % len(_COLOURS)]
    shape = _SHAPES[(index // len(_COLOURS) + index) % len(_SHAPES)]
    return f"sks pattern, {colour}, {shape}, simple background"


def make_tiny_dataset(
    root: str | Path,
    *,
    n: int = 4,
    size: int | tuple[int, int] = 64,
    repeats: int = 1,
    concept: str = "sks",
    captions: bool = True,
) -> Path:
    """Write ``root/<repeats>_<concept>/NNN.png`` (+ ``.txt`` captions) and return ``root``."""
    folder = Path(root) / f"{repeats}_{concept}"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(n):
        pattern_image(index, size).save(folder / f"{index:03d}.png")
        if captions:
            (folder / f"{index:03d}.txt").write_text(caption_for(index), encoding="utf-8")
    return Path(root)


def write_inverted_controls(data: str | Path, controls: str | Path) -> Path:
    """A control image beside every ``.png`` under ``data`` (a :func:`make_tiny_dataset` folder), written to the
    ``controls`` folder under the image's file name: its colours inverted (``255 - pixel``), a fixed function of
    the image, so a control-image run (``--control-dir``: FLUX.1 Kontext, control LoRAs) has a pairing to learn
    and every image its control image. Returns ``controls``."""
    controls = Path(controls)
    controls.mkdir(parents=True, exist_ok=True)
    for image in sorted(Path(data).rglob("*.png")):
        with Image.open(image) as opened:
            pixels = np.asarray(opened.convert("RGB"))
        Image.fromarray(255 - pixels).save(controls / image.name)
    return controls

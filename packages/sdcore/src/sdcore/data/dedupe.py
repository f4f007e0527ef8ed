"""Near-duplicate images by two measures that must agree, with numpy and PIL only.

Duplicates silently multiply an image's weight in training. Two images are grouped only when
both of these say they are the same picture:

- **structure**: a dHash of the luminance (each pixel of a 9x8 grayscale thumbnail compared with
  its right neighbour: 64 bits that survive resizing and re-encoding), at most ``threshold`` bits
  apart;
- **colour and content**: a 32x32 colour thumbnail; every thumbnail pixel of one image must lie
  close to the colour range of the 3x3 neighbourhood at the same place in the other (and the
  other way round): the worst distance, relative to the pictures' contrast (the largest
  per-channel range of the thumbnail, at least 0.2), is at most ``color_threshold``. The
  neighbourhood absorbs the sub-pixel shifts of a slight crop or resize, the contrast scaling
  absorbs JPEG ringing around strong edges, while a shape of another colour, another shape in the
  same place, or the same shape elsewhere differs by far more.

A luminance hash alone groups a red and a blue circle on the same background (their gradients
have the same signs); the colour test keeps them apart. Nothing is deleted;
:func:`move_duplicates` only moves files when asked.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import free_path
from .captions import CAPTION_EXTENSIONS
from .images import ImageError, is_image_path, open_image_rgb, probe_image

#: side of the colour thumbnail compared pixel by pixel
COLOR_SIZE = 32
#: default largest colour difference between matching places, as a fraction of the contrast.
#: Measured on the procedural sets of tests/data/test_dedupe_sets.py: near-duplicates (resized,
#: JPEG q70, 4-6% crops) reach 0.16, distinct images (other colour or shape) start at 0.31
DEFAULT_COLOR_THRESHOLD = 0.22
#: contrast below which differences are not scaled up further (flat, low-contrast pictures)
_CONTRAST_FLOOR = 0.2


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that look the same; ``keep`` is the largest (then first by path), ``others`` the rest."""

    keep: Path
    others: tuple[Path, ...]
    distance: int  # largest bit distance from ``keep`` within the group


def _dhash_of(image: Any, hash_size: int) -> int:
    import numpy as np
    from PIL import Image

    gray = image.convert("L").resize((hash_size + 1, hash_size), Image.Resampling.BOX)
    pixels = np.asarray(gray, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def dhash(path: str | os.PathLike[str], hash_size: int = 8) -> int:
    """The ``hash_size**2``-bit difference hash of an image (EXIF-oriented, alpha on white)."""
    return _dhash_of(open_image_rgb(path), hash_size)


@dataclass(frozen=True)
class ColorPrint:
    """A ``COLOR_SIZE``-square RGB thumbnail (0..1), the per-pixel min/max over each 3x3
    neighbourhood, and the contrast (largest per-channel range)."""

    pixels: Any
    low: Any
    high: Any
    contrast: float


def color_print(image: Any, size: int = COLOR_SIZE) -> ColorPrint:
    """The colour descriptor of a PIL RGB image (see the module docstring)."""
    import numpy as np
    from PIL import Image

    thumb = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    padded = np.pad(thumb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    windows = [padded[dy : dy + size, dx : dx + size] for dy in range(3) for dx in range(3)]
    stack = np.stack(windows)
    flat = thumb.reshape(-1, 3)
    contrast = float((flat.max(axis=0) - flat.min(axis=0)).max())
    return ColorPrint(thumb, stack.min(axis=0), stack.max(axis=0), contrast)


def color_distance(a: ColorPrint, b: ColorPrint) -> float:
    """How far a pixel of one thumbnail lies outside the neighbourhood colour range of the other,
    at worst, as a fraction of the pictures' contrast (0 = same look)."""
    import numpy as np

    def one_way(x: ColorPrint, y: ColorPrint) -> float:
        outside = np.maximum(y.low - x.pixels, 0.0) + np.maximum(x.pixels - y.high, 0.0)
        return float(outside.max())

    contrast = max(min(a.contrast, b.contrast), _CONTRAST_FLOOR)
    return max(one_way(a, b), one_way(b, a)) / contrast


def list_images(root: str | os.PathLike[str], *, exclude: str | os.PathLike[str] | None = None) -> list[Path]:
    """Image files under ``root`` (recursive, hidden folders skipped), sorted.

    ``exclude``: a folder left out wherever it lies below ``root``, the ``--move-to`` folder: duplicates moved
    there by an earlier run are out of the dataset and must not be grouped (and moved onto themselves) again."""
    root = Path(root)
    skip = Path(exclude).resolve() if exclude is not None else None
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (skip is None or (Path(dirpath) / d).resolve() != skip)
        )
        out += [Path(dirpath) / f for f in filenames if is_image_path(f) and not f.startswith(".")]
    return sorted(out)


def find_duplicates(
    paths: list[Path],
    *,
    threshold: int = 6,
    hash_size: int = 8,
    color_threshold: float = DEFAULT_COLOR_THRESHOLD,
) -> tuple[list[DuplicateGroup], list[tuple[Path, str]]]:
    """Group near-duplicates among ``paths``; also returns the files that could not be read.

    A pair counts when its dHash distance is at most ``threshold`` bits **and** its
    :func:`color_distance` at most ``color_threshold``.
    """
    import numpy as np

    hashes: list[int] = []
    prints: list[ColorPrint] = []
    sizes: list[int] = []
    usable: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    for path in paths:
        try:
            image = open_image_rgb(path)
            image_hash = _dhash_of(image, hash_size)
            colors = color_print(image)
            w, h = probe_image(path)
        except ImageError as exc:
            text = str(exc)
            unreadable.append((path, text[len(f"{path}: ") :] if text.startswith(f"{path}: ") else text))
            continue
        usable.append(path)
        hashes.append(image_hash)
        prints.append(colors)
        sizes.append(w * h)
    n = len(usable)
    if n < 2:
        return [], unreadable
    nbytes = (hash_size * hash_size + 7) // 8
    packed = np.array([list(h.to_bytes(nbytes, "big")) for h in hashes], dtype=np.uint8)  # (n, nbytes)
    popcount = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)

    def distances_from(block: np.ndarray) -> np.ndarray:
        """Hamming distances (len(block), n) via XOR of packed bytes and a popcount table."""
        return popcount[block[:, None, :] ^ packed[None, :, :]].sum(axis=2, dtype=np.int32)

    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    chunk = max(1, 2_000_000 // (n * nbytes))  # bounds the temporary (chunk, n, nbytes) array to ~2 MB
    for start in range(0, n, chunk):
        distances = distances_from(packed[start : start + chunk])
        for a, b in zip(*np.nonzero(distances <= threshold), strict=True):
            i, j = start + int(a), int(b)
            if i < j and find(i) != find(j) and color_distance(prints[i], prints[j]) <= color_threshold:
                parent[find(i)] = find(j)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    groups = []
    for indices in members.values():
        if len(indices) < 2:
            continue
        indices.sort(key=lambda i: (-sizes[i], str(usable[i])))
        keep = indices[0]
        distance = int(distances_from(packed[keep : keep + 1])[0, indices[1:]].max())
        groups.append(DuplicateGroup(usable[keep], tuple(usable[i] for i in indices[1:]), distance))
    groups.sort(key=lambda g: str(g.keep))
    return groups, unreadable


@dataclass(frozen=True)
class DuplicateMoves:
    """What :func:`move_duplicates` did, as ``(from, to)`` pairs: ``moved`` files left the dataset, ``copied``
    captions are still there too (an image staying behind reads them), so a script that takes ``moved`` as gone
    is right."""

    moved: list[tuple[Path, Path]]
    copied: list[tuple[Path, Path]]


def move_duplicates(groups: list[DuplicateGroup], destination: str | os.PathLike[str]) -> DuplicateMoves:
    """Move every ``others`` image (and its caption files) into ``destination``.
    A name already taken there (the image's or a caption's) gets :func:`sdcore.io.free_path`'s ``-2``, ``-3``
    ...: nothing is replaced and an image keeps its captions' stem. A caption that an image staying behind reads
    too (``a.txt`` of ``a.png`` and ``a.jpg``, as kohya reads it) is copied, not moved: the kept image keeps it."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    leaving = {path for group in groups for path in group.others}
    images: dict[Path, list[Path]] = {}  # each folder's images, listed once

    def shared(path: Path) -> bool:
        if path.parent not in images:
            images[path.parent] = [p for p in path.parent.iterdir() if is_image_path(p) and p.is_file()]
        return any(p.stem == path.stem and p not in leaving for p in images[path.parent])

    moved: list[tuple[Path, Path]] = []
    copied: list[tuple[Path, Path]] = []
    for group in groups:
        for path in group.others:
            captions = [extension for extension in CAPTION_EXTENSIONS if path.with_suffix(extension).is_file()]
            stays = shared(path)
            target = free_path(destination / path.name, twins=captions)
            shutil.move(str(path), str(target))
            moved.append((path, target))
            for extension in captions:
                caption, caption_target = path.with_suffix(extension), target.with_suffix(extension)
                if stays:
                    shutil.copy2(caption, caption_target)
                    copied.append((caption, caption_target))
                else:
                    shutil.move(str(caption), str(caption_target))
                    moved.append((caption, caption_target))
    return DuplicateMoves(moved, copied)

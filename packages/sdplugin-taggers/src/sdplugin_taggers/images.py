"""Finding, decoding and preprocessing images (PIL + numpy; imported only when tagging).

Decoding dominates on GPU (35-250 ms per multi-megapixel image single-threaded, see the
research notes), so these functions are written to run in worker threads: PIL releases the GIL
while decoding and resizing, and every function returns a fresh array the main thread only stacks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdcore.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".avif"})


def list_images(folder: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Image files under ``folder`` (sorted, hidden files and folders skipped)."""
    root = Path(folder)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    found: list[Path] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(Path(dirpath) / f for f in filenames if _is_image(f))
    else:
        found = [p for p in root.iterdir() if p.is_file() and _is_image(p.name)]
    return sorted(found)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def open_image(source: Any, *, draft: tuple[int, int] | None = None) -> Any:
    """An 8-bit RGB PIL image (transparency on white, EXIF orientation applied) from a path or a PIL image.

    Paths go through sdcore's reader, so truncated files, non-images and decompression bombs raise
    :class:`sdcore.data.images.ImageError` with the reason (the runner counts them as unreadable).
    """
    from PIL import Image
    from sdcore.data.images import open_image_rgb, to_rgb

    if isinstance(source, Image.Image):
        return to_rgb(source)
    return open_image_rgb(source, draft=draft)


def wd_preprocess(source: Any, size: int, *, fast_decode: bool = False) -> tuple[Any, tuple[int, int]]:
    """SmilingWolf's v3 preprocessing: white-composite, pad to a centred white square, bicubic
    resize to ``size``, float32 0-255 in **BGR** channel order, shape ``(size, size, 3)``.

    ``fast_decode`` lets libjpeg decode at a reduced DCT scale that still covers ``size`` (much
    faster for large JPEGs, slightly different pixels). Returns the array and the original size.
    """
    import numpy as np
    from PIL import Image
    from sdcore.data.images import probe_image

    drafted = fast_decode and not isinstance(source, Image.Image)
    rgb = open_image(source, draft=(size, size) if drafted else None)
    original = probe_image(source) if drafted else rgb.size  # a draft decode shrinks the image
    w, h = rgb.size
    side = max(w, h)
    if w != h:
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(rgb, ((side - w) // 2, (side - h) // 2))
        rgb = square
    if side != size:
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(rgb, dtype=np.float32)[:, :, ::-1]
    return np.ascontiguousarray(array), original


def fit_edge_pad(source: Any, size: int) -> tuple[Any, tuple[int, int]]:
    """DeepDanbooru's evaluation preprocessing: fit inside ``size`` keeping the aspect ratio
    (area filter when shrinking), centre with edge-replicated padding, RGB float32 in [0, 1]."""
    import numpy as np
    from PIL import Image

    rgb = open_image(source)
    original = rgb.size
    w, h = rgb.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        rgb = rgb.resize((nw, nh), Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    top, left = (size - nh) // 2, (size - nw) // 2
    array = np.pad(array, ((top, size - nh - top), (left, size - nw - left), (0, 0)), mode="edge")
    return np.ascontiguousarray(array), original


def iter_chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]

"""Near-duplicate images by perceptual hash (dHash), with numpy and PIL only.

Duplicates silently multiply an image's weight in training. dHash compares each pixel of a
9x8 grayscale thumbnail with its right neighbour: 64 bits that survive resizing, re-encoding and
small colour changes. Two images whose hashes differ in at most ``threshold`` bits are grouped.
Nothing is deleted; :func:`move_duplicates` only moves files when asked.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .captions import CAPTION_EXTENSIONS
from .images import ImageError, is_image_path, open_image_rgb, probe_image


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that look the same; ``keep`` is the largest (then first by path), ``others`` the rest."""

    keep: Path
    others: tuple[Path, ...]
    distance: int  # largest bit distance from ``keep`` within the group


def dhash(path: str | os.PathLike[str], hash_size: int = 8) -> int:
    """The ``hash_size**2``-bit difference hash of an image (EXIF-oriented, alpha on white)."""
    import numpy as np
    from PIL import Image

    image = open_image_rgb(path).convert("L").resize((hash_size + 1, hash_size), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """Image files under ``root`` (recursive, hidden folders skipped), sorted."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in filenames if is_image_path(f) and not f.startswith(".")]
    return sorted(out)


def find_duplicates(
    paths: list[Path], *, threshold: int = 6, hash_size: int = 8
) -> tuple[list[DuplicateGroup], list[tuple[Path, str]]]:
    """Group near-duplicates among ``paths``; also returns the files that could not be read."""
    import numpy as np

    hashes: list[int] = []
    sizes: list[int] = []
    usable: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    for path in paths:
        try:
            image_hash = dhash(path, hash_size)
            w, h = probe_image(path)
        except ImageError as exc:
            text = str(exc)
            unreadable.append((path, text[len(f"{path}: ") :] if text.startswith(f"{path}: ") else text))
            continue
        usable.append(path)
        hashes.append(image_hash)
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
            if i < j:
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


def _free_name(folder: Path, name: str) -> Path:
    target = folder / name
    stem, suffix = Path(name).stem, Path(name).suffix
    counter = 1
    while target.exists():
        target = folder / f"{stem}_{counter}{suffix}"
        counter += 1
    return target


def move_duplicates(groups: list[DuplicateGroup], destination: str | os.PathLike[str]) -> list[tuple[Path, Path]]:
    """Move every ``others`` image (and its caption files) into ``destination``; returns (from, to) pairs."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    moved: list[tuple[Path, Path]] = []
    for group in groups:
        for path in group.others:
            target = _free_name(destination, path.name)
            shutil.move(str(path), str(target))
            moved.append((path, target))
            for extension in CAPTION_EXTENSIONS:
                caption = path.with_suffix(extension)
                if caption.is_file():
                    caption_target = target.with_suffix(extension)
                    if caption_target.exists():
                        caption_target = _free_name(destination, caption_target.name)
                    shutil.move(str(caption), str(caption_target))
                    moved.append((caption, caption_target))
    return moved

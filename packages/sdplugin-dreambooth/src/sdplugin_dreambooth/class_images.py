"""Class images for prior preservation: generated once with the frozen model, resumable.

Each image is written atomically with its prompt beside it (``.txt``, which is also its caption
for training), so a killed run leaves only complete images and the next run generates just the
shortfall. ``class_images.json`` records the prompt, model and settings that produced them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdcore.data.captions import read_caption_text
from sdcore.data.images import IMAGE_SUFFIXES
from sdcore.errors import ConfigError, DataError
from sdcore.io import atomic_save, atomic_write_text

MANIFEST = "class_images.json"


def existing_class_images(folder: Path, prompt: str) -> list[Path]:
    """Images in ``folder`` usable for ``prompt``: any image whose caption is the prompt, or with no caption."""
    found: list[Path] = []
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        caption = path.with_suffix(".txt")
        if caption.exists():
            try:  # the captions' one decoding rule (a BOM, UTF-16 from Notepad)
                if read_caption_text(caption).strip() != prompt.strip():
                    continue
            except DataError as exc:
                raise ConfigError(f"class images: {exc}") from None
        found.append(path)
    return found


def ensure_class_images(
    bundle: Any,
    folder: str | Path,
    prompt: str,
    count: int,
    *,
    batch_size: int = 4,
    steps: int = 30,
    sampler: str = "dpm++2m",
    seed: int = 0,
    size: tuple[int, int] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Make sure ``folder`` holds ``count`` class images for ``prompt``; generate what is missing.

    Image ``i`` is always generated with seed ``seed + i``, so resuming after an interruption
    produces the same set as an uninterrupted run.
    """
    from sdcore.generate.pipeline import generate_images

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    have = existing_class_images(out, prompt)
    if len(have) >= count:
        return have[:count]
    taken = {p.stem for p in have}
    missing = [i for i in range(count) if f"class_{i:05d}" not in taken][: count - len(have)]
    width, height = size if size is not None else (None, None)
    manifest = {
        "prompt": prompt,
        "model": getattr(bundle, "source", None),
        "steps": steps,
        "sampler": sampler,
        "seed": seed,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    iterator = range(0, len(missing), batch_size)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="class images", unit="batch")
    for start in iterator:
        chunk = missing[start : start + batch_size]
        for index in chunk:  # one seed per image keeps results independent of the batch split
            (image,) = generate_images(
                bundle, [prompt], steps=steps, sampler=sampler, seed=seed + index, width=width, height=height
            )
            path = out / f"class_{index:05d}.png"
            _save_png(image, path)
            atomic_write_text(path.with_suffix(".txt"), prompt)
    return existing_class_images(out, prompt)[:count]


def _save_png(image: Any, path: Path) -> None:
    atomic_save(path, lambda tmp: image.save(tmp, format="PNG"))

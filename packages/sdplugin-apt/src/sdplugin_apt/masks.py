"""DreamArtist attention maps: ``<stem>_att.<ext>`` greyscale images that weight the loss.

Grey value ``g`` maps to a learning intensity: ``g <= 127`` -> ``g / 127`` (0..1), ``g > 127`` ->
``1 + 4 * (g - 127) / 128`` (1..5); so black ignores a region, mid-grey is normal, white counts 5x.
The map is resized to the latent size and multiplies the per-element loss (``Batch.masks``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MASK_SUFFIX = "_att"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def mask_path_for(image: str | Path) -> Path | None:
    """The attention map beside ``image`` (``foo.png`` -> ``foo_att.png`` or another image type)."""
    image = Path(image)
    for ext in (image.suffix, *IMAGE_EXTENSIONS):
        candidate = image.with_name(f"{image.stem}{MASK_SUFFIX}{ext}")
        if candidate.is_file():
            return candidate
    return None


def is_mask_file(path: str | Path) -> bool:
    """True for ``*_att.<image>`` files, which are not training images."""
    path = Path(path)
    return path.stem.endswith(MASK_SUFFIX) and path.suffix.lower() in IMAGE_EXTENSIONS


def intensity(grey: Any) -> torch.Tensor:
    """Map grey values (0..255, any shape) to DreamArtist's loss weights (0..5)."""
    import torch

    g = torch.as_tensor(grey, dtype=torch.float32)
    return torch.where(g <= 127, g / 127.0, 1.0 + 4.0 * (g - 127.0) / 128.0)


def load_attention_mask(path: str | Path, latent_size: tuple[int, int]) -> torch.Tensor:
    """``[1, h, w]`` loss weights for a latent of ``(h, w)`` from a greyscale map file."""
    import numpy as np
    from PIL import Image

    h, w = latent_size
    with Image.open(path) as image:
        grey = image.convert("L").resize((w, h), Image.Resampling.BILINEAR)
        values = np.asarray(grey, dtype=np.float32)
    return intensity(values).unsqueeze(0)

"""Images the inpainting sample tests write: a random picture and a mask whose parts each rule treats differently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def picture(path: Path, width: int = 50, height: int = 30) -> Path:
    """A random RGB picture (seed 1) saved at ``path``."""
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def rule_mask(path: Path, width: int = 50, height: int = 30) -> Path:
    """A hole (a white box), a faint grey patch (a trace: in OneTrainer's latent mask, not in its pixel hole) and
    a one-pixel white line (gone after the 5x5 box average), so each rule differs from a plain cut at 0.5."""
    values = np.zeros((height, width), dtype=np.uint8)
    values[8:20, 10:26] = 255
    values[2:6, 38:46] = 12
    values[24, 30:48] = 255
    Image.fromarray(values, mode="L").save(path)
    return path

"""kohya's two SD3 positional-embedding training options, on diffusers' ``SD3Transformer2DModel``
(sd-scripts 48d368f ``library/sd3_models.py``; kohya says "only for SD3.5M").

- ``--enable_scaled_pos_embed``: instead of cropping the centre of the model's one positional-embedding
  table (``pos_embed_max_size`` squared), each training resolution gets its own table: a 2-D sin-cos grid
  of side ``int(1.5 * p)`` (``p`` = that resolution's latent side in patches) whose central ``p x p``
  region spans the positions the model was trained with (KohakuBlueleaf's scaled embedding, below). A
  forward picks the table by the patch area of its input: the smallest training size whose threshold
  (the mean of its area and the next smaller size's; the largest size: its table's area) holds the
  input's area, else the largest; an input wider or taller than that table gets a new table of its own
  size, as kohya adds one. The tables are computed once, in float32, and cast to the input's dtype.
- ``--pos_emb_random_crop_rate``: with this probability a forward crops the table (the model's, or the
  scaled one) at a uniformly random position instead of its centre.

kohya's differences kept out: kohya decides the random crop once per forward (the whole batch) from the
global RNG; here each sample draws its own decision and position from its noise generator, after all its
other draws (the same distribution per sample; batch-size, accumulation and resume invariance), and the
crop applies to training and validation forwards only (kohya's MMDiT also crops at random while it renders
sample images). The model's own ``pos_embed`` table is not changed and is saved as it was.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: kohya's MMDiT.POS_EMBED_MAX_RATIO: a scaled table's side is this times the training size (in patches)
MAX_RATIO = 1.5
#: the patch grid SD3 was trained on (kohya's ``base_size``)
BASE_SIZE = 16
#: ``Batch.extra`` key of the per-sample crops: None (the centre) or (top, left) in the table
CROPS_KEY = "pos_embed_crops"
#: the attribute of the transformer's ``PatchEmbed`` that holds the installed :class:`KohyaPosEmbed`
_ATTRIBUTE = "_sdcore_kohya_pos_embed"


def scaled_sincos_pos_embed(embed_dim: int, grid_size: int, sample_size: int, base_size: int = BASE_SIZE) -> Any:
    """A ``[grid_size**2, embed_dim]`` float32 2-D sin-cos table whose coordinates are scaled so that the
    central ``sample_size`` square spans ``base_size`` units: coordinate ``i`` of a side is
    ``i / g * s - s * (g - n) / (2 g)`` with ``g = grid_size``, ``n = sample_size``, ``s = base_size * g / n``.
    Each half of the channels encodes one axis (the first half the column, the second the row, as the
    MAE/DiT table SD3 uses does) with ``sin`` then ``cos`` of ``coordinate * 10000**(-k / (embed_dim / 4))``."""
    import numpy as np
    import torch

    g, n = grid_size, sample_size
    scale = base_size * g / n
    coords = np.arange(g, dtype=np.float32) / g * scale - scale * (g - n) / (2 * g)
    rows = np.repeat(coords, g)  # row coordinate of position (r, c) -> index r * g + c
    cols = np.tile(coords, g)
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) / (half / 2.0))

    def axis(values: Any) -> Any:
        angles = np.einsum("m,d->md", values.astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return torch.from_numpy(np.concatenate([axis(cols), axis(rows)], axis=1)).float()


@dataclass
class KohyaPosEmbed:
    """What replaces ``PatchEmbed.cropped_pos_embed`` while the options are on."""

    patch_embed: Any  # diffusers' PatchEmbed of the transformer
    hidden_size: int
    patch_size: int
    scaled: bool
    #: (area threshold, patched size), ascending: kohya's ``resolution_area_to_latent_size``
    thresholds: list[tuple[int, int]]
    tables: dict[int, Any]  # patched size -> [side**2, D] float32 (CPU)
    #: the per-sample crops of the current forward (``None``: every sample's centre)
    crops: list[tuple[int, int] | None] | None = None

    def table_for(self, h: int, w: int) -> tuple[Any, int]:
        """(the table, its side) a forward of ``h x w`` patches crops."""
        if not self.scaled:
            side = int(self.patch_embed.pos_embed_max_size)
            return self.patch_embed.pos_embed.reshape(side * side, -1), side
        size = next((patched for area, patched in self.thresholds if h * w <= area), self.thresholds[-1][1])
        table = self.tables[size]
        side = math.isqrt(table.shape[0])
        if h > side or w > side:  # kohya adds a table for an input that does not fit
            size = max(h, w)
            side = int(size * MAX_RATIO)
            table = scaled_sincos_pos_embed(self.hidden_size, side, size)
            self.tables[size] = table
            self.thresholds = sorted([*self.thresholds, (side * side, size)])
        return table, side

    def draw_crop(self, h: int, w: int, rate: float, gen: torch.Generator) -> tuple[int, int] | None:
        """One sample's crop: with probability ``rate`` a uniform (top, left) in the table it will use,
        else None (the centre); kohya's ``rand < rate``, then ``randint`` for top and left."""
        import torch

        if not float(torch.rand((), generator=gen)) < rate:
            return None
        _table, side = self.table_for(h, w)
        top = int(torch.randint(0, side - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, side - w + 1, (1,), generator=gen))
        return top, left

    def __call__(self, height: int, width: int) -> Any:
        """``PatchEmbed.cropped_pos_embed(height, width)`` (pixel-latent sizes): ``[1 or B, h*w, D]``."""
        import torch

        h, w = height // self.patch_size, width // self.patch_size
        table, side = self.table_for(h, w)
        device = self.patch_embed.proj.weight.device
        grid = table.to(device=device).reshape(side, side, -1)
        offsets = self.crops or [None]
        out = []
        for crop in offsets:
            top, left = crop if crop is not None else ((side - h) // 2, (side - w) // 2)
            out.append(grid[top : top + h, left : left + w, :].reshape(h * w, -1))
        return torch.stack(out)


def install(transformer: Any, *, latent_sizes: Sequence[int] | None) -> KohyaPosEmbed:
    """Put kohya's positional embedding on ``transformer`` (a diffusers ``SD3Transformer2DModel``):
    ``latent_sizes`` (the training resolutions' latent sides, kohya's ``round(sqrt(w*h)) // 8``) turns on
    the scaled tables; None keeps the model's table (for the random crop alone)."""
    patch_embed = transformer.pos_embed
    if getattr(patch_embed, "pos_embed_max_size", None) is None:
        from ...errors import ConfigError

        raise ConfigError("kohya's SD3 positional-embedding options need an MMDiT with pos_embed_max_size")
    patch = int(transformer.config.patch_size)
    hidden = int(patch_embed.pos_embed.shape[-1])
    thresholds: list[tuple[int, int]] = []
    tables: dict[int, Any] = {}
    if latent_sizes:
        patched = sorted({size // patch for size in latent_sizes})
        for previous, size in itertools.pairwise(patched):
            thresholds.append(((previous**2 + size**2) // 2, previous))
        thresholds.append((int((patched[-1] * MAX_RATIO) ** 2), patched[-1]))
        for size in patched:
            tables[size] = scaled_sincos_pos_embed(hidden, int(size * MAX_RATIO), size)
    hook = KohyaPosEmbed(patch_embed, hidden, patch, bool(latent_sizes), thresholds, tables)
    setattr(patch_embed, _ATTRIBUTE, hook)
    patch_embed.cropped_pos_embed = hook
    return hook


def uninstall(transformer: Any) -> None:
    """The model's own cropping again (after the run)."""
    patch_embed = transformer.pos_embed
    if getattr(patch_embed, _ATTRIBUTE, None) is not None:
        delattr(patch_embed, _ATTRIBUTE)
        del patch_embed.cropped_pos_embed  # the instance attribute: the class's method shows again


def installed(transformer: Any) -> KohyaPosEmbed | None:
    return getattr(getattr(transformer, "pos_embed", None), _ATTRIBUTE, None)


@contextmanager
def crops_applied(transformer: Any, crops: list[tuple[int, int] | None] | None) -> Iterator[None]:
    """The forwards in the ``with`` block crop per sample as ``crops`` says (no-op without the hook)."""
    hook = installed(transformer)
    if hook is None or crops is None:
        yield
        return
    hook.crops = crops
    try:
        yield
    finally:
        hook.crops = None


__all__ = [
    "CROPS_KEY",
    "KohyaPosEmbed",
    "crops_applied",
    "install",
    "installed",
    "scaled_sincos_pos_embed",
    "uninstall",
]

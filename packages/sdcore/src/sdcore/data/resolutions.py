"""Several training resolutions ("512,768,1024"): each image trains at one of them, as OneTrainer does.

OneTrainer's ``resolution`` (and a concept's ``image.resolution_override``) may be a comma list. Its
MGDS bucketing (``AspectBucketing`` / ``SingleAspectCalculation``) then picks, for each image, one
entry of that list *uniformly at random* (``rand.choice`` over the list as written, so a value listed
twice is twice as likely), from a generator seeded by ``(seed, variation, image)``, and puts the image
into the nearest-aspect bucket *of that resolution*; batches are sorted by bucket, so each batch holds
one resolution. Which ``variation`` the choice sees depends on latent caching there:

- latents not cached: the variation is the epoch, so every epoch draws again (all repeats of an
  image within one epoch share the draw) -- sdcore's ``--resolution-draw epoch``;
- latents cached (OneTrainer's default): the cache holds ``image_variations`` (default 1) variations
  and epochs cycle through them, so with one variation each image keeps one drawn resolution for the
  whole run -- sdcore's ``--resolution-draw once``.

sdcore expands such an image into one index entry per distinct resolution (each with its own bucket
assignment, cached latent and disk cache file, since those are keyed by the bucket) and the epoch plan
takes the drawn one (:class:`~sdcore.data.sampler.BucketBatchSampler`); with ``once`` only the drawn
entry is kept, so nothing is encoded that never trains. The draws use sdcore's own seeded generator
(keyed by the image's path inside its folder), not OneTrainer's process-salted ``hash``, so the rule is
the same and the particular draws are sdcore's, reproducible across processes and resumes.

ai-toolkit's ``resolution: [512, 768]`` means something else (every image at every resolution in
every epoch, one dataset copy per resolution); :mod:`sdcore.train.aitoolkit` maps it to one subset per
resolution.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .dataset import DatasetIndex, ImageEntry, SubsetOptions

#: how often an image's resolution is drawn: every epoch, or once for the whole run
RESOLUTION_DRAWS: tuple[str, ...] = ("epoch", "once")


def parse_resolutions(value: object, what: str = "--resolutions") -> tuple[int, ...]:
    """``"512,768,1024"`` (or a list of numbers) -> ``(512, 768, 1024)``, order and repeats kept (a
    repeated value weighs the draw, as in OneTrainer); ``""`` -> ``()``. A bad value is a
    :class:`ConfigError` naming ``what``."""
    if value is None or value == "":
        return ()
    parts: list[object] = list(value) if isinstance(value, (list, tuple)) else list(str(value).split(","))
    out: list[int] = []
    for part in parts:
        text = str(part).strip()
        if isinstance(part, bool) or not text.isdigit() or int(text) <= 0:
            raise ConfigError(
                f"{what} {value!r}: a comma list of positive whole numbers such as 512,768,1024 is needed "
                f"({text!r} is not one)"
            )
        out.append(int(text))
    return tuple(out)


def image_key(entry: ImageEntry) -> str:
    """The image's path inside its subset folder (the file name when it lies elsewhere): draws keyed by
    it do not change when the dataset moves or other images are added."""
    folder = Path(entry.subset.image_dir)
    try:
        return f"{folder.name}/{entry.path.relative_to(folder).as_posix()}"
    except ValueError:
        return entry.path.name


def draw_resolution(resolutions: tuple[int, ...], seed: int, variation: int, key: str) -> int:
    """One image's resolution for ``variation``: a uniform choice over ``resolutions`` as written."""
    # str seeds hash with SHA-512: stable across processes and Python versions
    return random.Random(f"sdcore-resolution:{seed}:{variation}:{key}").choice(resolutions)


def draw_variation(draw: str, epoch: int) -> int:
    """The variation the draw of ``epoch`` uses: the epoch itself, or 0 for the whole run."""
    return 0 if draw == "once" else epoch


@dataclass(frozen=True)
class ResolutionGroup:
    """One image at several resolutions: ``entries[k]`` trains it at ``sizes[k]`` (distinct, in the
    order first listed); ``choices`` is the list the draw picks from (as written, repeats kept)."""

    entries: tuple[int, ...]
    sizes: tuple[int, ...]
    choices: tuple[int, ...]
    key: str

    def entry_for(self, seed: int, variation: int) -> int:
        """The entry that trains in ``variation``."""
        return self.entries[self.sizes.index(draw_resolution(self.choices, seed, variation, self.key))]


def expand_resolutions(
    index: DatasetIndex, held_out: frozenset[int], *, seed: int, draw: str
) -> tuple[frozenset[int], list[ResolutionGroup]]:
    """Give every image whose subset lists several ``resolutions`` one entry per distinct resolution
    (in place: ``index.entries`` is replaced, each copy's subset has that single resolution); returns
    the held-out set in the new numbering (an image held out for validation is validated at each of
    its resolutions) and the groups the epoch plan draws from. With ``draw == "once"`` only the drawn
    entry is kept and no group is returned (nothing is left to draw)."""
    if draw not in RESOLUTION_DRAWS:
        raise ConfigError(f"--resolution-draw {draw!r} is not one of {', '.join(RESOLUTION_DRAWS)}")
    subsets: dict[tuple[int, int], SubsetOptions] = {}
    entries: list[ImageEntry] = []
    new_held: set[int] = set()
    groups: list[ResolutionGroup] = []
    for i, entry in enumerate(index.entries):
        choices = tuple(getattr(entry.subset, "resolutions", ()) or ())
        if len(set(choices)) < 2:
            if i in held_out:
                new_held.add(len(entries))
            entries.append(entry)
            continue
        key = image_key(entry)
        sizes = tuple(dict.fromkeys(choices))
        if draw == "once" and i not in held_out:
            sizes = (draw_resolution(choices, seed, 0, key),)
        members = []
        for size in sizes:
            sub_key = (id(entry.subset), size)
            if sub_key not in subsets:
                # OneTrainer's rotated mask crop is at least the list's lowest resolution at every size it trains
                kept = {"mask_crop_min_size": getattr(entry.subset, "mask_crop_min_size", None) or min(choices)}
                subsets[sub_key] = replace(entry.subset, resolution=size, resolution_size=None, resolutions=(), **kept)
            if i in held_out:
                new_held.add(len(entries))
            members.append(len(entries))
            entries.append(replace(entry, subset=subsets[sub_key]))
        if len(members) > 1 and i not in held_out:
            groups.append(ResolutionGroup(tuple(members), sizes, choices, key))
    index.entries = entries
    index.resolution_groups = groups
    return frozenset(new_held), groups


__all__ = [
    "RESOLUTION_DRAWS",
    "ResolutionGroup",
    "draw_resolution",
    "draw_variation",
    "expand_resolutions",
    "image_key",
    "parse_resolutions",
]

"""FLUX.1 Kontext training data: a control (reference) image beside every training image.

A Kontext pair is "edit this (the control image) into that (the training image, with its caption)". The
control images live in their own folder with the training images' file stems (musubi-tuner's
``control_directory``, ai-toolkit's ``control_path``: ``data/cat.png`` pairs with ``controls/cat.jpg``);
``--control-dir`` sets that folder for every subset, a dataset TOML subset's ``control_directory`` for one.

How a control image becomes the reference latents (what the two peers do, and which sdcore follows):

- geometry: ai-toolkit resizes the control image to the size its target is resized to, crops it at the
  target's crop and mirrors it with the target (``load_control_image`` with ``full_size_control_images``),
  so control and target stay aligned pixel for pixel under every augmentation. sdcore does the same
  through the one geometry every sample goes through (:func:`sdcore.data.loading.fit_to_bucket`, with
  the subset's resize filter): a control image of the target's size lands exactly where the target does;
  one of another size is stretched to it first (as ai-toolkit). musubi-tuner resizes to the target's
  bucket keeping the control's own aspect (its default; it has no flips or random crops).
  ``color_aug`` changes the training image only (ai-toolkit replays spatial augmentations alone).
- encoding: both peers take a posterior *sample* of the VAE (ai-toolkit's ``encode_images``,
  musubi-tuner's ``ae.encode``), then Flux's shift and scale; sdcore draws it as it draws the training
  latents, from a generator seeded by the image (another purpose than the target's draw), so a cached run
  and an uncached one see the same reference latents.
- the step: :func:`sdcore.models.flux.kontext.join_reference` puts the reference's tokens after the noisy
  latents' with position ids ``(1, row, col)``; the loss is on the latents' tokens only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.images import IMAGE_SUFFIXES

if TYPE_CHECKING:
    import numpy as np

    from ..data.buckets import BucketAssignment
    from ..data.dataset import DatasetIndex, ImageEntry
    from ..models.layout import ModelLayout

log = logging.getLogger("sdcore.train")


def has_control(entry: ImageEntry) -> bool:
    """Whether ``entry`` is paired with a control image: its own (a JSONL row's, :mod:`sdcore.data.jsonl`) or one
    in its subset's control folder."""
    return getattr(entry, "control_path", None) is not None or _subset_paired(entry.subset)


def _subset_paired(subset: Any) -> bool:
    """Whether a subset's images come with control images: a control folder, or a JSONL naming one per row (not
    an imagefolder ``metadata.jsonl``, whose control column is ``""``)."""
    if getattr(subset, "control_dir", None) is not None:
        return True
    return getattr(subset, "jsonl_file", None) is not None and bool(getattr(subset, "jsonl_columns", ("", "x"))[1])


#: extensions a control image may have: every image extension sdcore trains on (a training image may be a
#: ``.tif``, so may its control image), in lower and upper case as kohya's and musubi-tuner's lists spell them
CONTROL_EXTENSIONS = tuple(dict.fromkeys(ext for s in IMAGE_SUFFIXES for ext in (s, s.upper())))


def control_image_path(entry: ImageEntry) -> Path | None:
    """The control image of ``entry``: the file named like it (:data:`CONTROL_EXTENSIONS`, the first in sorted
    order as kohya's and musubi-tuner's ``glob_images``) in its subset's control folder; None without."""
    own = getattr(entry, "control_path", None)
    if own is not None:  # a JSONL row's control image, checked when the row was read
        return Path(own) if Path(own).is_file() else None
    folder = getattr(entry.subset, "control_dir", None)
    if folder is None:
        return None
    found = sorted({str(Path(folder) / f"{entry.path.stem}{ext}") for ext in CONTROL_EXTENSIONS})
    found = [p for p in found if Path(p).is_file()]
    return Path(found[0]) if found else None


def control_identity(entry: ImageEntry) -> tuple[str, int, int] | None:
    """``entry``'s control image as a latent cache key part (None without one)."""
    from ..data.images import file_identity

    return file_identity(control_image_path(entry))


def load_control_pixels(
    entry: ImageEntry,
    assignment: BucketAssignment,
    *,
    flip: bool,
    crop: tuple[int, int] | None = None,
) -> np.ndarray:
    """The control image of ``entry`` as float32 CHW in [-1, 1], resized, cropped and mirrored exactly as the
    training image with ``assignment``, ``crop`` and ``flip`` is (so the pair stays aligned)."""
    import numpy as np

    from ..data.images import open_image_rgb
    from ..data.loading import fit_to_bucket
    from ..errors import DataError

    path = control_image_path(entry)
    if path is None:
        raise DataError(f"{entry.path}: no control image named {entry.path.stem}.* in {entry.subset.control_dir}")
    image = open_image_rgb(path)
    interpolation = getattr(entry.subset, "resize_interpolation", None)
    image, _ = fit_to_bucket(image, assignment, flip=flip, crop=crop, interpolation=interpolation)
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _listed(paths: list[str], limit: int = 10) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" ... and {len(paths) - limit} more" if len(paths) > limit else "")


def _same_folder(a: Path | None, b: Path | None) -> bool:
    try:
        return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def control_problems(index: DatasetIndex) -> list[str]:
    """Pre-flight problems of the control images (no model needed): a control folder that is not one or is
    the image folder itself, training images without a control image (listed, as the mask images are), unreadable control images,
    and a dataset where some subsets have control images and others not (a Kontext batch needs a reference
    for every sample: ai-toolkit and musubi-tuner pair every image of a control dataset)."""
    from ..data.images import ImageError, probe_image

    subsets = index.subsets or list({id(e.subset): e.subset for e in index.entries}.values())
    with_dir = [s for s in subsets if getattr(s, "control_dir", None) is not None]
    if not any(_subset_paired(s) for s in subsets):
        return []
    problems: list[str] = []
    for folder in dict.fromkeys(Path(s.control_dir) for s in with_dir if s.control_dir is not None):
        if not folder.is_dir():
            problems.append(f"control images: {folder} is not a folder (--control-dir / control_directory)")
    # the control folder is the subset's own image folder: every image pairs with itself (or with a same-stem
    # training image beside it), an identity "edit" no user means; the peers have no such check, sdcore refuses
    own = [str(s.image_dir) for s in with_dir if _same_folder(s.control_dir, s.image_dir)]
    if own:
        problems.append(
            f"control images: the control folder is the image folder itself ({_listed(own)}): each image would be "
            "its own control image; put the control images in a folder of their own"
        )
    without = [str(s.image_dir) for s in subsets if not _subset_paired(s)]
    if without:
        problems.append(
            f"control images: {len(without)} subset(s) have no control folder while others do ({_listed(without)}); "
            "every training image of a FLUX.1 Kontext or control-LoRA run needs its control image (give each subset a "
            "control_directory)"
        )
    missing: list[str] = []
    missing_class = 0
    unreadable: list[str] = []
    for entry in index.entries:
        control_dir = getattr(entry.subset, "control_dir", None)
        row = getattr(entry, "control_path", None) is not None  # a JSONL row's: its absence was reported already
        if not row and (control_dir is None or not Path(control_dir).is_dir()):
            continue
        path = control_image_path(entry)
        if path is None:
            missing.append(str(entry.path))
            missing_class += entry.is_class
            continue
        try:
            probe_image(path)
        except ImageError as exc:
            unreadable.append(str(exc))
    if missing:
        problems.append(
            f"control images: {len(missing)} image(s) without a control image of the same name in their control "
            f"folder: {_listed(missing)}"
            + (
                f" ({missing_class} of them regularisation images: a Kontext regularisation image is a pair too, "
                "and --control-dir serves --reg-data as well; a dataset TOML gives each subset its own "
                "control_directory)"
                if missing_class
                else ""
            )
        )
    if unreadable:
        problems.append(f"control images: {len(unreadable)} unreadable: {_listed(unreadable)}")
    return problems


def control_family_problems(layout: ModelLayout, index: DatasetIndex) -> list[str]:
    """Control images train FLUX.1 Kontext: a model of another family has no reference-image input, and a
    FLUX.1 without the guidance embedding (schnell) is not what Kontext [dev] was distilled from, so both
    are refused in one line rather than trained on tokens the model cannot place."""
    if not any(has_control(e) for e in index.entries):
        return []
    if layout.family != "flux":
        return [
            f"control images (--control-dir / control_directory) train FLUX.1 Kontext; this model is {layout.family}, "
            "which takes no reference image (train a FLUX.1 Kontext [dev] model, or leave out the control images)"
        ]
    config = layout.configs.get("transformer") or {}
    if not config.get("guidance_embeds", True):
        return [
            "control images (--control-dir / control_directory): this FLUX.1 (schnell) has no guidance embedding; "
            "FLUX.1 Kontext is a dev model (train FLUX.1 Kontext [dev], or dev to teach it references)"
        ]
    return []


def control_summary(index: DatasetIndex, *, channels: bool = False) -> list[str]:
    """The plan's line for a Kontext dataset (none without control images): that it trains FLUX.1 Kontext and
    from which control folders, so a dry run shows what the run will pair; ``channels``: a FLUX.1 control LoRA
    (:mod:`sdcore.train.control_lora`) takes them instead."""
    folders = list(dict.fromkeys(str(e.subset.jsonl_file if getattr(e, "control_path", None) is not None
                                     else e.subset.control_dir) for e in index.entries if has_control(e)))  # fmt: skip
    if not folders:
        return []
    what = "FLUX.1 control LoRA (control latents joined on the channels)" if channels else "FLUX.1 Kontext"
    return [f"  {what}: every sample paired with its control image from {_listed(folders)}"]


def warn_unpaired_kontext(bundle: Any) -> None:
    """A FLUX.1 Kontext model (a folder saying ``FluxKontextPipeline``) trained without control images learns
    text-to-image, which is rarely what its user meant: say so once the model is known (a Kontext single file
    reads as dev, so nothing can tell it there)."""
    from ..models.flux.variants import bundle_variant

    if getattr(bundle, "transformer", None) is not None and bundle_variant(bundle) == "kontext":
        log.warning(
            "%s is FLUX.1 Kontext and the dataset has no control images: it trains as text-to-image; to teach "
            "edits, pair each image with its source (--control-dir, or control_directory in the dataset TOML)",
            bundle.source or "this model",
        )


def reference_count(index: DatasetIndex | None) -> int:
    """Reference images per sample of a dataset (0 or 1): the memory plan's extra image tokens."""
    if index is None:
        return 0
    return 1 if any(has_control(e) for e in index.entries) else 0


def control_seed(base_seed: int, entry: ImageEntry, flipped: bool) -> int:
    """Seed of the control image's VAE posterior draw (as :func:`sdcore.train.cache.latent_seed`, another purpose)."""
    from .cache import latent_seed

    return latent_seed(base_seed, entry, flipped, purpose="control-latent")


def encode_controls(bundle: Any, pixels: list[Any], seeds: list[int]) -> Any:
    """Unscaled posterior samples of control pixel arrays (CHW, [-1, 1]) as the training latents are drawn."""
    import torch

    from .cache import encode_pixels

    return encode_pixels(bundle, torch.stack([torch.as_tensor(p) for p in pixels]), seeds)


__all__ = [
    "CONTROL_EXTENSIONS",
    "control_family_problems",
    "control_identity",
    "control_image_path",
    "control_problems",
    "control_seed",
    "control_summary",
    "encode_controls",
    "has_control",
    "load_control_pixels",
    "reference_count",
]

"""Pixels for one training sample: decode, resize to cover the bucket, crop, flip, scale to [-1, 1].

Resampling follows kohya: area averaging when shrinking (PIL ``BOX``, the equivalent of OpenCV's
``INTER_AREA``), Lanczos when enlarging; a subset's ``resize_interpolation`` (kohya's option) picks
one filter for both (:data:`sdcore.train.options.RESIZE_FILTERS`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from .buckets import BucketAssignment
from .dataset import ImageEntry
from .images import open_image_rgb

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    from .augment import ColorAug


def resize_for_bucket(image: PILImage.Image, size: tuple[int, int], interpolation: str | None = None) -> PILImage.Image:
    """Resize ``image`` to ``size`` (w, h): with ``interpolation`` (a name of
    :data:`sdcore.train.options.RESIZE_FILTERS`) that PIL filter; without (kohya's default), BOX (area)
    when shrinking, LANCZOS when enlarging."""
    from PIL import Image

    if image.size == tuple(size):
        return image
    if interpolation is not None:
        from ..train.options import RESIZE_FILTERS

        return image.resize(size, getattr(Image.Resampling, RESIZE_FILTERS[interpolation]))
    shrinking = size[0] * size[1] <= image.size[0] * image.size[1]
    method = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    return image.resize(size, method)


def fit_to_bucket(
    image: PILImage.Image,
    assignment: BucketAssignment,
    *,
    flip: bool,
    crop: tuple[int, int] | None = None,
    interpolation: str | None = None,
) -> tuple[PILImage.Image, tuple[int, int]]:
    """Resize to cover the bucket, crop at ``crop`` (``(left, top)`` in the resized image; the
    bucket's centre crop when None), mirror when ``flip``; returns the image and ``(top, left)``
    of the crop (mirrored when ``flip``). The one geometry every sample, mask and map goes through (a
    sample's mask augmentation, ``assignment.augment``, rotates and crops the image before all that);
    ``interpolation`` is the subset's ``resize_interpolation`` (:func:`resize_for_bucket`)."""
    from PIL import ImageOps

    if assignment.augment is not None:  # OneTrainer's mask augmentation: rotated and cropped first
        image = assignment.augment.apply(image)
    resized_w, resized_h = assignment.resized
    if image.size != (resized_w, resized_h):
        image = resize_for_bucket(image, (resized_w, resized_h), interpolation)
    left, top = assignment.crop if crop is None else crop
    bucket_w, bucket_h = assignment.bucket
    image = image.crop((left, top, left + bucket_w, top + bucket_h))
    if flip:
        image = ImageOps.mirror(image)
        left = resized_w - left - bucket_w
    return image, (top, left)


def load_training_image(
    entry: ImageEntry,
    assignment: BucketAssignment,
    *,
    flip: bool,
    crop: tuple[int, int] | None = None,
    color: ColorAug | None = None,
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """``(pixels, original_size, crop_coords)`` for one sample.

    ``pixels`` is float32 CHW in [-1, 1] of the bucket's size; ``original_size`` is (h, w) of the
    image after EXIF rotation (of the region a OneTrainer mask rotate-crop, ``assignment.augment``, keeps,
    as OneTrainer's ``CalcAspect`` runs after it); ``crop_coords`` is (top, left) of the crop in the resized
    image, mirrored when ``flip`` (what the flipped pixels really are, as SDXL's conditioning expects).
    ``crop`` is a ``random_crop`` position (``(left, top)``, else the bucket's centre crop) and
    ``color`` a drawn ``color_aug`` (:mod:`sdcore.data.augment`). When the image's subset uses
    ``alpha_mask``, the RGB channels are read as stored (no compositing on white), as kohya reads them.
    Raises :class:`~sdcore.data.images.ImageError` when the file became unreadable.
    """
    import numpy as np

    from .augment import apply_color_aug

    keep_alpha = bool(getattr(entry.subset, "alpha_mask", False))
    image = open_image_rgb(entry.path, keep_alpha=keep_alpha)
    if keep_alpha:
        image = image.convert("RGB")  # drops alpha without compositing (resizing RGBA would premultiply)
    original_size = (image.size[1], image.size[0])
    if assignment.augment is not None:  # OneTrainer measures the original size after its rotated mask crop
        crop_w, crop_h = assignment.augment.cropped_size
        original_size = (crop_h, crop_w)
    interpolation = getattr(entry.subset, "resize_interpolation", None)
    image, coords = fit_to_bucket(image, assignment, flip=flip, crop=crop, interpolation=interpolation)
    if color is not None:
        array = apply_color_aug(np.asarray(image, dtype=np.uint8), color).astype(np.float32)
    else:
        array = np.asarray(image, dtype=np.float32)
    pixels = array.transpose(2, 0, 1) / 127.5 - 1.0
    return np.ascontiguousarray(pixels, dtype=np.float32), original_size, coords


def load_training_channel(
    path: str | os.PathLike[str],
    assignment: BucketAssignment,
    *,
    channel: int | Literal["L", "RGB"],
    flip: bool,
    crop: tuple[int, int] | None = None,
    interpolation: str | None = None,
) -> np.ndarray:
    """One channel (0..3 of RGBA, colours as stored; ``"L"``: PIL's greyscale of the RGB) of the image at
    ``path`` as uint8 ``[H, W]`` (``"RGB"``: the three colour channels, ``[H, W, 3]``: segmentation masks),
    resized, cropped and flipped exactly like a training image with the same ``assignment``: kohya's alpha masks
    (channel 3 of the image) and mask images (channel 0, R, of ``conditioning_data_dir``), OneTrainer's greyscale
    ``-masklabel.png`` masks, with the image's ``interpolation`` (its subset's ``resize_interpolation``)."""
    import numpy as np

    rgba = open_image_rgb(path, keep_alpha=True)
    if channel == "RGB":
        image = rgba.convert("RGB")
    else:
        image = rgba.convert("RGB").convert("L") if channel == "L" else rgba.getchannel(channel)
    image, _ = fit_to_bucket(image, assignment, flip=flip, crop=crop, interpolation=interpolation)
    return np.asarray(image, dtype=np.uint8)

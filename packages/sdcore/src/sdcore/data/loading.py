"""Pixels for one training sample: decode, resize to cover the bucket, crop, flip, scale to [-1, 1].

Resampling follows kohya: area averaging when shrinking (PIL ``BOX``, the equivalent of OpenCV's
``INTER_AREA``), Lanczos when enlarging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .buckets import BucketAssignment
from .dataset import ImageEntry
from .images import open_image_rgb

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage


def resize_for_bucket(image: PILImage.Image, size: tuple[int, int]) -> PILImage.Image:
    """Resize ``image`` to ``size`` (w, h): BOX (area) when shrinking, LANCZOS when enlarging."""
    from PIL import Image

    if image.size == tuple(size):
        return image
    shrinking = size[0] * size[1] <= image.size[0] * image.size[1]
    method = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    return image.resize(size, method)


def load_training_image(
    entry: ImageEntry, assignment: BucketAssignment, *, flip: bool
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """``(pixels, original_size, crop_coords)`` for one sample.

    ``pixels`` is float32 CHW in [-1, 1] of the bucket's size; ``original_size`` is (h, w) of the
    image after EXIF rotation; ``crop_coords`` is (top, left) of the crop in the resized image,
    mirrored when ``flip`` (what the flipped pixels really are, as SDXL's conditioning expects).
    Raises :class:`~sdcore.data.images.ImageError` when the file became unreadable.
    """
    import numpy as np
    from PIL import ImageOps

    image = open_image_rgb(entry.path)
    original_size = (image.size[1], image.size[0])
    resized_w, resized_h = assignment.resized
    if image.size != (resized_w, resized_h):
        image = resize_for_bucket(image, (resized_w, resized_h))
    left, top = assignment.crop
    bucket_w, bucket_h = assignment.bucket
    image = image.crop((left, top, left + bucket_w, top + bucket_h))
    if flip:
        image = ImageOps.mirror(image)
        left = resized_w - left - bucket_w
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return np.ascontiguousarray(pixels, dtype=np.float32), original_size, (top, left)

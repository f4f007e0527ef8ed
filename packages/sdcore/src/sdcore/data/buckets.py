"""Aspect-ratio buckets (kohya style): train on many aspect ratios at a roughly constant pixel area.

A bucket is a ``(width, height)`` whose sides are multiples of ``step`` and whose area is at most
``resolution**2``. Each image goes to the bucket with the nearest aspect ratio, is resized so it
covers the bucket and is center-cropped; the crop offset is kept for SDXL's size conditioning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError, DataError


class ImageTooSmallError(DataError):
    """With ``bucket_no_upscale`` an image smaller than one bucket step on a side has no bucket."""


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: ``bucket`` (w, h), the size it is resized to first (w, h), and the
    center-crop offset ``crop`` = (left, top) inside the resized image."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]


def _check_bucket_settings(resolution: int, min_reso: int, max_reso: int, step: int) -> None:
    if step <= 0:
        raise ConfigError(f"bucket step must be positive, got {step}")
    if resolution < step:
        raise ConfigError(f"resolution {resolution} is smaller than the bucket step {step}")
    if min_reso <= 0 or max_reso < min_reso:
        raise ConfigError(f"bucket sides need 0 < min_bucket_reso <= max_bucket_reso, got {min_reso} and {max_reso}")
    if min_reso % step or max_reso % step:
        raise ConfigError(
            f"min_bucket_reso {min_reso} and max_bucket_reso {max_reso} must be multiples of the step {step}"
        )


def make_buckets(
    resolution: int, *, min_reso: int = 256, max_reso: int = 1024, step: int = 64
) -> list[tuple[int, int]]:
    """All buckets for ``resolution`` (sorted, unique), as kohya's ``make_bucket_resolutions``.

    The square bucket ``floor(resolution / step) * step`` is always present; then for each width
    from ``min_reso`` to ``max_reso`` the tallest multiple-of-step height within the area (capped
    at ``max_reso``) is added with its transpose when it is at least ``min_reso``.
    For 512 (defaults) that gives kohya's 17 buckets.
    """
    _check_bucket_settings(resolution, min_reso, max_reso, step)
    max_area = resolution * resolution
    side = resolution // step * step
    buckets = {(side, side)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, max_area // width // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def _cover(size: tuple[int, int], bucket: tuple[int, int]) -> BucketAssignment:
    """Smallest resize of ``size`` (keeping its aspect ratio) that covers ``bucket``; center crop."""
    width, height = size
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    resized_w = max(bucket_w, round(width * scale))
    resized_h = max(bucket_h, round(height * scale))
    crop = ((resized_w - bucket_w) // 2, (resized_h - bucket_h) // 2)
    return BucketAssignment(bucket=(bucket_w, bucket_h), resized=(resized_w, resized_h), crop=crop)


def assign_bucket(
    size: tuple[int, int],
    buckets: Sequence[tuple[int, int]],
    *,
    no_upscale: bool = False,
    resolution: int,
    step: int = 64,
) -> BucketAssignment:
    """The bucket, resize and crop for an image of ``size`` = (w, h).

    Normally the bucket with the nearest aspect ratio (compared in log space, so portrait and
    landscape errors weigh the same) is chosen. With ``no_upscale`` the image gets a bucket of
    its own: if its area exceeds ``resolution**2`` it is first scaled down to that area; the
    sides are then rounded *down* to ``step`` so the image is never enlarged (an image within
    the area is not resampled at all, only center-cropped to the rounded size). An image smaller
    than ``step`` on a side raises :class:`ImageTooSmallError` (the dataset index counts it).
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise DataError(f"invalid image size {width}x{height}")
    if no_upscale:
        max_area = resolution * resolution
        scale = min(1.0, math.sqrt(max_area / (width * height)))
        bucket_w = int(width * scale) // step * step
        bucket_h = int(height * scale) // step * step
        if bucket_w < step or bucket_h < step:
            raise ImageTooSmallError(
                f"image of {width}x{height} is smaller than the bucket step {step} on a side (bucket_no_upscale)"
            )
        if scale >= 1.0:  # within the area: no resampling at all, only crop the remainder (as kohya)
            return BucketAssignment(
                bucket=(bucket_w, bucket_h),
                resized=(width, height),
                crop=((width - bucket_w) // 2, (height - bucket_h) // 2),
            )
        return _cover(size, (bucket_w, bucket_h))
    if not buckets:
        raise ConfigError("no buckets to assign images to (check the bucket settings)")
    log_ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ratio), -b[0] * b[1]))
    return _cover(size, best)


def square_assignment(size: tuple[int, int], resolution: int) -> BucketAssignment:
    """Buckets off: every image is resized to cover ``resolution`` x ``resolution`` and center-cropped."""
    return _cover(size, (resolution, resolution))

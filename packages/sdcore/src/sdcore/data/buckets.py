"""Aspect-ratio buckets: train on many aspect ratios at a roughly constant pixel area.

Two rules (:data:`BUCKET_RULES`): kohya's (sd-scripts, sdcore's default, below) and OneTrainer's (MGDS
``AspectBucketing``, :func:`onetrainer_buckets`), so a OneTrainer config trains its images at OneTrainer's sizes
and crops.

A bucket is a ``(width, height)`` whose sides are multiples of ``step`` and whose area is at most
``resolution**2``, or ``w * h`` for kohya's non-square resolution ``(w, h)`` (``[768, 512]`` / ``"768,512"``,
kept as a pair because kohya's area is exactly ``w * h``, larger than the square of its integer side). Each image goes to the bucket with the nearest aspect ratio, is resized so it
covers the bucket and is center-cropped; the crop offset is kept for SDXL's size conditioning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from ..errors import ConfigError, DataError

#: a training resolution: the side of a square, or kohya's ``(width, height)``
Resolution: TypeAlias = int | tuple[int, int]

#: how buckets are built and filled: kohya's (sd-scripts' ``BucketManager``) or OneTrainer's (MGDS
#: ``AspectBucketing``: a fixed list of aspect ratios on the quantization grid, no smallest/largest side, no
#: no-upscale)
BUCKET_RULES: tuple[str, ...] = ("kohya", "onetrainer")

#: OneTrainer's bucket aspect ratios as (height, width) (MGDS ``AspectBucketing.all_possible_input_aspects``);
#: each is also used transposed
ONETRAINER_ASPECTS: tuple[tuple[float, float], ...] = (
    (1.0, 1.0),
    (1.0, 1.25),
    (1.0, 1.5),
    (1.0, 1.75),
    (1.0, 2.0),
    (1.0, 2.5),
    (1.0, 3.0),
    (1.0, 3.5),
    (1.0, 4.0),
)


class ImageTooSmallError(DataError):
    """With ``bucket_no_upscale`` an image smaller than one bucket step on a side has no bucket."""


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: ``bucket`` (w, h), the size it is resized to first (w, h), and the
    center-crop offset ``crop`` = (left, top) inside the resized image. ``augment``: a sample's
    OneTrainer mask augmentation (:class:`sdcore.data.mask_augment.MaskGeometry`), the rotation and crop
    every image of the sample gets before that resize (None: none)."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]
    augment: Any = None


def resolution_pair(resolution: Resolution) -> tuple[int, int]:
    """``(width, height)`` of a resolution: ``512`` -> ``(512, 512)``; a pair as it is."""
    if isinstance(resolution, tuple):
        return int(resolution[0]), int(resolution[1])
    return int(resolution), int(resolution)


def resolution_area(resolution: Resolution) -> int:
    """The bucket area of a resolution: ``side**2``, or kohya's ``w * h`` (its ``max_area``)."""
    width, height = resolution_pair(resolution)
    return width * height


def area_side(resolution: Resolution) -> int:
    """The side of a square of the resolution's area, ``isqrt(w * h)``: what ``--resolution`` holds for kohya's
    ``(w, h)`` (the memory plan's and the samples' size); a side is itself."""
    return math.isqrt(resolution_area(resolution))


def kohya_bucket_sides(min_reso: int, max_reso: int, step: int) -> tuple[int, int]:
    """``(min_bucket_reso, max_bucket_reso)`` on the bucket step as kohya's ``adjust_min_max_bucket_reso_by_steps``
    puts them (with a warning, where sdcore prints a note): the smallest side rounds down, the largest up."""
    if step <= 0:
        return min_reso, max_reso
    return min_reso - min_reso % step, max_reso + (-max_reso) % step


def bucket_sides_note(min_reso: int, max_reso: int, step: int) -> str | None:
    """What :func:`kohya_bucket_sides` changed, for the pre-flight's notes (``None``: nothing)."""
    adjusted = kohya_bucket_sides(min_reso, max_reso, step)
    if adjusted == (min_reso, max_reso):
        return None
    return (
        f"min_bucket_reso {min_reso} / max_bucket_reso {max_reso} are not on the bucket step {step}: buckets use "
        f"{adjusted[0]} / {adjusted[1]} (kohya rounds the smallest side down and the largest up the same way)"
    )


def bucket_range_note(
    resolution: Resolution, min_reso: int, max_reso: int, step: int, *, no_upscale: bool = False
) -> str | None:
    """A note for a resolution side outside ``[min_bucket_reso, max_bucket_reso]`` (both on the step, as
    :func:`kohya_bucket_sides` puts them), ``None`` where it fits. kohya's ``adjust_min_max_bucket_reso_by_steps``
    asserts the range (with ``bucket_no_upscale`` too), so such a run never starts there; sdcore trains on with the
    buckets :func:`make_buckets` builds (each image's own with ``no_upscale``, where the sides play no part), and
    the note says which they are and every option that brings the resolution inside (both sides can be out)."""
    low, high = kohya_bucket_sides(min_reso, max_reso, step)
    width, height = resolution_pair(resolution)
    shown = f"{width}x{height}" if width != height else str(width)
    outside, fixes = [], []
    if min(width, height) < low:
        outside.append(f"{min(width, height)} < {low}")
        fixes.append(f"--min-bucket-reso {min(width, height)} or less")
    if max(width, height) > high:
        outside.append(f"{max(width, height)} > {high}")
        fixes.append(f"--max-bucket-reso {-(-max(width, height) // step) * step} or more")
    if not outside:
        return None
    side = math.isqrt(resolution_area(resolution)) // step * step
    if no_upscale:
        trained = "each image's own bucket (--bucket-no-upscale: the bucket sides play no part)"
    else:
        try:
            buckets = make_buckets(resolution, min_reso=min_reso, max_reso=max_reso, step=step)
        except ConfigError:  # no buckets at all: the dataset's own error says why
            return None
        others = [bucket for bucket in buckets if bucket != (side, side)]
        if others:
            trained = (
                f"the {side}x{side} square bucket of its area and {len(others)} other bucket"
                f"{'s' if len(others) > 1 else ''} with sides in [{low}, {high}]"
            )
        else:
            trained = f"a single bucket, the {side}x{side} square of its area, so every image is cropped square"
    return (
        f"resolution {shown} lies outside [min_bucket_reso, max_bucket_reso] = [{low}, {high}] ({', '.join(outside)}); "
        f"kohya refuses this (an assert when it builds the dataset); sdcore trains on with {trained}; "
        f"give {' and '.join(fixes)} to bring it inside"
    )


def _check_bucket_settings(resolution: Resolution, min_reso: int, max_reso: int, step: int) -> None:
    if step <= 0:
        raise ConfigError(f"bucket step must be positive, got {step}")
    if min(resolution_pair(resolution)) < step:
        raise ConfigError(
            f"resolution {resolution} is smaller than the bucket step {step}: give a --bucket-step of at most "
            f"{min(resolution_pair(resolution))} (kohya's bucket_reso_steps), or a larger --resolution"
        )
    low, high = kohya_bucket_sides(min_reso, max_reso, step)
    if low <= 0 or high < low:
        on_step = f" ({low} and {high} on the step {step})" if (low, high) != (min_reso, max_reso) else ""
        raise ConfigError(
            f"bucket sides need 0 < min_bucket_reso <= max_bucket_reso, got {min_reso} and {max_reso}{on_step}"
        )


def make_buckets(
    resolution: Resolution, *, min_reso: int = 256, max_reso: int = 1024, step: int = 64
) -> list[tuple[int, int]]:
    """All buckets for ``resolution`` (sorted, unique), as kohya's ``make_bucket_resolutions``.

    The area is ``resolution**2``, or ``w * h`` for a pair ``(w, h)`` (kohya's ``max_area``: for
    ``(768, 512)`` that keeps the 768x512 bucket, which the square of the integer side, 627**2, would
    lose). The square bucket ``floor(sqrt(area) / step) * step`` is always present; then for each width
    from ``min_reso`` to ``max_reso`` the tallest multiple-of-step height within the area (capped
    at ``max_reso``) is added with its transpose when it is at least ``min_reso``; sides off the step are
    first put on it as kohya does (:func:`kohya_bucket_sides`). For 512 (defaults) that gives kohya's 17 buckets.
    """
    _check_bucket_settings(resolution, min_reso, max_reso, step)
    min_reso, max_reso = kohya_bucket_sides(min_reso, max_reso, step)
    max_area = resolution_area(resolution)
    side = math.isqrt(max_area) // step * step
    buckets = {(side, side)}
    # a width past area // min_reso has no height of min_reso left: stopping there is the same buckets, and a
    # --max-bucket-reso of 1000000000000 (a typo) no longer walks 10^10 widths while the pre-flight hangs
    for width in range(min_reso, min(max_reso, max_area // min_reso) + 1, step):
        height = min(max_reso, max_area // width // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def _round_half_up(x: float) -> int:
    """kohya's ``int(x + 0.5)`` (Python's ``round`` goes to even at .5: 512.5 -> 512, kohya's 513)."""
    return int(x + 0.5)


def _cover(size: tuple[int, int], bucket: tuple[int, int]) -> BucketAssignment:
    """Smallest resize of ``size`` (keeping its aspect ratio) that covers ``bucket``; center crop.

    As kohya's ``select_bucket``: the side that is relatively shorter is scaled to the bucket's and
    the other follows, both rounded half up."""
    width, height = size
    bucket_w, bucket_h = bucket
    scale = bucket_h / height if width / height > bucket_w / bucket_h else bucket_w / width
    resized_w = max(bucket_w, _round_half_up(width * scale))
    resized_h = max(bucket_h, _round_half_up(height * scale))
    crop = ((resized_w - bucket_w) // 2, (resized_h - bucket_h) // 2)
    return BucketAssignment(bucket=(bucket_w, bucket_h), resized=(resized_w, resized_h), crop=crop)


def _no_upscale_size(width: int, height: int, max_area: int, step: int) -> tuple[int, int]:
    """kohya's ``bucket_no_upscale`` resize of an image larger than ``max_area``: scaled to the area,
    then one side rounded to ``step`` (whichever keeps the aspect ratio better) and the other
    following it, rounded half up."""
    aspect = width / height

    def to_steps(x: float) -> int:
        rounded = _round_half_up(x)
        return rounded - rounded % step

    scaled_w = math.sqrt(max_area * aspect)
    scaled_h = max_area / scaled_w
    by_width = to_steps(scaled_w)
    height_of_width = to_steps(by_width / aspect)
    by_height = to_steps(scaled_h)
    width_of_height = to_steps(by_height * aspect)
    err_width = abs(by_width / height_of_width - aspect) if height_of_width else math.inf
    err_height = abs(width_of_height / by_height - aspect) if by_height else math.inf
    if err_width < err_height:
        return by_width, _round_half_up(by_width / aspect)
    return _round_half_up(by_height * aspect), by_height


def assign_bucket(
    size: tuple[int, int],
    buckets: Sequence[tuple[int, int]],
    *,
    no_upscale: bool = False,
    resolution: Resolution,
    step: int = 64,
) -> BucketAssignment:
    """The bucket, resize and crop for an image of ``size`` = (w, h).

    Normally the bucket with the nearest aspect ratio (kohya's plain difference of ``w / h``, not
    a log ratio, so the buckets are kohya's for every image) is chosen. With ``no_upscale`` the
    image gets a bucket of its own: if its area exceeds ``resolution**2`` (``w * h`` for a pair) it is first scaled down
    to about that area (kohya's rounding, :func:`_no_upscale_size`); the sides are then rounded
    *down* to ``step`` (an image within the area is not resampled at all, only center-cropped to
    the rounded size). An image smaller
    than ``step`` on a side raises :class:`ImageTooSmallError` (the dataset index counts it).
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise DataError(f"invalid image size {width}x{height}")
    if no_upscale:
        max_area = resolution_area(resolution)
        resized = (width, height) if width * height <= max_area else _no_upscale_size(width, height, max_area, step)
        bucket_w = resized[0] - resized[0] % step
        bucket_h = resized[1] - resized[1] % step
        if bucket_w < step or bucket_h < step:
            raise ImageTooSmallError(
                f"image of {width}x{height} is smaller than the bucket step {step} on a side (bucket_no_upscale)"
            )
        # within the area no resampling at all, only the remainder is cropped (as kohya)
        return BucketAssignment(
            bucket=(bucket_w, bucket_h),
            resized=resized,
            crop=((resized[0] - bucket_w) // 2, (resized[1] - bucket_h) // 2),
        )
    if not buckets:
        raise ConfigError("no buckets to assign images to (check the bucket settings)")
    if (width, height) in buckets:  # an image of a bucket's size keeps it (kohya: same ratio, other size)
        return _cover(size, (width, height))
    ratio = width / height
    # kohya: numpy argmin of |bucket w/h - image w/h| over the sorted buckets (first of equal errors)
    best = min(sorted(buckets), key=lambda b: abs(b[0] / b[1] - ratio))
    return _cover(size, best)


def square_assignment(size: tuple[int, int], resolution: Resolution, *, rule: str = "kohya") -> BucketAssignment:
    """Buckets off: every image is resized to cover ``resolution`` x ``resolution`` (kohya's ``(w, h)``:
    its one predefined bucket, so exactly ``w`` x ``h``) and center-cropped, with ``rule``'s rounding (OneTrainer's
    ``SingleAspectCalculation`` and fixed ``WxH`` scale as its buckets do, :func:`onetrainer_scale`)."""
    return fit_to_bucket(size, resolution_pair(resolution), rule=rule)


def fit_to_bucket(size: tuple[int, int], bucket: tuple[int, int], *, rule: str = "kohya") -> BucketAssignment:
    """The resize of ``size`` that covers ``bucket`` and its center crop, rounded as ``rule`` rounds (kohya: half
    up; OneTrainer: Python's ``round``): the two differ by a pixel where a side lands on .5."""
    return onetrainer_scale(size, bucket) if rule == "onetrainer" else _cover(size, bucket)


# --------------------------------------------------------------------------------------------
# OneTrainer's rule (MGDS AspectBucketing)


def onetrainer_buckets(resolution: Resolution, quantization: int) -> list[tuple[int, int]]:
    """OneTrainer's buckets for a target ``resolution`` as ``(width, height)``.

    Each of :data:`ONETRAINER_ASPECTS` and its transpose scaled to the area ``resolution**2`` (``h / sqrt(h * w) *
    resolution``), each side put on the grid with Python's ``round(x / quantization) * quantization`` (half to
    even), duplicates dropped: 17 buckets for 512 on OneTrainer's SD grid of 8. There is no smallest or largest
    side; a side rounded to 0 (only at a resolution up to the grid) drops its bucket. The list keeps the order MGDS holds them in (that of its ``list(set(...))`` of ``(h, w)``), because the
    bucket choice takes the first of equally near aspect ratios (:func:`assign_onetrainer_bucket`), which real
    image sizes hit."""
    if quantization <= 0:
        raise ConfigError(f"bucket quantization must be positive, got {quantization}")
    if isinstance(resolution, tuple) or resolution <= 0:
        raise ConfigError(
            f"OneTrainer's buckets are built around one positive side, got {resolution!r} (a W,H size is a fixed "
            "size: buckets off)"
        )
    scaled: list[tuple[float, float]] = []
    for h, w in ONETRAINER_ASPECTS:
        norm = math.sqrt(h * w)
        scaled.append((h / norm * resolution, w / norm * resolution))
    scaled += [(w, h) for h, w in scaled]
    on_grid = [(round(h / quantization) * quantization, round(w / quantization) * quantization) for h, w in scaled]
    # a side that rounds to 0 (a resolution up to the grid: SDXL's 64 at 64) is a bucket MGDS divides by zero
    # on, so OneTrainer cannot train there at all; sdcore leaves such buckets out (tiny test models train at 64)
    buckets = [(w, h) for h, w in list(set(on_grid)) if h > 0 and w > 0]
    if not buckets:
        raise ConfigError(
            f"resolution {resolution} on the bucket grid {quantization}: every bucket side rounds to 0; use a "
            f"resolution of at least {quantization}"
        )
    return buckets


def onetrainer_scale(size: tuple[int, int], bucket: tuple[int, int]) -> BucketAssignment:
    """OneTrainer's resize of an image of ``size`` = (w, h) to cover ``bucket`` (MGDS ``AspectBucketing`` /
    ``SingleAspectCalculation``): an image relatively taller than the bucket takes the bucket's width and its
    height follows (``round(h * bucket_w / w)``), any other the bucket's height; Python's ``round``, no floor at
    the bucket (the followed side is never below it). Smaller images are upscaled (OneTrainer has no no-upscale).
    The crop is the center (``ScaleCropImage`` without crop jitter: the excess ``// 2``)."""
    width, height = size
    bucket_w, bucket_h = bucket
    if width <= 0 or height <= 0:
        raise DataError(f"invalid image size {width}x{height}")
    if height / width > bucket_h / bucket_w:
        resized = (bucket_w, round(height * (bucket_w / width)))
    else:
        resized = (round(width * (bucket_h / height)), bucket_h)
    crop = ((resized[0] - bucket_w) // 2, (resized[1] - bucket_h) // 2)
    return BucketAssignment(bucket=(bucket_w, bucket_h), resized=resized, crop=crop)


def assign_onetrainer_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> BucketAssignment:
    """OneTrainer's bucket for an image of ``size`` = (w, h) among ``buckets`` (:func:`onetrainer_buckets`, in
    its order): the one whose ``h / w`` is nearest the image's by plain difference (MGDS's ``np.argmin``: the
    first of equal distances), then :func:`onetrainer_scale`."""
    width, height = size
    if width <= 0 or height <= 0:
        raise DataError(f"invalid image size {width}x{height}")
    if not buckets:
        raise ConfigError("no buckets to assign images to (check the bucket settings)")
    aspect = height / width
    best = min(range(len(buckets)), key=lambda i: abs(buckets[i][1] / buckets[i][0] - aspect))
    return onetrainer_scale(size, buckets[best])

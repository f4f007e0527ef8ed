"""OneTrainer's mask augmentations: a random circular mask shrink and a random rotated crop around the mask.

OneTrainer adds both to its data loader when masked training is on or the model has a mask input (an
inpainting model), before aspect bucketing, the scale-and-crop to the bucket, the flip and the colour
augmentations (``DataLoaderText2ImageMixin._mask_augmentation_modules``), with fixed settings; the maths is
mgds' (``RandomCircularMaskShrink``, ``RandomMaskRotateCrop``), rewritten here:

- **circular shrink** (:func:`circular_shrink`): a point inside the mask is picked (a uniform random number per
  pixel from a torch generator seeded with the draw, times the mask, the largest wins: the first on a tie), the
  radius is ``uniform(0.2, 1.0)`` times the distance from that point to the farthest masked pixel (weighted by
  the mask's value), and the mask is multiplied by the disc of that radius (distance ``<=`` radius). Only the
  mask changes. mgds' ``shrink_probability`` (1.0 in OneTrainer) is never read: a concept with the switch on
  shrinks every sample.
- **rotated crop** (:func:`rotate_crop_box`): the mask's bounding box (rows/columns with a value ``> 0.5``;
  the whole image when there is none; its ``max`` is the last index, not one past it) gives a centre; the mask
  and the image are rotated about it by ``uniform(-20, 20)`` degrees (:func:`rotate`: torchvision's bilinear
  ``rotate`` of a tensor, zeros outside); the rotated mask's box is widened on each side by a fraction drawn
  from ``uniform`` between what 10 % and 30 % padding of the box would add (top, bottom, left, right, in that
  order); a box under ``min_size``\\ :sup:`2` in area (``min_size``: the run's lowest resolution) grows on every
  side by ``(scale - 1)`` times its size, ``scale = sqrt(min_area / area)`` (so by ``2 * scale - 1``, mgds'
  arithmetic); it is shifted back inside the image, clipped to it and truncated to whole pixels; the mask and
  the image are cropped to it. mgds divides by zero on a box of zero area (a mask of one row or column); sdcore
  then grows it from its centre to ``min_size`` square.

Every draw comes from two :class:`random.Random` streams of the sample (:class:`MaskAug`), in mgds' order:
the shrink's point seed (``randint(0, 2**30)``) and factor; the rotation's angle and its four paddings
(``uniform(a, b)`` is ``a + (b - a) * random()``, so the four ``random()`` values are kept and the bounds,
which depend on the rotated mask, applied later).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

#: ``RandomCircularMaskShrink(shrink_factor_min=0.2, shrink_factor_max=1.0)`` in OneTrainer's data loader
SHRINK_FACTORS = (0.2, 1.0)
#: ``RandomMaskRotateCrop(max_rotate_angle=20)``
MAX_ROTATE_ANGLE = 20.0
#: ``RandomMaskRotateCrop(min_padding_percent=10, max_padding_percent=30)``
PADDING_PERCENT = (10.0, 30.0)


@dataclass(frozen=True)
class MaskAug:
    """One sample's draws: ``shrink`` = (the point's generator seed, the radius factor) or None;
    ``rotate`` = (angle in degrees, then the four ``random()`` values of the top, bottom, left and right
    padding) or None; ``min_size`` the crop's smallest side before the aspect is kept (the run's lowest
    resolution)."""

    shrink: tuple[int, float] | None
    rotate: tuple[float, float, float, float, float] | None
    min_size: int

    @classmethod
    def draw(cls, shrink: random.Random | None, rotate: random.Random | None, min_size: int) -> MaskAug | None:
        """The draws from each augmentation's own stream (None: that augmentation is off), mgds' order."""
        shrink_draw = None
        if shrink is not None:
            seed = shrink.randint(0, 1 << 30)
            shrink_draw = (seed, shrink.uniform(*SHRINK_FACTORS))
        rotate_draw = None
        if rotate is not None:
            angle = rotate.uniform(-MAX_ROTATE_ANGLE, MAX_ROTATE_ANGLE)
            rotate_draw = (angle, rotate.random(), rotate.random(), rotate.random(), rotate.random())
        if shrink_draw is None and rotate_draw is None:
            return None
        return cls(shrink_draw, rotate_draw, int(min_size))


def circular_shrink(mask: Any, seed: int, factor: float) -> Any:
    """``mask`` (a float tensor ``[H, W]``) times a disc around a random masked point (module docstring)."""
    import torch

    height, width = mask.shape[-2], mask.shape[-1]
    generator = torch.Generator(device=mask.device)
    generator.manual_seed(seed)
    noise = torch.rand((1, height, width), generator=generator, dtype=torch.float32, device=mask.device)
    flat = int(torch.argmax((noise * mask).flatten()).item())
    row, col = flat // width, flat % width
    rows = torch.arange(height, dtype=torch.float32, device=mask.device) - row
    cols = torch.arange(width, dtype=torch.float32, device=mask.device) - col
    distance = torch.sqrt(rows[:, None] ** 2 + cols[None, :] ** 2).to(mask.dtype)
    radius = factor * float((mask * distance).max().item())
    return mask * (distance <= radius).to(mask.dtype)


def masked_region(mask: Any) -> tuple[float, float, float, float]:
    """``(y_min, y_max, x_min, x_max)`` of the rows and columns where ``mask`` ``[H, W]`` exceeds 0.5 (the
    max is the last such index); the whole ``(0, H, 0, W)`` when none does."""
    import torch

    height, width = mask.shape[-2], mask.shape[-1]
    rows = torch.nonzero(torch.amax(mask, dim=-1) > 0.5).flatten()
    cols = torch.nonzero(torch.amax(mask, dim=-2) > 0.5).flatten()
    if rows.numel() == 0 or cols.numel() == 0:
        return 0.0, float(height), 0.0, float(width)
    return float(rows[0]), float(rows[-1]), float(cols[0]), float(cols[-1])


def rotate(tensor: Any, center: tuple[float, float], angle: float) -> Any:
    """``tensor`` (``[C, H, W]`` or ``[H, W]``, float) rotated by ``angle`` degrees (counter-clockwise) about
    ``center`` = (x, y) in pixels, bilinear, zeros outside: torchvision's ``rotate`` of a tensor. Output pixel
    ``(x, y)`` samples the source at ``R(angle) @ (x + 0.5 - cx, y + 0.5 - cy) + (cx, cy) - 0.5`` with ``R``
    the matrix ``[[cos, -sin], [sin, cos]]``."""
    import torch

    squeeze = tensor.ndim == 2
    image = tensor[None] if squeeze else tensor
    height, width = image.shape[-2], image.shape[-1]
    theta = math.radians(angle)
    cos, sin = math.cos(theta), math.sin(theta)
    xs = torch.arange(width, dtype=torch.float32) + 0.5 - center[0]
    ys = torch.arange(height, dtype=torch.float32) + 0.5 - center[1]
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    src_x = cos * gx - sin * gy + center[0] - 0.5
    src_y = sin * gx + cos * gy + center[1] - 0.5
    # grid_sample's normalised coordinates with align_corners=False: pixel i is at (2i + 1) / size - 1
    grid = torch.stack(((2 * src_x + 1) / width - 1, (2 * src_y + 1) / height - 1), dim=-1)[None]
    out = torch.nn.functional.grid_sample(
        image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )[0].to(tensor.dtype)
    return out[0] if squeeze else out


def rotate_crop_box(mask: Any, paddings: tuple[float, float, float, float], min_size: int) -> tuple[int, int, int, int]:
    """The crop ``(y_min, y_max, x_min, x_max)`` (whole pixels, end exclusive) around the *rotated* ``mask``
    ``[H, W]`` for the four padding draws (``random()`` values: top, bottom, left, right): module docstring."""
    height_px, width_px = mask.shape[-2], mask.shape[-1]
    y_min, y_max, x_min, x_max = masked_region(mask)
    height, width = y_max - y_min, x_max - x_min
    low, high = (1 - PADDING_PERCENT[0] / 100), (1 - PADDING_PERCENT[1] / 100)
    min_y, max_y = (height / low - height) / 2, (height / high - height) / 2
    min_x, max_x = (width / low - width) / 2, (width / high - width) / 2
    top, bottom, left, right = (a + (b - a) * u for (a, b), u in zip(
        ((min_y, max_y), (min_y, max_y), (min_x, max_x), (min_x, max_x)), paddings, strict=True
    ))  # fmt: skip
    y_min, y_max, x_min, x_max = y_min - top, y_max + bottom, x_min - left, x_max + right
    area = (y_max - y_min) * (x_max - x_min)
    min_area = min_size * min_size
    if area <= 0:  # mgds divides by zero here: grow from the centre to min_size square instead
        cy, cx = (y_min + y_max) / 2, (x_min + x_max) / 2
        y_min, y_max, x_min, x_max = cy - min_size / 2, cy + min_size / 2, cx - min_size / 2, cx + min_size / 2
    elif area < min_area:
        scale = math.sqrt(min_area / area)
        y_grow, x_grow = (scale - 1) * (y_max - y_min), (scale - 1) * (x_max - x_min)
        y_min, y_max, x_min, x_max = y_min - y_grow, y_max + y_grow, x_min - x_grow, x_max + x_grow
    if y_min < 0:
        y_min, y_max = 0.0, y_max - y_min
    if y_max > height_px:
        y_min, y_max = y_min + height_px - y_max, float(height_px)
    if x_min < 0:
        x_min, x_max = 0.0, x_max - x_min
    if x_max > width_px:
        x_min, x_max = x_min + width_px - x_max, float(width_px)
    box = int(max(0, y_min)), int(min(height_px, y_max)), int(max(0, x_min)), int(min(width_px, x_max))
    # never empty (mgds would go on with an empty image): at least one pixel each way
    return box[0], max(box[1], box[0] + 1), box[2], max(box[3], box[2] + 1)


@dataclass(frozen=True)
class MaskGeometry:
    """A sample's augmented mask and the rotation and crop every image-like input of it gets: ``size`` the
    image's (w, h) everything is brought to first, ``angle`` and ``center`` (x, y) the rotation (angle 0: none),
    ``box`` (y_min, y_max, x_min, x_max) the crop. Equal (and hashed) by the draw that made it (``key``), not the
    mask's values, so it can key prefetches and caches."""

    key: tuple[Any, ...]
    size: tuple[int, int]
    angle: float
    center: tuple[float, float]
    box: tuple[int, int, int, int]
    mask: Any = field(compare=False, hash=False, repr=False)

    @property
    def cropped_size(self) -> tuple[int, int]:
        """(w, h) of the cropped region: what the bucket's resize and crop then see."""
        return self.box[3] - self.box[2], self.box[1] - self.box[0]

    def apply(self, image: PILImage.Image) -> PILImage.Image:
        """``image`` (any PIL mode of 8-bit channels, or ``F``) brought to ``size`` (bilinear, e.g. a mask file
        of another size), rotated and cropped; 8-bit values are rounded back after the float rotation."""
        import numpy as np
        import torch
        from PIL import Image

        if image.size != self.size:
            image = image.resize(self.size, Image.Resampling.BILINEAR)
        y0, y1, x0, x1 = self.box
        if self.angle == 0.0:
            return image.crop((x0, y0, x1, y1))
        array = np.asarray(image, dtype=np.float32)
        tensor = torch.from_numpy(array.copy())
        tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor
        out = rotate(tensor, self.center, self.angle)[..., y0:y1, x0:x1]
        result = (out.permute(1, 2, 0) if out.ndim == 3 else out).numpy()
        if image.mode == "F":
            return Image.fromarray(np.ascontiguousarray(result, dtype=np.float32), mode="F")
        return Image.fromarray(np.clip(np.rint(result), 0, 255).astype(np.uint8), mode=image.mode)


def augment_mask(mask: np.ndarray, aug: MaskAug, key: tuple[Any, ...] = ()) -> MaskGeometry:
    """Apply ``aug`` to ``mask`` (float32 ``[H, W]`` in 0..1 at the image's size): the shrink, then the rotated
    crop's rotation and box, as OneTrainer runs them (the shrink first)."""
    import torch

    tensor = torch.from_numpy(mask.astype("float32", copy=True))
    if aug.shrink is not None:
        tensor = circular_shrink(tensor, *aug.shrink)
    height, width = tensor.shape
    angle, center = 0.0, (width / 2, height / 2)
    box = (0, height, 0, width)
    if aug.rotate is not None:
        y_min, y_max, x_min, x_max = masked_region(tensor)
        center = ((x_max + x_min) / 2, (y_max + y_min) / 2)
        angle = aug.rotate[0]
        tensor = rotate(tensor, center, angle)
        box = rotate_crop_box(tensor, aug.rotate[1:], aug.min_size)  # type: ignore[arg-type]
        tensor = tensor[box[0] : box[1], box[2] : box[3]]
    return MaskGeometry(key=(*key, aug), size=(width, height), angle=angle, center=center, box=box, mask=tensor.numpy())


__all__ = [
    "MAX_ROTATE_ANGLE",
    "PADDING_PERCENT",
    "SHRINK_FACTORS",
    "MaskAug",
    "MaskGeometry",
    "augment_mask",
    "circular_shrink",
    "masked_region",
    "rotate",
    "rotate_crop_box",
]

"""Reading training images safely: sizes without decoding, pixels as plain 8-bit RGB.

Real datasets are messy (phone photos with EXIF rotation, CMYK scans, 16-bit PNGs, transparent
stickers, half-downloaded files). Every image goes through here so that one bad file becomes a
counted, explained skip (:class:`ImageError`) instead of a crash hours into a run, and so that
the size used for bucketing is the size the pixels will have after EXIF rotation.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError

if TYPE_CHECKING:
    from PIL import Image as PILImage

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

#: Largest image (in pixels) we agree to decode: 80 MP (e.g. 10000x8000) is far beyond any training
#: need and bounded in memory (~240 MB RGB). Larger declared sizes are treated as decompression
#: bombs. It sits below Pillow's own warning threshold (~89 MP), which we also turn into an error.
MAX_IMAGE_PIXELS = 80_000_000

#: EXIF orientations (tag 0x0112) that swap width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


class ImageError(DataError):
    """An image file cannot be used for training (unreadable, truncated, too large, not an image)."""


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """True when the file name has one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _open(path: Path) -> PILImage.Image:
    """Open lazily (header only) and refuse absurd declared sizes before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: declared size too large (decompression bomb?): {_describe(exc)}") from None
    except Image.DecompressionBombWarning as exc:
        raise ImageError(f"{path}: declared size too large (decompression bomb?): {_describe(exc)}") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise ImageError(f"{path}: unreadable image: {_describe(exc)}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise ImageError(f"{path}: invalid image size {width}x{height}")
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise ImageError(
            f"{path}: declared size {width}x{height} exceeds the {MAX_IMAGE_PIXELS} pixel limit (decompression bomb?)"
        )
    return image


def _orientation(image: PILImage.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if value else 1
    except Exception:  # a broken EXIF block must not make the image unusable
        return 1


def probe_image(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` as the image will look after EXIF rotation, read from the header only."""
    path = Path(path)
    image = _open(path)
    try:
        width, height = image.size
        if _orientation(image) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        return width, height
    finally:
        image.close()


def verify_image(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Like :func:`probe_image` but also proves the pixel data is complete (truncation, bad CRCs).

    Cheaper than a full decode: PNGs are checked chunk by chunk (``verify``), JPEGs are decoded
    at 1/8 scale (``draft``), which still reads every entropy-coded byte. Other formats are
    decoded fully. Returns the oriented size.
    """
    from PIL import Image

    path = Path(path)
    size = probe_image(path)
    image = _open(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
                image.load()
    except Exception as exc:
        raise ImageError(f"{path}: damaged image data: {_describe(exc)}") from None
    finally:
        image.close()
    return size


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white (what a viewer shows)."""
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit int) grayscale: scale the 0..65535 range down instead of clipping at 255.
        values = np.asarray(image, dtype=np.float64)
        values = np.clip(values, 0, 65535) / 257.0
        gray = Image.fromarray(np.round(values).astype(np.uint8))
        return gray.convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        values = np.nan_to_num(np.clip(values, 0, 255))
        return Image.fromarray(np.round(values).astype(np.uint8)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def raw_rgba(image: PILImage.Image) -> PILImage.Image:
    """8-bit RGBA with the colours as stored (no compositing): what kohya's ``load_image(alpha=True)``
    reads (PIL ``convert("RGBA")``). Images without transparency get alpha 255 and the same RGB as
    :func:`to_rgb` (16-bit greys scaled, not clipped)."""
    mode = image.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        return image.convert("RGBA")
    return to_rgb(image).convert("RGBA")


def file_identity(path: str | os.PathLike[str] | None) -> tuple[str, int, int] | None:
    """``(resolved path, mtime, size)`` of a file beside a training image (its mask, control image, conditioning
    image), the part of a latent cache key that makes an edited, replaced or removed file re-encode; None for none."""
    if path is None:
        return None
    stat = Path(path).stat()
    return (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


def open_upright(source: str | os.PathLike[str] | PILImage.Image, what: str) -> PILImage.Image:
    """A generation input (the init image, a mask, a Kontext reference, a Depth/Canny control image) in its own mode,
    for the caller's reading rule: a PIL image as it is; a file decoded and turned upright by its EXIF orientation,
    as A1111 reads every image it is given (``images.fix_image``) and diffusers' ``load_image`` (ComfyUI's LoadImage
    too) reads one. A missing or unreadable file (a decompression bomb too) is one
    :class:`~sdcore.errors.ConfigError` line naming it ``what``: unlike a training image, there is nothing to skip."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ..errors import ConfigError

    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"a {what} must be a path or a PIL image, not {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as opened:
            return ImageOps.exif_transpose(opened)  # a new (decoded) image, or a copy when upright already
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:  # the last is no OSError
        raise ConfigError(f"cannot read {what} {path}: {_describe(exc)}") from None


def open_image_rgb(
    path: str | os.PathLike[str], *, draft: tuple[int, int] | None = None, keep_alpha: bool = False
) -> PILImage.Image:
    """Decode ``path`` fully, apply EXIF orientation and return an 8-bit RGB image.

    ``keep_alpha`` returns 8-bit RGBA instead, colours as stored (:func:`raw_rgba`): kohya's
    ``alpha_mask`` and mask images read the channels that way.

    ``draft`` lets a JPEG decode at a reduced DCT scale that still covers that size (taggers that
    resize to a few hundred pixels anyway decode large photos several times faster).

    Raises :class:`ImageError` (with the reason) for missing, truncated, corrupt, oversized and
    non-image files.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    image = _open(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if draft is not None and image.format == "JPEG":
                image.draft("RGB", draft)
            image.load()
            oriented = ImageOps.exif_transpose(image)
            if oriented is None:  # older Pillow returns None when in_place is used; be defensive
                oriented = image
            rgb = raw_rgba(oriented) if keep_alpha else to_rgb(oriented)
            if rgb is image:  # closing ``image`` below would destroy the pixels we return
                rgb = image.copy()
            rgb.load()
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{path}: damaged image data: {_describe(exc)}") from None
    finally:
        image.close()
    return rgb

"""``sdcore data preprocess``: AUTOMATIC1111's dataset preprocessing, without a webui.

Users coming from A1111 prepared their datasets with the Train > "Preprocess images" tab (up to 1.6;
since 1.7 the same operations live in Extras > "Postprocessing"). This module does the same
operations with the same parameters, defaults and output naming, so a recipe written for A1111
gives the same dataset here. Facts (formulas, defaults, names) come from A1111's behaviour; the code
is our own, in PIL + numpy (no torch, no OpenCV, no model unless a tagger captions the outputs).

Per source image (A1111 1.6 order), every enabled operation writes its own outputs from the
original image; the plain resize runs only when none of them did:

- ``split`` ("Split oversized images"): when the image is too long for the target aspect
  (:func:`split_ratio` below ``split_threshold`` and below 1), it is resized so its short side
  matches the target and cut into overlapping tiles along its long side (:func:`split_boxes`);
- ``focal_crop`` ("Auto focal point crop"), non-square images only: scale to cover the target and
  crop around a focal point, a weighted mean of an edge (corner) centroid and the centre of the
  most entropic window (:func:`focal_point`);
- ``auto_size`` ("Auto-sized crop"): a centre crop to the size, among multiples of 64 between the
  bounds, that best keeps the aspect (:func:`auto_size`); images with no size within the error
  threshold are skipped;
- ``keep_original_size``: the image unchanged;
- otherwise A1111's default "crop and resize" to ``width`` x ``height`` (:func:`resize_and_crop`).

Each output is written as ``{index:05}-{subindex}-{stem}.png`` (``subindex`` counts the outputs of
one source image, flipped copies included), with a ``.txt`` caption next to it built by
:func:`merge_caption`.

Differences from A1111, on purpose:

- files are numbered in sorted name order among the image files of SRC (A1111 numbers the entries
  of ``os.listdir``, in arbitrary order, caption files included);
- transparency is composited on white (A1111's ``convert("RGB")`` shows whatever colour the
  transparent pixels store, usually black);
- the existing caption is stripped before it is merged (A1111 keeps its trailing newline inside a
  prepended caption);
- a split that would give one tile gives that tile (A1111 divides by zero);
- the focal crop scales the image to *cover* the target (A1111 picks the scale from the image's
  orientation alone, which leaves black bars when the target is more oblong than the image; both
  agree whenever A1111's crop fits), and falls back to the centre when no point of interest is found
  (A1111 crops the top-left corner);
- the entropy score is the Shannon entropy of the grey-level histogram (A1111 1.6 sums
  ``-log2(p)`` over a dithered 1-bit image, which is not an entropy; the grey-level version is the
  one its code comments out);
- no face detection: A1111 uses OpenCV (a YuNet model or Haar cascades), which is not a dependency
  here, so ``focal_face_weight`` does not exist and faces count as edges and entropy only;
- corners are Shi-Tomasi scores computed in numpy (3x3 Sobel, 3x3 window, quality 0.04, at most
  100 corners at least 6 % of the short side apart), as A1111's ``goodFeaturesToTrack`` call does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError
from .captions import read_caption_text
from .images import ImageError, is_image_path, open_image_rgb

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

#: ``--captions`` modes, A1111's "Existing caption txt action".
CAPTION_MODES: tuple[str, ...] = ("ignore", "copy", "prepend", "append")
#: ``--auto-size-objective`` values, A1111's "Resizing objective" ("Maximize area", "Minimize error").
AUTO_SIZE_OBJECTIVES: tuple[str, ...] = ("area", "error")
#: A1111's "Auto-sized crop" searches sides in steps of 64 pixels.
AUTO_SIZE_STEP = 64

#: Caption builder for output images: ``captioner(images) -> one caption per image``.
Captioner = Callable[[list["PILImage.Image"]], list[str]]


@dataclass(frozen=True)
class PreprocessOptions:
    """The operations and their parameters; defaults are A1111's."""

    width: int = 512
    height: int = 512
    flip: bool = False
    flip_vertical: bool = False
    flip_both: bool = False
    split: bool = False
    split_threshold: float = 0.5
    overlap_ratio: float = 0.2
    focal_crop: bool = False
    focal_entropy_weight: float = 0.15
    focal_edges_weight: float = 0.5
    auto_size: bool = False
    auto_size_min_dim: int = 384
    auto_size_max_dim: int = 768
    auto_size_min_area: int = 64 * 64
    auto_size_max_area: int = 640 * 640
    auto_size_objective: str = "area"
    auto_size_threshold: float = 0.1
    keep_original_size: bool = False
    captions: str = "ignore"

    def problems(self) -> list[str]:
        """Every bad value, one line each (empty when all are usable)."""
        out: list[str] = []
        for name in ("width", "height"):
            value = getattr(self, name)
            if not 8 <= value <= 8192:
                out.append(f"--{name} {value}: must be between 8 and 8192 pixels")
        if not 0.0 <= self.split_threshold <= 1.0:
            out.append(f"--split-threshold {self.split_threshold}: must be between 0 and 1")
        if not 0.0 <= self.overlap_ratio <= 0.9:
            out.append(f"--overlap-ratio {self.overlap_ratio}: must be between 0 and 0.9")
        for name in ("focal_entropy_weight", "focal_edges_weight"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                out.append(f"--{name.replace('_', '-')} {value}: must be between 0 and 1")
        if self.auto_size:
            if self.auto_size_min_dim < 1:
                out.append(f"--auto-size-min-dim {self.auto_size_min_dim}: must be positive")
            if self.auto_size_max_dim < self.auto_size_min_dim:
                out.append(
                    f"--auto-size-max-dim {self.auto_size_max_dim} is below --auto-size-min-dim {self.auto_size_min_dim}"
                )
            if self.auto_size_min_area < 0:
                out.append(f"--auto-size-min-area {self.auto_size_min_area}: must not be negative")
            if self.auto_size_max_area < self.auto_size_min_area:
                out.append(
                    f"--auto-size-max-area {self.auto_size_max_area} is below "
                    f"--auto-size-min-area {self.auto_size_min_area}"
                )
            if not 0.0 <= self.auto_size_threshold <= 1.0:
                out.append(f"--auto-size-threshold {self.auto_size_threshold}: must be between 0 and 1")
        if self.auto_size_objective not in AUTO_SIZE_OBJECTIVES:
            out.append(f"--auto-size-objective {self.auto_size_objective!r}: choose one of {AUTO_SIZE_OBJECTIVES}")
        if self.captions not in CAPTION_MODES:
            out.append(f"--captions {self.captions!r}: choose one of {CAPTION_MODES}")
        return out


# ----------------------------------------------------------------------------------------------------------
# geometry (pure functions: sizes and boxes)


def resize_and_crop(image: PILImage.Image, width: int, height: int) -> PILImage.Image:
    """A1111's default "crop and resize": scale (Lanczos) so the image covers ``width`` x ``height``,
    then keep the centre. Sizes and offsets are floored as A1111 floors them."""
    from PIL import Image

    iw, ih = image.size
    if width / height > iw / ih:
        sw, sh = width, ih * width // iw
    else:
        sw, sh = iw * height // ih, height
    resized = image.resize((max(1, sw), max(1, sh)), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(resized, (width // 2 - sw // 2, height // 2 - sh // 2))
    return canvas


def split_ratio(image_size: tuple[int, int], width: int, height: int) -> tuple[float, bool]:
    """``(ratio, inverse_xy)``: how much of the image's long side one target-shaped tile covers
    (1 = the aspects match), and whether the long side is horizontal (A1111's ``inverse_xy``).
    Splitting happens when ``ratio < 1`` and ``ratio <= split_threshold``."""
    iw, ih = image_size
    if ih > iw:
        return (iw * height) / (ih * width), False
    return (ih * width) / (iw * height), True


def split_boxes(
    image_size: tuple[int, int], width: int, height: int, overlap_ratio: float
) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """``(resized_size, boxes)`` of A1111's "Split oversized images".

    The image is resized so its short side equals the target's matching side; along the long side
    (length ``h``, tile length ``t``) it is cut into ``n = ceil((h - t * overlap) / (t * (1 - overlap)))``
    tiles starting at ``int(i * (h - t) / (n - 1))``: the first tile starts at 0, the last one ends at
    ``h``, and neighbours overlap by at least ``overlap * t``.
    """
    _, inverse_xy = split_ratio(image_size, width, height)
    iw, ih = image_size
    if inverse_xy:
        from_w, from_h, to_w, to_h = ih, iw, height, width
    else:
        from_w, from_h, to_w, to_h = iw, ih, width, height
    long_side = from_h * to_w // from_w
    count = math.ceil((long_side - to_h * overlap_ratio) / (to_h * (1.0 - overlap_ratio)))
    count = max(1, count)
    step = (long_side - to_h) / (count - 1) if count > 1 else 0.0
    boxes: list[tuple[int, int, int, int]] = []
    for i in range(count):
        start = int(step * i)
        boxes.append((start, 0, start + to_h, to_w) if inverse_xy else (0, start, to_w, start + to_h))
    resized = (long_side, to_w) if inverse_xy else (to_w, long_side)
    return resized, boxes


def auto_size(
    image_size: tuple[int, int],
    *,
    min_dim: int,
    max_dim: int,
    min_area: int,
    max_area: int,
    objective: str,
    threshold: float,
) -> tuple[int, int] | None:
    """A1111's "Auto-sized crop" size search: ``(w, h)`` with both sides in
    ``range(min_dim, max_dim + 1, 64)``, ``min_area <= w*h <= max_area`` and aspect error
    ``1 - min(r, 1/r)`` (``r`` = image aspect / crop aspect) at most ``threshold``; ``objective``
    ``"area"`` prefers the largest area then the smallest error, ``"error"`` the smallest error then
    the largest area; the first candidate (w outer, h inner) wins exact ties. ``None`` when nothing fits.
    """
    iw, ih = image_size

    def error(w: int, h: int) -> float:
        r = (iw / ih) / (w / h)
        return 1.0 - (r if r < 1 else 1.0 / r)

    best: tuple[int, int] | None = None
    best_key: tuple[float, float] | None = None
    for w in range(min_dim, max_dim + 1, AUTO_SIZE_STEP):
        for h in range(min_dim, max_dim + 1, AUTO_SIZE_STEP):
            if not min_area <= w * h <= max_area:
                continue
            err = error(w, h)
            if err > threshold:
                continue
            key = (float(w * h), -err) if objective == "area" else (-err, float(w * h))
            if best_key is None or key > best_key:
                best, best_key = (w, h), key
    return best


def centre_crop_resize(image: PILImage.Image, width: int, height: int) -> PILImage.Image:
    """The largest centred ``width:height`` region (fractional box), resampled (Lanczos) to the size."""
    from PIL import Image

    iw, ih = image.size
    if ih / height < iw / width:
        sw = width * ih / height
        box = ((iw - sw) / 2, 0.0, iw - (iw - sw) / 2, float(ih))
    else:
        sh = height * iw / width
        box = (0.0, (ih - sh) / 2, float(iw), ih - (ih - sh) / 2)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box)


# ----------------------------------------------------------------------------------------------------------
# focal point


def grey_entropy(grey: np.ndarray) -> float:
    """Shannon entropy (bits) of the histogram of an 8-bit grey array."""
    import numpy as np

    counts = np.bincount(grey.reshape(-1), minlength=256).astype(np.float64)
    counts = counts[counts > 0]
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def entropy_point(grey: np.ndarray, crop_w: int, crop_h: int, step: int = 4) -> tuple[float, float] | None:
    """Centre of the crop-sized window with the most entropy, sliding by ``step`` pixels along the
    axis where the image is larger than the crop (A1111's windows end strictly inside the image;
    the first best window wins). ``None`` when the image has no room to slide."""
    import numpy as np

    h, w = grey.shape
    if w > crop_w:
        starts = range(0, w - crop_w, step)
        scores = [grey_entropy(grey[:crop_h, s : s + crop_w]) for s in starts]
        best = list(starts)[int(np.argmax(scores))]
        return best + crop_w / 2, crop_h / 2
    if h > crop_h:
        starts = range(0, h - crop_h, step)
        scores = [grey_entropy(grey[s : s + crop_h, :crop_w]) for s in starts]
        best = list(starts)[int(np.argmax(scores))]
        return crop_w / 2, best + crop_h / 2
    return None


def shi_tomasi_corners(
    grey: np.ndarray, *, max_corners: int = 100, quality: float = 0.04, min_distance: float = 0.0
) -> list[tuple[float, float]]:
    """Strong corners ``(x, y)``, strongest first: the smaller eigenvalue of the 3x3-summed structure
    tensor of 3x3 Sobel gradients (mirror borders), kept where it is a 3x3 local maximum above
    ``quality`` x the image maximum, then greedily at least ``min_distance`` apart (OpenCV's
    ``goodFeaturesToTrack`` rule, written in numpy)."""
    import numpy as np

    img = grey.astype(np.float64)
    if img.shape[0] < 3 or img.shape[1] < 3:
        return []
    p = np.pad(img, 1, mode="reflect")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])

    def box3(a: np.ndarray) -> np.ndarray:
        q = np.pad(a, 1, mode="reflect")
        return sum(q[i : i + a.shape[0], j : j + a.shape[1]] for i in range(3) for j in range(3))  # type: ignore[return-value]

    a, b, c = box3(dx * dx), box3(dx * dy), box3(dy * dy)
    score = (a + c) / 2 - np.sqrt(((a - c) / 2) ** 2 + b * b)
    top = float(score.max())
    if top <= 0:
        return []
    score = np.where(score >= top * quality, score, 0.0)
    q = np.pad(score, 1, mode="constant", constant_values=-np.inf)
    dilated = np.max(
        np.stack([q[i : i + score.shape[0], j : j + score.shape[1]] for i in range(3) for j in range(3)]), axis=0
    )
    peak = (score > 0) & (score == dilated)
    peak[0, :] = peak[-1, :] = False  # OpenCV skips the 1-pixel border
    peak[:, 0] = peak[:, -1] = False
    ys, xs = np.nonzero(peak)
    order = np.argsort(-score[ys, xs], kind="stable")
    chosen: list[tuple[float, float]] = []
    limit = min_distance * min_distance
    for k in order:
        x, y = float(xs[k]), float(ys[k])
        if all((x - cx) ** 2 + (y - cy) ** 2 >= limit for cx, cy in chosen):
            chosen.append((x, y))
            if len(chosen) >= max_corners:
                break
    return chosen


def focal_point(
    image: PILImage.Image, crop_w: int, crop_h: int, *, entropy_weight: float, edges_weight: float
) -> tuple[int, int]:
    """The crop centre A1111's focal crop aims at: the mean of the corner centroid (weight
    ``edges_weight``) and the most entropic window's centre (weight ``entropy_weight``), each
    weight renormalised over the kinds that found something; the image centre when none did.

    Corners are searched on a grey copy whose bottom 10 % is painted flat grey (153), A1111's guard
    against watermarks pulling the crop down."""
    import numpy as np
    from PIL import ImageDraw

    grey_image = image.convert("L")
    points: list[tuple[float, float, float]] = []
    if edges_weight > 0:
        masked = grey_image.copy()
        ImageDraw.Draw(masked).rectangle([0, image.height * 0.9, image.width, image.height], fill=153)
        corners = shi_tomasi_corners(np.asarray(masked), min_distance=min(image.width, image.height) * 0.06)
        if corners:
            xs, ys = zip(*corners, strict=True)
            points.append((sum(xs) / len(xs), sum(ys) / len(ys), edges_weight))
    if entropy_weight > 0:
        found = entropy_point(np.asarray(grey_image), crop_w, crop_h)
        if found is not None:
            points.append((found[0], found[1], entropy_weight))
    total = sum(weight for _, _, weight in points)
    if not points or total <= 0:
        return image.width // 2, image.height // 2
    x = sum(px * weight for px, _, weight in points) / total
    y = sum(py * weight for _, py, weight in points) / total
    return round(x), round(y)


def focal_crop(
    image: PILImage.Image, width: int, height: int, *, entropy_weight: float, edges_weight: float
) -> PILImage.Image:
    """Scale to cover ``width`` x ``height`` and cut that size around :func:`focal_point`, pushed
    back inside the image."""
    scale = max(width / image.width, height / image.height)
    size = (max(width, int(image.width * scale)), max(height, int(image.height * scale)))
    resized = image.resize(size)
    fx, fy = focal_point(resized, width, height, entropy_weight=entropy_weight, edges_weight=edges_weight)
    x1 = min(max(fx - width // 2, 0), resized.width - width)
    y1 = min(max(fy - height // 2, 0), resized.height - height)
    return resized.crop((x1, y1, x1 + width, y1 + height))


# ----------------------------------------------------------------------------------------------------------
# captions


def merge_caption(mode: str, generated: str, existing: str | None) -> str:
    """A1111's rule for the output caption: ``prepend`` gives ``"existing generated"``, ``append``
    ``"generated existing"``, ``copy`` the existing caption, each only when an existing caption is
    there; otherwise (and with ``ignore``) the generated caption. The result is stripped; an empty
    caption means no ``.txt`` is written."""
    existing = (existing or "").strip()
    caption = generated
    if existing:
        if mode == "prepend":
            caption = f"{existing} {generated}"
        elif mode == "append":
            caption = f"{generated} {existing}"
        elif mode == "copy":
            caption = existing
    return caption.strip()


# ----------------------------------------------------------------------------------------------------------
# the run


@dataclass
class PreprocessReport:
    """What a run wrote (or, with ``dry_run``, would write) and what it skipped, with reasons."""

    sources: int = 0
    images_written: list[Path] = field(default_factory=list)
    captions_written: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)
    no_auto_size: list[Path] = field(default_factory=list)
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        skipped = []
        if self.unreadable:
            skipped.append(f"{len(self.unreadable)} unreadable")
        if self.not_images:
            skipped.append(f"{len(self.not_images)} non-image file(s)")
        if self.no_auto_size:
            skipped.append(f"{len(self.no_auto_size)} with no auto-size within the error threshold")
        tail = f"; skipped {', '.join(skipped)}" if skipped else ""
        return (
            f"preprocess: {self.sources} source image(s), {verb} {len(self.images_written)} image(s) "
            f"and {len(self.captions_written)} caption(s){tail}"
        )


def source_problems(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[str]:
    """Problems with the folders, found before any work starts."""
    out: list[str] = []
    source, target = Path(src), Path(dst)
    if not source.exists():
        out.append(f"SRC {source}: no such folder")
    elif not source.is_dir():
        out.append(f"SRC {source}: not a folder")
    if target.exists() and not target.is_dir():
        out.append(f"DST {target}: exists and is not a folder")
    if source.is_dir():
        s, t = source.resolve(), target.resolve()
        if t == s:
            out.append(f"DST {target} is SRC: choose another output folder")
        elif s in t.parents:
            out.append(f"DST {target} is inside SRC {source}: choose a folder outside it")
        if not list_sources(source)[0]:  # a run would write nothing and say "0 source image(s)" as a success
            out.append(_no_source_images(source))
    return out


def _no_source_images(source: Path) -> str:
    """Why SRC has nothing to preprocess: a kohya dataset root (``data/10_name/``) keeps its images one level down,
    and SRC's sub-folders are not read (A1111's "Preprocess images" reads only the folder it is given)."""
    folders = sorted(
        entry
        for entry in source.iterdir()
        if entry.is_dir() and not entry.name.startswith(".") and list_sources(entry)[0]
    )
    if not folders:
        return f"SRC {source}: no image in it"
    nested = sum(len(list_sources(folder)[0]) for folder in folders)
    return (
        f"SRC {source}: no image directly in it, {nested} in its sub-folders ({', '.join(f.name for f in folders)}); "
        f"only SRC's own images are read, as A1111 reads them: name a sub-folder, e.g. SRC {folders[0]}"
    )


def list_sources(src: str | os.PathLike[str]) -> tuple[list[Path], list[Path]]:
    """``(images, others)`` among the files directly in ``src`` (not recursive, as A1111), sorted by
    name; caption ``.txt`` files and hidden files are neither."""
    images: list[Path] = []
    others: list[Path] = []
    for entry in sorted(Path(src).iterdir(), key=lambda p: p.name):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        if is_image_path(entry):
            images.append(entry)
        elif entry.suffix.lower() != ".txt":
            others.append(entry)
    return images, others


def process_image(image: PILImage.Image, options: PreprocessOptions) -> tuple[list[PILImage.Image], bool]:
    """The outputs of one source image before flipping, and whether auto-size found no size."""
    width, height = options.width, options.height
    outputs: list[PILImage.Image] = []
    acted = False
    if options.split:
        ratio, _ = split_ratio(image.size, width, height)
        if ratio < 1.0 and ratio <= options.split_threshold:
            resized_size, boxes = split_boxes(image.size, width, height, options.overlap_ratio)
            resized = image.resize(resized_size)
            outputs.extend(resized.crop(box) for box in boxes)
            acted = True
    if options.focal_crop and image.width != image.height:
        outputs.append(
            focal_crop(
                image,
                width,
                height,
                entropy_weight=options.focal_entropy_weight,
                edges_weight=options.focal_edges_weight,
            )
        )
        acted = True
    no_size = False
    if options.auto_size:
        size = auto_size(
            image.size,
            min_dim=options.auto_size_min_dim,
            max_dim=options.auto_size_max_dim,
            min_area=options.auto_size_min_area,
            max_area=options.auto_size_max_area,
            objective=options.auto_size_objective,
            threshold=options.auto_size_threshold,
        )
        if size is None:
            no_size = True
        else:
            outputs.append(centre_crop_resize(image, *size))
        acted = True
    if options.keep_original_size:
        outputs.append(image)
        acted = True
    if not acted:
        outputs.append(resize_and_crop(image, width, height))
    return outputs, no_size


def _with_flips(outputs: Sequence[PILImage.Image], options: PreprocessOptions) -> Iterator[PILImage.Image]:
    """Each output followed by its copies: mirrored (``flip``, A1111 1.6's and 1.7's "Horizontal"),
    upside down (``flip_vertical``, 1.7's "Vertical") and both (``flip_both``, 1.7's "Both")."""
    from PIL import Image, ImageOps

    for image in outputs:
        yield image
        if options.flip:
            yield ImageOps.mirror(image)
        if options.flip_vertical:
            yield image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        if options.flip_both:
            yield image.transpose(Image.Transpose.ROTATE_180)


def preprocess(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    options: PreprocessOptions,
    *,
    captioner: Captioner | None = None,
    dry_run: bool = False,
    say: Callable[[str], None] | None = None,
) -> PreprocessReport:
    """Run the enabled operations on every image directly in ``src``, writing into ``dst``.

    Raise :class:`~sdcore.errors.ConfigError` (every problem, one line each) before any work when
    the folders or options are unusable. Unreadable images are skipped and reported. Each file is
    written atomically; with ``dry_run`` nothing is written and the report lists what would be.
    ``captioner`` (a tagger) captions each output image, flipped copies included, as A1111 does.
    """
    from ..errors import ConfigError
    from ..io import atomic_save, atomic_write_text

    problems = source_problems(src, dst) + options.problems()
    if problems:
        raise ConfigError("\n".join(problems))
    report = PreprocessReport(dry_run=dry_run)
    images, report.not_images = list_sources(src)
    target = Path(dst)
    for index, path in enumerate(images):
        try:
            image = open_image_rgb(path)
        except ImageError as exc:
            report.unreadable.append((path, str(exc)))
            if say is not None:
                say(f"skipped: {exc}")
            continue
        caption_file = path.with_suffix(".txt")
        existing = None
        if options.captions != "ignore" and caption_file.is_file():
            try:  # the one caption decoding rule; a cp1252 caption is reported, not copied with U+FFFD in it
                existing = read_caption_text(caption_file, "existing caption")
            except DataError as exc:
                report.unreadable.append((path, str(exc)))
                if say is not None:
                    say(f"skipped: {exc}")
                continue
        report.sources += 1
        outputs, no_size = process_image(image, options)
        if no_size:
            report.no_auto_size.append(path)
            if say is not None:
                say(f"auto-size: no size within the error threshold for {path.name} ({image.width}x{image.height})")
        finals = list(_with_flips(outputs, options))
        generated = captioner(finals) if captioner is not None and finals and not dry_run else [""] * len(finals)
        for subindex, (result, text) in enumerate(zip(finals, generated, strict=True)):
            base = f"{index:05}-{subindex}-{path.stem}"
            image_path = target / f"{base}.png"
            if not dry_run:
                atomic_save(image_path, lambda tmp, im=result: im.save(tmp, format="PNG"))  # type: ignore[misc]
            report.images_written.append(image_path)
            caption = merge_caption(options.captions, text, existing)
            pending_tagger = dry_run and captioner is not None
            if caption or pending_tagger:
                caption_path = target / f"{base}.txt"
                if not dry_run:
                    atomic_write_text(caption_path, caption)
                report.captions_written.append(caption_path)
    return report

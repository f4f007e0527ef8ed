"""OneTrainer's concepts file (``training_concepts/concepts.json``) as sdcore subsets.

OneTrainer (Nerogar/OneTrainer) describes its data as a list of *concepts*; its UI saves every
concept as a full object (``ConceptConfig`` with nested ``image`` and ``text`` objects). A training
preset either embeds that list (``concepts``) or names the file (``concept_file_name``). This module
reads either into :class:`~sdcore.data.dataset.SubsetOptions`, one per enabled concept, with
OneTrainer's meaning for each field (its data loader and the MGDS pipeline it builds):

- images: the files in ``path`` (and sub-folders with ``include_subdirectories``, hidden ones
  skipped) with OneTrainer's image suffixes, in sorted order, except ``*-masklabel`` and
  ``*-condlabel`` files (its masks and conditioning images);
- samples per epoch (``balancing``): ``REPEATS`` gives ``floor(images * balancing)``, ``SAMPLES``
  gives ``int(balancing)``. sdcore repeats every image a whole number of times per epoch, so a
  concept maps exactly when that count is a multiple of its images (repeats = count / images);
  any other count (OneTrainer then walks through the images across epochs) is refused, naming
  the repeats that would fit;
- prompts (``text.prompt_source``): ``sample`` = the image's ``.txt``, ``concept`` = the text file
  ``prompt_path`` for every image, ``filename`` = the file name without its suffix. A text file
  holds one prompt per non-empty line and each use picks one line at random (sdcore's
  ``enable_wildcard`` line choice; a caption with ``{``/``}`` is refused, because sdcore would read
  ``{a|b}`` as a wildcard where OneTrainer keeps it as text);
- ``enable_tag_shuffling`` + ``keep_tags_count`` = kohya's ``shuffle_caption`` + ``keep_tokens``
  (split at ``,``, the first tags fixed, joined with ``", "``); tag dropout ``RANDOM`` = kohya's
  ``caption_tag_dropout_rate`` (each non-kept tag dropped independently) and ``FULL`` with no kept
  tag = ``caption_dropout_rate`` (the whole prompt dropped);
- ``image.enable_random_flip`` = ``flip_aug`` (a 50 % horizontal flip), ``enable_crop_jitter`` (on by
  default) = ``random_crop`` (a uniform crop offset inside the scaled image's excess, MGDS ``ScaleCropImage``);
  with latent caching OneTrainer's cache keeps the offset drawn when it was filled for the whole run, so it is
  ``random_crop_once`` there (one seeded draw per image, kept in sdcore's latent cache),
  ``resolution_override`` = the subset's resolution, or its list of resolutions ("512,768": each
  image trains at one drawn from it, :mod:`sdcore.data.resolutions`), or a fixed size ("768x768",
  "1024x768": width x height, buckets off, every image covering it and cropped to it;
  :func:`parse_onetrainer_resolution` reads every form as OneTrainer does);
- ``image_variations`` (OneTrainer's cached augmented copies): see :func:`_image_variations`;
- ``loss_weight`` multiplies each sample's loss; ``type`` ``VALIDATION`` holds the whole concept
  out for sdcore's validation loss (never trained), as OneTrainer keeps it out of training;
- masked training (``--masked-loss``, or a training preset with ``masked_training``): each image's
  mask is ``<stem>-masklabel.png`` beside it (only PNG, as OneTrainer's ``ModifyPath``), read as
  greyscale; an image without one trains with a full mask (OneTrainer's ``GenerateImageLike`` of
  255); the mask follows its image's resize, crop and flip (:func:`sdcore.train.data.load_mask`).
- ``image.enable_random_circular_mask_shrink`` / ``enable_random_mask_rotate_crop`` = the subset's
  ``mask_shrink`` / ``mask_rotate_crop`` (:mod:`sdcore.data.mask_augment`, OneTrainer's settings, the rotated
  crop at least the run's lowest resolution square); they act with masked training or an inpainting model
  (the pre-flight notes them as doing nothing otherwise, as in OneTrainer).

Everything else OneTrainer can do that sdcore does not reproduce exactly is refused by name when
set away from its default (:data:`REFUSED`), all problems of the file at once
(:class:`~sdcore.data.dataset.DatasetProblems`). ``seed`` (OneTrainer's own augmentation streams;
sdcore draws from its per-sample generator) and ``concept_stats`` (the UI's statistics) are read
and not used; disabled concepts are skipped with a note.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError

if TYPE_CHECKING:
    from ..train.options import TrainOptions
    from .dataset import DatasetIndex, SkippedFile, SubsetOptions

#: OneTrainer's ``path_util.SUPPORTED_IMAGE_EXTENSIONS``
IMAGE_SUFFIXES: tuple[str, ...] = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".avif")
#: file stems its data loader never trains on (``CollectPaths(exclude_postfix=...)``)
EXCLUDED_STEM_SUFFIXES: tuple[str, ...] = ("-masklabel", "-condlabel")

#: ``ConceptConfig.default_values()`` (``seed`` is random there; ``image``/``text`` below)
CONCEPT_DEFAULTS: dict[str, Any] = {
    "name": "",
    "path": "",
    "enabled": True,
    "type": "STANDARD",
    "include_subdirectories": False,
    "image_variations": 1,
    "text_variations": 1,
    "balancing": 1.0,
    "balancing_strategy": "REPEATS",
    "loss_weight": 1.0,
    "concept_stats": {},
}
#: ``ConceptImageConfig.default_values()``
IMAGE_DEFAULTS: dict[str, Any] = {
    "enable_crop_jitter": True,
    "enable_random_flip": False,
    "enable_fixed_flip": False,
    "enable_random_rotate": False,
    "enable_fixed_rotate": False,
    "random_rotate_max_angle": 0.0,
    "enable_random_brightness": False,
    "enable_fixed_brightness": False,
    "random_brightness_max_strength": 0.0,
    "enable_random_contrast": False,
    "enable_fixed_contrast": False,
    "random_contrast_max_strength": 0.0,
    "enable_random_saturation": False,
    "enable_fixed_saturation": False,
    "random_saturation_max_strength": 0.0,
    "enable_random_hue": False,
    "enable_fixed_hue": False,
    "random_hue_max_strength": 0.0,
    "enable_resolution_override": False,
    "resolution_override": "512",
    "enable_random_circular_mask_shrink": False,
    "enable_random_mask_rotate_crop": False,
}
#: ``ConceptTextConfig.default_values()``
TEXT_DEFAULTS: dict[str, Any] = {
    "prompt_source": "sample",
    "prompt_path": "",
    "enable_tag_shuffling": False,
    "tag_delimiter": ",",
    "keep_tags_count": 1,
    "tag_dropout_enable": False,
    "tag_dropout_mode": "FULL",
    "tag_dropout_probability": 0.0,
    "tag_dropout_special_tags_mode": "NONE",
    "tag_dropout_special_tags": "",
    "tag_dropout_special_tags_regex": False,
    "caps_randomize_enable": False,
    "caps_randomize_mode": "capslock, title, first, random",
    "caps_randomize_probability": 0.0,
    "caps_randomize_lowercase": False,
}

#: OneTrainer switches sdcore refuses when on, and why (the augmentation's other settings only
#: matter while its switch is on, as in OneTrainer)
REFUSED: dict[str, str] = {
    "image.enable_fixed_flip": "sdcore's flip is random (50 %), never every sample",
    "image.enable_random_rotate": "sdcore has no rotation augmentation",
    "image.enable_fixed_rotate": "sdcore has no rotation augmentation",
    "image.enable_random_brightness": "sdcore has no brightness augmentation",
    "image.enable_fixed_brightness": "sdcore has no brightness augmentation",
    "image.enable_random_contrast": "sdcore has no contrast augmentation",
    "image.enable_fixed_contrast": "sdcore has no contrast augmentation",
    "image.enable_random_saturation": "sdcore has no saturation augmentation",
    "image.enable_fixed_saturation": "sdcore has no saturation augmentation",
    "image.enable_random_hue": "sdcore has no hue augmentation (kohya's color_aug shifts hue differently)",
    "image.enable_fixed_hue": "sdcore has no hue augmentation (kohya's color_aug shifts hue differently)",
    "text.caps_randomize_enable": "sdcore has no capitalisation augmentation",
}
#: OneTrainer's mask augmentations and the subset fields they become (:mod:`sdcore.data.mask_augment`): its data
#: loader adds them with ``masked_training`` or a model with a mask input (inpainting); the pre-flight, which
#: knows the model, notes them as doing nothing otherwise
MASK_AUGMENTATIONS: dict[str, str] = {
    "image.enable_random_circular_mask_shrink": "mask_shrink",
    "image.enable_random_mask_rotate_crop": "mask_rotate_crop",
}
#: OneTrainer's mask file name: ``<image stem>-masklabel.png`` beside each image (``ModifyPath``; only PNG)
MASK_SUFFIX = "-masklabel.png"

_TYPES = ("STANDARD", "VALIDATION", "PRIOR_PREDICTION")
_STRATEGIES = ("REPEATS", "SAMPLES")
_SOURCES = ("sample", "concept", "filename")


@dataclass(frozen=True)
class Concept:
    """One concept with OneTrainer's defaults filled in (what its ``from_dict`` produces)."""

    fields: dict[str, Any]
    image: dict[str, Any]
    text: dict[str, Any]
    where: str

    @property
    def label(self) -> str:
        name = self.fields.get("name") or Path(str(self.fields.get("path") or "")).name
        return f"{self.where} ({name!r})" if name else self.where


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """``ConceptConfig``'s migrations: v0 ``repeats`` -> ``balancing``, v1 ``validation_concept`` -> ``type``."""
    version = data.get("__version", 0)
    out = dict(data)
    if isinstance(version, int) and version < 1 and "repeats" in out:
        out["balancing"] = out.pop("repeats")
    if isinstance(version, int) and version < 2 and "validation_concept" in out:
        out["type"] = "VALIDATION" if out.pop("validation_concept") else "STANDARD"
    return out


def _concept(raw: Any, where: str, notes: list[str]) -> Concept:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a concept must be a JSON object, got {type(raw).__name__}")
    data = _migrate(raw)
    known = set(CONCEPT_DEFAULTS) | {"image", "text", "seed", "__version", "balancing_strategy"}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        notes.append(f"{where}: keys sdcore does not know ignored: {', '.join(unknown)}")
    fields = {**CONCEPT_DEFAULTS, **{k: v for k, v in data.items() if k in CONCEPT_DEFAULTS}}
    image = data.get("image") or {}
    text = data.get("text") or {}
    if not isinstance(image, dict) or not isinstance(text, dict):
        raise DataError(f"{where}: 'image' and 'text' must be JSON objects")
    for part, table, defaults in (("image", image, IMAGE_DEFAULTS), ("text", text, TEXT_DEFAULTS)):
        extra = sorted(k for k in table if k not in defaults and k != "__version")
        if extra:
            notes.append(f"{where}: {part} keys sdcore does not know ignored: {', '.join(extra)}")
    return Concept(
        fields=fields,
        image={**IMAGE_DEFAULTS, **{k: v for k, v in image.items() if k in IMAGE_DEFAULTS}},
        text={**TEXT_DEFAULTS, **{k: v for k, v in text.items() if k in TEXT_DEFAULTS}},
        where=where,
    )


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None


#: OneTrainer's folders of configs and concepts (its built-in presets lie one level deeper, in
#: ``training_presets/<model>/``): the folder holding one of them is OneTrainer's own
ONETRAINER_FOLDERS = ("training_presets", "training_configs", "training_concepts", "training_samples")


def search_roots(base: Path) -> list[Path]:
    """Where :func:`resolve_path` looks, in order: the working directory; OneTrainer's folder when ``base``
    lies under one of its :data:`ONETRAINER_FOLDERS` (any depth: ``training_presets/SD1.5/#sd 1.5.json``);
    the folder above ``base``'s (a config saved in ``training_presets/`` or ``training_configs/``, a
    ``training_concepts/`` file); ``base``'s folder."""
    roots = [Path.cwd()]
    for folder in base.absolute().parents:
        if folder.name in ONETRAINER_FOLDERS:
            roots.append(folder.parent)
            break
    for root in (base.parent.parent, base.parent):
        if all(root.absolute() != seen.absolute() for seen in roots):
            roots.append(root)
    return roots


def resolve_path(raw: str, base: Path) -> Path:
    """OneTrainer resolves relative paths from its working directory, its own folder (its launch scripts
    change to it); sdcore looks in :func:`search_roots` of the file naming the path, the first that has it."""
    candidate = Path(raw).expanduser()
    if candidate.is_absolute():
        return candidate
    for root in search_roots(base):
        if (root / candidate).exists():
            return root / candidate
    return candidate


#: ``TrainConfig``'s ``concept_file_name`` default (relative to OneTrainer's folder)
DEFAULT_CONCEPT_FILE = "training_concepts/concepts.json"


def concepts_of(path: str | os.PathLike[str]) -> tuple[list[Any], Path]:
    """The raw concept list of a concepts file (a JSON list) or a training preset (a JSON object with
    ``concepts``, else ``concept_file_name``, OneTrainer's default when a preset leaves both out), and the file the
    list came from."""
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, list):
        return data, path
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a OneTrainer concepts file (a JSON list) or training preset (a JSON object)")
    if isinstance(data.get("concepts"), list):
        return data["concepts"], path
    name = data.get("concept_file_name")
    if name is None and "training_method" in data and "model_type" in data:
        # a preset leaves it out (none of OneTrainer's built-in ones sets it): TrainConfig's default applies
        name = DEFAULT_CONCEPT_FILE
        concepts_file = resolve_path(name, path)
        if not concepts_file.is_file():
            where = ", ".join(str(root) for root in search_roots(path))
            raise DataError(
                f"{path}: gives neither 'concepts' nor 'concept_file_name', and OneTrainer's default {name} is not "
                f"in {where} (the working directory first): add 'concept_file_name' (or give --data)"
            )
    if not isinstance(name, str) or not name:
        raise DataError(
            f"{path}: a JSON dataset is OneTrainer's concepts file (a list of concepts) or a training preset "
            "with 'concepts' or 'concept_file_name'"
        )
    concepts_file = resolve_path(name, path)
    data = _read_json(concepts_file)
    if not isinstance(data, list):
        raise DataError(f"{concepts_file}: a OneTrainer concepts file is a JSON list of concepts")
    return data, concepts_file


def list_images(directory: Path, recursive: bool) -> list[Path]:
    """The files OneTrainer's ``CollectPaths`` collects: its image suffixes, masks excluded, sorted.
    Hidden names are left out, as the dataset scan leaves them out, so the count that turns balancing
    into repeats is the count of images that train."""
    files: list[Path] = []
    for child in directory.iterdir():
        if child.name.startswith("."):
            continue
        if child.is_file():
            files.append(child)
        elif recursive and child.is_dir():
            files.extend(list_images(child, True))
    return sorted(
        f for f in files if f.suffix.lower() in IMAGE_SUFFIXES and not f.stem.endswith(EXCLUDED_STEM_SUFFIXES)
    )


def samples_per_epoch(images: int, balancing: float, strategy: str) -> int:
    """OneTrainer's samples of one concept per epoch (MGDS ``VariationSorting``): ``REPEATS``
    ``floor(images * balancing)``, ``SAMPLES`` ``int(balancing)``."""
    if strategy == "REPEATS":
        return math.floor(images * balancing)
    return int(balancing)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _caption_settings(c: Concept, problems: list[str]) -> dict[str, Any]:
    """shuffle/keep/dropout values for the subset, or problems for what sdcore cannot reproduce."""
    t = c.text
    out: dict[str, Any] = {"shuffle_caption": False, "keep_tokens": 0, "tag_dropout": 0.0, "caption_dropout": 0.0}
    keep = t["keep_tags_count"]
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        problems.append(f"{c.label}: text.keep_tags_count must be a non-negative integer, got {keep!r}")
        keep = 0
    shuffle = t["enable_tag_shuffling"] is True
    probability = _number(t["tag_dropout_probability"])
    dropping = t["tag_dropout_enable"] is True and probability is not None and probability > 0
    if t["tag_dropout_enable"] is True and (probability is None or not 0.0 <= probability <= 1.0):
        problems.append(f"{c.label}: text.tag_dropout_probability must be in [0, 1], got {probability!r}")
        dropping = False
    if (shuffle or dropping) and t["tag_delimiter"] != ",":
        problems.append(
            f"{c.label}: text.tag_delimiter {t['tag_delimiter']!r}: sdcore splits tags at ',' only "
            "(kohya's caption_separator is not supported either)"
        )
    out["shuffle_caption"] = shuffle
    out["keep_tokens"] = keep
    if dropping:
        assert probability is not None
        mode = t["tag_dropout_mode"]
        if t["tag_dropout_special_tags_mode"] != "NONE":
            problems.append(
                f"{c.label}: text.tag_dropout_special_tags_mode {t['tag_dropout_special_tags_mode']!r}: "
                "sdcore has no white/black list for tag dropout (use NONE)"
            )
        if mode == "RANDOM":
            out["tag_dropout"] = probability
        elif mode == "FULL" and keep == 0:
            out["caption_dropout"] = probability
        elif mode == "FULL":
            problems.append(
                f"{c.label}: text.tag_dropout_mode FULL with keep_tags_count {keep}: OneTrainer then drops every "
                "tag but the kept ones; sdcore drops a whole caption only (set keep_tags_count 0) or each tag "
                "alone (mode RANDOM)"
            )
        elif mode == "RANDOM WEIGHTED":
            problems.append(
                f"{c.label}: text.tag_dropout_mode 'RANDOM WEIGHTED' (a probability growing along the caption) "
                "is not supported by sdcore (use RANDOM)"
            )
        else:
            problems.append(f"{c.label}: text.tag_dropout_mode {mode!r} is not one of FULL, RANDOM, RANDOM WEIGHTED")
    return out


def load_concepts(
    path: str | os.PathLike[str], defaults: TrainOptions | None = None, skipped: list[SkippedFile] | None = None
) -> list[SubsetOptions]:
    """The subsets of a OneTrainer concepts file or training preset (see the module's docstring).

    Every concept OneTrainer would train (``enabled``) becomes one subset on top of the run's
    options (``defaults``). What sdcore cannot reproduce is collected over the whole file and
    raised at once as :class:`~sdcore.data.dataset.DatasetProblems`; disabled concepts and
    ignored keys are added to ``skipped`` as notes.
    """
    from .dataset import CONDITIONING_SUFFIX, DatasetProblems, SkippedFile, SubsetOptions, subset_defaults

    path = Path(path)
    raw_list, source = concepts_of(path)
    notes: list[str] = []
    problems: list[str] = []
    subsets: list[SubsetOptions] = []
    base = subset_defaults(defaults)
    masked = bool(defaults is not None and defaults.masked_loss) or preset_is_masked(path)
    if base.get("conditioning_suffix") is None and preset_sets(path, "custom_conditioning_image"):
        base = {**base, "conditioning_suffix": CONDITIONING_SUFFIX}
    for i, raw in enumerate(raw_list):
        try:
            concept = _concept(raw, f"concept {i}", notes)
        except DataError as exc:
            problems.append(str(exc))
            continue
        cached = defaults.cache_latents if defaults is not None else True
        subset = _subset(concept, source, base, problems, notes, skipped, masked=masked, cached=cached)
        if subset is not None:
            subsets.append(SubsetOptions(**subset))
    if skipped is not None:
        skipped.extend(SkippedFile(source, note) for note in notes)
    if problems:
        raise DatasetProblems([f"{source}: {problem}" for problem in problems])
    if not raw_list:
        raise DataError(f"{source}: the concepts file lists no concept")
    return subsets


#: OneTrainer rounds a fixed size to its bucket grid (``AspectBucketing``'s quantization: 8 for SD1/SD2,
#: 64 for SDXL, SD3, FLUX.1 and Chroma); a multiple of 64 is kept as written by every family, so where the grid
#: is not known (a concepts file given alone) sdcore takes such sizes only
FIXED_SIZE_GRID = 64


@dataclass(frozen=True)
class OneTrainerResolution:
    """A OneTrainer ``resolution`` string read as its data loader reads it: ``sizes`` (one number or a
    list, each image drawing one) or, for a fixed ``WxH``, ``fixed`` as (width, height)."""

    sizes: tuple[int, ...] = ()
    fixed: tuple[int, int] | None = None
    #: the fixed size as written, where OneTrainer's grid moved it (else ``None``)
    written: tuple[int, int] | None = None

    def rounding_note(self, what: str) -> str | None:
        """A note where OneTrainer's grid moved a fixed size, which the run then trains at as OneTrainer does."""
        if self.written is None or self.fixed is None:
            return None
        (w, h), (fw, fh) = self.written, self.fixed
        return f"{what} {w}x{h}: OneTrainer rounds a fixed size to its grid, so the images are cropped to {fw}x{fh}"


def _fixed_size_values(fixed: tuple[int, int]) -> dict[str, Any]:
    """A concept's fixed ``WxH`` as :class:`SubsetOptions` values: a square is its side; otherwise the side of
    the same area plus the pair, which sdcore's buckets-off crop covers and crops to (kohya's ``W,H``)."""
    from ..train.kohya import split_resolution

    side, size = split_resolution(fixed, None)
    return {"resolution": side, "resolution_size": size}


def parse_onetrainer_resolution(
    raw: object, what: str, *, buckets: bool, grid: int | None = None
) -> OneTrainerResolution:
    """Read a ``resolution`` / ``image.resolution_override`` as MGDS does (``AspectBucketing`` with
    ``aspect_ratio_bucketing``, ``SingleAspectCalculation`` without): text with an ``x`` and no comma is
    a fixed size ``W x H`` (bucketing only; without it MGDS fails on it), anything else a comma list read
    with Python's ``int`` (so `` 512``, ``+512`` and ``1_024`` are numbers there too). A fixed size is put on
    ``grid``, the family's bucket grid, with Python's ``round(side / grid) * grid`` as ``AspectBucketing``'s
    quantization does; without a grid only sizes on :data:`FIXED_SIZE_GRID` (every family's) are taken. Raises
    :class:`~sdcore.errors.ConfigError` with one line for what sdcore cannot train the same way."""
    text = str(raw).strip()
    if "x" in text and "," not in text:
        width_text, _, height_text = text.partition("x")
        try:
            width, height = int(width_text), int(height_text)
        except ValueError:
            raise ConfigError(f"{what} {text!r}: a fixed size is WIDTHxHEIGHT such as 1024x768") from None
        if not buckets:
            raise ConfigError(
                f"{what} {text!r}: OneTrainer reads a fixed size only with aspect_ratio_bucketing on (without "
                "it its data loader fails on it); give one number or a list"
            )
        if grid is not None and grid > 0:
            fixed = (round(width / grid) * grid, round(height / grid) * grid)
            if min(fixed) <= 0:
                raise ConfigError(
                    f"{what} {text!r}: on OneTrainer's grid of {grid} this size has a side of 0 (OneTrainer fails "
                    "on it); give sides of at least the grid"
                )
            return OneTrainerResolution(fixed=fixed, written=(width, height) if fixed != (width, height) else None)
        if min(width, height) <= 0 or width % FIXED_SIZE_GRID or height % FIXED_SIZE_GRID:
            raise ConfigError(
                f"{what} {text!r}: OneTrainer's fixed size (every image scaled to cover {width}x{height} and "
                f"cropped to it) is sdcore's W,H without buckets where both sides are multiples of "
                f"{FIXED_SIZE_GRID} (OneTrainer rounds others to its family's grid, which a concepts file alone "
                "does not name: give --bucket-rule onetrainer --bucket-step GRID, or such a size)"
            )
        return OneTrainerResolution(fixed=(width, height))
    sizes: list[int] = []
    for part in text.split(","):
        try:
            size = int(part)
        except ValueError:
            size = 0
        if size <= 0:
            raise ConfigError(
                f"{what} {text!r}: one number (1024), a comma list (512,768,1024) or, with "
                f"aspect_ratio_bucketing, a fixed size (1024x1024) is needed ({part.strip()!r} is not a number)"
            )
        sizes.append(size)
    return OneTrainerResolution(sizes=tuple(sizes))


def _subset(
    c: Concept,
    source: Path,
    base: dict[str, Any],
    problems: list[str],
    notes: list[str],
    skipped: list[SkippedFile] | None,
    *,
    masked: bool = False,
    cached: bool = True,
) -> dict[str, Any] | None:
    """The :class:`SubsetOptions` values of one concept (``None`` when it trains nothing); ``masked``:
    OneTrainer's masked training (each image's ``-masklabel.png`` is its loss mask); ``cached``: the run
    caches latents (OneTrainer's ``latent_caching``)."""
    from .dataset import SkippedFile

    f, image, text = c.fields, c.image, c.text
    if f["enabled"] is not True:
        if skipped is not None:
            skipped.append(SkippedFile(source, f"{c.label}: disabled; skipped (as OneTrainer)"))
        return None
    start = len(problems)
    kind = f["type"]
    if kind not in _TYPES:
        problems.append(f"{c.label}: type {kind!r} is not one of {', '.join(_TYPES)}")
    elif kind == "PRIOR_PREDICTION":
        problems.append(
            f"{c.label}: type PRIOR_PREDICTION (the base model's own prediction as the target) is not supported "
            "by sdcore; for prior preservation with class images use sdcore train dreambooth --reg-data"
        )
    for key, why in REFUSED.items():
        part, name = key.split(".")
        if (image if part == "image" else text)[name] is True:
            problems.append(f"{c.label}: {key}: {why}")
    if f["text_variations"] != 1:
        problems.append(
            f"{c.label}: text_variations {f['text_variations']!r}: sdcore draws a fresh caption every time an "
            "image is used (its --caption-variants is one count for the whole run); set 1"
        )
    loss_weight = _number(f["loss_weight"])
    if loss_weight is None or loss_weight < 0:
        problems.append(f"{c.label}: loss_weight must be a finite number >= 0, got {f['loss_weight']!r}")
        loss_weight = 1.0
    values = dict(base)
    values.update(_caption_settings(c, problems))
    values.update(
        loss_weight=loss_weight,
        flip=image["enable_random_flip"] is True,
        # crop jitter: a new crop at every use; with latent caching OneTrainer's cache keeps the crop drawn
        # when it was filled (per image variation), so sdcore draws it once per image for the run
        random_crop=image["enable_crop_jitter"] is True and not cached,
        random_crop_once=image["enable_crop_jitter"] is True and cached,
        recursive=f["include_subdirectories"] is True,
        image_suffixes=IMAGE_SUFFIXES,
        excluded_stem_suffixes=EXCLUDED_STEM_SUFFIXES,
        caption_extension=".txt",
        class_tokens=None,
        is_class=False,
        validation_split=1.0 if kind == "VALIDATION" else 0.0,
        mask_suffix=MASK_SUFFIX if masked else None,
        # OneTrainer's rotated crop is at least the run's lowest resolution square (not the concept's override)
        mask_crop_min_size=min(base.get("resolutions") or (base.get("resolution") or 512,)),
        **{field: image[key.split(".")[1]] is True for key, field in MASK_AUGMENTATIONS.items()},
    )
    if image["enable_resolution_override"] is True:
        try:  # the concept's list replaces the run's (a single number: that resolution alone)
            read = parse_onetrainer_resolution(
                image["resolution_override"], "image.resolution_override", buckets=bool(base.get("buckets", True)),
                grid=base.get("bucket_step") if base.get("bucket_rule") == "onetrainer" else None,
            )  # fmt: skip
        except ConfigError as exc:
            problems.append(f"{c.label}: {exc}")
        else:
            rounded = read.rounding_note("image.resolution_override")
            if rounded:
                notes.append(f"{c.label}: {rounded}")
            if read.fixed is not None:  # WxH: every image covers it and is cropped to it, no buckets
                values.update(_fixed_size_values(read.fixed), resolutions=(), buckets=False)
            else:
                values.update(resolution=max(read.sizes), resolutions=read.sizes if len(read.sizes) > 1 else ())
    _image_variations(c, values, problems, notes, cached=cached)
    source_kind = text["prompt_source"]
    if source_kind not in _SOURCES:
        problems.append(f"{c.label}: text.prompt_source {source_kind!r} is not one of {', '.join(_SOURCES)}")
    elif source_kind == "filename":
        values.update(caption_from_filename=True, enable_wildcard=False)
    else:
        values["enable_wildcard"] = True  # one random line per use, as OneTrainer's SelectRandomText
        if source_kind == "concept":
            prompt_file = resolve_path(str(text["prompt_path"]), source) if text["prompt_path"] else None
            if prompt_file is None or not prompt_file.is_file():
                problems.append(f"{c.label}: text.prompt_path {text['prompt_path']!r}: no such text file")
            else:
                from .captions import read_caption_lines

                try:
                    values["caption_text"] = read_caption_lines(prompt_file)
                except DataError as exc:
                    problems.append(f"{c.label}: {exc}")
    raw_path = f["path"]
    if not isinstance(raw_path, str) or not raw_path:
        problems.append(f"{c.label}: 'path' (the image folder) is empty")
        return None
    directory = resolve_path(raw_path, source)
    if not directory.is_dir():
        problems.append(f"{c.label}: image folder {directory} does not exist")
        return None
    values["image_dir"] = directory
    values["repeats"] = _repeats(c, directory, problems, notes)
    if len(problems) > start or values["repeats"] == 0:
        return None
    return values


def _image_variations(
    c: Concept, values: dict[str, Any], problems: list[str], notes: list[str], *, cached: bool
) -> None:
    """``image_variations`` N: OneTrainer's image cache (MGDS ``DiskCache``, only with latent caching) holds N
    augmented copies of each image (each its own resolution draw, flip, crop jitter and VAE sample) and the
    epochs go through them in turn. Without latent caching there is no such cache and N changes nothing. With
    it, what N varies is, in sdcore: the flip, drawn at every use from the two cached latents (more variety
    than N fixed copies); crop jitter, which sdcore draws once per image (N offsets there: the note says so);
    the colour augmentations, refused with cached latents anyway; and the resolution draw of a list, which
    sdcore makes once per image for the run: that case is refused."""
    variations = c.fields["image_variations"]
    if variations == 1:
        return
    if isinstance(variations, bool) or not isinstance(variations, int) or variations < 1:
        problems.append(f"{c.label}: image_variations must be a whole number >= 1, got {variations!r}")
        return
    if not cached:
        notes.append(f"{c.label}: image_variations {variations}: no effect without latent caching (as in OneTrainer)")
    elif len(set(values.get("resolutions") or ())) > 1:
        problems.append(
            f"{c.label}: image_variations {variations} with a resolution list: OneTrainer caches {variations} "
            "resolution draws per image and cycles them, sdcore with cached latents draws once per image for the "
            "run; set 1, or turn latent caching off (sdcore then draws every epoch)"
        )
    else:
        notes.append(
            f"{c.label}: image_variations {variations}: sdcore caches each image once (both flips, the flip drawn "
            f"at every use) instead of {variations} fixed copies"
            + (
                f", with one crop jitter offset per image where OneTrainer draws {variations}"
                if values.get("random_crop_once")
                else ""
            )
        )


def _repeats(c: Concept, directory: Path, problems: list[str], notes: list[str]) -> int:
    """Whole repeats per image giving OneTrainer's samples per epoch (0: it trains none)."""
    strategy = c.fields["balancing_strategy"]
    balancing = _number(c.fields["balancing"])
    if strategy not in _STRATEGIES:
        problems.append(f"{c.label}: balancing_strategy {strategy!r} is not one of REPEATS, SAMPLES")
        return 1
    if balancing is None or balancing < 0:
        problems.append(f"{c.label}: balancing must be a finite number >= 0, got {c.fields['balancing']!r}")
        return 1
    if c.fields["type"] == "VALIDATION":
        return 1  # a validation concept is used once per validation, whatever its balancing
    try:
        count = len(list_images(directory, c.fields["include_subdirectories"] is True))
    except OSError as exc:
        problems.append(f"{c.label}: cannot list {directory}: {exc.strerror or exc}")
        return 1
    if count == 0:
        return 1  # the scan reports the empty folder
    samples = samples_per_epoch(count, balancing, strategy)
    if samples == 0:
        notes.append(
            f"{c.label}: balancing {balancing:g} {strategy} gives 0 samples per epoch; skipped (as OneTrainer)"
        )
        return 0
    if samples % count:
        low, high = samples // count, samples // count + 1
        fits = (
            f"balancing {low} or {high} with REPEATS"
            if strategy == "REPEATS"
            else f"balancing {low * count} or {high * count} with SAMPLES"
        )
        problems.append(
            f"{c.label}: balancing {balancing:g} {strategy} = {samples} samples per epoch from {count} images; "
            f"sdcore repeats every image a whole number of times per epoch ({fits})"
        )
        return 1
    return samples // count


def caption_problems(index: DatasetIndex) -> list[str]:
    """Captions sdcore would read differently from OneTrainer: with the random line choice on, sdcore
    treats ``{a|b}`` as a wildcard (and ``{{`` as a brace); OneTrainer keeps them as text."""
    found = [
        e.path
        for e in index.entries
        if e.subset.image_suffixes == IMAGE_SUFFIXES
        and e.subset.enable_wildcard
        and ("{" in e.caption or "}" in e.caption)
    ]
    if not found:
        return []
    shown = ", ".join(str(p) for p in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return [
        f"{len(found)} prompt(s) contain '{{' or '}}', which sdcore reads as a {{a|b}} wildcard while "
        f"OneTrainer keeps it as text: {shown}"
    ]


def preset_sets(path: str | os.PathLike[str], key: str) -> bool:
    """Whether ``path`` is a OneTrainer training preset with the switch ``key`` on (quietly ``False`` for a
    concepts file or anything unreadable): a preset given as ``--data`` (or to ``sdcore data check``) pairs
    the files its own settings make a run read (``masked_training``: ``-masklabel.png`` masks;
    ``custom_conditioning_image``: ``-condlabel.png`` conditioning images)."""
    try:
        data = _read_json(Path(path))
    except DataError:
        return False
    return isinstance(data, dict) and data.get(key) is True


def preset_is_masked(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a OneTrainer training preset with ``masked_training`` on."""
    return preset_sets(path, "masked_training")


def mask_counts(index: DatasetIndex) -> tuple[int, list[Path]] | None:
    """``(images with a -masklabel.png mask, images without one)`` of the OneTrainer concepts trained with
    masks (an image without one trains with a full mask, as in OneTrainer); ``None`` when no subset uses
    such masks."""
    from ..train.data import mask_image_path

    entries = [e for e in index.entries if e.subset.mask_suffix is not None]
    if not entries:
        return None
    without = [e.path for e in entries if mask_image_path(e) is None]
    return len(entries) - len(without), without


def has_validation_concept(data: str) -> bool:
    """Whether ``data`` is a OneTrainer concepts file with an enabled ``VALIDATION`` concept (quietly
    ``False`` for anything else; reading the file reports its own problems)."""
    if not data or not data.lower().endswith(".json"):
        return False
    try:
        concepts, _ = concepts_of(Path(data).expanduser())
    except DataError:
        return False
    for raw in concepts:
        if isinstance(raw, dict):
            migrated = _migrate(raw)
            if migrated.get("type") == "VALIDATION" and migrated.get("enabled", True) is True:
                return True
    return False


__all__ = [
    "CONCEPT_DEFAULTS",
    "EXCLUDED_STEM_SUFFIXES",
    "IMAGE_DEFAULTS",
    "IMAGE_SUFFIXES",
    "MASK_AUGMENTATIONS",
    "MASK_SUFFIX",
    "REFUSED",
    "TEXT_DEFAULTS",
    "caption_problems",
    "concepts_of",
    "has_validation_concept",
    "list_images",
    "load_concepts",
    "mask_counts",
    "preset_is_masked",
    "preset_sets",
    "resolve_path",
    "samples_per_epoch",
]

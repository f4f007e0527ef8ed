"""Finding the training images: kohya folders, a kohya dataset TOML or OneTrainer's concepts file
(:mod:`.onetrainer`), into one flat index.

The index is built before any model loads, reads only image headers (plus an integrity check)
and caption files, and never drops a file silently: everything it cannot use is listed in
``skipped`` with the reason, and captions that are missing or empty are listed too, so that
``sdcore data check`` and the trainer's start-up summary can show them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError
from ..windows_paths import check_windows_path
from .buckets import (
    BucketAssignment,
    ImageTooSmallError,
    Resolution,
    area_side,
    assign_bucket,
    assign_onetrainer_bucket,
    make_buckets,
    onetrainer_buckets,
    resolution_pair,
    square_assignment,
)
from .captions import CAPTION_EXTENSIONS, _normalise_extension, caption_path_candidates, filename_caption, read_caption
from .images import ImageError, is_image_path, probe_image, verify_image

if TYPE_CHECKING:
    from ..train.options import TrainOptions
    from .resolutions import ResolutionGroup

#: kohya folder names: ``<repeats>_<class tokens>``, e.g. ``10_mychar woman``.
_FOLDER_RE = re.compile(r"^(\d+)_(.*)$")

log = logging.getLogger(__name__)


def _kohya_folder_params(name: str) -> tuple[int, str] | None:
    """A sub-folder name read as kohya's ``extract_dreambooth_params`` (sd-scripts config_util.py) reads it.

    ``int(name.split("_")[0])`` is the repeats and the rest, joined with ``_``, the class tokens: ``10``
    is 10 repeats and no tokens, ``1_a_b`` 1 and ``a_b``, `` 10_x`` 10 (``int`` strips spaces), ``-1_x``
    -1. ``None`` where that ``int`` fails (``abc``, ``_bad``, ``10 x``): kohya ignores the folder. The
    root's own name keeps needing the ``_`` (:data:`_FOLDER_RE`): a folder pointed at, e.g. ``2024``, is
    not read as 2024 repeats."""
    head, _, rest = name.partition("_")
    try:
        return int(head), rest
    except ValueError:
        return None


#: Files that legitimately sit beside images and are not reported as skipped.
_SIDECAR_SUFFIXES = frozenset(CAPTION_EXTENSIONS) | {".npz", ".json", ".toml", ".yaml", ".yml", ".md", ".db", ".ini"}
#: sdcore's own caches written beside the images (``train.text_store.store_file``: the text-encoder outputs of
#: ``--cache-text-encoder-outputs-to-disk``), so a second run does not report them as skipped non-images
_OWN_CACHE_RE = re.compile(r"^sdcore_text_[0-9a-f]+\.safetensors$")


#: OneTrainer's custom conditioning image beside ``<stem>.<ext>``: ``<stem>-condlabel.png`` (its ``ModifyPath``)
CONDITIONING_SUFFIX = "-condlabel.png"


@dataclass(frozen=True)
class SubsetOptions:
    """One folder of images and how to use it (a kohya ``[[datasets.subsets]]`` entry).

    Defaults come from :class:`~sdcore.train.options.TrainOptions` (see :func:`subset_defaults`).
    The bucket fields are per dataset in kohya's TOML, so each subset carries its own copy.
    """

    image_dir: Path
    repeats: int = 1
    is_class: bool = False
    caption_extension: str = ".txt"
    #: read the other of ``.txt``/``.caption`` where ``caption_extension``'s file is missing (kohya does not)
    caption_fallback: bool = True
    keep_tokens: int = 0
    shuffle_caption: bool = False
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0
    flip: bool = False
    class_tokens: str | None = None
    resolution: int = 512
    #: kohya's non-square resolution (``[768, 512]`` / ``"768,512"``) as ``(width, height)``; ``resolution`` is
    #: then the side of the same area (memory plan, sample size). Buckets use its exact area ``w * h`` and, buckets
    #: off, images are cropped to exactly ``w`` x ``h``, as kohya does. ``None``: the square ``resolution``
    resolution_size: tuple[int, int] | None = None
    #: several resolutions (OneTrainer's "512,768,1024"; ``resolution`` is then the largest): each image
    #: trains at one of them, drawn as :mod:`sdcore.data.resolutions` says; ``()``: ``resolution`` alone
    resolutions: tuple[int, ...] = ()
    # additions beyond the shared brief (all optional)
    #: the kohya ``[[datasets]]`` batch size (``None``: the run's ``--batch-size``); each dataset batches alone
    #: at its own size (:class:`sdcore.data.sampler.BucketBatchSampler`)
    batch_size: int | None = None
    #: which ``[[datasets]]`` of a kohya dataset TOML this subset is in (0 otherwise): batches never mix datasets
    dataset: int = 0
    #: the kohya dataset TOML this subset was read from (``None``: a folder or another config): a LoRA file
    #: then describes its data per ``[[datasets]]`` (kohya's ``ss_datasets``), as kohya does for such runs
    dataset_config: Path | None = None
    #: that ``[[datasets]]``'s own ``resize_interpolation`` (else ``[general]``'s, else the run's), which its
    #: subsets may override: kohya records it per dataset in ``ss_datasets`` beside each subset's
    dataset_resize_interpolation: str | None = None
    #: class images given beside the dataset (``--reg-data``, a method's generated class images), in no
    #: ``[[datasets]]``: the sampler balances them against every dataset's training images, where a
    #: ``[[datasets]]``'s own ``is_reg`` subsets balance against that dataset's alone (kohya)
    run_class: bool = False
    buckets: bool = True
    #: how buckets are built and filled (:data:`sdcore.data.buckets.BUCKET_RULES`): kohya's, or OneTrainer's
    #: (``bucket_step`` is then its quantization; ``min/max_bucket_reso`` and ``bucket_no_upscale`` unused)
    bucket_rule: str = "kohya"
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_step: int = 64
    bucket_no_upscale: bool = False
    keep_tokens_separator: str | None = None
    caption_prefix: str = ""
    caption_suffix: str = ""
    secondary_separator: str | None = None
    #: kohya's ``caption_separator``: where tags split for shuffling, keep_tokens and tag dropout
    caption_separator: str = ","
    caption_dropout_every_n_epochs: int = 0
    # kohya's validation split (per dataset in its TOML; sdcore.train.validation applies it per subset)
    validation_split: float = 0.0
    validation_seed: int | None = None
    # kohya's image options (sdcore.data.augment, sdcore.train.data)
    color_aug: bool = False
    random_crop: bool = False
    #: a random crop drawn once per image for the run (seeded by the image), not at every use: OneTrainer's crop
    #: jitter with latent caching, whose cache keeps the crop drawn when it was filled (:func:`sdcore.train.data.
    #: crops_drawn_once`); unlike ``random_crop`` it works with cached latents
    random_crop_once: bool = False
    #: kohya's ``resize_interpolation``: the filter that resizes to the bucket (None: area/lanczos)
    resize_interpolation: str | None = None
    #: the alpha channel (0..255 -> 0..1) weights the loss
    alpha_mask: bool = False
    #: ``--masked-loss``: a same-named mask image here weights the loss by its R channel
    conditioning_data_dir: Path | None = None
    #: mask images in ``conditioning_data_dir`` that pair with no training image are left alone (SimpleTuner's
    #: mask datasets look up each image's mask and never read the rest) instead of refused (kohya's check)
    mask_extras_allowed: bool = False
    #: how those mask images weigh the loss (:data:`sdcore.train.options.MASK_KINDS`): ``red`` the R channel as it
    #: is, ``segmentation`` SimpleTuner's binary mask of the channels' mean, drawn with ``--masked-loss-probability``
    mask_kind: str = "red"
    #: FLUX.1 Kontext: each image's control (reference) image, the file of the same stem in this folder
    #: (musubi-tuner's ``control_directory``, ai-toolkit's ``control_path``; :mod:`sdcore.train.kontext_data`)
    control_dir: Path | None = None
    #: a diffusers JSONL (:mod:`sdcore.data.jsonl`): its rows are this subset's images, each with its own control
    #: image and caption, read from ``jsonl_columns`` (image, control image, caption); ``image_dir`` is its folder
    jsonl_file: Path | None = None
    jsonl_columns: tuple[str, str, str] = ("image", "conditioning_image", "text")
    #: kohya's face-centred crop (buckets off; faces named ``<name>_<cx>_<cy>_<w>_<h>``)
    face_crop_aug_range: tuple[float, float] | None = None
    enable_wildcard: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    #: kohya's fine-tuning subset (``metadata_file``/``--in_json``): captions and tags come from this
    #: JSON (:mod:`sdcore.data.metadata`), not from caption files; ``image_dir`` is where its relative keys are
    metadata_file: Path | None = None
    #: how strongly the trained network acts on this subset's samples (kohya's per-dataset
    #: ``network_multiplier``): a method that supports it scales its change by this, per sample
    network_strength: float = 1.0
    #: OneTrainer concepts (:mod:`sdcore.data.onetrainer`): images in sub-folders too (its
    #: ``include_subdirectories``; hidden folders skipped), the image suffixes it reads (``None``: sdcore's),
    #: file stems it never trains on (its ``-masklabel``/``-condlabel`` masks), one caption for every
    #: image (its ``prompt_source`` ``concept``: the lines of one text file) or the file name as the
    #: caption (``filename``), and a per-sample loss weight (its ``loss_weight``)
    recursive: bool = False
    image_suffixes: tuple[str, ...] | None = None
    excluded_stem_suffixes: tuple[str, ...] = ()
    caption_text: str | None = None
    caption_from_filename: bool = False
    #: the file-name caption's rule (:data:`sdcore.data.captions.FILENAME_CAPTION_RULES`): OneTrainer's stem as it
    #: is, or SimpleTuner's (``caption_strategy filename``) with underscores as spaces
    filename_caption_rule: str = "stem"
    #: an image without a caption file is captioned from its file name by this rule (``--filename-captions``,
    #: the dataset TOML's ``filename_captions``; ``none``: off), before the class tokens; unlike
    #: ``caption_from_filename`` a caption file still wins (A1111's Train tab reads ``<stem>.txt`` first)
    filename_captions: str = "none"
    #: with ``filename_captions``: a file-name caption keeps only this regex's matches, joined with
    #: ``filename_join_string`` (A1111's "Filename word regex" / "Filename join string" settings; ``""``: off)
    filename_word_regex: str = ""
    filename_join_string: str = " "
    loss_weight: float = 1.0
    #: OneTrainer's masked training: each image's mask is the file beside it named ``<stem><mask_suffix>``
    #: (its ``-masklabel.png``), greyscale, a missing one weighting the whole image (``None``: no such masks)
    mask_suffix: str | None = None
    #: OneTrainer's custom conditioning images (``--inpainting-conditioning-images``): the file beside each image
    #: named ``<stem><conditioning_suffix>`` (its ``-condlabel.png``) is an inpainting model's masked image as it
    #: is; those files are not training images (``None``: no such images)
    conditioning_suffix: str | None = None
    #: OneTrainer's mask augmentations (:mod:`sdcore.data.mask_augment`; its concept's
    #: ``enable_random_circular_mask_shrink`` / ``enable_random_mask_rotate_crop``, kohya-style TOML keys
    #: ``mask_shrink`` / ``mask_rotate_crop``): on samples with a dataset mask, or every sample of an inpainting
    #: model; ``mask_crop_min_size`` the rotated crop's smallest side (None: the subset's lowest resolution)
    mask_shrink: bool = False
    mask_rotate_crop: bool = False
    mask_crop_min_size: int | None = None
    #: ai-toolkit datasets (:mod:`sdcore.train.aitoolkit`): ``[trigger]``/``[name]`` in captions become this
    #: word and a training caption without it gets it in front (``None``: not an ai-toolkit dataset)
    trigger_word: str | None = None

    @property
    def bucket_resolution(self) -> Resolution:
        """What the buckets are built around: ``resolution_size`` where kohya gave ``(w, h)``, else the side.
        The pair counts only while ``resolution`` is still its side: a reader that sets its own ``resolution`` on
        a subset built from the run's defaults (ai-toolkit, SimpleTuner, a TOML's own value) replaces it."""
        return _size_of_side(self.resolution_size, self.resolution) or self.resolution


@dataclass(frozen=True)
class ImageEntry:
    """One usable image. ``caption`` is the raw caption (file, else class tokens, else ``""``;
    the subset's ``caption_prefix``/``caption_suffix`` are NOT applied: the runtime adds them
    before caption processing, as kohya does); ``size`` is (w, h) after EXIF rotation."""

    path: Path
    caption: str
    repeats: int
    is_class: bool
    size: tuple[int, int]
    subset: SubsetOptions
    #: the ``tags`` of a metadata-file entry as kohya counts them for ``ss_tag_frequency`` (else ``None``)
    tags: str | None = None
    #: this image's own control image (a JSONL row's); ``None``: the subset's ``control_dir`` pairs by stem
    control_path: Path | None = None
    #: captions to draw one from at each use (an imagefolder ``metadata.jsonl`` row's list, as diffusers'
    #: text_to_image scripts draw); ``caption`` is the first. Empty: ``caption`` alone
    captions: tuple[str, ...] = ()

    @property
    def written_caption(self) -> str:
        """The caption with its subset's ``caption_prefix``/``caption_suffix``: every word training can see
        before shuffling, dropout and the method's template (what a method's dataset check searches)."""
        from .captions import join_affixes

        s = self.subset
        return join_affixes(self.caption, getattr(s, "caption_prefix", ""), getattr(s, "caption_suffix", ""))


@dataclass(frozen=True)
class SkippedFile:
    """A file (or folder) the index did not use, and why."""

    path: Path
    reason: str


@dataclass
class DatasetIndex:
    """The usable images plus everything that was wrong with the dataset."""

    entries: list[ImageEntry] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)
    empty_captions: list[Path] = field(default_factory=list)
    #: images without a caption file whose caption came from the folder's class tokens
    class_token_captions: list[Path] = field(default_factory=list)
    #: caption-like files (``.txt``, ``.caption``) no image of their folder reads: listed, not a problem (an
    #: image renamed away from its caption is listed already as uncaptioned; a prompt list or notes file is
    #: harmless, and kohya ignores both)
    unused_captions: list[Path] = field(default_factory=list)
    #: images without a caption file captioned from their file names (``filename_captions``)
    filename_captions: list[Path] = field(default_factory=list)
    subsets: list[SubsetOptions] = field(default_factory=list)
    source: Path | None = None
    #: files the training method claimed (e.g. DreamArtist attention maps): kept out of ``entries``
    auxiliary_files: list[Path] = field(default_factory=list)
    #: what makes the dataset unusable for training (a metadata file's missing images, bad entries):
    #: :func:`build_dataset_index` raises them all at once (:class:`DatasetProblems`)
    problems: list[str] = field(default_factory=list)
    #: images expanded to one entry per resolution (:func:`sdcore.data.resolutions.expand_resolutions`):
    #: the epoch plan trains one entry of each group (``ResolutionGroup``), empty otherwise
    resolution_groups: list[ResolutionGroup] = field(default_factory=list)

    def claim_method_files(self, auxiliary: Callable[[Path], bool]) -> None:
        """Move the images ``auxiliary(path)`` claims (a training method's own files, e.g. DreamArtist's
        ``<image>_att.png`` attention maps) from ``entries`` to ``auxiliary_files``, and out of the caption lists:
        those describe training images. One rule for the run (:func:`sdcore.train.data.drop_method_files`) and
        ``sdcore data check --method``, so both count the same images."""
        claimed = [entry.path for entry in self.entries if auxiliary(entry.path)]
        self.auxiliary_files = claimed
        gone = set(claimed)
        self.entries = [entry for entry in self.entries if entry.path not in gone]
        for listed in (self.missing_captions, self.empty_captions, self.class_token_captions, self.filename_captions):
            listed[:] = [path for path in listed if path not in gone]

    @property
    def instance_entries(self) -> list[ImageEntry]:
        return [e for e in self.entries if not e.is_class]

    @property
    def class_entries(self) -> list[ImageEntry]:
        return [e for e in self.entries if e.is_class]

    @property
    def samples_per_epoch(self) -> int:
        """Images with repeats expanded (instance and class images)."""
        return sum(e.repeats for e in self.entries)

    def summary(self) -> str:
        """A few lines for the start of a run: counts and every category of problem."""
        # an image at several resolutions counts once (its other entries are the same file)
        extra = {i for g in self.resolution_groups for i in g.entries[1:]}
        images = [e for i, e in enumerate(self.entries) if i not in extra]
        instance = [e for e in images if not e.is_class]
        klass = [e for e in images if e.is_class]
        lines = [
            f"dataset {self.source or ''}".rstrip() + ":",
            f"  {len(instance)} training images ({sum(e.repeats for e in instance)} with repeats)"
            + (f", {len(klass)} class images ({sum(e.repeats for e in klass)} with repeats)" if klass else ""),
        ]
        if self.resolution_groups:
            sizes = sorted({size for g in self.resolution_groups for size in g.sizes})
            lines.append(
                f"  {len(self.resolution_groups)} of them train at one of {', '.join(map(str, sizes))} each epoch "
                "(drawn per image; one bucket and cached latent per image and resolution)"
            )
        strengths = {id(e.subset): e.subset for e in self.entries if e.subset.network_strength != 1.0}
        if strengths:
            listed = ", ".join(f"{s.image_dir.name} {s.network_strength:+g}" for s in strengths.values())
            lines.append(f"  network_multiplier (per sample): {listed}; every other folder 1")
        if self.auxiliary_files:
            lines.append(
                f"  {len(self.auxiliary_files)} method files (e.g. attention maps) used alongside, not trained on"
            )
        if self.filename_captions:
            named = set(self.filename_captions)
            rules = sorted({getattr(e.subset, "filename_captions", "none") for e in self.entries if e.path in named})
            lines.append(
                f"  {len(self.filename_captions)} without caption file: captioned from their file names "
                f"(--filename-captions {', '.join(rules)})"
            )
        if self.class_token_captions:
            lines.append(f"  {len(self.class_token_captions)} without caption file: captioned with class tokens")
        if self.missing_captions:
            lines.append(
                f"  {len(self.missing_captions)} without caption file and no class tokens: trained uncaptioned"
            )
        if self.empty_captions:
            lines.append(f"  {len(self.empty_captions)} with an empty caption file")
        if self.unused_captions:
            shown = ", ".join(p.name for p in self.unused_captions[:5])
            more = f" and {len(self.unused_captions) - 5} more" if len(self.unused_captions) > 5 else ""
            lines.append(f"  {len(self.unused_captions)} caption files no image reads (not used): {shown}{more}")
        if self.skipped:
            lines.append(f"  {len(self.skipped)} files skipped:")
            for item in self.skipped[:20]:
                lines.append(f"    {item.path}: {item.reason}")
            if len(self.skipped) > 20:
                lines.append(f"    ... and {len(self.skipped) - 20} more (run `sdcore data check` for all)")
        return "\n".join(lines)


class DatasetProblems(DataError):
    """Several things make the dataset unusable (e.g. a metadata file's missing images); ``problems``
    holds one line each, so the pre-flight reports them with everything else."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------------------------
# subsets from folders


def subset_defaults(options: TrainOptions | None) -> dict[str, Any]:
    """The :class:`SubsetOptions` field values implied by the run's options."""
    if options is None:
        from ..train.options import TrainOptions

        options = TrainOptions()
    return {
        "caption_extension": options.caption_extension,
        "caption_fallback": options.caption_fallback,
        "filename_captions": options.filename_captions,
        "filename_word_regex": options.filename_word_regex,
        "filename_join_string": options.filename_join_string,
        "keep_tokens": options.keep_tokens,
        "shuffle_caption": options.shuffle_caption,
        "caption_dropout": options.caption_dropout,
        "tag_dropout": options.tag_dropout,
        "caption_dropout_every_n_epochs": options.caption_dropout_every_n_epochs,
        "caption_prefix": options.caption_prefix,
        "caption_suffix": options.caption_suffix,
        "secondary_separator": options.secondary_separator,
        "caption_separator": options.caption_separator,
        "keep_tokens_separator": options.keep_tokens_separator,
        "enable_wildcard": options.enable_wildcard,
        "token_warmup_min": options.token_warmup_min,
        "token_warmup_step": options.token_warmup_step,
        "flip": options.flip,
        "color_aug": options.color_aug,
        "random_crop": options.random_crop,
        "mask_shrink": options.mask_shrink,
        "mask_rotate_crop": options.mask_rotate_crop,
        "resize_interpolation": options.resize_interpolation,
        "alpha_mask": options.alpha_mask,
        "mask_kind": options.mask_kind,
        "conditioning_data_dir": Path(options.conditioning_data_dir).expanduser()
        if options.conditioning_data_dir
        else None,
        "control_dir": Path(options.control_dir).expanduser() if options.control_dir else None,
        "conditioning_suffix": CONDITIONING_SUFFIX if options.inpainting_conditioning_images else None,
        "face_crop_aug_range": _face_range_or_none(options.face_crop_aug_range),
        # 0 (the model's size) is resolved by the runtime first; with --resolutions the largest
        "resolution": options.resolution or max(_run_resolutions(options), default=512),
        "resolutions": _run_resolutions(options),
        "resolution_size": _run_resolution_size(options),
        "buckets": options.buckets,
        "bucket_rule": options.bucket_rule,
        "min_bucket_reso": options.min_bucket_reso,
        "max_bucket_reso": options.max_bucket_reso,
        "bucket_step": options.bucket_step,
        "bucket_no_upscale": options.bucket_no_upscale,
        "validation_split": options.validation_split,
        "validation_seed": options.validation_seed,
    }


def _run_resolutions(options: TrainOptions) -> tuple[int, ...]:
    """The run's ``--resolutions`` (a bad value is a pre-flight problem, reported there)."""
    from .resolutions import parse_resolutions

    try:
        return parse_resolutions(getattr(options, "resolutions", ""))
    except ConfigError:
        return ()


def run_resolution_pair(options: TrainOptions) -> tuple[int, int]:
    """The run's resolution as ``(width, height)``: kohya's ``--resolution W,H`` as given (what kohya records as
    ``ss_resolution`` and ``modelspec.resolution``), else ``(resolution, resolution)``."""
    size = _run_resolution_size(options)
    return size if size is not None else (options.resolution, options.resolution)


def _run_resolution_size(options: TrainOptions) -> tuple[int, int] | None:
    """The run's kohya ``(w, h)`` (``--resolution 768,512``), where its ``resolution`` is still that pair's side
    (the Python API may replace ``resolution`` alone: the side then wins) and no ``--resolutions`` list is given."""
    if _run_resolutions(options):
        return None
    return _size_of_side(getattr(options, "resolution_size", None), options.resolution)


def _size_of_side(size: Any, side: int) -> tuple[int, int] | None:
    """``size`` as ``(w, h)`` where ``side`` is still its side ``isqrt(w * h)``, else ``None`` (``side`` was set
    on its own since: it wins)."""
    if size is None:
        return None
    width, height = (int(v) for v in size)
    return (width, height) if side == area_side((width, height)) else None


def _face_range_or_none(value: Any) -> tuple[float, float] | None:
    """The run's ``--face-crop-aug-range`` (a bad value is a pre-flight problem, reported there)."""
    from .augment import face_crop_range

    try:
        return face_crop_range(value)
    except ValueError:
        return None


def folder_subsets(
    root: str | os.PathLike[str], *, is_class: bool, defaults: dict[str, Any], skipped: list[SkippedFile] | None = None
) -> list[SubsetOptions]:
    """Subsets of a kohya dataset folder.

    Sub-folders named ``N_tokens`` (or just ``N``, as kohya) become subsets with ``N`` repeats and class tokens
    ``tokens``; images directly inside ``root`` form a subset with 1 repeat (or, when ``root``
    itself is named ``N_tokens``, with its repeats and class tokens). Other sub-folders are
    reported in ``skipped`` (kohya ignores them silently, which hides mistakes).
    """
    root = Path(root)
    subsets: list[SubsetOptions] = []
    has_direct_images = False
    for child in sorted(root.iterdir()):
        if child.is_dir():
            if child.name.startswith("."):
                continue
            params = _kohya_folder_params(child.name)
            if params is None:
                if skipped is not None:
                    skipped.append(
                        SkippedFile(
                            child, "folder name does not start with a number of repeats (10_name, or just 10); ignored"
                        )
                    )
                continue
            repeats, rest = params
            if repeats < 1:
                if skipped is not None:
                    skipped.append(
                        SkippedFile(child, f"folder has {repeats} repeats (kohya reads under 1 as none); ignored")
                    )
                continue
            tokens = rest.strip() or None
            subsets.append(
                SubsetOptions(image_dir=child, repeats=repeats, is_class=is_class, class_tokens=tokens, **defaults)
            )
        elif is_image_path(child):
            has_direct_images = True
    if has_direct_images:
        # Pointing at a concept folder itself (``data/10_sks``) means what its name says.
        own = _FOLDER_RE.match(root.resolve().name)
        repeats = int(own.group(1)) if own and int(own.group(1)) > 0 else 1
        tokens = (own.group(2).strip() or None) if own and int(own.group(1)) > 0 else None
        subsets.insert(
            0, SubsetOptions(image_dir=root, repeats=repeats, is_class=is_class, class_tokens=tokens, **defaults)
        )
    return subsets


# --------------------------------------------------------------------------------------------
# subsets from a kohya dataset TOML

_DATASET_KEYS = {
    "network_multiplier",
    "resolution",
    "batch_size",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "validation_split",
    "validation_seed",
}
_SUBSET_KEYS = {
    "image_dir",
    "num_repeats",
    "class_tokens",
    "caption_extension",
    "caption_extention",  # kohya keeps the old misspelling
    "filename_captions",  # sdcore's: caption an image without a caption file from its name (--filename-captions)
    "filename_word_regex",  # sdcore's: the words kept of such a caption (--filename-word-regex, A1111's setting)
    "filename_join_string",  # sdcore's: what joins them (--filename-join-string)
    "is_reg",
    "shuffle_caption",
    "keep_tokens",
    "keep_tokens_separator",
    "flip_aug",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "caption_prefix",
    "caption_suffix",
    "secondary_separator",
    "caption_separator",
    "caption_dropout_every_n_epochs",
    "enable_wildcard",
    "token_warmup_min",
    "token_warmup_step",
    "color_aug",
    "random_crop",
    "mask_shrink",
    "mask_rotate_crop",
    "resize_interpolation",
    "alpha_mask",
    "mask_kind",  # sdcore's: how the conditioning_data_dir masks weigh the loss (--mask-kind)
    "conditioning_data_dir",
    "control_directory",  # musubi-tuner's key: FLUX.1 Kontext's control images (sdcore.train.kontext_data)
    "face_crop_aug_range",
    "metadata_file",
    "cache_info",  # kohya's cache of image sizes and captions: loading speed only, read and ignored
}
#: kohya subset keys that belong to one subset only (kohya's schema refuses them in [general] and [[datasets]])
_SUBSET_ONLY_KEYS = {"image_dir", "alpha_mask", "conditioning_data_dir", "control_directory", "metadata_file"}
#: keys of kohya's DreamBooth (caption-file) subsets that its fine-tuning schema refuses in a
#: ``metadata_file`` subset (captions come from the metadata; no class images there); the ones a
#: fine-tuning ``[[datasets]]`` table refuses too are those that are not subset-only
_NOT_FINE_TUNING_KEYS = {"class_tokens", "caption_extension", "caption_extention", "is_reg", "conditioning_data_dir",
                         "cache_info", "filename_captions", "filename_word_regex",
                         "filename_join_string"}  # fmt: skip
#: kohya keys sdcore recognises but does not implement: an explicit error beats silently ignoring them
_UNSUPPORTED_KEYS = {
    "debug_dataset",
}


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise DataError(f"{path}: dataset config not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read dataset config: {exc.strerror or exc}") from None


def _check_keys(table: Any, allowed: set[str], where: str, path: Path) -> dict[str, Any]:
    """The table, or one error listing every unknown and unsupported key of it (with the nearest key)."""
    import difflib

    if not isinstance(table, dict):
        raise DataError(f"{path}: {where} must be a table")
    problems = []
    for key in table:
        if key in allowed:
            continue
        if key in _UNSUPPORTED_KEYS:
            problems.append(f"kohya key '{key}' is not supported by sdcore")
            continue
        if key in _SUBSET_ONLY_KEYS:
            problems.append(f"'{key}' belongs in a [[datasets.subsets]] table (as in kohya)")
            continue
        if key == "network_multiplier":
            problems.append(f"'{key}' belongs in a [[datasets]] or [general] table (as in kohya)")
            continue
        close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
        problems.append(f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    if problems:
        raise DataError(f"{path}: {where}: " + "; ".join(problems))
    return table


def _typed(value: Any, kind: str, key: str, where: str, path: Path) -> Any:
    bad = DataError(f"{path}: {where}: '{key}' must be {kind}, got {value!r}")
    if kind == "a boolean":
        if not isinstance(value, bool):
            raise bad
    elif kind == "a string":
        if not isinstance(value, str):
            raise bad
    elif kind == "a resize interpolation":
        from ..train.options import RESIZE_INTERPOLATIONS

        if value not in RESIZE_INTERPOLATIONS:
            raise DataError(
                f"{path}: {where}: '{key}' must be one of {', '.join(RESIZE_INTERPOLATIONS)}, got {value!r}"
            )
    elif kind == "a file-name caption rule":
        from ..train.options import FILENAME_CAPTIONS

        if value not in FILENAME_CAPTIONS:
            raise DataError(f"{path}: {where}: '{key}' must be one of {', '.join(FILENAME_CAPTIONS)}, got {value!r}")
    elif kind == "a file-name word regex":
        from .captions import word_regex_problem

        if not isinstance(value, str):
            raise bad
        problem = word_regex_problem(value)
        if problem:
            raise DataError(f"{path}: {where}: '{key}' {value!r}: {problem}")
    elif kind == "a mask kind":
        from ..train.options import MASK_KINDS

        if value not in MASK_KINDS:
            raise DataError(f"{path}: {where}: '{key}' must be one of {', '.join(MASK_KINDS)}, got {value!r}")
    elif kind == "a non-empty string":
        if not isinstance(value, str) or not value:
            raise bad
    elif kind == "a positive integer":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad
    elif kind == "a non-negative integer":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad
    elif kind == "a probability (0..1)":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise bad
        value = float(value)
    elif kind == "a fraction in [0, 1)":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
            raise bad
        value = float(value)
    elif kind == "an integer" and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad
    elif kind == "a non-negative number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < float("inf"):
            raise bad
        value = float(value)
    return value


def _resolution(value: Any, where: str, path: Path) -> tuple[int, tuple[int, int] | None]:
    """kohya accepts ``512`` or ``[w, h]``: ``(side, None)``, or for a non-square ``[w, h]`` ``(isqrt(w*h),
    (w, h))`` (the side where one number is needed, the pair for buckets and crops; ``[w, w]`` is ``w``)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, None
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        width, height = value
        return (width, None) if width == height else (area_side((width, height)), (width, height))
    raise DataError(f"{path}: {where}: 'resolution' must be a positive integer or [width, height], got {value!r}")


def _network_multiplier(value: Any, where: str, path: Path) -> float:
    """kohya's per-dataset ``network_multiplier`` (``[[datasets]]`` or ``[general]``): any finite number.

    kohya (v0.8.2 to v0.9.1) puts it on every sample of the dataset and sets the network's multiplier
    from it each step, so a "slider" LoRA can learn one dataset at +1 and another at -1. Whether the
    run's method can honour it is the pre-flight's question (:func:`sdcore.train.data.strength_problems`);
    the index only carries it (as ``SubsetOptions.network_strength``).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise DataError(f"{path}: {where}: 'network_multiplier' must be a finite number, got {value!r}")
    return float(value)


_FIELD_OF = {
    "num_repeats": ("repeats", "a positive integer"),
    "class_tokens": ("class_tokens", "a string"),
    "caption_extension": ("caption_extension", "a string"),
    "caption_extention": ("caption_extension", "a string"),
    "filename_captions": ("filename_captions", "a file-name caption rule"),
    "filename_word_regex": ("filename_word_regex", "a file-name word regex"),
    "filename_join_string": ("filename_join_string", "a string"),
    "is_reg": ("is_class", "a boolean"),
    "shuffle_caption": ("shuffle_caption", "a boolean"),
    "keep_tokens": ("keep_tokens", "a non-negative integer"),
    "keep_tokens_separator": ("keep_tokens_separator", "a string"),
    "flip_aug": ("flip", "a boolean"),
    "caption_dropout_rate": ("caption_dropout", "a probability (0..1)"),
    "caption_tag_dropout_rate": ("tag_dropout", "a probability (0..1)"),
    "caption_prefix": ("caption_prefix", "a string"),
    "caption_suffix": ("caption_suffix", "a string"),
    "secondary_separator": ("secondary_separator", "a string"),
    "caption_separator": ("caption_separator", "a non-empty string"),
    "caption_dropout_every_n_epochs": ("caption_dropout_every_n_epochs", "a non-negative integer"),
    "color_aug": ("color_aug", "a boolean"),
    "random_crop": ("random_crop", "a boolean"),
    "mask_shrink": ("mask_shrink", "a boolean"),
    "mask_rotate_crop": ("mask_rotate_crop", "a boolean"),
    "resize_interpolation": ("resize_interpolation", "a resize interpolation"),
    "alpha_mask": ("alpha_mask", "a boolean"),
    "mask_kind": ("mask_kind", "a mask kind"),
    "enable_wildcard": ("enable_wildcard", "a boolean"),
    "token_warmup_min": ("token_warmup_min", "a non-negative integer"),
    "token_warmup_step": ("token_warmup_step", "a non-negative number"),
    "batch_size": ("batch_size", "a positive integer"),
    "enable_bucket": ("buckets", "a boolean"),
    "min_bucket_reso": ("min_bucket_reso", "a positive integer"),
    "max_bucket_reso": ("max_bucket_reso", "a positive integer"),
    "bucket_reso_steps": ("bucket_step", "a positive integer"),
    "bucket_no_upscale": ("bucket_no_upscale", "a boolean"),
    "validation_split": ("validation_split", "a fraction in [0, 1)"),
    "validation_seed": ("validation_seed", "an integer"),
}


def _apply(values: dict[str, Any], table: dict[str, Any], where: str, path: Path) -> dict[str, Any]:
    out = dict(values)
    for key, value in table.items():
        if key in ("subsets", "datasets", "image_dir", "conditioning_data_dir", "control_directory", "metadata_file"):
            continue
        if key == "resolution":
            out["resolution"], out["resolution_size"] = _resolution(value, where, path)
            out["resolutions"] = ()  # the TOML's own (single) resolution replaces --resolutions
            continue
        if key == "network_multiplier":
            out["network_strength"] = _network_multiplier(value, where, path)
            continue
        if key == "face_crop_aug_range":
            from .augment import face_crop_range

            try:
                out["face_crop_aug_range"] = face_crop_range(value)
            except ValueError as exc:
                raise DataError(f"{path}: {where}: {exc}") from None
            continue
        if key == "cache_info":
            _typed(value, "a boolean", key, where, path)
            continue
        name, kind = _FIELD_OF[key]
        out[name] = _typed(value, kind, key, where, path)
    return out


def _resolve_dir(raw: str, config: Path, key: str, where: str) -> Path:
    """Absolute paths as given; relative ones against the config's folder, else the working dir (kohya).

    A TOML written on Windows (``'C:\\train\\img'``) is refused naming the key; a relative path with backslashes
    is read with ``/`` when that exists (:func:`sdcore.windows_paths.check_windows_path`)."""
    checked = check_windows_path(raw, key, (config.parent, Path()))
    if checked.problem:
        raise DataError(f"{config}: {where}: {checked.problem}")
    if checked.note:
        log.warning("%s: %s: %s", config, where, checked.note)
    candidate = Path(checked.value).expanduser()
    if candidate.is_absolute():
        return candidate
    beside = config.parent / candidate
    if beside.exists() or not candidate.exists():
        return beside
    return candidate.resolve()


def load_toml_dataset_config(path: str | os.PathLike[str], defaults: TrainOptions | None = None) -> list[SubsetOptions]:
    """Subsets of a kohya dataset TOML (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``).

    Lower levels override higher ones, and the file overrides ``defaults`` (the run's options);
    ``num_repeats`` falls back to the run's ``dataset_repeats`` (kohya's ``--dataset_repeats``
    reaches every subset of a dataset config that does not set it).
    Unknown keys, kohya keys sdcore does not implement and wrongly typed values raise
    :class:`DataError` naming the key and the file. Relative ``image_dir`` (and ``metadata_file``)
    are resolved against the config file's folder (falling back to the working directory, as kohya
    does). A dataset whose subsets give ``metadata_file`` is kohya's fine-tuning dataset: all its
    subsets must give one, ``image_dir`` is then optional and the caption-file keys are refused, as
    kohya's schema does.
    """
    path = Path(path)
    data = _load_toml(path)
    _check_keys(data, {"general", "datasets"}, "top level", path)
    base = subset_defaults(defaults)
    base["repeats"] = defaults.dataset_repeats if defaults is not None else 1
    general = _check_keys(
        data.get("general", {}), _DATASET_KEYS | (_SUBSET_KEYS - _SUBSET_ONLY_KEYS), "[general]", path
    )
    base = _apply(base, general, "[general]", path)
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise DataError(f"{path}: no [[datasets]] defined")
    subsets: list[SubsetOptions] = []
    for d_index, dataset in enumerate(datasets):
        where = f"datasets[{d_index}]"
        dataset = _check_keys(dataset, _DATASET_KEYS | (_SUBSET_KEYS - _SUBSET_ONLY_KEYS) | {"subsets"}, where, path)
        level = _apply(base, dataset, where, path)
        level["dataset"] = d_index
        level["dataset_config"] = path
        level["dataset_resize_interpolation"] = level.get("resize_interpolation")
        entries = dataset.get("subsets")
        if not isinstance(entries, list) or not entries:
            raise DataError(f"{path}: {where}: no [[datasets.subsets]] defined")
        fine_tuning = _is_fine_tuning(entries, where, path)
        if fine_tuning:
            _refuse_keys(dataset, _NOT_FINE_TUNING_KEYS, where, path)
        seen_metadata: set[Path] = set()
        for s_index, subset in enumerate(entries):
            s_where = f"{where}.subsets[{s_index}]"
            subset = _check_keys(subset, _SUBSET_KEYS, s_where, path)
            if fine_tuning:
                _refuse_keys(subset, _NOT_FINE_TUNING_KEYS, s_where, path)
                values = _apply(level, subset, s_where, path)
                raw_meta = _typed(subset["metadata_file"], "a string", "metadata_file", s_where, path)
                metadata_file = _resolve_dir(raw_meta, path, "metadata_file", s_where)
                if metadata_file.resolve() in seen_metadata:
                    continue  # kohya: a dataset uses a metadata file once (the first subset naming it)
                seen_metadata.add(metadata_file.resolve())
                raw_dir = subset.get("image_dir")
                # without image_dir, relative keys are looked up from the working directory (older kohya)
                image_dir = (
                    _resolve_dir(_typed(raw_dir, "a string", "image_dir", s_where, path), path, "image_dir", s_where)
                    if raw_dir is not None
                    else Path()
                )
                values.update(class_tokens=None, is_class=False, conditioning_data_dir=None)
                values.update(_control_dir(subset, s_where, path))
                subsets.append(SubsetOptions(image_dir=image_dir, metadata_file=metadata_file, **values))
                continue
            if "image_dir" not in subset:
                raise DataError(f"{path}: {s_where}: 'image_dir' is required")
            image_dir = _resolve_dir(
                _typed(subset["image_dir"], "a string", "image_dir", s_where, path), path, "image_dir", s_where
            )
            values = _apply(level, subset, s_where, path)
            if "conditioning_data_dir" in subset:
                raw = _typed(subset["conditioning_data_dir"], "a string", "conditioning_data_dir", s_where, path)
                values["conditioning_data_dir"] = _resolve_dir(raw, path, "conditioning_data_dir", s_where)
            values.update(_control_dir(subset, s_where, path))
            subsets.append(SubsetOptions(image_dir=image_dir, **values))
    return subsets


def _control_dir(subset: dict[str, Any], where: str, path: Path) -> dict[str, Any]:
    """A subset's ``control_directory`` (musubi-tuner's key), resolved like ``image_dir``; else the run's."""
    if "control_directory" not in subset:
        return {}
    raw = _typed(subset["control_directory"], "a string", "control_directory", where, path)
    return {"control_dir": _resolve_dir(raw, path, "control_directory", where)}


def toml_batch_sizes(path: str | os.PathLike[str]) -> list[int | None]:
    """Each ``[[datasets]]``'s ``batch_size`` in a kohya dataset TOML (else ``[general]``'s, else ``None``:
    the run's ``--train_batch_size``, as kohya falls back); ``[]`` for a file that is not one.

    kohya batches every dataset with its own size, and so does sdcore's sampler (from each subset's
    ``batch_size``); :func:`sdcore.train.config.load_options` makes a value every dataset shares the run's,
    so that what reads the run's batch size sees it. Unreadable files give ``[]`` here: the pre-flight
    reports them.
    """
    try:
        data = _load_toml(Path(path))
    except DataError:
        return []
    general = data.get("general")
    fallback = general.get("batch_size") if isinstance(general, dict) else None
    datasets = data.get("datasets")
    if not isinstance(datasets, list):
        return []
    sizes: list[int | None] = []
    for dataset in datasets:
        value = dataset.get("batch_size", fallback) if isinstance(dataset, dict) else fallback
        sizes.append(value if isinstance(value, int) and not isinstance(value, bool) else None)
    return sizes


def _is_fine_tuning(entries: list[Any], where: str, path: Path) -> bool:
    """Whether a ``[[datasets]]`` is kohya's fine-tuning kind (every subset has ``metadata_file``)."""
    with_metadata = [isinstance(e, dict) and "metadata_file" in e for e in entries]
    if any(with_metadata) and not all(with_metadata):
        raise DataError(
            f"{path}: {where}: subsets with metadata_file and subsets without it cannot be mixed in one "
            "[[datasets]] (as in kohya); put them in separate [[datasets]] tables"
        )
    return all(with_metadata)


def _refuse_keys(table: dict[str, Any], keys: set[str], where: str, path: Path) -> None:
    found = sorted(k for k in table if k in keys)
    if found:
        raise DataError(
            f"{path}: {where}: {', '.join(repr(k) for k in found)}: not used by a metadata_file subset "
            "(captions and tags come from the metadata file; kohya's fine-tuning schema refuses these keys)"
        )


# --------------------------------------------------------------------------------------------
# scanning


def _probe_all(paths: list[Path], verify: bool) -> list[tuple[int, int] | ImageError]:
    """Sizes (or the error) of ``paths``, in order; threads overlap file I/O and decoding (PIL
    releases the GIL while decoding)."""
    check = verify_image if verify else probe_image

    def one(path: Path) -> tuple[int, int] | ImageError:
        try:
            return check(path)
        except ImageError as exc:
            return exc

    if len(paths) < 16:
        return [one(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, paths))


def _usable_sizes(
    subset: SubsetOptions, paths: list[Path], index: DatasetIndex, verify: bool
) -> Iterator[tuple[int, tuple[int, int]]]:
    """The position in ``paths`` and size of each readable image; unreadable and too-small ones go
    to the index's skipped list (shared by folder and metadata-file subsets, so both skip alike)."""
    for position, (path, size) in enumerate(zip(paths, _probe_all(paths, verify), strict=True)):
        if isinstance(size, ImageError):
            index.skipped.append(SkippedFile(path, _reason(size, path)))
            continue
        small = _too_small(subset, size)
        if small:
            index.skipped.append(SkippedFile(path, small))
            continue
        yield position, size


def _too_small(subset: SubsetOptions, size: tuple[int, int]) -> str | None:
    """Why an image is skipped under ``bucket_no_upscale`` (a side of its bucket would be under one
    bucket step, at any of the subset's resolutions: a long thin image shrunk to the area too), else
    ``None``."""
    if not subset.bucket_no_upscale:
        return None
    if min(size) < subset.bucket_step:
        return f"{size[0]}x{size[1]} is smaller than the bucket step {subset.bucket_step} (no-upscale)"
    resolutions: tuple[Resolution, ...] = tuple(subset.resolutions) or (subset.bucket_resolution,)
    for resolution in resolutions:
        width, height = resolution_pair(resolution)
        if width <= 0:
            continue
        try:
            assign_bucket(size, (), no_upscale=True, resolution=resolution, step=subset.bucket_step)
        except ImageTooSmallError:
            return (
                f"{size[0]}x{size[1]} shrunk to the area of {width}x{height} is under the bucket step "
                f"{subset.bucket_step} on a side (no-upscale)"
            )
    return None


def _scan_metadata_subset(subset: SubsetOptions, index: DatasetIndex, *, verify: bool) -> None:
    """Entries of a kohya fine-tuning subset: the images its metadata file lists, captioned from it.

    A listed image that is not there is a problem (kohya stops on it too); an unreadable one is
    skipped and counted as elsewhere; images in ``image_dir`` the file does not list are reported
    as skipped (kohya ignores them silently); a file with no entry is skipped as kohya skips it.
    """
    from .metadata import metadata_records, missing_hint, resolve_image

    assert subset.metadata_file is not None
    meta = subset.metadata_file
    try:
        records, problems = metadata_records(
            meta, enable_wildcard=subset.enable_wildcard, separator=subset.caption_separator
        )
    except DataError as exc:
        index.problems.append(str(exc))
        return
    index.problems.extend(problems)
    given_dir = subset.image_dir if subset.image_dir != Path() else None
    if given_dir is not None and not given_dir.is_dir():
        index.problems.append(f"{meta}: image folder {given_dir} does not exist")
        return
    if not records and not problems:
        index.skipped.append(SkippedFile(meta, "metadata file lists no image; subset ignored (as kohya)"))
        return
    found: list[tuple[Path, Any]] = []
    missing: list[str] = []
    for record in records:
        image = resolve_image(record.key, given_dir)
        if image is None:
            missing.append(record.key)
        else:
            found.append((image, record))
    if missing:
        where = f"in {given_dir}" if given_dir is not None else "(relative keys: from the working directory)"
        shown = ", ".join(f"{key!r}{missing_hint(key, given_dir)}" for key in missing[:10])
        shown += f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        index.problems.append(f"{meta}: {len(missing)} listed image(s) not found {where}: {shown}")
    paths = [image for image, _ in found]
    for position, size in _usable_sizes(subset, paths, index, verify):
        path, record = found[position]
        if record.caption == "":
            index.empty_captions.append(path)
        index.entries.append(
            ImageEntry(
                path=path,
                caption=record.caption,
                repeats=subset.repeats,
                is_class=False,
                size=size,
                subset=subset,
                tags=record.tags,
            )
        )
    if given_dir is not None:
        listed = {p.resolve() for p in paths}
        for child in sorted(given_dir.iterdir()):
            if is_image_path(child) and not child.name.startswith(".") and child.resolve() not in listed:
                index.skipped.append(SkippedFile(child, f"not listed in {meta.name}: not trained (as kohya)"))


def _scan_jsonl_subset(subset: SubsetOptions, index: DatasetIndex, *, verify: bool) -> None:
    """Entries of a diffusers JSONL (:mod:`sdcore.data.jsonl`): each usable row's image with its control image and
    caption; bad rows are problems (all at once, before any model loads), unreadable images skipped and counted as
    in a folder."""
    from .jsonl import jsonl_rows

    assert subset.jsonl_file is not None
    try:
        rows, problems = jsonl_rows(subset.jsonl_file, subset.jsonl_columns)
    except DataError as exc:
        index.problems.append(str(exc))
        return
    index.problems.extend(problems)
    for position, size in _usable_sizes(subset, [row.image for row in rows], index, verify):
        row = rows[position]
        if row.caption == "":
            index.empty_captions.append(row.image)
        index.entries.append(
            ImageEntry(
                path=row.image,
                caption=row.caption,
                repeats=subset.repeats,
                is_class=subset.is_class,
                size=size,
                subset=subset,
                control_path=row.control,
                captions=row.captions,
            )
        )


def filename_word_regex_problem(pattern: str) -> str | None:
    """``--filename-word-regex``'s problem, one wording wherever it is found (the run's options, its dataset)."""
    from .captions import word_regex_problem

    problem = word_regex_problem(pattern)
    return f"--filename-word-regex {pattern!r}: {problem}" if problem else None


def _scan_subset(subset: SubsetOptions, index: DatasetIndex, *, verify: bool, roots: set[Path]) -> None:
    if subset.metadata_file is not None:
        _scan_metadata_subset(subset, index, verify=verify)
        return
    if subset.jsonl_file is not None:
        _scan_jsonl_subset(subset, index, verify=verify)
        return
    directory = subset.image_dir
    if not directory.is_dir():
        index.skipped.append(SkippedFile(directory, "image folder does not exist"))
        return
    if subset.filename_captions != "none" and (problem := filename_word_regex_problem(subset.filename_word_regex)):
        if problem not in index.problems:  # one line for every subset that inherits --filename-word-regex
            index.problems.append(problem)
        return
    try:
        children = sorted(directory.iterdir())
    except OSError as exc:
        index.skipped.append(SkippedFile(directory, f"cannot list folder: {exc.strerror or exc}"))
        return
    images: list[Path] = []
    caption_files: list[Path] = []  # caption-like files, to list those no image reads
    pending = list(children)
    walked = {directory.resolve()}  # a linked folder is read once: a link to a parent would loop for ever
    while pending:
        path = pending.pop(0)
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if subset.recursive:
                if path.resolve() in walked:
                    index.skipped.append(SkippedFile(path, "folder already read (a link to a folder read before)"))
                    continue
                walked.add(path.resolve())
                try:
                    pending.extend(sorted(path.iterdir()))
                except OSError as exc:
                    index.skipped.append(SkippedFile(path, f"cannot list folder: {exc.strerror or exc}"))
                continue
            # the children of a kohya root were judged by folder_subsets already
            if directory not in roots:
                index.skipped.append(
                    SkippedFile(path, "sub-folder not scanned (images must sit directly in the folder)")
                )
            continue
        suffixes = subset.image_suffixes
        if not (is_image_path(path) if suffixes is None else path.suffix.lower() in suffixes):
            if path.suffix.lower() in {*CAPTION_EXTENSIONS, _normalise_extension(subset.caption_extension).lower()}:
                caption_files.append(path)
            if (
                path.suffix.lower() not in _SIDECAR_SUFFIXES
                and path.suffix.lower() != subset.caption_extension.lower()
                and not _OWN_CACHE_RE.match(path.name)
            ):
                index.skipped.append(SkippedFile(path, f"not an image (suffix '{path.suffix}')"))
            continue
        if subset.excluded_stem_suffixes and path.stem.endswith(subset.excluded_stem_suffixes):
            continue  # a mask beside its image, not a training image
        if subset.conditioning_suffix is not None and path.stem.endswith(Path(subset.conditioning_suffix).stem):
            continue  # a conditioning image (OneTrainer skips every '-condlabel' stem, whatever its suffix)
        images.append(path)
    images.sort()
    if not subset.caption_from_filename and subset.caption_text is None:
        index.unused_captions.extend(
            _unused_captions(caption_files, images, subset.caption_extension, fallback=subset.caption_fallback)
        )
    for position, size in _usable_sizes(subset, images, index, verify):
        path = images[position]
        try:
            if subset.caption_from_filename:
                caption: str | None = filename_caption(path, subset.filename_caption_rule)
            elif subset.caption_text is not None:
                caption = subset.caption_text
            else:
                caption = read_caption(
                    path, subset.caption_extension, all_lines=subset.enable_wildcard, fallback=subset.caption_fallback
                )
        except DataError as exc:
            index.skipped.append(SkippedFile(path, _reason(exc, path)))
            continue
        if caption is None and subset.filename_captions != "none":  # a caption file always wins
            named = filename_caption(
                path,
                subset.filename_captions,
                word_regex=subset.filename_word_regex,
                join_string=subset.filename_join_string,
            )
            if named.strip():  # a name of numbers only gives nothing: the class tokens, or uncaptioned
                index.filename_captions.append(path)
                caption = named
        if caption is None:
            if subset.class_tokens:
                index.class_token_captions.append(path)
                caption = subset.class_tokens
            else:
                index.missing_captions.append(path)
                caption = ""
        elif caption == "":
            index.empty_captions.append(path)
            caption = subset.class_tokens or ""
        if subset.trigger_word is not None:
            from ..train.aitoolkit import inject_trigger

            caption = inject_trigger(caption, subset.trigger_word, add_if_not_present=not subset.is_class)
        index.entries.append(
            ImageEntry(
                path=path, caption=caption, repeats=subset.repeats, is_class=subset.is_class, size=size, subset=subset
            )
        )


def _unused_captions(
    caption_files: list[Path], images: list[Path], extension: str, *, fallback: bool = True
) -> list[Path]:
    """Caption files no image of the folder reads (its image renamed, deleted or of a type not read, or a
    text file that is no caption: a prompt list, notes).

    kohya ignores them silently; listing them shows a caption that trains nothing. An image that turns
    out unreadable still owns its caption (the image itself is listed). On a file system that ignores
    case (Windows, macOS) ``A.TXT`` is the caption ``A.png`` reads as ``A.txt``."""
    read = {candidate for image in images for candidate in caption_path_candidates(image, extension, fallback=fallback)}
    by_name = {(c.parent, c.name.lower()): c for c in read}
    unused = []
    for path in sorted(caption_files):
        if path in read:
            continue
        twin = by_name.get((path.parent, path.name.lower()))
        if twin is not None and _same_file(twin, path):
            continue
        unused.append(path)
    return unused


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _reason(exc: Exception, path: Path) -> str:
    """The error text without the leading ``<path>: `` (the report shows the path already)."""
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _subsets_for(
    source: Path, *, is_class: bool, defaults: dict[str, Any], options: TrainOptions | None, skipped: list[SkippedFile]
) -> list[SubsetOptions]:
    if not source.exists():
        raise DataError(f"{source}: dataset path does not exist")
    if options is not None and options.metadata_file and not is_class:
        if not source.is_dir():
            raise DataError(
                f"--metadata-file {options.metadata_file}: --data must be the image folder its keys are in, "
                f"not {source} (in a dataset TOML, give metadata_file in the [[datasets.subsets]] table)"
            )
        metadata_file = Path(options.metadata_file).expanduser()
        values = {**defaults, "class_tokens": None, "conditioning_data_dir": None}
        return [SubsetOptions(image_dir=source, repeats=options.dataset_repeats, metadata_file=metadata_file, **values)]
    if source.is_file() and source.suffix.lower() == ".jsonl":  # diffusers' --jsonl_for_train
        columns = (
            (options.image_column, options.conditioning_image_column, options.caption_column)
            if options is not None
            else ("image", "conditioning_image", "text")
        )
        if options is not None and options.control_dir:
            raise DataError(
                f"--control-dir with the JSONL dataset {source}: each row names its control image "
                f"(--conditioning-image-column {options.conditioning_image_column!r}); drop --control-dir"
            )
        values = {**defaults, "control_dir": None, "class_tokens": None}
        repeats = options.dataset_repeats if options is not None else 1
        subset = SubsetOptions(image_dir=source.parent, repeats=repeats, jsonl_file=source, jsonl_columns=columns,
                               is_class=is_class, **values)  # fmt: skip
        return [subset]
    if source.is_file():
        from ..train import simpletuner_config
        from ..train.aitoolkit import is_job_file, load_datasets
        from ..train.diffusers_script import is_command_file
        from ..train.diffusers_script import load_datasets as load_command_datasets

        if is_job_file(source):
            subsets = load_datasets(source, options, skipped)
        elif simpletuner_config.is_config_file(source):  # its data_backend_config
            subsets = simpletuner_config.load_datasets(source, options, skipped)
        elif is_command_file(source):  # a diffusers example-script command (sdcore.train.diffusers_script)
            subsets = load_command_datasets(source, options)
        elif source.suffix.lower() == ".json":
            from .onetrainer import load_concepts

            subsets = load_concepts(source, options, skipped)
        elif source.suffix.lower() != ".toml":
            raise DataError(
                f"{source}: a dataset is a folder, a .toml dataset config, a OneTrainer concepts .json, an "
                "ai-toolkit job or a diffusers .jsonl"
            )
        else:
            subsets = load_toml_dataset_config(source, options)
        if is_class:
            subsets = [replace(s, is_class=True) for s in subsets]
        return subsets
    return folder_subsets(source, is_class=is_class, defaults=defaults, skipped=skipped)


def scan_dataset(options: TrainOptions, *, verify: bool = True) -> DatasetIndex:
    """Build the index without judging it (used by ``sdcore data check``, which reports an empty dataset)."""
    if not options.data:
        raise DataError("no dataset given (--data: a folder, a .toml dataset config or a OneTrainer concepts .json)")
    source = Path(options.data).expanduser()
    defaults = subset_defaults(options)
    index = DatasetIndex(source=source)
    index.subsets = _subsets_for(source, is_class=False, defaults=defaults, options=options, skipped=index.skipped)
    if options.reg_data:
        reg = Path(options.reg_data).expanduser()
        extra = _subsets_for(reg, is_class=True, defaults=defaults, options=options, skipped=index.skipped)
        index.subsets += [replace(s, run_class=True) for s in extra]
    roots = {p for p in (source, Path(options.reg_data).expanduser() if options.reg_data else None) if p and p.is_dir()}
    for subset in index.subsets:
        # a dataset TOML's own no-upscale would be ignored by OneTrainer's buckets (the run's flag is a pre-flight
        # problem, bucket_rule_problems); said once per subset, before kohya's no-upscale skips any image
        if subset.buckets and subset.bucket_no_upscale and getattr(subset, "bucket_rule", "kohya") == "onetrainer":
            index.problems.append(
                f"{subset.image_dir}: bucket_no_upscale is kohya's; OneTrainer's buckets (--bucket-rule onetrainer) "
                "always scale an image to cover its bucket: leave one of them out"
            )
    for subset in index.subsets:
        _scan_subset(subset, index, verify=verify, roots=roots)
    from ..train.aitoolkit import is_job_file
    from ..train.simpletuner_config import is_config_file

    onetrainer = source.suffix.lower() == ".json" and source.is_file()
    if onetrainer and not is_job_file(source) and not is_config_file(source):
        from .onetrainer import caption_problems

        index.problems.extend(caption_problems(index))
    return index


def build_dataset_index(options: TrainOptions, *, verify: bool = True) -> DatasetIndex:
    """Index ``options.data`` (and ``options.reg_data`` as class images).

    ``verify`` checks each image's data is complete (cheap: PNG chunk CRCs, 1/8-scale JPEG
    decode), so a truncated download is skipped up front instead of failing mid-run. Raises
    :class:`DataError` when the dataset is missing or has no usable training image.
    """
    index = scan_dataset(options, verify=verify)
    if index.problems:
        raise DatasetProblems(index.problems)
    if not index.instance_entries:
        where = options.data
        detail = (
            f" ({len(index.skipped)} files skipped: {index.skipped[0].path}: {index.skipped[0].reason} ...)"
            if index.skipped
            else ""
        )
        raise DataError(f"{where}: no usable training images found{detail}")
    return index


# --------------------------------------------------------------------------------------------
# buckets for an index


def assign_buckets(index: DatasetIndex) -> list[BucketAssignment]:
    """One :class:`BucketAssignment` per entry of ``index`` (same order), using each entry's
    subset settings (bucket rule, resolution, bucket sides and step, no-upscale, buckets on/off)."""
    cache: dict[tuple[str, Resolution, int, int, int], list[tuple[int, int]]] = {}
    out: list[BucketAssignment] = []
    for entry in index.entries:
        s = entry.subset
        resolution = s.bucket_resolution
        rule = getattr(s, "bucket_rule", "kohya")
        if not s.buckets:
            out.append(square_assignment(entry.size, resolution, rule=rule))
            continue
        key = (rule, resolution, s.min_bucket_reso, s.max_bucket_reso, s.bucket_step)
        if key not in cache:
            cache[key] = (
                onetrainer_buckets(resolution, s.bucket_step)
                if rule == "onetrainer"
                else make_buckets(
                    resolution, min_reso=s.min_bucket_reso, max_reso=s.max_bucket_reso, step=s.bucket_step
                )
            )
        if rule == "onetrainer":
            out.append(assign_onetrainer_bucket(entry.size, cache[key]))
            continue
        out.append(
            assign_bucket(
                entry.size, cache[key], no_upscale=s.bucket_no_upscale, resolution=resolution, step=s.bucket_step
            )
        )
    return out


__all__ = [
    "CONDITIONING_SUFFIX",
    "DatasetIndex",
    "DatasetProblems",
    "ImageEntry",
    "SkippedFile",
    "SubsetOptions",
    "assign_buckets",
    "build_dataset_index",
    "folder_subsets",
    "load_toml_dataset_config",
    "run_resolution_pair",
    "scan_dataset",
    "subset_defaults",
    "toml_batch_sizes",
]

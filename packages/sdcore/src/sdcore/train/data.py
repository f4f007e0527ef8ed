"""The runtime's view of a dataset: epoch plans of micro-batches and per-sample randomness.

A *sample* is one use of one image in one epoch: ``(entry index, occurrence)`` where occurrence
counts the repeats of that image within the epoch. Every random choice about a sample (flip,
caption variant, noise, timestep, VAE posterior draw) is seeded from ``(seed, epoch, entry,
occurrence)`` alone. Batching, gradient accumulation, the number of processes and resuming
therefore never change what a sample looks like. The one per-batch draw, ``--masked-loss-probability``
(SimpleTuner's, once per loss call), is seeded by the micro-batch's first sample: resuming keeps it, another
batch size or process count makes other batches and so other draws.
"""

from __future__ import annotations

import math
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .noise import sample_seed

if TYPE_CHECKING:
    from ..data.augment import ColorAug
    from ..data.buckets import BucketAssignment
    from ..data.dataset import DatasetIndex, ImageEntry
    from ..data.mask_augment import MaskGeometry
    from .method import TrainingMethod
    from .options import TrainOptions


@dataclass(frozen=True)
class SampleRef:
    """One use of an image: ``entry`` indexes ``index.entries``; ``occurrence`` counts repeats."""

    entry: int
    occurrence: int
    epoch: int

    def seed(self, base_seed: int, purpose: str) -> int:
        return sample_seed(base_seed, purpose, self.epoch, self.entry, self.occurrence)

    def rng(self, base_seed: int, purpose: str) -> random.Random:
        return random.Random(self.seed(base_seed, purpose))


@dataclass(frozen=True)
class SampleView:
    """How one sample's pixels look: mirrored, where it is cropped (``(left, top)`` in the resized
    image; None = the bucket's centre crop) and its colour augmentation. Hashable: it keys prefetches
    and masks."""

    flip: bool
    crop: tuple[int, int] | None = None
    color: ColorAug | None = None
    #: ``face_crop_aug_range``: the size the image is resized to first (None: the bucket's)
    resized: tuple[int, int] | None = None
    #: OneTrainer's mask augmentation (:mod:`sdcore.data.mask_augment`): the sample's shrunk mask and the
    #: rotation and crop its images get before the resize (``resized``/``crop`` are then the crop's)
    augment: MaskGeometry | None = None

    def apply(self, assignment: BucketAssignment) -> BucketAssignment:
        """``assignment`` with this view's resize and crop (the same object when it has neither)."""
        if self.crop is None and self.resized is None and self.augment is None:
            return assignment
        import dataclasses

        return dataclasses.replace(
            assignment,
            resized=self.resized or assignment.resized,
            crop=self.crop if self.crop is not None else assignment.crop,
            augment=self.augment,
        )


class TrainData:
    """Index + bucket assignments + sampler, sharded for this process."""

    def __init__(
        self,
        index: DatasetIndex,
        assignments: list[BucketAssignment],
        *,
        batch_size: int,
        seed: int,
        balance_class: bool = False,
        rank: int = 0,
        world_size: int = 1,
        held_out: frozenset[int] = frozenset(),
        resolution_draw: str = "epoch",
    ) -> None:
        from ..data.sampler import BucketBatchSampler

        self.index = index
        self.entries: list[ImageEntry] = index.entries
        self.assignments = assignments
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        #: entries held out for the validation loss (:mod:`.validation`): in ``entries`` (cached like
        #: the others) but never in an epoch plan
        self.held_out = held_out
        self.sampler = BucketBatchSampler(
            index,
            assignments,
            batch_size,
            seed,
            balance_class=balance_class,
            held_out=held_out,
            resolution_groups=index.resolution_groups,
            resolution_draw=resolution_draw,
        )
        self._plans: dict[int, list[list[SampleRef]]] = {}
        self._largest: dict[int, int] | None = None
        #: the model has a mask input (an inpainting model; set by the runtime): OneTrainer's mask
        #: augmentations then act on every sample of a subset with them on, not only on masked ones
        self.mask_input = False

    def epoch_plan(self, epoch: int) -> list[list[SampleRef]]:
        """This process's micro-batches of ``epoch``, in order."""
        if epoch in self._plans:
            return self._plans[epoch]
        batches = self.sampler.epoch_batches(epoch)
        seen: dict[int, int] = {}
        refs: list[list[SampleRef]] = []
        for batch in batches:
            row = []
            for entry in batch:
                occurrence = seen.get(entry, 0)
                seen[entry] = occurrence + 1
                row.append(SampleRef(entry, occurrence, epoch))
            refs.append(row)
        if self.world_size > 1:
            usable = len(refs) // self.world_size * self.world_size
            if usable == 0:
                raise ConfigError(
                    f"only {len(refs)} batches per epoch for {self.world_size} processes: lower --batch-size or add images"
                )
            refs = refs[self.rank : usable : self.world_size]
        if len(self._plans) > 4:
            self._plans.pop(next(iter(self._plans)))
        self._plans[epoch] = refs
        return refs

    def steps_in_epoch(self, epoch: int, gradient_accumulation: int) -> int:
        """Optimizer steps of ``epoch``: its micro-batches in groups of ``gradient_accumulation``, the
        last group possibly short (kohya's ``ceil(len(train_dataloader) / accumulation)``)."""
        return math.ceil(len(self.epoch_plan(epoch)) / max(1, gradient_accumulation))

    def steps_in_epochs(self, epochs: int, gradient_accumulation: int, limit: int | None = None) -> int:
        """Optimizer steps of the first ``epochs`` epochs, each planned; counting stops once ``limit`` is reached
        (the run's steps): ``--epochs 1000000000000 --max-steps 10`` planned every epoch, and the pre-flight hung."""
        steps = 0
        for epoch in range(epochs):
            steps += self.steps_in_epoch(epoch, gradient_accumulation)
            if limit is not None and steps >= limit:
                break
        return steps

    def flip_of(self, ref: SampleRef) -> bool:
        """Whether this use of the image is mirrored (never for evaluation refs, epoch < 0)."""
        if ref.epoch < 0 or not self.entries[ref.entry].subset.flip:
            return False
        return ref.rng(self.seed, "flip").random() < 0.5

    @property
    def largest_resolution(self) -> int:
        """The largest resolution any image trains at (several with ``--resolutions`` or per-subset
        resolutions): the memory plan's size."""
        return max((e.subset.resolution for e in self.entries), default=0)

    @property
    def batch_shapes(self) -> list[tuple[int, int]]:
        """``(batch size, largest resolution)`` of each dataset's batches (one pair but with a kohya dataset TOML
        whose ``[[datasets]]`` batch differently): the memory plan sizes the peak on the worst of them."""
        largest: dict[tuple[int, int], int] = {}
        for i, entry in enumerate(self.entries):
            if i in self.held_out:
                continue
            group = self.sampler.group_of(entry)
            largest[group] = max(largest.get(group, 0), entry.subset.resolution)
        return sorted({(self.effective_batch(batch), resolution) for (_, batch), resolution in largest.items()})

    @property
    def largest_batches(self) -> dict[int, int]:
        """Each batch size's largest batch of any epoch (the batches of the datasets that batch at that size:
        one key but with a kohya dataset TOML whose ``[[datasets]]`` batch differently). A batch is one bucket's
        images (kohya's bucketing too), so where no bucket holds as many images as the size it is smaller; not
        epoch 0's alone, which a per-epoch resolution draw or class-image draw can leave smaller than a later
        epoch's (:meth:`~sdcore.data.sampler.BucketBatchSampler.largest_batches`)."""
        if self._largest is None:
            self._largest = self.sampler.largest_batches()
        return self._largest

    def effective_batch(self, size: int) -> int:
        """The largest batch a dataset batching at ``size`` makes (``--batch-size 1000`` on 40 images: 40)."""
        return min(size, self.largest_batches.get(size, size))

    def batch_size_notes(self, label: str = "--batch-size") -> list[str]:
        """A note for each batch size no bucket fills (``--batch-size 1000000000000`` on a 40-image dataset),
        naming the batch the run trains at instead; the logs and the memory plan use that one
        (:meth:`effective_batch`). ``label`` names the run's batch size as the user gave it
        (:func:`sdcore.options.option_label`: ``run.toml: train_batch_size`` for a kohya config's)."""
        notes = []
        for size, used in sorted(self.largest_batches.items()):
            if used < size:
                named = f"{label} {size}" if size == self.sampler.batch_size else f"a dataset's batch_size {size}"
                notes.append(
                    f"{named}: no bucket holds that many images and a batch is one bucket's (as in kohya), so batches "
                    f"hold at most {used}: the run trains at batch size {used}"
                )
        return notes

    @property
    def batch_sizes_text(self) -> str:
        """The batch size for the logs: ``4``, or ``2-4`` where datasets batch differently (each the largest batch
        it makes, :meth:`effective_batch`)."""
        sizes = sorted({self.effective_batch(size) for size in self.sampler.batch_sizes.values()})
        return str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"

    @property
    def held_out_entries(self) -> list[ImageEntry]:
        """The images held out for validation, an image validated at several resolutions once."""
        seen: dict[tuple[Path, bool], ImageEntry] = {}
        for i in sorted(self.held_out):
            entry = self.entries[i]
            seen.setdefault((entry.path, entry.is_class), entry)
        return list(seen.values())

    @property
    def trained_entries(self) -> list[ImageEntry]:
        """The images that train (all but the held-out ones), an image at several resolutions once."""
        extra = {i for g in self.index.resolution_groups for i in g.entries[1:]}
        return [e for i, e in enumerate(self.entries) if i not in self.held_out and i not in extra]

    def crop_of(self, ref: SampleRef) -> tuple[int, int] | None:
        """kohya's ``random_crop`` (or ``face_crop_aug_range``) crop ``(left, top)`` drawn from the
        sample's own generator, or None (the bucket's centre crop: the options off, or an evaluation
        ref, epoch < 0)."""
        return self.geometry_of(ref)[1]

    def geometry_of(self, ref: SampleRef) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """``(resized, crop)`` of this sample: ``face_crop_aug_range`` (buckets off, a face in the
        file name) draws both, ``random_crop`` the crop; ``(None, None)`` keeps the bucket's."""
        entry = self.entries[ref.entry]
        s = entry.subset
        if ref.epoch < 0:
            return None, None
        face_range = getattr(s, "face_crop_aug_range", None)
        if face_range is not None and not s.buckets:
            from ..data.augment import draw_face_crop, face_info

            face = face_info(entry.path)
            if face is not None:
                assignment = self.assignments[ref.entry]
                return draw_face_crop(
                    ref.rng(self.seed, "crop"),
                    entry.size,
                    assignment.bucket,
                    face,
                    face_range,
                    random_crop=bool(getattr(s, "random_crop", False)),
                )
        if not getattr(s, "random_crop", False):
            return None, None
        from ..data.augment import draw_crop

        assignment = self.assignments[ref.entry]
        return None, draw_crop(ref.rng(self.seed, "crop"), assignment.resized, assignment.bucket)

    def color_of(self, ref: SampleRef) -> ColorAug | None:
        """kohya's ``color_aug`` for this sample (None: unchanged; never for evaluation refs)."""
        if ref.epoch < 0 or not getattr(self.entries[ref.entry].subset, "color_aug", False):
            return None
        from ..data.augment import draw_color_aug

        return draw_color_aug(ref.rng(self.seed, "color-aug"))

    def mask_augment_of(self, ref: SampleRef) -> MaskGeometry | None:
        """OneTrainer's mask augmentations of this sample (:mod:`sdcore.data.mask_augment`), or None: its subset
        has neither on, the sample has no mask to augment (no dataset mask and no mask input, where OneTrainer
        adds neither module) or it is an evaluation ref (epoch < 0). Each augmentation draws from its own
        stream of the sample's generator."""
        entry = self.entries[ref.entry]
        s = entry.subset
        shrink, rotate = bool(getattr(s, "mask_shrink", False)), bool(getattr(s, "mask_rotate_crop", False))
        if ref.epoch < 0 or not (shrink or rotate) or not (self.mask_input or has_dataset_mask(entry)):
            return None
        from ..data.mask_augment import MaskAug

        aug = MaskAug.draw(
            ref.rng(self.seed, "mask-shrink") if shrink else None,
            ref.rng(self.seed, "mask-rotate-crop") if rotate else None,
            mask_crop_min_size(s),
        )
        return None if aug is None else mask_geometry(entry, aug)

    def view_of(self, ref: SampleRef) -> SampleView:
        """Everything drawn about how this sample's pixels look. With a rotated crop the bucket's resize and crop
        (and ``random_crop``'s draw) are those of the cropped region, which keeps the image's bucket (sdcore
        plans its batches per bucket; OneTrainer buckets the region by its own aspect ratio)."""
        augment = self.mask_augment_of(ref)
        if augment is None or augment.box == (0, augment.size[1], 0, augment.size[0]):  # no crop: the image's own
            resized, crop = self.geometry_of(ref)
            return SampleView(self.flip_of(ref), crop, self.color_of(ref), resized, augment)
        from ..data.buckets import fit_to_bucket

        bucket = self.assignments[ref.entry].bucket
        rule = getattr(self.entries[ref.entry].subset, "bucket_rule", "kohya")
        cover = fit_to_bucket(augment.cropped_size, bucket, rule=rule)
        crop = cover.crop
        if getattr(self.entries[ref.entry].subset, "random_crop", False):
            from ..data.augment import draw_crop

            crop = draw_crop(ref.rng(self.seed, "crop"), cover.resized, bucket)
        return SampleView(self.flip_of(ref), crop, self.color_of(ref), cover.resized, augment)

    def needed_latents(self) -> list[tuple[int, bool]]:
        """Every (entry, flipped) latent a run may ask for."""
        wanted = []
        for i, entry in enumerate(self.entries):
            wanted.append((i, False))
            if entry.subset.flip and i not in self.held_out:  # held-out images are validated unflipped
                wanted.append((i, True))
        return wanted


def caption_is_random(entry: ImageEntry) -> bool:
    from ..data.captions import has_wildcards

    s = entry.subset
    wildcards = getattr(s, "enable_wildcard", False) and has_wildcards(entry.caption)
    listed = len(getattr(entry, "captions", ())) > 1
    return bool(s.shuffle_caption or s.caption_dropout > 0 or s.tag_dropout > 0 or wildcards or listed)


def caption_depends_on_step(entry: ImageEntry, total_steps: int) -> bool:
    """Whether kohya's token warm-up is on for ``entry``'s subset (its captions change with the step,
    so they cannot be encoded once into the text-encoder cache, as kohya refuses to cache them)."""
    from ..data.captions import warmup_steps

    return warmup_steps(float(getattr(entry.subset, "token_warmup_step", 0.0)), total_steps) > 0


def caption_dropped(entry: ImageEntry, epoch: int) -> bool:
    """Whether ``epoch`` (0-based) drops every caption of ``entry``'s subset (``caption_dropout_every_n_epochs``)."""
    from ..data.captions import dropped_at_epoch

    return dropped_at_epoch(getattr(entry.subset, "caption_dropout_every_n_epochs", 0), epoch)


def make_caption(
    method: Any, entry: ImageEntry, rng: random.Random, *, epoch: int = -1, step: int = 0, total_steps: int = 0
) -> str:
    """Dataset caption -> training prompt: kohya processing, then the method's own template.

    ``epoch`` (0-based; -1 outside an epoch) decides kohya's ``caption_dropout_every_n_epochs``;
    it draws nothing, so the per-sample ``rng`` sees the same draws with the option on or off.
    ``step`` (optimizer steps done) and ``total_steps`` drive kohya's token warm-up. The wildcard
    choices draw from ``rng`` where kohya draws them (after the caption-dropout draw, before the
    shuffle); with ``enable_wildcard`` off nothing is drawn for them. An entry with a list of captions (an
    imagefolder row's, :attr:`ImageEntry.captions`) draws one first, as diffusers' text_to_image scripts do.
    """
    from ..data.captions import process_caption

    s = entry.subset
    listed = getattr(entry, "captions", ())
    caption = process_caption(
        rng.choice(listed) if listed else entry.caption,
        shuffle=s.shuffle_caption,
        keep_tokens=s.keep_tokens,
        tag_dropout=s.tag_dropout,
        caption_dropout=s.caption_dropout,
        rng=rng,
        keep_tokens_separator=getattr(s, "keep_tokens_separator", None),
        prefix=getattr(s, "caption_prefix", ""),
        suffix=getattr(s, "caption_suffix", ""),
        secondary_separator=getattr(s, "secondary_separator", None),
        caption_separator=getattr(s, "caption_separator", ","),
        drop=caption_dropped(entry, epoch),
        enable_wildcard=getattr(s, "enable_wildcard", False),
        token_warmup_min=getattr(s, "token_warmup_min", 1),
        token_warmup_step=getattr(s, "token_warmup_step", 0.0),
        step=step,
        max_steps=total_steps,
    )
    return method.caption_for(caption, is_class=entry.is_class, rng=rng)


def load_pixels(
    entry: ImageEntry,
    assignment: BucketAssignment,
    *,
    flip: bool,
    crop: tuple[int, int] | None = None,
    color: ColorAug | None = None,
) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """``(CHW float32 in [-1, 1], original (h, w), crop (top, left))`` for one image; ``crop`` and
    ``color`` are a sample's ``random_crop`` position and ``color_aug`` (:meth:`TrainData.view_of`)."""
    from ..data.loading import load_training_image

    return load_training_image(entry, assignment, flip=flip, crop=crop, color=color)


#: kohya's IMAGE_EXTENSIONS, in its order (``glob_images``: each spelling exactly, so ``.Png`` is not found)
MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP")


def mask_image_path(entry: ImageEntry) -> Path | None:
    """The mask image of ``entry``, or None: kohya's ``--masked-loss`` mask (same base name in its
    subset's ``conditioning_data_dir``, the first in sorted order: kohya's ``glob_images(dir, base)[0]``)
    or OneTrainer's (``<stem>-masklabel.png`` beside the image: its ``ModifyPath``; only ``.png`` is read)."""
    suffix = getattr(entry.subset, "mask_suffix", None)
    if suffix is not None:
        beside = entry.path.with_name(entry.path.stem + suffix)
        return beside if beside.is_file() else None
    folder = getattr(entry.subset, "conditioning_data_dir", None)
    if folder is None:
        return None
    found = sorted(str(folder / f"{entry.path.stem}{ext}") for ext in MASK_EXTENSIONS)
    found = [p for p in dict.fromkeys(found) if Path(p).is_file()]
    return Path(found[0]) if found else None


def has_dataset_mask(entry: ImageEntry) -> bool:
    """Whether the dataset weights this image's loss (``alpha_mask``, a ``conditioning_data_dir`` or
    OneTrainer's ``-masklabel.png`` masks)."""
    s = entry.subset
    return bool(
        getattr(s, "alpha_mask", False)
        or getattr(s, "conditioning_data_dir", None) is not None
        or getattr(s, "mask_suffix", None) is not None
    )


def is_segmentation(entry: ImageEntry) -> bool:
    """Whether ``entry``'s mask is a segmentation mask (its subset's ``mask_kind``): a ``conditioning_data_dir``
    mask image read as SimpleTuner's ``conditioning_type segmentation``, binary at the loss's size
    (:func:`dataset_mask_at_latent`) and drawn per batch with ``--masked-loss-probability``."""
    s = entry.subset
    return (
        getattr(s, "mask_kind", "red") == "segmentation"
        and getattr(s, "conditioning_data_dir", None) is not None
        and getattr(s, "mask_suffix", None) is None
    )


def segmentation_grey(rgb: Any) -> Any:
    """A segmentation mask image's pixels (uint8 ``[H, W, 3]``) as float32 ``[H, W]`` in 0..1: SimpleTuner's
    pixels in [-1, 1] (``ToTensor`` then ``Normalize(0.5, 0.5)``), the sum of the three channels ``/ 3``, then
    ``/ 2 + 0.5``: 0 exactly where a pixel is black, above 0 where any channel is not. The binarisation waits for
    the loss's size (:func:`dataset_mask_at_latent`): SimpleTuner averages areas first, so a latent cell with
    one coloured pixel counts as inside."""
    import numpy as np

    t = rgb.astype(np.float32) / np.float32(255.0)
    t = (t - np.float32(0.5)) / np.float32(0.5)
    mean = (t[..., 0] + t[..., 1] + t[..., 2]) / np.float32(3.0)
    return mean / np.float32(2.0) + np.float32(0.5)


def load_mask(
    entry: ImageEntry, assignment: BucketAssignment, *, flip: bool, crop: tuple[int, int] | None = None
) -> Any:
    """The loss mask of one sample at pixel size (float32 ``[H, W]`` in 0..1), or None (no mask: ones).

    Geometry: the image's own resize, crop and flip (:func:`sdcore.data.loading.fit_to_bucket`), so a
    mask follows every random crop and flip of its image (and the cached latents' centre crop).
    Values: ``alpha_mask``: the alpha channel ``/ 255``; a ``conditioning_data_dir`` mask image: its
    R channel through kohya's path (``ToTensor`` then ``Normalize(0.5, 0.5)`` then ``/ 2 + 0.5``,
    in float32), or with ``mask_kind segmentation`` the mean of its three channels the same way
    (:func:`segmentation_grey`, binarised later at the loss's size); OneTrainer's ``-masklabel.png``: greyscale
    (its ``LoadImage(channels=1)``; the masks its editor writes are grey RGB, read the same by PIL's ``L``)
    ``/ 255``, and a missing one is None, the whole image (its ``GenerateImageLike`` fills the mask with 255).
    A missing kohya mask image is a pre-flight problem; here it raises :class:`DataError`.
    """
    import numpy as np

    from ..data.loading import fit_to_bucket, load_training_channel
    from ..errors import DataError

    s = entry.subset
    interpolation = getattr(s, "resize_interpolation", None)
    if assignment.augment is not None:  # the sample's augmented mask (at the crop's size) goes to the bucket
        import dataclasses

        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(assignment.augment.mask, dtype=np.float32), mode="F")
        plain = dataclasses.replace(assignment, augment=None)
        fitted, _ = fit_to_bucket(image, plain, flip=flip, crop=crop, interpolation=interpolation)
        return np.clip(np.asarray(fitted, dtype=np.float32), 0.0, 1.0)
    if getattr(s, "mask_suffix", None) is not None:
        path = mask_image_path(entry)
        if path is None:
            return None
        grey = load_training_channel(path, assignment, channel="L", flip=flip, crop=crop, interpolation=interpolation)
        return grey.astype(np.float32) / np.float32(255.0)
    if getattr(s, "conditioning_data_dir", None) is not None:
        path = mask_image_path(entry)
        if path is None:
            raise DataError(f"{entry.path}: no mask image named {entry.path.stem}.* in {s.conditioning_data_dir}")
        if is_segmentation(entry):
            rgb = load_training_channel(
                path, assignment, channel="RGB", flip=flip, crop=crop, interpolation=interpolation
            )
            return segmentation_grey(rgb)
        red = load_training_channel(path, assignment, channel=0, flip=flip, crop=crop, interpolation=interpolation)
        t = red.astype(np.float32) / np.float32(255.0)
        t = (t - np.float32(0.5)) / np.float32(0.5)
        return t / np.float32(2.0) + np.float32(0.5)
    if getattr(s, "alpha_mask", False):
        alpha = load_training_channel(
            entry.path, assignment, channel=3, flip=flip, crop=crop, interpolation=interpolation
        )
        return alpha.astype(np.float32) / np.float32(255.0)
    return None


def mask_at_image_size(entry: ImageEntry) -> Any:
    """``entry``'s dataset mask as float32 ``[H, W]`` in 0..1 at the image's own size (a mask file of another
    size stretched to it, bilinear), or ones (OneTrainer's ``GenerateImageLike`` mask) without one: what its
    mask augmentations start from. Values as :func:`load_mask` reads them."""
    import numpy as np
    from PIL import Image

    from ..data.images import open_image_rgb
    from ..errors import DataError

    s = entry.subset
    width, height = entry.size
    path: Path | None = None
    channel: int | str = "L"
    if getattr(s, "mask_suffix", None) is not None:
        path, channel = mask_image_path(entry), "L"
    elif getattr(s, "conditioning_data_dir", None) is not None:
        path, channel = mask_image_path(entry), 0
        if path is None:
            raise DataError(f"{entry.path}: no mask image named {entry.path.stem}.* in {s.conditioning_data_dir}")
    elif getattr(s, "alpha_mask", False):
        path, channel = entry.path, 3
    if path is None:
        return np.ones((height, width), dtype=np.float32)
    rgba = open_image_rgb(path, keep_alpha=True)
    if is_segmentation(entry):
        grey = segmentation_grey(np.asarray(rgba.convert("RGB"), dtype=np.uint8))
    else:
        image = rgba.convert("RGB").convert("L") if channel == "L" else rgba.getchannel(channel)
        grey = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    values = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32), mode="F")
    if values.size != (width, height):
        values = values.resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)


def mask_crop_min_size(subset: Any) -> int:
    """The rotated crop's ``min_size``: the subset's ``mask_crop_min_size`` (a OneTrainer import: its run's
    lowest resolution), else the subset's lowest resolution (OneTrainer's rule for its run)."""
    given = getattr(subset, "mask_crop_min_size", None)
    if given:
        return int(given)
    return int(min(getattr(subset, "resolutions", ()) or (subset.resolution,)))


_GEOMETRIES: dict[Any, Any] = {}
_GEOMETRIES_LOCK = threading.Lock()  # the prefetch threads ask too


def mask_geometry(entry: ImageEntry, aug: Any) -> MaskGeometry:
    """The sample's augmented mask and image geometry (:func:`sdcore.data.mask_augment.augment_mask` of
    :func:`mask_at_image_size`), kept for the few dozen latest draws (a sample asks for it for its pixels,
    its loss mask and its inpainting conditioning)."""
    from ..data.mask_augment import augment_mask

    key = (str(entry.path), entry.size, aug)
    with _GEOMETRIES_LOCK:
        found = _GEOMETRIES.get(key)
    if found is None:
        found = augment_mask(mask_at_image_size(entry), aug, key=(str(entry.path), entry.size))
        with _GEOMETRIES_LOCK:
            if len(_GEOMETRIES) >= 64:
                _GEOMETRIES.pop(next(iter(_GEOMETRIES)))
            _GEOMETRIES[key] = found
    return found  # type: ignore[no-any-return]


#: how a pixel mask shrinks to the loss's (latent) size: kohya's ``apply_masked_loss`` averages areas
#: (``interpolate(mode="area")``); OneTrainer's ``ScaleImage(factor=0.125)`` is torchvision's
#: ``Resize(BILINEAR, antialias=True)``
MASK_FILTERS = ("area", "bilinear")


def mask_filter(entry: ImageEntry) -> str:
    """The :data:`MASK_FILTERS` name ``entry``'s mask shrinks with (OneTrainer's masks: ``bilinear``)."""
    return "bilinear" if getattr(entry.subset, "mask_suffix", None) is not None else "area"


def mask_to_latent(mask: Any, latent_size: tuple[int, int], mode: str = "area") -> Any:
    """A pixel-size mask ``[H, W]`` as loss weights ``[1, h, w]``, no renormalisation by the mask's mean:
    ``area`` is kohya's ``apply_masked_loss`` (``interpolate(mode="area")``), ``bilinear`` OneTrainer's
    ``ScaleImage`` (``interpolate(mode="bilinear", antialias=True)``, what torchvision's ``Resize`` runs on a
    tensor)."""
    import torch

    tensor = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    if mode == "bilinear":
        shrunk = torch.nn.functional.interpolate(
            tensor, size=latent_size, mode="bilinear", align_corners=False, antialias=True
        )
        return shrunk[0]
    return torch.nn.functional.interpolate(tensor, size=latent_size, mode="area")[0]


def segmentation_inside(values: Any) -> Any:
    """A segmentation mask's values (numpy or torch, 0..1) as SimpleTuner's ``(mask > 0)``: 1 wherever above 0,
    else 0, in the values' own dtype."""
    inside = values > 0
    return inside.to(values.dtype) if hasattr(inside, "to") else inside.astype(values.dtype)


def dataset_mask_at_latent(entry: ImageEntry, pixel_mask: Any, latent_size: tuple[int, int]) -> Any:
    """``entry``'s pixel mask (:func:`load_mask`) as loss weights ``[1, h, w]``: shrunk with its
    :func:`mask_filter`, and for a segmentation mask (:func:`is_segmentation`) 1 wherever the shrunk value is
    above 0, else 0 (SimpleTuner's ``(mask > 0)`` after ``interpolate(mode="area")`` and ``/ 2 + 0.5``)."""
    shrunk = mask_to_latent(pixel_mask, latent_size, mask_filter(entry))
    if is_segmentation(entry):
        return segmentation_inside(shrunk)
    return shrunk


def trained_pixel_mask(entry: ImageEntry, pixel_mask: Any) -> Any:
    """``entry``'s pixel mask (:func:`load_mask`) with the values the loss gives it, at pixel size: a
    segmentation mask binarised (:func:`segmentation_inside`), other kinds as they are (``red``: the R channel).
    The loss binarises after shrinking to the latent, but a cell's area average of these values (all >= 0) is
    above 0 exactly where some pixel is, so shrinking this gives the same inside cells: what a preview
    (``--debug-dataset``) shows."""
    return segmentation_inside(pixel_mask) if is_segmentation(entry) else pixel_mask


def seeded_draw(seed: int, probability: float) -> bool:
    """``random() < probability`` from a generator of its own seeded by ``seed`` (1 always, 0 never): the draws
    that SimpleTuner and OneTrainer make from a global generator, made from the sample's or batch's own seed so a
    run, and a resumed run, draws the same. Whether a batch's segmentation masks weigh its loss
    (``--masked-loss-probability``: SimpleTuner's ``random.random() < masked_loss_probability`` once per loss
    call; the seed is the batch's first sample's) and an inpainting sample's full-mask draw
    (:func:`sdcore.train.inpainting.unmasked_draw`)."""
    return random.Random(seed).random() < probability


def clamp_unmasked(mask: Any, unmasked_weight: float) -> Any:
    """A dataset mask at latent size clamped to ``[unmasked_weight, 1]`` (OneTrainer's ``masked_losses``:
    ``unmasked_weight`` is what the loss outside the mask still weighs); 0 leaves it as it is (kohya).
    Applied to the dataset's mask before it multiplies a method's own loss map, which may exceed 1."""
    if unmasked_weight <= 0:
        return mask
    import torch

    return torch.clamp(mask, unmasked_weight, 1.0)


def normalize_mask_area(masks: Any) -> Any:
    """Masks ``[..., 1, h, w]`` divided by their mean over each mask's pixels (OneTrainer's
    ``normalize_masked_area_loss``: ``mean(loss * m) / mean(m)``). An all-zero mask stays zero (its loss is
    0, where OneTrainer would divide 0 by 0: NaN)."""
    import torch

    mean = masks.mean(dim=tuple(range(masks.ndim - 3, masks.ndim)), keepdim=True)
    return masks / torch.where(mean > 0, mean, torch.ones_like(mean))


def weigh_by_mask(loss: Any, masks: Any, *, normalize: bool = False) -> Any:
    """The element-wise loss ``[B, C, h, w]`` weighted by loss masks ``[B, 1, h, w]``: one rule for kohya and
    OneTrainer. ``loss * m`` (kohya's ``apply_masked_loss``; ``m`` clamped by :func:`clamp_unmasked` for
    OneTrainer), with ``m`` divided by its mean over each sample's pixels when ``normalize``
    (:func:`normalize_mask_area`). The caller takes the mean over ``C, h, w``: OneTrainer's per-sample loss
    is ``mean(loss * m) / mean(m)`` with ``m = clamp(mask, unmasked_weight, 1)``. The runtime normalises the
    dataset's mask alone, before a method's own loss map multiplies it (``BatchMaker.sample_mask``), so
    the map keeps its scale."""
    masks = masks.to(loss.dtype)
    return loss * (normalize_mask_area(masks) if normalize else masks)


def build_train_data(
    options: TrainOptions,
    *,
    balance_class: bool,
    rank: int = 0,
    world_size: int = 1,
    auxiliary: Any = None,
) -> TrainData:
    """Index, buckets and sampler; ``auxiliary(path)`` names method files that are not images to train on."""
    from ..data.dataset import build_dataset_index

    index = build_dataset_index(options)
    if auxiliary is not None:
        drop_method_files(index, auxiliary, options.data)
    return plan_train_data(index, options, balance_class=balance_class, rank=rank, world_size=world_size)


def drop_method_files(index: DatasetIndex, auxiliary: Any, data: str | None) -> None:
    """Move the files ``auxiliary(path)`` claims (a method's files, e.g. DreamArtist's attention maps) from the
    index's images to ``auxiliary_files``, and out of its caption counts: those count training images.
    Nothing left to train on is a :class:`ConfigError`."""
    index.claim_method_files(auxiliary)
    if not index.entries:
        raise ConfigError(f"{data}: every image is a method file (e.g. an attention map); nothing to train on")


def plan_train_data(
    index: DatasetIndex, options: TrainOptions, *, balance_class: bool, rank: int = 0, world_size: int = 1
) -> TrainData:
    """Validation split, resolutions, buckets and sampler of a built index (the run and its pre-flight).
    An image at several resolutions (``--resolutions``) becomes one entry per resolution after the
    validation split is drawn, so an image is held out (or not) at all its resolutions alike."""
    from ..data.dataset import assign_buckets
    from ..data.resolutions import expand_resolutions

    held_out = held_out_for(index, options)
    held_out, _ = expand_resolutions(index, held_out, seed=options.seed, draw=options.resolution_draw)
    return TrainData(
        index,
        crops_drawn_once(index, assign_buckets(index), options.seed),
        batch_size=options.batch_size,
        seed=options.seed,
        balance_class=balance_class,
        rank=rank,
        world_size=world_size,
        held_out=held_out,
        resolution_draw=options.resolution_draw,
    )


def crops_drawn_once(index: DatasetIndex, assignments: list[BucketAssignment], seed: int) -> list[BucketAssignment]:
    """``assignments`` with the crop of each ``random_crop_once`` image drawn once for the run in place of the
    bucket's centre crop. OneTrainer's ``ScaleCropImage`` draws a crop jitter offset uniformly in the scaled
    image's excess per cached variation, and its latent cache (MGDS ``DiskCache``) keeps that crop for every
    epoch: the same draw (``draw_crop``) made once per image, seeded by the image's place in its folder and its
    resolution, so the cache, its key and SDXL's crop conditioning all see it like a centre crop."""
    import dataclasses

    from ..data.augment import draw_crop
    from .cache import latent_seed

    out = list(assignments)
    for i, entry in enumerate(index.entries):
        if not getattr(entry.subset, "random_crop_once", False):
            continue
        a = out[i]
        rng = random.Random(sample_seed(latent_seed(seed, entry, False, "crop-once"), entry.subset.resolution))
        out[i] = dataclasses.replace(a, crop=draw_crop(rng, a.resized, a.bucket))
    return out


def held_out_for(index: DatasetIndex, options: TrainOptions) -> frozenset[int]:
    """The entries the validation split holds out (:mod:`.validation`); a split that holds out every
    training image is a :class:`ConfigError`."""
    from .validation import held_out_entries

    held_out = held_out_entries(index, seed=options.seed)
    if held_out and all(i in held_out for i, e in enumerate(index.entries) if not e.is_class):
        raise ConfigError(
            f"{options.data}: the validation split holds out every training image; lower "
            "--validation-split (or the TOML's validation_split) or add images"
        )
    return held_out


def total_steps_for(options: TrainOptions, data: TrainData) -> tuple[int, int | None]:
    """(optimizer steps to run, epoch limit or None)."""
    accum = options.gradient_accumulation
    epochs = options.epochs
    if options.max_steps is None and epochs is None:
        epochs = 1
    if epochs is None:
        return int(options.max_steps or 0), None
    steps = data.steps_in_epochs(epochs, accum, limit=options.max_steps)
    if options.max_steps is not None:
        steps = min(steps, options.max_steps)
    return steps, epochs


def steps_text(data: TrainData, total_steps: int, max_epochs: int | None, accumulation: int) -> str:
    """``"80 optimizer steps over 2 epochs"``; when ``--max-steps`` ends the run before the epochs do,
    the epoch it ends in (``--epochs 2 --max-steps 10`` said "10 optimizer steps over 2 epochs" for a
    run that stops inside the first)."""
    text = f"{total_steps} optimizer steps"
    if not max_epochs:
        return text
    ends, done = max_epochs, 0
    for epoch in range(max_epochs):  # up to the epoch the run ends in (every epoch has a step)
        done += data.steps_in_epoch(epoch, accumulation)
        if done >= total_steps:
            ends = epoch + 1
            break
    if total_steps < done or ends < max_epochs:
        return f"{text} (--max-steps ends the run in epoch {ends} of {max_epochs})"
    return f"{text} over {max_epochs} epochs"


def _face_cropped(entry: ImageEntry) -> bool:
    s = entry.subset
    return getattr(s, "face_crop_aug_range", None) is not None and not s.buckets


def _listed(paths: list[str], limit: int = 10) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" ... and {len(paths) - limit} more" if len(paths) > limit else "")


def image_option_problems(options: TrainOptions, index: DatasetIndex) -> list[str]:
    """Pre-flight problems of kohya's image options (``random_crop``, ``color_aug``, ``alpha_mask``,
    ``masked_loss`` with ``conditioning_data_dir``), per subset as the dataset TOML sets them.

    kohya refuses cached latents with ``random_crop`` or ``color_aug`` (``is_latent_cacheable``),
    ``random_crop`` with mask images (its ControlNet dataset), mask folders without ``masked_loss``
    (its schema), and a dataset whose mask images are missing, left over or of another size.
    """
    from ..data.images import ImageError, is_image_path, probe_image

    problems: list[str] = []
    subsets = index.subsets or list({id(e.subset): e.subset for e in index.entries}.values())
    from ..data.augment import face_info
    from ..data.buckets import resolution_pair

    augmenting = sorted({name for s in subsets for name in ("random_crop", "color_aug") if getattr(s, name, False)})
    faces = [e for e in index.entries if _face_cropped(e) and face_info(e.path) is not None]
    if faces:
        augmenting.append("face_crop_aug_range")
    for s in subsets:
        if getattr(s, "face_crop_aug_range", None) is not None and s.buckets:
            problems.append(
                f"{s.image_dir}: face_crop_aug_range works with buckets off (kohya ignores it with enable_bucket): "
                "add --no-buckets (enable_bucket = false)"
            )
            break
    # kohya's crop_target never enlarges: each side must reach the target's (w x h for its non-square resolution)
    target = {id(e.subset): resolution_pair(e.subset.bucket_resolution) for e in faces}
    small = [
        f"{e.path} ({e.size[0]}x{e.size[1]})"
        for e in faces
        if e.size[0] < target[id(e.subset)][0] or e.size[1] < target[id(e.subset)][1]
    ]
    if small:
        width, height = target[id(faces[0].subset)]
        named = str(width) if width == height else f"{width}x{height}"
        problems.append(
            f"face_crop_aug_range: {len(small)} image(s) smaller than the resolution {named} "
            f"(kohya never enlarges them and stops): {_listed(small)}"
        )
    if augmenting and options.cache_latents:
        problems.append(
            f"{' and '.join(augmenting)} change(s) the pixels every time an image is used, so latents cannot be "
            "cached (kohya refuses it too): pass --no-cache-latents"
        )
    with_dir = [s for s in subsets if getattr(s, "conditioning_data_dir", None) is not None]
    if with_dir and not options.masked_loss:
        problems.append(
            f"conditioning_data_dir ({with_dir[0].conditioning_data_dir}) holds --masked-loss mask images: "
            "add --masked-loss (kohya refuses the key without it)"
        )
    if options.masked_loss and not any(has_dataset_mask(e) for e in index.entries):
        problems.append(
            "--masked-loss has no masks: give --conditioning-data-dir (or conditioning_data_dir in the dataset "
            "TOML's subsets) with mask images, or alpha_mask for images with transparency"
        )
    weighing = [
        flag
        for flag, on in (
            ("--masked-loss-unmasked-weight", options.masked_loss_unmasked_weight > 0),
            ("--masked-loss-normalize", options.masked_loss_normalize),
        )
        if on
    ]
    if weighing and not any(has_dataset_mask(e) for e in index.entries):
        problems.append(
            f"{' and '.join(weighing)} change(s) how loss masks weigh the loss, but the dataset has none: add "
            "--masked-loss with mask images (or a OneTrainer concepts file's -masklabel.png masks) or alpha_mask"
        )
    # segmentation masks are read from conditioning_data_dir mask images only
    odd_kind = [
        str(s.image_dir)
        for s in subsets
        if getattr(s, "mask_kind", "red") == "segmentation"
        and getattr(s, "conditioning_data_dir", None) is None
        and (getattr(s, "alpha_mask", False) or getattr(s, "mask_suffix", None) is not None)
    ]
    if odd_kind:
        problems.append(
            f"mask_kind segmentation reads mask images of a conditioning_data_dir (SimpleTuner's segmentation "
            f"datasets); {_listed(odd_kind)} weigh(s) the loss by alpha_mask or -masklabel.png masks, which are read "
            "as they are: leave out mask_kind (or --mask-kind) there"
        )
    segmented = any(is_segmentation(e) for e in index.entries)
    asked = [str(s.image_dir) for s in subsets if getattr(s, "mask_kind", "red") == "segmentation"]
    if asked and not segmented and not odd_kind:
        problems.append(
            f"mask_kind segmentation ({_listed(asked)}) reads --masked-loss mask images of a conditioning_data_dir "
            "(SimpleTuner's segmentation datasets), but no subset has them: give --conditioning-data-dir (or "
            "conditioning_data_dir in the dataset TOML's subsets) with --masked-loss, or leave out mask_kind"
        )
    if options.masked_loss_probability != 1.0 and not segmented:
        problems.append(
            f"--masked-loss-probability {options.masked_loss_probability:g} draws whether segmentation masks weigh "
            "a batch (SimpleTuner's masked_loss_probability), but the dataset has none: add --mask-kind segmentation "
            '(or mask_kind = "segmentation" in the dataset TOML) with --masked-loss mask images, or leave it at 1'
        )
    for s in subsets:
        if getattr(s, "mask_suffix", None) is None:
            continue
        other = "alpha_mask" if getattr(s, "alpha_mask", False) else None
        if getattr(s, "conditioning_data_dir", None) is not None:
            other = "conditioning_data_dir"
        if other is not None:
            problems.append(
                f"{s.image_dir}: {other} and OneTrainer's -masklabel.png masks both give masks; a OneTrainer "
                f"concepts file's masks are its -masklabel.png files (leave out {other})"
            )
    unreadable: list[str] = []
    for entry in index.entries:
        if getattr(entry.subset, "mask_suffix", None) is None:
            continue
        path = mask_image_path(entry)
        if path is not None:
            try:
                probe_image(path)
            except ImageError as exc:
                unreadable.append(str(exc))
    if unreadable:
        problems.append(f"masked training: {len(unreadable)} -masklabel mask(s) unreadable: {_listed(unreadable)}")
    for s in with_dir:
        folder = s.conditioning_data_dir
        assert folder is not None
        if getattr(s, "alpha_mask", False):
            problems.append(
                f"{s.image_dir}: alpha_mask and conditioning_data_dir both give masks; choose one "
                "(kohya's mask-image subsets have no alpha_mask)"
            )
        if getattr(s, "face_crop_aug_range", None) is not None and not s.buckets:
            problems.append(
                f"{s.image_dir}: face_crop_aug_range with mask images (conditioning_data_dir) is not supported "
                "(kohya's mask images are centre-cropped)"
            )
        if getattr(s, "random_crop", False):
            problems.append(
                f"{s.image_dir}: random_crop with mask images (conditioning_data_dir) is not supported "
                "(kohya refuses it: its mask images are centre-cropped)"
            )
        if not folder.is_dir():
            problems.append(f"conditioning_data_dir {folder}: not a folder")
    missing: list[str] = []
    mismatched: list[str] = []
    used: set[str] = set()
    for entry in index.entries:
        mask_dir = getattr(entry.subset, "conditioning_data_dir", None)
        if mask_dir is None or not mask_dir.is_dir():
            continue
        path = mask_image_path(entry)
        if path is None:
            missing.append(str(entry.path))
            continue
        used.add(os.path.splitext(os.path.abspath(path))[0])
        try:
            size = probe_image(path)
        except ImageError as exc:
            mismatched.append(str(exc))
            continue
        if size != entry.size:
            mismatched.append(f"{path} is {size[0]}x{size[1]}, its image {entry.size[0]}x{entry.size[1]}")
    if missing:
        problems.append(
            f"--masked-loss: {len(missing)} image(s) without a mask image of the same name in their "
            f"conditioning_data_dir: {_listed(missing)}"
        )
    if mismatched:
        problems.append(
            f"--masked-loss: {len(mismatched)} mask image(s) unusable (a mask must have its image's size, as kohya "
            f"asserts): {_listed(mismatched)}"
        )
    extra: list[str] = []
    # a folder a kohya subset reads keeps kohya's check; SimpleTuner's mask datasets never read their extra files
    folders = {
        s.conditioning_data_dir
        for s in with_dir
        if s.conditioning_data_dir is not None and not getattr(s, "mask_extras_allowed", False)
    }
    for folder in sorted(f for f in folders if f.is_dir()):
        for child in sorted(folder.iterdir()):
            if child.is_file() and is_image_path(child) and os.path.splitext(os.path.abspath(child))[0] not in used:
                extra.append(str(child))
    if extra:
        problems.append(
            f"--masked-loss: {len(extra)} mask image(s) match no training image (kohya refuses extra mask images): "
            f"{_listed(extra)}"
        )
    return problems


def mask_augment_checks(options: TrainOptions, index: DatasetIndex, *, mask_input: bool) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` of OneTrainer's mask augmentations (``mask_shrink`` / ``mask_rotate_crop``): they act
    on images with a dataset mask, or on every image when the model has a mask input (``mask_input``), as
    OneTrainer adds them with masked training or an inpainting model; elsewhere a note says they do nothing.
    The rotated crop changes the pixels every time an image is used and the shrink an inpainting model's masked
    image, so those cannot use cached latents (as kohya refuses ``random_crop``); the shrink of a loss mask alone
    can (the mask is read every step). OneTrainer's cache instead keeps one draw per ``image_variations``."""
    problems: list[str] = []
    notes: list[str] = []
    acting: dict[str, set[str]] = {"mask_shrink": set(), "mask_rotate_crop": set()}
    idle: set[str] = set()
    for entry in index.entries:
        s = entry.subset
        for name in acting:
            if getattr(s, name, False):
                (acting[name] if mask_input or has_dataset_mask(entry) else idle).add(str(s.image_dir))
    if idle:
        notes.append(
            f"mask_shrink/mask_rotate_crop (OneTrainer's mask augmentations) do nothing for {_listed(sorted(idle))}: "
            "no mask images and the model has no mask input (as in OneTrainer without masked training)"
        )
    blocking = sorted(
        name for name in acting if acting[name] and (name == "mask_rotate_crop" or mask_input)
    )  # fmt: skip
    if blocking and options.cache_latents:
        problems.append(
            f"{' and '.join(blocking)} (OneTrainer's image.enable_random_"
            f"{'/'.join('circular_mask_shrink' if n == 'mask_shrink' else 'mask_rotate_crop' for n in blocking)}) "
            "change(s) what is encoded every time an image is used, so latents cannot be cached (OneTrainer's "
            "cache keeps one draw per image variation for the whole run): pass --no-cache-latents"
        )
    return problems, notes


def strength_problems(method: TrainingMethod[Any], index: DatasetIndex) -> list[str]:
    """Pre-flight problem of dataset strengths other than 1 (kohya's per-dataset ``network_multiplier``)
    for a method that cannot scale what it trains per sample (:attr:`Capabilities.per_sample_strength`).

    kohya applies the value through the network's ``set_multiplier``, so only network methods honour
    it there; a method without the capability would silently train every dataset alike.
    """
    if method.capabilities().per_sample_strength:
        return []
    subsets = index.subsets or list({id(e.subset): e.subset for e in index.entries}.values())
    odd = [s for s in subsets if getattr(s, "network_strength", 1.0) != 1.0]
    if not odd:
        return []
    listed = _listed([f"{s.image_dir} ({s.network_strength:g})" for s in odd])
    return [
        f"network_multiplier other than 1 in the dataset config ({listed}): the {method.name or 'training'!r} "
        "method cannot scale its training per sample (kohya applies it to networks such as LoRA); "
        "remove it or train a LoRA"
    ]

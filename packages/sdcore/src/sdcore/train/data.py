"""The runtime's view of a dataset: epoch plans of micro-batches and per-sample randomness.

A *sample* is one use of one image in one epoch: ``(entry index, occurrence)`` where occurrence
counts the repeats of that image within the epoch. Every random choice about a sample (flip,
caption variant, noise, timestep, VAE posterior draw) is seeded from ``(seed, epoch, entry,
occurrence)`` alone. Batching, gradient accumulation, the number of processes and resuming
therefore never change what a sample looks like.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .noise import sample_seed

if TYPE_CHECKING:
    from ..data.buckets import BucketAssignment
    from ..data.dataset import DatasetIndex, ImageEntry
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
    ) -> None:
        from ..data.sampler import BucketBatchSampler

        self.index = index
        self.entries: list[ImageEntry] = index.entries
        self.assignments = assignments
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.sampler = BucketBatchSampler(index, assignments, batch_size, seed, balance_class=balance_class)
        self._plans: dict[int, list[list[SampleRef]]] = {}

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

    def flip_of(self, ref: SampleRef) -> bool:
        """Whether this use of the image is mirrored (never for evaluation refs, epoch < 0)."""
        if ref.epoch < 0 or not self.entries[ref.entry].subset.flip:
            return False
        return ref.rng(self.seed, "flip").random() < 0.5

    def needed_latents(self) -> list[tuple[int, bool]]:
        """Every (entry, flipped) latent a run may ask for."""
        wanted = []
        for i, entry in enumerate(self.entries):
            wanted.append((i, False))
            if entry.subset.flip:
                wanted.append((i, True))
        return wanted


def caption_is_random(entry: ImageEntry) -> bool:
    from ..data.captions import has_wildcards

    s = entry.subset
    wildcards = getattr(s, "enable_wildcard", False) and has_wildcards(entry.caption)
    return bool(s.shuffle_caption or s.caption_dropout > 0 or s.tag_dropout > 0 or wildcards)


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
    shuffle); with ``enable_wildcard`` off nothing is drawn for them.
    """
    from ..data.captions import process_caption

    s = entry.subset
    caption = process_caption(
        entry.caption,
        shuffle=s.shuffle_caption,
        keep_tokens=s.keep_tokens,
        tag_dropout=s.tag_dropout,
        caption_dropout=s.caption_dropout,
        rng=rng,
        keep_tokens_separator=getattr(s, "keep_tokens_separator", None),
        prefix=getattr(s, "caption_prefix", ""),
        suffix=getattr(s, "caption_suffix", ""),
        secondary_separator=getattr(s, "secondary_separator", None),
        drop=caption_dropped(entry, epoch),
        enable_wildcard=getattr(s, "enable_wildcard", False),
        token_warmup_min=getattr(s, "token_warmup_min", 1),
        token_warmup_step=getattr(s, "token_warmup_step", 0.0),
        step=step,
        max_steps=total_steps,
    )
    return method.caption_for(caption, is_class=entry.is_class, rng=rng)


def load_pixels(
    entry: ImageEntry, assignment: BucketAssignment, *, flip: bool
) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """``(CHW float32 in [-1, 1], original (h, w), crop (top, left))`` for one image."""
    from ..data.loading import load_training_image

    return load_training_image(entry, assignment, flip=flip)


def build_train_data(
    options: TrainOptions,
    *,
    balance_class: bool,
    rank: int = 0,
    world_size: int = 1,
    auxiliary: Any = None,
) -> TrainData:
    """Index, buckets and sampler; ``auxiliary(path)`` names method files that are not images to train on."""
    from ..data.dataset import assign_buckets, build_dataset_index

    index = build_dataset_index(options)
    if auxiliary is not None:
        kept = [entry for entry in index.entries if not auxiliary(entry.path)]
        index.auxiliary_files = [entry.path for entry in index.entries if auxiliary(entry.path)]
        index.entries = kept
        if not kept:
            raise ConfigError(
                f"{options.data}: every image is a method file (e.g. an attention map); nothing to train on"
            )
    assignments = assign_buckets(index)
    return TrainData(
        index,
        assignments,
        batch_size=options.batch_size,
        seed=options.seed,
        balance_class=balance_class,
        rank=rank,
        world_size=world_size,
    )


def total_steps_for(options: TrainOptions, data: TrainData) -> tuple[int, int | None]:
    """(optimizer steps to run, epoch limit or None)."""
    accum = options.gradient_accumulation
    epochs = options.epochs
    if options.max_steps is None and epochs is None:
        epochs = 1
    if epochs is None:
        return int(options.max_steps or 0), None
    steps = sum(math.ceil(len(data.epoch_plan(e)) / accum) for e in range(epochs))
    if options.max_steps is not None:
        steps = min(steps, options.max_steps)
    return steps, epochs

"""Epoch plans: which images go together in which batch, one bucket per batch.

Deterministic for ``(seed, epoch)`` so a resumed run sees exactly the batches it would have seen,
and a partial last batch in a bucket is kept (kohya-derived trainers that drop small buckets
silently lose images). With ``balance_class`` (DreamBooth prior preservation) class images are
drawn to match the number of instance samples of their own dataset (each kohya ``[[datasets]]`` apart),
cycling through all class images across epochs.
An image at several resolutions (:mod:`.resolutions`) has one entry per resolution; each epoch keeps
the entry its draw names and leaves the others out, so its batches stay single-resolution buckets.

A kohya dataset TOML's ``[[datasets]]`` each batch alone, with their own ``batch_size`` (kohya's
``DatasetGroup``: every dataset makes whole batches of its own buckets, and the DataLoader shuffles all
of them together), so batches form within (dataset, bucket) at that dataset's size. With one dataset
the groups are the buckets alone and the batches are those of a single batch size.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from ..errors import DataError
from .buckets import BucketAssignment
from .dataset import DatasetIndex, ImageEntry
from .resolutions import ResolutionGroup, draw_variation


class BucketBatchSampler:
    """Batches of indices into ``index.entries``; repeats expanded; every batch from one bucket."""

    def __init__(
        self,
        index: DatasetIndex,
        assignments: Sequence[BucketAssignment],
        batch_size: int,
        seed: int,
        balance_class: bool = False,
        held_out: Collection[int] = (),
        resolution_groups: Sequence[ResolutionGroup] = (),
        resolution_draw: str = "epoch",
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if len(assignments) != len(index.entries):
            raise DataError(f"{len(assignments)} bucket assignments for {len(index.entries)} images")
        self.index = index
        self.assignments = list(assignments)
        self.batch_size = batch_size
        self.seed = seed
        self.balance_class = balance_class
        # ``held_out``: images kept for the validation loss (never trained on)
        self.held_out = frozenset(held_out)
        self._instance = [
            i
            for i, e in enumerate(index.entries)
            for _ in range(e.repeats)
            if not e.is_class and i not in self.held_out
        ]
        self._class = [i for i, e in enumerate(index.entries) for _ in range(e.repeats) if e.is_class]
        self._len: int | None = None
        #: each entry's (dataset, batch size): a batch never mixes two of them
        self._group = [self.group_of(e) for e in index.entries]
        #: class images outside any [[datasets]] (balanced against the whole run's training images)
        self._run_class = [bool(getattr(e.subset, "run_class", False)) for e in index.entries]
        #: one dataset: every class image balances against every training image, as before datasets
        self._single_pool = len({g[0] for g, run in zip(self._group, self._run_class, strict=True) if not run}) <= 1
        self.resolution_groups = list(resolution_groups)
        self.resolution_draw = resolution_draw

    def group_of(self, entry: ImageEntry) -> tuple[int, int]:
        """``(dataset, batch size)`` of an entry: its kohya ``[[datasets]]`` number and that dataset's own
        ``batch_size`` (kohya: a dataset's value wins; none given: the run's)."""
        subset = entry.subset
        own = getattr(subset, "batch_size", None)
        return int(getattr(subset, "dataset", 0)), own if own is not None else self.batch_size

    @property
    def batch_sizes(self) -> dict[int, int]:
        """Each dataset's batch size (one entry without a dataset TOML, or with one dataset)."""
        return dict(sorted(set(self._group)))

    def largest_batches(self) -> dict[int, int]:
        """Each batch size's largest batch any epoch can make: a batch is one (dataset, bucket)'s samples, so where
        no bucket holds as many samples as the size, batches stay smaller. An upper bound over every epoch, not
        epoch 0's: an image with several resolutions counts in the bucket of each (an epoch's draw can put every
        image at one of them), and with ``balance_class`` a bucket with class images of a pool may get all of
        that pool's draws (as many as its training samples: the draw cycles, so one class image can come twice)."""
        counts: dict[tuple[int, int, tuple[int, int]], int] = {}
        for i in self._instance if self.balance_class else self._instance + self._class:
            key = (*self._group[i], self.assignments[i].bucket)
            counts[key] = counts.get(key, 0) + 1
        if self.balance_class:
            # a pool draws at most as many class samples an epoch as its training samples (all resolutions counted)
            wanted = {
                pool: len(self._instance)
                if pool is None
                else sum(1 for i in self._instance if self._group[i][0] == pool)
                for pool in {self._pool_of(i) for i in self._class}
            }
            feeding: dict[tuple[int, int, tuple[int, int]], set[int | None]] = {}
            for i in self._class:
                feeding.setdefault((*self._group[i], self.assignments[i].bucket), set()).add(self._pool_of(i))
            for key, pools in feeding.items():
                counts[key] = counts.get(key, 0) + sum(wanted[pool] for pool in pools)
        largest: dict[int, int] = {}
        for (_, size, _), count in counts.items():
            largest[size] = max(largest.get(size, 0), min(count, size))
        return largest

    def _pool_of(self, i: int) -> int | None:
        """The class-image pool entry ``i`` balances in: its kohya ``[[datasets]]``, or None for the whole run's (one
        dataset, or class images given beside the datasets)."""
        return None if self._single_pool or self._run_class[i] else self._group[i][0]

    def resolution_dropped(self, epoch: int) -> frozenset[int]:
        """The entries of ``epoch`` that are another resolution of an image than the one drawn."""
        variation = draw_variation(self.resolution_draw, epoch)
        dropped: set[int] = set()
        for group in self.resolution_groups:
            keep = group.entry_for(self.seed, variation)
            dropped.update(i for i in group.entries if i != keep)
        return frozenset(dropped)

    def _rng(self, epoch: int, purpose: str) -> random.Random:
        # str seeds hash with SHA-512: stable across processes and Python versions (no PYTHONHASHSEED)
        return random.Random(f"sdcore-sampler:{self.seed}:{epoch}:{purpose}")

    def epoch_samples(self, epoch: int) -> list[int]:
        """The entry indices used in ``epoch`` (with repeats), before batching."""
        dropped = self.resolution_dropped(epoch) if self.resolution_groups else frozenset()
        samples = [i for i in self._instance if i not in dropped]
        klass = [i for i in self._class if i not in dropped]
        if not klass:
            return samples
        if not self.balance_class:
            return samples + klass
        # Each kohya [[datasets]] balances its own class images against its own training images
        # (kohya's DreamBoothDataset counts both per dataset): a dataset without training images draws
        # none, one without class images gets none; class images given beside the datasets (--reg-data,
        # a method's) balance against all training images. Within a pool, cycle through a seed-fixed
        # permutation, one window per epoch, so that over several epochs every class image is used about
        # equally often. With one dataset (no dataset TOML, or one [[datasets]]) every class image is in
        # one pool with the seed it always had, so the draws are exactly the whole-run balance's.
        pools: dict[int | None, list[int]] = {}
        for i in klass:
            pools.setdefault(self._pool_of(i), []).append(i)
        drawn: list[int] = []
        for key in sorted(pools, key=lambda k: -1 if k is None else k):
            want = len(samples) if key is None else sum(1 for i in samples if self._group[i][0] == key)
            if not want:
                continue
            pool = pools[key]
            order = "class-order" if not key else f"class-order:{key}"
            random.Random(f"sdcore-sampler:{self.seed}:{order}").shuffle(pool)
            start = (epoch * want) % len(pool)
            drawn += [pool[(start + k) % len(pool)] for k in range(want)]
        return samples + drawn

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Shuffled batches for ``epoch`` (0-based); same result for the same seed and epoch."""
        rng = self._rng(epoch, "batches")
        # keyed (dataset, batch size, bucket): one dataset sorts and shuffles exactly as buckets alone did
        by_bucket: dict[tuple[int, int, tuple[int, int]], list[int]] = {}
        for i in self.epoch_samples(epoch):
            by_bucket.setdefault((*self._group[i], self.assignments[i].bucket), []).append(i)
        batches: list[list[int]] = []
        for key in sorted(by_bucket):
            members = by_bucket[key]
            size = key[1]
            rng.shuffle(members)
            batches.extend(members[k : k + size] for k in range(0, len(members), size))
        rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        """Batches per epoch (of epoch 0; with ``balance_class`` later epochs can differ by a few
        batches when class images of different buckets are drawn)."""
        if self._len is None:
            self._len = len(self.epoch_batches(0))
        return self._len

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sdcore.data.buckets import BucketAssignment, assign_bucket, make_buckets
from sdcore.data.dataset import DatasetIndex, ImageEntry, SubsetOptions, assign_buckets, build_dataset_index
from sdcore.data.images import ImageError
from sdcore.data.loading import load_training_image
from sdcore.data.sampler import BucketBatchSampler
from sdcore.errors import DataError
from sdcore.train.options import TrainOptions


def _index(spec: list[tuple[tuple[int, int], int, bool]]) -> tuple[DatasetIndex, list[BucketAssignment]]:
    """Entries from (size, repeats, is_class) without touching the disk."""
    subset = SubsetOptions(image_dir=Path("."))
    entries = [
        ImageEntry(path=Path(f"{i}.png"), caption="", repeats=r, is_class=c, size=s, subset=subset)
        for i, (s, r, c) in enumerate(spec)
    ]
    index = DatasetIndex(entries=entries)
    buckets = make_buckets(512)
    return index, [assign_bucket(e.size, buckets, resolution=512) for e in entries]


SPEC = [((512, 512), 3, False), ((768, 512), 2, False), ((512, 768), 1, False), ((500, 500), 4, False),
        ((1000, 400), 1, False), ((600, 600), 2, False), ((300, 900), 5, False)]  # fmt: skip


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_every_image_repeats_times_and_batches_single_bucket(batch_size):
    index, assignments = _index(SPEC)
    sampler = BucketBatchSampler(index, assignments, batch_size, seed=7)
    for epoch in range(3):
        batches = sampler.epoch_batches(epoch)
        counts = Counter(i for batch in batches for i in batch)
        assert counts == {i: e.repeats for i, e in enumerate(index.entries)}
        for batch in batches:
            assert 1 <= len(batch) <= batch_size
            assert len({assignments[i].bucket for i in batch}) == 1
        # at most one partial batch per bucket (nothing dropped, nothing split needlessly)
        partial = Counter(assignments[b[0]].bucket for b in batches if len(b) < batch_size)
        assert all(v == 1 for v in partial.values())
        assert len(batches) == len(sampler)


def test_deterministic_per_seed_and_epoch():
    index, assignments = _index(SPEC)
    a = BucketBatchSampler(index, assignments, 2, seed=1)
    b = BucketBatchSampler(index, assignments, 2, seed=1)
    assert a.epoch_batches(0) == b.epoch_batches(0) and a.epoch_batches(5) == b.epoch_batches(5)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert a.epoch_batches(0) != BucketBatchSampler(index, assignments, 2, seed=2).epoch_batches(0)


def test_balance_class_matches_instance_count_and_cycles_class_images():
    spec = [((512, 512), 2, False), ((512, 512), 1, False)] + [((512, 512), 1, True)] * 10
    index, assignments = _index(spec)
    sampler = BucketBatchSampler(index, assignments, 2, seed=0, balance_class=True)
    used = Counter()
    for epoch in range(10):
        flat = [i for batch in sampler.epoch_batches(epoch) for i in batch]
        instance = [i for i in flat if not index.entries[i].is_class]
        klass = [i for i in flat if index.entries[i].is_class]
        assert Counter(instance) == {0: 2, 1: 1}
        assert len(klass) == 3
        used.update(klass)
    assert set(used) == set(range(2, 12)) and max(used.values()) - min(used.values()) <= 1
    # without balancing every class image is used with its repeats
    plain = BucketBatchSampler(index, assignments, 2, seed=0)
    assert len([i for b in plain.epoch_batches(0) for i in b]) == 3 + 10


def test_sampler_validates_inputs():
    index, assignments = _index(SPEC)
    with pytest.raises(DataError):
        BucketBatchSampler(index, assignments[:-1], 1, seed=0)
    with pytest.raises(DataError):
        BucketBatchSampler(index, assignments, 0, seed=0)


# ------------------------------------------------------------------------------------- loading


def _entry(path: Path, size: tuple[int, int]) -> ImageEntry:
    return ImageEntry(
        path=path, caption="", repeats=1, is_class=False, size=size, subset=SubsetOptions(image_dir=path.parent)
    )


def test_load_training_image_shape_range_sizes_and_flip(tmp_path):
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)
    pixels[:, :48] = (255, 0, 0)  # left red, right white
    pixels[:, 48:] = 255
    path = tmp_path / "a.png"
    Image.fromarray(pixels).save(path)
    entry = _entry(path, (96, 64))
    assignment = BucketAssignment(bucket=(64, 64), resized=(96, 64), crop=(8, 0))
    array, original, crop = load_training_image(entry, assignment, flip=False)
    assert array.shape == (3, 64, 64) and array.dtype == np.float32
    assert array.min() >= -1.0 and array.max() <= 1.0
    assert original == (64, 96) and crop == (0, 8)
    assert np.allclose(array[:, :, 0], [[1.0], [-1.0], [-1.0]])  # left column red
    assert np.allclose(array[:, :, -1], 1.0)  # right column white
    flipped, _, flip_crop = load_training_image(entry, assignment, flip=True)
    assert np.array_equal(flipped, array[:, :, ::-1])
    assert flip_crop == (0, 96 - 8 - 64)


def test_downscale_averages_area_and_upscale_works(tmp_path):
    checker = (np.indices((128, 128)).sum(axis=0) % 2 * 255).astype(np.uint8)
    path = tmp_path / "c.png"
    Image.fromarray(np.stack([checker] * 3, axis=-1)).save(path)
    entry = _entry(path, (128, 128))
    down, _, _ = load_training_image(entry, BucketAssignment((64, 64), (64, 64), (0, 0)), flip=False)
    assert np.abs(down).max() < 0.02, "a 1-px checkerboard shrinks to flat gray with area averaging"
    up, original, _ = load_training_image(entry, BucketAssignment((256, 256), (256, 256), (0, 0)), flip=False)
    assert up.shape == (3, 256, 256) and original == (128, 128)


def test_exif_rotated_image_loads_in_display_orientation(tmp_path, make):
    path = tmp_path / "r.jpg"
    make.rotated_jpeg(path)  # displayed 40x80, red on top
    opts = TrainOptions(data=str(tmp_path), resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_step=32)
    index = build_dataset_index(opts)
    (assignment,) = assign_buckets(index)
    assert assignment.bucket == (32, 96)
    array, original, _ = load_training_image(index.entries[0], assignment, flip=False)
    assert original == (80, 40)
    assert array.shape[1] > array.shape[2], "portrait after rotation"
    top = array[:, : array.shape[1] // 4].mean(axis=(1, 2))
    assert top[0] > 0.6 and top[2] < -0.6


def test_unreadable_at_load_time_raises_image_error(tmp_path, make):
    path = tmp_path / "t.jpg"
    make.truncated_jpeg(path)
    with pytest.raises(ImageError):
        load_training_image(_entry(path, (64, 64)), BucketAssignment((64, 64), (64, 64), (0, 0)), flip=False)


def test_largest_batches_bound_every_epoch_also_with_class_images_drawn_again():
    """A balanced class pool of one image is drawn as often as there are training samples (5): its bucket's batch
    holds it five times beside the four training samples, which counting the bucket's entries (5) would miss; the
    bound stays a bucket's count, not the batch size given (DreamBooth's ``--batch-size 1000`` is a batch of 9)."""
    spec = [((512, 512), 4, False), ((512, 512), 1, True), ((512, 768), 1, False)]
    index, assignments = _index(spec)
    sampler = BucketBatchSampler(index, assignments, 1000, seed=0, balance_class=True)
    assert max(len(b) for b in sampler.epoch_batches(0)) == 9 and sampler.largest_batches() == {1000: 9}
    plain = BucketBatchSampler(index, assignments, 1000, seed=0)
    assert plain.largest_batches() == {1000: 5} == {1000: max(len(b) for b in plain.epoch_batches(0))}
    for epoch in range(6):  # the bound holds in every epoch
        assert max(len(b) for b in sampler.epoch_batches(epoch)) <= sampler.largest_batches()[1000]

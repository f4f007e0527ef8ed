"""OneTrainer's aspect buckets (``--bucket-rule onetrainer``) against MGDS's rule, written out here from
mgds ``src/mgds/pipelineModules/AspectBucketing.py`` (``__create_automatic_buckets``, ``__get_bucket`` and the
scale of ``get_item``), in its own (height, width) order, and compared number for number with sdcore's."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from sdcore.data.buckets import (
    ONETRAINER_ASPECTS,
    assign_onetrainer_bucket,
    fit_to_bucket,
    onetrainer_buckets,
    square_assignment,
)
from sdcore.errors import ConfigError

# --- MGDS's rule, (h, w) throughout, as AspectBucketing computes it -------------------------------------------

MGDS_ASPECTS = [(1.0, 1.0), (1.0, 1.25), (1.0, 1.5), (1.0, 1.75), (1.0, 2.0), (1.0, 2.5), (1.0, 3.0), (1.0, 3.5),
                (1.0, 4.0)]  # fmt: skip


def mgds_buckets(target: int, quantization: int) -> list[tuple[int, int]]:
    sizes = [(h / math.sqrt(h * w) * target, w / math.sqrt(h * w) * target) for (h, w) in MGDS_ASPECTS]
    sizes = sizes + [(w, h) for (h, w) in sizes]
    sizes = [(round(h / quantization) * quantization, round(w / quantization) * quantization) for h, w in sizes]
    return list(set(sizes))


def mgds_assign(h: int, w: int, target: int, quantization: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(scale resolution, crop resolution) as (h, w) for an image of h x w."""
    buckets = mgds_buckets(target, quantization)
    aspects = np.array([bh / bw for bh, bw in buckets])
    bucket = buckets[int(np.argmin(abs(aspects - h / w)))]
    if h / w > bucket[0] / bucket[1]:
        scale = bucket[1] / w
        return (round(h * scale), bucket[1]), bucket
    scale = bucket[0] / h
    return (bucket[0], round(w * scale)), bucket


# --- the tests -------------------------------------------------------------------------------------------------


def test_the_aspect_list_is_mgds():
    assert list(ONETRAINER_ASPECTS) == MGDS_ASPECTS


@pytest.mark.parametrize("target, quantization", [(512, 8), (1024, 64), (768, 8), (64, 8), (1536, 64)])
def test_bucket_lists_match_mgds_in_its_order(target, quantization):
    ours = onetrainer_buckets(target, quantization)
    want = [(w, h) for h, w in mgds_buckets(target, quantization)]
    assert ours == want  # the order too: it decides exact ties
    assert len(ours) == len(set(ours))
    assert all(w % quantization == 0 and h % quantization == 0 for w, h in ours)
    assert (target // quantization * quantization,) * 2 in ours


def test_512_on_the_sd_grid_and_1024_on_the_sdxl_grid():
    """The lists differ from kohya's: 8-pixel sides for SD, and 1:4 buckets beyond kohya's 1024 side."""
    b512 = set(onetrainer_buckets(512, 8))
    assert len(b512) == 17 and (576, 456) in b512 and (1024, 256) in b512 and (256, 1024) in b512
    b1024 = set(onetrainer_buckets(1024, 64))
    # 1:3 and 1:3.5 share a short side of 576 on the 64 grid but not the long one: 17 buckets
    assert len(b1024) == 17 and (2048, 512) in b1024 and (1792, 576) in b1024 and (1920, 576) in b1024


SIZES = [
    (512, 512),  # square, exact
    (600, 800),  # portrait 3:4
    (1920, 1080),  # landscape 16:9
    (3000, 2000),  # 3:2
    (200, 1000),  # extreme 1:5, beyond the last aspect
    (1000, 200),  # extreme 5:1
    (40, 30),  # tiny: upscaled
    (64, 100),  # tiny portrait: upscaled
    (513, 511),  # nearly square, rounding of the followed side
    (1026, 1161),  # an exact tie of two aspect distances at 512 on the 8 grid: MGDS's first wins
]


@pytest.mark.parametrize("target, quantization", [(512, 8), (1024, 64)])
@pytest.mark.parametrize("size", SIZES)
def test_assignments_match_mgds(size, target, quantization):
    w, h = size
    (scale_h, scale_w), (crop_h, crop_w) = mgds_assign(h, w, target, quantization)
    a = assign_onetrainer_bucket(size, onetrainer_buckets(target, quantization))
    assert a.bucket == (crop_w, crop_h)
    assert a.resized == (scale_w, scale_h)
    # ScaleCropImage without crop jitter: the excess halved (floor)
    assert a.crop == ((scale_w - crop_w) // 2, (scale_h - crop_h) // 2)
    assert a.resized[0] >= a.bucket[0] and a.resized[1] >= a.bucket[1]


def test_many_random_sizes_match_mgds():
    rng = random.Random(7)
    buckets = onetrainer_buckets(512, 8)
    for _ in range(300):
        w, h = rng.randint(16, 4000), rng.randint(16, 4000)
        (scale_h, scale_w), (crop_h, crop_w) = mgds_assign(h, w, 512, 8)
        a = assign_onetrainer_bucket((w, h), buckets)
        assert (a.bucket, a.resized) == ((crop_w, crop_h), (scale_w, scale_h)), (w, h)


def test_the_tie_case_is_a_real_tie_and_the_order_decides_it():
    """1026x1161 sits exactly between two buckets' aspect ratios: a sorted list would pick the other one."""
    buckets = onetrainer_buckets(512, 8)
    aspect = 1161 / 1026
    distances = sorted(abs(h / w - aspect) for w, h in buckets)
    assert distances[0] == distances[1]
    tied = [b for b in buckets if abs(b[1] / b[0] - aspect) == distances[0]]
    ours = assign_onetrainer_bucket((1026, 1161), buckets).bucket
    assert ours == tied[0]
    assert assign_onetrainer_bucket((1026, 1161), sorted(buckets, reverse=tied[0] < tied[1])).bucket == tied[1]


def test_rounding_is_pythons_not_kohyas():
    """A followed side on .5: OneTrainer rounds half to even, kohya half up (one pixel of difference)."""
    ot = fit_to_bucket((5, 4), (2, 2), rule="onetrainer")  # scale 2/4: width 2.5 -> 2 (even)
    kohya = fit_to_bucket((5, 4), (2, 2), rule="kohya")  # int(2.5 + 0.5) = 3
    assert ot.resized == (round(5 * (2 / 4)), 2) == (2, 2)
    assert kohya.resized == (3, 2)
    assert square_assignment((5, 4), 2, rule="onetrainer") == ot  # buckets off: SingleAspectCalculation's rounding
    assert square_assignment((5, 4), 2) == kohya


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="quantization must be positive"):
        onetrainer_buckets(512, 0)
    with pytest.raises(ConfigError, match="every bucket side rounds to 0"):
        onetrainer_buckets(32, 128)


def test_a_resolution_up_to_the_grid_leaves_out_the_buckets_with_a_side_of_0():
    """64 on the 64 grid (tiny SDXL runs): MGDS's list holds (128, 0) and (0, 128), on which it divides by zero;
    sdcore keeps the rest, in MGDS's order."""
    want = [(w, h) for h, w in mgds_buckets(64, 64) if h and w]
    assert len(want) < len(mgds_buckets(64, 64))
    assert onetrainer_buckets(64, 64) == want and set(want) == {(64, 64), (128, 64), (64, 128)}
    assert assign_onetrainer_bucket((100, 64), want).bucket == (128, 64)
    with pytest.raises(ConfigError, match="one positive side"):
        onetrainer_buckets((768, 512), 64)


def test_mgds_order_does_not_depend_on_the_hash_seed():
    """The tie-breaking order is that of a set of int tuples, whose hashes Python does not randomise: the same list
    in a process with any ``PYTHONHASHSEED`` (OneTrainer's process and sdcore's agree), not an accident of this
    one. Strings would be randomised; this guards against bucket keys turning into them."""
    import os
    import subprocess
    import sys

    code = "from sdcore.data.buckets import onetrainer_buckets as b; print(b(512, 8), b(1024, 64))"
    here = f"{onetrainer_buckets(512, 8)} {onetrainer_buckets(1024, 64)}"
    for seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == here

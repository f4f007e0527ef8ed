from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sdcore.data.buckets import (
    ImageTooSmallError,
    assign_bucket,
    bucket_range_note,
    bucket_sides_note,
    make_buckets,
    square_assignment,
)
from sdcore.errors import ConfigError

KOHYA_512 = {
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
}  # fmt: skip


def test_512_matches_kohya():
    buckets = make_buckets(512)
    expected = KOHYA_512 | {(h, w) for w, h in KOHYA_512}
    assert set(buckets) == expected
    assert len(buckets) == 17


@pytest.mark.parametrize(
    "resolution, lo, hi, step", [(512, 256, 1024, 64), (1024, 512, 2048, 32), (768, 256, 1024, 64)]
)
def test_bucket_invariants(resolution, lo, hi, step):
    buckets = make_buckets(resolution, min_reso=lo, max_reso=hi, step=step)
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        assert lo <= w <= hi and lo <= h <= hi
    assert (resolution // step * step,) * 2 in buckets


def test_bad_settings():
    with pytest.raises(ConfigError):
        make_buckets(512, min_reso=1024, max_reso=256)
    with pytest.raises(ConfigError):
        make_buckets(512, step=0)
    with pytest.raises(ConfigError, match=r"got 40 and 1024 \(0 and 1024 on the step 64\)"):
        make_buckets(512, min_reso=40)  # kohya's rounding leaves no smallest side


def test_sides_off_the_step_are_put_on_it_as_kohya_does():
    """kohya's adjust_min_max_bucket_reso_by_steps: min_bucket_reso rounds down to the step, max up (a warning)."""
    assert make_buckets(512, min_reso=250, max_reso=1000) == make_buckets(512, min_reso=192, max_reso=1024)
    assert make_buckets(512, min_reso=250, max_reso=1000) != make_buckets(512, min_reso=256, max_reso=960)
    assert bucket_sides_note(250, 1000, 64) == (
        "min_bucket_reso 250 / max_bucket_reso 1000 are not on the bucket step 64: buckets use 192 / 1024 "
        "(kohya rounds the smallest side down and the largest up the same way)"
    )
    assert bucket_sides_note(256, 1024, 64) is None


def test_the_preflight_notes_the_adjustment_once(tmp_path):
    from sdcore.data.dataset import build_dataset_index
    from sdcore.testing.datasets import make_tiny_dataset
    from sdcore.train.options import TrainOptions
    from sdcore.train.preflight import bucket_side_notes

    make_tiny_dataset(tmp_path / "data", n=2)
    index = build_dataset_index(
        TrainOptions(data=str(tmp_path / "data"), resolution=64, min_bucket_reso=40, max_bucket_reso=72, bucket_step=16)
    )
    assert bucket_side_notes(index) == [bucket_sides_note(40, 72, 16)]
    index = build_dataset_index(
        TrainOptions(data=str(tmp_path / "data"), resolution=64, buckets=False, min_bucket_reso=40)
    )
    assert bucket_side_notes(index) == []  # kohya adjusts (and checks) them with buckets on only


def test_a_resolution_outside_the_bucket_sides_is_noted_where_kohya_stops():
    """kohya asserts min(resolution) >= min_bucket_reso and max(resolution) <= max_bucket_reso (after putting them on
    the step); sdcore trains on, and the note says it plainly: the range, that kohya refuses it, the buckets sdcore
    then builds (checked against make_buckets) and the option that brings the resolution inside."""
    assert bucket_range_note(512, 256, 1024, 64) is None
    assert bucket_range_note((1024, 256), 256, 1024, 64) is None  # both sides inside: kohya passes
    above = bucket_range_note(1536, 256, 1024, 64)
    assert above == (
        "resolution 1536 lies outside [min_bucket_reso, max_bucket_reso] = [256, 1024] (1536 > 1024); kohya refuses "
        "this (an assert when it builds the dataset); sdcore trains on with the 1536x1536 square bucket of its area "
        "and 25 other buckets with sides in [256, 1024]; give --max-bucket-reso 1536 or more to bring it inside"
    )
    others = [bucket for bucket in make_buckets(1536) if bucket != (1536, 1536)]
    assert len(others) == 25 and max(side for bucket in others for side in bucket) == 1024
    # a non-square resolution below the smallest side still gets buckets of its area (not only the square)
    below = bucket_range_note((768, 200), 256, 1024, 64)
    assert below == (
        "resolution 768x200 lies outside [min_bucket_reso, max_bucket_reso] = [256, 1024] (200 < 256); kohya refuses "
        "this (an assert when it builds the dataset); sdcore trains on with the 384x384 square bucket of its area "
        "and 6 other buckets with sides in [256, 1024]; give --min-bucket-reso 200 or less to bring it inside"
    )
    assert len(make_buckets((768, 200))) == 7 and (384, 384) in make_buckets((768, 200))
    assert make_buckets(64) == [(64, 64)]  # a square below 256: the square alone, every image cropped square
    assert bucket_range_note(64, 256, 1024, 64) == (
        "resolution 64 lies outside [min_bucket_reso, max_bucket_reso] = [256, 1024] (64 < 256); kohya refuses this "
        "(an assert when it builds the dataset); sdcore trains on with a single bucket, the 64x64 square of its "
        "area, so every image is cropped square; give --min-bucket-reso 64 or less to bring it inside"
    )
    # the sides are put on the step first, as kohya does before its assert: 1000 -> 1024 admits 1024
    assert bucket_range_note(1024, 256, 1000, 64) is None
    note = bucket_range_note(1050, 256, 1000, 64)
    assert note is not None and note.startswith(
        "resolution 1050 lies outside [min_bucket_reso, max_bucket_reso] = [256, 1024] (1050 > 1024)"
    )
    assert note.endswith("give --max-bucket-reso 1088 or more to bring it inside")


def test_the_range_note_names_both_sides_and_no_upscale_buckets():
    """A resolution out on both sides needs both options (the note named only the first, so the fix met kohya's
    assert again); with --bucket-no-upscale the sides build no buckets at all, so no count of them is said."""
    both = bucket_range_note((2048, 128), 256, 1024, 64)
    assert both is not None and "(128 < 256, 2048 > 1024)" in both
    assert both.endswith("give --min-bucket-reso 128 or less and --max-bucket-reso 2048 or more to bring it inside")
    own = bucket_range_note(1536, 256, 1024, 64, no_upscale=True)
    assert own == (
        "resolution 1536 lies outside [min_bucket_reso, max_bucket_reso] = [256, 1024] (1536 > 1024); kohya refuses "
        "this (an assert when it builds the dataset); sdcore trains on with each image's own bucket "
        "(--bucket-no-upscale: the bucket sides play no part); give --max-bucket-reso 1536 or more to bring it inside"
    )


def test_the_preflight_notes_each_resolution_outside_the_sides_once(tmp_path):
    from sdcore.data.dataset import build_dataset_index
    from sdcore.testing.datasets import make_tiny_dataset
    from sdcore.train.options import TrainOptions
    from sdcore.train.preflight import bucket_side_notes

    make_tiny_dataset(tmp_path / "data", n=2)
    options = TrainOptions(data=str(tmp_path / "data"), resolution=128, resolutions="64,96,128", min_bucket_reso=96,
                           max_bucket_reso=128, bucket_step=32)  # fmt: skip
    assert bucket_side_notes(build_dataset_index(options)) == [bucket_range_note(64, 96, 128, 32)]
    options = TrainOptions(data=str(tmp_path / "data"), resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    assert bucket_side_notes(build_dataset_index(options)) == []
    options = TrainOptions(data=str(tmp_path / "data"), resolution=256, min_bucket_reso=64, max_bucket_reso=128,
                           bucket_no_upscale=True)  # fmt: skip
    assert bucket_side_notes(build_dataset_index(options)) == [bucket_range_note(256, 64, 128, 64, no_upscale=True)]


BUCKETS_512 = make_buckets(512)
sizes = st.tuples(st.integers(16, 4000), st.integers(16, 4000))


@settings(max_examples=300, deadline=None)
@given(size=sizes)
def test_assignment_covers_bucket_and_picks_nearest_aspect(size):
    a = assign_bucket(size, BUCKETS_512, resolution=512)
    bw, bh = a.bucket
    rw, rh = a.resized
    assert a.bucket in BUCKETS_512
    assert rw >= bw and rh >= bh
    left, top = a.crop
    assert 0 <= left <= rw - bw and 0 <= top <= rh - bh
    # centered crop
    assert abs(left - (rw - bw - left)) <= 1 and abs(top - (rh - bh - top)) <= 1
    # resize keeps the aspect ratio (up to rounding)
    assert abs(rw / rh - size[0] / size[1]) <= 2.0 / min(rw, rh) * max(rw / rh, 1)
    # nearest aspect ratio among all buckets (kohya's linear |w/h - ratio|)
    err = abs(bw / bh - size[0] / size[1])
    assert err <= min(abs(w / h - size[0] / size[1]) for w, h in BUCKETS_512) + 1e-12


def test_aspect_error_small_within_bucket_range():
    for w, h in [(1000, 1000), (1200, 800), (800, 1200), (1920, 1080), (600, 1500), (512, 700)]:
        a = assign_bucket((w, h), BUCKETS_512, resolution=512)
        assert abs(math.log(a.bucket[0] / a.bucket[1]) - math.log(w / h)) < 0.12


@settings(max_examples=300, deadline=None)
@given(size=sizes)
def test_no_upscale_never_enlarges(size):
    try:
        a = assign_bucket(size, BUCKETS_512, resolution=512, no_upscale=True, step=64)
    except ImageTooSmallError:
        assert min(size) < 64 or size[0] * size[1] > 512 * 512
        return
    bw, bh = a.bucket
    assert bw % 64 == 0 and bh % 64 == 0 and bw >= 64 and bh >= 64
    assert bw * bh <= 512 * 512
    assert a.resized[0] <= size[0] and a.resized[1] <= size[1], "never upscaled"
    assert a.resized[0] >= bw and a.resized[1] >= bh
    if size[0] * size[1] <= 512 * 512:
        assert a.bucket == (size[0] // 64 * 64, size[1] // 64 * 64)
        assert a.resized == size


def test_no_upscale_tiny_image_is_refused():
    with pytest.raises(ImageTooSmallError):
        assign_bucket((10, 10), BUCKETS_512, resolution=512, no_upscale=True)
    with pytest.raises(ImageTooSmallError):
        assign_bucket((500, 40), BUCKETS_512, resolution=512, no_upscale=True)


def test_square_assignment():
    a = square_assignment((200, 100), 64)
    assert a.bucket == (64, 64) and a.resized == (128, 64) and a.crop == (32, 0)


# --- kohya's BucketManager.select_bucket, rewritten from its documented behaviour -------------------------
# sd-scripts library/train_util.py:286-346 (select_bucket) and :282-284 (round_to_steps).


def _kohya_select(size, buckets, *, no_upscale=False, max_area=512 * 512, step=64):
    w, h = size
    ar = w / h
    if not no_upscale:
        if (w, h) in buckets:
            reso = (w, h)
        else:  # np.argmin of |w/h - ar| over the sorted list: the first smallest *linear* error
            errors = [abs(bw / bh - ar) for bw, bh in buckets]
            reso = buckets[errors.index(min(errors))]
        scale = reso[1] / h if ar > reso[0] / reso[1] else reso[0] / w
        return reso, (int(w * scale + 0.5), int(h * scale + 0.5))

    def rts(x):
        x = int(x + 0.5)
        return x - x % step

    if w * h > max_area:
        rw = math.sqrt(max_area * ar)
        rh = max_area / rw
        bwr = rts(rw)
        ar_wr = bwr / rts(bwr / ar)
        bhr = rts(rh)
        ar_hr = rts(bhr * ar) / bhr
        resized = (bwr, int(bwr / ar + 0.5)) if abs(ar_wr - ar) < abs(ar_hr - ar) else (int(bhr * ar + 0.5), bhr)
    else:
        resized = (w, h)
    return (resized[0] - resized[0] % step, resized[1] - resized[1] % step), resized


@pytest.mark.parametrize(
    "size",
    [
        (1140, 1000),  # between 512x512 and 576x448: the linear error picks the square, the log one would not
        (1000, 1140),
        (1500, 1000), (1000, 1500), (1920, 1080), (1080, 1920), (3000, 1000), (700, 2400), (640, 480),
        (1025, 1024),  # 1025 * 0.5 = 512.5: kohya rounds half up (513), Python's round() to even (512)
        (448, 576),  # exactly a bucket
        (4000, 300),
    ],
)  # fmt: skip
def test_bucket_and_resize_match_kohya(size):
    a = assign_bucket(size, BUCKETS_512, resolution=512)
    bucket, resized = _kohya_select(size, BUCKETS_512)
    assert (a.bucket, a.resized) == (bucket, resized)
    # trim_and_resize_if_required (train_util.py:2976-2985): centre crop = excess // 2
    assert a.crop == ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)


@pytest.mark.parametrize(
    "size", [(1500, 1000), (1000, 1500), (1920, 1080), (4000, 3000), (2000, 500), (600, 500), (700, 300), (1111, 777)]
)
def test_no_upscale_matches_kohya(size):
    a = assign_bucket(size, BUCKETS_512, resolution=512, no_upscale=True, step=64)
    bucket, resized = _kohya_select(size, BUCKETS_512, no_upscale=True)
    assert (a.bucket, a.resized) == (bucket, resized)
    assert a.crop == ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)


@settings(max_examples=300, deadline=None)
@given(size=sizes)
def test_random_sizes_match_kohya(size):
    a = assign_bucket(size, BUCKETS_512, resolution=512)
    assert (a.bucket, a.resized) == _kohya_select(size, BUCKETS_512)


def test_a_huge_max_side_gives_the_buckets_of_the_largest_side_that_has_any():
    """``--max-bucket-reso 1000000000000`` (a typo) walked 10^10 widths: ``sdcore data check`` and the training
    pre-flight hung. A width whose height within the area is below ``min_reso`` adds nothing; the walk stops there."""
    import signal

    def hung(*_):
        raise TimeoutError("make_buckets walked every width up to max_reso")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        assert make_buckets(512, max_reso=10**12) == make_buckets(512, max_reso=1024)
        assert make_buckets((768, 512), min_reso=64, max_reso=10**12, step=8) == make_buckets(
            (768, 512), min_reso=64, max_reso=768 * 512 // 64, step=8
        )
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

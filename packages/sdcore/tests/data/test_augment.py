"""kohya's image options in the data layer: color_aug, random_crop and the alpha / mask-image channels.

The references are written here from kohya's documented behaviour (library/train_util.py:
``AugHelper.color_aug``, ``trim_and_resize_if_required``, ``load_image``) and OpenCV's documented
8-bit HSV formulas, not from sdcore's code.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image
from sdcore.data.augment import (
    ColorAug,
    apply_color_aug,
    bgr_to_hsv,
    draw_color_aug,
    draw_crop,
    hsv_to_bgr,
    hue_shift,
)
from sdcore.data.buckets import BucketAssignment
from sdcore.data.dataset import ImageEntry, SubsetOptions
from sdcore.data.loading import load_training_channel, load_training_image


def _kohya_draws(rng: random.Random) -> ColorAug | None:
    """kohya's AugHelper.color_aug decisions, with ``random`` replaced by ``rng``."""
    if rng.random() <= 0.33:
        if rng.random() > 0.5:
            shift = rng.uniform(-8, 8)
            return ColorAug("hue", shift + 180 if shift < 0 else shift)
        return ColorAug("gamma", rng.uniform(0.95, 1.05))
    return None


def test_color_aug_draws_follow_kohya_order_and_rates():
    got = [draw_color_aug(random.Random(seed)) for seed in range(3000)]
    want = [_kohya_draws(random.Random(seed)) for seed in range(3000)]
    assert got == want
    changed = [a for a in got if a is not None]
    assert 0.30 < len(changed) / len(got) < 0.36  # p = 0.33
    hues = [a.value for a in changed if a.kind == "hue"]
    gammas = [a.value for a in changed if a.kind == "gamma"]
    assert 0.4 < len(hues) / len(changed) < 0.6
    assert all(0 <= h <= 8 or 172 <= h < 180 for h in hues)
    assert all(0.95 <= g <= 1.05 for g in gammas)


def test_gamma_is_applied_to_raw_0_255_values_and_truncated():
    rgb = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    for gamma in (0.95, 1.0, 1.05):
        out = apply_color_aug(rgb, ColorAug("gamma", gamma))
        want = np.floor(np.minimum(np.arange(256, dtype=np.float64) ** gamma, 255)).astype(np.uint8)
        assert np.array_equal(out[..., 0].reshape(-1), want)
    assert apply_color_aug(rgb, ColorAug("gamma", 0.95))[15, 15, 0] == 193  # white darkens (255 ** 0.95)
    assert apply_color_aug(rgb, None) is rgb


def _doc_hsv(bgr: np.ndarray) -> np.ndarray:
    """OpenCV's documented RGB->HSV (8-bit: H/2, S*255, V*255), in float64 and rounded."""
    b, g, r = (bgr[..., i].astype(np.float64) for i in range(3))
    v = np.maximum(np.maximum(b, g), r)
    mn = np.minimum(np.minimum(b, g), r)
    d = v - mn
    s = np.where(v > 0, d / np.maximum(v, 1), 0) * 255
    safe = np.maximum(d, 1)
    h = np.where(v == r, 60 * (g - b) / safe, np.where(v == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
    h = np.where(d == 0, 0, h)
    h = np.where(h < 0, h + 360, h)
    return np.stack([h / 2, s, v], -1)


def test_hsv_conversion_matches_opencv_documented_formulas():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    hsv = bgr_to_hsv(bgr).astype(np.float64)
    doc = _doc_hsv(bgr)
    hue_diff = np.abs(hsv[..., 0] - np.round(doc[..., 0]))
    hue_diff = np.minimum(hue_diff, 180 - hue_diff)  # 179.6 rounds to 180 == 0
    assert hue_diff.max() <= 1 and np.abs(hsv[..., 1:] - np.round(doc[..., 1:])).max() <= 1
    assert np.mean(hue_diff == 0) > 0.95
    # pure colours land exactly: red (B, G, R = 0, 0, 255) is hue 0, green 60, blue 120
    for bgr_px, h in (((0, 0, 255), 0), ((0, 255, 0), 60), ((255, 0, 0), 120)):
        assert bgr_to_hsv(np.array([[bgr_px]], dtype=np.uint8))[0, 0].tolist() == [h, 255, 255]
    # back to BGR: the textbook sectors (p, q, t) in float64, times 255, truncated like OpenCV's vector path
    hsv8 = rng.integers(0, [180, 256, 256], (64, 64, 3)).astype(np.uint8)
    h6, sf, vf = hsv8[..., 0] / 30.0, hsv8[..., 1] / 255.0, hsv8[..., 2] / 255.0
    sector = np.floor(h6).astype(int)
    f = h6 - sector
    p, q, t = vf * (1 - sf), vf * (1 - sf * f), vf * (1 - sf * (1 - f))
    r = np.choose(sector, [vf, q, p, p, t, vf])
    g = np.choose(sector, [t, vf, vf, q, p, p])
    b = np.choose(sector, [p, p, t, vf, vf, q])
    want = np.floor(np.stack([b, g, r], -1) * 255 + 1e-9)
    diff = np.abs(hsv_to_bgr(hsv8).astype(np.float64) - want)
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.95


def test_hue_shift_reads_the_rgb_array_as_bgr_like_kohya():
    """kohya passes RGB to cv2's BGR2HSV: a +8 step (16 degrees) moves *that* hue, i.e. pure red
    (read as blue, hue 120) goes to 128 in the BGR reading."""
    red = np.zeros((2, 2, 3), dtype=np.uint8)
    red[..., 0] = 255
    out = hue_shift(red, 8.0)
    assert bgr_to_hsv(out)[0, 0, 0] == 128
    assert np.array_equal(hue_shift(red, 0.0), red)
    # a negative draw is wrapped to 180 + shift before the modulo, as kohya does
    assert np.array_equal(apply_color_aug(red, ColorAug("hue", 180 - 8.0)), hue_shift(red, 172.0))


def test_random_crop_draws_width_then_height_inclusive():
    seen = {draw_crop(random.Random(s), (70, 64), (64, 64)) for s in range(400)}
    assert seen == {(left, 0) for left in range(7)}  # randint(0, 6): both ends reachable
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert draw_crop(rng_a, (80, 90), (64, 64)) == (rng_b.randint(0, 16), rng_b.randint(0, 26))
    assert draw_crop(random.Random(1), (64, 64), (64, 64)) == (0, 0)


def _entry(path, size, **subset):
    return ImageEntry(
        path=path,
        caption="",
        repeats=1,
        is_class=False,
        size=size,
        subset=SubsetOptions(image_dir=path.parent, **subset),
    )


def test_random_crop_position_and_coords(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    entry = _entry(tmp_path / "a.png", (80, 64))
    assignment = BucketAssignment((64, 64), (80, 64), (8, 0))
    centre, _, coords = load_training_image(entry, assignment, flip=False)
    assert coords == (0, 8)
    pixels, _, coords = load_training_image(entry, assignment, flip=False, crop=(3, 0))
    assert coords == (0, 3)
    want = array[:, 3:67].astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    assert np.array_equal(pixels, want)
    flipped, _, coords = load_training_image(entry, assignment, flip=True, crop=(3, 0))
    assert coords == (0, 80 - 3 - 64) and np.array_equal(flipped, want[:, :, ::-1])
    assert not np.array_equal(centre, pixels)


def test_alpha_mask_reads_rgb_as_stored_and_the_alpha_channel(tmp_path):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under a transparent left half
    rgba[:, 32:, 3] = 255
    rgba[:, :32, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assignment = BucketAssignment((64, 64), (64, 64), (0, 0))
    plain, _, _ = load_training_image(_entry(tmp_path / "a.png", (64, 64)), assignment, flip=False)
    stored, _, _ = load_training_image(_entry(tmp_path / "a.png", (64, 64), alpha_mask=True), assignment, flip=False)
    # off: composited on white (unchanged behaviour); alpha_mask: kohya's RGB as stored
    assert plain[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert stored[:, 0, 0].tolist() == pytest.approx([200 / 127.5 - 1, -1.0, -1.0])
    assert np.array_equal(stored[:, :, 40], plain[:, :, 40])
    alpha = load_training_channel(tmp_path / "a.png", assignment, channel=3, flip=True)
    assert alpha[:, :32].min() == 255 and alpha[:, 32:].max() == 0


def test_face_info_reads_kohyas_name_convention():
    from sdcore.data.augment import face_info

    assert face_info("/d/img_30_40_20_22.png") == (30, 40, 20, 22)
    assert face_info("my_cat_img_30_40_20_22.jpg") == (30, 40, 20, 22)
    assert face_info("img_0_40_20_22.png") is None  # kohya: no face when cx is 0
    assert face_info("a_30_40_20.png") is None and face_info("a_b_c_d_e.png") is None


def test_face_crop_puts_the_face_at_the_size_and_place_the_range_asks():
    from sdcore.data.augment import draw_face_crop, face_crop_range

    assert face_crop_range("2.0,4.0") == (2.0, 4.0) and face_crop_range([3, 3]) == (3.0, 3.0)
    assert face_crop_range("") is None
    for bad in ("4,2", "2", "0,1", "a,b"):
        with pytest.raises(ValueError):
            face_crop_range(bad)
    face = (300, 200, 80, 100)  # centre (300, 200), larger side 100, in a 600x400 image
    # fixed range 2: the face's larger side becomes half the target's shorter side: scale 0.32
    resized, (left, top) = draw_face_crop(random.Random(0), (600, 400), (64, 64), face, (2.0, 2.0), random_crop=False)
    assert resized == (192, 128)
    assert (left + 32, top + 32) == (int(300 * 0.32 + 0.5), int(200 * 0.32 + 0.5))  # the face is centred
    # an open range: the face's side lands between 1/4 and 1/2 of the target, the centre within face/20
    sizes = set()
    for seed in range(200):
        (w, h), (left, top) = draw_face_crop(
            random.Random(seed), (600, 400), (64, 64), face, (2.0, 4.0), random_crop=False
        )
        scale = w / 600
        assert 16 - 1 <= 100 * scale <= 32 + 1
        assert 0 <= left <= w - 64 and 0 <= top <= h - 64
        sizes.add(w)
    assert len(sizes) > 20
    # never upscales (scale <= 1) and covers the target (an image already at the target is kept)
    (w, h), _ = draw_face_crop(
        random.Random(1), (600, 400), (256, 256), (300, 200, 10, 10), (1.0, 1.0), random_crop=False
    )
    assert (w, h) == (600, 400)
    assert draw_face_crop(random.Random(1), (64, 64), (64, 64), face, (2.0, 4.0), random_crop=True) == (
        (64, 64),
        (0, 0),
    )
    # random_crop moves the crop around the face, inside the image
    spots = {
        draw_face_crop(random.Random(s), (600, 400), (64, 64), face, (2.0, 2.0), random_crop=True)[1]
        for s in range(100)
    }
    assert len(spots) > 50 and all(0 <= x <= 192 - 64 and 0 <= y <= 128 - 64 for x, y in spots)

"""OneTrainer's mask augmentations (:mod:`sdcore.data.mask_augment`) against mgds' algorithms rewritten here.

The references follow mgds (Nerogar/mgds ``RandomCircularMaskShrink``, ``RandomMaskRotateCrop``) step by step
in their own style (flat argmax over a ``(1, H, W)`` noise, linspace gradients, ascending/descending sequences
for the box, ``Random.uniform`` draws in mgds' order), and torchvision's tensor ``rotate`` as a per-pixel
inverse map with bilinear weights in numpy (not ``grid_sample``), never with sdcore's helpers.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runtime_methods import ConvOutMethod
from sdcore.data.mask_augment import MaskAug, augment_mask, circular_shrink, rotate
from sdcore.testing.contract import contract_options

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from test_onetrainer import concept  # the UI-saved concept object

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mgds_shrink(mask: np.ndarray, rand: random.Random) -> np.ndarray:
    """mgds' ``RandomCircularMaskShrink.get_item`` (factor 0.2..1) on a ``(1, H, W)`` mask."""
    t = torch.from_numpy(mask)
    g = torch.Generator().manual_seed(rand.randint(0, 1 << 30))
    noise = torch.rand(size=t.shape, generator=g, dtype=torch.float32)
    flat = torch.argmax(torch.flatten(noise * t)).item()
    cy, cx = flat // noise.shape[-1], flat % noise.shape[-1]
    h, w = t.shape[-2], t.shape[-1]
    v = torch.linspace(-cy, h - cy - 1, h) ** 2
    u = torch.linspace(-cx, w - cx - 1, w) ** 2
    grad = torch.sqrt(v.unsqueeze(1).expand(h, w) + u.unsqueeze(0).expand(h, w)).unsqueeze(0)
    radius = rand.uniform(0.2, 1.0) * (t * grad).max().item()
    return (t * (grad <= radius).float()).numpy()


def tv_rotate(img: np.ndarray, center: tuple[float, float], angle: float) -> np.ndarray:
    """torchvision's ``rotate(tensor, angle, BILINEAR, center=center)`` on ``[C, H, W]``: the inverse affine
    matrix of ``-angle`` about ``center - (w/2, h/2)``, pixel centres at ``+0.5``, bilinear, zeros outside."""
    _, h, w = img.shape
    r = math.radians(-angle)
    m = [math.cos(r), math.sin(r), 0.0, -math.sin(r), math.cos(r), 0.0]  # [d, -b, 0, -c, a, 0]
    cx, cy = center[0] - w * 0.5, center[1] - h * 0.5
    m[2] += m[0] * -cx + m[1] * -cy + cx
    m[5] += m[3] * -cx + m[4] * -cy + cy
    out = np.zeros_like(img, dtype=np.float64)
    for y in range(h):
        for x in range(w):
            bx, by = x + 0.5 - w * 0.5, y + 0.5 - h * 0.5
            sx = m[0] * bx + m[1] * by + m[2] + w * 0.5 - 0.5
            sy = m[3] * bx + m[4] * by + m[5] + h * 0.5 - 0.5
            x0, y0 = math.floor(sx), math.floor(sy)
            for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
                for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[:, y, x] += wy * wx * img[:, yy, xx]
    return out.astype(np.float32)


def mgds_region(mask: np.ndarray) -> tuple[float, float, float, float]:
    """mgds' ``__get_masked_region`` with its ascending/descending sequences."""
    h, w = mask.shape[-2:]
    rows = (mask.max(axis=-1) > 0.5).astype(np.float32).reshape(-1)
    cols = (mask.max(axis=-2) > 0.5).astype(np.float32).reshape(-1)
    y_min, y_max = h - (rows * np.arange(h, 0, -1)).max(), (rows * np.arange(h)).max()
    x_min, x_max = w - (cols * np.arange(w, 0, -1)).max(), (cols * np.arange(w)).max()
    if y_max < y_min or x_max < x_min:
        return 0, h, 0, w
    return float(y_min), float(y_max), float(x_min), float(x_max)


def mgds_rotate_crop(rand: random.Random, mask: np.ndarray, image: np.ndarray, min_size: int):
    """mgds' ``RandomMaskRotateCrop.__apply`` (20 degrees, 10..30 % padding) on ``(1, H, W)`` / ``(C, H, W)``."""
    mh, mw = mask.shape[-2:]
    y_min, y_max, x_min, x_max = mgds_region(mask)
    center = ((x_max + x_min) / 2, (y_max + y_min) / 2)
    angle = rand.uniform(-20, 20)
    mask, image = tv_rotate(mask, center, angle), tv_rotate(image, center, angle)
    y_min, y_max, x_min, x_max = mgds_region(mask)
    height, width = y_max - y_min, x_max - x_min
    min_ye, max_ye = (height / 0.9 - height) / 2, (height / 0.7 - height) / 2
    min_xe, max_xe = (width / 0.9 - width) / 2, (width / 0.7 - width) / 2
    y_min -= rand.uniform(min_ye, max_ye)
    y_max += rand.uniform(min_ye, max_ye)
    x_min -= rand.uniform(min_xe, max_xe)
    x_max += rand.uniform(min_xe, max_xe)
    area = (y_max - y_min) * (x_max - x_min)
    if area < min_size * min_size:
        scale = math.sqrt(min_size * min_size / area)
        ye, xe = (scale - 1) * (y_max - y_min), (scale - 1) * (x_max - x_min)
        y_min, y_max, x_min, x_max = y_min - ye, y_max + ye, x_min - xe, x_max + xe
    if y_min < 0:
        y_min, y_max = y_min - y_min, y_max - y_min
    if y_max > mh:
        shift = mh - y_max
        y_min, y_max = y_min + shift, y_max + shift
    if x_min < 0:
        x_min, x_max = x_min - x_min, x_max - x_min
    if x_max > mw:
        shift = mw - x_max
        x_min, x_max = x_min + shift, x_max + shift
    box = int(max(0, y_min)), int(min(mh, y_max)), int(max(0, x_min)), int(min(mw, x_max))
    return box, mask[..., box[0] : box[1], box[2] : box[3]], image[..., box[0] : box[1], box[2] : box[3]]


def _mask(h: int = 40, w: int = 56) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.float32)
    mask[9:27, 14:44] = 1.0
    mask[20:24, 30:34] = 0.5  # a grey patch: the point and radius weigh it
    return mask


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_circular_shrink_is_mgds(seed):
    mask = _mask()
    want = mgds_shrink(mask[None], random.Random(seed))[0]
    rand = random.Random(seed)
    got = circular_shrink(torch.from_numpy(mask), rand.randint(0, 1 << 30), rand.uniform(0.2, 1.0)).numpy()
    assert np.array_equal(got, want)
    assert 0 < got.sum() <= mask.sum()  # a disc inside the mask
    aug = MaskAug.draw(random.Random(seed), None, 32)
    assert aug is not None and np.array_equal(augment_mask(mask, aug).mask, want)


@pytest.mark.parametrize(("angle", "center"), [(13.7, (20.5, 17.0)), (-19.2, (31.0, 9.5))])
def test_rotate_is_torchvisions_bilinear_rotate(angle, center):
    image = np.random.default_rng(2).random((3, 14, 19)).astype(np.float32)
    got = rotate(torch.from_numpy(image), center, angle).numpy()
    assert np.allclose(got, tv_rotate(image, center, angle), atol=2e-5)
    square = torch.from_numpy(image[:, :13, :13].copy())  # 90 degrees about the centre: exactly rot90
    assert torch.allclose(rotate(square, (6.5, 6.5), 90.0), torch.rot90(square, 1, dims=(1, 2)), atol=1e-5)


@pytest.mark.parametrize(("seed", "min_size"), [(1, 8), (5, 30), (8, 48)])
def test_rotate_crop_is_mgds_on_mask_and_image(seed, min_size):
    mask = _mask()
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    box, want_mask, want_image = mgds_rotate_crop(
        random.Random(seed), mask[None], pixels.transpose(2, 0, 1).astype(np.float32), min_size
    )
    aug = MaskAug.draw(None, random.Random(seed), min_size)
    assert aug is not None
    geometry = augment_mask(mask, aug)
    assert geometry.box == box and geometry.cropped_size == (box[3] - box[2], box[1] - box[0])
    assert np.allclose(geometry.mask, want_mask[0], atol=2e-5)
    got = np.asarray(geometry.apply(Image.fromarray(pixels)), dtype=np.float32).transpose(2, 0, 1)
    assert np.abs(got - want_image).max() <= 0.5 + 1e-3  # rounded back to 8 bits
    if min_size == 48:  # the small box grew past min_size (mgds' 2 * scale - 1) and was clipped to the image
        assert box[1] - box[0] == 40 or box[3] - box[2] == 56


def _dataset(tmp_path: Path, **image_fields):
    folder = tmp_path / "imgs"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(folder / name)
        (folder / f"{Path(name).stem}.txt").write_text("a photo", encoding="utf-8")
        grey = np.zeros((64, 96), dtype=np.uint8)
        grey[20:44, 30:70] = 255
        Image.fromarray(grey, "L").save(folder / f"{Path(name).stem}-masklabel.png")
    fields = {f"image__{k}": v for k, v in image_fields.items()}
    cfg = tmp_path / "concepts.json"
    cfg.write_text(json.dumps([concept(folder, image__enable_crop_jitter=False, **fields)]), encoding="utf-8")
    return cfg


def test_importer_maps_the_fields_and_the_draws_repeat_with_the_seed(tmp_path):
    from sdcore.data.onetrainer import load_concepts
    from sdcore.train.data import SampleRef, build_train_data, load_mask, load_pixels
    from sdcore.train.options import TrainOptions

    cfg = _dataset(tmp_path, enable_random_circular_mask_shrink=True, enable_random_mask_rotate_crop=True)
    subsets = load_concepts(cfg, TrainOptions(resolution=64, masked_loss=True))
    assert (subsets[0].mask_shrink, subsets[0].mask_rotate_crop, subsets[0].mask_crop_min_size) == (True, True, 64)
    options = TrainOptions(
        data=str(cfg), resolution=64, masked_loss=True, seed=9, min_bucket_reso=64, max_bucket_reso=128
    )
    data = build_train_data(options, balance_class=False)
    ref = SampleRef(0, 0, 0)
    view = data.view_of(ref)
    assert view.augment is not None and view == data.view_of(ref)
    assert view != data.view_of(SampleRef(0, 0, 1))  # another epoch, another draw
    again = build_train_data(options, balance_class=False).view_of(ref)
    assert again == view and again.augment is not None and np.array_equal(again.augment.mask, view.augment.mask)
    shrink, rotate_rng = ref.rng(9, "mask-shrink"), ref.rng(9, "mask-rotate-crop")
    assert view.augment.key[-1] == MaskAug.draw(shrink, rotate_rng, 64)
    assert data.view_of(SampleRef(0, 0, -1)).augment is None  # evaluation refs: never augmented
    assignment = view.apply(data.assignments[0])
    pixels, _, _ = load_pixels(data.entries[0], assignment, flip=view.flip)
    mask = load_mask(data.entries[0], assignment, flip=view.flip)
    w, h = assignment.bucket
    assert pixels.shape == (3, h, w) and mask.shape == (h, w) and 0 < mask.sum() < mask.size


def test_preflight_refuses_cached_latents_and_notes_no_effect(tmp_path):
    from sdcore.train.preflight import run_preflight

    cfg = _dataset(tmp_path / "r", enable_random_mask_rotate_crop=True)
    values = {"data": str(cfg), "masked_loss": True, "max_bucket_reso": 128}
    o = contract_options(ConvOutMethod, tmp_path, values)
    report = run_preflight(ConvOutMethod(o), o, plan=False)
    assert any("mask_rotate_crop" in p and "--no-cache-latents" in p for p in report.problems)
    o = contract_options(ConvOutMethod, tmp_path, {**values, "cache_latents": False}, tag="nocache")
    assert not any("mask_" in p for p in run_preflight(ConvOutMethod(o), o, plan=False).problems)


def test_preflight_keeps_cached_latents_for_a_shrunk_loss_mask_and_notes_no_effect(tmp_path):
    from sdcore.train.preflight import run_preflight

    values = {"masked_loss": True, "max_bucket_reso": 128}
    cfg = _dataset(tmp_path / "s", enable_random_circular_mask_shrink=True)  # the loss mask alone: cacheable
    o = contract_options(ConvOutMethod, tmp_path, {**values, "data": str(cfg)}, tag="shrink")
    assert not any("mask_" in p for p in run_preflight(ConvOutMethod(o), o, plan=False).problems)
    o = contract_options(ConvOutMethod, tmp_path, {"data": str(cfg), "max_bucket_reso": 128}, tag="plain")
    report = run_preflight(ConvOutMethod(o), o, plan=False)  # no masked training, no mask input: nothing
    assert any("do nothing" in n and "mask input" in n for n in report.notes)


def _alpha_dataset(tmp_path: Path, size: tuple[int, int] = (192, 128)) -> Path:
    """A kohya folder of one RGBA image (``alpha_mask``) with a 24x20 opaque patch: the rotated crop is small."""
    folder = tmp_path / "2_imgs"
    folder.mkdir(parents=True)
    w, h = size
    rgba = np.random.default_rng(6).integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[50:74, 80:100, 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    (folder / "a.txt").write_text("a photo", encoding="utf-8")
    return tmp_path


def test_rotate_crop_min_size_is_the_lowest_of_the_run_resolutions(tmp_path):
    """OneTrainer's ``min_size=lowest_resolution``, the smallest number of its ``resolution`` list, for every
    sample (DataLoaderText2ImageMixin.py:139-141), whichever of the list a sample trains at: with
    ``--resolutions 64,128`` the image's entry at 128 crops at least 64x64 too, not 128x128."""
    from sdcore.train.data import SampleRef, build_train_data
    from sdcore.train.options import TrainOptions

    options = TrainOptions(
        data=str(_alpha_dataset(tmp_path)), resolutions="64,128", alpha_mask=True, mask_rotate_crop=True, seed=3,
        min_bucket_reso=64, max_bucket_reso=256,
    )  # fmt: skip
    data = build_train_data(options, balance_class=False)
    sizes = sorted(entry.subset.resolution for entry in data.entries)
    assert sizes == [64, 128]
    for i in range(len(data.entries)):
        augment = data.view_of(SampleRef(i, 0, 0)).augment
        assert augment is not None and augment.key[-1].min_size == 64
        w, h = augment.cropped_size  # grown past 64x64 (mgds' 2 * scale - 1 growth), still under 128x128
        assert 64 * 64 <= w * h < 128 * 128


def test_sdxl_original_size_of_a_rotated_crop_is_the_crops(tmp_path):
    """OneTrainer measures ``original_resolution`` (CalcAspect of the image) after the mask augmentations
    (DataLoaderText2ImageMixin.py:_create_dataset: mask_augmentation before aspect_bucketing_in) and SDXL's
    time ids read it (BaseStableDiffusionXLSetup.py:243-244): the cropped region's (h, w), not the file's."""
    from sdcore.train.data import SampleRef, build_train_data, load_pixels
    from sdcore.train.options import TrainOptions

    options = TrainOptions(
        data=str(_alpha_dataset(tmp_path)), resolution=64, alpha_mask=True, mask_rotate_crop=True, seed=3,
        min_bucket_reso=64, max_bucket_reso=128,
    )  # fmt: skip
    data = build_train_data(options, balance_class=False)
    view = data.view_of(SampleRef(0, 0, 0))
    assert view.augment is not None
    w, h = view.augment.cropped_size
    assert (w, h) != (192, 128)
    pixels, original, _ = load_pixels(data.entries[0], view.apply(data.assignments[0]), flip=view.flip)
    assert original == (h, w) and pixels.shape[1:] == tuple(reversed(data.assignments[0].bucket))
    plain = data.view_of(SampleRef(0, 0, -1))  # no augmentation: the file's size, as before
    assert load_pixels(data.entries[0], plain.apply(data.assignments[0]), flip=False)[1] == (128, 192)

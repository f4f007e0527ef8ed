"""kohya's image options in the runtime: dataset loss masks (``alpha_mask``, ``--masked-loss`` mask
images), ``random_crop`` and ``color_aug`` per sample, and their pre-flight problems.

The reference masks are computed here with kohya's formula (``apply_masked_loss``: the mask times
the element-wise loss, resized by area averaging to the latent size, no renormalisation), from the
image's pixels with numpy slicing, not with sdcore's loaders.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from runtime_methods import ConvOutMethod
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.testing.datasets import make_tiny_dataset
from sdcore.train.data import SampleRef, image_option_problems
from sdcore.train.loop import TrainSession
from sdcore.train.preflight import run_preflight


def _area(mask: np.ndarray, factor: int = 8) -> np.ndarray:
    """Area averaging by an integer factor (what ``interpolate(mode="area")`` is for exact multiples)."""
    h, w = mask.shape
    return mask.astype(np.float64).reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _alpha_dataset(root, *, width=64):
    """Two 64x``width`` RGBA images; image 0 is transparent on its left half and half-opaque in a band."""
    data = make_tiny_dataset(root, n=2, size=(width, 64), repeats=1)
    folder = data / "1_sks"
    rgba = np.array(Image.open(folder / "000.png").convert("RGBA"))
    rgba[..., 3] = 255
    rgba[:, : width // 2, 3] = 0
    rgba[40:48, width // 2 :, 3] = 128
    Image.fromarray(rgba, "RGBA").save(folder / "000.png")
    return data, rgba[..., 3].copy()


def _session(tmp_path, data, **kw):
    values = {"data": str(data), "batch_size": 1, "flip": True, "max_bucket_reso": 64}
    values.update(kw)
    o = contract_options(ConvOutMethod, tmp_path, values)
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    return s


def _refs(session, name, count=8):
    index = [e.path.name for e in session.data.entries].index(name)
    return [SampleRef(index, 0, epoch) for epoch in range(count)]


def test_alpha_mask_at_latent_size_is_kohyas_formula_and_flips_with_the_image(tmp_path):
    data, alpha = _alpha_dataset(tmp_path / "d")
    s = _session(tmp_path, data, alpha_mask=True)
    refs = _refs(s, "000.png")
    flips = [s.data.flip_of(r) for r in refs]
    assert True in flips and False in flips
    want = _area(alpha.astype(np.float32) / 255.0)
    for ref, flipped in zip(refs, flips, strict=True):
        mask = s.make_batch([ref]).masks[0, 0].double().numpy()
        expected = want[:, ::-1] if flipped else want
        assert np.allclose(mask, expected, atol=1e-7)
    assert float(want[5, 6]) == pytest.approx(128 / 255)  # the half-opaque band is kept, not binarised
    # the other image (opaque, so alpha 255 everywhere) gets ones, as kohya fills missing masks
    other = s.make_batch([_refs(s, "001.png", 1)[0]]).masks
    assert torch.equal(other, torch.ones_like(other))


def test_masked_loss_mask_images_use_the_red_channel_and_the_image_geometry(tmp_path):
    data = make_tiny_dataset(tmp_path / "d", n=2, size=(80, 64), repeats=1)  # resized to 80x64, centre-cropped
    masks = tmp_path / "masks"
    masks.mkdir()
    rng = np.random.default_rng(3)
    red = {}
    for name in ("000", "001"):
        rgb = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(masks / f"{name}.png")
        red[name] = rgb[..., 0]
    s = _session(tmp_path, data, masked_loss=True, conditioning_data_dir=str(masks))
    for name in ("000", "001"):
        for ref in _refs(s, f"{name}.png", 4):
            assignment = s.data.assignments[ref.entry]
            assert assignment.resized == (80, 64) and assignment.bucket == (64, 64)
            left = assignment.crop[0]
            # kohya: ToTensor, Normalize(0.5, 0.5), then / 2 + 0.5, all float32
            t = red[name][:, left : left + 64].astype(np.float32) / np.float32(255)
            pixel = ((t - np.float32(0.5)) / np.float32(0.5)) / np.float32(2) + np.float32(0.5)
            want = _area(pixel)
            if s.data.flip_of(ref):
                want = want[:, ::-1]
            assert np.allclose(s.make_batch([ref]).masks[0, 0].double().numpy(), want, atol=1e-7)


def test_a_mask_that_zeroes_half_the_image_zeroes_those_latents_gradient_exactly(tmp_path):
    data, _ = _alpha_dataset(tmp_path / "d")
    s = _session(tmp_path, data, alpha_mask=True, flip=False)
    batch = s.make_batch(_refs(s, "000.png", 1))
    captured = {}

    def hook(module, args, output):
        pred = output[0] if isinstance(output, tuple) else output.sample
        pred.retain_grad()
        captured["pred"] = pred

    handle = s.bundle.unet.register_forward_hook(hook)
    try:
        noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(0))
        loss = s.sample_loss(batch, noise, torch.tensor([500]), 0)
        loss.sum().backward()
    finally:
        handle.remove()
    grad = captured["pred"].grad
    assert grad is not None and grad.shape[-1] == 8
    assert torch.count_nonzero(grad[..., :4]) == 0  # the transparent half: exactly zero
    assert torch.count_nonzero(grad[..., 4:]) == grad[..., 4:].numel()
    # the trainable weights still learn from the visible half
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.bundle.unet.conv_out.parameters())


class _TwiceMethod(ConvOutMethod):
    """A method whose own loss map weights everything 2x (to see the product with the dataset mask)."""

    def loss_mask(self, entry, assignment, *, flipped, latent_size):
        return torch.full((1, *latent_size), 2.0)


def test_dataset_masks_multiply_the_methods_masks(tmp_path):
    data, alpha = _alpha_dataset(tmp_path / "d")
    o = contract_options(
        _TwiceMethod, tmp_path, {"data": str(data), "batch_size": 1, "alpha_mask": True, "max_bucket_reso": 64}
    )
    s = TrainSession(_TwiceMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    mask = s.make_batch(_refs(s, "000.png", 1)).masks[0, 0].double().numpy()
    assert np.allclose(mask, 2 * _area(alpha.astype(np.float32) / 255.0), atol=1e-7)
    plain = contract_options(_TwiceMethod, tmp_path, {"data": str(data), "batch_size": 1, "max_bucket_reso": 64})
    s2 = TrainSession(_TwiceMethod(plain), bundle=create_tiny_bundle("sd1"))
    s2.setup()
    assert torch.equal(s2.make_batch(_refs(s2, "000.png", 1)).masks, torch.full((1, 1, 8, 8), 2.0))


def test_random_crop_and_color_aug_draw_per_sample_and_reach_the_pixels(tmp_path):
    data = make_tiny_dataset(tmp_path / "d", n=2, size=(96, 64), repeats=1)
    s = _session(tmp_path, data, random_crop=True, color_aug=True, cache_latents=False, flip=False)
    refs = _refs(s, "000.png", 60)
    crops = [s.data.crop_of(r) for r in refs]
    assert s.data.assignments[refs[0].entry].resized == (96, 64)
    assert {c[1] for c in crops} == {0} and len({c[0] for c in crops}) > 10
    assert all(0 <= c[0] <= 32 for c in crops)
    # the same sample draws the same view whatever batch it is in; evaluation refs are not augmented
    assert s.data.view_of(refs[3]) == s.data.view_of(SampleRef(refs[3].entry, 0, 3))
    assert s.data.crop_of(SampleRef(refs[0].entry, 0, -1)) is None
    assert s.data.color_of(SampleRef(refs[0].entry, 0, -1)) is None
    colours = [s.data.color_of(r) for r in refs]
    assert any(c is not None for c in colours) and any(c is None for c in colours)
    batch = s.make_batch(refs[:1])
    top, left = batch.crop_coords[0]
    assert (top, left) == (0, crops[0][0])  # SDXL's crop conditioning gets the real crop
    pixels, _, _ = s.batches.pixels(refs[0].entry, s.data.view_of(refs[0]))
    array = np.array(Image.open(data / "1_sks" / "000.png").convert("RGB"))[:, left : left + 64]
    from sdcore.data.augment import apply_color_aug

    want = apply_color_aug(array, colours[0]).astype(np.float32).transpose(2, 0, 1) / 127.5 - 1
    assert np.array_equal(pixels, want)


def test_options_off_draw_nothing_new(tmp_path):
    s = _session(tmp_path, make_tiny_dataset(tmp_path / "d", n=2, size=64))
    for ref in _refs(s, "000.png", 4):
        view = s.data.view_of(ref)
        assert view.crop is None and view.color is None and view.flip == s.data.flip_of(ref)


def _problems(tmp_path, data, **kw):
    values = {"data": str(data), "max_bucket_reso": 64}
    values.update(kw)
    o = contract_options(ConvOutMethod, tmp_path, values)
    return run_preflight(ConvOutMethod(o), o, plan=False).problems


def test_preflight_lists_missing_extra_and_mismatched_mask_images(tmp_path):
    data = make_tiny_dataset(tmp_path / "d", n=4, size=64, repeats=1)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 64), 255).save(masks / "000.png")
    Image.new("L", (32, 64), 255).save(masks / "001.png")  # wrong size
    Image.new("L", (64, 64), 255).save(masks / "stray.png")  # no such image
    problems = _problems(tmp_path, data, masked_loss=True, conditioning_data_dir=str(masks))
    text = "\n".join(problems)
    assert "2 image(s) without a mask image" in text
    assert "002.png" in text and "003.png" in text
    assert "001.png is 32x64, its image 64x64" in text
    assert "stray.png" in text and "match no training image" in text
    for name in ("002", "003"):
        Image.new("L", (64, 64), 0).save(masks / f"{name}.png")
    Image.new("L", (64, 64), 0).save(masks / "001.png")
    (masks / "stray.png").unlink()
    assert _problems(tmp_path, data, masked_loss=True, conditioning_data_dir=str(masks)) == []


def test_preflight_refuses_what_kohya_refuses(tmp_path):
    tiny_data = make_tiny_dataset(tmp_path / "d", n=4, size=64)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(4):
        Image.new("L", (64, 64), 255).save(masks / f"{i:03d}.png")
    text = "\n".join(_problems(tmp_path, tiny_data, random_crop=True))
    assert "random_crop" in text and "--no-cache-latents" in text
    text = "\n".join(_problems(tmp_path, tiny_data, color_aug=True))
    assert "color_aug" in text and "--no-cache-latents" in text
    assert _problems(tmp_path, tiny_data, random_crop=True, color_aug=True, cache_latents=False) == []
    assert "add --masked-loss" in "\n".join(_problems(tmp_path, tiny_data, conditioning_data_dir=str(masks)))
    assert "--masked-loss has no masks" in "\n".join(_problems(tmp_path, tiny_data, masked_loss=True))
    both = _problems(
        tmp_path,
        tiny_data,
        masked_loss=True,
        conditioning_data_dir=str(masks),
        random_crop=True,
        alpha_mask=True,
        cache_latents=False,
    )
    assert any("random_crop with mask images" in p for p in both)
    assert any("alpha_mask and conditioning_data_dir" in p for p in both)
    missing = "\n".join(_problems(tmp_path, tiny_data, masked_loss=True, conditioning_data_dir=str(tmp_path / "no")))
    assert "not a folder" in missing


def test_dataset_toml_subsets_carry_the_options(tmp_path):
    tiny_data = make_tiny_dataset(tmp_path / "d", n=4, size=64)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(4):
        Image.new("L", (64, 64), 255).save(masks / f"{i:03d}.png")
    config = tmp_path / "ds.toml"
    config.write_text(
        "[general]\ncolor_aug = true\n[[datasets]]\nrandom_crop = true\n[[datasets.subsets]]\n"
        f"image_dir = '{tiny_data / '1_sks'}'\nconditioning_data_dir = 'masks'\n"
    )
    o = contract_options(ConvOutMethod, tmp_path, {"data": str(config), "masked_loss": True, "cache_latents": False})
    from sdcore.data.dataset import build_dataset_index

    index = build_dataset_index(o)
    subset = index.entries[0].subset
    assert (subset.color_aug, subset.random_crop, subset.conditioning_data_dir) == (True, True, masks)
    problems = image_option_problems(o, index)
    assert len(problems) == 1 and "random_crop with mask images" in problems[0]
    fixed = dataclasses.replace(o)
    config.write_text(config.read_text().replace("random_crop = true", "random_crop = false"))
    assert image_option_problems(fixed, build_dataset_index(fixed)) == []


def test_face_crop_resizes_and_crops_around_the_named_face(tmp_path):
    folder = tmp_path / "d" / "1_sks"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    big = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(big).save(folder / "face_160_128_64_64.png")
    Image.fromarray(big[:64, :64]).save(folder / "plain.png")
    s = _session(
        tmp_path,
        tmp_path / "d",
        face_crop_aug_range="2.0,2.0",
        buckets=False,
        cache_latents=False,
        flip=False,
        min_bucket_reso=64,
    )
    ref = _refs(s, "face_160_128_64_64.png", 1)[0]
    view = s.data.view_of(ref)
    # scale max(64/256, 64/(64*2)) = 0.5 -> 128x128; the face centre (80, 64) is the crop's centre
    assert view.resized == (128, 128) and view.crop == (80 - 32, 64 - 32)
    pixels, _, coords = s.batches.pixels(ref.entry, view)
    want = np.asarray(Image.fromarray(big).resize((128, 128), Image.Resampling.BOX))[32:96, 48:112]
    assert coords == (32, 48)
    assert np.array_equal(pixels, want.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1)
    assert s.data.view_of(_refs(s, "plain.png", 1)[0]).resized is None  # no face in the name: unchanged


def test_preflight_face_crop_needs_buckets_off_no_cache_and_big_enough_images(tmp_path):
    folder = tmp_path / "d" / "1_sks"
    folder.mkdir(parents=True)
    Image.new("RGB", (256, 256)).save(folder / "face_160_128_64_64.png")
    Image.new("RGB", (48, 48)).save(folder / "small_20_20_10_10.png")
    text = "\n".join(_problems(tmp_path, tmp_path / "d", face_crop_aug_range="2,4", resolution=64))
    assert "add --no-buckets" in text
    text = "\n".join(_problems(tmp_path, tmp_path / "d", face_crop_aug_range="2,4", resolution=64, buckets=False))
    assert "face_crop_aug_range change(s) the pixels" in text and "--no-cache-latents" in text
    assert "1 image(s) smaller than the resolution 64" in text and "small_20_20_10_10.png (48x48)" in text
    assert "must be two numbers" in "\n".join(_problems(tmp_path, tmp_path / "d", face_crop_aug_range="2"))

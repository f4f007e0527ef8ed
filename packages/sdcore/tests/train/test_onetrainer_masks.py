"""OneTrainer's masked training in sdcore: the ``-masklabel.png`` pairing of a concepts file, the masks'
geometry and values at latent size, OneTrainer's loss rule, and ``sdcore data check``'s counts.

The expected values are OneTrainer's rules rewritten here from its source (Nerogar/OneTrainer, mirror HEAD
23df3832; mgds HEAD 3a6994ad), never with sdcore's own helpers:

- the mask of ``x.<ext>`` is ``x-masklabel.png`` (``ModifyPath(postfix='-masklabel', extension='.png')``),
  read greyscale ``/ 255`` (``LoadImage(channels=1)``); a missing one is all ones (``GenerateImageLike``
  with 255, which ``LoadImage``'s ``None`` falls back to);
- the mask is scaled, cropped and flipped with its image (``ScaleCropImage``, ``RandomFlip`` over
  ``['image', 'mask']``), then shrunk to latent size by ``ScaleImage(factor=0.125)``: torchvision's
  ``Resize(BILINEAR, antialias=True)``, the filter PIL's ``BILINEAR`` resize is (a triangle filter
  stretched by the scale), which is the reference below;
- ``masked_losses``: ``m = clamp(mask, unmasked_weight, 1)``, ``loss * m``, divided by ``m.mean((1, 2, 3))``
  with ``normalize_masked_area_loss``, then ``.mean`` over the sample (``__masked_losses``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runtime_methods import ConvOutMethod
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.data import SampleRef, clamp_unmasked, mask_to_latent, weigh_by_mask

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from test_onetrainer import concept  # the UI-saved concept object

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def onetrainer_sample_loss(loss: np.ndarray, mask: np.ndarray, unmasked_weight: float, normalize: bool) -> np.ndarray:
    """OneTrainer's per-sample masked loss (``masked_losses`` then ``.mean``) for ``loss [B, C, h, w]`` and
    ``mask [B, 1, h, w]``, in float64."""
    m = np.clip(mask.astype(np.float64), unmasked_weight, 1.0)
    weighted = loss.astype(np.float64) * m
    if normalize:
        weighted = weighted / m.mean(axis=(1, 2, 3), keepdims=True)
    return weighted.mean(axis=(1, 2, 3))


def pil_bilinear(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask [H, W]`` shrunk to ``size (h, w)`` by PIL's antialiased bilinear filter (float32 image)."""
    image = Image.fromarray(mask.astype(np.float32), "F").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float64)


@pytest.mark.parametrize(("weight", "normalize"), [(0.0, False), (0.1, False), (0.1, True), (0.35, True)])
def test_weigh_by_mask_is_onetrainers_masked_losses(weight, normalize):
    gen = torch.Generator().manual_seed(7)
    loss = torch.rand(3, 4, 6, 5, generator=gen) * 2
    mask = torch.rand(3, 1, 6, 5, generator=gen)
    mask[1] = 0.0  # nothing masked in: the weight alone (or 0 without one)
    mask[2, :, :3] = 1.0
    got = weigh_by_mask(loss, clamp_unmasked(mask, weight), normalize=normalize).mean(dim=(1, 2, 3))
    want = onetrainer_sample_loss(loss.numpy(), mask.numpy(), weight, normalize)
    assert np.allclose(got.double().numpy(), want, rtol=1e-6, atol=1e-7)
    if weight == 0.0 and not normalize:  # kohya's apply_masked_loss: loss * mask, nothing else
        assert torch.equal(weigh_by_mask(loss, mask), loss * mask)


def test_an_empty_mask_normalised_gives_zero_not_nan():
    loss = torch.ones(2, 4, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[1, :, :2] = 1.0
    got = weigh_by_mask(loss, mask, normalize=True).mean(dim=(1, 2, 3))
    assert got[0].item() == 0.0  # OneTrainer divides 0 by 0 here (NaN); sdcore keeps the zero loss
    assert got[1].item() == pytest.approx(1.0)  # mean(loss * m) / mean(m) = (1/2) / (1/2)


def test_bilinear_mask_filter_is_the_antialiased_bilinear_resize():
    rng = np.random.default_rng(5)
    mask = rng.random((48, 80)).astype(np.float32)
    mask[:, :30] = 0.0
    got = mask_to_latent(mask, (6, 10), "bilinear")[0].double().numpy()
    assert np.allclose(got, pil_bilinear(mask, (6, 10)), atol=1e-5)
    area = mask_to_latent(mask, (6, 10))[0].double().numpy()  # kohya's area mean, unchanged by default
    assert np.allclose(area, mask.astype(np.float64).reshape(6, 8, 10, 8).mean(axis=(1, 3)), atol=1e-6)
    assert not np.allclose(got, area, atol=1e-3)  # the two filters do differ at the mask's edge


def _masked_concepts(tmp_path: Path, *, width: int = 64, jitter: bool = False, flip: bool = False):
    """A concept of three images: ``a.png`` (grey mask, right half 1, a 0.5 band), ``b.jpg`` (its mask is
    ``b-masklabel.png``), ``c.png`` with no mask (and a ``c-masklabel.jpg`` OneTrainer does not read)."""
    folder = tmp_path / "imgs"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    masks = {}
    for name in ("a.png", "b.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 256, (64, width, 3), dtype=np.uint8)).save(folder / name)
        (folder / f"{Path(name).stem}.txt").write_text("a photo", encoding="utf-8")
    grey = np.zeros((64, width), dtype=np.uint8)
    grey[:, width // 2 :] = 255
    grey[8:40, :] = 128
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(folder / "a-masklabel.png")  # grey RGB, as its editor
    masks["a.png"] = grey
    noise = rng.integers(0, 256, (64, width), dtype=np.uint8)
    Image.fromarray(noise, "L").save(folder / "b-masklabel.png")
    masks["b.jpg"] = noise
    Image.fromarray(np.zeros((64, width), dtype=np.uint8), "L").save(folder / "c-masklabel.jpg")
    cfg = tmp_path / "concepts.json"
    cfg.write_text(
        json.dumps([concept(folder, image__enable_crop_jitter=jitter, image__enable_random_flip=flip)]),
        encoding="utf-8",
    )
    return cfg, folder, masks


def _session(tmp_path, data, **kw):
    from sdcore.train.loop import TrainSession

    values = {"data": str(data), "batch_size": 1, "max_bucket_reso": 64}
    values.update(kw)
    o = contract_options(ConvOutMethod, tmp_path, values)
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    return s


def _ref(s, name: str, epoch: int = 0) -> SampleRef:
    return SampleRef([e.path.name for e in s.data.entries].index(name), 0, epoch)


def test_masklabel_pairing_values_and_missing_masks(tmp_path):
    cfg, _, masks = _masked_concepts(tmp_path)
    s = _session(tmp_path, cfg, masked_loss=True)
    assert sorted(e.path.name for e in s.data.entries) == ["a.png", "b.jpg", "c.png"]  # masks never train
    for name in ("a.png", "b.jpg"):
        got = s.make_batch([_ref(s, name)]).masks[0, 0].double().numpy()
        assert np.allclose(got, pil_bilinear(masks[name].astype(np.float32) / 255, (8, 8)), atol=1e-5), name
    got = s.make_batch([_ref(s, "a.png")]).masks[0, 0]
    assert float(got[2, 0]) == pytest.approx(128 / 255, abs=1e-6)  # inside the grey band: kept, not binarised
    # no c-masklabel.png: the whole image (the .jpg is not read): ones beside a masked sample, no mask alone
    assert s.make_batch([_ref(s, "c.png")]).masks is None
    full = s.make_batch([_ref(s, "a.png"), _ref(s, "c.png")]).masks[1]
    assert torch.equal(full, torch.ones_like(full))
    plain = _session(tmp_path, cfg)  # masked training off: the mask files are ignored, as in OneTrainer
    assert plain.make_batch([_ref(plain, "a.png")]).masks is None


def test_masks_follow_the_random_crop_and_flip(tmp_path):
    cfg, _, masks = _masked_concepts(tmp_path, width=96, jitter=True, flip=True)
    s = _session(tmp_path, cfg, masked_loss=True, cache_latents=False)
    seen_flips, seen_crops = set(), set()
    for epoch in range(12):
        ref = _ref(s, "b.jpg", epoch)
        view = s.data.view_of(ref)
        left = view.crop[0] if view.crop is not None else s.data.assignments[ref.entry].crop[0]
        want = masks["b.jpg"][:, left : left + 64].astype(np.float32) / 255
        if view.flip:
            want = want[:, ::-1]
        seen_flips.add(view.flip)
        seen_crops.add(left)
        got = s.make_batch([ref]).masks[0, 0].double().numpy()
        assert np.allclose(got, pil_bilinear(np.ascontiguousarray(want), (8, 8)), atol=1e-5), epoch
    assert seen_flips == {True, False} and len(seen_crops) > 3


def test_cached_latents_get_the_centre_crop_mask(tmp_path):
    cfg, _, masks = _masked_concepts(tmp_path, width=96)  # crop jitter off: latents are cached
    s = _session(tmp_path, cfg, masked_loss=True)
    assert s.batches.latent_cache is not None
    ref = _ref(s, "b.jpg")
    assert s.data.assignments[ref.entry].crop == (16, 0)  # centre of the 96-wide resize
    want = pil_bilinear(masks["b.jpg"][:, 16:80].astype(np.float32) / 255, (8, 8))
    assert np.allclose(s.make_batch([ref]).masks[0, 0].double().numpy(), want, atol=1e-5)


def test_the_step_loss_is_onetrainers_masked_loss(tmp_path):
    """A fixed batch through the tiny SD1 model: the loss ``sample_loss`` returns equals OneTrainer's
    ``mean(mse * m) / mean(m)`` on the prediction it made, with ``m`` the clamped latent mask."""
    cfg, _, masks = _masked_concepts(tmp_path)
    s = _session(
        tmp_path, cfg, masked_loss=True, masked_loss_unmasked_weight=0.2, masked_loss_normalize=True, flip=False
    )
    batch = s.make_batch([_ref(s, "a.png"), _ref(s, "c.png")])
    captured = {}

    def hook(module, args, output):
        captured["pred"] = (output[0] if isinstance(output, tuple) else output.sample).detach()

    handle = s.bundle.unet.register_forward_hook(hook)
    try:
        noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(0))
        loss = s.sample_loss(batch, noise, torch.tensor([300, 700]), 0)
    finally:
        handle.remove()
    mse = (captured["pred"].double() - noise.double()).numpy() ** 2  # epsilon prediction: the target is the noise
    mask = np.stack([pil_bilinear(masks["a.png"].astype(np.float32) / 255, (8, 8)), np.ones((8, 8))])[:, None]
    want = onetrainer_sample_loss(mse, mask, 0.2, True)
    assert np.allclose(loss.detach().double().numpy(), want, rtol=1e-5)
    # at the defaults (kohya's loss * mask) the same prediction gives the unclamped, unnormalised loss
    k = _session(tmp_path / "k", cfg, masked_loss=True, flip=False)
    kohya = k.sample_loss(k.make_batch([_ref(k, "a.png"), _ref(k, "c.png")]), noise, torch.tensor([300, 700]), 0)
    assert np.allclose(kohya.detach().double().numpy(), onetrainer_sample_loss(mse, mask, 0.0, False), rtol=1e-5)


class _TwiceMethod(ConvOutMethod):
    """A method whose own loss map weighs everything 2x."""

    def loss_mask(self, entry, assignment, *, flipped, latent_size):
        return torch.full((1, *latent_size), 2.0)


def test_the_clamp_applies_to_the_dataset_mask_not_the_methods_map(tmp_path):
    from sdcore.train.loop import TrainSession

    cfg, _, masks = _masked_concepts(tmp_path)
    values = {"data": str(cfg), "batch_size": 1, "max_bucket_reso": 64, "flip": False}
    o = contract_options(_TwiceMethod, tmp_path, {**values, "masked_loss": True, "masked_loss_unmasked_weight": 0.3})
    s = TrainSession(_TwiceMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    got = s.make_batch([_ref(s, "a.png")]).masks[0, 0].double().numpy()
    want = 2 * np.clip(pil_bilinear(masks["a.png"].astype(np.float32) / 255, (8, 8)), 0.3, 1.0)
    assert np.allclose(got, want, atol=1e-5) and got.min() == pytest.approx(0.6, abs=1e-6)


def test_data_check_counts_masks(tmp_path):
    from sdcore.data.check import check_dataset
    from sdcore.train.options import TrainOptions

    cfg, _, _ = _masked_concepts(tmp_path)
    report = check_dataset(cfg, TrainOptions(masked_loss=True))
    assert (report.images, report.masks, report.unmasked) == (3, 2, ["imgs/c.png"])
    assert "2 image(s) with one, 1 without" in report.to_text()
    assert report.to_dict()["masks"] == {"with_mask": 2, "without_mask": ["imgs/c.png"]}
    assert check_dataset(cfg).masks is None  # masked training off: nothing paired
    preset = tmp_path / "preset.json"  # a training preset with masked_training counts them without the flag
    fields = {"training_method": "LORA", "model_type": "STABLE_DIFFUSION_15", "masked_training": True}
    preset.write_text(json.dumps({**fields, "concept_file_name": str(cfg)}), encoding="utf-8")
    assert check_dataset(preset).masks == 2


def test_a_preset_as_data_pairs_its_conditioning_images(tmp_path):
    """A training preset with custom_conditioning_image given as --data (or to `sdcore data check`) pairs each
    image's -condlabel.png as the run would (OneTrainer reads them with the preset's setting); its concepts
    file alone, or the preset with the switch off, pairs none."""
    from sdcore.data.dataset import CONDITIONING_SUFFIX
    from sdcore.data.onetrainer import load_concepts

    cfg, _, _ = _masked_concepts(tmp_path)
    preset = tmp_path / "preset.json"
    fields = {"training_method": "LORA", "model_type": "STABLE_DIFFUSION_15_INPAINTING"}
    for on, want in ((True, CONDITIONING_SUFFIX), (False, None)):
        body = {**fields, "custom_conditioning_image": on, "concept_file_name": str(cfg)}
        preset.write_text(json.dumps(body), encoding="utf-8")
        assert [s.conditioning_suffix for s in load_concepts(preset)] == [want]
    assert [s.conditioning_suffix for s in load_concepts(cfg)] == [None]


def test_preflight_problems_of_the_mask_options(tmp_path):
    from sdcore.testing.datasets import make_tiny_dataset
    from sdcore.train.preflight import run_preflight

    data = make_tiny_dataset(tmp_path / "d", n=2, size=64)
    o = contract_options(
        ConvOutMethod, tmp_path, {"data": str(data), "max_bucket_reso": 64, "masked_loss_normalize": True}
    )
    text = "\n".join(run_preflight(ConvOutMethod(o), o, plan=False).problems)
    assert "--masked-loss-normalize change(s) how loss masks weigh the loss, but the dataset has none" in text
    o = contract_options(
        ConvOutMethod, tmp_path, {"data": str(data), "alpha_mask": True, "masked_loss_unmasked_weight": 1.5}
    )
    text = "\n".join(run_preflight(ConvOutMethod(o), o, plan=False).problems)
    assert "--masked-loss-unmasked-weight must be in [0, 1]" in text
    cfg, folder, _ = _masked_concepts(tmp_path / "m")
    (folder / "a-masklabel.png").write_bytes(b"not a png")
    o = contract_options(ConvOutMethod, tmp_path, {"data": str(cfg), "masked_loss": True, "max_bucket_reso": 64})
    text = "\n".join(run_preflight(ConvOutMethod(o), o, plan=False).problems)
    assert "1 -masklabel mask(s) unreadable" in text and "a-masklabel.png" in text
    o = contract_options(ConvOutMethod, tmp_path, {"data": str(cfg), "masked_loss": True, "alpha_mask": True})
    text = "\n".join(run_preflight(ConvOutMethod(o), o, plan=False).problems)
    assert "alpha_mask and OneTrainer's -masklabel.png masks both give masks" in text


def test_mask_augmentations_map_with_or_without_masks(tmp_path):
    """The switches become the subset's fields either way: whether they act (masked training or a mask input)
    is the pre-flight's to say, as it knows the model (tests/train/test_mask_augment.py)."""
    from sdcore.data.onetrainer import load_concepts
    from sdcore.train.options import TrainOptions

    cfg, folder, _ = _masked_concepts(tmp_path)
    cfg.write_text(json.dumps([concept(folder, image__enable_random_circular_mask_shrink=True)]), encoding="utf-8")
    for masked in (False, True):
        skipped: list = []
        (subset,) = load_concepts(cfg, TrainOptions(masked_loss=masked, resolution=512), skipped)
        assert (subset.mask_shrink, subset.mask_rotate_crop) == (True, False)
        assert (subset.mask_suffix is not None) is masked and not skipped


def test_normalising_divides_by_the_dataset_masks_area_not_the_methods_map(tmp_path):
    """--masked-loss-normalize is OneTrainer's mean(loss * m) / mean(m) with m the (clamped) dataset mask; a
    method's own loss map (here 2x everywhere) still multiplies the loss, with or without a dataset mask,
    so the same prediction gives exactly twice the plain method's loss."""
    from sdcore.train.loop import TrainSession

    cfg, _, _ = _masked_concepts(tmp_path)
    values = {"data": str(cfg), "batch_size": 1, "max_bucket_reso": 64, "flip": False, "masked_loss": True,
              "masked_loss_unmasked_weight": 0.2, "masked_loss_normalize": True}  # fmt: skip
    losses = []
    for method_class in (ConvOutMethod, _TwiceMethod):
        o = contract_options(method_class, tmp_path, values, tag=method_class.__name__)
        s = TrainSession(method_class(o), bundle=create_tiny_bundle("sd1"))
        s.setup()
        batch = s.make_batch([_ref(s, "a.png"), _ref(s, "c.png")])  # c.png has no mask: the method's map alone
        noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            losses.append(s.sample_loss(batch, noise, torch.tensor([300, 700]), 0))
    plain, twice = losses
    torch.testing.assert_close(twice, 2 * plain, rtol=1e-5, atol=0)

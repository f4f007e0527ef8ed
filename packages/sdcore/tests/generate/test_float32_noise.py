"""Generation noise is A1111's at every size: drawn in float32 on the CPU generator, then the model's dtype.

A1111 (AUTOMATIC1111/stable-diffusion-webui modules/rng.py: ``randn`` / ``randn_local`` /
``randn_without_seed`` draw ``torch.randn(shape, device=cpu, generator=...)`` in float32 and then move it to
the device; ``ImageRNG.first`` for the start noise, ``ImageRNG.next`` for each ancestral step's noise).
torch's CPU half-precision draw equals the rounded float32 draw only when the element count is a multiple
of 16, so these tests use a 40x40 image (a 4 x 5 x 5 latent, 100 elements) where the two differ.
"""

from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from sdcore.generate.pipeline import generate_images

_SIZE = 40  # 4 * 5 * 5 = 100 latent elements: not a multiple of 16


@pytest.fixture(scope="module")
def fp16_sd1():
    from sdcore.models.load import load_model

    return load_model("tiny:sd1", dtype="fp16")


def _a1111_randn(shape, generator=None, device=None, dtype=None, layout=None):
    """A1111's draw: each image's generator draws its ``[1, C, h, w]`` in float32 on the CPU; then ``dtype``."""
    generators = generator if isinstance(generator, list) else [generator]
    if len(generators) == 1:
        drawn = torch.randn(tuple(shape), generator=generators[0])
    else:
        drawn = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators])
    return drawn.to(device=device or "cpu", dtype=dtype or torch.float32)


def _denoiser_inputs(bundle, **settings):
    inputs: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        inputs.append((args[0] if args else kwargs["sample"]).detach().clone())

    handle = bundle.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        images = generate_images(
            bundle, ["a cat", "a dog"], steps=3, width=_SIZE, height=_SIZE, sampler="euler_a", seed=7, **settings
        )
    finally:
        handle.remove()
    return images, inputs


def _noise_modules():
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion, pipeline_stable_diffusion_img2img
    from diffusers.schedulers import scheduling_euler_ancestral_discrete

    return [pipeline_stable_diffusion, pipeline_stable_diffusion_img2img, scheduling_euler_ancestral_discrete]


def test_torchs_half_precision_draw_differs_at_this_size():
    # what makes the other tests able to fail: the fp16 draw is not the rounded float32 draw here
    half = torch.randn((1, 4, 5, 5), generator=torch.Generator().manual_seed(7), dtype=torch.float16)
    rounded = torch.randn((1, 4, 5, 5), generator=torch.Generator().manual_seed(7)).half()
    assert not torch.equal(half, rounded)


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_fp16_start_and_euler_a_noise_are_the_float32_draw_cast(fp16_sd1, monkeypatch, img2img):
    settings = {}
    if img2img:
        pixels = np.random.default_rng(0).integers(0, 255, (_SIZE, _SIZE, 3), np.uint8)
        settings = {"init_image": Image.fromarray(pixels), "strength": 0.9}
    _, actual = _denoiser_inputs(fp16_sd1, **settings)
    # the same run with the pipeline's and the Euler a scheduler's draws replaced by A1111's
    for module in _noise_modules():
        monkeypatch.setattr(module, "randn_tensor", _a1111_randn)
    _, expected = _denoiser_inputs(fp16_sd1, **settings)
    assert len(actual) == len(expected) >= 2  # the first input is the start noise, the later ones follow Euler a's
    assert actual[0].dtype == torch.float16
    for got, want in zip(actual, expected, strict=True):
        assert torch.equal(got, want)


def test_fp32_runs_are_unchanged(monkeypatch):
    from sdcore.generate import rng
    from sdcore.models.load import load_model

    bundle = load_model("tiny:sd1")
    images, swapped = _denoiser_inputs(bundle)
    monkeypatch.setattr(rng, "float32_noise", contextlib.nullcontext)  # diffusers' own draws, as before
    plain_images, plain = _denoiser_inputs(bundle)
    assert swapped[0].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(swapped, plain, strict=True))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, plain_images, strict=True))


def test_the_swap_is_undone_and_reaches_modules_imported_inside():
    from diffusers.utils import torch_utils
    from sdcore.generate.rng import float32_noise, randn_float32

    original = torch_utils.randn_tensor
    assert original is not randn_float32
    name = "diffusers._sdcore_late_import_probe"
    with float32_noise():
        with float32_noise():  # nested: one swap
            pass
        assert all(m.randn_tensor is randn_float32 for m in _noise_modules())
        late = types.ModuleType(name)
        late.randn_tensor = torch_utils.randn_tensor  # what `from ..utils.torch_utils import randn_tensor` binds
        sys.modules[name] = late
        assert late.randn_tensor is randn_float32
    try:
        assert torch_utils.randn_tensor is original
        assert late.randn_tensor is original
        assert all(m.randn_tensor is original for m in _noise_modules())
    finally:
        del sys.modules[name]

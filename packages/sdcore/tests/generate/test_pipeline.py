"""Pipelines over tiny models: determinism, seeds, img2img, every sampler, module sharing."""

from __future__ import annotations

import numpy as np
import pytest
from sdcore.errors import ConfigError
from sdcore.generate.pipeline import (
    SAMPLERS,
    build_pipeline,
    default_size,
    generate_images,
    make_scheduler,
    sampler_id,
    sampler_label,
)


def _arr(image):
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_deterministic_per_seed_and_seeds_differ(tiny_bundles, family):
    bundle = tiny_bundles(family)
    first = generate_images(bundle, ["a cat", "a cat"], steps=2, seed=5, negative_prompt="blurry")
    again = generate_images(bundle, ["a cat"], steps=2, seed=5, negative_prompt="blurry")
    other = generate_images(bundle, ["a cat"], steps=2, seed=6, negative_prompt="blurry")
    assert first[0].size == (64, 64) and first[0].mode == "RGB"
    assert np.array_equal(
        _arr(again[0]), _arr(generate_images(bundle, ["a cat"], steps=2, seed=5, negative_prompt="blurry")[0])
    )
    # image i of a batch uses seed + i: the second image of the batch is the seed-6 image
    assert np.abs(_arr(first[1]) - _arr(other[0])).max() <= 1  # batched vs single numerics may differ by 1/255
    assert np.abs(_arr(first[0]) - _arr(again[0])).max() <= 1
    assert np.abs(_arr(again[0]) - _arr(other[0])).mean() > 5


def test_emphasis_changes_the_image(sd1):
    plain = generate_images(sd1, ["a cat"], steps=2, seed=1)[0]
    same = generate_images(sd1, ["a (cat:1.0)"], steps=2, seed=1)[0]
    weighted = generate_images(sd1, ["a (cat:1.8)"], steps=2, seed=1)[0]
    assert np.array_equal(_arr(plain), _arr(same))
    assert not np.array_equal(_arr(plain), _arr(weighted))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_img2img_runs_and_keeps_the_image(tiny_bundles, family):
    from PIL import Image

    bundle = tiny_bundles(family)
    init = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))[..., None].repeat(3, -1))
    low = generate_images(bundle, ["a cat"], steps=4, seed=1, init_image=init, strength=0.25)[0]
    again = generate_images(bundle, ["a cat"], steps=4, seed=1, init_image=init, strength=0.25)[0]
    high = generate_images(bundle, ["a cat"], steps=4, seed=1, init_image=init, strength=1.0)[0]
    assert low.size == (64, 64)
    assert np.array_equal(_arr(low), _arr(again))
    assert not np.array_equal(_arr(low), _arr(high))


def test_img2img_accepts_a_path_and_resizes(sd1, tmp_path):
    from PIL import Image

    path = tmp_path / "init.png"
    Image.new("RGB", (70, 90), (200, 30, 30)).save(path)
    image = generate_images(sd1, ["x"], steps=2, init_image=path, strength=0.5)[0]
    assert image.size == (64, 88)  # rounded down to multiples of 8
    image = generate_images(sd1, ["x"], steps=2, init_image=path, strength=0.5, width=64, height=64)[0]
    assert image.size == (64, 64)
    with pytest.raises(ConfigError):
        generate_images(sd1, ["x"], steps=2, init_image=tmp_path / "missing.png")


def _has_scipy() -> bool:
    import importlib.util

    return importlib.util.find_spec("scipy") is not None


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs(sd1, sampler):
    if sampler == "lms" and not _has_scipy():
        with pytest.raises(ConfigError, match="scipy"):
            generate_images(sd1, ["a cat"], steps=3, sampler=sampler)
        return
    images = generate_images(sd1, ["a cat"], steps=3, seed=2, sampler=sampler)
    pixels = _arr(images[0])
    assert images[0].size == (64, 64) and pixels.std() > 0


def test_v_prediction_sampler_config(sd2):
    for sampler in SAMPLERS:
        if sampler == "lms" and not _has_scipy():
            continue
        scheduler = make_scheduler(sd2, sampler)
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.config.num_train_timesteps == 1000
    assert make_scheduler(sd2, "dpm++2m_karras").config.use_karras_sigmas is True
    assert type(make_scheduler(sd2, "euler_a")).__name__ == "EulerAncestralDiscreteScheduler"


def test_unipc_is_configured_as_a1111s(sd1):
    """A1111 modules/shared_options.py: uni_pc_variant "bh1", uni_pc_order 3, uni_pc_lower_order_final
    True; sd_samplers_timesteps_impl.py runs UniPC with predict_x0=True and skip type "time_uniform", whose
    times run from 1 to 1/N: the last step lands on sigma_min (discrete t = 0), not on 0. (diffusers'
    defaults: order 2, bh2, last sigma 0.)"""
    scheduler = make_scheduler(sd1, "UniPC")
    config = scheduler.config
    assert (config.solver_order, config.solver_type) == (3, "bh1")
    assert config.predict_x0 is True and config.lower_order_final is True
    scheduler.set_timesteps(10)
    alphas = sd1.noise_scheduler.alphas_cumprod
    sigma_min = float(((1 - alphas[0]) / alphas[0]).sqrt())
    assert scheduler.timesteps[0] == 999 and float(scheduler.sigmas[-1]) == pytest.approx(sigma_min, rel=1e-5)


def test_sampler_names():
    assert sampler_id("Euler a") == "euler_a"
    assert sampler_id("k_euler_a") == "euler_a"
    assert sampler_id("DPM++ 2M Karras") == "dpm++2m_karras"
    assert sampler_id("DPM++ 2M") == "dpm++2m"
    assert sampler_id("PLMS") == "pndm"
    assert sampler_id("UniPC") == "unipc"
    assert sampler_label("euler_a") == "Euler a"
    for sid in SAMPLERS:
        assert sampler_id(sampler_label(sid)) == sid
    with pytest.raises(ConfigError, match="unknown sampler"):
        sampler_id("nope")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_pipeline_shares_the_bundle_modules(tiny_bundles, family):
    bundle = tiny_bundles(family)
    for img2img in (False, True):
        pipe = build_pipeline(bundle, img2img=img2img, sampler="ddim")
        assert pipe.unet is bundle.unet and pipe.vae is bundle.vae
        assert pipe.text_encoder is bundle.text_encoders[0]
        if family == "sdxl":
            assert pipe.text_encoder_2 is bundle.text_encoders[1]
        else:
            assert pipe.safety_checker is None
        assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_default_sizes(sd1):
    from types import SimpleNamespace

    assert default_size(sd1) == 64

    def fake(family, prediction, sample_size, source_format="diffusers"):
        unet = SimpleNamespace(config=SimpleNamespace(sample_size=sample_size))
        vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[1, 2, 3, 4]))
        from sdcore.models.bundle import ModelBundle

        return ModelBundle(family, prediction, unet, vae, [], [], None, source_format=source_format)

    assert default_size(fake("sd1", "epsilon", 64)) == 512
    assert default_size(fake("sd2", "v_prediction", 96)) == 768
    assert default_size(fake("sd2", "epsilon", 64)) == 512
    assert default_size(fake("sdxl", "epsilon", 128)) == 1024
    assert default_size(fake("sdxl", "epsilon", 128, "tiny")) == 64
    small = fake("sd1", "epsilon", 8, "toyworld")
    small.vae.config.block_out_channels = [16, 32, 32]  # 4x VAE: 8x8 latents are 32x32 pixels
    assert default_size(small) == 32


def test_bad_arguments(sd1):
    with pytest.raises(ConfigError, match="multiple of 8"):
        generate_images(sd1, ["a"], steps=1, width=60)
    with pytest.raises(ConfigError):
        generate_images(sd1, ["a"], steps=0)
    with pytest.raises(ConfigError):
        generate_images(sd1, ["a", "b"], steps=1, negative_prompt=["x"])
    assert generate_images(sd1, [], steps=1) == []


def test_training_mode_is_restored(sd1):
    sd1.unet.train()
    try:
        generate_images(sd1, ["a"], steps=1)
        assert sd1.unet.training and not sd1.vae.training
    finally:
        sd1.unet.eval()

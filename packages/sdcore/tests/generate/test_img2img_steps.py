"""img2img counts its steps and starts as A1111 does (tiny models).

Expected values are A1111's rules rewritten here (AUTOMATIC1111/stable-diffusion-webui 1.10, facts only):
modules/sd_samplers_common.py ``setup_img2img_steps`` (option ``img2img_fix_steps`` off, its default: the
schedule is ``steps``, ``t_enc = int(min(strength, 0.999) * steps)``), modules/sd_samplers_kdiffusion.py
``sample_img2img`` (``sigma_sched = sigmas[steps - t_enc - 1:]``: ``t_enc + 1`` steps, the start
``x + noise * sigma_sched[0]``), modules/sd_samplers_timesteps.py ``sample_img2img`` (DDIM's start
``x * sqrt(a) + noise * sqrt(1 - a)``, ``a`` the ``alphas_cumprod`` of ``timesteps[t_enc]`` with
``timesteps = range(0, 1000, 1000 // steps) + 1``), modules/processing.py ``StableDiffusionProcessingImg2Img.sample``
(the noise is ``rng.next()``, the seed's first draw). Forge (lllyasviel/stable-diffusion-webui-forge,
modules/sd_samplers_kdiffusion.py:136-143) counts the same for flow models. Before this, sdcore ran diffusers'
``int(steps * strength)`` steps from a step later, and none (a traceback) at ``--steps 1``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sdcore.generate.pipeline import generate_images, make_scheduler


def _init_image(size: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8))


class _Calls:
    """Records each denoiser call's (sample, timestep) while installed."""

    def __init__(self, module):
        self.module = module
        self.calls: list[tuple[torch.Tensor, float]] = []

    def __enter__(self):
        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            self.calls.append((sample.detach().clone(), float(torch.as_tensor(timestep).flatten()[0])))

        self.handle = self.module.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _a1111_t_enc(steps: int, strength: float) -> int:
    return int(min(strength, 0.999) * steps)  # setup_img2img_steps, img2img_fix_steps off


@pytest.mark.parametrize(
    ("family", "sampler", "steps", "strength"),
    [
        ("sd1", "euler_a", 4, 0.5),
        ("sd1", "euler_a", 10, 0.75),
        ("sd1", "euler_a", 3, 1.0),
        ("sd1", "euler_a", 1, 0.75),
        ("sd1", "euler_a", 4, 0.0),  # A1111's slider starts at 0: t_enc 0, one step at the last sigma
        ("sd1", "dpm++2m", 5, 0.3),
        ("sd1", "dpm++2m", 4, 0.75),
        ("sd1", "ddim", 4, 0.5),
        ("sd1", "ddim", 5, 0.9),
        ("sdxl", "euler_a", 4, 0.6),
        ("sdxl", "ddim", 2, 0.75),
    ],
)
def test_img2img_runs_a1111s_steps_from_a1111s_start(tiny_bundles, family, sampler, steps, strength):
    bundle = tiny_bundles(family)
    with _Calls(bundle.unet) as rec:
        generate_images(bundle, ["a cat"], steps=steps, seed=3, sampler=sampler, init_image=_init_image(),
                        strength=strength)  # fmt: skip
    t_enc = _a1111_t_enc(steps, strength)
    scheduler = make_scheduler(bundle, sampler)
    scheduler.set_timesteps(steps)
    # sigma_sched = sigmas[steps - t_enc - 1:]: t_enc + 1 steps, one (batched CFG) UNet call each
    expected = [float(t) for t in scheduler.timesteps[steps - t_enc - 1 :]]
    assert len(rec.calls) == t_enc + 1
    assert [t for _, t in rec.calls] == pytest.approx(expected)


def test_one_step_img2img_runs_one_step(sd1):
    # int(0.75 * 1) = 0: diffusers' rule ran no step (a traceback); A1111's t_enc + 1 runs the only one
    with _Calls(sd1.unet) as rec:
        image = generate_images(sd1, ["a cat"], steps=1, seed=1, init_image=_init_image(), strength=0.75)[0]
    assert len(rec.calls) == 1
    assert image.size == (64, 64)


def _start(bundle, sampler: str, steps: int, strength: float, seed: int):
    """The first UNet call's input (the uncond half of the CFG batch) and the A1111 start it should be."""
    from sdcore.generate.pipeline import _encode_images, build_pipeline

    init_image = _init_image()
    with _Calls(bundle.unet) as rec:
        generate_images(bundle, ["a cat"], steps=steps, seed=seed, sampler=sampler, init_image=init_image,
                        strength=strength)  # fmt: skip
    with torch.no_grad():
        init = _encode_images(build_pipeline(bundle, img2img=True), [init_image]).float()
    noise = torch.randn(tuple(init.shape), generator=torch.Generator().manual_seed(seed))  # rng.next(): first draw
    return rec.calls[0][0][:1].float(), init, noise, _a1111_t_enc(steps, strength)


@pytest.mark.parametrize(("steps", "strength"), [(4, 0.5), (5, 0.75), (1, 0.75)])
def test_k_diffusion_start_is_the_seeds_noise_at_a1111s_first_sigma(sd1, steps, strength):
    sample, init, noise, t_enc = _start(sd1, "euler_a", steps, strength, seed=11)
    scheduler = make_scheduler(sd1, "euler_a")
    scheduler.set_timesteps(steps)
    sigma = float(scheduler.sigmas[steps - t_enc - 1])  # sigma_sched[0]
    expected = (init + noise * sigma) / (sigma**2 + 1) ** 0.5  # xi, through k-diffusion's c_in
    torch.testing.assert_close(sample, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("steps", "strength"), [(4, 0.5), (5, 0.3)])
def test_ddim_start_is_a1111s(sd1, steps, strength):
    sample, init, noise, t_enc = _start(sd1, "ddim", steps, strength, seed=4)
    timesteps = [min(t + 1, 999) for t in range(0, 1000, 1000 // steps)]  # CompVisSampler.get_timesteps
    alpha = float(sd1.noise_scheduler.alphas_cumprod[timesteps[t_enc]])
    expected = init * alpha**0.5 + noise * (1 - alpha) ** 0.5
    torch.testing.assert_close(sample, expected, atol=1e-4, rtol=1e-4)


def test_inpainting_counts_as_img2img(sd1):
    from sdcore.generate.inpaint import Inpaint

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    steps, strength = 4, 0.5
    with _Calls(sd1.unet) as rec:
        generate_images(sd1, ["a cat"], steps=steps, seed=2, init_image=_init_image(), strength=strength,
                        inpaint=Inpaint(mask))  # fmt: skip
    t_enc = _a1111_t_enc(steps, strength)
    scheduler = make_scheduler(sd1, "euler_a")
    scheduler.set_timesteps(steps)
    assert [t for _, t in rec.calls] == pytest.approx([float(t) for t in scheduler.timesteps[steps - t_enc - 1 :]])


@pytest.mark.parametrize(
    ("family", "steps", "strength"), [("sd3", 4, 0.5), ("flux", 4, 0.75), ("chroma", 5, 0.6), ("flux", 3, 0.0)]
)
def test_flow_img2img_runs_forges_steps(loaded_tiny, family, steps, strength):
    # Forge's sample_img2img on a flow model: the same setup_img2img_steps and sigmas[steps - t_enc - 1:]
    # (the flow pipelines start at int(steps - steps * strength): one step fewer where steps * strength is whole)
    bundle = loaded_tiny(family)
    with _Calls(bundle.transformer) as rec:
        generate_images(bundle, ["a cat"], steps=steps, seed=1, width=64, height=64, cfg=1.0)
    full = [t for _, t in rec.calls]
    assert len(full) == steps  # the txt2img schedule of the same size (its shift and mu; cfg 1: one call a step)
    with _Calls(bundle.transformer) as rec:
        generate_images(bundle, ["a cat"], steps=steps, seed=1, init_image=_init_image(), strength=strength, cfg=1.0)
    t_enc = _a1111_t_enc(steps, strength)
    assert [t for _, t in rec.calls] == pytest.approx(full[steps - t_enc - 1 :])


@pytest.mark.parametrize(("family", "seed"), [("sd3", 5), ("flux", 6), ("chroma", 7)])
def test_flow_img2img_starts_from_the_mean_and_the_seeds_first_draw(loaded_tiny, family, seed):
    # Forge (modules/processing.py:1845 StableDiffusionProcessingImg2Img.sample: x = self.rng.next(), the seed's
    # first draw; modules/sd_samplers_kdiffusion.py:143-147 sample_img2img: the flow noise_scaling at
    # sigma_sched[0]) and sdcore's own img2img rule (docs/generation.md: the init latent is the posterior's mean,
    # the noise the seed's first draw). diffusers' flow img2img pipelines sample the posterior from the seed's
    # generator first, which made the start noise the seed's second draw.
    from types import SimpleNamespace

    from diffusers import FluxPipeline
    from sdcore.generate.pipeline import _encode_images

    bundle = loaded_tiny(family)
    init_image = _init_image()
    with _Calls(bundle.transformer) as rec:
        generate_images(bundle, ["a cat"], steps=4, seed=seed, init_image=init_image, strength=0.5, cfg=1.0)
    sample, timestep = rec.calls[0]
    with torch.no_grad():
        init = _encode_images(SimpleNamespace(vae=bundle.vae), [init_image]).float()
    noise = torch.randn(tuple(init.shape), generator=torch.Generator().manual_seed(seed))  # the first draw
    sigma = timestep / 1000 if family == "sd3" else timestep  # the Flux/Chroma transformers take t / 1000
    expected = (1 - sigma) * init + sigma * noise  # FlowMatchEulerDiscreteScheduler.scale_noise
    if family != "sd3":  # packed 2x2 as the pipelines pack their latents
        expected = FluxPipeline._pack_latents(expected, *expected.shape)
    torch.testing.assert_close(sample[:1].float(), expected, atol=2e-3, rtol=2e-3)


# -- transparent init images -------------------------------------------------------------------------------------
# A1111 1.10: the img2img tab's image is a gr.Image(image_mode="RGBA") and modules/processing.py
# StableDiffusionProcessingImg2Img.init composites every init image over opts.img2img_background_color ("#ffffff")
# with modules/images.py flatten (alpha-weighted paste); the "Inpaint upload" tab's image is a plain
# gr.Image(type="pil") (image_mode "RGB"), which drops the alpha (modules/ui.py; modules/img2img.py modes 0 and 4).


def _half_transparent(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (64, 64, 3), np.uint8)
    alpha = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))  # transparent left, opaque right
    alpha[:, 24:40] = 128  # a half-transparent band
    path = tmp_path / "init.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    return path, rgb, alpha


def _flattened(rgb, alpha, background=255.0):
    a = alpha[..., None].astype(np.float64) / 255.0
    return rgb * a + background * (1.0 - a)  # the source over white, weighted by its alpha


def test_img2img_flattens_a_transparent_init_image_onto_white(tmp_path):
    from sdcore.generate.pipeline import _load_init_image

    path, rgb, alpha = _half_transparent(tmp_path)
    flat = np.asarray(_load_init_image(path), dtype=np.float64)
    assert np.abs(flat - _flattened(rgb, alpha)).max() <= 1.0  # PIL's 8-bit blend rounds
    assert (flat[:, 0] == 255).all()  # alpha 0: the background
    assert np.array_equal(flat[:, -1], rgb[:, -1])  # alpha 255: the image
    # the inpainting mode drops the alpha and keeps the colours under it
    assert np.array_equal(np.asarray(_load_init_image(path, flatten=False)), rgb)


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_other_transparent_modes_are_flattened_too(tmp_path, mode):
    from sdcore.generate.pipeline import _load_init_image

    grey = np.random.default_rng(5).integers(0, 255, (16, 16), np.uint8)
    alpha = np.zeros((16, 16), np.uint8)
    alpha[:, 8:] = 255
    if mode == "LA":
        image = Image.fromarray(np.dstack([grey, alpha]), "LA")
    else:  # a palette PNG with a transparent index (the tab's RGBA conversion honours it)
        image = Image.fromarray(np.where(alpha > 0, grey // 2 + 1, 0).astype(np.uint8), "L").convert("P")
        image.info["transparency"] = 0
    path = tmp_path / f"init-{mode}.png"
    image.save(path)
    flat = np.asarray(_load_init_image(path))
    assert (flat[:, :8] == 255).all()
    assert not (flat[:, 8:] == 255).all()


def test_a_transparent_init_image_generates_as_its_white_flattening(sd1, tmp_path):
    from sdcore.generate.inpaint import Inpaint

    path, rgb, _ = _half_transparent(tmp_path)
    settings = {"steps": 1, "seed": 2, "strength": 0.5}
    got = generate_images(sd1, ["a cat"], init_image=path, **settings)[0]
    # PIL's alpha-weighted paste over white, as images.flatten does it (its numbers: the test above)
    flat = Image.composite(Image.open(path), Image.new("RGBA", (64, 64), "white"), Image.open(path).getchannel("A"))
    want = generate_images(sd1, ["a cat"], init_image=flat.convert("RGB"), **settings)[0]
    dropped = generate_images(sd1, ["a cat"], init_image=Image.fromarray(rgb), **settings)[0]
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(got), np.asarray(dropped))
    # with a mask (the Inpaint upload tab) the alpha is dropped instead
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    masked = generate_images(sd1, ["a cat"], init_image=path, inpaint=Inpaint(mask), **settings)[0]
    plain = generate_images(sd1, ["a cat"], init_image=Image.fromarray(rgb), inpaint=Inpaint(mask), **settings)[0]
    assert np.array_equal(np.asarray(masked), np.asarray(plain))

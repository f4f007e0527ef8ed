"""A1111's inpainting with regular SD3, FLUX.1 and Chroma models (sdcore.generate.flow_inpaint), as Forge runs it:
the masked start, the per-step blend of the denoised estimate, the final blend and the paste-back."""

import numpy as np
import pytest
import torch
from PIL import Image


def _picture(size=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _box_mask(size=64, box=(16, 16, 40, 40)):
    mask = np.zeros((size, size), dtype=np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = 255
    return Image.fromarray(mask)


def _init_latent(bundle, pixels):
    """The posterior's mean in the denoiser's latent space, ``(mean - shift) * scale``, written out here."""
    config = bundle.vae.config
    with torch.no_grad():
        mean = bundle.vae.encode(pixels).latent_dist.mean
    return (mean - config.shift_factor) * config.scaling_factor


def test_blended_output_gives_the_blended_denoised_estimate():
    """``x - sigma * v'`` is ``denoised * nmask + init * (1 - nmask)`` for the flow velocity ``v``; mixing two CFG
    branches after blending each is blending their mix (weights summing to one)."""
    from sdcore.generate.flow_inpaint import flow_blended_output

    gen = torch.Generator().manual_seed(0)
    x, v, v_uncond, init = (torch.randn(2, 16, 4, 4, generator=gen) for _ in range(4))
    nmask = (torch.rand(1, 1, 4, 4, generator=gen) > 0.5).float()
    sigma = 0.6
    fixed = flow_blended_output(v, x, sigma, init, nmask)
    torch.testing.assert_close(x - sigma * fixed, (x - sigma * v) * nmask + init * (1 - nmask))
    scale = 3.5
    mixed = flow_blended_output(v_uncond + scale * (v - v_uncond), x, sigma, init, nmask)
    each = [flow_blended_output(branch, x, sigma, init, nmask) for branch in (v, v_uncond)]
    torch.testing.assert_close(mixed, each[1] + scale * (each[0] - each[1]))
    assert not torch.allclose(fixed, v)  # the mask keeps something


def _recording_steps(monkeypatch, cls):
    """Every ``cls.step`` call's (model output, sample, sigma of the evaluation: the scheduler's own sigmas at
    the index the step reads, not the timestep sdcore reads it from)."""
    seen = []
    original = cls.step

    def step(self, model_output, timestep, sample, *args, **kwargs):
        result = original(self, model_output, timestep, sample, *args, **kwargs)
        seen.append((model_output.detach().double(), sample.detach().double(), float(self.sigmas[self.step_index - 1])))
        return result

    monkeypatch.setattr(cls, "step", step)
    return seen


@pytest.mark.parametrize(
    ("family", "sampler", "fill"),
    [("sd3", "euler", "original"), ("flux", "euler_a", "latent noise"), ("chroma", "euler", "latent nothing")],
)
def test_every_step_and_the_end_keep_the_init_latent_outside_the_mask(loaded_tiny, monkeypatch, family, sampler, fill):
    """Each step's denoised estimate (``x - sigma * v``, with the scheduler's own sigma) is the init latent where the
    latent mask keeps; the final latent is too, and differs inside; the unmasked pixels are the original's.
    With ``latent noise`` the start in the hole is the seed's noise exactly (``sigma * n + (1 - sigma) * n``)."""
    import diffusers
    from sdcore.generate import pipeline
    from sdcore.generate.inpaint import Inpaint, prepare

    bundle = loaded_tiny(family)
    image, mask = _picture(), _box_mask()
    settings = Inpaint(mask, fill=fill)
    prepared = prepare(settings, image, 64, 64)
    init = _init_latent(bundle, prepared.pixels()).double()
    nmask = torch.from_numpy(prepared.latent_mask(8, 8))[None, None].double()
    packed = family in ("flux", "chroma")

    def layout(latents):  # the scheduler's layout: Flux and Chroma step packed 2x2 tokens
        return diffusers.FluxPipeline._pack_latents(latents, *latents.shape) if packed else latents

    keep = layout((1 - nmask).expand_as(init).contiguous()) == 1
    assert keep.any() and (~keep).any()
    seen = _recording_steps(monkeypatch, diffusers.FlowMatchEulerDiscreteScheduler)
    finals = []
    decode = pipeline.decode_latents
    monkeypatch.setattr(
        pipeline, "decode_latents", lambda pipe, latents, kind: finals.append(latents) or decode(pipe, latents, kind)
    )
    out = pipeline.generate_images(bundle, ["a cat"], steps=4, seed=3, sampler=sampler, init_image=image,
                                   inpaint=settings)[0]  # fmt: skip
    assert len(seen) == 4  # strength 0.75 of 4 steps: A1111's int(0.75 * 4) + 1 steps
    for output, sample, sigma in seen:
        denoised = sample - sigma * output
        torch.testing.assert_close(denoised[keep], layout(init)[keep].expand_as(denoised[keep]), rtol=1e-4, atol=1e-4)
    (final,) = finals
    torch.testing.assert_close(final.double()[(1 - nmask).expand_as(final) == 1],
                               init[(1 - nmask).expand_as(init) == 1], rtol=1e-5, atol=1e-5)  # fmt: skip
    assert not torch.allclose(final.double()[nmask.expand_as(final) == 1], init[nmask.expand_as(init) == 1], atol=1e-2)
    if fill == "latent noise":
        noise = torch.randn(init.shape, generator=torch.Generator().manual_seed(3)).double()
        hole = ~keep
        torch.testing.assert_close(seen[0][1][hole], layout(noise)[hole], rtol=1e-5, atol=1e-5)
    alpha = np.asarray(prepared.overlay)[..., 3]
    assert (alpha == 255).any()
    assert np.array_equal(np.asarray(out)[alpha == 255], np.asarray(image)[alpha == 255])


def test_sd3_heun_blends_both_evaluations_of_each_step(loaded_tiny, monkeypatch):
    """SD3 starts Heun from an init image (diffusers' own ``FlowMatchHeunDiscreteScheduler``: every timestep after
    the first listed twice, the corrector evaluated at the next sigma). The blend's ``timestep / 1000`` is the sigma
    of both evaluations: each denoised estimate, with the scheduler's sigma, is the init latent where the mask keeps
    (two prompts, a 48x80 image: latents 6 wide, 10 high)."""
    import diffusers
    from sdcore.generate import pipeline
    from sdcore.generate.inpaint import Inpaint, prepare

    bundle = loaded_tiny("sd3")
    image, mask = _picture(), _box_mask()
    settings = Inpaint(mask, blur=0)
    prepared = prepare(settings, image, 48, 80)
    init = _init_latent(bundle, prepared.pixels()).double()
    nmask = torch.from_numpy(prepared.latent_mask(6, 10))[None, None].double()
    keep = ((1 - nmask) == 1).expand(2, *init.shape[1:])
    seen = _recording_steps(monkeypatch, diffusers.FlowMatchHeunDiscreteScheduler)
    pipeline.generate_images(bundle, ["a cat", "a dog"], steps=3, seed=2, sampler="heun", init_image=image,
                             inpaint=settings, width=48, height=80)  # fmt: skip
    # A1111's int(0.75 * 3) + 1 = 3 steps of 3: the first one evaluation, the others two (Heun's), 5 in all
    assert len(seen) == 5 and len({sigma for _, _, sigma in seen}) == 3
    for output, sample, sigma in seen:
        denoised = sample - sigma * output
        torch.testing.assert_close(denoised[keep], init.expand_as(denoised)[keep], rtol=1e-4, atol=1e-4)


def test_a_mask_repaints_what_the_prompt_says_and_only_there(loaded_tiny):
    """Two prompts, one seed: the hole differs between them, the unmasked pixels are the original's in both, and
    ``--inpainting-mask-invert`` repaints the outside instead."""
    from sdcore.generate.inpaint import Inpaint
    from sdcore.generate.pipeline import generate_images

    bundle = loaded_tiny("flux")
    image, mask = _picture(), _box_mask()
    cat, dog = generate_images(
        bundle, ["a cat", "a dog"], steps=3, seed=1, init_image=image, inpaint=Inpaint(mask, blur=0)
    )
    inside = np.asarray(mask) == 255
    original = np.asarray(image)
    for picture in (cat, dog):
        assert np.array_equal(np.asarray(picture)[~inside], original[~inside])
    assert not np.array_equal(np.asarray(cat)[inside], np.asarray(dog)[inside])
    (inverted,) = generate_images(bundle, ["a cat"], steps=3, seed=1, init_image=image,
                                  inpaint=Inpaint(mask, blur=0, invert=True))  # fmt: skip
    assert np.array_equal(np.asarray(inverted)[inside], original[inside])
    assert not np.array_equal(np.asarray(inverted)[~inside], original[~inside])


def test_refusals(loaded_tiny, monkeypatch, tmp_path):
    """A family that does not inpaint says so in one line (before loading when its headers tell), and so does a
    mask beside a FLUX.1 Depth/Canny control image."""
    import types

    from click.testing import CliRunner
    from sdcore.builtin.generate_command import generate
    from sdcore.errors import ConfigError
    from sdcore.generate.inpaint import Inpaint
    from sdcore.generate.pipeline import MASK_WITH_CONTROL, _check_inpaint_family, generate_images
    from sdcore.models import layout
    from sdcore.models.family import get_family
    from sdcore.plugins import get_plugin_manager

    refiner = types.SimpleNamespace(family_spec=get_family("sdxl-refiner"))
    with pytest.raises(ConfigError, match="this is a Stable Diffusion XL refiner model"):
        _check_inpaint_family(refiner)
    depth = loaded_tiny("flux-depth")
    with pytest.raises(ConfigError, match="--mask with --control-image"):
        generate_images(depth, ["a cat"], steps=1, init_image=_picture(), control_image=_picture(),
                        inpaint=Inpaint(_box_mask()))  # fmt: skip
    _picture().save(tmp_path / "init.png")
    _box_mask().save(tmp_path / "mask.png")
    monkeypatch.setattr(layout, "peek_family", lambda model: "sdxl-refiner")
    pm = get_plugin_manager(builtins=False, entrypoints=False)
    args = ["a cat", "-m", "tiny:flux-depth", "--init-image", str(tmp_path / "init.png"), "--mask",
            str(tmp_path / "mask.png"), "--control-image", str(tmp_path / "init.png"), "-o", str(tmp_path / "o.png")]  # fmt: skip
    result = CliRunner().invoke(generate, args, obj=types.SimpleNamespace(pm=pm))
    error = result.exception
    assert isinstance(error, ConfigError) and error.exit_code == 2
    (line,) = str(error).splitlines()
    assert "this is a Stable Diffusion XL refiner model" in line and MASK_WITH_CONTROL in line


def test_cli_inpaints_a_flux_model_and_writes_a1111_fields(tmp_path):
    import types

    from click.testing import CliRunner
    from sdcore.builtin.generate_command import generate
    from sdcore.plugins import get_plugin_manager

    image, mask = _picture(), _box_mask()
    image.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    pm = get_plugin_manager(builtins=False, entrypoints=False)
    out = tmp_path / "out.png"
    args = ["a cat", "-m", "tiny:flux", "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
            "--mask-blur", "0", "--inpainting-fill", "latent noise", "--steps", "2", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(generate, args, obj=types.SimpleNamespace(pm=pm))
    assert result.exit_code == 0, result.output
    with Image.open(out) as written:
        text = written.info["parameters"]
        pixels = np.asarray(written.convert("RGB"))
    assert "Masked content: latent noise" in text and "Denoising strength: 0.75" in text
    assert "Mask blur" not in text  # A1111 writes it only when there is a blur
    inside = np.asarray(mask) == 255
    assert np.array_equal(pixels[~inside], np.asarray(image)[~inside])
    assert not np.array_equal(pixels[inside], np.asarray(image)[inside])

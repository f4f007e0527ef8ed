"""The Hires. fix on the flow-matching families (tiny SD3, FLUX.1-dev and Chroma).

Expected values come from the rules rewritten here, not from sdcore's code: A1111's/Forge's
``setup_img2img_steps`` (modules/sd_samplers_common.py: a schedule of ``int(steps / min(strength, 0.999))``
steps, ``t_enc = steps - 1``) and ``sample_img2img`` (lllyasviel/stable-diffusion-webui-forge
modules/sd_samplers_kdiffusion.py: ``sigma_sched = sigmas[steps - t_enc - 1:]``, start
``predictor.noise_scaling(sigma_sched[0], noise, x)``, which for a flow model, backend/modules/k_prediction.py
``AbstractPrediction.noise_scaling`` with prediction ``const``, is ``sigma * noise + (1 - sigma) * x``);
the sigmas are diffusers' (FluxPipeline/ChromaPipeline: ``linspace(1, 1/n, n)`` shifted by ``mu`` of the
image's token count, ``calculate_shift``; SD3: ``FlowMatchEulerDiscreteScheduler.set_timesteps`` with the
static shift).
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sdcore.errors import ConfigError
from sdcore.generate.hires import HiresFix
from sdcore.generate.pipeline import generate_images
from sdcore.generate.pnginfo import parse_parameters

FAMILIES = ("sd3", "flux", "chroma")


@pytest.fixture(scope="module")
def flow_bundles(loaded_tiny):
    return loaded_tiny


class _Calls:
    """Records each transformer call's (hidden_states, first timestep) while installed."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.calls: list[tuple[torch.Tensor, float]] = []

    def __enter__(self):
        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["hidden_states"]
            self.calls.append((sample.detach().clone(), float(kwargs["timestep"].flatten()[0])))

        self.handle = self.transformer.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _arr(image):
    return np.asarray(image, dtype=np.int16)


def _branches(family):
    """Transformer calls a step: Chroma runs CFG's prompt and negative as two calls, SD3 batches them,
    Flux dev has distilled guidance (one call)."""
    return 2 if family == "chroma" else 1


def _expected_timesteps(bundle, family, schedule, width, height):
    """The family pipeline's whole ``schedule``-step sigmas for a ``width x height`` image, as the
    transformer sees them (SD3: sigma * 1000; Flux/Chroma: sigma), from diffusers' documented rules."""
    config = bundle.noise_scheduler.config
    if family == "sd3":  # static shift s applied to linspace(1, shift(1/1000), n) (FlowMatchEuler.set_timesteps)
        shift = config["shift"]

        def shifted(s):
            return shift * s / (1 + (shift - 1) * s)

        sigma_min = shifted(1 / config["num_train_timesteps"])
        grid = np.linspace(1.0, sigma_min, schedule)
        return [1000 * shifted(s) for s in grid]
    # FluxPipeline: linspace(1, 1/n, n), mu linear in the packed token count, time_shift exp(mu)/(exp(mu)+(1/s-1))
    seq = (height // 16) * (width // 16)
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    mu = config["base_shift"] + slope * (seq - config["base_image_seq_len"])
    grid = np.linspace(1.0, 1 / schedule, schedule)
    return [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in grid]


def _first_latents(bundle, prompt, seed, steps, width, height):
    """The family's txt2img latents (unpacked), as ``generate`` makes them for the first pass."""
    from sdcore.models.family import family_adapter

    with torch.no_grad():
        return family_adapter(bundle.family).generate(bundle, [prompt], [""], seeds=[seed], steps=steps, cfg=3.5,
                                                      width=width, height=height, output_type="latent")  # fmt: skip


def _decode(bundle, latents):
    """Pixels of ``latents`` decoded as the flow pipelines decode: ``/ scaling + shift``, VAE, [0, 255] rounded."""
    config = bundle.vae.config
    with torch.no_grad():
        pixels = bundle.vae.decode(latents / config.scaling_factor + config.shift_factor).sample
    pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (pixels * 255).round().astype(np.int16)


@pytest.mark.parametrize(
    ("family", "size", "hires", "final"),
    [
        # int(48 * 1.5) = 72 -> rounded down to 16: 64; 64 * 1.5 = 96
        ("sd3", (48, 64), HiresFix(scale=1.5, steps=1), (64, 96)),
        ("flux", (48, 64), HiresFix(scale=1.5, steps=1), (64, 96)),
        # 1.25: 60 -> 48, 80 -> 80; an image upscaler's odd latent (60 // 8 = 7) loses its last row too
        ("chroma", (48, 64), HiresFix(scale=1.25, steps=1, upscaler="Lanczos"), (48, 80)),
        # both sides: cover 100x40 (100 x 133), crop (133 - 40) // 16 = 5 units of 16: 8 - 5 = 3 -> 48 high
        ("flux", (48, 64), HiresFix(resize_x=100, resize_y=40, steps=1), (96, 48)),
    ],
)
def test_output_size_is_the_target_rounded_down_to_16(flow_bundles, family, size, hires, final):
    image = generate_images(flow_bundles(family), ["a cat"], steps=1, cfg=3.5, seed=0, width=size[0], height=size[1],
                            hires=hires)[0]  # fmt: skip
    assert image.size == final
    assert hires.final_size(*size, factor=16) == final


@pytest.mark.parametrize("family", FAMILIES)
def test_first_pass_is_plain_txt2img_and_strength_0_decodes_the_upscaled_latent(flow_bundles, family, monkeypatch):
    from sdcore.generate import pipeline

    bundle = flow_bundles(family)
    settings = {"steps": 2, "cfg": 3.5, "seed": 5, "width": 32, "height": 48}
    with _Calls(bundle.transformer) as plain_calls:
        plain = generate_images(bundle, ["a cat"], **settings)[0]
    handed: list[torch.Tensor] = []
    real = pipeline._flow_hires_run

    def spy(second, bundle, prompts, negatives, latents, hires, **kwargs):
        handed.append(latents.clone())
        return real(second, bundle, prompts, negatives, latents, hires, **kwargs)

    monkeypatch.setattr(pipeline, "_flow_hires_run", spy)
    with _Calls(bundle.transformer) as rec:
        big = generate_images(bundle, ["a cat"], hires=HiresFix(scale=2, denoising_strength=0), **settings)[0]
    # the hires fix's first pass is txt2img, exactly, in latent space: every transformer input the same, and
    # the latent it hands on decodes to the txt2img image pixel for pixel
    assert len(rec.calls) == len(plain_calls.calls) == 2 * _branches(family)  # strength 0: no second-pass call
    for (sample, t), (plain_sample, plain_t) in zip(rec.calls, plain_calls.calls, strict=True):
        assert torch.equal(sample, plain_sample) and t == plain_t
    first = handed[0]
    assert first.shape == (1, 16, 6, 4)  # unpacked [B, C, h, w], also for Flux and Chroma
    assert np.array_equal(_decode(bundle, first)[0], _arr(plain))
    # (the family's generate makes the same latent; CPU matmuls may differ in the last bit between calls)
    torch.testing.assert_close(first, _first_latents(bundle, "a cat", 5, 2, 32, 48), atol=1e-5, rtol=1e-5)
    upscaled = torch.nn.functional.interpolate(first.float(), size=(12, 8), mode="bilinear")  # "Latent"
    assert big.size == (64, 96)
    assert np.array_equal(_arr(big), _decode(bundle, upscaled)[0])


@pytest.mark.parametrize(
    ("family", "steps", "hr_steps", "strength"),
    [("sd3", 3, 2, 0.5), ("flux", 2, 3, 0.4), ("flux", 3, 0, 0.7), ("chroma", 2, 2, 1.0), ("chroma", 2, 3, 0.3)],
)
def test_second_pass_runs_hr_steps_at_the_rules_sigmas(flow_bundles, family, steps, hr_steps, strength):
    bundle = flow_bundles(family)
    hires = HiresFix(scale=1.5, steps=hr_steps, denoising_strength=strength)
    with _Calls(bundle.transformer) as rec:
        image = generate_images(bundle, ["a cat"], steps=steps, cfg=3.5, seed=3, width=32, height=32, hires=hires)[0]
    run = hr_steps or steps  # hr_second_pass_steps or steps
    schedule = int(run / min(strength, 0.999))  # setup_img2img_steps
    branches = _branches(family)
    assert len(rec.calls) == (steps + run) * branches
    second = [t for _, t in rec.calls[steps * branches :: branches]]
    assert image.size == (48, 48)
    expected = _expected_timesteps(bundle, family, schedule, 48, 48)[schedule - run :]  # sigmas[steps - t_enc - 1:]
    assert second == pytest.approx(expected, rel=1e-5)


def test_hr_sampler_heun_runs_its_steps_on_the_tail_of_the_schedule(flow_bundles):
    """--hr-sampler heun after an Euler first pass: ``run`` Heun steps from the rule's start sigma, each a
    predictor and a corrector call except the last (k-diffusion's Heun, as Forge samples: 2 * run - 1 calls)."""
    bundle = flow_bundles("flux")
    steps, run, strength = 2, 2, 0.5
    with _Calls(bundle.transformer) as rec:
        generate_images(bundle, ["a cat"], steps=steps, cfg=3.5, seed=2, width=32, height=32,
                        hires=HiresFix(scale=1, steps=run, denoising_strength=strength, sampler="heun"))  # fmt: skip
    schedule = int(run / strength)
    tail = _expected_timesteps(bundle, "flux", schedule, 32, 32)[schedule - run :]
    expected = [tail[0], tail[1], tail[1]]  # step 1: predictor at s0, corrector at s1; step 2 (to 0): Euler at s1
    assert [t for _, t in rec.calls[steps:]] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_second_pass_starts_from_the_flow_noised_upscale(flow_bundles, family):
    from diffusers import FluxPipeline

    bundle = flow_bundles(family)
    seed, steps, run, strength = 11, 2, 2, 0.5
    with _Calls(bundle.transformer) as rec:
        generate_images(bundle, ["a cat"], steps=steps, cfg=3.5, seed=seed, width=32, height=32,
                        hires=HiresFix(scale=2, steps=run, denoising_strength=strength))  # fmt: skip
    first = _first_latents(bundle, "a cat", seed, steps, 32, 32)
    x0 = torch.nn.functional.interpolate(first.float(), size=(8, 8), mode="bilinear")
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(seed))  # the seed's, at the large shape
    schedule = int(run / strength)
    sigma = _expected_timesteps(bundle, family, schedule, 64, 64)[schedule - run]
    sigma = sigma / 1000 if family == "sd3" else sigma
    expected = (1 - sigma) * x0 + sigma * noise  # noise_scaling of a flow ("const") model
    sample = rec.calls[steps][0][:1]  # SD3: the uncond half of the CFG batch (both halves are the same latent)
    if family == "flux":
        expected = FluxPipeline._pack_latents(expected, 1, 16, 8, 8)
    torch.testing.assert_close(sample, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("family", "sampler"), [("flux", "euler"), ("chroma", "euler_a")])
def test_each_image_depends_on_its_seed_alone(flow_bundles, family, sampler):
    bundle = flow_bundles(family)
    hires = HiresFix(scale=1.5, steps=2, upscaler="Nearest")
    settings = {"steps": 2, "cfg": 3.5, "width": 32, "height": 32, "sampler": sampler, "hires": hires}
    pair = generate_images(bundle, ["a cat", "a cat"], seed=20, **settings)
    alone = generate_images(bundle, ["a cat"], seed=21, **settings)
    again = generate_images(bundle, ["a cat"], seed=21, **settings)
    assert np.array_equal(_arr(alone[0]), _arr(again[0]))  # same seed, same image
    # batched and single runs may differ by 1/255 in a pixel (float order), as in test_pipeline's seed test
    assert np.abs(_arr(pair[1]) - _arr(alone[0])).max() <= 1
    assert np.abs(_arr(pair[0]) - _arr(pair[1])).mean() > 1  # another seed: another image


def test_true_cfg_and_the_hires_prompt_reach_the_second_pass(flow_bundles):
    bundle = flow_bundles("flux")
    hires = HiresFix(scale=1.5, steps=2, prompt="a dog", negative_prompt="blurry")
    with _Calls(bundle.transformer) as rec:
        generate_images(bundle, ["a cat"], negative_prompt="dark", steps=2, cfg=3.5, seed=1, width=32, height=32,
                        true_cfg_scale=2.0, hires=hires)  # fmt: skip
    assert len(rec.calls) == 2 * 2 + 2 * 2  # true CFG: prompt and negative calls in both passes


def test_a_sampler_the_family_lacks_is_one_line_before_the_first_pass(flow_bundles):
    bundle = flow_bundles("flux")
    with _Calls(bundle.transformer) as rec, pytest.raises(ConfigError, match="'lms' does not sample flow-matching"):
        generate_images(bundle, ["x"], steps=1, cfg=3.5, width=32, height=32, hires=HiresFix(sampler="lms"))
    assert rec.calls == []


def test_cli_flux_hires_writes_the_target_size_and_hires_fields(tmp_path):
    from sdcore.builtin.generate_command import generate
    from sdcore.plugins import get_plugin_manager

    out = tmp_path / "hr.png"
    pm = get_plugin_manager(builtins=False, entrypoints=False)
    result = CliRunner().invoke(
        generate,
        ["a cat", "-m", "tiny:flux", "--steps", "2", "--seed", "3", "--size", "48x32", "--hr-scale", "2",
         "--hr-steps", "1", "--denoising-strength", "0.5", "--hr-upscaler", "Latent (bicubic)", "-o", str(out)],
        obj=types.SimpleNamespace(pm=pm),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (96, 64)
        params = parse_parameters(image.info["parameters"])
    assert params.size == (48, 32)  # A1111's "Size" is the first pass's
    for key, value in {"Denoising strength": "0.5", "Hires upscale": "2", "Hires steps": "1",
                       "Hires upscaler": "Latent (bicubic)"}.items():  # fmt: skip
        assert params.extra[key] == value
    assert params.hires_fix() == HiresFix(scale=2.0, steps=1, denoising_strength=0.5, upscaler="Latent (bicubic)")


def test_prompt_editing_counts_on_from_the_first_pass(flow_bundles):
    """A1111's hires offsets (prompt_parser.py): ``[a:b:1.5]`` is ``a`` through the first pass and switches
    half-way through the second."""
    bundle = flow_bundles("flux")
    texts = []
    handle = bundle.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: texts.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        generate_images(bundle, ["[a cat:a dog:1.5]"], steps=2, cfg=3.5, seed=1, width=32, height=32,
                        hires=HiresFix(scale=1, steps=4, denoising_strength=0.5))  # fmt: skip
    finally:
        handle.remove()
    # second pass schedule [(2, "a cat"), (4, "a dog")]: A1111's evaluations 0..2 are "a cat"
    assert len(texts) == 2 + 4
    assert all(torch.equal(texts[0], text) for text in texts[1:5])
    assert not torch.equal(texts[4], texts[5])


def test_hr_cfg_and_hr_distilled_cfg_guide_the_second_pass(flow_bundles):
    """Forge's "Hires Distilled CFG Scale" (modules/processing.py hr_distilled_cfg, given to the hires
    conditioning as its distilled_cfg_scale) is FLUX.1's embedded guidance in the second pass, and its "Hires
    CFG Scale" (hr_cfg) the pass's real CFG: above 1, a prompt and a negative call a step."""
    bundle = flow_bundles("flux")
    guidance: list[float] = []

    def hook(module, args, kwargs):
        guidance.append(float(kwargs["guidance"].flatten()[0]))

    handle = bundle.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generate_images(bundle, ["a cat"], steps=2, cfg=3.5, seed=1, width=32, height=32,
                        hires=HiresFix(scale=1, steps=2, cfg=2.0, distilled_cfg=1.5))  # fmt: skip
    finally:
        handle.remove()
    assert guidance == [3.5, 3.5] + [1.5] * 4  # one call a step, then prompt and negative a step


def test_flux_infotext_writes_forges_hires_cfg_fields_when_they_differ():
    hires = HiresFix(cfg=2.0, distilled_cfg=1.5)
    fields = hires.infotext_fields("a", "", "euler", cfg=1.0, distilled_cfg=3.5)
    assert fields["Hires CFG Scale"] == 2.0 and fields["Hires Distilled CFG Scale"] == 1.5
    same = hires.infotext_fields("a", "", "euler", cfg=2.0, distilled_cfg=1.5)
    assert "Hires CFG Scale" not in same and "Hires Distilled CFG Scale" not in same
    text = "a\nSteps: 2, Sampler: Euler, CFG scale: 1, Seed: 1, Size: 32x32, Distilled CFG Scale: 3.5, "
    text += "Denoising strength: 0.7, Hires CFG Scale: 2, Hires Distilled CFG Scale: 1.5, Hires upscale: 2"
    assert parse_parameters(text).hires_fix() == HiresFix(cfg=2.0, distilled_cfg=1.5)


def test_flux_hr_cfg_1_with_a_negative_prompt_is_one_line_before_the_first_pass(flow_bundles):
    """--hr-cfg is FLUX.1's true CFG in the hires pass: at 1 that pass has no negative, and a negative prompt there
    is refused as on the first pass (sdcore does not drop it silently), but before the first pass runs and naming
    the hires option, not --true-cfg-scale, which the user already set."""
    bundle = flow_bundles("flux")
    settings = {"steps": 1, "cfg": 3.5, "seed": 1, "width": 32, "height": 32, "true_cfg_scale": 2.0}
    with _Calls(bundle.transformer) as rec, pytest.raises(ConfigError, match="--hr-cfg") as info:
        generate_images(bundle, ["a cat"], negative_prompt="dark", hires=HiresFix(scale=1, steps=1, cfg=1.0),
                        **settings)  # fmt: skip
    assert rec.calls == [] and "--true-cfg-scale above 1" not in str(info.value)
    with _Calls(bundle.transformer) as rec:  # an empty hires negative needs no true CFG
        generate_images(bundle, ["a cat"], negative_prompt="dark", hires=HiresFix(scale=1, steps=1, cfg=1.0,
                        negative_prompt=""), **settings)  # fmt: skip
    assert len(rec.calls) == 2 + 1  # true CFG's two calls in the first pass, one in the second


def test_flux_hr_negative_without_true_cfg_is_one_line_before_the_first_pass(flow_bundles):
    """--hr-negative without true CFG (none on the first pass, no --hr-cfg): refused before the first pass too."""
    bundle = flow_bundles("flux")
    with _Calls(bundle.transformer) as rec, pytest.raises(ConfigError, match="--hr-cfg above 1"):
        generate_images(bundle, ["a cat"], steps=1, cfg=3.5, seed=1, width=32, height=32,
                        hires=HiresFix(scale=1, steps=1, negative_prompt="blurry"))  # fmt: skip
    assert rec.calls == []
    with pytest.raises(ConfigError, match="add --true-cfg-scale above 1"):  # the first pass's own negative
        generate_images(bundle, ["a cat"], negative_prompt="dark", steps=1, cfg=3.5, seed=1, width=32, height=32,
                        hires=HiresFix(scale=1, steps=1))  # fmt: skip


@pytest.mark.parametrize(
    ("family", "hires", "final"),
    [
        # cover 40x8 from 32x32: 40x40, crop (40 - 8) // 16 = 2 units of 16 from 40 // 16 = 2: nothing left
        ("flux", HiresFix(resize_x=40, resize_y=8, steps=1), "32x0"),
        ("chroma", HiresFix(resize_x=8, steps=1, upscaler="Lanczos"), "0x0"),  # 8x8: less than one 16-pixel unit
        ("sd1", HiresFix(resize_x=4, resize_y=4, steps=1), "0x0"),  # A1111's rule: 4 // 8 = 0 latent pixels
    ],
)
def test_a_hires_target_with_no_whole_unit_is_one_line_before_the_first_pass(flow_bundles, family, hires, final):
    """A target that rounds (or crops) down to nothing (sides of 16 pixels on the flow families, 8 on SD) is
    refused with one line naming the size, not a torch error from an empty latent after the first pass."""
    from sdcore.models.load import load_model

    bundle = load_model("tiny:sd1") if family == "sd1" else flow_bundles(family)
    size = 64 if family == "sd1" else 32
    with _Calls(bundle.denoiser) as rec, pytest.raises(ConfigError, match=f"makes a {final} image"):
        generate_images(bundle, ["a"], steps=1, cfg=3.5, width=size, height=size, hires=hires)
    assert rec.calls == []

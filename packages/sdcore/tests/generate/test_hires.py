"""A1111's Hires. fix in ``generate_images`` and ``sdcore generate`` (tiny models).

Expected values are A1111's rules rewritten here (AUTOMATIC1111/stable-diffusion-webui, facts only):
modules/processing.py ``StableDiffusionProcessingTxt2Img.calculate_target_resolution`` (sizes, crop),
``sample_hr_pass`` (noise from the seeds at the large shape, steps ``hr_second_pass_steps or steps``),
modules/sd_samplers_common.py ``setup_img2img_steps`` (schedule ``int(steps / min(strength, 0.999))``,
``t_enc = steps - 1``: the last ``steps`` steps), modules/sd_samplers_kdiffusion.py ``sample_img2img``
(``x + noise * sigmas[schedule - t_enc - 1]``), modules/images.py ``resize_image`` + modules/upscaler.py,
modules/prompt_parser.py ``get_learned_conditioning_prompt_schedules`` (hires offsets, its doctests).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sdcore.builtin import generate_command
from sdcore.builtin.generate_command import generate
from sdcore.errors import ConfigError
from sdcore.generate.hires import HiresFix, upscale_image
from sdcore.generate.networks import Activation, PromptNetworkHandler
from sdcore.generate.pipeline import generate_images, make_scheduler
from sdcore.generate.pnginfo import parse_parameters
from sdcore.generate.prompt_editing import prompt_schedule
from sdcore.generate.session import NetworkSession


class _UnetCalls:
    """Records each UNet call's (sample, timestep, conv_out bias) while installed."""

    def __init__(self, unet):
        self.unet = unet
        self.calls: list[tuple[torch.Tensor, float, float]] = []

    def __enter__(self):
        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            bias = float(module.conv_out.bias.detach()[0])
            self.calls.append((sample.detach().clone(), float(torch.as_tensor(timestep).flatten()[0]), bias))

        self.handle = self.unet.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _arr(image):
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(
    ("family", "steps", "hr_steps", "strength"),
    [("sd1", 4, 3, 0.5), ("sd1", 4, 0, 0.7), ("sd1", 3, 2, 1.0), ("sd1", 3, 5, 0.3), ("sdxl", 3, 2, 0.6)],
)
def test_second_pass_runs_a1111s_steps_on_a1111s_schedule(tiny_bundles, family, steps, hr_steps, strength):
    bundle = tiny_bundles(family)
    hires = HiresFix(scale=1.5, steps=hr_steps, denoising_strength=strength)
    with _UnetCalls(bundle.unet) as rec:
        images = generate_images(bundle, ["a cat"], steps=steps, seed=3, width=64, height=64, hires=hires)
    run = hr_steps or steps  # sample_hr_pass: hr_second_pass_steps or steps
    schedule = int(run / min(strength, 0.999))  # setup_img2img_steps
    assert len(rec.calls) == steps + run  # one (batched CFG) UNet call a step, each pass
    scheduler = make_scheduler(bundle, "euler_a")
    scheduler.set_timesteps(schedule)
    # the last `run` steps of the schedule (sigma_sched = sigmas[schedule - t_enc - 1:], t_enc = run - 1)
    expected = [float(t) for t in scheduler.timesteps[schedule - run :]]
    assert [t for _, t, _ in rec.calls[steps:]] == pytest.approx(expected)
    assert images[0].size == (96, 96)


def test_second_pass_noise_is_the_seeds_noise_at_the_large_shape(sd1):
    from sdcore.generate.pipeline import _run, build_pipeline

    seed, steps, run, strength = 11, 3, 2, 0.5
    hires = HiresFix(scale=2, steps=run, denoising_strength=strength)
    with _UnetCalls(sd1.unet) as rec:
        generate_images(sd1, ["a cat"], steps=steps, seed=seed, width=64, height=64, hires=hires)
    pipe = build_pipeline(sd1)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        first = _run(pipe, sd1, ["a cat"], [""], seeds=[seed], steps=steps, cfg=7.0, width=64, height=64,
                     image=None, strength=0.75, clip_skip=1, output_type="latent")  # fmt: skip
    init = torch.nn.functional.interpolate(first.float(), size=(16, 16), mode="bilinear")  # "Latent"
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    schedule = int(run / min(strength, 0.999))
    scheduler = make_scheduler(sd1, "euler_a")
    scheduler.set_timesteps(schedule)
    sigma = float(scheduler.sigmas[schedule - run])
    expected = (init + noise * sigma) / (sigma**2 + 1) ** 0.5  # k-diffusion's c_in of x + noise * sigma
    sample = rec.calls[steps][0][:1]  # the second pass's first call, uncond half of the CFG batch
    torch.testing.assert_close(sample, expected, atol=1e-4, rtol=1e-4)


def test_each_image_depends_on_its_seed_alone(sd1):
    hires = HiresFix(scale=1.5, steps=2, upscaler="Lanczos")
    pair = generate_images(sd1, ["a cat", "a cat"], steps=2, seed=20, width=64, height=64, hires=hires)
    alone = generate_images(sd1, ["a cat"], steps=2, seed=21, width=64, height=64, hires=hires)
    # batched and single runs may differ by 1/255 in a pixel (float order), as in test_pipeline's seed test
    assert np.abs(_arr(pair[1]) - _arr(alone[0])).max() <= 1
    assert np.abs(_arr(pair[1]) - _arr(alone[0])).mean() < 0.01
    assert np.abs(_arr(pair[0]) - _arr(pair[1])).mean() > 5  # another seed: another image


def test_scale_1_strength_0_is_the_first_pass_and_runs_no_second_pass(sd1):
    plain = generate_images(sd1, ["a cat"], steps=3, seed=4, width=64, height=64)
    with _UnetCalls(sd1.unet) as rec:
        same = generate_images(
            sd1, ["a cat"], steps=3, seed=4, width=64, height=64, hires=HiresFix(scale=1, denoising_strength=0)
        )
    assert len(rec.calls) == 3  # strength 0: setup_img2img_steps gives 0 steps, the sampler returns its input
    assert np.array_equal(_arr(plain[0]), _arr(same[0]))


def test_strength_0_with_a_scale_only_upscales(sd1):
    with _UnetCalls(sd1.unet) as rec:
        big = generate_images(sd1, ["a cat"], steps=2, seed=4, width=64, height=64,
                              hires=HiresFix(scale=2, denoising_strength=0, upscaler="Lanczos"))  # fmt: skip
    assert len(rec.calls) == 2
    assert big[0].size == (128, 128)


@pytest.mark.parametrize(
    ("size", "hires", "target", "final"),
    [
        # int(width * scale): 1.5 * 40 = 60, whose latent is 60 // 8 = 7: the image is 56
        ((64, 40), HiresFix(scale=1.5), (96, 60, 0, 0), (96, 56)),
        # one side given: the other keeps the ratio, x * height // width
        ((64, 48), HiresFix(resize_x=80), (80, 60, 0, 0), (80, 56)),
        ((64, 48), HiresFix(resize_y=96), (128, 96, 0, 0), (128, 96)),
        # both given: cover the box, crop (upscaled - wanted) // 8 latent pixels
        ((64, 64), HiresFix(resize_x=96, resize_y=64), (96, 96, 0, 4), (96, 64)),
        ((64, 32), HiresFix(resize_x=96, resize_y=64), (128, 64, 4, 0), (96, 64)),
    ],
)
def test_target_sizes_and_crop_are_a1111s(sd1, size, hires, target, final):
    assert hires.target(*size) == target
    assert hires.final_size(*size) == final
    image = generate_images(sd1, ["a cat"], steps=1, seed=0, width=size[0], height=size[1],
                            hires=HiresFix(**{**hires.__dict__, "steps": 1}))[0]  # fmt: skip
    assert image.size == final


def test_latent_and_image_upscalers_differ(sd1):
    def make(upscaler):
        hires = HiresFix(scale=1.5, steps=2, upscaler=upscaler)
        return _arr(generate_images(sd1, ["a cat"], steps=2, seed=9, width=64, height=64, hires=hires)[0])

    latent, nearest, lanczos, image_nearest = (make(u) for u in ("Latent", "Latent (nearest)", "Lanczos", "Nearest"))
    for a, b in ((latent, lanczos), (latent, nearest), (lanczos, image_nearest), (nearest, image_nearest)):
        assert not np.array_equal(a, b)


def test_image_upscalers_resize_as_a1111():
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (32, 24, 3), dtype=np.uint8))
    # an integer scale to a multiple of 8: Nearest alone, every pixel repeated
    doubled = np.asarray(upscale_image(small, 48, 64, "Nearest"))
    assert np.array_equal(doubled, np.asarray(small).repeat(2, axis=0).repeat(2, axis=1))
    # 1.5 x 24 = 36: the upscaler's own size, Lanczos to (36 // 8 * 8) = 32 wide, then to 36
    scaled = upscale_image(small, 36, 48, "Nearest")
    chain = small.resize((36, 48), Image.Resampling.NEAREST).resize((32, 48), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(scaled), np.asarray(chain.resize((36, 48), Image.Resampling.LANCZOS)))
    # no enlargement: straight Lanczos
    same = upscale_image(small, 24, 32, "Lanczos")
    assert np.array_equal(np.asarray(same), np.asarray(small))


def test_hires_prompt_schedule_counts_on_from_the_first_pass():
    # prompt_parser.py doctests: get_learned_conditioning_prompt_schedules([p], 10, 10)
    assert prompt_schedule("a [b:.5] c", 10, first_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, first_steps=10) == [(5, "a  c"), (10, "a b c")]
    # an integer step counts from the first pass's steps (v - base_steps)
    assert prompt_schedule("[x:y:25]", 10, first_steps=20) == [(5, "x"), (10, "y")]
    assert prompt_schedule("[x:y:5]", 10, first_steps=20) == [(10, "y")]
    assert prompt_schedule("a [b:c:0.5]", 10) == [(5, "a b"), (10, "a c")]  # the first pass is unchanged


class _Shift(PromptNetworkHandler):
    tag = "test"

    def activate(self, bundle, refs, prompt, negative_prompt):
        bias = bundle.unet.conv_out.bias
        saved = bias.detach().clone()
        with torch.no_grad():
            bias += sum(r.weight for r in refs)

        def undo():
            with torch.no_grad():
                bias.copy_(saved)

        return Activation(prompt, negative_prompt, undo, {"Test hashes": refs[0].name})


def test_networks_follow_each_pass_prompt(sd1):
    session = NetworkSession({"test": _Shift()})
    base = float(sd1.unet.conv_out.bias.detach()[0])

    def biases(hires):
        with _UnetCalls(sd1.unet) as rec:
            generate_images(sd1, ["a cat <test:n:0.5>"], steps=2, seed=1, width=64, height=64,
                            networks=session, hires=hires)  # fmt: skip
        return [round(b - base, 4) for _, _, b in rec.calls]

    assert biases(HiresFix(scale=1, steps=2)) == [0.5] * 4  # same prompt: on in both passes
    assert biases(HiresFix(scale=1, steps=2, prompt="a cat")) == [0.5, 0.5, 0.0, 0.0]
    assert biases(HiresFix(scale=1, steps=2, prompt="a dog <test:m:-1>")) == [0.5, 0.5, -1.0, -1.0]
    assert float(sd1.unet.conv_out.bias.detach()[0]) == base


def test_refusals(sd1):
    from sdcore.models.load import load_model

    with pytest.raises(ConfigError, match="follows a txt2img pass"):
        generate_images(sd1, ["x"], steps=1, init_image=Image.new("RGB", (64, 64)), hires=HiresFix())
    with pytest.raises(ConfigError, match=r"unknown hires upscaler 'R-ESRGAN 4x\+'.*; --hr-sampler"):
        generate_images(sd1, ["x"], steps=1, hires=HiresFix(upscaler="R-ESRGAN 4x+", sampler="nope"))
    # the flow families run it (test_hires_flow.py), with their own samplers, checked before the first pass
    with pytest.raises(ConfigError, match="'ddim' does not sample flow-matching models"):
        generate_images(load_model("tiny:sd3"), ["x"], steps=1, hires=HiresFix(sampler="ddim"))


def _invoke(args):
    from sdcore.plugins import get_plugin_manager

    pm = get_plugin_manager(builtins=False, entrypoints=False)
    return CliRunner().invoke(generate, args, obj=types.SimpleNamespace(pm=pm), catch_exceptions=True)


def test_cli_writes_and_reads_back_a1111s_hires_fields(tmp_path):
    out = tmp_path / "hr.png"
    result = _invoke(["a cat", "-m", "tiny:sd1", "--steps", "2", "--seed", "3", "--size", "64x48",
                      "--hr-resize-x", "96", "--hr-steps", "1", "--hr-upscaler", "latent (nearest-exact)",
                      "--hr-negative", "blurry", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (96, 72)  # 96 x 48 // 64 = 72
        text = image.info["parameters"]
    fields = text.splitlines()[-1]
    # A1111's order: Denoising strength in its slot, the hires fields after RNG, Version last
    assert "Size: 64x48" in fields
    order = ["Denoising strength: 0.7", "RNG: CPU", "Hires negative prompt: blurry", "Hires resize: 96x0",
             "Hires steps: 1", "Hires upscaler: Latent (nearest-exact)", "Version:"]  # fmt: skip
    positions = [fields.index(f) for f in order]
    assert positions == sorted(positions)
    assert "Hires prompt" not in fields and "Hires sampler" not in fields and "Hires upscale:" not in fields
    params = parse_parameters(text)
    assert params.size == (64, 48)
    assert params.hires_fix() == HiresFix(resize_x=96, upscaler="Latent (nearest-exact)", steps=1,
                                          denoising_strength=0.7, negative_prompt="blurry")  # fmt: skip


def test_cli_scale_default_and_plain_txt2img_fields(tmp_path):
    out, plain = tmp_path / "hr.png", tmp_path / "plain.png"
    assert _invoke(["a cat", "-m", "tiny:sd1", "--steps", "1", "--hires", "--denoising-strength", "0",
                    "--hr-sampler", "Euler", "-o", str(out)]).exit_code == 0  # fmt: skip
    assert _invoke(["a cat", "-m", "tiny:sd1", "--steps", "1", "-o", str(plain)]).exit_code == 0
    with Image.open(out) as image, Image.open(plain) as base:
        assert image.size == (128, 128)  # A1111's default "Upscale by" 2
        params = parse_parameters(image.info["parameters"])
        assert parse_parameters(base.info["parameters"]).hires_fix() is None
        assert "Denoising strength" not in base.info["parameters"]
    assert params.extra["Hires upscale"] == "2" and params.extra["Hires upscaler"] == "Latent"
    assert params.extra["Hires sampler"] == "Euler"
    assert params.hires_fix() == HiresFix(denoising_strength=0.0, sampler="euler")


def test_cli_bad_upscaler_is_one_line_before_loading(tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(generate_command, "_load_bundle", no_load)
    result = _invoke(["a cat", "-m", "tiny:sd1", "--hr-upscaler", "4x-UltraSharp", "-o", str(tmp_path / "x.png")])
    # the CLI prints a ConfigError as one "Error: ..." line (sdcore.cli), no traceback
    assert isinstance(result.exception, ConfigError), result.output
    assert "unknown hires upscaler '4x-UltraSharp'" in str(result.exception) and "\n" not in str(result.exception)
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(image)
    result = _invoke(
        ["a", "-m", "tiny:sd1", "--init-image", str(image), "--strength", "0", "-o", str(tmp_path / "y.png")]
    )
    # strength 0 passes the pre-flight (A1111's one img2img step: test_img2img_steps) and reaches the loader
    assert isinstance(result.exception, AssertionError) and "the model was loaded" in str(result.exception)
    result = _invoke(["a", "-m", "tiny:sd1", "--init-image", str(image), "--hires", "-o", str(tmp_path / "z.png")])
    assert isinstance(result.exception, ConfigError) and "follows a txt2img pass" in str(result.exception)


def test_cli_writes_hires_schedule_type_as_the_first_pass_does(tmp_path):
    """A1111 1.9+ reads a plain "Hires sampler: DPM++ 2M" with its Automatic (Karras) schedule; sdcore ran
    uniform sigmas, so the schedule is named, as "Schedule type" is for the first pass."""

    def fields(*args):
        out = tmp_path / f"hr{len(list(tmp_path.iterdir()))}.png"
        result = _invoke(["a cat", "-m", "tiny:sd1", "--steps", "1", "--size", "64x64", "--hires",
                          "--hr-steps", "1", *args, "-o", str(out)])  # fmt: skip
        assert result.exit_code == 0, result.output
        with Image.open(out) as image:
            return parse_parameters(image.info["parameters"])

    params = fields("--sampler", "euler_a", "--hr-sampler", "DPM++ 2M")
    assert params.extra["Hires sampler"] == "DPM++ 2M" and params.extra["Hires schedule type"] == "SGM Uniform"
    assert "Schedule type" not in params.extra  # Euler a: Automatic, as A1111 assumes
    assert params.hires_fix().sampler == "dpm++2m"
    params = fields("--sampler", "euler_a", "--hr-sampler", "DPM++ 2M Karras")  # the label names it
    assert params.extra["Hires sampler"] == "DPM++ 2M Karras" and "Hires schedule type" not in params.extra
    # the first pass names its schedule: a missing hires field would mean "Use same scheduler" in A1111
    params = fields("--sampler", "dpm++2m", "--hr-sampler", "Euler")
    assert params.extra["Schedule type"] == "SGM Uniform" and params.extra["Hires schedule type"] == "Automatic"
    params = fields("--sampler", "dpm++2m", "--hr-sampler", "dpm++2m")  # same sampler: no hires fields
    assert "Hires sampler" not in params.extra and "Hires schedule type" not in params.extra


# Forge's txt2img "Hires CFG Scale" (lllyasviel/stable-diffusion-webui-forge modules/processing.py,
# StableDiffusionProcessingTxt2Img.hr_cfg; its UI slider starts at the first pass's default, 7): the guidance
# scale of the second pass alone.
@pytest.mark.parametrize(("hr_cfg", "second"), [(3.0, 3.0), (None, 7.0)])
def test_hr_cfg_is_the_second_pass_guidance(sd1, monkeypatch, hr_cfg, second):
    from sdcore.generate import pipeline

    scales: list[float] = []
    real = pipeline._hires_run

    def spy(pipe, *args, **kwargs):
        call = type(pipe).__call__

        def recording(self, *a, **k):
            scales.append(k["guidance_scale"])
            return call(self, *a, **k)

        monkeypatch.setattr(type(pipe), "__call__", recording)
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_hires_run", spy)
    generate_images(sd1, ["a cat"], steps=1, cfg=7.0, seed=1, width=64, height=64,
                    hires=HiresFix(scale=1, steps=1, cfg=hr_cfg))  # fmt: skip
    assert scales == [second]


def test_hr_distilled_cfg_is_only_for_distilled_guidance(sd1):
    with pytest.raises(ConfigError, match="--hr-distilled-cfg is for guidance-distilled models"):
        generate_images(sd1, ["x"], steps=1, width=64, height=64, hires=HiresFix(distilled_cfg=3.0))
    assert HiresFix(cfg=float("nan")).problems() == ["--hr-cfg must be a finite number, got nan"]


def test_cli_writes_and_reads_hires_cfg_only_when_it_differs(tmp_path):
    texts = []
    for hr_cfg in ("5", "7"):
        out = tmp_path / f"hr{hr_cfg}.png"
        result = _invoke(["a cat", "-m", "tiny:sd1", "--steps", "1", "--size", "64x64", "--cfg", "7",
                          "--hr-cfg", hr_cfg, "--hr-scale", "1", "-o", str(out)])  # fmt: skip
        assert result.exit_code == 0, result.output
        with Image.open(out) as image:
            texts.append(image.info["parameters"])
    fields = texts[0].splitlines()[-1]
    # Forge's order: after the hires prompts, before the size fields
    assert fields.index("Hires CFG Scale: 5") < fields.index("Hires upscale: 1") < fields.index("Hires upscaler")
    assert parse_parameters(texts[0]).hires_fix() == HiresFix(scale=1.0, cfg=5.0)
    assert "Hires CFG Scale" not in texts[1] and parse_parameters(texts[1]).hires_fix() == HiresFix(scale=1.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "1000000000000"], "'1000000000000': sdcore makes image sides of at most 16384"),
        (["--size", "64x20000"], "'64x20000': sdcore makes image sides of at most 16384"),
        (["--hr-resize-x", "1000000000000"], "--hr-resize-x/-y must be at most 16384, got 1000000000000x0"),
        (["--hr-steps", "1000000000000"], "1000000000000 is not in the range 0<=x<=1000"),
    ],
)
def test_a_huge_size_or_hires_size_is_refused_before_the_model_loads(tmp_path, monkeypatch, args, message):
    """A typo's 10^12 overflowed torch's size computation (``Storage size calculation overflowed``) or asked
    numpy for 10 TiB of sigmas, both as tracebacks after the model had loaded."""
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("must not load"))
    result = _invoke(["a cat", "-m", "tiny:sd1", "--steps", "1", *args, "-o", str(tmp_path / "x.png")])
    assert result.exit_code != 0  # click's usage error, or the pre-flight's (exit 2 under the root command)
    assert message in result.output or message in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_a_hires_scale_past_the_largest_side_is_one_line(sd1, tmp_path):
    """``--hr-scale`` multiplies the model's size, known once it loads: still one line, before the first pass."""
    with pytest.raises(ConfigError, match=r"makes a 64000000000000x64000000000000 image; .* at most 16384"):
        generate_images(sd1, ["x"], steps=1, width=64, height=64, hires=HiresFix(scale=1e12))
    result = _invoke(["a cat", "-m", "tiny:sd1", "--steps", "1", "--hr-scale", "1e12", "-o", str(tmp_path / "x.png")])
    assert isinstance(result.exception, ConfigError)  # the root command's one line
    assert "at most 16384: lower --hr-scale or --hr-resize-x/-y" in str(result.exception)

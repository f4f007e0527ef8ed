"""Flux.1 generation beyond plain Euler: true CFG with a negative prompt and the shared flow samplers,
each against diffusers' ``FluxPipeline`` (or, for Heun, which diffusers' Flux pipeline cannot run, against
Heun's method written out over the pipeline's own schedule)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def dev():
    from sdcore.models.flux.adapter import FluxAdapter

    return FluxAdapter().create_tiny(variant="dev", seed=0)


def _pipe(bundle, scheduler=None):
    from diffusers import FluxPipeline

    scheduler = scheduler or type(bundle.noise_scheduler).from_config(bundle.noise_scheduler.config)
    pipe = FluxPipeline(scheduler=scheduler, vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                        tokenizer=bundle.tokenizers[0], text_encoder_2=bundle.text_encoders[1],
                        tokenizer_2=bundle.tokenizers[1], transformer=bundle.transformer)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _array(image):
    return np.asarray(image).astype(np.int16)


# ----------------------------------------------------------------------------------------------- true CFG


def test_negative_prompt_with_true_cfg_equals_flux_pipeline(dev):
    """--negative with --true-cfg-scale 3 = FluxPipeline(negative_prompt=..., true_cfg_scale=3) pixel for
    pixel; the negative changes the image (it is not dropped)."""
    from sdcore.generate.pipeline import generate_images

    settings = {"steps": 3, "cfg": 3.5, "seed": 7, "width": 32, "height": 48}
    got = generate_images(dev, ["a purple ring"], negative_prompt="a blue square", true_cfg_scale=3.0, **settings)[0]
    with torch.no_grad():
        expected = _pipe(dev)("a purple ring", negative_prompt="a blue square", true_cfg_scale=3.0, width=32,
                              height=48, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=512,
                              generator=torch.Generator().manual_seed(7)).images[0]  # fmt: skip
    assert np.array_equal(_array(got), _array(expected))
    plain = generate_images(dev, ["a purple ring"], **settings)[0]
    assert np.abs(_array(got) - _array(plain)).max() > 0
    # an empty negative with true CFG guides against the empty prompt (Forge's and ComfyUI's reading)
    empty = generate_images(dev, ["a purple ring"], true_cfg_scale=3.0, **settings)[0]
    with torch.no_grad():
        reference = _pipe(dev)("a purple ring", negative_prompt="", true_cfg_scale=3.0, width=32, height=48,
                               num_inference_steps=3, guidance_scale=3.5, max_sequence_length=512,
                               generator=torch.Generator().manual_seed(7)).images[0]  # fmt: skip
    assert np.array_equal(_array(empty), _array(reference))


def test_true_cfg_img2img_equals_flux_img2img_pipeline(dev):
    from diffusers import FluxImg2ImgPipeline
    from sdcore.generate.pipeline import generate_images

    init = _init_image()
    got = generate_images(dev, ["a ring"], negative_prompt="a square", true_cfg_scale=2.0, steps=4, cfg=2.0,
                          seed=1, init_image=init, strength=0.5)[0]  # fmt: skip
    pipe = FluxImg2ImgPipeline(scheduler=type(dev.noise_scheduler).from_config(dev.noise_scheduler.config),
                               vae=dev.vae, text_encoder=dev.text_encoders[0], tokenizer=dev.tokenizers[0],
                               text_encoder_2=dev.text_encoders[1], tokenizer_2=dev.tokenizers[1],
                               transformer=dev.transformer)  # fmt: skip
    with torch.no_grad():  # A1111's strength 0.5 of 4 steps runs 3 (t_enc + 1): the pipeline's strength 0.75
        # from the posterior's mean (the pipeline takes latents as they are): its noise is the seed's first draw
        mean = pipe.vae.encode(pipe.image_processor.preprocess(init)).latent_dist.mean
        start = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        expected = pipe("a ring", negative_prompt="a square", true_cfg_scale=2.0, image=start, strength=0.75,
                        width=32, height=32, num_inference_steps=4, guidance_scale=2.0,
                        generator=[torch.Generator().manual_seed(1)]).images[0]  # fmt: skip
    assert np.array_equal(_array(got), _array(expected))


def test_negative_without_true_cfg_says_how_to_enable_it(dev):
    from sdcore.errors import ConfigError
    from sdcore.generate.pipeline import generate_images

    with pytest.raises(ConfigError, match=r"needs true CFG: add --true-cfg-scale above 1"):
        generate_images(dev, ["a cat"], negative_prompt="blurry", steps=1, width=32, height=32)
    with pytest.raises(ConfigError, match="at least 1"):
        generate_images(dev, ["a cat"], true_cfg_scale=0.5, steps=1, width=32, height=32)


def test_cli_true_cfg_scale(tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.generate.pnginfo import read_png_parameters
    from sdcore.plugins import get_plugin_manager

    cli, out = build_cli(get_plugin_manager()), tmp_path / "neg.png"
    base = ["generate", "--model", "tiny:flux", "a ring", "-n", "blurry", "--steps", "1", "--size", "32",
            "--models-dir", str(tmp_path), "-o", str(out)]  # fmt: skip
    refused = CliRunner().invoke(cli, base)
    assert refused.exit_code != 0 and "add --true-cfg-scale above 1" in refused.output, refused.output
    result = CliRunner().invoke(cli, [*base, "--true-cfg-scale", "2.5", "--cfg", "3.5"])
    assert result.exit_code == 0, result.output
    params = read_png_parameters(out)
    assert params is not None and params.negative_prompt == "blurry"
    # as Forge writes Flux images: "CFG scale" is the true CFG, the guidance is "Distilled CFG Scale"
    assert params.cfg == 2.5 and params.extra.get("Distilled CFG Scale") == "3.5"


# ----------------------------------------------------------------------------------------------- samplers


def test_euler_a_equals_flux_pipeline_with_that_scheduler(dev):
    """euler_a = FluxPipeline with diffusers' stochastic flow Euler swapped in (dynamic shift from the
    config, its step noise from torch's global generator, which sdcore seeds with the image's seed)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from sdcore.generate.pipeline import generate_images

    state = torch.random.get_rng_state()
    got = generate_images(dev, ["a red square"], steps=3, cfg=3.5, seed=11, width=48, height=32, sampler="euler_a")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
    again = generate_images(dev, ["a red square"], steps=3, cfg=3.5, seed=11, width=48, height=32, sampler="Euler a")
    euler = generate_images(dev, ["a red square"], steps=3, cfg=3.5, seed=11, width=48, height=32, sampler="euler")
    config = {k: v for k, v in dev.noise_scheduler.config.items() if not k.startswith("_")}  # _use_default_values
    scheduler = FlowMatchEulerDiscreteScheduler.from_config({**config, "stochastic_sampling": True})
    assert scheduler.config.use_dynamic_shifting and scheduler.config.stochastic_sampling
    torch.manual_seed(11)
    with torch.no_grad():
        expected = _pipe(dev, scheduler)("a red square", width=48, height=32, num_inference_steps=3,
                                         guidance_scale=3.5, max_sequence_length=512,
                                         generator=torch.Generator().manual_seed(11)).images[0]  # fmt: skip
    assert np.array_equal(_array(got[0]), _array(expected))
    assert np.array_equal(_array(got[0]), _array(again[0]))
    assert np.abs(_array(got[0]) - _array(euler[0])).max() > 0  # the fresh noise does act
    # in a batch, each image is its own seed's: image 1 of seeds 10, 11 is the image of seed 11 alone
    batch = generate_images(dev, ["a cat", "a red square"], steps=3, cfg=3.5, seed=10, width=48, height=32,
                            sampler="euler_a")  # fmt: skip
    assert np.array_equal(_array(batch[1]), _array(got[0]))


def test_diffusers_heun_cannot_run_in_flux_pipeline(dev):
    """Why Flux needs sdcore's Heun: diffusers' FlowMatchHeunDiscreteScheduler takes neither the sigma list
    nor the dynamic shift mu that FluxPipeline hands every scheduler (if this starts passing, diffusers
    gained them and the stock scheduler can be used)."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = _pipe(dev, FlowMatchHeunDiscreteScheduler(shift=3.0))
    with pytest.raises((ValueError, TypeError)), torch.no_grad():
        pipe("a cat", width=32, height=32, num_inference_steps=2, max_sequence_length=16)


def test_heun_on_flux_is_heuns_method_on_the_pipelines_schedule(dev):
    """sdcore's heun inside FluxPipeline = Heun's method written out here: the predictor/corrector average of
    two velocities per step over the sigmas FluxPipeline's Euler uses (linspace(1, 1/n, n) under dev's
    resolution shift exp(mu)), a plain Euler step to sigma 0 at the end."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from sdcore.models.flux.adapter import FluxAdapter, image_ids, text_ids
    from sdcore.models.flux.generate import build_flux_pipeline

    steps, height, width = 3, 32, 64
    pipe = build_flux_pipeline(dev, sampler="heun")
    pipe.set_progress_bar_config(disable=True)
    cond = FluxAdapter().encode_prompts(dev, ["a purple ring"])
    common = {"prompt_embeds": cond.hidden_states, "pooled_prompt_embeds": cond.pooled, "guidance_scale": 3.5,
              "num_inference_steps": steps, "width": width, "height": height}  # fmt: skip
    with torch.no_grad():
        got = pipe(**common, generator=torch.Generator().manual_seed(5), output_type="latent").images
        start = pipe.prepare_latents(1, 16, height, width, cond.hidden_states.dtype, "cpu",
                                     torch.Generator().manual_seed(5))[0]  # fmt: skip

    config = dev.noise_scheduler.config
    mu = calculate_shift(start.shape[1], config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)  # fmt: skip
    plain = np.linspace(1.0, 1 / steps, steps)
    sigmas = [float(np.exp(mu) / (np.exp(mu) + (1 / s - 1))) for s in plain] + [0.0]  # time_shift, exponent 1
    assert not np.allclose(sigmas[1], 3.0 * plain[1] / (1 + 2.0 * plain[1]))  # not the static shift 3

    def velocity(x, sigma):
        t = torch.full((1,), sigma, dtype=torch.float32) * 1000
        return dev.transformer(hidden_states=x, timestep=t.to(x.dtype) / 1000,
                               guidance=torch.full((1,), 3.5), pooled_projections=cond.pooled,
                               encoder_hidden_states=cond.hidden_states,
                               txt_ids=text_ids(cond.hidden_states.shape[1]), img_ids=image_ids(4, 8),
                               return_dict=False)[0]  # fmt: skip

    x = start.float()
    with torch.no_grad():
        for i in range(steps):
            s, s_next = torch.tensor(sigmas[i]), torch.tensor(sigmas[i + 1])
            first = velocity(x, sigmas[i])
            predicted = x + (s_next - s) * first
            if sigmas[i + 1] == 0.0:
                x = predicted
            else:
                x = x + (s_next - s) * 0.5 * (first + velocity(predicted, float(s_next)))
    assert torch.allclose(pipe.scheduler.sigmas, torch.tensor(sigmas).repeat_interleave(2)[1:-1], atol=1e-6)
    assert torch.allclose(got, x, atol=1e-5), (got - x).abs().max()


def test_heun_through_generate_images(dev, tiny_model):
    """heun through sdcore generate on dev (dynamic shift): an image that differs from Euler's. With an init
    image Flux refuses it (FluxImg2ImgPipeline would cut Heun's doubled timesteps as if they were steps:
    measured, strength 0.5 of 4 steps evaluated only the last sigma); SD3's img2img counts them right."""
    from sdcore.errors import ConfigError
    from sdcore.generate.pipeline import generate_images

    heun = generate_images(dev, ["a ring"], steps=2, cfg=3.5, seed=3, width=32, height=32, sampler="heun")[0]
    euler = generate_images(dev, ["a ring"], steps=2, cfg=3.5, seed=3, width=32, height=32, sampler="euler")[0]
    assert heun.size == (32, 32) and np.abs(_array(heun) - _array(euler)).max() > 0
    with pytest.raises(
        ConfigError, match=r"'heun' cannot start from an init image on Flux\.1 models; use euler, euler_a$"
    ):
        generate_images(dev, ["a ring"], steps=4, seed=3, sampler="heun", init_image=heun, strength=0.5)
    sd3 = tiny_model("sd3")
    calls = []
    hook = sd3.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        generate_images(
            sd3, ["a ring"], steps=4, seed=3, sampler="heun", init_image=heun.resize((64, 64)), strength=0.5
        )
    finally:
        hook.remove()
    # A1111's count, the last 3 of 4 steps (t_enc + 1 = int(0.5 * 4) + 1): two Heun steps (2 evaluations each),
    # then Euler's to sigma 0
    assert len(calls) == 5


def test_flow_sampler_table_is_shared_and_refuses_others(dev):
    from diffusers import FlowMatchHeunDiscreteScheduler
    from sdcore.errors import ConfigError
    from sdcore.generate.flow_samplers import FLOW_SAMPLERS, flow_scheduler
    from sdcore.generate.pipeline import generate_images
    from sdcore.models.sd3.tiny import flow_scheduler_config

    assert set(FLOW_SAMPLERS) == {"euler", "euler_a", "heun", "dpm++2m", "unipc"}
    sd3 = flow_scheduler(flow_scheduler_config(), "heun", family="SD3")  # a static shift: diffusers' own Heun
    assert type(sd3) is FlowMatchHeunDiscreteScheduler and sd3.config.shift == 3.0
    with pytest.raises(ConfigError, match=r"'ddim' does not sample flow-matching models \(Flux.1\); "
                       "choose one of: euler, euler_a, heun, dpm\\+\\+2m, unipc"):  # fmt: skip
        generate_images(dev, ["a cat"], steps=1, width=32, height=32, sampler="ddim")
    with pytest.raises(ConfigError, match=r"'unipc' cannot start from an init image on Flux\.1 models; use euler"):
        generate_images(dev, ["a cat"], steps=2, sampler="unipc", init_image=_init_image(), strength=0.5)


def _init_image():
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))


def _solver(name, **config):
    """diffusers' multistep solver in flow mode, configured here from its documented parameters."""
    import diffusers

    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "DPMSolverMultistepScheduler" else {}
    return getattr(diffusers, name)(use_flow_sigmas=True, prediction_type="flow_prediction", **extra, **config)


@pytest.mark.parametrize(("sampler", "name"), [("dpm++2m", "DPMSolverMultistepScheduler"),
                                               ("unipc", "UniPCMultistepScheduler")])  # fmt: skip
def test_solvers_on_flux_dev_equal_flux_pipeline_with_that_scheduler(dev, sampler, name):
    """dpm++2m / unipc on dev = FluxPipeline with diffusers' solver in flow mode and dynamic shift swapped in."""
    from sdcore.generate.pipeline import generate_images

    got = generate_images(dev, ["a red square"], steps=4, cfg=3.5, seed=2, width=48, height=32, sampler=sampler)[0]
    scheduler = _solver(name, use_dynamic_shifting=True, time_shift_type="exponential")
    with torch.no_grad():
        expected = _pipe(dev, scheduler)("a red square", width=48, height=32, num_inference_steps=4,
                                         guidance_scale=3.5, max_sequence_length=512,
                                         generator=torch.Generator().manual_seed(2)).images[0]  # fmt: skip
    assert np.array_equal(_array(got), _array(expected))
    euler = generate_images(dev, ["a red square"], steps=4, cfg=3.5, seed=2, width=48, height=32, sampler="euler")[0]
    assert np.abs(_array(got) - _array(euler)).max() > 0


def test_solvers_on_schnell_and_sd3(tiny_model):
    """schnell's fixed shift: unipc = FluxPipeline with UniPC at flow_shift 1; dpm++2m is refused (diffusers'
    DPM-Solver would demand the dynamic shift FluxPipeline passes). SD3: dpm++2m = StableDiffusion3Pipeline
    with DPM-Solver at SD3's shift 3."""
    from diffusers import StableDiffusion3Pipeline
    from sdcore.errors import ConfigError
    from sdcore.generate.pipeline import generate_images
    from sdcore.models.flux.adapter import FluxAdapter

    schnell = FluxAdapter().create_tiny(variant="schnell", seed=1)
    got = generate_images(schnell, ["a ring"], steps=3, seed=4, width=32, height=32, sampler="unipc")[0]
    with torch.no_grad():
        expected = _pipe(schnell, _solver("UniPCMultistepScheduler", flow_shift=1.0))(
            "a ring", width=32, height=32, num_inference_steps=3, max_sequence_length=256,  # schnell's T5 length
            generator=torch.Generator().manual_seed(4)).images[0]  # fmt: skip
    assert np.array_equal(_array(got), _array(expected))
    with pytest.raises(
        ConfigError, match=r"'dpm\+\+2m' cannot sample this Flux\.1 model: its schedule has a fixed shift"
    ):
        generate_images(schnell, ["a ring"], steps=3, width=32, height=32, sampler="dpm++2m")

    sd3 = tiny_model("sd3")
    got = generate_images(sd3, ["a cat"], negative_prompt="blurry", steps=3, cfg=4.0, seed=6, sampler="dpm++2m")[0]
    clip_l, clip_g, t5 = sd3.text_encoders
    pipe = StableDiffusion3Pipeline(transformer=sd3.transformer, scheduler=_solver("DPMSolverMultistepScheduler",
                                    flow_shift=3.0), vae=sd3.vae, text_encoder=clip_l, tokenizer=sd3.tokenizers[0],
                                    text_encoder_2=clip_g, tokenizer_2=sd3.tokenizers[1], text_encoder_3=t5,
                                    tokenizer_3=sd3.tokenizers[2])  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe("a cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=4.0, width=64,
                        height=64, generator=torch.Generator().manual_seed(6)).images[0]  # fmt: skip
    assert np.array_equal(_array(got), _array(expected))


@pytest.mark.parametrize("family", ["sd1", "sd3", "chroma"])
def test_true_cfg_scale_is_refused_where_cfg_is_real(family, tiny_model):
    """SD1/SD2/SDXL, SD3 and Chroma have real CFG in --cfg: --true-cfg-scale there is one clear line, not ignored."""
    from sdcore.errors import ConfigError
    from sdcore.generate.pipeline import generate_images

    with pytest.raises(ConfigError, match=r"--true-cfg-scale is for guidance-distilled models \(Flux\.1\)"):
        generate_images(tiny_model(family), ["a cat"], steps=1, true_cfg_scale=2.0)


def test_cli_default_guidance_is_the_familys(tmp_path):
    """Without --cfg, FLUX.1 gets its reference embedded guidance 3.5 (Forge's Distilled CFG default), SD 7."""
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.generate.pnginfo import read_png_parameters
    from sdcore.plugins import get_plugin_manager

    cli = build_cli(get_plugin_manager())
    for model, size in (("tiny:flux", "32"), ("tiny:sd1", "64")):
        out = tmp_path / f"{model.split(':')[1]}.png"
        result = CliRunner().invoke(cli, ["generate", "--model", model, "a ring", "--steps", "1", "--size", size,
                                          "--models-dir", str(tmp_path), "-o", str(out)])  # fmt: skip
        assert result.exit_code == 0, result.output
        params = read_png_parameters(out)
        assert params is not None
        if model == "tiny:flux":
            assert params.extra.get("Distilled CFG Scale") == "3.5" and params.cfg == 1.0
        else:
            assert params.cfg == 7.0 and "Distilled CFG Scale" not in params.extra


def test_cli_schnell_writes_no_distilled_guidance(tmp_path):
    """Forge writes "Distilled CFG Scale" (and "Hires Distilled CFG Scale") only on models with the guidance
    embedding: schnell ignores the value, so its PNG leaves it out and a typed --cfg is a warning, not silence."""
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.generate.pnginfo import read_png_parameters
    from sdcore.plugins import get_plugin_manager

    cli = build_cli(get_plugin_manager())
    for model in ("tiny:flux-schnell", "tiny:flux"):
        out = tmp_path / f"{model.split(':')[1]}.png"
        result = CliRunner().invoke(cli, ["generate", "--model", model, "a ring", "--steps", "1", "--size", "32",
                                          "--cfg", "5", "--hr-scale", "1.5", "--hr-distilled-cfg", "2",
                                          "--models-dir", str(tmp_path), "-o", str(out)])  # fmt: skip
        assert result.exit_code == 0, result.output
        params = read_png_parameters(out)
        assert params is not None and params.cfg == 1.0
        if model == "tiny:flux-schnell":
            assert "Distilled CFG Scale" not in params.extra and "Hires Distilled CFG Scale" not in params.extra
            assert "--cfg and --hr-distilled-cfg set the distilled guidance, which FLUX.1 schnell has not" in (
                result.output
            )
        else:
            assert (
                float(params.extra["Distilled CFG Scale"]) == 5
                and float(params.extra["Hires Distilled CFG Scale"]) == 2
            )
            assert "warning" not in result.output


def test_cli_clip_skip_that_changes_nothing_is_a_warning(tmp_path):
    """FLUX.1 takes only CLIP-L's pooled vector (the last layer whatever the skip, in Forge too) and Chroma has no
    CLIP: --clip-skip there renders the same image, so it says so (the PNG keeps the field, as Forge writes it);
    SD3's CLIP hidden states do move with it, so no warning there."""
    from click.testing import CliRunner
    from PIL import Image
    from sdcore.cli import build_cli
    from sdcore.generate.pnginfo import read_png_parameters
    from sdcore.plugins import get_plugin_manager

    cli = build_cli(get_plugin_manager())
    for model, ignored in (("tiny:flux", True), ("tiny:chroma", True), ("tiny:sd3", False)):
        pixels = []
        for skip in ("1", "2"):
            out = tmp_path / f"{model.split(':')[1]}-{skip}.png"
            result = CliRunner().invoke(cli, ["generate", "--model", model, "a ring", "--steps", "1", "--size", "32",
                                              "--seed", "1", "--clip-skip", skip, "--models-dir", str(tmp_path),
                                              "-o", str(out)])  # fmt: skip
            assert result.exit_code == 0, result.output
            assert ("--clip-skip 2 changes nothing" in result.output) == (ignored and skip == "2"), result.output
            pixels.append(np.asarray(Image.open(out)))
        params = read_png_parameters(out)
        assert params is not None and params.extra.get("Clip skip") == "2"
        assert np.array_equal(*pixels) == ignored

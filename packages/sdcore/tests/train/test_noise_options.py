"""kohya's noise and timestep options against references written here from kohya's documented code
(``train_util.get_noise_noisy_latents_and_timesteps``, ``custom_train_functions.apply_noise_offset``,
``pyramid_noise_like``, ``fix_noise_scheduler_betas_for_zero_terminal_snr``, ``flux_train_utils``).

The references take kohya's random draws as arguments so both sides can use the same numbers; the
draws are then taken from the sample's generator in sdcore's documented order (noise, offset
direction, timestep, then the newer options' draws).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from runtime_methods import ConvOutMethod
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.loop import TrainSession
from sdcore.train.noise import (
    NoiseSettings,
    draw_noise,
    integer_timesteps,
    min_snr_weights,
    pyramid_noise,
    sample_noise,
    zero_terminal_snr_betas,
    zero_terminal_snr_scheduler,
)
from sdcore.train.objectives import DdpmObjective, FlowMatchingObjective
from sdcore.train.preflight import PreflightError, objective_option_checks, validate_options

SHAPE = (4, 16, 16)


# --- references, from kohya's code (draws passed in) ---------------------------------------------


def kohya_apply_noise_offset(latents, noise, noise_offset, adaptive_noise_scale, direction):
    """apply_noise_offset: ``direction`` is its ``torch.randn((B, C, 1, 1))``."""
    if adaptive_noise_scale is not None:
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
        noise_offset = noise_offset + adaptive_noise_scale * latent_mean
        noise_offset = torch.clamp(noise_offset, 0.0, None)
    return noise + noise_offset * direction


def kohya_pyramid_noise_like(noise, iterations, discount, randoms, levels):
    """pyramid_noise_like: ``randoms()`` stands for ``random.random()``, ``levels(b, c, h, w)`` for
    ``torch.randn(b, c, h, w)``."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    noise = noise.clone()
    for i in range(iterations):
        r = randoms() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(levels(b, c, wn, hn)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def kohya_zero_terminal_snr_betas(betas):
    alphas = 1 - betas
    alphas_bar_sqrt = alphas.cumprod(0).sqrt()
    a0, at = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= at
    alphas_bar_sqrt *= a0 / (a0 - at)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _draws(key, shape=SHAPE, offset=True, low=0, high=1000):
    """The existing draws of one sample, in sdcore's order: noise, offset direction, timestep."""
    gen = torch.Generator().manual_seed(key)
    noise = torch.randn(shape, generator=gen)
    direction = torch.randn((shape[0], 1, 1), generator=gen) if offset else None
    t = torch.randint(low, high, (1,), generator=gen)
    return gen, noise, direction, t


# --- off: the draws are the ones sdcore always made ---------------------------------------------


def test_with_the_options_off_the_draws_are_the_old_ones():
    """The pre-options sample_noise, written out: noise, offset term, randint; bit for bit."""
    keys = [3, 99, 12345]
    for offset in (0.0, 0.07):
        noise, t = sample_noise(keys, SHAPE, noise_offset=offset)
        for i, key in enumerate(keys):
            gen = torch.Generator().manual_seed(key)
            old = torch.randn(SHAPE, generator=gen)
            if offset:
                old = old + offset * torch.randn((SHAPE[0], 1, 1), generator=gen)
            assert torch.equal(noise[i], old)
            assert int(t[i]) == int(torch.randint(0, 1000, (1,), generator=gen))
        _, _, perturbed = draw_noise(keys, SHAPE, NoiseSettings(noise_offset=offset), integer_timesteps(1000))
        assert perturbed is None


# --- noise offset: random strength, adaptive scale ------------------------------------------------


def test_noise_offset_random_strength_is_kohyas_formula():
    keys = [5, 6, 7]
    noise, t, _ = draw_noise(keys, SHAPE, NoiseSettings(noise_offset=0.1, offset_random_strength=True),
                             integer_timesteps(1000))  # fmt: skip
    for i, key in enumerate(keys):
        gen, base, direction, step = _draws(key)
        strength = torch.rand(1, generator=gen) * 0.1  # kohya: torch.rand(1) * args.noise_offset
        want = kohya_apply_noise_offset(None, base[None], strength, None, direction[None])[0]
        assert torch.equal(noise[i], want) and int(t[i]) == int(step)
    # over many samples the strength is U(0, 1) * offset: recover it from the offset term
    many = list(range(3000))
    noise, _, _ = draw_noise(many, (1, 1, 1), NoiseSettings(noise_offset=1.0, offset_random_strength=True),
                             integer_timesteps(1000))  # fmt: skip
    strengths = []
    for key in many[:3000]:
        gen, base, direction, _ = _draws(key, (1, 1, 1))
        strengths.append(float((noise[key] - base).flatten()[0] / direction.flatten()[0]))
    s = np.array(strengths)
    assert s.min() >= 0 and s.max() < 1.0 + 1e-5
    assert s.mean() == pytest.approx(0.5, abs=0.02) and s.var() == pytest.approx(1 / 12, abs=0.01)


@pytest.mark.parametrize("scale", [0.5, -3.0])
def test_adaptive_noise_scale_is_kohyas_formula(scale):
    """offset + scale * |channel mean of the latent|, clamped at 0 (a negative scale can reach it)."""
    keys = [21, 22]
    latents = torch.randn((2, *SHAPE)) + torch.tensor([0.5, -1.0, 0.05, 2.0]).view(1, 4, 1, 1)
    noise, _, _ = draw_noise(keys, SHAPE, NoiseSettings(noise_offset=0.1, adaptive_noise_scale=scale),
                             integer_timesteps(1000), latents)  # fmt: skip
    for i, key in enumerate(keys):
        _, base, direction, _ = _draws(key)
        want = kohya_apply_noise_offset(latents[i : i + 1], base[None], 0.1, scale, direction[None])[0]
        assert torch.allclose(noise[i], want, atol=1e-6, rtol=0)
    if scale < 0:  # the channels with |mean| > 0.1 / 3 got offset 0: no offset term there
        _, base, _, _ = _draws(21)
        assert torch.equal(noise[0, 1], base[1]) and torch.equal(noise[0, 3], base[3])


# --- multires (pyramid) noise ---------------------------------------------------------------------


def _from(gen):
    """kohya's random.random() and torch.randn(b, c, h, w), drawn from ``gen`` instead."""
    return (lambda: float(torch.rand((), generator=gen))), (lambda b, c, h, w: torch.randn((b, c, h, w), generator=gen))


def test_pyramid_noise_is_kohyas_for_one_sample():
    """kohya's pyramid_noise_like on a batch of one, fed the same r's and level noises."""
    for iterations, discount, shape in ((6, 0.3, SHAPE), (10, 0.8, (4, 24, 40)), (1, 0.3, SHAPE)):
        gen = torch.Generator().manual_seed(11)
        noise = torch.randn(shape)
        ours = pyramid_noise(noise, gen, iterations, discount)
        gen = torch.Generator().manual_seed(11)
        ref = kohya_pyramid_noise_like(noise[None], iterations, discount, *_from(gen))[0]
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0), (iterations, shape)
        assert float(ours.std()) == pytest.approx(1.0, abs=1e-5)  # kohya's renormalisation


def test_multires_comes_after_the_offset_as_in_kohya():
    """get_noise_noisy_latents_and_timesteps applies the offset, then the pyramid to the result
    (the two are exclusive only in train_control_net.py's branch)."""
    settings = NoiseSettings(noise_offset=0.2, multires_iterations=4, multires_discount=0.3)
    noise, t, _ = draw_noise([8], SHAPE, settings, integer_timesteps(1000))
    gen, base, direction, step = _draws(8)
    offset = kohya_apply_noise_offset(None, base[None], 0.2, None, direction[None])
    ref = kohya_pyramid_noise_like(offset, 4, 0.3, *_from(gen))[0]
    assert torch.allclose(noise[0], ref, atol=1e-6, rtol=0) and int(t[0]) == int(step)


def test_multires_noise_has_more_low_frequencies():
    keys = list(range(200))
    plain, _ = sample_noise(keys, SHAPE)
    # the channel's spatial mean of white noise has variance 1/256; pyramid noise keeps unit variance
    # per sample but correlates neighbours, so its spatial means vary more, the more so the larger
    # the discount (measured: about 2.3/256 at kohya's 0.3, 40/256 at 0.8)
    assert float(plain.mean(dim=(2, 3)).var()) == pytest.approx(1 / 256, rel=0.2)
    spread = []
    for discount in (0.3, 0.8):
        multi, _, _ = draw_noise(keys, SHAPE, NoiseSettings(multires_iterations=6, multires_discount=discount),
                                 integer_timesteps(1000))  # fmt: skip
        spread.append(float(multi.mean(dim=(2, 3)).var()) * 256)
    assert 1.6 < spread[0] < 4 and spread[1] > 15
    assert torch.allclose(multi.flatten(1).std(dim=1), torch.ones(200), atol=1e-5)


# --- timestep range ------------------------------------------------------------------------------


def test_min_max_timestep_draws_uniformly_in_the_range():
    keys = list(range(4000))
    _, t, _ = draw_noise(keys, (1, 2, 2), NoiseSettings(), integer_timesteps(1000, 200, 260))
    assert int(t.min()) == 200 and int(t.max()) == 259  # [min, max): max excluded, as torch.randint
    counts = np.bincount(t.numpy() - 200, minlength=60)
    assert counts.min() > 30 and counts.max() < 110  # ~66.7 each
    assert float(t.float().mean()) == pytest.approx((200 + 259) / 2, abs=1.5)
    for key in keys[:5]:  # the same draw as kohya's torch.randint(min, max), from the sample's generator
        assert int(t[key]) == int(_draws(key, (1, 2, 2), offset=False, low=200, high=260)[3])


def test_the_objective_refuses_a_bad_range():
    from sdcore.errors import ConfigError

    sched = create_tiny_bundle("sd1").noise_scheduler
    for low, high in ((500, 500), (-1, 10), (0, 1001), (900, None)):
        if (low, high) == (900, None):
            DdpmObjective(sched, min_timestep=low, max_timestep=high)  # 900 < 1000: fine
            continue
        with pytest.raises(ConfigError, match="0 <= min < max <= 1000"):
            DdpmObjective(sched, min_timestep=low, max_timestep=high)


@pytest.mark.parametrize("sampling", ["logit_normal", "mode", "uniform"])
def test_sd3_timestep_range_is_kohyas_mapping(sampling):
    """sd3_train_utils: u (the sampling, then the shift) -> int(u * (max - min) + min), sigma = t / 1000."""
    obj = FlowMatchingObjective(timestep_sampling=sampling, shift=3.0, min_timestep=100, max_timestep=700)
    keys = list(range(2000))
    _, t, _ = obj.draw(keys, (1, 2, 2), NoiseSettings())
    free = FlowMatchingObjective(timestep_sampling=sampling, shift=3.0)
    for key in keys[:20]:
        gen = torch.Generator().manual_seed(key)
        torch.randn((1, 2, 2), generator=gen)
        u = free.sample_sigmas(1, gen)  # the same draw, shifted, before the range
        assert float(t[key]) == float((u * (700 - 100) + 100).long())
    assert float(t.min()) >= 100 and float(t.max()) <= 700 and torch.equal(t, t.floor())
    noisy = obj.noised(torch.zeros((1, 1, 2, 2)), torch.ones((1, 1, 2, 2)), t[:1]).noisy
    assert torch.allclose(noisy, torch.full_like(noisy, float(t[0]) / 1000))  # sigma = t / 1000
    # without a range nothing changes
    assert torch.equal(free.draw(keys[:50], (1, 2, 2), NoiseSettings())[1], free.sample(keys[:50], (1, 2, 2))[1])


def test_flow_range_is_checked():
    from sdcore.errors import ConfigError

    with pytest.raises(ConfigError, match="0 <= min < max <= 1000"):
        FlowMatchingObjective(min_timestep=700, max_timestep=100)


# --- input perturbation --------------------------------------------------------------------------


@pytest.mark.parametrize("random_strength", [False, True])
def test_input_perturbation_draws(random_strength):
    keys = [31, 32]
    settings = NoiseSettings(ip_noise_gamma=0.1, ip_random_strength=random_strength)
    noise, t, perturbed = draw_noise(keys, SHAPE, settings, integer_timesteps(1000))
    for i, key in enumerate(keys):
        gen, base, _, step = _draws(key, offset=False)
        strength = torch.rand(1, generator=gen) * 0.1 if random_strength else 0.1
        xi = torch.randn(SHAPE, generator=gen)
        assert torch.equal(noise[i], base) and int(t[i]) == int(step)
        assert torch.equal(perturbed[i], base + strength * xi)


def _session(tmp_path, **kw):
    o = contract_options(ConvOutMethod, tmp_path, kw, family="sd1")
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    return s


def _seen(s):
    seen = {}

    def compute_loss(ctx):
        seen.update(noisy=ctx.noisy_latents, target=ctx.target, t=ctx.timesteps)
        return None

    s.method.compute_loss = compute_loss
    return seen


def test_input_perturbation_feeds_the_input_and_keeps_the_target(tmp_path):
    """kohya: noisy = add_noise(x, noise + gamma * randn), target = noise (epsilon)."""
    s = _session(tmp_path, ip_noise_gamma=0.3)
    refs = s.data.epoch_plan(0)[0]
    batch = s.make_batch(refs)
    noise, t, perturbed = s.objective.draw_for(refs, batch)
    assert perturbed is not None and not torch.equal(perturbed, noise)
    seen = _seen(s)
    with torch.no_grad():
        s.sample_loss(batch, noise, t, 0, perturbed)
    x, sched = batch.latents.float(), s.bundle.noise_scheduler
    assert torch.equal(seen["noisy"], sched.add_noise(x, perturbed, t))
    assert torch.equal(seen["target"], noise)


def test_flow_input_perturbation_is_kohyas_flux_formula():
    """flux_train_utils: noisy = (1 - s) x + s (noise + gamma xi); the target stays noise - x."""
    obj = FlowMatchingObjective(timestep_sampling="uniform")
    noise, t, perturbed = obj.draw([41, 42], SHAPE, NoiseSettings(ip_noise_gamma=0.2))
    x = torch.randn((2, *SHAPE))
    out = obj.noised(x, noise, t, perturbed)
    s = (t / 1000).view(-1, 1, 1, 1)
    for i, key in enumerate([41, 42]):
        gen = torch.Generator().manual_seed(key)
        base = torch.randn(SHAPE, generator=gen)
        sigma = obj.sample_sigmas(1, gen)
        xi = torch.randn(SHAPE, generator=gen)
        assert torch.equal(noise[i], base) and torch.equal(t[i : i + 1], sigma * 1000)
        assert torch.equal(perturbed[i], base + 0.2 * xi)
    assert torch.allclose(out.noisy, (1 - s) * x + s * (noise + (perturbed - noise)), atol=1e-6)
    assert torch.equal(out.target, noise - x)


# --- zero terminal SNR ---------------------------------------------------------------------------


def test_zero_terminal_snr_betas_match_kohya_and_diffusers():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    sched = create_tiny_bundle("sd1").noise_scheduler
    betas = sched.betas.clone()
    ours = zero_terminal_snr_betas(betas)
    assert torch.allclose(ours, kohya_zero_terminal_snr_betas(betas.clone()), atol=1e-7, rtol=0)
    assert torch.allclose(ours, rescale_zero_terminal_snr(betas.clone()), atol=1e-7, rtol=0)
    fixed = zero_terminal_snr_scheduler(sched)
    assert float(fixed.alphas_cumprod[-1]) == 0.0 and float(fixed.betas[-1]) == 1.0
    assert float(fixed.alphas_cumprod[0]) == pytest.approx(float(sched.alphas_cumprod[0]), rel=1e-6)
    assert torch.equal(sched.betas, betas)  # the model's schedule is untouched


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_zero_terminal_snr_objective(prediction):
    """Pure noise in at the last step, finite min-SNR weights (kohya computes the SNR table before
    fixing the betas, so the weights are the unfixed schedule's)."""
    from diffusers import DDPMScheduler

    base = create_tiny_bundle("sd1").noise_scheduler
    sched = DDPMScheduler.from_config({**base.config, "prediction_type": prediction})
    obj = DdpmObjective(sched, min_snr_gamma=5.0, zero_terminal_snr=True)
    x, noise = torch.randn((3, *SHAPE)), torch.randn((3, *SHAPE))
    t = torch.tensor([999, 500, 0])
    out = obj.noised(x, noise, t)
    assert torch.equal(out.noisy[0], noise[0])
    fixed = obj.noising.alphas_cumprod
    want = fixed[500].sqrt() * x[1] + (1 - fixed[500]).sqrt() * noise[1]
    assert torch.allclose(out.noisy[1], want, atol=1e-6)
    if prediction == "v_prediction":
        assert torch.allclose(out.target[0], -x[0], atol=1e-6)  # v = sqrt(abar) eps - sqrt(1 - abar) x
    else:
        assert torch.equal(out.target, noise)
    assert torch.isfinite(out.weights).all()
    assert torch.equal(out.weights, min_snr_weights(sched, t, 5.0))


# --- options, pre-flight, invariance -----------------------------------------------------------

ALL_DDPM = {
    "noise_offset": 0.1,
    "noise_offset_random_strength": True,
    "adaptive_noise_scale": 0.05,
    "multires_noise_iterations": 4,
    "multires_noise_discount": 0.4,
    "ip_noise_gamma": 0.1,
    "ip_noise_gamma_random_strength": True,
    "min_timestep": 100,
    "max_timestep": 900,
    "zero_terminal_snr": True,
}


def test_the_session_draws_with_every_option(tmp_path):
    s = _session(tmp_path, **ALL_DDPM)
    refs = s.data.epoch_plan(0)[0]
    batch = s.make_batch(refs)
    noise, t, perturbed = s.objective.draw_for(refs, batch)
    keys = [ref.seed(s.options.seed, "noise") for ref in refs]
    settings = NoiseSettings(0.1, True, 0.05, 4, 0.4, 0.1, True)
    want = draw_noise(keys, batch.latents.shape[1:], settings, integer_timesteps(1000, 100, 900), batch.latents)
    assert torch.equal(noise, want[0]) and torch.equal(t, want[1]) and torch.equal(perturbed, want[2])
    assert ((t >= 100) & (t < 900)).all()
    assert s.objective.training.noising is not s.bundle.noise_scheduler  # zero terminal SNR


def test_preflight_reports_every_bad_noise_value_at_once(tmp_path):
    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"adaptive_noise_scale": 0.1, "multires_noise_iterations": -1, "multires_noise_discount": -0.5,
         "ip_noise_gamma": -0.1, "min_timestep": 800, "max_timestep": 700},
    )  # fmt: skip
    with pytest.raises(PreflightError) as info:
        validate_options(o)
    text = str(info.value)
    for part in (
        "--adaptive-noise-scale adds to the noise offset: it needs --noise-offset",
        "--multires-noise-iterations must be >= 0, got -1",
        "--multires-noise-discount must be >= 0, got -0.5",
        "--ip-noise-gamma must be >= 0, got -0.1",
        "--min-timestep 800 / --max-timestep 700: need 0 <= min < max <= 1000",
    ):
        assert part in text, text
    o = contract_options(ConvOutMethod, tmp_path, {"max_timestep": 1001})
    with pytest.raises(PreflightError, match="need 0 <= min < max <= 1000"):
        validate_options(o)
    validate_options(contract_options(ConvOutMethod, tmp_path, ALL_DDPM))  # all fine together


def test_flow_families_refuse_what_kohyas_sd3_flux_scripts_do_not_apply(tmp_path):
    o = contract_options(ConvOutMethod, tmp_path, ALL_DDPM)
    problems, _ = objective_option_checks(o, "flux")
    text = "\n".join(problems)
    for flag in ("--noise-offset-random-strength", "--adaptive-noise-scale", "--multires-noise-iterations",
                 "--zero-terminal-snr", "--min-timestep/--max-timestep"):  # fmt: skip
        assert flag in text
    assert "--ip-noise-gamma" not in text  # kohya's Flux script perturbs the input
    problems, _ = objective_option_checks(o, "sd3")
    assert any("--ip-noise-gamma: kohya's SD3 scripts" in p for p in problems)
    assert not any("--min-timestep" in p for p in problems)  # kohya's SD3 script bounds its sigmas with them
    assert objective_option_checks(o, "sd1")[0] == []
    # the defaults spelled out (kohya_ss writes min 0 / max 1000) are no range
    plain = contract_options(ConvOutMethod, tmp_path, {"min_timestep": 0, "max_timestep": 1000, "ip_noise_gamma": 0.1})
    assert objective_option_checks(plain, "flux")[0] == []


def test_accumulation_invariance_holds_with_every_option(tmp_path):
    """Batch 2 x 1 == batch 1 x accumulation 2 with all the options on (per-sample draws)."""
    from sdcore.testing.contract import make_tiny_dataset
    from sdcore.train.loop import train

    data = make_tiny_dataset(tmp_path / "two", n=2)
    results = []
    for tag, bs, acc in (("big", 2, 1), ("acc", 1, 2)):
        o = contract_options(ConvOutMethod, tmp_path, {**ALL_DDPM, "data": str(data), "batch_size": bs,
                             "gradient_accumulation": acc, "max_steps": 2, "flip": True}, tag=tag)  # fmt: skip
        method = ConvOutMethod(o)
        r = train(method, bundle=create_tiny_bundle("sd1"))
        results.append((method.trainable_state_dict(), r.losses))
    (sa, la), (sb, lb) = results
    assert all(math.isfinite(v) for v in la)
    assert la == pytest.approx(lb, rel=1e-5)
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6), k

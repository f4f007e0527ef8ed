"""Training objectives: DDPM as before, flow matching per its formulas, the samplers' distributions."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from runtime_methods import ConvOutMethod
from sdcore.errors import ConfigError
from sdcore.models import family as fam
from sdcore.models.family import SD1, register_family
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.loop import TrainSession
from sdcore.train.noise import min_snr_weights, sample_noise, training_target
from sdcore.train.objectives import DdpmObjective, FlowMatchingObjective, objective_for
from sdcore.train.preflight import PreflightError, objective_option_checks, validate_options

N = 20000


def _sigmas(**kw) -> np.ndarray:
    return FlowMatchingObjective(**kw).sample_sigmas(N, torch.Generator().manual_seed(7)).double().numpy()


def _logit(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 1e-7, 1 - 1e-7)
    return np.log(x / (1 - x))


# --- the samplers -------------------------------------------------------------------------------


def test_logit_normal_median_and_spread():
    s = _sigmas(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    assert np.median(s) == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.01)  # sigmoid is monotone
    assert _logit(s).std() == pytest.approx(0.8, rel=0.03)
    assert s.min() >= 0 and s.max() <= 1


def test_uniform_and_the_time_shift_formula():
    plain = _sigmas(timestep_sampling="uniform")
    assert plain.mean() == pytest.approx(0.5, abs=0.01)
    shifted = _sigmas(timestep_sampling="uniform", shift=3.0)
    # E[3u / (1 + 2u)] for u ~ U(0, 1) = 1.5 - 0.75 ln 3 (integrated by hand)
    assert shifted.mean() == pytest.approx(1.5 - 0.75 * math.log(3), abs=0.01)
    # a monotone map moves quantiles with it: the median 0.5 goes to 3*0.5 / (1 + 2*0.5) = 0.75
    assert np.median(shifted) == pytest.approx(0.75, abs=0.01)
    # same generator, same draws: every sample is exactly the formula applied to the unshifted one
    assert np.allclose(shifted, 3 * plain / (1 + 2 * plain), atol=1e-6)


def test_mode_sampling_matches_the_sd3_density():
    s = _sigmas(timestep_sampling="mode", mode_scale=1.29)
    # the share of sigmas in [0.25, 0.75], computed independently on a fine grid of u
    u = np.linspace(0, 1, 200001)
    f = 1 - u - 1.29 * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
    expected = np.mean((f >= 0.25) & (f <= 0.75))
    assert expected > 0.6  # the mode sampling favours the middle (uniform would give 0.5)
    assert np.mean((s >= 0.25) & (s <= 0.75)) == pytest.approx(expected, abs=0.01)
    zero = _sigmas(timestep_sampling="mode", mode_scale=0.0)  # f_mode(u; 0) = 1 - u: uniform
    assert zero.mean() == pytest.approx(0.5, abs=0.01)


def test_sigmoid_sampling_scale():
    s = _sigmas(timestep_sampling="sigmoid", sigmoid_scale=2.0)
    assert _logit(s).std() == pytest.approx(2.0, rel=0.03)
    assert np.median(s) == pytest.approx(0.5, abs=0.01)


def test_flow_sampling_is_per_sample_seeded():
    obj = FlowMatchingObjective(timestep_sampling="logit_normal")
    noise, t = obj.sample([11, 12], (4, 8, 8))
    noise_b, t_b = obj.sample([12], (4, 8, 8))
    assert torch.equal(noise[1], noise_b[0]) and t[1] == t_b[0]
    assert t.dtype == torch.float32 and ((t >= 0) & (t <= 1000)).all()
    # the noise is the same draw the DDPM objective makes for the same sample
    assert torch.equal(noise, sample_noise([11, 12], (4, 8, 8))[0])


def test_flow_options_are_checked():
    with pytest.raises(ConfigError, match="timestep-sampling 'cosmap'"):
        FlowMatchingObjective(timestep_sampling="cosmap")
    with pytest.raises(ConfigError, match="discrete-flow-shift must be positive"):
        FlowMatchingObjective(shift=0.0)
    with pytest.raises(ConfigError, match=r"mode-scale must be between -1 and 1\.75"):
        FlowMatchingObjective(mode_scale=2.0)


# --- the step ------------------------------------------------------------------------------------


def test_flow_noised_follows_the_formula():
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 16, 4, 4, generator=gen), torch.randn(3, 16, 4, 4, generator=gen)
    t = torch.tensor([0.0, 250.0, 1000.0])
    out = FlowMatchingObjective().noised(latents, noise, t)
    s = torch.tensor([0.0, 0.25, 1.0]).view(3, 1, 1, 1)
    assert torch.allclose(out.noisy, (1 - s) * latents + s * noise)
    assert torch.equal(out.noisy[0], latents[0]) and torch.equal(out.noisy[2], noise[2])
    assert torch.equal(out.target, noise - latents)
    assert torch.equal(out.timesteps, t) and out.weights is None


@pytest.fixture
def flow_family():
    """SD1's UNet trained with flow matching: a family declared at run time (as a plugin would)."""
    before = dict(fam._REGISTERED)
    family = dataclasses.replace(SD1, name="toy-flow", objective="flow-matching")
    register_family(family)
    yield family
    fam._REGISTERED.clear()
    fam._REGISTERED.update(before)


def _session(tmp_path, bundle, **kw):
    o = contract_options(ConvOutMethod, tmp_path, kw, family="sd1")
    s = TrainSession(ConvOutMethod(o), bundle=bundle)
    s.setup()
    return s


def test_the_step_uses_the_flow_objective_of_the_family(tmp_path, flow_family):
    bundle = create_tiny_bundle("sd1")
    bundle.family = "toy-flow"
    s = _session(tmp_path, bundle, timestep_sampling="uniform", discrete_flow_shift=2.0)
    assert isinstance(s.objective.training, FlowMatchingObjective)
    assert s.objective.training.shift == 2.0
    refs = s.data.epoch_plan(0)[0]
    batch = s.make_batch(refs)
    noise, t = s.objective.noise_for(refs, batch)
    seen = {}

    def compute_loss(ctx):
        seen.update(noisy=ctx.noisy_latents, target=ctx.target, t=ctx.timesteps, pred=ctx.predict(ctx.conditioning))
        return None

    s.method.compute_loss = compute_loss
    with torch.no_grad():
        loss = s.sample_loss(batch, noise, t, 0)
    x = batch.latents.float()
    sig = (t / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(seen["noisy"], (1 - sig) * x + sig * noise)
    assert torch.equal(seen["target"], noise - x)
    assert torch.equal(seen["t"], t)
    expected = ((seen["pred"] - (noise - x)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, expected)


def test_sd1_step_is_the_old_ddpm_path(tmp_path):
    """The loss equals the pre-objectives computation: scheduler.add_noise, epsilon target, the
    UNet called directly, min-SNR weights; bit for bit."""
    bundle = create_tiny_bundle("sd1")
    s = _session(tmp_path, bundle, min_snr_gamma=5.0, noise_offset=0.05)
    assert isinstance(s.objective.training, DdpmObjective)
    refs = s.data.epoch_plan(0)[0]
    batch = s.make_batch(refs)
    keys = [ref.seed(s.options.seed, "noise") for ref in refs]
    noise, t = s.objective.noise_for(refs, batch)
    old_noise, old_t = sample_noise(keys, batch.latents.shape[1:], noise_offset=0.05, num_timesteps=1000)
    assert torch.equal(noise, old_noise) and torch.equal(t, old_t)
    with torch.no_grad():
        loss = s.sample_loss(batch, noise, t, 0)
        sched, x = bundle.noise_scheduler, batch.latents.float()
        noisy = sched.add_noise(x, noise, t)
        pred = bundle.unet(noisy, t, batch.conditioning.hidden_states, return_dict=False)[0]
        old = torch.nn.functional.mse_loss(pred.float(), training_target(sched, x, noise, t), reduction="none")
        old = old.mean(dim=(1, 2, 3)) * min_snr_weights(sched, t, 5.0) * batch.loss_weights
    assert torch.equal(loss, old)


def test_objective_for_reads_the_family(tmp_path, flow_family):
    bundle = create_tiny_bundle("sd1")
    o = contract_options(ConvOutMethod, tmp_path, {"timestep_sampling": "mode", "mode_scale": 0.5})
    assert isinstance(objective_for(bundle, o), DdpmObjective)
    bundle.family = "toy-flow"
    flow = objective_for(bundle, o)
    assert isinstance(flow, FlowMatchingObjective) and (flow.timestep_sampling, flow.mode_scale) == ("mode", 0.5)


def test_preflight_checks_flow_options(tmp_path, flow_family):
    o = contract_options(ConvOutMethod, tmp_path, {"logit_std": 0.0, "discrete_flow_shift": -1.0})
    with pytest.raises(PreflightError) as info:
        validate_options(o)
    assert "--logit-std must be positive" in str(info.value)
    assert "--discrete-flow-shift must be positive" in str(info.value)
    o = contract_options(ConvOutMethod, tmp_path, {"min_snr_gamma": 5.0, "discrete_flow_shift": 3.0})
    problems, notes = objective_option_checks(o, "toy-flow")
    assert problems and "--min-snr-gamma" in problems[0] and not notes
    problems, notes = objective_option_checks(o, "sd1")
    assert not problems and notes == [
        "--discrete-flow-shift: flow-matching options, without effect on sd1 (a DDPM family)"
    ]


def test_ddpm_family_silent_on_the_neutral_flow_shift(tmp_path):
    """--discrete-flow-shift 1 is no shift (sd-scripts 48d368f library/flux_train_utils.py:491, s' = s*t/(1+(s-1)*t)
    is t at s = 1) and was the option's default: a config saved with it (every --save-config dump written before the
    default became None) notes nothing on a DDPM family, as before; another value still notes."""
    from sdcore.train.config import dump_options, load_options

    saved = tmp_path / "old.toml"
    dump_options(contract_options(ConvOutMethod, tmp_path, {"discrete_flow_shift": 1.0}), saved)
    assert "discrete_flow_shift = 1.0" in saved.read_text()
    o = load_options(ConvOutMethod.options_class, saved)
    assert o.discrete_flow_shift == 1.0
    assert objective_option_checks(o, "sd1") == ([], [])
    o = dataclasses.replace(o, discrete_flow_shift=2.0)
    assert objective_option_checks(o, "sd1")[1] == [
        "--discrete-flow-shift: flow-matching options, without effect on sd1 (a DDPM family)"
    ]


def test_kohya_flow_names_translate():
    from dataclasses import fields

    from sdcore.train.kohya import translate
    from sdcore.train.options import TrainOptions

    names = [f.name for f in fields(TrainOptions)]
    out = translate({"timestep_sampling": "shift", "discrete_flow_shift": 3.1582}, names, where="cfg")
    assert out.values == {"timestep_sampling": "sigmoid", "discrete_flow_shift": 3.1582} and not out.problems
    out = translate({"weighting_scheme": "none", "training_shift": 3.0}, names, where="cfg")
    assert out.values == {"weighting_scheme": "uniform", "discrete_flow_shift": 3.0}
    out = translate({"timestep_sampling": "flux_shift", "model_prediction_type": "Sigma_Scaled"}, names, where="cfg")
    assert out.values == {"timestep_sampling": "flux_shift", "model_prediction_type": "sigma_scaled"}
    out = translate({"timestep_sampling": "cosmap", "weighting_scheme": "lognorm"}, names, where="cfg")
    assert len(out.problems) == 2 and "available: sigma, uniform" in out.problems[0]


def test_a_flow_matching_family_trains_through_the_runtime(tmp_path, flow_family):
    """The whole loop (caches, accumulation, optimizer) with float flow timesteps: the fixed-noise
    loss (flow formulas at s = 0.1 ... 0.9) drops."""
    bundle = create_tiny_bundle("sd1")
    bundle.family = "toy-flow"
    o = contract_options(
        ConvOutMethod, tmp_path, {"max_steps": 30, "lr": 1e-2, "batch_size": 4, "save_state": False}, family="sd1"
    )
    s = TrainSession(ConvOutMethod(o), bundle=bundle)
    s.setup()
    before = s.fixed_loss()
    result = s.run()
    after = s.fixed_loss()
    assert all(math.isfinite(x) for x in result.losses)
    print(f"flow-matching fixed loss {before:.4f} -> {after:.4f}")
    assert after < before * 0.9, (before, after)


# --- kohya's Flux samplings: sigma and flux_shift -------------------------------------------------


def test_sigma_sampling_picks_sigmas_of_the_shifted_scheduler_table():
    """kohya Flux's default: u -> index floor(1000 u) of the flow-matching Euler scheduler's table
    (diffusers' scheduler builds the same table kohya's copy does) -> that sigma, timestep 1000 sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from sdcore.train.objectives import scheduler_table_sigmas

    table = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.tensor([0.0, 0.25, 0.2509, 0.5, 0.9999, 1.0])
    got = scheduler_table_sigmas(u, 3.0)
    # by hand: u = 0.25 -> index 250 -> t = 750/1000 -> 3 * 0.75 / (1 + 2 * 0.75) = 0.9
    assert got[1].item() == pytest.approx(0.9, abs=1e-6) and got[2] == got[1]  # same index, same sigma
    assert got[0].item() == 1.0 and got[-1] == got[-2]  # u = 1 (a rounded draw) takes the last index
    expected = table.sigmas[torch.tensor([0, 250, 250, 500, 999, 999])]
    assert torch.equal(got, expected)
    obj = FlowMatchingObjective(timestep_sampling="sigma", shift=3.0)
    assert torch.equal(obj.timesteps_of(got), table.timesteps[torch.tensor([0, 250, 250, 500, 999, 999])])


def test_sigma_sampling_draws_with_the_weighting_schemes_density():
    gen = torch.Generator().manual_seed(3)
    u = torch.rand((50,), generator=gen)
    sigmas = FlowMatchingObjective(timestep_sampling="sigma", shift=2.0).sample_sigmas(
        50, torch.Generator().manual_seed(3)
    )
    t = (1000 - np.floor(u.double().numpy() * 1000)) / 1000  # the table's unshifted level
    assert np.allclose(sigmas.double().numpy(), 2 * t / (1 + t), atol=1e-6)
    # uniform, shift 1: sigmas on the grid 1/1000 ... 1, mean (1 + 1000) / 2000
    plain = _sigmas(timestep_sampling="sigma")
    assert np.allclose(plain * 1000, np.round(plain * 1000), atol=1e-3) and plain.min() >= 0.001
    assert plain.mean() == pytest.approx(0.5005, abs=0.01)
    # logit_normal density: sigmoid(N(0.8, 1)) = u; sigma = 1 - u on the grid, so its median is sigmoid(-0.8)
    logit = _sigmas(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_mean=0.8)
    assert np.median(logit) == pytest.approx(1 / (1 + math.exp(0.8)), abs=0.01)
    # the density schemes only: sigma_sqrt/cosmap (loss weights) draw u uniformly, as kohya
    assert np.array_equal(_sigmas(timestep_sampling="sigma", weighting_scheme="cosmap"), plain)


@pytest.mark.parametrize(("side", "mu"), [(64, 0.5 + 768 * 0.65 / 3840), (128, 1.15)])
def test_flux_shift_uses_the_resolution_dependent_mu(side, mu):
    """512px (64x64 latents, 1024 tokens) and 1024px (4096 tokens): mu on BFL's line through
    (256, 0.5) and (4096, 1.15); the sigmoid draw is shifted by e^mu, --discrete-flow-shift is not used."""
    from sdcore.train.objectives import flux_shift_mu

    assert flux_shift_mu(side, side) == pytest.approx(mu, abs=1e-9)
    obj = FlowMatchingObjective(timestep_sampling="flux_shift", sigmoid_scale=1.5, shift=5.0)
    _, t = obj.sample([41, 42], (16, side, side))
    expected = []
    for key in (41, 42):  # the sample's generator draws its noise first, then the normal of the sampling
        gen = torch.Generator().manual_seed(key)
        torch.randn((16, side, side), generator=gen)
        s = 1 / (1 + math.exp(-1.5 * torch.randn((1,), generator=gen).item()))
        expected.append(1000 * s * math.exp(mu) / (s * math.exp(mu) + 1 - s))
    assert t.tolist() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="latents' size"):
        obj.sample_sigmas(1)


def test_new_flow_values_are_checked():
    with pytest.raises(ConfigError, match="model-prediction-type 'eps'"):
        FlowMatchingObjective(model_prediction_type="eps")
    with pytest.raises(ConfigError, match="weighting-scheme 'none'"):
        FlowMatchingObjective(weighting_scheme="none")

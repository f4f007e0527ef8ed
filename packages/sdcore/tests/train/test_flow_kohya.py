"""kohya's Flux/SD3 objective: --model_prediction_type and the --weighting_scheme loss weights in one
step of a tiny Flux/SD3 model, against losses computed here by hand from kohya's documented formulas."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from runtime_methods import ProjOutMethod  # noqa: E402
from sdcore.testing.contract import contract_options  # noqa: E402
from sdcore.train.loop import TrainSession  # noqa: E402


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """One tiny Flux and one tiny SD3 session (set up once: the options are changed per test)."""
    made = {}
    for family in ("flux", "sd3"):
        tmp = tmp_path_factory.mktemp(family)
        o = contract_options(ProjOutMethod, tmp, {"max_steps": 1, "save_state": False}, family=family)
        s = TrainSession(ProjOutMethod(o), bundle=None)
        s.setup()
        made[family] = s
    return made


def _one_step(s, **options):
    """(loss from the runtime, the pieces to compute it by hand) for the first batch."""
    for name, value in options.items():
        setattr(s.options, name, value)
    refs = s.data.epoch_plan(0)[0]
    batch = s.make_batch(refs)
    noise, t = s.objective.noise_for(refs, batch)
    with torch.no_grad():
        loss = s.sample_loss(batch, noise, t, 0)
        x = batch.latents.float()
        sig = (t / 1000).view(-1, 1, 1, 1)
        noisy = (1 - sig) * x + sig * noise
        out = s.objective.predict(noisy, t, s.objective.conditioning_for(batch), batch).float()  # the denoiser only
    return loss, x, noise, sig, noisy, out, batch.loss_weights


def _mse(a, b):
    return ((a - b) ** 2).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_raw_is_the_velocity_loss_and_ignores_the_weighting_scheme(sessions, family):
    loss, x, noise, _, _, out, w = _one_step(sessions[family], model_prediction_type="raw", weighting_scheme="cosmap")
    assert torch.allclose(loss, _mse(out, noise - x) * w, rtol=1e-5)


def test_additive_adds_the_noisy_input(sessions):
    loss, x, noise, _, noisy, out, w = _one_step(sessions["flux"], model_prediction_type="additive",
                                                 weighting_scheme="uniform")  # fmt: skip
    assert torch.allclose(loss, _mse(out + noisy, noise - x) * w, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["uniform", "cosmap", "sigma_sqrt"])
def test_sigma_scaled_is_kohyas_flux_reading_with_its_loss_weight(sessions, scheme):
    """kohya's Flux script: noisy - sigma * output, compared with noise - latents (its target for
    every prediction type), times 1 / 2/(pi(1-2s+2s^2)) / sigma^-2 per sample."""
    loss, x, noise, sig, noisy, out, w = _one_step(sessions["flux"], model_prediction_type="sigma_scaled",
                                                   weighting_scheme=scheme)  # fmt: skip
    s = sig.flatten()
    weight = {"uniform": torch.ones_like(s), "cosmap": 2 / (math.pi * ((1 - s) ** 2 + s**2)), "sigma_sqrt": 1 / s**2}
    expected = _mse(noisy - sig * out, noise - x) * weight[scheme] * w
    assert torch.allclose(loss, expected, rtol=1e-5)
    raw = _one_step(sessions["flux"], model_prediction_type="raw")[0]
    assert not torch.allclose(loss, raw)


def test_x0_is_kohyas_sd3_loss(sessions):
    """kohya's SD3 script: noisy - sigma * output against the latents. That error is sigma times the
    velocity error, so with sigma_sqrt (1/sigma^2) it is exactly the raw velocity loss, and with the
    uniform scheme the velocity loss weighted by sigma^2."""
    s = sessions["sd3"]
    raw, x, _, sig, noisy, out, w = _one_step(s, model_prediction_type="raw", weighting_scheme="uniform")
    x0 = _one_step(s, model_prediction_type="x0", weighting_scheme="uniform")[0]
    assert torch.allclose(x0, _mse(noisy - sig * out, x) * w, rtol=1e-5)
    assert torch.allclose(x0, raw * sig.flatten() ** 2, rtol=1e-4)
    weighted = _one_step(s, model_prediction_type="x0", weighting_scheme="sigma_sqrt")[0]
    assert torch.allclose(weighted, raw, rtol=1e-4)


def test_preflight_refuses_a_flow_reading_on_a_ddpm_family_and_notes_unused_weights(tmp_path):
    from sdcore.train.preflight import objective_option_checks

    o = contract_options(ProjOutMethod, tmp_path, {"model_prediction_type": "sigma_scaled"})
    problems, _ = objective_option_checks(o, "sd1")
    assert len(problems) == 1 and "--model-prediction-type sigma_scaled" in problems[0] and "sd1" in problems[0]
    assert objective_option_checks(o, "flux") == ([], [])
    o = contract_options(ProjOutMethod, tmp_path, {"weighting_scheme": "cosmap"})
    problems, notes = objective_option_checks(o, "flux")
    assert not problems and notes and "without effect with raw" in notes[0]
    o = contract_options(ProjOutMethod, tmp_path, {"weighting_scheme": "mode", "timestep_sampling": "sigmoid"})
    assert "without effect with --timestep-sampling sigmoid" in objective_option_checks(o, "sd3")[1][0]
    o = contract_options(ProjOutMethod, tmp_path, {"weighting_scheme": "mode", "timestep_sampling": "sigma"})
    assert objective_option_checks(o, "flux") == ([], [])

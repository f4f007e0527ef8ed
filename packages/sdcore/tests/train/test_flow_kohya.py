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


# --- kohya's Flux/SD3 script defaults and translation ----------------------------------------------


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """Tiny Flux (BFL single file) and SD3 single files, so the family is read from a real header."""
    from sdcore.models.family import family_adapter

    folder = tmp_path_factory.mktemp("models")
    files = {}
    for family in ("flux", "sd3"):
        files[family] = str(family_adapter(family).create_tiny().save(folder / f"{family}.safetensors"))
    return files


def _kohya(tmp_path, model, body=""):
    """Options and notes from a kohya-named TOML (``pretrained_model_name_or_path``, ``learning_rate``)."""
    from sdcore.train.config import load_options
    from sdcore.train.options import TrainOptions

    path = tmp_path / "kohya.toml"
    path.write_text(f'pretrained_model_name_or_path = "{model}"\nlearning_rate = 1e-4\n{body}', encoding="utf-8")
    notes: list[str] = []
    return load_options(TrainOptions, path, notes=notes), " | ".join(notes)


def _flow(o):
    """The flow options as the run reads them (the guidance resolved: --guidance-scale, else 1.0)."""
    from sdcore.train.objectives import training_guidance

    return (o.timestep_sampling, o.model_prediction_type, o.discrete_flow_shift, training_guidance(o),
            o.weighting_scheme)  # fmt: skip


def test_a_kohya_flux_toml_gets_the_flux_scripts_defaults(tmp_path, model_files):
    o, notes = _kohya(tmp_path, model_files["flux"])
    assert _flow(o) == ("sigma", "sigma_scaled", 3.0, 3.5, "uniform")
    for default in ("timestep_sampling defaults to sigma", "model_prediction_type defaults to sigma_scaled",
                    "discrete_flow_shift defaults to 3.0", "guidance_scale defaults to 3.5"):  # fmt: skip
        assert default in notes
    o, _ = _kohya(tmp_path, model_files["flux"], 'model_prediction_type = "raw"\nguidance_scale = 1.0\n')
    assert _flow(o) == ("sigma", "raw", 3.0, 1.0, "uniform")


@pytest.mark.parametrize("zero", ["0", "0.0"])
def test_a_kohya_guidance_scale_of_0_is_0(tmp_path, model_files, zero):
    """flux_train_network.py / flux_train.py feed ``float(args.guidance_scale)`` to the guidance embedding (sd-scripts
    flux_train_network.py:342, flux_train.py:640) and record it as ss_guidance_scale (flux_train_network.py:453):
    a given 0 trains at 0, not "unset" (kohya's docs ask 0.0 for Chroma). Since --guidance-scale's default became
    None, the config layer's rule for kohya_ss's untouched fields (a 0 of an optional option is None) read it as not
    given: the run trained at 1.0."""
    o, notes = _kohya(tmp_path, model_files["flux"], f"guidance_scale = {zero}\n")
    assert o.guidance_scale == 0.0 and _flow(o)[3] == 0.0
    assert "guidance_scale defaults to 3.5" not in notes


def test_kohya_flux_samplings_translate_with_kohyas_shift_rules(tmp_path, model_files):
    flux = model_files["flux"]
    # kohya's README: shift = the sigmoid sampling, then the discrete flow shift (weighting_scheme no longer clashes)
    o, _ = _kohya(
        tmp_path, flux, 'timestep_sampling = "shift"\ndiscrete_flow_shift = 3.1582\nweighting_scheme = "logit_normal"\n'
    )
    assert _flow(o) == ("sigmoid", "sigma_scaled", 3.1582, 3.5, "logit_normal")
    # kohya's sigmoid and uniform are not shifted: neither the given shift nor the 3.0 default applies
    o, notes = _kohya(tmp_path, flux, 'timestep_sampling = "sigmoid"\ndiscrete_flow_shift = 3.0\n')
    assert (o.timestep_sampling, o.discrete_flow_shift) == ("sigmoid", 1.0)
    assert "does not time-shift it, so discrete_flow_shift 3.0 has no effect" in notes
    o, notes = _kohya(tmp_path, flux, 'timestep_sampling = "uniform"\n')
    assert (o.timestep_sampling, o.discrete_flow_shift) == ("uniform", 1.0) and "time-shift" not in notes
    o, _ = _kohya(tmp_path, flux, 'timestep_sampling = "flux_shift"\nsigmoid_scale = 1.5\nweighting_scheme = "none"\n')
    assert (o.timestep_sampling, o.sigmoid_scale, o.weighting_scheme) == ("flux_shift", 1.5, "uniform")


def test_a_kohya_sd3_toml_gets_the_sd3_scripts_objective(tmp_path, model_files):
    o, notes = _kohya(tmp_path, model_files["sd3"])
    # the shift unset (None): SD3's own flow_shift 1.0, kohya sd3_train's --training_shift default
    assert _flow(o) == ("uniform", "x0", None, 1.0, "uniform") and o.min_timestep == 0 and o.max_timestep is None
    assert "sd3: noisy - sigma * output is compared with the latents" in notes
    o, notes = _kohya(
        tmp_path, model_files["sd3"], 'weighting_scheme = "logit_normal"\ntraining_shift = 3.0\nlogit_mean = 0.5\n'
    )
    assert _flow(o) == ("logit_normal", "x0", 3.0, 1.0, "logit_normal") and o.logit_mean == 0.5
    assert "weighting_scheme's density (logit_normal)" in notes
    o, _ = _kohya(tmp_path, model_files["sd3"], 'weighting_scheme = "cosmap"\nmax_timestep = 900\n')
    assert _flow(o)[:2] == ("uniform", "x0") and (o.min_timestep, o.max_timestep) == (None, 900)
    # an explicit 0 (what the kohya_ss GUI writes for every run) is kohya's SD3 default: integer timesteps too
    o, _ = _kohya(tmp_path, model_files["sd3"], "min_timestep = 0\n")
    assert (o.min_timestep, o.max_timestep) == (0, None)


def test_kohya_sd3_timesteps_are_the_scripts_integers(tmp_path, model_files):
    """sd3_train_utils: t = int(shift(u) * (max - min) + min), sigma = t / 1000, the loss weighted by
    weighting_scheme; the objective built from a kohya SD3 TOML draws exactly that."""
    from sdcore.train.objectives import FlowMatchingObjective

    o, _ = _kohya(tmp_path, model_files["sd3"], "training_shift = 3.0\n")
    obj = FlowMatchingObjective(timestep_sampling=o.timestep_sampling, shift=o.discrete_flow_shift,
                                min_timestep=o.min_timestep, max_timestep=o.max_timestep)  # fmt: skip
    _, t = obj.sample([5, 6, 7], (16, 8, 8))
    expected = []
    for key in (5, 6, 7):
        gen = torch.Generator().manual_seed(key)
        torch.randn((16, 8, 8), generator=gen)  # the noise comes first
        u = torch.rand((1,), generator=gen).item()
        expected.append(math.floor(1000 * 3 * u / (1 + 2 * u)))
    assert t.tolist() == [float(e) for e in expected]


def test_native_runs_and_ddpm_kohya_runs_keep_sdcores_flow_defaults(tmp_path, model_files):
    from sdcore.train.config import load_options
    from sdcore.train.options import TrainOptions

    native = tmp_path / "native.toml"
    native.write_text(f'model = "{model_files["flux"]}"\nlr = 1e-4\ntimestep_sampling = "sigmoid"\n'
                      "discrete_flow_shift = 3.0\n", encoding="utf-8")  # fmt: skip
    o = load_options(TrainOptions, native, notes=[])
    assert _flow(o) == ("sigmoid", "raw", 3.0, 1.0, "uniform")  # sdcore's sigmoid is shifted
    o, notes = _kohya(tmp_path, "tiny:sd1")
    assert _flow(o) == ("logit_normal", "raw", None, 1.0, "uniform") and o.min_timestep is None  # shift unset
    assert "flux:" not in notes and "sd3:" not in notes
    o, notes = _kohya(tmp_path, "tiny:flux")  # the tiny spelling is read without a file
    assert _flow(o)[:2] == ("sigma", "sigma_scaled")


def test_an_unreadable_family_is_said(tmp_path):
    (tmp_path / "odd.safetensors").write_bytes(b"not a safetensors file")
    o, notes = _kohya(tmp_path, tmp_path / "odd.safetensors")
    assert o.timestep_sampling == "logit_normal" and "kohya's Flux/SD3 script defaults" in notes


def test_kohya_sigmoid_keeps_its_shift_on_sd3_and_sdcores_own_flag_keeps_sdcores_meaning(tmp_path, model_files):
    o, notes = _kohya(tmp_path, model_files["sd3"], 'timestep_sampling = "sigmoid"\ntraining_shift = 3.0\n')
    assert (o.timestep_sampling, o.discrete_flow_shift) == ("sigmoid", 3.0) and "time-shift" not in notes
    from sdcore.train.config import load_options
    from sdcore.train.options import TrainOptions

    path = tmp_path / "mixed.toml"
    path.write_text(f'pretrained_model_name_or_path = "{model_files["flux"]}"\n', encoding="utf-8")
    o = load_options(TrainOptions, path, {"timestep_sampling": "sigmoid", "discrete_flow_shift": 2.0}, notes=[])
    assert (o.timestep_sampling, o.discrete_flow_shift, o.model_prediction_type) == ("sigmoid", 2.0, "sigma_scaled")


def test_kohya_flux_model_type_is_known(tmp_path):
    from sdcore.errors import ConfigError

    o, _ = _kohya(tmp_path, "tiny:flux", 'model_type = "flux"\n')
    assert o.timestep_sampling == "sigma"
    with pytest.raises(ConfigError, match="model_type = 'chroma' but the model is a flux model"):
        _kohya(tmp_path, "tiny:flux", 'model_type = "chroma"\n')

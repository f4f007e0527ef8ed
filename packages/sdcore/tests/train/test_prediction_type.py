"""``--prediction-type``: the training override of what a DDPM model predicts (kohya's --v_parameterization,
diffusers' --prediction_type), from the option to the loss target, the pre-flight and the saved file."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from runtime_methods import ConvOutMethod, loss_target
from sdcore.errors import ConfigError
from sdcore.models.load import load_model, override_prediction_type
from sdcore.models.save import write_single_file
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train import kohya
from sdcore.train.loop import TrainSession
from sdcore.train.options import TrainOptions
from sdcore.train.preflight import run_preflight

PRESENT = [f.name for f in fields(TrainOptions)]


@pytest.mark.parametrize("chosen", ["v_prediction", "epsilon"])
def test_the_option_reaches_the_loaded_model_and_the_loss_target(tmp_path, chosen):
    """tiny:sd1 is epsilon by itself; loaded by the session (no bundle given), the option decides."""
    o = contract_options(ConvOutMethod, tmp_path, {"prediction_type": chosen})
    s = TrainSession(ConvOutMethod(o))
    s.setup()
    assert s.bundle.prediction_type == chosen
    assert s.bundle.noise_scheduler.config.prediction_type == chosen
    target, latents, noise, t = loss_target(s)
    if chosen == "v_prediction":
        velocity = s.bundle.noise_scheduler.get_velocity(latents, noise, t)
        assert torch.allclose(target, velocity) and not torch.allclose(target, noise)
    else:
        assert torch.equal(target, noise)


def test_a_given_bundle_follows_the_option_too(tmp_path):
    """sd2's tiny model is v; --prediction-type epsilon (an SD2-512 base file without a marker) trains noise."""
    o = contract_options(ConvOutMethod, tmp_path, {"prediction_type": "epsilon"}, family="sd2")
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd2"))
    s.setup()
    assert s.bundle.prediction_type == "epsilon"
    target, _, noise, _ = loss_target(s)
    assert torch.equal(target, noise)


def test_auto_keeps_the_models_own(tmp_path):
    o = contract_options(ConvOutMethod, tmp_path, family="sd2")
    assert o.prediction_type == "auto"
    s = TrainSession(ConvOutMethod(o))
    s.setup()
    assert s.bundle.prediction_type == "v_prediction"


def test_override_keeps_the_rest_of_the_schedule():
    bundle = create_tiny_bundle("sd1")
    before = bundle.noise_scheduler.alphas_cumprod.clone()
    override_prediction_type(bundle, "v_prediction")
    assert bundle.prediction_type == bundle.noise_scheduler.config.prediction_type == "v_prediction"
    assert torch.equal(bundle.noise_scheduler.alphas_cumprod, before)
    assert override_prediction_type(bundle, "auto").prediction_type == "v_prediction"
    with pytest.raises(ConfigError, match="unknown prediction type"):
        override_prediction_type(bundle, "sample")


def test_a_flow_family_refuses_it_before_loading(tmp_path):
    o = contract_options(ConvOutMethod, tmp_path, {"prediction_type": "v_prediction"}, family="flux")
    report = run_preflight(ConvOutMethod(o), o, plan=False)
    assert any(p.startswith("--prediction-type v_prediction: flux trains with flow matching") for p in report.problems)
    # and a bundle already loaded (a format the pre-flight cannot read) is refused by the loader's step
    with pytest.raises(ConfigError, match="flow matching"):
        override_prediction_type(create_tiny_bundle("flux"), "epsilon")
    auto = contract_options(ConvOutMethod, tmp_path, family="flux")
    assert not [p for p in run_preflight(ConvOutMethod(auto), auto, plan=False).problems if "prediction" in p]


def _single_file(tmp_path, prediction_type: str):
    bundle = override_prediction_type(create_tiny_bundle("sd1"), prediction_type)
    path = tmp_path / f"sd1-{prediction_type}.safetensors"
    write_single_file(bundle, path)
    return path


def test_a_note_where_the_option_contradicts_what_the_file_declares(tmp_path):
    path = _single_file(tmp_path, "v_prediction")  # modelspec.prediction_type v, the v_pred key
    o = contract_options(ConvOutMethod, tmp_path, {"model": str(path), "prediction_type": "epsilon"})
    report = run_preflight(ConvOutMethod(o), o, plan=False)
    assert not [p for p in report.problems if "prediction" in p]
    notes = [n for n in report.notes if n.startswith("--prediction-type epsilon")]
    assert notes == [
        "--prediction-type epsilon: the model declares v_prediction (modelspec); training follows --prediction-type "
        "(as kohya follows --v_parameterization) and the trained files say epsilon"
    ]
    # the checks after it see what will train: --scale-v-pred-loss-like-noise-pred needs v
    report = run_preflight(ConvOutMethod(o), replace_options(o, scale_v_pred_loss_like_noise_pred=True), plan=False)
    assert any("--scale-v-pred-loss-like-noise-pred needs a v-prediction model" in p for p in report.problems)
    # the same value as the file: no note
    same = contract_options(ConvOutMethod, tmp_path, {"model": str(path), "prediction_type": "v_prediction"})
    assert not [n for n in run_preflight(ConvOutMethod(same), same, plan=False).notes if "--prediction-type" in n]


def replace_options(o, **kw):
    from dataclasses import replace

    return replace(o, **kw)


def test_a_file_that_declares_nothing_gets_no_note(tmp_path):
    """A file without modelspec/sdcore.config/v_pred key: the case the option is for (no contradiction)."""
    from safetensors.torch import load_file, save_file

    path = _single_file(tmp_path, "epsilon")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), bare)  # the weights without any metadata
    o = contract_options(ConvOutMethod, tmp_path, {"model": str(bare), "prediction_type": "v_prediction"})
    report = run_preflight(ConvOutMethod(o), o, plan=False)
    assert not [n for n in report.notes if "--prediction-type" in n] and not report.problems
    assert load_model(bare, prediction_type="v_prediction").prediction_type == "v_prediction"


def test_a_model_saved_after_the_override_says_what_was_trained(tmp_path):
    """The full-model writers (DreamBooth's) read the bundle: modelspec, sdcore.config and the v_pred key."""
    from sdcore.models.source import read_safetensors_header

    path = _single_file(tmp_path, "v_prediction")
    header, _ = read_safetensors_header(path)
    assert header["__metadata__"]["modelspec.prediction_type"] == "v" and "v_pred" in header
    assert load_model(path).prediction_type == "v_prediction"


# --- kohya ----------------------------------------------------------------------------------------


def test_kohya_v_parameterization_maps_to_the_option(tmp_path):
    out = kohya.translate({"v_parameterization": True}, PRESENT, where="cfg")
    assert not out.problems and out.values == {"prediction_type": "v_prediction"} and not out.notes
    for off in (False, "false"):  # the kohya_ss GUI writes false for an untouched box
        out = kohya.translate({"v_parameterization": off}, PRESENT, where="cfg")
        assert not out.problems and out.values == {"prediction_type": "auto"}
    assert "v_parameterization" in kohya.flag_names()  # store_true on kohya's command line
    cfg = tmp_path / "k.toml"
    cfg.write_text("[model_arguments]\nv2 = true\nv_parameterization = true\n", encoding="utf-8")
    from runtime_methods import ConvOutOptions
    from sdcore.train.config import load_options

    notes: list[str] = []
    o = load_options(ConvOutOptions, cfg, notes=notes)
    assert o.prediction_type == "v_prediction"
    assert any(n.startswith("v2: the model family is read") for n in notes)


def test_resolution_zero_takes_the_native_size_of_the_chosen_type(tmp_path):
    """An SD2 file that declares nothing is built as SD2-768-v (96 latent) or, with epsilon, as SD2-512 (64):
    --resolution 0 peeks the size the loader will build."""
    from safetensors.torch import load_file, save_file
    from sdcore.models.native import peek_native_resolution
    from sdcore.train.options import apply_model_defaults

    path = tmp_path / "sd2.safetensors"
    write_single_file(create_tiny_bundle("sd2"), path)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), bare)
    assert (peek_native_resolution(bare), peek_native_resolution(bare, "epsilon")) == (768, 512)
    o = contract_options(ConvOutMethod, tmp_path, {"model": str(bare), "resolution": 0, "prediction_type": "epsilon"})
    assert apply_model_defaults(o) and o.resolution == 512


def test_a_resume_that_would_train_another_prediction_type_warns(tmp_path, capsys):
    """The state records what the run trained (as resolved): resuming a --prediction-type v_prediction state
    without the option (tiny:sd1 is epsilon by itself) switches the loss target, and says so; the same resolved
    type (sd2's own v given explicitly or not) says nothing."""
    from dataclasses import replace

    from sdcore.train.loop import train

    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 1, "prediction_type": "v_prediction"})
    train(ConvOutMethod(o))
    capsys.readouterr()
    train(ConvOutMethod(replace(o, resume="latest", max_steps=2, prediction_type="auto", progress=True)))
    assert "resuming with changed prediction_type" in capsys.readouterr().err
    v = contract_options(ConvOutMethod, tmp_path, {"max_steps": 1}, family="sd2", tag="sd2")
    train(ConvOutMethod(v))
    capsys.readouterr()
    train(ConvOutMethod(replace(v, resume="latest", max_steps=2, prediction_type="v_prediction", progress=True)))
    assert "resuming with changed" not in capsys.readouterr().err


def test_an_unusable_a1111_config_beside_the_file_gives_way_to_the_option(tmp_path):
    """An EDM model.yaml beside a single file refuses auto (sdcore cannot tell its type), but --prediction-type
    loads the file without reading it: the pre-flight reads the layout the same way, not refusing the run."""
    path = _single_file(tmp_path, "epsilon")
    path.with_suffix(".yaml").write_text(
        "model:\n  params:\n    denoiser_config:\n      params:\n        scaling_config:\n"
        "          target: sgm.modules.diffusionmodules.denoiser_scaling.EDMScaling\n"
    )
    auto = contract_options(ConvOutMethod, tmp_path, {"model": str(path)})
    assert any("EDMScaling" in p for p in run_preflight(ConvOutMethod(auto), auto, plan=False).problems)
    o = contract_options(ConvOutMethod, tmp_path, {"model": str(path), "prediction_type": "v_prediction"})
    report = run_preflight(ConvOutMethod(o), o, plan=False)
    assert not report.problems, report.problems
    assert (report.layout.prediction_type, report.layout.prediction_source) == ("v_prediction", "user")
    assert load_model(path, prediction_type="v_prediction").prediction_type == "v_prediction"

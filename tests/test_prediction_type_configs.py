"""Other tools' prediction-type settings as sdcore's ``--prediction-type`` (sdcore.train: kohya, kohya_gui,
diffusers_script, onetrainer_config, simpletuner_config, aitoolkit). Each expected value is that tool's meaning:
kohya train_util.py (--v_parameterization sets the scheduler's prediction type and the v target), diffusers
train_text_to_image*.py (``noise_scheduler.register_to_config(prediction_type=...)``), OneTrainer
``*FineTuneSetup`` (force_v/epsilon_prediction; every SD setup forces v with the zero-terminal rescale) and
``StableDiffusionModelLoader`` (SD2 ``_BASE`` files read with v2-inference.yaml), SimpleTuner models/sd1x
(``PREDICTION_TYPE = from_str(prediction_type)``), ai-toolkit stable_diffusion_model.py (``is_v_pred``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _lora(path: Path, notes: list[str] | None = None):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    return load_options(LoraOptions, path, notes=notes if notes is not None else [])


def _dreambooth(path: Path, notes: list[str] | None = None):
    from sdcore.train.config import load_options
    from sdplugin_dreambooth.options import DreamBoothOptions

    return load_options(DreamBoothOptions, path, notes=notes if notes is not None else [])


# --- kohya: .sh command and kohya_ss GUI json ----------------------------------------------------------


def test_kohya_command_flag(tmp_path):
    line = ("accelerate launch train_network.py --pretrained_model_name_or_path=tiny:sd2 --train_data_dir=d "
            "--output_dir=o --network_module=networks.lora --v2 --v_parameterization\n")  # fmt: skip
    assert _lora(_write(tmp_path, "train.sh", line)).prediction_type == "v_prediction"
    plain = line.replace(" --v_parameterization", "")
    assert _lora(_write(tmp_path, "plain.sh", plain)).prediction_type == "auto"


def test_kohya_gui_checkbox(tmp_path):
    gui = {"LoRA_type": "Standard", "network_dim": 8, "network_alpha": 4, "learning_rate": 1e-4,
           "text_encoder_lr": 5e-5, "unet_lr": 1e-4, "optimizer": "AdamW", "max_resolution": "512,512",
           "lr_warmup": 0, "pretrained_model_name_or_path": "tiny:sd1"}  # fmt: skip
    on = _lora(_write(tmp_path, "on.json", json.dumps({**gui, "v2": True, "v_parameterization": True})))
    off = _lora(_write(tmp_path, "off.json", json.dumps({**gui, "v_parameterization": False})))
    assert (on.prediction_type, off.prediction_type) == ("v_prediction", "auto")


def test_kohya_flag_on_a_flow_family_is_ignored_as_kohya_ignores_it(tmp_path):
    """kohya's flux_train_network.py computes its own flow target and never reads --v_parameterization: the run
    keeps auto (a note says so) instead of the refusal sdcore's own --prediction-type gets on Flux."""
    line = ("accelerate launch flux_train_network.py --pretrained_model_name_or_path=tiny:flux --train_data_dir=d "
            "--output_dir=o --network_module=networks.lora_flux --v_parameterization\n")  # fmt: skip
    notes: list[str] = []
    assert _lora(_write(tmp_path, "flux.sh", line), notes).prediction_type == "auto"
    assert any(n.startswith("v_parameterization: flux trains with flow matching") for n in notes), notes
    # on a DDPM family it stays v, and sdcore's own option on the command line is not rewritten
    sd = line.replace("flux_train_network.py", "train_network.py").replace("tiny:flux", "tiny:sd2")
    assert _lora(_write(tmp_path, "sd.sh", sd.replace("networks.lora_flux", "networks.lora"))).prediction_type == (
        "v_prediction"
    )
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    given = load_options(LoraOptions, _write(tmp_path, "cli.sh", line), {"prediction_type": "epsilon"}, notes=[])
    assert given.prediction_type == "epsilon"


# --- diffusers example scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["epsilon", "v_prediction"])
def test_diffusers_prediction_type(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    line = (f"accelerate launch train_text_to_image_lora.py --pretrained_model_name_or_path=tiny:sd1 "
            f"--train_data_dir=pics --prediction_type={value}\n")  # fmt: skip
    assert _lora(_write(tmp_path, "train.sh", line)).prediction_type == value


def test_diffusers_prediction_type_other_values_are_problems(tmp_path, monkeypatch):
    from sdcore.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    line = ("accelerate launch train_text_to_image_lora.py --pretrained_model_name_or_path=tiny:sd1 "
            "--train_data_dir=pics --prediction_type=sample\n")  # fmt: skip
    with pytest.raises(ConfigError) as info:
        _lora(_write(tmp_path, "train.sh", line))
    assert any("--prediction_type sample: the script trains epsilon or v_prediction only" in p
               for p in info.value.problems)  # fmt: skip


# --- OneTrainer -----------------------------------------------------------------------------------------

ONETRAINER = {"model_type": "STABLE_DIFFUSION_15", "base_model_name": "tiny:sd1",
              "output_model_destination": "models/out.safetensors", "resolution": "512"}  # fmt: skip


def test_onetrainer_force_flags_in_a_fine_tune(tmp_path):
    run = {**ONETRAINER, "training_method": "FINE_TUNE"}
    v = _dreambooth(_write(tmp_path, "v.json", json.dumps({**run, "force_v_prediction": True})))
    eps = _dreambooth(_write(tmp_path, "e.json", json.dumps({**run, "force_epsilon_prediction": True})))
    plain = _dreambooth(_write(tmp_path, "p.json", json.dumps(run)))
    assert (v.prediction_type, eps.prediction_type, plain.prediction_type) == ("v_prediction", "epsilon", "auto")


def test_onetrainer_lora_ignores_the_force_flags_but_not_the_zero_terminal_rescale(tmp_path):
    run = {**ONETRAINER, "training_method": "LORA"}
    notes: list[str] = []
    forced = _lora(_write(tmp_path, "f.json", json.dumps({**run, "force_v_prediction": True})), notes)
    assert forced.prediction_type == "auto"
    assert any("force_v_prediction: accepted, no effect (OneTrainer reads it in its fine-tune" in n for n in notes)
    rescaled = _lora(
        _write(tmp_path, "z.json", json.dumps({**run, "rescale_noise_scheduler_to_zero_terminal_snr": True}))
    )
    assert (rescaled.prediction_type, rescaled.zero_terminal_snr) == ("v_prediction", True)


def test_onetrainer_sd2_base_single_file_is_epsilon(tmp_path):
    """StableDiffusionModelLoader converts a single file with v2-inference.yaml for the _BASE types."""
    from sdcore.train.aitoolkit import JobTranslation
    from sdcore.train.onetrainer_config import DEFAULTS, _Reader, config_prediction_type

    def decided(model_type: str, model: str) -> str | None:
        data = {**DEFAULTS, "model_type": model_type, "base_model_name": model}
        return config_prediction_type(_Reader(data, "cfg", JobTranslation()), "sd2", "lora")

    assert decided("STABLE_DIFFUSION_21_BASE", "sd21-base.safetensors") == "epsilon"
    assert decided("STABLE_DIFFUSION_21_BASE", "a/diffusers/folder") is None  # its scheduler config decides
    assert decided("STABLE_DIFFUSION_21", "sd21.safetensors") is None  # v unless global_step 875000: the default


def test_onetrainer_notes_a_v_prediction_sd_file_it_would_train_as_epsilon(tmp_path):
    """OneTrainer converts SD1.5/SDXL single files with v1-inference.yaml / sd_xl_base.yaml (epsilon) whatever they
    declare; sdcore's auto follows the file, and the translation says so where the file declares v."""
    from sdcore.models.load import override_prediction_type
    from sdcore.models.tiny import create_tiny_bundle

    eps = create_tiny_bundle("sdxl").save(tmp_path / "xl.safetensors")
    vpred = override_prediction_type(create_tiny_bundle("sdxl"), "v_prediction").save(tmp_path / "xl-v.safetensors")
    run = {**ONETRAINER, "model_type": "STABLE_DIFFUSION_XL_10_BASE", "training_method": "LORA", "resolution": "64"}
    found = {}
    for path in (eps, vpred):
        notes: list[str] = []
        options = _lora(_write(tmp_path, "c.json", json.dumps({**run, "base_model_name": str(path)})), notes)
        assert options.prediction_type == "auto"
        found[path.name] = [n for n in notes if "declares v-prediction" in n]
    assert found["xl.safetensors"] == []
    (note,) = found["xl-v.safetensors"]
    assert "(modelspec) and sdcore trains it as v; OneTrainer converts SD1.5/SDXL files with its epsilon config" in note


# --- SimpleTuner and ai-toolkit -------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "value", "expected"), [
    ("sd1x", "v_prediction", "v_prediction"), ("sdxl", "epsilon", "epsilon"), ("flux", "v_prediction", None),
])  # fmt: skip
def test_simpletuner_prediction_type(tmp_path, family, value, expected):
    from sdcore.train.config import field_types
    from sdcore.train.simpletuner_config import translate_config
    from sdplugin_lora.method import LoraOptions

    data = {"model_family": family, "model_type": "lora", "pretrained_model_name_or_path": "m",
            "prediction_type": value}  # fmt: skip
    out = translate_config(data, list(field_types(LoraOptions)), where="cfg", path=tmp_path / "config.json")
    assert out.values.get("prediction_type") == expected
    assert not [p for p in out.problems if "prediction_type" in p]
    if expected is None:
        assert any("prediction_type v_prediction: flux trains with flow matching" in n for n in out.notes)


def test_aitoolkit_is_v_pred(tmp_path):
    import yaml

    def job(model: dict) -> Path:
        process = {"type": "sd_trainer", "model": model, "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
                   "datasets": [{"folder_path": "imgs"}]}  # fmt: skip
        data = {"job": "extension", "config": {"name": "run", "process": [process]}}
        return _write(tmp_path, "job.yaml", yaml.safe_dump(data))

    assert _lora(job({"name_or_path": "tiny:sd2", "is_v_pred": True})).prediction_type == "v_prediction"
    assert _lora(job({"name_or_path": "tiny:sd1"})).prediction_type == "auto"

"""A kohya Flux/SD3 LoRA run from kohya's flags: kohya's script defaults train, and the file records the
flow objective in the ``ss_*`` keys kohya's ``update_metadata`` writes."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from sdcore.testing.contract import make_tiny_dataset  # noqa: E402


def _train(tmp_path, model, *extra):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager
    from sdplugin_lora.format import read_lora

    data = tmp_path / "data"
    if not data.exists():
        make_tiny_dataset(data, n=2, size=64)
    out = tmp_path / "out" / f"{model.split(':')[-1]}{len(extra)}.safetensors"
    args = ["train", "lora", "--pretrained_model_name_or_path", model, "--train_data_dir", str(data),
            "--output", str(out), "--network_dim", "2", "--resolution", "64", "--max_train_steps", "1",
            "--save_precision", "float", "--no-progress", "--network_train_unet_only", *extra]  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return read_lora(out).metadata, result.output


def test_a_kohya_flux_run_trains_and_records_kohyas_flux_defaults(tmp_path):
    meta, output = _train(tmp_path, "tiny:flux")
    assert "flux: timestep_sampling defaults to sigma" in output
    expected = {"ss_timestep_sampling": "sigma", "ss_model_prediction_type": "sigma_scaled",
                "ss_discrete_flow_shift": "3.0", "ss_guidance_scale": "3.5", "ss_weighting_scheme": "uniform",
                "ss_sigmoid_scale": "1.0", "ss_logit_mean": "0.0", "ss_logit_std": "1.0", "ss_mode_scale": "1.29",
                "ss_model_type": "flux", "ss_apply_t5_attn_mask": "False",
                "ss_network_module": "networks.lora_flux"}  # fmt: skip
    assert {k: meta.get(k) for k in expected} == expected
    # kohya's README recipe: shift sampling (sdcore's shifted sigmoid) with raw predictions, named as kohya names it
    meta, _ = _train(tmp_path, "tiny:flux", "--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582",
                     "--model_prediction_type", "raw", "--weighting_scheme", "cosmap")  # fmt: skip
    assert (meta["ss_timestep_sampling"], meta["ss_discrete_flow_shift"]) == ("shift", "3.1582")
    assert (meta["ss_model_prediction_type"], meta["ss_weighting_scheme"]) == ("raw", "cosmap")


def test_a_kohya_sd3_run_records_the_sd3_keys_only(tmp_path):
    meta, output = _train(tmp_path, "tiny:sd3", "--weighting_scheme", "logit_normal", "--logit_mean", "0.5")
    assert "sd3: noisy - sigma * output is compared with the latents" in output
    assert (meta["ss_weighting_scheme"], meta["ss_logit_mean"], meta["ss_logit_std"]) == ("logit_normal", "0.5", "1.0")
    assert "ss_timestep_sampling" not in meta and "ss_model_prediction_type" not in meta  # kohya's SD3 script has none
    assert meta["ss_network_module"] == "networks.lora_sd3"  # the module kohya's sd3_train_network.py trains
    assert "modelspec.timestep_range" not in meta  # sdcore's kohya SD3 default min_timestep 0 is no range given
    meta, _ = _train(tmp_path, "tiny:sd3", "--max_timestep", "900")
    assert meta["modelspec.timestep_range"] == "0,900"
    sd1, _ = _train(tmp_path, "tiny:sd1")
    assert "ss_weighting_scheme" not in sd1 and "ss_guidance_scale" not in sd1
    assert sd1["ss_network_module"] == "networks.lora"

"""kohya's loss options for LoRA: TOML keys and flags translated, a tiny CLI run with --loss-type huber,
and the ``ss_*`` metadata kohya's train_network.py writes for them."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner
from sdcore.errors import ConfigError
from sdcore.testing.contract import make_tiny_dataset
from sdcore.train.config import load_options
from sdplugin_lora.method import LoraOptions


def _invoke(args: list[str]):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    return result, result.output


def test_toml_keys_translate(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[training_arguments]\n"
        'loss_type = "huber"\nhuber_schedule = "exponential"\nhuber_c = 0.2\nhuber_scale = 1.5\n'
        "debiased_estimation_loss = true\nv_pred_like_loss = 0.1\nscale_v_pred_loss_like_noise_pred = false\n"
    )
    o = load_options(LoraOptions, cfg, notes=[])
    assert (o.loss_type, o.huber_schedule, o.huber_c, o.huber_scale) == ("huber", "exponential", 0.2, 1.5)
    assert (o.debiased_estimation_loss, o.v_pred_like_loss, o.scale_v_pred_loss_like_noise_pred) == (True, 0.1, False)


def test_gui_off_values_are_the_defaults_and_need_no_note(tmp_path):
    cfg = tmp_path / "gui.toml"
    cfg.write_text(
        'loss_type = "l2"\nhuber_schedule = "snr"\nhuber_c = 0.1\nhuber_scale = 1\nv_pred_like_loss = 0\n'
        "debiased_estimation_loss = false\nscale_v_pred_loss_like_noise_pred = false\n"
    )
    notes: list[str] = []
    o = load_options(LoraOptions, cfg, notes=notes)
    default = LoraOptions()
    names = ("loss_type", "huber_schedule", "huber_c", "huber_scale", "v_pred_like_loss",
             "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred")  # fmt: skip
    for name in names:
        assert getattr(o, name) == getattr(default, name), name
    assert not any("huber" in n for n in notes), notes


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ('loss_type = "l3"', "loss_type = 'l3' is not a valid value (available: l2, l1, huber, smooth_l1)"),
        ('huber_schedule = "cosine"', "huber_schedule = 'cosine' is not a valid value (available: constant, "),
    ],
)
def test_unknown_values_are_refused(tmp_path, items, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(items + "\n")
    with pytest.raises(ConfigError) as info:
        load_options(LoraOptions, cfg)
    assert message in str(info.value)


def test_kohya_flags_on_the_command_line(tmp_path):
    kohya = {"loss_type": "smooth_l1", "huber_schedule": "constant", "huber_c": "0.3", "huber_scale": "2",
             "debiased_estimation_loss": True, "v_pred_like_loss": "0.25"}  # fmt: skip
    o = load_options(LoraOptions, None, kohya=kohya, notes=[])
    assert (o.loss_type, o.huber_schedule, o.huber_c, o.huber_scale) == ("smooth_l1", "constant", 0.3, 2.0)
    assert o.debiased_estimation_loss and o.v_pred_like_loss == 0.25
    # through the real command line: the flags reach the pre-flight, which refuses what kohya refuses
    data = make_tiny_dataset(tmp_path / "d", n=1, size=64)
    result, text = _invoke(
        ["train", "lora", "--pretrained_model_name_or_path", "tiny:sd1", "--train_data_dir", str(data),
         "--output_dir", str(tmp_path / "o"), "--resolution", "64", "--dry-run",
         "--loss_type", "huber", "--huber_c", "0", "--scale_v_pred_loss_like_noise_pred", "--debiased_estimation_loss"]
    )  # fmt: skip
    assert result.exit_code == 2, text
    errors = [line for line in text.splitlines() if line.startswith("Error: ")]
    assert errors == [
        "Error: --huber-c must be positive (kohya's default 0.1), got 0.0",
        "Error: --scale-v-pred-loss-like-noise-pred needs a v-prediction model (as in kohya)",
    ], text


def test_cli_run_with_huber_loss_records_kohya_metadata(tmp_path):
    from sdplugin_lora.format import read_lora

    data = make_tiny_dataset(tmp_path / "d", n=2, size=64)
    out = tmp_path / "huber.safetensors"
    result, text = _invoke(
        ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", str(out), "--resolution", "64",
         "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--max-steps", "3", "--rank", "2", "--lr", "1e-3",
         "--loss-type", "huber", "--huber-schedule", "exponential", "--huber-c", "0.2", "--huber-scale", "1.5",
         "--debiased-estimation-loss", "--no-progress", "--no-save-state"]
    )  # fmt: skip
    assert result.exit_code == 0, text
    assert "saved" in text and "after 3 steps" in text
    meta = read_lora(out).metadata
    assert meta["ss_loss_type"] == "huber" and meta["ss_huber_schedule"] == "exponential"
    assert (meta["ss_huber_c"], meta["ss_huber_scale"], meta["ss_debiased_estimation"]) == ("0.2", "1.5", "True")


def test_default_metadata_is_kohyas_defaults():
    from pathlib import Path

    from sdcore.train.method import SaveInfo
    from sdplugin_lora.method import kohya_training_metadata

    info = SaveInfo(path=Path("x.safetensors"), step=1, epoch=0, metadata={}, final=True)
    meta = kohya_training_metadata(LoraOptions(), info)
    # train_network.py's defaults: str(args.x) of l2, snr, 1.0, 0.1, False
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_scale"], meta["ss_huber_c"]) == (
        "l2",
        "snr",
        "1.0",
        "0.1",
    )
    assert meta["ss_debiased_estimation"] == "False" and math.isclose(float(meta["ss_huber_c"]), 0.1)

"""kohya's noise and timestep options: TOML keys, command-line flags and GUI presets become sdcore's
options; a run with them on trains and records them as kohya's ``ss_*`` keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sdcore.errors import ConfigError
from sdcore.testing.contract import make_tiny_dataset
from sdcore.train.config import load_options
from sdplugin_lora.method import LoraOptions

DATA = Path(__file__).parent / "data" / "kohya"

KOHYA_TOML = """
pretrained_model_name_or_path = "tiny:sd1"
noise_offset = 0.05
noise_offset_random_strength = true
adaptive_noise_scale = 0.01
multires_noise_iterations = 6
multires_noise_discount = 0.2
ip_noise_gamma = 0.1
ip_noise_gamma_random_strength = true
min_timestep = 100
max_timestep = 900
zero_terminal_snr = true
"""

WANT = {
    "noise_offset": 0.05,
    "noise_offset_random_strength": True,
    "adaptive_noise_scale": 0.01,
    "multires_noise_iterations": 6,
    "multires_noise_discount": 0.2,
    "ip_noise_gamma": 0.1,
    "ip_noise_gamma_random_strength": True,
    "min_timestep": 100,
    "max_timestep": 900,
    "zero_terminal_snr": True,
}


def _got(o: LoraOptions) -> dict:
    return {name: getattr(o, name) for name in WANT}


def test_kohya_toml_keys_translate(tmp_path):
    cfg = tmp_path / "kohya.toml"
    cfg.write_text(KOHYA_TOML)
    assert _got(load_options(LoraOptions, cfg, notes=[])) == WANT


def test_kohya_defaults_are_sdcores():
    o = LoraOptions()
    assert o.multires_noise_discount == 0.3  # kohya's argparse default
    assert (o.multires_noise_iterations, o.adaptive_noise_scale, o.ip_noise_gamma) == (None, None, None)
    assert (o.min_timestep, o.max_timestep, o.zero_terminal_snr, o.noise_offset_random_strength) == (
        None,
        None,
        False,
        False,
    )


def test_kohya_zero_values_mean_off():
    """kohya tests these options for truth; 0 (what kohya_ss writes for untouched fields) is off."""
    kohya = {"adaptive_noise_scale": "0", "multires_noise_iterations": 0, "ip_noise_gamma": 0.0}
    o = load_options(LoraOptions, None, kohya=kohya, notes=[])
    assert (o.adaptive_noise_scale, o.multires_noise_iterations, o.ip_noise_gamma) == (None, None, None)


def _cli():
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return build_cli(get_plugin_manager())


def _args(data: Path, out: Path, style: str) -> list[str]:
    names = {
        "kohya": [
            "--noise_offset", "0.05", "--noise_offset_random_strength", "--adaptive_noise_scale", "0.01",
            "--multires_noise_iterations", "3", "--multires_noise_discount", "0.2", "--ip_noise_gamma", "0.1",
            "--ip_noise_gamma_random_strength", "--min_timestep", "100", "--max_timestep", "900",
            "--zero_terminal_snr",
        ],
        "sdcore": [
            "--noise-offset", "0.05", "--noise-offset-random-strength", "--adaptive-noise-scale", "0.01",
            "--multires-noise-iterations", "3", "--multires-noise-discount", "0.2", "--ip-noise-gamma", "0.1",
            "--ip-noise-gamma-random-strength", "--min-timestep", "100", "--max-timestep", "900",
            "--zero-terminal-snr",
        ],
    }[style]  # fmt: skip
    return ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", str(out),
            "--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--batch-size", "2",
            "--max-steps", "2", "--lr", "1e-3", "--no-progress", "--rank", "2", *names]  # fmt: skip


@pytest.mark.parametrize("style", ["kohya", "sdcore"])
def test_cli_run_with_the_options_records_kohyas_metadata(tmp_path, style):
    from sdplugin_lora.format import read_lora

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(_cli(), _args(data, out, style), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    meta = read_lora(out).metadata
    assert {k: meta[k] for k in meta if k in KEYS} == {
        "ss_noise_offset": "0.05",
        "ss_noise_offset_random_strength": "True",
        "ss_adaptive_noise_scale": "0.01",
        "ss_multires_noise_iterations": "3",
        "ss_multires_noise_discount": "0.2",
        "ss_ip_noise_gamma": "0.1",
        "ss_ip_noise_gamma_random_strength": "True",
        "ss_zero_terminal_snr": "True",
        "modelspec.timestep_range": "100,900",  # kohya's sai_model_spec records the range this way
    }


KEYS = {
    "ss_noise_offset",
    "ss_noise_offset_random_strength",
    "ss_adaptive_noise_scale",
    "ss_multires_noise_iterations",
    "ss_multires_noise_discount",
    "ss_ip_noise_gamma",
    "ss_ip_noise_gamma_random_strength",
    "ss_zero_terminal_snr",
    "modelspec.timestep_range",
}


def test_metadata_with_the_options_off_is_kohyas_unset_spelling(tmp_path):
    from sdcore.train.method import SaveInfo
    from sdplugin_lora.method import kohya_training_metadata

    def info() -> SaveInfo:
        return SaveInfo(path=tmp_path / "x.safetensors", step=1, epoch=0, metadata={}, final=False)

    meta = kohya_training_metadata(LoraOptions(), info())
    assert {k: meta[k] for k in KEYS - {"modelspec.timestep_range", "ss_noise_offset"}} == {
        "ss_noise_offset_random_strength": "False",
        "ss_adaptive_noise_scale": "None",
        "ss_multires_noise_iterations": "None",
        "ss_multires_noise_discount": "0.3",
        "ss_ip_noise_gamma": "None",
        "ss_ip_noise_gamma_random_strength": "False",
        "ss_zero_terminal_snr": "False",
    }
    assert "modelspec.timestep_range" not in meta
    half = kohya_training_metadata(LoraOptions(max_timestep=500), info())
    assert half["modelspec.timestep_range"] == "0,500"


def test_cli_preflight_lists_every_bad_noise_value_and_exits_2(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", str(tmp_path / "o.safetensors"),
            "--adaptive_noise_scale", "0.1", "--multires-noise-iterations", "-2", "--ip-noise-gamma", "-1",
            "--min_timestep", "900", "--max_timestep", "100", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for part in ("--adaptive-noise-scale adds to the noise offset", "--multires-noise-iterations must be >= 0",
                 "--ip-noise-gamma must be >= 0", "need 0 <= min < max <= 1000"):  # fmt: skip
        assert part in result.output, result.output


def test_gui_presets_noise_offset_type_picks_the_fields(tmp_path):
    """kohya_ss passes noise_offset/adaptive/random strength for "Original" (adaptive only with a
    positive noise_offset) and the multires fields for "Multires"."""
    data = json.loads((DATA / "gui_preset_loha.json").read_text())
    data.update(scale_weight_norms=0, noise_offset=0.1, adaptive_noise_scale=0.01)
    cfg = tmp_path / "loha.json"
    cfg.write_text(json.dumps(data))  # noise_offset_type "Multires", iterations 6, discount 0.2
    o = load_options(LoraOptions, cfg, notes=[])
    assert (o.multires_noise_iterations, o.multires_noise_discount) == (6, 0.2)
    assert (o.noise_offset, o.adaptive_noise_scale) == (0.0, None)
    data.update(noise_offset_type="Original")
    cfg.write_text(json.dumps(data))
    o = load_options(LoraOptions, cfg, notes=[])
    assert (o.multires_noise_iterations, o.multires_noise_discount) == (None, 0.3)
    assert (o.noise_offset, o.adaptive_noise_scale) == (0.1, 0.01)
    data.update(noise_offset=0)  # the GUI drops adaptive_noise_scale without an offset
    cfg.write_text(json.dumps(data))
    assert load_options(LoraOptions, cfg, notes=[]).adaptive_noise_scale is None
    sdxl = load_options(LoraOptions, DATA / "gui_preset_sdxl_standard.json", notes=[])
    assert (sdxl.noise_offset, sdxl.adaptive_noise_scale, sdxl.min_timestep, sdxl.max_timestep) == (
        0.04,
        0.004,
        100,
        900,
    )
    data.update(noise_offset_type="Perlin")
    cfg.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="noise_offset_type = 'Perlin' is not supported"):
        load_options(LoraOptions, cfg, notes=[])

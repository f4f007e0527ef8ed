"""kohya's ``--resolution "768,512"`` (its args, config TOML, command files) and sdcore's ``--resolution 768,512``
carry the pair to the subsets: ``resolution`` stays the int side (memory plan, sample size), ``resolution_size``
holds ``(w, h)`` for the buckets, the buckets-off crop and the metadata (train_util.prepare_dataset_args: a
``"w,h"`` becomes the tuple ``(w, h)``, one number ``(n, n)``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from runtime_methods import ConvOutOptions
from sdcore.data.dataset import assign_buckets, build_dataset_index
from sdcore.errors import ConfigError
from sdcore.specs import MethodSpec
from sdcore.train.cli import build_train_command
from sdcore.train.config import dump_options, load_options
from sdcore.train.options import TrainOptions


def _data(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "1_sks"
    folder.mkdir(parents=True)
    Image.new("RGB", (900, 600), (10, 200, 30)).save(folder / "wide.png")
    return tmp_path / "data"


def _bucket(options: TrainOptions) -> tuple[int, int]:
    index = build_dataset_index(options)
    (entry,) = index.entries
    assert entry.subset.resolution_size == options.resolution_size
    return assign_buckets(index)[0].bucket


def test_kohya_resolution_w_h_in_args_config_and_command_file_reach_the_subsets(tmp_path):
    from sdplugin_lora.method import LoraOptions

    data = _data(tmp_path)
    kohya = {"pretrained_model_name_or_path": "tiny:sd1", "train_data_dir": str(data), "resolution": "768,512"}
    from_args = load_options(LoraOptions, kohya=kohya, notes=[])
    config = tmp_path / "kohya.toml"
    config.write_text("".join(f'{k} = "{v}"\n' for k, v in kohya.items()), encoding="utf-8")
    from_config = load_options(LoraOptions, config, notes=[])
    command = tmp_path / "train.sh"
    command.write_text(
        "accelerate launch train_network.py " + " ".join(f'--{k}="{v}"' for k, v in kohya.items()) + "\n",
        encoding="utf-8",
    )
    from_command = load_options(LoraOptions, command, notes=[])
    for o in (from_args, from_config, from_command):
        assert (o.resolution, o.resolution_size) == (627, (768, 512))
        assert _bucket(o) == (768, 512)
    assert dataclasses.asdict(from_args) == dataclasses.asdict(from_config) == dataclasses.asdict(from_command)


@pytest.mark.parametrize("value", ["512,512", "512", [512, 512], 512])
def test_a_square_kohya_resolution_is_the_side_as_today(value):
    o = load_options(TrainOptions, kohya={"resolution": value}, notes=[])
    assert (o.resolution, o.resolution_size) == (512, None)


def test_sdcore_config_accepts_w_h_and_the_pair_round_trips(tmp_path):
    for spelling in ('"768,512"', "[768, 512]"):
        path = tmp_path / "run.toml"
        path.write_text(f"resolution = {spelling}\n", encoding="utf-8")
        o = load_options(TrainOptions, path)
        assert (o.resolution, o.resolution_size) == (627, (768, 512))
        dump_options(o, tmp_path / "dumped.toml")
        assert load_options(TrainOptions, tmp_path / "dumped.toml") == o
    # a side given on the command line replaces the config's pair
    o = load_options(TrainOptions, tmp_path / "dumped.toml", {"resolution": 512})
    assert (o.resolution, o.resolution_size) == (512, None)
    with pytest.raises(ConfigError, match="resolution"):
        load_options(TrainOptions, None, {"resolution": "768,512,3"})


def test_sdcore_command_line_resolution_w_h(tmp_path):
    data = _data(tmp_path)
    out = tmp_path / "eff.toml"
    command = build_train_command(MethodSpec(name="convout", summary="test", method="runtime_methods:ConvOutMethod"))
    args = ["--model", "tiny:sd1", "--data", str(data), "--resolution", "768,512", "--max-steps", "1",
            "--output", str(tmp_path / "r.safetensors")]  # fmt: skip
    result = CliRunner().invoke(command, [*args, "--dry-run", "--save-config", str(out)])
    assert result.exit_code == 0, result.output
    o = load_options(ConvOutOptions, out)
    assert (o.resolution, o.resolution_size) == (627, (768, 512))
    assert _bucket(o) == (768, 512)
    assert "resolution: 627 (the side of 768x512: " in result.output
    typed = tmp_path / "typed.toml"
    result = CliRunner().invoke(command, [*args, "--resolution", "768x512", "--dry-run", "--save-config", str(typed)])
    assert result.exit_code == 0, result.output
    assert load_options(ConvOutOptions, typed) == o
    bad = CliRunner().invoke(command, [*args[:4], "--resolution", "768;512", "--dry-run"])
    assert bad.exit_code == 2 and "is not a resolution" in bad.output


def test_kohya_ss_gui_max_resolution_w_h_is_the_same_pair(tmp_path):
    """The kohya_ss GUI saves ``max_resolution = "768,512"`` and passes it to sd-scripts as ``--resolution``."""
    import json

    from sdplugin_lora.method import LoraOptions

    preset = tmp_path / "gui.json"
    preset.write_text(json.dumps({"LoRA_type": "Standard", "max_resolution": "768,512"}), encoding="utf-8")
    o = load_options(LoraOptions, preset, notes=[])
    assert (o.resolution, o.resolution_size) == (627, (768, 512))

"""kohya's fine-tuning dataset through ``sdcore train lora``: ``--in_json`` + ``--train_data_dir`` +
``--dataset_repeats`` on the command line and in a training TOML, a dataset TOML with ``metadata_file``
subsets, the ``ss_*`` keys kohya writes for it, and its problems in the pre-flight (exit 2, all at once).

The metadata is written as kohya's merge_captions_to_metadata / merge_dd_tags_to_metadata write it
(keys are file stems; ``caption`` and ``tags``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from sdcore.testing.contract import make_tiny_dataset
from sdcore.train.config import load_options
from sdplugin_lora.method import LoraOptions

TAGS = ["1girl, Solo, smile", "outdoors, solo", "solo"]


@pytest.fixture(scope="module")
def ft_data(tmp_path_factory):
    """images/ (3 tiny PNGs, no caption files) + meta.json keyed by stem, as kohya's merge scripts write it."""
    root = tmp_path_factory.mktemp("ft")
    make_tiny_dataset(root, n=3, size=64, captions=False, name="x")
    images = root / "images"
    (root / "1_x").rename(images)
    meta = {f"img{i:02d}": {"caption": f"picture {i}", "tags": TAGS[i]} for i in range(3)}
    (root / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return root


def _invoke(args: list[str]):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    return result, result.output


_COMMON = [
    "--pretrained_model_name_or_path=tiny:sd1",
    "--network_dim", "2",
    "--resolution", "64",
    "--train_batch_size", "2",
    "--network_train_unet_only",
    "--no-progress",
]  # fmt: skip


def test_in_json_command_line_trains_and_records_it_as_kohya(tmp_path, ft_data):
    from sdplugin_lora.format import read_lora

    out = tmp_path / "out"
    args = [
        "train", "lora", *_COMMON,
        "--in_json", str(ft_data / "meta.json"),
        "--train_data_dir", str(ft_data / "images"),
        "--dataset_repeats", "2",
        "--max_train_epochs", "1",
        "--output_dir", str(out),
        "--output_name", "ft",
    ]  # fmt: skip
    result, text = _invoke(args)
    assert result.exit_code == 0, text
    meta = read_lora(out / "ft.safetensors").metadata
    assert meta["ss_steps"] == str(math.ceil(3 * 2 / 2))  # 3 images x 2 repeats, batch 2, 1 epoch
    assert meta["ss_num_train_images"] == "6"
    # kohya names a fine-tuning subset by its metadata file; tag counts come from "tags" only, lower-cased
    assert json.loads(meta["ss_dataset_dirs"]) == {"meta.json": {"n_repeats": 2, "img_count": 3}}
    assert json.loads(meta["ss_tag_frequency"]) == {"meta.json": {"1girl": 1, "solo": 3, "smile": 1, "outdoors": 1}}


def test_in_json_in_a_training_toml_and_the_native_spelling(tmp_path, ft_data):
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f"pretrained_model_name_or_path = 'tiny:sd1'\nin_json = '{(ft_data / 'meta.json').as_posix()}'\n"
        f"train_data_dir = '{(ft_data / 'images').as_posix()}'\ndataset_repeats = 3\n"
        f"output_dir = '{tmp_path.as_posix()}'\nreg_data_dir = '{tmp_path.as_posix()}'\n",
        encoding="utf-8",
    )
    notes: list[str] = []
    o = load_options(LoraOptions, cfg, notes=notes)
    assert (o.metadata_file, o.data, o.dataset_repeats, o.reg_data) == (
        str(ft_data / "meta.json"),
        str(ft_data / "images"),
        3,
        None,
    )
    assert "in_json is given, so reg_data_dir is ignored (as in kohya's fine-tuning dataset)" in notes
    # sdcore's own flags, checked with --dry-run: the plan counts 3 images x 3 repeats
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(ft_data / "images"), "--metadata-file",
            str(ft_data / "meta.json"), "--dataset-repeats", "3", "--output", str(tmp_path / "o.safetensors"),
            "--resolution", "64", "--dry-run"]  # fmt: skip
    result, text = _invoke(args)
    assert result.exit_code == 0, text
    assert "3 training images (9 with repeats)" in text


def test_dataset_toml_metadata_file_subset_trains(tmp_path, ft_data):
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(
        "[general]\nshuffle_caption = true\nkeep_tokens = 1\n[[datasets]]\nresolution = 64\nbatch_size = 1\n"
        f"[[datasets.subsets]]\nimage_dir = '{(ft_data / 'images').as_posix()}'\n"
        f"metadata_file = '{(ft_data / 'meta.json').as_posix()}'\nnum_repeats = 1\n",
        encoding="utf-8",
    )
    out = tmp_path / "toml.safetensors"
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(dataset), "--output", str(out), "--rank", "2",
            "--max-steps", "1", "--no-progress"]  # fmt: skip
    result, text = _invoke(args)
    assert result.exit_code == 0, text
    assert out.exists() and "after 1 steps" in text


def test_missing_images_and_bad_options_are_preflight_problems_at_once(tmp_path, ft_data):
    meta = json.loads((ft_data / "meta.json").read_text())
    meta["lost"] = {"caption": "gone"}
    broken = tmp_path / "meta.json"
    broken.write_text(json.dumps(meta), encoding="utf-8")
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(ft_data / "images"), "--metadata-file",
            str(broken), "--dataset-repeats", "0", "--output", str(tmp_path / "o.safetensors")]  # fmt: skip
    result, text = _invoke(args)
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    assert "--dataset-repeats must be at least 1, got 0" in text
    assert f"{broken}: 1 listed image(s) not found in {ft_data / 'images'}: 'lost'" in text
    broken.write_text('{"img00": {"caption": "a"},}', encoding="utf-8")
    result, text = _invoke([*args[:-4], "--output", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2 and "invalid JSON" in text and str(broken) in text


def test_dataset_config_wins_over_in_json_as_in_kohya(tmp_path, ft_data):
    cfg = tmp_path / "train.toml"
    dataset = tmp_path / "d.toml"
    dataset.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{Path(ft_data).as_posix()}'\n")
    cfg.write_text(
        f"dataset_config = '{dataset.as_posix()}'\nin_json = 'meta.json'\npretrained_model_name_or_path = 'tiny:sd1'\n",
        encoding="utf-8",
    )
    notes: list[str] = []
    o = load_options(LoraOptions, cfg, notes=notes)
    assert o.data == str(dataset) and o.metadata_file is None
    assert "dataset_config is given, so in_json is ignored (as in kohya)" in notes


def test_dataset_repeats_with_a_folder_dataset_is_noted_and_unused(tmp_path):
    data = make_tiny_dataset(tmp_path / "folders", n=2, size=64, repeats=5)
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--dataset_repeats", "3", "--output",
            str(tmp_path / "o.safetensors"), "--resolution", "64", "--dry-run"]  # fmt: skip
    result, text = _invoke(args)
    assert result.exit_code == 0, text
    assert "--dataset-repeats 3 is not used: a folder dataset takes its repeats from the folder names" in text
    assert "2 training images (10 with repeats)" in text

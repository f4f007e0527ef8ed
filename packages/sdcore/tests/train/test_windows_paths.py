"""Configs written on Windows, read on Linux: kohya training TOML, kohya_ss GUI JSON, a ``train.bat``, a kohya dataset
TOML whose paths are Windows paths.

On Linux ``C:\\train\\img`` names nothing, and ``C:\\train\\out`` as an output would silently become a folder of that
name in the working directory; the contract is one problem per key naming the key, the path and that it is a Windows
path. A relative path with backslashes (``.\\data\\10_x``) is read with ``/`` when that exists. The files are written
here the way Windows tools write them (TOML literal strings, JSON ``\\\\`` escapes, cmd's ``^`` continuations).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sdcore.errors import ConfigError, DataError
from sdcore.testing.datasets import make_tiny_dataset
from sdcore.windows_paths import check_windows_path, windows_path_kind


def _load(config: Path, notes: list[str] | None = None):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    return load_options(LoraOptions, config, {}, notes=[] if notes is None else notes)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("C:\\train\\img", "drive"),
        ("C:/train/img", "drive"),
        ("d:\\models\\sd15.safetensors", "drive"),
        ("\\\\server\\share\\out", "share"),
        (".\\img", "relative"),
        ("img\\10_x", "relative"),
        ("\\train\\img", "root"),  # the current drive's root: not /train/img
        ("data/10_x", None),
        ("/data/img", None),
        ("mychar \\(smile\\), portrait", None),  # a prompt with A1111's escaped brackets
        ("\\", None),  # a separator, not a path
        ("tiny:sd1", None),
    ],
)
def test_windows_path_kind(value: str, kind: str | None) -> None:
    assert windows_path_kind(value) == kind


def test_kohya_training_toml_with_windows_paths_names_each_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "train.toml"
    config.write_text(  # literal strings as a Windows user writes them, and a basic string with escapes
        "pretrained_model_name_or_path = 'D:\\models\\sd15.safetensors'\n"
        'train_data_dir = "C:/train/img"\n'
        "output_dir = '\\\\server\\share\\out'\n"
        'output_name = "mychar"\nnetwork_module = "networks.lora"\nnetwork_dim = 4\nmax_train_steps = 2\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        _load(config)
    problems = info.value.problems
    assert any(
        "pretrained_model_name_or_path 'D:\\models\\sd15.safetensors'" in p and "drive letter" in p for p in problems
    )
    assert any("train_data_dir 'C:/train/img'" in p and "Windows path" in p for p in problems)
    assert any(p.startswith(f"{config}: output_dir '\\\\server\\share\\out") and "network share" in p for p in problems)
    assert not list(tmp_path.glob("*server*"))  # nothing written under a backslash name


def test_kohya_gui_json_with_backslash_escapes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "gui.json"
    gui = {
        "LoRA_type": "Standard", "pretrained_model_name_or_path": "tiny:sd1", "train_data_dir": "C:\\train\\img",
        "output_dir": "C:\\train\\out", "output_name": "mychar", "logging_dir": "C:\\train\\log", "reg_data_dir": "",
        "network_dim": 4, "network_alpha": 1, "max_train_steps": 2,
    }  # fmt: skip
    config.write_text(json.dumps(gui), encoding="utf-8")  # json writes each \ as \\, as the GUI does
    with pytest.raises(ConfigError) as info:
        _load(config)
    text = "\n".join(info.value.problems)
    for key, value in [("train_data_dir", "C:\\train\\img"), ("logging_dir", "C:\\train\\log")]:
        assert f"{key} '{value}' looks like a Windows path (a drive letter)" in text
    assert "output_dir 'C:\\train\\out" in text


def test_relative_backslash_path_is_read_with_slashes_when_it_exists(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_tiny_dataset(tmp_path / "data", n=2, size=64)
    config = tmp_path / "train.toml"
    config.write_text(
        "pretrained_model_name_or_path = 'tiny:sd1'\ntrain_data_dir = '.\\data'\noutput_dir = 'out'\n"
        "network_module = 'networks.lora'\nnetwork_dim = 4\nsample_prompts = 'mychar \\(smile\\)'\n",
        encoding="utf-8",
    )
    notes: list[str] = []
    options = _load(config, notes)
    assert options.data == "./data"
    assert options.sample_prompts == "mychar \\(smile\\)"  # a prompt is not a path
    assert any("train_data_dir '.\\data' is read as './data'" in n for n in notes)
    # kohya joins output_dir and output_name with "/": the output's folder exists, so it is read with "/"
    (tmp_path / "out").mkdir()
    config.write_text(config.read_text().replace("output_dir = 'out'", "output_dir = '.\\out'"), encoding="utf-8")
    assert _load(config).output.startswith("./out/")
    config.write_text(config.read_text().replace(".\\data", ".\\missing\\10_x"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"train_data_dir '\.\\missing\\10_x' looks like a Windows path \(backslash"):
        _load(config)


def test_bat_command_with_windows_paths(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    bat = tmp_path / "train.bat"
    bat.write_bytes(
        b"@echo off\r\nset DATA=C:\\train\\img\r\n"
        b"accelerate launch --num_cpu_threads_per_process 1 train_network.py ^\r\n"
        b'  --pretrained_model_name_or_path="tiny:sd1" --train_data_dir="%DATA%" ^\r\n'
        b'  --output_dir="D:\\lora" --output_name=x --network_module=networks.lora --network_dim=4\r\n'
    )
    with pytest.raises(ConfigError) as info:
        _load(bat)
    text = "\n".join(info.value.problems)
    assert "train_data_dir 'C:\\train\\img' looks like a Windows path" in text
    assert "output_dir 'D:\\lora" in text


def test_dataset_toml_with_windows_paths(tmp_path: Path, monkeypatch) -> None:
    from sdcore.data.dataset import load_toml_dataset_config

    monkeypatch.chdir(tmp_path)
    make_tiny_dataset(tmp_path / "img" / "10_x", n=2, size=64)
    toml = tmp_path / "dataset.toml"
    toml.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'C:\\train\\img'\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"subsets\[0\]: image_dir 'C:\\train\\img' looks like a Windows path"):
        load_toml_dataset_config(toml)
    toml.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '.\\img\\10_x'\n", encoding="utf-8")
    (subset,) = load_toml_dataset_config(toml)
    assert subset.image_dir == tmp_path / "img" / "10_x"


def test_a_posix_name_with_a_backslash_that_exists_is_kept(tmp_path: Path) -> None:
    (tmp_path / "a\\b").mkdir()
    assert check_windows_path("a\\b", "image_dir", (tmp_path,)).value == "a\\b"


def test_only_path_options_are_checked(tmp_path: Path, monkeypatch) -> None:
    """A regex, a separator, a prompt or free text with a backslash is not a Windows path: left as written."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "train.toml"
    config.write_text(
        'model = "tiny:sd1"\ndata = "data"\noutput = "out"\n'
        "layer_filter = 'attn1\\.to_q'\nlayer_filter_regex = true\n"  # OneTrainer's regex layer filter
        "caption_separator = '\\w'\n"  # would have become '/w' (its folder '/' exists)
        "training_comment = 'D:\\models\\sd15 + my set'\n"
        "metadata_description = 'img\\10_x'\n",
        encoding="utf-8",
    )
    notes: list[str] = []
    options = _load(config, notes)
    assert options.layer_filter == "attn1\\.to_q"
    assert options.caption_separator == "\\w"
    assert options.training_comment == "D:\\models\\sd15 + my set"
    assert options.metadata_description == "img\\10_x"
    assert not [n for n in notes if "Windows" in n]


def test_drive_root_path_is_refused_not_read_as_posix_root(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "train.toml"
    config.write_text('model = "tiny:sd1"\ndata = \'\\train\\img\'\noutput = "out"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        _load(config)
    assert "data '\\train\\img' looks like a Windows path (the root of a Windows drive)" in str(info.value)

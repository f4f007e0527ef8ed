"""``sdcore data preprocess --tagger wd14``: each output image is tagged, and merged with the old caption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image
from sdcore.cli import build_cli
from sdcore.plugins import get_plugin_manager
from sdplugin_taggers.wd14 import WD14Tagger
from wdmodels import TAGS, make_wd_model


def test_preprocess_captions_every_tile_with_the_tagger(tmp_path: Path) -> None:
    # "blue_sky" rises with brightness: 0.1 + 0.9 * mean/255, so white tiles get it and black ones do not
    weights = [0.9 if name == "blue_sky" else 0.0 for name, _, _ in TAGS]
    model = make_wd_model(tmp_path / "wd", weights=weights)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    array = np.zeros((200, 64, 3), dtype=np.uint8)
    array[:100] = 255
    Image.fromarray(array).save(src / "sky.png")
    (src / "sky.txt").write_text("my style\n", encoding="utf-8")

    cli = build_cli(get_plugin_manager())
    args = ["data", "preprocess", str(src), str(dst), "--width", "64", "--height", "64", "--split"]
    args += ["--captions", "prepend", "--tagger", "wd14", "--tagger-model", str(model)]
    dry = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert not dst.exists() and f"would write {dst / '00000-3-sky.txt'}" in dry.output

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    tiles = sorted(dst.glob("*.png"))
    assert [p.name for p in tiles] == [f"00000-{i}-sky.png" for i in range(4)]  # ceil((200 - 12.8) / 51.2)

    reference = WD14Tagger(model).tag([str(p) for p in tiles])  # the tagger run on the written files
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in tiles]
    assert captions == [f"my style {r.caption()}" for r in reference]
    assert "blue sky" in captions[0] and "blue sky" not in captions[-1]
    assert "wrote 4 image(s) and 4 caption(s)" in result.output


def test_preprocess_unknown_tagger_lists_installed_ones(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    cli = build_cli(get_plugin_manager())
    result = CliRunner().invoke(
        cli, ["data", "preprocess", str(tmp_path / "src"), str(tmp_path / "dst"), "--tagger", "wd15"]
    )
    assert result.exit_code == 2
    assert "available: " in result.output and "wd14" in result.output


def test_preprocess_bad_tagger_model_is_one_line_before_any_work(tmp_path: Path) -> None:
    src, empty = tmp_path / "src", tmp_path / "not-a-model"
    src.mkdir()
    empty.mkdir()
    Image.new("RGB", (32, 32)).save(src / "a.png")
    cli = build_cli(get_plugin_manager())
    args = ["data", "preprocess", str(src), str(tmp_path / "dst"), "--tagger", "wd14", "--tagger-model", str(empty)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "Error:" in result.output and "model.onnx" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "dst").exists()

"""The click commands end to end: options reach the caption files, summary and JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sdplugin_taggers.commands import wd14_command
from wdmodels import save_image


def run(*args: str):
    return CliRunner().invoke(wd14_command, [str(a) for a in args], catch_exceptions=False)


def test_wd14_writes_captions_and_summary(wd_v3: Path, image_dir: Path, tmp_path: Path) -> None:
    (image_dir / "sub").mkdir()
    save_image(image_dir / "sub" / "d.png")
    (image_dir / "bad.png").write_bytes(b"nope")
    out = tmp_path / "out.jsonl"
    result = run(image_dir, "--model-dir", wd_v3, "--providers", "cpu", "--json", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "provider: CPUExecutionProvider" in result.output
    assert "images found: 4, tagged: 3, skipped (caption exists): 0, unreadable: 1" in result.output
    assert "1girl" in result.output.split("top ")[1]
    caption = (image_dir / "a.txt").read_text(encoding="utf-8")
    assert caption == 'hatsune miku (vocaloid), 1girl, long hair, ^_^, don\'t say "lazy"\n'
    assert not (image_dir / "sub" / "d.txt").exists()
    assert not (image_dir / "bad.txt").exists()
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 3 and records[0]["general"]["1girl"] == 0.95
    assert records[0]["image_size"] == [16, 16]


def test_wd14_options_modes_and_recursive(wd_v3: Path, image_dir: Path) -> None:
    (image_dir / "sub").mkdir()
    save_image(image_dir / "sub" / "d.png")
    (image_dir / "a.txt").write_text("mine, long hair\n", encoding="utf-8")
    result = run(image_dir, "--model-dir", wd_v3, "--providers", "cpu", "--recursive", "--no-progress")
    assert "tagged: 3, skipped (caption exists): 1" in result.output
    assert (image_dir / "a.txt").read_text(encoding="utf-8") == "mine, long hair\n"
    assert (image_dir / "sub" / "d.txt").exists()
    run(image_dir, "--model-dir", wd_v3, "--providers", "cpu", "--mode", "append", "--mcut", "--no-progress")
    assert (image_dir / "a.txt").read_text(
        encoding="utf-8"
    ) == "mine, long hair, hatsune miku (vocaloid), other char, 1girl\n"
    args = ["--mode", "overwrite", "--underscores", "--escape", "--ratings", "last", "--max-tags", "2"]
    run(
        image_dir,
        "--model-dir",
        wd_v3,
        "--providers",
        "cpu",
        "--ext",
        ".caption",
        *args,
        "--include-first",
        "trig",
        "--exclude",
        "1girl",
        "--no-progress",
    )
    assert (image_dir / "a.caption").read_text(
        encoding="utf-8"
    ) == "trig, hatsune_miku_\\(vocaloid\\), long_hair, general\n"
    assert (image_dir / "a.txt").read_text(encoding="utf-8").startswith("mine")


@pytest.mark.parametrize("mode", ["overwrite", "append", "prepend", "skip"])
def test_include_first_opens_the_caption_in_every_mode(wd_v3: Path, image_dir: Path, mode: str) -> None:
    # issue 17: append wrote "..., green theme, mychar"; kohya's --keep_tokens needs the trigger first
    (image_dir / "a.txt").write_text("green theme, long hair\n", encoding="utf-8")
    (image_dir / "b.txt").write_text("mychar, green theme\n", encoding="utf-8")
    result = run(image_dir, "--model-dir", wd_v3, "--providers", "cpu", "--mode", mode, "--include-first", "mychar")
    assert result.exit_code == 0, result.output
    a = (image_dir / "a.txt").read_text(encoding="utf-8")
    if mode == "skip":
        assert a == "green theme, long hair\n"
    else:
        tags = a.strip().split(", ")
        assert tags[0] == "mychar" and tags.count("mychar") == 1, a
        if mode == "append":
            assert tags[1:3] == ["green theme", "long hair"]
    c = (image_dir / "c.txt").read_text(encoding="utf-8")  # no caption before: written in every mode
    assert c.startswith("mychar, "), c
    b = (image_dir / "b.txt").read_text(encoding="utf-8").strip().split(", ")
    assert b[0] == "mychar" and b.count("mychar") == 1


def test_wd14_errors_are_one_line(tmp_path: Path, image_dir: Path) -> None:
    (tmp_path / "model").mkdir()
    result = CliRunner().invoke(wd14_command, [str(image_dir), "--model-dir", str(tmp_path / "model")])
    assert result.exit_code == 1
    assert "Error:" in result.output and "model.onnx" in result.output and "Traceback" not in result.output


def test_progress_bar_is_shown(wd_v3: Path, image_dir: Path) -> None:
    result = CliRunner().invoke(wd14_command, [str(image_dir), "--model-dir", str(wd_v3), "--providers", "cpu"])
    assert result.exit_code == 0
    assert "3/3" in result.output and "img" in result.output


def test_command_module_is_import_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, sdplugin_taggers.commands, sdplugin_taggers.plugin;"
        "heavy = [m for m in ('torch', 'numpy', 'onnxruntime', 'PIL', 'transformers') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_a_kohya_dataset_root_without_recursive_says_to_add_it(wd_v3: Path, tmp_path: Path) -> None:
    # kohya's layout keeps the images in data/10_name/; tagging data/ itself found 0 images and exited 0
    # with nothing written. It stops (exit 1 as the tagger's other folder errors, one line) naming --recursive;
    # --recursive tags them.
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    root = tmp_path / "data"
    (root / "10_my char").mkdir(parents=True)
    save_image(root / "10_my char" / "a.png")
    cli = build_cli(get_plugin_manager())
    args = ["tag", "wd14", str(root), "--model-dir", str(wd_v3), "--providers", "cpu", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "no image directly in it, 1 in its sub-folders" in result.output and "--recursive" in result.output
    assert not (root / "10_my char" / "a.txt").exists()
    result = CliRunner().invoke(cli, [*args, "--recursive"])
    assert result.exit_code == 0, result.output
    assert (root / "10_my char" / "a.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["tag", "wd14", str(empty), "--model-dir", str(wd_v3), "--no-progress"])
    assert result.exit_code == 0 and "images found: 0" in result.output  # nothing anywhere: nothing to say


@pytest.mark.parametrize("mode", ["overwrite", "skip"])
def test_no_tag_above_the_threshold_writes_no_blank_caption(wd_v3: Path, image_dir: Path, mode: str) -> None:
    # sweep2: --mode overwrite with nothing above the threshold replaced a.txt by a blank line (the caption was
    # lost) and wrote blank b.txt/c.webp captions, which training reads as empty captions (kohya stops on them)
    (image_dir / "a.txt").write_text("mine, long hair\n", encoding="utf-8")
    args = ["--general-threshold", "1", "--character-threshold", "1", "--mode", mode, "--no-progress"]
    result = run(image_dir, "--model-dir", wd_v3, "--providers", "cpu", *args)
    assert result.exit_code == 0, result.output
    assert (image_dir / "a.txt").read_text(encoding="utf-8") == "mine, long hair\n"
    assert not (image_dir / "b.txt").exists() and not (image_dir / "c.txt").exists()
    blank = 3 if mode == "overwrite" else 2
    assert (
        f"no tag for {blank} image(s) (none above the threshold, or all excluded): no caption written" in result.output
    )


def test_output_files_that_are_inputs_are_refused_before_the_model_loads(
    wd_v3: Path, image_dir: Path, tmp_path: Path
) -> None:
    # sweep2: --json naming an image or a caption of the folder replaced it with JSONL after the run (exit 0)
    (image_dir / "a.txt").write_text("mine\n", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in image_dir.iterdir()}
    for target, what in [
        ("b.jpg", "the image"),
        ("a.txt", "the caption file of"),
        ("c.caption", "the caption file of"),
    ]:
        args = [
            image_dir,
            "--model-dir",
            wd_v3,
            "--providers",
            "cpu",
            "--ext",
            "caption" if "caption" in target else ".txt",
        ]
        result = CliRunner().invoke(wd14_command, [str(a) for a in [*args, "--json", image_dir / target]])
        assert result.exit_code == 1, result.output
        assert f"--json {image_dir / target} is {what}" in result.output and "give a file of its own" in result.output
        assert "model:" not in result.output  # found before the model loaded
    assert {p.name: p.read_bytes() for p in image_dir.iterdir()} == before
    nested = tmp_path / "kohya"
    save_image(nested / "10_x" / "a.png")
    result = CliRunner().invoke(wd14_command, [str(nested), "--model-dir", str(wd_v3), "--ext", "/"])
    assert result.exit_code == 1 and "model:" not in result.output
    assert (
        "no image directly in it, 1 in its sub-folders" in result.output
        and "invalid caption extension" in result.output
    )

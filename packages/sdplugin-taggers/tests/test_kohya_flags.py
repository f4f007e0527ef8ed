"""kohya's finetune/tag_images_by_wd14_tagger.py flags on ``sdcore tag wd14``: the same captions as sdcore's
spellings, kohya's meaning where the two differ (README "kohya's flags")."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from sdcore.errors import ConfigError
from sdplugin_taggers.commands import KOHYA_REPO_ID, wd14_command
from sdplugin_taggers.tags import parse_tag_replacement
from wdmodels import make_wd_model, save_image


def run(*args: object):
    return CliRunner().invoke(wd14_command, [str(a) for a in args], catch_exceptions=False)


def captions(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): p.read_text(encoding="utf-8")
        for p in sorted(folder.rglob("*"))
        if p.suffix not in (".png", ".jpg", ".webp") and p.is_file()
    }


def test_a_kohya_command_line_tags_as_the_sdcore_spelling_does(image_dir: Path, tmp_path: Path) -> None:
    (image_dir / "sub").mkdir()
    save_image(image_dir / "sub" / "d.png")
    kohya_dir, sdcore_dir = tmp_path / "kohya", tmp_path / "sdcore"
    shutil.copytree(image_dir, kohya_dir)
    shutil.copytree(image_dir, sdcore_dir)
    models = tmp_path / "wd14_tagger_model"  # kohya's layout: --model_dir holds <repo_id as a_b>
    make_wd_model(models / KOHYA_REPO_ID.replace("/", "_"))
    kohya = run(kohya_dir, "--model_dir", models, "--thresh", "0.45", "--character_threshold", "0.55",
                "--batch_size", "2", "--caption_extension", ".cap", "--undesired_tags", "long_hair,solo",
                "--use_rating_tags", "--character_tags_first", "--remove_underscore", "--recursive", "--onnx",
                "--max_data_loader_n_workers", "0", "--frequency_tags", "--debug", "--providers", "cpu",
                "--no-progress")  # fmt: skip
    assert kohya.exit_code == 0, kohya.output
    sdcore = run(sdcore_dir, "--model-dir", models / KOHYA_REPO_ID.replace("/", "_"), "--general-threshold",
                 "0.45", "--character-threshold", "0.55", "--batch-size", "2", "--ext", ".cap", "--exclude",
                 "long_hair,solo", "--ratings", "first", "--characters", "first", "--recursive", "--workers", "0",
                 "--providers", "cpu", "--no-progress")  # fmt: skip
    assert sdcore.exit_code == 0, sdcore.output
    assert captions(kohya_dir) == captions(sdcore_dir)
    # general 0.45 from --thresh; characters at their own 0.55: other_char (0.5) is out
    assert captions(kohya_dir)["a.cap"] == "general, hatsune miku (vocaloid), 1girl, ^_^\n"
    assert set(captions(kohya_dir)) == {"a.cap", "b.cap", "c.cap", "sub/d.cap"}
    assert "batch size 2, 0 decode workers" in kohya.stdout
    for flag in ("--onnx", "--frequency_tags", "--debug", "--remove_underscore"):
        assert f"note: {flag}:" in kohya.stderr
    assert "note:" not in sdcore.stderr


def test_kohya_meanings_always_first_replacement_separator_append(wd_v3: Path, image_dir: Path) -> None:
    args = [image_dir, "--model_dir", wd_v3, "--providers", "cpu", "--no-progress", "--caption_separator", "; ",
            "--tag_replacement", "1girl,1woman;don't_say_\"lazy\",quiet", "--always_first_tags",
            "long_hair,1woman,absent"]  # fmt: skip
    assert run(*args).exit_code == 0
    # kohya: --always_first_tags move the tags the caption has to its front (never add them), after the
    # replacements; the separator joins the tags
    assert (image_dir / "a.txt").read_text(encoding="utf-8") == (
        "long hair; 1woman; hatsune miku (vocaloid); ^_^; quiet\n"
    )
    (image_dir / "b.txt").write_text("mine; 1woman\n", encoding="utf-8")
    assert run(*args, "--append_tags").exit_code == 0
    # kohya's --append_tags: the tags there first (split on the separator), then the new ones in their order
    assert (image_dir / "b.txt").read_text(encoding="utf-8") == (
        "mine; 1woman; long hair; hatsune miku (vocaloid); ^_^; quiet\n"
    )


def test_kohya_hub_flags_give_the_offline_line(image_dir: Path, tmp_path: Path, wd_v3: Path) -> None:
    result = run(image_dir, "--model_dir", tmp_path / "models", "--repo_id", "SmilingWolf/wd-swinv2-tagger-v3")
    assert result.exit_code == 2
    where = tmp_path / "models" / "SmilingWolf_wd-swinv2-tagger-v3"
    assert (
        f"sdcore downloads nothing: get it once, online: hf download SmilingWolf/wd-swinv2-tagger-v3 model.onnx "
        f"selected_tags.csv --local-dir {where}, then --model-dir {where}" in result.output
    )
    result = run(image_dir, "--model_dir", wd_v3, "--force_download")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--force_download: sdcore downloads nothing: get it once, online: hf download {KOHYA_REPO_ID}" in (
        result.output
    )
    result = run(image_dir, "--model_dir", wd_v3, "--tag_replacement", "a,b;c;d,e,f")
    assert result.exit_code == 2 and "'c; d,e,f'" in result.output


def test_parse_tag_replacement_escapes() -> None:
    assert parse_tag_replacement(r"a\,b,A\,B;c\;d,CD;") == (("a,b", "A,B"), ("c;d", "CD"))
    with pytest.raises(ConfigError, match="source,target pairs"):
        parse_tag_replacement("only")


def test_kohya_flag_contradicting_sdcores_option_is_refused(wd_v3: Path, image_dir: Path) -> None:
    # sweep2: --append_tags --mode overwrite appended, --use_rating_tags --ratings off wrote the rating,
    # --remove_underscore --underscores kept underscores ...: one of the two won in silence
    args = [str(image_dir), "--model-dir", str(wd_v3), "--providers", "cpu", "--no-progress"]
    pairs = [
        ["--append_tags", "--mode", "overwrite"],
        ["--use_rating_tags", "--ratings", "off"],
        ["--character_tags_first", "--characters", "last"],
        ["--remove_underscore", "--underscores"],
        ["--caption_extension", ".cap", "--ext", ".txt"],
        ["--max_data_loader_n_workers", "2", "--workers", "0"],
    ]
    result = CliRunner().invoke(wd14_command, [*args, *[a for pair in pairs for a in pair]])
    assert result.exit_code == 2, result.output
    for said in (
        "--append_tags and --mode overwrite",
        "--use_rating_tags and --ratings off",
        "--character_tags_first and --characters last",
        "--remove_underscore and --underscores",
        "--caption_extension .cap and --ext .txt",
        "--max_data_loader_n_workers 2 and --workers 0",
    ):
        assert said in result.output
    assert not list(image_dir.glob("*.txt")) and not list(image_dir.glob("*.cap"))
    agreeing = ["--append_tags", "--mode", "append", "--use_rating_tags_as_last_tag", "--ratings", "last"]
    assert (
        CliRunner().invoke(wd14_command, [*args, *agreeing, "--caption_extension", "txt", "--ext", ".txt"]).exit_code
        == 0
    )

"""What a newcomer to ``sdcore data`` tripped on (kohya/A1111 layouts and habits)."""

from __future__ import annotations

from click.testing import CliRunner
from PIL import Image, ImageDraw
from sdcore.builtin.data_commands import data_group


def _circle(path, colour, size=96):
    image = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(image).ellipse((20, 20, 60, 60), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((size, size), Image.LANCZOS).save(path)


def test_dedupe_leaves_its_move_to_folder_inside_the_dataset_alone(tmp_path):
    """``--move-to data/dupes --yes`` run twice: the second run found the moved copy again under PATH, grouped it
    with its original and "moved" it into the same folder as ``copy-2.png`` (and a larger copy there would have
    been kept while the dataset's image moved out)."""
    data = tmp_path / "data"
    _circle(data / "10_x" / "a.png", "red")
    _circle(data / "10_x" / "copy.png", "red", size=64)
    (data / "10_x" / "copy.txt").write_text("x, red circle", encoding="utf-8")
    _circle(data / "10_x" / "b.png", "blue")
    dupes = data / "dupes"
    runner = CliRunner()
    first = runner.invoke(data_group, ["dedupe", str(data), "--move-to", str(dupes), "--yes"])
    assert first.exit_code == 0, first.output
    assert "1 duplicate image(s) moved" in first.output
    assert sorted(p.name for p in dupes.iterdir()) == ["copy.png", "copy.txt"]
    second = runner.invoke(data_group, ["dedupe", str(data), "--move-to", str(dupes), "--yes"])
    assert second.exit_code == 0, second.output
    assert "No near-duplicates found" in second.output and "moved" not in second.output
    assert sorted(p.name for p in dupes.iterdir()) == ["copy.png", "copy.txt"]
    assert sorted(p.name for p in (data / "10_x").iterdir()) == ["a.png", "b.png"]


def test_preprocess_of_a_kohya_dataset_root_says_to_name_a_sub_folder(tmp_path):
    """``sdcore data preprocess data out`` on kohya's ``data/10_x/`` layout wrote nothing, said
    "0 source image(s)" and exited 0; an empty SRC did the same. Both are now one error line, exit 2."""
    _circle(tmp_path / "data" / "10_x" / "a.png", "red")
    _circle(tmp_path / "data" / "10_x" / "b.png", "blue")
    runner = CliRunner()
    result = runner.invoke(data_group, ["preprocess", str(tmp_path / "data"), str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"SRC {tmp_path / 'data'}: no image directly in it, 2 in its sub-folders (10_x); " in result.output
    assert f"name a sub-folder, e.g. SRC {tmp_path / 'data' / '10_x'}" in result.output
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    result = runner.invoke(data_group, ["preprocess", str(tmp_path / "empty"), str(tmp_path / "out")])
    assert result.exit_code == 2 and f"SRC {tmp_path / 'empty'}: no image in it" in result.output
    result = runner.invoke(data_group, ["preprocess", str(tmp_path / "data" / "10_x"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000-0-a.png", "00001-0-b.png"]


def test_data_check_reads_kohya_spellings_and_names_sdcores_options(tmp_path):
    """``sdcore data check DIR --enable_bucket`` got click's "Did you mean '--no-buckets'?" (the opposite) and
    ``--min_bucket_reso 256`` a list of near spellings, where ``sdcore train`` takes kohya's spellings as they are."""
    _circle(tmp_path / "data" / "10_x" / "a.png", "red")
    runner = CliRunner()
    data = str(tmp_path / "data")
    result = runner.invoke(data_group, ["check", data, "--min_bucket_reso", "64", "--caption_extension", ".cap"])
    assert result.exit_code == 0, result.output
    assert "captions: 0 from files, 1 from class tokens" in result.output
    for typed, says in (
        ("--enable_bucket", "buckets are on by default"),
        ("--bucket_reso_steps", "kohya's bucket_reso_steps is --bucket-step"),
        ("--bucket_no_upscale", "kohya's bucket_no_upscale is --no-upscale"),
        ("--train_data_dir", "the dataset is the PATH argument"),
        ("--shuffle_caption", "a training option"),
    ):
        result = runner.invoke(data_group, ["check", data, typed])
        assert result.exit_code == 2
        assert f"No such option: {typed} ({says}" in result.output, result.output
        assert "Did you mean" not in result.output


def test_dedupe_refuses_a_move_to_that_is_the_dataset_itself(tmp_path):
    """``dedupe data --move-to data --yes`` said "1 duplicate image(s) moved to data" and only renamed the copy and
    its caption (``copy-2.png``, ``copy-2.txt``): it stayed in the dataset."""
    data = tmp_path / "data"
    _circle(data / "a.png", "red")
    _circle(data / "copy.png", "red", size=64)
    (data / "copy.txt").write_text("x, red circle", encoding="utf-8")
    for given in (str(data), str(data) + "/", str(tmp_path / "data" / ".")):
        result = CliRunner().invoke(data_group, ["dedupe", str(data), "--move-to", given, "--yes"])
        assert result.exit_code == 2, result.output
        assert f"--move-to {given} is PATH itself: the duplicates would stay in the dataset" in result.output
        assert f"e.g. --move-to {data / 'dupes'}" in result.output
    assert sorted(p.name for p in data.iterdir()) == ["a.png", "copy.png", "copy.txt"]

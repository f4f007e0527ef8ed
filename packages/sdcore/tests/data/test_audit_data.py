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

"""``sdcore data dedupe`` on two procedural sets (issue 17).

- distinct: shapes x colours x positions x backgrounds, colour variants of the same shape at the
  same place included: no group may form (a luminance hash alone grouped circles of six colours);
- near-duplicates: the same pictures resized, JPEG-recompressed and slightly cropped: each must
  land in one group with its original.
"""

from __future__ import annotations

import io
import itertools
import json

import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw
from sdcore.builtin.data_commands import data_group
from sdcore.data.dedupe import find_duplicates, list_images

SHAPES = ("circle", "square", "triangle", "bar")
COLOURS = ((220, 30, 30), (30, 160, 40), (40, 60, 220), (230, 200, 30), (150, 40, 170), (30, 190, 200), (20, 20, 20))
POSITIONS = ((0.3, 0.3), (0.7, 0.3), (0.5, 0.5), (0.3, 0.7), (0.7, 0.7))
BACKGROUNDS = ((245, 245, 240), (120, 130, 140))


def draw(shape: str, colour: tuple[int, int, int], pos: tuple[float, float], bg: tuple[int, int, int], size: int = 128):
    image = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(image)
    cx, cy, r = pos[0] * size, pos[1] * size, size * 0.17
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        d.polygon(((cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)), fill=colour)
    else:
        d.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=colour)
    return image


def distinct_set() -> list[tuple[str, Image.Image]]:
    out = []
    for (s, shape), (c, colour), (p, pos), (b, bg) in itertools.product(
        enumerate(SHAPES), enumerate(COLOURS), enumerate(POSITIONS), enumerate(BACKGROUNDS)
    ):
        if colour == bg:
            continue
        out.append((f"s{s}_c{c}_p{p}_b{b}.png", draw(shape, colour, pos, bg)))
    return out


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _crop(image: Image.Image, fraction: float) -> Image.Image:
    w, h = image.size
    dx, dy = round(w * fraction / 2), round(h * fraction / 2)
    return image.crop((dx, dy, w - dx, h - dy))


VARIANTS = {
    "half": lambda im: im.resize((64, 64), Image.Resampling.LANCZOS),
    "double": lambda im: im.resize((256, 256), Image.Resampling.BICUBIC),
    "jpeg70": lambda im: _jpeg(im, 70),
    "crop4": lambda im: _crop(im, 0.04),
    "crop6_jpeg85": lambda im: _jpeg(_crop(im, 0.06), 85),
}


@pytest.fixture(scope="module")
def distinct_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distinct")
    for name, image in distinct_set():
        image.save(folder / name)
    return folder


def test_distinct_set_has_no_false_groups(distinct_folder):
    paths = list_images(distinct_folder)
    assert len(paths) >= 250
    groups, unreadable = find_duplicates(paths)
    assert not unreadable
    assert groups == [], [(g.keep.name, [p.name for p in g.others]) for g in groups[:5]]


def test_colour_variants_of_one_circle_are_not_grouped(tmp_path):
    # the case: six circles of different colours, same place, same background
    for c, colour in enumerate(COLOURS[:6]):
        draw("circle", colour, (0.5, 0.5), BACKGROUNDS[0]).save(tmp_path / f"circle{c}.png")
    assert find_duplicates(list_images(tmp_path))[0] == []


def test_near_duplicates_are_grouped_with_their_original(tmp_path):
    originals = distinct_set()[::9]  # a spread of shapes, colours, places and backgrounds
    for name, image in originals:
        stem = name[:-4]
        image.save(tmp_path / name)
        for variant, make in VARIANTS.items():
            make(image).save(tmp_path / f"{stem}__{variant}.png")
    groups, _ = find_duplicates(list_images(tmp_path))
    by_stem = {g.keep.name.split("__")[0].removesuffix(".png"): g for g in groups}
    assert len(groups) == len(originals), [(g.keep.name, [p.name for p in g.others]) for g in groups]
    for name, _ in originals:
        group = by_stem[name[:-4]]
        members = {group.keep.name, *(p.name for p in group.others)}
        assert members == {name, *(f"{name[:-4]}__{v}.png" for v in VARIANTS)}


def test_move_to_lists_first_and_moves_only_with_yes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    image = draw("circle", COLOURS[0], (0.5, 0.5), BACKGROUNDS[0])
    image.save(data / "a.png")
    image.resize((64, 64)).save(data / "a_small.png")
    draw("circle", COLOURS[2], (0.5, 0.5), BACKGROUNDS[0]).save(data / "blue.png")
    runner = CliRunner()
    target = tmp_path / "dups"
    listed = runner.invoke(data_group, ["dedupe", str(data), "--move-to", str(target)])
    assert listed.exit_code == 0, listed.output
    assert "dup   a_small.png" in listed.output and "would be moved" in listed.output and "--yes" in listed.output
    assert (data / "a_small.png").exists() and not target.exists()
    as_json = json.loads(runner.invoke(data_group, ["dedupe", str(data), "--move-to", str(target), "--json"]).output)
    assert as_json["would_move"] == ["a_small.png"] and as_json["moved"] == []
    moved = runner.invoke(data_group, ["dedupe", str(data), "--move-to", str(target), "--yes"])
    assert moved.exit_code == 0 and "moved to" in moved.output
    assert not (data / "a_small.png").exists() and (target / "a_small.png").exists() and (data / "blue.png").exists()


def test_move_keeps_what_the_destination_holds(tmp_path):
    """A duplicate whose name (or its caption's) is taken in the destination gets the first number free for both:
    nothing there is replaced and the caption keeps the image's stem."""
    from sdcore.data.dedupe import DuplicateGroup, move_duplicates

    data, target = tmp_path / "data", tmp_path / "dups"
    data.mkdir()
    target.mkdir()
    (data / "a.png").write_bytes(b"keep")
    (data / "b.png").write_bytes(b"moved image")
    (data / "b.txt").write_text("moved caption")
    (target / "b.png").write_bytes(b"earlier image")
    (target / "b-2.txt").write_text("earlier caption")
    moved = dict(move_duplicates([DuplicateGroup(data / "a.png", (data / "b.png",), 0)], target).moved)
    assert moved[data / "b.png"] == target / "b-3.png" and (target / "b-3.png").read_bytes() == b"moved image"
    assert moved[data / "b.txt"] == target / "b-3.txt" and (target / "b-3.txt").read_text() == "moved caption"
    assert (target / "b.png").read_bytes() == b"earlier image" and (target / "b-2.txt").read_text() == "earlier caption"
    assert not (data / "b.png").exists() and not (data / "b.txt").exists()


def test_a_caption_shared_with_an_image_that_stays_is_copied_not_moved(tmp_path):
    """kohya reads ``a.txt`` for ``a.png`` and ``a.jpg`` alike: moving the duplicate ``a.jpg`` took ``a.txt`` with
    it, and the kept ``a.png`` trained uncaptioned (its caption now in the duplicates folder)."""
    from sdcore.data.dedupe import DuplicateGroup, move_duplicates

    data, target = tmp_path / "data", tmp_path / "dups"
    data.mkdir()
    (data / "a.png").write_bytes(b"keep")
    (data / "a.jpg").write_bytes(b"duplicate")
    (data / "a.txt").write_text("the caption of both")
    (data / "b.png").write_bytes(b"keep b")
    (data / "c.png").write_bytes(b"duplicate of b")
    (data / "c.txt").write_text("c's own caption")
    groups = [
        DuplicateGroup(data / "a.png", (data / "a.jpg",), 0),
        DuplicateGroup(data / "b.png", (data / "c.png",), 0),
    ]
    done = move_duplicates(groups, target)
    moved = dict(done.moved)
    assert (data / "a.txt").read_text() == "the caption of both"  # the kept image keeps its caption
    assert done.copied == [(data / "a.txt", target / "a.txt")] and data / "a.txt" not in moved
    assert (target / "a.txt").read_text() == "the caption of both"
    assert not (data / "a.jpg").exists() and (target / "a.jpg").read_bytes() == b"duplicate"
    assert not (data / "c.txt").exists() and (target / "c.txt").read_text() == "c's own caption"  # its own: moved


def test_json_lists_a_copied_caption_under_copied_not_moved(tmp_path):
    """``dedupe --json`` listed a caption that stays in the dataset (copied: the kept image reads it) under "moved",
    so a script taking "moved" as gone was wrong; it has its own key now."""
    data, target = tmp_path / "data", tmp_path / "dups"
    data.mkdir()
    image = draw("circle", COLOURS[0], (0.5, 0.5), BACKGROUNDS[0])
    image.save(data / "a.png")
    image.resize((64, 64)).save(data / "a.jpg", quality=95)  # the smaller duplicate: it moves
    (data / "a.txt").write_text("the caption of both")
    other = draw("square", COLOURS[2], (0.4, 0.6), BACKGROUNDS[1])
    other.save(data / "b.png")
    other.resize((64, 64)).save(data / "c.png")
    (data / "c.txt").write_text("c's own caption")
    args = ["dedupe", str(data), "--move-to", str(target), "--yes"]
    result = CliRunner().invoke(data_group, [*args, "--json"])
    assert result.exit_code == 0, result.output
    as_json = json.loads(result.output)
    moved = {(m["from"], m["to"]) for m in as_json["moved"]}
    assert moved == {(str(data / n), str(target / n)) for n in ("a.jpg", "c.png", "c.txt")}
    assert as_json["copied"] == [{"from": str(data / "a.txt"), "to": str(target / "a.txt")}]
    assert (data / "a.txt").is_file() and not (data / "c.txt").exists()
    empty = json.loads(CliRunner().invoke(data_group, ["dedupe", str(data), "--json"]).output)
    assert empty["moved"] == [] and empty["copied"] == []

"""``sdcore data preprocess``: A1111's preprocessing operations on tiny synthetic images."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sdcore.builtin.data_commands import data_group
from sdcore.data.preprocess import (
    PreprocessOptions,
    auto_size,
    focal_crop,
    merge_caption,
    preprocess,
    shi_tomasi_corners,
    split_boxes,
    split_ratio,
)
from sdcore.errors import ConfigError

from .conftest import noise_image, write_truncated_png


def run(*args: str) -> object:
    return CliRunner().invoke(data_group, ["preprocess", *args])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def textured_white(width: int, height: int, box: tuple[int, int, int, int], seed: int = 3) -> Image.Image:
    """White image with one noise-textured rectangle ``box`` = (x0, y0, x1, y1)."""
    array = np.full((height, width, 3), 255, dtype=np.uint8)
    x0, y0, x1, y1 = box
    rng = np.random.default_rng(seed)
    array[y0:y1, x0:x1] = rng.integers(0, 200, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
    return Image.fromarray(array)


# ------------------------------------------------------------------ default resize


def test_default_resize_keeps_the_centre(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    stripes = np.zeros((50, 150, 3), dtype=np.uint8)
    stripes[:, :50] = (255, 0, 0)
    stripes[:, 50:100] = (0, 255, 0)
    stripes[:, 100:] = (0, 0, 255)
    Image.fromarray(stripes).save(src / "stripes.png")
    noise_image(40, 90).save(src / "tall.png")

    report = preprocess(src, dst, PreprocessOptions(width=50, height=50))

    assert sorted(p.name for p in dst.iterdir()) == ["00000-0-stripes.png", "00001-0-tall.png"]
    assert report.sources == 2 and len(report.images_written) == 2 and not report.captions_written
    out = pixels(dst / "00000-0-stripes.png")
    assert out.shape == (50, 50, 3)
    inner = out[:, 3:-3].reshape(-1, 3).astype(int)  # away from the resampling seams
    assert (np.abs(inner - (0, 255, 0)) <= 2).all()  # the middle third only
    assert pixels(dst / "00001-0-tall.png").shape == (50, 50, 3)


# ------------------------------------------------------------------ split


def expected_split(iw: int, ih: int, w: int, h: int, overlap: float) -> tuple[tuple[int, int], list[tuple]]:
    """A1111's split written out: short side to the target, n tiles along the long side."""
    tall = ih > iw
    long_in, short_in = (ih, iw) if tall else (iw, ih)
    tile_short, tile_long = (w, h) if tall else (h, w)
    length = long_in * tile_short // short_in
    n = math.ceil((length - tile_long * overlap) / (tile_long * (1 - overlap)))
    starts = [int((length - tile_long) / (n - 1) * i) for i in range(n)]
    if tall:
        return (tile_short, length), [(0, s, tile_short, s + tile_long) for s in starts]
    return (length, tile_short), [(s, 0, s + tile_long, tile_short) for s in starts]


@pytest.mark.parametrize(
    ("size", "target", "overlap"),
    [((100, 370), (64, 64), 0.2), ((500, 120), (64, 48), 0.35), ((90, 400), (64, 96), 0.0), ((64, 300), (64, 64), 0.9)],
)
def test_split_boxes_follow_the_formula_and_cover_the_image(size, target, overlap) -> None:
    resized, boxes = split_boxes(size, *target, overlap)
    assert (resized, boxes) == expected_split(*size, *target, overlap)
    tall = size[1] > size[0]
    axis = 1 if tall else 0
    length = resized[axis]
    tile = target[axis]
    assert len(boxes) >= 2
    assert boxes[0][axis] == 0 and boxes[-1][axis + 2] == length  # first starts at 0, last ends at the edge
    for a, b in itertools.pairwise(boxes):
        assert a[axis + 2] - b[axis] >= math.floor(overlap * tile)  # neighbours overlap at least that much
        assert b[axis] > a[axis]
    for box in boxes:
        assert (box[2] - box[0], box[3] - box[1]) == target


def test_split_writes_the_tiles_and_respects_the_threshold(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    tall = noise_image(100, 370, seed=5)
    tall.save(src / "a_tall.png")
    noise_image(100, 160, seed=6).save(src / "b_mild.png")  # ratio 0.625 > 0.5: not split
    noise_image(600, 100, seed=7).save(src / "c_wide.png")

    preprocess(src, dst, PreprocessOptions(width=64, height=64, split=True))

    resized_size, boxes = expected_split(100, 370, 64, 64, 0.2)
    resized = np.asarray(tall.resize(resized_size))
    names = sorted(p.name for p in dst.iterdir())
    assert [n for n in names if n.startswith("00000-")] == [f"00000-{i}-a_tall.png" for i in range(len(boxes))]
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        np.testing.assert_array_equal(pixels(dst / f"00000-{i}-a_tall.png"), resized[y0:y1, x0:x1])
    assert [n for n in names if n.startswith("00001-")] == ["00001-0-b_mild.png"]
    assert split_ratio((100, 160), 64, 64)[0] == pytest.approx(0.625)
    wide = [n for n in names if n.startswith("00002-")]
    assert len(wide) == len(expected_split(600, 100, 64, 64, 0.2)[1]) == 8  # 384 px long: ceil(7.25)
    assert all(pixels(dst / n).shape == (64, 64, 3) for n in names)


def test_split_of_exactly_one_tile_does_not_divide_by_zero() -> None:
    # ratio just below 1 floors the long side to the tile length: one tile (A1111 divides by zero)
    resized, boxes = split_boxes((1000, 1001), 64, 64, 0.2)
    assert resized == (64, 64) and boxes == [(0, 0, 64, 64)]


# ------------------------------------------------------------------ focal crop


@pytest.mark.parametrize(
    ("size", "box", "weights"),
    [
        ((600, 200), (450, 70, 510, 130), (0.15, 0.5)),
        ((600, 200), (40, 20, 100, 80), (0.15, 0.5)),
        ((600, 200), (450, 70, 510, 130), (1.0, 0.0)),  # entropy alone
        ((600, 200), (450, 70, 510, 130), (0.0, 1.0)),  # edges alone
        ((240, 720), (60, 500, 120, 560), (0.15, 0.5)),  # portrait
    ],
)
def test_focal_crop_contains_the_detail(size, box, weights) -> None:
    image = textured_white(*size, box)
    crop = focal_crop(image, 200, 200, entropy_weight=weights[0], edges_weight=weights[1])
    assert crop.size == (200, 200)
    # scale = 200 / short side; the textured square must be whole in the crop
    scale = 200 / min(size)
    side = round((box[2] - box[0]) * scale)
    dark = (np.asarray(crop) < 250).any(axis=2)
    assert dark.sum() >= 0.9 * side * side
    # and a centred crop would have missed it (the test means something)
    centre_x = (size[0] * scale - 200) / 2
    centre_y = (size[1] * scale - 200) / 2
    bx0, by0, bx1, by1 = (v * scale for v in box)
    assert bx1 <= centre_x or bx0 >= centre_x + 200 or by1 <= centre_y or by0 >= centre_y + 200


def test_shi_tomasi_finds_the_four_corners_of_a_square() -> None:
    grey = np.zeros((80, 100), dtype=np.uint8)
    grey[20:60, 30:70] = 255  # corners at (30, 20), (69, 20), (30, 59), (69, 59)
    corners = shi_tomasi_corners(grey, min_distance=10)
    assert len(corners) == 4
    for cx, cy in ((30, 20), (69, 20), (30, 59), (69, 59)):
        assert min(abs(x - cx) + abs(y - cy) for x, y in corners) <= 2
    assert shi_tomasi_corners(np.full((40, 40), 7, dtype=np.uint8)) == []  # flat: nothing
    stripes = np.zeros((40, 40), dtype=np.uint8)
    stripes[:, 20:] = 255  # a straight edge is no corner
    assert shi_tomasi_corners(stripes) == []


def test_focal_crop_skips_square_images_and_writes_target_size(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    textured_white(300, 100, (240, 30, 290, 80)).save(src / "wide.png")
    noise_image(80, 80).save(src / "square.png")
    preprocess(src, dst, PreprocessOptions(width=64, height=64, focal_crop=True))
    names = sorted(p.name for p in dst.iterdir())
    assert names == ["00000-0-square.png", "00001-0-wide.png"]  # square: plain resize
    out = pixels(dst / "00001-0-wide.png")
    assert out.shape == (64, 64, 3) and (out < 250).any(axis=2).sum() > 0.5 * (50 * 64 / 100) ** 2


# ------------------------------------------------------------------ auto-size


def brute_force_size(iw, ih, lo, hi, amin, amax, objective, threshold):
    best = None
    for w in range(lo, hi + 1, 64):
        for h in range(lo, hi + 1, 64):
            a = (iw / ih) / (w / h)
            err = 1 - min(a, 1 / a)
            if amin <= w * h <= amax and err <= threshold:
                key = (w * h, -err) if objective == "area" else (-err, w * h)
                if best is None or key > best[0]:
                    best = (key, (w, h))
    return best and best[1]


@pytest.mark.parametrize("objective", ["area", "error"])
@pytest.mark.parametrize("size", [(1000, 600), (600, 1000), (777, 500), (512, 512)])
def test_auto_size_search(size, objective) -> None:
    got = auto_size(size, min_dim=384, max_dim=768, min_area=4096, max_area=409600, objective=objective, threshold=0.09)
    assert got == brute_force_size(*size, 384, 768, 4096, 409600, objective, 0.09)
    if size == (1000, 600):
        assert got == ((768, 448) if objective == "area" else (640, 384))


def test_auto_size_writes_that_size_and_counts_misfits(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    noise_image(1000, 600).save(src / "fits.png")
    noise_image(1000, 300).save(src / "too_wide.png")  # aspect 3.3: nothing within 0.1
    report = preprocess(src, dst, PreprocessOptions(auto_size=True))
    assert [p.name for p in dst.iterdir()] == ["00000-0-fits.png"]
    with Image.open(dst / "00000-0-fits.png") as image:
        assert image.size == (768, 448)
    assert report.no_auto_size == [src / "too_wide.png"]
    assert "1 with no auto-size" in report.summary()


# ------------------------------------------------------------------ flip, names, captions, bad files


def test_flip_copies_are_exact_mirrors(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    noise_image(64, 200, seed=2).save(src / "x.png")
    preprocess(src, dst, PreprocessOptions(width=64, height=64, split=True, flip=True))
    names = sorted(p.name for p in dst.iterdir())
    n_tiles = len(expected_split(64, 200, 64, 64, 0.2)[1])
    assert names == sorted(f"00000-{i}-x.png" for i in range(2 * n_tiles))
    for i in range(0, 2 * n_tiles, 2):
        original, mirrored = pixels(dst / f"00000-{i}-x.png"), pixels(dst / f"00000-{i + 1}-x.png")
        np.testing.assert_array_equal(mirrored, original[:, ::-1])
        assert not np.array_equal(original, mirrored)


def test_vertical_and_both_flips_follow_each_output(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    noise_image(48, 48, seed=8).save(src / "x.png")
    preprocess(src, dst, PreprocessOptions(width=48, height=48, flip=True, flip_vertical=True, flip_both=True))
    assert sorted(p.name for p in dst.iterdir()) == [f"00000-{i}-x.png" for i in range(4)]
    original = pixels(dst / "00000-0-x.png")
    np.testing.assert_array_equal(pixels(dst / "00000-1-x.png"), original[:, ::-1])
    np.testing.assert_array_equal(pixels(dst / "00000-2-x.png"), original[::-1, :])
    np.testing.assert_array_equal(pixels(dst / "00000-3-x.png"), original[::-1, ::-1])


@pytest.mark.parametrize(
    ("mode", "generated", "existing", "expected"),
    [
        ("ignore", "", "old tags\n", ""),
        ("ignore", "new", "old", "new"),
        ("copy", "new", "old\n", "old"),
        ("copy", "new", None, "new"),
        ("prepend", "new", "old", "old new"),
        ("append", "new", "old", "new old"),
        ("prepend", "", "old", "old"),
        ("append", "new", "  ", "new"),
    ],
)
def test_merge_caption(mode, generated, existing, expected) -> None:
    assert merge_caption(mode, generated, existing) == expected


def test_caption_files_follow_the_mode(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    noise_image(64, 64).save(src / "a.png")
    (src / "a.txt").write_text("1girl, solo\n", encoding="utf-8")
    noise_image(64, 64, seed=4).save(src / "b.png")  # no caption file
    for mode, expected in (("ignore", None), ("copy", "1girl, solo"), ("prepend", "1girl, solo")):
        dst = tmp_path / mode
        preprocess(src, dst, PreprocessOptions(width=32, height=32, flip=True, captions=mode))
        for sub in (0, 1):
            caption = dst / f"00000-{sub}-a.txt"
            assert (caption.read_text(encoding="utf-8") if caption.exists() else None) == expected
        assert not list(dst.glob("00001-*.txt"))


def test_captioner_sees_every_output_and_merges(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    noise_image(64, 64).save(src / "a.png")
    (src / "a.txt").write_text("old", encoding="utf-8")
    seen: list[tuple[int, int]] = []

    def captioner(images: list[Image.Image]) -> list[str]:
        seen.extend(im.size for im in images)
        return [f"w{im.width}" for im in images]

    preprocess(src, dst, PreprocessOptions(width=32, height=48, flip=True, captions="append"), captioner=captioner)
    assert seen == [(32, 48), (32, 48)]
    assert (dst / "00000-0-a.txt").read_text(encoding="utf-8") == "w32 old"
    assert (dst / "00000-1-a.txt").read_text(encoding="utf-8") == "w32 old"


def test_bad_files_are_skipped_and_counted(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    write_truncated_png(src / "a_broken.png")
    (src / "b_fake.jpg").write_text("not a jpeg", encoding="utf-8")
    (src / "notes.md").write_text("hello", encoding="utf-8")
    (src / "sub").mkdir()
    noise_image(64, 64).save(src / "sub" / "nested.png")  # not recursive, as A1111
    noise_image(64, 64).save(src / "c_good.png")
    report = preprocess(src, dst, PreprocessOptions(width=32, height=32))
    assert [p.name for p in dst.iterdir()] == ["00002-0-c_good.png"]  # bad files keep their index
    assert [p.name for p, _ in report.unreadable] == ["a_broken.png", "b_fake.jpg"]
    assert report.not_images == [src / "notes.md"]
    assert report.summary() == (
        "preprocess: 1 source image(s), wrote 1 image(s) and 0 caption(s); skipped 2 unreadable, 1 non-image file(s)"
    )


def test_bad_options_raise_every_problem_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        preprocess(
            tmp_path / "missing",
            tmp_path / "dst",
            PreprocessOptions(width=0, overlap_ratio=0.95, auto_size=True, auto_size_max_dim=100, captions="x"),
        )
    text = str(info.value)
    for needle in ("no such folder", "--width 0", "--overlap-ratio", "--auto-size-max-dim 100", "--captions"):
        assert needle in text
    assert not (tmp_path / "dst").exists()


# ------------------------------------------------------------------ CLI


def test_cli_runs_lists_and_reports(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    noise_image(64, 200).save(src / "x.png")
    (src / "x.txt").write_text("tags", encoding="utf-8")

    dry = run(str(src), str(dst), "--width", "64", "--height", "64", "--split", "--captions", "copy", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert not dst.exists()
    assert f"would write {dst / '00000-0-x.png'}" in dry.output
    assert f"would write {dst / '00000-0-x.txt'}" in dry.output

    real = run(str(src), str(dst), "--width", "64", "--height", "64", "--split", "--captions", "copy")
    assert real.exit_code == 0, real.output
    tiles = len(expected_split(64, 200, 64, 64, 0.2)[1])
    assert f"wrote {tiles} image(s) and {tiles} caption(s)" in real.output
    assert len(list(dst.glob("*.png"))) == tiles and not list(dst.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("make_args", "needles"),
    [
        (lambda s, t: [str(s / "missing"), str(t)], ["no such folder"]),
        (lambda s, t: [str(s), str(s)], ["is SRC"]),
        (lambda s, t: [str(s), str(s / "out")], ["inside SRC"]),
        (
            lambda s, t: [str(s), str(t), "--split-threshold", "2", "--focal-edges-weight", "-1", "--height", "4"],
            ["--split-threshold 2.0", "--focal-edges-weight -1.0", "--height 4"],
        ),
        (lambda s, t: [str(s), str(t), "--tagger", "no-such-tagger"], ["no such tagger", "needs --tagger-model"]),
        (lambda s, t: [str(s), str(t), "--tagger-model", str(s)], ["needs --tagger NAME"]),
    ],
)
def test_cli_problems_exit_2_without_traceback(tmp_path: Path, make_args, needles) -> None:
    src = tmp_path / "src"
    src.mkdir()
    noise_image(32, 32).save(src / "a.png")
    result = run(*make_args(src, tmp_path / "dst"))
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "dst").exists() and not (src / "out").exists()

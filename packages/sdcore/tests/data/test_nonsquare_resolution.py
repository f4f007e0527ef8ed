"""kohya's non-square resolution (``resolution = [768, 512]`` / ``"768,512"``) trains as kohya trains it.

kohya keeps the pair: ``make_bucket_resolutions(max_reso=(w, h))`` builds the buckets on ``max_area = w * h``,
``bucket_no_upscale`` shrinks images above that area, and with buckets off its bucket manager has the one
predefined resolution ``(w, h)``, so every image covers it and is cropped to exactly ``w`` x ``h``. The side of the
same area (``isqrt(w * h)``) squared is a smaller area, which loses e.g. the 768x512 bucket.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image
from sdcore.data.buckets import assign_bucket, make_buckets, square_assignment
from sdcore.data.dataset import assign_buckets, build_dataset_index, load_toml_dataset_config
from sdcore.train.options import TrainOptions


def kohya_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """kohya's documented rule (library/model_util.py make_bucket_resolutions), written out here: the area is
    ``w * h``; the square bucket is ``int(sqrt(area) // divisible) * divisible``; each width from ``min_size`` to
    ``max_size`` (in steps) pairs with ``min(max_size, (area // width) // divisible * divisible)`` and its
    transpose when that height is at least ``min_size``."""
    area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((area // width) // divisible) * divisible)
        if height >= min_size:
            resos.update({(width, height), (height, width)})
        width += divisible
    return sorted(resos)


@pytest.mark.parametrize("size", [(768, 512), (512, 768), (1024, 768), (640, 448)])
def test_buckets_of_a_non_square_resolution_are_kohyas(size):
    assert make_buckets(size) == kohya_bucket_resolutions(size)


def test_768x512_keeps_its_own_bucket_that_the_square_side_loses():
    side = math.isqrt(768 * 512)  # 627: the side sdcore used to train at
    assert (768, 512) in make_buckets((768, 512)) and (512, 768) in make_buckets((768, 512))
    assert (768, 512) not in make_buckets(side)  # 627**2 // 768 = 511 -> 448
    assert (576, 576) in make_buckets((768, 512)) and (576, 576) in make_buckets(side)  # the square bucket: same
    # a 3:2 image lands in it
    assert assign_bucket((900, 600), make_buckets((768, 512)), resolution=(768, 512)).bucket == (768, 512)


def test_a_square_pair_is_the_side():
    assert make_buckets((512, 512)) == make_buckets(512)
    assert square_assignment((300, 200), (512, 512)) == square_assignment((300, 200), 512)
    for image in ((1000, 1000), (2000, 900), (300, 700)):
        assert assign_bucket(image, (), no_upscale=True, resolution=(640, 640)) == assign_bucket(
            image, (), no_upscale=True, resolution=640
        )


def test_buckets_off_crops_to_exactly_w_by_h():
    """kohya, enable_bucket false: BucketManager's one predefined reso (768, 512); the 1:1 image is wider than
    nothing, so its width is scaled to 768 (768x768) and the height center-cropped to 512."""
    got = square_assignment((1000, 1000), (768, 512))
    assert (got.bucket, got.resized, got.crop) == ((768, 512), (768, 768), (0, 128))
    wide = square_assignment((2000, 1000), (768, 512))  # wider than 3:2: height to 512, width cropped
    assert (wide.bucket, wide.resized, wide.crop) == ((768, 512), (1024, 512), (128, 0))


def test_no_upscale_area_is_w_times_h():
    """kohya's select_bucket without upscaling: an image within ``max_area = w * h`` is not resized at all, its
    sides only rounded down to the step. 771x510 (393210 px) is within 768*512 = 393216 but over 627**2."""
    own = assign_bucket((771, 510), (), no_upscale=True, resolution=(768, 512))
    assert (own.resized, own.bucket) == ((771, 510), (768, 448))
    side = assign_bucket((771, 510), (), no_upscale=True, resolution=math.isqrt(768 * 512))
    assert side.resized != (771, 510)  # the smaller area shrank it: the pair is what changes the result


def _image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 40, 200)).save(path)


def _toml(tmp_path: Path, body: str) -> Path:
    _image(tmp_path / "imgs" / "wide.png", (900, 600))
    _image(tmp_path / "imgs" / "square.png", (1000, 1000))
    path = tmp_path / "dataset.toml"
    path.write_text(body + "\n  [[datasets.subsets]]\n  image_dir = 'imgs'\n", encoding="utf-8")
    return path


def _buckets(tmp_path: Path, config: Path) -> dict[str, tuple[int, int]]:
    index = build_dataset_index(TrainOptions(data=str(config), resolution=512))
    return {e.path.name: a.bucket for e, a in zip(index.entries, assign_buckets(index), strict=True)}


def test_a_dataset_toml_with_768x512_trains_in_kohyas_buckets(tmp_path):
    config = _toml(tmp_path, "[general]\nresolution = [768, 512]\n[[datasets]]\nenable_bucket = true")
    (subset,) = load_toml_dataset_config(config)
    assert (subset.resolution, subset.resolution_size) == (627, (768, 512))  # the side stays the int everywhere
    assert _buckets(tmp_path, config) == {"wide.png": (768, 512), "square.png": (576, 576)}


def test_a_dataset_toml_with_768x512_and_buckets_off_crops_to_768x512(tmp_path):
    config = _toml(tmp_path, "[[datasets]]\nresolution = [768, 512]\nenable_bucket = false")
    assert _buckets(tmp_path, config) == {"wide.png": (768, 512), "square.png": (768, 512)}


def test_a_datasets_own_resolution_replaces_generals_pair_and_a_square_pair_is_the_side(tmp_path):
    config = _toml(tmp_path, "[general]\nresolution = [768, 512]\n[[datasets]]\nresolution = 640")
    (subset,) = load_toml_dataset_config(config)
    assert (subset.resolution, subset.resolution_size) == (640, None)
    square = _toml(tmp_path, "[[datasets]]\nresolution = [640, 640]")
    (subset,) = load_toml_dataset_config(square)
    assert (subset.resolution, subset.resolution_size) == (640, None)


def test_the_runs_pair_reaches_folder_subsets_and_a_resolution_list_drops_it(tmp_path):
    _image(tmp_path / "data" / "1_sks" / "wide.png", (900, 600))
    o = TrainOptions(data=str(tmp_path / "data"), resolution=627, resolution_size=(768, 512))
    index = build_dataset_index(o)
    assert index.entries[0].subset.resolution_size == (768, 512)
    assert assign_buckets(index)[0].bucket == (768, 512)
    # the Python API replacing the side alone: the side wins (no stale pair); a --resolutions list trains squares
    for stale in (
        TrainOptions(data=o.data, resolution=512, resolution_size=(768, 512)),
        TrainOptions(data=o.data, resolution=627, resolution_size=(768, 512), resolutions="512,768"),
    ):
        assert {e.subset.resolution_size for e in build_dataset_index(stale).entries} == {None}


def test_data_check_reads_resolution_w_h_as_the_run_does(tmp_path):
    import json

    from click.testing import CliRunner
    from sdcore.builtin.data_commands import data_group

    _image(tmp_path / "data" / "1_sks" / "wide.png", (900, 600))
    args = ["check", str(tmp_path / "data"), "--json"]
    result = CliRunner().invoke(data_group, [*args, "--resolution", "768,512"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["buckets"] == {"768x512": 1}
    bad = CliRunner().invoke(data_group, [*args, "--resolution", "768x512"])
    assert bad.exit_code == 2 and "resolution must be a side (512) or W,H (768,512)" in bad.output


def test_a_subset_resolution_set_on_its_own_replaces_the_runs_pair(tmp_path):
    """Readers (ai-toolkit, SimpleTuner, diffusers) build subsets from the run's defaults and set their own
    ``resolution``: the run's kohya pair (``--resolution 768,512``) must not survive beside it and decide the
    buckets, the crop (buckets off) or the metadata."""
    from dataclasses import replace

    from sdcore.data.dataset import SubsetOptions, subset_defaults

    options = TrainOptions(data=str(tmp_path), resolution=627, resolution_size=(768, 512))
    base = SubsetOptions(image_dir=tmp_path, **subset_defaults(options))
    assert base.bucket_resolution == (768, 512)
    own = replace(base, resolution=1024)
    assert own.bucket_resolution == 1024
    assert replace(own, buckets=False).bucket_resolution == 1024
    assert square_assignment((2000, 2000), own.bucket_resolution).bucket == (1024, 1024)

from __future__ import annotations

import json

import click
import numpy as np
from click.testing import CliRunner
from PIL import Image
from sdcore.builtin.data_commands import data_group, sdcore_register_commands
from sdcore.data.check import check_dataset
from sdcore.data.dedupe import dhash, find_duplicates, list_images
from sdcore.train.options import TrainOptions


def test_check_report_lists_every_problem(messy_dataset):
    opts = TrainOptions(resolution=64, min_bucket_reso=64, max_bucket_reso=128, batch_size=2)
    report = check_dataset(messy_dataset["root"], opts)
    assert report.images == 9 and report.instance_images == 9 and report.class_images == 0
    assert report.samples_per_epoch == 41
    assert {p.split("/")[-1] for p, _ in report.skipped} == messy_dataset["skipped"]
    assert report.missing_captions == ["direct.png"]
    assert report.empty_captions == ["5_sks dog/empty.png"]
    assert "5_sks dog/nocap.png" in report.class_token_captions
    assert report.captions_from_files == 1  # only good.png has a caption file
    assert len(report.class_token_captions) == 6
    assert [p for p, _ in report.upscaled] == ["5_sks dog/sixteen.png", "5_sks dog/tiny.png"]  # 48x16, 10x10
    assert sum(report.buckets.values()) == 9
    assert report.batches_per_epoch >= 41 // 2
    assert report.tag_frequencies["sks dog"] == 8  # 1 caption file + 6 class-token + 1 empty file (class tokens)
    assert report.images_per_tag["sitting"] == ["5_sks dog/good.png"]
    assert not report.ok and report.problems == 6 + 1 + 1 + 2
    text = report.to_text()
    for needle in ("truncated.jpg", "bomb.png", "fake.jpg", "direct.png", "empty.png", "tiny.png", "skipped files (6)"):
        assert needle in text
    data = report.to_dict()
    json.dumps(data)
    assert data["captions"] == {"from_files": 1, "from_file_names": 0, "from_class_tokens": 6, "missing": 1, "empty": 1}


def test_cli_check_json_and_text(messy_dataset):
    runner = CliRunner()
    root = str(messy_dataset["root"])
    result = runner.invoke(
        data_group,
        ["check", root, "--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["images"] == 9 and len(data["skipped"]) == 6
    assert any("decompression bomb" in s["reason"] for s in data["skipped"])
    strict = runner.invoke(
        data_group,
        ["check", root, "--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--strict"],
    )
    assert strict.exit_code == 1 and "problem(s) found" in strict.output
    no_up = runner.invoke(
        data_group,
        [
            "check",
            root,
            "--resolution",
            "64",
            "--bucket-step",
            "16",
            "--min-bucket-reso",
            "64",
            "--max-bucket-reso",
            "128",
            "--no-upscale",
            "--json",
        ],
    )
    assert any(s["path"].endswith("tiny.png") for s in json.loads(no_up.output)["skipped"])


def test_cli_check_empty_dataset_fails(tmp_path):
    result = CliRunner().invoke(data_group, ["check", str(tmp_path)])
    assert result.exit_code == 1 and "no usable training images" in result.output


def test_clean_dataset_is_ok(tmp_path):
    from sdcore.testing.datasets import make_tiny_dataset

    make_tiny_dataset(tmp_path, n=3, size=64, repeats=2)
    report = check_dataset(tmp_path, TrainOptions(resolution=64, min_bucket_reso=64, max_bucket_reso=128))
    assert report.ok and report.images == 3 and report.samples_per_epoch == 6
    assert report.buckets == {"64x64": 3}
    assert "OK: no problems found" in report.to_text()


def test_command_registration():
    cli = click.Group()
    sdcore_register_commands(cli)
    assert cli.commands["data"] is data_group
    assert set(data_group.commands) == {"check", "dedupe", "preprocess"}


# ------------------------------------------------------------------------------------- dedupe


def _scene(seed: int, size: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)


def test_dhash_survives_resize_and_jpeg(tmp_path):
    _scene(1).save(tmp_path / "a.png")
    _scene(1).resize((64, 64)).save(tmp_path / "b.jpg", quality=70)
    _scene(2).save(tmp_path / "c.png")
    ha, hb, hc = (dhash(tmp_path / n) for n in ("a.png", "b.jpg", "c.png"))
    assert bin(ha ^ hb).count("1") <= 6
    assert bin(ha ^ hc).count("1") > 12


def test_dedupe_groups_and_moves_only_when_asked(tmp_path):
    data = tmp_path / "data" / "1_x"
    data.mkdir(parents=True)
    _scene(1).save(data / "big.png")
    (data / "big.txt").write_text("a", encoding="utf-8")
    _scene(1).resize((48, 48)).save(data / "small.png")
    (data / "small.txt").write_text("b", encoding="utf-8")
    _scene(2).save(data / "other.png")
    (data / "broken.png").write_text("nope", encoding="utf-8")
    groups, unreadable = find_duplicates(list_images(tmp_path / "data"))
    assert len(groups) == 1 and groups[0].keep.name == "big.png" and [p.name for p in groups[0].others] == ["small.png"]
    assert [p.name for p, _ in unreadable] == ["broken.png"]

    runner = CliRunner()
    listed = runner.invoke(data_group, ["dedupe", str(tmp_path / "data")])
    assert listed.exit_code == 0 and "dup   1_x/small.png" in listed.output and "nothing moved" in listed.output
    assert (data / "small.png").exists()

    moved_to = tmp_path / "dups"
    result = runner.invoke(
        data_group, ["dedupe", str(tmp_path / "data"), "--move-to", str(moved_to), "--yes", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["groups"][0]["duplicates"] == ["1_x/small.png"]
    assert not (data / "small.png").exists() and not (data / "small.txt").exists()
    assert (moved_to / "small.png").exists() and (moved_to / "small.txt").read_text(encoding="utf-8") == "b"
    assert (data / "big.png").exists() and (data / "other.png").exists()


def _toml_dataset(tmp_path, *batch_sizes: int, images: int = 4):
    """A kohya dataset TOML with one [[datasets]] per batch size, over one folder of 64px images."""
    from sdcore.testing.datasets import make_tiny_dataset

    make_tiny_dataset(tmp_path, n=images, size=64)
    lines = []
    for size in batch_sizes:
        lines += ["[[datasets]]", "resolution = 64", f"batch_size = {size}"]
        lines += ["  [[datasets.subsets]]", f"  image_dir = '{(tmp_path / '1_sks').as_posix()}'"]
    path = tmp_path / "dataset.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_cli_check_counts_batches_at_the_dataset_toml_batch_size(tmp_path):
    """A run batches at the TOML's batch_size (kohya reads it before --train_batch_size); data check
    counted at --batch-size, so the two disagreed."""
    from sdcore.train.config import load_options
    from sdcore.train.data import build_train_data

    toml = _toml_dataset(tmp_path, 2, images=4)
    args = ["check", toml, "--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "128"]
    result = CliRunner().invoke(data_group, [*args, "--batch-size", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    # 4 images of one bucket at batch size 2: ceil(4 / 2) batches, as the run's own plan
    assert data["batch_size"] == 2 and data["batches_per_epoch"] == 2
    assert any("batch size 2 from" in note for note in data["notes"]), data["notes"]
    run = load_options(TrainOptions, overrides={"data": toml, "resolution": 64, "min_bucket_reso": 64}, notes=[])
    assert len(build_train_data(run, balance_class=False).epoch_plan(0)) == data["batches_per_epoch"]
    text = CliRunner().invoke(data_group, args)
    assert "batches per epoch at batch size 2: 2" in text.output and "note: batch size 2 from" in text.output
    # datasets that batch differently: each at its own size, as the run (kohya): ceil(4 / 2) + ceil(4 / 3) batches
    both = CliRunner().invoke(data_group, ["check", _toml_dataset(tmp_path / "two", 2, 3), *args[2:], "--json"])
    assert both.exit_code == 0, both.output
    report = json.loads(both.output)
    assert report["dataset_batch_sizes"] == [2, 3] and report["batches_per_epoch"] == 2 + 2
    text = CliRunner().invoke(data_group, ["check", _toml_dataset(tmp_path / "two", 2, 3), *args[2:]]).output
    assert "batches per epoch at batch sizes 2, 3 (per dataset): 4" in text


def _run_buckets_by_resolution(data) -> dict[str, dict[str, int]]:
    """The run's own bucket assignments (TrainData), grouped by the resolution each entry trains at."""
    out: dict[str, dict[str, int]] = {}
    for entry, assignment in zip(data.entries, data.assignments, strict=True):
        name = f"{assignment.bucket[0]}x{assignment.bucket[1]}"
        sized = out.setdefault(str(entry.subset.resolution), {})
        sized[name] = sized.get(name, 0) + 1
    return out


def test_cli_check_shows_each_resolutions_buckets(tmp_path):
    """With several resolutions data check showed only the largest one's buckets; the run trains each
    image at one drawn resolution, in that resolution's buckets."""
    from sdcore.testing.datasets import make_tiny_dataset
    from sdcore.train.config import load_options
    from sdcore.train.data import build_train_data

    make_tiny_dataset(tmp_path, n=3, size=256)
    make_tiny_dataset(tmp_path, n=2, size=(256, 128), concept="wide")
    bucket_args = ["--min-bucket-reso", "64", "--max-bucket-reso", "512", "--bucket-step", "64"]
    for draw in ("epoch", "once"):
        args = ["check", str(tmp_path), "--resolutions", "128,256", "--resolution-draw", draw, *bucket_args]
        result = CliRunner().invoke(data_group, [*args, "--seed", "7", "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        shown = data["buckets_by_resolution"]
        assert data["resolution_draw"] == draw and data["images"] == 5
        # the smaller resolution's buckets are there (before: only 256's), each within its area
        assert set(shown) == {"128", "256"} if draw == "epoch" else set(shown) <= {"128", "256"}
        for size, buckets in shown.items():
            assert all(int(w) * int(h) <= int(size) ** 2 for w, h in (b.split("x") for b in buckets))
        counted = sum(n for buckets in shown.values() for n in buckets.values())
        assert counted == (10 if draw == "epoch" else 5)  # every image at each resolution, or at its drawn one
        run = load_options(
            TrainOptions,
            overrides={
                "data": str(tmp_path),
                "resolutions": "128,256",
                "resolution_draw": draw,
                "seed": 7,
                "min_bucket_reso": 64,
                "max_bucket_reso": 512,
                "bucket_step": 64,
            },
        )
        plan = build_train_data(run, balance_class=False)
        assert shown == _run_buckets_by_resolution(plan)
        assert data["batches_per_epoch"] == len(plan.epoch_plan(0))
        text = CliRunner().invoke(data_group, [*args, "--seed", "7"]).output
        for size in shown:
            assert f"buckets at resolution {size} (" in text
    # a list whose largest is not --resolution: the run's one-line error
    bad = CliRunner().invoke(data_group, ["check", str(tmp_path), "--resolution", "128", "--resolutions", "128,256"])
    assert bad.exit_code == 2 and "Error: --resolution 128 with --resolutions 128,256" in bad.output


def test_cli_check_counts_images_as_a_conditioning_image_run(tmp_path):
    """`sdcore data check --inpainting-conditioning-images` counts the images that run trains on: its
    <name>-condlabel files are masked images, not training images (OneTrainer's CollectPaths drops every
    '-condlabel' stem, modules/dataLoader/mixin/DataLoaderText2ImageMixin.py exclude_postfix)."""
    folder = tmp_path / "1_sks"
    folder.mkdir()
    for name in ("a.png", "a-condlabel.png", "b.png"):
        Image.new("RGB", (64, 64), (len(name), 0, 0)).save(folder / name)
    runner = CliRunner()
    args = ["check", str(tmp_path), "--resolution", "64", "--json"]
    plain = runner.invoke(data_group, args)
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.output)["images"] == 3  # a kohya folder: every image trains
    result = runner.invoke(data_group, [*args, "--inpainting-conditioning-images"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["images"] == 2


def test_cli_check_shows_onetrainers_buckets(tmp_path):
    """``--bucket-rule onetrainer --bucket-step 8``: the report's buckets are OneTrainer's (80x56 for a 100x64
    image at 64, off kohya's step); a bad rule and kohya's no-upscale with it are one-line errors (exit 2)."""
    from sdcore.data.buckets import assign_onetrainer_bucket, onetrainer_buckets

    for name, size in (("wide", (100, 64)), ("tall", (64, 120))):
        Image.new("RGB", size).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text("x", encoding="utf-8")
    cli = click.Group()
    sdcore_register_commands(cli)
    args = ["data", "check", str(tmp_path), "--resolution", "64", "--json"]
    result = CliRunner().invoke(cli, [*args, "--bucket-rule", "onetrainer", "--bucket-step", "8"])
    assert result.exit_code == 0, result.output
    buckets = json.loads(result.output)["buckets"]
    want = [assign_onetrainer_bucket(s, onetrainer_buckets(64, 8)).bucket for s in ((100, 64), (64, 120))]
    assert buckets == {f"{w}x{h}": 1 for w, h in want} and "80x56" in buckets
    kohya = json.loads(CliRunner().invoke(cli, [*args, "--min-bucket-reso", "64"]).output)["buckets"]
    assert kohya != buckets
    bad = CliRunner().invoke(cli, [*args, "--bucket-rule", "simpletuner"])
    assert bad.exit_code == 2 and "choose one of kohya, onetrainer" in bad.output
    bad = CliRunner().invoke(cli, [*args, "--bucket-rule", "onetrainer", "--no-upscale"])
    assert bad.exit_code == 2 and "--bucket-no-upscale" in bad.output


def test_a_dataset_tomls_no_upscale_with_onetrainers_buckets_is_a_problem(tmp_path):
    """A kohya dataset TOML's ``bucket_no_upscale`` under ``--bucket-rule onetrainer`` would be silently ignored
    (OneTrainer's buckets always upscale): one line naming the TOML key, exit 1, as the run's own flag is refused."""
    images = tmp_path / "imgs"
    images.mkdir()
    for name, size in (("a", (100, 64)), ("b", (30, 20))):
        Image.new("RGB", size).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text("x", encoding="utf-8")
    toml = tmp_path / "ds.toml"
    toml.write_text(
        '[[datasets]]\nresolution = 64\nbucket_no_upscale = true\n[[datasets.subsets]]\nimage_dir = "imgs"\n'
    )
    cli = click.Group()
    sdcore_register_commands(cli)
    args = ["data", "check", str(toml), "--bucket-step", "8", "--json"]
    result = CliRunner().invoke(cli, [*args, "--bucket-rule", "onetrainer"])
    assert result.exit_code == 1, result.output
    (error,) = json.loads(result.output)["errors"]
    assert "bucket_no_upscale" in error and "onetrainer" in error
    kohya = CliRunner().invoke(cli, [*args, "--min-bucket-reso", "8"])  # kohya's own setting: no such problem
    assert kohya.exit_code == 0 and json.loads(kohya.output)["errors"] == [], kohya.output

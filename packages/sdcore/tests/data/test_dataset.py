from __future__ import annotations

from pathlib import Path

import pytest
from sdcore.data.dataset import assign_buckets, build_dataset_index, load_toml_dataset_config, scan_dataset
from sdcore.errors import DataError
from sdcore.train.options import TrainOptions


def _names(paths) -> set[str]:
    return {Path(p).name for p in paths}


def test_messy_folder_every_problem_counted(messy_dataset):
    root = messy_dataset["root"]
    index = build_dataset_index(TrainOptions(data=str(root), resolution=64, min_bucket_reso=64, max_bucket_reso=128))
    assert _names(e.path for e in index.entries) == messy_dataset["usable"]
    assert _names(s.path for s in index.skipped) == messy_dataset["skipped"]
    reasons = {s.path.name: s.reason for s in index.skipped}
    assert "damaged" in reasons["truncated.jpg"]
    assert "damaged" in reasons["corrupt.png"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert "not an image" in reasons["fake.jpg"]
    assert "not an image" in reasons["notes.xyz"]
    assert "repeats" in reasons["misc"]
    by_name = {e.path.name: e for e in index.entries}
    assert by_name["good.png"].caption == "sks dog, sitting, grass"
    assert by_name["good.png"].repeats == 5 and by_name["good.png"].subset.class_tokens == "sks dog"
    assert by_name["nocap.png"].caption == "sks dog"  # class tokens stand in for a missing caption
    assert by_name["empty.png"].caption == "sks dog"
    assert by_name["direct.png"].repeats == 1 and by_name["direct.png"].caption == ""
    assert by_name["rotated.jpg"].size == (40, 80)
    assert by_name["tiny.png"].size == (10, 10)
    assert _names(index.missing_captions) == {"direct.png"}
    assert _names(index.empty_captions) == {"empty.png"}
    assert "nocap.png" in _names(index.class_token_captions)
    assert not any(e.is_class for e in index.entries)
    summary = index.summary()
    assert "6 files skipped" in summary and "truncated.jpg" in summary and "empty caption" in summary
    assert index.samples_per_epoch == 8 * 5 + 1


def test_no_upscale_skips_tiny_images(messy_dataset):
    opts = TrainOptions(
        data=str(messy_dataset["root"]),
        resolution=64,
        bucket_no_upscale=True,
        bucket_step=16,
        min_bucket_reso=64,
        max_bucket_reso=128,
    )
    index = build_dataset_index(opts)
    reasons = {s.path.name: s.reason for s in index.skipped}
    assert "smaller than the bucket step" in reasons["tiny.png"]
    assert "tiny.png" not in _names(e.path for e in index.entries)
    for entry, a in zip(index.entries, assign_buckets(index), strict=True):
        assert a.resized[0] <= entry.size[0] and a.bucket[0] % 16 == 0


def test_reg_data_marks_class_images(tmp_path, make):
    (tmp_path / "train" / "3_sks").mkdir(parents=True)
    (tmp_path / "reg" / "2_dog").mkdir(parents=True)
    for i in range(2):
        make.noise(seed=i).save(tmp_path / "train" / "3_sks" / f"{i}.png")
    for i in range(3):
        make.noise(seed=10 + i).save(tmp_path / "reg" / "2_dog" / f"{i}.png")
    index = build_dataset_index(TrainOptions(data=str(tmp_path / "train"), reg_data=str(tmp_path / "reg")))
    assert len(index.instance_entries) == 2 and len(index.class_entries) == 3
    assert all(e.caption == "dog" and e.repeats == 2 for e in index.class_entries)
    assert "3 class images (6 with repeats)" in index.summary()


def test_missing_and_empty_datasets_raise_with_path(tmp_path, make):
    with pytest.raises(DataError, match="does not exist") as info:
        build_dataset_index(TrainOptions(data=str(tmp_path / "nope")))
    assert "nope" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable training images") as info:
        build_dataset_index(TrainOptions(data=str(tmp_path / "empty")))
    assert "empty" in str(info.value)
    bad = tmp_path / "bad" / "1_x"
    bad.mkdir(parents=True)
    make.text_as_image(bad / "a.png")
    with pytest.raises(DataError, match=r"1 files skipped.*a\.png"):
        build_dataset_index(TrainOptions(data=str(tmp_path / "bad")))
    with pytest.raises(DataError, match="no dataset given"):
        build_dataset_index(TrainOptions())
    assert scan_dataset(TrainOptions(data=str(tmp_path / "empty"))).entries == []


def test_caption_extension_option(tmp_path, make):
    folder = tmp_path / "1_x"
    folder.mkdir()
    make.noise().save(folder / "a.png")
    (folder / "a.caption").write_text("from caption", encoding="utf-8")
    (folder / "a.txt").write_text("from txt", encoding="utf-8")
    index = build_dataset_index(TrainOptions(data=str(tmp_path), caption_extension=".caption"))
    assert index.entries[0].caption == "from caption"
    assert index.entries[0].subset.caption_extension == ".caption"


# ---------------------------------------------------------------------------------------- TOML


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_toml_config_levels_and_overrides(tmp_path, make):
    for name in ("hoge", "reg"):
        (tmp_path / name).mkdir()
        make.noise().save(tmp_path / name / "a.png")
    config = _write(
        tmp_path / "dataset.toml",
        """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 768
batch_size = 4
bucket_reso_steps = 32
bucket_no_upscale = true

  [[datasets.subsets]]
  image_dir = 'hoge'
  class_tokens = 'hoge girl'
  num_repeats = 10
  flip_aug = true
  caption_tag_dropout_rate = 0.1

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'reg'
  class_tokens = 'girl'
  keep_tokens = 0
  caption_dropout_rate = 0.05

[[datasets]]
resolution = [640, 360]
  [[datasets.subsets]]
  image_dir = 'hoge'
  shuffle_caption = false
""",
    )
    defaults = TrainOptions(flip=False, resolution=512, caption_dropout=0.0)
    first, second, third = load_toml_dataset_config(config, defaults)
    assert first.image_dir == tmp_path / "hoge" and first.repeats == 10 and first.class_tokens == "hoge girl"
    assert first.shuffle_caption and first.keep_tokens == 1 and first.flip and first.tag_dropout == 0.1
    assert first.resolution == 768 and first.batch_size == 4 and first.bucket_step == 32 and first.bucket_no_upscale
    assert not first.is_class
    assert second.is_class and second.keep_tokens == 0 and second.caption_dropout == 0.05 and second.repeats == 1
    assert not second.flip
    assert third.resolution == 480 and not third.shuffle_caption and third.keep_tokens == 1
    assert third.bucket_step == 64  # dataset-level settings do not leak into the next dataset
    index = build_dataset_index(TrainOptions(data=str(config)))
    assert len(index.instance_entries) == 2 and len(index.class_entries) == 1


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir='x'\nnum_repeat=3\ndebug_dataset=true\nclas_tokens='a'\n",
            # every problem of the table at once, each with the nearest key
            r"unknown key 'num_repeat' \(did you mean 'num_repeats'\?\); kohya key 'debug_dataset' is not supported "
            r"by sdcore; unknown key 'clas_tokens' \(did you mean 'class_tokens'\?\)",
        ),
        (
            "[general]\nbogus=1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='x'\n",
            r"\[general\]: unknown key 'bogus'",
        ),
        (
            "[[datasets]]\ndebug_dataset=true\n[[datasets.subsets]]\nimage_dir='x'\n",
            "'debug_dataset' is not",
        ),
        ("[[datasets]]\nalpha_mask=true\n[[datasets.subsets]]\nimage_dir='x'\n", "'alpha_mask' belongs in a"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='x'\nrandom_crop='yes'\n", "'random_crop' must be a boolean"),
        ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats=2\n", "'image_dir' is required"),
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir='x'\nnum_repeats='2'\n",
            "'num_repeats' must be a positive integer",
        ),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='x'\ncaption_dropout_rate=1.5\n", "probability"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='x'\nflip_aug=1\n", "'flip_aug' must be a boolean"),
        ("[[datasets]]\nresolution='big'\n[[datasets.subsets]]\nimage_dir='x'\n", "'resolution' must be"),
        ("[general]\nkeep_tokens=1\n", r"no \[\[datasets\]\]"),
        ("[[datasets]]\nresolution=512\n", r"no \[\[datasets.subsets\]\]"),
        ("[general\n", "invalid TOML"),
        ("datasets = 3\n", r"no \[\[datasets\]\]"),
        ("extra = 1\n", "top level: unknown key 'extra'"),
    ],
)
def test_toml_errors_name_key_and_file(tmp_path, body, message):
    config = _write(tmp_path / "cfg.toml", body)
    with pytest.raises(DataError, match=message) as info:
        load_toml_dataset_config(config)
    assert str(config) in str(info.value)


def test_toml_missing_image_dir_is_skipped_not_crash(tmp_path, make):
    (tmp_path / "ok").mkdir()
    make.noise().save(tmp_path / "ok" / "a.png")
    config = _write(
        tmp_path / "d.toml",
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir='ok'\n[[datasets.subsets]]\nimage_dir='gone'\n",
    )
    index = build_dataset_index(TrainOptions(data=str(config)))
    assert len(index.entries) == 1
    assert [s.reason for s in index.skipped] == ["image folder does not exist"]


def test_non_toml_file_is_rejected(tmp_path):
    _write(tmp_path / "data.yaml", "{}")
    with pytest.raises(
        DataError,
        match=r"folder, a \.toml dataset config, a OneTrainer concepts \.json, an ai-toolkit job or a diffusers \.jsonl",
    ):
        build_dataset_index(TrainOptions(data=str(tmp_path / "data.yaml")))
    _write(tmp_path / "data.json", "{}")  # JSON: OneTrainer's concepts file or preset, and this is neither
    with pytest.raises(DataError, match=r"concepts file \(a list of concepts\) or a training preset"):
        build_dataset_index(TrainOptions(data=str(tmp_path / "data.json")))


def test_nested_folders_are_reported_and_many_images_keep_order(tmp_path, make):
    folder = tmp_path / "2_x"
    (folder / "more").mkdir(parents=True)
    make.noise(seed=99).save(folder / "more" / "hidden.png")
    for i in range(20):  # enough to take the threaded probing path
        make.noise(16, 16, seed=i).save(folder / f"{i:02d}.png")
    make.truncated_jpeg(folder / "07b.jpg")
    index = build_dataset_index(TrainOptions(data=str(tmp_path)))
    assert [e.path.name for e in index.entries] == [f"{i:02d}.png" for i in range(20)]
    reasons = {s.path.name: s.reason for s in index.skipped}
    assert set(reasons) == {"07b.jpg", "more"}
    assert "damaged" in reasons["07b.jpg"]
    assert "sub-folder not scanned" in reasons["more"]


def test_pointing_at_a_concept_folder_uses_its_name(tmp_path, make):
    folder = tmp_path / "10_sks cat"
    folder.mkdir()
    make.noise().save(folder / "a.png")
    index = build_dataset_index(TrainOptions(data=str(folder)))
    assert index.entries[0].repeats == 10 and index.entries[0].caption == "sks cat"
    plain = tmp_path / "plain"
    plain.mkdir()
    make.noise().save(plain / "a.png")
    entry = build_dataset_index(TrainOptions(data=str(plain))).entries[0]
    assert entry.repeats == 1 and entry.caption == "" and entry.subset.class_tokens is None


def test_folder_names_are_parsed_as_kohya_parses_them(tmp_path, make):
    """kohya's extract_dreambooth_params (config_util.py): ``int(name.split("_")[0])`` is the repeats and the
    rest, joined with ``_``, the class tokens; so a folder named just ``10`` trains with 10 repeats and no
    class tokens, ``int`` strips spaces (`` 2_s``), a name whose first ``_`` part is not a number is ignored
    and so is one under 1 repeat (``-1_x``, ``0_zero``). A file named like a folder is no folder (kohya
    skips non-directories)."""
    for name in ("10", "5_x_y", "3_my char", "4_", " 2_s", "_bad", "abc", "10 x", "0_zero", "-1_x", "1.5_x"):
        (tmp_path / name).mkdir()
        make.noise().save(tmp_path / name / "a.png")
    (tmp_path / "7_file").write_text("not a folder")
    index = build_dataset_index(TrainOptions(data=str(tmp_path)))
    got = {e.path.parent.name: (e.repeats, e.subset.class_tokens, e.caption) for e in index.entries}
    assert got == {
        "10": (10, None, ""),
        "5_x_y": (5, "x_y", "x_y"),
        "3_my char": (3, "my char", "my char"),
        "4_": (4, None, ""),
        " 2_s": (2, "s", "s"),
    }
    reasons = {s.path.name: s.reason for s in index.skipped}
    assert set(reasons) == {"_bad", "abc", "10 x", "0_zero", "-1_x", "1.5_x"}
    assert "-1 repeats" in reasons["-1_x"] and "0 repeats" in reasons["0_zero"]
    assert index.samples_per_epoch == 10 + 5 + 3 + 4 + 2


def test_a_caption_file_no_image_reads_is_listed_not_counted_as_a_problem(tmp_path, make):
    """A caption whose image was renamed or deleted trains nothing; kohya ignores it silently, sdcore lists
    it (check, the pre-flight and the run) but does not count it as a problem: a renamed image is listed
    already as uncaptioned, and a prompt list or notes file in the folder is harmless (``--strict`` passed
    on such a folder before the listing). Captions an image reads, a face-crop image's shared ``name.txt``
    and an upper-case suffix's included, and an unreadable image's caption are not listed."""
    from sdcore.data.check import check_dataset

    folder = tmp_path / "10_x"
    folder.mkdir()
    make.noise().save(folder / "a.png")
    (folder / "a.txt").write_text("a")
    make.noise().save(folder / "up.JPG")
    (folder / "up.txt").write_text("upper-case suffix")
    make.noise().save(folder / "face_10_20_30_40.png")
    (folder / "face.txt").write_text("shared by the crop")
    (folder / "broken.jpg").write_bytes(b"")
    (folder / "broken.txt").write_text("its image is listed")
    (folder / "orphan.txt").write_text("no image")
    (folder / "old.caption").write_text("no image either")
    (folder / "meta_cap.json").write_text("{}")  # kohya's metadata: a sidecar, not a caption
    index = build_dataset_index(TrainOptions(data=str(tmp_path)))
    assert {s.path.name for s in index.skipped} == {"broken.jpg"}
    assert [p.name for p in index.unused_captions] == ["old.caption", "orphan.txt"]
    assert "2 caption files no image reads (not used): old.caption, orphan.txt" in index.summary()
    report = check_dataset(tmp_path, TrainOptions())
    assert report.unused_captions == ["10_x/old.caption", "10_x/orphan.txt"]
    assert report.to_dict()["unused_captions"] == report.unused_captions
    assert "10_x/orphan.txt" in report.to_text()
    assert report.problems == len(report.skipped) + len(report.upscaled)  # broken.jpg (+ small images) only


def test_an_upper_case_caption_a_case_blind_file_system_reads_is_not_listed(tmp_path, make):
    """On Windows/macOS ``B.TXT`` is the ``B.txt`` that ``B.png`` reads; a link stands in for that here (the
    test file system sees case). Where the file system sees case, ``C.TXT`` is not read and is listed."""
    from sdcore.data.dataset import _unused_captions

    for name in ("B", "C"):
        make.noise().save(tmp_path / f"{name}.png")
    (tmp_path / "B.TXT").write_text("b")
    (tmp_path / "B.txt").symlink_to(tmp_path / "B.TXT")
    (tmp_path / "C.TXT").write_text("c")
    files = [tmp_path / n for n in ("B.TXT", "B.txt", "C.TXT")]
    images = [tmp_path / "B.png", tmp_path / "C.png"]
    assert _unused_captions(files, images, ".txt") == [tmp_path / "C.TXT"]


def test_a_prompt_file_in_a_clean_dataset_keeps_check_strict_passing(tmp_path, make):
    """kohya's --sample_prompts file (or notes) kept in the dataset folder trains nothing and harms nothing:
    `sdcore data check --strict` passes as it did before unused captions were listed, and names it."""
    from click.testing import CliRunner
    from sdcore.builtin.data_commands import data_group

    folder = tmp_path / "10_x"
    folder.mkdir()
    make.noise(64, 64).save(folder / "a.png")
    (folder / "a.txt").write_text("a")
    (folder / "sample_prompts.txt").write_text("a photo of x --n blurry\n")
    args = ["check", str(tmp_path), "--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "64"]
    result = CliRunner().invoke(data_group, [*args, "--strict"])
    assert result.exit_code == 0, result.output
    assert "OK: no problems found" in result.output and "10_x/sample_prompts.txt" in result.output


def test_no_upscale_skips_a_long_thin_image_its_area_shrink_takes_under_the_step(tmp_path):
    """8000x70 at 512 with no-upscale: kohya's select_bucket (sd-scripts train_util.py:309-338) shrinks it to
    the 512x512 area, about 4000x35, whose bucket height is 0. It is skipped with its reason, not an error
    that stops the index (its short side, 70, is over the step)."""
    from PIL import Image

    folder = tmp_path / "2_x"
    folder.mkdir()
    Image.new("RGB", (8000, 70)).save(folder / "long.png")
    Image.new("RGB", (600, 500)).save(folder / "ok.png")
    index = build_dataset_index(TrainOptions(data=str(tmp_path), resolution=512, bucket_no_upscale=True))
    reasons = {s.path.name: s.reason for s in index.skipped}
    assert "under the bucket step 64" in reasons["long.png"]
    assert [e.path.name for e in index.entries] == ["ok.png"]
    assert [a.bucket for a in assign_buckets(index)] == [(512, 448)]


def test_own_text_encoder_cache_beside_the_images_is_not_reported_as_skipped(tmp_path):
    """``--cache-text-encoder-outputs-to-disk`` writes its store beside the images; the next run's scan must
    not list it as "not an image" (a kohya user sees that after every second run), while another
    ``.safetensors`` there still is."""
    from PIL import Image
    from sdcore.train.text_store import store_file

    folder = tmp_path / "10_ohwx"
    folder.mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(folder / "a.png")
    store = store_file(folder, "d6225ca0f5bf" + "0" * 52, None)
    store.write_bytes(b"x")
    (folder / "lora.safetensors").write_bytes(b"x")
    index = build_dataset_index(TrainOptions(data=str(tmp_path), resolution=64, min_bucket_reso=64))
    assert _names(e.path for e in index.entries) == {"a.png"}
    assert _names(s.path for s in index.skipped) == {"lora.safetensors"}

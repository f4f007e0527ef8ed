"""kohya's fine-tuning metadata dataset (``--in_json`` / ``metadata_file``): records, captions, repeats,
problems.

The metadata files are written here the way kohya's ``finetune/`` scripts write them: the merge
scripts key entries by the image's file stem (``--full_path``: its full path) with ``"caption"``
(merge_captions_to_metadata) and ``"tags"`` (merge_dd_tags_to_metadata), prepare_buckets_latents
adds ``"train_resolution"``, the current WD14 tagger writes ``"tags"`` + ``"image_size"`` (or a JSONL
of ``image_path``/``caption``/``image_size``). The expected captions are written by hand from
kohya's rule (``FineTuningDataset``): caption, then ``","`` and the tags when there are tags.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sdcore.data.captions import process_caption
from sdcore.data.dataset import DatasetProblems, build_dataset_index, load_toml_dataset_config, scan_dataset
from sdcore.data.metadata import combine_caption
from sdcore.errors import DataError
from sdcore.train.options import TrainOptions

BUCKETS = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_truncated_png(path: Path) -> None:
    noise_image(64, 64, seed=9).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        noise_image(64, 48, seed=seed).save(folder / name)
    return folder


def _meta(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def ft(tmp_path):
    """imgs/ with four images and a metadata file as merge_captions + merge_dd_tags write it."""
    imgs = _images(tmp_path / "imgs", ["a.png", "b.jpg", "c.webp", "d.png", "unlisted.png"])
    (imgs / "a_0064x0048_sd.npz").write_bytes(b"not read")  # kohya's latent cache beside it: ignored
    meta = _meta(
        tmp_path / "meta.json",
        {
            "a": {"caption": "a photo of a cat", "tags": "1girl, solo, Smile", "train_resolution": [64, 48]},
            "b": {"caption": "a dog"},  # caption only
            "c": {"tags": "outdoors, tree"},  # tags only
            "d": {"caption": "", "tags": ""},  # nothing: trained uncaptioned
        },
    )
    return tmp_path, imgs, meta


def test_metadata_entries_captions_as_kohya_builds_them(ft):
    _, imgs, meta = ft
    index = build_dataset_index(TrainOptions(data=str(imgs), metadata_file=str(meta), dataset_repeats=3, **BUCKETS))
    by_name = {e.path.name: e for e in index.entries}
    assert sorted(by_name) == ["a.png", "b.jpg", "c.webp", "d.png"]  # stem keys found with kohya's extensions
    assert by_name["a.png"].caption == "a photo of a cat,1girl, solo, Smile"
    assert by_name["b.jpg"].caption == "a dog"
    assert by_name["c.webp"].caption == "outdoors, tree"
    assert by_name["d.png"].caption == ""
    assert [by_name[n].tags for n in ("a.png", "b.jpg", "c.webp", "d.png")] == [
        "1girl, solo, Smile",
        None,
        "outdoors, tree",
        None,
    ]
    assert {e.repeats for e in index.entries} == {3} and index.samples_per_epoch == 12
    assert not any(e.is_class for e in index.entries)
    assert by_name["a.png"].size == (64, 48)  # from the file; train_resolution is not used
    assert [p.name for p in index.empty_captions] == ["d.png"]
    skipped = {s.path.name: s.reason for s in index.skipped}
    assert skipped == {"unlisted.png": "not listed in meta.json: not trained (as kohya)"}
    assert index.problems == []


def test_caption_options_apply_to_metadata_captions_as_in_kohya(ft):
    """Prefix, keep_tokens, shuffle and tag dropout work on the combined caption; the split is at ","."""
    _, imgs, meta = ft
    options = TrainOptions(data=str(imgs), metadata_file=str(meta), caption_prefix="sks", **BUCKETS)
    index = build_dataset_index(options)
    entry = next(e for e in index.entries if e.path.name == "a.png")
    s = entry.subset
    assert (s.caption_prefix, s.metadata_file) == ("sks", meta)
    plain = process_caption(entry.caption, prefix=s.caption_prefix, rng=random.Random(0))
    assert plain == "sks a photo of a cat,1girl, solo, Smile"  # untouched text when nothing splits it
    shuffled = process_caption(entry.caption, prefix="sks", shuffle=True, keep_tokens=1, rng=random.Random(3))
    tags = shuffled.split(", ")
    assert tags[0] == "sks a photo of a cat" and sorted(tags[1:]) == ["1girl", "Smile", "solo"]


def test_combine_caption_rules():
    assert combine_caption("cap", "t1, t2") == ("cap,t1, t2", "t1, t2")
    assert combine_caption(None, "t1") == ("t1", "t1")
    assert combine_caption("cap", None) == ("cap", None)
    assert combine_caption("cap", "") == ("cap", None)  # empty tags add nothing and are not counted
    assert combine_caption(None, None) == ("", None)
    # enable_wildcard: tags (line breaks -> ",") go after every non-blank caption line
    assert combine_caption("x {a|b}\n\ny", "t1\nt2", enable_wildcard=True) == ("x {a|b},t1,t2\ny,t1,t2", "t1,t2")
    assert combine_caption("x", "", enable_wildcard=True) == ("x,", "")
    assert combine_caption(None, "t", enable_wildcard=True) == ("", "t")  # kohya: no caption line, no caption


def test_full_path_keys_jsonl_and_relative_keys_with_extension(tmp_path):
    imgs = _images(tmp_path / "imgs", ["x.png", "y.png"])
    other = _images(tmp_path / "elsewhere", ["z.png"])
    meta = _meta(
        tmp_path / "m.json",
        {str(other / "z.png"): {"caption": "zed"}, "x.png": {"caption": "ex"}, "y": {"tags": "why"}},
    )
    index = build_dataset_index(TrainOptions(data=str(imgs), metadata_file=str(meta), **BUCKETS))
    assert {e.path: e.caption for e in index.entries} == {
        other / "z.png": "zed",
        imgs / "x.png": "ex",
        imgs / "y.png": "why",
    }
    lines = [
        {"image_path": str(imgs / "x.png"), "caption": "1girl, solo", "image_size": [64, 48]},
        {"image_path": "y.png", "tags": "blue"},  # no caption: "" (kohya's JSONL reader)
    ]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    index = build_dataset_index(TrainOptions(data=str(imgs), metadata_file=str(jsonl), **BUCKETS))
    assert {e.path.name: e.caption for e in index.entries} == {"x.png": "1girl, solo", "y.png": "blue"}


def test_missing_images_bad_entries_and_corrupt_images_reported_together(ft):
    _, imgs, meta = ft
    write_truncated_png(imgs / "broken.png")
    data = json.loads(meta.read_text())
    data.update({"gone": {"caption": "x"}, "a_0064x0048_sd": {"caption": "only npz"}, "bad": ["not", "an", "object"]})
    data["broken"] = {"caption": "truncated"}
    data["b"] = {"caption": 3}
    _meta(meta, data)
    options = TrainOptions(data=str(imgs), metadata_file=str(meta), **BUCKETS)
    index = scan_dataset(options)
    assert "broken.png" in {s.path.name for s in index.skipped}  # corrupt: skipped and counted, not a problem
    with pytest.raises(DatasetProblems) as info:
        build_dataset_index(options)
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert f"{meta}: entry 'b': 'caption' must be a string, got int" == problems[0]
    assert f"{meta}: entry 'bad' must be an object" in problems[1]
    assert problems[2].startswith(f"{meta}: 2 listed image(s) not found in {imgs}: 'gone', 'a_0064x0048_sd'")
    assert "only a kohya .npz latent cache is there" in problems[2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "invalid JSON: Expecting property name"),
        ("[1, 2]", "a kohya metadata file is a JSON object of image key -> entry, got a list"),
    ],
)
def test_bad_json_is_a_problem(ft, text, message):
    _, imgs, meta = ft
    meta.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetProblems, match=message):
        build_dataset_index(TrainOptions(data=str(imgs), metadata_file=str(meta), **BUCKETS))
    with pytest.raises(DatasetProblems, match="metadata file not found"):
        build_dataset_index(TrainOptions(data=str(imgs), metadata_file=str(meta.with_name("nope.json")), **BUCKETS))


def test_metadata_file_needs_an_image_folder(ft, tmp_path):
    _, _, meta = ft
    config = tmp_path / "d.toml"
    config.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\n", encoding="utf-8")
    with pytest.raises(DataError, match="--data must be the image folder its keys are in"):
        build_dataset_index(TrainOptions(data=str(config), metadata_file=str(meta)))


def test_dataset_toml_metadata_file_subsets(ft):
    tmp_path, imgs, meta = ft
    config = tmp_path / "d.toml"
    config.write_text(
        "[general]\nshuffle_caption = true\ncaption_extension = '.caption'\n"
        "[[datasets]]\nresolution = 64\nkeep_tokens = 1\n"
        "[[datasets.subsets]]\nmetadata_file = 'meta.json'\nimage_dir = 'imgs'\nnum_repeats = 4\n"
        "[[datasets.subsets]]\nmetadata_file = 'meta.json'\nimage_dir = 'imgs'\nnum_repeats = 9\n"  # kohya: once
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\n",
        encoding="utf-8",
    )
    first, second = load_toml_dataset_config(config, TrainOptions(dataset_repeats=2))
    assert (first.metadata_file, first.image_dir, first.repeats) == (meta, imgs, 4)
    assert (first.shuffle_caption, first.keep_tokens, first.class_tokens) == (True, 1, None)
    # a subset without num_repeats takes --dataset_repeats (kohya's argparse fallback), metadata or not
    assert (second.metadata_file, second.repeats) == (None, 2)
    index = build_dataset_index(TrainOptions(data=str(config), **BUCKETS))
    ft_entries = [e for e in index.entries if e.subset.metadata_file is not None]
    assert len(ft_entries) == 4 and {e.repeats for e in ft_entries} == {4}
    assert next(e for e in ft_entries if e.path.name == "a.png").caption == "a photo of a cat,1girl, solo, Smile"


@pytest.mark.parametrize(
    ("subset", "message"),
    [
        ("metadata_file = 'meta.json'\nclass_tokens = 'sks'", "'class_tokens': not used by a metadata_file subset"),
        ("metadata_file = 'meta.json'\nis_reg = true", "'is_reg': not used by a metadata_file subset"),
        ("metadata_file = 1", "'metadata_file' must be a string"),
    ],
)
def test_dataset_toml_refuses_what_kohya_fine_tuning_refuses(ft, subset, message):
    tmp_path, _, _ = ft
    config = tmp_path / "d.toml"
    config.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\n{subset}\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_toml_dataset_config(config)


def test_dataset_toml_cannot_mix_metadata_and_folder_subsets(ft):
    tmp_path, _, _ = ft
    config = tmp_path / "d.toml"
    config.write_text(
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\nmetadata_file = 'meta.json'\n"
        "[[datasets.subsets]]\nimage_dir = 'imgs'\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError, match="cannot be mixed in one"):
        load_toml_dataset_config(config)
    config.write_text("[general]\nmetadata_file = 'meta.json'\n[[datasets]]\n", encoding="utf-8")
    with pytest.raises(DataError, match="'metadata_file' belongs in a"):
        load_toml_dataset_config(config)


def test_empty_metadata_file_is_skipped_as_kohya_skips_it(ft):
    _, imgs, meta = ft
    meta.write_text("{}", encoding="utf-8")
    index = scan_dataset(TrainOptions(data=str(imgs), metadata_file=str(meta), **BUCKETS))
    assert index.entries == [] and index.problems == []
    assert any(s.path == meta and "lists no image" in s.reason for s in index.skipped)
    with pytest.raises(DataError, match="no usable training images"):
        build_dataset_index(TrainOptions(data=str(imgs), metadata_file=str(meta), **BUCKETS))


def test_data_check_reads_a_metadata_file(ft):
    from click.testing import CliRunner
    from sdcore.builtin.data_commands import data_group

    _, imgs, meta = ft
    args = ["check", str(imgs), "--in-json", str(meta), "--dataset-repeats", "2", "--resolution", "64", "--json"]
    result = CliRunner().invoke(data_group, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["images"], report["samples_per_epoch"], report["errors"]) == (4, 8, [])
    assert report["tag_frequencies"]["solo"] == 1 and report["tag_frequencies"]["a photo of a cat"] == 1
    data = json.loads(meta.read_text())
    data["lost"] = {"caption": "x"}
    _meta(meta, data)
    result = CliRunner().invoke(data_group, args[:-1])
    assert result.exit_code == 1
    assert f"ERROR: {meta}: 1 listed image(s) not found in {imgs}: 'lost'" in result.output


def test_fine_tuning_dataset_table_refuses_caption_file_keys_and_many_missing_are_counted(ft):
    tmp_path, imgs, meta = ft
    config = tmp_path / "d.toml"
    config.write_text(
        "[[datasets]]\ncaption_extension = '.txt'\n[[datasets.subsets]]\nmetadata_file = 'meta.json'\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=r"datasets\[0\]: 'caption_extension': not used by a metadata_file subset"):
        load_toml_dataset_config(config)
    _meta(meta, {f"lost{i:02d}": {"caption": "x"} for i in range(12)})
    with pytest.raises(DatasetProblems) as info:
        build_dataset_index(TrainOptions(data=str(imgs), metadata_file=str(meta), **BUCKETS))
    (problem,) = info.value.problems
    assert problem.startswith(f"{meta}: 12 listed image(s) not found in {imgs}: 'lost00', 'lost01'")
    assert problem.endswith("'lost09' and 2 more")

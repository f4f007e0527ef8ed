"""kohya's ``ss_datasets`` in a LoRA trained from a dataset config, as sd-scripts' train_network.py writes it
(48d368f, lines 1069-1198): one JSON entry per ``[[datasets]]`` with its batch size, resolution, buckets,
tag frequency and subsets; the merged ``ss_tag_frequency`` and ``ss_dataset_dirs`` (reg folders left out)
beside it; the per-dataset top-level keys (``ss_batch_size_per_device``, ``ss_resolution``, the augmentation
flags, ...) left out. A run from a folder keeps those top-level keys and writes no ``ss_datasets``."""

from __future__ import annotations

import json

import pytest
from sdcore.data.dataset import build_dataset_index
from sdcore.testing.datasets import pattern_image
from sdcore.train.method import RunFacts, SaveInfo
from sdplugin_lora.dataset_metadata import PER_DATASET_KEYS, kohya_reg_uses
from sdplugin_lora.method import LoraMethod, LoraOptions, kohya_training_metadata


def _folder(path, captions: list[str | None], sizes=None):
    path.mkdir(parents=True)
    for i, caption in enumerate(captions):
        pattern_image(i, sizes[i] if sizes else 64).save(path / f"{i:03d}.png")
        if caption is not None:
            (path / f"{i:03d}.txt").write_text(caption, encoding="utf-8")


def _two_datasets(root):
    """Dataset 0 (batch 2, 64 px): 2 images x 3 repeats and 3 uncaptioned reg images (class tokens);
    dataset 1 (batch 1, 128 px, flipped): a 2:1 and a square image x 2 repeats."""
    _folder(root / "a" / "3_a", ["sks, red, circle", "sks, blue"])
    _folder(root / "reg" / "1_person", [None, None, None])
    _folder(root / "b" / "2_b", ["sks, square", "wide, sks"], sizes=[(96, 48), 64])
    config = root / "dataset.toml"
    config.write_text(
        "[general]\nshuffle_caption = true\nkeep_tokens = 1\ncaption_extension = '.txt'\n"
        "[[datasets]]\nbatch_size = 2\nresolution = 64\n"
        "[[datasets.subsets]]\nimage_dir = 'a/3_a'\nnum_repeats = 3\nclass_tokens = 'sks'\n"
        "[[datasets.subsets]]\nimage_dir = 'reg/1_person'\nis_reg = true\nclass_tokens = 'person'\n"
        "[[datasets]]\nbatch_size = 1\nresolution = 128\nflip_aug = true\nmax_bucket_reso = 128\n"
        "[[datasets.subsets]]\nimage_dir = 'b/2_b'\nnum_repeats = 2\ncaption_prefix = 'photo'\n",
        encoding="utf-8",
    )
    return config


def _pick(table: dict, *keys: str) -> tuple:
    return tuple(table[key] for key in keys)


def _train(tmp_path, data) -> dict[str, str]:
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import train
    from sdplugin_lora.format import read_lora

    values = {"data": str(data), "rank": 2, "max_steps": 1, "batch_size": 4}
    method = LoraMethod(contract_options(LoraMethod, tmp_path, values))
    return read_lora(train(method, bundle=create_tiny_bundle("sd1")).output).metadata


def test_a_two_dataset_config_writes_ss_datasets_as_kohya(tmp_path):
    meta = _train(tmp_path, _two_datasets(tmp_path / "data"))
    datasets = json.loads(meta["ss_datasets"])
    assert [d["batch_size_per_device"] for d in datasets] == [2, 1]
    first, second = datasets
    assert (first["is_dreambooth"], first["num_train_images"], first["num_reg_images"]) == (True, 6, 3)
    assert (second["num_train_images"], second["num_reg_images"]) == (4, 0)
    assert (first["resolution"], second["resolution"]) == ([64, 64], [128, 128])
    assert (second["enable_bucket"], second["min_bucket_reso"], second["max_bucket_reso"]) == (True, 64, 128)
    a, reg = first["subsets"]
    assert _pick(a, "image_dir", "num_repeats", "img_count", "is_reg", "class_tokens") == ("3_a", 3, 2, False, "sks")
    assert _pick(reg, "image_dir", "num_repeats", "img_count", "is_reg") == ("1_person", 1, 3, True)
    assert _pick(a, "shuffle_caption", "keep_tokens", "flip_aug", "caption_prefix") == (True, 1, False, None)
    (b,) = second["subsets"]
    assert _pick(b, "image_dir", "num_repeats", "flip_aug", "caption_prefix", "is_reg") == (
        "2_b",
        2,
        True,
        "photo",
        False,
    )
    # tag frequency per dataset: the reg folder's captions are its class tokens
    assert first["tag_frequency"] == {"3_a": {"sks": 2, "blue": 1, "circle": 1, "red": 1}, "1_person": {"person": 3}}
    assert second["tag_frequency"] == {"2_b": {"sks": 2, "square": 1, "wide": 1}}
    # buckets: 6 training uses + the 3 reg images balanced up to 6 (kohya's DreamBoothDataset); the 2:1 image
    # in the 2:1 bucket of 128, the square one in the square bucket, each twice
    assert first["bucket_info"] == {"buckets": {"0": {"resolution": [64, 64], "count": 12}}, "mean_img_ar_error": 0}
    assert second["bucket_info"]["buckets"] == {
        "0": {"resolution": [128, 64], "count": 2},
        "1": {"resolution": [128, 128], "count": 2},
    }
    # beside it: kohya's merged tables (training folders only in ss_dataset_dirs)
    assert json.loads(meta["ss_dataset_dirs"]) == {
        "3_a": {"n_repeats": 3, "img_count": 2},
        "2_b": {"n_repeats": 2, "img_count": 2},
    }
    assert set(json.loads(meta["ss_tag_frequency"])) == {"3_a", "1_person", "2_b"}
    assert meta["ss_num_train_images"] == "10" and meta["ss_num_reg_images"] == "3"
    assert not set(PER_DATASET_KEYS) & set(meta)


def test_a_folder_run_keeps_the_top_level_keys(tmp_path):
    _folder(tmp_path / "data" / "3_a", ["sks, Red, red", "sks"])
    meta = _train(tmp_path, tmp_path / "data")
    assert "ss_datasets" not in meta
    assert meta["ss_batch_size_per_device"] == "4" and meta["ss_resolution"] == "(64, 64)"
    assert meta["ss_shuffle_caption"] == "False" and meta["ss_flip_aug"] == "False"
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_a": {"n_repeats": 3, "img_count": 2}}
    # kohya's set_tag_frequency: every occurrence, lower-cased, in the order first met (repeats not counted)
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags == {"3_a": {"sks": 2, "red": 2}} and list(tags["3_a"]) == ["sks", "red"]


def _metadata(o: LoraOptions) -> dict[str, str]:
    run = RunFacts(total_steps=1, started_at=0.0, entries=tuple(build_dataset_index(o).entries))
    info = SaveInfo(path=o.output, step=1, epoch=1, metadata={}, final=True, run=run)  # type: ignore[arg-type]
    return kohya_training_metadata(o, info)


def test_a_fine_tuning_dataset_and_reg_data_beside_the_config(tmp_path):
    """A metadata-file dataset is kohya's fine-tuning kind (metadata_file, no class_tokens/is_reg; tags from the
    metadata); class images given with --reg-data are in no [[datasets]]: ss_reg_dataset_dirs names them."""
    _folder(tmp_path / "images", [None, None])
    meta_file = tmp_path / "meta.json"
    meta_file.write_text(
        json.dumps({"000": {"caption": "x", "tags": "Solo, smile"}, "001": {"caption": "y", "tags": "solo"}})
    )
    _folder(tmp_path / "reg" / "1_person", [None])
    _folder(tmp_path / "a" / "1_a", ["sks"])
    config = tmp_path / "d.toml"
    config.write_text(
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a/1_a'\n"
        "[[datasets]]\nbatch_size = 3\n[[datasets.subsets]]\nimage_dir = 'images'\nmetadata_file = 'meta.json'\n"
        "num_repeats = 2\n",
        encoding="utf-8",
    )
    o = LoraOptions(data=str(config), reg_data=str(tmp_path / "reg"), batch_size=1, resolution=64, min_bucket_reso=64)
    meta = _metadata(o)
    first, second = json.loads(meta["ss_datasets"])
    assert (first["batch_size_per_device"], second["batch_size_per_device"]) == (1, 3)
    assert first["num_reg_images"] == 0  # the run's class images balance against every dataset, in none
    (sub,) = second["subsets"]
    assert second["is_dreambooth"] is False and "is_reg" not in sub and "class_tokens" not in sub
    assert _pick(sub, "metadata_file", "image_dir", "num_repeats", "img_count") == ("meta.json", "images", 2, 2)
    assert second["tag_frequency"] == {"meta.json": {"solo": 2, "smile": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {
        "1_a": {"n_repeats": 1, "img_count": 1},
        "meta.json": {"n_repeats": 2, "img_count": 2},
    }
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_person": {"n_repeats": 1, "img_count": 1}}


def test_a_folder_used_by_two_datasets_is_merged_as_kohya(tmp_path):
    """kohya's merge: ss_dataset_dirs names a folder met again ``name (2)``; ss_tag_frequency counts it once."""
    _folder(tmp_path / "1_a", ["sks, red"])
    config = tmp_path / "d.toml"
    config.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '1_a'\n"
                      "[[datasets]]\nresolution = 128\n[[datasets.subsets]]\nimage_dir = '1_a'\nnum_repeats = 4\n")  # fmt: skip
    meta = _metadata(LoraOptions(data=str(config), resolution=64, min_bucket_reso=64))
    assert json.loads(meta["ss_dataset_dirs"]) == {
        "1_a": {"n_repeats": 1, "img_count": 1},
        "1_a (2)": {"n_repeats": 4, "img_count": 1},
    }
    assert json.loads(meta["ss_tag_frequency"]) == {"1_a": {"red": 1, "sks": 1}}
    assert [len(d["subsets"]) for d in json.loads(meta["ss_datasets"])] == [1, 1]


def test_kohya_reg_uses():
    """DreamBoothDataset's balancing: a first pass with each image's repeats until the training images are
    reached, then one use at a time round the list; images after the first pass fills are unused."""
    assert kohya_reg_uses([1, 1, 1], 7) == [3, 2, 2]
    assert kohya_reg_uses([2, 3], 4) == [2, 3]
    assert kohya_reg_uses([5, 5], 3) == [5, 0]
    assert kohya_reg_uses([2], 0) == [0] and kohya_reg_uses([], 5) == []


def test_lora_info_reads_tags_from_ss_datasets(tmp_path):
    """A file that holds ss_datasets without ss_tag_frequency: lora_info's top tags come from the datasets'
    tables, a folder in two datasets counted once (kohya's merge)."""
    from lora_testutil import fresh_bundle, random_network
    from sdplugin_lora.format import network_metadata, save_lora
    from sdplugin_lora.tools import lora_info

    datasets = [
        {"tag_frequency": {"5_a": {"cat": 3, "dog": 1}}},
        {"tag_frequency": {"5_a": {"cat": 3}, "2_b": {"dog": 4}}},
    ]
    network = random_network(fresh_bundle("sd1"), rank=2)
    meta = network_metadata(family="sd1", rank=2, alpha=2, extra={"ss_datasets": json.dumps(datasets)})
    path = save_lora(tmp_path / "x.safetensors", network.state_dict(), meta)
    assert lora_info(path)["top_tags"] == [("dog", 5), ("cat", 3)]


def test_a_datasets_resize_interpolation_is_its_own_not_its_subsets(tmp_path):
    """kohya's ``ss_datasets[].resize_interpolation`` is the dataset's value (its own, else ``[general]``'s, else
    the run's), whatever its subsets override; each subset records its own."""
    _folder(tmp_path / "a", ["x"])
    _folder(tmp_path / "b", ["y"])
    config = tmp_path / "d.toml"
    config.write_text(
        "[general]\nresize_interpolation = 'lanczos'\n"
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nresize_interpolation = 'area'\n"
        "[[datasets.subsets]]\nimage_dir = 'b'\n"
        "[[datasets]]\nresize_interpolation = 'bicubic'\n"
        "[[datasets.subsets]]\nimage_dir = 'b'\nresize_interpolation = 'area'\n",
        encoding="utf-8",
    )
    meta = _metadata(LoraOptions(data=str(config), resolution=64, min_bucket_reso=64))
    first, second = json.loads(meta["ss_datasets"])
    assert first["resize_interpolation"] == "lanczos"
    assert [s["resize_interpolation"] for s in first["subsets"]] == ["area", "lanczos"]
    assert second["resize_interpolation"] == "bicubic"
    assert [s["resize_interpolation"] for s in second["subsets"]] == ["area"]


def _train_with(tmp_path, data, **values) -> dict[str, str]:
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import train
    from sdplugin_lora.format import read_lora

    values = {"data": str(data), "rank": 2, "max_steps": 1, "batch_size": 2, **values}
    method = LoraMethod(contract_options(LoraMethod, tmp_path, values))
    return read_lora(train(method, bundle=create_tiny_bundle("sd1")).output).metadata


def test_a_non_square_dataset_resolution_is_recorded_as_kohyas_w_h(tmp_path):
    """kohya's ss_datasets ``"resolution": (dataset.width, dataset.height)``: ``[96, 64]`` for a ``[96, 64]``
    dataset, whose buckets are on the area 96*64 (the 3:2 image in the 96x64 bucket, which the square of the
    side, 78**2, would not hold: 6084 // 96 -> 32)."""
    _folder(tmp_path / "data" / "2_a", ["sks, wide", "sks"], sizes=[(96, 64), 64])
    config = tmp_path / "dataset.toml"
    config.write_text(
        "[[datasets]]\nresolution = [96, 64]\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 32\n"
        "[[datasets.subsets]]\nimage_dir = 'data/2_a'\n",
        encoding="utf-8",
    )
    (dataset,) = json.loads(_train_with(tmp_path, config)["ss_datasets"])
    assert dataset["resolution"] == [96, 64]
    buckets = [b["resolution"] for b in dataset["bucket_info"]["buckets"].values()]
    assert [96, 64] in buckets and [64, 64] in buckets


def test_a_non_square_run_resolution_is_recorded_as_kohyas_w_h(tmp_path):
    """kohya's ``ss_resolution`` is ``str(args.resolution)``, the tuple ``(w, h)`` of ``--resolution w,h``, and
    its modelspec.resolution ``"{w}x{h}"`` (sai_model_spec.determine_resolution)."""
    _folder(tmp_path / "data" / "1_a", ["sks, wide"], sizes=[(96, 64)])
    meta = _train_with(
        tmp_path, tmp_path / "data", resolution=78, resolution_size=(96, 64), min_bucket_reso=32, bucket_step=32
    )
    assert meta["ss_resolution"] == "(96, 64)" and meta["modelspec.resolution"] == "96x64"


def test_a_folder_run_records_its_buckets_as_kohya(tmp_path):
    """kohya's folder-run bucket keys (train_network.py 48d368f, 1190-1198): ``ss_enable_bucket``,
    ``ss_bucket_no_upscale``, ``ss_min_bucket_reso``/``ss_max_bucket_reso`` and ``ss_bucket_info`` (the buckets
    the images use with their counts times repeats); sdcore's ``sdcore_bucket_rule`` says kohya's rule ran."""
    _folder(tmp_path / "data" / "2_a", ["sks", "sks"], sizes=[(96, 32), 64])
    o = LoraOptions(data=str(tmp_path / "data"), resolution=64, min_bucket_reso=32, bucket_step=32)
    meta = _metadata(o)
    assert _pick(meta, "ss_enable_bucket", "ss_bucket_no_upscale") == ("True", "False")
    assert _pick(meta, "ss_min_bucket_reso", "ss_max_bucket_reso") == ("32", "1024")
    assert meta["sdcore_bucket_rule"] == "kohya"
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert sorted((tuple(b["resolution"]), b["count"]) for b in buckets.values()) == [((64, 64), 2), ((96, 32), 2)]


def test_the_onetrainer_rule_writes_no_kohya_bucket_sides(tmp_path):
    """Under ``--bucket-rule onetrainer`` kohya's smallest and largest bucket sides played no part (OneTrainer's
    buckets are its aspect ratios on the --bucket-step grid): ``ss_min_bucket_reso``/``ss_max_bucket_reso`` are
    ``"None"``, what kohya writes when its sides play no part (buckets off) and every kohya folder-run file
    holds; ``sdcore_bucket_rule`` names the rule and ``ss_bucket_info`` holds OneTrainer's buckets: the 2:1
    image in its 88x48 (the 64 px area on the 8 px grid), which kohya's rule (sides 64..1024 on 64) has no room
    for."""
    _folder(tmp_path / "data" / "2_a", ["sks", "sks"], sizes=[(96, 48), 64])
    o = LoraOptions(data=str(tmp_path / "data"), resolution=64, bucket_rule="onetrainer", bucket_step=8)
    meta = _metadata(o)
    assert _pick(meta, "ss_min_bucket_reso", "ss_max_bucket_reso") == ("None", "None")
    assert _pick(meta, "ss_enable_bucket", "ss_bucket_no_upscale", "sdcore_bucket_rule") == (
        "True",
        "False",  # OneTrainer always scales an image to cover its bucket
        "onetrainer",
    )
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert sorted((tuple(b["resolution"]), b["count"]) for b in buckets.values()) == [((64, 64), 2), ((88, 48), 2)]


def test_buckets_off_write_kohyas_none_sides(tmp_path):
    """kohya with buckets off (train_util.py 48d368f, DreamBoothDataset): ``min_bucket_reso``/``max_bucket_reso``
    ``None`` and ``bucket_no_upscale`` False whatever was asked, so its folder-run metadata says ``"None"``,
    ``"None"``, ``"False"`` and ``ss_bucket_info`` ``null`` (``json.dumps(None)``), not the unused options."""
    _folder(tmp_path / "data" / "2_a", ["sks", "sks"], sizes=[(96, 48), 64])
    o = LoraOptions(data=str(tmp_path / "data"), resolution=64, buckets=False, bucket_no_upscale=True)
    meta = _metadata(o)
    assert _pick(meta, "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso", "ss_max_bucket_reso") == (
        "False",
        "False",
        "None",
        "None",
    )
    assert meta["ss_bucket_info"] == "null" and meta["sdcore_bucket_rule"] == "kohya"


def test_the_onetrainer_rule_in_ss_datasets(tmp_path):
    """A dataset TOML trained under the OneTrainer rule: each ``ss_datasets`` entry has kohya's
    ``min_bucket_reso``/``max_bucket_reso`` as ``null`` (kohya's value when its sides play no part; kohya's
    entries always hold both keys) and its ``bucket_info`` holds the buckets OneTrainer's rule used; the
    top-level ``sdcore_bucket_rule`` names the rule (the per-dataset bucket keys stay out)."""
    _folder(tmp_path / "2_a", ["sks", "sks"], sizes=[(96, 48), 64])
    config = tmp_path / "d.toml"
    config.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '2_a'\n", encoding="utf-8")
    meta = _metadata(LoraOptions(data=str(config), resolution=64, bucket_rule="onetrainer", bucket_step=8))
    (dataset,) = json.loads(meta["ss_datasets"])
    assert dataset["min_bucket_reso"] is None and dataset["max_bucket_reso"] is None
    assert dataset["enable_bucket"] is True
    assert sorted(tuple(b["resolution"]) for b in dataset["bucket_info"]["buckets"].values()) == [(64, 64), (88, 48)]
    assert meta["sdcore_bucket_rule"] == "onetrainer"
    assert not {"ss_min_bucket_reso", "ss_max_bucket_reso", "ss_bucket_info"} & set(meta)


@pytest.mark.parametrize(
    ("length", "epochs"),
    [({"max_steps": 3}, "2"), ({"max_steps": None, "epochs": 1}, "1"), ({"max_steps": 5, "epochs": 2}, "2")],
)
def test_the_epoch_keys_are_kohyas(tmp_path, length, epochs):
    """kohya's ss_num_batches_per_epoch is its dataloader's length (micro-batches of an epoch) and ss_num_epochs
    ``ceil(max_train_steps / ceil(batches / accumulation))``: 2 images x 3 repeats at batch 2 are 3 batches, 2
    optimizer steps an epoch with accumulation 2, so 3 steps last 2 epochs; --epochs bounds it."""
    _folder(tmp_path / "data" / "3_a", ["sks, red", "sks"])
    meta = _train_with(tmp_path, tmp_path / "data", gradient_accumulation=2, **length)
    assert meta["ss_num_batches_per_epoch"] == "3"
    assert meta["ss_num_epochs"] == epochs

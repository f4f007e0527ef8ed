"""OneTrainer's concepts file as a dataset: every concept object is written here the way OneTrainer's
UI saves it (a full object: every field of ``ConceptConfig``/``ConceptImageConfig``/``ConceptTextConfig``
with its default, ``__version`` 2), then changed where a test needs it. The expected repeats come from
OneTrainer's balancing rule written out here (MGDS ``VariationSorting``: ``REPEATS`` gives
``floor(images * balancing)`` samples per epoch, ``SAMPLES`` gives ``int(balancing)``)."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sdcore.data.captions import process_caption
from sdcore.data.dataset import DatasetProblems, build_dataset_index, scan_dataset
from sdcore.errors import DataError
from sdcore.train.options import TrainOptions

# fmt: off
#: one concept as OneTrainer's UI saves it (ConceptConfig.to_dict() of the default values)
UI_CONCEPT: dict[str, Any] = {
    "__version": 2,
    "image": {
        "__version": 0,
        "enable_crop_jitter": True,
        "enable_random_flip": False, "enable_fixed_flip": False,
        "enable_random_rotate": False, "enable_fixed_rotate": False, "random_rotate_max_angle": 0.0,
        "enable_random_brightness": False, "enable_fixed_brightness": False, "random_brightness_max_strength": 0.0,
        "enable_random_contrast": False, "enable_fixed_contrast": False, "random_contrast_max_strength": 0.0,
        "enable_random_saturation": False, "enable_fixed_saturation": False, "random_saturation_max_strength": 0.0,
        "enable_random_hue": False, "enable_fixed_hue": False, "random_hue_max_strength": 0.0,
        "enable_resolution_override": False, "resolution_override": "512",
        "enable_random_circular_mask_shrink": False, "enable_random_mask_rotate_crop": False,
    },
    "text": {
        "__version": 0,
        "prompt_source": "sample", "prompt_path": "",
        "enable_tag_shuffling": False, "tag_delimiter": ",", "keep_tags_count": 1,
        "tag_dropout_enable": False, "tag_dropout_mode": "FULL", "tag_dropout_probability": 0.0,
        "tag_dropout_special_tags_mode": "NONE", "tag_dropout_special_tags": "", "tag_dropout_special_tags_regex": False,
        "caps_randomize_enable": False, "caps_randomize_mode": "capslock, title, first, random",
        "caps_randomize_probability": 0.0, "caps_randomize_lowercase": False,
    },
    "name": "", "path": "", "seed": -325512069, "enabled": True, "type": "STANDARD",
    "include_subdirectories": False, "image_variations": 1, "text_variations": 1,
    "balancing": 1.0, "balancing_strategy": "REPEATS", "loss_weight": 1.0, "concept_stats": {},
}
# fmt: on

BUCKETS = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128}


def concept(path: Path, **changes: Any) -> dict[str, Any]:
    """A UI-saved concept for ``path``; ``image__x``/``text__x`` change the nested objects."""
    out = copy.deepcopy(UI_CONCEPT)
    out["path"] = str(path)
    out["name"] = path.name
    for key, value in changes.items():
        if "__" in key:
            part, name = key.split("__", 1)
            out[part][name] = value
        else:
            out[key] = value
    return out


def images(folder: Path, names: list[str], captions: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (64, 64), (40 * i % 255, 90, 160)).save(folder / name)
    for stem, text in (captions or {}).items():
        (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
    return folder


def write_concepts(path: Path, concepts: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(concepts, indent=4), encoding="utf-8")
    return path


def ot_samples(n_images: int, balancing: float, strategy: str) -> int:
    """OneTrainer's samples per epoch of a concept, written out from its VariationSorting."""
    return math.floor(n_images * balancing) if strategy == "REPEATS" else int(balancing)


def index_of(path: Path, **options: Any):
    return build_dataset_index(TrainOptions(data=str(path), **{**BUCKETS, **options}), verify=False)


def test_ui_concepts_map_to_subsets_with_onetrainers_repeats_and_prompt_sources(tmp_path):
    a = images(tmp_path / "a", ["1.png", "2.png", "3.png", "1-masklabel.png", "x.gif"], {"1": "a1, tag", "2": ""})
    b = images(tmp_path / "b", ["p.png", "q.jpg"])
    (tmp_path / "b" / "sub").mkdir()
    images(tmp_path / "b" / "sub", ["r.png", "s.png"])
    images(tmp_path / "b" / ".hidden", ["h.png"])
    c = images(tmp_path / "c", ["cat one.png", "dog.v2.webp"])
    d = images(tmp_path / "d", ["z.png"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\n  second prompt  \n", encoding="utf-8")
    cfg = write_concepts(
        tmp_path / "training_concepts" / "concepts.json",
        [
            concept(a, balancing=2.0, text__enable_tag_shuffling=True, text__keep_tags_count=1),
            concept(
                b,
                include_subdirectories=True,
                balancing=8,
                balancing_strategy="SAMPLES",
                text__prompt_source="concept",
                text__prompt_path=str(prompts),
                image__enable_random_flip=True,
                loss_weight=0.5,
            ),
            concept(
                c,
                text__prompt_source="filename",
                image__enable_crop_jitter=False,
                text__tag_dropout_enable=True,
                text__tag_dropout_mode="RANDOM",
                text__tag_dropout_probability=0.25,
            ),
            concept(d, enabled=False),
        ],
    )
    index = index_of(cfg)
    by_dir = {s.image_dir: s for s in index.subsets}
    assert list(by_dir) == [a, b, c]  # the disabled concept is not there...
    assert any("disabled; skipped" in s.reason and "'d'" in s.reason for s in index.skipped)  # ...with a note
    # repeats: OneTrainer's samples per epoch over the images it collects (masks and .gif not among them)
    assert by_dir[a].repeats * 3 == ot_samples(3, 2.0, "REPEATS") and by_dir[a].repeats == 2
    assert by_dir[b].repeats * 4 == ot_samples(4, 8, "SAMPLES") and by_dir[b].repeats == 2
    assert by_dir[c].repeats == 1
    entries = {e.path.relative_to(tmp_path).as_posix(): e for e in index.entries}
    assert sorted(entries) == [
        "a/1.png",
        "a/2.png",
        "a/3.png",
        "b/p.png",
        "b/q.jpg",
        "b/sub/r.png",
        "b/sub/s.png",
        "c/cat one.png",
        "c/dog.v2.webp",
    ]
    # prompts: sample = the image's .txt, concept = the prompt file's lines, filename = the stem
    assert entries["a/1.png"].caption == "a1, tag" and entries["a/2.png"].caption == ""
    assert entries["a/3.png"].caption == "" and tmp_path / "a" / "3.png" in index.missing_captions
    assert {entries[k].caption for k in entries if k.startswith("b/")} == {"first prompt\nsecond prompt"}
    assert entries["c/cat one.png"].caption == "cat one" and entries["c/dog.v2.webp"].caption == "dog.v2"
    sa, sb, sc = by_dir[a], by_dir[b], by_dir[c]
    assert (sa.shuffle_caption, sa.keep_tokens, sa.tag_dropout, sa.caption_dropout) == (True, 1, 0.0, 0.0)
    assert (sc.shuffle_caption, sc.tag_dropout, sc.caption_dropout) == (False, 0.25, 0.0)
    assert (sa.flip, sb.flip, sc.flip) == (False, True, False)
    # crop jitter (on by default): with latent caching (TrainOptions' default) drawn once, kept in the cache
    assert (sa.random_crop_once, sb.random_crop_once, sc.random_crop_once) == (True, True, False)
    assert not (sa.random_crop or sb.random_crop or sc.random_crop)
    assert (sa.loss_weight, sb.loss_weight, sc.loss_weight) == (1.0, 0.5, 1.0)
    assert sb.recursive and not sa.recursive
    assert (sa.enable_wildcard, sb.enable_wildcard, sc.enable_wildcard) == (True, True, False)
    assert index.samples_per_epoch == 3 * 2 + 4 * 2 + 2


def test_balancing_rule_over_many_values(tmp_path):
    folder = images(tmp_path / "f", [f"{i}.png" for i in range(4)])
    for strategy, balancing in [
        ("REPEATS", 1),
        ("REPEATS", 3.0),
        ("REPEATS", 0.5),
        ("REPEATS", 1.9),
        ("SAMPLES", 4),
        ("SAMPLES", 12.7),
        ("SAMPLES", 6),
        ("SAMPLES", 2),
    ]:
        cfg = write_concepts(
            tmp_path / f"{strategy}{balancing}.json",
            [concept(folder, balancing=balancing, balancing_strategy=strategy)],
        )
        samples = ot_samples(4, balancing, strategy)
        if samples % 4 == 0:
            assert index_of(cfg).subsets[0].repeats == samples // 4, (strategy, balancing)
        else:
            with pytest.raises(DatasetProblems) as info:
                index_of(cfg)
            (line,) = info.value.problems
            assert f"= {samples} samples per epoch from 4 images" in line and "whole number" in line


def test_hidden_files_count_neither_for_balancing_nor_for_training(tmp_path):
    folder = images(tmp_path / "f", ["1.png", "2.png", ".thumb.png"])
    cfg = write_concepts(tmp_path / "c.json", [concept(folder, balancing=4, balancing_strategy="SAMPLES")])
    index = index_of(cfg)
    assert sorted(e.path.name for e in index.entries) == ["1.png", "2.png"]
    assert index.subsets[0].repeats == 2  # 4 samples from the 2 images that train, not from 3 files


def test_caption_options_act_like_onetrainer(tmp_path):
    """The mapped subset's caption processing gives OneTrainer's results: shuffling keeps the first
    keep_tags_count tags and joins with ', '; RANDOM dropout at 1.0 leaves only the kept tags; FULL
    with no kept tag at 1.0 leaves nothing."""
    folder = images(tmp_path / "f", ["1.png"], {"1": "sks,  b, c ,d"})
    cases = {
        "shuffle": dict(text__enable_tag_shuffling=True, text__keep_tags_count=1),
        "random": dict(
            text__tag_dropout_enable=True,
            text__tag_dropout_mode="RANDOM",
            text__tag_dropout_probability=1.0,
            text__keep_tags_count=1,
        ),
        "full": dict(text__tag_dropout_enable=True, text__tag_dropout_probability=1.0, text__keep_tags_count=0),
    }
    for name, changes in cases.items():
        cfg = write_concepts(tmp_path / f"{name}.json", [concept(folder, **changes)])
        (entry,) = index_of(cfg).entries
        s = entry.subset
        out = {
            process_caption(
                entry.caption,
                shuffle=s.shuffle_caption,
                keep_tokens=s.keep_tokens,
                tag_dropout=s.tag_dropout,
                caption_dropout=s.caption_dropout,
                enable_wildcard=s.enable_wildcard,
                rng=random.Random(k),
            )
            for k in range(40)
        }
        if name == "shuffle":
            assert all(o.startswith("sks, ") and sorted(o.split(", ")) == ["b", "c", "d", "sks"] for o in out)
            assert len(out) > 1
        elif name == "random":
            assert out == {"sks"}
        else:
            assert out == {""}


def test_multi_line_prompts_pick_one_line_and_braces_are_refused(tmp_path):
    folder = images(tmp_path / "f", ["1.png", "2.png"], {"1": "line one\nline two\n", "2": "a {b|c} d"})
    cfg = write_concepts(tmp_path / "c.json", [concept(folder)])
    index = scan_dataset(TrainOptions(data=str(cfg), **BUCKETS), verify=False)
    (problem,) = index.problems
    assert "1 prompt(s) contain '{' or '}'" in problem and "2.png" in problem
    entry = next(e for e in index.entries if e.path.name == "1.png")
    picks = {process_caption(entry.caption, enable_wildcard=True, rng=random.Random(k)) for k in range(30)}
    assert picks == {"line one", "line two"}


def test_everything_sdcore_cannot_reproduce_is_refused_by_name_at_once(tmp_path):
    folder = images(tmp_path / "f", ["1.png", "2.png"])
    cfg = write_concepts(
        tmp_path / "c.json",
        [
            concept(folder, type="PRIOR_PREDICTION", image__enable_random_rotate=True, image__enable_fixed_flip=True),
            concept(
                folder,
                image_variations=3,
                image__enable_resolution_override=True,
                image__resolution_override="64,96",
                text__caps_randomize_enable=True,
                image__enable_random_hue=True,
            ),
            concept(
                folder,
                text__tag_dropout_enable=True,
                text__tag_dropout_mode="RANDOM WEIGHTED",
                text__tag_dropout_probability=0.3,
            ),
            concept(
                folder,
                text__tag_dropout_enable=True,
                text__tag_dropout_probability=0.3,
                text__tag_dropout_special_tags_mode="WHITELIST",
                text__tag_dropout_special_tags="x",
            ),
            concept(folder, text__tag_dropout_enable=True, text__tag_dropout_probability=0.3),  # FULL, keeps 1
            concept(folder, text__enable_tag_shuffling=True, text__tag_delimiter=";"),
            concept(folder, text__prompt_source="concept", text__prompt_path=str(tmp_path / "missing.txt")),
            concept(folder, image__enable_resolution_override=True, image__resolution_override="512x760"),
            concept(tmp_path / "nowhere"),
            concept(folder, loss_weight=-1),
        ],
    )
    with pytest.raises(DatasetProblems) as info:
        index_of(cfg)
    text = "\n".join(info.value.problems)
    for needle in [
        "concept 0 ('f'): type PRIOR_PREDICTION",
        "concept 0 ('f'): image.enable_random_rotate",
        "concept 0 ('f'): image.enable_fixed_flip",
        "concept 1 ('f'): image_variations 3 with a resolution list",
        "concept 1 ('f'): text.caps_randomize_enable",
        "concept 1 ('f'): image.enable_random_hue",
        "concept 2 ('f'): text.tag_dropout_mode 'RANDOM WEIGHTED'",
        "concept 3 ('f'): text.tag_dropout_special_tags_mode 'WHITELIST'",
        "concept 4 ('f'): text.tag_dropout_mode FULL with keep_tags_count 1",
        "concept 5 ('f'): text.tag_delimiter ';'",
        "concept 6 ('f'): text.prompt_path",
        "concept 7 ('f'): image.resolution_override '512x760'",
        "concept 8 ('nowhere'): image folder",
        "concept 9 ('f'): loss_weight",
    ]:
        assert needle in text, needle
    assert len(info.value.problems) == 15, info.value.problems  # concept 3 is FULL with a kept tag too


def test_defaults_settings_away_from_their_switch_are_not_refused(tmp_path):
    """An augmentation's strength without its switch does nothing in OneTrainer: no refusal."""
    folder = images(tmp_path / "f", ["1.png"])
    cfg = write_concepts(
        tmp_path / "c.json",
        [
            concept(
                folder,
                image__random_rotate_max_angle=30.0,
                text__tag_dropout_probability=0.5,
                text__tag_dropout_mode="RANDOM WEIGHTED",
                image__enable_resolution_override=True,
                image__resolution_override="96",
            )
        ],
    )
    (subset,) = index_of(cfg).subsets
    assert subset.tag_dropout == 0.0 and subset.resolution == 96


def test_resolution_override_forms_read_as_onetrainer(tmp_path):
    """MGDS reads a concept's resolution_override like the run's resolution (mgds 3a6994a
    src/mgds/pipelineModules/AspectBucketing.py:175-190): int() per comma part, and with aspect_ratio_bucketing
    an 'x' without a comma is a fixed WIDTHxHEIGHT every image covers and is cropped to (:182-208)."""
    folder = images(tmp_path / "f", ["1.png"])

    def override(value: str, **options: Any):
        cfg = write_concepts(
            tmp_path / "c.json",
            [concept(folder, image__enable_resolution_override=True, image__resolution_override=value)],
        )
        return index_of(cfg, **options).subsets[0]

    assert override("+96").resolution == 96  # int("+96")
    assert (override(" 64, 96").resolution, override(" 64, 96").resolutions) == (96, (64, 96))
    square = override("128x128")
    assert (square.resolution, square.resolutions, square.buckets) == (128, (), False)
    wide = override("192x128")  # width 192, height 128: the side of the area and the pair, buckets off
    assert (wide.resolution, wide.resolution_size, wide.resolutions, wide.buckets) == (156, (192, 128), (), False)
    for value, options, needle in [
        ("96x64", {}, "'96x64': OneTrainer's fixed size (every image scaled to cover 96x64"),
        ("100x100", {}, "both sides are multiples of 64"),
        ("128x128", {"buckets": False}, "'128x128': OneTrainer reads a fixed size only with aspect_ratio_bucketing"),
        ("64,", {}, "'' is not a number"),
    ]:
        with pytest.raises(DatasetProblems) as info:
            override(value, **options)
        (problem,) = info.value.problems
        assert f"concept 0 ('f'): image.resolution_override {value!r}" in problem and needle in problem, problem


def test_image_variations_refused_only_where_sdcore_differs(tmp_path):
    """OneTrainer caches image_variations copies only with latent caching (OneTrainer 23df3832
    modules/dataLoader/mixin/DataLoaderText2ImageMixin.py:347,356: the image DiskCache is added only then) and
    cycles them by epoch (mgds DiskCache.py:137, variation % variations). What a copy fixes that sdcore does not
    redraw anyway is a resolution list's draw: refused there; elsewhere a note."""
    folder = images(tmp_path / "f", ["1.png"])
    listed = {"image__enable_resolution_override": True, "image__resolution_override": "64,96"}
    cfg = write_concepts(tmp_path / "c.json", [concept(folder, image_variations=4)])
    index = index_of(cfg)
    assert len(index.subsets) == 1
    assert any("image_variations 4: sdcore caches each image once" in s.reason for s in index.skipped)
    cfg = write_concepts(tmp_path / "c.json", [concept(folder, image_variations=4, **listed)])
    index = index_of(cfg, cache_latents=False)
    assert index.subsets[0].resolutions == (64, 96)
    assert any("image_variations 4: no effect without latent caching" in s.reason for s in index.skipped)
    with pytest.raises(DatasetProblems) as info:
        index_of(cfg)
    assert "image_variations 4 with a resolution list" in info.value.problems[0]
    cfg = write_concepts(tmp_path / "c.json", [concept(folder, text_variations=2)])
    with pytest.raises(DatasetProblems, match="text_variations 2"):
        index_of(cfg)


def test_validation_concept_is_held_out_and_presets_point_at_the_file(tmp_path):
    from sdcore.train.validation import held_out_entries, validation_option_problems

    train = images(tmp_path / "train", ["1.png", "2.png"])
    val = images(tmp_path / "val", ["v.png"])
    concepts = write_concepts(
        tmp_path / "ot" / "training_concepts" / "concepts.json",
        [concept(train), concept(val, type="VALIDATION", balancing=5)],
    )
    index = index_of(concepts)
    held = held_out_entries(index, seed=1)
    assert [index.entries[i].path for i in held] == [val / "v.png"]
    assert validation_option_problems(TrainOptions(data=str(concepts), validate_every_n_steps=2)) == []
    assert validation_option_problems(TrainOptions(data=str(tmp_path / "x"), validate_every_n_steps=2))
    # a preset names the file relative to OneTrainer's folder, or embeds the list
    preset = tmp_path / "ot" / "training_presets" / "my.json"
    preset.parent.mkdir(parents=True)
    preset.write_text(json.dumps({"concept_file_name": "training_concepts/concepts.json", "concepts": None}))
    assert [s.image_dir for s in index_of(preset).subsets] == [train, val]
    preset.write_text(json.dumps({"concepts": [concept(val)]}))
    assert [s.image_dir for s in index_of(preset).subsets] == [val]


def test_old_concept_versions_migrate_and_bad_files_are_clear_errors(tmp_path):
    folder = images(tmp_path / "f", ["1.png", "2.png"])
    old = {"name": "x", "path": str(folder), "repeats": 3.0, "validation_concept": False}
    (subset,) = index_of(write_concepts(tmp_path / "old.json", [old])).subsets
    assert subset.repeats == 3 and subset.validation_split == 0.0
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        index_of(bad)
    bad.write_text(json.dumps({"lr": 1}))
    with pytest.raises(DataError, match="concept_file_name"):
        index_of(bad)
    with pytest.raises(DataError, match="lists no concept"):
        index_of(write_concepts(tmp_path / "empty.json", []))


def test_data_check_reads_a_concepts_file(tmp_path):
    from click.testing import CliRunner
    from sdcore.builtin.data_commands import data_group

    folder = images(tmp_path / "f", ["1.png", "2.png"], {"1": "a, b", "2": "b"})
    cfg = write_concepts(tmp_path / "concepts.json", [concept(folder, balancing=3)])
    args = ["check", str(cfg), "--resolution", "64", "--json"]
    result = CliRunner().invoke(data_group, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["images"], report["samples_per_epoch"], report["errors"]) == (2, 6, [])
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    write_concepts(cfg, [concept(folder, image__enable_random_rotate=True)])
    result = CliRunner().invoke(build_cli(get_plugin_manager()), ["data", *args[:-1]])
    assert result.exit_code == 1 and "image.enable_random_rotate: sdcore has no rotation" in result.output
    assert "Traceback" not in result.output


def test_crop_jitter_draws_at_every_use_without_cache_and_once_per_image_with_it(tmp_path):
    """MGDS ``ScaleCropImage`` draws the crop jitter offset ``randint(0, scaled - crop)`` per side (uniform in
    the excess) for each variation it is asked for; without latent caching that is every use (sdcore's
    ``random_crop``), with it the image ``DiskCache`` keeps the variation it filled for every epoch
    (``variation % image_variations``): one offset per image for the run (``random_crop_once``), which sdcore
    keeps in the bucket assignment, so the cached latent is encoded from that crop. Wide images (96x64) at 64
    square leave 32 pixels of excess across."""
    import numpy as np
    from sdcore.data.loading import load_training_image, resize_for_bucket
    from sdcore.train.data import build_train_data

    folder = tmp_path / "wide"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = write_concepts(tmp_path / "c.json", [concept(folder)])
    fixed = {"buckets": False, "resolution": 64}
    uncached = index_of(cfg, cache_latents=False, **fixed).subsets[0]
    assert (uncached.random_crop, uncached.random_crop_once) == (True, False)

    def plan(seed: int):
        options = TrainOptions(data=str(cfg), seed=seed, batch_size=1, **{**BUCKETS, **fixed})
        return build_train_data(options, balance_class=False)

    data = plan(1)
    assert (data.index.subsets[0].random_crop, data.index.subsets[0].random_crop_once) == (False, True)
    crops = [a.crop for a in data.assignments]
    assert all(a.resized == (96, 64) and a.bucket == (64, 64) for a in data.assignments)
    assert all(0 <= left <= 32 and top == 0 for left, top in crops)
    assert len(set(crops)) > 2  # drawn per image, not the centre crop (16, 0) for all
    assert crops == [a.crop for a in plan(1).assignments]  # the same crop every run (and every epoch)
    assert crops != [a.crop for a in plan(2).assignments]  # a draw of the run's seed
    for ref in data.epoch_plan(3)[0]:
        assert data.crop_of(ref) is None  # no redraw per use: the assignment's crop is the image's
    # what the latent cache encodes: the resized image cut at the drawn offset
    entry, assignment = data.entries[0], data.assignments[0]
    pixels, _, coords = load_training_image(entry, assignment, flip=False)
    left = assignment.crop[0]
    resized = np.asarray(resize_for_bucket(Image.open(entry.path).convert("RGB"), (96, 64), None), np.float32)
    assert coords == (0, left)
    expected = resized[:, left : left + 64].transpose(2, 0, 1) / 127.5 - 1.0
    assert np.abs(pixels - expected).max() < 1e-6

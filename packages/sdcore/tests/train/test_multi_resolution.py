"""Several training resolutions (``--resolutions 64,96``; OneTrainer's ``resolution: "512,768"``).

OneTrainer's rule (mgds ``AspectBucketing``/``SingleAspectCalculation``): each image gets
``rand.choice(list)`` from a generator of ``(seed, variation, image)``, then the nearest-aspect bucket
of that resolution; batches are sorted by bucket. Without latent caching the variation is the epoch
(every repeat in an epoch shares the draw); with cached latents and one image variation it is 0 for the
whole run. The reference rule below is rewritten from that description and compared with the plans.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from sdcore.data.buckets import assign_bucket, make_buckets
from sdcore.data.resolutions import image_key, parse_resolutions
from sdcore.errors import ConfigError
from sdcore.testing.datasets import make_tiny_dataset
from sdcore.train.data import build_train_data
from sdcore.train.options import TrainOptions, apply_model_defaults

BUCKETS = {"min_bucket_reso": 32, "max_bucket_reso": 192, "bucket_step": 32}


def reference_choice(choices: tuple[int, ...], seed: int, variation: int, key: str) -> int:
    """OneTrainer's ``rand.choice(target_resolutions)`` with sdcore's seeded generator."""
    return random.Random(f"sdcore-resolution:{seed}:{variation}:{key}").choice(choices)


def _data(root: Path, **kw):
    o = TrainOptions(model="tiny:sd1", data=str(root), **{"batch_size": 2, **BUCKETS, **kw})
    apply_model_defaults(o)
    return o, build_train_data(o, balance_class=False)


def _mixed_dataset(root: Path) -> Path:
    make_tiny_dataset(root, n=5, size=(96, 64), repeats=2)
    make_tiny_dataset(root, n=4, size=(64, 128), repeats=1, concept="tall")
    return root


def test_each_epoch_trains_each_image_at_its_drawn_resolution_in_that_resolutions_buckets(tmp_path):
    o, data = _data(_mixed_dataset(tmp_path / "d"), resolutions="64,96", seed=7)
    assert o.resolution == 96  # the largest: the memory plan's size
    images = {e.path for e in data.entries}
    assert len(data.entries) == 2 * len(images) == 18  # one entry per (image, resolution)
    for entry, assignment in zip(data.entries, data.assignments, strict=True):  # sdcore's buckets of that size
        r = entry.subset.resolution
        assert assignment == assign_bucket(
            entry.size, make_buckets(r, min_reso=32, max_reso=192, step=32), resolution=r
        )
    draws = []
    for epoch in range(4):
        plan = data.epoch_plan(epoch)
        used = [data.entries[ref.entry] for batch in plan for ref in batch]
        by_image: dict[Path, set[int]] = {}
        for entry in used:
            by_image.setdefault(entry.path, set()).add(entry.subset.resolution)
        assert set(by_image) == images and Counter(e.path for e in used) == {e.path: e.repeats for e in used}
        for entry in used:  # every repeat of an image in an epoch shares one draw: the reference rule's
            assert by_image[entry.path] == {reference_choice((64, 96), 7, epoch, image_key(entry))}
        for batch in plan:  # single-resolution, single-bucket batches
            assert len({data.assignments[ref.entry].bucket for ref in batch}) == 1
            assert len({data.entries[ref.entry].subset.resolution for ref in batch}) == 1
        draws.append({p: next(iter(v)) for p, v in by_image.items()})
    assert len({tuple(sorted(d.items())) for d in draws}) > 1  # drawn again per epoch
    # the same seed plans the same epochs from scratch (a resumed run), another seed other draws
    _, again = _data(tmp_path / "d", resolutions="64,96", seed=7)
    assert [again.epoch_plan(e) for e in range(4)] == [data.epoch_plan(e) for e in range(4)]
    _, other = _data(tmp_path / "d", resolutions="64,96", seed=8)
    assert [other.epoch_plan(e) for e in range(4)] != [data.epoch_plan(e) for e in range(4)]


def test_the_draw_is_uniform_over_the_list_as_written(tmp_path):
    root = make_tiny_dataset(tmp_path / "many", n=60, size=32)
    _, data = _data(root, resolutions="32,32,64", seed=3, batch_size=1)  # 32 listed twice: 2/3 of the draws
    counts: Counter[int] = Counter()
    for epoch in range(5):
        for batch in data.epoch_plan(epoch):
            counts[data.entries[batch[0].entry].subset.resolution] += 1
    assert sum(counts.values()) == 300 and 0.58 < counts[32] / 300 < 0.75


def test_once_draws_one_resolution_for_the_whole_run_and_keeps_only_that_entry(tmp_path):
    _, data = _data(_mixed_dataset(tmp_path / "d"), resolutions="64,96", resolution_draw="once", seed=5)
    assert len(data.entries) == 9 and not data.index.resolution_groups  # the drawn entry alone
    for entry in data.entries:  # OneTrainer with cached latents and image_variations 1: variation 0
        assert entry.subset.resolution == reference_choice((64, 96), 5, 0, image_key(entry))
    assert {e.subset.resolution for e in data.entries} == {64, 96}
    plans = [data.epoch_plan(e) for e in range(3)]
    assert all({r.entry for b in p for r in b} == set(range(9)) for p in plans)


def test_the_validation_split_holds_out_an_image_at_all_its_resolutions(tmp_path):
    _, data = _data(_mixed_dataset(tmp_path / "d"), resolutions="64,96", validation_split=0.3, seed=1)
    held = {data.entries[i].path for i in data.held_out}
    assert held and len(data.held_out) == 2 * len(held)
    trained = {data.entries[r.entry].path for e in range(3) for b in data.epoch_plan(e) for r in b}
    assert not trained & held and len(data.trained_entries) == 9 - len(held)  # one per image
    # the run's facts (LoRA's ss_validation... counts) count a held-out image once, with its repeats
    assert len(data.held_out_entries) == len(held) and {e.path for e in data.held_out_entries} == held
    assert sum(e.repeats for e in data.held_out_entries) < sum(data.entries[i].repeats for i in data.held_out)


def test_a_subset_copied_per_resolution_is_one_folder_in_the_dataset_strengths(tmp_path):
    """sdcore_dataset_strengths (LoRA metadata) names each folder once, though ``--resolutions`` trains its
    images through one subset copy per resolution."""
    from sdplugin_lora.method import _dataset_strengths

    root = tmp_path / "d"
    make_tiny_dataset(root, n=6, size=(96, 64), repeats=1)
    (tmp_path / "data.toml").write_text(
        f"[[datasets]]\nnetwork_multiplier = -1.0\n[[datasets.subsets]]\nimage_dir = '{next(root.iterdir())}'\n"
    )
    for draw in ("once", "epoch"):
        _, data = _data(tmp_path / "data.toml", resolutions="64,96", resolution_draw=draw, seed=3)
        assert {e.subset.resolution for e in data.entries} == {64, 96}  # the copies are there
        assert list(_dataset_strengths(tuple(data.entries)).values()) == [-1.0]


def test_latents_are_cached_once_per_image_and_resolution_on_disk_too(tmp_path):
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.cache import LatentCache, cache_file

    _, data = _data(make_tiny_dataset(tmp_path / "d", n=3, size=(96, 64)), resolutions="64,96", seed=2)
    bundle = create_tiny_bundle("sd1")
    cache = LatentCache(bundle, data.entries, data.assignments, seed=2, to_disk=True)
    cache.fill(data.needed_latents())
    assert cache.encoded == 6 and cache.reused == 0  # 3 images x 2 resolutions, never per epoch
    shapes = {cache.get(i, False)[0].shape[1:] for i in range(6)}
    # 64x64 and 96x96 buckets at the tiny VAE's scale 8: at 96 the 96x64 image is as far from 96x96 as from
    # 128x64 (|w/h - 1.5| = 0.5 both) and kohya's argmin takes the first in sorted order, 96x96
    assert shapes == {(8, 8), (12, 12)}
    files = {cache_file(e, a, cache.vae_id, None) for e, a in zip(data.entries, data.assignments, strict=True)}
    assert len(files) == 6 and all(f.exists() for f in files)
    for epoch in range(3):  # every planned sample's latent is one of these
        assert all((r.entry, False) in cache.latents for b in data.epoch_plan(epoch) for r in b)
    again = LatentCache(bundle, data.entries, data.assignments, seed=2, to_disk=True)
    again.fill(data.needed_latents())
    assert again.encoded == 0 and again.reused == 6


def test_bad_lists_and_a_conflicting_resolution_are_preflight_problems():
    from sdcore.train.preflight import resolutions_problems

    assert parse_resolutions("512, 768,1024") == (512, 768, 1024) and parse_resolutions("") == ()
    for bad in ("512,x", "512,,768", "0,512", "1024x768"):
        with pytest.raises(ConfigError, match="comma list of positive whole numbers"):
            parse_resolutions(bad)
    assert resolutions_problems(TrainOptions(resolutions="64,abc"))[0].startswith("--resolutions '64,abc'")
    (conflict,) = resolutions_problems(TrainOptions(resolution=512, resolutions="64,96"))
    assert "largest of the list (96)" in conflict
    assert resolutions_problems(TrainOptions(resolution=96, resolutions="64,96")) == []
    assert "only matters with --resolutions" in resolutions_problems(TrainOptions(resolution_draw="once"))[0]
    from sdcore.train.preflight import option_problems

    assert any(p.startswith("--resolutions '64,abc'") for p in option_problems(TrainOptions(resolutions="64,abc")))


def test_three_sizes_given_to_resolution_point_at_resolutions(sd_cli):
    from sdcore.plugins import get_plugin_manager

    result = sd_cli(["train", "lora", "--model", "tiny:sd1", "--resolution", "512,768,1024"], pm=get_plugin_manager())
    assert result.exit_code == 2 and "several: --resolutions 512,768,1024" in result.output


def test_the_memory_plan_is_sized_for_the_largest_resolution(tmp_path):
    from sdcore.train.preflight import run_preflight
    from sdplugin_lora.method import LoraMethod, LoraOptions

    data = make_tiny_dataset(tmp_path / "d", n=2, size=64)
    common = {"model": "tiny:sd1", "data": str(data), "output": str(tmp_path / "o.safetensors"), **BUCKETS}
    peaks = {}
    for name, kw in (("64", {"resolution": 64}), ("96", {"resolution": 96}), ("both", {"resolutions": "64,96"})):
        o = LoraOptions(**common, **kw)
        apply_model_defaults(o)
        report = run_preflight(LoraMethod(o), o)
        assert not report.problems and report.memory is not None
        peaks[name] = (report.memory.estimate.activations, report.memory.estimate.settings["resolution"])
    assert peaks["both"] == peaks["96"] == (peaks["96"][0], 96) and peaks["96"][0] > peaks["64"][0]


def _cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--resolutions", "64,96",
            "--min-bucket-reso", "32", "--max-bucket-reso", "192", "--bucket-step", "32", "--batch-size", "2",
            "--no-progress", "--rank", "2", "--save-dtype", "fp32", "--lr", "0.01", "--seed", "4",
            "--output", str(out), *extra]  # fmt: skip


def test_a_lora_trains_at_two_resolutions_from_the_cli_and_resumes_exactly(tmp_path, sd_cli):
    import torch
    from safetensors.torch import load_file
    from sdcore.plugins import get_plugin_manager

    data = make_tiny_dataset(tmp_path / "d", n=3, size=(96, 64), repeats=2)
    pm = get_plugin_manager()
    whole = sd_cli(_cli_args(data, tmp_path / "whole.safetensors", "--max-steps", "6"), pm=pm)
    assert whole.exit_code == 0, whole.output
    assert "train at one of 64, 96 each epoch" in whole.output
    part = tmp_path / "part.safetensors"
    first = sd_cli(_cli_args(data, part, "--max-steps", "4"), pm=pm)
    assert first.exit_code == 0, first.output
    resumed = sd_cli(_cli_args(data, part, "--max-steps", "6", "--resume", "latest"), pm=pm)
    assert resumed.exit_code == 0, resumed.output
    a, b = load_file(str(tmp_path / "whole.safetensors")), load_file(str(part))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _onetrainer(tmp_path: Path, concepts: list[dict], **config) -> TrainOptions:
    import sys

    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
    from test_onetrainer import concept

    path = tmp_path / "config.json"
    body = {"training_method": "LORA", "model_type": "STABLE_DIFFUSION_15", "base_model_name": "tiny:sd1",
            "output_model_destination": "models/lora.safetensors", "output_model_format": "KOHYA_LORA",
            "concepts": [concept(Path(c.pop("path")), **c) for c in concepts], **config}  # fmt: skip
    path.write_text(json.dumps(body), encoding="utf-8")
    return load_options(LoraOptions, path, notes=[])


def test_onetrainer_resolution_lists_map_to_resolutions(tmp_path):
    from sdcore.data.dataset import build_dataset_index

    a = make_tiny_dataset(tmp_path / "a", n=2) / "1_sks"
    b = make_tiny_dataset(tmp_path / "b", n=2, concept="other") / "1_other"
    cached = _onetrainer(tmp_path, [{"path": str(a)}], resolution="512, 768", latent_caching=True)
    assert (cached.resolution, cached.resolutions, cached.resolution_draw) == (768, "512,768", "once")
    live = _onetrainer(tmp_path, [{"path": str(a)}], resolution="512,768", latent_caching=False)
    assert (live.resolution, live.resolutions, live.resolution_draw) == (768, "512,768", "epoch")
    single = _onetrainer(tmp_path, [{"path": str(a)}], resolution="640")
    assert (single.resolution, single.resolutions) == (640, "")
    # a concept's override list replaces the run's; a single override is that resolution alone
    o = _onetrainer(
        tmp_path,
        [{"path": str(a), "image__enable_resolution_override": True, "image__resolution_override": "64,96"},
         {"path": str(b), "image__enable_resolution_override": True, "image__resolution_override": "80"}],
        resolution="512,768", latent_caching=False,
    )  # fmt: skip
    subsets = {s.image_dir: s for s in build_dataset_index(o).subsets}
    assert (subsets[a].resolution, subsets[a].resolutions) == (96, (64, 96))
    assert (subsets[b].resolution, subsets[b].resolutions) == (80, ())
    # SD1.5's grid is 8: 1024x760 is on it (OneTrainer trains it as written); 1024x2 rounds to a side of 0
    assert _onetrainer(tmp_path, [{"path": str(a)}], resolution="1024x760").resolution_size == (1024, 760)
    with pytest.raises(ConfigError, match=r"resolution '1024x2': on OneTrainer's grid of 8 this size has a side of 0"):
        _onetrainer(tmp_path, [{"path": str(a)}], resolution="1024x2")


def test_onetrainer_fixed_size_override_is_a_w_h_crop(tmp_path):
    """A concept's ``resolution_override`` "128x64" (MGDS AspectBucketing: width 128, height 64): every image covers
    128x64 and is cropped to it, sdcore's W,H without buckets; a size off the family's grid is rounded onto it."""
    from sdcore.data.dataset import assign_buckets, build_dataset_index

    a = make_tiny_dataset(tmp_path / "a", n=2) / "1_sks"
    o = _onetrainer(
        tmp_path, [{"path": str(a), "image__enable_resolution_override": True, "image__resolution_override": "128x64"}]
    )
    (tmp_path / "run").mkdir()
    run = _onetrainer(tmp_path / "run", [{"path": str(a)}], resolution="128x64", aspect_ratio_bucketing=True)
    for options in (o, run):  # the concept's override, and the run's own resolution
        index = build_dataset_index(options)
        (subset,) = index.subsets
        assert (subset.resolution, subset.resolution_size, subset.buckets) == (90, (128, 64), False)
        assignment = assign_buckets(index)[0]
        assert index.entries[0].size == (64, 64)
        assert (assignment.bucket, assignment.resized, assignment.crop) == ((128, 64), (128, 128), (0, 32))
    # off the 64 grid but on SD1.5's grid of 8 (OneTrainer's AspectBucketing quantization): trained as written;
    # 97x64 is rounded to 96x64, as OneTrainer rounds it
    for written in ("96x64", "97x64"):
        o = _onetrainer(
            tmp_path,
            [{"path": str(a), "image__enable_resolution_override": True, "image__resolution_override": written}],
        )
        (subset,) = build_dataset_index(o).subsets
        assert (subset.resolution_size, subset.buckets) == ((96, 64), False)
    # a concepts file given alone names no family, so no grid: only sizes on every family's grid (64)
    from sdcore.data.onetrainer import parse_onetrainer_resolution

    with pytest.raises(ConfigError, match=r"'96x64': .*multiples of 64 .*--bucket-rule onetrainer --bucket-step GRID"):
        parse_onetrainer_resolution("96x64", "resolution_override", buckets=True)
    assert parse_onetrainer_resolution("97x64", "r", buckets=True, grid=8).fixed == (96, 64)


def test_aitoolkit_lists_train_every_image_at_every_resolution(tmp_path):
    """ai-toolkit's ``preprocess_dataset_raw_config`` copies the dataset per resolution: not OneTrainer's
    draw, so it stays one subset per resolution (each image at each size every epoch)."""
    import yaml
    from sdcore.train.aitoolkit import load_datasets

    root = make_tiny_dataset(tmp_path / "d", n=2) / "1_sks"
    job = {"job": "extension", "config": {"name": "x", "process": [{"type": "sd_trainer", "datasets": [
        {"folder_path": str(root), "resolution": [64, 96], "bucket_tolerance": 32}]}]}}  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    subsets = load_datasets(path, None)
    assert [(s.resolution, s.resolutions) for s in subsets] == [(64, ()), (96, ())]
    _, data = _data(path)
    used = Counter(
        (data.entries[r.entry].path.name, data.entries[r.entry].subset.resolution)
        for b in data.epoch_plan(0)
        for r in b
    )
    assert used == {(name, r): 1 for name in ("000.png", "001.png") for r in (64, 96)}


def test_aitoolkit_resolution_below_its_bucket_tolerance_names_the_jobs_keys(tmp_path):
    """A dataset's resolution under its bucket step is said in the job's words (``bucket_tolerance``, its default
    64 said as such), not as the command line's --bucket-step the user never typed; a step that is not a positive
    whole number is a problem too (it was a traceback)."""
    import yaml
    from sdcore.data.dataset import DatasetProblems
    from sdcore.train.aitoolkit import load_datasets

    root = make_tiny_dataset(tmp_path / "d", n=1) / "1_sks"
    datasets = [{"folder_path": str(root), "resolution": 32}, {"folder_path": str(root), "resolution": [48, 64],
                "bucket_tolerance": 56}, {"folder_path": str(root), "bucket_tolerance": 0}]  # fmt: skip
    path = tmp_path / "job.yaml"
    job = {"job": "extension", "config": {"name": "x", "process": [{"type": "sd_trainer", "datasets": datasets}]}}
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    with pytest.raises(DatasetProblems) as info:
        load_datasets(path, None)
    message = str(info.value)
    assert "--bucket-step" not in message
    for expected in (
        f"{path}: process.datasets[0].resolution 32 is smaller than its bucket_tolerance 64 (ai-toolkit's default), "
        "the bucket step: give the dataset a bucket_tolerance of at most 32, or a larger resolution",
        "process.datasets[1].resolution 48 is smaller than its bucket_tolerance 56, the bucket step: give the "
        "dataset a bucket_tolerance of at most 48",
        "process.datasets[2].bucket_tolerance: 0 is not a positive whole number",
    ):
        assert expected in message, (expected, message)
    assert "datasets[1].resolution 64" not in message


def test_the_batch_size_note_and_memory_batch_cover_every_epochs_draw(tmp_path):
    """``--batch-size 6 --resolutions 64,96`` on 6 images: an epoch whose draw puts all six at one resolution trains a
    batch of 6, so the batch the pre-flight names (and sizes the memory plan with) is 6 and no note says the run
    trains at less; epoch 0's draw alone (3 or 4 at a resolution for most seeds) said "batch size 4" and planned the
    memory of 4 images."""
    root = make_tiny_dataset(tmp_path / "d", n=6, size=64)
    for seed in range(8):
        _, data = _data(root, resolutions="64,96", batch_size=6, seed=seed)
        largest = max(len(b) for epoch in range(12) for b in data.sampler.epoch_batches(epoch))
        assert data.effective_batch(6) >= largest, seed
        assert data.effective_batch(6) == 6 and data.batch_size_notes() == [] and data.batch_sizes_text == "6"
    # one resolution: the bound is the bucket's images, as before
    _, data = _data(root, batch_size=6, seed=0)
    assert data.effective_batch(6) == 6 and data.batch_size_notes() == []
    _, data = _data(root, batch_size=8, seed=0)
    assert data.effective_batch(8) == 6 and len(data.batch_size_notes()) == 1

"""kohya dataset TOMLs whose ``[[datasets]]`` batch at different sizes (kohya's config_README example: a
DreamBooth dataset at 512 with ``batch_size = 4`` and a fine-tuning dataset at 768 with ``batch_size = 2``).

kohya (library/train_util.py, library/config_util.py): each ``[[datasets]]`` makes whole batches of its own
buckets at its own ``batch_size`` (a dataset's value, else ``[general]``'s, else ``--train_batch_size``);
``DatasetGroup`` concatenates them and the DataLoader (``batch_size=1``, ``shuffle=True``) shuffles all the
batches together, so a batch never mixes datasets and an epoch has the sum of the datasets' batch counts.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from runtime_methods import ConvOutMethod
from sdcore.data.dataset import ImageEntry, build_dataset_index, load_toml_dataset_config
from sdcore.data.sampler import BucketBatchSampler
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.testing.datasets import make_tiny_dataset, pattern_image
from sdcore.train.data import plan_train_data
from sdcore.train.loop import train
from sdcore.train.options import TrainOptions
from sdcore.train.preflight import run_preflight


def _kohya_example(root: Path, *, second_batch: int = 2) -> Path:
    """kohya's first example, small: DreamBooth subsets (one of them regularisation) at 64, batch 4; a
    fine-tuning (metadata_file) dataset at 96, batch ``second_batch``."""
    make_tiny_dataset(root / "hoge", n=3, size=64, concept="hoge girl")
    make_tiny_dataset(root / "fuga", n=2, size=64, concept="fuga boy")
    make_tiny_dataset(root / "reg", n=2, size=64, concept="human")
    piyo = root / "piyo"
    piyo.mkdir()
    for i in range(3):
        pattern_image(40 + i, 96).save(piyo / f"p{i}.png")
    (piyo / "piyo_md.json").write_text(json.dumps({f"p{i}": {"caption": f"piyo {i}"} for i in range(3)}))
    config = root / "dataset.toml"
    config.write_text(
        "[general]\nshuffle_caption = true\ncaption_extension = '.txt'\nkeep_tokens = 1\n\n"
        "[[datasets]]\nresolution = 64\nbatch_size = 4\nkeep_tokens = 2\n"
        "  [[datasets.subsets]]\n  image_dir = 'hoge/1_hoge girl'\n  class_tokens = 'hoge girl'\n"
        "  [[datasets.subsets]]\n  image_dir = 'fuga/1_fuga boy'\n  class_tokens = 'fuga boy'\n  keep_tokens = 3\n"
        "  [[datasets.subsets]]\n  is_reg = true\n  image_dir = 'reg/1_human'\n  class_tokens = 'human'\n"
        "  keep_tokens = 1\n\n"
        f"[[datasets]]\nresolution = [96, 96]\nbatch_size = {second_batch}\nflip_aug = true\n"
        "  [[datasets.subsets]]\n  image_dir = 'piyo'\n  metadata_file = 'piyo/piyo_md.json'\n",
        encoding="utf-8",
    )
    return config


class ShapeRecorder(ConvOutMethod):
    """ConvOut that records each micro-batch's latent shape (batch, height, width)."""

    name = "shape-recorder"

    def __init__(self, options):
        super().__init__(options)
        self.shapes: list[tuple[int, int, int]] = []

    def compute_loss(self, ctx):
        latents = ctx.batch.latents
        self.shapes.append((latents.shape[0], latents.shape[-2], latents.shape[-1]))
        return None


def _expected_batches(samples: list[ImageEntry], run_batch: int) -> list[tuple[int, int]]:
    """kohya's batches of an epoch's samples as (size, resolution), sorted: per dataset and bucket (one square
    bucket per resolution here), ceil(n / the dataset's batch size) batches, the last one short."""
    counts: dict[tuple[int, int, int], int] = {}
    for e in samples:
        size = e.subset.batch_size or run_batch
        key = (e.subset.dataset, size, e.subset.resolution)
        counts[key] = counts.get(key, 0) + 1
    out = []
    for (_, size, resolution), n in counts.items():
        out += [(size, resolution)] * (n // size) + ([(n % size, resolution)] if n % size else [])
    return sorted(out)


def test_the_kohya_example_trains_an_epoch_at_each_datasets_batch_size(tmp_path):
    config = _kohya_example(tmp_path)
    subsets = load_toml_dataset_config(config)
    assert [(s.dataset, s.batch_size, s.resolution) for s in subsets] == [(0, 4, 64)] * 3 + [(1, 2, 96)]
    o = contract_options(ShapeRecorder, tmp_path, {"data": str(config), "batch_size": 1, "epochs": 1,
                         "max_steps": None, "cache_latents": False, "bucket_step": 32})  # fmt: skip
    method = ShapeRecorder(o)
    train(method, bundle=create_tiny_bundle("sd1"))
    data = plan_train_data(build_dataset_index(o), o, balance_class=True)  # DreamBooth: class images balanced
    samples = [data.entries[i] for i in data.sampler.epoch_samples(0)]
    # 5 DreamBooth images + 5 class draws (as many as ITS OWN training images, kohya's DreamBoothDataset) in
    # batches of 4: 4 + 4 + 2; 3 fine-tuning images in batches of 2: 2 + 1
    expected = _expected_batches(samples, o.batch_size)
    assert expected == [(1, 96), (2, 64), (2, 96), (4, 64), (4, 64)]
    assert sorted((b, h * 8) for b, h, _ in method.shapes) == expected
    assert all(h == w for _, h, w in method.shapes)


def test_batches_never_mix_datasets_and_steps_add_up(tmp_path):
    config = _kohya_example(tmp_path, second_batch=4)  # the same size: still two datasets, as kohya
    o = TrainOptions(data=str(config), batch_size=1, seed=3)
    data = plan_train_data(build_dataset_index(o), o, balance_class=False)
    for epoch in range(3):
        batches = data.sampler.epoch_batches(epoch)
        assert all(len({data.entries[i].subset.dataset for i in b}) == 1 for b in batches)
        assert sorted(len(b) for b in batches) == [3, 3, 4]  # 7 -> 4 + 3; 3 -> 3
    # steps per epoch: the sum of the datasets' ceil(images / batch size), then gradient accumulation
    config = _kohya_example(tmp_path / "two")
    for accumulation in (1, 3):
        o = contract_options(ConvOutMethod, tmp_path, {"data": str(config), "batch_size": 1, "epochs": 2,
                             "max_steps": None, "gradient_accumulation": accumulation, "bucket_step": 32})  # fmt: skip
        report = run_preflight(ConvOutMethod(o), o, plan=False)
        assert not report.problems, report.problems
        samples = [report.data.entries[i].subset.dataset for i in report.data.sampler.epoch_samples(0)]
        micro = math.ceil(samples.count(0) / 4) + math.ceil(samples.count(1) / 2)
        assert samples.count(1) == 3 and micro >= 4
        assert len(report.data.epoch_plan(0)) == micro
        assert report.total_steps == 2 * math.ceil(micro / accumulation)


def _old_batches(sampler: BucketBatchSampler, epoch: int, size: int) -> list[list[int]]:
    """The epoch plan of one batch size as it was before per-dataset sizes: every sample grouped by bucket alone."""
    rng = random.Random(f"sdcore-sampler:{sampler.seed}:{epoch}:batches")
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i in sampler.epoch_samples(epoch):
        by_bucket.setdefault(sampler.assignments[i].bucket, []).append(i)
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        batches.extend(members[k : k + size] for k in range(0, len(members), size))
    rng.shuffle(batches)
    return batches


def test_one_dataset_gives_the_batches_it_always_gave(tmp_path):
    from sdcore.data.dataset import assign_buckets

    root = tmp_path / "d"
    make_tiny_dataset(root, n=5, size=64, repeats=3, concept="a")
    make_tiny_dataset(root, n=4, size=(96, 64), repeats=2, concept="b")
    toml = tmp_path / "one.toml"
    toml.write_text(f"[[datasets]]\nbatch_size = 3\n[[datasets.subsets]]\nimage_dir = '{root / '3_a'}'\n"
                    f"[[datasets.subsets]]\nimage_dir = '{root / '2_b'}'\n")  # fmt: skip
    for data, batch in ((root, 2), (root, 4), (toml, 3)):
        o = TrainOptions(data=str(data), batch_size=batch, max_bucket_reso=128, bucket_step=32, min_bucket_reso=32)
        index = build_dataset_index(o)
        assignments = assign_buckets(index)
        assert len({a.bucket for a in assignments}) == 2
        for seed in (0, 7):
            sampler = BucketBatchSampler(index, assignments, 1 if data == toml else batch, seed)
            assert len(sampler.batch_sizes) == 1
            for epoch in range(3):
                assert sampler.epoch_batches(epoch) == _old_batches(sampler, epoch, batch)


def test_validation_batches_per_dataset_and_the_memory_plan_sizes_the_worst(tmp_path):
    from sdcore.train.options import apply_model_defaults
    from sdcore.train.validation import validation_batches
    from sdplugin_lora.method import LoraMethod, LoraOptions

    config = _kohya_example(tmp_path)
    o = TrainOptions(data=str(config), batch_size=1, seed=1)
    data = plan_train_data(build_dataset_index(o), o, balance_class=False)
    everything = frozenset(range(len(data.entries)))
    held = validation_batches(data.index, everything, data.assignments, 1, None, data.sampler.group_of)
    assert sorted(len(b) for b in held) == [1, 2, 3, 4]
    assert data.batch_sizes_text == "2-4"
    # the peak: batch 2 at 96 (2 * 96^2 latent pixels) beats batch 4 at 64 (4 * 64^2); at batch 1 it does not
    for second, want in ((2, (2, 96)), (1, (4, 64))):
        config = _kohya_example(tmp_path / f"m{second}", second_batch=second)
        lo = LoraOptions(model="tiny:sd1", data=str(config), output=str(tmp_path / "o.safetensors"), batch_size=1)
        apply_model_defaults(lo)
        report = run_preflight(LoraMethod(lo), lo)
        assert not report.problems and report.memory is not None, report.problems
        settings = report.memory.estimate.settings
        assert (settings["batch_size"], settings["resolution"]) == want


def _kohya_reg_samples(train: int, reg_repeats: list[int]) -> int:
    """The regularisation samples one kohya ``DreamBoothDataset`` trains per epoch (library/train_util.py,
    DreamBoothDataset.__init__ at 48d368f, lines 2113-2184): it counts ITS OWN training images with repeats, and
    registers its reg images in order (each with its repeats, then one more repeat each, round-robin) until
    as many reg samples as that count are registered; a dataset without training images registers none."""
    if not train or not reg_repeats:
        return 0
    n = 0
    for repeats in reg_repeats:  # the first pass: every reg image with its own repeats, stopping at the count
        n += repeats
        if n >= train:
            return n
    return train  # later passes add one repeat at a time and stop exactly at the count


def test_class_images_balance_against_their_own_datasets_training_images(tmp_path):
    """kohya balances each [[datasets]]'s reg images against that dataset's training images, not the run's."""
    make_tiny_dataset(tmp_path / "a", n=3, size=64, repeats=2, concept="a")
    make_tiny_dataset(tmp_path / "r0", n=2, size=64, concept="r0")
    make_tiny_dataset(tmp_path / "b", n=2, size=64, concept="b")
    make_tiny_dataset(tmp_path / "r1", n=3, size=64, concept="r1")
    make_tiny_dataset(tmp_path / "r2", n=2, size=64, concept="r2")
    config = tmp_path / "reg.toml"
    config.write_text(
        "[[datasets]]\nresolution = 64\nbatch_size = 2\n"
        "  [[datasets.subsets]]\n  image_dir = 'a/2_a'\n  num_repeats = 2\n"
        "  [[datasets.subsets]]\n  is_reg = true\n  image_dir = 'r0/1_r0'\n"
        "[[datasets]]\nresolution = 64\nbatch_size = 3\n"
        "  [[datasets.subsets]]\n  image_dir = 'b/1_b'\n"
        "  [[datasets.subsets]]\n  is_reg = true\n  image_dir = 'r1/1_r1'\n"
        "[[datasets]]\nresolution = 64\nbatch_size = 1\n"  # regularisation images alone: kohya trains none
        "  [[datasets.subsets]]\n  is_reg = true\n  image_dir = 'r2/1_r2'\n",
        encoding="utf-8",
    )
    o = TrainOptions(data=str(config), batch_size=1, seed=5)
    data = plan_train_data(build_dataset_index(o), o, balance_class=True)
    train = {0: 6, 1: 2, 2: 0}  # a: 3 images x 2 repeats; b: 2 images; none in datasets[2]
    regs = {0: [1, 1], 1: [1, 1, 1], 2: [1, 1]}
    for epoch in range(3):
        samples = [data.entries[i] for i in data.sampler.epoch_samples(epoch)]
        for dataset in range(3):
            mine = [e for e in samples if e.subset.dataset == dataset]
            assert sum(not e.is_class for e in mine) == train[dataset]
            assert sum(e.is_class for e in mine) == _kohya_reg_samples(train[dataset], regs[dataset])
    assert [_kohya_reg_samples(train[d], regs[d]) for d in range(3)] == [6, 2, 0]
    # class images given beside the TOML (--reg-data; kohya ignores reg_data_dir with a dataset config) are in
    # no [[datasets]]: they balance against all 8 training samples, the [[datasets]]' own as above
    make_tiny_dataset(tmp_path / "extra", n=3, size=64, concept="x")
    o = TrainOptions(data=str(config), reg_data=str(tmp_path / "extra"), batch_size=1, seed=5)
    data = plan_train_data(build_dataset_index(o), o, balance_class=True)
    samples = [data.entries[i] for i in data.sampler.epoch_samples(1)]
    beside = [e for e in samples if e.subset.image_dir.name == "1_x"]
    assert len(beside) == 8 and {e.subset.dataset for e in beside} == {0}
    assert sum(e.is_class for e in samples) == 8 + 6 + 2


def _old_samples(sampler: BucketBatchSampler, epoch: int) -> list[int]:
    """An epoch's samples as drawn before per-dataset balancing: class draws as many as all training samples."""
    samples, klass = list(sampler._instance), list(sampler._class)
    pool = list(klass)
    random.Random(f"sdcore-sampler:{sampler.seed}:class-order").shuffle(pool)
    start = (epoch * len(samples)) % len(pool)
    return samples + [pool[(start + k) % len(pool)] for k in range(len(samples))]


def test_one_dataset_draws_the_class_images_it_always_drew(tmp_path):
    from sdcore.data.dataset import assign_buckets

    make_tiny_dataset(tmp_path / "img", n=5, size=64, repeats=3, concept="a")
    make_tiny_dataset(tmp_path / "reg", n=4, size=64, repeats=1, concept="r")
    toml = tmp_path / "one.toml"
    toml.write_text("[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = 'img/3_a'\n"
                    "[[datasets.subsets]]\nis_reg = true\nimage_dir = 'reg/1_r'\n")  # fmt: skip
    for o in (
        TrainOptions(data=str(tmp_path / "img"), reg_data=str(tmp_path / "reg"), batch_size=2),
        TrainOptions(data=str(toml), batch_size=2),
        TrainOptions(data=str(toml), reg_data=str(tmp_path / "reg"), batch_size=2),  # both in one pool
    ):
        index = build_dataset_index(o)
        sampler = BucketBatchSampler(index, assign_buckets(index), 2, 11, balance_class=True)
        assert sum(e.is_class for e in index.entries) == (8 if o.reg_data and o.data.endswith(".toml") else 4)
        for epoch in range(4):
            assert sampler.epoch_samples(epoch) == _old_samples(sampler, epoch)


def test_lora_metadata_has_each_datasets_batch_size_in_ss_datasets(tmp_path):
    """kohya (train_network.py at 48d368f, lines 1069-1184): with a dataset config the per-dataset sizes go into
    ss_datasets' batch_size_per_device and ss_batch_size_per_device is not written, whether or not the
    datasets' sizes differ."""
    from sdcore.train.method import RunFacts, SaveInfo
    from sdplugin_lora.method import LoraOptions, kohya_training_metadata

    for second in (2, 4):
        config = _kohya_example(tmp_path / str(second), second_batch=second)
        o = LoraOptions(data=str(config), batch_size=4 if second == 4 else 1)  # uniform sizes become the run's
        entries = tuple(build_dataset_index(o).entries)
        run = RunFacts(total_steps=1, started_at=0.0, entries=entries)
        info = SaveInfo(path=tmp_path / "x.safetensors", step=1, epoch=1, metadata={}, final=True, run=run)
        meta = kohya_training_metadata(o, info)
        assert "ss_batch_size_per_device" not in meta
        assert [d["batch_size_per_device"] for d in json.loads(meta["ss_datasets"])] == [4, second]


def test_a_batch_size_no_bucket_fills_is_said_with_the_batch_used(tmp_path):
    """``--batch-size 1000000000000`` on 5 images trained in batches of 5 (a batch is one bucket's images, as
    kohya's) while the dry run said "batches of 1000000000000" and the memory plan sized a petabyte: now one note
    names the batch used, and the logs and the memory plan use it."""
    from sdcore.train.options import apply_model_defaults
    from sdplugin_lora.method import LoraMethod, LoraOptions

    make_tiny_dataset(tmp_path / "d", n=5, size=64, concept="a")
    huge = 10**12
    o = TrainOptions(data=str(tmp_path / "d"), batch_size=huge, max_bucket_reso=128, bucket_step=32, min_bucket_reso=32)
    data = plan_train_data(build_dataset_index(o), o, balance_class=False)
    assert data.effective_batch(huge) == 5 and data.batch_sizes_text == "5" and data.batch_shapes[0][0] == 5
    assert data.batch_size_notes() == [
        f"--batch-size {huge}: no bucket holds that many images and a batch is one bucket's (as in kohya), so batches "
        "hold at most 5: the run trains at batch size 5"
    ]
    lo = LoraOptions(
        model="tiny:sd1", data=str(tmp_path / "d"), output=str(tmp_path / "o.safetensors"), batch_size=huge
    )
    apply_model_defaults(lo)
    report = run_preflight(LoraMethod(lo), lo)
    assert not report.problems, report.problems
    assert data.batch_size_notes()[0] in report.notes
    assert report.memory is not None and report.memory.estimate.settings["batch_size"] == 5
    # a batch size a bucket fills: no note, the size as given
    o = TrainOptions(data=str(tmp_path / "d"), batch_size=2, max_bucket_reso=128, bucket_step=32, min_bucket_reso=32)
    data = plan_train_data(build_dataset_index(o), o, balance_class=False)
    assert data.batch_size_notes() == [] and data.batch_sizes_text == "2"


def test_one_dataset_with_its_own_batch_size_sizes_the_memory_plan_at_that_batch(tmp_path):
    """A dataset TOML with one ``[[datasets]]`` at ``batch_size = 8`` (the run's --batch-size 1) trains batches of 8
    (kohya: the dataset's value wins), but the memory plan sized batches of 1: with one dataset it took the run's
    --batch-size, not the dataset's."""
    from sdcore.train.options import apply_model_defaults
    from sdplugin_lora.method import LoraMethod, LoraOptions

    make_tiny_dataset(tmp_path / "hoge", n=12, size=64, concept="hoge girl")
    config = tmp_path / "dataset.toml"
    config.write_text(
        "[[datasets]]\nresolution = 64\nbatch_size = 8\n"
        "  [[datasets.subsets]]\n  image_dir = 'hoge/1_hoge girl'\n  class_tokens = 'hoge girl'\n",
        encoding="utf-8",
    )
    o = LoraOptions(model="tiny:sd1", data=str(config), output=str(tmp_path / "o.safetensors"), batch_size=1)
    apply_model_defaults(o)
    data = plan_train_data(build_dataset_index(o), o, balance_class=False)
    assert max(len(b) for b in data.sampler.epoch_batches(0)) == 8 and data.batch_sizes_text == "8"
    report = run_preflight(LoraMethod(o), o)
    assert not report.problems, report.problems
    assert report.memory is not None and report.memory.estimate.settings["batch_size"] == 8


def test_the_batch_size_note_names_a_kohya_configs_train_batch_size(tmp_path):
    """A kohya config's ``train_batch_size = 64`` on 5 images was noted as "--batch-size 64", a flag the user never
    typed; the note now names the key as the config wrote it."""
    from sdcore.train.config import load_options
    from sdcore.train.options import apply_model_defaults
    from sdplugin_lora.method import LoraMethod, LoraOptions

    make_tiny_dataset(tmp_path / "d", n=5, size=64, concept="a")
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        f'pretrained_model_name_or_path = "tiny:sd1"\ntrain_data_dir = "{(tmp_path / "d").as_posix()}"\n'
        f'output_dir = "{tmp_path.as_posix()}"\noutput_name = "o"\nnetwork_module = "networks.lora"\n'
        "train_batch_size = 64\nresolution = 64\nmax_train_steps = 2\n",
        encoding="utf-8",
    )
    o = load_options(LoraOptions, cfg)
    apply_model_defaults(o)
    report = run_preflight(LoraMethod(o), o)
    assert not report.problems, report.problems
    said = [note for note in report.notes if "no bucket holds that many images" in note]
    assert said == [
        f"{cfg}: train_batch_size 64: no bucket holds that many images and a batch is one bucket's (as in kohya), "
        "so batches hold at most 5: the run trains at batch size 5"
    ], report.notes

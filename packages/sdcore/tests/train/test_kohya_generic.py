"""kohya's generic train_util options (cache_text_encoder_outputs_to_disk, caption_separator,
resize_interpolation, ddp_*, torch_compile, deepspeed ...): what each becomes in sdcore."""

from __future__ import annotations

from dataclasses import fields

import pytest
from runtime_methods import ConvOutOptions
from sdcore.errors import ConfigError
from sdcore.testing.distributed import torchrun_command
from sdcore.train import kohya
from sdcore.train.config import load_options
from sdcore.train.options import TrainOptions

PRESENT = [f.name for f in fields(TrainOptions)]


# --- cache_text_encoder_outputs_to_disk ---------------------------------------------------------


def test_te_cache_to_disk_turns_the_cache_and_its_files_on():
    both = {"cache_text_encoder_outputs": True, "cache_text_encoder_outputs_to_disk": True}
    out = kohya.translate({"cache_text_encoder_outputs_to_disk": True}, PRESENT, where="cfg")
    assert not out.problems and out.values == both
    # kohya (sdxl_train_util, sd3/flux scripts) turns caching on even over an explicit false
    items = {"cache_text_encoder_outputs": False, "cache_text_encoder_outputs_to_disk": True}
    out = kohya.translate(items, PRESENT, where="cfg")
    assert not out.problems and out.values == both
    # off (what the kohya_ss GUI writes for an untouched field): the cache stays as it is, no files
    out = kohya.translate({"cache_text_encoder_outputs_to_disk": False}, PRESENT, where="cfg")
    assert not out.problems and out.values == {"cache_text_encoder_outputs_to_disk": False} and not out.notes


def test_te_cache_to_disk_from_a_kohya_toml(tmp_path):
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        "[model_arguments]\ncache_text_encoder_outputs = false\ncache_text_encoder_outputs_to_disk = true\n",
        encoding="utf-8",
    )
    o = load_options(ConvOutOptions, cfg, notes=[])
    assert o.cache_text_encoder_outputs is True and o.cache_text_encoder_outputs_to_disk is True
    assert "cache_text_encoder_outputs_to_disk" in kohya.flag_names()  # a store_true flag on kohya's CLI


# --- caption_separator --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_caption_separator_shuffles_keeps_and_drops_as_commas_do(seed):
    import random

    from sdcore.data.captions import process_caption

    kw = dict(shuffle=True, keep_tokens=1, tag_dropout=0.3, secondary_separator=";;;")
    with_bar = process_caption("sks|a|b;;;c|d|e|f", caption_separator="|", rng=random.Random(seed), **kw)
    with_comma = process_caption("sks,a,b;;;c,d,e,f", rng=random.Random(seed), **kw)
    # the same draws pick the same tags; kohya joins with ", " and puts caption_separator back for ";;;"
    assert with_bar == with_comma.replace("b,c", "b|c")
    assert with_bar.startswith("sks, ")
    # keep_tokens_separator splits first, then caption_separator inside each part
    kw = dict(shuffle=True, keep_tokens_separator="|||", rng=random.Random(seed))
    bar = process_caption("x / y ||| a / b / c ||| z", caption_separator=" / ", **kw)
    comma = process_caption(
        "x, y ||| a, b, c ||| z", rng=random.Random(seed), **{k: v for k, v in kw.items() if k != "rng"}
    )
    assert bar == comma and bar.startswith("x, y, ") and bar.endswith(", z")


def test_caption_separator_is_used_as_given():
    """kohya splits at the separator exactly (``"| "`` does not split ``"a|b"``)."""
    import random

    from sdcore.data.captions import process_caption

    out = process_caption("a|b| c| d", caption_separator="| ", tag_dropout=1e-9, rng=random.Random(0))
    assert out == "a|b, c, d"


def test_caption_separator_through_the_runtime_and_the_dataset_toml(tmp_path):
    from runtime_methods import ConvOutMethod
    from sdcore.data.dataset import load_toml_dataset_config
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.testing.contract import contract_options, make_tiny_dataset
    from sdcore.train.loop import TrainSession

    def captions(folder, text, **kw):
        data = make_tiny_dataset(tmp_path / folder, n=2)
        for image in (data / "1_tiny").glob("*.png"):
            image.with_suffix(".txt").write_text(text, encoding="utf-8")
        o = contract_options(ConvOutMethod, tmp_path / folder, {"data": str(data), "max_steps": 1, **kw})
        s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
        s.setup()
        out = {}
        for epoch in range(3):
            for refs in s.data.epoch_plan(epoch):
                for ref, caption in zip(refs, s.make_batch(refs).captions, strict=True):
                    out[(ref.epoch, ref.entry, ref.occurrence)] = caption
        return out

    kw = dict(shuffle_caption=True, keep_tokens=1, cache_text_encoder_outputs=False)
    bar = captions("bar", "sks|a|b|c|d", caption_separator="|", **kw)
    comma = captions("comma", "sks,a,b,c,d", **kw)
    assert bar == comma and len(set(bar.values())) > 2  # shuffled, and the same shuffles
    # kohya name, and the dataset TOML's key at every level (kohya's subset-ascendable key)
    out = kohya.translate({"caption_separator": "|"}, PRESENT, where="cfg")
    assert not out.problems and out.values == {"caption_separator": "|"}
    (tmp_path / "img").mkdir()
    config = tmp_path / "d.toml"
    config.write_text(
        "[general]\ncaption_separator = '|'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img'\n"
        "[[datasets.subsets]]\nimage_dir = 'img'\ncaption_separator = ';'\n",
        encoding="utf-8",
    )
    first, second = load_toml_dataset_config(config, TrainOptions())
    assert (first.caption_separator, second.caption_separator) == ("|", ";")
    (first,) = load_toml_dataset_config(_one_subset(tmp_path), TrainOptions(caption_separator="/"))
    assert first.caption_separator == "/"  # the run's option is the default of every subset


def _one_subset(tmp_path, extra=""):
    config = tmp_path / "one.toml"
    config.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img'\n{extra}", encoding="utf-8")
    return config


def test_empty_caption_separator_is_refused(tmp_path):
    from sdcore.data.dataset import load_toml_dataset_config
    from sdcore.errors import DataError
    from sdcore.train.preflight import option_problems

    problems = option_problems(TrainOptions(model="m", data="d", output="o", caption_separator=""))
    assert any("--caption-separator is empty" in p for p in problems)
    (tmp_path / "img").mkdir()
    with pytest.raises(DataError, match="'caption_separator' must be a non-empty string"):
        load_toml_dataset_config(_one_subset(tmp_path, "caption_separator = ''\n"), TrainOptions())


def test_caption_separator_joins_a_metadata_caption_and_its_tags(tmp_path):
    """kohya's FineTuningDataset: ``caption + caption_separator + tags``."""
    import json

    from sdcore.data.metadata import metadata_records

    meta = tmp_path / "meta.json"
    meta.write_text(
        json.dumps({"img1": {"caption": "a photo", "tags": "x|y"}, "img2": {"tags": "z"}}), encoding="utf-8"
    )
    records, problems = metadata_records(meta, separator="|")
    assert not problems and [r.caption for r in records] == ["a photo|x|y", "z"]
    records, _ = metadata_records(meta)
    assert records[0].caption == "a photo,x|y"


# --- resize_interpolation -----------------------------------------------------------------------

_PIL_FILTER = {  # written from kohya's docs/utils: lanczos and box are PIL's own; the rest stand in for cv2's
    "lanczos": "LANCZOS",
    "nearest": "NEAREST",
    "bilinear": "BILINEAR",
    "linear": "BILINEAR",
    "bicubic": "BICUBIC",
    "cubic": "BICUBIC",
    "area": "BOX",
    "box": "BOX",
}


def _noise_image(tmp_path, size=(80, 56), name="a.png"):
    import numpy as np
    from PIL import Image

    array = np.random.default_rng(3).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / name)
    return Image.open(tmp_path / name).convert("RGB")


def _entry(path, size, **subset):
    from sdcore.data.dataset import ImageEntry, SubsetOptions

    return ImageEntry(path=path, caption="", repeats=1, is_class=False, size=size,
                      subset=SubsetOptions(image_dir=path.parent, **subset))  # fmt: skip


@pytest.mark.parametrize("resized", [(40, 28), (120, 84)])  # shrinking and enlarging
def test_each_resize_interpolation_is_that_pil_filter_and_the_default_is_unchanged(tmp_path, resized):
    import numpy as np
    from PIL import Image
    from sdcore.data.buckets import BucketAssignment
    from sdcore.data.loading import load_training_image
    from sdcore.train.options import RESIZE_INTERPOLATIONS

    image = _noise_image(tmp_path)
    assignment = BucketAssignment((resized[0] - 8, resized[1]), resized, (4, 0))

    def expected(filter_name):
        out = image.resize(resized, getattr(Image.Resampling, filter_name)).crop((4, 0, resized[0] - 4, resized[1]))
        return np.asarray(out, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0

    seen = {}
    for name in RESIZE_INTERPOLATIONS:
        entry = _entry(tmp_path / "a.png", (80, 56), resize_interpolation=name)
        pixels, _, _ = load_training_image(entry, assignment, flip=False)
        assert np.array_equal(pixels, expected(_PIL_FILTER[name])), name
        seen[_PIL_FILTER[name]] = pixels
    assert len({p.tobytes() for p in seen.values()}) == 5  # five different filters really ran
    # no option: kohya's default, area (BOX) when shrinking and Lanczos when enlarging, as before
    default, _, _ = load_training_image(_entry(tmp_path / "a.png", (80, 56)), assignment, flip=False)
    assert np.array_equal(default, expected("BOX" if resized[0] < 80 else "LANCZOS"))


def test_resize_interpolation_reaches_masks_and_the_latent_cache_key(tmp_path):
    import numpy as np
    from PIL import Image
    from sdcore.data.buckets import BucketAssignment
    from sdcore.data.loading import load_training_channel
    from sdcore.train.cache import image_key

    _noise_image(tmp_path)
    assignment = BucketAssignment((40, 28), (40, 28), (0, 0))
    red = load_training_channel(tmp_path / "a.png", assignment, channel=0, flip=False, interpolation="nearest")
    want = Image.open(tmp_path / "a.png").convert("RGBA").getchannel(0).resize((40, 28), Image.Resampling.NEAREST)
    assert np.array_equal(red, np.asarray(want))
    keys = {
        name: image_key(_entry(tmp_path / "a.png", (80, 56), resize_interpolation=name), assignment, "vae")
        for name in (None, "nearest", "lanczos")
    }
    assert len(set(keys.values())) == 3  # a cached latent of another filter is never reused


def test_resize_interpolation_option_kohya_name_and_dataset_toml(tmp_path):
    from sdcore.data.dataset import load_toml_dataset_config
    from sdcore.errors import DataError

    out = kohya.translate({"resize_interpolation": "bicubic"}, PRESENT, where="cfg")
    assert not out.problems and out.values == {"resize_interpolation": "bicubic"}
    cfg = tmp_path / "k.toml"
    cfg.write_text('resize_interpolation = "sinc"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="resize_interpolation 'sinc': choose one of lanczos"):
        load_options(ConvOutOptions, cfg)
    (tmp_path / "img").mkdir()
    config = tmp_path / "d.toml"
    config.write_text(
        "[general]\nresize_interpolation = 'nearest'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img'\n"
        "[[datasets.subsets]]\nimage_dir = 'img'\nresize_interpolation = 'box'\n",
        encoding="utf-8",
    )
    first, second = load_toml_dataset_config(config, TrainOptions(resize_interpolation="area"))
    assert (first.resize_interpolation, second.resize_interpolation) == ("nearest", "box")
    (first,) = load_toml_dataset_config(_one_subset(tmp_path), TrainOptions(resize_interpolation="area"))
    assert first.resize_interpolation == "area"
    with pytest.raises(DataError, match="'resize_interpolation' must be one of lanczos"):
        load_toml_dataset_config(_one_subset(tmp_path, "resize_interpolation = 'Lanczos'\n"), TrainOptions())


# --- ddp_*, torch_compile, cache_info -----------------------------------------------------------


def test_ddp_options_reach_the_accelerator():
    import datetime

    from sdcore.train.placement import create_accelerator

    plain = create_accelerator(TrainOptions())
    assert plain.ddp_handler.to_kwargs() == {"find_unused_parameters": True, "broadcast_buffers": False}
    assert plain.init_handler is None  # accelerate's own timeout
    o = TrainOptions(ddp_timeout=90, ddp_static_graph=True, ddp_gradient_as_bucket_view=True)
    acc = create_accelerator(o)
    assert acc.ddp_handler.to_kwargs() == {
        "find_unused_parameters": True,
        "broadcast_buffers": False,
        "static_graph": True,
        "gradient_as_bucket_view": True,
    }
    assert acc.init_handler.timeout == datetime.timedelta(minutes=90)


def test_ddp_options_kohya_names_and_bad_timeout(tmp_path):
    from sdcore.train.preflight import option_problems

    items = {"ddp_timeout": 30, "ddp_static_graph": True, "ddp_gradient_as_bucket_view": True}
    out = kohya.translate(items, PRESENT, where="cfg")
    assert not out.problems and out.values == items
    assert {"ddp_static_graph", "ddp_gradient_as_bucket_view"} <= kohya.flag_names()
    # kohya: "if args.ddp_timeout" -- 0 is accelerate's default
    cfg = tmp_path / "k.toml"
    cfg.write_text("ddp_timeout = 0\nddp_static_graph = false\n", encoding="utf-8")
    assert load_options(ConvOutOptions, cfg).ddp_timeout is None
    problems = option_problems(TrainOptions(model="m", data="d", output="o", ddp_timeout=-5))
    assert any("--ddp-timeout is in minutes and must be 1 or more" in p for p in problems)


def test_torch_compile_and_cache_info_are_accepted_with_a_note(tmp_path):
    from sdcore.data.dataset import load_toml_dataset_config
    from sdcore.errors import DataError

    cfg = tmp_path / "k.toml"
    cfg.write_text('torch_compile = true\ndynamo_backend = "inductor"\ncache_info = true\n', encoding="utf-8")
    notes: list[str] = []
    o = load_options(ConvOutOptions, cfg, notes=notes)
    base = tmp_path / "base.toml"
    base.write_text("xformers = true\n", encoding="utf-8")  # the same kohya defaults, without the three
    assert o == load_options(ConvOutOptions, base, notes=[])  # nothing that trains changed
    assert any(n.startswith("torch_compile: sdcore runs the denoiser without torch.compile") for n in notes)
    assert any(n.startswith("cache_info: ") for n in notes)
    assert {"torch_compile", "cache_info"} <= kohya.flag_names()
    (tmp_path / "img").mkdir()
    (first,) = load_toml_dataset_config(_one_subset(tmp_path, "cache_info = true\n"), TrainOptions())
    assert first.image_dir.name == "img"
    with pytest.raises(DataError, match="'cache_info' must be a boolean"):
        load_toml_dataset_config(_one_subset(tmp_path, "cache_info = 'yes'\n"), TrainOptions())


@pytest.mark.skipif(torchrun_command() is None, reason="torchrun not available")
@pytest.mark.slow
def test_two_processes_with_kohyas_ddp_options_train_like_one(tmp_path):
    """A static graph and bucket-view gradients change how DDP averages, not what it averages."""
    from pathlib import Path

    from runtime_methods import ConvOutMethod
    from sdcore.testing.distributed import check_processes_equal_accumulation

    values = {"ddp_static_graph": True, "ddp_gradient_as_bucket_view": True, "ddp_timeout": 5, "max_steps": 3}
    record = check_processes_equal_accumulation(
        ConvOutMethod, tmp_path, values, extra_pythonpath=[str(Path(__file__).parent)]
    )
    assert record["ddp"] == {"static_graph": True, "gradient_as_bucket_view": True}


# --- DeepSpeed -----------------------------------------------------------------------------------


def test_deepspeed_is_refused_with_the_accelerate_config_that_gives_the_same_engine():
    items = {
        "deepspeed": True,
        "zero_stage": 3,
        "offload_optimizer_device": "cpu",
        "offload_param_device": "nvme",
        "offload_param_nvme_path": "/nvme",
        "zero3_init_flag": True,
        "gradient_accumulation_steps": 4,
        "max_grad_norm": 0.5,
    }
    out = kohya.translate(items, PRESENT, where="cfg")
    (problem,) = [p for p in out.problems if "deepspeed" in p]
    assert problem.startswith("cfg: deepspeed: sdcore takes DeepSpeed from accelerate's launch config")
    assert "docs/accelerate/deepspeed-zero2.yaml" in problem
    assert (
        "{zero_stage: 3, offload_optimizer_device: cpu, offload_param_device: nvme, offload_param_nvme_path: /nvme, "
        "zero3_init_flag: true, gradient_accumulation_steps: 4, gradient_clipping: 0.5}"
    ) in problem
    out = kohya.translate({"deepspeed": True, "zero_stage": 0, "fp16_master_weights_and_gradients": True}, PRESENT,
                          where="cfg")  # fmt: skip
    assert "{zero_stage: 0, gradient_accumulation_steps: 1, gradient_clipping: 1.0}" in out.problems[0]
    assert "fp16_master_weights_and_gradients goes in a DeepSpeed JSON" in out.problems[0]


def test_deepspeed_options_without_deepspeed_do_nothing_as_in_kohya(tmp_path):
    # what the kohya_ss GUI writes for an untouched DeepSpeed section: no problem, no note
    untouched = {"deepspeed": False, "zero_stage": 2, "offload_optimizer_device": "", "zero3_init_flag": False}
    out = kohya.translate(untouched, PRESENT, where="cfg")
    assert not out.problems and not out.notes and not out.values
    out = kohya.translate({"zero_stage": 3, "offload_param_device": "cpu"}, PRESENT, where="cfg")
    assert not out.problems and not out.values
    assert out.notes == [
        "offload_param_device, zero_stage: DeepSpeed options without deepspeed have no effect (as in kohya)"
    ]
    cfg = tmp_path / "k.toml"
    cfg.write_text("deepspeed = true\nzero_stage = 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="deepspeed: sdcore takes DeepSpeed from accelerate's launch config"):
        load_options(ConvOutOptions, cfg)
    assert {"deepspeed", "zero3_init_flag", "zero3_save_16bit_model"} <= kohya.flag_names()

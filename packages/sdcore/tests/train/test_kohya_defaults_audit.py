"""A run written in kohya's names that leaves an option out trains (and writes) what sd-scripts would.

The expected values are sd-scripts' defaults, read from its source (kohya-ss/sd-scripts 48d368f; lines of
library/train_util.py unless another file is named), written as the sdcore value that means the same thing:
not copied from sdcore's output."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from sdcore.data.captions import read_caption
from sdcore.data.dataset import build_dataset_index, load_toml_dataset_config
from sdcore.train import kohya
from sdcore.train.caption_checks import caption_twin_notes
from sdcore.train.config import load_options
from sdcore.train.options import TrainOptions

#: (kohya name, sdcore option, the value kohya's default means in sdcore's terms, where kohya sets it)
AUDIT = [
    ("train_batch_size", "batch_size", 1, "3900 --train_batch_size 1"),
    ("learning_rate", "lr", 2e-6, "3701 --learning_rate 2.0e-6"),
    ("optimizer_type", "optimizer", "adamw", "3678 '' -> get_optimizer 4844-4845: AdamW"),
    ("optimizer_args", "optimizer_args", "", "3709 None: no extra arguments"),
    ("lr_scheduler", "lr_scheduler", "constant", "3740"),
    ("lr_warmup_steps", "lr_warmup_steps", 0, "3746"),
    ("lr_scheduler_num_cycles", "lr_cycles", 1, "3760"),
    ("lr_scheduler_power", "lr_power", 1.0, "3766"),
    ("max_grad_norm", "max_grad_norm", 1.0, "3702"),
    ("gradient_accumulation_steps", "gradient_accumulation", 1, "3974"),
    ("mixed_precision", "mixed_precision", "no", "3980"),
    # 3839 --save_precision None; prepare_dtype 5514: save_dtype None keeps the trained float32 weights
    ("save_precision", "save_dtype", "fp32", "3839 + 5507-5522"),
    ("save_state", "save_state", False, "3888 store_true"),
    ("save_every_n_epochs", "save_every_epochs", None, "3846"),
    ("save_every_n_steps", "save_every", None, "3852"),
    ("max_train_steps", "max_steps", 1600, "3952"),
    ("max_train_epochs", "epochs", None, "3953"),
    ("clip_skip", "clip_skip", 1, "4019 None: the last layer"),
    ("noise_offset", "noise_offset", 0.0, "4067 None: off"),
    ("min_snr_gamma", "min_snr_gamma", None, "custom_train_functions.py:117-119"),
    ("v_pred_like_loss", "v_pred_like_loss", 0.0, "custom_train_functions.py:128-130 None: off"),
    ("multires_noise_discount", "multires_noise_discount", 0.3, "4103"),
    ("loss_type", "loss_type", "l2", "4132"),
    ("huber_c", "huber_c", 0.1, "4147"),
    ("weighting_scheme", "weighting_scheme", "uniform", "4277"),
    ("mode_scale", "mode_scale", 1.29, "4297"),
    ("v_parameterization", "prediction_type", "auto", "3646 store_true: the model's own"),
    ("prior_loss_weight", "prior_loss_weight", 1.0, "4232"),
    ("dataset_repeats", "dataset_repeats", 1, "4677"),
    ("caption_extension", "caption_extension", ".caption", "4492"),
    ("shuffle_caption", "shuffle_caption", False, "4488"),
    ("caption_separator", "caption_separator", ",", "4491"),
    ("keep_tokens", "keep_tokens", 0, "4501"),
    ("caption_prefix", "caption_prefix", "", "4526 None"),
    ("color_aug", "color_aug", False, "4538"),
    ("flip_aug", "flip", False, "4541"),
    ("random_crop", "random_crop", False, "4550"),
    ("enable_bucket", "buckets", False, "4585 store_true"),
    ("min_bucket_reso", "min_bucket_reso", 256, "4590"),
    ("max_bucket_reso", "max_bucket_reso", 1024, "4597"),
    ("bucket_reso_steps", "bucket_step", 64, "4604"),
    ("bucket_no_upscale", "bucket_no_upscale", False, "4610"),
    ("token_warmup_min", "token_warmup_min", 1, "4622"),
    ("token_warmup_step", "token_warmup_step", 0.0, "4628"),
    ("caption_dropout_rate", "caption_dropout", 0.0, "4650"),
    ("caption_dropout_every_n_epochs", "caption_dropout_every_n_epochs", 0, "4653"),
    ("caption_tag_dropout_rate", "tag_dropout", 0.0, "4659"),
]


@pytest.fixture(scope="module")
def kohya_run() -> tuple[TrainOptions, list[str]]:
    notes: list[str] = []
    options = load_options(TrainOptions, None, kohya={"pretrained_model_name_or_path": "tiny:sd1"}, notes=notes)
    return options, notes


@pytest.mark.parametrize(("name", "target", "want", "source"), AUDIT, ids=[row[0] for row in AUDIT])
def test_an_option_left_out_has_kohyas_default(kohya_run, name, target, want, source):
    options, _ = kohya_run
    assert kohya.ALIASES[name].target == target  # the table audits the alias kohya.py really has
    assert getattr(options, target) == want, f"kohya: {source}"


def test_the_audit_covers_every_kohya_default_applied():
    """Every general kohya default sdcore applies is in the audit table (or is a method's / conditional one)."""
    audited = {target for _, target, _, _ in AUDIT}
    method_only = {"rank", "alpha", "train_text_encoder"}  # LoRA/DreamBooth options, tested with their plugins
    conditional = {"sample_steps", "sample_resolution", "sample_cfg", "cache_latents", "save_limit", "caption_fallback"}
    assert {target for target, _, _ in kohya.KOHYA_DEFAULTS} - audited == method_only | conditional


def test_the_applied_defaults_are_said(kohya_run):
    _, notes = kohya_run
    applied = next(n for n in notes if n.startswith("kohya defaults applied"))
    for said in (
        "learning_rate defaults to 2e-6",
        "caption_extension defaults to .caption",
        "save_precision defaults to none: the weights are saved as they train, in float32",
        "no resumable training state is written unless save_state",
    ):
        assert said in applied
    assert "every intermediate save is kept" not in applied  # no intermediate saves in this run


def test_sdcore_names_keep_sdcores_defaults():
    o = load_options(TrainOptions, None, {"model": "tiny:sd1"})
    assert (o.lr, o.caption_extension, o.caption_fallback, o.save_dtype, o.save_state, o.save_limit) == (
        1e-4,
        ".txt",
        True,
        "fp16",
        True,
        5,
    )


def test_intermediate_saves_are_all_kept_unless_a_last_n_option():
    # train_util.py:3864/3876: save_last_n_epochs / save_last_n_steps None remove nothing
    o = load_options(TrainOptions, None, kohya={"save_every_n_epochs": 1}, notes=[])
    assert o.save_limit == 0
    o = load_options(TrainOptions, None, kohya={"save_every_n_epochs": 1, "save_last_n_epochs": 3}, notes=[])
    assert o.save_limit == 3


def test_given_values_win_and_full_bf16_saves_in_bf16():
    kohya_items = {
        "learning_rate": 1e-4,
        "caption_extension": ".txt",
        "save_precision": "fp16",
        "save_state": True,
    }
    o = load_options(TrainOptions, None, kohya=kohya_items, notes=[])
    assert (o.lr, o.caption_extension, o.save_dtype, o.save_state) == (1e-4, ".txt", "fp16", True)
    # prepare_dtype: save_dtype None with full_bf16 writes the network as it trains, in bf16
    o = load_options(TrainOptions, None, kohya={"full_bf16": True, "mixed_precision": "bf16"}, notes=[])
    assert o.save_dtype == "bf16"


def test_save_state_on_train_end_keeps_a_state():
    notes: list[str] = []
    o = load_options(TrainOptions, None, kohya={"save_state_on_train_end": True}, notes=notes)
    assert o.save_state is True
    assert not any("no resumable training state" in n for n in notes)


def test_seed_deliberately_stays_fixed():
    # train_network.py:503-504 draws a random seed when none is given; sdcore keeps its fixed 42 (one such draw)
    o = load_options(TrainOptions, None, kohya={"train_batch_size": 1}, notes=[])
    assert o.seed == 42


def _folder(tmp_path: Path, captions: dict[str, str]) -> Path:
    from PIL import Image

    folder = tmp_path / "img" / "2_sks dog"
    folder.mkdir(parents=True)
    for stem in ("a", "b", "c"):
        Image.new("RGB", (64, 64), (40, 80, 120)).save(folder / f"{stem}.png")
    for name, text in captions.items():
        (folder / name).write_text(text, encoding="utf-8")
    return tmp_path / "img"


def test_a_kohya_run_reads_only_caption_extension_and_names_the_unread_twins(tmp_path):
    data = _folder(tmp_path, {"a.txt": "a photo of sks dog", "b.txt": "sks dog running", "c.caption": "sks dog"})
    options = load_options(TrainOptions, None, kohya={"train_data_dir": str(data)}, notes=[])
    assert (options.caption_extension, options.caption_fallback) == (".caption", False)
    index = build_dataset_index(options)
    captions = {e.path.name: e.caption for e in index.entries}
    # train_util.py:2066-2079: no caption file -> the folder's class tokens (empty without them)
    assert captions == {"a.png": "sks dog", "b.png": "sks dog", "c.png": "sks dog"}
    assert sorted(p.name for p in index.class_token_captions) == ["a.png", "b.png"]
    assert caption_twin_notes(index) == [
        f"2 images have no .caption caption file but a .txt one (e.g. {data / '2_sks dog' / 'a.txt'}): kohya reads "
        "only caption_extension '.caption' (sd-scripts' default when caption_extension is left out), so they train "
        "on their class tokens or an empty caption, here as in kohya; set caption_extension = '.txt' to train on "
        "those captions"
    ]
    # sdcore's own names keep the safety net: the .txt captions are read
    own = load_options(TrainOptions, None, {"data": str(data)})
    index = build_dataset_index(own)
    assert {e.path.name: e.caption for e in index.entries}["a.png"] == "a photo of sks dog"
    assert caption_twin_notes(index) == []


def test_read_caption_without_fallback(tmp_path):
    image = tmp_path / "x.png"
    (tmp_path / "x.txt").write_text("from txt\n", encoding="utf-8")
    assert read_caption(image, ".caption") == "from txt"
    assert read_caption(image, ".caption", fallback=False) is None


def test_dataset_toml_subsets_inherit_kohyas_caption_extension(tmp_path):
    data = _folder(tmp_path, {"a.caption": "cap a", "a.txt": "txt a"})
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data / '2_sks dog'}'\n", encoding="utf-8")
    notes: list[str] = []
    options = load_options(TrainOptions, None, kohya={"dataset_config": str(toml)}, notes=notes)
    (subset,) = load_toml_dataset_config(toml, options)
    # config_util.py BlueprintGenerator: subset, dataset, general, then the argparse value (".caption")
    assert (subset.caption_extension, subset.caption_fallback) == (".caption", False)
    assert any("caption_extension defaults to .caption" in n for n in notes)
    # a TOML that sets the extension for every subset: the run-wide default is not said
    toml.write_text(
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{data / '2_sks dog'}'\ncaption_extension = '.txt'\n",
        encoding="utf-8",
    )
    notes = []
    options = load_options(TrainOptions, None, kohya={"dataset_config": str(toml)}, notes=notes)
    assert not any("caption_extension defaults" in n for n in notes)
    (subset,) = load_toml_dataset_config(toml, options)
    assert subset.caption_extension == ".txt"


def test_fields_audited_exist():
    names = {f.name for f in fields(TrainOptions)}
    assert {target for _, target, _, _ in AUDIT} <= names

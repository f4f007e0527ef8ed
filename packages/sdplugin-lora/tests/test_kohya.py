"""A kohya user's command line and training TOML run unchanged (sdcore.train.kohya + the LoRA options).

The configs in ``data/kohya`` are written the way kohya's tools write them (see its README).
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open
from sdcore.errors import ConfigError
from sdcore.testing.contract import make_tiny_dataset
from sdcore.train.config import load_options
from sdplugin_lora.method import LoraOptions

DATA = Path(__file__).parent / "data" / "kohya"


def _config(tmp_path: Path, name: str, **paths: Path) -> Path:
    text = (DATA / name).read_text(encoding="utf-8")
    for key, value in paths.items():
        text = text.replace("{" + key + "}", value.as_posix())
    out = tmp_path / name
    out.write_text(text, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def kohya_data(tmp_path_factory):
    """kohya's folder layout: ``train/10_mychar`` (10 repeats) and ``reg/1_style``."""
    root = tmp_path_factory.mktemp("kohya")
    make_tiny_dataset(root / "train", n=2, size=64, repeats=10, name="mychar")
    make_tiny_dataset(root / "style", n=2, size=64, repeats=3, name="mystyle")
    make_tiny_dataset(root / "reg", n=2, size=64, repeats=1, name="style")
    return root


def _cli():
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return build_cli(get_plugin_manager())


def _invoke(args: list[str]):
    result = CliRunner().invoke(_cli(), args, catch_exceptions=False)
    return result, result.output


def test_kohya_command_line_trains_and_names_the_files_as_kohya(tmp_path, kohya_data):
    """The done-when test: train_network.py's flags, unchanged, including unsupported-but-harmless ones."""
    from sdplugin_lora.format import read_lora

    out = tmp_path / "out"
    args = [
        "train",
        "lora",
        "--pretrained_model_name_or_path=tiny:sd1",
        "--train_data_dir", str(kohya_data / "train"),
        "--output_dir", str(out),
        "--output_name", "mychar",
        "--save_model_as", "safetensors",
        "--network_module", "networks.lora",
        "--network_dim", "4",
        "--network_alpha", "2",
        "--network_args", "conv_dim=2", "conv_alpha=1",
        "--learning_rate", "1e-3",
        "--unet_lr", "1e-3",
        "--text_encoder_lr", "5e-4",
        "--train_batch_size", "4",
        "--resolution", "64,64",
        "--enable_bucket",
        "--min_bucket_reso", "64",
        "--max_bucket_reso", "128",
        "--max_train_epochs", "2",
        "--save_every_n_epochs", "1",
        "--lr_scheduler", "cosine_with_restarts",
        "--lr_warmup_steps", "1",
        "--optimizer_type", "AdamW",
        "--mixed_precision", "no",
        "--save_precision", "fp16",
        "--seed", "1",
        "--clip_skip", "1",
        "--caption_extension", ".txt",
        "--shuffle_caption",
        "--keep_tokens", "1",
        "--noise_offset", "0.05",
        "--min_snr_gamma", "5",
        "--cache_latents",
        "--gradient_accumulation_steps", "1",
        "--xformers",
        "--max_data_loader_n_workers", "0",
        "--persistent_data_loader_workers",
        "--no-progress",
    ]  # fmt: skip
    result, text = _invoke(args)
    assert result.exit_code == 0, text
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == ["mychar-000001.safetensors", "mychar.safetensors"]
    # harmless options are noted (max_data_loader_n_workers 0 is kohya's own default: nothing to say)
    assert "note: accepted without effect here: persistent_data_loader_workers, xformers" in text
    lora = read_lora(out / "mychar.safetensors")
    meta = lora.metadata
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert meta["ss_output_name"] == "mychar"
    # kohya's optimizer/schedule keys: module.Class(args), the scheduler's kohya name, the warmup as given
    assert (meta["ss_optimizer"], meta["ss_lr_scheduler"], meta["ss_lr_warmup_steps"]) == (
        "torch.optim.adamw.AdamW",
        "cosine_with_restarts",
        "1",
    )
    assert meta["ss_steps"] == str(2 * math.ceil(20 / 4))  # 2 images x 10 repeats, batch 4, 2 epochs
    # kohya's train_network trains the text encoder unless --network_train_unet_only
    assert any(k.startswith("lora_te_") for k in lora.modules)
    # conv_dim=2 made it a LoCon: 3x3 ResNet convs carry rank-2 modules
    conv = [k for k in lora.modules if k.endswith("resnets_0_conv1")]
    assert conv and all(lora.modules[k].down.shape[0] == 2 for k in conv)


def test_kohya_gui_flat_toml_runs(tmp_path, kohya_data):
    prompts = tmp_path / "prompts.txt"
    shutil.copy(DATA / "prompts.txt", prompts)
    out = tmp_path / "gui"
    cfg = _config(
        tmp_path, "gui_flat.toml", data=kohya_data / "train", output=out, logs=tmp_path / "logs", prompts=prompts
    )
    notes: list[str] = []
    o = load_options(LoraOptions, cfg, notes=notes)
    assert (o.model, o.data, o.output) == ("tiny:sd1", str(kohya_data / "train"), str(out / "mychar.safetensors"))
    assert (o.rank, o.alpha, o.conv_rank, o.conv_alpha, o.algo) == (4, 2.0, 2, 1.0, "lora")
    assert (o.epochs, o.max_steps) == (2, None)  # max_train_epochs overrides max_train_steps, as in kohya
    assert (o.lr, o.unet_lr, o.te_lr, o.batch_size, o.resolution) == (1e-3, 1e-3, 5e-4, 2, 64)
    assert (o.lr_scheduler, o.optimizer, o.save_dtype, o.seed, o.save_every_epochs) == (
        "cosine",
        "adamw",
        "fp16",
        1234,
        1,
    )
    assert (o.buckets, o.min_bucket_reso, o.max_bucket_reso, o.bucket_no_upscale) == (True, 64, 128, True)
    assert o.train_text_encoder and o.sample_prompts == str(prompts) and o.log_dir == str(tmp_path / "logs")
    joined = "\n".join(notes)
    assert "max_train_epochs overrides max_train_steps" in joined
    assert "lr_scheduler_num_cycles only applies to cosine_with_restarts" in joined
    result, text = _invoke(["train", "lora", "--config", str(cfg), "--no-progress"])
    assert result.exit_code == 0, text
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["mychar-000001.safetensors", "mychar.safetensors"]
    samples = sorted(p.name for p in (out / "mychar-samples").iterdir())
    assert samples == ["final.png"]
    # and each prompt alone where kohya puts it: output_dir/sample/<output_name>_<step>_<line>_<time>_<--d>.png
    images = sorted(p.name for p in (out / "sample").iterdir())
    assert len(images) == 2 and all(re.fullmatch(rf"mychar_\d{{6}}_0{i}_\d{{14}}_{i + 1}\.png", n) for i, n in
                                    enumerate(images)), images  # fmt: skip


def test_sections_toml_with_lycoris_and_dataset_config(tmp_path, kohya_data):
    dataset = _config(tmp_path, "dataset.toml", data=kohya_data / "style", reg=kohya_data / "reg" / "1_style")
    out = tmp_path / "sec"
    cfg = _config(tmp_path, "sections.toml", dataset=dataset, output=out, logs=tmp_path / "logs")
    notes: list[str] = []
    o = load_options(LoraOptions, cfg, notes=notes)
    assert (o.algo, o.rank, o.alpha, o.conv_rank, o.conv_alpha) == ("loha", 4, 2.0, 2, 1.0)
    assert o.unet_only and not o.train_text_encoder
    assert o.optimizer_args == "weight_decay=0.1 betas=0.9,0.99"
    # save_last_n_steps 2, every 2: kohya keeps the saves of the last 2 steps, i.e. 2 of them
    assert (o.max_steps, o.epochs, o.save_every, o.save_limit) == (4, None, 2, 2)
    # kohya renders nothing when sample_every_n_steps comes without sample_prompts
    assert (o.sample_every, o.sample_sampler, o.lr_scheduler) == (None, "k_euler_a", "constant_with_warmup")
    assert "sample_every_n_steps without sample_prompts: no sample images (as in kohya)" in notes
    assert o.data == str(dataset) and o.output == str(out / "mystyle.safetensors")
    assert any("75-token chunks" in n for n in notes)
    assert not any("buckets are off" in n for n in notes)  # the dataset TOML's [general] enable_bucket decides
    result, text = _invoke(["train", "lora", "--config", str(cfg), "--no-progress"])
    assert result.exit_code == 0, text
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "mystyle-step00000002.safetensors",
        "mystyle.safetensors",
    ]
    # kohya titles every save with --output_name, the intermediate ones too
    with safe_open(str(out / "mystyle-step00000002.safetensors"), "pt") as f:
        step_meta = f.metadata()
    assert (step_meta["ss_output_name"], step_meta["modelspec.title"], step_meta["ss_steps"]) == (
        "mystyle",
        "mystyle",
        "2",
    )


def test_every_argument_config_lists_all_unsupported_options_at_once(tmp_path, kohya_data):
    cfg = _config(tmp_path, "all_sections.toml", data=kohya_data / "train", output=tmp_path / "o")
    refused = tmp_path / "refused.toml"
    refused.write_text(
        cfg.read_text().replace("random_crop = true", 'random_crop = true\ndataset_class = "my.Dataset"')
    )
    with pytest.raises(ConfigError) as info:
        load_options(LoraOptions, refused)
    message = str(info.value)
    for name in ("dataset_class = 'my.Dataset'",):
        assert name in message
    # the options at their "off" value pass, and multires noise, max-norm and random_crop translate
    assert message.count("not supported by sdcore") == 1
    assert load_options(LoraOptions, cfg, notes=[]).random_crop is True
    # scale_weight_norms translates (LyCORIS' LoHa max-norm), multires noise too
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(cfg.read_text().replace("random_crop = true", "random_crop = false"))
    kept = load_options(LoraOptions, fixed, notes=[])
    assert (kept.scale_weight_norms, kept.algo, kept.multires_noise_iterations) == (1, "loha", 10)
    from sdplugin_lora.method import LoraMethod

    LoraMethod(kept).validate()
    # with those switched off the same file loads
    text = cfg.read_text().replace("multires_noise_iterations = 10", "multires_noise_iterations = 0")
    cfg.write_text(
        text.replace("scale_weight_norms = 1", "scale_weight_norms = 0").replace(
            "random_crop = true", "random_crop = false"
        )
    )
    o = load_options(LoraOptions, cfg, notes=[])
    assert (o.epochs, o.max_steps, o.algo, o.conv_rank, o.caption_dropout, o.sample_sampler) == (
        2,
        None,
        "loha",
        4,
        0.05,
        "ddim",
    )
    assert o.resume is None and o.clip_skip == 2 and o.te_lr == 0.0002


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ({"network_module": "networks.my_lora"}, "network_module 'networks.my_lora' is not available"),
        (
            {"network_module": "networks.lora_lumina"},
            "network_module 'networks.lora_lumina' is not supported by sdcore",
        ),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=oft"]}, "algo='oft' is not supported by sdcore"),
        ({"network_args": ["dylora_unit=4"]}, "network_args dylora_unit=4 is not supported"),
        ({"network_args": ["algo=loha"]}, "algo= needs network_module = lycoris.kohya"),
        ({"network_args": ["conv_dim"]}, "is not key=value"),
        ({"output_dir": "o", "save_model_as": "ckpt"}, "sdcore writes .safetensors"),
        ({"output_name": "x"}, "need output_dir"),
        ({"optimizer_type": "Adam W"}, "optimizer_type = 'Adam W' is not a valid value"),
        ({"lr_scheduler": "cosine_annealing"}, "lr_scheduler = 'cosine_annealing' is not a valid value"),
        ({"lr_warmup_steps": 10.5}, "kohya reads a float as a ratio of the total steps"),
        ({"lr_decay_steps": "150%"}, "a percentage must be between 0% and 100%"),
        ({"text_encoder_lr": [1e-4, 2e-4]}, "cannot be read before loading; set te1_lr/te2_lr/te3_lr"),
        ({"dataset_class": "my.Dataset"}, "dataset_class = 'my.Dataset' is not supported"),
        ({"stop_text_encoder_training": 5}, "kohya's dreambooth option"),
    ],
)
def test_translation_refuses_what_would_change_the_result(tmp_path, items, message):
    import tomli_w

    cfg = tmp_path / "c.toml"
    cfg.write_text(tomli_w.dumps(items))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_options(LoraOptions, cfg)


def test_command_line_kohya_names_override_config_and_clash_with_sdcore_names(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[additional_network_arguments]\nnetwork_dim = 8\n")
    o = load_options(LoraOptions, cfg, kohya={"network_dim": "16"}, notes=[])
    assert o.rank == 16
    o = load_options(LoraOptions, cfg, {"rank": 32}, notes=[])
    assert o.rank == 32
    with pytest.raises(ConfigError, match="network_dim and rank both given"):
        load_options(LoraOptions, None, {"rank": 32}, kohya={"network_dim": "16"})
    cfg.write_text("network_dim = 8\nrank = 4\n")
    with pytest.raises(ConfigError, match="network_dim and rank both given"):
        load_options(LoraOptions, cfg)


def test_kohya_defaults_only_for_runs_written_in_kohya_terms():
    o = load_options(LoraOptions, None, {"model": "tiny:sd1"})
    assert (o.rank, o.alpha, o.train_text_encoder, o.buckets, o.max_steps) == (16, None, False, True, None)
    notes: list[str] = []
    o = load_options(LoraOptions, None, kohya={"pretrained_model_name_or_path": "tiny:sd1"}, notes=notes)
    assert (o.rank, o.alpha, o.train_text_encoder, o.buckets, o.max_steps) == (4, 1.0, True, False, 1600)
    assert "network_dim defaults to 4; network_alpha defaults to 1" in notes[0]
    o = load_options(
        LoraOptions,
        None,
        kohya={"network_train_unet_only": True, "max_train_epochs": "3", "network_alpha": "4"},
        notes=[],
    )
    assert (o.alpha, o.train_text_encoder, o.unet_only, o.max_steps, o.epochs) == (4.0, False, True, None, 3)


def test_help_lists_kohya_names_in_their_own_section():
    _result, text = _invoke(["train", "lora", "--help"])
    main, _, kohya = text.partition("kohya names")
    assert "--network_dim" not in main and "--rank" in main
    assert "--network_dim" in kohya and "--rank" in kohya and "--network_args" in kohya and "--xformers" not in main


@pytest.mark.parametrize(
    ("flag", "hint"), [("--network-dim", "--rank"), ("--network_dimm", "--rank"), ("--conv_dim", "--conv-rank")]
)
def test_unknown_flags_hint_the_sdcore_name(flag, hint):
    result, text = _invoke(["train", "lora", flag, "4"])
    assert result.exit_code == 2
    assert f"did you mean {hint}?" in text


def test_network_args_keys_map_or_pass_through_when_they_are_lora_options():
    o = load_options(
        LoraOptions,
        None,
        kohya={
            "network_module": "lycoris.kohya",
            "network_args": ["algo=lokr", "factor=4", "rank_dropout=0.1", "module_dropout=0.2", "dropout=0.05"],
            "network_alpha": "2",
        },
        notes=[],
    )
    assert (o.algo, o.lokr_factor, o.rank_dropout, o.module_dropout, o.dropout) == ("lokr", 4, 0.1, 0.2, 0.05)
    assert o.conv_alpha == 2.0  # LyCORIS: conv_alpha defaults to network_alpha
    o = load_options(
        LoraOptions,
        None,
        kohya={
            "network_args": ["lokr_factor=3", "use_tucker=False", "preset=attn-mlp"],
            "network_module": "lycoris.kohya",
        },
        notes=[],
    )
    # LyCORIS preset attn-mlp: Transformer blocks only, no conv (enable_conv=False) = kohya's LierLa set
    assert (o.lokr_factor, o.algo, o.conv_rank) == (3, "lora", 0)
    o = load_options(
        LoraOptions, None, kohya={"network_module": "lycoris.kohya", "network_args": ["dora_wd=True"]}, notes=[]
    )
    assert o.algo == "dora"


@pytest.mark.parametrize(
    ("algo", "extra", "want"), [("loha", [], "loha"), ("lokr", [], "lokr"), ("lora", ["dora_wd=True"], "dora")]
)
def test_lycoris_full_preset_adapts_convs_at_network_dim_for_every_algo(algo, extra, want):
    """lycoris.kohya's create_network: conv_dim/conv_alpha default to network_dim/network_alpha and
    the default preset 'full' enables convs, so algo=loha/lokr (and DoRA) train the 3x3 convs too."""
    kohya = {"network_module": "lycoris.kohya", "network_args": [f"algo={algo}", *extra]}
    o = load_options(LoraOptions, None, kohya={**kohya, "network_dim": "8", "network_alpha": "2"}, notes=[])
    assert (o.algo, o.conv_rank, o.conv_alpha) == (want, 8, 2.0)
    o = load_options(LoraOptions, None, kohya=kohya, notes=[])  # kohya's defaults: dim 4, alpha 1
    assert (o.rank, o.alpha, o.conv_rank, o.conv_alpha) == (4, 1.0, 4, 1.0)
    mixed = load_options(LoraOptions, None, overrides={"rank": 16, "alpha": 4.0}, kohya=kohya, notes=[])
    assert (mixed.conv_rank, mixed.conv_alpha) == (16, 4.0)  # sdcore's --rank/--alpha are network_dim/alpha
    given = {**kohya, "network_args": [*kohya["network_args"], "conv_dim=0"], "network_dim": "8"}
    assert load_options(LoraOptions, None, kohya=given, notes=[]).conv_rank == 0
    if want == "dora":  # sdcore's DoRA layout is LyCORIS' wd_on_output=False; True would train another one
        layout = {**kohya, "network_args": [*kohya["network_args"], "wd_on_output=False"]}
        assert load_options(LoraOptions, None, kohya=layout, notes=[]).algo == "dora"
        with pytest.raises(ConfigError, match="wd_on_output=True"):
            load_options(LoraOptions, None, kohya={**kohya, "network_args": [*kohya["network_args"], "wd_on_output=True"]},
                         notes=[])  # fmt: skip


def test_gui_presets_are_read_and_their_unsupported_settings_listed(tmp_path):
    import json

    for name, translated in (
        ("gui_preset_loha.json", {"multires_noise_iterations": 6, "scale_weight_norms": 1}),
        (
            "gui_preset_sdxl_standard.json",
            {"adaptive_noise_scale": 0.004, "max_timestep": 900, "min_timestep": 100},
        ),
    ):  # every setting of these presets is one sdcore has now
        read = load_options(LoraOptions, DATA / name, notes=[])
        assert {k: getattr(read, k) for k in translated} == translated
    # what sdcore does not have is listed, all at once
    data = json.loads((DATA / "gui_preset_loha.json").read_text())
    data.update(dataset_class="mymodule.MyDataset", min_bucket_reso="abc")
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps(data))
    refused = ["dataset_class = 'mymodule.MyDataset'"]
    with pytest.raises(ConfigError) as info:
        load_options(LoraOptions, listed)
    message = str(info.value)
    assert all(r in message for r in refused), message
    assert message.count("not supported by sdcore") == len(refused), message
    assert "min_bucket_reso" in message  # reported together with the unsupported option
    data = json.loads((DATA / "gui_preset_loha.json").read_text())
    data.update(multires_noise_iterations=0, noise_offset_type="Original", scale_weight_norms=0, use_cp=False)
    cfg = tmp_path / "loha.json"
    cfg.write_text(json.dumps(data))
    notes: list[str] = []
    o = load_options(LoraOptions, cfg, notes=notes)
    assert (o.algo, o.rank, o.alpha, o.conv_rank, o.conv_alpha) == ("loha", 16, 8.0, 4, 2.0)
    # max_train_steps null: the GUI passes none, so sd-scripts trains its default 1600 steps (epoch 3 is unused)
    assert (o.epochs, o.max_steps, o.resolution, o.gradient_accumulation, o.seed) == (None, 1600, 512, 2, 42)
    assert (o.unet_lr, o.te_lr, o.train_text_encoder, o.optimizer, o.mixed_precision) == (
        5e-4,
        2e-4,
        True,
        "adamw",
        "bf16",
    )
    assert "read as a kohya_ss GUI preset (LoRA_type LyCORIS/LoHa)" in notes
    data = json.loads((DATA / "gui_preset_sdxl_standard.json").read_text())
    data.update(adaptive_noise_scale=0, max_timestep=1000, min_timestep=0, text_encoder_lr=0)
    cfg.write_text(json.dumps(data))
    o = load_options(LoraOptions, cfg, notes=[])
    # Standard LoRA ignores the GUI's conv fields; max_train_steps wins over the GUI's epoch field;
    # a text-encoder rate of 0 means UNet only (the GUI's rule)
    assert (o.algo, o.conv_rank, o.max_steps, o.epochs, o.seed, o.resolution) == ("lora", 0, 300, None, 1234, 1024)
    assert o.unet_only and not o.train_text_encoder and o.noise_offset == 0.04


def test_sdxl_text_encoder_lr_pair_on_the_command_line():
    from sdcore.train.cli import expand_multi_values

    args = expand_multi_values(["--text_encoder_lr", "1e-4", "1e-4", "--network_args", "conv_dim=2", "--seed", "1"])
    assert args == [
        "--text_encoder_lr",
        "1e-4",
        "--text_encoder_lr",
        "1e-4",
        "--network_args",
        "conv_dim=2",
        "--seed",
        "1",
    ]
    o = load_options(LoraOptions, None, kohya={"text_encoder_lr": ["1e-4", "1e-4"]}, notes=[])
    assert o.te_lr == 1e-4


def test_kohya_initial_step_with_skip_names_and_records_the_offset_steps(tmp_path):
    """--initial_step K --skip_until_initial_step: the counter starts at K, so step saves are named and
    recorded (ss_steps, ss_epoch) with the uninterrupted run's numbers, as kohya's global_step = K."""
    from sdplugin_lora.format import read_lora

    make_tiny_dataset(tmp_path / "train", n=2, size=64, repeats=1, name="mychar")  # batch 1: 2 steps/epoch
    out = tmp_path / "out"
    args = [
        "train", "lora", "--pretrained_model_name_or_path=tiny:sd1", "--train_data_dir", str(tmp_path / "train"),
        "--output_dir", str(out), "--output_name", "mychar", "--network_module", "networks.lora",
        "--network_dim", "2", "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "8",
        "--save_every_n_steps", "5", "--initial_step", "3", "--skip_until_initial_step", "--no-progress",
    ]  # fmt: skip
    result, text = _invoke(args)
    assert result.exit_code == 0, text
    assert "starting at step 3 (epoch 2, batch 2)" in text
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "mychar-step00000005.safetensors",
        "mychar.safetensors",
    ]
    meta = read_lora(out / "mychar-step00000005.safetensors").metadata
    # step 5 lies in the third epoch (kohya's 0-based epoch counter there is 2)
    assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_max_train_steps"]) == ("5", "2", "8")
    assert read_lora(out / "mychar.safetensors").metadata["ss_steps"] == "8"

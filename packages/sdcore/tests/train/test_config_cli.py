"""Config files (TOML/JSON), overrides, dumping, and the generated click command."""

import json

import click
import pytest
from click.testing import CliRunner
from runtime_methods import ConvOutOptions
from sdcore.errors import ConfigError
from sdcore.specs import MethodSpec
from sdcore.train.cli import build_train_command
from sdcore.train.config import dump_options, load_options


def test_toml_with_dashes_tables_and_overrides(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "tiny:sd1"\nmax-steps = 5\n[training]\nlr = 0.5\nflip = true\n', encoding="utf-8")
    o = load_options(ConvOutOptions, cfg, {"lr": 0.25, "train-text-norm": True})
    assert (o.model, o.max_steps, o.lr, o.flip, o.train_text_norm) == ("tiny:sd1", 5, 0.25, True, True)


def test_json_config(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"batch_size": 3, "min_snr_gamma": 5}), encoding="utf-8")
    o = load_options(ConvOutOptions, cfg)
    assert o.batch_size == 3 and o.min_snr_gamma == 5.0


def test_unknown_keys_are_listed_together_with_the_nearest_name(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("lrr = 1e-4\nbatch_sise = 2\nnetwork_dimm = 4\nzzz = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_options(ConvOutOptions, cfg)
    message = str(info.value)
    assert "bad.toml" in message and "\n" not in message
    assert "'lrr' (did you mean 'lr'?)" in message
    assert "'batch_sise' (did you mean 'batch_size'?)" in message
    assert "'network_dimm' (did you mean 'network_dim'" in message  # kohya's name (not a ConvOut option)
    assert "'zzz'," not in message and message.endswith("'zzz'")


def test_wrong_types_and_choices(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('batch_size = "two"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="batch_size must be int"):
        load_options(ConvOutOptions, cfg)
    cfg.write_text('save_dtype = "fp8"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="choose one of"):
        load_options(ConvOutOptions, cfg)
    cfg.write_text("lr = [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_options(ConvOutOptions, cfg)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_float_options_refuse_nan_and_inf_on_the_command_line_and_in_configs(tmp_path, value):
    """nan passed every `lr <= 0` style check (a run training on lr=nan, "done", with a NaN file)."""
    float_flags = ["--lr", "--noise-offset", "--min-snr-gamma", "--max-grad-norm", "--prior-loss-weight"]
    args = ["--model", "tiny:sd1", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--dry-run"]
    result = CliRunner().invoke(_command(), [*args, *(x for flag in float_flags for x in (flag, value))])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    for flag in float_flags:  # every one at once, before anything loads
        assert f"{flag[2:].replace('-', '_')} must be a finite number, got {value}" in result.output
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"lr = {value}\nhuber_c = {value}\n", encoding="utf-8")  # TOML has nan and inf literals
    with pytest.raises(ConfigError, match=f"lr must be a finite number, got {value}; huber_c must be"):
        load_options(ConvOutOptions, cfg)


def test_save_config_never_replaces_the_config_it_reads(tmp_path, tiny_data):
    """``--config kohya.toml --save-config kohya.toml`` replaced kohya's file with sdcore's names in silence."""
    kohya = tmp_path / "kohya.toml"
    kohya.write_text(f'pretrained_model_name_or_path = "tiny:sd1"\ntrain_data_dir = "{tiny_data}"\n', encoding="utf-8")
    before = kohya.read_bytes()
    for spelled in (kohya, tmp_path / "sub" / ".." / "kohya.toml"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        args = ["--config", str(kohya), "--output", str(tmp_path / "o"), "--save-config", str(spelled), "--dry-run"]
        result = CliRunner().invoke(_command(), args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert f"--save-config {spelled} is the input {kohya}: the result cannot replace a file it is made from" in (
            result.output
        )
        assert kohya.read_bytes() == before
    saved = tmp_path / "sdcore.toml"
    args = ["--config", str(kohya), "--output", str(tmp_path / "o"), "--save-config", str(saved), "--dry-run"]
    assert CliRunner().invoke(_command(), args).exit_code == 0 and saved.is_file()


def test_dump_load_roundtrip(tmp_path):
    o = ConvOutOptions(
        model="tiny:sd1",
        data="d",
        output="o",
        max_steps=7,
        optimizer_args="betas=0.9,0.99",
        train_text_norm=True,
        min_snr_gamma=5.0,
    )
    path = tmp_path / "o.toml"
    dump_options(o, path)
    assert load_options(ConvOutOptions, path) == o


def _command():
    return build_train_command(MethodSpec(name="convout", summary="test", method="runtime_methods:ConvOutMethod"))


def test_generated_command_has_every_option():
    cmd = _command()
    names = {p.name for p in cmd.params}
    assert {"config", "max_steps", "lr", "flip", "train_text_norm", "mixed_precision", "dry_run"} <= names
    flip = next(p for p in cmd.params if p.name == "flip")
    assert "--no-flip" in flip.secondary_opts
    mp = next(p for p in cmd.params if p.name == "mixed_precision")
    assert isinstance(mp.type, click.Choice)


def test_help_groups_options_without_an_options_options_section():
    """A field declared without group= is listed under plain "Options", not "Options options"."""
    from click.testing import CliRunner

    text = CliRunner().invoke(_command(), ["--help"]).output
    assert "Options options" not in text
    options_section = text.split("\nOptions:\n", 1)[1]
    assert "--train-text-norm" in options_section.split("options:\n", 1)[0]
    assert "Training options:" in text and "Model options:" in text


def test_command_line_overrides_config_and_only_given_flags(tmp_path, tiny_data):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'model = "tiny:sd1"\ndata = "{tiny_data}"\nlr = 0.5\nbatch_size = 2\nresolution = 64\n'
        "min_bucket_reso = 64\nmax_bucket_reso = 128\nmax_steps = 3\n",
        encoding="utf-8",
    )
    out = tmp_path / "eff.toml"
    result = CliRunner().invoke(
        _command(),
        [
            "--config",
            str(cfg),
            "--lr",
            "0.125",
            "--output",
            str(tmp_path / "r.safetensors"),
            "--dry-run",
            "--save-config",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    o = load_options(ConvOutOptions, out)
    assert o.lr == 0.125  # typed flag wins
    assert o.batch_size == 2 and o.max_steps == 3  # config values survive flags left at defaults
    assert "3 optimizer steps" in result.output


def test_underscore_spellings_of_sdcore_flags_are_those_flags(tmp_path, tiny_data):
    """kohya users type --max_steps / --no_cache_latents; --help promises every option works that way."""
    out = tmp_path / "eff.toml"
    args = ["--model", "tiny:sd1", "--data", str(tiny_data), "--output", str(tmp_path / "r.safetensors"),
            "--resolution", "64", "--min_bucket_reso=64", "--max_bucket_reso", "128", "--max_steps", "3",
            "--no_cache_latents", "--caption_variants=2", "--dry-run", "--save_config", str(out)]  # fmt: skip
    result = CliRunner().invoke(_command(), args)
    assert result.exit_code == 0, result.output
    o = load_options(ConvOutOptions, out)
    assert o.max_steps == 3 and o.cache_latents is False and o.caption_variants == 2 and o.min_bucket_reso == 64
    # kohya's own names keep their kohya meaning (--max_train_steps -> --max-steps), a typo still says which
    result = CliRunner().invoke(_command(), [*args[:-2], "--max_stepz", "1"])
    assert result.exit_code == 2 and "did you mean --max-steps?" in result.output


def test_underscore_rewrite_leaves_option_values_alone(tmp_path, tiny_data):
    """A value that looks like an underscore flag (``--training-comment --max_steps``) is the option's value,
    as click reads it, not a flag to rewrite."""
    out = tmp_path / "eff.toml"
    args = ["--model", "tiny:sd1", "--data", str(tiny_data), "--output", str(tmp_path / "my_file.safetensors"),
            "--resolution", "64", "--min_bucket_reso=64", "--max_steps", "3", "--training_comment", "--caption_variants",
            "--dry-run", "--save_config", str(out)]  # fmt: skip
    result = CliRunner().invoke(_command(), args)
    assert result.exit_code == 0, result.output
    o = load_options(ConvOutOptions, out)
    assert o.training_comment == "--caption_variants" and o.max_steps == 3
    assert o.output == str(tmp_path / "my_file.safetensors")
    result = CliRunner().invoke(_command(), [*args[:-5], "--training-comment", "--max_steps", *args[-3:]])
    assert result.exit_code == 0, result.output
    assert load_options(ConvOutOptions, out).training_comment == "--max_steps"


def test_command_reports_config_errors_in_one_line(tmp_path):
    result = CliRunner().invoke(_command(), ["--model", "tiny:sd1"])
    assert result.exit_code == 2  # the pre-flight's exit code: every problem, one line each
    lines = result.output.splitlines()
    assert "Error: no dataset given (--data: a folder of images or a dataset .toml)" in lines
    assert "Error: no output given (--output: where to write the result)" in lines
    assert "Traceback" not in result.output


def test_command_trains(tmp_path, tiny_data):
    out = tmp_path / "r.safetensors"
    result = CliRunner().invoke(
        _command(),
        [
            "--model",
            "tiny:sd1",
            "--data",
            str(tiny_data),
            "--output",
            str(out),
            "--resolution",
            "64",
            "--min-bucket-reso",
            "64",
            "--max-bucket-reso",
            "128",
            "--max-steps",
            "2",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.exists() and "after 2 steps" in result.output


def test_kohya_spellings_on_the_command_line_convert_to_an_sdcore_config(tmp_path, tiny_data):
    """A kohya command line (hidden flags) checked with --dry-run and written back in sdcore's names."""
    out = tmp_path / "eff.toml"
    args = [
        "--pretrained_model_name_or_path", "tiny:sd1",
        "--train_data_dir", str(tiny_data),
        "--output_dir", str(tmp_path / "out"),
        "--output_name", "mine",
        "--learning_rate", "0.25",
        "--train_batch_size", "2",
        "--resolution", "64,64",
        "--enable_bucket",
        "--min_bucket_reso", "64",
        "--max_bucket_reso", "128",
        "--max_train_steps", "3",
        "--optimizer_type", "SGDNesterov",
        "--optimizer_args", "weight_decay=0.01", "momentum=0.5",
        "--lr_scheduler", "cosine_with_restarts",
        "--save_precision", "float",
        "--sdpa",
        "--dry-run",
        "--save-config", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(_command(), args)
    assert result.exit_code == 0, result.output
    assert "note: accepted without effect here: sdpa" in result.output
    assert f"result: {tmp_path / 'out' / 'mine.safetensors'}" in result.output
    o = load_options(ConvOutOptions, out)
    assert (o.model, o.data, o.lr, o.batch_size, o.resolution, o.max_steps) == (
        "tiny:sd1",
        str(tiny_data),
        0.25,
        2,
        64,
        3,
    )
    assert (o.optimizer, o.lr_scheduler, o.save_dtype, o.buckets) == (
        "sgdnesterov",
        "cosine_with_restarts",
        "fp32",
        True,
    )
    assert o.optimizer_args == "weight_decay=0.01 momentum=0.5"  # sgdnesterov adds nesterov=True itself


def test_kohya_option_of_another_method_and_unknown_flags():
    result = CliRunner().invoke(_command(), ["--network_dim", "4"])
    assert result.exit_code == 2
    assert "--network_dim is a kohya option of `sdcore train lora`, not of this method" in result.output
    result = CliRunner().invoke(_command(), ["--learning-rate", "4"])
    assert "did you mean --lr?" in result.output

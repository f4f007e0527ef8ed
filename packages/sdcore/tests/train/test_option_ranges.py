"""Declared option ranges (``option(minimum=..., maximum=...)``): a value outside one is refused by the pre-flight's
option check (:func:`sdcore.train.preflight.option_problems`) whether or not the option takes effect in the run
(``--ema-decay -1`` without ``--ema``), from the command line and from every config format, with the other
problems, before anything loads."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sdcore.options import out_of_range, range_problems, range_symbols, range_text
from sdcore.train.config import field_types, load_options, unwrap_optional
from sdcore.train.options import TrainOptions
from sdcore.train.preflight import option_problems
from sdplugin_apt.method import APTOptions
from sdplugin_dreambooth.options import DreamBoothOptions
from sdplugin_hn.method import HNOptions
from sdplugin_lora.method import LoraOptions
from sdplugin_ti.method import TIOptions

CLASSES = (TrainOptions, LoraOptions, DreamBoothOptions, TIOptions, APTOptions, HNOptions)


def _outside(meta: dict[str, Any], base: type) -> Any:
    """A value just outside the declared range (its own bound where that bound is left out)."""
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is not None:
        value = low if meta.get("above_minimum") else low - (1 if base is int else 0.5)
    else:
        value = high if meta.get("below_maximum") else high + (1 if base is int else 0.5)
    return base(value)


def _declared() -> list[Any]:
    cases, seen = [], set()
    for cls in CLASSES:
        types_ = field_types(cls)
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata or {})
            if range_text(meta) is None or (f.name, meta.get("minimum"), meta.get("maximum")) in seen:
                continue
            seen.add((f.name, meta.get("minimum"), meta.get("maximum")))
            base, _ = unwrap_optional(types_[f.name])
            cases.append(pytest.param(cls, f.name, _outside(meta, base), id=f"{cls.__name__}.{f.name}"))
    return cases


def test_some_options_declare_ranges() -> None:
    names = {case.values[1] for case in _declared()}
    assert {"ema_decay", "mae_strength", "debug_dataset_steps", "num_class_images", "rank", "vectors"} <= names


@pytest.mark.parametrize(("cls", "name", "value"), _declared())
def test_a_value_outside_a_declared_range_is_refused_on_the_command_line(cls: type, name: str, value: Any) -> None:
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    problems = option_problems(load_options(cls, None, {name: value}))
    flag = meta.get("flag") or "--" + name.replace("_", "-")
    said = [p for p in problems if p.startswith(f"{flag} ")]  # by the declared range, or the option's own check
    assert said, problems
    assert range_problems(cls(**{name: value})) == [f"{flag} must be {range_text(meta)}, got {value}"]


def test_range_words() -> None:
    assert range_text({"minimum": 0, "maximum": 1}) == "between 0 and 1"
    assert range_text({"minimum": 0, "maximum": 1, "above_minimum": True, "below_maximum": True}) == (
        "between 0 and 1 (exclusive)"
    )
    assert range_text({"minimum": 0, "maximum": 1, "below_maximum": True}) == "between 0 and 1 (1 excluded)"
    assert range_text({"minimum": 0, "above_minimum": True}) == "positive"
    assert range_text({"minimum": 0}) == "0 or more"
    assert range_text({"minimum": 1}) == "at least 1"
    assert range_text({"maximum": 75}) == "at most 75"
    assert range_text({}) is None
    assert out_of_range({"minimum": 0}, None) is None  # an optional left unset
    assert out_of_range({"minimum": 0, "maximum": 1}, 1.0) is None
    assert out_of_range({"minimum": 0, "maximum": 1}, 1.5) == "must be between 0 and 1, got 1.5"


def test_unused_options_out_of_range_are_listed_together_before_anything_loads(tmp_path: Path) -> None:
    from sdcore.specs import MethodSpec
    from sdcore.train.cli import build_train_command

    command = build_train_command(MethodSpec(name="lora", summary="LoRA", method="sdplugin_lora.method:LoraMethod"))
    result = CliRunner().invoke(
        command,
        ["--model", "tiny:sd1", "--data", str(tmp_path), "--output", str(tmp_path / "o.safetensors"),
         "--ema-decay", "-1", "--mae-strength", "-2", "--debug-dataset-steps", "-1", "--rank", "0", "--dry-run"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    for said in (
        "Error: --debug-dataset-steps must be at least 1, got -1",
        "Error: --ema-decay must be between 0 and 1 (exclusive), got -1.0",
        "Error: --mae-strength must be 0 or more, got -2.0",
    ):
        assert said in lines
    assert [line for line in lines if line.startswith("Error: --rank ")] == [  # its own check, said once
        "Error: --rank must be at least 1 (got 0)"
    ]
    assert any("no usable training images" in line for line in lines), lines  # with the other problems
    assert "Traceback" not in result.output


def test_a_config_file_names_its_key_and_kohya_names_theirs(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[training]\nema_decay = 1.5\n[loss]\nhuber_strength = -1\nnetwork_dim = 0\n", encoding="utf-8")
    problems = option_problems(load_options(LoraOptions, config, {"tag_dropout": 2.0}))
    for said in (
        "--tag-dropout must be between 0 and 1, got 2.0",
        f"{config}: ema_decay must be between 0 and 1 (exclusive), got 1.5",
        f"{config}: huber_strength must be 0 or more, got -1.0",
        f"{config}: network_dim must be at least 1, got 0",
    ):
        assert said in problems
    data = tmp_path / "run.json"
    data.write_text(json.dumps({"num_class_images": -1}), encoding="utf-8")
    problems = option_problems(load_options(DreamBoothOptions, data))
    assert f"{data}: num_class_images must be 0 or more, got -1" in problems


def _meta(cls: type) -> dict[str, Any]:
    return {f.name: dict(f.metadata or {}) for f in dataclasses.fields(cls)}


def _outside_values(cls: type, values: dict[str, Any]) -> list[str]:
    meta = _meta(cls)
    return [f"{n}={v!r}" for n, v in values.items() if n in meta and out_of_range(meta[n], v) is not None]


def test_translated_defaults_sit_inside_the_declared_ranges(tmp_path: Path) -> None:
    """Each other trainer's default config, translated, and kohya's default tables, give in-range values."""
    from sdcore.train import aitoolkit, kohya, onetrainer_config, simpletuner_config

    fields = [f.name for f in dataclasses.fields(LoraOptions)]
    path = tmp_path / "x.json"
    onetrainer = onetrainer_config.translate_config(
        {**onetrainer_config.DEFAULTS, "training_method": "LORA"}, fields, where="ot", path=path
    )
    simpletuner = simpletuner_config.translate_config(
        {**simpletuner_config.DEFAULTS, "model_family": "flux", "model_type": "lora"}, fields, where="st", path=path
    )
    process: dict[str, Any] = copy.deepcopy(aitoolkit.DEFAULTS["process"])
    for section in ("save", "logging", "sample", "network", "train", "model", "ema_config"):
        process[section] = copy.deepcopy(aitoolkit.DEFAULTS[section])
    process["type"] = "sd_trainer"
    process["network"]["type"] = "lora"
    process["datasets"] = [copy.deepcopy(aitoolkit.DEFAULTS["dataset"])]
    job = aitoolkit.translate_job(
        {"job": "extension", "config": {"name": "r", "process": [process]}}, fields, where="a", path=path
    )
    for translation in (onetrainer, simpletuner, job):
        assert len(translation.values) > 10  # the defaults were translated
        assert _outside_values(LoraOptions, translation.values) == []
    for table in (kohya.KOHYA_DEFAULTS, *kohya.KOHYA_FAMILY_DEFAULTS.values()):
        kohya_values = {name: value for name, value, _ in table}
        assert kohya_values
        assert _outside_values(LoraOptions, kohya_values) == []
        assert _outside_values(DreamBoothOptions, kohya_values) == []


def _help_extra(name: str) -> dict[str, Any]:
    import click
    from sdcore.specs import MethodSpec
    from sdcore.train.cli import build_train_command

    command = build_train_command(MethodSpec(name="lora", summary="LoRA", method="sdplugin_lora.method:LoraMethod"))
    ctx = click.Context(command)
    param = next(p for p in command.params if p.name == name)
    assert isinstance(param, click.Option)
    return dict(param.get_help_extra(ctx))


def test_help_shows_the_declared_range_as_click_shows_its_ranges() -> None:
    assert _help_extra("ema_decay") == {"default": "0.999", "range": "0<x<1"}
    assert _help_extra("tag_dropout") == {"default": "0.0", "range": "0<=x<=1"}
    assert _help_extra("lr")["range"] == "x>=0"  # LoRA's --lr 0 beside --unet-lr/--te-lr (kohya); the pre-flight
    # refuses it where a trained part would train at it
    assert _help_extra("min_snr_gamma") == {"range": "x>0"}  # no default: the range alone, as click writes it
    assert "range" not in _help_extra("seed")  # no range declared, none shown
    assert range_symbols({"maximum": 75}) == "x<=75"
    assert range_symbols({"minimum": 0, "maximum": 1, "below_maximum": True}) == "0<=x<1"
    assert range_symbols({}) is None


def test_a_click_range_type_keeps_its_own_range_text() -> None:
    import click
    from sdcore.train.cli import DeclaredRangeOption

    option = DeclaredRangeOption(
        ["--n"], type=click.IntRange(0, 5), default=1, show_default=True, declared_range="x>=0"
    )
    extra = option.get_help_extra(click.Context(click.Command("c", params=[option])))
    assert extra["range"] == "0<=x<=5"
    record = option.get_help_record(click.Context(click.Command("c", params=[option])))
    assert record is not None and record[1].count("x") == 1  # said once


#: options given a range this time, each out of range in every peer tool or refused by sdcore's own check already
NEWLY_RANGED = {
    "token_warmup_min": -1, "min_bucket_reso": 0, "max_bucket_reso": -64, "lr_power": -1.0,
    "lr_min_ratio": 1.5, "max_timestep": 0, "timestep_shift": 0.0, "discrete_flow_shift": -3.0, "max_table_index": 0,
    "logit_std": 0.0, "mode_scale": 2.0, "sigmoid_scale": -1.0, "t5xxl_max_token_length": 0, "initial_step": -1,
    "initial_epoch": 0, "stop_text_encoder_at": 0, "stop_text_encoder_after_epochs": 0, "lokr_factor": -2,
    "scale_weight_norms": -1.0, "ggpo_sigma": -0.03, "ggpo_beta": -0.01, "loraplus_lr_ratio": 0.0,
    "loraplus_unet_lr_ratio": -16.0, "loraplus_text_encoder_lr_ratio": -1.0, "embedding_lr": -1e-4,
    "embedding_stop_at": 0,
}  # fmt: skip
#: numbers left without a range: legal in a peer tool, or their bounds depend on another option (--lr-cycles: only
#: the cycled schedules read it; kohya_ss GUI configs carry lr_scheduler_num_cycles = 0 beside others)
UNRANGED = ("lr_cycles", "seed", "validation_seed", "adaptive_noise_scale", "noising_weight", "noising_bias", "logit_mean",
            "guidance_scale", "alpha", "conv_alpha", "network_multiplier", "block_lr_zero_threshold")  # fmt: skip


def test_the_options_left_out_last_time_declare_their_ranges() -> None:
    meta = _meta(LoraOptions)
    assert [n for n, v in NEWLY_RANGED.items() if out_of_range(meta[n], v) is None] == []
    assert [n for n in UNRANGED if range_text(meta[n]) is not None] == []
    # the overrides of a method keep the runtime's range: TI's, APT's, HN's and DreamBooth's --lr, its warmup
    for cls in (TIOptions, APTOptions, HNOptions, DreamBoothOptions):
        assert range_text(_meta(cls)["lr"]) == "positive"
    assert range_text(_meta(DreamBoothOptions)["lr_warmup_steps"]) == "0 or more"
    runtime = _meta(TrainOptions)
    lost = [f"{cls.__name__}.{name}" for cls in CLASSES for name, meta in _meta(cls).items()
            if name in runtime and range_text(runtime[name]) and not range_text(meta)]  # fmt: skip
    assert lost == []
    apt = _meta(APTOptions)
    assert [out_of_range(apt[n], v) is None for n, v in (("neg_lr_weight", 0.0), ("rec_loss_weight", -1.0))] == [
        False,
        False,
    ]
    assert out_of_range(apt["discriminator_size"], 0) is not None
    # sentinels and edge values that mean something stay legal
    for name, value in (("lokr_factor", -1), ("lokr_factor", 0), ("lr_power", 0.0), ("initial_step", 0),
                        ("mode_scale", -1.0), ("mode_scale", 1.75), ("scale_weight_norms", 0.0)):  # fmt: skip
        assert out_of_range(meta[name], value) is None, name
    # 2/(pi-2) = 1.7519383...: not 17 digits, and not 1.75194 either, which the check refuses ("must be between -1
    # and 1.75194, got 1.75194"): a bound is shortened inward, so the number the message shows is accepted
    assert range_text(meta["mode_scale"]) == "between -1 and 1.75193"
    assert range_symbols(meta["mode_scale"]) == "-1<=x<=1.75193"
    assert out_of_range(meta["mode_scale"], 1.75193) is None
    assert out_of_range(meta["mode_scale"], 1.75194) == "must be between -1 and 1.75193, got 1.75194"
    low = {"minimum": 1 / 3, "above_minimum": True}  # a lower bound rounds up: "above 0.333334"
    assert range_text(low) == "above 0.333334" and out_of_range(low, 0.333334) is None


def test_a_range_said_by_the_methods_joined_line_is_not_said_again() -> None:
    from sdplugin_lora.method import LoraMethod

    options = LoraOptions(scale_weight_norms=-1.0, loraplus_lr_ratio=-2.0)
    problems = option_problems(options, LoraMethod(options))
    text = "\n".join(problems)
    assert text.count("--loraplus-lr-ratio") == 1, problems
    assert text.count("--scale-weight-norms") == 1, problems

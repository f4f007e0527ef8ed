"""kohya_ss GUI configs (sdcore.train.kohya_gui): the GUI's presets and saved configs, read as the GUI launches
sd-scripts (bmaltais/kohya_ss kohya_gui/lora_gui.py, dreambooth_gui.py, finetune_gui.py,
textual_inversion_gui.py; the rules are restated in each test). The presets under data/kohya_ss_gui are the
GUI's own (see the README there)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sdcore.errors import ConfigError
from sdcore.train import kohya
from sdcore.train.config import field_types, load_options
from sdcore.train.kohya_gui import _GUI_SIGNATURE, GUI_LORA_TYPES, gui_preset, gui_tab, is_gui_preset
from sdplugin_dreambooth.options import DreamBoothOptions
from sdplugin_lora.method import LoraOptions
from sdplugin_ti.method import TIOptions

PRESETS = Path(__file__).parent / "data" / "kohya_ss_gui"
LORA_FIELDS = list(field_types(LoraOptions))

#: presets refused, with the by-name problem each gets (every other preset loads)
REFUSED: dict[str, list[str]] = {
    # Adafactor relative_step=True: sd-scripts runs its adafactor schedule and stops on the GUI's 10 % warmup
    "finetune/adafactor.json": ["lr_warmup 10 (%) with kohya's adafactor schedule", "set lr_warmup"],
}
#: LoRA_type -> sdcore --algo for the types sdcore trains (networks.lora: conv_dim decides lora/locon)
ALGOS = {
    "LyCORIS/LoCon": "locon",
    "LyCORIS/LoHa": "loha",
    "LyCORIS/LoKr": "lokr",
    "LyCORIS/iA3": "ia3",
    "Flux1": "lora",
}


def _presets() -> list[str]:
    return sorted(str(p.relative_to(PRESETS)) for p in PRESETS.glob("*/*.json"))


def _write(tmp_path: Path, data: dict[str, Any], name: str = "gui.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _gui(**fields: Any) -> dict[str, Any]:
    """A small LoRA-tab config (the GUI saves every field; the tests set those they are about)."""
    return {"LoRA_type": "Standard", "network_dim": 8, "network_alpha": 4, "learning_rate": 1e-4,
            "text_encoder_lr": 5e-5, "unet_lr": 1e-4, "optimizer": "AdamW", "max_resolution": "512,512",
            "lr_warmup": 0, **fields}  # fmt: skip


def _number(value: Any) -> float:
    return float(value) if value not in ("", None) else 0.0


def test_presets_are_the_guis_whole_set():
    names = _presets()
    assert len(names) >= 35 and {n.split("/")[0] for n in names} == {"lora", "dreambooth", "finetune"}
    assert set(REFUSED) <= set(names)


def _paths_moved_here(data: dict[str, Any]) -> dict[str, Any]:
    """The preset as a user has it after sdcore named its Windows paths (``E:/models/sd3.safetensors``, which
    cannot exist here and which sdcore refuses rather than read as a relative folder): each moved to ``/data``."""
    from sdcore.windows_paths import windows_path_kind

    def moved(value: Any) -> Any:
        if isinstance(value, str) and windows_path_kind(value):
            return "/data/" + value.replace("\\", "/").rsplit("/", 1)[-1]
        return value

    return {key: moved(value) for key, value in data.items()}


@pytest.mark.parametrize("name", _presets())
def test_every_gui_preset_loads_or_is_refused_by_name(name, tmp_path):
    data = json.loads((PRESETS / name).read_text())
    assert is_gui_preset(data)
    if _paths_moved_here(data) != data:  # written on Windows: each such path named, then the preset as fixed
        with pytest.raises(ConfigError, match="looks like a Windows path"):
            load_options(LoraOptions if name.startswith("lora/") else DreamBoothOptions, PRESETS / name, notes=[])
        data = _paths_moved_here(data)
    preset = _write(tmp_path, data, Path(name).name)
    lora = name.startswith("lora/")
    assert gui_tab(data) == ("lora" if lora else name.split("/")[0])
    options_class = LoraOptions if lora else DreamBoothOptions
    if name in REFUSED:
        with pytest.raises(ConfigError) as info:
            load_options(options_class, preset, notes=[])
        assert all(part in str(info.value) for part in REFUSED[name]), str(info.value)
        assert "unknown option" not in str(info.value)
        return
    notes: list[str] = []
    o = load_options(options_class, preset, notes=notes)
    assert o.lr == pytest.approx(_number(data["learning_rate"]))
    assert o.optimizer == data["optimizer"].lower()
    # common_gui.resolve_lr_warmup_steps: steps above 0 win, else percent / 100 (a ratio of the steps)
    steps, percent = _number(data.get("lr_warmup_steps")), _number(data.get("lr_warmup"))
    assert o.lr_warmup_steps == (int(steps) if steps > 0 else percent / 100)
    # the length as the GUI loads and launches it: common_gui.update_my_data int()s the fields ("" -> 0, cycles
    # "" -> 1); a missing field keeps its widget's default (class_basic_training.py:115 max_train_steps 1600);
    # lora_gui.py:1720 derives the steps from epoch only when max_train_steps is 0; max_train_epochs wins
    # (sd-scripts train_network.py:799)
    epochs_given = int(_number(data.get("max_train_epochs")))
    steps_given = 1600 if data.get("max_train_steps") is None else int(_number(data["max_train_steps"]))
    if epochs_given:
        assert (o.epochs, o.max_steps) == (epochs_given, None)
    elif steps_given:
        assert (o.epochs, o.max_steps) == (None, steps_given)
    else:
        assert (o.epochs, o.max_steps) == (int(_number(data.get("epoch", 1))), None)
    if not lora:
        return
    cycles = data.get("lr_scheduler_num_cycles")
    assert o.lr_cycles == (1 if cycles in (None, "") else int(cycles))  # never the epoch count (update_my_data)
    assert (o.rank, o.alpha) == (int(data["network_dim"]), float(data["network_alpha"]))
    lora_type = data["LoRA_type"]
    assert f"read as a kohya_ss GUI preset (LoRA_type {lora_type})" in notes
    if lora_type == "Standard":
        assert (o.algo, o.conv_rank) == ("lora", 0)
    else:
        assert o.algo == ALGOS[lora_type]
    te_lr, unet_lr = _number(data.get("text_encoder_lr")), _number(data.get("unet_lr"))
    extra = data.get("additional_parameters", "")
    # lora_gui.resolve_network_train_flags: a text-encoder rate of 0 (with a U-Net rate) trains the U-Net only
    assert o.unet_only == ((te_lr == 0 and unet_lr != 0) or "--network_train_unet_only" in extra)
    assert o.unet_lr == (unet_lr or None)
    assert o.te_lr == (te_lr or None)


# ---------------------------------------------------------------------------------------------------------
# LoRA_type -> network_module + network_args (lora_gui.py train_model)

#: lora_gui.py: LoRA_type -> (network_module, LyCORIS algo); the Flux types need the FLUX.1 box
LORA_TYPES = {
    "Standard": ("networks.lora", None),
    "Kohya LoCon": ("networks.lora", None),
    "LoRA-FA": ("networks.lora_fa", None),
    "Kohya DyLoRA": ("networks.dylora", None),
    "Kohya LoHa": ("networks.loha", None),
    "Kohya LoKr": ("networks.lokr", None),
    "Flux1": ("networks.lora_flux", None),
    "Flux1 OFT": ("networks.oft_flux", None),
    "HunyuanImage-2.1": ("networks.lora_hunyuan_image", None),
    "Anima": ("networks.lora_anima", None),
    "Lumina": ("networks.lora_lumina", None),
    "LoCon": ("lycoris.kohya", "locon"),
    "LyCORIS/LoCon": ("lycoris.kohya", "locon"),
    "LyCORIS/LoHa": ("lycoris.kohya", "loha"),
    "LyCORIS/LoKr": ("lycoris.kohya", "lokr"),
    "LyCORIS/iA3": ("lycoris.kohya", "ia3"),
    "LyCORIS/BOFT": ("lycoris.kohya", "boft"),
    "LyCORIS/Diag-OFT": ("lycoris.kohya", "diag-oft"),
    "LyCORIS/DyLoRA": ("lycoris.kohya", "dylora"),
    "LyCORIS/GLoRA": ("lycoris.kohya", "glora"),
    "LyCORIS/Native Fine-Tuning": ("lycoris.kohya", "full"),
}


def test_every_current_lora_type_is_known():
    assert set(GUI_LORA_TYPES) == set(LORA_TYPES)


@pytest.mark.parametrize("lora_type", sorted(LORA_TYPES))
def test_lora_type_becomes_the_guis_network_module_and_algo(lora_type, tmp_path):
    flux = lora_type.startswith("Flux1")
    items, _, problems = gui_preset(_gui(LoRA_type=lora_type, flux1_checkbox=flux, sdxl=not flux), "x", LORA_FIELDS)
    module, algo = LORA_TYPES[lora_type]
    assert problems == []
    assert items["network_module"] == module
    algos = [a.split("=", 1)[1] for a in items["network_args"] if a.startswith("algo=")]
    assert algos == ([algo] if algo else [])
    # end to end: loads, or is refused naming the module or the algo (never an unknown option)
    try:
        load_options(LoraOptions, _write(tmp_path, _gui(LoRA_type=lora_type, flux1_checkbox=flux)), notes=[])
    except ConfigError as exc:
        message = str(exc)
        assert "unknown option" not in message
        named = module if algo is None else f"algo={algo!r}"
        assert named in message, message


def test_lycoris_types_write_the_guis_network_args():
    items, _, _ = gui_preset(_gui(LoRA_type="LyCORIS/LoKr", conv_dim=4, conv_alpha=2, factor=8), "x")
    # lora_gui.py's LoKr line: preset conv_dim conv_alpha use_tucker rank_dropout bypass_mode dora_wd module_dropout
    # factor use_cp use_scalar decompose_both rank_dropout_scale algo train_norm (widget defaults where unsaved)
    assert items["network_args"] == [
        "preset=full", "conv_dim=4", "conv_alpha=2", "use_tucker=False", "rank_dropout=0", "bypass_mode=False",
        "dora_wd=False", "module_dropout=0.0", "factor=8", "use_cp=False", "use_scalar=False",
        "decompose_both=False", "rank_dropout_scale=False", "algo=lokr", "train_norm=False",
    ]  # fmt: skip
    items, _, _ = gui_preset(_gui(LoRA_type="LyCORIS/DyLoRA", unit=4), "x")
    assert "block_size=4" in items["network_args"] and "algo=dylora" in items["network_args"]
    items, _, _ = gui_preset(_gui(LoRA_type="LyCORIS/iA3", train_on_input=False), "x")
    assert items["network_args"][-2:] == ["train_on_input=False", "algo=ia3"]


@pytest.mark.parametrize(
    "preset", ["attn-mlp", "attn-only", "full", "full-lin", "unet-transformer-only", "unet-convblock-only"]
)
def test_every_gui_lycoris_preset_choice_loads(preset, tmp_path):
    """lora_gui.py LYCORIS_PRESETS_CHOICES: each one is a LyCORIS built-in preset sdcore selects exactly."""
    from sdplugin_lora.method import LoraMethod

    data = _gui(LoRA_type="LyCORIS/LoKr", LyCORIS_preset=preset, conv_dim=4, conv_alpha=2, factor=4)
    o = load_options(LoraOptions, _write(tmp_path, data), notes=[])
    assert (o.lycoris_preset, o.algo) == (preset, "lokr")
    LoraMethod(o).validate()
    # enable_conv=False presets (LyCORIS config.py): the GUI's conv_dim does nothing; the others keep it
    assert o.conv_rank == (4 if preset in ("full", "unet-convblock-only") else 0)


def test_kohya_network_types_pass_only_the_fields_that_are_set():
    items, _, _ = gui_preset(_gui(LoRA_type="Standard", conv_dim=8, block_dims="2,4", rank_dropout=0), "x")
    assert items["network_args"] == ["block_dims=2,4"]  # Standard has no conv; zero fields are left out
    items, _, _ = gui_preset(_gui(LoRA_type="Kohya LoCon", conv_dim=8, conv_alpha=2, module_dropout=0.1), "x")
    assert items["network_args"] == ["conv_dim=8", "conv_alpha=2", "module_dropout=0.1"]
    items, _, _ = gui_preset(_gui(LoRA_type="Kohya DyLoRA", conv_dim=0, unit=2), "x")
    assert items["network_args"] == ["conv_alpha=1", "unit=2"]
    items, _, _ = gui_preset(_gui(LoRA_type="Kohya LoKr", sdxl=True, conv_dim=4, conv_alpha=2.0, factor=-1), "x")
    assert items["network_args"] == ["conv_dim=4", "conv_alpha=2"]  # factor -1 is its default: left out
    items, _, _ = gui_preset(_gui(loraplus_lr_ratio=16, loraplus_unet_lr_ratio=0), "x")
    assert items["network_args"] == ["loraplus_lr_ratio=16"] and "loraplus_lr_ratio" not in items


def test_standard_lora_loads_with_its_translated_values(tmp_path):
    data = _gui(LoRA_type="Kohya LoCon", conv_dim=8, conv_alpha=2, lr_warmup=10, sdxl=True, xformers="sdpa")
    notes: list[str] = []
    o = load_options(LoraOptions, _write(tmp_path, data), notes=notes)
    # networks.lora with conv_dim (kohya's LoCon): sdcore's lora with 3x3-conv modules
    assert (o.algo, o.rank, o.alpha, o.conv_rank, o.conv_alpha) == ("lora", 8, 4.0, 8, 2.0)
    assert (o.lr, o.unet_lr, o.te_lr, o.optimizer, o.resolution, o.lr_warmup_steps) == (
        1e-4, 1e-4, 5e-5, "adamw", 512, 0.1
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# model-family boxes and their fields


FLUX_FIELDS = {"ae": "ae.sft", "clip_l": "clip_l.sft", "t5xxl": "t5.sft", "guidance_scale": 1.0,
               "timestep_sampling": "shift", "discrete_flow_shift": 3.1, "model_prediction_type": "raw",
               "t5xxl_max_token_length": 512, "apply_t5_attn_mask": True}  # fmt: skip
SD3_FIELDS = {"sd3_clip_l": "l.sft", "sd3_t5xxl": "t5.sft", "clip_g": "g.sft", "weighting_scheme": "logit_normal",
              "logit_mean": 0.1, "sd3_t5_dropout_rate": 0.2, "sd3_enable_scaled_pos_embed": True}  # fmt: skip


def test_flux_fields_pass_only_with_the_flux_box():
    items, notes, problems = gui_preset(
        _gui(LoRA_type="Flux1", flux1_checkbox=True, vae="vae.sft", **FLUX_FIELDS, **SD3_FIELDS), "x"
    )
    assert problems == []
    assert {k: items[k] for k in FLUX_FIELDS} == FLUX_FIELDS
    assert not {"clip_g", "weighting_scheme", "logit_mean", "t5_dropout_rate", "sd3_clip_l"} & items.keys()
    # the ae/vae rule: Flux reads the autoencoder from ae; the GUI's vae field is not read
    assert "vae" not in items and any("vae 'vae.sft' is not read for FLUX.1" in n for n in notes)
    off, _, _ = gui_preset(_gui(vae="vae.sft", **FLUX_FIELDS), "x")
    assert not set(FLUX_FIELDS) & off.keys() and off["vae"] == "vae.sft"


def test_sd3_fields_pass_only_with_the_sd3_box():
    items, _, problems = gui_preset(_gui(sd3_checkbox=True, **SD3_FIELDS, **FLUX_FIELDS), "x")
    assert problems == [] and items["network_module"] == "networks.lora_sd3"
    assert (items["clip_l"], items["t5xxl"], items["clip_g"], items["t5_dropout_rate"]) == (
        "l.sft", "t5.sft", "g.sft", 0.2
    )  # fmt: skip
    assert items["enable_scaled_pos_embed"] is True and items["weighting_scheme"] == "logit_normal"
    assert not {"ae", "guidance_scale", "timestep_sampling", "model_prediction_type"} & items.keys()
    off, _, _ = gui_preset(_gui(**SD3_FIELDS), "x")
    assert off["network_module"] == "networks.lora" and not {"clip_l", "t5xxl", "clip_g", "logit_mean"} & off.keys()


def test_flux_config_loads_with_its_flow_options(tmp_path):
    data = _gui(LoRA_type="Flux1", flux1_checkbox=True, text_encoder_lr=0, split_mode=True, train_t5xxl=True,
                img_attn_dim=4, rank_dropout=0.1, **FLUX_FIELDS)  # fmt: skip
    items, _, _ = gui_preset(data, "x")
    assert items["network_args"] == ["img_attn_dim=4", "train_blocks=single", "train_t5xxl=True", "rank_dropout=0.1"]
    # the GUI's split mode trains the single blocks only (lora_flux train_blocks=single): sdcore's layer filter
    split = load_options(LoraOptions, _write(tmp_path, data), notes=[])
    assert (split.layer_filter, split.layer_exclude, split.blocks_to_swap) == ("single_transformer_blocks.", None, 18)
    assert split.module_ranks == "^lora_unet_(?=.*img_attn)=4"  # lora_flux's img_attn_dim: a rank rule
    data.pop("img_attn_dim")
    data.update(split_mode=False)
    o = load_options(LoraOptions, _write(tmp_path, data), notes=[])
    assert (o.vae, o.clip_l, o.t5xxl, o.guidance_scale, o.discrete_flow_shift) == (
        "ae.sft", "clip_l.sft", "t5.sft", 1.0, 3.1
    )  # fmt: skip
    assert (o.timestep_sampling, o.model_prediction_type, o.rank_dropout, o.unet_only) == ("sigmoid", "raw", 0.1, True)


def test_family_box_problems_are_reported_by_name():
    _, _, problems = gui_preset(_gui(sdxl=True, flux1_checkbox=True, LoRA_type="Flux1"), "x")
    assert "x: more than one model family box is ticked (sdxl, flux1_checkbox): tick one" in problems
    items, _, problems = gui_preset(_gui(LoRA_type="Anima", anima_checkbox=True, anima_qwen3="q.sft"), "x")
    assert len(problems) == 1 and "anima_checkbox is ticked: Anima is not a model family sdcore trains" in problems[0]
    items, _, problems = gui_preset(_gui(anima_qwen3="q.sft", lumina_gemma2="g", hunyuan_byt5="b"), "x")
    assert problems == [] and not {"anima_qwen3", "lumina_gemma2", "hunyuan_byt5"} & items.keys()
    _, _, problems = gui_preset(_gui(flux1_checkbox=True), "x")
    assert problems == ["x: LoRA_type 'Standard' with flux1_checkbox: the GUI needs Flux1 or a LyCORIS type"]
    _, _, problems = gui_preset(_gui(LoRA_type="Flux1"), "x")
    assert problems == ["x: LoRA_type 'Flux1' needs flux1_checkbox (a FLUX.1 model)"]


# ---------------------------------------------------------------------------------------------------------
# rates, warmup, additional parameters


@pytest.mark.parametrize(
    ("te", "unet", "t5", "want"),
    [
        (5e-5, 1e-4, 0, {"text_encoder_lr": [5e-5, 5e-5]}),  # one rate per text encoder, T5 taking CLIP's
        (5e-5, 1e-4, 2e-5, {"text_encoder_lr": [5e-5, 2e-5]}),
        (0, 1e-4, 0, {"network_train_unet_only": True}),
        (5e-5, 0, 0, {"network_train_text_encoder_only": True, "text_encoder_lr": [5e-5, 5e-5]}),
        (0, 0, 0, {}),  # neither flag: both train at learning_rate
    ],
)
def test_text_encoder_rates_and_train_flags_as_the_gui(te, unet, t5, want):
    items, _, problems = gui_preset(_gui(text_encoder_lr=te, unet_lr=unet, t5xxl_lr=t5), "x")
    keys = ("text_encoder_lr", "network_train_unet_only", "network_train_text_encoder_only")
    assert problems == [] and {k: items[k] for k in keys if items.get(k)} == want
    assert ("unet_lr" in items) == (unet != 0)
    assert ("text_encoder_lr" in items) == (te != 0)  # the GUI writes None for a 0 rate, which kohya would freeze


def test_t5_rate_without_a_text_encoder_rate_is_refused():
    _, _, problems = gui_preset(_gui(text_encoder_lr=0, t5xxl_lr=1e-5), "x")
    assert problems == ["x: t5xxl_lr needs a text_encoder_lr above 0 (as the GUI says)"]


@pytest.mark.parametrize(("percent", "steps", "want"), [(10, 0, 0.1), (10, 50, 50), (0, 0, None), ("", "", None)])
def test_lr_warmup_percent_becomes_a_ratio_unless_steps_are_given(percent, steps, want):
    items, _, _ = gui_preset(_gui(lr_warmup=percent, lr_warmup_steps=steps), "x")
    assert items.get("lr_warmup_steps") == want and "lr_warmup" not in items


@pytest.mark.parametrize(
    ("scheduler", "optimizer", "args", "percent", "steps", "refused"),
    [
        ("adafactor", "Adafactor", "relative_step=True", 10, 0, "lr_warmup 10 (%)"),
        ("cosine", "Adafactor", "", 5, 0, "lr_warmup 5 (%)"),  # kohya's default relative_step=True
        ("constant", "Adafactor", "warmup_init=True relative_step=False", 0, 20, "lr_warmup_steps 20"),
        ("cosine", "Adafactor", "relative_step=False", 5, 0, None),  # a fixed rate: cosine with warmup
        ("adafactor", "Adafactor", "", 0, 0, None),
        ("cosine", "AdamW", "", 10, 0, None),
    ],
)
def test_a_warmup_with_kohyas_adafactor_schedule_is_refused_by_gui_name(
    scheduler, optimizer, args, percent, steps, refused
):
    """sd-scripts get_optimizer: Adafactor with relative_step (its default; warmup_init forces it) runs the
    adafactor schedule, and get_scheduler_fix raises on any warmup with it; the GUI passes the warmup anyway."""
    gui = _gui(lr_scheduler=scheduler, optimizer=optimizer, optimizer_args=args, lr_warmup=percent,
               lr_warmup_steps=steps)  # fmt: skip
    _, _, problems = gui_preset(gui, "x")
    if refused is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(f"x: {refused} with kohya's adafactor schedule")
        assert "set lr_warmup and lr_warmup_steps to 0" in problems[0]


def test_empty_lr_cycles_load_as_one_not_the_epoch_count(tmp_path):
    # common_gui.py:411 update_my_data: int(lr_scheduler_num_cycles), 1 when that fails; the launch's
    # "" -> int(epoch) (lora_gui.py:2232) sees a loaded config's 1 (was: the epoch count)
    data = _gui(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles="", epoch=30, max_train_steps="")
    o = load_options(LoraOptions, _write(tmp_path, data), notes=[])
    assert (o.lr_cycles, o.epochs) == (1, 30)
    items, _, _ = gui_preset({**data, "lr_scheduler_num_cycles": "3"}, "x")
    assert items["lr_scheduler_num_cycles"] == 3
    # the fine-tuning tab hides the field and does not pass it (finetune_gui.py has no lr_scheduler_num_cycles)
    items, _, _ = gui_preset(_db(train_dir="/d", lr_scheduler_num_cycles=4), "x")
    assert "lr_scheduler_num_cycles" not in items


def test_length_follows_the_guis_max_train_steps(tmp_path):
    def length(**fields: Any) -> tuple[Any, Any]:
        o = load_options(LoraOptions, _write(tmp_path, _gui(**{"epoch": 20, **fields})), notes=[])
        return o.epochs, o.max_steps

    # a config without max_train_steps keeps the widget's 1600 (class_basic_training.py:115,
    # lora_gui.py:804); epoch is unused (the GUI passes no epoch option) (was: 20 epochs)
    assert length() == (None, 1600)
    # "" loads as 0 (common_gui.py:420), and 0 makes the GUI derive the steps from epoch (lora_gui.py:1720)
    assert length(max_train_steps="") == (20, None)
    assert length(max_train_steps=0) == (20, None)
    assert length(max_train_steps="300") == (None, 300)
    assert length(max_train_steps="", max_train_epochs="7") == (7, None)
    # with a dataset_config the GUI skips that step count and sd-scripts trains its default 1600
    # (lora_gui.py:1617-1656; train_util.py --max_train_steps default=1600) (was: 20 epochs)
    assert length(max_train_steps=0, dataset_config="/d.toml") == (None, 1600)
    # epoch "" loads as 0 (common_gui.py:393): 0 derived steps, so sd-scripts' default 1600
    assert length(max_train_steps=0, epoch="") == (None, 1600)
    notes: list[str] = []
    load_options(LoraOptions, _write(tmp_path, _gui(epoch=20)), notes=notes)
    assert any("the GUI's default 1600 steps" in n for n in notes), notes


def test_finetune_flip_aug_halves_the_steps(tmp_path):
    # finetune_gui.py:1023: with flip_aug (no dataset_config) max_train_steps becomes ceil(steps / 2)
    def length(**fields: Any) -> tuple[Any, Any]:
        data = _db(train_dir="/d", image_folder="/i", flip_aug=True, **fields)
        o = load_options(DreamBoothOptions, _write(tmp_path, data), notes=[])
        return o.epochs, o.max_steps

    assert length(max_train_steps=301) == (None, 151)
    assert length() == (None, 800)  # the widget's 1600, halved
    assert length(max_train_steps=301, dataset_config="/d.toml") == (None, 301)
    assert length(max_train_steps="", epoch=4) == (2, None)  # half of 4 epochs' steps
    assert length(max_train_steps="", epoch=3, max_train_epochs=5) == (5, None)
    with pytest.raises(ConfigError, match="flip_aug with epoch 3: the fine-tuning tab trains half"):
        length(max_train_steps="", epoch=3)


def test_additional_parameters_are_read_as_kohya_options(tmp_path):
    extra = '--max_grad_norm=0.5 --lr_scheduler_type "CosineAnnealingLR" --lr_scheduler_args "T_max=30" eta_min=0 --network_train_unet_only'
    items, notes, problems = gui_preset(_gui(additional_parameters=extra), "x")
    assert problems == []
    assert (items["max_grad_norm"], items["lr_scheduler_type"], items["lr_scheduler_args"]) == (
        "0.5", "CosineAnnealingLR", ["T_max=30", "eta_min=0"]
    )  # fmt: skip
    assert items["network_train_unet_only"] is True
    assert "additional_parameters read as sd-scripts options" in notes[-1]
    o = load_options(LoraOptions, _write(tmp_path, _gui(additional_parameters=extra)), notes=[])
    assert (o.max_grad_norm, o.lr_scheduler_args, o.unet_only) == (0.5, "T_max=30 eta_min=0", True)
    with pytest.raises(ConfigError, match="'stray' does not follow an --option"):
        load_options(LoraOptions, _write(tmp_path, _gui(additional_parameters="stray --seed 1")), notes=[])
    with pytest.raises(ConfigError, match=r"unknown option.*'no_such_option'"):
        load_options(LoraOptions, _write(tmp_path, _gui(additional_parameters="--no_such_option 1")), notes=[])


# ---------------------------------------------------------------------------------------------------------
# the other tabs


def _db(**fields: Any) -> dict[str, Any]:
    return {"learning_rate": 1e-5, "optimizer": "AdamW", "max_resolution": "1024,1024", "lr_warmup": 0,
            "learning_rate_te": 2e-6, "learning_rate_te1": 3e-6, "learning_rate_te2": 4e-6,
            "train_text_encoder": True, "model_list": "custom", **fields}  # fmt: skip


def test_dreambooth_tab_text_encoder_rates_follow_the_sdxl_box(tmp_path):
    assert gui_tab(_db()) == "dreambooth"
    sdxl = load_options(DreamBoothOptions, _write(tmp_path, _db(sdxl=True)), notes=[])
    assert (sdxl.te_lr, sdxl.te1_lr, sdxl.te2_lr, sdxl.train_text_encoder) == (None, 3e-6, 4e-6, True)
    items, notes, _ = gui_preset(_db(), "x")
    # dreambooth_gui.py: learning_rate_te for SD1/SD2, te1/te2 and train_text_encoder for SDXL only
    assert items["learning_rate_te"] == 2e-6 and not {"learning_rate_te1", "learning_rate_te2"} & items.keys()
    assert "train_text_encoder" not in items and "read as a kohya_ss GUI preset (DreamBooth tab)" in notes
    sd = load_options(DreamBoothOptions, _write(tmp_path, _db()), notes=[])
    assert (sd.te_lr, sd.te1_lr, sd.resolution, sd.optimizer) == (2e-6, None, 1024, "adamw")


def test_a_guidance_scale_of_0_is_dropped_by_the_lora_tab_alone():
    """lora_gui.py drops every value ``in ["", False, None]`` from the TOML it runs (L2559-2566: 0.0 == False, its
    own comment says so; Chroma's 0.0 re-added after, a model type sdcore refuses here), so a FLUX.1 LoRA preset's
    guidance_scale 0 reaches flux_train_network.py as its default 3.5; dreambooth_gui.py drops only ``== ""`` /
    ``is False`` / ``is None`` (L1156-1160), so its 0.0 reaches flux_train.py as 0."""
    flux = {"flux1_checkbox": True, "guidance_scale": 0.0}
    items, _, _ = gui_preset(_gui(LoRA_type="Flux1", **flux), "x")
    assert "guidance_scale" not in items
    items, _, _ = gui_preset(_gui(LoRA_type="Flux1", flux1_checkbox=True, guidance_scale=1.0), "x")
    assert items["guidance_scale"] == 1.0
    items, _, _ = gui_preset(_db(**flux), "x")
    assert items["guidance_scale"] == 0.0


def test_dreambooth_tab_flux_fields_use_its_own_names():
    items, _, _ = gui_preset(
        _db(flux1_checkbox=True, flux1_clip_l="l.sft", flux1_t5xxl="t5.sft", clip_l="sd3l", ae="ae.sft"), "x"
    )
    assert (items["clip_l"], items["t5xxl"], items["ae"]) == ("l.sft", "t5.sft", "ae.sft")
    items, _, _ = gui_preset(_db(sd3_checkbox=True, flux1_clip_l="l.sft", clip_l="sd3l.sft", t5xxl="t5"), "x")
    assert (items["clip_l"], items["t5xxl"]) == ("sd3l.sft", "t5")


def test_finetune_tab_reads_its_metadata_file_and_image_folder(tmp_path):
    data = _db(sdxl_checkbox=True, train_dir="/out", image_folder="/imgs", use_latent_files="Yes",
               latent_metadata_filename="lat.json", caption_metadata_filename="cap.json", create_caption=True,
               dataset_repeats=3)  # fmt: skip
    assert gui_tab(data) == "finetune"
    o = load_options(DreamBoothOptions, _write(tmp_path, data), notes=[])
    assert (o.metadata_file, o.data, o.buckets, o.dataset_repeats, o.te1_lr) == (
        "/out/lat.json",
        "/imgs",
        True,
        3,
        3e-6,
    )
    items, _, _ = gui_preset({**data, "use_latent_files": "No"}, "x")
    assert items["in_json"] == "/out/cap.json" and "create_caption" not in items


def test_ti_tab_template_and_token(tmp_path):
    data = {"token_string": "mytok", "init_word": "cat", "num_vectors_per_token": 4, "template": "style template",
            "learning_rate": 5e-3, "optimizer": "AdamW", "max_resolution": "512,512", "lr_warmup": 0,
            "weights": ""}  # fmt: skip
    assert gui_tab(data) == "ti"
    o = load_options(TIOptions, _write(tmp_path, data), notes=[])
    assert (o.name, o.init_text, o.vectors, o.template, o.lr) == ("mytok", "cat", 4, "style", 5e-3)
    items, _, _ = gui_preset({**data, "template": "object template"}, "x")
    assert items["use_object_template"] is True and "template" not in items


def test_a_config_of_another_tab_names_the_command(tmp_path):
    with pytest.raises(ConfigError, match="a kohya_ss GUI lora config: run it with `sdcore train lora`"):
        load_options(DreamBoothOptions, _write(tmp_path, _gui()), notes=[])
    with pytest.raises(ConfigError, match="a kohya_ss GUI dreambooth config: run it with `sdcore train dreambooth`"):
        load_options(LoraOptions, _write(tmp_path, _db()), notes=[])


def test_gui_signature_names_are_no_kohya_or_sdcore_option():
    fields: set[str] = set()
    for options_class in (LoraOptions, DreamBoothOptions, TIOptions):
        fields |= set(field_types(options_class))
    assert not {n for n in _GUI_SIGNATURE if kohya.is_kohya_name(n) or n in fields}
    assert not is_gui_preset({"optimizer": "adamw", "network_dim": 4, "learning_rate": 1e-4})


def test_gui_glora_with_preset_full_still_validates(tmp_path):
    """The GUI always writes preset=full; GLoRA adapts its modules as lycoris.kohya's GLoRA does (its
    transformer-only branch never runs in LyCORIS f49d30d)."""
    from sdplugin_lora.method import LoraMethod

    data = _gui(LoRA_type="LyCORIS/GLoRA", LyCORIS_preset="full")
    o = load_options(LoraOptions, _write(tmp_path, data), notes=[])
    assert (o.algo, o.lycoris_preset) == ("glora", "full")
    LoraMethod(o).validate()


@pytest.mark.parametrize("model", ["tiny:flux", "tiny:sd3", "tiny:sd1"])
def test_gui_flux_preset_min_snr_gamma_is_skipped_on_flow_models_as_kohya_skips_it(tmp_path, model):
    """The GUI's own Flux preset sets min_snr_gamma 7, which kohya's Flux/SD3 LoRA scripts never apply (their
    post_process_loss returns the loss unweighted): the preset loads and trains without it, with a note; the
    same kohya options on SD1 keep the weighting (train_network.py applies it there)."""
    data = json.loads((PRESETS / "lora" / "flux1D - adamw8bit fp8.json").read_text())
    assert data["min_snr_gamma"] == 7
    data.update(optimizer="AdamW", ae="", clip_l="", t5xxl="")  # the preset's placeholder paths, bitsandbytes
    notes: list[str] = []
    o = load_options(LoraOptions, _write(tmp_path, data), {"model": model, "data": "d", "output": "o"}, notes=notes)
    kohya = {"pretrained_model_name_or_path": model, "debiased_estimation_loss": True, "v_pred_like_loss": 0.5,
             "min_snr_gamma": 5}  # fmt: skip
    flags = load_options(LoraOptions, None, {"data": "d", "output": "o"}, kohya=kohya, notes=notes)
    if model == "tiny:sd1":
        assert (o.min_snr_gamma, flags.min_snr_gamma, flags.debiased_estimation_loss) == (7, 5, True)
        assert not any("SNR loss weights" in n for n in notes)
        return
    assert (o.min_snr_gamma, flags.min_snr_gamma, flags.debiased_estimation_loss, flags.v_pred_like_loss) == (
        None, None, False, 0.0
    )  # fmt: skip
    assert any(n.startswith("min_snr_gamma 7: kohya's") and "ignored" in n for n in notes), notes


#: class_basic_training.py / class_advanced_training.py / class_source_model.py / class_accelerate_launch.py
#: (bmaltais/kohya_ss 45088f0): the widgets' values a LoRA-tab config that leaves the field out (or null) keeps
#: (lora_gui.py open_configuration: ``json_value if json_value is not None else value``)
WIDGETS = {"max_resolution": "512,512", "enable_bucket": True, "max_bucket_reso": 2048, "bucket_no_upscale": True,
           "caption_extension": ".txt", "mixed_precision": "fp16", "save_precision": "fp16"}  # fmt: skip


@pytest.mark.parametrize("name", [n for n in _presets() if n.startswith("lora/")])
def test_lora_presets_leave_out_fields_at_the_guis_widget_values(name, tmp_path):
    """Most presets leave out max_bucket_reso (sd-scripts 1024, the GUI 2048); iA3-Prodigy-sd15 leaves out the
    resolution, buckets, caption extension and precisions too: the run is the GUI's, not sd-scripts' defaults."""
    data = _paths_moved_here(json.loads((PRESETS / name).read_text()))
    notes: list[str] = []
    o = load_options(LoraOptions, _write(tmp_path, data, Path(name).name), notes=notes)
    gui = {key: data[key] if data.get(key) is not None else value for key, value in WIDGETS.items()}
    width, height = (int(v) for v in str(gui["max_resolution"]).split(","))
    if width == height:
        assert (o.resolution, o.resolution_size) == (width, None)
    else:
        assert o.resolution_size == (width, height)
    assert (o.buckets, o.max_bucket_reso, o.bucket_no_upscale) == (
        bool(gui["enable_bucket"]), int(gui["max_bucket_reso"]), bool(gui["bucket_no_upscale"])
    )  # fmt: skip
    assert o.mixed_precision == gui["mixed_precision"]
    assert o.save_dtype == gui["save_precision"]
    if gui["caption_extension"]:  # "" is left out of the GUI's TOML: sd-scripts' own ".caption"
        assert o.caption_extension == gui["caption_extension"]
    left_out = [key for key in WIDGETS if data.get(key) is None]
    widget_notes = [n for n in notes if n.startswith("not in the file, so the kohya_ss GUI's own values")]
    assert len(widget_notes) == (1 if left_out else 0), notes
    assert all(f"{key} " in widget_notes[0] for key in left_out)


def test_ia3_prodigy_preset_gets_the_lora_tabs_widget_values(tmp_path):
    """presets/lora/iA3-Prodigy-sd15.json names 28 fields; the GUI runs the rest at its widgets' values."""
    notes: list[str] = []
    o = load_options(LoraOptions, PRESETS / "lora" / "iA3-Prodigy-sd15.json", notes=notes)
    assert (o.resolution, o.buckets, o.max_bucket_reso, o.bucket_no_upscale, o.min_bucket_reso, o.bucket_step) == (
        512, True, 2048, True, 256, 64
    )  # fmt: skip
    assert (o.mixed_precision, o.save_dtype, o.caption_extension, o.cache_latents) == ("fp16", "fp16", ".txt", True)
    # the file's own values stay: Prodigy at lr 1, constant, no warmup, save every 10 epochs, GUI 1600 steps
    assert (o.optimizer, o.lr, o.unet_lr, o.te_lr, o.lr_scheduler, o.lr_warmup_steps) == (
        "prodigy", 1.0, 1.0, 1.0, "constant", 0
    )  # fmt: skip
    assert (o.save_every_epochs, o.max_steps, o.rank, o.alpha, o.algo) == (10, 1600, 1024, 1024.0, "ia3")
    assert (o.noise_offset, o.adaptive_noise_scale, o.caption_dropout, o.keep_tokens, o.seed) == (
        0.05, 0.005, 0.5, 1, 31337
    )  # fmt: skip


def test_a_bare_lora_config_runs_at_the_lora_tabs_rates_and_network(tmp_path):
    """lora_gui.py: learning_rate_value 0.0001, lr_scheduler_value "cosine", lr_warmup_value 10 (%),
    DEFAULT_TEXT_ENCODER_LR = DEFAULT_UNET_LR = 0.0001, network_dim 8, network_alpha 1; class_basic_training.py
    save_every_n_epochs 1."""
    o = load_options(LoraOptions, _write(tmp_path, {"LoRA_type": "Standard", "optimizer": "AdamW"}), notes=[])
    assert (o.lr, o.unet_lr, o.te_lr, o.lr_scheduler, o.lr_warmup_steps) == (1e-4, 1e-4, 1e-4, "cosine", 0.1)
    assert (o.rank, o.alpha, o.save_every_epochs, o.max_steps) == (8, 1.0, 1, 1600)
    # a field the file gives, even "" or 0, is the file's (only a missing or null one takes the widget's)
    o = load_options(LoraOptions, _write(tmp_path, _gui(enable_bucket=False, max_bucket_reso=None,
                                                        save_every_n_epochs=0)), notes=[])  # fmt: skip
    assert (o.buckets, o.max_bucket_reso, o.save_every_epochs) == (False, 2048, None)


def test_widget_values_follow_the_guis_change_handlers(tmp_path):
    """Loading a config runs the widgets' change handlers after filling them: class_basic_training.py
    lr_scheduler_changed sets the warmup to 0 for "constant" (sd-scripts refuses a constant warmup), and
    common_gui.py color_aug_changed unticks cache_latents (kohya refuses cached latents with color_aug)."""
    notes: list[str] = []
    o = load_options(LoraOptions, _write(tmp_path, {"LoRA_type": "Standard", "lr_scheduler": "constant"}), notes=notes)
    assert (o.lr_scheduler, o.lr_warmup_steps) == ("constant", 0)
    assert "lr_warmup 0" in notes[0] and not any("constant_with_warmup" in n for n in notes), notes
    # the widget's 10 % stays for every other schedule
    o = load_options(LoraOptions, _write(tmp_path, {"LoRA_type": "Standard", "lr_scheduler": "linear"}), notes=[])
    assert (o.lr_scheduler, o.lr_warmup_steps) == ("linear", 0.1)
    notes = []
    o = load_options(LoraOptions, _write(tmp_path, {"LoRA_type": "Standard", "color_aug": True}), notes=notes)
    assert (o.color_aug, o.cache_latents) == (True, False)
    assert "cache_latents False" in notes[0], notes
    o = load_options(LoraOptions, _write(tmp_path, {"LoRA_type": "Standard", "color_aug": False}), notes=[])
    assert o.cache_latents is True


def test_the_guis_fp16_says_what_to_do_without_a_gpu(tmp_path):
    """mixed_precision left out runs at the Accelerate launch widget's fp16, which needs a CUDA GPU: the note
    names the flag and the key that change it; a file that names mixed_precision gets no such line."""
    notes: list[str] = []
    o = load_options(LoraOptions, _write(tmp_path, {"LoRA_type": "Standard"}), notes=notes)
    assert o.mixed_precision == "fp16"
    assert notes[0].endswith(
        "; mixed_precision fp16 needs a CUDA GPU: without one give --mixed-precision no (or bf16), "
        'or set "mixed_precision" in the file'
    ), notes
    o = load_options(LoraOptions, _write(tmp_path, _gui(mixed_precision="bf16")), notes=(notes := []))
    assert o.mixed_precision == "bf16" and not any("CUDA" in n for n in notes), notes
    o = load_options(LoraOptions, _write(tmp_path, {"LoRA_type": "Standard"}), {"mixed_precision": "no"}, notes=[])
    assert o.mixed_precision == "no"  # the command line wins over the widget's value


# ---------------------------------------------------------------------------------------------------------
# the other tabs' widget values (bmaltais/kohya_ss 45088f0): the shared classes' widgets as in WIDGETS, then
# each tab's own BasicTraining(learning_rate_value, lr_scheduler_value, lr_warmup_value) and tab widgets

#: dreambooth_gui.py:1272 BasicTraining(learning_rate_value=1e-5, lr_scheduler_value="cosine", lr_warmup_value=10);
#: class_basic_training.py:266-297 starts the TE rates at learning_rate_value
DB_WIDGETS = {**WIDGETS, "cache_latents": True, "save_every_n_epochs": 1, "learning_rate": 1e-5,
              "lr_scheduler": "cosine", "lr_warmup": 10, "learning_rate_te": 1e-5, "learning_rate_te1": 1e-5,
              "learning_rate_te2": 1e-5}  # fmt: skip
#: finetune_gui.py:1606 BasicTraining(learning_rate_value=1e-5) (the class's "constant", 0 %); its own "Dataset
#: Preparation" max_resolution "512,512" / max_bucket_reso "1024" (the ones it passes, :1724-1726), dataset_repeats
#: 40, train_text_encoder True, use_latent_files "Yes"; it always passes enable_bucket True (:1166)
FT_WIDGETS = {**DB_WIDGETS, "lr_scheduler": "constant", "lr_warmup": 0, "max_bucket_reso": "1024",
              "dataset_repeats": 40, "train_text_encoder": True, "use_latent_files": "Yes"}  # fmt: skip
#: textual_inversion_gui.py:1108 BasicTraining(1e-5, "cosine", 10); its token widgets: init_word "*", Vectors 1,
#: Template "caption" (token_string has no value)
TI_WIDGETS = {**WIDGETS, "cache_latents": True, "save_every_n_epochs": 1, "learning_rate": 1e-5,
              "lr_scheduler": "cosine", "lr_warmup": 10, "init_word": "*", "num_vectors_per_token": 1,
              "template": "caption"}  # fmt: skip


def _common_widgets(o: Any, gui: dict[str, Any]) -> None:
    """The options the shared widgets and the rate widgets decide, as the GUI passes ``gui``'s values."""
    width, height = (int(v) for v in str(gui["max_resolution"]).split(","))
    assert (o.resolution, o.resolution_size) == ((width, None) if width == height else (o.resolution, (width, height)))
    assert (o.max_bucket_reso, o.bucket_no_upscale, o.cache_latents) == (
        int(gui["max_bucket_reso"]), bool(gui["bucket_no_upscale"]), bool(gui["cache_latents"])
    )  # fmt: skip
    assert (o.mixed_precision, o.save_dtype, o.caption_extension) == (
        gui["mixed_precision"], gui["save_precision"], gui["caption_extension"]
    )  # fmt: skip
    assert o.save_every_epochs == (int(gui["save_every_n_epochs"]) or None)
    assert (o.lr, o.lr_scheduler) == (pytest.approx(float(gui["learning_rate"])), gui["lr_scheduler"])
    # common_gui.resolve_lr_warmup_steps: percent / 100 (the constant schedule's handler set it to 0)
    assert o.lr_warmup_steps == (0 if gui["lr_scheduler"] == "constant" else int(gui["lr_warmup"]) / 100)


def test_a_bare_dreambooth_config_runs_at_the_dreambooth_tabs_widget_values(tmp_path):
    notes: list[str] = []
    o = load_options(DreamBoothOptions, _write(tmp_path, {"model_list": "custom"}), notes=notes)
    _common_widgets(o, DB_WIDGETS)
    assert (o.lr, o.lr_scheduler, o.lr_warmup_steps, o.resolution, o.mixed_precision) == (
        1e-5, "cosine", 0.1, 512, "fp16"
    )  # fmt: skip
    # SD1/SD2: the TE rate widget; the class_basic_training.py:115 max_train_steps widget's 1600
    assert (o.te_lr, o.te1_lr, o.buckets, o.max_steps, o.epochs) == (1e-5, None, True, 1600, None)
    assert (
        notes[0].startswith("not in the file, so the kohya_ss GUI's own values") and "learning_rate 1e-05" in notes[0]
    )
    assert "lr_scheduler 'cosine', lr_warmup 10" in notes[0]
    assert any("the GUI's default 1600 steps" in n for n in notes), notes
    # SDXL: TE1/TE2 rates at the widget's 1e-5; dreambooth_gui.py:928 trains the text encoders when one is above 0
    sdxl = load_options(DreamBoothOptions, _write(tmp_path, {"model_list": "custom", "sdxl": True}), notes=[])
    assert (sdxl.te_lr, sdxl.te1_lr, sdxl.te2_lr, sdxl.train_text_encoder) == (None, 1e-5, 1e-5, True)
    # a saved train_text_encoder is not read (the tab has no such widget)
    data = {"model_list": "custom", "sdxl": True, "learning_rate_te1": 0, "learning_rate_te2": 0,
            "train_text_encoder": True}  # fmt: skip
    frozen = load_options(DreamBoothOptions, _write(tmp_path, data), notes=[])
    assert (frozen.te1_lr, frozen.te2_lr, frozen.train_text_encoder) == (0.0, 0.0, False)
    items, _, _ = gui_preset({**data, "learning_rate_te2": 5e-6}, "x")
    assert items["train_text_encoder"] is True


def test_the_dreambooth_and_ti_tabs_keep_a_null_field_unset():
    """dreambooth_gui.py:206 / textual_inversion_gui.py:157 open_configuration: ``my_data.get(key, value)``, so
    a null loads as null (the TOML leaves it out: sd-scripts' default); lora_gui.py and finetune_gui.py:263 take
    the widget's value for a null as for a missing field."""
    for data in ({"model_list": "custom"}, {"token_string": "tok", "model_list": "custom"}):
        items, notes, _ = gui_preset({**data, "learning_rate": None, "lr_scheduler": None}, "x")
        assert (items["learning_rate"], items["lr_scheduler"]) == (None, None)
        assert "learning_rate 1e-05" not in notes[0] and "lr_scheduler" not in notes[0]
        assert "max_resolution '512,512'" in notes[0]
    items, notes, _ = gui_preset({"train_dir": "/d", "learning_rate": None, "lr_scheduler": None}, "x")
    assert (items["learning_rate"], items["lr_scheduler"]) == (1e-5, "constant")
    items, _, _ = gui_preset({"LoRA_type": "Standard", "learning_rate": None}, "x")
    assert items["learning_rate"] == 1e-4


def test_a_bare_finetune_config_runs_at_the_finetuning_tabs_widget_values(tmp_path):
    notes: list[str] = []
    data = {"train_dir": "/out", "image_folder": "/imgs", "model_list": "custom"}
    o = load_options(DreamBoothOptions, _write(tmp_path, data), notes=notes)
    _common_widgets(o, FT_WIDGETS)
    assert (o.lr, o.lr_scheduler, o.lr_warmup_steps, o.max_bucket_reso, o.buckets) == (1e-5, "constant", 0, 1024, True)
    # use_latent_files "Yes": finetune_gui.py reads the latent metadata file meta_lat.json from train_dir
    assert (o.metadata_file, o.data, o.dataset_repeats, o.train_text_encoder, o.te_lr) == (
        "/out/meta_lat.json", "/imgs", 40, True, 1e-5
    )  # fmt: skip
    assert (o.max_steps, o.epochs) == (1600, None)
    assert "enable_bucket" not in notes[0] and "dataset_repeats 40" in notes[0], notes
    sdxl = load_options(DreamBoothOptions, _write(tmp_path, {**data, "sdxl_checkbox": True}), notes=[])
    assert (sdxl.te_lr, sdxl.te1_lr, sdxl.te2_lr) == (None, 1e-5, 1e-5)
    # flip_aug halves the widget's 1600 steps (finetune_gui.py:1023)
    flipped = load_options(DreamBoothOptions, _write(tmp_path, {**data, "flip_aug": True}), notes=[])
    assert flipped.max_steps == 800


def test_a_bare_ti_config_runs_at_the_ti_tabs_widget_values(tmp_path):
    notes: list[str] = []
    o = load_options(TIOptions, _write(tmp_path, {"token_string": "mytok", "model_list": "custom"}), notes=notes)
    _common_widgets(o, TI_WIDGETS)
    # not sdcore's TI lr 5e-3: the tab's 1e-5, cosine, 10 % warmup; 1600 steps
    assert (o.lr, o.lr_scheduler, o.lr_warmup_steps, o.max_steps, o.mixed_precision) == (
        1e-5, "cosine", 0.1, 1600, "fp16"
    )  # fmt: skip
    # the token widgets: init_word "*", 1 vector, template "caption" (the captions: no object/style template)
    assert (o.name, o.init_text, o.vectors, o.template) == ("mytok", "*", 1, "filewords")
    assert "init_word '*', num_vectors_per_token 1, template 'caption'" in notes[0], notes
    # the file's own token fields stay
    data = {"token_string": "t", "init_word": "dog", "num_vectors_per_token": 3, "template": "object template",
            "learning_rate": 2e-3, "model_list": "custom"}  # fmt: skip
    o = load_options(TIOptions, _write(tmp_path, data), notes=[])
    assert (o.init_text, o.vectors, o.template, o.lr) == ("dog", 3, "subject", 2e-3)  # use_object_template


@pytest.mark.parametrize("name", [n for n in _presets() if not n.startswith("lora/") and n not in REFUSED])
def test_dreambooth_and_finetune_presets_leave_out_fields_at_the_tabs_widget_values(name, tmp_path):
    """The fine-tuning presets leave out the TE rates (the widgets' 1e-5, passed for SDXL: the SDXL Essenz
    preset trains its text encoders at 1e-5 beside a 1e-6 U-Net, as the GUI runs it); their length is checked
    with every preset above."""
    data = _paths_moved_here(json.loads((PRESETS / name).read_text()))
    o = load_options(DreamBoothOptions, _write(tmp_path, data, Path(name).name), notes=[])
    table = FT_WIDGETS if name.startswith("finetune/") else DB_WIDGETS
    gui = {key: data.get(key, value) for key, value in table.items()}  # the presets have no nulls
    _common_widgets(o, gui)
    assert o.buckets is (True if name.startswith("finetune/") else bool(gui["enable_bucket"]))
    sdxl = bool(data.get("sdxl") or data.get("sdxl_checkbox"))
    if sdxl:
        assert (o.te_lr, o.te1_lr, o.te2_lr) == (None, float(gui["learning_rate_te1"]), float(gui["learning_rate_te2"]))
    else:
        assert (o.te_lr, o.te1_lr) == (float(gui["learning_rate_te"]), None)
    if name.startswith("finetune/"):
        assert (o.dataset_repeats, o.train_text_encoder) == (
            int(gui["dataset_repeats"]),
            bool(gui["train_text_encoder"]),
        )


def test_a_missing_finetune_metadata_file_is_explained_by_the_guis_preparation_steps(tmp_path):
    """finetune_gui.py writes train_dir's metadata files before each run (create_caption / create_buckets, both
    ticked by default: merge_captions_to_metadata.py, prepare_buckets_latents.py -> meta_lat.json); sdcore runs
    neither, so a file that is not there gets a note naming the step and the use_latent_files way out."""
    out = tmp_path / "out"
    out.mkdir()
    data = {"train_dir": str(out), "image_folder": str(tmp_path), "model_list": "custom"}
    notes: list[str] = []
    o = load_options(DreamBoothOptions, _write(tmp_path, data), notes=notes)
    assert o.metadata_file == f"{out}/meta_lat.json"
    (hint,) = [n for n in notes if n.startswith("in_json ")]
    assert hint == (
        f"in_json {out}/meta_lat.json (the fine-tuning tab's metadata file) is not there: the GUI writes it before "
        'training with its "Generate image buckets metadata" step (sd-scripts\' finetune/prepare_buckets_latents.py), '
        f'which sdcore does not run: run it; or set "use_latent_files": "No" to read the caption metadata file '
        f"{out}/meta_cap.json"
    )
    notes = []
    o = load_options(DreamBoothOptions, _write(tmp_path, {**data, "use_latent_files": "No"}), notes=notes)
    assert o.metadata_file == f"{out}/meta_cap.json"
    (hint,) = [n for n in notes if n.startswith("in_json ")]
    assert (
        "merge_captions_to_metadata.py), which sdcore does not run: run it" in hint and "use_latent_files" not in hint
    )
    # the file is there (the GUI wrote it once): no note, and the dry run's dataset reads it
    (out / "meta_lat.json").write_text("{}")
    notes = []
    o = load_options(DreamBoothOptions, _write(tmp_path, data), notes=notes)
    assert o.metadata_file == f"{out}/meta_lat.json" and not [n for n in notes if n.startswith("in_json ")]

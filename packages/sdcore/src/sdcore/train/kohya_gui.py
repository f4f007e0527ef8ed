"""kohya_ss GUI configs (bmaltais/kohya_ss): the JSON its tabs save and the presets it ships.

The GUI keeps its own field names (``LoRA_type``, ``max_resolution``, ``optimizer``, ``lr_warmup`` in
percent, ``xformers`` as a string, the model-family boxes ``sdxl``/``sd3_checkbox``/``flux1_checkbox``
...) and turns them into sd-scripts options when it launches a run. :func:`gui_preset` does that
turning as the GUI does (lora_gui.py, dreambooth_gui.py, finetune_gui.py, textual_inversion_gui.py):
``LoRA_type`` becomes ``network_module`` + ``network_args``, a family's fields pass only while its box is
ticked, and so on. What comes out has sd-scripts names only, so :mod:`.kohya` translates it like any
kohya TOML (one table of kohya names, one place that refuses what sdcore does not train).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .kohya.values import _OFF, _args_text, _is_off, _text

#: the GUI tabs whose saved configs are read (tab -> the ``sdcore train`` method that runs them)
TABS = {"lora": "lora", "dreambooth": "dreambooth", "finetune": "dreambooth", "ti": "ti"}
#: a field of each sdcore method's options, to tell which method a config was given to
METHOD_FIELD = {"lora": "rank", "dreambooth": "instance_prompt", "ti": "vectors"}

#: fields every tab saves and no sd-scripts or sdcore option is named (a GUI config's signature)
_GUI_SIGNATURE = frozenset(
    {"LoRA_type", "max_resolution", "lr_warmup", "additional_parameters", "num_cpu_threads_per_process",
     "model_list", "save_as_bool"}
)  # fmt: skip
_TI_FIELDS = frozenset({"token_string", "init_word", "num_vectors_per_token"})
_FINETUNE_FIELDS = frozenset(
    {"train_dir", "image_folder", "caption_metadata_filename", "latent_metadata_filename", "use_latent_files",
     "sdxl_checkbox", "create_caption", "create_buckets", "generate_caption_database", "generate_image_buckets",
     "full_path"}
)  # fmt: skip

#: the model-family boxes of the families sdcore trains (the finetune tab names SDXL's ``sdxl_checkbox``)
_SDXL_BOXES = ("sdxl", "sdxl_checkbox")
FLUX, SD3, SDXL = "flux1_checkbox", "sd3_checkbox", "sdxl"
#: pseudo-box: no flow-matching family ticked (SD1/SD2/SDXL)
_UNET = "unet"
#: the GUI's other family boxes: models sdcore does not train (box -> model, prefix of its own fields)
OTHER_FAMILIES = {
    "anima_checkbox": ("Anima", "anima_"),
    "hunyuan_image_checkbox": ("HunyuanImage-2.1", "hunyuan_"),
    "lumina_checkbox": ("Lumina Image 2.0", "lumina_"),
}

#: GUI fields that only steer the GUI or the launcher (accelerate), dropped
GUI_ONLY = frozenset(
    {"num_cpu_threads_per_process", "use_wandb", "model_list", "save_as", "save_as_bool", "file_path", "gpu_ids",
     "multi_gpu", "num_processes", "num_machines", "main_process_port", "extra_accelerate_launch_args",
     "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic", "noise_offset_type_original", "print_only",
     "headless", "show_timesteps", "show_timesteps_resolution", "training_preset", "stop_text_encoder_training_pct"}
)  # fmt: skip

_FLUX_ONLY = ("split_mode", "t5xxl_max_token_length", "guidance_scale", "mem_eff_save", "apply_t5_attn_mask",
              "cpu_offload_checkpointing", "single_blocks_to_swap", "double_blocks_to_swap", "fp8_base_unet",
              "discrete_flow_shift", "model_prediction_type", "timestep_sampling", "blockwise_fused_optimizers")  # fmt: skip
_SD3_ONLY = ("clip_g", "clip_g_dropout_rate", "logit_mean", "logit_std", "mode_scale", "weighting_scheme",
             "pos_emb_random_crop_rate", "save_clip", "save_t5xxl", "t5xxl_device", "t5xxl_dtype")  # fmt: skip
# A family's fields: GUI field -> (sd-scripts name, the boxes under which the GUI passes it). Fields of
# one tab only are in that tab's table; a GUI field in none of them passes under its own name.
_FAMILY_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sdxl_cache_text_encoder_outputs": ("cache_text_encoder_outputs", (SDXL,)),
    "sdxl_no_half_vae": ("no_half_vae", (SDXL,)),
    "flux1_cache_text_encoder_outputs": ("cache_text_encoder_outputs", (FLUX,)),
    "flux1_cache_text_encoder_outputs_to_disk": ("cache_text_encoder_outputs_to_disk", (FLUX,)),
    "sd3_cache_text_encoder_outputs": ("cache_text_encoder_outputs", (SD3,)),
    "sd3_cache_text_encoder_outputs_to_disk": ("cache_text_encoder_outputs_to_disk", (SD3,)),
    "ae": ("ae", (FLUX,)),
    **{name: (name, (FLUX,)) for name in _FLUX_ONLY},
    "blocks_to_swap": ("blocks_to_swap", (FLUX, SD3)),
    "sd3_clip_l": ("clip_l", (SD3,)),
    "sd3_t5xxl": ("t5xxl", (SD3,)),
    "sd3_clip_l_dropout_rate": ("clip_l_dropout_rate", (SD3,)),
    "sd3_enable_scaled_pos_embed": ("enable_scaled_pos_embed", (SD3,)),
    "sd3_t5_dropout_rate": ("t5_dropout_rate", (SD3,)),
    "sd3_text_encoder_batch_size": ("text_encoder_batch_size", (SD3,)),
    "sd3_disable_mmap_load_safetensors": ("disable_mmap_load_safetensors", (SD3,)),
    "sd3_fused_backward_pass": ("fused_backward_pass", (SD3,)),
    **{name: (name, (SD3,)) for name in _SD3_ONLY},
}
_TAB_FIELDS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    # lora_gui.py: clip_l/t5xxl are the Flux fields (SD3 has sd3_clip_l/sd3_t5xxl); fused_backward_pass is
    # SD3's only; disable_mmap_load_safetensors SD3's only
    "lora": {
        "clip_l": ("clip_l", (FLUX,)),
        "t5xxl": ("t5xxl", (FLUX,)),
        "fused_backward_pass": ("fused_backward_pass", ()),
        "disable_mmap_load_safetensors": ("disable_mmap_load_safetensors", ()),
    },
    # dreambooth_gui.py / finetune_gui.py: clip_l/t5xxl are SD3's, flux1_clip_l/flux1_t5xxl Flux's; the plain
    # fused_backward_pass is SDXL's (Flux and SD3 have their own boxes); train_blocks is LoRA-only
    "dreambooth": {
        "clip_l": ("clip_l", (SD3,)),
        "t5xxl": ("t5xxl", (SD3,)),
        "flux1_clip_l": ("clip_l", (FLUX,)),
        "flux1_t5xxl": ("t5xxl", (FLUX,)),
        "flux_fused_backward_pass": ("fused_backward_pass", (FLUX,)),
        "fused_backward_pass": ("fused_backward_pass", (_UNET,)),
        "train_blocks": ("train_blocks", ()),
    },
    "ti": {},
}
_TAB_FIELDS["finetune"] = {**_TAB_FIELDS["dreambooth"], "vae": ("vae", ())}  # finetune passes vae for Anima only

#: "LoRA_type" -> sd-scripts network_module (lora_gui.py); LyCORIS types add their algo to network_args
GUI_LORA_TYPES: dict[str, str] = {
    "Standard": "networks.lora",
    "Kohya LoCon": "networks.lora",
    "LoRA-FA": "networks.lora_fa",
    "Kohya DyLoRA": "networks.dylora",
    "Kohya LoHa": "networks.loha",
    "Kohya LoKr": "networks.lokr",
    "Flux1": "networks.lora_flux",
    "Flux1 OFT": "networks.oft_flux",
    "HunyuanImage-2.1": "networks.lora_hunyuan_image",
    "Anima": "networks.lora_anima",
    "Lumina": "networks.lora_lumina",
    "LoCon": "lycoris.kohya",
    **{f"LyCORIS/{kind}": "lycoris.kohya" for kind in ("LoCon", "LoHa", "LoKr", "iA3", "BOFT", "Diag-OFT", "DyLoRA",
                                                        "GLoRA", "Native Fine-Tuning")},
}  # fmt: skip
# The LyCORIS network_args lora_gui.py writes per type: (network_arg, GUI field) in its order, then the algo
# and (every type but iA3) train_norm.
_LYCORIS_COMMON = (("preset", "LyCORIS_preset"), ("conv_dim", "conv_dim"), ("conv_alpha", "conv_alpha"))
_LYCORIS_LOCON = (
    *_LYCORIS_COMMON, ("use_tucker", "use_tucker"), ("rank_dropout", "rank_dropout"), ("bypass_mode", "bypass_mode"),
    ("dora_wd", "dora_wd"), ("module_dropout", "module_dropout"), ("use_scalar", "use_scalar"),
    ("rank_dropout_scale", "rank_dropout_scale"),
)  # fmt: skip
_LYCORIS_ARGS: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    "LyCORIS/BOFT": (
        (*_LYCORIS_COMMON, ("module_dropout", "module_dropout"), ("use_tucker", "use_tucker"),
         ("rank_dropout", "rank_dropout"), ("rank_dropout_scale", "rank_dropout_scale")),
        "boft",
    ),
    "LyCORIS/Diag-OFT": (
        (*_LYCORIS_COMMON, ("module_dropout", "module_dropout"), ("use_tucker", "use_tucker"),
         ("rank_dropout", "rank_dropout"), ("rank_dropout_scale", "rank_dropout_scale"), ("constraint", "constrain"),
         ("rescaled", "rescaled")),
        "diag-oft",
    ),
    "LyCORIS/DyLoRA": (
        (*_LYCORIS_COMMON, ("use_tucker", "use_tucker"), ("block_size", "unit"), ("rank_dropout", "rank_dropout"),
         ("module_dropout", "module_dropout")),
        "dylora",
    ),
    "LyCORIS/GLoRA": (
        (*_LYCORIS_COMMON, ("use_tucker", "use_tucker"), ("rank_dropout", "rank_dropout"),
         ("module_dropout", "module_dropout"), ("rank_dropout_scale", "rank_dropout_scale")),
        "glora",
    ),
    "LyCORIS/iA3": ((*_LYCORIS_COMMON, ("train_on_input", "train_on_input")), "ia3"),
    "LoCon": (_LYCORIS_LOCON, "locon"),
    "LyCORIS/LoCon": (_LYCORIS_LOCON, "locon"),
    "LyCORIS/LoHa": (_LYCORIS_LOCON, "loha"),
    "LyCORIS/LoKr": (
        (*_LYCORIS_LOCON[:-2], ("factor", "factor"), ("use_cp", "use_cp"), ("use_scalar", "use_scalar"),
         ("decompose_both", "decompose_both"), ("rank_dropout_scale", "rank_dropout_scale")),
        "lokr",
    ),
    "LyCORIS/Native Fine-Tuning": (
        (("preset", "LyCORIS_preset"), ("rank_dropout", "rank_dropout"), ("module_dropout", "module_dropout"),
         ("rank_dropout_scale", "rank_dropout_scale")),
        "full",
    ),
}  # fmt: skip
#: the LoRA tab's values for network fields a saved config leaves out (lora_gui.py's widgets' defaults)
_NETWORK_DEFAULTS: dict[str, Any] = {
    "LyCORIS_preset": "full", "conv_dim": 1, "conv_alpha": 1, "use_tucker": False, "rank_dropout": 0,
    "bypass_mode": False, "dora_wd": False, "module_dropout": 0.0, "use_scalar": False, "rank_dropout_scale": False,
    "factor": -1, "use_cp": False, "decompose_both": False, "train_norm": False, "constrain": 0.0, "rescaled": False,
    "unit": 1, "train_on_input": True,
}  # fmt: skip
#: the widgets every tab builds from the shared classes, at the same values: class_basic_training.py (resolution,
#: buckets, cache_latents, caption extension, save_every_n_epochs), class_advanced_training.py (bucket_no_upscale),
#: class_source_model.py (save_precision) and class_accelerate_launch.py (mixed_precision) (bmaltais/kohya_ss
#: 45088f0). Only the widgets whose value differs from sd-scripts' default (or sdcore's) for the run are listed.
_SHARED_WIDGETS: dict[str, Any] = {
    "max_resolution": "512,512", "enable_bucket": True, "max_bucket_reso": 2048, "bucket_no_upscale": True,
    "cache_latents": True, "caption_extension": ".txt", "save_every_n_epochs": 1, "save_precision": "fp16",
    "mixed_precision": "fp16",
}  # fmt: skip


def _basic_training(learning_rate: float, lr_scheduler: str = "constant", lr_warmup: int = 0) -> dict[str, Any]:
    """The rate widgets of class_basic_training.py as a tab builds it (``BasicTraining(learning_rate_value=...,
    lr_scheduler_value=..., lr_warmup_value=...)``; the class's own defaults are "constant" and 0 %)."""
    return {"learning_rate": learning_rate, "lr_scheduler": lr_scheduler, "lr_warmup": lr_warmup}


def _te_widgets(learning_rate: float) -> dict[str, Any]:
    """The TE rate widgets of the DreamBooth and fine-tuning tabs: class_basic_training.py starts them at the
    tab's learning_rate_value (the tab passes te for SD1/SD2, te1/te2 for SDXL)."""
    return {key: learning_rate for key in ("learning_rate_te", "learning_rate_te1", "learning_rate_te2")}


#: per tab, the values for the training fields a config leaves out. The GUI loads a config into its widgets
#: (``open_configuration``) and launches from the widgets, so a config that names few fields (an older GUI's,
#: or presets/lora/iA3-Prodigy-sd15.json) runs at these, not at sd-scripts' defaults: the shared classes'
#: (:data:`_SHARED_WIDGETS`), then the tab's own (bmaltais/kohya_ss 45088f0):
#: - lora_gui.py: BasicTraining(0.0001, "cosine", 10 %), DEFAULT_TEXT_ENCODER_LR = DEFAULT_UNET_LR = 0.0001,
#:   network_dim 8, network_alpha 1;
#: - dreambooth_gui.py: BasicTraining(1e-5, "cosine", 10 %) and its TE rates;
#: - finetune_gui.py: BasicTraining(1e-5) (constant, 0 %) and its TE rates; its own "Dataset Preparation" widgets
#:   max_bucket_reso "1024" and max_resolution "512,512" (the ones it passes), dataset_repeats 40,
#:   train_text_encoder True, use_latent_files "Yes" (metadata file names: :func:`_finetune_tab`'s fallbacks are
#:   the widgets' meta_cap.json / meta_lat.json); it always buckets, so enable_bucket is not a widget it reads;
#: - textual_inversion_gui.py: BasicTraining(1e-5, "cosine", 10 %), init_word "*", num_vectors_per_token 1,
#:   template "caption" (token_string has no value: the GUI stops on an empty one).
_TAB_WIDGETS: dict[str, dict[str, Any]] = {
    "lora": {**_SHARED_WIDGETS, **_basic_training(0.0001, "cosine", 10), "text_encoder_lr": 0.0001,
             "unet_lr": 0.0001, "network_dim": 8, "network_alpha": 1},
    "dreambooth": {**_SHARED_WIDGETS, **_basic_training(1e-5, "cosine", 10), **_te_widgets(1e-5)},
    "finetune": {**{k: v for k, v in _SHARED_WIDGETS.items() if k != "enable_bucket"}, **_basic_training(1e-5),
                 **_te_widgets(1e-5), "max_bucket_reso": 1024, "dataset_repeats": 40, "train_text_encoder": True,
                 "use_latent_files": "Yes"},
    "ti": {**_SHARED_WIDGETS, **_basic_training(1e-5, "cosine", 10), "init_word": "*", "num_vectors_per_token": 1,
           "template": "caption"},
}  # fmt: skip
#: tabs whose open_configuration keeps a null as null (dreambooth_gui.py, textual_inversion_gui.py:
#: ``my_data.get(key, value)``): there only a missing field takes the widget's value, a null reaches sd-scripts
#: unset. lora_gui.py and finetune_gui.py fill both (``json_value if json_value is not None else value``).
_NULL_KEPT = frozenset({"dreambooth", "ti"})
#: networks.lora's block-wise fields (Standard, Kohya LoCon, LoRA-FA, Kohya DyLoRA pass those that are set)
_BLOCK_FIELDS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                 "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")  # fmt: skip
#: networks.lora_flux's fields (the Flux1 type passes those that are set)
_FLUX_FIELDS = ("img_attn_dim", "img_mlp_dim", "img_mod_dim", "single_dim", "txt_attn_dim", "txt_mlp_dim",
                "txt_mod_dim", "single_mod_dim", "in_dims", "train_double_block_indices", "train_single_block_indices")  # fmt: skip
_LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
#: the LoRA tab's network fields: every one is consumed by the network_args step (none passes on by name)
_NETWORK_FIELDS = frozenset(
    {"LyCORIS_preset", "conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "bypass_mode", "dora_wd",
     "module_dropout", "use_scalar", "rank_dropout_scale", "factor", "use_cp", "decompose_both", "train_norm",
     "constrain", "rescaled", "unit", "train_on_input", "split_qkv", "train_t5xxl", "train_blocks", "train_lora_ggpo",
     "ggpo_beta", "ggpo_sigma", "enable_all_linear", "t5xxl_lr", "conv_dims", "conv_alphas",
     *_BLOCK_FIELDS, *_FLUX_FIELDS, *_LORAPLUS}
)  # fmt: skip
#: old GUI spellings of the block-wise conv fields
_OLD_NAMES = {
    "conv_dims": "conv_block_dims",
    "conv_alphas": "conv_block_alphas",
    "lora_network_weights": "network_weights",
}


def is_gui_preset(data: dict[str, Any]) -> bool:
    """A config saved by (or shipped with) the kohya_ss GUI: it has one of the GUI's own field names."""
    return bool(_GUI_SIGNATURE & data.keys())


def gui_tab(data: dict[str, Any]) -> str:
    """The GUI tab that saved ``data``: lora (``LoRA_type``), ti (the token fields), finetune (its folder and
    metadata fields), else dreambooth."""
    if "LoRA_type" in data:
        return "lora"
    if _TI_FIELDS & data.keys():
        return "ti"
    if _FINETUNE_FIELDS & data.keys():
        return "finetune"
    return "dreambooth"


def _on(value: Any) -> bool:
    return not _is_off(value, _OFF)


def _number(value: Any) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


def _family(items: dict[str, Any], where: str, problems: list[str]) -> str:
    """The ticked family box (pops them all); more than one, or a family sdcore does not train, is a problem."""
    ticked = [box for box in (*_SDXL_BOXES, FLUX, SD3) if _on(items.pop(box, None))]
    ticked = [SDXL if box in _SDXL_BOXES else box for box in dict.fromkeys(ticked)]
    for box, (model, prefix) in OTHER_FAMILIES.items():
        if _on(items.pop(box, None)):
            problems.append(
                f"{where}: {box} is ticked: {model} is not a model family sdcore trains (SD1/SD2, SDXL, SD3, FLUX.1)"
            )
        for key in [k for k in items if k.startswith(prefix)]:
            items.pop(key)  # the GUI passes these only with their box ticked
    if len(set(ticked)) > 1:
        problems.append(f"{where}: more than one model family box is ticked ({', '.join(ticked)}): tick one")
    return ticked[0] if ticked else _UNET


def _family_fields(items: dict[str, Any], tab: str, family: str, notes: list[str]) -> None:
    """Each family field under its sd-scripts name while its box is ticked, dropped otherwise (as the GUI)."""
    table = {**_FAMILY_FIELDS, **_TAB_FIELDS[tab]}
    out: dict[str, Any] = {}
    for key, (target, boxes) in table.items():
        if key not in items:
            continue
        value = items.pop(key)
        passes = family in boxes or (family == SDXL and _UNET in boxes)
        if passes and (target not in out or _on(value)):
            out[target] = value
    if family == FLUX:
        # flux_train*.py read the autoencoder from ae; the GUI also writes its vae field, which they never read
        vae = items.pop("vae", None)
        if _on(vae):
            notes.append(f"vae {vae!r} is not read for FLUX.1 (kohya's Flux scripts load the autoencoder from ae)")
    model_type = _text(out.pop("model_type", items.pop("model_type", "")))
    if family == FLUX and model_type.lower() == "chroma":
        out["model_type"] = model_type  # refused by name in the translation
    items.update(out)


def _arg(name: str, value: Any) -> str:
    return f"{name}={_text(value)}".replace('"', "")


def _lora_network(
    items: dict[str, Any], lora_type: str, family: str, where: str, problems: list[str]
) -> tuple[str, list[str]]:
    """network_module and network_args as lora_gui.py builds them for ``lora_type``."""
    g = {**_NETWORK_DEFAULTS, **{key: items.pop(key) for key in [k for k in items if k in _NETWORK_FIELDS]}}
    for old, new in _OLD_NAMES.items():
        if old in g and new not in g:
            g[new] = g.pop(old)
    module = GUI_LORA_TYPES[lora_type]
    args: list[str] = []

    def set_ones(names: Iterable[str]) -> None:
        args.extend(_arg(name, g[name]) for name in names if _on(g.get(name)))

    def dropouts() -> None:  # lora_gui.append_rank_module_dropout_network_args: only positive rates
        args.extend(_arg(name, g[name]) for name in ("rank_dropout", "module_dropout") if _number(g.get(name)) > 0)

    if lora_type in _LYCORIS_ARGS:
        fields, algo = _LYCORIS_ARGS[lora_type]
        args = [_arg(name, g[field]) for name, field in fields] + [f"algo={algo}"]
        if lora_type != "LyCORIS/iA3":
            args.append(_arg("train_norm", g["train_norm"]))
    elif lora_type in ("Standard", "Kohya LoCon"):
        if family == SD3:
            module = "networks.lora_sd3"
        if lora_type == "Kohya LoCon":
            args += [_arg("conv_dim", g["conv_dim"]), _arg("conv_alpha", g["conv_alpha"])]
        set_ones(_BLOCK_FIELDS)
    elif lora_type == "LoRA-FA":
        set_ones(_BLOCK_FIELDS)
    elif lora_type == "Kohya DyLoRA":
        set_ones(("conv_dim", "conv_alpha", *_BLOCK_FIELDS, "unit"))
    elif lora_type == "Flux1":
        set_ones(_FLUX_FIELDS)
        if _on(g.get("train_lora_ggpo")):
            set_ones(("ggpo_beta", "ggpo_sigma"))
        if _on(items.get("split_mode")):
            args.append("train_blocks=single")  # the GUI forces single blocks in split mode
        if _on(g.get("split_qkv")):
            args.append("split_qkv=True")
        if _on(g.get("train_t5xxl")) and family == FLUX:
            args.append("train_t5xxl=True")
        dropouts()
    elif lora_type == "Flux1 OFT":
        set_ones(("enable_all_linear",))
    elif lora_type in ("Kohya LoHa", "Kohya LoKr"):  # lora_gui.build_native_loha_lokr_network_args
        if _number(g.get("conv_dim")) > 0:
            args.append(f"conv_dim={int(_number(g['conv_dim']))}")
            if g.get("conv_alpha") is not None:
                alpha = _number(g["conv_alpha"])
                args.append(f"conv_alpha={int(alpha) if alpha == int(alpha) else alpha}")
        if _on(g.get("use_tucker")):
            args.append("use_tucker=True")
        if lora_type == "Kohya LoKr" and int(_number(g.get("factor", -1))) != -1:
            args.append(f"factor={int(_number(g['factor']))}")
        dropouts()
    else:  # HunyuanImage-2.1, Anima, Lumina
        dropouts()
    set_ones(_LORAPLUS)
    te_lr, t5_lr = _number(items.get("text_encoder_lr")), _number(g.get("t5xxl_lr"))
    if te_lr == 0 and t5_lr > 0:
        problems.append(f"{where}: t5xxl_lr needs a text_encoder_lr above 0 (as the GUI says)")
    elif te_lr > 0:  # the GUI writes one rate per text encoder: [CLIP, T5]
        items["text_encoder_lr"] = [te_lr, t5_lr if t5_lr > 0 else te_lr]
    return module, args


def _lora_tab(items: dict[str, Any], family: str, where: str, notes: list[str], problems: list[str]) -> None:
    lora_type = _text(items.pop("LoRA_type"))
    if lora_type not in GUI_LORA_TYPES:
        problems.append(f"{where}: LoRA_type {lora_type!r} is not one of the GUI's ({', '.join(GUI_LORA_TYPES)})")
        lora_type = "Standard"
    if family == FLUX and lora_type not in ("Flux1", "Flux1 OFT") and not lora_type.startswith("LyCORIS"):
        problems.append(f"{where}: LoRA_type {lora_type!r} with flux1_checkbox: the GUI needs Flux1 or a LyCORIS type")
    if lora_type in ("Flux1", "Flux1 OFT") and family != FLUX:
        problems.append(f"{where}: LoRA_type {lora_type!r} needs flux1_checkbox (a FLUX.1 model)")
    te_lr, unet_lr = _number(items.get("text_encoder_lr")), _number(items.get("unet_lr"))
    module, args = _lora_network(items, lora_type, family, where, problems)
    items["network_module"], items["network_args"] = module, args
    _noise_fields(items)
    # lora_gui.resolve_network_train_flags: a zero rate leaves that part untrained
    for key in ("network_train_unet_only", "network_train_text_encoder_only"):
        items.pop(key, None)
    if te_lr == 0 and unet_lr != 0:
        items["network_train_unet_only"] = True
    elif te_lr != 0 and unet_lr == 0:
        items["network_train_text_encoder_only"] = True
    for key, rate in (("unet_lr", unet_lr), ("text_encoder_lr", te_lr)):
        if rate == 0:  # lora_gui.train_model writes None for a 0 rate (the flags above say what trains)
            items.pop(key, None)
    if "guidance_scale" in items and _number(items["guidance_scale"]) == 0:
        # lora_gui.train_model leaves every value in ["", False, None] out of its TOML, 0.0 included (Chroma's put
        # back, a model type refused here): flux_train_network.py then trains at its default
        items.pop("guidance_scale")
    if _number(items.get("stop_text_encoder_training")) > 0:
        notes.append("stop_text_encoder_training is ignored for LoRA (as the GUI does)")
    items.pop("stop_text_encoder_training", None)
    notes.append(f"read as a kohya_ss GUI preset (LoRA_type {lora_type})")


def _widget_values(items: dict[str, Any], tab: str, notes: list[str]) -> None:
    """The tab's widget values (:data:`_TAB_WIDGETS`) for the fields ``items`` leaves out (or sets to null, where
    the tab reads a null so: :data:`_NULL_KEPT`), as a freshly started GUI fills them when it loads the config;
    said in one note. The load also runs the widgets' change handlers (every tab wires both), which overrule a
    filled value: class_basic_training.py ``lr_scheduler_changed`` sets the warmup to 0 for the constant schedule
    (sd-scripts refuses a warmup there), and common_gui.py ``color_aug_changed`` unticks cache_latents (a
    colour-augmented image has no fixed latent)."""
    widgets = dict(_TAB_WIDGETS[tab])
    if tab in _NULL_KEPT:
        missing = [key for key in widgets if key not in items]
    else:
        missing = [key for key in widgets if items.get(key) is None]
    if _text(items.get("lr_scheduler") or widgets["lr_scheduler"]) == "constant":
        widgets["lr_warmup"] = 0
    if _on(items.get("color_aug")):
        widgets["cache_latents"] = False
    for key in missing:
        items[key] = widgets[key]
    if missing:
        given = ", ".join(f"{key} {widgets[key]!r}" for key in missing)
        note = f"not in the file, so the kohya_ss GUI's own values (its widgets' defaults): {given}"
        if "mixed_precision" in missing:
            note += (
                "; mixed_precision fp16 needs a CUDA GPU: without one give --mixed-precision no (or bf16), "
                'or set "mixed_precision" in the file'
            )
        notes.append(note)


def _noise_fields(items: dict[str, Any]) -> None:
    """The LoRA tab's "noise_offset_type" picks which noise fields reach sd-scripts: "Original" passes
    noise_offset, noise_offset_random_strength and adaptive_noise_scale (the last only with a
    positive noise_offset), "Multires" passes the multires_noise_* fields; the others are dropped."""
    kind = _text(items.get("noise_offset_type") or "Original")
    if kind not in ("Original", "Multires"):
        return  # left for the unsupported-value check to report
    items.pop("noise_offset_type", None)
    if kind == "Multires":
        for key in ("noise_offset", "noise_offset_random_strength", "adaptive_noise_scale"):
            items.pop(key, None)
        return
    for key in ("multires_noise_iterations", "multires_noise_discount"):
        items.pop(key, None)
    try:
        offset = float(items.get("noise_offset") or 0)
    except (TypeError, ValueError):
        return  # reported by the translation
    if offset <= 0:
        items.pop("adaptive_noise_scale", None)


def _finetune_tab(items: dict[str, Any], notes: list[str]) -> None:
    """finetune_gui.py: the images are image_folder, the captions (or latents) a metadata JSON in train_dir."""
    train_dir = _text(items.pop("train_dir", "") or "")
    latents = _text(items.pop("use_latent_files", "")) == "Yes"
    caption_json = _text(items.pop("caption_metadata_filename", "") or "meta_cap.json")
    latent_json = _text(items.pop("latent_metadata_filename", "") or "meta_lat.json")
    if train_dir:
        items["in_json"] = f"{train_dir}/{latent_json if latents else caption_json}"
        if not Path(items["in_json"]).expanduser().is_file():
            notes.append(_metadata_hint(items["in_json"], latents, f"{train_dir}/{caption_json}"))
    if "image_folder" in items:
        items["train_data_dir"] = items.pop("image_folder")
    items["enable_bucket"] = True  # finetune_gui.py always buckets
    for key in ("create_caption", "create_buckets", "generate_caption_database", "generate_image_buckets",
                "full_path", "batch_size", "caption_extension_finetune"):  # fmt: skip
        items.pop(key, None)  # the GUI's preparation steps (captions, buckets), not training options
    notes.append("read as a kohya_ss GUI preset (fine-tuning tab)")


def _metadata_hint(in_json: str, latents: bool, caption_file: str) -> str:
    """Why the fine-tuning tab's metadata file may be missing: the GUI writes it before each run (its "Generate
    caption metadata" and "Generate image buckets metadata" boxes, ``create_caption``/``create_buckets``, ticked
    by default: sd-scripts' finetune/merge_captions_to_metadata.py from image_folder's caption files, then
    finetune/prepare_buckets_latents.py, which writes the latent metadata file), and sdcore runs neither step, so
    a config whose file was never written (``use_latent_files`` "Yes" is the widget's value) stops on it."""
    if latents:
        step = (
            'the GUI writes it before training with its "Generate image buckets metadata" step (sd-scripts\' '
            "finetune/prepare_buckets_latents.py)"
        )
        other = f'; or set "use_latent_files": "No" to read the caption metadata file {caption_file}'
    else:
        step = (
            'the GUI writes it before training with its "Generate caption metadata" step (sd-scripts\' '
            "finetune/merge_captions_to_metadata.py)"
        )
        other = ""
    return f"in_json {in_json} (the fine-tuning tab's metadata file) is not there: {step}, which sdcore does not run: run it{other}"


def _te_rates(items: dict[str, Any], family: str) -> None:
    """dreambooth/finetune tabs: learning_rate_te for SD1/SD2 (and SD3/Flux), te1/te2 for SDXL only."""
    sdxl = family == SDXL
    for key in ("learning_rate_te1", "learning_rate_te2"):
        if not sdxl:
            items.pop(key, None)
    if sdxl:
        items.pop("learning_rate_te", None)


def _ti_tab(items: dict[str, Any]) -> None:
    """textual_inversion_gui.py: template "object template"/"style template" -> use_object/style_template."""
    template = _text(items.pop("template", "") or "")
    if template == "object template":
        items["use_object_template"] = True
    elif template == "style template":
        items["use_style_template"] = True
    if "sdxl_no_half_vae" in items:  # the TI tab passes it whatever the family
        items["no_half_vae"] = items.pop("sdxl_no_half_vae")


def _warmup(items: dict[str, Any], where: str, problems: list[str]) -> None:
    """common_gui.resolve_lr_warmup_steps: lr_warmup_steps wins when above 0, else lr_warmup percent / 100
    (a ratio of the total steps, as sd-scripts reads a float below 1). The GUI passes it whatever the schedule:
    with kohya's adafactor schedule (``lr_scheduler adafactor``, or forced by Adafactor's relative_step) a warmup
    stops sd-scripts (get_scheduler_fix: "does not require num_warmup_steps"), so it is a problem by GUI names."""
    percent, steps = _number(items.pop("lr_warmup", 0)), _number(items.get("lr_warmup_steps"))
    if steps > 0:
        items["lr_warmup_steps"] = int(steps)
    elif percent != 0:
        items["lr_warmup_steps"] = percent / 100
    else:
        items.pop("lr_warmup_steps", None)
        return
    if _text(items.get("lr_scheduler") or "").lower() == "adafactor" or _adafactor_schedule(items):
        given = f"lr_warmup_steps {int(steps)}" if steps > 0 else f"lr_warmup {percent:g} (%)"
        problems.append(
            f"{where}: {given} with kohya's adafactor schedule (lr_scheduler adafactor, or Adafactor with "
            "relative_step): it has no warmup and sd-scripts stops on one ('does not require num_warmup_steps'), "
            "whatever the GUI passes; set lr_warmup and lr_warmup_steps to 0"
        )


def _adafactor_schedule(items: dict[str, Any]) -> bool:
    """sd-scripts get_optimizer: Adafactor with relative_step (its default there; warmup_init turns it on)
    replaces the chosen lr_scheduler by its adafactor schedule."""
    from .optim import adafactor_relative_step

    if _text(items.get("optimizer_type") or "").lower() != "adafactor":
        return False
    args = _args_text(items.get("optimizer_args") or "")
    return adafactor_relative_step("adafactor", args if "relative_step" in args else f"{args} relative_step=True")


#: class_basic_training.py: the "Max train steps" and "Epoch" widgets' defaults, which a config that does not
#: name the field keeps when the GUI loads it (a GUI config.toml's basic.max_train_steps changes the first)
_GUI_MAX_TRAIN_STEPS, _GUI_EPOCH = 1600, 1


def _gui_int(value: Any, fallback: int) -> int:
    """common_gui.update_my_data, run on every config the GUI loads: ``int(value)``, ``fallback`` when that
    fails ("" included)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return fallback


def _length(items: dict[str, Any], tab: str, where: str, notes: list[str], problems: list[str]) -> None:
    """The run's length as the GUI passes it (lora_gui.py, dreambooth_gui.py, textual_inversion_gui.py,
    finetune_gui.py train_model). A config without max_train_steps keeps the widget's 1600; "" loads as 0, and
    only then, without a dataset_config, does the GUI derive max_train_steps from ``epoch`` (images x repeats
    / batch / accumulation x epoch, doubled with reg images), which sdcore reads as that many epochs. The
    GUI never passes ``epoch`` itself: with a given max_train_steps it is unused, with a dataset_config and no
    steps sd-scripts trains its default 1600. The fine-tuning tab halves the steps with flip_aug (no
    dataset_config). lr_scheduler_num_cycles "" loads as 1 (the epoch count only for a field emptied in the
    running GUI); the fine-tuning tab does not pass it."""
    raw = items.get("max_train_steps")
    steps = _GUI_MAX_TRAIN_STEPS if raw is None else _gui_int(raw, 0)
    raw_epoch = items.pop("epoch", None)
    epoch = _GUI_EPOCH if raw_epoch is None else _gui_int(raw_epoch, 0)
    dataset_config = _on(items.get("dataset_config"))
    from_epochs = steps == 0 and not dataset_config and epoch > 0
    if from_epochs:
        items["epoch"] = epoch  # --epochs, unless max_train_epochs is set (translated with the kohya names)
        items.pop("max_train_steps", None)
    else:
        items["max_train_steps"] = steps if steps != 0 else _GUI_MAX_TRAIN_STEPS
        if raw is None and not _number(items.get("max_train_epochs")):
            notes.append(
                f"max_train_steps is not in the file: the GUI's default {_GUI_MAX_TRAIN_STEPS} steps "
                f"(epoch {epoch} sets the length only with max_train_steps 0)"
            )
    if tab == "finetune" and _on(items.get("flip_aug")) and not dataset_config:
        if not from_epochs:
            items["max_train_steps"] = -(-items["max_train_steps"] // 2)
            notes.append(f"flip_aug: the fine-tuning tab halves max_train_steps (to {items['max_train_steps']})")
        elif epoch % 2 == 0:
            items["epoch"] = epoch // 2
            notes.append(f"flip_aug: the fine-tuning tab halves the steps of epoch {epoch}: {epoch // 2} epochs")
        elif not _number(items.get("max_train_epochs")):
            problems.append(
                f"{where}: flip_aug with epoch {epoch}: the fine-tuning tab trains half of {epoch} epochs' steps, "
                "which sdcore cannot count ahead; set max_train_steps or max_train_epochs"
            )
    if tab == "finetune":
        items.pop("lr_scheduler_num_cycles", None)
    elif "lr_scheduler_num_cycles" in items:
        items["lr_scheduler_num_cycles"] = _gui_int(items["lr_scheduler_num_cycles"], 1)


def _additional(text: str, where: str, problems: list[str]) -> dict[str, Any]:
    """The GUI's "additional_parameters": sd-scripts command-line options it appends after ``--config_file``,
    so they win over the config's values (``--name value``, ``--name=value``, ``--flag``, ``--name a b``)."""
    from .kohya import MULTI_VALUE

    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        problems.append(f"{where}: additional_parameters {text!r}: {exc}")
        return {}
    parsed: dict[str, list[str]] = {}
    name = ""
    for token in tokens:
        if token.startswith("--"):
            name, _, value = token[2:].partition("=")
            parsed[name] = [value] if value else []
        elif name:
            parsed[name].append(token)
        else:
            problems.append(f"{where}: additional_parameters: {token!r} does not follow an --option")
    out: dict[str, Any] = {}
    for key, values in parsed.items():
        if key in MULTI_VALUE:
            out[key] = values
        else:
            out[key] = True if not values else values[0] if len(values) == 1 else values
    return out


def gui_preset(
    data: dict[str, Any], where: str, fields: Iterable[str] = ()
) -> tuple[dict[str, Any], list[str], list[str]]:
    """sd-scripts-named items, notes and problems for a kohya_ss GUI config's fields, as the GUI launches
    them. ``fields`` (the options of the method it was given to) tells a config of another tab."""
    items = dict(data)
    notes: list[str] = []
    problems: list[str] = []
    tab = gui_tab(items)
    present = set(fields)
    method = TABS[tab]
    if present and METHOD_FIELD[method] not in present:
        problems.append(f"{where}: a kohya_ss GUI {tab} config: run it with `sdcore train {method}`")
    family = _family(items, where, problems)
    _widget_values(items, tab, notes)
    if tab == "lora":
        _lora_tab(items, family, where, notes, problems)
    else:
        for key in _NETWORK_FIELDS & items.keys():
            items.pop(key)  # fields of the LoRA tab some other tabs save too
        items.pop("noise_offset_type", None)  # these tabs pass it, but sd-scripts reads no such option
        if tab == "finetune":
            _finetune_tab(items, notes)
        if tab in ("dreambooth", "finetune"):
            _te_rates(items, family)
            if tab == "dreambooth":
                # dreambooth_gui.py has no train_text_encoder widget: for SDXL it trains the text encoders when
                # a TE1 or TE2 rate is above 0 (a saved field is not read), for the others it passes none
                items.pop("train_text_encoder", None)
                if family == SDXL:
                    rates = (_number(items.get(key)) for key in ("learning_rate_te1", "learning_rate_te2"))
                    items["train_text_encoder"] = any(rate > 0 for rate in rates)
                notes.append("read as a kohya_ss GUI preset (DreamBooth tab)")
        if tab == "ti":
            _ti_tab(items)
            notes.append("read as a kohya_ss GUI preset (textual inversion tab)")
    _family_fields(items, "finetune" if tab == "finetune" else tab, family, notes)
    if _on(items.get("train_inpainting")):  # kohya's random masks: --inpainting-masks random (kohya.ALIASES)
        items["train_inpainting"] = True
        cached = [k for k in ("cache_latents", "cache_latents_to_disk") if _on(items.pop(k, None))]
        if cached:  # the GUI greys them out and never passes them with --train_inpainting (kohya_ss #3527)
            notes.append(f"train_inpainting: {' and '.join(cached)} left out, as the kohya_ss GUI leaves them out")
    else:
        items.pop("train_inpainting", None)
    for old, new in _OLD_NAMES.items():
        if old in items and new not in items:
            items[new] = items.pop(old)
    if "optimizer" in items:
        items["optimizer_type"] = items.pop("optimizer")
    if "max_resolution" in items:
        items["resolution"] = items.pop("max_resolution")
    _warmup(items, where, problems)
    _length(items, tab, where, notes, problems)
    extra = _additional(_text(items.pop("additional_parameters", "") or ""), where, problems)
    if extra:
        notes.append(f"additional_parameters read as sd-scripts options: {', '.join(extra)}")
        items.update(extra)
    attention = items.pop("xformers", None)
    if isinstance(attention, str) and attention.lower() in ("xformers", "sdpa"):
        items[attention.lower()] = True
    elif attention is True:
        items["xformers"] = True
    for key in [k for k in items if k in GUI_ONLY]:
        items.pop(key)
    return items, notes, problems


__all__ = [
    "GUI_LORA_TYPES",
    "GUI_ONLY",
    "METHOD_FIELD",
    "OTHER_FAMILIES",
    "TABS",
    "gui_preset",
    "gui_tab",
    "is_gui_preset",
]

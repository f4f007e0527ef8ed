"""A kohya sd-scripts command file (``train.sh``, ``train.bat``, ``train.ps1``) as ``--config``.

kohya's own docs and most guides give a run as one command, ``accelerate launch flux_train_network.py
--pretrained_model_name_or_path=... --network_dim=16 ...``, which users keep in a shell file (on Windows a ``.bat``
or ``.ps1``). ``sdcore train lora --config train.sh`` reads that file: :mod:`.shell_command` finds the command and its
words; here the words after the kohya script become kohya options exactly as ``sdcore train lora --network_dim 16
...`` on the command line would give them (the same flag and several-value rules, :data:`.kohya.MULTI_VALUE`), so
:func:`sdcore.train.config.load_options` translates them with the one kohya translation (:mod:`.kohya`), kohya's
defaults included. A ``--config_file`` in the command is read beneath the command's arguments (kohya parses the
command line over the TOML's values).

The script decides the sdcore method (``train_network.py`` is a LoRA run, ``sdxl_train.py`` a full fine-tune,
``train_textual_inversion.py`` an embedding) and the model family kohya would load; a mismatch is a problem found
before any model loads, as kohya would fail on it. Scripts sdcore does not run (ControlNet, LLLite, XTI, the model
families it does not train, generation) are refused by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .shell_command import COMMAND_SUFFIXES, ambiguous_option, command_lines, is_option_word, resolve_option

#: kohya's training scripts: the sdcore method that runs them and the family kohya loads in each
#: (None: SD1.x/SD2.x, kohya's scripts without a prefix)
SCRIPTS: dict[str, tuple[str, str | None]] = {
    "train_network.py": ("lora", None), "sdxl_train_network.py": ("lora", "sdxl"),
    "sd3_train_network.py": ("lora", "sd3"), "flux_train_network.py": ("lora", "flux"),
    "train_db.py": ("dreambooth", None), "fine_tune.py": ("dreambooth", None), "sdxl_train.py": ("dreambooth", "sdxl"),
    "sd3_train.py": ("dreambooth", "sd3"), "flux_train.py": ("dreambooth", "flux"),
    "train_textual_inversion.py": ("ti", None), "sdxl_train_textual_inversion.py": ("ti", "sdxl"),
}  # fmt: skip
#: the options each kohya script's argparse defines: the option strings of the parser its ``setup_parser()`` builds
#: (names only), read from kohya-ss/sd-scripts at 48d368f (2026-02-16) by building each parser. sdcore's kohya tables
#: (:mod:`.kohya`) are not this set: they hold one union for every script and names of other tools, and miss names
#: sdcore passes through (``--vae``, ``--t5xxl``). argparse resolves a prefix against the whole set of the script
#: (``allow_abbrev``), so this is what a prefix is resolved against: ``--network_di`` is ``--network_dim`` in
#: train_network.py; in train_db.py, which has no network options, it is not an argument.
_COMMON_ARGS = (
    "adaptive_noise_scale alpha_mask async_upload bucket_no_upscale bucket_reso_steps cache_info cache_latents "
    "cache_latents_to_disk caption_extension caption_extention caption_prefix caption_separator caption_suffix "
    "clip_skip color_aug config_file console_log_file console_log_level console_log_simple dataset_class "
    "dataset_config ddp_gradient_as_bucket_view ddp_static_graph ddp_timeout debiased_estimation_loss "
    "debug_dataset deepspeed dynamo_backend enable_bucket enable_wildcard face_crop_aug_range flip_aug "
    "fp16_master_weights_and_gradients fp8_base full_bf16 full_fp16 fused_backward_pass "
    "gradient_accumulation_steps gradient_checkpointing help highvram huber_c huber_scale huber_schedule "
    "huggingface_path_in_repo huggingface_repo_id huggingface_repo_type huggingface_repo_visibility "
    "huggingface_token ip_noise_gamma ip_noise_gamma_random_strength keep_tokens keep_tokens_separator "
    "learning_rate log_config log_prefix log_tracker_config log_tracker_name log_with logging_dir loss_type "
    "lowram lr_decay_steps lr_scheduler lr_scheduler_args lr_scheduler_min_lr_ratio lr_scheduler_num_cycles "
    "lr_scheduler_power lr_scheduler_timescale lr_scheduler_type lr_warmup_steps max_bucket_reso "
    "max_data_loader_n_workers max_grad_norm max_timestep max_token_length max_train_epochs max_train_steps "
    "mem_eff_attn metadata_author metadata_description metadata_is_negative_embedding metadata_license "
    "metadata_merged_from metadata_preprocessor metadata_tags metadata_thumbnail metadata_title "
    "metadata_trigger_phrase metadata_usage_hint min_bucket_reso min_snr_gamma min_timestep mixed_precision "
    "multires_noise_discount multires_noise_iterations noise_offset noise_offset_random_strength "
    "offload_optimizer_device offload_optimizer_nvme_path offload_param_device offload_param_nvme_path "
    "optimizer_args optimizer_type output_config output_dir output_name persistent_data_loader_workers "
    "pretrained_model_name_or_path random_crop resize_interpolation resolution resume resume_from_huggingface "
    "sample_at_first sample_every_n_epochs sample_every_n_steps sample_prompts sample_sampler save_every_n_epochs "
    "save_every_n_steps save_last_n_epochs save_last_n_epochs_state save_last_n_steps save_last_n_steps_state "
    "save_model_as save_n_epoch_ratio save_precision save_state save_state_on_train_end save_state_to_huggingface "
    "scale_v_pred_loss_like_noise_pred sdpa secondary_separator seed shuffle_caption skip_cache_check "
    "token_warmup_min token_warmup_step tokenizer_cache_dir torch_compile train_batch_size train_data_dir "
    "use_8bit_adam use_lion_optimizer v2 v_parameterization v_pred_like_loss vae vae_batch_size wandb_api_key "
    "wandb_run_name xformers zero3_init_flag zero3_save_16bit_model zero_stage zero_terminal_snr "
)
SCRIPT_ARGS: dict[str, frozenset[str]] = {
    "train_network.py": frozenset((_COMMON_ARGS + (
        "base_weights base_weights_multiplier caption_dropout_every_n_epochs caption_dropout_rate "
        "caption_tag_dropout_rate conditioning_data_dir cpu_offload_checkpointing dataset_repeats "
        "dim_from_weights fp8_base_unet in_json initial_epoch initial_step masked_loss max_validation_steps "
        "network_alpha network_args network_dim network_dropout network_module network_train_text_encoder_only "
        "network_train_unet_only network_weights no_half_vae no_metadata prior_loss_weight reg_data_dir "
        "scale_weight_norms skip_until_initial_step text_encoder_lr training_comment unet_lr "
        "validate_every_n_epochs validate_every_n_steps validation_seed validation_split weighted_captions "
    )).split()),
    "sdxl_train_network.py": frozenset((_COMMON_ARGS + (
        "base_weights base_weights_multiplier cache_text_encoder_outputs cache_text_encoder_outputs_to_disk "
        "caption_dropout_every_n_epochs caption_dropout_rate caption_tag_dropout_rate conditioning_data_dir "
        "cpu_offload_checkpointing dataset_repeats dim_from_weights disable_mmap_load_safetensors fp8_base_unet "
        "in_json initial_epoch initial_step masked_loss max_validation_steps network_alpha network_args "
        "network_dim network_dropout network_module network_train_text_encoder_only network_train_unet_only "
        "network_weights no_half_vae no_metadata prior_loss_weight reg_data_dir scale_weight_norms "
        "skip_until_initial_step text_encoder_lr training_comment unet_lr validate_every_n_epochs "
        "validate_every_n_steps validation_seed validation_split weighted_captions "
    )).split()),
    "sd3_train_network.py": frozenset((_COMMON_ARGS + (
        "apply_lg_attn_mask apply_t5_attn_mask base_weights base_weights_multiplier blocks_to_swap "
        "cache_text_encoder_outputs cache_text_encoder_outputs_to_disk caption_dropout_every_n_epochs "
        "caption_dropout_rate caption_tag_dropout_rate clip_g clip_g_dropout_rate clip_l clip_l_dropout_rate "
        "conditioning_data_dir cpu_offload_checkpointing dataset_repeats dim_from_weights "
        "disable_mmap_load_safetensors enable_scaled_pos_embed fp8_base_unet in_json initial_epoch initial_step "
        "logit_mean logit_std masked_loss max_validation_steps mode_scale network_alpha network_args network_dim "
        "network_dropout network_module network_train_text_encoder_only network_train_unet_only network_weights "
        "no_half_vae no_metadata pos_emb_random_crop_rate prior_loss_weight reg_data_dir save_clip save_t5xxl "
        "scale_weight_norms skip_until_initial_step t5_dropout_rate t5xxl t5xxl_device t5xxl_dtype "
        "t5xxl_max_token_length text_encoder_batch_size text_encoder_lr training_comment training_shift unet_lr "
        "validate_every_n_epochs validate_every_n_steps validation_seed validation_split weighted_captions "
        "weighting_scheme "
    )).split()),
    "flux_train_network.py": frozenset((_COMMON_ARGS + (
        "ae apply_t5_attn_mask base_weights base_weights_multiplier blocks_to_swap cache_text_encoder_outputs "
        "cache_text_encoder_outputs_to_disk caption_dropout_every_n_epochs caption_dropout_rate "
        "caption_tag_dropout_rate clip_l conditioning_data_dir controlnet_model_name_or_path "
        "cpu_offload_checkpointing dataset_repeats dim_from_weights disable_mmap_load_safetensors "
        "discrete_flow_shift fp8_base_unet guidance_scale in_json initial_epoch initial_step logit_mean logit_std "
        "masked_loss max_validation_steps mode_scale model_prediction_type model_type network_alpha network_args "
        "network_dim network_dropout network_module network_train_text_encoder_only network_train_unet_only "
        "network_weights no_half_vae no_metadata prior_loss_weight reg_data_dir scale_weight_norms sigmoid_scale "
        "skip_until_initial_step split_mode t5xxl t5xxl_max_token_length text_encoder_batch_size text_encoder_lr "
        "timestep_sampling training_comment unet_lr validate_every_n_epochs validate_every_n_steps "
        "validation_seed validation_split weighted_captions weighting_scheme "
    )).split()),
    "train_db.py": frozenset((_COMMON_ARGS + (
        "caption_dropout_every_n_epochs caption_dropout_rate caption_tag_dropout_rate conditioning_data_dir "
        "learning_rate_te masked_loss no_half_vae no_token_padding prior_loss_weight reg_data_dir "
        "stop_text_encoder_training use_safetensors weighted_captions "
    )).split()),
    "fine_tune.py": frozenset((_COMMON_ARGS + (
        "caption_dropout_every_n_epochs caption_dropout_rate caption_tag_dropout_rate dataset_repeats "
        "diffusers_xformers in_json learning_rate_te no_half_vae train_text_encoder use_safetensors "
        "weighted_captions "
    )).split()),
    "sdxl_train.py": frozenset((_COMMON_ARGS + (
        "block_lr cache_text_encoder_outputs cache_text_encoder_outputs_to_disk caption_dropout_every_n_epochs "
        "caption_dropout_rate caption_tag_dropout_rate conditioning_data_dir dataset_repeats diffusers_xformers "
        "disable_mmap_load_safetensors fused_optimizer_groups in_json learning_rate_te1 learning_rate_te2 "
        "masked_loss no_half_vae reg_data_dir train_text_encoder use_safetensors weighted_captions "
    )).split()),
    "sd3_train.py": frozenset((_COMMON_ARGS + (
        "apply_lg_attn_mask apply_t5_attn_mask blocks_to_swap blockwise_fused_optimizers "
        "cache_text_encoder_outputs cache_text_encoder_outputs_to_disk caption_dropout_every_n_epochs "
        "caption_dropout_rate caption_tag_dropout_rate clip_g clip_g_dropout_rate clip_l clip_l_dropout_rate "
        "conditioning_data_dir dataset_repeats disable_mmap_load_safetensors enable_scaled_pos_embed "
        "fused_optimizer_groups in_json learning_rate_te1 learning_rate_te2 learning_rate_te3 logit_mean "
        "logit_std masked_loss mode_scale num_last_block_to_freeze pos_emb_random_crop_rate reg_data_dir "
        "save_clip save_t5xxl skip_latents_validity_check t5_dropout_rate t5xxl t5xxl_device t5xxl_dtype "
        "t5xxl_max_token_length text_encoder_batch_size train_t5xxl train_text_encoder training_shift "
        "use_safetensors use_t5xxl_cache_only weighted_captions weighting_scheme "
    )).split()),
    "flux_train.py": frozenset((_COMMON_ARGS + (
        "ae apply_t5_attn_mask blocks_to_swap blockwise_fused_optimizers cache_text_encoder_outputs "
        "cache_text_encoder_outputs_to_disk caption_dropout_every_n_epochs caption_dropout_rate "
        "caption_tag_dropout_rate clip_l conditioning_data_dir controlnet_model_name_or_path "
        "cpu_offload_checkpointing dataset_repeats disable_mmap_load_safetensors discrete_flow_shift "
        "double_blocks_to_swap fused_optimizer_groups guidance_scale in_json logit_mean logit_std masked_loss "
        "mem_eff_save mode_scale model_prediction_type model_type reg_data_dir sigmoid_scale "
        "single_blocks_to_swap skip_latents_validity_check t5xxl t5xxl_max_token_length text_encoder_batch_size "
        "timestep_sampling use_safetensors weighted_captions weighting_scheme "
    )).split()),
    "train_textual_inversion.py": frozenset((_COMMON_ARGS + (
        "conditioning_data_dir dataset_repeats in_json init_word masked_loss no_half_vae num_vectors_per_token "
        "prior_loss_weight reg_data_dir token_string use_object_template use_style_template weights "
    )).split()),
    "sdxl_train_textual_inversion.py": frozenset((_COMMON_ARGS + (
        "conditioning_data_dir dataset_repeats disable_mmap_load_safetensors in_json init_word masked_loss "
        "no_half_vae num_vectors_per_token prior_loss_weight reg_data_dir token_string use_object_template "
        "use_style_template weights "
    )).split()),
}  # fmt: skip
_OTHER_FAMILY = "a model family sdcore does not train"
#: kohya scripts sdcore does not run, with the reason
REFUSED_SCRIPTS: dict[str, str] = {
    **dict.fromkeys(("train_controlnet.py", "train_control_net.py", "sdxl_train_control_net.py",
                     "flux_train_control_net.py"), "ControlNet training, which sdcore does not have"),
    **dict.fromkeys(("sdxl_train_control_net_lllite.py", "sdxl_train_control_net_lllite_old.py"),
                    "ControlNet-LLLite training, which sdcore does not have"),
    "train_textual_inversion_XTI.py": "Extended Textual Inversion (XTI), which sdcore does not train: "
    "sdcore train ti trains a plain embedding",
    **dict.fromkeys(("anima_train.py", "anima_train_network.py", "lumina_train.py", "lumina_train_network.py",
                     "hunyuan_image_train_network.py"), _OTHER_FAMILY),
    **dict.fromkeys(("gen_img.py", "gen_img_diffusers.py", "sdxl_gen_img.py", "sdxl_minimal_inference.py",
                     "sd3_minimal_inference.py", "flux_minimal_inference.py", "lumina_minimal_inference.py",
                     "anima_minimal_inference.py", "hunyuan_image_minimal_inference.py"),
                    "image generation, not training: use sdcore generate"),
}  # fmt: skip
_METHOD_NAMES = {"lora": "a LoRA/LyCORIS network", "dreambooth": "a full fine-tune", "ti": "a textual inversion"}
_FAMILY_NAMES = {None: "SD1.x/SD2.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5", "flux": "FLUX.1/Chroma"}


@dataclass
class KohyaCommand:
    """The kohya options of a command file (``options``: kohya or sdcore names -> value, as the command line gives
    them), the script that runs them, and notes and problems met while reading."""

    script: str
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _script_at(words: list[str]) -> int | None:
    for i, word in enumerate(words):
        name = Path(word.replace("\\", "/")).name
        if name in SCRIPTS or name in REFUSED_SCRIPTS:
            return i
    return None


def read_command(path: str | os.PathLike[str], fields: list[str]) -> KohyaCommand | None:
    """The kohya command in ``path`` (for a method with option names ``fields``), or None when the file runs no
    kohya script (then other readers try it)."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in (*COMMAND_SUFFIXES, ".txt", "") or not p.is_file():
        return None
    try:
        lines = list(command_lines(p))
    except ConfigError:
        return None  # the diffusers reader reports an unreadable shell file
    for line in lines:
        at = _script_at(line.words)
        if at is None:
            continue
        script = Path(line.words[at].replace("\\", "/")).name
        command = KohyaCommand(script)
        where = f"{p}: {script}"
        if script in REFUSED_SCRIPTS:
            command.problems.append(f"{where}: {REFUSED_SCRIPTS[script]}")
            return command
        if line.missing:
            command.problems.append(f"{p}: variable(s) not set: {', '.join(sorted(set(line.missing)))}")
        if line.unsupported:
            command.problems.append(f"{p}: shell expansion(s) sdcore does not run: {', '.join(line.unsupported)} "
                                    "(write the value)")  # fmt: skip
        _check_method(script, fields, where, p, command)
        command.notes += line.joined_note(p) + _launcher_notes(line.words[:at], where)
        given = _parse(line.words[at + 1 :], where, command)
        if given.get("output_config") and given.get("config_file"):  # train_util.py read_config_from_file
            command.problems.append(f"{where}: --output_config with --config_file: kohya writes the arguments to "
                                    "that file and exits without training; remove --output_config to train")  # fmt: skip
        base = _config_file(given.pop("config_file", None), p, where, command)
        command.options = {**base, **given}
        return command
    return None


def _check_method(script: str, fields: list[str], where: str, path: Path, command: KohyaCommand) -> None:
    method, _family = SCRIPTS[script]
    present = set(fields)
    running = "lora" if "rank" in present else "ti" if "vectors" in present else "dreambooth"
    if running != method:
        command.problems.append(f"{where} trains {_METHOD_NAMES[method]}: run it with "
                                f"sdcore train {method} --config {path}")  # fmt: skip


def script_family_problem(script: str, family: str | None, model: str, where: str) -> str | None:
    """The script loads another family than the model's (kohya fails loading it), or None."""
    wanted = SCRIPTS.get(script, (None, None))[1]
    if family is None or script not in SCRIPTS:
        return None
    fits = {
        None: family.startswith(("sd1", "sd2")),
        "sdxl": family.startswith("sdxl"),
        "sd3": family.startswith("sd3"),
        "flux": family.startswith(("flux", "chroma")),
    }[wanted]
    if fits:
        return None
    return f"{where}: {script} trains {_FAMILY_NAMES[wanted]} models; {model} is a {family} model"


def _launcher_notes(words: list[str], where: str) -> list[str]:
    """``accelerate launch --num_processes 2 --mixed_precision bf16 ...``: what the launcher's options mean here."""
    notes: list[str] = []
    options: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            following = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else ""
            options[name.replace("-", "_")] = value if eq else following
    counts = (options.get(n, "1") for n in ("num_processes", "num_machines"))
    several = "multi_gpu" in options or any(c and (not c.isdigit() or int(c) > 1) for c in counts)
    if several:  # the kohya_ss GUI writes --num_processes 1 --num_machines 1 for every run: one process
        count = options.get("num_processes", "")
        n = count if count.isdigit() and int(count) > 1 else "N"
        # kohya's get_scheduler_fix counts num_processes scheduler steps per optimizer step (accelerate's
        # AcceleratedScheduler): a ratio stays a ratio, a whole number of steps shrinks by the process count
        notes.append(f"{where}: accelerate launch's process options: run sdcore under `accelerate launch` (or "
                     "--num-processes) for several processes; a whole-number --lr_warmup_steps/--lr_decay_steps lasts "
                     f"1/{n} as many optimizer steps in kohya's {n}-process run (its scheduler steps once per "
                     "process), in sdcore the number given")  # fmt: skip
    if "mixed_precision" in options:
        notes.append(f"{where}: accelerate launch --mixed_precision has no effect (kohya hands its own "
                     "--mixed_precision, default no, to accelerate); give it to the script")  # fmt: skip
    return notes


def _parse(words: list[str], where: str, command: KohyaCommand) -> dict[str, Any]:
    """The words after the script as kohya's argparse reads them: ``--name value`` / ``--name=value``, a
    store_true flag without a value, several values after a several-value option (``--network_args a=1 b=2``), a
    unique prefix of one of the script's options (:data:`SCRIPT_ARGS`) as that option (``--network_di 8``)."""
    from .kohya import MULTI_VALUE, flag_names

    flags = flag_names()
    out: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("--"):
            command.problems.append(f"{where}: {word!r}: not an argument (kohya's argparse stops with 'unrecognized "
                                    "arguments')")  # fmt: skip
            continue
        name, eq, text = word[2:].partition("=")
        name, candidates = resolve_option(name, SCRIPT_ARGS.get(command.script))
        if candidates:  # argparse stops here; the values are skipped, the name is reported once
            command.problems.append(ambiguous_option(where, name, candidates, command.script))
            while not eq and i < len(words) and not is_option_word(words[i]):
                i += 1
            continue
        values: list[str] = [text] if eq else []
        while not eq and i < len(words) and not is_option_word(words[i]):
            values.append(words[i])
            i += 1
            if name not in MULTI_VALUE:
                break
        value: Any
        if name in MULTI_VALUE:
            value = values
        elif name in flags:
            value = True
            if values:
                command.problems.append(f"{where}: --{name} is a flag and takes no value (got {values[0]!r})")
        elif values:
            value = values[0]
        else:
            command.problems.append(f"{where}: --{name} needs a value")
            continue
        if name in out:  # argparse keeps the last; a run file with a duplicate is most often a slip
            command.notes.append(f"{where}: --{name} is given twice: the last one counts (as in argparse)")
        out[name] = value
    return out


def _config_file(value: Any, path: Path, where: str, command: KohyaCommand) -> dict[str, Any]:
    """The options of the command's ``--config_file`` (kohya adds ``.toml`` when the name lacks it); a relative
    name is looked up from the working directory, then beside the command file."""
    if value is None:
        return {}
    from .config import read_config_file

    name = str(value)
    if not name.endswith(".toml"):
        name += ".toml"
    found = Path(name).expanduser()
    if not found.is_absolute() and not found.is_file() and (path.parent / found).is_file():
        found = path.parent / found
    if not found.is_file():
        command.problems.append(f"{where}: --config_file {name}: no such file")
        return {}
    command.notes.append(f"{where}: --config_file {found}: its options read beneath the command's (as in kohya)")
    return read_config_file(found)

"""The kohya name tables: :data:`ALIASES`, :data:`COMPOSITE`, :data:`IGNORED`, :data:`UNSUPPORTED` (with
:data:`OTHER_SCRIPTS`), :data:`KOHYA_DEFAULTS`, :data:`KOHYA_FAMILY_DEFAULTS` and the :class:`Translation` they fill.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from .values import (
    _OFF,
    _args_text,
    _float_list,
    _flow_sampling,
    _huber_schedule,
    _is_off,
    _loss_type,
    _model_prediction_type,
    _off_is_zero,
    _optimizer,
    _pair_text,
    _path_list,
    _precision,
    _ratio,
    _scheduler,
    _steps_or_ratio,
    _te_rates,
    _unless_zero,
    _v_parameterization,
    _weighting_scheme,
    _zero_is_a_value,
    resolution_value,
)


@dataclass(frozen=True)
class Alias:
    """A kohya option that is one sdcore option."""

    target: str
    convert: Callable[[Any], Any] | None = None
    flag: bool = False  # store_true on kohya's command line
    methods: str = ""  # for the "kohya names" help: which kohya script has it, when not all
    #: an option only the methods of ``methods`` have, when the target is shared with others (LoRA has
    #: ``stop_text_encoder_at`` too, but kohya's train_network.py has no --stop_text_encoder_training)
    only_with: str = ""

    def applies(self, present: Collection[str]) -> bool:
        """Whether a method with the option fields ``present`` takes this kohya name."""
        return self.target in present and (not self.only_with or self.only_with in present)


def _a(
    target: str,
    convert: Callable[[Any], Any] | None = None,
    *,
    flag: bool = False,
    methods: str = "",
    only_with: str = "",
) -> Alias:
    return Alias(target, convert, flag, methods, only_with)


ALIASES: dict[str, Alias] = {
    # model and data
    "pretrained_model_name_or_path": _a("model"),
    # model parts (sd3_train_network.py: clip_l clip_g t5xxl vae; flux_train_network.py: clip_l t5xxl ae)
    "clip_l": _a("clip_l"),
    "clip_g": _a("clip_g"),
    "ae": _a("vae"),
    "train_data_dir": _a("data"),
    "dataset_config": _a("data"),
    "reg_data_dir": _a("reg_data"),
    "in_json": _a("metadata_file"),
    "dataset_repeats": _a("dataset_repeats"),
    "resolution": _a("resolution", resolution_value),
    "caption_extension": _a("caption_extension"),
    "caption_extention": _a("caption_extension"),  # kohya keeps the old misspelling
    "shuffle_caption": _a("shuffle_caption", flag=True),
    "keep_tokens": _a("keep_tokens"),
    "caption_dropout_rate": _a("caption_dropout"),
    "caption_tag_dropout_rate": _a("tag_dropout"),
    "caption_dropout_every_n_epochs": _a("caption_dropout_every_n_epochs"),
    "caption_prefix": _a("caption_prefix"),
    "caption_suffix": _a("caption_suffix"),
    "secondary_separator": _a("secondary_separator"),
    "caption_separator": _a("caption_separator"),
    "keep_tokens_separator": _a("keep_tokens_separator"),
    "enable_wildcard": _a("enable_wildcard", flag=True),
    "token_warmup_min": _a("token_warmup_min"),
    "token_warmup_step": _a("token_warmup_step"),
    "weighted_captions": _a("weighted_captions", flag=True),
    "flip_aug": _a("flip", flag=True),
    "resize_interpolation": _a("resize_interpolation"),
    "random_crop": _a("random_crop", flag=True),
    "face_crop_aug_range": _a("face_crop_aug_range", _pair_text),
    "color_aug": _a("color_aug", flag=True),
    "alpha_mask": _a("alpha_mask", flag=True),
    "masked_loss": _a("masked_loss", flag=True),
    "conditioning_data_dir": _a("conditioning_data_dir"),
    "enable_bucket": _a("buckets", flag=True),
    "min_bucket_reso": _a("min_bucket_reso"),
    "max_bucket_reso": _a("max_bucket_reso"),
    "bucket_reso_steps": _a("bucket_step"),
    "bucket_no_upscale": _a("bucket_no_upscale", flag=True),
    "debug_dataset": _a("debug_dataset", flag=True),
    "prior_loss_weight": _a("prior_loss_weight"),
    "cache_latents": _a("cache_latents", flag=True),
    # sd-scripts v0.10.4+ (PRs #2309/#2318): an inpainting UNet trained on random masks drawn each step
    # (:mod:`sdcore.train.random_masks`); kohya refuses latent caching with it, as the pre-flight does
    "train_inpainting": _a("inpainting_masks", lambda on: "dataset" if _is_off(on, _OFF) else "random", flag=True),
    "cache_latents_to_disk": _a("cache_latents_to_disk", flag=True),
    "cache_text_encoder_outputs": _a("cache_text_encoder_outputs", flag=True),
    "cache_text_encoder_outputs_to_disk": _a("cache_text_encoder_outputs_to_disk", flag=True),
    # schedule
    "max_train_steps": _a("max_steps"),
    "max_train_epochs": _a("epochs"),
    "train_batch_size": _a("batch_size"),
    "learning_rate": _a("lr"),
    "lr_scheduler": _a("lr_scheduler", _scheduler),
    "lr_warmup_steps": _a("lr_warmup_steps", _steps_or_ratio),
    "lr_scheduler_power": _a("lr_power"),
    "lr_scheduler_num_cycles": _a("lr_cycles", int),
    "lr_scheduler_min_lr_ratio": _a("lr_min_ratio", float),
    "lr_decay_steps": _a("lr_decay_steps", _steps_or_ratio),
    "lr_scheduler_timescale": _a("lr_timescale", int),
    "lr_scheduler_type": _a("lr_scheduler_type"),
    "lr_scheduler_args": _a("lr_scheduler_args", _args_text),
    "optimizer_type": _a("optimizer", _optimizer),
    "optimizer_args": _a("optimizer_args", _args_text),
    "max_grad_norm": _a("max_grad_norm"),
    "gradient_accumulation_steps": _a("gradient_accumulation"),
    "fused_backward_pass": _a("fused_backward_pass", flag=True),  # sdxl/sd3/flux_train.py (full fine-tuning)
    "fused_optimizer_groups": _a("fused_optimizer_groups", int),  # sdxl_train.py (0: off, as kohya_ss writes)
    "blockwise_fused_optimizers": _a("blockwise_fused_optimizers", flag=True),  # sd3/flux_train.py
    "gradient_checkpointing": _a("gradient_checkpointing", flag=True),
    "mixed_precision": _a("mixed_precision", _precision),
    "full_bf16": _a("full_bf16", flag=True),
    "full_fp16": _a("full_fp16", flag=True),
    "fp8_base": _a("fp8_base", flag=True),
    # sdcore's --fp8-base is the denoiser's weights only; kohya's fp8_base alone also stores the text encoders in
    # fp8 (kohya_text_encoder_storage, once the family is known), fp8_base_unet keeps them in the compute dtype
    "fp8_base_unet": _a("fp8_base", flag=True),
    "blocks_to_swap": _a("blocks_to_swap"),
    # accelerate's DDP settings (train_util.prepare_accelerator); kohya: a timeout of 0 is accelerate's default
    "ddp_timeout": _a("ddp_timeout", lambda v: _unless_zero(int(v))),
    "ddp_static_graph": _a("ddp_static_graph", flag=True),
    "ddp_gradient_as_bucket_view": _a("ddp_gradient_as_bucket_view", flag=True),
    "seed": _a("seed"),
    "clip_skip": _a("clip_skip"),
    "noise_offset": _a("noise_offset"),
    "min_snr_gamma": _a("min_snr_gamma"),
    "loss_type": _a("loss_type", _loss_type),
    "huber_schedule": _a("huber_schedule", _huber_schedule),
    "huber_c": _a("huber_c"),
    "huber_scale": _a("huber_scale"),
    "debiased_estimation_loss": _a("debiased_estimation_loss", flag=True),
    "scale_v_pred_loss_like_noise_pred": _a("scale_v_pred_loss_like_noise_pred", flag=True),
    "v_pred_like_loss": _a("v_pred_like_loss", _off_is_zero),
    # noise and timestep draws (train_util.get_noise_noisy_latents_and_timesteps)
    "noise_offset_random_strength": _a("noise_offset_random_strength", flag=True),
    "adaptive_noise_scale": _a("adaptive_noise_scale", lambda v: _unless_zero(float(v))),
    "multires_noise_iterations": _a("multires_noise_iterations", lambda v: _unless_zero(int(v))),
    "multires_noise_discount": _a("multires_noise_discount", float),
    "ip_noise_gamma": _a("ip_noise_gamma", lambda v: _unless_zero(float(v))),
    "ip_noise_gamma_random_strength": _a("ip_noise_gamma_random_strength", flag=True),
    "min_timestep": _a("min_timestep", int),
    "max_timestep": _a("max_timestep", int),
    "zero_terminal_snr": _a("zero_terminal_snr", flag=True),
    # flow matching (flux_train_network.py, sd3_train_network.py)
    "timestep_sampling": _a("timestep_sampling", _flow_sampling),
    "weighting_scheme": _a("weighting_scheme", _weighting_scheme),
    "model_prediction_type": _a("model_prediction_type", _model_prediction_type),
    # train_util.py: the flag sets the noise scheduler's prediction_type and the loss target (v), and the saved
    # metadata (sai_model_spec prediction_type "v", ss_base_model_version "..._v"); off leaves the model's own
    "v_parameterization": _a("prediction_type", _v_parameterization, flag=True),
    "training_shift": _a("discrete_flow_shift"),
    "discrete_flow_shift": _a("discrete_flow_shift", float),
    "sigmoid_scale": _a("sigmoid_scale", float),
    "logit_mean": _a("logit_mean", float),
    "logit_std": _a("logit_std", float),
    "mode_scale": _a("mode_scale", float),
    "guidance_scale": _a("guidance_scale", _zero_is_a_value),
    # SD3/Flux conditioning (sd3_train_utils.py, flux_train_utils.py): the same names as sdcore's, for kohya's CLI
    "apply_t5_attn_mask": _a("apply_t5_attn_mask", flag=True),
    "apply_lg_attn_mask": _a("apply_lg_attn_mask", flag=True),
    "clip_l_dropout_rate": _a("clip_l_dropout_rate", float),
    "clip_g_dropout_rate": _a("clip_g_dropout_rate", float),
    "t5_dropout_rate": _a("t5_dropout_rate", float),
    "enable_scaled_pos_embed": _a("enable_scaled_pos_embed", flag=True),
    "pos_emb_random_crop_rate": _a("pos_emb_random_crop_rate", float),
    # saving, samples, logs
    "save_precision": _a("save_dtype", _precision),
    "save_every_n_steps": _a("save_every"),
    "save_every_n_epochs": _a("save_every_epochs"),
    "save_last_n_epochs": _a("save_limit"),
    # kohya: save_every_n_epochs = floor(epochs / ratio) or 1, only for a ratio above 0
    "save_n_epoch_ratio": _a("save_n_epoch_ratio", lambda v: int(v) if int(v) > 0 else None),
    "save_state": _a("save_state", flag=True),
    "resume": _a("resume"),
    # 0 (what the kohya_ss GUI writes for an untouched field) is "not given": kohya's help says so
    "initial_step": _a("initial_step", lambda v: _unless_zero(int(v))),
    "initial_epoch": _a("initial_epoch", lambda v: _unless_zero(int(v))),
    "skip_until_initial_step": _a("skip_until_initial_step", flag=True),
    "sample_prompts": _a("sample_prompts"),
    "sample_every_n_steps": _a("sample_every"),
    "sample_every_n_epochs": _a("sample_every_epochs"),
    "sample_sampler": _a("sample_sampler"),
    "sample_at_first": _a("sample_at_first", flag=True),
    # the user's metadata in every saved .safetensors (library/sai_model_spec.py, train_network.py)
    "metadata_author": _a("metadata_author"),
    "metadata_description": _a("metadata_description"),
    "metadata_license": _a("metadata_license"),
    "metadata_tags": _a("metadata_tags"),
    "metadata_usage_hint": _a("metadata_usage_hint"),
    "metadata_thumbnail": _a("metadata_thumbnail"),
    "metadata_merged_from": _a("metadata_merged_from"),
    "metadata_trigger_phrase": _a("metadata_trigger_phrase"),
    "metadata_preprocessor": _a("metadata_preprocessor"),
    "metadata_is_negative_embedding": _a("metadata_is_negative_embedding", str),
    "training_comment": _a("training_comment"),
    # validation loss (train_network.py, 2025)
    "validation_split": _a("validation_split", float),
    "validation_seed": _a("validation_seed", int),
    "validate_every_n_steps": _a(
        "validate_every_n_steps", lambda v: _unless_zero(int(v))
    ),  # kohya_ss writes 0 when untouched
    "validate_every_n_epochs": _a(
        "validate_every_n_epochs", lambda v: _unless_zero(int(v))
    ),  # kohya_ss writes 0 when untouched
    "max_validation_steps": _a("max_validation_steps", int),
    "logging_dir": _a("log_dir"),
    # LoRA (train_network.py)
    "network_dim": _a("rank", methods="lora"),
    "network_alpha": _a("alpha", methods="lora"),
    "network_dropout": _a("dropout", methods="lora"),
    "network_weights": _a("network_weights", methods="lora"),
    "network_train_unet_only": _a("unet_only", flag=True, methods="lora"),
    "network_train_text_encoder_only": _a("te_only", flag=True, methods="lora"),
    "unet_lr": _a("unet_lr", _zero_is_a_value, methods="lora"),
    "text_encoder_lr": _a("te_lr", _te_rates, methods="lora"),
    "metadata_title": _a("metadata_title"),  # modelspec.title only: kohya's ss_output_name stays output_name
    "no_metadata": _a("minimal_metadata", flag=True, methods="lora"),
    "scale_weight_norms": _a("scale_weight_norms", methods="lora"),
    "network_multiplier": _a("network_multiplier", methods="lora"),
    # LoRA+ (kohya takes them in network_args; an early sd-scripts and the kohya_ss GUI's TOML name them top-level)
    "loraplus_lr_ratio": _a("loraplus_lr_ratio", _ratio, methods="lora"),
    "loraplus_unet_lr_ratio": _a("loraplus_unet_lr_ratio", _ratio, methods="lora"),
    "loraplus_text_encoder_lr_ratio": _a("loraplus_text_encoder_lr_ratio", _ratio, methods="lora"),
    "base_weights": _a("base_weights", _path_list, methods="lora"),
    "base_weights_multiplier": _a("base_weights_multiplier", _float_list, methods="lora"),
    "dim_from_weights": _a("dim_from_weights", flag=True, methods="lora"),
    # DreamBooth (train_db.py / fine_tune.py)
    "stop_text_encoder_training": _a("stop_text_encoder_at", methods="dreambooth", only_with="instance_prompt"),
    "learning_rate_te": _a("te_lr", _zero_is_a_value, methods="dreambooth"),
    "train_text_encoder": _a("train_text_encoder", flag=True, methods="dreambooth"),
    "no_token_padding": _a("no_token_padding", flag=True, methods="dreambooth"),
    "block_lr": _a("block_lr", _pair_text, methods="dreambooth"),  # sdxl_train.py: 23 U-Net rates ("a,b,..")
    # full fine-tuning of SDXL/SD3 (sdxl_train.py, sd3_train.py): per-encoder rates, T5 training
    "learning_rate_te1": _a("te1_lr", _zero_is_a_value, methods="dreambooth"),
    "learning_rate_te2": _a("te2_lr", _zero_is_a_value, methods="dreambooth"),
    "learning_rate_te3": _a("te3_lr", _zero_is_a_value, methods="dreambooth"),
    "train_t5xxl": _a("train_t5", flag=True, methods="dreambooth"),
    "num_last_block_to_freeze": _a("num_last_block_to_freeze", lambda v: int(v or 0), methods="dreambooth"),
    # textual inversion (train_textual_inversion.py)
    "token_string": _a("name", methods="ti"),
    "init_word": _a("init_text", methods="ti"),
    "num_vectors_per_token": _a("vectors", methods="ti"),
    "weights": _a("init_weights", methods="ti"),
}


#: composite kohya options translated in :func:`translate` (name -> help text for ``--help``)
COMPOSITE: dict[str, str] = {
    "output_dir": "with --output_name and --save_model_as: --output DIR/NAME.EXT",
    "output_name": "see --output_dir (default 'last', as kohya)",
    "save_model_as": "safetensors (LoRA, DreamBooth), pt/safetensors (TI), diffusers (DreamBooth)",
    "network_module": "networks.lora -> --algo lora/locon; lycoris.kohya -> --algo from network_args algo=",
    "network_args": "'conv_dim=8' 'conv_alpha=4' 'algo=loha' ... -> --conv-rank --conv-alpha --algo ...",
    "use_object_template": "--template subject (TI)",
    "use_style_template": "--template style (TI)",
    "use_8bit_adam": "old kohya flag: --optimizer adamw8bit",
    "use_lion_optimizer": "old kohya flag: --optimizer lion",
    "save_last_n_steps": "--save-limit N/save_every_n_steps + 1 (kohya keeps the saves of the last N steps)",
    "save_last_n_steps_state": "with save_state: --keep-states N/save_every_n_steps + 1 (default save_last_n_steps)",
    "save_last_n_epochs_state": "with save_state: --keep-states N (default save_last_n_epochs)",
    "epoch": "kohya_ss GUI field: --epochs when neither max_train_epochs nor max_train_steps is given",
    "v2": "accepted: the model family is read from the model",
    "cache_text_encoder_outputs_to_disk": "--cache-text-encoder-outputs --cache-text-encoder-outputs-to-disk (one "
    ".safetensors per dataset folder, not kohya's per-image npz)",
    "deepspeed": "refused: give DeepSpeed to `accelerate launch --config_file` (docs/accelerate/deepspeed-zero2.yaml)",
    **dict.fromkeys(
        (
            "zero_stage",
            "offload_optimizer_device",
            "offload_optimizer_nvme_path",
            "offload_param_device",
            "offload_param_nvme_path",
            "zero3_init_flag",
            "zero3_save_16bit_model",
            "fp16_master_weights_and_gradients",
        ),
        "with --deepspeed only (see --deepspeed); without it no effect, as in kohya",
    ),
    "double_blocks_to_swap": "kohya's old flux_train.py name: --blocks-to-swap double + single // 2 (when not given)",
    "single_blocks_to_swap": "see --double_blocks_to_swap",
    "split_mode": "kohya's old flux_train_network.py flag: --blocks-to-swap 18 (when not given)",
    "cpu_offload_checkpointing": "--cpu-offload-checkpointing, which turns --gradient-checkpointing on as kohya does "
    "(not with blocks_to_swap)",
    "use_t5xxl_cache_only": "sd3_train.py: --cache-text-encoder-outputs, T5's outputs cached while CLIP trains (not with "
    "train_t5xxl)",
}


_FLAG_COMPOSITES = {
    "use_object_template",
    "use_style_template",
    "use_8bit_adam",
    "use_lion_optimizer",
    "v2",
    "cache_text_encoder_outputs_to_disk",
    "deepspeed",
    "zero3_init_flag",
    "zero3_save_16bit_model",
    "fp16_master_weights_and_gradients",
    "split_mode",
    "cpu_offload_checkpointing",
    "use_t5xxl_cache_only",
}


#: options without an effect on the trained result here (accepted with one note)
IGNORED: dict[str, str] = {
    **dict.fromkeys(("xformers", "sdpa", "mem_eff_attn"), "sdcore picks the attention kernel itself"),
    **dict.fromkeys(
        (
            "max_data_loader_n_workers",
            "persistent_data_loader_workers",
            "vae_batch_size",
            "lowram",
            "highvram",
            "lowvram",
            "no_half_vae",
            "skip_cache_check",
            "async_upload",
            "disable_mmap_load_safetensors",
            "tokenizer_cache_dir",
        ),
        "sdcore manages loading and memory itself",
    ),
    **dict.fromkeys(
        (
            "log_with",
            "log_prefix",
            "log_tracker_name",
            "log_tracker_config",
            "log_config",
            "wandb_api_key",
            "wandb_run_name",
            "console_log_level",
            "console_log_file",
            "console_log_simple",
            "output_config",
            "dynamo_backend",
            "save_state_on_train_end",
            "save_state_to_huggingface",
            "max_token_length",
        ),
        "logging, metadata or save bookkeeping",
    ),
    **dict.fromkeys(
        (
            "huggingface_repo_id",
            "huggingface_token",
            "huggingface_repo_type",
            "huggingface_repo_visibility",
            "huggingface_path_in_repo",
            "resume_from_huggingface",
        ),
        "no uploads (sdcore works offline)",
    ),
    "use_safetensors": "sdcore always writes safetensors",
    "torch_compile": "speed only",
    "cache_info": "speed only",
    # kohya's SD3/Flux/SDXL memory and bookkeeping options (sd3_train.py, flux_train.py, train_util.py)
    **dict.fromkeys(
        ("mem_eff_save", "skip_latents_validity_check", "t5xxl_device", "t5xxl_dtype", "text_encoder_batch_size"),
        "sdcore manages loading and memory itself",
    ),
    "diffusers_xformers": "sdcore picks the attention kernel itself",
    **dict.fromkeys(("save_clip", "save_t5xxl"), "logging, metadata or save bookkeeping"),
}


_IGNORED_NOTES = {
    "max_token_length": "sdcore encodes long captions in 75-token chunks without a limit",
    "save_state_on_train_end": "kohya's state at the end only: sdcore's --save-state (on for this run) writes one at "
    "the end and one with each intermediate save (--keep-states prunes them)",
    "use_safetensors": "sdcore always writes .safetensors (a single file, or a diffusers folder of them); kohya "
    "without it and without save_model_as would write a .ckpt",
    "torch_compile": "sdcore runs the denoiser without torch.compile (compiling changes speed, not what trains); "
    "dynamo_backend is ignored with it",
    "cache_info": "sdcore reads image sizes and captions each run (kohya's cache only speeds up loading)",
    "t5xxl_dtype": "kohya's SD3 scripts do not read it (their help: [DOES NOT WORK]); T5 runs in the mixed-precision "
    "dtype there as here",
    "t5xxl_device": "kohya's SD3 scripts do not read it (their help: [DOES NOT WORK])",
    "mem_eff_save": "a memory-saving way to write the same checkpoint; sdcore always casts and writes a model "
    "tensor by tensor from host memory, with no second copy on the GPU",
    "text_encoder_batch_size": "the batch size of text-encoder caching (the same encodings); sdcore uses its own",
    "skip_latents_validity_check": "kohya's old name of skip_cache_check; sdcore's latent cache checks its keys itself",
    "save_clip": "kohya's sd3_train.py does not read it (its help: [DOES NOT WORK]); sdcore's SD3 checkpoint holds "
    "the text encoders it was given",
    "save_t5xxl": "kohya's sd3_train.py does not read it (its help: [DOES NOT WORK]); sdcore's SD3 checkpoint holds "
    "the text encoders it was given",
}


_FLAG_IGNORED = {
    "xformers",
    "sdpa",
    "mem_eff_attn",
    "persistent_data_loader_workers",
    "lowram",
    "highvram",
    "lowvram",
    "no_half_vae",
    "skip_cache_check",
    "async_upload",
    "disable_mmap_load_safetensors",
    "log_config",
    "console_log_simple",
    "output_config",
    "save_state_on_train_end",
    "save_state_to_huggingface",
    "resume_from_huggingface",
    "use_safetensors",
    "torch_compile",
    "cache_info",
    "mem_eff_save",
    "skip_latents_validity_check",
    "diffusers_xformers",
    "save_clip",
    "save_t5xxl",
}


#: aliases of one method's options whose "off" value is not in :data:`_OFF` (accepted for other methods)
_ALIAS_OFF: dict[str, tuple[Any, ...]] = {"network_multiplier": (*_OFF, 1, 1.0)}


#: options that change the result and are not implemented: accepted only at these values
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    **dict.fromkeys(
        ("dataset_class",),
        _OFF,
    ),
    "noise_offset_type": (*_OFF, "Original"),
    # flux_train_utils: flux (default) or chroma; the model file decides the family, model_type_problems checks it
    "model_type": (*_OFF, "flux", "chroma"),
}


#: options of kohya's scripts for models and methods sdcore does not train (script -> its own options); a
#: TOML written for them is refused by name while these hold their off values (the kohya_ss GUI writes them all)
OTHER_SCRIPTS: dict[str, tuple[str, ...]] = {
    "kohya's Anima scripts (anima_train*.py)": (
        "cross_attn_lr", "llm_adapter_lr", "llm_adapter_path", "mlp_lr", "mod_lr", "qwen3", "qwen3_max_token_length",
        "self_attn_lr", "t5_max_token_length", "t5_tokenizer_path", "unsloth_offload_checkpointing",
        "vae_disable_cache",
    ),
    "kohya's Anima and HunyuanImage scripts": ("attn_mode", "split_attn", "vae_chunk_size", "fp8_scaled"),
    "kohya's HunyuanImage script (hunyuan_image_train_network.py)": ("byt5", "fp8_vl", "text_encoder", "text_encoder_cpu"),
    "kohya's Lumina scripts (lumina_train*.py)": (
        "gemma2", "gemma2_max_token_length", "sample_batch_size", "system_prompt", "use_flash_attn", "use_sage_attn",
    ),
    "kohya's ControlNet and ControlNet-LLLite scripts": ("controlnet_model_name_or_path", "control_net_lr", "cond_emb_dim"),
}  # fmt: skip


UNSUPPORTED.update(dict.fromkeys((n for names in OTHER_SCRIPTS.values() for n in names), _OFF))


_FLAG_UNSUPPORTED: set[str] = {
    "split_attn", "fp8_scaled", "fp8_vl", "text_encoder_cpu", "unsloth_offload_checkpointing", "vae_disable_cache",
    "use_flash_attn", "use_sage_attn",
}  # fmt: skip


#: why an :data:`UNSUPPORTED` option is refused, where "it changes the result" does not say enough
_UNSUPPORTED_NOTES = {
    "model_type": "flux_train_network.py's model types are flux and chroma",
    **{
        name: f"an option of {scripts}, for models or methods sdcore does not train (its training methods are "
        "`sdcore train --help`'s, on SD1/SD2/SDXL, SD3 and FLUX.1 models)"
        for scripts, names in OTHER_SCRIPTS.items()
        for name in names
    },
}


#: kohya defaults that differ from sdcore's and decide what trains or what is written (target, kohya value, why;
#: an empty why sets the value without a note). Lines cite sd-scripts 48d368f; options not listed have sdcore's
#: kohya default already (train_batch_size 1, lr_scheduler constant, AdamW, mixed_precision no, clip_skip last
#: layer, the bucket sizes 256/1024/64, caption options off, noise_offset and min_snr_gamma off: the audit table in
#: docs/training.md), or differ on purpose (seed: kohya draws a random one, sdcore's 42 is one such draw, kept so a
#: run repeats; max_token_length: kohya truncates captions at 75 tokens, sdcore encodes them whole in chunks)
KOHYA_DEFAULTS: tuple[tuple[str, Any, str], ...] = (
    ("rank", 4, "network_dim defaults to 4"),
    ("alpha", 1.0, "network_alpha defaults to 1"),
    ("train_text_encoder", True, "the text encoder is trained unless --network_train_unet_only"),
    ("buckets", False, "buckets are off unless --enable_bucket"),
    ("max_steps", 1600, "max_train_steps defaults to 1600"),
    # sd-scripts 48d368f library/train_util.py:6506 (sample_image_inference: prompt_dict.get("sample_steps", 30))
    ("sample_steps", 30, "sample images take 30 steps where a prompt gives no --s"),
    # :6507-6509 (width/height 512, scale 7.5); SD3's the same (sd3_train_utils.py:489-491), FLUX.1/Chroma's 512x512
    # too (flux_train_utils.py:156-157), with their own CFG (KOHYA_FAMILY_DEFAULTS)
    ("sample_resolution", 512, "sample images are 512x512 where a prompt gives no --w/--h"),
    ("sample_cfg", 7.5, "sample images take CFG 7.5 where a prompt gives no --l"),
    (
        "cache_latents",
        False,
        "latents are not cached unless --cache_latents (random_crop/color_aug/face_crop_aug_range and "
        "train_inpainting need that)",
    ),
    # library/train_util.py:3701 (add_optimizer_arguments: --learning_rate 2.0e-6); LoRA's unet_lr/text_encoder_lr
    # fall back to it (train_network.py), so does ss_learning_rate in the file's metadata
    ("lr", 2e-6, "learning_rate defaults to 2e-6 (kohya's, for every script; LoRA is usually trained near 1e-4)"),
    # train_util.py:4492 (add_dataset_arguments: --caption_extension ".caption"), which config_util.py's
    # BlueprintGenerator gives every dataset-TOML subset that sets none (the argparse value comes before the
    # DreamBoothSubsetParams default, also ".caption")
    ("caption_extension", ".caption", "caption_extension defaults to .caption"),
    # train_util.py:1946-1970 (read_caption): only <stem><caption_extension> is read, then the class tokens or ""
    ("caption_fallback", False, ""),
    # train_util.py:3839 (--save_precision None) and prepare_dtype (:5514): save_dtype None writes the weights in
    # the dtype they train in, float32 (full_fp16/full_bf16 are translated to their dtype in _composites)
    ("save_dtype", "fp32", "save_precision defaults to none: the weights are saved as they train, in float32"),
    # train_util.py:3864/3876 (--save_last_n_epochs / --save_last_n_steps None): no intermediate save is removed
    ("save_limit", 0, "every intermediate save is kept unless save_last_n_epochs/save_last_n_steps"),
    # train_util.py:3888 (--save_state store_true): no resumable state is written without it
    ("save_state", False, "no resumable training state is written unless save_state"),
)


#: kohya's SD3/Flux LoRA scripts' defaults that differ from sdcore's and decide what trains, per family
#: (target, kohya value, why); applied like :data:`KOHYA_DEFAULTS` when the family is known before loading
KOHYA_FAMILY_DEFAULTS: dict[str, tuple[tuple[str, Any, str], ...]] = {
    "flux": (
        ("timestep_sampling", "sigma", "flux: timestep_sampling defaults to sigma"),
        ("model_prediction_type", "sigma_scaled", "flux: model_prediction_type defaults to sigma_scaled"),
        ("discrete_flow_shift", 3.0, "flux: discrete_flow_shift defaults to 3.0"),
        ("guidance_scale", 3.5, "flux: guidance_scale defaults to 3.5"),
        # sd-scripts 48d368f library/flux_train_utils.py:155 (sample_image_inference: .get("sample_steps", 20))
        ("sample_steps", 20, "flux: sample images take 20 steps where a prompt gives no --s"),
        # flux_train_utils.py:158-159: guidance_scale 3.5 (--g) and scale 1.0 (--l, true CFG) are sdcore's own
        # FLUX.1 defaults; None keeps them (and FLUX.1 Fill's guidance 30: kohya trains no Fill model)
        ("sample_cfg", None, ""),
    ),
    # flux_train_network.py --model_type chroma: the same script defaults; guidance 0 as kohya's docs require
    # (sdcore's Chroma transformer gets 0 whatever is set: diffusers' ChromaTransformer2DModel has no guidance input)
    "chroma": (
        ("timestep_sampling", "sigma", "chroma: timestep_sampling defaults to sigma (kohya recommends sigmoid)"),
        ("model_prediction_type", "sigma_scaled", "chroma: model_prediction_type defaults to sigma_scaled"),
        ("discrete_flow_shift", 3.0, "chroma: discrete_flow_shift defaults to 3.0"),
        ("guidance_scale", 0.0, "chroma: guidance_scale 0.0 (kohya's docs require it)"),
        ("sample_steps", 20, "chroma: sample images take 20 steps where a prompt gives no --s"),  # as flux
        # flux_train_utils.py:159 (scale 1.0): kohya's Chroma samples run without CFG unless --l, so --n is unused
        ("sample_cfg", 1.0, "chroma: sample images take CFG 1 (no CFG: --n unused) where a prompt gives no --l"),
    ),
    # train_util.py's sample_image_inference (SD 1.x/2.x, SDXL) uses --sample_sampler, whose default is ddim
    # (sd-scripts 48d368f library/train_util.py:4197-4199, :6513); kohya's SD3/FLUX.1 samples ignore it
    **{
        family: (("sample_sampler", "ddim", f"{family}: sample images use the ddim sampler unless --ss"),)
        for family in ("sd1", "sd2", "sdxl")
    },
    "sd3": (
        # sd3_train_utils.get_noisy_model_input_and_timesteps: u from weighting_scheme's density, shifted by
        # training_shift, floored to an integer timestep in [min_timestep, max_timestep) (sigma = t / 1000)
        ("timestep_sampling", "uniform", "sd3: the noise level is drawn with weighting_scheme's density (uniform)"),
        ("min_timestep", 0, "sd3: timesteps are integers in [min_timestep, max_timestep) = [0, 1000)"),
        # sd3_train_network.py: model_pred * (-sigmas) + noisy_model_input against target = latents
        ("model_prediction_type", "x0", "sd3: noisy - sigma * output is compared with the latents (x0)"),
    ),
}


#: the defaults above that only matter with sample prompts (applied, and said, only then)
_SAMPLE_TARGETS = frozenset({"sample_steps", "sample_sampler", "sample_resolution", "sample_cfg"})


#: the samplings kohya's SD3 script draws with (its --weighting_scheme's densities)
_SD3_DENSITIES = {"logit_normal": "logit_normal", "mode": "mode"}


@dataclass
class Translation:
    """sdcore option values from kohya options, plus notes and problems (reported together)."""

    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)  # sdcore option -> the kohya name that set it
    #: option -> the option whose final value it takes unless set itself (LyCORIS: conv_dim = network_dim)
    follow: dict[str, str] = field(default_factory=dict)
    #: option -> the value a given kohya option implies where the run does not set the option itself (kohya's TI
    #: without a template flag trains on the captions: ``template`` filewords, unless the config names a template)
    implied: dict[str, Any] = field(default_factory=dict)

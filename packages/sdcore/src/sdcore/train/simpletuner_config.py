"""SimpleTuner (bghira/SimpleTuner) configs as sdcore options, datasets and sample prompts.

A SimpleTuner run is a flat table of its command-line options (``config/config.json``, ``config.toml``;
keys with or without the leading ``--``, booleans and numbers often as strings: ``"true"``, ``"1e-4"``), plus
the data backend JSON its ``data_backend_config`` names (a list of datasets) and, for ``lora_type
lycoris``, the LyCORIS JSON its ``lycoris_config`` names. ``sdcore train lora --config config.json`` (a
``model_type lora`` run) or ``sdcore train dreambooth --config config.json`` (``model_type full``) reads it
through :func:`translate_config`; ``--data`` and ``--sample-prompts`` become the config itself, read by
:func:`load_datasets` (its data backends) and :func:`read_sample_prompts` (its validation prompts).

Every option name and default below is SimpleTuner's (its field registry,
``simpletuner/simpletuner_sdk/server/services/field_registry/sections/*.py`` and
``simpletuner/helpers/models/field_registry/*.py``, which its argument parser is built from), with its
meaning from the code that uses it (``helpers/models/common.py``, ``helpers/models/flux/model.py``,
``helpers/training/custom_schedule.py``, ``helpers/training/trainer.py``) and ``documentation/OPTIONS.md``,
``DATALOADER.md``. SimpleTuner's defaults apply where a config leaves an option out (learning rate 4e-7,
batch size 4, LoRA rank 16 with alpha = rank, PEFT ``lora_dropout`` 0.1, gradients clipped by *value* at 2.0,
Flux guidance 1.0, a shift of 3 on flow-matching models), not sdcore's: a default sdcore cannot reproduce
is a problem like any other value. An option is translated, accepted with a note (no effect on what is
learned: trackers, the hub, caches, compilation, devices), accepted at SimpleTuner's default and refused by
name otherwise, or unknown (with the nearest SimpleTuner name). All problems are reported at once.
A FLUX.1 Kontext run's (``model_flavour kontext``) reference dataset, named by a training dataset's
``conditioning_data``, is that subset's control folder; a mask dataset (``conditioning_type mask`` or
``segmentation``, any family) its ``conditioning_data_dir`` with ``--masked-loss`` and the subset's ``mask_kind``
(:func:`_conditioning_folders`).
SimpleTuner is AGPL-3.0: only facts (names, defaults, meanings) are taken from it here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError
from .aitoolkit import JobTranslation
from .field_tables import drop_foreign_options, nearest_field, same_value

if TYPE_CHECKING:
    from ..data.dataset import SkippedFile, SubsetOptions
    from .options import TrainOptions
    from .sample_prompts import SamplePrompt

#: every option of SimpleTuner's argument parser (its field registry: the ``arg_name`` without ``--``) and its
#: default (None where the registry computes it); bghira/SimpleTuner bc8e6ab
DEFAULTS: dict[str, Any] = {
    "accelerate_config": None, "accelerate_extra_args": None, "accelerator_cache_clear_interval": None,
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-08, "adam_weight_decay": 0.01,
    "allow_dataset_oversubscription": False, "aspect_bucket_alignment": 64, "aspect_bucket_disable_rebuild": False,
    "aspect_bucket_rounding": 2, "aspect_bucket_worker_count": 12, "assistant_lora_inference_strength": 0.0,
    "assistant_lora_path": None, "assistant_lora_strength": 1.0, "attention_mechanism": "diffusers",
    "audio_channels": 1, "audio_duration_interval": 3.0, "audio_flow_schedule_shift": None,
    "audio_max_duration_seconds": None, "audio_min_duration_seconds": None, "audio_truncation_mode": "beginning",
    "aws_max_pool_connections": 128, "base_model_default_dtype": "bf16", "base_model_precision": "no_change",
    "cache_dir": None, "cache_dir_text": "cache", "cache_dir_vae": "", "caption_dropout_probability": None,
    "caption_strategy": "filename", "checkpoint_epoch_interval": None, "checkpoint_step_interval": 500,
    "checkpointing_rolling_steps": 0, "checkpointing_use_tempdir": False, "checkpoints_rolling_total_limit": 1,
    "checkpoints_total_limit": 5, "compress_disk_cache": True, "conditioning_multidataset_sampling": "random",
    "configs_dir": "", "context_parallel_comm_strategy": "allgather", "context_parallel_size": 1, "control": False,
    "controlnet": False, "controlnet_custom_config": None, "controlnet_model_name_or_path": None,
    "crepa_adjacent_distance": 1, "crepa_adjacent_tau": 1.0, "crepa_block_index": 8, "crepa_cutoff_step": 0,
    "crepa_decay_steps": 0, "crepa_drop_vae_encoder": False, "crepa_enabled": False,
    "crepa_encoder": "dinov2_vitg14", "crepa_encoder_frames_batch_size": -1, "crepa_encoder_image_size": 518,
    "crepa_feature_source": "encoder", "crepa_lambda": 0.5, "crepa_lambda_end": 0.0,
    "crepa_normalize_by_frames": True, "crepa_normalize_neighbour_sum": False, "crepa_power": 1.0,
    "crepa_scheduler": "constant", "crepa_self_flow": False, "crepa_self_flow_mask_ratio": 0.1,
    "crepa_similarity_ema_decay": 0.99, "crepa_similarity_threshold": None, "crepa_spatial_align": True,
    "crepa_teacher_block_index": None, "crepa_threshold_mode": "permanent", "crepa_use_backbone_features": False,
    "crepa_use_tae": False, "crepa_warmup_steps": 0, "custom_text_encoder_intermediary_layers": None,
    "custom_tracker": None, "data_aesthetic_score": 7.0, "data_backend_config": None,
    "data_backend_sampling": "auto-weighting", "dataloader_prefetch": False, "dataloader_prefetch_qlen": 10,
    "debug_aspect_buckets": False, "debug_dataset_loader": False, "deepspeed_config": None,
    "delete_invalid_checkpoints": False, "delete_model_after_load": False, "delete_nsfw_images": False,
    "delete_problematic_images": False, "delete_unwanted_images": False, "diff2flow_enabled": False,
    "diff2flow_loss": False, "diffusion_blocks_config": None, "disable_assistant_lora": False,
    "disable_benchmark": False, "disable_bucket_pruning": False, "disable_multiline_split": False,
    "disable_segmented_timestep_sampling": False, "disable_tf32": False, "disk_low_action": "stop",
    "disk_low_script": None, "disk_low_threshold": None, "distillation_config": None, "distillation_method": None,
    "dynamo_backend": "no", "dynamo_dynamic": False, "dynamo_fullgraph": False, "dynamo_mode": "",
    "dynamo_use_regional_compilation": False, "ema_cpu_only": False, "ema_decay": 0.995, "ema_device": "cpu",
    "ema_foreach_disable": False, "ema_update_interval": 1, "ema_validation": "comparison", "ema_warmup_steps": 0,
    "enable_group_offload": False, "enable_multiprocessing": False, "enable_nsfw_check": False,
    "enable_watermark": False, "eval_dataset_id": None, "eval_dataset_pooling": False, "eval_epoch_interval": None,
    "eval_loss_disable": False, "eval_steps_interval": None, "eval_timesteps": 28, "evaluation_type": "none",
    "find_unused_parameters": None, "flow_beta_schedule_alpha": 2.0, "flow_beta_schedule_beta": 2.0,
    "flow_cubic_schedule_weights": None, "flow_custom_timesteps": None, "flow_schedule_auto_shift": False,
    "flow_schedule_shift": 3.0, "flow_sigmoid_scale": 1.0, "flow_timesteps_mode": "fixed-list",
    "flow_use_beta_schedule": False, "flow_use_uniform_schedule": False, "flux_attention_masked_training": False,
    "flux_fast_schedule": False, "flux_guidance_max": 4.0, "flux_guidance_min": 0.0,
    "flux_guidance_mode": "constant", "flux_guidance_value": 1.0, "flux_lora_target": "all", "framerate": None,
    "freeze_encoder_after": 17, "freeze_encoder_before": 12, "freeze_encoder_strategy": "after",
    "fsdp_activation_checkpointing": False, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_cpu_offload": False, "fsdp_cpu_ram_efficient_loading": False, "fsdp_enable": False,
    "fsdp_limit_all_gathers": True, "fsdp_reshard_after_forward": True, "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_transformer_layer_cls_to_wrap": None, "fsdp_version": 2, "fully_unload_text_encoder": False,
    "fuse_optimizer": False, "fuse_qkv_projections": False, "grad_clip_method": "value",
    "gradient_accumulation_steps": 1, "gradient_checkpointing": True, "gradient_checkpointing_backend": "torch",
    "gradient_checkpointing_interval": None, "gradient_checkpointing_offload_attention": False,
    "gradient_checkpointing_offload_pin_memory_max_buckets": 12, "gradient_checkpointing_offload_prefetch": False,
    "gradient_checkpointing_segment_stride": None, "gradient_precision": None, "group_offload_blocks_per_group": 1,
    "group_offload_text_encoder": False, "group_offload_to_disk_path": "", "group_offload_type": "block_level",
    "group_offload_use_stream": False, "group_offload_vae": False, "hub_model_id": None, "huber_c": 0.1,
    "huber_schedule": "snr", "i_know_what_i_am_doing": False, "ignore_missing_files": False,
    "image_processing_batch_size": 32, "inference_scheduler_timestep_spacing": "trailing", "init_lokr_norm": None,
    "init_lora": None, "init_lora_ema": None, "init_lora_step": None, "input_perturbation": 0.0,
    "input_perturbation_steps": 0, "instance_prompt": None, "internal_guidance_block_index": None,
    "internal_guidance_enabled": False, "internal_guidance_loss_weight": 0.5, "irepa_enabled": False,
    "irepa_projector_kernel_size": 3, "irepa_spatial_norm_alpha": 0.6, "keep_vae_loaded": False,
    "layer_freeze_strategy": None, "layersync_enabled": False, "layersync_lambda": 0.2,
    "layersync_student_block": None, "layersync_teacher_block": None, "learning_rate": 4e-07, "local_rank": -1,
    "logging_dir": "./logs", "lora_alpha": None, "lora_dropout": 0.1, "lora_format": "diffusers",
    "lora_init_type": "default", "lora_rank": 16, "lora_type": "standard", "loss_type": "l2", "lr_end": 4e-07,
    "lr_num_cycles": 1, "lr_power": 0.8, "lr_scale": False, "lr_scale_sqrt": False,
    "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 0, "lycoris_config": "config/lycoris_config.json",
    "machine_rank": 0, "main_process_ip": "127.0.0.1", "main_process_port": 29500, "masked_loss_probability": 1.0,
    "max_grad_norm": 2.0, "max_grounding_entities": 0, "max_train_steps": None, "max_upscale_threshold": None,
    "max_workers": 32, "maximum_image_size": None, "merge_environment_config": None,
    "metadata_update_interval": 3600, "minimum_image_size": None, "mixed_precision": "bf16",
    "mixflow_enabled": False, "mixflow_gamma": 0.8, "model_card_note": None, "model_card_private": True,
    "model_card_safe_for_work": False, "model_family": None, "model_flavour": None, "model_type": "full",
    "modelspec_comment": None, "musubi_block_swap_device": "cpu", "musubi_blocks_to_swap": 0,
    "nextlat_block_index": -1, "nextlat_enabled": False, "nextlat_kl_weight": 0.0, "nextlat_state_loss": "smooth_l1",
    "nextlat_weight": 0.0, "noise_offset": 0.1, "noise_offset_probability": 0.25, "nsfw_check_backend_types": "all",
    "nsfw_check_min_votes": 2, "nsfw_check_models": None, "nsfw_check_sample_types": "image,conditioning",
    "nsfw_check_video_frame_count": 3, "nsfw_check_video_frame_selection": "uniform",
    "nsfw_check_video_min_flagged_frames": 1, "num_eval_images": 4, "num_machines": 1, "num_processes": 1,
    "num_train_epochs": 1, "num_validation_images": 1, "offload_during_save": False, "offload_during_startup": False,
    "offload_param_path": None, "offset_noise": False, "only_instance_prompt": False, "optimizer": "adamw_bf16",
    "optimizer_beta1": None, "optimizer_beta2": None, "optimizer_config": None, "optimizer_cpu_offload_method": None,
    "optimizer_offload_gradients": False, "optimizer_release_gradients": False, "output_dir": "simpletuner-results",
    "override_dataset_config": False, "parquet_caption_column": None, "parquet_filename_column": None,
    "peft_lora_mode": "standard", "peft_lora_target_modules": None, "post_checkpoint_script": None,
    "post_upload_script": None, "prediction_type": None, "prepend_instance_prompt": False,
    "preserve_data_backend_cache": False,
    "pretrained_evaluation_model_name_or_path": "openai/clip-vit-large-patch14-336",
    "pretrained_gemma_model_name_or_path": None, "pretrained_grounding_model_name_or_path": None,
    "pretrained_model_name_or_path": None, "pretrained_t5_model_name_or_path": None,
    "pretrained_transformer_model_name_or_path": None, "pretrained_transformer_subfolder": "transformer",
    "pretrained_unet_model_name_or_path": None, "pretrained_unet_subfolder": "unet",
    "pretrained_vae_model_name_or_path": "madebyollin/sdxl-vae-fp16-fix", "print_filenames": False,
    "print_sampler_statistics": False, "prodigy_steps": None, "publishing_config": None,
    "push_checkpoints_to_hub": False, "push_to_hub": False, "push_to_hub_background": False,
    "quantization_config": None, "quantize_activations": False, "quantize_via": "accelerator",
    "qwen_text_encoder_model_name_or_path": None, "ramtorch": False, "ramtorch_controlnet": False,
    "ramtorch_disable_extensions": True, "ramtorch_disable_sync_hooks": False, "ramtorch_target_modules": None,
    "ramtorch_text_encoder": False, "ramtorch_text_encoder_percent": 100, "ramtorch_transformer_percent": 100,
    "ramtorch_vae": False, "read_batch_size": 25, "refiner_training": False,
    "refiner_training_invert_schedule": False, "refiner_training_strength": 0.2, "report_to": "none",
    "rescale_betas_zero_snr": False, "resolution": 1024, "resolution_type": "pixel_area",
    "resume_from_checkpoint": "latest", "revision": None, "sageattention_usage": "inference", "same_network": True,
    "save_text_encoder": False, "scheduled_sampling_max_step_offset": 0, "scheduled_sampling_order": 2,
    "scheduled_sampling_prob_end": 0.5, "scheduled_sampling_prob_start": 0.0, "scheduled_sampling_probability": 0.0,
    "scheduled_sampling_ramp_shape": "linear", "scheduled_sampling_ramp_steps": 0,
    "scheduled_sampling_reflexflow": None, "scheduled_sampling_reflexflow_alpha": 1.0,
    "scheduled_sampling_reflexflow_beta1": 10.0, "scheduled_sampling_reflexflow_beta2": 1.0,
    "scheduled_sampling_sampler": "unipc", "scheduled_sampling_start_step": 0,
    "scheduled_sampling_strategy": "uniform", "sd3_clip_uncond_behaviour": "empty_string",
    "sd3_t5_uncond_behaviour": None, "sdnq_compile_mode": "auto", "sdnq_dequantize_fp32": None,
    "sdnq_group_size": None, "sdnq_hadamard_group_size": None, "sdnq_modules_dtype_dict": None,
    "sdnq_modules_quant_config": None, "sdnq_modules_to_not_convert": None, "sdnq_modules_to_not_use_matmul": None,
    "sdnq_quantized_matmul_dtype": "auto", "sdnq_svd_rank": None, "sdnq_svd_steps": None, "sdnq_use_hadamard": None,
    "sdnq_use_quantized_matmul": None, "sdnq_use_svd": None, "sdnq_weights_dtype": None,
    "sdxl_refiner_uses_full_range": False, "sdxl_validation_pipeline_mode": "trained-stage",
    "sdxl_validation_stage1_model": None, "sdxl_validation_stage2_model": None, "seed": None,
    "seed_for_each_device": True, "set_grads_to_none": False, "singlora_ramp_up_steps": 0, "skip_file_discovery": "",
    "sla_config": None, "slider_lora_target": False, "snr_gamma": None, "snr_weight": 1.0,
    "soft_min_snr_sigma_data": None, "strict_epoch_limit": False, "t5_padding": "unmodified",
    "target_downsample_size": None, "text_cache_disable": False, "text_cache_ondemand": False,
    "text_embed_full_cache": False, "text_encoder_1_precision": "no_change", "text_encoder_2_precision": "no_change",
    "text_encoder_3_precision": "no_change", "text_encoder_4_precision": "no_change", "text_encoder_batch_size": 1,
    "text_encoder_limit": 100, "text_encoder_lr": None, "timestep_bias_begin": 0, "timestep_bias_end": 1000,
    "timestep_bias_multiplier": 1.0, "timestep_bias_portion": 0.25, "timestep_bias_strategy": None,
    "tokenizer_max_length": None, "torch_num_threads": 8, "tracker_image_layout": "gallery",
    "tracker_project_name": "simpletuner", "tracker_run_name": "simpletuner-testing", "train_batch_size": 4,
    "train_text_encoder": False, "training_scheduler_timestep_spacing": "trailing", "tread_config": None,
    "trust_remote_code": False, "twinflow_enabled": False, "twinflow_target_step_count": 1,
    "unet_attention_slice": False, "urepa_cutoff_step": 0, "urepa_decay_steps": 0, "urepa_enabled": False,
    "urepa_encoder_image_size": 518, "urepa_lambda": 0.5, "urepa_lambda_end": 0.0, "urepa_manifold_weight": 3.0,
    "urepa_model": "dinov2_vitg14", "urepa_power": 1.0, "urepa_scheduler": "constant",
    "urepa_similarity_ema_decay": 0.99, "urepa_similarity_threshold": None, "urepa_threshold_mode": "permanent",
    "urepa_use_tae": False, "urepa_warmup_steps": 0, "use_dora": False, "use_ema": False, "use_soft_min_snr": False,
    "user_prompt_library": None, "vae_batch_size": 4, "vae_cache_disable": False, "vae_cache_ondemand": False,
    "vae_cache_scan_behaviour": "recreate", "vae_dtype": "bf16", "vae_enable_patch_conv": False,
    "vae_enable_slicing": False, "vae_enable_temporal_roll": False, "vae_enable_tiling": False,
    "validate_after_epoch": None, "validate_after_step": None, "validation_adapter_config": None,
    "validation_adapter_mode": "adapter_only", "validation_adapter_name": None, "validation_adapter_path": None,
    "validation_adapter_strength": 1.0, "validation_disable": False, "validation_disable_unconditional": False,
    "validation_epoch_interval": None, "validation_external_background": False, "validation_external_script": None,
    "validation_guidance": 7.5, "validation_guidance_real": 1.0, "validation_guidance_rescale": 0.0,
    "validation_guidance_skip_layers": None, "validation_guidance_skip_layers_start": 0.01,
    "validation_guidance_skip_layers_stop": 0.2, "validation_guidance_skip_scale": 2.8,
    "validation_image_format": "png", "validation_image_quality": 90, "validation_input": None,
    "validation_internal_guidance_scale": 1.0, "validation_lycoris_strength": 1.0,
    "validation_method": "simpletuner-local", "validation_multigpu": "batch-parallel",
    "validation_negative_prompt": "blurry, cropped, ugly", "validation_no_cfg_until_timestep": 2,
    "validation_noise_scheduler": None, "validation_num_inference_steps": 30, "validation_num_video_frames": None,
    "validation_on_startup": False, "validation_preview": False, "validation_preview_steps": 1,
    "validation_prompt": None, "validation_prompt_library": False, "validation_randomize": False,
    "validation_resolution": "256", "validation_seed": None, "validation_seed_source": "cpu",
    "validation_step_interval": 100, "validation_stitch_input_location": "left", "validation_using_datasets": None,
    "variant": None, "webhook_config": None, "webhook_reporting_interval": None, "write_batch_size": 128,
    "xm_block_size": 0, "xm_candidate_count": 1, "xm_enabled": False, "xm_selection_scope": "sample",
    "xm_training_target": "noise",
}  # fmt: skip

#: options read with a note: trackers, the hub, caches, compilation, devices and speed change nothing learned
NOTED_PREFIXES = ("tracker_", "hub_", "push_", "model_card_", "webhook_", "dynamo_", "fsdp_", "nsfw_", "aws_",
                  "cache_dir", "vae_cache_", "text_cache_", "ramtorch", "group_offload_", "debug_", "print_",
                  "disk_low_", "sdnq_", "validation_", "eval_", "num_eval_", "context_parallel_",
                  "gradient_checkpointing_", "musubi_", "metadata_", "publishing_", "post_")  # fmt: skip
NOTED = {"report_to", "logging_dir", "resume_from_checkpoint", "checkpoint_epoch_interval",
         "checkpointing_rolling_steps", "checkpointing_use_tempdir", "delete_invalid_checkpoints",
         "checkpoints_rolling_total_limit", "custom_tracker", "merge_environment_config", "configs_dir",
         "enable_watermark", "local_rank", "accelerate_config", "accelerate_extra_args", "deepspeed_config",
         "num_processes", "num_machines", "main_process_ip", "main_process_port", "machine_rank", "same_network",
         "max_workers", "torch_num_threads", "dataloader_prefetch", "dataloader_prefetch_qlen",
         "aspect_bucket_worker_count", "image_processing_batch_size", "write_batch_size", "read_batch_size",
         "text_encoder_batch_size", "vae_batch_size", "enable_multiprocessing", "keep_vae_loaded",
         "fully_unload_text_encoder", "offload_during_startup", "offload_during_save", "delete_model_after_load",
         "quantize_via", "compress_disk_cache", "preserve_data_backend_cache", "override_dataset_config",
         "skip_file_discovery", "aspect_bucket_disable_rebuild", "disable_benchmark", "disable_tf32",
         "set_grads_to_none", "attention_mechanism", "sageattention_usage", "vae_enable_slicing", "vae_enable_tiling",
         "vae_enable_patch_conv", "vae_enable_temporal_roll", "vae_dtype", "enable_group_offload",
         "accelerator_cache_clear_interval", "seed_for_each_device", "ema_cpu_only",
         "ema_foreach_disable", "num_validation_images", "user_prompt_library", "text_encoder_limit",
         "trust_remote_code", "revision", "variant", "base_model_default_dtype", "unet_attention_slice",
         "find_unused_parameters", "delete_unwanted_images", "delete_problematic_images", "metadata_update_interval",
         "i_know_what_i_am_doing", "fuse_qkv_projections", "optimizer_offload_gradients",
         "fuse_optimizer", "optimizer_release_gradients", "data_aesthetic_score", "lora_format"}  # fmt: skip
#: options :func:`translate_config` (or the dataset and sample readers) turn into sdcore settings
HANDLED = {"model_family", "model_type", "model_flavour", "pretrained_model_name_or_path", "output_dir",
           "conditioning_multidataset_sampling", "masked_loss_probability",
           "data_backend_config", "seed", "max_train_steps", "num_train_epochs", "train_batch_size", "learning_rate",
           "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "lr_end", "optimizer", "adam_beta1",
           "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm", "grad_clip_method",
           "gradient_accumulation_steps", "gradient_checkpointing", "mixed_precision", "lora_rank", "lora_alpha",
           "lora_type", "lora_dropout", "lycoris_config", "flux_lora_target", "init_lora", "checkpoint_step_interval",
           "caption_dropout_probability", "snr_gamma", "loss_type", "huber_schedule", "huber_c", "noise_offset",
           "noise_offset_probability", "offset_noise", "flow_schedule_shift", "flow_schedule_auto_shift",
           "flow_sigmoid_scale", "flow_use_uniform_schedule", "flux_guidance_mode", "flux_guidance_value",
           "flux_guidance_min", "flux_guidance_max", "flux_attention_masked_training", "train_text_encoder",
           "text_encoder_lr", "use_ema", "ema_decay", "ema_update_interval", "ema_warmup_steps", "ema_device",
           "ema_validation",
           "pretrained_vae_model_name_or_path", "resolution", "resolution_type", "minimum_image_size",
           "maximum_image_size", "target_downsample_size", "caption_strategy", "instance_prompt",
           "prepend_instance_prompt", "only_instance_prompt", "aspect_bucket_alignment",
           "validation_prompt", "validation_step_interval", "validation_resolution", "validation_guidance",
           "validation_num_inference_steps", "validation_seed", "validation_negative_prompt", "validation_disable",
           "validation_on_startup", "user_prompt_library", "prediction_type", "checkpoints_total_limit",
           "base_model_precision", "disable_bucket_pruning", "tread_config"}  # fmt: skip
#: ``text_encoder_N_precision`` (N: the family's text encoders in order) -> ``--text-encoder-weights-dtype``
HANDLED |= {f"text_encoder_{n}_precision" for n in range(1, 5)}
#: ``model_family`` -> sdcore's family (sd1x holds SD 1.x and 2.x: sdcore reads which from the model)
FAMILIES = {"sd1x": "sd1", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "chroma": "chroma"}
FLOW_FAMILIES = ("sd3", "flux", "chroma")
#: the hub model SimpleTuner loads when a config gives no pretrained_model_name_or_path: the family's
#: HUGGINGFACE_PATHS at model_flavour, else at its DEFAULT_MODEL_FLAVOUR (helpers/models/<family>/model.py)
HUB_MODELS: dict[str, tuple[str, dict[str, str]]] = {
    "flux": ("krea", {"dev": "black-forest-labs/flux.1-dev", "krea": "black-forest-labs/flux.1-krea-dev",
                      "schnell": "black-forest-labs/flux.1-schnell", "kontext": "black-forest-labs/flux.1-kontext-dev",
                      "fluxbooru": "terminusresearch/fluxbooru-v0.3", "libreflux": "jimmycarter/LibreFlux-SimpleTuner"}),
    "chroma": ("base", {"base": "lodestones/Chroma1-Base", "hd": "lodestones/Chroma1-HD",
                        "flash": "lodestones/Chroma1-Flash"}),
    "sd3": ("medium", {"medium": "stabilityai/stable-diffusion-3.5-medium",
                       "large": "stabilityai/stable-diffusion-3.5-large"}),
    "sdxl": ("base-1.0", {"base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
                          "refiner-1.0": "stabilityai/stable-diffusion-xl-refiner-1.0",
                          "base-0.9": "stabilityai/stable-diffusion-xl-base-0.9",
                          "refiner-0.9": "stabilityai/stable-diffusion-xl-refiner-0.9"}),
    "sd1x": ("dreamshaper", {"1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                             "1.4": "CompVis/stable-diffusion-v1-4", "dreamshaper": "Lykon/dreamshaper-8",
                             "realvis": "SG161222/RealVisXL_V5.0"}),
}  # fmt: skip
#: ``optimizer`` -> sdcore's optimizer (SimpleTuner's helpers/training/optimizer_param.py names); adamw_bf16 is
#: AdamW on bf16 weights with stochastic rounding, sdcore's AdamW keeps fp32 weights and moments (a note).
#: torch-optimi's AdamW, Adam (L2 decay at its weight_decay 0 is no decay: AdamW's rule), Lion and SGD have the
#: update rules of torch's AdamW, lion-pytorch's Lion and torch's SGD; their Kahan summation only compensates
#: the rounding of bf16/fp16 weights, which sdcore's fp32 adapter weights do not have (a note)
OPTIMIZERS = {"adamw_bf16": "adamw", "adamw": "adamw", "bnb-adamw8bit": "adamw8bit", "bnb-lion8bit": "lion8bit",
              "bnb-lion": "lion", "prodigy": "prodigy", "adafactor": "adafactor",
              "adamw_schedulefree": "adamwschedulefree", "optimi-adamw": "adamw", "optimi-adam": "adamw",
              "optimi-lion": "lion", "optimi-sgd": "sgd", "torch-adamw": "adamw", "torch-sgd": "sgd"}  # fmt: skip
#: the optimizers' settings SimpleTuner passes (optimizer_param.py ``default_settings``; outside DeepSpeed its
#: adam_beta1/2, adam_weight_decay and adam_epsilon options are not read), as sdcore --optimizer-args
OPTIMIZER_SETTINGS = {
    "adamw_bf16": "betas=0.9,0.999 weight_decay=0.01 eps=1e-06",
    "adamw": "betas=0.9,0.999 weight_decay=0.01 eps=1e-08",  # an older name: torch-adamw's settings
    "torch-adamw": "betas=0.9,0.999 weight_decay=0.01 eps=1e-08",
    "torch-sgd": "momentum=0.0 weight_decay=0.0",
    "bnb-adamw8bit": "betas=0.9,0.999 weight_decay=0.01 eps=1e-06",
    "adamw_schedulefree": "betas=0.9,0.999 weight_decay=0.01 eps=1e-08",
    "optimi-adamw": "betas=0.9,0.99 weight_decay=0.0 eps=1e-06",
    "optimi-adam": "betas=0.9,0.99 weight_decay=0.0 eps=1e-06",
    "optimi-lion": "betas=0.9,0.99 weight_decay=0.0",
    "bnb-lion": "betas=0.9,0.99 weight_decay=0.0",
    "bnb-lion8bit": "betas=0.9,0.99 weight_decay=0.0",
    "optimi-sgd": "momentum=0.0 weight_decay=0.0",
}
#: ``base_model_precision`` (helpers/training/__init__.py quantised_precision_levels: the denoiser's frozen
#: weights; the text encoders have their own text_encoder_N_precision) -> sdcore's --base-weights-dtype storage
#: and what differs. sdcore's int8 is symmetric absmax per output row, fp8 a plain float8_e4m3fn cast,
#: nf4 QLoRA's NormalFloat4 in blocks of 64 (sdcore.train.base_weights); None: frozen weights kept in the
#: compute dtype (a 16-bit SimpleTuner storage, no worse than bf16)
_SAME_KIND = "the same kind of rounding as {}, not the same numbers"
PRECISIONS: dict[str, tuple[str | None, str]] = {
    "int8-quanto": ("int8", _SAME_KIND.format("optimum-quanto's qint8 (absmax per row)")),
    "int8-torchao": ("int8", _SAME_KIND.format("torchao's int8 weight-only (absmax per row)")),
    "int8dq-torchao": ("int8", "torchao's int8 weights per row, without its int8 dynamic activations (sdcore "
                               "computes in the compute dtype)"),
    "int8-sdnq": ("int8", _SAME_KIND.format("SDNQ's int8")),
    "uint8-sdnq": ("int8", "symmetric int8 per row, not SDNQ's uint8 with a zero point: a few codes differ"),
    "int6-sdnq": ("int8", "int8 per row, finer than SDNQ's int6: the frozen weights round less"),
    "int5-sdnq": ("int8", "int8 per row, finer than SDNQ's int5: the frozen weights round less"),
    "uint5-sdnq": ("int8", "int8 per row, finer than SDNQ's uint5: the frozen weights round less"),
    "int4-quanto": ("nf4", "QLoRA's NormalFloat4 in blocks of 64, not quanto's uniform int4 with a scale per group: "
                           "the same memory class, different numbers"),
    "int4-torchao": ("nf4", "QLoRA's NormalFloat4 in blocks of 64, not torchao's int4 weight-only (uniform codes "
                            "per group): the same memory class, different numbers"),
    "uint4-sdnq": ("nf4", "QLoRA's NormalFloat4 in blocks of 64, not SDNQ's uint4: the same memory class, "
                          "different numbers"),
    "nf4-bnb": ("nf4", "bitsandbytes' NF4 codes in blocks of 64, absmax kept in fp32 (bitsandbytes may quantize "
                       "them again): the same codes"),
    "int8dq-int4-torchao": ("nf4", "NormalFloat4 weights in blocks of 64, not torchao's int4 weights with int8 "
                                   "dynamic activations"),
    "fp8-int4-torchao": ("nf4", "NormalFloat4 weights in blocks of 64, not torchao's int4 weights with fp8 "
                                "dynamic activations"),
    "fp8-quanto": ("fp8", _SAME_KIND.format("optimum-quanto's qfloat8 (float8_e4m3fn)")),
    "fp8uz-quanto": ("fp8", "float8_e4m3fn, not quanto's float8_e4m3fnuz: a different fp8 grid"),
    "fp8-native": ("fp8", _SAME_KIND.format("SimpleTuner's native fp8 (float8_e4m3fn)")),
    "fp8-torchao": ("fp8", "fp8 weights without torchao's fp8 dynamic activations (sdcore computes in the compute "
                           "dtype)"),
    "fp8wo-torchao": ("fp8", _SAME_KIND.format("torchao's fp8 weight-only")),
    "fp8-sdnq": ("fp8", "fp8 weights without SDNQ's fp8 matmul (sdcore computes in the compute dtype)"),
    "fp8-transformerengine": ("fp8", "fp8 weights without Transformer Engine's fp8 matmul (sdcore computes in "
                                     "the compute dtype)"),
    "int16-sdnq": (None, "kept in the compute dtype (bf16 under mixed precision), not SDNQ's int16"),
    "uint16-sdnq": (None, "kept in the compute dtype (bf16 under mixed precision), not SDNQ's uint16"),
    "fp16-sdnq": (None, "kept in the compute dtype (bf16 under mixed precision), not SDNQ's fp16"),
}  # fmt: skip
#: below 4 bits: sdcore's nf4 rounds the frozen weights far less, which changes what the adapter learns to make up for
COARSER_PRECISIONS = ("int2-quanto", "uint3-sdnq", "uint2-sdnq")
#: SimpleTuner optimizers sdcore lacks -> the nearest sdcore optimizer to suggest (StableAdamW scales each
#: tensor's step by its gradient's RMS against the second moment; RAdam, Ranger and Adan are other rules)
NEAREST_OPTIMIZERS = {"optimi-stableadamw": "adamw", "optimi-adan": "adamw", "optimi-ranger": "adamw",
                      "optimi-radam": "radamschedulefree", "ao-adamw8bit": "adamw8bit",
                      "ao-adamw4bit": "adamw8bit", "ao-adamfp8": "adamw8bit", "ao-adamwfp8": "adamw8bit",
                      "soap": "adamw", "bnb-paged-adamw8bit": "pagedadamw8bit", "bnb-ademamix": "adamw"}  # fmt: skip
#: ``lr_scheduler`` -> sdcore's (diffusers' get_scheduler names; cosine_with_warmup is SimpleTuner's alias of cosine)
SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant_with_warmup", "cosine": "cosine",
              "cosine_with_warmup": "cosine", "cosine_with_restarts": "cosine_with_restarts", "linear": "linear",
              "polynomial": "polynomial"}  # fmt: skip
#: ``flux_lora_target`` -> the PEFT target module names SimpleTuner gives (helpers/models/flux/model.py
#: get_lora_target_layers), as sdcore --layer-filter patterns (a diffusers path contains one). The fused names
#: (to_qkv, add_qkv_proj) exist only with fuse_qkv_projections, which sdcore does not do, so they are left out.
#: PEFT matches a name or its dotted tail, so all+ffs's proj_out is also the final layer (added by the reader).
FLUX_TARGETS = {
    "all": ("attn.to_k", "attn.to_q", "attn.to_v", "add_k_proj", "add_q_proj", "add_v_proj", "to_out.0",
            "to_add_out"),
    "context": ("add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"),
    "context+ffs": ("add_k_proj", "add_q_proj", "add_v_proj", "to_add_out", "ff_context.net.0.proj",
                    "ff_context.net.2"),
    "all+ffs": ("attn.to_k", "attn.to_q", "attn.to_v", "add_k_proj", "add_q_proj", "add_v_proj", "to_out.0",
                "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                "proj_out"),
    "tiny": ("single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"),
    "nano": ("single_transformer_blocks.7.proj_out",),
}  # fmt: skip
#: SD3, SDXL and SD 1.x/2.x standard LoRAs: the models' DEFAULT_LORA_TARGET (to_k, to_q, to_v, to_out.0)
ATTENTION_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
#: the data backend's keys (documentation/DATALOADER.md) this reader translates, notes, or refuses away from
#: their defaults
BACKEND_HANDLED = {"id", "type", "dataset_type", "instance_data_dir", "repeats", "resolution", "resolution_type",
                   "minimum_image_size", "maximum_image_size", "target_downsample_size", "crop", "crop_style",
                   "crop_aspect", "caption_strategy", "instance_prompt", "prepend_instance_prompt",
                   "only_instance_prompt", "probability", "is_regularisation_data", "is_regularization_data",
                   "disabled", "disable", "default", "conditioning_data", "conditioning_type",
                   "source_dataset_id"}  # fmt: skip
BACKEND_NOTED = {"cache_dir_vae", "vae_cache_clear_each_epoch", "text_embeds", "image_embeds", "skip_file_discovery",
                 "preserve_data_backend_cache", "cache_dir", "metadata_backend", "hash_filenames",
                 "write_batch_size", "vae_cache_ondemand", "vae_cache_disable", "cache_file_suffix",
                 "metadata_update_interval", "ignore_epochs", "delete_unwanted_images",
                 "delete_problematic_images"}  # fmt: skip
#: data backend keys that change what trains and that sdcore does not implement (refused when given)
BACKEND_REFUSED = {"conditioning", "caption_shuffle",
                   "minimum_aspect_ratio", "maximum_aspect_ratio", "max_upscale_threshold", "max_num_samples",
                   "start_epoch", "start_step", "end_epoch", "end_step", "timestep_sampling_offset",
                   "slider_strength", "crop_aspect_buckets", "train_batch_size", "parquet", "huggingface",
                   "disable_multiline_split", "video", "audio"}  # fmt: skip
#: LyCORIS JSON keys (documentation/LYCORIS.md, LyCORIS' create_lycoris arguments) -> sdcore's options
LYCORIS_ALGOS = ("lora", "locon", "loha", "lokr")
LYCORIS_KEYS = {"algo", "multiplier", "linear_dim", "linear_alpha", "conv_dim", "conv_alpha", "factor",
                "full_matrix", "dropout", "rank_dropout", "module_dropout", "apply_preset", "use_tucker",
                "decompose_both", "rank_dropout_scale", "bypass_mode"}  # fmt: skip
#: ``apply_preset.target_module`` names -> --layer-filter patterns of the diffusers paths inside such modules
LYCORIS_MODULES = {"Attention": ("attn",), "FeedForward": ("ff.net", "ff_context.net")}
CONFIG_SUFFIXES = (".json", ".toml")
#: SimpleTuner's legacy option names its config loader forwards (cli_utils.py _LEGACY_ARG_HANDLERS, the
#: registry's aliases) -> today's names
LEGACY_NAMES = {"checkpointing_steps": "checkpoint_step_interval", "validation_steps": "validation_step_interval",
                "save_total_limit": "checkpoints_total_limit", "fused_qkv_projections": "fuse_qkv_projections"}  # fmt: skip
#: keys SimpleTuner's config loader drops (UI-only and dataset-only names; vae_cache_preprocess: a cache choice)
LOADER_DROPPED = {"aspect_ratio_bucketing", "aspect_ratio_bucket_min", "aspect_ratio_bucket_max", "repeats",
                  "ez_model_type", "__disabled_fields__", "__active_tab__", "vae_cache_preprocess"}  # fmt: skip


def _strip(key: Any) -> str:
    return str(key).strip().lstrip("-").replace("-", "_")


def _load_table(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from exc
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: invalid {path.suffix.lstrip('.').upper()}: {exc}") from None


def is_config(data: Any) -> bool:
    """A SimpleTuner config: a flat table whose keys (with or without ``--``) hold ``model_family`` and one of
    ``model_type``, ``pretrained_model_name_or_path`` or ``data_backend_config``."""
    if not isinstance(data, dict):
        return False
    keys = {_strip(k) for k in data}
    return "model_family" in keys and bool(
        keys & {"model_type", "pretrained_model_name_or_path", "data_backend_config"}
    )


def read_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The config in ``path`` with its keys stripped of ``--``, or None when it is not a SimpleTuner
    ``config.json``/``config.toml`` (SimpleTuner's ``config.env`` shell files are not read)."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in CONFIG_SUFFIXES or not p.is_file():
        return None
    if p.suffix.lower() == ".json":
        try:
            head = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        if "model_family" not in head:
            return None
    data = _load_table(p)
    if not is_config(data):
        return None
    out: dict[str, Any] = {}
    for raw, value in data.items():
        # SimpleTuner's loader (cli_utils.py mapping_to_cli_args) passes nothing on for None, "" or the string
        # "false": the option keeps its default (gradient_checkpointing "false" stays on)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "false")):
            continue
        key = _strip(raw)
        if key in LOADER_DROPPED:
            continue
        if key == "ignore_final_epochs":  # forwarded as strict_epoch_limit = not the value
            key, value = "strict_epoch_limit", not _bool(value)
        out[LEGACY_NAMES.get(key, key)] = value
    return out


def is_config_file(path: str | os.PathLike[str]) -> bool:
    try:
        return read_config(path) is not None
    except ConfigError:
        return False


def _bool(value: Any) -> bool:
    """SimpleTuner's reading of a boolean option (cli_utils: "true"/"1"/"yes"/"on" and their opposites)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class _Reader:
    """One config's values over SimpleTuner's defaults; bad numbers are problems, once each."""

    def __init__(self, data: dict[str, Any], where: str, out: JobTranslation) -> None:
        self.data, self.where, self.out = data, where, out

    def given(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str) -> Any:
        return self.data.get(key, DEFAULTS.get(key))

    def flag(self, key: str) -> bool:
        return _bool(self.get(key))

    def number(self, key: str, kind: type = float) -> Any:
        value = self.get(key)
        if value is None or value == "":
            return None
        try:
            number = float(value)
            if kind is int:
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return number
        except (TypeError, ValueError):
            self.out.problems.append(f"{self.where}.{key} {value!r}: a number is needed")
            return None

    def text(self, key: str) -> str:
        value = self.get(key)
        return "" if value is None else str(value).strip()


#: why an option sdcore refuses away from its default is not what an sdcore option of a like name does
REFUSED_WHY = {
    # helpers/models/flux/model.py: controlnet_init builds a FluxControlNetModel beside the frozen transformer
    "controlnet": "SimpleTuner trains a ControlNet (a separate FluxControlNetModel / ControlNetModel, or a LoRA on "
    "it) fed by the conditioning dataset; sdcore trains no ControlNet (sdcore's --control-lora is diffusers' FLUX.1 "
    "control LoRA, whose control image enters the transformer's own widened img_in)",
    # flux/model.py control_init widens x_embedder (and reads pos_embed.proj, which diffusers' FLUX.1 transformer
    # lacks); get_lora_target_layers then forces flux_lora_target "controlnet", whose modules (controlnet_x_embedder,
    # controlnet_blocks.N, controlnet_single_blocks.N) exist in a FluxControlNetModel only; the field registry
    # (sections/model.py) marks it disabled, "Currently disabled for all architectures"
    "control": "SimpleTuner's channel-wise control training widens the transformer's input like diffusers' control "
    "LoRA but puts its LoRA on ControlNet module names (flux_lora_target forced to controlnet) and is disabled in "
    "its own option registry; it is not what sdcore's --control-lora trains (diffusers' train_control_lora_flux.py: "
    "give sdcore's own options, --control-lora with --control-dir, instead of this config)",
}


def _check_options(data: dict[str, Any], where: str, out: JobTranslation) -> None:
    """Unknown names (with the nearest), noted options away from their default, and refused options."""
    unknown = [f"{k!r}{nearest_field(k, DEFAULTS)}" for k in data if k not in DEFAULTS]
    if unknown:
        out.problems.append(f"{where}: unknown SimpleTuner option(s): {', '.join(unknown)}")
    for key, value in data.items():
        if key not in DEFAULTS or key in HANDLED:
            continue
        default = DEFAULTS[key]
        same = same_value(value, default) or (isinstance(default, bool) and _bool(value) == default)
        if key in NOTED or key.startswith(NOTED_PREFIXES):
            if not same:
                out.notes.append(f"{where}.{key}: accepted, no effect on what is learned here")
        elif not same and key in REFUSED_WHY:
            out.problems.append(f"{where}.{key} = {value!r}: {REFUSED_WHY[key]}")
        elif not same:
            out.problems.append(
                f"{where}.{key} = {value!r}: sdcore does not implement this SimpleTuner option (only its default "
                f"{default!r} is accepted)"
            )


def translate_config(
    data: dict[str, Any], fields: list[str], *, where: str, path: str | os.PathLike[str]
) -> JobTranslation:
    """sdcore option values for a SimpleTuner config (``fields``: the method's option names); ``data`` and
    ``sample_prompts`` point at the config ``path`` itself."""
    out = JobTranslation()
    _check_options(data, where, out)
    r = _Reader(data, where, out)
    v = out.values
    family_name = r.text("model_family").lower()
    family = FAMILIES.get(family_name)
    if family is None:
        out.problems.append(
            f"{where}.model_family {family_name!r}: a model family sdcore does not train (it reads SimpleTuner's "
            f"{', '.join(FAMILIES)})"
        )
    flow = family in FLOW_FAMILIES
    model_type = r.text("model_type").lower()
    if model_type not in ("lora", "full"):
        out.problems.append(f"{where}.model_type {model_type!r}: sdcore reads SimpleTuner's lora and full runs")
    if model_type == "lora" and "rank" not in fields:
        out.problems.append(f"{where}: model_type lora is a LoRA run: use sdcore train lora")
    if model_type == "full" and "rank" in fields:
        out.problems.append(f"{where}: model_type full is a full fine-tune: use sdcore train dreambooth")
    if not r.text("pretrained_model_name_or_path"):
        out.needs["model"] = f"{where}.pretrained_model_name_or_path: {_hub_model(r, family_name)}"
    else:
        v["model"] = r.text("pretrained_model_name_or_path")
    predicts = r.text("prediction_type").lower()
    if predicts and flow:
        out.notes.append(f"{where}.prediction_type {predicts}: {family} trains with flow matching here; not applied")
    elif predicts in ("epsilon", "v_prediction"):
        # models/sd1x, sdxl: PREDICTION_TYPE = PredictionTypes.from_str(prediction_type), which picks the loss
        # target (get_prediction_target: get_velocity for v) whatever the model's scheduler says
        v["prediction_type"] = predicts
    elif predicts:
        out.problems.append(f"{where}.prediction_type {predicts}: sdcore trains SD models as epsilon or v_prediction")
    vae = r.text("pretrained_vae_model_name_or_path")
    if family in ("sdxl", "sd1") and r.given("pretrained_vae_model_name_or_path") and Path(vae).expanduser().exists():
        v["vae"] = vae
    elif family in ("sdxl", "sd1"):
        out.notes.append(
            f"{where}.pretrained_vae_model_name_or_path {vae!r}: sdcore reads no model hub; the model's own VAE is "
            "used (give a local VAE file or folder to train on SimpleTuner's)"
        )
    output = Path(r.text("output_dir") or "simpletuner-results").expanduser()
    # SimpleTuner's final LoRA: output_dir/pytorch_lora_weights.safetensors; a full fine-tune: a diffusers folder
    v["output"] = str(output / "pytorch_lora_weights.safetensors") if model_type == "lora" else str(output)
    if model_type == "full":
        v["save_format"] = "diffusers"
    v["data"] = str(path)
    seed = r.number("seed", int)
    if seed is not None:
        v["seed"] = seed
    else:
        out.notes.append(f"{where}.seed: not given (SimpleTuner draws one); sdcore's seed 42 is used")
    _training(r, family, flow, out)
    _text_encoder_precisions(r, family, out)
    if model_type == "lora":
        _lora(r, family, out)
    _timesteps(r, family, flow, out)
    _validation(r, family, path, out)
    _ema(r, out)  # after the validation: its note says what the samples show
    _kontext(r, out)
    backend = r.text("data_backend_config")
    if not backend:
        out.problems.append(f"{where}.data_backend_config: the data backend JSON is needed")
    else:
        for problem in _backend_problems(Path(backend).expanduser(), f"{where}.data_backend_config", data):
            out.problems.append(problem)
        out.notes.extend(_crop_notes(Path(backend).expanduser(), f"{where}.data_backend_config", data))
        out.notes.extend(_conditioning_notes(Path(backend).expanduser(), f"{where}.data_backend_config", data))
    _masked_loss(r, Path(backend).expanduser() if backend else None, out)
    drop_foreign_options(v, fields, f"{where}: not options of this training method", out.problems)
    return out


def _is_kontext(top: dict[str, Any]) -> bool:
    """A FLUX.1 Kontext run: ``model_family flux`` with ``model_flavour kontext`` (flux/model.py keys every Kontext
    behaviour, its need of a conditioning dataset included, on that flavour)."""
    family = str(top.get("model_family", "")).strip().lower()
    return family == "flux" and str(top.get("model_flavour", "")).strip().lower() == "kontext"


def _kontext(r: _Reader, out: JobTranslation) -> None:
    """``conditioning_multidataset_sampling`` (how SimpleTuner mixes several conditioning datasets of one training
    dataset: sampler.py ``connect_conditioning_samples``) and a Kontext run's validation."""
    sampling = r.text("conditioning_multidataset_sampling").lower()
    if sampling and sampling not in ("random", "combined"):
        out.problems.append(
            f"{r.where}.conditioning_multidataset_sampling {sampling!r}: SimpleTuner's are random and combined"
        )
    elif sampling == "combined":
        out.notes.append(
            f"{r.where}.conditioning_multidataset_sampling combined: sdcore reads one reference (and one mask) dataset "
            "per training dataset and gives each image both; with one conditioning dataset, combined and random are "
            "the same"
        )
    if _is_kontext(r.data) and (r.given("validation_prompt") or r.given("user_prompt_library")):
        out.notes.append(
            f"{r.where}: model_flavour kontext: SimpleTuner's validation edits the paired reference images of its "
            "datasets; sdcore's samples from validation_prompt have none and render text-to-image (a sample prompt "
            "file line's --ctrl_img PATH gives one)"
        )


def _masked_loss(r: _Reader, backend: Path | None, out: JobTranslation) -> None:
    """``--masked-loss`` when a training dataset names a ``conditioning_type mask`` or ``segmentation`` dataset (its
    subset's ``conditioning_data_dir`` and ``mask_kind``: :func:`_conditioning_folders`); the other subsets have no
    mask, so their loss is unweighted, as SimpleTuner's batches without one. ``masked_loss_probability`` is drawn
    for segmentation masks only (models/common.py ``loss``): ``--masked-loss-probability`` with a segmentation
    dataset, a note otherwise (a mask weighs every step)."""
    kinds: set[str] = set()
    if backend is not None:
        try:
            backends = _backends(backend, f"{r.where}.data_backend_config")
        except ConfigError:
            backends = []  # reported by the data backend's reading
        conditioning = _conditioning_backends(backends, backend, "")
        kinds = {
            str(conditioning.get(str(i), ("", {}))[1].get("conditioning_type"))
            for b in backends
            if isinstance(b, dict) and not _disabled(b) and not _is_conditioning(b)
            for i in _conditioning_ids(b)
        } & set(MASK_TYPES)
    if kinds:
        out.values["masked_loss"] = True
    probability = r.number("masked_loss_probability")
    if probability is None or probability == DEFAULTS["masked_loss_probability"]:
        return
    if "segmentation" in kinds:
        out.values["masked_loss_probability"] = float(probability)
    else:
        out.notes.append(
            f"{r.where}.masked_loss_probability {probability}: SimpleTuner draws it for segmentation masks only; "
            "mask datasets (conditioning_type mask) weigh every step's loss: no effect here"
        )


def _hub_model(r: _Reader, family_name: str) -> str:
    """What SimpleTuner loads without ``pretrained_model_name_or_path`` and what sdcore needs instead."""
    need = "sdcore reads no model hub: give a local copy's path (pretrained_model_name_or_path or --model)"
    if family_name not in HUB_MODELS:
        return f"not given; {need}"
    default, paths = HUB_MODELS[family_name]
    flavour = r.text("model_flavour") or default
    if flavour not in paths:
        return f"not given, and model_flavour {flavour!r} is none of {family_name}'s ({', '.join(paths)}); {need}"
    return (
        f"not given: SimpleTuner would download {paths[flavour]} (model_family {family_name}, model_flavour "
        f"{flavour}); {need}"
    )


def _bucket_pruning(r: _Reader, out: JobTranslation) -> None:
    """SimpleTuner drops an aspect bucket whose images x (repeats + 1) are fewer than train_batch_size
    (metadata/backends/base.py ``_prune_small_buckets``) unless ``disable_bucket_pruning``; sdcore never drops
    one (a short last batch is trained: sdcore.data.sampler), so ``true`` is sdcore's behaviour."""
    batch = r.number("train_batch_size", int) or 1
    if not r.flag("disable_bucket_pruning") and batch > 1:
        out.notes.append(
            f"{r.where}.disable_bucket_pruning false: SimpleTuner leaves out a bucket with fewer images x (repeats "
            f"+ 1) than train_batch_size {batch}; sdcore trains them in a shorter batch (as disable_bucket_pruning "
            "true)"
        )


def _tread(r: _Reader, out: JobTranslation) -> None:
    """``tread_config`` ``{"routes": [{"selection_ratio", "start_layer_idx", "end_layer_idx"}, ...]}`` (a mapping,
    or its JSON text as SimpleTuner's command line takes it) -> ``--tread-route RATIO:START:END`` each: the same
    meaning (the share dropped; global block indexes, negative from the end, the end inclusive:
    helpers/training/tread.py and the FLUX.1/SD3 transformers' forwards). Each malformed route is one problem."""
    config = r.get("tread_config")
    if not config:
        return
    where = f"{r.where}.tread_config"
    if isinstance(config, str):  # SimpleTuner reads the text with ast.literal_eval: JSON or a Python literal
        import ast

        try:
            config = json.loads(config)
        except ValueError:
            try:
                config = ast.literal_eval(config.strip())
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                out.problems.append(f"{where}: not a JSON object or Python dict literal")
                return
    routes = config.get("routes") if isinstance(config, dict) else None
    if not isinstance(routes, list) or not routes:
        out.problems.append(f'{where}: needs "routes", a list of {{selection_ratio, start_layer_idx, end_layer_idx}}')
        return
    from .token_routing import parse_route

    values = []
    for number, route in enumerate(routes):
        keys = ("selection_ratio", "start_layer_idx", "end_layer_idx")
        if not isinstance(route, dict) or any(key not in route for key in keys):
            out.problems.append(f"{where}.routes[{number}]: needs {', '.join(keys)}")
            continue
        ratio, start, end = (route[key] for key in keys)
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or any(isinstance(i, bool) or not isinstance(i, int) for i in (start, end))
        ):
            out.problems.append(f"{where}.routes[{number}]: selection_ratio must be a number, the indexes integers")
            continue
        text = f"{float(ratio):g}:{start}:{end}"
        try:
            parse_route(text)
        except ConfigError as exc:
            out.problems.append(f"{where}.routes[{number}]: {exc}")
            continue
        values.append(text)
    if values and len(values) == len(routes):
        out.values["tread_route"] = tuple(values)


def _text_encoder_precisions(r: _Reader, family: str | None, out: JobTranslation) -> None:
    """``text_encoder_N_precision``: SimpleTuner quantises text encoder N (its order is sdcore's) with the preset;
    sdcore stores that encoder's frozen Linear weights in the nearest format (--text-encoder-weights-dtype, one
    value when they agree); the numbers differ slightly from quanto's/torchao's kernels (a note)."""
    from ..models.family import get_family

    count = len(get_family(family).text_encoders) if family else 0
    chosen = []
    for n in range(1, 5):
        preset = r.text(f"text_encoder_{n}_precision") or "no_change"
        if preset == "no_change":
            chosen.append("none")
            continue
        if n > count:
            out.notes.append(f"{r.where}.text_encoder_{n}_precision: the model has no text encoder {n}; no effect")
            continue
        if preset not in PRECISIONS:
            coarser = preset in COARSER_PRECISIONS
            out.problems.append(
                f"{r.where}.text_encoder_{n}_precision {preset!r}: "
                + ("sdcore stores frozen weights in 4 bits at the fewest (nearest: nf4-bnb)" if coarser else
                   f"not one of SimpleTuner's precisions{nearest_field(preset, PRECISIONS)}")
            )  # fmt: skip
            chosen.append("none")
            continue
        storage, difference = PRECISIONS[preset]  # the one table of SimpleTuner's presets (base_model_precision's)
        chosen.append(storage or "none")
        out.notes.append(
            f"{r.where}.text_encoder_{n}_precision {preset}: stored as sdcore's {storage or 'compute dtype'} "
            f"({difference})"
        )
    chosen = chosen[:count]
    if any(value != "none" for value in chosen):
        out.values["text_encoder_weights_dtype"] = chosen[0] if len(set(chosen)) == 1 else ",".join(chosen)


def _training(r: _Reader, family: str | None, flow: bool, out: JobTranslation) -> None:
    v, w = out.values, r.where
    steps = r.number("max_train_steps", int)
    epochs = r.number("num_train_epochs", int)
    if steps:  # SimpleTuner: max_train_steps wins; num_train_epochs 0 means "run by steps"
        v["max_steps"] = steps
    elif epochs:
        v["epochs"] = epochs
    else:
        out.problems.append(f"{w}: max_train_steps or num_train_epochs is needed")
    for key, target in (("learning_rate", "lr"), ("train_batch_size", "batch_size"),
                        ("gradient_accumulation_steps", "gradient_accumulation"), ("lr_warmup_steps", "lr_warmup_steps"),
                        ("checkpoint_step_interval", "save_every"), ("checkpoints_total_limit", "save_limit")):  # fmt: skip
        number = r.number(key, float if key == "learning_rate" else int)
        if number is not None:
            v[target] = number
    v["save_dtype"] = "bf16" if r.text("mixed_precision") == "bf16" else "fp32"
    v["gradient_checkpointing"] = r.flag("gradient_checkpointing")
    precision = r.text("mixed_precision") or "no"
    if precision in ("no", "fp16", "bf16"):
        v["mixed_precision"] = precision
    else:
        out.problems.append(f"{w}.mixed_precision {precision!r}: sdcore trains with no, fp16 or bf16 mixed precision")
    _schedule(r, out)
    _optimizer(r, out)
    _precision(r, out)
    _bucket_pruning(r, out)
    _tread(r, out)
    dropout = r.number("caption_dropout_probability")
    if dropout:
        v["caption_dropout"] = dropout
    loss = r.text("loss_type")
    v["loss_type"] = loss
    if loss in ("huber", "smooth_l1"):
        v["huber_schedule"] = r.text("huber_schedule")
        v["huber_c"] = r.number("huber_c")
    gamma = r.number("snr_gamma")
    if gamma and flow:
        out.notes.append(f"{w}.snr_gamma: no effect on flow-matching models (as in SimpleTuner)")
    elif gamma:
        v["min_snr_gamma"] = gamma
    if r.flag("offset_noise") and not flow:  # common.py: only with offset_noise, never on flow matching
        v["noise_offset"] = r.number("noise_offset")
        probability = r.number("noise_offset_probability")
        if probability is not None and probability != 1.0:
            out.problems.append(
                f"{w}.noise_offset_probability {probability}: SimpleTuner adds the offset noise to that share of "
                "the steps; sdcore adds it on every step (set it to 1)"
            )
    _text_encoder(r, family, out)


def _text_encoder(r: _Reader, family: str | None, out: JobTranslation) -> None:
    """``train_text_encoder`` (+ ``text_encoder_lr``): SimpleTuner documents it as "also train the text encoder
    (CLIP) model"; its optimizer gets every CLIP encoder's trainable tensors (T5 is skipped: "does not support
    finetuning"; SD3's third encoder is not trained), in their own group at ``text_encoder_lr`` when given
    (trainer.py), else at ``learning_rate``; LyCORIS runs refuse it (safety_check.py). sdcore trains the CLIP
    encoders with ``--train-text-encoder`` (T5 only with ``--train-t5``, not set here): a LoRA on them for a
    LoRA run, the full encoders for a full run; ``--te-lr`` is ``text_encoder_lr``. SimpleTuner's own trainer
    (bc8e6ab) adds no adapter to the encoders, keeps them ``requires_grad_(False)`` and encodes the captions
    under ``no_grad``, so its run leaves them as they were: a note says so."""
    w = r.where
    rate = r.number("text_encoder_lr")
    if not r.flag("train_text_encoder"):
        if rate is not None:
            out.notes.append(f"{w}.text_encoder_lr: without train_text_encoder no text encoder trains; not used")
        return
    if r.text("lora_type").lower() == "lycoris" and r.text("model_type").lower() == "lora":
        out.problems.append(f"{w}.train_text_encoder with lora_type lycoris: SimpleTuner refuses it (LyCORIS trains "
                            "the denoiser only); remove train_text_encoder")  # fmt: skip
        return
    if family == "chroma":
        out.problems.append(f"{w}.train_text_encoder: Chroma's only text encoder is T5, which SimpleTuner does not "
                            "train (it skips T5 encoders); remove train_text_encoder")  # fmt: skip
        return
    out.values["train_text_encoder"] = True
    if rate is not None:
        out.values["te_lr"] = rate
    clip = {"sd3": "CLIP-L and CLIP-G, not T5", "flux": "CLIP-L, not T5"}.get(family or "", "its CLIP encoder(s)")
    what = "a LoRA on " if r.text("model_type").lower() == "lora" else ""
    out.notes.append(
        f"{w}.train_text_encoder: sdcore trains {what}{clip} (--train-text-encoder"
        + (f", --te-lr {rate:g}" if rate is not None else "")
        + "), as SimpleTuner documents the option; SimpleTuner's own trainer at bc8e6ab adds no adapter to the "
        "text encoders and encodes captions without gradients, so its run leaves them unchanged (remove "
        "train_text_encoder to train as it did)"
    )


def _ema(r: _Reader, out: JobTranslation) -> None:
    """``use_ema`` (helpers/training/ema.py ``EMAModel``, built with ``decay = ema_decay`` and
    ``warmup_steps = ema_warmup_steps``, the rest at its defaults: min_decay 0, update_after_step 0, no
    inv_gamma/power warm-up): stepped after optimizer step n (its global_step, already counted) when
    ``n % ema_update_interval == 0``, with the decay ``get_decay(n)``: 0 at n = 1, then
    ``min(ema_decay, (1 + u) / (10 + u))`` with u = n - 1 -- sdcore's ``--ema-warmup diffusers``; with
    ``ema_warmup_steps`` W > 0, 0 while n < W and ``ema_decay`` from W on -- ``--ema-warmup copy``. The average
    covers the denoiser's trained tensors (its LoRA, or the full model); validation and the full model's final
    save use it; a LoRA run saves its raw LoRA as the result and the average beside each checkpoint
    (``ema/``)."""
    v, w = out.values, r.where
    if not r.flag("use_ema"):
        given = [k for k in ("ema_decay", "ema_update_interval", "ema_warmup_steps", "ema_validation") if r.given(k)]
        if given:
            out.notes.append(f"{w}: {', '.join(given)} without use_ema: not used (as in SimpleTuner)")
        return
    decay = r.number("ema_decay")
    interval = r.number("ema_update_interval", int)
    warmup_steps = r.number("ema_warmup_steps", int) or 0
    v["ema"] = True
    if decay is None or not 0.0 < decay < 1.0:
        out.problems.append(f"{w}.ema_decay {r.get('ema_decay')!r}: a decay between 0 and 1 is needed")
    else:
        v["ema_decay"] = decay
    v["ema_update_every"] = 1 if interval is None else interval  # None: every step (should_update_ema)
    if warmup_steps > 0:
        v["ema_warmup"] = "copy"
        v["ema_warmup_steps"] = warmup_steps
    else:
        v["ema_warmup"] = "diffusers"
    device = r.text("ema_device") or "cpu"
    if device not in ("cpu", "accelerator"):
        out.problems.append(f"{w}.ema_device {device!r}: choose cpu or accelerator")
    else:
        v["ema_device"] = "cpu" if device == "cpu" else "same"
    lora = r.text("model_type").lower() == "lora"
    out.notes.append(
        f"{w}.use_ema: sdcore saves the average as the result"
        + (" (SimpleTuner's pytorch_lora_weights.safetensors is the raw LoRA; its average is each checkpoint's "
           "ema/ file)" if lora else " (as SimpleTuner's final pipeline)")
        + " and keeps it in fp32 (SimpleTuner stores it in the training weight dtype: bf16 under mixed_precision "
        "bf16)"
        + ("; a trained text encoder is averaged too (SimpleTuner averages the denoiser only)"
           if r.flag("train_text_encoder") else "")
    )  # fmt: skip
    mode = r.text("ema_validation") or "comparison"
    if mode not in ("none", "ema_only", "comparison"):
        out.problems.append(f"{w}.ema_validation {mode!r}: choose none, ema_only or comparison")
    elif mode != "ema_only" and "sample_prompts" in v:
        seen = "the raw weights' images beside them" if mode == "comparison" else "the raw weights instead"
        out.notes.append(f"{w}.ema_validation {mode}: sdcore's samples use the average (SimpleTuner renders {seen})")


def _precision(r: _Reader, out: JobTranslation) -> None:
    """``base_model_precision``: the frozen denoiser weights' storage (the text encoders' own
    ``text_encoder_N_precision`` are read apart)."""
    v, w = out.values, r.where
    name = r.text("base_model_precision") or "no_change"
    if name == "no_change":
        return
    if name in COARSER_PRECISIONS:
        out.problems.append(
            f"{w}.base_model_precision {name!r}: sdcore stores frozen weights in 4 bits at the fewest (nearest: "
            "base_model_precision nf4-bnb, sdcore's --base-weights-dtype nf4)"
        )
        return
    if name not in PRECISIONS:
        out.problems.append(
            f"{w}.base_model_precision {name!r}: not one of SimpleTuner's precisions{nearest_field(name, PRECISIONS)}"
        )
        return
    storage, difference = PRECISIONS[name]
    if storage is not None:
        v["base_weights_dtype"] = storage
    shown = f"--base-weights-dtype {storage}" if storage else "no --base-weights-dtype"
    out.notes.append(f"{w}.base_model_precision {name}: the denoiser's frozen weights: sdcore's {shown} ({difference})")


def _schedule(r: _Reader, out: JobTranslation) -> None:
    v, w = out.values, r.where
    name = r.text("lr_scheduler").lower()
    warmup = r.number("lr_warmup_steps", int) or 0
    if name == "constant" and warmup > 0:  # cli_utils.normalize_lr_scheduler_value
        name = "constant_with_warmup"
    if name not in SCHEDULERS:
        out.problems.append(f"{w}.lr_scheduler {name!r}: sdcore reads SimpleTuner's {', '.join(SCHEDULERS)}")
        return
    v["lr_scheduler"] = SCHEDULERS[name]
    if name == "cosine_with_restarts":
        v["lr_cycles"] = r.number("lr_num_cycles", int)
    if name == "polynomial":
        # diffusers' polynomial decay: (lr - lr_end) * (1 - progress)^power + lr_end
        v["lr_power"] = r.number("lr_power")
        lr, end = r.number("learning_rate"), r.number("lr_end")
        if lr and end is not None:
            v["lr_min_ratio"] = end / lr
    elif r.given("lr_end") or r.given("lr_power"):
        out.notes.append(f"{w}.lr_end/lr_power: used by the polynomial schedule only (as in SimpleTuner)")


def _optimizer(r: _Reader, out: JobTranslation) -> None:
    v, w = out.values, r.where
    name = r.text("optimizer").lower()
    if name in NEAREST_OPTIMIZERS or name not in OPTIMIZERS:
        nearest = NEAREST_OPTIMIZERS.get(name, "adamw")
        out.problems.append(f"{w}.optimizer {name!r}: not in sdcore (the nearest: --optimizer {nearest})")
        return
    v["optimizer"] = OPTIMIZERS[name]
    if name == "adamw_bf16":
        out.notes.append(
            f"{w}.optimizer adamw_bf16: trained with sdcore's AdamW (fp32 weights and moments; SimpleTuner's keeps "
            "bf16 weights with stochastic rounding: the same update, rounded differently)"
        )
    if name.startswith("optimi-"):
        out.notes.append(
            f"{w}.optimizer {name}: sdcore's --optimizer {OPTIMIZERS[name]} has torch-optimi's update rule; optimi's "
            "Kahan summation makes up for bf16 weights' rounding, sdcore's adapter weights are fp32 (no rounding to "
            "make up for)"
        )
    if name in OPTIMIZER_SETTINGS:
        v["optimizer_args"] = OPTIMIZER_SETTINGS[name]
    ignored = [k for k in ("adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon") if r.given(k)]
    if ignored:
        out.notes.append(
            f"{w}: {', '.join(ignored)}: not read by SimpleTuner's optimizers outside DeepSpeed (each uses its own "
            "settings: optimizer_param.py), nor here"
        )
    norm = r.number("max_grad_norm") or 0.0
    method = r.text("grad_clip_method")
    if name == "prodigy" or norm <= 0:  # trainer.py: prodigy and optimi-stableadamw are never clipped
        v["max_grad_norm"] = 0.0
    elif method in ("norm", "value"):  # trainer.py: accelerator.clip_grad_norm_ / clip_grad_value_
        v["max_grad_norm"] = norm
        v["grad_clip_method"] = method
    else:
        out.problems.append(f"{w}.grad_clip_method {method!r}: SimpleTuner clips by value or norm")


def _lora(r: _Reader, family: str | None, out: JobTranslation) -> None:
    v, w = out.values, r.where
    kind = r.text("lora_type").lower()
    if kind == "lycoris":
        _lycoris(r, family, out)
        return
    if kind != "standard":
        out.problems.append(f"{w}.lora_type {kind!r}: choose standard or lycoris")
        return
    rank = r.number("lora_rank", int)
    alpha = r.number("lora_alpha")
    v["algo"] = "lora"
    v["rank"] = rank
    v["alpha"] = rank if alpha is None else alpha  # common.py add_lora_adapter: lora_alpha or lora_rank
    dropout = r.number("lora_dropout")
    if dropout:  # common.py add_lora_adapter: PEFT's LoraConfig(lora_dropout=...), dropout on each module's input
        v["lora_input_dropout"] = dropout
    if family in FLOW_FAMILIES:
        # SimpleTuner saves transformer LoRAs as diffusers/PEFT keys (transformer.<module>.lora_A/B)
        v["key_layout"] = "diffusers"
        v["split_qkv"] = True
        if alpha is not None and alpha != rank:
            out.problems.append(
                f"{w}.lora_alpha {alpha} with lora_rank {rank}: sdcore's diffusers-layout LoRA files carry no alpha; "
                "give lora_alpha = lora_rank (SimpleTuner's default)"
            )
    if family == "flux":
        target = r.text("flux_lora_target")
        if target not in FLUX_TARGETS:
            out.problems.append(
                f"{w}.flux_lora_target {target!r}: sdcore reads {', '.join(FLUX_TARGETS)} (the other targets adapt "
                "embedders, norms or a ControlNet)"
            )
        else:
            v["layer_filter"] = ",".join(FLUX_TARGETS[target])
            if "proj_out" in FLUX_TARGETS[target] and rank:
                # PEFT also matches the transformer's own final proj_out (kohya's final_layer.linear), which is
                # outside sdcore's default targets
                v["extra_module_ranks"] = f"final_layer_linear={rank}"
    elif family is not None:
        v["layer_filter"] = ",".join(ATTENTION_TARGETS)
    if r.get("init_lora"):
        init = Path(r.text("init_lora")).expanduser()
        if init.is_file():
            v["network_weights"] = str(init)
        else:
            out.problems.append(f"{w}.init_lora {r.text('init_lora')!r}: no such file here (sdcore reads no hub)")


def _lycoris(r: _Reader, family: str | None, out: JobTranslation) -> None:
    """``lycoris_config``'s JSON (LyCORIS' create_lycoris arguments plus apply_preset) as sdcore's LyCORIS options."""
    v, w = out.values, f"{r.where}.lycoris_config"
    path = Path(r.text("lycoris_config")).expanduser()
    if not path.is_file():
        out.problems.append(f"{w} {str(path)!r}: no such file")
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        out.problems.append(f"{w} {path}: cannot read it as JSON ({exc})")
        return
    if not isinstance(config, dict):
        out.problems.append(f"{w} {path}: a JSON table is needed")
        return
    wl = f"{w} {path}"
    unknown = [f"{k!r}{nearest_field(k, LYCORIS_KEYS)}" for k in config if k not in LYCORIS_KEYS]
    if unknown:
        out.problems.append(f"{wl}: unknown LyCORIS key(s): {', '.join(unknown)}")
    algo = str(config.get("algo", "lora")).lower()
    if algo not in LYCORIS_ALGOS:
        out.problems.append(f"{wl}: algo {algo!r}: sdcore's LyCORIS reads {', '.join(LYCORIS_ALGOS)} from here")
        return
    v["algo"] = algo
    dim = config.get("linear_dim")
    if algo == "lokr" and config.get("full_matrix") and (dim is None or dim >= 10000):
        out.problems.append(f"{wl}: lokr with full_matrix (no linear_dim): sdcore's LoKr is low-rank; give linear_dim")
    v["rank"] = int(dim) if dim is not None else 4  # LyCORIS create_lycoris: linear_dim 4, linear_alpha 1
    v["alpha"] = float(config.get("linear_alpha", 1.0))
    if config.get("conv_dim"):
        v["conv_rank"] = int(config["conv_dim"])
        v["conv_alpha"] = float(config.get("conv_alpha", 1.0))
    if algo == "lokr":
        v["lokr_factor"] = int(config.get("factor", -1))
    for key in ("dropout", "rank_dropout", "module_dropout"):
        if config.get(key):
            v[key] = float(config[key])
    for key in ("use_tucker", "decompose_both", "rank_dropout_scale"):
        if config.get(key):
            v[key] = True
    if _bool(config.get("bypass_mode", False)):
        # LyCORIS' bypass_forward: org_forward(x) + the adapter's own forward on x, the same sum as the merged
        # weight's forward (LyCORIS uses it for quantised base weights, which it cannot merge into)
        out.notes.append(
            f"{wl}: bypass_mode: LyCORIS adds the adapter's output to the frozen layer's instead of merging the "
            "weights first; the same result up to rounding, which is how sdcore runs its LyCORIS modules"
        )
    if float(config.get("multiplier", 1.0)) != 1.0:
        out.problems.append(f"{wl}: multiplier {config['multiplier']}: sdcore trains at multiplier 1")
    preset = config.get("apply_preset")
    modules: list[str] = ["Attention"]  # SimpleTuner's DEFAULT_LYCORIS_TARGET (flux, sd3, sdxl models)
    if isinstance(preset, dict):
        other = sorted(set(preset) - {"target_module", "module_algo_map"})
        if other:
            out.problems.append(f"{wl}: apply_preset {other}: sdcore reads target_module (and module_algo_map)")
        modules = list(preset.get("target_module") or modules)
        algo_map = preset.get("module_algo_map") or {}
        differ = [name for name, cfg in algo_map.items() if any(config.get(k) != x for k, x in dict(cfg).items())]
        if differ:
            out.problems.append(
                f"{wl}: apply_preset.module_algo_map gives {', '.join(sorted(differ))} their own settings; sdcore "
                "trains one network setting (put them in the top-level keys)"
            )
    elif preset is not None:
        out.problems.append(f"{wl}: apply_preset must be a table")
    bad = [m for m in modules if m not in LYCORIS_MODULES]
    if bad:
        out.problems.append(f"{wl}: apply_preset.target_module {bad}: sdcore reads {', '.join(LYCORIS_MODULES)}")
    else:
        v["layer_filter"] = ",".join(p for m in modules for p in LYCORIS_MODULES[m])
    if family in FLOW_FAMILIES:
        out.notes.append(f"{wl}: saved in sdcore's kohya LyCORIS layout (SimpleTuner saves LyCORIS' own keys)")


def _timesteps(r: _Reader, family: str | None, flow: bool, out: JobTranslation) -> None:
    """Flow matching as SimpleTuner draws it (common.py sample_flow_sigmas, custom_schedule.py
    apply_flow_schedule_shift): sigmoid(flow_sigmoid_scale * N(0, 1)) (or uniform), then shifted by
    flow_schedule_shift s: s*t/(1+(s-1)*t), or with flow_schedule_auto_shift (which wins when the shift is
    also set) by Flux's resolution-dependent exp(mu); the model's raw output against noise - latents."""
    v, w = out.values, r.where
    if not flow:
        return
    shift = r.number("flow_schedule_shift")
    auto = r.flag("flow_schedule_auto_shift")
    if r.flag("flow_use_uniform_schedule"):
        v["timestep_sampling"] = "uniform"
        if auto:
            out.problems.append(f"{w}.flow_schedule_auto_shift with flow_use_uniform_schedule: not in sdcore")
    else:
        v["timestep_sampling"] = "flux_shift" if auto else "sigmoid"
        v["sigmoid_scale"] = r.number("flow_sigmoid_scale")
    if auto and family not in ("flux", "chroma"):
        out.problems.append(f"{w}.flow_schedule_auto_shift: sdcore's resolution-dependent shift is Flux's")
    if not auto:
        v["discrete_flow_shift"] = shift if shift and shift > 0 else 1.0
    v["model_prediction_type"] = "raw"
    v["weighting_scheme"] = "uniform"
    if family == "flux":
        mode = r.text("flux_guidance_mode")
        if mode == "constant":
            v["guidance_scale"] = r.number("flux_guidance_value")
        else:
            out.problems.append(
                f"{w}.flux_guidance_mode {mode!r}: sdcore trains FLUX.1 with one guidance value (constant)"
            )
        if r.flag("flux_attention_masked_training"):
            v["apply_t5_attn_mask"] = True


def _validation(r: _Reader, family: str | None, path: str | os.PathLike[str], out: JobTranslation) -> None:
    v = out.values
    if r.flag("validation_disable") or not (r.text("validation_prompt") or r.get("user_prompt_library")):
        return
    v["sample_prompts"] = str(path)
    v["sample_every"] = r.number("validation_step_interval", int)
    v["sample_steps"] = r.number("validation_num_inference_steps", int)
    v["sample_at_first"] = r.flag("validation_on_startup")


def _size(text: str, where: str) -> tuple[int, int]:
    """``validation_resolution``: ``1024``, ``1024x768`` (one of a comma list)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            number = float(parts[0])
            side = int(number) if number > 8 else int(round(math.sqrt(number * 1e6) / 64) * 64)  # megapixels
            return side, side
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(f"{where}.validation_resolution {text!r}: WIDTHxHEIGHT or a size is needed") from None


def read_sample_prompts(path: str | os.PathLike[str]) -> list[SamplePrompt]:
    """The config's validation prompts: ``validation_prompt`` and the ``user_prompt_library`` JSON's prompts, at
    each ``validation_resolution``, with ``validation_negative_prompt``, ``validation_num_inference_steps``,
    ``validation_guidance`` (FLUX.1's embedded guidance there: SimpleTuner's real CFG is off at
    ``validation_guidance_real`` 1) and ``validation_seed``."""
    from .sample_prompts import SamplePrompt

    data = read_config(path)
    if data is None:
        raise ConfigError(f"{path}: not a SimpleTuner config")
    where = str(path)
    out = JobTranslation()
    r = _Reader(data, where, out)
    texts = [r.text("validation_prompt")] if r.text("validation_prompt") else []
    library = r.get("user_prompt_library")
    if library:
        lib_path = Path(str(library)).expanduser()
        try:
            table = json.loads(lib_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{where}.user_prompt_library {lib_path}: cannot read it ({exc})") from None
        for value in table.values() if isinstance(table, dict) else table:
            texts.append(str(value.get("prompt", "")) if isinstance(value, dict) else str(value))
    family = FAMILIES.get(r.text("model_family").lower())
    guidance = r.number("validation_guidance")
    seed = r.number("validation_seed", int)
    steps = r.number("validation_num_inference_steps", int)
    negative = r.text("validation_negative_prompt")
    if family == "flux" and (r.number("validation_guidance_real") or 1.0) <= 1.0:
        negative = ""  # FLUX.1 validation uses the negative prompt only with real CFG (validation_guidance_real > 1)
    if out.problems:
        raise ConfigError("; ".join(out.problems))
    sizes = [_size(t.strip(), where) for t in r.text("validation_resolution").split(",") if t.strip()]
    prompts: list[SamplePrompt] = []
    for text in texts:
        for width, height in sizes:
            prompts.append(
                SamplePrompt(
                    prompt=text,
                    negative=negative,
                    width=width,
                    height=height,
                    steps=steps,
                    seed=seed,
                    cfg=None if family == "flux" else guidance,
                    guidance=guidance if family == "flux" else None,
                )
            )
    return prompts


def _backends(path: Path, where: str) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{where} {path}: cannot read it as JSON ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{where} {path}: a JSON list of data backends is needed")
    return data


def _crop_notes(path: Path, where: str, top: dict[str, Any]) -> list[str]:
    """``crop`` false (the default) is not "no crop" in SimpleTuner (training_sample.py ``prepare``/``resize``): the
    image is resized keeping its aspect to an intermediary size covering the aspect bucket
    (``calculate_new_size_by_pixel_area``) and the excess cropped off by the ``crop_style`` handler (default random,
    cropping.py), once, when its VAE cache is built. sdcore does the same bucket resize + crop with the excess at
    the centre (a random spot per use would forbid cached latents), so the pixels differ by that excess only."""
    try:
        backends = _backends(path, where)
    except ConfigError:
        return []  # reported with the backend's problems
    notes = []
    for i, b in enumerate(backends):
        if not isinstance(b, dict) or str(b.get("dataset_type", "image")).lower() != "image" or _is_conditioning(b):
            continue
        style = str(b.get("crop_style", "random"))
        head = f"{where} {path}[{i}] ({b.get('id', '?')})"
        square = _bool(b.get("crop", False)) and str(b.get("crop_aspect", "square")) == "square"
        if str(b.get("resolution_type", top.get("resolution_type", "pixel_area"))) == "pixel" and not square:
            res = b.get("resolution", top.get("resolution", DEFAULTS["resolution"]))
            notes.append(
                f"{head}: resolution_type pixel: SimpleTuner sizes each image's shorter edge to {res} (a 2:1 image "
                f"about {2 * float(res):g}x{res}); sdcore's buckets keep the area {res}x{res} (about "
                f"{float(res) * math.sqrt(2):.0f}x{float(res) / math.sqrt(2):.0f}): fewer pixels on non-square images"
            )
        if not _bool(b.get("crop", False)) and style != "center":
            notes.append(
                f"{head}: crop false: resized to cover its aspect bucket and the few pixels over it cropped at the "
                f"centre (SimpleTuner crops them by crop_style {style!r}, once when it caches latents)"
            )
        elif _bool(b.get("crop", False)) and style == "random":
            notes.append(
                f"{head}: crop_style random: cropped at the centre (SimpleTuner picks one random spot per image, once "
                "when it caches latents; sdcore's --random-crop draws a new spot at every use, which cached latents "
                "cannot hold)"
            )
    return notes


def _megapixels(value: float, res_type: str) -> float:
    """A size option in area units: pixel_area turns a pixel edge (over 10) into megapixels as SimpleTuner's
    data backend config does (data_backend/config/image.py)."""
    return value * value / 1e6 if res_type == "pixel_area" and value > 10 else value


def _size_limits(backend: dict[str, Any], w: str, res_type: str, res: float, square: bool) -> list[str]:
    """``minimum_image_size`` (SimpleTuner skips smaller images: metadata/backends/base.py
    ``meets_resolution_requirements``), ``maximum_image_size`` with ``target_downsample_size`` (the image
    resized to the latter before the crop: training_sample.py ``_downsample_before_crop``, only with crop,
    both given). sdcore filters no image by size, so the folder's images are checked here: none under the
    minimum is SimpleTuner's result exactly. A square crop's pre-resize to the resolution itself is the
    resize sdcore does (shorter edge to the side, then the crop)."""
    problems = []
    minimum = backend.get("minimum_image_size")
    if minimum:
        small = _under_minimum(backend, float(minimum), res_type, square)
        if small:
            shown = ", ".join(small[:3]) + (f" and {len(small) - 3} more" if len(small) > 3 else "")
            problems.append(
                f"{w}: minimum_image_size {minimum}: SimpleTuner leaves out {shown}; sdcore filters no image by "
                "size (move them out of instance_data_dir, or drop minimum_image_size to train them)"
            )
    target = backend.get("target_downsample_size") or 0
    resized = bool(target) and bool(backend.get("maximum_image_size")) and _bool(backend.get("crop", False))
    if resized and not (square and _megapixels(float(target), res_type) == _megapixels(res, res_type)):
        problems.append(
            f"{w}: target_downsample_size {target}: SimpleTuner resizes each image to it before cropping; "
            "sdcore resizes to the resolution (give crop_aspect square with target_downsample_size = "
            "resolution, or leave maximum_image_size/target_downsample_size out)"
        )
    return problems


def _disabled(backend: dict[str, Any]) -> bool:
    """A data backend SimpleTuner skips: ``disabled`` or ``disable`` true (factory.py reads both)."""
    return _bool(backend.get("disabled", False)) or _bool(backend.get("disable", False))


def _dataset_images(folder: Path) -> list[Path]:
    """The images of a local dataset as SimpleTuner's ``LocalDataBackend.list_files`` finds them: every
    sub-folder too (``os.walk``), sorted; hidden names are left out, as sdcore's scan leaves them out."""
    from ..data.images import is_image_path

    found: list[Path] = []
    walked: set[Path] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        if Path(root).resolve() in walked:  # a link back to a folder read before (SimpleTuner's seen_directories)
            dirs.clear()
            continue
        walked.add(Path(root).resolve())
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / name for name in files if not name.startswith(".") and is_image_path(name)]
    return sorted(found)


def _under_minimum(backend: dict[str, Any], minimum: float, res_type: str, square: bool) -> list[str]:
    """The images of ``instance_data_dir`` SimpleTuner's ``minimum_image_size`` leaves out: pixel compares
    both edges, area (and pixel_area, converted) the area in megapixels and, for a square crop, both edges
    with the area's square root."""
    from ..data.images import ImageError, probe_image

    folder = Path(str(backend.get("instance_data_dir", ""))).expanduser()
    if not folder.is_dir():
        return []
    area = _megapixels(minimum, res_type) * 1e6
    small = []
    for path in _dataset_images(folder):
        try:
            width, height = probe_image(path)
        except ImageError:
            continue  # skipped and reported by the dataset scan
        if res_type == "pixel":
            below = min(width, height) < minimum
        else:
            edge = math.floor(math.sqrt(area))
            below = width * height < area or (square and min(width, height) < edge)
        if below:
            small.append(path.name)
    return small


def _backend_problems(path: Path, where: str, top: dict[str, Any]) -> list[str]:
    """The data backend JSON's problems, reported with the config's (before any model loads)."""
    try:
        _image_backends(path, where, None, top)
    except (ConfigError, DataError) as exc:
        return list(getattr(exc, "problems", None) or [str(exc)])
    return []


#: dataset keys whose value, when a backend leaves it out, is the config's top-level option of that name
INHERITED = ("resolution", "resolution_type", "caption_strategy", "instance_prompt", "prepend_instance_prompt",
             "only_instance_prompt", "minimum_image_size", "maximum_image_size", "target_downsample_size")  # fmt: skip


def _is_conditioning(backend: dict[str, Any]) -> bool:
    """A conditioning dataset: ``dataset_type conditioning``, or any ``conditioning_type`` (factory.py
    ``_configure_single_data_backend`` makes a backend with one a conditioning dataset whatever its type says)."""
    kind = str(backend.get("dataset_type", "image")).lower()
    return kind == "conditioning" or backend.get("conditioning_type") is not None


def _conditioning_backends(backends: list[Any], path: Path, where: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """The enabled conditioning datasets by id, each with its place in the backend JSON (for messages)."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for i, b in enumerate(backends):
        if isinstance(b, dict) and _is_conditioning(b) and not _disabled(b):
            found[str(b.get("id", ""))] = (f"{where} {path}[{i}] ({b.get('id', '?')})", b)
    return found


def _conditioning_ids(backend: dict[str, Any]) -> list[Any]:
    value = backend.get("conditioning_data")
    if value in (None, "", []):
        return []
    return list(value) if isinstance(value, list) else [value]


#: the conditioning types whose images are reference images (DATALOADER.md conditioning_type); ``None``: a
#: ``dataset_type conditioning`` without one, and ``controlnet``: both scanned and cropped on their own, as loose
REFERENCE_TYPES = ("reference_strict", "reference_loose", "controlnet", None)
#: the conditioning types whose images weigh the loss, not the model's input (collate.py MASK_CONDITIONING_TYPES)
MASK_TYPES = ("mask", "segmentation")


def _conditioning_folders(
    backend: dict[str, Any],
    w: str,
    conditioning: dict[str, tuple[str, dict[str, Any]]],
    top: dict[str, Any],
    problems: list[str],
) -> tuple[Path | None, Path | None, str]:
    """A training dataset's ``conditioning_data`` as its subset's control folder (FLUX.1 Kontext's reference
    images), its mask folder (``conditioning_type mask`` or ``segmentation``: sdcore's ``conditioning_data_dir``
    with ``--masked-loss``), each None when not named or refused (the reasons in ``problems``), and the mask's
    ``mask_kind`` (:func:`_mask_folder`).

    SimpleTuner's pairing (multiaspect/sampler.py ``connect_conditioning_samples`` / ``get_conditioning_sample``):
    the training image's path after its ``instance_data_dir`` starts with "/", so it reads as absolute and only its
    base name is joined to the conditioning dataset's folder: the same file name, extension included, at the
    folder's top, for an image in a sub-folder too (unless ``instance_data_dir`` ends in "/":
    :func:`_simpletuner_pair`); a missing pair stops the step (collate.py:
    "Each conditioning backend must supply one sample per training example"). sdcore pairs by file stem
    (:mod:`sdcore.train.kontext_data`, :func:`sdcore.train.data.mask_image_path`), so names that would pair
    differently are problems (:func:`_pairing_problems`) and a missing pair is the pre-flight's.

    A mask dataset (collate.py: its pixels are ``prepare_like`` the training image, so the same crop and size;
    models/common.py ``loss``: the red channel in [-1, 1], area-interpolated to the latent size, ``/ 2 + 0.5``,
    times the loss, the plain mean) is what sdcore's mask images do with its defaults, in every model family and
    beside a Kontext reference (collate.py keeps references for the model's input and masks for the loss)."""
    ids = _conditioning_ids(backend)
    if not ids:
        return None, None, "red"
    given = backend.get("conditioning_data")
    found: list[tuple[str, str, dict[str, Any]]] = []
    for ref in (str(i) for i in ids):
        if ref not in conditioning:
            problems.append(
                f"{w}: conditioning_data {ref!r}: no enabled dataset of that id with dataset_type conditioning (or a "
                'conditioning_type); SimpleTuner stops: "Conditioning data backend ... not found"'
            )
            continue
        found.append((ref, *conditioning[ref]))
    masks = [f for f in found if f[2].get("conditioning_type") in MASK_TYPES]
    references = [f for f in found if f[2].get("conditioning_type") not in MASK_TYPES]
    if len(references) > 1:
        problems.append(
            f"{w}: conditioning_data {given!r}: several conditioning datasets (SimpleTuner's "
            "conditioning_multidataset_sampling: random takes one per image and epoch, combined gives them all as "
            "references); sdcore trains FLUX.1 Kontext with one reference image per sample: name one"
        )
        return None, None, "red"
    if len(masks) > 1:
        problems.append(
            f"{w}: conditioning_data {given!r}: several mask datasets ({', '.join(m[0] for m in masks)}); sdcore "
            "weighs each image's loss by one mask image: name one"
        )
        return None, None, "red"
    sampling = str(top.get("conditioning_multidataset_sampling", DEFAULTS["conditioning_multidataset_sampling"]))
    if masks and references and sampling.strip().lower() != "combined":
        problems.append(
            f"{w}: conditioning_data {given!r}: a reference and a mask dataset with conditioning_multidataset_sampling "
            f"{sampling}: SimpleTuner then takes one of the two per image and epoch (the reference or the mask); "
            "sdcore gives each image both: set conditioning_multidataset_sampling combined"
        )
        return None, None, "red"
    control = _reference_folder(backend, w, references[0][1:], top, problems) if references else None
    mask, kind = _mask_folder(backend, w, masks[0][1:], problems) if masks else (None, "red")
    return control, mask, kind


def _conditioning_dir(backend: dict[str, Any], cw: str, cond: dict[str, Any], problems: list[str]) -> Path | None:
    """A conditioning dataset's folder: its keys known, ``source_dataset_id`` its training dataset's, local."""
    source = cond.get("source_dataset_id")
    if source not in (None, "") and str(source) != str(backend.get("id")):
        problems.append(
            f"{cw}: source_dataset_id {source!r}, but conditioning_data of {backend.get('id')!r} names it: sdcore "
            "fits each conditioning image to the training image it pairs with (give the same id, or leave it out)"
        )
    storage = str(cond.get("type", "local")).lower()
    known = BACKEND_HANDLED | BACKEND_NOTED | BACKEND_REFUSED
    unknown = [f"{k!r}{nearest_field(str(k), known)}" for k in cond if k not in known]
    if unknown:
        problems.append(f"{cw}: unknown data backend key(s): {', '.join(unknown)}")
    if storage != "local":
        problems.append(f"{cw}: type {storage!r}: sdcore reads local image folders only (conditioning datasets too)")
        return None
    if not cond.get("instance_data_dir"):
        problems.append(f"{cw}: instance_data_dir is needed")
        return None
    return Path(str(cond["instance_data_dir"])).expanduser()


def _reference_folder(
    backend: dict[str, Any], w: str, named: tuple[str, dict[str, Any]], top: dict[str, Any], problems: list[str]
) -> Path | None:
    """A reference dataset as the training subset's control folder (FLUX.1 Kontext runs only)."""
    cw, cond = named
    ref = cond.get("id")
    if not (_bool(top.get("controlnet", False)) or _bool(top.get("control", False))) and not _is_kontext(top):
        problems.append(
            f"{w}: conditioning_data {ref!r}: sdcore reads reference conditioning datasets as FLUX.1 Kontext's "
            f"reference images (model_family flux, model_flavour kontext); this run is model_family "
            f"{top.get('model_family')!r}, model_flavour {top.get('model_flavour')!r} (a loss mask is a dataset "
            "with conditioning_type mask)"
        )
        return None
    kind = cond.get("conditioning_type")
    if kind not in REFERENCE_TYPES:
        problems.append(
            f"{cw}: conditioning_type {kind!r}: SimpleTuner's are reference_strict, reference_loose (FLUX.1 Kontext's "
            "reference images here), mask, segmentation and controlnet"
        )
        return None
    folder = _conditioning_dir(backend, cw, cond, problems)
    if folder is None:
        return None
    problems.extend(_pairing_problems(str(backend.get("instance_data_dir", "")), folder, cw, kind))
    return folder


def _mask_folder(
    backend: dict[str, Any], w: str, named: tuple[str, dict[str, Any]], problems: list[str]
) -> tuple[Path | None, str]:
    """A ``conditioning_type mask`` or ``segmentation`` dataset as the training subset's ``conditioning_data_dir``
    and its ``mask_kind``: ``red`` for a mask (its red channel as it is), ``segmentation`` for SimpleTuner's
    segmentation mask (models/common.py ``loss``: the mean of the three channels, area-interpolated to the loss's
    size, ``/ 2 + 0.5``, ``> 0``: 1 wherever a latent cell is not all black; applied to a batch with probability
    ``masked_loss_probability``: :func:`sdcore.train.data.dataset_mask_at_latent`). Both are ``prepare_like`` the
    training image (collate.py), as sdcore's mask images follow theirs."""
    cw, cond = named
    kind = "segmentation" if cond.get("conditioning_type") == "segmentation" else "red"
    folder = _conditioning_dir(backend, cw, cond, problems)
    if folder is None:
        return None, kind
    problems.extend(_pairing_problems(str(backend.get("instance_data_dir", "")), folder, cw, "mask"))
    return folder, kind


def _simpletuner_pair(image: Path, given: str, folder: Path) -> Path:
    """The conditioning file SimpleTuner reads for ``image`` of a dataset whose ``instance_data_dir`` is
    ``given`` (multiaspect/sampler.py): the image's absolute path (``list_files``) split at ``given``, the last
    piece kept; absolute ("/sub/cat.png", the usual case) joins only the file name onto the conditioning folder,
    relative ("sub/cat.png": ``given`` ends in "/") the whole piece, so sub-folders pair by their path there."""
    listed = os.path.join(os.path.abspath(image.parent), image.name)
    rest = listed.split(given)[-1] if given else listed
    if os.path.isabs(rest):
        inside = os.path.abspath(folder)
        return Path(rest) if rest.startswith(inside) else folder / os.path.basename(rest)
    return folder / rest.lstrip("/")


def _pairing_problems(given: str, folder: Path, w: str, kind: str | None) -> list[str]:
    """Training images SimpleTuner and sdcore would pair differently: a reference of the same file name that
    sdcore's stem search passes over (another extension sorts first), or only one of another extension (sdcore
    pairs it, SimpleTuner finds none). Unless ``kind`` is ``reference_strict`` (the training image's bucket and
    crop copied), SimpleTuner buckets and crops each reference on its own: sdcore fits it to its training image's
    crop, the same bucket when the two have one aspect ratio, so pairs whose aspect ratios differ are listed
    too. A ``mask`` follows its training image's crop in both (sdcore's stem search: kohya's mask extensions,
    :data:`sdcore.train.data.MASK_EXTENSIONS`). Missing pairs are the pre-flight's."""
    from ..data.images import ImageError, probe_image
    from .data import MASK_EXTENSIONS
    from .kontext_data import CONTROL_EXTENSIONS

    images = Path(given).expanduser()
    if not images.is_dir() or not folder.is_dir():
        return []  # the scan and the pre-flight report them
    other: list[str] = []
    unread: list[str] = []
    shapes: list[str] = []
    extensions = MASK_EXTENSIONS if kind == "mask" else CONTROL_EXTENSIONS
    for image in _dataset_images(images):
        same = _simpletuner_pair(image, os.path.expanduser(given), folder)
        candidates = sorted({str(folder / f"{image.stem}{ext}") for ext in extensions})
        pick = next((Path(c) for c in candidates if Path(c).is_file()), None)
        if pick is None:
            if same.is_file():  # a sub-folder's path, or an extension sdcore's search does not spell
                unread.append(f"{same} for {image.relative_to(images).as_posix()}")
            continue
        if not same.is_file() or os.path.abspath(pick) != os.path.abspath(same):
            other.append(f"{image.relative_to(images).as_posix()} -> {pick.name}")
            continue
        if kind in ("reference_strict", "mask"):
            continue
        try:
            (a, b), (c, d) = probe_image(image), probe_image(pick)
        except ImageError:
            continue  # reported by the scan / the pre-flight
        if abs(a / b - c / d) > 0.01 * (a / b):
            shapes.append(f"{image.name} ({a}x{b}) -> {pick.name} ({c}x{d})")
    problems = []
    if other:
        problems.append(
            f"{w}: SimpleTuner pairs a training image with the file of the same name and extension (a sub-folder's "
            "path too when instance_data_dir ends in '/'); sdcore "
            f"pairs by file stem and would take another file: {', '.join(other[:5])}"
            + (f" and {len(other) - 5} more" if len(other) > 5 else "")
            + " (rename them to the training images' names)"
        )
    if unread:
        problems.append(
            f"{w}: SimpleTuner reads {', '.join(unread[:5])}"
            + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
            + f"; sdcore looks for the file stem at the folder's top with the extensions {' '.join(extensions)} "
            "(give each image its conditioning file of the same name there, in one of those formats)"
        )
    if shapes:
        problems.append(
            f"{w}: conditioning_type {kind or 'not given'}: SimpleTuner buckets and crops these "
            "references on their own; sdcore fits each to its training image's crop (reference_strict), which "
            f"changes their aspect ratio: {', '.join(shapes[:5])}"
            + (f" and {len(shapes) - 5} more" if len(shapes) > 5 else "")
            + " (give references of the training images' aspect ratios, or conditioning_type reference_strict)"
        )
    return problems


def _conditioning_notes(path: Path, where: str, top: dict[str, Any]) -> list[str]:
    """What a read conditioning dataset does differently in detail, and the conditioning datasets nothing names
    (SimpleTuner configures them and no training dataset draws from them: DATALOADER.md, a conditioning dataset
    makes no training batch of its own)."""
    try:
        backends = _backends(path, where)
    except ConfigError:
        return []
    conditioning = _conditioning_backends(backends, path, where)
    named = {str(ref) for b in backends if isinstance(b, dict) and not _disabled(b)
             for ref in _conditioning_ids(b)}  # fmt: skip
    notes = []
    for ref, (cw, cond) in conditioning.items():
        if ref not in named:
            notes.append(f"{cw}: a conditioning dataset no training dataset names in conditioning_data: not read")
            continue
        kind = cond.get("conditioning_type")
        if kind != "reference_strict" and kind in REFERENCE_TYPES:
            notes.append(
                f"{cw}: conditioning_type {kind or 'not given'}: SimpleTuner buckets and crops these references on "
                "their own; sdcore fits each to its training image's bucket and crop (reference_strict's geometry): "
                "the same bucket for a reference of its training image's aspect ratio, cropped at the same spot"
            )
        set_here = [k for k in ("resolution", "resolution_type", "maximum_image_size", "target_downsample_size",
                                "minimum_image_size", "caption_strategy", "instance_prompt") if k in cond]  # fmt: skip
        if set_here:
            # factory.py synchronize_conditioning_settings copies the training dataset's sizes over; collate.py
            # uses a conditioning dataset's captions only in random mode with several conditioning datasets
            notes.append(
                f"{cw}: {', '.join(set_here)}: not read (SimpleTuner gives a conditioning dataset its training "
                "dataset's sizes, and with one conditioning dataset trains on the training dataset's captions)"
            )
    return notes


def _image_backends(path: Path, where: str, options: TrainOptions | None, top: dict[str, Any]) -> list[SubsetOptions]:
    from dataclasses import replace

    from ..data.dataset import SubsetOptions, subset_defaults

    backends = _backends(path, where)
    problems: list[str] = []
    base = SubsetOptions(image_dir=Path("."), **subset_defaults(options))
    subsets: list[SubsetOptions] = []
    conditioning = _conditioning_backends(backends, path, where)
    paired: list[str] = []  # the training datasets naming a reference in conditioning_data, and those naming none
    unpaired: list[str] = []
    masks_only = 0  # the unpaired naming a loss mask
    for i, backend in enumerate(backends):
        w = f"{where} {path}[{i}]"
        if not isinstance(backend, dict):
            problems.append(f"{w}: a table is needed")
            continue
        w = f"{where} {path}[{i}] ({backend.get('id', '?')})"
        backend = {**{k: top[k] for k in INHERITED if k in top}, **backend}
        if _disabled(backend):
            continue
        kind = str(backend.get("dataset_type", "image")).lower()
        if kind in ("text_embeds", "image_embeds", "conditioning_image_embeds"):
            continue  # SimpleTuner's caches: sdcore caches text-encoder outputs and latents itself
        if _is_conditioning(backend):
            continue  # read as the control or mask folder of the training dataset naming it (_conditioning_folders)
        if kind != "image":
            problems.append(f"{w}: dataset_type {kind!r}: sdcore trains on image datasets (conditioning, video and "
                            "audio datasets are not read)")  # fmt: skip
            continue
        storage = str(backend.get("type", "local")).lower()
        if storage != "local":
            named = f" {backend['dataset_name']}" if storage == "huggingface" and backend.get("dataset_name") else ""
            problems.append(
                f"{w}: type {storage!r}: sdcore reads local image folders only: download the dataset{named} to a "
                "folder (images with .txt captions or instance_prompt), then give type local and instance_data_dir "
                "(without dataset_name and metadata_backend)"
            )
            continue
        known = BACKEND_HANDLED | BACKEND_NOTED | BACKEND_REFUSED
        unknown = [f"{k!r}{nearest_field(str(k), known)}" for k in backend if k not in known]
        if unknown:
            problems.append(f"{w}: unknown data backend key(s): {', '.join(unknown)}")
        refused = sorted(k for k in backend if k in BACKEND_REFUSED and backend[k] not in (None, False, "", [], {}))
        generated = backend.get("conditioning")
        if generated and "conditioning" in refused:
            # DATALOADER.md: SimpleTuner generates a conditioning dataset (canny, depth, ...) from these images
            refused.remove("conditioning")
            kinds = [str(g.get("type", "?")) for g in (generated if isinstance(generated, list) else [generated])
                     if isinstance(g, dict)]  # fmt: skip
            problems.append(
                f"{w}: conditioning {', '.join(kinds) or generated!r}: SimpleTuner generates conditioning images "
                "from this dataset; sdcore does not: make them yourself into a folder with the training images' "
                "file names, give it as a dataset of its own (dataset_type conditioning, conditioning_type "
                "reference_strict) and name its id in this dataset's conditioning_data (FLUX.1 Kontext's reference "
                "images), without conditioning"
            )
        if refused:
            problems.append(f"{w}: {', '.join(refused)}: not implemented in sdcore")
        if _bool(backend.get("is_regularisation_data", backend.get("is_regularization_data", False))):
            problems.append(
                f"{w}: is_regularisation_data: SimpleTuner trains such data towards the base model's own prediction "
                "(parent-teacher); sdcore's regularisation images are kohya's prior preservation (use --reg-data)"
            )
        if not backend.get("instance_data_dir"):
            problems.append(f"{w}: instance_data_dir is needed")
            continue
        if backend.get("source_dataset_id") not in (None, ""):
            problems.append(
                f"{w}: source_dataset_id: names a conditioning dataset's source (DATALOADER.md: only for "
                "dataset_type conditioning); a training dataset names its conditioning dataset with conditioning_data"
            )
        control, mask, mask_kind = _conditioning_folders(backend, w, conditioning, top, problems)
        if not generated:
            # a Kontext run's pairs: a reference named (or refused: reported once, above), not a loss mask alone
            if any(conditioning.get(str(i), ("", {}))[1].get("conditioning_type") not in MASK_TYPES
                   for i in _conditioning_ids(backend)):  # fmt: skip
                paired.append(w)
            else:
                unpaired.append(f"{w}{' (a loss mask only)' if mask is not None else ''}")
                masks_only += mask is not None
        probability = backend.get("probability", 1.0)
        if float(probability) != 1.0:
            problems.append(f"{w}: probability {probability}: sdcore draws every dataset by its size and repeats")
        crop = _bool(backend.get("crop", False))
        style = str(backend.get("crop_style", "random"))
        aspect = str(backend.get("crop_aspect", "square"))
        square = crop and aspect == "square"
        res_type = str(backend.get("resolution_type", "pixel_area"))
        res = float(backend.get("resolution", DEFAULTS["resolution"]))
        step = int(top.get("aspect_bucket_alignment", DEFAULTS["aspect_bucket_alignment"]))
        # SimpleTuner turns pixel_area E into E*E/1e6 megapixels, and a square of that area into the edge
        # sqrt(area) rounded to the nearest multiple of the alignment (at least one step): area 1.0 is 1024.
        # pixel E sizes the shorter edge to E: with crop_aspect square the square is E x E, as area E*E gives;
        # otherwise sdcore's bucket keeps the area E*E (a note from _crop_notes)
        if res_type in ("pixel_area", "area", "pixel"):
            edge = math.sqrt(res * 1e6) if res_type == "area" else res
            side = max(round(edge / step) * step, step)
        else:
            problems.append(f"{w}: resolution_type {res_type!r}: SimpleTuner's are pixel, area and pixel_area")
            continue
        problems.extend(_size_limits(backend, w, res_type, res, square))
        if crop and style not in ("random", "center"):
            problems.append(f"{w}: crop_style {style!r}: sdcore crops at random or at the centre")
        if crop and aspect not in ("square", "preserve"):
            problems.append(f"{w}: crop_aspect {aspect!r}: sdcore crops square or to an aspect bucket")
        strategy = str(backend.get("caption_strategy", "filename")).replace("_", "")
        prompt = backend.get("instance_prompt")
        class_tokens = None
        extension = ".txt"
        from_filename = False
        if strategy == "instanceprompt" or _bool(backend.get("only_instance_prompt", False)):
            if not prompt:
                problems.append(f"{w}: caption_strategy instanceprompt needs instance_prompt")
            class_tokens = str(prompt)
            extension = ".simpletuner-instance-prompt"  # no caption file: every image gets instance_prompt
        elif strategy == "filename":  # prompts.py prepare_instance_prompt_from_filename: the stem, "_" -> " "
            from_filename = True
        elif strategy != "textfile":
            problems.append(
                f"{w}: caption_strategy {strategy!r}: sdcore reads captions from the file name (filename), .txt "
                "files (textfile) or one prompt for all (instanceprompt)"
            )
        prefix = base.caption_prefix
        if _bool(backend.get("prepend_instance_prompt", False)) and class_tokens is None:
            # prompts.py prepare_instance_prompt_from_filename/_textfile: instance_prompt + " " + caption, as
            # sdcore's caption_prefix joins (sdcore.data.captions.join_affixes); without an instance_prompt
            # SimpleTuner's data backend factory stops
            if prompt is None:
                problems.append(f"{w}: prepend_instance_prompt needs instance_prompt")
            else:
                prefix = f"{prompt} {prefix}" if prefix else str(prompt)
        subsets.append(
            replace(
                base,
                image_dir=Path(str(backend["instance_data_dir"])).expanduser(),
                repeats=int(backend.get("repeats", 0)) + 1,  # DATALOADER.md: 0 = seen once
                caption_extension=extension,
                caption_prefix=prefix,
                class_tokens=class_tokens,
                caption_from_filename=from_filename,
                filename_caption_rule="spaces" if from_filename else base.filename_caption_rule,
                resolution=side,
                buckets=not square,
                bucket_step=step,
                min_bucket_reso=min(base.min_bucket_reso, max(side // step, 1) * step),
                max_bucket_reso=max(base.max_bucket_reso, -(-side // step) * step),
                random_crop=False,  # SimpleTuner's random spot is fixed when it caches latents: _crop_notes
                control_dir=control,
                conditioning_data_dir=mask,
                mask_extras_allowed=mask is not None,
                mask_kind=mask_kind,
                recursive=True,  # LocalDataBackend.list_files walks every sub-folder
            )
        )
    generated = any(isinstance(b, dict) and b.get("conditioning") for b in backends)
    if _is_kontext(top) and subsets and not paired and not generated and masks_only:
        # factory.py counts a mask dataset as the conditioning dataset Kontext needs; collate.py then builds no
        # reference latents, and flux/model.py trains text-to-image steps of the Kontext model
        problems.append(
            f"{where} {path}: model_flavour kontext with a loss mask and no reference image: SimpleTuner trains "
            "text-to-image steps of the Kontext model; sdcore's FLUX.1 Kontext run pairs every training image with "
            "a reference: name a reference dataset (conditioning_type reference_strict) beside the mask "
            "(conditioning_multidataset_sampling combined)"
        )
    elif _is_kontext(top) and subsets and not paired and not generated:
        # factory.py: requires_conditioning_dataset (flux/model.py: true for kontext) without a training dataset's
        # conditioning_data stops SimpleTuner: "Model requires a conditioning dataset, but none was found"
        problems.append(
            f"{where} {path}: model_flavour kontext trains on pairs: SimpleTuner needs a conditioning dataset "
            "(dataset_type conditioning) named by a training dataset's conditioning_data, and stops without one"
        )
    elif _is_kontext(top) and paired and unpaired:
        # SimpleTuner needs one such dataset in all (factory.py); a batch of the others has no conditioning latents
        # and flux/model.py prepare_batch_conditions then builds no Kontext inputs: a text-to-image step
        problems.append(
            f"{where} {path}: {', '.join(unpaired)}: no reference in conditioning_data while {', '.join(paired)} "
            "names one: "
            "SimpleTuner trains this dataset's batches without a reference image (text-to-image steps of the Kontext "
            "model); sdcore's FLUX.1 Kontext run pairs every training image: name a conditioning dataset for it too, "
            "or train it in a run of its own"
        )
    if not subsets and not problems:
        problems.append(f"{where} {path}: no local image dataset")
    if problems:
        from ..data.dataset import DatasetProblems

        raise DatasetProblems(problems)
    return subsets


def load_datasets(
    path: str | os.PathLike[str], options: TrainOptions | None, skipped: list[SkippedFile] | None = None
) -> list[SubsetOptions]:
    """The config's data backends (``data_backend_config``) as sdcore subsets: each enabled ``local`` image
    dataset with its ``repeats`` + 1 (SimpleTuner's 0 means once), its resolution as a bucket area, its crop
    and its captions; cache backends (``text_embeds``, ``image_embeds``) are skipped."""
    data = read_config(path)
    if data is None:
        raise DataError(f"{path}: not a SimpleTuner config")
    backend = data.get("data_backend_config")
    if not backend:
        raise DataError(f"{path}: data_backend_config is needed")
    return _image_backends(Path(str(backend)).expanduser(), f"{path}: data_backend_config", options, data)


__all__ = ["DEFAULTS", "is_config", "is_config_file", "load_datasets", "read_config", "read_sample_prompts",
           "translate_config"]  # fmt: skip

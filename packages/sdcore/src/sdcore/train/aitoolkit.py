"""ostris/ai-toolkit job files (YAML or JSON) as sdcore options, dataset subsets and sample prompts.

An ai-toolkit job is ``job: extension`` with ``config: {name, process: [...]}``; a training process
(``type: sd_trainer``, ``ui_trainer`` or ``diffusion_trainer``) holds the sections ``network``,
``save``, ``datasets``, ``train``, ``model``, ``sample`` and ``logging``. ``sdcore train lora --config
job.yaml`` reads the process through :func:`translate_job` when it has a ``network`` section; without one
ai-toolkit fine-tunes the whole model, which is ``sdcore train dreambooth --config job.yaml`` (each command
refuses the other kind of job). ``--data job.yaml`` reads its ``datasets``
(:func:`load_datasets`) and ``--sample-prompts job.yaml`` its ``sample`` section
(:func:`read_sample_prompts`). The translation sets ``data`` and ``sample_prompts`` to the job file
itself, so one file drives the run.

Every field name and default below is ai-toolkit's (``toolkit/config_modules.py``), with its meaning
from ``jobs/process/BaseSDTrainProcess.py`` and ``toolkit/``: ai-toolkit's defaults apply where the job
leaves a field out (``lr`` 1e-6, ``steps`` 1000, LoRA rank 4 and alpha 1, fp32 training, optimizers
with ``eps=1e-6``), not sdcore's. A field is either translated, accepted with a note (no effect on
the result here: logging, devices, worker counts, compilation), accepted at ai-toolkit's default
value and refused by name otherwise (what sdcore does not implement), or unknown (with the nearest
ai-toolkit name). All problems of a job are reported at once.

As ai-toolkit does when it reads a job: ``${VAR}`` is replaced by the environment variable (an unset
one is a problem), ``[name]`` anywhere by ``config.name``, and YAML's ``1e-4`` is a float. Relative
paths (``training_folder``, ``folder_path``) are relative to the working directory, as in
ai-toolkit. ``[trigger]`` in captions and sample prompts: :func:`inject_trigger`.

Flux and SD3 LoRAs are saved as ai-toolkit saves them (``toolkit/lora_special.py``: PEFT format for
transformer models): diffusers/PEFT keys ``transformer.<module>.lora_A/B.weight`` with separate
``to_q``/``to_k``/``to_v`` modules, each with its own down (sdcore's ``key_layout = "diffusers"`` with
``split_qkv``), and alpha = rank (ai-toolkit writes no alpha in that format, so ``linear_alpha`` has
no effect there). SD1/SD2/SDXL LoRAs keep sdcore's kohya layout (ai-toolkit's ``lora_unet_`` names).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError
from .field_tables import FOLLOWS, drop_foreign_options
from .field_tables import nearest_field as _nearest
from .field_tables import same_value as _same

if TYPE_CHECKING:
    from ..data.dataset import SkippedFile, SubsetOptions
    from .options import TrainOptions
    from .sample_prompts import SamplePrompt

#: the suffixes ai-toolkit reads jobs from (``toolkit/config.py``)
JOB_SUFFIXES = (".yaml", ".yml", ".json", ".jsonc")
#: process types that run ai-toolkit's SD trainer (``extensions_built_in/sd_trainer``)
TRAINER_TYPES = ("sd_trainer", "ui_trainer", "diffusion_trainer")

#: every field of ai-toolkit's config classes and its default (SaveConfig, LoggingConfig, SampleConfig,
#: NetworkConfig, TrainConfig, ModelConfig, EMAConfig, DatasetConfig in toolkit/config_modules.py)
DEFAULTS: dict[str, dict[str, Any]] = {
    "save": {
        "save_every": 1000,
        "dtype": "float16",
        "max_step_saves_to_keep": 5,
        "save_format": "safetensors",
        "push_to_hub": False,
        "hf_repo_id": None,
        "hf_private": False,
    },
    "logging": {
        "log_every": 100,
        "verbose": False,
        "use_wandb": False,
        "use_ui_logger": False,
        "project_name": "ai-toolkit",
        "run_name": None,
    },
    "sample": {
        "sampler": "ddpm",
        "sample_every": 100,
        "sample_start_step": 0,
        "width": 512,
        "height": 512,
        "neg": False,
        "seed": 0,
        "walk_seed": False,
        "guidance_scale": 7,
        "sample_steps": 20,  # ai-toolkit 27a03a9 toolkit/config_modules.py:90 (a sample's own: :57)
        "network_multiplier": 1,
        "guidance_rescale": 0.0,
        "format": "jpg",
        "adapter_conditioning_scale": 1.0,
        "refiner_start_at": 0.5,
        "extra_values": [],
        "num_frames": 1,
        "fps": 16,
        "prompts": [],
        "samples": FOLLOWS,
        "do_cfg_norm": False,
    },
    "network": {
        "type": "lora",
        "rank": None,
        "linear": None,
        "conv": None,
        "alpha": 1.0,
        "linear_alpha": FOLLOWS,
        "conv_alpha": FOLLOWS,
        "dropout": None,
        "network_kwargs": {},
        "lorm": None,
        "transformer_only": True,
        "lokr_full_rank": True,
        "lokr_factor": -1,
        "old_lokr_format": False,
        "split_multistage_loras": True,
        "layer_offloading": False,
        "pretrained_lora_path": None,
        "all_layers": False,
    },
    "train": {
        "noise_scheduler": "ddpm",
        "content_or_style": "balanced",
        "steps": 1000,
        "lr": 1e-06,
        "unet_lr": FOLLOWS,
        "text_encoder_lr": FOLLOWS,
        "refiner_lr": FOLLOWS,
        "embedding_lr": FOLLOWS,
        "adapter_lr": FOLLOWS,
        "optimizer": "adamw",
        "optimizer_params": {},
        "lr_scheduler": "constant",
        "lr_scheduler_params": {},
        "min_denoising_steps": 0,
        "max_denoising_steps": 999,
        "batch_size": 1,
        "dtype": "fp32",
        "xformers": False,
        "sdp": False,
        "attention_backend": "native",
        "train_unet": True,
        "train_text_encoder": False,
        "train_refiner": True,
        "train_turbo": False,
        "show_turbo_outputs": False,
        "min_snr_gamma": None,
        "snr_gamma": None,
        "learnable_snr_gos": False,
        "noise_offset": 0.0,
        "skip_first_sample": False,
        "force_first_sample": False,
        "gradient_checkpointing": True,
        "weight_jitter": 0.0,
        "merge_network_on_save": False,
        "merge_network_on_save_strength": 1.0,
        "max_grad_norm": 1.0,
        "start_step": None,
        "free_u": False,
        "adapter_assist_name_or_path": None,
        "adapter_assist_type": "t2i",
        "noise_multiplier": 1.0,
        "target_noise_multiplier": 1.0,
        "random_noise_multiplier": 0.0,
        "do_signal_correction_noise": False,
        "do_batch_noise_correction": False,
        "batch_noise_correction_scale": 0.1,
        "do_signal_amplification": False,
        "signal_amplification_strength": 0.5,
        "signal_correction_noise_scale": 1.0,
        "random_noise_shift": 0.0,
        "img_multiplier": 1.0,
        "noisy_latent_multiplier": 1.0,
        "latent_multiplier": 1.0,
        "negative_prompt": None,
        "max_negative_prompts": 1,
        "reg_weight": 1.0,
        "num_train_timesteps": 1000,
        "adaptive_scaling_factor": False,
        "prompt_dropout_prob": 0.0,
        "match_noise_norm": False,
        "gradient_accumulation_steps": 1,
        "gradient_accumulation": 1,
        "short_and_long_captions": False,
        "short_and_long_captions_encoder_split": False,
        "single_item_batching": False,
        "match_adapter_assist": False,
        "match_adapter_chance": 0.0,
        "loss_target": "noise",
        "inverted_mask_prior": False,
        "inverted_mask_prior_multiplier": 0.5,
        "diff_output_preservation": False,
        "diff_output_preservation_multiplier": 1.0,
        "diff_output_preservation_class": "",
        "blank_prompt_preservation": False,
        "blank_prompt_preservation_multiplier": 1.0,
        "standardize_images": False,
        "standardize_latents": False,
        "dynamic_noise_offset": False,
        "do_cfg": False,
        "do_random_cfg": False,
        "cfg_scale": 1.0,
        "max_cfg_scale": FOLLOWS,
        "cfg_rescale": None,
        "correct_pred_norm": False,
        "correct_pred_norm_multiplier": 1.0,
        "loss_type": "mse",
        "t0_loss_target": False,
        "t0_velocity_equiv_weight": False,
        "do_fft_loss": False,
        "do_fft_velocity_equiv_weight": False,
        "pred_scaler": 1.0,
        "prompt_saturation_chance": 0.0,
        "do_prior_divergence": False,
        "ema_config": None,
        "target_norm_std": None,
        "target_norm_std_value": 1.0,
        "timestep_type": "sigmoid",
        "next_sample_timesteps": 8,
        "linear_timesteps": False,
        "linear_timesteps2": False,
        "disable_sampling": False,
        "unload_text_encoder": False,
        "cache_text_embeddings": False,
        "do_paramiter_swapping": False,
        "paramiter_swapping_factor": 0.1,
        "bypass_guidance_embedding": False,
        "latent_feature_extractor_path": None,
        "latent_feature_loss_weight": 1.0,
        "diffusion_feature_extractor_path": FOLLOWS,
        "diffusion_feature_extractor_weight": FOLLOWS,
        "optimal_noise_pairing_samples": 1,
        "force_consistent_noise": False,
        "blended_blur_noise": False,
        "do_guidance_loss": False,
        "guidance_loss_target": 3.0,
        "do_guidance_loss_cfg_zero": False,
        "guidance_loss_schedule": "constant",
        "unconditional_prompt": "",
        "do_differential_guidance": False,
        "differential_guidance_scale": 3.0,
        "switch_boundary_every": 1,
        "do_blank_stabilization": False,
        "audio_loss_multiplier": 1.0,
        "max_loss_debug": False,
        "max_loss": None,
        "validation_config": None,
    },
    "model": {
        "name_or_path": None,
        "is_v2": False,
        "is_xl": False,
        "is_pixart": False,
        "is_pixart_sigma": False,
        "is_auraflow": False,
        "is_v3": False,
        "is_flux": False,
        "is_lumina2": False,
        "use_flux_cfg": False,
        "is_ssd": False,
        "is_vega": False,
        "is_v_pred": False,
        "dtype": "float16",
        "vae_path": None,
        "refiner_name_or_path": None,
        "refiner_start_at": 0.5,
        "lora_path": None,
        "assistant_lora_path": None,
        "inference_lora_path": None,
        "unconditional_lora_path": None,
        "latent_space_version": None,
        "use_text_encoder_1": True,
        "use_text_encoder_2": True,
        "experimental_xl": False,
        "text_encoder_bits": 16,
        "unet_path": None,
        "unet_sample_size": None,
        "vae_device": None,
        "vae_dtype": FOLLOWS,
        "te_device": None,
        "te_dtype": FOLLOWS,
        "quantize": False,
        "quantize_te": FOLLOWS,
        "qtype": "qfloat8",
        "qtype_te": "qfloat8",
        "low_vram": False,
        "attn_masking": False,
        "ignore_if_contains": None,
        "only_if_contains": None,
        "quantize_kwargs": {},
        "split_model_over_gpus": False,
        "split_model_other_module_param_count_scale": 0.3,
        "te_name_or_path": None,
        "arch": None,
        "auto_memory": False,
        "layer_offloading": FOLLOWS,
        "layer_offloading_transformer_percent": 1.0,
        "layer_offloading_text_encoder_percent": 1.0,
        "extras_name_or_path": FOLLOWS,
        "accuracy_recovery_adapter": None,
        "compile": False,
        "block_compile": False,
        "compile_mode": "default",
        "compile_fullgraph": False,
        "compile_dynamic": True,
        "cache_size_limit": None,
        "model_kwargs": {},
        "model_paths": {},
        "in_context": False,
    },
    "ema_config": {"use_ema": False, "ema_decay": 0.999, "use_feedback": False, "param_multiplier": 1.0},
    "dataset": {
        "batch_size": None,
        "type": "image",
        "folder_path": None,
        "dataset_path": None,
        "default_caption": None,
        "trigger_word": None,
        "diff_output_preservation": False,
        "diff_output_preservation_class": "",
        "random_triggers": [],
        "random_triggers_max": 1,
        "caption_ext": ".txt",
        "random_scale": False,
        "random_crop": False,
        "resolution": 512,
        "scale": 1.0,
        "buckets": True,
        "bucket_tolerance": 64,
        "is_reg": False,
        "prior_reg": False,
        "shuffle_tokens": False,
        "keep_tokens": 0,
        "flip_x": False,
        "flip_y": False,
        "augments": [],
        "control_path": None,
        "control_from_same_folder": False,
        "num_controls_from_same_folder": 1,
        "control_path_1": None,
        "control_path_2": None,
        "control_path_3": None,
        "control_transparent_color": [0, 0, 0],
        "inpaint_path": None,
        "full_size_control_images": True,
        "alpha_mask": False,
        "mask_path": None,
        "unconditional_path": None,
        "invert_mask": False,
        "mask_min_value": 0.0,
        "poi": None,
        "use_short_captions": False,
        "num_repeats": 1,
        "cache_latents": False,
        "cache_latents_to_disk": False,
        "cache_tensors_to_disk": False,
        "cache_clip_vision_to_disk": False,
        "cache_text_embeddings": False,
        "load_image_when_caching_latents": False,
        "standardize_images": False,
        "augmentations": None,
        "shuffle_augmentations": False,
        "caption_type": None,
        "guidance_type": "targeted",
        "clip_image_path": None,
        "clip_image_from_same_folder": False,
        "clip_image_augmentations": None,
        "clip_image_shuffle_augmentations": False,
        "replacements": [],
        "loss_multiplier": 1.0,
        "num_workers": 2,
        "prefetch_factor": 2,
        "cache_latents_num_workers": FOLLOWS,
        "extra_values": [],
        "square_crop": False,
        "replay_transforms": True,
        "num_frames": 1,
        "shrink_video_to_frames": True,
        "fps": 24,
        "auto_frame_count": False,
        "trim_auto_frame_count_tail": True,
        "debug": False,
        "controls": [],
        "fast_image_size": False,
        "do_i2v": False,
        "do_audio": False,
        "audio_preserve_pitch": False,
        "audio_normalize": False,
        "network_weight": 1.0,
        "token_dropout_rate": 0.0,
        "caption_dropout_rate": 0.0,
    },
}
DEFAULTS["process"] = {
    "type": None, "name": FOLLOWS, "training_folder": FOLLOWS, "device": "cpu", "performance_log_every": 0,
    "trigger_word": None, "network": None, "save": {}, "datasets": None, "train": {}, "model": {}, "sample": {},
    "logging": {}, "training_seed": None, "log_dir": None, "first_sample": None, "guidance": None,
    "embedding": None, "decorator": None, "adapter": None, "do_lorm": False, "lorm_extract_mode": "ratio",
    "lorm_extract_mode_param": 0.25, "torch_profiler": False,
}  # fmt: skip

#: fields read with a note: they change speed, memory, logging or where things run, not what is learned
NOTED: dict[str, dict[str, str]] = {
    "process": {"device": "sdcore places the model itself (accelerate)", "performance_log_every": "timing log",
                "torch_profiler": "profiling"},
    "save": {"hf_repo_id": "sdcore does not upload", "hf_private": "sdcore does not upload"},
    "logging": {name: "logging" for name in DEFAULTS["logging"]},
    "train": {"xformers": "attention kernel", "sdp": "attention kernel", "attention_backend": "attention kernel",
              "unload_text_encoder": "memory", "cache_text_embeddings": "sdcore caches frozen text-encoder outputs",
              "max_loss_debug": "logging", "show_turbo_outputs": "logging"},
    "model": {"low_vram": "memory", "text_encoder_bits": "sdcore keeps the text encoders in their dtype", "dtype": "load dtype",
              "vae_device": "placement", "te_device": "placement", "vae_dtype": "load dtype",
              "te_dtype": "load dtype", "compile": "compilation", "block_compile": "compilation",
              "compile_mode": "compilation", "compile_fullgraph": "compilation", "compile_dynamic": "compilation",
              "cache_size_limit": "compilation", "auto_memory": "memory", "layer_offloading": "memory",
              "layer_offloading_transformer_percent": "memory", "layer_offloading_text_encoder_percent": "memory",
              "extras_name_or_path": "sdcore reads the model's parts from --model"},
    "dataset": {"num_workers": "data loading", "prefetch_factor": "data loading",
                "cache_latents_num_workers": "data loading", "debug": "logging", "fast_image_size": "data loading",
                "load_image_when_caching_latents": "data loading"},
    "sample": {"format": "sdcore writes PNG samples", "sampler": "sdcore samples with the family's own sampler"},
}  # fmt: skip

#: fields :func:`translate_job` (or the dataset and sample readers) turn into sdcore settings
HANDLED: dict[str, set[str]] = {
    "process": {"type", "name", "training_folder", "trigger_word", "network", "save", "datasets", "train", "model",
                "sample", "logging", "training_seed", "log_dir"},
    "network": {"type", "rank", "linear", "alpha", "linear_alpha", "conv", "conv_alpha", "dropout", "lokr_factor",
                "lokr_full_rank", "pretrained_lora_path", "network_kwargs"},
    "save": {"dtype", "save_every", "max_step_saves_to_keep", "save_format"},
    "train": {"steps", "lr", "unet_lr", "text_encoder_lr", "optimizer", "optimizer_params", "lr_scheduler",
              "lr_scheduler_params", "batch_size", "gradient_accumulation_steps", "gradient_accumulation", "dtype",
              "train_unet", "train_text_encoder", "gradient_checkpointing", "noise_scheduler", "timestep_type",
              "max_grad_norm", "noise_offset", "min_snr_gamma", "skip_first_sample", "force_first_sample",
              "disable_sampling", "loss_type", "cfg_scale", "ema_config", "reg_weight", "min_denoising_steps",
              "max_denoising_steps", "content_or_style", "linear_timesteps", "linear_timesteps2", "snr_gamma",
              "bypass_guidance_embedding"},
    "model": {"name_or_path", "arch", "quantize", "qtype", "vae_path", "attn_masking", "lora_path",
              "assistant_lora_path", "use_flux_cfg", "quantize_kwargs", "quantize_te", "qtype_te", "only_if_contains",
              "ignore_if_contains"}
    | {name for name in DEFAULTS["model"] if name.startswith("is_")},
    "sample": {"prompts", "samples", "sample_every", "sample_steps", "width", "height", "neg", "seed", "walk_seed",
               "guidance_scale"},
    "dataset": {"folder_path", "caption_ext", "caption_dropout_rate", "shuffle_tokens", "token_dropout_rate",
                "keep_tokens", "flip_x", "resolution", "num_repeats", "is_reg", "trigger_word", "default_caption",
                "cache_latents", "cache_latents_to_disk", "buckets", "bucket_tolerance", "random_crop",
                "alpha_mask", "loss_multiplier", "cache_text_embeddings", "control_path"},
    "ema_config": {"use_ema", "ema_decay"},  # use_feedback / param_multiplier: refused away from their defaults
}  # fmt: skip

#: ai-toolkit model flags / ``arch`` -> sdcore family (the others are models sdcore does not train)
FAMILY_FLAGS = {"is_flux": "flux", "is_v3": "sd3", "is_xl": "sdxl", "is_v2": "sd2"}
#: (config_modules.ModelConfig turns ``flex1`` into ``flux``: Ostris' Flex.1-alpha is a FLUX.1 with 8 double blocks
#: and the guidance embedding, which sdcore's Flux loader reads with its block counts from the weights)
#: (``flux_kontext``: FLUX.1 Kontext [dev] has dev's shapes; its datasets' ``control_path`` makes the run Kontext's)
ARCH_FAMILIES = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "flex1": "flux",
                 "chroma": "chroma", "flux_kontext": "flux"}  # fmt: skip
#: ai-toolkit models derived from a family sdcore trains, and why sdcore does not train them (``arch`` or flag)
ARCH_REFUSALS = {
    "flex2": "Flex.2 is a FLUX.1 derivative whose transformer takes control and inpainting latents as extra input "
    "channels (extensions_built_in/flex2); sdcore's Flux trains text-to-image only",
    "ssd": "Segmind SSD-1B is a distilled SDXL with fewer UNet blocks; sdcore's SDXL family is built and tested on "
    "the full SDXL UNet only",
    "vega": "Segmind Vega is a distilled SDXL with fewer UNet blocks; sdcore's SDXL family is built and tested on "
    "the full SDXL UNet only",
}
#: the flow-matching families ai-toolkit trains that sdcore trains too
FLOW_FAMILIES = ("flux", "sd3", "chroma")
#: ai-toolkit's ``toolkit/optimizer.py`` names -> (sdcore optimizer, arguments ai-toolkit adds)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {"eps": 1e-6}),
    "adam": ("Adam", {"eps": 1e-6}),
    "adamw8bit": ("adamw8bit", {"eps": 1e-6}),
    "adam8bit": ("bitsandbytes.optim.Adam8bit", {"eps": 1e-6}),
    "lion": ("lion", {}),
    "lion8bit": ("lion8bit", {}),
    "prodigy": ("prodigy", {"eps": 1e-6}),
    "dadaptation": ("dadaptadam", {"eps": 1e-6}),
    "adagrad": ("Adagrad", {}),
    "adafactor": ("adafactor", {"relative_step": False, "scale_parameter": False, "warmup_init": False}),
}
#: ai-toolkit schedulers (``toolkit/scheduler.py``) that are torch classes given ``total_iters`` = steps as
#: this argument (cosine without arguments is sdcore's cosine: the same curve)
TORCH_SCHEDULERS = {"cosine": ("CosineAnnealingLR", "T_max"), "cosine_with_restarts": ("CosineAnnealingWarmRestarts", "T_0"),
                    "linear": ("LinearLR", "total_iters"), "step": ("StepLR", "")}  # fmt: skip
PRECISIONS = {"fp32": "no", "float32": "no", "fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16",
              "bfloat16": "bf16"}  # fmt: skip
SAVE_DTYPES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "bf16": "bf16", "bfloat16": "bf16"}
#: ``train.loss_type`` -> sdcore ``loss_type``
LOSS_TYPES = {"mse": "l2", "mae": "l1"}
#: loss types sdcore has no counterpart for, and why (``extensions_built_in/sd_trainer/SDTrainer.py``)
LOSS_REFUSALS = {
    "pseudo_huber": "ai-toolkit's pseudo_huber is sqrt(d^2 + c^2) - c with c = 0.01, half of sdcore's --loss-type "
    "smooth_l1 (--huber-schedule constant --huber-c 0.01): the gradients differ by a factor of 2 (clipping, "
    "non-adaptive optimizers), --loss-type mix has no pseudo-Huber term (its huber is torch's true Huber) and "
    "sdcore has no loss scale to halve it",
    "wavelet": "sdcore has no wavelet loss",
    "stepped": "sdcore has no stepped loss",
}
#: flow-matching timestep types sdcore has no counterpart for, and why (``toolkit/samplers/
#: custom_flowmatch_sampler.py``, ``BaseSDTrainProcess``)
TIMESTEP_REFUSALS = {
    "next_sample": "sdcore does not train on the next sampling step",
    "one_step": "sdcore does not train at one fixed timestep",
    "two_step": "sdcore does not train at fixed timesteps",
    "four_step": "sdcore does not train at fixed timesteps",
    "eight_step": "sdcore does not train at fixed timesteps",
}
#: ai-toolkit's DDPM timestep table for SD1/SD2/SDXL: ``toolkit/sampler.py``'s ``sd_config`` (steps_offset 0,
#: "leading" spacing) set to 1000 steps, so index i is timestep 999 - i
DDPM_TIMESTEPS = 1000
#: flow-matching ``train.timestep_type`` -> sdcore ``timestep_sampling`` (``toolkit/samplers/custom_flowmatch_sampler.py``:
#: ``linear`` = an index of linspace(1000, 1, 1000); ``shift`` and ``flux_shift`` (one branch) = an index of the
#: scheduler's shifted table; ``sigmoid`` (1000 sorted 1000 (1 - sigmoid(N(0, 1)))) and ``lognorm_blend`` = an index
#: of a table drawn anew (per step there, per sample in sdcore): sdcore's ai-toolkit tables. ``sigmoid`` is the
#: table, not sdcore's continuous sigmoid sampling: the index leaves out the least noisy value of each table (a
#: CDF within 1/999 of the continuous one) and min/max_denoising_steps keep a quantile band of it); ``weighted`` =
#: the linear table with its measured loss weights (WEIGHTED_LOSS_WEIGHT)
TIMESTEP_TYPES = {"sigmoid": "sigmoid_table", "linear": "linear_table", "shift": "shift_table",
                  "flux_shift": "shift_table", "lognorm_blend": "lognorm_blend_table",
                  "weighted": "linear_table"}  # fmt: skip
#: ``weighted``'s loss weight (SDTrainer: get_weights_for_timesteps(timestep_type="weighted") on flowmatch, which
#: takes ai-toolkit's default_weighing_scheme and wins over linear_timesteps(2)'s bells): sdcore's
#: ``--timestep-loss-weight``
WEIGHTED_LOSS_WEIGHT = "weighted_table"
#: the samplings whose table ai-toolkit draws once per step for the batch (sdcore: per sample)
DRAWN_TABLE_TYPES = ("sigmoid_table", "lognorm_blend_table")
#: entries of ai-toolkit's flow-matching training table (``num_train_timesteps``)
FLOW_TABLE_SIZE = 1000
#: ai-toolkit's flow-matching scheduler per family (``toolkit/sampler.py``): ``sd_flow_config`` shifts by 3.0,
#: ``flux_config`` by the resolution (use_dynamic_shifting) -> (sdcore's --discrete-flow-shift, --dynamic-timestep-shift)
FLOW_SCHEDULER_SHIFTS = {"sd3": (3.0, False), "flux": (1.0, True), "chroma": (1.0, True)}  # chroma_model.py: flux's


def _float_resolver_loader() -> Any:
    """A safe YAML loader that reads ``1e-4`` as a float, as ai-toolkit's loader does (YAML 1.1 wants a dot)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    pattern = re.compile(
        r"^[-+]?(?:\d[\d_]*\.?[\d_]*(?:[eE][-+]?\d+)?|\.\d[\d_]*(?:[eE][-+]?\d+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    )
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", pattern, list("-+0123456789."))
    # integers keep their own resolver (it was registered first for these characters)
    return Loader


def parse_job_text(text: str, suffix: str, where: str) -> Any:
    """The parsed content of a ``.yaml``/``.yml``/``.json`` file (ai-toolkit's float reading)."""
    if suffix.lower() in (".json", ".jsonc"):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: invalid JSON: {exc}") from None
    import yaml

    try:
        return yaml.load(text, Loader=_float_resolver_loader())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {' '.join(str(exc).split())}") from None


def is_job(data: Any) -> bool:
    """An ai-toolkit job: ``job`` and a ``config`` table with a ``process`` list."""
    return (
        isinstance(data, dict)
        and "job" in data
        and isinstance(data.get("config"), dict)
        and isinstance(data["config"].get("process"), list)
    )


def _replace_env(text: str, where: str) -> str:
    missing: list[str] = []

    def value(match: re.Match[str]) -> str:
        found = os.environ.get(match.group(1))
        if found is None:
            missing.append(match.group(1))
            return match.group(0)
        return found

    out = re.sub(r"\$\{([^}]+)\}", value, text)
    if missing:
        raise ConfigError(
            f"{where}: environment variable(s) not set: {', '.join(sorted(set(missing)))} (ai-toolkit's ${{VAR}})"
        )
    return out


def _replace_name(value: Any, name: str) -> Any:
    """``[name]`` -> the job's name in every string (keys too), as ai-toolkit's ``preprocess_config``."""
    if isinstance(value, str):
        return value.replace("[name]", name)
    if isinstance(value, list):
        return [_replace_name(v, name) for v in value]
    if isinstance(value, dict):
        return {_replace_name(k, name): _replace_name(v, name) for k, v in value.items()}
    return value


def read_job(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The job in ``path`` with ``${VAR}`` and ``[name]`` replaced, or ``None`` when the file is not an
    ai-toolkit job (or not a YAML/JSON file)."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in JOB_SUFFIXES:
        return None
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read ({getattr(exc, 'strerror', None) or exc})") from exc
    if p.suffix.lower() in (".json", ".jsonc") and '"job"' not in text:
        return None  # other JSON files (OneTrainer concepts, kohya GUI presets, prompt lists) stay theirs
    data = parse_job_text(_replace_env(text, str(p)), p.suffix, str(p))
    if not is_job(data):
        return None
    name = data["config"].get("name")
    return _replace_name(data, str(name)) if name is not None else data


def is_job_file(path: str | os.PathLike[str]) -> bool:
    try:
        return read_job(path) is not None
    except ConfigError:
        return Path(path).suffix.lower() in (".yaml", ".yml")  # a broken YAML job: its reader reports why


def inject_trigger(caption: str, trigger: str | None, *, add_if_not_present: bool) -> str:
    """ai-toolkit's ``inject_trigger_into_prompt``: ``[name]`` and ``[trigger]`` become the trigger word
    (removed when there is none); with ``add_if_not_present`` (training captions, not regularisation
    images) a caption without the trigger gets ``"<trigger> "`` in front."""
    word = trigger or ""
    out = caption.replace("[name]", word).replace("[trigger]", word)
    if word.strip() and add_if_not_present and word not in out:
        out = f"{word} {out}"
    return out


@dataclass
class JobTranslation:
    """sdcore option values of a job (``values``), with notes and problems (one line each).

    ``needs`` holds the problems of values the file lacks that a command-line option can give instead
    (``{"model": "...: the model to train is needed"}``): :func:`sdcore.train.config.load_options` reports
    one only when that option is not on the command line, so ``--model`` completes a config without a
    model path as its help promises ("flags given here override it").

    ``advice`` holds the notes about a value the file lacks and the reader filled with its trainer's default
    (``{"mixed_precision": "...: train_dtype is not set, so OneTrainer's default FLOAT_16 applies..."}``): shown
    only when that option is not on the command line, where the user's own value replaces the default."""

    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    needs: dict[str, str] = field(default_factory=dict)
    advice: dict[str, str] = field(default_factory=dict)


#: fields written in a section ai-toolkit does not read them from (its NetworkConfig takes the LoRA module
#: filters from ``network_kwargs`` only: toolkit/config_modules.py, BaseSDTrainProcess passes
#: ``**network_kwargs`` to LoRASpecialNetwork), so ai-toolkit ignores them there: where they go
MISPLACED: dict[tuple[str, str], str] = {
    ("network", key): f" (ai-toolkit reads {key} from network.network_kwargs only and ignores it here: move it there)"
    for key in ("only_if_contains", "ignore_if_contains")
}


def check_section(table: Any, section: str, where: str, out: JobTranslation) -> dict[str, Any]:
    """The section as a dict; unknown names, noted fields and fields set away from ai-toolkit's
    default that sdcore does not implement go to ``out``."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        out.problems.append(f"{where}: must be a table, got {table!r}")
        return {}
    known = DEFAULTS[section]
    unknown = [f"{k!r}{MISPLACED.get((section, str(k))) or _nearest(str(k), known)}" for k in table if k not in known]
    if unknown:
        out.problems.append(f"{where}: unknown ai-toolkit field(s): {', '.join(unknown)}")
    noted = NOTED.get(section, {})
    handled = HANDLED.get(section, set())
    for key, value in table.items():
        if key not in known or key in handled:
            continue
        if key in noted:
            if not _same(value, known[key]):
                out.notes.append(f"{where}.{key}: accepted, no effect on the result here ({noted[key]})")
        elif not _same(value, known[key]):
            out.problems.append(
                f"{where}.{key} = {value!r}: sdcore does not implement this ai-toolkit field (only its default "
                f"{known[key]!r} is accepted)"
            )
    return dict(table)


def _process(job: dict[str, Any], where: str, out: JobTranslation) -> dict[str, Any]:
    processes = job["config"]["process"]
    trainers = [p for p in processes if isinstance(p, dict) and p.get("type") in TRAINER_TYPES]
    others = [str(p.get("type")) if isinstance(p, dict) else repr(p) for p in processes if p not in trainers]
    if str(job.get("job")) != "extension":
        out.problems.append(f"{where}: job {job.get('job')!r}: sdcore reads ai-toolkit training jobs (job: extension)")
    if others:
        out.problems.append(
            f"{where}: process type(s) {', '.join(others)}: sdcore reads ai-toolkit's trainer processes "
            f"({', '.join(TRAINER_TYPES)})"
        )
    if len(trainers) != 1:
        if not others:
            out.problems.append(f"{where}: config.process must hold one training process, found {len(trainers)}")
        return trainers[0] if trainers else {}
    return trainers[0]


def job_family(model: dict[str, Any], where: str, out: JobTranslation) -> str | None:
    """The family the job's ``model`` section declares (``arch`` or the ``is_*`` flags; SD1 when none)."""
    flags = [FAMILY_FLAGS[k] for k in FAMILY_FLAGS if model.get(k)]
    other_flags = [k for k in DEFAULTS["model"] if k.startswith("is_") and k not in FAMILY_FLAGS and k != "is_v_pred"]
    refused = [k for k in other_flags if model.get(k)]
    arch = model.get("arch")
    if refused:
        why = [ARCH_REFUSALS[k[3:]] for k in refused if k[3:] in ARCH_REFUSALS]
        out.problems.append(
            f"{where}.model: {', '.join(refused)}: sdcore does not train this model family{': ' if why else ''}"
            + "; ".join(why)
        )
        return None
    if arch is not None:
        arch = str(arch).split(":")[0]
        if arch not in ARCH_FAMILIES:
            reason = f" ({ARCH_REFUSALS[arch]})" if arch in ARCH_REFUSALS else ""
            out.problems.append(
                f"{where}.model.arch {arch!r}: sdcore does not train this model family{reason} "
                f"(it trains {', '.join(ARCH_FAMILIES)})"
            )
            return None
        if flags and flags[0] != ARCH_FAMILIES[arch]:
            out.problems.append(f"{where}.model: arch {arch} and {flags[0]} flags disagree")
        return ARCH_FAMILIES[arch]
    if len(set(flags)) > 1:
        out.problems.append(f"{where}.model: several family flags ({', '.join(flags)})")
    return flags[0] if flags else "sd1"


def _args_text(args: dict[str, Any]) -> str:
    def one(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return ",".join(one(v) for v in value)
        return str(value)

    return " ".join(f"{k}={one(v)}" for k, v in args.items())


def translate_job(
    job: dict[str, Any], fields: list[str], *, where: str, path: str | os.PathLike[str]
) -> JobTranslation:
    """sdcore option values for the job's training process (``fields``: the method's option names);
    ``data`` and ``sample_prompts`` point at the job file ``path`` itself."""
    out = JobTranslation()
    process = _process(job, where, out)
    w = f"{where}: process"
    check_section(process, "process", w, out)
    network = check_section(process.get("network"), "network", f"{w}.network", out)
    save = check_section(process.get("save"), "save", f"{w}.save", out)
    train = check_section(process.get("train"), "train", f"{w}.train", out)
    model = check_section(process.get("model"), "model", f"{w}.model", out)
    sample = check_section(process.get("sample"), "sample", f"{w}.sample", out)
    check_section(process.get("logging"), "logging", f"{w}.logging", out)
    ema = check_section(train.get("ema_config"), "ema_config", f"{w}.train.ema_config", out)
    datasets = process.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        out.problems.append(f"{w}.datasets: a list of datasets is needed")
        datasets = []
    for i, dataset in enumerate(datasets):
        check_section(dataset, "dataset", f"{w}.datasets[{i}]", out)
    family = job_family(model, w, out)
    flow = family in FLOW_FAMILIES
    v: dict[str, Any] = out.values

    # model and output: <training_folder>/<name>/<name>.safetensors, as ai-toolkit names its final save
    if not model.get("name_or_path"):
        out.needs["model"] = f"{w}.model.name_or_path: the model to train is needed (or give --model)"
    else:
        v["model"] = str(model["name_or_path"])
    if model.get("vae_path"):
        v["vae"] = str(model["vae_path"])
    name = str(process.get("name") or job["config"].get("name") or "")
    if not name:
        out.problems.append(f"{where}: config.name is needed (ai-toolkit names the output after it)")
    folder = Path(str(process.get("training_folder") or "output")).expanduser()
    v["output"] = str(folder / name / f"{name}.safetensors")
    v["data"] = str(path)
    if model.get("is_v_pred"):
        # stable_diffusion_model.py: prediction_type = "v_prediction" if is_v_pred else "epsilon" (the noise
        # scheduler's and the target); false stays sdcore's auto, which also reads a file's own v marker
        if flow:
            out.notes.append(f"{w}.model.is_v_pred: {family} trains with flow matching here; not applied")
        else:
            v["prediction_type"] = "v_prediction"
        if (train.get("min_snr_gamma") or 0) > 1e-6:
            out.problems.append(
                f"{w}.train.min_snr_gamma with model.is_v_pred: ai-toolkit weighs min(gamma / snr, 1) for every "
                "prediction type, sdcore's (kohya's) --min-snr-gamma min(snr, gamma) / (snr + 1) for v-prediction"
            )
    if model.get("quantize"):
        _quantize(str(model.get("qtype", "qfloat8")), w, out)
    _quantize_kwargs(model.get("quantize_kwargs"), bool(model.get("quantize")), f"{w}.model.quantize_kwargs", out)
    _quantize_te(model, family, w, out)
    _merged_loras(model, family, w, out)
    if model.get("attn_masking"):
        if family == "flux":
            v["apply_t5_attn_mask"] = True
        elif family != "chroma":  # Chroma's T5 padding is always masked in the transformer (ai-toolkit's too)
            out.problems.append(f"{w}.model.attn_masking: sdcore masks T5's padding on Flux only")
    if family == "chroma":  # chroma_model.py get_prompt_embeds: text_encoder(ids) with no attention_mask
        out.notes.append(
            f"{w}.model.arch chroma: ai-toolkit runs T5 without T5's attention mask (the padding is hidden in the "
            "transformer only); sdcore gives T5 the mask too, as kohya, OneTrainer and ChromaPipeline do"
        )
    if process.get("training_seed") is not None:
        v["seed"] = process["training_seed"]
    if process.get("log_dir"):
        v["log_dir"] = str(process["log_dir"])
    trigger = process.get("trigger_word")
    if trigger:
        v["metadata_trigger_phrase"] = str(trigger)

    lora_job = "rank" in fields
    # BaseSDTrainProcess reads get_conf('network', None): any network section (``{}`` too) trains a LoRA with
    # NetworkConfig's defaults; none (or null) fine-tunes the whole denoiser (and the text encoders per
    # train.train_text_encoder), so each kind of job is refused by the other method rather than silently changed
    has_network = process.get("network") is not None
    if has_network and not lora_job:
        out.problems.append(f"{w}.network: ai-toolkit trains this LoRA network; run the job with `sdcore train lora`")
    elif lora_job and not has_network:
        out.problems.append(
            f"{w}: this job fine-tunes the whole model (no network section): run it with "
            f"sdcore train dreambooth --config {path}"
        )
    elif has_network:
        _network(network, family, f"{w}.network", out)
    _model_filter(model, family, lora_job, w, out)
    _train(train, family, flow, f"{w}.train", out)  # family None: refused above; its rules are skipped
    _bypass_guidance(train, model, family, w, out)
    if v.get("train_text_encoder") and (v.get("layer_filter") is not None or v.get("layer_exclude") is not None):
        out.notes.append(f"{w}.network.network_kwargs: only_if_contains/ignore_if_contains apply to the denoiser's "
                         "modules here; ai-toolkit also matches them against the text encoders' names")  # fmt: skip
    if ema.get("use_ema"):  # ai-toolkit saves and samples the EMA; its decay is constant (no use_num_updates)
        v["ema"] = True
        v["ema_decay"] = ema.get("ema_decay", DEFAULTS["ema_config"]["ema_decay"])
        v["ema_warmup"] = "none"

    # save
    dtype = str(save.get("dtype", "float16")).lower()
    if dtype not in SAVE_DTYPES:
        out.problems.append(f"{w}.save.dtype {dtype!r}: choose one of {', '.join(SAVE_DTYPES)}")
    else:
        v["save_dtype"] = SAVE_DTYPES[dtype]
    v["save_every"] = save.get("save_every", 1000)
    _save_format(str(save.get("save_format", "safetensors")), family, lora_job, v, w, out)
    v["save_limit"] = save.get("max_step_saves_to_keep", 5)

    # sampling: ai-toolkit samples before the first step unless told not to
    prompts = sample.get("samples") or sample.get("prompts")
    if prompts and not train.get("disable_sampling"):
        v["sample_prompts"] = str(path)
        v["sample_every"] = sample.get("sample_every", 100)
        v["sample_steps"] = sample.get("sample_steps", 20)
        v["sample_at_first"] = bool(train.get("force_first_sample")) or not train.get("skip_first_sample")

    # datasets: read by load_datasets (--data is the job); the run-wide caching follows them
    tables = [d for d in datasets if isinstance(d, dict)]
    cached = [d for d in tables if d.get("cache_text_embeddings")]
    if cached:
        if len(cached) != len(tables):  # config_modules.validate_configs
            out.problems.append(
                f"{w}.datasets: cache_text_embeddings must be on for every dataset or none (as in ai-toolkit)"
            )
        v["caption_variants"] = 1  # one encoding per caption, one shuffled order, as ai-toolkit caches it
        if any(d.get("caption_dropout_rate") or d.get("token_dropout_rate") for d in cached):
            out.notes.append(
                f"{w}.datasets: cache_text_embeddings turns caption_dropout_rate and token_dropout_rate off, as in "
                "ai-toolkit (it encodes each caption once)"
            )
    if tables:
        v["cache_latents"] = any(d.get("cache_latents") or d.get("cache_latents_to_disk") for d in tables)
        v["cache_latents_to_disk"] = any(bool(d.get("cache_latents_to_disk")) for d in tables)
        regs = [d for d in tables if d.get("is_reg")]
        if regs and not any(not d.get("is_reg") for d in tables):
            out.problems.append(f"{w}.datasets: only regularisation datasets (is_reg), nothing to train on")
        elif regs:
            out.notes.append(
                f"{w}.datasets: is_reg images are mixed into each epoch by their num_repeats (kohya's way); "
                "ai-toolkit takes a regularisation batch every other step"
            )

    drop_foreign_options(v, fields, f"{where}: not options of this training method", out.problems)
    return out


def _model_filter(model: dict[str, Any], family: str | None, lora_job: bool, where: str, out: JobTranslation) -> None:
    """``model.only_if_contains``/``ignore_if_contains``: the parameter-name filter of a full fine-tune
    (``StableDiffusion.named_parameters``: the denoiser's ``transformer.<path>``/``unet.<path>`` names, read by
    ``prepare_optimizer_params`` only when the job has no network). sdcore's DreamBooth trains every denoiser
    parameter and has no such filter, so a fine-tune's list is refused; a LoRA job never reads it (its filter is
    ``network.network_kwargs``)."""
    given = {key: model[key] for key in ("only_if_contains", "ignore_if_contains") if model.get(key) is not None}
    if not given:
        return
    names = ", ".join(f"model.{key}" for key in given)
    if lora_job:
        out.notes.append(
            f"{where}.{names}: ai-toolkit reads it for full fine-tunes only (a LoRA job's filter is "
            "network.network_kwargs), so it has no effect here either"
        )
        return
    nearest = "; on SDXL --block-lr with 0 for a block freezes whole U-Net blocks" if family == "sdxl" else ""
    for key, words in given.items():
        out.problems.append(
            f"{where}.model.{key} = {words!r}: ai-toolkit's full fine-tune then trains only the denoiser "
            f"parameters whose name {'contains' if key == 'only_if_contains' else 'lacks'} one of them; sdcore's "
            f"DreamBooth has no parameter filter and trains them all (drop the list to train every parameter, "
            f"or train a LoRA on those layers: network.network_kwargs.{key}{nearest})"
        )


def _save_format(
    fmt: str, family: str | None, lora_job: bool, v: dict[str, Any], where: str, out: JobTranslation
) -> None:
    """``save.save_format`` (safetensors or diffusers). A LoRA is written as .safetensors whatever it says
    (``BaseSDTrainProcess.save``: the format applies to the full model). A full fine-tune: Flux/Flex.1 is always
    diffusers (``validate_configs`` forces it on is_flux), Kontext's ``save_model`` always writes a diffusers
    transformer, Chroma's always a .safetensors; SD1/2/XL/SD3 follow the field. sdcore's DreamBooth writes the
    whole model in that format: a diffusers folder at ``<training_folder>/<name>/<name>``, as ai-toolkit names it."""
    if fmt not in ("safetensors", "diffusers"):
        out.problems.append(f"{where}.save.save_format {fmt!r}: ai-toolkit takes safetensors or diffusers")
        return
    if lora_job:
        if fmt == "diffusers" and family not in ("flux", None):
            out.notes.append(f"{where}.save.save_format diffusers: ai-toolkit writes a LoRA as .safetensors anyway")
        return
    forced = {"flux": "diffusers", "chroma": "single-file"}.get(family or "")
    chosen = forced or ("diffusers" if fmt == "diffusers" else "single-file")
    if forced and (fmt == "diffusers") != (forced == "diffusers"):
        out.notes.append(
            f"{where}.save.save_format {fmt}: ai-toolkit writes a {family} fine-tune as "
            f"{'a diffusers folder' if chosen == 'diffusers' else 'one .safetensors file'} whatever it says; so does sdcore"
        )
    if family == "chroma":
        out.notes.append(
            f"{where}.save: ai-toolkit's Chroma file is the transformer alone (BFL keys); sdcore writes a ComfyUI "
            "checkpoint (with T5 and the VAE): `sdcore model convert --to bfl` writes the transformer alone"
        )
    v["save_format"] = chosen
    if chosen == "diffusers":
        v["output"] = str(Path(v["output"]).with_suffix(""))


def local_lora_file(value: Any, field: str, out: JobTranslation) -> str | None:
    """ai-toolkit's LoRA path fields: a file, or a folder holding ``pytorch_lora_weights.safetensors``; ai-toolkit
    downloads a hub id, sdcore reads no hub, so anything else is a problem that says what to give."""
    path = Path(str(value)).expanduser()
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if path.is_file():
        return str(path)
    out.problems.append(
        f"{field} {value!r}: no such file or folder here (sdcore reads no model hub: download the LoRA's "
        "pytorch_lora_weights.safetensors and give its path)"
    )
    return None


#: ai-toolkit ``model.qtype`` -> ``--base-weights-dtype`` and what differs (optimum-quanto's and torchao's names)
QTYPES: dict[str, tuple[str, str]] = {
    "qfloat8": ("fp8", "not optimum-quanto's qfloat8: the same kind of rounding, not the same numbers"),
    "float8": ("fp8", "not torchao's float8 weight-only: the same kind of rounding, not the same numbers"),
    "qint8": ("int8", "symmetric absmax per output row like quanto's qint8, maxima kept in fp32: a few codes may differ"),
    "int8": ("int8", "symmetric absmax per output row like torchao's int8 weight-only, maxima in fp32"),
    "qint4": ("nf4", "NOT quanto's qint4 (uniform codes, a scale per group): QLoRA's NormalFloat4 in blocks of 64; "
              "the same memory class, different numbers"),
    "uint4": ("nf4", "NOT ai-toolkit's uint4 (uniform codes with a scale and zero point per group): QLoRA's "
              "NormalFloat4 in blocks of 64; the same memory class, different numbers"),
}  # fmt: skip


def _quantize(qtype: str, where: str, out: JobTranslation) -> None:
    """``model.quantize`` with its ``qtype``: the denoiser's frozen weights in sdcore's nearest storage format."""
    if "|" in qtype:  # e.g. "uint4|ostris/accuracy_recovery_adapters/...": a 4-bit base plus a recovery LoRA
        out.problems.append(
            f"{where}.model.qtype {qtype!r}: sdcore does not load accuracy-recovery adapters; use the plain qtype"
        )
        return
    if qtype not in QTYPES:
        out.problems.append(
            f"{where}.model.qtype {qtype!r}: sdcore stores frozen weights as fp8, int8 or nf4 "
            f"(qtype {', '.join(QTYPES)})"
        )
        return
    storage, difference = QTYPES[qtype]
    if storage == "fp8":
        out.values["fp8_base"] = True
    else:
        out.values["base_weights_dtype"] = storage
    out.notes.append(
        f"{where}.model.quantize: the denoiser's frozen weights are stored as {storage} "
        f"(sdcore's --base-weights-dtype {storage}, {difference})"
    )


def _quantize_te(model: dict[str, Any], family: str | None, where: str, out: JobTranslation) -> None:
    """ai-toolkit quantises T5-XXL alone, with ``model.qtype``: on FLUX.1 (Kontext) and Chroma when
    ``quantize_te`` (default: ``quantize``), on SD3 with ``quantize`` itself (stable_diffusion_model.py and the
    chroma/flux_kontext extensions); CLIP stays, and those models never read ``qtype_te``. sdcore stores T5's
    frozen Linear weights in the nearest format (--text-encoder-weights-dtype, the other encoders none)."""
    from ..models.family import get_family

    quantize = bool(model.get("quantize"))
    asked = quantize if family == "sd3" else bool(model.get("quantize_te", quantize))
    specs = get_family(family).text_encoders if family else ()
    t5 = [spec.kind.startswith("t5") for spec in specs]
    if "qtype_te" in model and any(t5):
        out.notes.append(f"{where}.model.qtype_te: ai-toolkit's {family} model quantises T5 with qtype; no effect")
    if not asked:
        return
    if not any(t5):
        if model.get("quantize_te"):
            out.notes.append(f"{where}.model.quantize_te: ai-toolkit quantises no {family} text encoder; no effect")
        return
    qtype = str(model.get("qtype", "qfloat8"))
    if qtype not in QTYPES:
        if not quantize:  # model.quantize's own check names a bad qtype already
            out.problems.append(
                f"{where}.model.qtype {qtype!r}: sdcore stores T5 as fp8, int8 or nf4 ({', '.join(QTYPES)})"
            )
        return
    storage, difference = QTYPES[qtype]
    out.values["text_encoder_weights_dtype"] = ",".join(storage if is_t5 else "none" for is_t5 in t5)
    out.notes.append(
        f"{where}.model.{'quantize' if family == 'sd3' else 'quantize_te'}: T5-XXL's frozen Linear weights are stored "
        f"as {storage} (--text-encoder-weights-dtype {out.values['text_encoder_weights_dtype']}; {difference})"
    )


def _quantize_kwargs(kwargs: Any, quantize: bool, where: str, out: JobTranslation) -> None:
    """``quantize_kwargs: {exclude: [...]}`` (optimum-quanto's ``quantize`` arguments: glob patterns of the
    transformer's module names kept unquantized; Ostris' Flex.1 examples keep ``*time_text_embed*``) ->
    ``--base-weights-exclude``; other arguments are refused."""
    if kwargs is None or kwargs == {}:
        return
    if not isinstance(kwargs, dict):
        out.problems.append(f"{where}: must be a table, got {kwargs!r}")
        return
    other = sorted(str(k) for k in kwargs if k != "exclude")
    if other:
        out.problems.append(f"{where}: sdcore implements exclude only (got {other})")
    patterns = kwargs.get("exclude")
    if patterns is None:
        return
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p and "," not in p for p in patterns):
        out.problems.append(f"{where}.exclude: a list of glob patterns without commas, got {patterns!r}")
        return
    if not quantize:
        out.notes.append(f"{where}: no effect without model.quantize (as in ai-toolkit)")
        return
    out.values["base_weights_exclude"] = ",".join(patterns)


def _merged_loras(model: dict[str, Any], family: str | None, where: str, out: JobTranslation) -> None:
    """``model.lora_path`` is fused into the model before training (kohya's and sdcore's base_weights);
    ``assistant_lora_path`` (Flux schnell's training adapter) is fused the same way, and ai-toolkit samples
    with it taken out again (a -1 weight), which sdcore's samples do not."""
    given = [name for name in ("lora_path", "assistant_lora_path") if model.get(name)]
    if not given:
        return
    if len(given) > 1:
        out.problems.append(f"{where}.model: lora_path and assistant_lora_path cannot both be given (as in ai-toolkit)")
        return
    name = given[0]
    if family != "flux":
        out.problems.append(f"{where}.model.{name}: ai-toolkit fuses such LoRAs into Flux models only")
        return
    path = local_lora_file(model[name], f"{where}.model.{name}", out)
    if path is None:
        return
    out.values["base_weights"] = path
    if name == "assistant_lora_path":
        out.notes.append(
            f"{where}.model.assistant_lora_path: the adapter is merged into the model for training (--base-weights); "
            "samples during training include it (ai-toolkit's take it out again), the saved LoRA is the same"
        )


def _network(network: dict[str, Any], family: str | None, where: str, out: JobTranslation) -> None:
    v = out.values
    if network.get("pretrained_lora_path"):  # the network starts from these weights (kohya's --network_weights)
        initial = local_lora_file(network["pretrained_lora_path"], f"{where}.pretrained_lora_path", out)
        if initial is not None:
            v["network_weights"] = initial
    kind = str(network.get("type", "lora")).lower()
    rank = network.get("rank") if network.get("rank") is not None else network.get("linear")
    rank = 4 if rank is None else rank
    alpha = network.get("linear_alpha", network.get("alpha", 1.0))
    conv = network.get("conv")
    conv_alpha = network.get("conv_alpha", conv)
    if kind == "lokr":
        if network.get("lokr_full_rank", True):
            out.problems.append(
                f"{where}.type lokr with lokr_full_rank (ai-toolkit's default): sdcore's LoKr is low-rank; "
                "set lokr_full_rank: false and a linear rank"
            )
        v["algo"] = "lokr"
        v["lokr_factor"] = network.get("lokr_factor", -1)
    elif kind in ("lora", "locon"):
        v["algo"] = "locon" if kind == "locon" else "lora"
    else:
        out.problems.append(f"{where}.type {kind!r}: sdcore trains lora, locon and lokr networks")
    v["rank"] = rank
    if family in FLOW_FAMILIES:
        # ai-toolkit saves transformer LoRAs in PEFT format, which has no alpha: the scale is 1 (alpha = rank)
        v["alpha"] = rank
        if ("linear_alpha" in network or "alpha" in network) and not _same(alpha, rank):
            out.notes.append(
                f"{where}.linear_alpha {alpha}: ai-toolkit's Flux/SD3 LoRAs (PEFT format) train and save with "
                f"alpha = rank ({rank}), so sdcore does too"
            )
        v["key_layout"] = "diffusers"
        v["split_qkv"] = True
        if kind != "lora":
            out.problems.append(f"{where}.type {kind}: on {family} sdcore trains plain LoRA (ai-toolkit's lora)")
        if conv:
            out.notes.append(f"{where}.conv: {family} has no convolutions that ai-toolkit's LoRA adapts")
    else:
        v["alpha"] = alpha
        if conv:
            v["conv_rank"] = conv
            v["conv_alpha"] = conv_alpha
    if network.get("dropout") is not None:
        v["dropout"] = network["dropout"]
    _network_kwargs(network.get("network_kwargs"), family, f"{where}.network_kwargs", out)


#: ai-toolkit's name of the denoiser in the module names ``only_if_contains``/``ignore_if_contains`` are
#: matched against (``toolkit/lora_special.py``): ``<prefix>.<diffusers path>``, and the LoRA name, where the
#: dots are ``_`` (``lora_unet``, SD) or ``$$`` (PEFT format, which ai-toolkit always uses on transformers)
#: (Flex.1 is read as flux). ai-toolkit's Chroma is its own BFL-layout model (``double_blocks.N.img_attn.qkv``):
#: its names are not the diffusers paths sdcore matches, so the lists are refused there
CONTAINS_PREFIX = {"flux": ("transformer", "$$"), "sd3": ("transformer", "$$")}
_SD_PREFIX = ("lora_unet", "_")


def contains_regex(word: str, prefix: str, sep: str | None) -> str:
    """A regular expression searched in a diffusers path that matches exactly the paths ai-toolkit's ``word``
    matches: ``word in f"{prefix}.{path}"`` and, with ``sep`` (``only_if_contains``), ``word`` in the LoRA
    name (the dots written ``sep``). A word may start inside the prefix (``transformer.single_transformer_blocks.``
    matches paths that start ``single_transformer_blocks.``); a word inside the prefix matches every path."""

    def forms(text: str, head: str, char: Callable[[str], str]) -> list[str] | None:
        """Where ``text`` occurs in ``head + path`` (path written with ``char``); None: every path."""
        if text in head:
            return None
        out = ["".join(map(char, text))]
        for k in range(len(head)):
            tail = head[k:]
            if text.startswith(tail):
                out.append("^" + "".join(map(char, text[len(tail) :])))
        return out

    alternatives = forms(word, prefix + ".", re.escape)
    if alternatives is None:
        return ""
    if sep == "_" and "." not in word:  # lora_unet_down_blocks_0_...: a "_" of the word is a "_" or "." of the path
        lora = forms(word, prefix + "_", lambda c: "[._]" if c == "_" else re.escape(c))
        if lora is None:
            return ""
        alternatives += lora
    elif sep == "$$" and "$$" in word:  # transformer$$single_transformer_blocks$$...: "$$" is a dot
        plain = word.replace("$$", ".")
        lora = forms(plain, prefix + ".", re.escape) if "$" not in plain else []
        if lora is None:
            return ""
        alternatives += lora
    unique = list(dict.fromkeys(alternatives))
    return unique[0] if len(unique) == 1 else "|".join(f"(?:{a})" for a in unique)


def _network_kwargs(kwargs: Any, family: str | None, where: str, out: JobTranslation) -> None:
    """``only_if_contains`` -> ``--layer-filter``, ``ignore_if_contains`` -> ``--layer-exclude`` (which wins, as
    ignore does in ai-toolkit), as regular expressions on the diffusers path (:func:`contains_regex`) unless the
    words are plain substrings of it; other kwargs are refused."""
    if kwargs is None or kwargs == {}:
        return
    if not isinstance(kwargs, dict):
        out.problems.append(f"{where}: must be a table, got {kwargs!r}")
        return
    other = sorted(str(k) for k in kwargs if k not in ("only_if_contains", "ignore_if_contains"))
    if other:
        out.problems.append(f"{where}: sdcore implements only_if_contains and ignore_if_contains (got {other})")
    lists: dict[str, list[str]] = {}
    for key in ("only_if_contains", "ignore_if_contains"):
        words = kwargs.get(key)
        if words is None:
            continue
        if isinstance(words, str) or not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            out.problems.append(f"{where}.{key}: a list of strings, got {words!r}")
            continue
        bad = [w for w in words if "," in w or w != w.strip()]
        if bad:
            out.problems.append(f"{where}.{key} {bad}: a comma or surrounding spaces cannot be written in a pattern")
            continue
        lists[key] = words
    if not lists:
        return
    if family == "chroma":
        out.problems.append(f"{where}: ai-toolkit's Chroma matches these words against its BFL-layout module names "
                            "(double_blocks.N.img_attn.qkv), sdcore's Chroma has diffusers ones; write --layer-filter/"
                            "--layer-exclude patterns on the paths `sdcore lora targets` lists")  # fmt: skip
        return
    prefix, sep = CONTAINS_PREFIX.get(family or "", _SD_PREFIX)
    only, ignore = lists.get("only_if_contains"), lists.get("ignore_if_contains")
    regexes = {key: [contains_regex(w, prefix, sep if key == "only_if_contains" else None) for w in words]
               for key, words in lists.items()}  # fmt: skip
    plain = all(r == re.escape(w) for k in lists for w, r in zip(lists[k], regexes[k], strict=True))
    if only is not None and not only:
        out.problems.append(f"{where}.only_if_contains is empty: ai-toolkit then adapts nothing")
    elif only is not None:
        if plain and len(only) == 1:
            out.values["layer_filter"] = only[0]
        else:  # one alternation: ai-toolkit lets a word match nothing, sdcore's filter refuses an unused pattern
            out.values["layer_filter"] = "|".join(f"(?:{r})" for r in regexes["only_if_contains"])
            plain = False
    if ignore:
        out.values["layer_exclude"] = ",".join(ignore if plain else regexes["ignore_if_contains"])
    out.values["layer_filter_regex"] = not plain


def _train(train: dict[str, Any], family: str | None, flow: bool, where: str, out: JobTranslation) -> None:
    v = out.values
    v["max_steps"] = train.get("steps", 1000)
    v["lr"] = train.get("lr", 1e-6)
    for key in ("unet_lr", "text_encoder_lr"):
        # BaseSDTrainProcess gives the network unet_lr = text_encoder_lr = train.lr: these fields are not read
        if key in train and not _same(train[key], v["lr"]):
            out.notes.append(f"{where}.{key} {train[key]}: no effect in ai-toolkit's trainer (the network's "
                             f"parameter groups all get train.lr, {v['lr']}), so sdcore trains at lr too")  # fmt: skip
    v["batch_size"] = train.get("batch_size", 1)
    # ai-toolkit's ``gradient_accumulation`` takes N batches per step (sdcore's accumulation); its legacy
    # ``gradient_accumulation_steps`` counts every batch as a step of ``steps``, save_every... (-1: a whole epoch)
    if train.get("gradient_accumulation_steps", 1) != 1:
        out.problems.append(
            f"{where}.gradient_accumulation_steps {train['gradient_accumulation_steps']}: ai-toolkit's legacy "
            "accumulation counts each batch as a step; use gradient_accumulation (sdcore reads that one)"
        )
    v["gradient_accumulation"] = train.get("gradient_accumulation", 1)
    if train.get("reg_weight", 1.0) != 1.0:
        v["prior_loss_weight"] = train["reg_weight"]  # the loss multiplier of is_reg samples
    v["gradient_checkpointing"] = bool(train.get("gradient_checkpointing", True))
    v["max_grad_norm"] = train.get("max_grad_norm", 1.0)
    if train.get("noise_offset"):
        v["noise_offset"] = train["noise_offset"]
    # SDTrainer: apply_snr_weight multiplies by min(gamma / snr, 1) = min(snr, gamma) / snr, sdcore's min-SNR for
    # epsilon prediction (translate_job refuses v-prediction); snr_gamma (gamma / snr uncapped) comes first
    snr_gamma = train.get("snr_gamma")
    if snr_gamma is not None and float(snr_gamma) > 1e-6:
        out.problems.append(
            f"{where}.snr_gamma {snr_gamma}: ai-toolkit weighs gamma / snr without a cap; sdcore's --min-snr-gamma "
            "caps it at 1 (min_snr_gamma)"
        )
    elif train.get("min_snr_gamma") is not None and float(train["min_snr_gamma"]) > 1e-6:
        v["min_snr_gamma"] = train["min_snr_gamma"]
    loss = str(train.get("loss_type", "mse")).lower()
    if loss in LOSS_TYPES:
        v["loss_type"] = LOSS_TYPES[loss]
    else:
        why = LOSS_REFUSALS.get(loss, "")
        out.problems.append(
            f"{where}.loss_type {loss!r}: {why}{'; ' if why else ''}sdcore implements ai-toolkit's mse and mae"
        )
    style = str(train.get("content_or_style", "balanced")).lower()
    if style != "balanced":
        out.problems.append(
            f"{where}.content_or_style {style!r}: ai-toolkit draws timesteps as U^3 (content) or 1 - U^3 (style) "
            "over the range; sdcore draws them uniformly"
        )
    dtype = str(train.get("dtype", "fp32")).lower()
    if dtype in PRECISIONS:
        v["mixed_precision"] = PRECISIONS[dtype]
    else:
        out.problems.append(f"{where}.dtype {dtype!r}: choose one of {', '.join(PRECISIONS)}")
    unet, te = bool(train.get("train_unet", True)), bool(train.get("train_text_encoder", False))
    if not unet and not te:
        out.problems.append(f"{where}: train_unet and train_text_encoder are both off: nothing to train")
    v["train_text_encoder"] = te
    if te and not unet:
        v["te_only"] = True
    # optimizer: ai-toolkit's names, with the eps it adds unless optimizer_params give one
    name = str(train.get("optimizer", "adamw")).lower()
    params = train.get("optimizer_params") or {}
    if not isinstance(params, dict):
        out.problems.append(f"{where}.optimizer_params: must be a table")
        params = {}
    if name not in OPTIMIZERS:
        out.problems.append(
            f"{where}.optimizer {name!r}: not available in sdcore (ai-toolkit's {', '.join(OPTIMIZERS)} are)"
        )
    else:
        optimizer, added = OPTIMIZERS[name]
        v["optimizer"] = optimizer
        args = {**added, **params}
        if args:
            v["optimizer_args"] = _args_text(args)
        if name == "adafactor":
            out.notes.append(
                f"{where}.optimizer adafactor: transformers' Adafactor with ai-toolkit's arguments "
                "(ai-toolkit's own copy adds stochastic rounding for bf16 weights)"
            )
    _schedule(train, where, out)
    # noise and timesteps
    scheduler = str(train.get("noise_scheduler", "ddpm")).lower()
    if family is None:
        return
    if flow:
        if scheduler != "flowmatch":
            out.notes.append(f"{where}.noise_scheduler {scheduler!r}: sdcore trains {family} with flow matching")
        kind = str(train.get("timestep_type", "sigmoid")).lower()
        # BaseSDTrainProcess: linear_timesteps(2) build the linear table whatever the timestep_type; SDTrainer
        # then weighs the loss by the bell (half bell with linear_timesteps2, which wins)
        linear = bool(train.get("linear_timesteps") or train.get("linear_timesteps2"))
        if kind not in TIMESTEP_TYPES:
            why = TIMESTEP_REFUSALS.get(kind, "")
            out.problems.append(
                f"{where}.timestep_type {kind!r}: {why}{'; ' if why else ''}sdcore implements ai-toolkit's "
                f"{', '.join(TIMESTEP_TYPES)} timesteps"
            )
        else:
            sampling = "linear_table" if linear else TIMESTEP_TYPES[kind]
            v["timestep_sampling"] = sampling
            v["sigmoid_scale"] = 1.0
            v["discrete_flow_shift"] = 1.0
            if sampling == "shift_table":
                v["discrete_flow_shift"], v["dynamic_timestep_shift"] = FLOW_SCHEDULER_SHIFTS[family]
                if family == "chroma":  # BaseSDTrainProcess: patch 2 for is_flux only; chroma_model.py's FakeConfig 1
                    out.notes.append(
                        f"{where}.timestep_type {kind}: ai-toolkit's Chroma counts the resolution shift's tokens "
                        "with patch size 1 (h * w latent pixels, 4x the packed tokens, so a larger shift); sdcore "
                        "counts the packed tokens, as its Flux and ChromaPipeline do"
                    )
            if kind == "weighted":
                v["timestep_loss_weight"] = WEIGHTED_LOSS_WEIGHT
            elif linear:
                v["timestep_loss_weight"] = "half_bell" if train.get("linear_timesteps2") else "bell"
            if sampling in DRAWN_TABLE_TYPES and int(train.get("batch_size", 1)) > 1:
                out.notes.append(
                    f"{where}.timestep_type {kind}: ai-toolkit draws one table per step for the whole batch; "
                    "sdcore draws one per sample (the same distribution for each sample)"
                )
            _flow_range(train, where, out)
            v["model_prediction_type"] = "raw"
            v["weighting_scheme"] = "uniform"
        if family == "flux":
            v["guidance_scale"] = train.get("cfg_scale", 1.0)
    else:
        if scheduler == "flowmatch":
            out.problems.append(f"{where}.noise_scheduler flowmatch: sdcore trains {family} with its DDPM schedule")
        elif scheduler != "ddpm":
            out.notes.append(f"{where}.noise_scheduler {scheduler!r}: sdcore adds noise with the DDPM schedule")
        if {"timestep_type", "linear_timesteps", "linear_timesteps2"} & set(train):
            out.notes.append(f"{where}.timestep_type/linear_timesteps: used by ai-toolkit with flowmatch only")
        _ddpm_range(train, where, out)
        if train.get("cfg_scale", 1.0) != 1.0:
            out.problems.append(f"{where}.cfg_scale: a guidance embedding value, Flux only")


def _bypass_guidance(train: dict[str, Any], model: dict[str, Any], family: str | None, where: str,
                     out: JobTranslation) -> None:  # fmt: skip
    """``train.bypass_guidance_embedding`` -> ``--bypass-guidance-embedding`` on Flux (Ostris' Flex.1 examples set
    it); ``model.use_flux_cfg`` turns it on too (``config_modules.validate_configs``, Flux only). Elsewhere
    ai-toolkit's other models have no guidance embedding and ignore it: a note."""
    cfg = bool(model.get("use_flux_cfg"))
    bypass = bool(train.get("bypass_guidance_embedding"))
    if family is None or not (bypass or cfg):
        return
    if family != "flux":
        fields = [f"{where}.{name}" for name, on in (("train.bypass_guidance_embedding", bypass),
                                                     ("model.use_flux_cfg", cfg)) if on]  # fmt: skip
        out.notes.append(f"{', '.join(fields)}: no effect on {family} (no guidance embedding; ai-toolkit reads "
                         "it on Flux only)")  # fmt: skip
        return
    out.values["bypass_guidance_embedding"] = True
    if cfg:
        out.notes.append(
            f"{where}.model.use_flux_cfg: trains with the guidance embedding bypassed, as ai-toolkit; ai-toolkit "
            "also samples without it, with true CFG at sample.guidance_scale against neg, where sdcore's samples "
            "keep the embedded guidance (the previews differ, the trained weights do not)"
        )


def _flow_range(train: dict[str, Any], where: str, out: JobTranslation) -> None:
    """``min/max_denoising_steps`` on flowmatch (BaseSDTrainProcess, content_or_style balanced): clipped to
    [0, 999], then the table index ``randint(min, max)`` (max excluded), or ``min`` itself when they are equal:
    sdcore's ``--min-table-index``/``--max-table-index`` (for the sigmoid table a quantile band of each table)."""
    low = max(int(train.get("min_denoising_steps", 0)), 0)
    high = min(int(train.get("max_denoising_steps", 999)), FLOW_TABLE_SIZE - 1)
    if low > high:
        out.problems.append(
            f"{where}.min/max_denoising_steps {low}/{high}: ai-toolkit's randint({low}, {high}) needs min <= max"
        )
        return
    out.values["min_table_index"] = low
    out.values["max_table_index"] = high if high > low else low + 1


def _ddpm_range(train: dict[str, Any], where: str, out: JobTranslation) -> None:
    """``min/max_denoising_steps`` on the DDPM schedule (BaseSDTrainProcess, content_or_style balanced): clipped
    to [0, 999], then an index ``randint(min + 1, max - 1)`` of the 1000-step table, whose index i is timestep
    999 - i; so the timesteps are uniform integers in [1001 - max, 998 - min] = kohya's ``--min-timestep
    1001 - max --max-timestep 999 - min`` (the defaults 0 and 999 give [2, 998])."""
    low = max(int(train.get("min_denoising_steps", 0)), 0)
    high = min(int(train.get("max_denoising_steps", 999)), DDPM_TIMESTEPS - 1)
    if high - low < 3:
        out.problems.append(
            f"{where}.min/max_denoising_steps {low}/{high}: ai-toolkit draws from randint({low + 1}, {high - 1}), "
            "which needs max - min >= 3 (sdcore draws from a range)"
        )
        return
    out.values["min_timestep"] = DDPM_TIMESTEPS + 1 - high
    out.values["max_timestep"] = DDPM_TIMESTEPS - 1 - low


def _schedule(train: dict[str, Any], where: str, out: JobTranslation) -> None:
    """``lr_scheduler`` as ai-toolkit builds it: torch schedulers given ``total_iters`` = steps."""
    v = out.values
    name = str(train.get("lr_scheduler", "constant")).lower()
    params = dict(train.get("lr_scheduler_params") or {})
    steps = train.get("steps", 1000)
    if name == "constant":
        if params.get("factor", 1.0) != 1.0 or set(params) - {"factor", "total_iters"}:
            v["lr_scheduler_type"] = "ConstantLR"
            v["lr_scheduler_args"] = _args_text({"factor": 1.0, "total_iters": steps, **params})
        else:
            v["lr_scheduler"] = "constant"
    elif name == "constant_with_warmup":
        v["lr_scheduler"] = "constant_with_warmup"
        v["lr_warmup_steps"] = params.pop("num_warmup_steps", 1000)
        params.pop("total_iters", None)
        if params:
            out.problems.append(f"{where}.lr_scheduler_params {sorted(params)}: not arguments of constant_with_warmup")
    elif name == "cosine" and not set(params) - {"total_iters"}:
        if params.get("total_iters", steps) == steps:
            v["lr_scheduler"] = "cosine"  # CosineAnnealingLR(T_max=steps): lr*(1+cos(pi*t/steps))/2 = sdcore's cosine
        else:
            v["lr_scheduler_type"] = "CosineAnnealingLR"
            v["lr_scheduler_args"] = f"T_max={params['total_iters']}"
    elif name in TORCH_SCHEDULERS:
        cls, key = TORCH_SCHEDULERS[name]
        total = params.pop("total_iters", steps)
        if key and key not in params and not (name == "step" or "max_iterations" in params):
            params[key] = total
        v["lr_scheduler_type"] = cls
        if params:
            v["lr_scheduler_args"] = _args_text(params)
    else:
        out.problems.append(
            f"{where}.lr_scheduler {name!r}: sdcore reads ai-toolkit's constant, constant_with_warmup, cosine, "
            "cosine_with_restarts, linear and step"
        )


def _job_process(path: str | os.PathLike[str], error: type[Exception]) -> tuple[dict[str, Any], str]:
    job = read_job(path)
    if job is None:
        raise error(f"{path}: not an ai-toolkit job (job: extension, config.process)")
    out = JobTranslation()
    process = _process(job, str(path), out)
    if out.problems:
        raise error("; ".join(out.problems))
    return process, str(path)


def _keep_tokens(d: dict[str, Any], trigger: bool, where: str, out: JobTranslation) -> int:
    """sdcore's keep_tokens for a dataset. ai-toolkit's ``keep_tokens`` only spares the first tokens from
    ``token_dropout_rate`` (dataloader_mixins.py get_caption: the drop loop), while ``shuffle_tokens`` shuffles
    every token; sdcore's (kohya's) keep_tokens also holds them in place. And ai-toolkit puts the trigger in
    front after the drop, so it is never dropped; sdcore's trigger is joined to the first tag, which drops
    with it unless kept."""
    keep = int(d.get("keep_tokens", 0))
    shuffle = bool(d.get("shuffle_tokens", False))
    dropout = float(d.get("token_dropout_rate", 0.0)) > 0
    if dropout and shuffle and keep > 0:
        out.problems.append(
            f"{where}.keep_tokens {keep} with shuffle_tokens and token_dropout_rate: ai-toolkit spares those tokens "
            "from the drop but shuffles them; sdcore's keep_tokens holds them in place"
        )
    if dropout and trigger and keep == 0 and not d.get("is_reg"):
        out.problems.append(
            f"{where}.token_dropout_rate with a trigger word and keep_tokens 0: ai-toolkit adds the trigger after "
            "the drop (never dropped); sdcore's trigger joins the first tag, which may be dropped (keep_tokens: 1 "
            "keeps both, in ai-toolkit too)"
        )
    return keep if dropout else 0  # without token dropout ai-toolkit's keep_tokens changes nothing


def _cached_captions(d: dict[str, Any]) -> dict[str, Any]:
    """A dataset with ``cache_text_embeddings``: ai-toolkit encodes each caption once, skipping caption and token
    dropout (dataloader_mixins.py get_caption: both are off when caching) and keeping the one shuffled order it
    cached; the job's translation sets --caption-variants 1 for that order."""
    if not d.get("cache_text_embeddings"):
        return d
    return {**d, "caption_dropout_rate": 0.0, "token_dropout_rate": 0.0}


def load_datasets(
    path: str | os.PathLike[str], options: TrainOptions | None, skipped: list[SkippedFile] | None = None
) -> list[SubsetOptions]:
    """The job's ``datasets`` as sdcore subsets: one per dataset and resolution (ai-toolkit's
    ``preprocess_dataset_raw_config`` splits a resolution list the same way), with ai-toolkit's
    defaults; ``is_reg`` datasets are regularisation images; ``default_caption`` captions images
    without (or with an empty) caption file; the trigger word (the dataset's, else the process')
    goes into the captions as :func:`inject_trigger` says."""
    from dataclasses import replace

    from ..data.dataset import DatasetProblems, SubsetOptions, subset_defaults

    process, where = _job_process(path, DataError)
    out = JobTranslation()
    tables = process.get("datasets")
    if not isinstance(tables, list) or not tables:
        raise DataError(f"{where}: process.datasets: a list of datasets is needed")
    base = SubsetOptions(image_dir=Path("."), **subset_defaults(options))
    subsets: list[SubsetOptions] = []
    for i, raw in enumerate(tables):
        w = f"{where}: process.datasets[{i}]"
        d = check_section(raw, "dataset", w, out)
        if not d:
            continue
        if not d.get("folder_path"):
            out.problems.append(f"{w}.folder_path: the image folder is needed")
            continue
        ext = str(d.get("caption_ext", ".txt"))
        ext = ext if ext.startswith(".") else f".{ext}"
        d = _cached_captions(d)
        trigger = d.get("trigger_word", process.get("trigger_word"))
        keep_tokens = _keep_tokens(d, bool(trigger), w, out)
        control = _control_folder(d.get("control_path"), w, out)
        resolutions = d.get("resolution", 512)
        resolutions = resolutions if isinstance(resolutions, list) else [resolutions]
        step = d.get("bucket_tolerance", 64)
        if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
            out.problems.append(f"{w}.bucket_tolerance: {step!r} is not a positive whole number")
            continue
        for res in resolutions:
            if not isinstance(res, int) or isinstance(res, bool) or res <= 0:
                out.problems.append(f"{w}.resolution: {res!r} is not a positive whole number")
                continue
            if res < step and bool(d.get("buckets", True)):  # said here in the job's words, not as --bucket-step
                written = "" if "bucket_tolerance" in d else " (ai-toolkit's default)"
                out.problems.append(
                    f"{w}.resolution {res} is smaller than its bucket_tolerance {step}{written}, the bucket step: "
                    f"give the dataset a bucket_tolerance of at most {res}, or a larger resolution"
                )
                continue
            subsets.append(
                replace(
                    base,
                    image_dir=Path(str(d["folder_path"])).expanduser(),
                    repeats=int(d.get("num_repeats", 1)),
                    is_class=bool(d.get("is_reg", False)),
                    caption_extension=ext,
                    keep_tokens=keep_tokens,
                    shuffle_caption=bool(d.get("shuffle_tokens", False)),
                    caption_dropout=float(d.get("caption_dropout_rate", 0.0)),
                    tag_dropout=float(d.get("token_dropout_rate", 0.0)),
                    caption_separator=",",
                    flip=bool(d.get("flip_x", False)),
                    random_crop=bool(d.get("random_crop", False)),
                    alpha_mask=bool(d.get("alpha_mask", False)),
                    loss_weight=float(d.get("loss_multiplier", 1.0)),
                    class_tokens=str(d["default_caption"]) if d.get("default_caption") is not None else None,
                    resolution=res,
                    buckets=bool(d.get("buckets", True)),
                    bucket_step=step,
                    # the bucket limits stay multiples of the step, as sdcore's (kohya's) buckets need, for a
                    # resolution that is not one (ai-toolkit takes any size: 96, 1100)
                    min_bucket_reso=min(base.min_bucket_reso, max(res // step, 1) * step),
                    max_bucket_reso=max(base.max_bucket_reso, -(-res // step) * step),
                    caption_prefix="",
                    caption_suffix="",
                    trigger_word=str(trigger) if trigger else "",
                    control_dir=control,
                )
            )
    if out.problems:
        raise DatasetProblems(out.problems)
    return subsets


def _control_folder(value: Any, where: str, out: JobTranslation) -> Path | None:
    """A dataset's ``control_path`` (FLUX.1 Kontext's control images, matched by file stem as ai-toolkit's
    ``dataloader_mixins`` does): one folder, or a list of one. Several folders are several reference images
    per sample, which Kontext places with ComfyUI's offset position ids; sdcore trains one reference. An empty
    ``control_path`` (``''``, ai-toolkit's DatasetConfig reads it as none; ``[]``, no folder to search) is none."""
    if value is None or value == "" or value == []:
        return None
    folders = value if isinstance(value, list) else [value]
    if len(folders) != 1 or not isinstance(folders[0], str) or not folders[0]:
        out.problems.append(
            f"{where}.control_path = {value!r}: sdcore trains FLUX.1 Kontext with one control folder (one reference "
            "image per sample); several control folders are not supported"
        )
        return None
    return Path(folders[0]).expanduser()


def read_sample_prompts(path: str | os.PathLike[str]) -> list[SamplePrompt]:
    """The job's ``sample`` section as sample prompts: each prompt (``prompts`` strings, or ``samples``
    tables) with the section's width, height, ``sample_steps``, ``neg`` and ``guidance_scale`` unless the
    prompt's own ``--w``/``--h``/``--s``/``--n``/``--l`` flags say otherwise; seeds are ``seed`` (+ the
    prompt's position with ``walk_seed``; a ``samples`` table's own ``seed`` stays for the prompts after it
    unless ``walk_seed``, as ai-toolkit's loop does); ``[trigger]`` becomes the process' trigger word. On Flux
    ``guidance_scale`` (and ``--l``) is the embedded guidance, as in ai-toolkit. A prompt's ``--ctrl_img PATH``
    (or a ``samples`` table's ``ctrl_img``) is FLUX.1 Kontext's reference image for that sample."""
    from dataclasses import replace

    from .sample_prompts import AITOOLKIT, parse_prompt_line

    process, where = _job_process(path, ConfigError)
    out = JobTranslation()
    sample = check_section(process.get("sample"), "sample", f"{where}: process.sample", out)
    raw_model = process.get("model")
    model: dict[str, Any] = raw_model if isinstance(raw_model, dict) else {}
    family = job_family(model, f"{where}: process", out)
    if out.problems:
        raise ConfigError("; ".join(out.problems))
    trigger = process.get("trigger_word")
    items = sample.get("samples") or [{"prompt": p} for p in sample.get("prompts") or []]
    neg = sample.get("neg")
    base_seed = int(sample.get("seed", 0))
    seed = base_seed
    prompts: list[SamplePrompt] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ConfigError(f"{where}: process.sample prompt {i + 1}: a prompt text is needed")
        text = item["prompt"]
        if trigger is not None:
            text = inject_trigger(text, str(trigger), add_if_not_present=False)
        line = parse_prompt_line(text, f"{where}: process.sample prompt {i + 1}")
        guidance = item.get("guidance_scale", sample.get("guidance_scale", 7))
        cfg = line.cfg if line.cfg is not None else float(guidance)
        if sample.get("walk_seed"):
            seed = base_seed + i
        if item.get("seed") is not None:  # kept for the prompts after it unless walk_seed (as ai-toolkit)
            seed = int(item["seed"])
        prompts.append(
            replace(
                line,
                negative=line.negative or str(item.get("neg", neg) or ""),
                width=line.width or int(item.get("width", sample.get("width", 512))),
                height=line.height or int(item.get("height", sample.get("height", 512))),
                steps=line.steps or int(item.get("sample_steps", sample.get("sample_steps", 20))),
                seed=line.seed if line.seed is not None else int(seed),
                reference=line.reference or (str(item["ctrl_img"]) if item.get("ctrl_img") else None),
                cfg=None if family == "flux" else cfg,
                guidance=cfg if family == "flux" else line.guidance,
                source=AITOOLKIT,
            )
        )
    return prompts


__all__ = [
    "DEFAULTS",
    "JobTranslation",
    "inject_trigger",
    "is_job",
    "is_job_file",
    "load_datasets",
    "read_job",
    "read_sample_prompts",
    "translate_job",
]

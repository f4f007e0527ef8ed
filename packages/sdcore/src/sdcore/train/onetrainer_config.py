"""OneTrainer training configs (its presets and the JSON its UI saves) as sdcore options and sample prompts.

OneTrainer (Nerogar/OneTrainer) keeps a whole run in one ``TrainConfig`` (``modules/util/config/
TrainConfig.py``): a flat table of general fields plus nested tables for each model part (``unet``,
``transformer``, ``text_encoder``... a ``TrainModelPartConfig``), the optimizer (``TrainOptimizerConfig``),
the embedding (``TrainEmbeddingConfig``), the concepts and the samples. ``sdcore train <method> --config
config.json`` reads it through :func:`translate_config`; ``--data`` becomes the config itself (its
``concepts`` or ``concept_file_name``, read by :mod:`sdcore.data.onetrainer`) and ``--sample-prompts`` too
(its ``samples`` or ``sample_definition_file_name``, read by :func:`read_sample_prompts`).

Every field name and default below is OneTrainer's (``default_values()`` of each config class, config
version 11), with its meaning from the code that uses it: ``modules/util/create.py`` (optimizers and the
learning-rate schedule), ``modules/util/lr_scheduler_util.py``, ``modules/modelSetup/mixin/
ModelSetupNoiseMixin.py`` (noise and timesteps), ``modules/util/TimedActionMixin.py`` (the time units of
saves, samples and ``stop_training_after``). A preset gives only the fields it changes: OneTrainer's
defaults apply to the rest (learning rate 3e-6, 100 epochs, fp16 training, LoRA rank 16 and alpha 1,
200 warmup steps, text encoders training for 30 epochs), not sdcore's.

A field is translated, accepted with a note (no effect on what is learned: logging, devices, backups,
caches), accepted at OneTrainer's default and refused by name otherwise (what sdcore does not do), or
unknown (with the nearest OneTrainer name). All problems of a config are reported at once. Parts a model
family does not have (``prior`` on SDXL, ``transformer`` on SD1.5) are ignored, as OneTrainer ignores them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .aitoolkit import JobTranslation
from .field_tables import drop_foreign_options, nearest_field, same_value
from .loss import MIX_STRENGTHS
from .objectives import MODE_SCALE_RANGE

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .sample_prompts import SamplePrompt

#: the config version whose field names this reader knows (``TrainConfig.__init__``'s ``config_version``)
CONFIG_VERSION = 11

#: ``TrainConfig.default_values()``: every top-level field and its default (nested tables: see below);
#: ``train_device`` is the machine's default device there ("cuda" where there is one)
DEFAULTS: dict[str, Any] = {
    "training_method": "FINE_TUNE", "model_type": "STABLE_DIFFUSION_15", "debug_mode": False, "debug_dir": "debug",
    "workspace_dir": "workspace/run", "cache_dir": "workspace-cache/run", "huggingface_cache_dir": "",
    "offline_mode": False, "tensorboard": True, "tensorboard_expose": False, "tensorboard_always_on": False,
    "tensorboard_port": 6006, "validation": False, "validate_after": 1, "validate_after_unit": "EPOCH",
    "continue_last_backup": False, "prevent_overwrites": False, "include_train_config": "NONE", "multi_gpu": False,
    "device_indexes": "", "gradient_reduce_precision": "FLOAT_32_STOCHASTIC", "fused_gradient_reduce": True,
    "async_gradient_reduce": True, "async_gradient_reduce_buffer": 100,
    "base_model_name": "stable-diffusion-v1-5/stable-diffusion-v1-5", "output_dtype": "FLOAT_32",
    "output_model_format": "SAFETENSORS", "output_model_destination": "models/model.safetensors",
    "async_offloading": True, "force_circular_padding": False, "compile": False,
    "concept_file_name": "training_concepts/concepts.json", "concepts": None, "aspect_ratio_bucketing": True,
    "latent_caching": True, "clear_cache_before_training": True, "learning_rate_scheduler": "CONSTANT",
    "custom_learning_rate_scheduler": None, "scheduler_params": [], "learning_rate": 3e-6,
    "learning_rate_warmup_steps": 200.0, "learning_rate_cycles": 1.0, "learning_rate_min_factor": 0.0,
    "epochs": 100, "batch_size": 1, "gradient_accumulation_steps": 1, "ema": "OFF", "ema_decay": 0.999,
    "ema_update_step_interval": 5, "dataloader_threads": 2, "train_device": "cuda", "temp_device": "cpu",
    "train_dtype": "FLOAT_16", "fallback_train_dtype": "BFLOAT_16", "enable_autocast_cache": True,
    "only_cache": False, "resolution": "512", "frames": "25", "attention_mechanism": "SDP", "mse_strength": 1.0,
    "mae_strength": 0.0, "log_cosh_strength": 0.0, "huber_strength": 0.0, "huber_delta": 1.0,
    "vb_loss_strength": 1.0, "loss_weight_fn": "CONSTANT", "loss_weight_strength": 5.0, "dropout_probability": 0.0,
    "loss_scaler": "NONE", "learning_rate_scaler": "NONE", "clip_grad_norm": 1.0, "offset_noise_weight": 0.0,
    "generalized_offset_noise": False, "perturbation_noise_weight": 0.0,
    "rescale_noise_scheduler_to_zero_terminal_snr": False, "force_v_prediction": False,
    "force_epsilon_prediction": False, "min_noising_strength": 0.0, "max_noising_strength": 1.0,
    "timestep_distribution": "UNIFORM", "noising_weight": 0.0, "noising_bias": 0.0, "timestep_shift": 1.0,
    "dynamic_timestep_shifting": False, "text_encoder_layer_skip": 0, "text_encoder_sequence_length": 512,
    "text_encoder_2_layer_skip": 0, "text_encoder_2_sequence_length": 77, "text_encoder_3_layer_skip": 0,
    "text_encoder_4_layer_skip": 0, "masked_training": False, "unmasked_probability": 0.1, "unmasked_weight": 0.1,
    "normalize_masked_area_loss": False, "masked_prior_preservation_weight": 0.0, "custom_conditioning_image": False,
    "layer_filter": "", "layer_filter_preset": "full", "layer_filter_regex": False, "embedding_learning_rate": None,
    "preserve_embedding_norm": False, "additional_embeddings": [], "embedding_weight_dtype": "FLOAT_32",
    "peft_type": "LORA", "lora_model_name": "", "lora_rank": 16, "lora_alpha": 1.0, "lora_decompose": False,
    "lora_decompose_norm_epsilon": True, "lora_decompose_output_axis": False, "lora_weight_dtype": "FLOAT_32",
    "bundle_additional_embeddings": True, "oft_block_size": 32, "oft_block_share": False, "oft_scaled": False,
    "lokr_dim": 16, "lokr_decompose_both": False, "lokr_decompose_factor": -1, "lokr_use_tucker": False,
    "lokr_weight_decompose": False, "lokr_dora_on_output": True, "lokr_full_matrix": False, "lokr_vec_trick": True,
    "optimizer_defaults": {}, "sample_definition_file_name": "training_samples/samples.json", "samples": None,
    "sample_after": 10, "sample_after_unit": "MINUTE", "sample_skip_first": 0, "sample_image_format": "JPG",
    "sample_video_format": "MP4", "sample_audio_format": "MP3", "samples_to_tensorboard": True,
    "non_ema_sampling": True, "backup_after": 30, "backup_after_unit": "MINUTE", "rolling_backup": False,
    "rolling_backup_count": 3, "backup_before_save": True, "save_every": 0, "save_every_unit": "NEVER",
    "save_skip_first": 0, "save_filename_prefix": "",
}  # fmt: skip
#: ``TrainModelPartConfig.default_values()``
PART_DEFAULTS: dict[str, Any] = {
    "model_name": "", "include": True, "train": True, "stop_training_after": None, "stop_training_after_unit": "NEVER",
    "learning_rate": None, "weight_dtype": "FLOAT_32", "dropout_probability": 0.0, "train_embedding": True,
    "attention_mask": False, "guidance_scale": 1.0, "gradient_checkpointing": True, "offload_fraction": 0.0,
    "activation_offloading": False,
}  # fmt: skip
#: the model parts of a TrainConfig, with what ``TrainConfig.default_values()`` changes in each
_TE = {"stop_training_after": 30, "stop_training_after_unit": "EPOCH"}
PARTS: dict[str, dict[str, Any]] = {
    "unet": {"stop_training_after": 0}, "prior": {"stop_training_after": 0}, "transformer": {"stop_training_after": 0},
    "unconditional_transformer": {"train": False, "gradient_checkpointing": False},
    "text_encoder": _TE, "text_encoder_2": _TE, "text_encoder_3": _TE, "text_encoder_4": _TE,
    "vae": {}, "effnet_encoder": {}, "decoder": {}, "decoder_text_encoder": {}, "decoder_vqgan": {},
}  # fmt: skip
#: ``TrainEmbeddingConfig.default_values()`` (``uuid`` is random there)
EMBEDDING_DEFAULTS: dict[str, Any] = {
    "uuid": None, "model_name": "", "placeholder": "<embedding>", "train": True, "stop_training_after": None,
    "stop_training_after_unit": "NEVER", "token_count": 1, "initial_embedding_text": "*", "is_output_embedding": False,
}  # fmt: skip
#: ``QuantizationConfig.default_values()``: used by OneTrainer with quantized weight dtypes only
QUANTIZATION_DEFAULTS: dict[str, Any] = {
    "layer_filter": "", "layer_filter_preset": "full", "layer_filter_regex": False, "svd_dtype": "NONE",
    "svd_rank": 16, "cache_dir": None,
}  # fmt: skip
#: ``TrainOptimizerConfig.default_values()``
OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "optimizer": "ADAMW", "adam_w_mode": False, "alpha": None, "amsgrad": False, "beta1": None, "beta2": None,
    "beta3": None, "bias_correction": False, "block_wise": False, "capturable": False, "centered": False,
    "clip_threshold": None, "d0": None, "d_coef": None, "dampening": None, "decay_rate": None, "decouple": False,
    "differentiable": False, "eps": None, "eps2": None, "foreach": False, "fsdp_in_use": False, "fused": False,
    "fused_back_pass": False, "growth_rate": None, "initial_accumulator_value": None, "initial_accumulator": None,
    "is_paged": False, "log_every": None, "lr_decay": None, "max_unorm": None, "maximize": False,
    "min_8bit_size": None, "quant_block_size": None, "momentum": None, "nesterov": False, "no_prox": False,
    "optim_bits": None, "percentile_clipping": None, "r": None, "relative_step": False, "safeguard_warmup": False,
    "scale_parameter": False, "stochastic_rounding": True, "use_bias_correction": False, "use_triton": False,
    "warmup_init": False, "weight_decay": None, "weight_lr_power": None, "decoupled_decay": False,
    "fixed_decay": False, "rectify": False, "degenerated_to_sgd": False, "k": None, "xi": None,
    "n_sma_threshold": None, "ams_bound": False, "adanorm": False, "adam_debias": False, "slice_p": None,
    "cautious": False, "weight_decay_by_lr": True, "prodigy_steps": None, "use_speed": False, "split_groups": True,
    "split_groups_mean": True, "factored": True, "factored_fp32": True, "use_stableadamw": True,
    "use_cautious": False, "use_grams": False, "use_adopt": False, "d_limiter": True, "use_schedulefree": True,
    "use_orthograd": False, "nnmf_factor": False, "orthogonal_gradient": False, "use_atan2": False,
    "use_AdEMAMix": False, "beta3_ema": None, "alpha_grad": None, "beta1_warmup": None, "min_beta1": None,
    "Simplified_AdEMAMix": False, "kourkoutas_beta": False, "schedulefree_c": None, "ns_steps": None,
    "MuonWithAuxAdam": False, "muon_hidden_layers": None, "muon_adam_regex": False, "muon_adam_lr": None,
    "muon_te1_adam_lr": None, "muon_te2_adam_lr": None, "muon_adam_config": {}, "rms_rescaling": True,
    "normuon_variant": False, "beta2_normuon": None, "low_rank_ortho": False, "ortho_rank": None,
    "accelerated_ns": False, "cautious_wd": False, "approx_mars": False, "auto_kappa_p": False, "compile": False,
}  # fmt: skip
#: ``SampleConfig.default_values()`` fields (width/height/steps/cfg/scheduler depend on the model: :data:`SAMPLE_MODEL_DEFAULTS`)
SAMPLE_FIELDS = frozenset(
    {"enabled", "prompt", "negative_prompt", "height", "width", "frames", "length", "seed", "random_seed",
     "diffusion_steps", "cfg_scale", "noise_scheduler", "text_encoder_1_layer_skip", "text_encoder_1_sequence_length",
     "text_encoder_2_layer_skip", "text_encoder_2_sequence_length", "text_encoder_3_layer_skip",
     "text_encoder_4_layer_skip", "transformer_attention_mask", "force_last_timestep", "sample_inpainting",
     "base_image_path", "mask_image_path"}
)  # fmt: skip
#: ``SampleConfig._get_model_defaults``: (width, height, diffusion_steps, cfg_scale, noise_scheduler) per family
#: (OneTrainer 23df383 modules/util/config/SampleConfig.py:13-19 without a model, then sd1 :25-31, sd2 :33-39,
#: sdxl :41-47, sd3 :49-54, flux :56-61, chroma :63-73; every sample takes them, SampleConfig.py:214)
SAMPLE_MODEL_DEFAULTS: dict[str | None, tuple[int, int, int, float, str]] = {
    None: (512, 512, 30, 7.0, "DDIM"),
    "sd1": (512, 512, 30, 7.5, "EULER_A"),
    "sd2": (768, 768, 30, 7.5, "DDIM"),
    "sdxl": (1024, 1024, 30, 7.5, "EULER_A"),
    "sd3": (1024, 1024, 28, 7.0, "DDIM"),
    "flux": (1024, 1024, 30, 3.5, "DDIM"),
    "chroma": (1024, 1024, 30, 3.5, "DDIM"),  # cfg_scale: Chroma's real CFG (ChromaSampler), not a guidance input
}
#: ``SampleConfig._get_model_defaults``' ``negative_prompt`` where it is not empty
SAMPLE_NEGATIVE_DEFAULTS: dict[str | None, str] = {
    "chroma": "This low-quality, greyscale, unfinished sketch is inaccurate and flawed. The image is very blurred "
    "and lacks detail, with excessive chromatic aberrations and artifacts. The image is overly saturated with "
    "excessive bloom.",
}
#: OneTrainer's ``NoiseScheduler`` -> sdcore sampler (SD1/SD2/SDXL samples; flow families use their own)
SAMPLERS = {"DDIM": "ddim", "EULER": "euler", "EULER_A": "euler_a", "DPMPP": "dpm++2m", "DPMPP_KARRAS": "dpm++2m_karras",
            "UNIPC": "unipc"}  # fmt: skip

#: ``training_method`` -> the ``sdcore train`` method that runs it
METHODS = {"LORA": "lora", "FINE_TUNE": "dreambooth", "EMBEDDING": "ti"}
#: ``model_type`` -> sdcore family (``ModelType`` in modules/util/enum/ModelType.py)
FAMILIES = {
    "STABLE_DIFFUSION_15": "sd1", "STABLE_DIFFUSION_20": "sd2", "STABLE_DIFFUSION_20_BASE": "sd2",
    "STABLE_DIFFUSION_21": "sd2", "STABLE_DIFFUSION_21_BASE": "sd2", "STABLE_DIFFUSION_XL_10_BASE": "sdxl",
    "STABLE_DIFFUSION_3": "sd3", "STABLE_DIFFUSION_35": "sd3", "FLUX_DEV_1": "flux", "CHROMA_1": "chroma",
    "STABLE_DIFFUSION_15_INPAINTING": "sd1", "STABLE_DIFFUSION_20_INPAINTING": "sd2",
    "STABLE_DIFFUSION_XL_10_BASE_INPAINTING": "sdxl", "FLUX_FILL_DEV_1": "flux",
}  # fmt: skip
#: the ``model_type`` values of inpainting models (``has_mask_input`` and ``has_conditioning_image_input``):
#: the mask and masked image enter the denoiser (:mod:`sdcore.train.inpainting`); the loaded model must be one
INPAINTING_TYPES = frozenset(
    {"STABLE_DIFFUSION_15_INPAINTING", "STABLE_DIFFUSION_20_INPAINTING", "STABLE_DIFFUSION_XL_10_BASE_INPAINTING",
     "FLUX_FILL_DEV_1"}
)  # fmt: skip
#: the model parts OneTrainer trains for each family (``ModelType.model_parts``); the first is the denoiser
FAMILY_PARTS = {
    "sd1": ("unet", "text_encoder", "vae"),
    "sd2": ("unet", "text_encoder", "vae"),
    "sdxl": ("unet", "text_encoder", "text_encoder_2", "vae"),
    "sd3": ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"),
    "flux": ("transformer", "text_encoder", "text_encoder_2", "vae"),
    "chroma": ("transformer", "text_encoder", "vae"),  # T5-XXL is Chroma's only text encoder
}
#: the T5 encoder's part (sdcore's ``train_t5``)
T5_PART = {"sd3": "text_encoder_3", "flux": "text_encoder_2", "chroma": "text_encoder"}
#: OneTrainer's bucket grid per family (the ``aspect_bucketing_quantization`` its ``*BaseDataLoader`` gives MGDS's
#: ``AspectBucketing``): sdcore's ``--bucket-step`` under ``--bucket-rule onetrainer``
BUCKET_QUANTIZATION = {"sd1": 8, "sd2": 8, "sdxl": 64, "sd3": 64, "flux": 64, "chroma": 64}
#: the families OneTrainer trains with flow matching (``ModelType.is_flow_matching``; its flow noise and loss)
FLOW_FAMILIES = ("sd3", "flux", "chroma")
#: ``LAYER_PRESETS`` of each family's ``Base*Setup``: ``layer_filter_preset`` -> the ``layer_filter`` patterns
#: it fills in (what OneTrainer's UI and presets write next to the preset name)
LAYER_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "sd1": {"attn-mlp": ("attentions",), "attn-only": ("attn",), "full": ()},
    "sd2": {"attn-mlp": ("attentions",), "attn-only": ("attn",), "full": ()},
    "sdxl": {"attn-mlp": ("attentions",), "attn-only": ("attn",), "full": ()},
    "sd3": {"attn-only": ("attn",), "blocks": ("transformer_block",), "full": ()},
    "flux": {"attn-mlp": ("attn", "ff.net", "proj_mlp"), "attn-only": ("attn",), "blocks": ("transformer_block",),
             "full": ()},
    "chroma": {"attn-mlp": ("attn", "ff.net", "proj_mlp"), "attn-only": ("attn",), "blocks": ("transformer_block",),
               "full": ()},
}  # fmt: skip
#: what OneTrainer's ``full`` preset (an empty filter: every Linear and Conv2d of the denoiser) adapts outside
#: sdcore's candidates (kohya's targets; SD's LoCon adds the ResNets and down/upsamplers). Every other preset's
#: patterns select a subset of the candidates, so they map exactly to ``--layer-filter``
FULL_PRESET_OUTSIDE = {
    "sd1": "conv_in, conv_out, time_embedding",
    "sd2": "conv_in, conv_out, time_embedding",
    "sdxl": "conv_in, conv_out, time_embedding, add_embedding",
    "sd3": "pos_embed.proj, context_embedder, time_text_embed, norm_out.linear, proj_out",
    "flux": "x_embedder, context_embedder, time_text_embed, norm_out.linear, proj_out",
    "chroma": "x_embedder, context_embedder, distilled_guidance_layer, proj_out",
}
PRECISIONS = {"FLOAT_16": "fp16", "BFLOAT_16": "bf16", "FLOAT_32": "no", "TFLOAT_32": "no"}
SAVE_DTYPES = {"FLOAT_16": "fp16", "BFLOAT_16": "bf16", "FLOAT_32": "fp32"}
#: weight dtypes that store a frozen part in a plain float type (sdcore keeps frozen parts in the training dtype)
PLAIN_DTYPES = ("FLOAT_32", "FLOAT_16", "BFLOAT_16", "TFLOAT_32", "NONE")
#: OneTrainer's bitsandbytes storage types of the denoiser -> ``--base-weights-dtype``
STORED_DTYPES = {"NFLOAT_4": "nf4", "INT_8": "int8"}
#: a text encoder's stored types -> ``--text-encoder-weights-dtype`` (its Linear layers, as OneTrainer's quantization)
TEXT_ENCODER_DTYPES = {"FLOAT_8": "fp8", **STORED_DTYPES}
#: a fallback that create.py passes as None where the library's default is something else (ProdigyPlus' eps:
#: None turns on its Adam-atan2 update); a fallback of None leaves the argument to the library's default,
#: which is create.py's value there (tests/test_onetrainer_config.py checks each against the installed class)
PASS_NONE = "PASS_NONE"
#: ``create.py``: OneTrainer optimizer -> (sdcore optimizer, {argument: (OneTrainer fields, value when unset)});
#: every argument is passed, as OneTrainer passes them all (``betas`` joins beta1/beta2, Adafactor's eps eps/eps2)
OPTIMIZERS: dict[str, tuple[str, dict[str, tuple[tuple[str, ...], tuple[Any, ...]]]]] = {
    "ADAMW": ("adamw", {"betas": (("beta1", "beta2"), (0.9, 0.999)), "weight_decay": (("weight_decay",), (1e-2,)),
                        "eps": (("eps",), (1e-8,)), "amsgrad": (("amsgrad",), (False,))}),
    "ADAM": ("torch.optim.Adam", {"betas": (("beta1", "beta2"), (0.9, 0.999)),
                                  "weight_decay": (("weight_decay",), (0,)), "eps": (("eps",), (1e-8,)),
                                  "amsgrad": (("amsgrad",), (False,))}),
    "ADAMW_8BIT": ("adamw8bit", {"betas": (("beta1", "beta2"), (0.9, 0.999)),
                                 "weight_decay": (("weight_decay",), (1e-2,)), "eps": (("eps",), (1e-8,)),
                                 "min_8bit_size": (("min_8bit_size",), (4096,)),
                                 "percentile_clipping": (("percentile_clipping",), (100,)),
                                 "block_wise": (("block_wise",), (True,))}),
    "LION": ("lion", {"betas": (("beta1", "beta2"), (0.9, 0.99)), "weight_decay": (("weight_decay",), (0,))}),
    "SGD": ("sgd", {"momentum": (("momentum",), (0,)), "dampening": (("dampening",), (0,)),
                    "weight_decay": (("weight_decay",), (0,)), "nesterov": (("nesterov",), (False,))}),
    "PRODIGY": ("prodigy", {"betas": (("beta1", "beta2"), (0.9, 0.999)), "beta3": (("beta3",), (None,)),
                            "eps": (("eps",), (1e-8,)), "weight_decay": (("weight_decay",), (0,)),
                            "decouple": (("decouple",), (True,)),
                            "use_bias_correction": (("use_bias_correction",), (False,)),
                            "safeguard_warmup": (("safeguard_warmup",), (False,)), "d0": (("d0",), (1e-6,)),
                            "d_coef": (("d_coef",), (1.0,)), "growth_rate": (("growth_rate",), (None,)),
                            "slice_p": (("slice_p",), (1,))}),
    "ADAM_8BIT": ("bitsandbytes.optim.Adam", {"betas": (("beta1", "beta2"), (0.9, 0.999)),  # bnb's 32-bit Adam class
                                              "weight_decay": (("weight_decay",), (0,)), "eps": (("eps",), (1e-8,)),
                                              "min_8bit_size": (("min_8bit_size",), (4096,)),
                                              "percentile_clipping": (("percentile_clipping",), (100,)),
                                              "block_wise": (("block_wise",), (True,)),
                                              "is_paged": (("is_paged",), (False,))}),
    "ADAGRAD": ("bitsandbytes.optim.Adagrad", {"weight_decay": (("weight_decay",), (0,)), "eps": (("eps",), (1e-10,)),
                                               "lr_decay": (("lr_decay",), (0,)),
                                               "initial_accumulator_value": (("initial_accumulator_value",), (0,))}),
    "RMSPROP": ("bitsandbytes.optim.RMSprop", {"weight_decay": (("weight_decay",), (0,)), "eps": (("eps",), (1e-8,)),
                                               "alpha": (("alpha",), (0.99,)), "momentum": (("momentum",), (0,)),
                                               "centered": (("centered",), (False,))}),
    "LION_8BIT": ("lion8bit", {"weight_decay": (("weight_decay",), (0,)), "betas": (("beta1", "beta2"), (0.9, 0.999)),
                               "min_8bit_size": (("min_8bit_size",), (4096,)),
                               "percentile_clipping": (("percentile_clipping",), (100,)),
                               "block_wise": (("block_wise",), (True,)), "is_paged": (("is_paged",), (False,))}),
    # schedule-free: create.py gives them learning_rate_warmup_steps as it is (see _optimizer) and no LR schedule
    "SCHEDULE_FREE_ADAMW": ("adamwschedulefree", {"betas": (("beta1", "beta2"), (0.9, 0.999)),
                                                  "weight_decay": (("weight_decay",), (1e-2,)), "eps": (("eps",), (1e-8,)),
                                                  "r": (("r",), (0,)), "weight_lr_power": (("weight_lr_power",), (2.0,)),
                                                  "foreach": (("foreach",), (False,))}),
    "SCHEDULE_FREE_SGD": ("sgdschedulefree", {"momentum": (("momentum",), (0,)), "weight_decay": (("weight_decay",), (0,)),
                                              "r": (("r",), (0,)), "weight_lr_power": (("weight_lr_power",), (2.0,)),
                                              "foreach": (("foreach",), (False,))}),
    # D-Adaptation: growth_rate's fallback inf is the library's default (left out: the option text cannot say inf)
    "DADAPT_SGD": ("dadaptsgd", {"momentum": (("momentum",), (0.0,)), "weight_decay": (("weight_decay",), (0,)),
                                 "log_every": (("log_every",), (0,)), "d0": (("d0",), (1e-6,)),
                                 "growth_rate": (("growth_rate",), (None,)),
                                 "fsdp_in_use": (("fsdp_in_use",), (False,))}),
    "DADAPT_ADAM": ("dadaptadam", {"betas": (("beta1", "beta2"), (0.9, 0.999)), "eps": (("eps",), (1e-8,)),
                                   "weight_decay": (("weight_decay",), (0,)), "log_every": (("log_every",), (0,)),
                                   "decouple": (("decouple",), (False,)),
                                   "use_bias_correction": (("use_bias_correction",), (False,)),
                                   "d0": (("d0",), (1e-6,)), "growth_rate": (("growth_rate",), (None,)),
                                   "fsdp_in_use": (("fsdp_in_use",), (False,))}),
    "DADAPT_ADAN": ("dadaptadan", {"betas": (("beta1", "beta2", "beta3"), (0.98, 0.92, 0.99)),
                                   "eps": (("eps",), (1e-8,)), "weight_decay": (("weight_decay",), (0.02,)),
                                   "no_prox": (("no_prox",), (False,)), "log_every": (("log_every",), (0,)),
                                   "d0": (("d0",), (1e-6,)), "growth_rate": (("growth_rate",), (None,))}),
    "DADAPT_ADA_GRAD": ("dadaptadagrad", {"momentum": (("momentum",), (0,)), "log_every": (("log_every",), (0,)),
                                          "weight_decay": (("weight_decay",), (0.0,)), "eps": (("eps",), (0.0,)),
                                          "d0": (("d0",), (1e-6,)), "growth_rate": (("growth_rate",), (None,))}),
    "DADAPT_LION": ("dadaptlion", {"betas": (("beta1", "beta2"), (0.9, 0.999)),
                                   "weight_decay": (("weight_decay",), (0.0,)), "log_every": (("log_every",), (0,)),
                                   "d0": (("d0",), (1e-6,)), "fsdp_in_use": (("fsdp_in_use",), (False,))}),
    "PRODIGY_PLUS_SCHEDULE_FREE": (
        "prodigyplus.ProdigyPlusScheduleFree",
        {"betas": (("beta1", "beta2"), (0.9, 0.99)), "beta3": (("beta3",), (None,)),
         "weight_decay": (("weight_decay",), (0.0,)), "weight_decay_by_lr": (("weight_decay_by_lr",), (True,)),
         "use_bias_correction": (("use_bias_correction",), (False,)), "d0": (("d0",), (1e-6,)),
         "d_coef": (("d_coef",), (1.0,)), "prodigy_steps": (("prodigy_steps",), (0,)),
         "use_speed": (("use_speed",), (False,)), "eps": (("eps",), (PASS_NONE,)),
         "split_groups": (("split_groups",), (True,)), "split_groups_mean": (("split_groups_mean",), (True,)),
         "factored": (("factored",), (True,)), "factored_fp32": (("factored_fp32",), (True,)),
         "use_stableadamw": (("use_stableadamw",), (True,)), "use_cautious": (("use_cautious",), (False,)),
         "use_grams": (("use_grams",), (False,)), "use_adopt": (("use_adopt",), (False,)),
         "stochastic_rounding": (("stochastic_rounding",), (True,)), "d_limiter": (("d_limiter",), (True,)),
         "use_schedulefree": (("use_schedulefree",), (True,)), "schedulefree_c": (("schedulefree_c",), (0.0,)),
         "use_orthograd": (("use_orthograd",), (False,))},
    ),
    "ADAFACTOR": ("adafactor", {"eps": (("eps", "eps2"), (1e-30, 1e-3)),
                                "clip_threshold": (("clip_threshold",), (1.0,)),
                                "decay_rate": (("decay_rate",), (-0.8,)), "beta1": (("beta1",), (None,)),
                                "weight_decay": (("weight_decay",), (0.0,)),
                                "scale_parameter": (("scale_parameter",), (True,)),
                                "relative_step": (("relative_step",), (True,)),
                                "warmup_init": (("warmup_init",), (False,))}),
}  # fmt: skip
#: optimizers whose OneTrainer version is its own code (modules/util/optimizer), not a library sdcore can load
OPTIMIZER_REFUSALS = {
    name: "OneTrainer runs its own copy (modules/util/optimizer: stochastic rounding, its own options), not "
    "came_pytorch's class that sdcore would load"
    for name in ("CAME", "CAME_8BIT")
}
#: optimizers OneTrainer runs without an LR schedule (``Optimizer.is_schedule_free``)
#: the optimizers of :data:`OPTIMIZERS` OneTrainer steps in backward with ``fused_back_pass``
#: (``Optimizer.supports_fused_back_pass``); it ignores the flag for every other one
FUSED_BACK_PASS_OPTIMIZERS = ("ADAFACTOR", "ADAM", "ADAMW", "PRODIGY_PLUS_SCHEDULE_FREE")
SCHEDULE_FREE = ("SCHEDULE_FREE_ADAMW", "SCHEDULE_FREE_SGD", "PRODIGY_PLUS_SCHEDULE_FREE")
#: optimizer fields OneTrainer reads for every optimizer that change speed or memory only
OPTIMIZER_NOTED = {"foreach": "speed", "fused": "speed", "compile": "compilation", "log_every": "logging",
                   "stochastic_rounding": "rounds bf16 weights; sdcore trains float32 adapters and embeddings"}  # fmt: skip

#: top-level fields read with a note: no effect on what is learned
NOTED: dict[str, str] = {
    **{name: "logging" for name in ("debug_mode", "debug_dir", "tensorboard", "tensorboard_expose",
                                     "tensorboard_always_on", "tensorboard_port", "samples_to_tensorboard")},
    **{name: "devices and speed" for name in ("multi_gpu", "device_indexes", "gradient_reduce_precision",
                                               "fused_gradient_reduce", "async_gradient_reduce",
                                               "async_gradient_reduce_buffer", "async_offloading", "compile",
                                               "dataloader_threads", "train_device", "temp_device",
                                               "enable_autocast_cache", "attention_mechanism")},
    **{name: "sdcore has no backups on a clock: give --save-state to keep resumable states with the saves"
       for name in ("backup_after", "backup_after_unit", "rolling_backup", "rolling_backup_count",
                    "backup_before_save")},
    "workspace_dir": "sdcore writes next to --output", "cache_dir": "sdcore's cache is --cache-dir",
    "huggingface_cache_dir": "sdcore reads the Hugging Face cache it finds", "offline_mode": "sdcore reads no hub",
    "continue_last_backup": "give --resume <state>", "prevent_overwrites": "output naming",
    "include_train_config": "output metadata", "fallback_train_dtype": "sdcore trains in --mixed-precision",
    "clear_cache_before_training": "sdcore checks its cache against the images and settings",
    "sample_image_format": "sdcore writes PNG samples", "sample_video_format": "no video",
    "sample_audio_format": "no audio", "non_ema_sampling": "samples", "save_filename_prefix": "output naming",
    "validation": "sdcore validates on "
    "VALIDATION concepts (--validate-every-n-steps/-epochs)", "validate_after": "validation schedule",
    "validate_after_unit": "validation schedule", "vb_loss_strength": "used by OneTrainer for learned-variance "
    "models only", "text_encoder_sequence_length": "sdcore uses the family's token length",
    "text_encoder_2_sequence_length": "sdcore uses the family's token length",
}  # fmt: skip
#: the masked-training fields: OneTrainer reads them with ``masked_training`` only
MASK_FIELDS = (
    "unmasked_probability",
    "unmasked_weight",
    "normalize_masked_area_loss",
    "masked_prior_preservation_weight",
)
#: top-level fields refused away from their default, with why (the maths differs from every sdcore option)
REFUSED: dict[str, str] = {
    "perturbation_noise_weight": "OneTrainer adds w * N(0, 1) to the noise of both the noisy input and the target "
    "(_create_noise); sdcore's --ip-noise-gamma perturbs the input only",
    "generalized_offset_noise": "a timestep-dependent offset (psi_t of the generalized offset noise paper); "
    "sdcore's --noise-offset is the same at every timestep",
    "loss_scaler": "OneTrainer multiplies the loss by the batch size and/or the accumulation steps; sdcore has no "
    "loss scale (it changes gradient clipping and non-adaptive optimizers)",
}
#: ``learning_rate_scaler`` -> what ``get_scale`` multiplies (every parameter group's rate is multiplied by
#: the square root, ``NamedParameterGroup.parameters_for_optimizer``); GLOBAL_*: times the world size, 1 here
LR_SCALERS: dict[str, tuple[bool, bool]] = {  # (batch size, accumulation)
    "NONE": (False, False), "BATCH": (True, False), "GLOBAL_BATCH": (True, False),
    "GRADIENT_ACCUMULATION": (False, True), "BOTH": (True, True), "GLOBAL_BOTH": (True, True),
}  # fmt: skip
#: the option values that are learning rates (scaled by ``learning_rate_scaler``)
RATE_OPTIONS = ("lr", "unet_lr", "te_lr", "te1_lr", "te2_lr", "te3_lr", "embedding_lr")
#: top-level fields :func:`translate_config` turns into sdcore settings (or refuses with its own message)
HANDLED = frozenset(
    {"training_method", "model_type", "base_model_name", "output_dtype", "output_model_format",
     "output_model_destination", "concept_file_name", "concepts", "aspect_ratio_bucketing", "latent_caching",
     "learning_rate_scheduler", "learning_rate", "learning_rate_warmup_steps", "learning_rate_cycles",
     "learning_rate_min_factor", "epochs", "batch_size", "gradient_accumulation_steps", "ema", "ema_decay",
     "ema_update_step_interval", "train_dtype", "resolution", "mse_strength", "mae_strength", "log_cosh_strength",
     "huber_strength", "loss_weight_fn", "loss_weight_strength", "dropout_probability", "clip_grad_norm",
     "offset_noise_weight", "rescale_noise_scheduler_to_zero_terminal_snr", "force_v_prediction",
     "force_epsilon_prediction", "min_noising_strength",
     "max_noising_strength", "timestep_distribution", "noising_weight", "noising_bias", "timestep_shift",
     "dynamic_timestep_shifting", "text_encoder_layer_skip", "text_encoder_2_layer_skip", "layer_filter_preset",
     "layer_filter", "layer_filter_regex",
     "embedding_learning_rate", "additional_embeddings", "bundle_additional_embeddings", "peft_type", "lora_model_name", "lora_rank", "lora_alpha", "lora_decompose",
     "lokr_dim", "lokr_decompose_factor", "lokr_decompose_both", "lokr_use_tucker", "sample_definition_file_name", "samples", "sample_after",
     "sample_after_unit", "sample_skip_first", "save_every", "save_every_unit", "save_skip_first",
     "huber_delta", "lora_decompose_norm_epsilon", "learning_rate_scaler", "masked_training", *MASK_FIELDS,
     "custom_conditioning_image", "optimizer_defaults"}
)  # fmt: skip
_NESTED = frozenset({*PARTS, "optimizer", "embedding", "quantization", "cloud", "secrets"})
#: OneTrainer's top-level ``weight_dtype`` before config version 10 (its built-in Chroma presets still carry it):
#: ``TrainConfig.__migration_9`` gives it to every part whose ``weight_dtype`` is ``NONE``, then drops it
LEGACY_WEIGHT_DTYPE = "weight_dtype"
#: OneTrainer's ``DataType`` names a part's ``weight_dtype`` may hold
WEIGHT_DTYPES = ("NONE", "FLOAT_8", "FLOAT_16", "FLOAT_32", "BFLOAT_16", "TFLOAT_32", "INT_8", "NFLOAT_4",
                 "FLOAT_W8A8", "INT_W8A8", "FLOAT_W8A8_COMPRESSED", "INT_W8A8_COMPRESSED", "GGUF", "GGUF_A8_FLOAT",
                 "GGUF_A8_INT")  # fmt: skip


def is_train_config(data: Any) -> bool:
    """A OneTrainer TrainConfig: a JSON object with its ``training_method`` and ``model_type`` fields."""
    return isinstance(data, dict) and "training_method" in data and "model_type" in data


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_train_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The TrainConfig in ``path``, or ``None`` when it is not a ``.json`` OneTrainer config."""
    p = Path(path).expanduser()
    if p.suffix.lower() != ".json" or not p.is_file():
        return None
    data = _read_json(p)
    return data if is_train_config(data) else None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class _Reader:
    """Reads one TrainConfig: unknown and refused fields go to ``out`` as they are met."""

    def __init__(self, data: dict[str, Any], where: str, out: JobTranslation) -> None:
        self.data, self.where, self.out = data, where, out
        #: the optimizer settings the run uses (``optimizer`` with the UI's ``optimizer_defaults``), once read
        self.optimizer: dict[str, Any] = dict(OPTIMIZER_DEFAULTS)

    def get(self, key: str) -> Any:
        return self.data.get(key, DEFAULTS.get(key))

    def table(self, key: str, defaults: dict[str, Any]) -> dict[str, Any]:
        """A nested table over its defaults; unknown names are problems."""
        raw = self.data.get(key)
        if raw is None:
            return dict(defaults)
        if not isinstance(raw, dict):
            self.out.problems.append(f"{self.where}: {key} must be an object, got {raw!r}")
            return dict(defaults)
        return self.table_value(key, raw, defaults)

    def table_value(self, key: str, raw: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        """A nested object given as a value (a list item) over its defaults; unknown names are problems.
        ``__version`` is each nested config class's own version (``BaseConfig.to_dict`` writes it into every
        table of a config the UI saves, 0 for all of them): not a field."""
        unknown = [f"{k!r}{nearest_field(str(k), defaults)}" for k in raw if k not in defaults and k != "__version"]
        if unknown:
            self.out.problems.append(f"{self.where}: unknown OneTrainer field(s) in {key}: {', '.join(unknown)}")
        return {**defaults, **{k: v for k, v in raw.items() if k in defaults}}

    def refuse(self, name: str, value: Any, why: str) -> None:
        self.out.problems.append(f"{self.where}: {name} {value!r}: {why}")

    def note(self, text: str) -> None:
        self.out.notes.append(f"{self.where}: {text}")


def translate_config(
    data: dict[str, Any], fields: list[str], *, where: str, path: str | os.PathLike[str]
) -> JobTranslation:
    """sdcore option values for a OneTrainer TrainConfig (``fields``: the method's option names); ``data`` and
    ``sample_prompts`` point at the config file ``path`` itself."""
    from .kohya_gui import METHOD_FIELD

    out = JobTranslation()
    r = _Reader(data, where, out)
    v = out.values
    version = data.get("__version")
    if version is not None and (not isinstance(version, int) or version < CONFIG_VERSION):
        out.problems.append(
            f"{where}: __version {version!r}: saved by an older OneTrainer (sdcore reads config version "
            f"{CONFIG_VERSION}); open it in a current OneTrainer and save it again"
        )
        return out
    if isinstance(version, int) and version > CONFIG_VERSION:
        r.note(f"__version {version}: newer than the version {CONFIG_VERSION} sdcore knows; new fields are reported")
    unknown = [f"{k!r}{nearest_field(k, [*DEFAULTS, *_NESTED])}" for k in data if k not in DEFAULTS and
               k not in _NESTED and k not in ("__version", LEGACY_WEIGHT_DTYPE)]  # fmt: skip
    if unknown:
        out.problems.append(f"{where}: unknown OneTrainer field(s): {', '.join(unknown)}")

    # method and family
    training_method = _text(r.get("training_method"))
    method = METHODS.get(training_method)
    if method is None:
        r.refuse("training_method", training_method, f"sdcore trains {', '.join(METHODS)} (not the VAE)")
        return out
    present = set(fields)
    if present and METHOD_FIELD[method] not in present:
        out.problems.append(f"{where}: a OneTrainer {training_method} config: run it with `sdcore train {method}`")
        return out
    model_type = _text(r.get("model_type"))
    family = FAMILIES.get(model_type)
    if family is None:
        kind = "depth models" if model_type.endswith("DEPTH") else "this model family"
        r.refuse(
            "model_type",
            model_type,
            f"sdcore does not train {kind} (it trains SD1.5, SD2.x, SDXL, SD3/3.5, FLUX.1 dev, Chroma and the "
            "SD/SDXL inpainting and FLUX.1 Fill models)",
        )
        return out

    for key, value in data.items():  # plain fields: noted, or refused away from the default
        if key in HANDLED or key in _NESTED or key not in DEFAULTS:
            continue
        if same_value(value, DEFAULTS[key]):
            continue
        if key in NOTED:
            r.note(f"{key}: accepted, no effect on the result here ({NOTED[key]})")
        elif key in REFUSED:
            r.refuse(key, value, REFUSED[key])
        else:
            r.refuse(
                key, value, f"sdcore does not implement this OneTrainer setting (only its default {DEFAULTS[key]!r})"
            )
    quantization = r.table("quantization", QUANTIZATION_DEFAULTS)
    if any(not same_value(quantization[k], d) for k, d in QUANTIZATION_DEFAULTS.items()):
        r.note("quantization: accepted, no effect here (OneTrainer's quantized weight dtypes only)")
    cloud = data.get("cloud")
    if isinstance(cloud, dict) and cloud.get("enabled"):
        r.refuse("cloud.enabled", True, "sdcore trains on this machine (run it where the GPU is)")

    _model(r, family, method, fields)
    parts = {
        name: r.table(name, {**PART_DEFAULTS, **PARTS[name]})
        for name in PARTS
        if name in data or name in FAMILY_PARTS[family]
    }
    _legacy_weight_dtype(r, parts)
    _parts(r, parts, family, method, fields)
    _training(r, family, method)
    _masked(r, method, inpainting=model_type in INPAINTING_TYPES)
    _custom_conditioning(r, inpainting=model_type in INPAINTING_TYPES)
    _noise(r, family)
    _prediction(r, family, method)
    _additional_embeddings(r, method)
    if method == "lora":
        _lora(r, family)
    elif _text(r.get("layer_filter")) and method == "ti":  # no *EmbeddingSetup reads it
        r.note("layer_filter: accepted, no effect on an embedding (as in OneTrainer)")
    elif _text(r.get("layer_filter")):  # a fine-tune's freeze filter (ModuleFilter.create in *FineTuneSetup)
        r.refuse("layer_filter", r.get("layer_filter"), "OneTrainer then trains only the matching denoiser "
                 "parameters; sdcore trains all of them (leave it empty)")  # fmt: skip
    if method == "ti":
        _embedding(r)
    if method == "dreambooth":
        _fine_tune_weights(r, parts, family)
    _ema(r, fields)
    _default_concepts(r, path)
    _saves_and_samples(r, family, path)
    _rate_scaler(r)
    drop_foreign_options(v, fields, f"{where}: not options of `sdcore train {method}`", out.problems)
    return out


def _default_concepts(r: _Reader, path: str | os.PathLike[str]) -> None:
    """A config that names no concepts (every built-in preset) trains on ``TrainConfig``'s default
    ``training_concepts/concepts.json`` (:func:`sdcore.data.onetrainer.concepts_of`), found in one of several
    folders: a note says which file that is, since it is not in the config."""
    if isinstance(r.data.get("concepts"), list) or "concept_file_name" in r.data:
        return
    from ..data.onetrainer import DEFAULT_CONCEPT_FILE, resolve_path

    found = resolve_path(DEFAULT_CONCEPT_FILE, Path(path))
    if found.is_file():
        r.note(f"concept_file_name: not given, OneTrainer's default {DEFAULT_CONCEPT_FILE}: the concepts of {found} "
               "(unless --data is given)")  # fmt: skip


def _legacy_weight_dtype(r: _Reader, parts: dict[str, dict[str, Any]]) -> None:
    """The top-level ``weight_dtype`` of configs older than version 10 (OneTrainer's Chroma presets still have
    it): ``TrainConfig.__migration_9`` copies it into each part given in the config whose ``weight_dtype`` is
    ``NONE`` and drops it, so a part with its own dtype keeps it (a built-in preset, loaded without migration,
    ignores the field: the same for every part that gives its own). Read before the parts are."""
    if LEGACY_WEIGHT_DTYPE not in r.data:
        return
    value = _text(r.data[LEGACY_WEIGHT_DTYPE])
    if value not in WEIGHT_DTYPES:
        r.refuse(LEGACY_WEIGHT_DTYPE, r.data[LEGACY_WEIGHT_DTYPE], f"choose one of {', '.join(WEIGHT_DTYPES)}")
        return
    given = [name for name, part in parts.items() if name in r.data and _text(part["weight_dtype"]) == "NONE"]
    for name in given:
        parts[name]["weight_dtype"] = value
    if given:
        r.note(f"weight_dtype {value} (OneTrainer's field before config version 10): the weight_dtype of "
               f"{', '.join(given)}, which said NONE, as OneTrainer's config migration gives it")  # fmt: skip
    else:
        r.note(f"weight_dtype {value} (OneTrainer's field before config version 10): no effect, every part "
               "gives its own weight_dtype (as in OneTrainer)")  # fmt: skip


#: a trained part's half-precision ``weight_dtype`` -> (the ``train_dtype`` precision it needs, sdcore's option)
HALF_WEIGHTS = {"BFLOAT_16": ("bf16", "full_bf16"), "FLOAT_16": ("fp16", "full_fp16")}


def _fine_tune_weights(r: _Reader, parts: dict[str, dict[str, Any]], family: str) -> None:
    """The ``weight_dtype`` of the parts a FINE_TUNE trains. OneTrainer loads each part in its weight_dtype
    and its optimizer updates those tensors (no float32 master copy; ``create.py`` patches Adafactor and
    AdamW to round bf16 updates stochastically with ``optimizer.stochastic_rounding``): with one half type
    for every trained part and the train_dtype of the same type, sdcore's ``--full-bf16``/``--full-fp16``.
    Otherwise sdcore keeps a float32 master copy (more memory, finer updates), said in a note."""
    v = r.out.values
    names = FAMILY_PARTS[family]
    trained = [names[0], *(n for n in names[1:] if n.startswith("text_encoder") and parts[n]["train"])]
    dtypes = {n: _text(parts[n]["weight_dtype"]) for n in trained}
    half = {n: d for n, d in dtypes.items() if d in HALF_WEIGHTS}
    if not half:
        return
    shown = ", ".join(f"{n}.weight_dtype {d}" for n, d in half.items())
    kinds = set(dtypes.values())
    dtype = next(iter(half.values()))
    precision, option = HALF_WEIGHTS[dtype]
    if len(kinds) > 1 or v.get("mixed_precision") != precision:
        why = (
            "the trained parts differ in weight_dtype"
            if len(kinds) > 1
            else f"train_dtype {_text(r.get('train_dtype'))} is not {dtype}"
        )
        r.note(
            f"{shown}: OneTrainer updates these weights in that type itself; sdcore trains them through a float32 "
            f"master copy (more memory, finer updates) since {why} (--{option.replace('_', '-')} needs one type "
            "for all and the matching train_dtype)"
        )
        return
    v[option] = True
    note = f"{shown}: trained in that type itself, no float32 master copy (--{option.replace('_', '-')}, as OneTrainer)"
    table = r.optimizer
    stochastic = (
        dtype == "BFLOAT_16"
        and table["stochastic_rounding"]
        and _text(table["optimizer"]) in ("ADAFACTOR", "ADAMW", "ADAM")
    )
    if stochastic and not (v.get("optimizer") == "adafactor" and v.get("fused_backward_pass")):
        note += (
            "; OneTrainer rounds each bf16 update stochastically (optimizer.stochastic_rounding), sdcore does so "
            "for Adafactor with fused_back_pass only (kohya's) and rounds to nearest otherwise"
        )
    r.note(note)


def _custom_conditioning(r: _Reader, *, inpainting: bool) -> None:
    """``custom_conditioning_image``: each image's ``-condlabel.png`` is an inpainting model's masked image
    (``--inpainting-conditioning-images``); OneTrainer reads it for the models with the mask input only."""
    on = r.get("custom_conditioning_image")
    if not isinstance(on, bool):
        r.refuse("custom_conditioning_image", on, "must be true or false")
    elif on and inpainting:
        r.out.values["inpainting_conditioning_images"] = True
    elif on:
        r.note("custom_conditioning_image: accepted, no effect on a model without the mask input (as in OneTrainer)")


def _masked(r: _Reader, method: str, *, inpainting: bool = False) -> None:
    """``masked_training``: each image's ``-masklabel.png`` weighs its loss (:mod:`sdcore.data.onetrainer` pairs
    them; a missing one is a full mask). OneTrainer's per-sample loss (``masked_losses``) is
    ``mean(loss * m) / mean(m)`` with ``m = clamp(mask, unmasked_weight, 1)``, the division only with
    ``normalize_masked_area_loss``: ``--masked-loss --masked-loss-unmasked-weight W [--masked-loss-normalize]``
    (:func:`sdcore.train.data.weigh_by_mask`). ``unmasked_probability`` only acts on inpainting models, with or
    without ``masked_training`` (its data loader adds ``RandomLatentMaskRemove`` for ``has_mask_input`` model
    types): ``--inpainting-unmasked-probability``; the masks are then also the inpainting masks (without
    ``masked_training`` every mask is a full one, as in OneTrainer)."""
    v = r.out.values
    on = r.get("masked_training")
    if not isinstance(on, bool):
        r.refuse("masked_training", on, "must be true or false")
        return
    if inpainting:
        p = r.get("unmasked_probability")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            r.refuse("unmasked_probability", p, "must be a number in [0, 1]")
        else:
            v["inpainting_unmasked_probability"] = float(p)
    if not on:
        fields = [k for k in MASK_FIELDS if not (inpainting and k == "unmasked_probability")]
        changed = [k for k in fields if k in r.data and not same_value(r.data[k], DEFAULTS[k])]
        for key in changed:
            r.note(f"{key}: accepted, no effect without masked_training (as in OneTrainer)")
        return
    v["masked_loss"] = True
    weight = r.get("unmasked_weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= float(weight) <= 1.0:
        r.refuse("unmasked_weight", weight, "must be a number in [0, 1] (the loss weight outside the mask)")
    else:
        v["masked_loss_unmasked_weight"] = float(weight)
    normalize = r.get("normalize_masked_area_loss")
    if not isinstance(normalize, bool):
        r.refuse("normalize_masked_area_loss", normalize, "must be true or false")
    else:
        v["masked_loss_normalize"] = normalize
    if not inpainting:
        r.note(
            f"unmasked_probability {r.get('unmasked_probability')!r}: no effect (OneTrainer replaces the mask by a "
            "full one at this probability for inpainting models only)"
        )
    prior = r.get("masked_prior_preservation_weight")
    if isinstance(prior, bool) or not isinstance(prior, (int, float)):
        r.refuse("masked_prior_preservation_weight", prior, "must be a number")
    elif prior > 0 and method == "lora":
        r.refuse(
            "masked_prior_preservation_weight",
            prior,
            "OneTrainer trains a LoRA outside the mask toward the base model's own prediction (a second, "
            "LoRA-off forward); sdcore has no such target (set 0)",
        )
    elif prior != 0:
        r.note("masked_prior_preservation_weight: accepted, no effect (OneTrainer uses it for LoRA only)")


def _inpainting_match(r: _Reader, model: str) -> None:
    """An inpainting ``model_type`` needs an inpainting model (an SD UNet with 9 input channels, FLUX.1 Fill's
    384-wide ``img_in``) and any other type a plain one: OneTrainer's denoiser input is built from the type,
    so a mismatch is a shape error at its first step; here it is one line (from the model's header)."""
    from ..models.layout import read_layout
    from .inpainting import layout_kind

    try:
        layout = read_layout(model)
    except Exception:  # unreadable here: the loader and the pre-flight say why
        return
    model_type = _text(r.get("model_type"))
    wanted = model_type in INPAINTING_TYPES
    if wanted and layout_kind(layout) is None:
        r.refuse("model_type", model_type, f"base_model_name {model} is not an inpainting model (no mask input)")
    elif not wanted and layout_kind(layout) is not None:
        kind = "a FLUX.1 Fill" if layout.family == "flux" else "an inpainting"
        r.refuse("model_type", model_type, f"base_model_name {model} is {kind} model: use its _INPAINTING/FILL type")


def _rate_scaler(r: _Reader) -> None:
    """``learning_rate_scaler``: every parameter group's rate times sqrt(batch size and/or accumulation steps);
    GLOBAL_* also times the world size, 1 without ``multi_gpu`` (sdcore's rates are given scaled)."""
    name = _text(r.get("learning_rate_scaler"))
    if name not in LR_SCALERS:
        r.refuse("learning_rate_scaler", name, f"choose one of {', '.join(LR_SCALERS)}")
        return
    if name.startswith("GLOBAL") and r.get("multi_gpu"):
        r.refuse("learning_rate_scaler", name, "with multi_gpu it scales by the world size; give the rate instead")
        return
    by_batch, by_accumulation = LR_SCALERS[name]
    scale = (int(r.get("batch_size")) if by_batch else 1) * (
        int(r.get("gradient_accumulation_steps") or 1) if by_accumulation else 1
    )
    if scale == 1:
        return
    v = r.out.values
    for key in RATE_OPTIONS:
        if v.get(key) is not None:
            v[key] = float(v[key]) * scale**0.5
    r.note(f"learning_rate_scaler {name}: the learning rates are multiplied by sqrt({scale}) (as OneTrainer does)")


def _model(r: _Reader, family: str, method: str, fields: list[str]) -> None:
    """Model, output, precisions and data."""
    v = r.out.values
    model = _text(r.get("base_model_name"))
    v["model"] = model
    if model:
        from ..models.layout import peek_family

        found = peek_family(model) if (model.startswith("tiny:") or Path(model).expanduser().exists()) else None
        if found is not None and found != family:
            r.refuse("model_type", r.get("model_type"), f"base_model_name {model} is a {found} model, not {family}")
        elif found is not None:
            _inpainting_match(r, model)
    v["output"] = _text(r.get("output_model_destination"))
    train_dtype = _text(r.get("train_dtype"))
    if train_dtype in PRECISIONS:
        v["mixed_precision"] = PRECISIONS[train_dtype]
        if "train_dtype" not in r.data and PRECISIONS[train_dtype] == "fp16":  # a hand-written config (the UI saves it)
            r.out.advice["mixed_precision"] = (
                f"{r.where}: train_dtype is not set, so OneTrainer's default {train_dtype} applies "
                f"(--mixed-precision {PRECISIONS[train_dtype]}, which needs a CUDA GPU); without one set "
                '"train_dtype": "FLOAT_32" (or "BFLOAT_16") in the config, or give --mixed-precision no (or bf16)'
            )
    else:
        r.refuse("train_dtype", train_dtype, f"choose one of {', '.join(PRECISIONS)}")
    output_dtype = _text(r.get("output_dtype"))
    if output_dtype in SAVE_DTYPES:
        v["save_dtype"] = SAVE_DTYPES[output_dtype]
    else:
        r.refuse("output_dtype", output_dtype, f"sdcore saves {', '.join(SAVE_DTYPES)}")
    fmt = _text(r.get("output_model_format"))
    if method == "lora":
        if fmt == "KOHYA_LORA":
            v["key_layout"] = "kohya"
        elif fmt == "DIFFUSERS_LORA" and family in FLOW_FAMILIES:
            v["key_layout"] = "diffusers"
        elif fmt in ("LEGACY_LORA", "SAFETENSORS") and family in ("sd1", "sd2", "sdxl"):
            v["key_layout"] = "kohya"
            r.note(f"output_model_format {fmt}: written in kohya's LoRA layout (OneTrainer's SD LoRA keys)")
        else:
            r.refuse("output_model_format", fmt,
                     "sdcore writes LoRAs as KOHYA_LORA (and DIFFUSERS_LORA for SD3/Flux/Chroma)")  # fmt: skip
    elif method == "dreambooth" and family == "chroma":
        # ChromaModelSaver: DIFFUSERS, or the transformer alone in BFL keys (LEGACY_SAFETENSORS and
        # ORIGINAL_TRANSFORMER: lodestones' Chroma1-HD.safetensors layout)
        if fmt == "DIFFUSERS":
            v["save_format"] = "diffusers"
        elif fmt in ("ORIGINAL_TRANSFORMER", "LEGACY_SAFETENSORS"):
            v["save_format"] = "single-file"
            r.note(f"output_model_format {fmt}: sdcore writes a ComfyUI checkpoint (the transformer's BFL keys "
                   "under model.diffusion_model., with T5 and the VAE); `sdcore model convert --to bfl` "
                   "writes the transformer alone, as OneTrainer does")  # fmt: skip
        else:
            r.refuse("output_model_format", fmt, "OneTrainer writes Chroma as DIFFUSERS, ORIGINAL_TRANSFORMER or "
                     "LEGACY_SAFETENSORS")  # fmt: skip
    elif method == "dreambooth":
        if fmt in ("SAFETENSORS", "LEGACY_SAFETENSORS", "ORIGINAL_SINGLE_FILE"):
            v["save_format"] = "single-file"
        elif fmt == "DIFFUSERS":
            v["save_format"] = "diffusers"
        else:
            r.refuse("output_model_format", fmt, "sdcore writes a single-file model or a diffusers folder")
    elif fmt == "SAFETENSORS":
        v["format"] = "safetensors"
        # sdcore's TI output names A1111's .pt, always written, with the --format copy beside it
        # (OneTrainer's EmbeddingSaverMixin writes safetensors data to the destination, whatever its suffix)
        destination = Path(v["output"])
        if destination.suffix.lower() in (".safetensors", ".pt", ".bin", ".ckpt"):
            v["output"] = str(destination.with_suffix(".pt"))
            written = destination.with_suffix(".safetensors")
            elsewhere = "" if written == destination else f"; OneTrainer writes that file as {destination}"
            r.note(f"output_model_format SAFETENSORS: the embedding is written to {written} and, beside it, as "
                   f"A1111's {destination.with_suffix('.pt').name}{elsewhere}")  # fmt: skip
        else:
            r.note("output_model_format SAFETENSORS: the embedding is written as .safetensors and A1111's .pt")
    else:
        r.refuse("output_model_format", fmt, "sdcore writes embeddings as SAFETENSORS (and A1111's .pt)")
    # data: the concepts (in the config or its concept_file_name) are read by sdcore.data.onetrainer
    from ..data.onetrainer import parse_onetrainer_resolution

    v["buckets"] = bool(r.get("aspect_ratio_bucketing"))
    # OneTrainer's buckets on its family's grid; buckets off (or a fixed WxH), its rounding of the cover resize
    v.update(bucket_rule="onetrainer", bucket_step=BUCKET_QUANTIZATION.get(family, 64))
    # MGDS ScaleCropImage resizes with torchvision's Resize(BILINEAR, antialias=True) on float tensors: PIL's
    # bilinear (antialiased when shrinking too) gives the same pixels within a level of rounding
    v["resize_interpolation"] = "bilinear"
    try:
        read = parse_onetrainer_resolution(
            _text(r.get("resolution")), "resolution", buckets=v["buckets"], grid=v["bucket_step"]
        )
    except ConfigError as exc:  # a fixed WxH with a side of 0 on the grid, or no number
        r.out.problems.append(f"{r.where}: {exc}")
    else:
        rounded = read.rounding_note("resolution")
        if rounded:
            r.note(rounded)
        sizes = read.sizes
        if read.fixed is not None:  # WxH: every image covers it and is cropped to it, no buckets; load_options
            # turns a non-square pair into the side of its area plus resolution_size, as for kohya's W,H
            v.update(resolution=read.fixed if read.fixed[0] != read.fixed[1] else read.fixed[0], buckets=False)
        elif len(sizes) == 1:
            v["resolution"] = sizes[0]
        else:  # one uniform draw per image: per epoch, or once for the run with cached latents
            v.update(resolution=max(sizes), resolutions=",".join(map(str, sizes)))
            v["resolution_draw"] = "once" if r.get("latent_caching") else "epoch"
    v["cache_latents"] = bool(r.get("latent_caching"))
    for key in ("text_encoder_layer_skip", "text_encoder_2_layer_skip"):
        skip = r.get(key)
        if not skip:
            continue
        if family in ("sd1", "sd2", "sdxl") and (key == "text_encoder_layer_skip" or family == "sdxl"):
            v["clip_skip"] = int(skip) + 1  # skipping n final layers = kohya's clip_skip n + 1
        else:
            r.refuse(key, skip, "sdcore skips CLIP layers on SD1/SD2/SDXL only")
    if family == "sdxl" and r.get("text_encoder_layer_skip") != r.get("text_encoder_2_layer_skip"):
        r.refuse("text_encoder_2_layer_skip", r.get("text_encoder_2_layer_skip"),
                 "sdcore skips the same number of layers in both SDXL text encoders (clip_skip)")  # fmt: skip


def _stop(r: _Reader, name: str, part: dict[str, Any]) -> tuple[str, int] | None:
    """A part's ``stop_training_after`` when it takes effect before the run ends (``TimedActionMixin.
    single_action_elapsed``: EPOCH n trains epochs 0..n-1, STEP n steps 0..n-1; NEVER never stops)."""
    unit, after = _text(part.get("stop_training_after_unit")), part.get("stop_training_after")
    if unit == "NEVER" or after is None:
        return None
    if unit == "EPOCH" and int(after) >= int(r.get("epochs")):
        return None
    if unit in ("EPOCH", "STEP"):
        return unit, int(after)
    r.refuse(f"{name}.stop_training_after_unit", unit, "sdcore stops a part after a number of steps, not on a clock")
    return None


def _parts(r: _Reader, parts: dict[str, dict[str, Any]], family: str, method: str, fields: list[str]) -> None:
    """The model parts of the family: which train, their rates, dtypes and options."""
    v = r.out.values
    names = FAMILY_PARTS[family]
    denoiser_name, encoders = names[0], [n for n in names if n.startswith("text_encoder")]
    denoiser = parts[denoiser_name]
    stored_encoders: dict[str, str] = {}
    for name in names:
        part = parts[name]
        if not part["include"]:
            r.refuse(f"{name}.include", False, "sdcore loads every part of the model")
        dtype = _text(part["weight_dtype"])
        if name == denoiser_name and dtype == "FLOAT_8":
            v["fp8_base"] = True  # OneTrainer's float8 storage of the frozen weights, upcast per layer = fp8_base
        elif name == denoiser_name and dtype in STORED_DTYPES:
            v["base_weights_dtype"] = STORED_DTYPES[dtype]
            r.note(
                f"{name}.weight_dtype {dtype}: the frozen weights are stored as sdcore's {STORED_DTYPES[dtype]} "
                + ("(NF4 in blocks of 64, no double quantisation: bitsandbytes' codes, not its exact maxima)"
                   if dtype == "NFLOAT_4" else
                   "(absmax int8 per output row, weight-only: LLM.int8's fp16 outlier columns are not kept apart, "
                   "so the numbers differ slightly)")
            )  # fmt: skip
        elif name in encoders and dtype in TEXT_ENCODER_DTYPES and method == "dreambooth":
            r.note(
                f"{name}.weight_dtype {dtype}: kept in the training precision (sdcore's fine-tune writes the whole "
                "model, and a text encoder stored in fewer bits would be written rounded; its outputs are cached, "
                "so it leaves the device after caching)"
            )
        elif name in encoders and dtype in TEXT_ENCODER_DTYPES:  # --text-encoder-weights-dtype, per encoder
            stored_encoders[name] = TEXT_ENCODER_DTYPES[dtype]
            # OneTrainer leaves transformers' _keep_in_fp32_modules (T5's feed-forward ``wo``) unquantised, in the
            # train dtype (HFModelLoaderMixin: keep_in_fp32_modules); sdcore stores those too
            kept = (
                "; OneTrainer keeps T5's wo layers in the train dtype, sdcore stores them too"
                if name == T5_PART.get(family)
                else ""
            )
            r.note(
                f"{name}.weight_dtype {dtype}: its frozen Linear weights stored as sdcore's {stored_encoders[name]}{kept}"
            )
        elif dtype not in PLAIN_DTYPES:
            r.refuse(
                f"{name}.weight_dtype",
                dtype,
                "sdcore stores frozen weights in float8, nf4 or int8 (Linear layers) or a float type",
            )
        elif dtype != "FLOAT_32" and not (method == "dreambooth" and (name == denoiser_name or part["train"])):
            r.note(f"{name}.weight_dtype {dtype}: sdcore keeps frozen weights in the training precision")
        if name == "vae":
            if part["model_name"]:
                v["vae"] = str(part["model_name"])
            continue
        if name == denoiser_name and part["model_name"] and family == "chroma":
            _chroma_transformer_file(r, str(part["model_name"]))
        elif name != denoiser_name and part["model_name"] and family == "chroma":
            r.note(f"{name}.model_name: no effect (OneTrainer's Chroma reads T5 from base_model_name's text_encoder)")
        elif name == denoiser_name and part["model_name"]:
            r.refuse(f"{name}.model_name", part["model_name"], "sdcore reads the whole model from base_model_name")
        if part["dropout_probability"]:
            r.refuse(
                f"{name}.dropout_probability", part["dropout_probability"], "sdcore has no text-encoder output dropout"
            )
        offload_inputs = name == denoiser_name and denoiser_name == "transformer" and part["gradient_checkpointing"]
        if part["activation_offloading"] and offload_inputs:
            # LayerOffloadConductor.after_layer keeps each checkpointed block's inputs on the temp device (the CPU)
            # for backward: what --cpu-offload-checkpointing keeps there
            v["cpu_offload_checkpointing"] = True
        if part["offload_fraction"] or (part["activation_offloading"] and not offload_inputs):
            r.note(f"{name}: offloading accepted, no effect on the result here (memory)")
        if part["attention_mask"] and family != "chroma":
            if name == "transformer" and family == "flux":
                v["apply_t5_attn_mask"] = True
            else:
                r.refuse(f"{name}.attention_mask", True, "sdcore masks T5's padding on Flux only")
        if not part["train_embedding"] and method == "ti":
            r.refuse(f"{name}.train_embedding", False, "sdcore trains the embedding in every text encoder")
        elif method == "lora" and name in encoders and r.get("additional_embeddings") and family not in ("sd1", "sd2"):
            # a LORA run's additional embeddings (--embedding): OneTrainer trains each text encoder's vectors per its
            # train_embedding (default true; SD1/SD2's setups ignore it); sdcore's CLIP vectors and Chroma's T5
            # always train, SD3/FLUX.1's T5 with --embedding-t5
            if name == T5_PART.get(family) and family != "chroma":
                v["embedding_t5"] = bool(part["train_embedding"])
            elif not part["train_embedding"]:
                r.refuse(f"{name}.train_embedding", False, "sdcore trains the additional embeddings' vectors in "
                         "every CLIP text encoder and in Chroma's T5 (SD3/FLUX.1's T5: --embedding-t5)")  # fmt: skip
    if stored_encoders:  # one value when every encoder agrees, else one per encoder in the family's order
        chosen = [stored_encoders.get(n, "none") for n in encoders]
        v["text_encoder_weights_dtype"] = chosen[0] if len(set(chosen)) == 1 else ",".join(chosen)
    if family == "flux" and not same_value(denoiser["guidance_scale"], 1.0):
        v["guidance_scale"] = denoiser["guidance_scale"]
    if family == "chroma":
        # ChromaModel.encode_text masks T5's padding but one token (expand_mask=1) and BaseChromaSetup.predict
        # hands the transformer that mask whatever transformer.attention_mask says: sdcore's Chroma does the same
        v["apply_t5_attn_mask"] = True
        if not same_value(denoiser["guidance_scale"], PART_DEFAULTS["guidance_scale"]):
            r.note(f"transformer.guidance_scale {denoiser['guidance_scale']}: no effect (BaseChromaSetup.predict "
                   "passes no guidance; Chroma's approximator gets 0, in OneTrainer and in sdcore)")  # fmt: skip
    v["gradient_checkpointing"] = bool(denoiser["gradient_checkpointing"])
    if method == "ti":
        return
    stop = _stop(r, denoiser_name, denoiser)
    if stop is not None:
        r.refuse(
            f"{denoiser_name}.stop_training_after", f"{stop[1]} {stop[0]}", "sdcore trains the denoiser to the end"
        )
    training = [n for n in encoders if parts[n]["train"]]
    t5 = T5_PART.get(family)
    clip_training = [n for n in training if n != t5]
    if t5 in training:
        if not clip_training and family != "chroma":  # Chroma's T5 is its only text encoder
            r.refuse(f"{t5}.train", True, "sdcore trains T5 together with the CLIP text encoders (train_t5)")
        v["train_t5"] = True
    v["train_text_encoder"] = bool(training)
    rates = {n: parts[n]["learning_rate"] for n in training}
    if method == "lora":
        if not denoiser["train"] and not training:
            r.out.problems.append(f"{r.where}: nothing trains ({denoiser_name}.train and the text encoders' are false)")
        if not denoiser["train"] and training:
            v["te_only"] = True
        if denoiser["learning_rate"] is not None:
            v["unet_lr"] = denoiser["learning_rate"]
        given = {rate for rate in rates.values() if rate is not None}
        if len(given) == 1 and None not in rates.values():
            v["te_lr"] = given.pop()
        else:  # each encoder its own rate; one without (None) trains at learning_rate, sdcore's --lr
            _encoder_rates(v, encoders, t5, rates)
    else:  # dreambooth: the denoiser's rate is the run's rate, each text encoder may have its own
        if not denoiser["train"]:
            r.refuse(f"{denoiser_name}.train", False, "sdcore's fine-tuning always trains the denoiser")
        if denoiser["learning_rate"] is not None:
            v["lr"] = denoiser["learning_rate"]
        if family in ("sd1", "sd2") and rates.get("text_encoder") is not None:
            v["te_lr"] = rates["text_encoder"]
        elif family not in ("sd1", "sd2"):
            _encoder_rates(v, encoders, t5, rates)
    _text_encoder_stop(r, training, parts)


def _encoder_rates(v: dict[str, Any], encoders: Sequence[str], t5: str | None, rates: dict[str, Any]) -> None:
    """Each text encoder's ``learning_rate`` as sdcore's te1 CLIP-L, te2 CLIP-G, te3 T5 (Flux's 2nd, Chroma's 1st)."""
    for i, n in enumerate(encoders, 1):
        if rates.get(n) is not None:
            v[f"te{3 if n == t5 else i}_lr"] = rates[n]


def _chroma_transformer_file(r: _Reader, name: str) -> None:
    """``transformer.model_name`` on Chroma: ChromaModelLoader reads the transformer from that single file
    (``from_single_file``: lodestones' BFL file or a diffusers-layout one) and everything else from the
    ``base_model_name`` diffusers folder: sdcore's model is the file, with ``--t5xxl``, ``--t5-tokenizer``
    and ``--vae`` (``vae.model_name`` wins, as in OneTrainer) taken from the folder's components."""
    v = r.out.values
    base = Path(_text(v.get("model"))).expanduser()
    if not base.is_dir():
        r.refuse("transformer.model_name", name, "OneTrainer then takes T5 and the VAE from base_model_name's "
                 "diffusers folder: give base_model_name as a local Chroma diffusers folder")  # fmt: skip
        return
    v["model"] = name
    v["t5xxl"], v["t5_tokenizer"], v["vae"] = str(base / "text_encoder"), str(base / "tokenizer"), str(base / "vae")


def _text_encoder_stop(r: _Reader, training: list[str], parts: dict[str, dict[str, Any]]) -> None:
    """The text encoders' ``stop_training_after`` as the runtime's stop (:mod:`sdcore.train.te_stop`, LoRA and
    fine-tune alike), with ``TimedActionMixin.single_action_elapsed``'s meaning: EPOCH n trains epochs 0..n-1
    (``--stop-text-encoder-after-epochs n``); STEP n trains the micro-batches 0..n-1 (OneTrainer's
    ``global_step`` counts micro-batches), i.e. the first ``ceil(n / accumulation)`` optimizer steps
    (``--stop-text-encoder-at``). sdcore stops all text encoders together.

    OneTrainer itself re-reads ``requires_grad`` only after each optimizer step, from the step just done
    (``after_optimizer_step``), so its text encoder also trains in the one step that crosses the point; the
    note says so."""
    stops = {n: _stop(r, n, parts[n]) for n in training}
    found = {stop for stop in stops.values() if stop is not None}
    if len(found) > 1 or (found and None in stops.values()):
        shown = {n: "never" if stop is None else f"{stop[1]} {stop[0]}" for n, stop in stops.items()}
        r.refuse("text encoder stop_training_after", shown, "sdcore stops all text encoders at the same point")
        return
    if not found:
        return
    unit, after = found.pop()
    if after < 1:
        names = " and ".join(n for n in training)
        r.refuse(f"{training[0]}.stop_training_after", f"{after} {unit}",
                 f"that stops before the first step: set {names}.train false instead")  # fmt: skip
        return
    if unit == "STEP":
        steps = -(-after // int(r.get("gradient_accumulation_steps") or 1))
        r.out.values["stop_text_encoder_at"] = steps
        where = f"optimizer step {steps + 1}"
    else:
        r.out.values["stop_text_encoder_after_epochs"] = after
        where = f"the first step of epoch {after + 1}"
    r.note(
        f"text encoder stop_training_after {after} {unit}: sdcore freezes it from {where} on; OneTrainer "
        "updates it in that step too (it applies the stop after each optimizer step)"
    )


def _training(r: _Reader, family: str, method: str) -> None:
    """Rates, schedule, batches, optimizer, loss."""
    v = r.out.values
    lr = r.get("learning_rate")
    if method == "ti" and r.get("embedding_learning_rate") is not None:
        lr = r.get("embedding_learning_rate")  # the embedding's own rate
    if "lr" not in v:
        v["lr"] = lr
    epochs = r.get("epochs")
    v["epochs"] = epochs
    v["max_steps"] = None
    v["batch_size"] = r.get("batch_size")
    accumulation = int(r.get("gradient_accumulation_steps") or 1)
    v["gradient_accumulation"] = accumulation
    clip = r.get("clip_grad_norm")
    v["max_grad_norm"] = 0.0 if clip is None else clip  # None: no clipping
    _optimizer(r)  # first: schedule-free optimizers and Adafactor's relative step set the schedule themselves
    if "lr_scheduler" not in v:
        _schedule(r, accumulation)
    _loss(r, family)
    dropout = r.get("dropout_probability")
    if dropout and method == "lora":
        if _text(r.get("peft_type")) == "LORA" and not r.get("lora_decompose"):
            v["dropout"] = dropout  # LoRAModule: lora_up(dropout(lora_down(x))), kohya's network_dropout
        else:  # LoHa drops its factors' weights, DoRA the input: not sdcore's dropout
            r.refuse("dropout_probability", dropout, "sdcore's dropout is plain LoRA's (on the down output)")


def _loss(r: _Reader, family: str) -> None:
    """``ModelSetupDiffusionLossMixin``: the sum of losses and the timestep weight ``loss_weight_fn``."""
    v = r.out.values
    strengths = {k: float(r.get(k) or 0.0) for k in MIX_STRENGTHS}
    used = {k: s for k, s in strengths.items() if s != 0}
    if used == {"mse_strength": 1.0}:
        v["loss_type"] = "l2"
    elif used == {"mae_strength": 1.0}:
        v["loss_type"] = "l1"
    elif not used:
        r.refuse("loss strengths", strengths, "every loss strength is 0: OneTrainer would train on no loss")
    else:  # OneTrainer's sum, its torch Huber with huber_delta (sdcore.train.loss.mixed_loss)
        v["loss_type"] = "mix"
        v.update(strengths)
        v["huber_delta"] = float(r.get("huber_delta"))
    weight = _text(r.get("loss_weight_fn"))
    strength = r.get("loss_weight_strength")
    flow = family in FLOW_FAMILIES
    if weight == "CONSTANT":
        return
    if weight == "SIGMA" and flow:
        v["sigma_loss_weight"] = True  # sigma of the sample's timestep, (t + 1) / T
    elif weight == "MIN_SNR_GAMMA" and not flow:
        v["min_snr_gamma"] = strength  # min(snr, gamma) / snr, / (snr + 1) for v-prediction: the same as sdcore's
        _zero_terminal_snr_note(r, weight, "min(snr, gamma) / snr (/ (snr + 1) on v-prediction)")
    elif weight == "DEBIASED_ESTIMATION" and not flow:
        v["debiased_estimation_loss"] = True  # 1 / sqrt(min(snr, 1000)) for epsilon prediction, as kohya's
        # (with rescale_noise_scheduler_to_zero_terminal_snr OneTrainer forces v: config_prediction_type)
        if v_prediction(r):  # 1 / sqrt(min(snr, 1000) + 1), not kohya's 1 / (min(snr, 1000) + 1)
            v["debiased_estimation_sqrt"] = True  # on the rescaled schedule, as OneTrainer's (sdcore.train.loss)
    elif weight == "P2" and not flow:
        v["p2_loss_gamma"] = strength  # (1 + snr)^-strength, snr + 1 for v-prediction
    elif weight == "SIGMA":
        r.refuse("loss_weight_fn", weight, "a flow-matching noise-level weight; SD1/SD2/SDXL train with DDPM "
                 "(OneTrainer refuses it too)")  # fmt: skip
    elif weight in SNR_LOSS_WEIGHTS:
        r.refuse("loss_weight_fn", weight, "an SNR weight of a DDPM schedule; SD3/Flux train with flow matching "
                 "(Chroma too; OneTrainer refuses it too)")  # fmt: skip
    else:
        r.refuse("loss_weight_fn", weight, f"choose one of CONSTANT, SIGMA, {', '.join(SNR_LOSS_WEIGHTS)}")


#: OneTrainer's ``loss_weight_fn`` values of a DDPM schedule (its ``_flow_matching_losses`` raises for them)
SNR_LOSS_WEIGHTS = ("P2", "MIN_SNR_GAMMA", "DEBIASED_ESTIMATION")
#: SD2 model types whose models predict v (the 768 models; the _BASE ones predict epsilon)
V_PREDICTION_TYPES = ("STABLE_DIFFUSION_20", "STABLE_DIFFUSION_21")


def _zero_terminal_snr_note(r: _Reader, weight: str, formula: str) -> None:
    """What differs for an SNR loss weight that keeps kohya's meaning under OneTrainer's zero terminal SNR.

    OneTrainer rescales the model's scheduler and its loss weights read the rescaled SNR (lower at every
    timestep, 0 at the last). sdcore's ``--min-snr-gamma`` and epsilon ``--debiased-estimation-loss`` are
    kohya's, whose SNR table is taken before the betas are fixed; following OneTrainer would need an option
    of its own, so the translation says what differs instead (P2 and the v-prediction debiased weight, the only
    debiased weight with the rescale, which forces v, are OneTrainer's only and read the rescaled schedule,
    :mod:`sdcore.train.loss`)."""
    if not r.get("rescale_noise_scheduler_to_zero_terminal_snr"):
        return
    r.note(
        f"loss_weight_fn {weight} with rescale_noise_scheduler_to_zero_terminal_snr: sdcore's {formula} reads the "
        "SNR of the model's schedule before the zero-terminal rescale (kohya's meaning); OneTrainer's reads the "
        "rescaled schedule's, lower at every timestep and 0 at the last (where its epsilon weight is not finite), "
        "so the weights differ, most at high timesteps"
    )


def v_prediction(r: _Reader) -> bool:
    """Whether the model predicts v: what the config decides (:func:`config_prediction_type`), else the SD2 768
    model types (OneTrainer reads the rest from the model's scheduler, as sdcore does)."""
    method = METHODS.get(_text(r.get("training_method")), "")
    family = FAMILIES.get(_text(r.get("model_type")), "")
    decided = config_prediction_type(r, family, method)
    return decided == "v_prediction" if decided else _text(r.get("model_type")) in V_PREDICTION_TYPES


#: the single-file suffixes OneTrainer converts with its model type's ldm YAML (StableDiffusionModelLoader)
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def config_prediction_type(r: _Reader, family: str, method: str) -> str | None:
    """The prediction type a OneTrainer config trains whatever the model says, or None where the model decides.

    Every SD/SDXL setup calls ``force_v_prediction`` after ``rescale_noise_scheduler_to_zero_terminal_snr``;
    only the fine-tune setups (``StableDiffusion[XL]FineTuneSetup``) read ``force_v_prediction`` and
    ``force_epsilon_prediction``; a single SD2 ``_BASE`` file is read with ``v2-inference.yaml`` (epsilon)."""
    if family in FLOW_FAMILIES or not family:
        return None
    if r.get("rescale_noise_scheduler_to_zero_terminal_snr"):
        return "v_prediction"
    if method == "dreambooth" and r.get("force_v_prediction"):
        return "v_prediction"
    if method == "dreambooth" and r.get("force_epsilon_prediction"):
        return "epsilon"
    model = _text(r.get("base_model_name")).lower()
    if _text(r.get("model_type")).endswith("_BASE") and family == "sd2" and model.endswith(_SINGLE_FILE_SUFFIXES):
        return "epsilon"
    return None


def _declared_v_note(r: _Reader) -> None:
    """A single SD1.5/SDXL file that declares v-prediction: OneTrainer converts it with its model type's epsilon
    config (v1-inference.yaml, sd_xl_base.yaml) whatever it declares, sdcore's ``auto`` follows the file."""
    model = _text(r.get("base_model_name"))
    if not model.lower().endswith(_SINGLE_FILE_SUFFIXES) or not Path(model).expanduser().is_file():
        return
    from ..errors import SdcoreError
    from ..models.layout import read_layout

    try:
        layout = read_layout(Path(model).expanduser())
    except SdcoreError:
        return  # the pre-flight reports a file that cannot be read
    if layout.prediction_type == "v_prediction" and layout.prediction_source != "default":
        r.note(
            f"base_model_name {model}: the file declares v-prediction ({layout.prediction_source}) and sdcore trains "
            "it as v; OneTrainer converts SD1.5/SDXL files with its epsilon config and would train it as epsilon "
            "(give --prediction-type epsilon for OneTrainer's run, or force_v_prediction in a OneTrainer fine-tune)"
        )


def _prediction(r: _Reader, family: str, method: str) -> None:
    """``--prediction-type`` where the config decides it; the force flags noted where OneTrainer ignores them."""
    decided = config_prediction_type(r, family, method)
    if decided is not None:
        r.out.values["prediction_type"] = decided
    elif family in ("sd1", "sdxl"):
        _declared_v_note(r)
    for key in ("force_v_prediction", "force_epsilon_prediction"):
        if not r.get(key):
            continue
        if family in FLOW_FAMILIES:
            r.note(f"{key}: {family} trains with flow matching; not applied (OneTrainer's {family} setups ignore it)")
        elif method != "dreambooth":
            r.note(f"{key}: accepted, no effect (OneTrainer reads it in its fine-tune setups only)")
        elif r.get("rescale_noise_scheduler_to_zero_terminal_snr") and key == "force_epsilon_prediction":
            r.note(
                f"{key}: no effect with rescale_noise_scheduler_to_zero_terminal_snr, which forces v (as OneTrainer)"
            )


def _schedule(r: _Reader, accumulation: int) -> None:
    """``create.create_lr_scheduler``: warmup above 1 is a step count (divided by the accumulation), from
    0 to 1 a share of the run; then ``lr_scheduler_util``'s curves over the steps after the warmup."""
    v = r.out.values
    name = _text(r.get("learning_rate_scheduler"))
    warmup = float(r.get("learning_rate_warmup_steps") or 0.0)
    cycles = float(r.get("learning_rate_cycles") or 1.0)
    floor = float(r.get("learning_rate_min_factor") or 0.0)
    if warmup > 1:
        v["lr_warmup_steps"] = int(warmup / accumulation)
    elif warmup == 1:
        r.refuse("learning_rate_warmup_steps", 1.0, "a warmup over the whole run; give a step count or a share below 1")
    elif warmup > 0:
        v["lr_warmup_steps"] = warmup  # a share of the run, as sdcore (kohya) reads a number below 1
    else:
        v["lr_warmup_steps"] = 0
    warm = v["lr_warmup_steps"] != 0
    if name == "CONSTANT":
        v["lr_scheduler"] = "constant_with_warmup" if warm else "constant"
    elif name == "LINEAR" and floor == 0:
        v["lr_scheduler"] = "linear"
    elif name == "COSINE" and floor == 0:
        v["lr_scheduler"] = "cosine"  # 0.5 * (1 + cos(pi * progress)) = diffusers' cosine (half a wave)
    elif name in ("COSINE", "COSINE_WITH_RESTARTS") and (2 * (cycles if name != "COSINE" else 0.5)).is_integer():
        # 0.5 * (1 + cos(2 pi * cycles * progress)), lifted to min + (1 - min) * f: cosine_with_min_lr with
        # 2 * cycles half-waves (its num_cycles = lr_cycles / 2)
        v["lr_scheduler"] = "cosine_with_min_lr"
        v["lr_cycles"] = int(2 * (cycles if name != "COSINE" else 0.5))
        v["lr_min_ratio"] = floor
    elif name == "COSINE_WITH_HARD_RESTARTS" and floor == 0 and cycles.is_integer():
        v["lr_scheduler"] = "cosine_with_restarts"  # cos(pi * ((cycles * progress) % 1)): diffusers' hard restarts
        v["lr_cycles"] = int(cycles)
    elif name in SCHEDULER_REFUSALS:
        r.refuse("learning_rate_scheduler", name, SCHEDULER_REFUSALS[name])
    else:
        r.refuse("learning_rate_scheduler", name, "sdcore reads CONSTANT, LINEAR, COSINE, COSINE_WITH_RESTARTS (whole "
                 "half-waves) and COSINE_WITH_HARD_RESTARTS (whole cycles); LINEAR and hard restarts without "
                 "learning_rate_min_factor")  # fmt: skip


#: schedules sdcore has no counterpart for, and why (lr_scheduler_util.py, create.py)
SCHEDULER_REFUSALS = {
    "REX": "REX's (1 - p) / (1 - d + d (1 - p)) curve is not among sdcore's schedules",
    "ADAFACTOR": "with optimizer ADAFACTOR and relative_step true it is sdcore's adafactor schedule (read so); "
    "with a given rate OneTrainer's AdafactorSchedule keeps the first parameter group's rate for every group "
    "and no warmup: choose CONSTANT (the same with one rate)",
    "CUSTOM": "a class of OneTrainer's users; give sdcore's --lr-scheduler-type class path instead",
}


def _args_text(args: dict[str, Any]) -> str:
    def one(value: Any) -> str:
        if isinstance(value, tuple):
            return ",".join(one(x) for x in value)
        return repr(value) if isinstance(value, float) else str(value)

    return " ".join(f"{k}={one(x)}" for k, x in args.items())


def _optimizer(r: _Reader) -> None:
    """The optimizer with every argument ``create.py`` gives it (a field left at None takes create.py's value)."""
    v = r.out.values
    table = r.optimizer = _ui_optimizer(r, r.table("optimizer", OPTIMIZER_DEFAULTS))
    name = _text(table["optimizer"])
    if name not in OPTIMIZERS:
        why = OPTIMIZER_REFUSALS.get(name, "")
        r.refuse(
            "optimizer.optimizer", name, f"{why}{'; ' if why else ''}sdcore runs OneTrainer's {', '.join(OPTIMIZERS)}"
        )
        return
    optimizer, arguments = OPTIMIZERS[name]
    if name == "ADAMW_8BIT" and table["is_paged"]:
        optimizer = "pagedadamw8bit"
    args: dict[str, Any] = {}
    for arg, (keys, fallbacks) in arguments.items():
        values = tuple(table[k] if table[k] is not None else f for k, f in zip(keys, fallbacks, strict=True))
        if any(x is None for x in values):
            continue  # the library's own default (OneTrainer passes None)
        values = tuple(None if x == PASS_NONE else x for x in values)
        args[arg] = values if len(values) > 1 else values[0]
    if name in ("SCHEDULE_FREE_ADAMW", "SCHEDULE_FREE_SGD"):
        # create.py passes learning_rate_warmup_steps as it is (not divided by the accumulation, a share below 1
        # not resolved) and forces a constant schedule without warmup: the optimizer warms up by itself
        args["warmup_steps"] = float(r.get("learning_rate_warmup_steps") or 0.0)
    if name in SCHEDULE_FREE:
        v["lr_scheduler"], v["lr_warmup_steps"] = "constant", 0
        if table["fused_back_pass"] and name == "PRODIGY_PLUS_SCHEDULE_FREE":
            r.refuse("optimizer.fused_back_pass", True, "ProdigyPlus' own fused back pass is not sdcore's")
    if name == "ADAFACTOR" and args.get("relative_step"):
        # create.py gives Adafactor lr=None and takes the rates out of the parameter groups: Adafactor's own
        # relative step, which no LR schedule changes (ADAFACTOR's AdafactorSchedule only reports it) = kohya's
        # relative_step=True with the adafactor schedule
        v["lr_scheduler"], v["lr_warmup_steps"] = "adafactor", 0
        if _text(r.get("learning_rate_scheduler")) != "ADAFACTOR":
            r.note(f"learning_rate_scheduler {_text(r.get('learning_rate_scheduler'))}: no effect with Adafactor's "
                   "relative_step (its own rate); sdcore reports it with the adafactor schedule")  # fmt: skip
    v["optimizer"] = optimizer
    v["optimizer_args"] = _args_text(args)
    family = FAMILIES.get(_text(r.get("model_type")), "")
    clip = r.get("clip_grad_norm")
    if table["fused_back_pass"] and name not in FUSED_BACK_PASS_OPTIMIZERS:
        r.note(f"optimizer.fused_back_pass: accepted, no effect with {name} (OneTrainer steps it after backward: "
               "Optimizer.supports_fused_back_pass)")  # fmt: skip
    elif table["fused_back_pass"] and name != "PRODIGY_PLUS_SCHEDULE_FREE":
        from .fused import KOHYA_FAMILIES

        # GenericTrainer.__apply_fused_back_pass: each tensor steps in backward, clipped by its own norm, on every
        # family, and with gradient_accumulation_steps in the backward of the update's last batch
        # (--fused-clip per-tensor always: the same weights as kohya's rule where both accept the run, and the
        # pre-flight's notes then name OneTrainer's rule, not kohya's refusal of fused + accumulation)
        v["fused_backward_pass"], v["fused_clip"] = True, "per-tensor"
        if clip and family not in KOHYA_FAMILIES:  # kohya's scripts clip all gradients together there
            r.note(f"optimizer.fused_back_pass with clip_grad_norm {clip} on {family}: --fused-clip per-tensor "
                   "(OneTrainer clips each tensor by its own norm as it steps it in backward; sdcore's default "
                   "follows kohya, whose scripts for this family clip all gradients together)")  # fmt: skip
    for key, why in OPTIMIZER_NOTED.items():
        if not same_value(table[key], OPTIMIZER_DEFAULTS[key]):
            r.note(f"optimizer.{key}: accepted, no effect on the result here ({why})")


def _ui_optimizer(r: _Reader, table: dict[str, Any]) -> dict[str, Any]:
    """The optimizer settings OneTrainer's UI trains with. ``optimizer_defaults`` keeps the UI's settings per
    optimizer; loading a config or preset in the UI replaces the ``optimizer`` table by the chosen optimizer's
    entry there, over the UI's own defaults for it (``optimizer_util.change_optimizer``,
    ``OPTIMIZER_DEFAULT_PARAMETERS``: for ADAMW and ADAFACTOR the same weights as ``create.py``'s fallbacks
    sdcore applies, AdamW's ``fused``/``stochastic_rounding`` aside), and closing its optimizer window keeps both in step
    (``update_optimizer_config``), so in a config the UI saved they agree. The built-in presets give only the
    entry (the Chroma fine-tunes' Adafactor with ``fused_back_pass``): its values fill the fields the
    ``optimizer`` object leaves out (not those it gives, even at their default value: a hand-edited
    ``"fused_back_pass": false`` is not turned back on). A field both give differently is ambiguous (the UI
    trains with the entry's, ``scripts/train.py``, which ignores ``optimizer_defaults``, with the table's): one
    problem line each."""
    raw = r.data.get("optimizer_defaults")
    written = r.data.get("optimizer")
    given = set(written) if isinstance(written, dict) else set()
    name = _text(table["optimizer"])
    if raw in (None, {}):
        return table
    if not isinstance(raw, dict):
        r.refuse("optimizer_defaults", raw, "must be an object of optimizer settings by optimizer name")
        return table
    entry = raw.get(name)
    if not isinstance(entry, dict):
        r.note("optimizer_defaults: accepted, no effect on the result here (the UI's remembered settings of "
               "optimizers other than the chosen one)")  # fmt: skip
        return table
    saved = r.table_value(f"optimizer_defaults.{name}", entry, OPTIMIZER_DEFAULTS)
    merged, taken = dict(table), []
    for key in OPTIMIZER_DEFAULTS:
        if key == "optimizer" or same_value(saved[key], table[key]):
            continue
        if key not in given:
            merged[key] = saved[key]
            taken.append(f"{key}={saved[key]!r}")
        else:
            r.refuse(f"optimizer.{key}", table[key], f"optimizer_defaults.{name}.{key} says {saved[key]!r}: "
                     "OneTrainer's UI trains with the latter, its scripts/train.py with the former; make them "
                     "agree")  # fmt: skip
    if taken:
        r.note(f"optimizer_defaults.{name}: {', '.join(taken)} (the settings OneTrainer's UI loads for the chosen "
               "optimizer; its scripts/train.py would ignore them)")  # fmt: skip
    return merged


def _noise(r: _Reader, family: str) -> None:
    """``ModelSetupNoiseMixin``: offset noise, timestep distributions and shift."""
    v = r.out.values
    if r.get("offset_noise_weight"):
        v["noise_offset"] = r.get("offset_noise_weight")  # noise + w * N(0, 1) per channel = kohya's noise_offset
    if r.get("rescale_noise_scheduler_to_zero_terminal_snr"):
        v["zero_terminal_snr"] = True
    kind = _text(r.get("timestep_distribution"))
    low, high = float(r.get("min_noising_strength")), float(r.get("max_noising_strength"))
    weight, bias = float(r.get("noising_weight")), float(r.get("noising_bias"))
    shift, dynamic = float(r.get("timestep_shift")), bool(r.get("dynamic_timestep_shifting"))
    narrowed = (low, high) != (0.0, 1.0)
    if family not in FLOW_FAMILIES:
        if shift != 1:  # _get_timestep_discrete shifts the DDPM timesteps with config.timestep_shift too
            v["timestep_shift"] = shift
            _distribution(r, kind, low, high, weight, bias)
        elif kind == "UNIFORM":  # int(min + (max - min) * U) over 1000 steps = kohya's uniform draw from [min, max)
            if narrowed:
                v["min_timestep"], v["max_timestep"] = int(1000 * low), int(1000 * high)
        else:
            _distribution(r, kind, low, high, weight, bias)
        return
    v["model_prediction_type"] = "raw"  # OneTrainer's flow loss: the prediction against noise - latents
    v["weighting_scheme"] = "uniform"
    if dynamic and family == "flux":
        if kind == "LOGIT_NORMAL" and (weight, bias) == (0.0, 0.0) and not narrowed:
            # sigmoid(N(0, 1)), shifted by the resolution's exp(mu) (Flux's calculate_timestep_shift) = kohya flux_shift
            v["timestep_sampling"], v["sigmoid_scale"] = "flux_shift", 1.0
        else:
            # BaseFluxSetup: any distribution, then the resolution's exp(mu) as the shift of _get_timestep_discrete
            v["dynamic_timestep_shift"] = True
            _distribution(r, kind, low, high, weight, bias)
            if kind in ("SIGMOID", "COS_MAP", "INVERTED_PARABOLA"):
                r.note(f"dynamic_timestep_shifting with {kind}: OneTrainer keeps the bucket weights of its first "
                       "batch's resolution; sdcore weighs each batch by its own (the same with one image size)")  # fmt: skip
        if shift != 1:
            r.note("timestep_shift: without effect with dynamic_timestep_shifting (the resolution decides the shift)")
        return
    if dynamic:  # BaseChromaSetup (and SD3's) draw with timestep_shift alone
        r.note("dynamic_timestep_shifting: OneTrainer shifts by resolution for Flux only")
    v["discrete_flow_shift"] = shift  # t' = s t / ((s - 1) t + 1), as OneTrainer shifts
    low_scale, high_scale = MODE_SCALE_RANGE
    if narrowed or kind not in ("UNIFORM", "LOGIT_NORMAL", "HEAVY_TAIL"):
        # OneTrainer's own draw: narrowed before the shift, its weighted buckets (sdcore.train.timestep_distributions)
        _distribution(r, kind, low, high, weight, bias)
    elif kind == "UNIFORM":
        v["timestep_sampling"] = "uniform"
    elif kind == "LOGIT_NORMAL":
        # sigmoid(N(noising_bias, noising_weight + 1))
        v["timestep_sampling"], v["logit_mean"], v["logit_std"] = "logit_normal", bias, weight + 1.0
    elif low_scale <= weight <= high_scale:
        # HEAVY_TAIL: 1 - u - w (cos(pi u / 2)^2 - 1 + u), u uniform: the SD3 paper's mode sampling (kohya's "mode")
        # with scale noising_weight (noising_bias unused)
        v["timestep_sampling"], v["mode_scale"] = "mode", weight
    else:
        r.refuse("noising_weight", weight, f"HEAVY_TAIL's scale must lie in [{low_scale:g}, {high_scale:.4f}] "
                 "(outside it the mapping is not monotone; sdcore's --mode-scale refuses it)")  # fmt: skip


def _distribution(r: _Reader, kind: str, low: float, high: float, weight: float, bias: float) -> None:
    """A OneTrainer distribution as sdcore's ``--timestep-distribution`` (the same draw, on every family)."""
    from .timestep_distributions import TIMESTEP_DISTRIBUTIONS

    name = kind.lower()
    if name not in TIMESTEP_DISTRIBUTIONS:
        r.refuse("timestep_distribution", kind, f"choose one of {', '.join(d.upper() for d in TIMESTEP_DISTRIBUTIONS)}")
        return
    if name == "heavy_tail" and not MODE_SCALE_RANGE[0] <= weight <= MODE_SCALE_RANGE[1]:
        r.refuse("noising_weight", weight, f"HEAVY_TAIL's scale must lie in [{MODE_SCALE_RANGE[0]:g}, "
                 f"{MODE_SCALE_RANGE[1]:.4f}] (outside it the mapping is not monotone)")  # fmt: skip
        return
    v = r.out.values
    v["timestep_distribution"], v["noising_weight"], v["noising_bias"] = name, weight, bias
    v["min_noising_strength"], v["max_noising_strength"] = low, high


def _lora(r: _Reader, family: str) -> None:
    v = r.out.values
    kind = _text(r.get("peft_type"))
    if r.get("lora_model_name"):
        v["network_weights"] = str(r.get("lora_model_name"))
    v["rank"], v["alpha"] = r.get("lora_rank"), r.get("lora_alpha")
    if kind == "LORA":
        v["algo"] = "dora" if r.get("lora_decompose") else "lora"
        if r.get("lora_decompose"):
            r.note("lora_decompose: trained as LyCORIS' DoRA (weight decomposition), saved in its layout")
            if r.get("lora_decompose_output_axis"):
                r.refuse("lora_decompose_output_axis", True, "sdcore's DoRA decomposes along the input axis")
    elif kind == "LOHA":
        v["algo"] = "loha"
    elif kind == "LOKR":
        v["algo"], v["rank"] = "lokr", r.get("lokr_dim")
        v["lokr_factor"] = r.get("lokr_decompose_factor")
        # LoRAModule.LoKrModule: w1 low-rank when decompose_both and dim < max(w1 sides) / 2, Tucker core lokr_t2
        # for kxk convs: LyCORIS' conditions, factor shapes and keys (sdcore's --decompose-both / --use-tucker)
        v["decompose_both"] = bool(r.get("lokr_decompose_both"))
        v["use_tucker"] = bool(r.get("lokr_use_tucker"))
    else:
        r.refuse("peft_type", kind, "sdcore trains LORA, LOHA and LOKR")
    preset, custom = _text(r.get("layer_filter_preset")), _text(r.get("layer_filter"))
    regex = bool(r.get("layer_filter_regex"))
    patterns = tuple(x.strip() for x in custom.split(",")) if custom else ()
    if not custom and preset in LAYER_PRESETS[family]:  # OneTrainer's UI writes the preset's patterns
        patterns = LAYER_PRESETS[family][preset]
    elif not custom and preset != "custom":
        r.refuse("layer_filter_preset", preset, f"OneTrainer's {family} presets are "
                 f"{', '.join(LAYER_PRESETS[family])}")  # fmt: skip
        return
    lora_conv = kind == "LORA" and not r.get("lora_decompose")
    if patterns and patterns in LAYER_PRESETS[family].values() and not regex:
        # a preset's patterns select only modules among sdcore's candidates (kohya's targets): exact as a filter
        v["layer_filter"] = ",".join(patterns)
    elif custom and any(patterns):  # LoRAModuleWrapper: the denoiser's modules whose name a pattern matches
        v["layer_filter"], v["layer_filter_regex"] = custom, regex
        if family in ("sd1", "sd2", "sdxl") and lora_conv:
            v["algo"], v["conv_rank"], v["conv_alpha"] = "locon", v["rank"], v["alpha"]
            where = "every Linear and Conv2d of the UNet's attention and ResNet blocks (LoCon, conv rank = rank)"
        elif family in ("sd1", "sd2", "sdxl"):
            where = "the Linear layers of the UNet's attention blocks"
        else:
            where = f"the Linear layers of the {family} blocks (kohya's targets)"
        r.note(f"layer_filter {custom!r}: applied to {where}; OneTrainer matches every Linear and Conv2d of the "
               f"denoiser, so a layer outside them is not adapted ({FULL_PRESET_OUTSIDE[family]})")  # fmt: skip
    elif family in ("sd1", "sd2", "sdxl") and not lora_conv:  # full: an empty filter
        r.refuse("layer_filter_preset", preset or "full", "OneTrainer then adapts every Linear and Conv2d of the "
                 "UNet; sdcore does that (but conv_in, conv_out, the time embeddings) as LoCon, for LORA")  # fmt: skip
    else:  # full (or an empty filter): every Linear and Conv2d of the denoiser
        if family in ("sd1", "sd2", "sdxl"):
            v["algo"], v["conv_rank"], v["conv_alpha"] = "locon", v["rank"], v["alpha"]
        what = "the UNet, as LoCon (conv rank = rank)" if family in ("sd1", "sd2", "sdxl") else f"the {family} blocks"
        r.note(f"layer_filter_preset full: sdcore adapts every Linear and Conv2d of {what}; OneTrainer also adapts "
               f"{FULL_PRESET_OUTSIDE[family]}")  # fmt: skip


def _additional_embeddings(r: _Reader, method: str) -> None:
    """``additional_embeddings`` of a LORA run: new embeddings trained with it (``TrainEmbeddingConfig`` each),
    bundled in the LoRA file (``bundle_additional_embeddings``, the default) or, with it false, written as separate
    files instead (``--embedding-files``: OneTrainer's ``<LoRA file>_embeddings/<placeholder>.safetensors``): the
    LoRA's ``--embedding PLACEHOLDER:TOKEN_COUNT:INITIAL_EMBEDDING_TEXT``, ``embedding_learning_rate`` its
    ``--embedding-lr`` and a STEP ``stop_training_after`` its ``--embedding-stop-at``. What sdcore cannot do is
    refused by name."""
    v = r.out.values
    raw = r.get("additional_embeddings")
    if raw in (None, []):
        return
    if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
        r.refuse("additional_embeddings", raw, "must be a list of embedding objects")
        return
    if method != "lora":
        r.refuse("additional_embeddings", f"{len(raw)} embedding(s)", "sdcore trains additional embeddings with "
                 "a LoRA only (sdcore train lora --embedding)")  # fmt: skip
        return
    if r.get("bundle_additional_embeddings") is False:  # OneTrainer: separate files instead, not both
        v["embedding_files"] = True
    specs, stops = [], set()
    for i, item in enumerate(raw):
        name = f"additional_embeddings[{i}]"
        emb = r.table_value(name, item, EMBEDDING_DEFAULTS)
        placeholder = _text(emb["placeholder"])
        if not placeholder.strip() or ":" in placeholder or "." in placeholder:
            r.refuse(f"{name}.placeholder", emb["placeholder"], "sdcore names the embedding by its placeholder "
                     "(the file's bundle_emb.<placeholder> keys): a non-empty text without ':' or '.'")  # fmt: skip
        if emb["model_name"]:
            r.refuse(f"{name}.model_name", emb["model_name"], "sdcore starts additional embeddings from their "
                     "initial_embedding_text (not from a file)")  # fmt: skip
        if not emb["train"]:
            r.refuse(f"{name}.train", False, "sdcore trains every additional embedding")
        if emb["is_output_embedding"]:
            r.refuse(f"{name}.is_output_embedding", True, "sdcore trains input embeddings")
        stop = _stop(r, name, emb)
        if stop is not None and stop[0] == "EPOCH":
            r.refuse(f"{name}.stop_training_after_unit", "EPOCH", "sdcore stops the embeddings after a step count "
                     "(--embedding-stop-at): give the unit STEP")  # fmt: skip
        stops.add(stop[1] if stop is not None else None)
        count = emb["token_count"] if emb["token_count"] is not None else 1
        specs.append(f"{placeholder}:{count}:{_text(emb['initial_embedding_text'])}")
    if len(stops) > 1:
        r.refuse("additional_embeddings", "stop_training_after", "sdcore stops every embedding at one step count "
                 "(--embedding-stop-at): give them the same stop")  # fmt: skip
    v["embedding"] = tuple(specs)
    if r.get("embedding_learning_rate") is not None:
        v["embedding_lr"] = r.get("embedding_learning_rate")
    (stop_at,) = stops if len(stops) == 1 else (None,)
    if stop_at is not None:
        v["embedding_stop_at"] = stop_at


def _embedding(r: _Reader) -> None:
    v = r.out.values
    emb = r.table("embedding", EMBEDDING_DEFAULTS)
    # OneTrainer trains on the captions as written, the placeholder inside them: sdcore's filewords template;
    # the placeholder (``<embedding>`` by default) is replaced wherever it is written (BaseModel.
    # _add_embeddings_to_prompt's str.replace, samples too) = --placeholder; the embedding is written to
    # output_model_destination (the *EmbeddingSaver's save_single), whose stem is the name it answers to in A1111
    from ..io import file_stem_problem

    placeholder = _text(emb["placeholder"])
    if not placeholder.strip():
        r.refuse("embedding.placeholder", emb["placeholder"], "the text the captions use for the embedding is empty")
    stem = Path(_text(r.get("output_model_destination"))).stem
    if file_stem_problem(stem):
        r.refuse("output_model_destination", r.get("output_model_destination"), "its file name is the embedding's "
                 "name: use letters, digits, '.', '_', '-' and spaces only")  # fmt: skip
    v["name"], v["placeholder"], v["template"] = stem, placeholder, "filewords"
    v["vectors"] = emb["token_count"] if emb["token_count"] is not None else 1
    v["init_text"] = str(emb["initial_embedding_text"])
    if emb["model_name"]:
        v["init_weights"] = str(emb["model_name"])
    if not emb["train"]:
        r.refuse("embedding.train", False, "nothing to train")
    stop = _stop(r, "embedding", emb)
    if stop is not None:
        r.refuse("embedding.stop_training_after", f"{stop[1]} {stop[0]}", "sdcore trains the embedding to the end")
    if emb["is_output_embedding"]:
        r.refuse("embedding.is_output_embedding", True, "sdcore trains input embeddings")
    if r.get("preserve_embedding_norm"):
        r.refuse("preserve_embedding_norm", True, "sdcore does not rescale the vectors")


def _ema(r: _Reader, fields: list[str]) -> None:
    """``ema`` GPU/CPU keeps an EMA of the trained weights (updated every ``ema_update_step_interval`` steps,
    OneTrainer's decay warm-up, the shadow in host memory for CPU): the runtime's ``--ema`` options."""
    v = r.out.values
    mode = _text(r.get("ema"))
    if mode == "OFF":
        return
    if mode not in ("GPU", "CPU"):
        r.refuse("ema", mode, "choose OFF, GPU or CPU")
        return
    v["ema"] = True
    v["ema_decay"] = r.get("ema_decay")
    v["ema_update_every"] = int(r.get("ema_update_step_interval"))
    v["ema_warmup"] = "onetrainer"
    v["ema_device"] = "cpu" if mode == "CPU" else "same"


def _optimizer_steps(r: _Reader, name: str, every: int) -> int:
    """A STEP interval in sdcore's optimizer steps. OneTrainer's STEP unit counts batches (TimedActionMixin
    reads ``train_progress.global_step``, which GenericTrainer advances once per batch, an optimizer step
    every ``gradient_accumulation_steps`` of them) and runs the save or sample at the next optimizer step:
    every ``every / accumulation`` optimizer steps when that divides, an uneven cadence otherwise."""
    accumulation = int(r.get("gradient_accumulation_steps") or 1)
    if every % accumulation:
        r.refuse(
            name,
            every,
            f"OneTrainer counts it in batches, {accumulation} per optimizer step (gradient_accumulation_steps): "
            "give a multiple of it",
        )
    return max(1, every // accumulation)


def _saves_and_samples(r: _Reader, family: str, path: str | os.PathLike[str]) -> None:
    """``save_every``/``sample_after`` in STEP or EPOCH units; clock units have no sdcore counterpart."""
    v = r.out.values
    v["data"] = str(path)
    every, unit = int(r.get("save_every") or 0), _text(r.get("save_every_unit"))
    if every > 0 and unit == "STEP":
        v["save_every"] = _optimizer_steps(r, "save_every", every)
    elif every > 0 and unit == "EPOCH":
        v["save_every_epochs"] = every
    elif unit in ("SECOND", "MINUTE", "HOUR") and every > 0:
        r.note(f"save_every {every} {unit}: sdcore saves by steps or epochs, not on a clock: no intermediate saves")
    if r.get("save_skip_first"):
        r.note(f"save_skip_first {r.get('save_skip_first')}: sdcore writes every intermediate save")
    after, sample_unit = int(r.get("sample_after") or 0), _text(r.get("sample_after_unit"))
    if not isinstance(r.data.get("samples"), list):
        from ..data.onetrainer import resolve_path

        name = _text(r.get("sample_definition_file_name"))
        if not resolve_path(name, Path(path)).is_file():
            if sample_unit != "NEVER" and after > 0:
                r.note(f"sample_definition_file_name {name}: no such file here, so no samples")
            return
    try:
        prompts = read_sample_prompts(path)
    except ConfigError as exc:
        r.out.problems.append(str(exc))
        return
    if not prompts or after <= 0 or sample_unit == "NEVER":
        return
    if sample_unit in ("STEP", "EPOCH"):
        v["sample_prompts"] = str(path)
        if sample_unit == "STEP":
            v["sample_every"] = _optimizer_steps(r, "sample_after", after)
        else:
            v["sample_every_epochs"] = after
        v["sample_at_first"] = not r.get("sample_skip_first")
        if int(r.get("sample_skip_first") or 0) > 1:
            r.note(f"sample_skip_first {r.get('sample_skip_first')}: sdcore skips only the first sampling")
    else:
        r.note(f"sample_after {after} {sample_unit}: sdcore samples by steps or epochs, not on a clock: no samples")


# --- sample prompts ---------------------------------------------------------------------------------------


def _samples_of(data: Any, path: Path) -> tuple[list[Any], str | None]:
    """The sample list of a TrainConfig (``samples``, else ``sample_definition_file_name``) or of a samples
    file, and the config's ``model_type`` (None for a bare samples file)."""
    from ..data.onetrainer import resolve_path

    if isinstance(data, list):
        return data, None
    if not is_train_config(data):
        raise ConfigError(f"{path}: not a OneTrainer config or samples file")
    model_type = _text(data.get("model_type", DEFAULTS["model_type"]))
    if isinstance(data.get("samples"), list):
        return data["samples"], model_type
    name = _text(data.get("sample_definition_file_name", DEFAULTS["sample_definition_file_name"]))
    samples_file = resolve_path(name, path)
    listed = _read_json(samples_file)
    if not isinstance(listed, list):
        raise ConfigError(f"{samples_file}: a OneTrainer samples file is a JSON list of samples")
    return listed, model_type


def is_samples_list(data: Any) -> bool:
    """A OneTrainer samples file: a JSON list of objects with its own field names (``diffusion_steps``,
    ``cfg_scale``, ``noise_scheduler``, ``random_seed``; kohya's JSON prompts say ``sample_steps``/``scale``)."""
    own = {"diffusion_steps", "cfg_scale", "noise_scheduler", "random_seed"}
    return isinstance(data, list) and any(isinstance(e, dict) and own & e.keys() for e in data)


def is_sample_source(path: str | os.PathLike[str]) -> bool:
    p = Path(path).expanduser()
    if p.suffix.lower() != ".json" or not p.is_file():
        return False
    try:
        data = _read_json(p)
    except ConfigError:
        return False
    return is_train_config(data) or is_samples_list(data)


def read_sample_prompts(path: str | os.PathLike[str], family: str | None = None) -> list[SamplePrompt]:
    """The enabled samples of a TrainConfig or samples file as sample prompts, with OneTrainer's per-family
    defaults (``SampleConfig._get_model_defaults``) for the config's ``model_type``, or for a bare samples file
    the ``family`` of the model being trained (OneTrainer always reads its samples for a known model; unknown,
    SampleConfig's model-less defaults); on Flux ``cfg_scale`` is the embedded guidance (its FluxSampler), and a
    sample with ``random_seed`` gets sdcore's seed for its position. A ``sample_inpainting`` sample carries its
    ``base_image_path`` and ``mask_image_path`` (resolved as OneTrainer's other relative paths are) for an
    inpainting model to fill (:func:`_inpainting_files`)."""
    from .sample_prompts import ONETRAINER, SamplePrompt, sampler_name

    p = Path(path).expanduser()
    entries, model_type = _samples_of(_read_json(p), p)
    if model_type is not None:
        family = FAMILIES.get(model_type)
    elif family not in SAMPLE_MODEL_DEFAULTS:
        family = None
    width, height, steps, cfg, scheduler = SAMPLE_MODEL_DEFAULTS[family]
    prompts: list[SamplePrompt] = []
    for i, e in enumerate(entries):
        where = f"{p} sample {i + 1}"
        if not isinstance(e, dict):
            raise ConfigError(f"{where}: each sample is an object")
        unknown = [f"{k!r}{nearest_field(k, SAMPLE_FIELDS)}" for k in e if k not in SAMPLE_FIELDS]
        if unknown:
            raise ConfigError(f"{where}: unknown OneTrainer sample field(s): {', '.join(unknown)}")
        if not e.get("enabled", True):
            continue
        if not isinstance(e.get("prompt"), str) or not e["prompt"].strip():
            raise ConfigError(f"{where}: the prompt is empty")
        scale = float(e.get("cfg_scale", cfg))
        sampler: str | None = None
        ignored: tuple[str, ...] = ()
        if family in (None, "sd1", "sd2", "sdxl"):
            chosen = _text(e.get("noise_scheduler", scheduler))
            if chosen in SAMPLERS:
                sampler = sampler_name(SAMPLERS[chosen])
            else:
                ignored = (f"noise_scheduler {chosen} (sdcore has no such sampler; the run's sampler is used)",)
        files, notes = _inpainting_files(e, model_type, family, p, where)
        prompts.append(
            SamplePrompt(
                prompt=e["prompt"],
                negative=str(e.get("negative_prompt", SAMPLE_NEGATIVE_DEFAULTS.get(family, ""))),
                width=int(e.get("width", width)),
                height=int(e.get("height", height)),
                steps=int(e.get("diffusion_steps", steps)),
                seed=None if e.get("random_seed") else int(e.get("seed", 42)),
                cfg=None if family == "flux" else scale,
                guidance=scale if family == "flux" else None,
                sampler=sampler,
                ignored=(*ignored, *notes),
                inpaint_image=files[0] if files else None,
                inpaint_mask=files[1] if files else None,
                source=ONETRAINER,
            )
        )
    return prompts


def _inpainting_files(entry: dict[str, Any], model_type: str | None, family: str | None, path: Path,
                      where: str) -> tuple[tuple[str, str] | None, tuple[str, ...]]:  # fmt: skip
    """A ``sample_inpainting`` sample's ``(base image, mask)`` paths and its notes. OneTrainer's samplers read
    the fields only on a model with the conditioning-image input (``has_conditioning_image_input``): on another
    ``model_type`` they are left out, as OneTrainer leaves them. On SDXL OneTrainer starts the sample one step in,
    from the masked image's latent noised to that step (its StableDiffusionXLSampler); sdcore denoises it from the
    seed's noise over every step, as OneTrainer's SD 1.5/2.x sampler does (a note says so)."""
    from ..data.onetrainer import resolve_path

    if not entry.get("sample_inpainting"):
        return None, ()
    if model_type is not None and model_type not in INPAINTING_TYPES:
        return None, (f"sample_inpainting (OneTrainer reads base_image_path and mask_image_path only on an "
                      f"inpainting model; {model_type} renders the sample from text)",)  # fmt: skip
    base, mask = _text(entry.get("base_image_path")).strip(), _text(entry.get("mask_image_path")).strip()
    if not base or not mask:
        missing = " and ".join(name for name, value in (("base_image_path", base), ("mask_image_path", mask))
                               if not value)  # fmt: skip
        raise ConfigError(f"{where}: sample_inpainting needs {missing} (the image to fill and its mask)")
    notes: tuple[str, ...] = ()
    if family == "sdxl":
        notes = ("sample_inpainting's SDXL start (OneTrainer skips the first step and starts from the masked "
                 "image's noised latent; sdcore denoises from the seed's noise over every step)",)  # fmt: skip
    return (str(resolve_path(base, path)), str(resolve_path(mask, path))), notes


__all__ = [
    "DEFAULTS",
    "FAMILIES",
    "METHODS",
    "is_sample_source",
    "is_samples_list",
    "is_train_config",
    "read_sample_prompts",
    "read_train_config",
    "translate_config",
]

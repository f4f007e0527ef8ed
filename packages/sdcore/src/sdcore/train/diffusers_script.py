"""A diffusers example-script command (a shell file or a text file) as sdcore options.

Many users start from the shell file a diffusers example or blog post gives: ``export MODEL_NAME=...`` lines and
one ``accelerate launch train_dreambooth_lora_flux.py --pretrained_model_name_or_path=$MODEL_NAME ...`` command.
``sdcore train lora --config train.sh`` (or ``sdcore train dreambooth`` for the full fine-tune scripts) reads it:
:func:`read_command` finds the command (line continuations joined, ``VAR=value``/``export VAR=value`` lines and the
environment substituted for ``$VAR``/``${VAR}``, then split as the shell splits words), :func:`translate_command`
turns each argument into sdcore's option with the script's own DEFAULTS where the command leaves one out and they
differ from sdcore's (LoRA rank 4, the FLUX.1 script's ``lora_alpha`` 4, ``lr_warmup_steps`` 500, its target
modules, its timestep drawing, its AdamW weight decay, ...). ``--data`` is the command file itself: its instance
folder with every image captioned with ``--instance_prompt`` (the scripts read no caption files), and with
``--with_prior_preservation`` a LoRA run's class folder with ``--class_prompt`` (:func:`load_datasets`).

Every default below cites the script line it comes from: diffusers ``examples/`` at commit 58eb52c (Apache-2.0).
An argument is translated, noted (logging, hub, precision bookkeeping: no effect on what is learned here) or a
problem naming it (it would change what trains and sdcore cannot do it); all problems come at once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError
from .aitoolkit import JobTranslation
from .field_tables import drop_foreign_options
from .field_tables import nearest_field as _nearest
from .shell_command import COMMAND_SUFFIXES, ambiguous_option, command_lines, is_option_word, resolve_option

if TYPE_CHECKING:
    from ..data.dataset import SubsetOptions
    from .options import TrainOptions
    from .sample_prompts import SamplePrompt


@dataclass(frozen=True)
class Script:
    """One diffusers training script: the family it trains, the sdcore command that trains the same thing
    (``lora``/``dreambooth``), its dataset kind (``dreambooth``: instance/class folders, ``text_to_image``: a
    hub dataset or an imagefolder, ``control``: a JSONL) and its defaults that differ between scripts
    (``name: (value, line)``)."""

    family: str
    method: str
    kind: str
    defaults: dict[str, tuple[Any, int]]


def _d(**values: tuple[Any, int]) -> dict[str, tuple[Any, int]]:
    return values


#: the scripts sdcore translates (examples/dreambooth, examples/text_to_image, examples/flux-control) with their
#: per-script defaults, each (value, line of its ``parser.add_argument`` call in that script)
SCRIPTS: dict[str, Script] = {
    "train_dreambooth_lora_flux.py": Script("flux", "lora", "dreambooth", _d(
        rank=(4, 375), lora_alpha=(4, 381), learning_rate=(1e-4, 489), guidance_scale=(3.5, 496),
        max_sequence_length=(512, 348), weighting_scheme=("none", 542), adam_weight_decay=(1e-4, 588),
        adam_weight_decay_text_encoder=(1e-3, 590),
        train_batch_size=(4, 440), num_train_epochs=(1, 446), resolution=(512, 412), validation_epochs=(50, 366),
        output_dir=("flux-dreambooth-lora", 405), lr_warmup_steps=(500, 524), checkpointing_steps=(500, 453))),
    "train_dreambooth_lora_sd3.py": Script("sd3", "lora", "dreambooth", _d(
        rank=(4, 365), learning_rate=(1e-4, 475), max_sequence_length=(77, 338), weighting_scheme=("logit_normal", 521),
        adam_weight_decay=(1e-4, 573), adam_weight_decay_text_encoder=(1e-3, 575), train_batch_size=(4, 426),
        num_train_epochs=(1, 432), resolution=(512, 397),
        validation_epochs=(50, 356), output_dir=("sd3-dreambooth", 390), lr_warmup_steps=(500, 503),
        checkpointing_steps=(500, 439), precondition_outputs=(1, 540))),
    "train_dreambooth_lora_sdxl.py": Script("sdxl", "lora", "dreambooth", _d(
        rank=(4, 657), learning_rate=(1e-4, 490), adam_weight_decay=(1e-4, 572),
        adam_weight_decay_text_encoder=(1e-3, 574), train_batch_size=(4, 441),
        num_train_epochs=(1, 447), resolution=(1024, 413), validation_epochs=(50, 370),
        output_dir=("lora-dreambooth-model", 401), lr_warmup_steps=(500, 526), checkpointing_steps=(500, 454))),
    "train_dreambooth_lora.py": Script("sd1", "lora", "dreambooth", _d(
        rank=(4, 526), learning_rate=(5e-4, 389), adam_weight_decay=(1e-2, 433), train_batch_size=(4, 340),
        num_train_epochs=(1, 346), resolution=(512, 317), validation_epochs=(50, 285),
        output_dir=("lora-dreambooth-model", 310), lr_warmup_steps=(500, 410), checkpointing_steps=(500, 353))),
    "train_dreambooth_flux.py": Script("flux", "dreambooth", "dreambooth", _d(
        learning_rate=(1e-4, 455), guidance_scale=(3.5, 462), max_sequence_length=(77, 328),
        weighting_scheme=("none", 508), adam_weight_decay=(1e-4, 554),
        adam_weight_decay_text_encoder=(1e-3, 556), train_batch_size=(4, 406),
        num_train_epochs=(1, 412), resolution=(512, 378), validation_epochs=(50, 346),
        output_dir=("flux-dreambooth", 371), lr_warmup_steps=(500, 490), checkpointing_steps=(500, 419))),
    "train_dreambooth_sd3.py": Script("sd3", "dreambooth", "dreambooth", _d(
        learning_rate=(1e-4, 441), max_sequence_length=(77, 314), weighting_scheme=("logit_normal", 487),
        adam_weight_decay=(1e-4, 539), adam_weight_decay_text_encoder=(1e-3, 541), train_batch_size=(4, 392),
        num_train_epochs=(1, 398), resolution=(512, 364),
        validation_epochs=(50, 332), output_dir=("sd3-dreambooth", 357), lr_warmup_steps=(500, 469),
        checkpointing_steps=(500, 405), precondition_outputs=(1, 506))),
    "train_dreambooth.py": Script("sd1", "dreambooth", "dreambooth", _d(
        learning_rate=(5e-6, 388), adam_weight_decay=(1e-2, 432), train_batch_size=(4, 333),
        num_train_epochs=(1, 339), resolution=(512, 310), validation_steps=(100, 481),
        output_dir=("dreambooth-model", 303), lr_warmup_steps=(500, 409), checkpointing_steps=(500, 346))),
    "train_text_to_image_lora.py": Script("sd1", "lora", "text_to_image", _d(
        rank=(4, 420), learning_rate=(1e-4, 293), adam_weight_decay=(1e-2, 345), train_batch_size=(16, 272),
        num_train_epochs=(100, 275), resolution=(512, 249), validation_epochs=(1, 218),
        output_dir=("sd-model-finetuned-lora", 236), lr_warmup_steps=(500, 314), checkpointing_steps=(500, 392))),
    "train_text_to_image_lora_sdxl.py": Script("sdxl", "lora", "text_to_image", _d(
        rank=(4, 472), learning_rate=(1e-4, 366), adam_weight_decay=(1e-2, 418), train_batch_size=(16, 320),
        num_train_epochs=(100, 323), resolution=(1024, 292), validation_epochs=(1, 261),
        output_dir=("sd-model-finetuned-lora", 279), lr_warmup_steps=(500, 387), checkpointing_steps=(500, 330))),
    # the full fine-tunes of examples/text_to_image: the UNet alone, sdcore train dreambooth without prior images
    "train_text_to_image.py": Script("sd1", "dreambooth", "text_to_image", _d(
        learning_rate=(1e-4, 333), adam_weight_decay=(1e-2, 412), train_batch_size=(16, 312),
        num_train_epochs=(100, 315), resolution=(512, 289), validation_epochs=(5, 487),
        output_dir=("sd-model-finetuned", 276), lr_warmup_steps=(500, 354), checkpointing_steps=(500, 459))),
    "train_text_to_image_sdxl.py": Script("sdxl", "dreambooth", "text_to_image", _d(
        learning_rate=(1e-4, 317), adam_weight_decay=(1e-2, 419), train_batch_size=(16, 271),
        num_train_epochs=(100, 274), resolution=(1024, 248), validation_epochs=(1, 211),
        output_dir=("sdxl-model-finetuned", 235), lr_warmup_steps=(500, 338), checkpointing_steps=(500, 281))),
    "train_control_lora_flux.py": Script("flux", "lora", "control", _d(
        rank=(4, 321), learning_rate=(5e-6, 353), guidance_scale=(30.0, 542), weighting_scheme=("none", 558),
        adam_weight_decay=(1e-2, 398), train_batch_size=(4, 278), num_train_epochs=(1, 281), resolution=(1024, 269),
        validation_steps=(100, 516), output_dir=("control-lora", 256), lr_warmup_steps=(500, 374),
        checkpointing_steps=(500, 288))),
}  # fmt: skip
#: the arguments each script's argparse defines (its ``parser.add_argument("--...")`` calls at 58eb52c): one
#: it does not define stops the script with "unrecognized arguments", so the command is refused
_ALL_SCRIPTS_ARGS = (
    "adam_beta1 adam_beta2 adam_epsilon adam_weight_decay allow_tf32 checkpointing_steps "
    "checkpoints_total_limit dataloader_num_workers gradient_accumulation_steps gradient_checkpointing "
    "hub_model_id hub_token learning_rate logging_dir lr_scheduler lr_warmup_steps max_grad_norm "
    "max_train_steps mixed_precision num_train_epochs num_validation_images output_dir "
    "pretrained_model_name_or_path push_to_hub report_to resolution resume_from_checkpoint revision scale_lr "
    "seed train_batch_size use_8bit_adam validation_prompt variant"
)
#: train_text_to_image.py's arguments: --validation_prompts (nargs="+"), no --validation_prompt/--num_validation_images
_TEXT_TO_IMAGE_ARGS = (
    "adam_beta1 adam_beta2 adam_epsilon adam_weight_decay allow_tf32 cache_dir caption_column center_crop "
    "checkpointing_steps checkpoints_total_limit dataloader_num_workers dataset_config_name dataset_name "
    "dream_detail_preservation dream_training enable_xformers_memory_efficient_attention foreach_ema "
    "gradient_accumulation_steps gradient_checkpointing hub_model_id hub_token image_column "
    "image_interpolation_mode input_perturbation learning_rate local_rank logging_dir lr_scheduler "
    "lr_warmup_steps max_grad_norm max_train_samples max_train_steps mixed_precision noise_offset "
    "non_ema_revision num_train_epochs offload_ema output_dir prediction_type pretrained_model_name_or_path "
    "push_to_hub random_flip report_to resolution resume_from_checkpoint revision scale_lr seed snr_gamma "
    "tracker_project_name train_batch_size train_data_dir use_8bit_adam use_ema validation_epochs "
    "validation_prompts variant"
)
SCRIPT_ARGS: dict[str, frozenset[str]] = {
    "train_dreambooth_lora_flux.py": frozenset((_ALL_SCRIPTS_ARGS + " " + (
        "adam_weight_decay_text_encoder cache_dir cache_latents caption_column center_crop class_data_dir "
        "class_prompt dataset_config_name dataset_name enable_npu_flash_attention guidance_scale image_column "
        "instance_data_dir instance_prompt local_rank logit_mean logit_std lora_alpha lora_dropout lora_layers "
        "lr_num_cycles lr_power max_sequence_length mode_scale num_class_images optimizer "
        "prior_generation_precision prior_loss_weight prodigy_beta3 prodigy_decouple prodigy_safeguard_warmup "
        "prodigy_use_bias_correction random_flip rank repeats sample_batch_size text_encoder_lr "
        "train_text_encoder upcast_before_saving validation_epochs weighting_scheme with_prior_preservation"
    )).split()),
    "train_dreambooth_lora_sd3.py": frozenset((_ALL_SCRIPTS_ARGS + " " + (
        "adam_weight_decay_text_encoder cache_dir cache_latents caption_column center_crop class_data_dir "
        "class_prompt dataset_config_name dataset_name image_column instance_data_dir instance_prompt "
        "local_rank logit_mean logit_std lora_blocks lora_dropout lora_layers lr_num_cycles lr_power "
        "max_sequence_length mode_scale num_class_images optimizer precondition_outputs "
        "prior_generation_precision prior_loss_weight prodigy_beta3 prodigy_decouple prodigy_safeguard_warmup "
        "prodigy_use_bias_correction random_flip rank repeats sample_batch_size text_encoder_lr "
        "train_text_encoder upcast_before_saving validation_epochs weighting_scheme with_prior_preservation"
    )).split()),
    "train_dreambooth_lora_sdxl.py": frozenset((_ALL_SCRIPTS_ARGS + " " + (
        "adam_weight_decay_text_encoder cache_dir caption_column center_crop class_data_dir class_prompt "
        "dataset_config_name dataset_name do_edm_style_training enable_xformers_memory_efficient_attention "
        "image_column image_interpolation_mode instance_data_dir instance_prompt local_rank lora_dropout "
        "lr_num_cycles lr_power num_class_images optimizer output_kohya_format "
        "pretrained_vae_model_name_or_path prior_generation_precision prior_loss_weight prodigy_beta3 "
        "prodigy_decouple prodigy_safeguard_warmup prodigy_use_bias_correction random_flip rank repeats "
        "sample_batch_size snr_gamma text_encoder_lr train_text_encoder use_dora validation_epochs "
        "with_prior_preservation"
    )).split()),
    "train_dreambooth_lora.py": frozenset((_ALL_SCRIPTS_ARGS + " " + (
        "center_crop class_data_dir class_labels_conditioning class_prompt "
        "enable_xformers_memory_efficient_attention image_interpolation_mode instance_data_dir instance_prompt "
        "local_rank lora_dropout lr_num_cycles lr_power num_class_images pre_compute_text_embeddings "
        "prior_generation_precision prior_loss_weight rank sample_batch_size text_encoder_use_attention_mask "
        "tokenizer_max_length tokenizer_name train_text_encoder validation_epochs validation_images "
        "with_prior_preservation"
    )).split()),
    "train_dreambooth_flux.py": frozenset((_ALL_SCRIPTS_ARGS + " " + (
        "adam_weight_decay_text_encoder cache_dir caption_column center_crop class_data_dir class_prompt "
        "dataset_config_name dataset_name enable_npu_flash_attention guidance_scale image_column "
        "image_interpolation_mode instance_data_dir instance_prompt local_rank logit_mean logit_std "
        "lr_num_cycles lr_power max_sequence_length mode_scale num_class_images optimizer "
        "prior_generation_precision prior_loss_weight prodigy_beta3 prodigy_decouple prodigy_safeguard_warmup "
        "prodigy_use_bias_correction random_flip repeats sample_batch_size text_encoder_lr train_text_encoder "
        "validation_epochs weighting_scheme with_prior_preservation"
    )).split()),
    "train_dreambooth_sd3.py": frozenset((_ALL_SCRIPTS_ARGS + " " + (
        "adam_weight_decay_text_encoder cache_dir caption_column center_crop class_data_dir class_prompt "
        "dataset_config_name dataset_name image_column instance_data_dir instance_prompt local_rank logit_mean "
        "logit_std lr_num_cycles lr_power max_sequence_length mode_scale num_class_images optimizer "
        "precondition_outputs prior_generation_precision prior_loss_weight prodigy_beta3 prodigy_decouple "
        "prodigy_safeguard_warmup prodigy_use_bias_correction random_flip repeats sample_batch_size "
        "text_encoder_lr train_text_encoder validation_epochs weighting_scheme with_prior_preservation"
    )).split()),
    "train_dreambooth.py": frozenset((_ALL_SCRIPTS_ARGS + " " + (
        "center_crop class_data_dir class_labels_conditioning class_prompt "
        "enable_xformers_memory_efficient_attention instance_data_dir instance_prompt local_rank lr_num_cycles "
        "lr_power num_class_images offset_noise pre_compute_text_embeddings prior_generation_precision "
        "prior_loss_weight sample_batch_size set_grads_to_none skip_save_text_encoder snr_gamma "
        "text_encoder_use_attention_mask tokenizer_max_length tokenizer_name train_text_encoder "
        "validation_images validation_scheduler validation_steps with_prior_preservation"
    )).split()),
    "train_text_to_image_lora.py": frozenset((_ALL_SCRIPTS_ARGS + " " + (
        "cache_dir caption_column center_crop dataset_config_name dataset_name "
        "enable_xformers_memory_efficient_attention image_column image_interpolation_mode local_rank "
        "max_train_samples noise_offset prediction_type random_flip rank snr_gamma train_data_dir "
        "validation_epochs"
    )).split()),
    "train_text_to_image_lora_sdxl.py": frozenset((_ALL_SCRIPTS_ARGS + " " + (
        "cache_dir caption_column center_crop dataset_config_name dataset_name debug_loss "
        "enable_npu_flash_attention enable_xformers_memory_efficient_attention image_column "
        "image_interpolation_mode local_rank max_train_samples noise_offset prediction_type "
        "pretrained_vae_model_name_or_path random_flip rank snr_gamma train_data_dir train_text_encoder "
        "validation_epochs"
    )).split()),
    "train_control_lora_flux.py": frozenset((_ALL_SCRIPTS_ARGS + " " + (
        "cache_dir caption_column conditioning_image_column dataset_config_name dataset_name gaussian_init_lora "
        "guidance_scale image_column jsonl_for_train log_dataset_samples logit_mean logit_std lora_layers "
        "lr_num_cycles lr_power max_train_samples mode_scale offload proportion_empty_prompts rank "
        "tracker_project_name train_norm_layers upcast_before_saving use_lora_bias validation_image "
        "validation_steps weighting_scheme"
    )).split()),
    "train_text_to_image.py": frozenset(_TEXT_TO_IMAGE_ARGS.split()),
    "train_text_to_image_sdxl.py": frozenset((_ALL_SCRIPTS_ARGS + " " + (
        "cache_dir caption_column center_crop dataset_config_name dataset_name enable_npu_flash_attention "
        "enable_xformers_memory_efficient_attention image_column image_interpolation_mode local_rank "
        "max_train_samples noise_offset prediction_type pretrained_vae_model_name_or_path "
        "proportion_empty_prompts random_flip snr_gamma timestep_bias_begin timestep_bias_end "
        "timestep_bias_multiplier timestep_bias_portion timestep_bias_strategy train_data_dir use_ema "
        "validation_epochs"
    )).split()),
}  # fmt: skip
#: the arguments each script declares with ``nargs="+"`` (a list of values up to the next option), at 58eb52c
NARGS: dict[str, frozenset[str]] = {
    "train_dreambooth.py": frozenset({"validation_images"}),  # :567
    "train_dreambooth_lora.py": frozenset({"validation_images"}),  # :517
    "train_control_lora_flux.py": frozenset({"validation_prompt", "validation_image"}),  # :491, :502
    "train_text_to_image.py": frozenset({"validation_prompts"}),  # :273
}
#: the same in every script that has the argument: (value, its line in train_dreambooth_lora_flux.py)
COMMON_DEFAULTS: dict[str, tuple[Any, int]] = {
    "rank": (4, 375), "lr_warmup_steps": (500, 524), "checkpointing_steps": (500, 453), "adam_beta1": (0.9, 574),
    "adam_beta2": (0.999, 577), "adam_epsilon": (1e-8, 602), "optimizer": ("AdamW", 561), "lr_scheduler": ("constant", 515),
    "lr_num_cycles": (1, 527), "lr_power": (1.0, 533), "max_grad_norm": (1.0, 622), "repeats": (1, 326),
    "num_class_images": (100, 396), "prior_loss_weight": (1.0, 395), "text_encoder_lr": (5e-6, 503),
    "logit_mean": (0.0, 549), "logit_std": (1.0, 552), "mode_scale": (1.29, 555), "gradient_accumulation_steps": (1, 478),
    "lora_dropout": (0.0, 387),
}  # fmt: skip

#: other diffusers example scripts, refused by name: the model families sdcore does not train, or what they train
_OTHER_FAMILY = "a model family sdcore does not train"
REFUSED_SCRIPTS: dict[str, str] = {
    **{f"train_dreambooth_lora_{name}.py": _OTHER_FAMILY for name in (
        "flux2", "flux2_img2img", "flux2_klein", "flux2_klein_img2img", "hidream", "lumina2", "qwen_image", "sana",
        "z_image", "ideogram4", "krea2")},
    "train_dreambooth_lora_flux_kontext.py": "FLUX.1 Kontext LoRA: use sdcore's Kontext training (docs/training.md) "
    "with a --control-dir of reference images",
    **{name: "an advanced/miniature variant (pivotal tuning or other extras) sdcore does not translate" for name in (
        "train_dreambooth_lora_flux_advanced.py", "train_dreambooth_lora_sdxl_advanced.py",
        "train_dreambooth_lora_sd15_advanced.py", "train_dreambooth_lora_flux_miniature.py",
        "train_dreambooth_lora_sd3_miniature.py")},
    **{name: "a ControlNet/adapter/other trainer sdcore does not have" for name in (
        "train_controlnet.py", "train_controlnet_flux.py", "train_controlnet_sd3.py", "train_controlnet_sdxl.py",
        "train_t2i_adapter_sdxl.py", "train_control_flux.py", "train_control_cogview4.py", "train_instruct_pix2pix.py",
        "train_instruct_pix2pix_sdxl.py", "train_instruct_pix2pix_lora.py", "train_custom_diffusion.py",
        "train_diffusion_dpo.py", "train_diffusion_dpo_sdxl.py", "train_dreambooth_inpaint.py", "train_dreambooth_inpaint_lora.py",
        "train_multi_subject_dreambooth.py", "train_lcm_distill_lora_sdxl.py", "train_unconditional.py",
        "train_amused.py", "train_cogvideox_lora.py")},
}  # fmt: skip

#: arguments without a value (``action="store_true"``) in these scripts
FLAGS = {
    "with_prior_preservation", "center_crop", "random_flip", "train_text_encoder", "gradient_checkpointing",
    "scale_lr", "use_8bit_adam", "push_to_hub", "allow_tf32", "cache_latents", "upcast_before_saving",
    "enable_npu_flash_attention", "enable_xformers_memory_efficient_attention", "use_dora", "use_lora_bias",
    "train_norm_layers", "gaussian_init_lora", "offload", "set_grads_to_none", "pre_compute_text_embeddings",
    "text_encoder_use_attention_mask", "skip_save_text_encoder", "output_kohya_format", "debug_loss",
    "log_dataset_samples", "do_edm_style_training", "offset_noise", "use_ema", "offload_ema", "foreach_ema",
    "dream_training",
}  # fmt: skip
#: accepted with a note: logging, the hub, devices, speed and memory (the value does not change what is learned)
NOTED = {
    "revision": "the hub", "variant": "the hub", "cache_dir": "the hub cache", "push_to_hub": "sdcore does not upload",
    "hub_token": "sdcore does not upload", "hub_model_id": "sdcore does not upload", "logging_dir": "logging",
    "report_to": "logging (sdcore logs with --log-dir)", "allow_tf32": "speed", "dataloader_num_workers": "data loading",
    "local_rank": "accelerate sets it", "enable_npu_flash_attention": "attention kernel",
    "enable_xformers_memory_efficient_attention": "attention kernel", "sample_batch_size": "class image generation",
    "prior_generation_precision": "class image generation", "cache_latents": "sdcore caches latents by default",
    "upcast_before_saving": "precision bookkeeping (sdcore saves in --save-dtype)",
    "offload": "memory: with cached latents and text-encoder outputs the VAE and text encoders leave the device",
    "set_grads_to_none": "speed", "tracker_project_name": "logging", "num_validation_images": "sdcore samples one "
    "image per prompt", "resume_from_checkpoint": "give sdcore's --resume", "log_dataset_samples": "logging",
    "dataset_config_name": "the hub", "gaussian_init_lora": "initialisation only (sdcore: kaiming-uniform lora_A, "
    "zero lora_B; PEFT's gaussian init also starts from a zero change)",
    "pre_compute_text_embeddings": "sdcore caches frozen text-encoder outputs",
    "skip_save_text_encoder": "what is saved", "debug_loss": "logging",
    "foreach_ema": "speed (torch._foreach EMA update, same values)",
    "non_ema_revision": "the hub (the revision of the trained UNet's start)",
}  # fmt: skip
#: refused unless at the script's default: what trains would change, and sdcore has no counterpart
REFUSED = {
    "class_labels_conditioning": "sdcore does not condition on class labels",
    "do_edm_style_training": "sdcore has no EDM-style training",
    "text_encoder_use_attention_mask": "sdcore encodes SD1/SD2 prompts without CLIP's attention mask",
    "tokenizer_max_length": "sdcore pads CLIP prompts to 77 tokens",
    "max_train_samples": "sdcore trains on every image (the script keeps a seeded shuffle's first N: copy those "
    "into a folder)",
    "dream_training": "sdcore has no DREAM training (arXiv 2312.00210's extra forward pass); train without it",
    "output_kohya_format": "a second file in kohya's names (sdcore's SD/SDXL LoRA is already in kohya's names)",
}  # fmt: skip
#: every argument :func:`translate_command` turns into sdcore options
HANDLED = {
    "pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "dataset_name", "instance_data_dir",
    "train_data_dir", "jsonl_for_train", "image_column", "conditioning_image_column", "caption_column",
    "instance_prompt", "class_data_dir", "class_prompt", "with_prior_preservation", "num_class_images",
    "prior_loss_weight", "repeats", "resolution", "center_crop", "random_flip", "image_interpolation_mode", "rank",
    "lora_alpha", "lora_dropout", "lora_layers", "lora_blocks", "use_dora", "use_lora_bias", "train_norm_layers",
    "train_text_encoder", "text_encoder_lr", "learning_rate", "scale_lr", "train_batch_size",
    "gradient_accumulation_steps", "max_train_steps", "num_train_epochs", "lr_scheduler", "lr_warmup_steps",
    "lr_num_cycles", "lr_power", "optimizer", "use_8bit_adam", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_weight_decay_text_encoder", "adam_epsilon", "prodigy_beta3", "prodigy_decouple",
    "prodigy_use_bias_correction", "prodigy_safeguard_warmup", "max_grad_norm", "mixed_precision",
    "gradient_checkpointing", "seed", "guidance_scale", "max_sequence_length", "weighting_scheme", "logit_mean",
    "logit_std", "mode_scale", "precondition_outputs", "snr_gamma", "noise_offset", "prediction_type",
    "validation_prompt", "validation_epochs", "validation_steps", "validation_image", "checkpointing_steps",
    "checkpoints_total_limit", "output_dir", "proportion_empty_prompts", "use_ema", "offload_ema",
    "input_perturbation", "validation_prompts", "dream_detail_preservation", "timestep_bias_strategy",
    "timestep_bias_multiplier", "timestep_bias_begin", "timestep_bias_end", "timestep_bias_portion",
}  # fmt: skip
#: diffusers' get_scheduler names (src/diffusers/optimization.py) that sdcore's schedules share
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear", "polynomial", "cosine_with_restarts")
#: --weighting_scheme -> sdcore's --weighting-scheme (kohya's, which copied diffusers' compute_density_for_timestep_sampling)
WEIGHTING = {"none": "uniform", "logit_normal": "logit_normal", "mode": "mode", "sigma_sqrt": "sigma_sqrt",
             "cosmap": "cosmap"}  # fmt: skip
#: the scheduler shift of the models the scripts are written for (FlowMatchEulerDiscreteScheduler's scheduler_config:
#: stabilityai SD3 ``shift`` 3.0; FLUX.1 dev ``use_dynamic_shifting`` true, so the scripts' 1000-step table is unshifted)
FLOW_SHIFT = {"sd3": 3.0, "flux": 1.0}


@dataclass
class Command:
    """One diffusers command: its script (file name), its arguments (``name -> value``, ``True`` for a flag), the
    ``accelerate launch`` options before the script, and problems met while reading it."""

    script: str
    args: dict[str, Any] = field(default_factory=dict)
    launch: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    path: str = ""
    notes: list[str] = field(default_factory=list)
    #: prefixes of several arguments (already a problem: argparse's "ambiguous option")
    ambiguous: set[str] = field(default_factory=set)


def _script_of(words: list[str]) -> int | None:
    for i, word in enumerate(words):
        if word.endswith(".py") and Path(word).name.startswith("train"):
            return i
    return None


def read_command(path: str | os.PathLike[str]) -> Command | None:
    """The diffusers command in ``path``, or ``None`` when the file names no diffusers training script (a ``.sh``
    file naming an unknown one is returned, so that its translation says so)."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in (*COMMAND_SUFFIXES, ".txt", ""):
        return None
    shell_file = p.suffix.lower() in COMMAND_SUFFIXES
    for line in command_lines(p):
        words = line.words
        at = _script_of(words)
        if at is None:
            continue  # another command (mkdir -p $(dirname ...)): not what sdcore reads
        script = Path(words[at]).name
        if script not in SCRIPTS and script not in REFUSED_SCRIPTS and not shell_file:
            return None
        command = Command(script, path=str(p))
        command.launch = _parse_args(words[:at], command, launcher=True)
        command.args = _parse_args(words[at + 1 :], command, launcher=False)
        command.notes += line.joined_note(p)
        if line.missing:
            command.problems.append(f"{p}: variable(s) not set: {', '.join(sorted(set(line.missing)))}")
        if line.unsupported:
            command.problems.append(f"{p}: shell expansion(s) sdcore does not run: {', '.join(line.unsupported)} "
                                    "(write the value)")  # fmt: skip
        return command
    if shell_file:
        raise ConfigError(f"{p}: no diffusers or kohya training script (train_*.py) is run in this file")
    return None


def _full_name(name: str, script: str, command: Command) -> str:
    """``name`` as the script's argparse resolves it (:func:`.shell_command.resolve_option`: ``--res 512`` is
    ``--resolution``); a prefix of several is argparse's "ambiguous option" error."""
    full, candidates = resolve_option(name, SCRIPT_ARGS.get(script))
    if candidates:
        command.ambiguous.add(name)
        command.problems.append(ambiguous_option(command.path, name, candidates, script))
    return full


def _parse_args(words: list[str], command: Command, *, launcher: bool) -> dict[str, Any]:
    """The words after the script (or, ``launcher``, accelerate's before it) as argparse reads them: a unique prefix
    is its argument, a ``nargs="+"`` argument takes every value up to the next option (a list), others one value
    (further words are "unrecognized arguments"). A script sdcore refuses by name is read leniently (every
    value taken): it is refused for what it is, not for its words."""
    out: dict[str, Any] = {}
    known = not launcher and command.script in SCRIPTS
    lists = NARGS.get(command.script, frozenset()) if known else frozenset()
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("--"):
            if known:
                command.problems.append(f"{command.path}: {word!r}: not an argument of {command.script}")
            continue
        name, eq, value = word[2:].partition("=")
        name = name.replace("-", "_")
        if known:
            name = _full_name(name, command.script, command)
        value_: Any
        if eq:
            value_ = value
        elif name in FLAGS or i >= len(words) or is_option_word(words[i]):
            value_ = True
        else:
            value_ = words[i]
            i += 1
        if name in lists or not (known or launcher or name in FLAGS):
            taken = [] if value_ is True else [value_]
            # --name=value is the whole of a nargs="+" argument: argparse matches its explicit value alone, so
            # further words are "unrecognized arguments" (a known script's loop reports them)
            while i < len(words) and not is_option_word(words[i]) and not (eq and name in lists):
                taken.append(words[i])
                i += 1
            if name in lists and not taken:
                command.problems.append(f"{command.path}: --{name}: expected at least one argument")
            value_ = taken if name in lists else (taken[0] if len(taken) == 1 else taken or True)
        if name in out and not launcher:  # argparse keeps the last (kohya command files read alike)
            command.notes.append(f"{command.path}: --{name} is given twice: the last one counts (as in argparse)")
        out[name] = value_
    return out


def is_command_file(path: str | os.PathLike[str]) -> bool:
    try:
        return read_command(path) is not None
    except ConfigError:
        return Path(path).suffix.lower() in COMMAND_SUFFIXES


class _Args:
    """The command's arguments with the script's defaults and argparse's types; what was read is remembered."""

    def __init__(self, command: Command, script: Script, where: str, out: JobTranslation) -> None:
        self.c, self.s, self.where, self.out = command, script, where, out

    def given(self, name: str) -> bool:
        return name in self.c.args

    def default(self, name: str) -> tuple[Any, int]:
        return self.s.defaults.get(name) or COMMON_DEFAULTS.get(name) or (None, 0)

    def raw(self, name: str) -> Any:
        return self.c.args[name] if name in self.c.args else self.default(name)[0]

    def num(self, name: str, kind: type) -> Any:
        value = self.raw(name)
        if isinstance(value, list):
            self.out.problems.append(f"{self.where}: --{name} takes one value, got {len(value)}")
            return None
        if value is None or value is True:
            if value is True:
                self.out.problems.append(f"{self.where}: --{name} needs a value")
            return None
        try:
            return kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
        except ValueError:
            self.out.problems.append(f"{self.where}: --{name} {value!r} is not a {kind.__name__}")
            return None

    def flag(self, name: str) -> bool:
        value = self.c.args.get(name, False)
        return value is True or str(value).lower() in ("1", "true")

    def text(self, name: str) -> str | None:
        value = self.raw(name)
        if isinstance(value, list):  # a nargs="+" argument read where one value is meant: its first
            return str(value[0]) if value else None
        return None if value is None or value is True else str(value)

    def texts(self, name: str) -> list[str]:
        """A ``nargs="+"`` argument's values (one value is a list of one)."""
        value = self.raw(name)
        if value is None or value is True:
            return []
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _opt_args(args: dict[str, Any]) -> str:
    def one(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    return " ".join(f"{k}={one(v)}" for k, v in args.items())


def translate_command(
    command: Command, fields: list[str], *, where: str, path: str | os.PathLike[str]
) -> JobTranslation:
    """sdcore option values for ``command`` (``fields``: the method's option names), with notes and problems."""
    out = JobTranslation()
    out.problems += command.problems
    out.notes += command.notes
    w = f"{where}: {command.script}"
    script = SCRIPTS.get(command.script)
    if script is None:
        reason = REFUSED_SCRIPTS.get(command.script, "not a diffusers script sdcore reads")
        out.problems.append(f"{w}: {reason} (sdcore reads {', '.join(SCRIPTS)})")
        return out
    method = "dreambooth" if "instance_prompt" in fields and "rank" not in fields else "lora"
    if method != script.method:
        right = "sdcore train dreambooth" if script.method == "dreambooth" else "sdcore train lora"
        out.problems.append(f"{w} trains {'a full fine-tune' if script.method == 'dreambooth' else 'a LoRA'}: "
                            f"run it with {right} --config {path}")  # fmt: skip
        return out
    a = _Args(command, script, w, out)
    v = out.values
    known = HANDLED | set(NOTED) | set(REFUSED)
    defined = SCRIPT_ARGS[command.script]
    undefined = [
        f"--{k}{_nearest(k, defined)}" for k in command.args if k not in defined and k not in command.ambiguous
    ]
    if undefined:
        out.problems.append(f"{w}: {', '.join(undefined)}: not argument(s) of {command.script} (its argparse stops "
                            "with 'unrecognized arguments')")  # fmt: skip
    unknown = [f"--{k}{_nearest(k, known)}" for k in command.args if k in defined and k not in known]
    if unknown:
        out.problems.append(f"{w}: unknown or unsupported argument(s): {', '.join(unknown)}")
    for name in command.args:
        if name in NOTED:
            out.notes.append(f"{w}: --{name} accepted, no effect on the result here ({NOTED[name]})")
        elif name in REFUSED and command.args[name] not in (None, False):
            out.problems.append(f"{w}: --{name}: {REFUSED[name]}")
    for name in ("num_processes", "num_machines", "multi_gpu", "config_file", "main_process_port"):
        if name in command.launch:
            out.notes.append(f"{where}: accelerate launch --{name}: run sdcore under accelerate launch for that")
    family = script.family
    flow = family in ("flux", "sd3")

    # the model
    if a.given("pretrained_model_name_or_path"):
        v["model"] = a.text("pretrained_model_name_or_path")
    else:
        out.needs["model"] = f"{w}: --pretrained_model_name_or_path is needed (or give sdcore's --model)"
    if a.given("pretrained_vae_model_name_or_path"):
        v["vae"] = a.text("pretrained_vae_model_name_or_path")
    if a.given("prediction_type"):
        # train_text_to_image*.py: noise_scheduler.register_to_config(prediction_type=...) before each step's
        # target, so the run trains it whatever the model's scheduler says; any other value stops the first
        # step ("Unknown prediction type")
        chosen = a.text("prediction_type")
        if chosen in ("epsilon", "v_prediction"):
            v["prediction_type"] = chosen
        else:
            out.problems.append(f"{w}: --prediction_type {chosen}: the script trains epsilon or v_prediction only")

    _data(a, script, method, path, w, out)
    _network(a, script, method, w, out)
    _schedule(a, script, method, w, out)
    _objective(a, script, flow, w, out)
    _fine_tune(a, w, out)

    # sampling and saving
    prompts = validation_prompts(command)
    if prompts:
        if any(" --" in f" {prompt}" for prompt in prompts):
            out.problems.append(f"{w}: a validation prompt holds ' --': give --sample-prompts a prompt file")
        # several prompts (nargs="+"): the command file itself, read back by read_sample_prompts
        v["sample_prompts"] = prompts[0] if len(prompts) == 1 else str(path)
        if script.kind == "control" or command.script == "train_dreambooth.py":
            v["sample_every"] = a.num("validation_steps", int)
        else:
            v["sample_every_epochs"] = a.num("validation_epochs", int)
        if a.given("validation_image"):
            out.problems.append(
                f"{w}: --validation_image: write a --sample-prompts file with one '... --cn IMAGE' line"
            )
    v["save_every"] = a.num("checkpointing_steps", int)
    limit = a.num("checkpoints_total_limit", int)
    if limit is None:  # None in the scripts: keep every checkpoint
        v["save_limit"] = 0
    else:
        # the scripts delete len(checkpoints) - limit + 1 of the oldest before each save when len >= limit
        # (train_dreambooth_lora_flux.py:1869-1876), so a limit of 0 or less deletes them all and keeps the newest
        v["save_limit"] = v["keep_states"] = max(limit, 1)
        if limit < 1:
            out.notes.append(f"{w}: --checkpoints_total_limit {limit}: the script removes every earlier checkpoint "
                             "before each save, keeping the newest: --save-limit 1")  # fmt: skip
    output = a.text("output_dir") or ""
    if method == "lora":  # save_lora_weights' file name
        v["output"] = str(Path(output) / "pytorch_lora_weights.safetensors")
    else:
        v["output"] = output
        v["save_format"] = "diffusers"  # save_pretrained of the pipeline
        if script.kind == "text_to_image":  # the trained fp32 UNet saved as it is (train_text_to_image.py:1121-1133)
            v["save_dtype"] = "fp32"
    if a.given("seed"):
        v["seed"] = a.num("seed", int)
    else:
        out.notes.append(f"{w}: no --seed: the script runs unseeded, sdcore uses --seed 42")
    mixed = a.text("mixed_precision") or command.launch.get("mixed_precision")
    if mixed:
        if mixed not in ("no", "fp16", "bf16"):
            out.problems.append(f"{w}: --mixed_precision {mixed!r}: choose no, fp16 or bf16")
        else:
            v["mixed_precision"] = mixed
            out.notes.append(f"{w}: --mixed_precision {mixed}: the frozen weights in {mixed} and the trained ones in "
                             "fp32, as the script casts them (precision bookkeeping)")  # fmt: skip
    if a.flag("gradient_checkpointing"):
        v["gradient_checkpointing"] = True
    drop_foreign_options(v, fields, f"{where}: not options of this training method", out.problems)
    return out


def local_dataset(args: dict[str, Any]) -> Path | None:
    """``--dataset_name`` naming an existing folder: diffusers' ``load_dataset(folder)`` reads it as an imagefolder
    (its ``metadata.jsonl`` gives the columns), so it is data on this machine, not a hub id."""
    name = args.get("dataset_name")
    if not isinstance(name, str) or not name:
        return None
    folder = Path(name).expanduser()
    return folder if folder.is_dir() else None


def _data(a: _Args, script: Script, method: str, path: str | os.PathLike[str], w: str, out: JobTranslation) -> None:
    v = out.values
    local = local_dataset(a.c.args)
    if a.given("dataset_name") and local is None:
        out.problems.append(f"{w}: --dataset_name {a.text('dataset_name')!r} is a Hugging Face hub dataset (no such "
                            "folder here): sdcore works offline (download it and give its folder)")  # fmt: skip
    name = next(k for k, s in SCRIPTS.items() if s is script)
    # the SDXL full fine-tune encodes every image and caption once before training (dataset.map of
    # compute_vae_encodings / encode_prompt, train_text_to_image_sdxl.py:919-946): its flip, crop, caption choice and
    # empty prompt are drawn once per image for the run
    once = name == "train_text_to_image_sdxl.py"
    if script.kind == "control":
        v["control_lora"] = True
        if a.given("jsonl_for_train"):
            v["data"] = a.text("jsonl_for_train")
        elif local is not None:
            out.problems.append(f"{w}: --dataset_name {local}: give the rows as --jsonl_for_train (image, control "
                                "image and caption paths)")  # fmt: skip
        elif not a.given("dataset_name"):
            out.problems.append(f"{w}: --jsonl_for_train is needed (the image / control image / caption rows)")
        for column in ("image_column", "conditioning_image_column", "caption_column"):
            if a.given(column):
                v[column] = a.text(column)
    elif script.kind == "text_to_image":
        folder: Path | None = local
        if a.given("train_data_dir"):
            data_dir = Path(a.text("train_data_dir") or "").expanduser()
            # load_dataset(dataset_name, data_dir=train_data_dir): the folder inside the dataset's
            folder = data_dir if local is None or data_dir.is_absolute() else local / data_dir
        if folder is not None:
            _imagefolder(a, folder, once, w, out)
        elif not a.given("dataset_name"):
            out.problems.append(f"{w}: --train_data_dir or --dataset_name (a folder) is needed")
        v["buckets"] = False  # the scripts resize and crop every image to a --resolution square
    else:
        if a.given("instance_data_dir") or local is not None:
            v["data"] = str(path)  # load_datasets: the instance folder captioned with --instance_prompt
        elif not a.given("dataset_name"):
            out.problems.append(f"{w}: --instance_data_dir is needed")
        captions = local is not None and a.given("caption_column")
        if local is not None and a.given("instance_data_dir"):
            out.notes.append(f"{w}: --instance_data_dir is not read with --dataset_name (as in the script)")
        if captions and local is not None and not (local / "metadata.jsonl").is_file():
            out.problems.append(f"{w}: --caption_column {a.text('caption_column')!r}: {local} has no metadata.jsonl "
                                "to give that column (the script stops)")  # fmt: skip
        if not a.given("instance_prompt"):
            out.problems.append(f"{w}: --instance_prompt is needed (the caption of every instance image)")
        elif method == "dreambooth" and not captions:
            v["instance_prompt"] = a.text("instance_prompt")
        if a.given("caption_column") and local is None and not a.given("dataset_name"):
            out.notes.append(f"{w}: --caption_column is read only with --dataset_name: no effect")
        v["buckets"] = False
        _prior(a, method, w, out)
    if a.given("proportion_empty_prompts"):
        v["caption_dropout"] = a.num("proportion_empty_prompts", float)
        if once:
            out.notes.append(f"{w}: --proportion_empty_prompts: the script empties that share of the captions once "
                             "for the run; sdcore drops captions per use (--caption-dropout)")  # fmt: skip
        else:
            out.notes.append(f"{w}: --proportion_empty_prompts: sdcore drops captions per sample (--caption-dropout)")
    v["resolution"] = a.num("resolution", int)
    if script.kind == "control":  # train_control_lora_flux.py:681: Resize((resolution, resolution)), no crop
        out.notes.append(f"{w}: the script stretches the image and control image to a --resolution square; sdcore "
                         "resizes, crops and buckets them together")  # fmt: skip
    elif not a.flag("center_crop"):
        if name in PER_STEP_CROP:  # torchvision RandomCrop in __getitem__: a new crop each time
            v["random_crop"] = True
            v["cache_latents"] = False
        else:
            out.notes.append(f"{w}: no --center_crop: the script draws one random crop per image when it builds the "
                             "dataset (fixed for the run); sdcore crops at the centre")  # fmt: skip
    v["flip"] = a.flag("random_flip")
    if v["flip"] and name == "train_text_to_image_sdxl.py":
        out.notes.append(f"{w}: --random_flip: the script flips half the images once for the run (their latents are "
                         "computed before training); sdcore flips each use with probability 0.5")  # fmt: skip
    interpolation = a.text("image_interpolation_mode")
    if a.given("image_interpolation_mode"):
        v["resize_interpolation"] = interpolation
    if a.given("repeats"):
        v["dataset_repeats"] = a.num("repeats", int)


def _imagefolder(a: _Args, folder: Path, once: bool, w: str, out: JobTranslation) -> None:
    """A text_to_image script's imagefolder (``--train_data_dir``, or a local ``--dataset_name``)."""
    v = out.values
    if (folder / "metadata.jsonl").is_file():
        # load_dataset("imagefolder"): each row's file_name (relative to the folder) becomes the "image"
        # column, its other keys columns; --caption_column names the caption (train_text_to_image_lora.py:
        # 613-644). Read by sdcore's diffusers JSONL reader (sdcore.data.jsonl), no control image column.
        v["data"] = str(folder / "metadata.jsonl")
        v["image_column"] = "file_name"
        v["conditioning_image_column"] = ""
        v["caption_column"] = a.text("caption_column") or "text"
        if (a.text("image_column") or "image") != "image":
            out.problems.append(f"{w}: --image_column {a.text('image_column')!r}: an imagefolder's images are "
                                "its 'image' column (from metadata.jsonl's file_name); the script stops "
                                "on another")  # fmt: skip
        drawn = " (the script draws one per image once for the run, when it encodes them)" if once else ""
        out.notes.append(f"{w}: {folder}: images and captions from its metadata.jsonl; a row with a list of "
                         f"captions trains on one drawn at random each time{drawn}")  # fmt: skip
    else:
        if (folder / "metadata.csv").is_file():
            out.problems.append(f"{w}: {folder}: its metadata.csv captions are not read; write them as a "
                                "metadata.jsonl (file_name and caption keys) or give a .txt caption beside each "
                                "image")  # fmt: skip
        v["data"] = str(folder)
        out.notes.append(f"{w}: {folder} has no metadata.jsonl: captions from the .txt files beside the images "
                         "(the script's imagefolder would have no caption column)")  # fmt: skip


def _prior(a: _Args, method: str, w: str, out: JobTranslation) -> None:
    v = out.values
    names = ("class_data_dir", "class_prompt", "num_class_images", "prior_loss_weight")
    if not a.flag("with_prior_preservation"):
        given = [f"--{n}" for n in names if a.given(n)]
        if given:
            out.notes.append(f"{w}: {', '.join(given)} without --with_prior_preservation: not used (as in the script)")
        return
    if not a.given("class_data_dir") or not a.given("class_prompt"):
        out.problems.append(f"{w}: --with_prior_preservation needs --class_data_dir and --class_prompt")
        return
    v["prior_loss_weight"] = a.num("prior_loss_weight", float)
    wanted = a.num("num_class_images", int) or 0
    if method == "dreambooth":
        v["class_data"] = a.text("class_data_dir")
        v["class_prompt"] = a.text("class_prompt")
        v["num_class_images"] = wanted
    else:
        from ..data.images import is_image_path

        folder = Path(a.text("class_data_dir") or "").expanduser()
        have = sum(1 for f in folder.iterdir() if is_image_path(f)) if folder.is_dir() else 0
        if have < wanted:
            out.problems.append(
                f"{w}: --class_data_dir {folder} holds {have} of --num_class_images {wanted} images: the script "
                "generates the rest with the base model, sdcore's LoRA does not (generate them with sdcore train "
                "dreambooth's class images or lower --num_class_images)"
            )
    out.notes.append(f"{w}: class images are mixed into each epoch (kohya's way); the script pairs one with each "
                     "instance image in a batch")  # fmt: skip


#: scripts that crop each time an image is used (torchvision transforms in __getitem__, or the text_to_image
#: scripts' preprocess_train through dataset.with_transform: train_text_to_image_lora_sdxl.py:942-982); the others
#: draw one crop per image at dataset build, e.g. train_dreambooth_lora_flux.py:813-839
PER_STEP_CROP = {"train_dreambooth_lora.py", "train_dreambooth.py", "train_text_to_image_lora.py",
                 "train_text_to_image_lora_sdxl.py", "train_text_to_image.py"}  # fmt: skip
#: PEFT target modules of each LoRA script without --lora_layers (the file's line of the list)
TARGETS = {
    "train_dreambooth_lora_flux.py": (("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
        "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2"), 1257),
    "train_dreambooth_lora_sd3.py": (("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"), 1251),
    "train_dreambooth_lora_sdxl.py": (("to_k", "to_q", "to_v", "to_out.0"), 1225),
    "train_dreambooth_lora.py": (("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"), 945),
    "train_text_to_image_lora.py": (("to_k", "to_q", "to_v", "to_out.0"), 537),
    "train_text_to_image_lora_sdxl.py": (("to_k", "to_q", "to_v", "to_out.0"), 705),
}  # fmt: skip
#: --module-ranks rule leaving CLIP's MLP (fc1/fc2, kohya names lora_te[12]_..._mlp_fc1) out of a text-encoder LoRA:
#: the scripts adapt q_proj, k_proj, v_proj and out_proj only (train_dreambooth_lora_sdxl.py:1237,
#: train_dreambooth_lora.py:956, train_dreambooth_lora_sd3.py:1283, train_text_to_image_lora_sdxl.py:717)
TEXT_ENCODER_MLP_OFF = r"^lora_te\d?_.*_mlp_fc[12]$=0"
#: scripts whose LoRA alpha is ``--lora_alpha`` (the others pass lora_alpha=args.rank)
ALPHA_ARG = {"train_dreambooth_lora_flux.py"}


def peft_target_regex(names: list[str] | tuple[str, ...]) -> str:
    """One ``--layer-filter`` regex matching PEFT's list ``target_modules``: the module path or a path ending in
    ``.<name>``. One pattern for the whole list, because PEFT fails only when no name matches (a script's list may
    name modules the model lacks: train_dreambooth_lora.py:945's add_k_proj/add_v_proj on an SD1.5 UNet), while
    sdcore refuses each pattern that matches nothing."""
    return f"(^|\\.)({'|'.join(re.escape(name) for name in names)})$"


def _network(a: _Args, script: Script, method: str, w: str, out: JobTranslation) -> None:
    v = out.values
    if a.flag("train_text_encoder"):
        v["train_text_encoder"] = True
        if method == "lora":  # CLIP's PEFT target_modules q/k/v/out_proj (train_dreambooth_lora_flux.py:1287)
            v["module_ranks"] = TEXT_ENCODER_MLP_OFF
        rate = a.num("text_encoder_lr", float)
        if (a.text("optimizer") or "").lower() == "prodigy":  # the scripts give prodigy one rate
            rate = a.num("learning_rate", float)
        v["te_lr"] = rate
        # the scripts that have it give the text-encoder group its own decay, default 1e-3
        # (train_dreambooth_lora_flux.py:590, used at :1396)
        te_decay = a.num("adam_weight_decay_text_encoder", float)
        if te_decay is not None and te_decay != a.num("adam_weight_decay", float):
            out.notes.append(f"{w}: --adam_weight_decay_text_encoder {te_decay:g}: sdcore uses one weight decay for "
                             f"every group (--adam_weight_decay {a.num('adam_weight_decay', float):g})")  # fmt: skip
    if method != "lora":
        for name in ("rank", "lora_alpha", "lora_layers", "use_dora", "lora_dropout"):
            if a.given(name):
                out.problems.append(f"{w}: --{name} is a LoRA argument")
        return
    rank = a.num("rank", int)
    v["rank"] = rank
    alpha = a.num("lora_alpha", int) if script in (SCRIPTS[s] for s in ALPHA_ARG) else rank
    v["alpha"] = alpha  # PEFT's scale lora_alpha / r, as kohya's alpha / rank
    dropout = a.num("lora_dropout", float)
    if dropout:  # PEFT's LoraConfig(lora_dropout=): a dropout on each LoRA module's input, not kohya's --dropout
        v["lora_input_dropout"] = dropout
    if a.flag("use_dora"):
        v["algo"] = "dora"
    if script.kind == "control":
        if a.given("lora_layers"):
            v["lora_layers"] = a.text("lora_layers")
        v["lora_bias"] = a.flag("use_lora_bias")
        v["train_norm_layers"] = a.flag("train_norm_layers")
        v["alpha"] = rank  # lora_alpha=args.rank
        return
    name = next(k for k, s in SCRIPTS.items() if s is script)
    names: list[str] = list(TARGETS[name][0])
    if a.given("lora_layers"):
        names = [n.strip() for n in (a.text("lora_layers") or "").split(",") if n.strip()]
    if a.given("lora_blocks"):
        blocks = [b.strip() for b in (a.text("lora_blocks") or "").split(",") if b.strip()]
        names = [f"transformer_blocks.{b}.{n}" for b in blocks for n in names]
    v["layer_filter"] = peft_target_regex(names)
    v["layer_filter_regex"] = True
    if script.family in ("flux", "sd3"):
        v["key_layout"] = "diffusers"  # save_lora_weights: transformer.<module>.lora_A/B
        v["split_qkv"] = True  # PEFT gives to_q, to_k and to_v each its own lora_A
    else:
        out.notes.append(f"{w}: the LoRA is saved in kohya's names (lora_unet_...), which diffusers' "
                         "load_lora_weights reads as it reads the script's file")  # fmt: skip


def _schedule(a: _Args, script: Script, method: str, w: str, out: JobTranslation) -> None:
    v = out.values
    lr = a.num("learning_rate", float)
    batch = a.num("train_batch_size", int) or 1
    accumulation = a.num("gradient_accumulation_steps", int) or 1
    if a.flag("scale_lr") and lr is not None:
        processes = int(a.c.launch.get("num_processes", 1) or 1)
        lr = lr * accumulation * batch * processes
        out.notes.append(
            f"{w}: --scale_lr: --lr {lr:g} (learning_rate x accumulation x batch x {processes} process(es))"
        )
    v["lr"] = lr
    v["batch_size"] = batch
    v["gradient_accumulation"] = accumulation
    if a.given("max_train_steps"):
        v["max_steps"] = a.num("max_train_steps", int)
    else:
        v["epochs"] = a.num("num_train_epochs", int)
    schedule = a.text("lr_scheduler") or "constant"
    if schedule not in LR_SCHEDULERS:
        out.problems.append(f"{w}: --lr_scheduler {schedule!r}: choose one of {', '.join(LR_SCHEDULERS)}")
    else:
        v["lr_scheduler"] = schedule
    # diffusers' get_scheduler: "constant" takes no warmup (its default 500 has no effect there)
    v["lr_warmup_steps"] = 0 if schedule == "constant" else a.num("lr_warmup_steps", int)
    v["lr_cycles"] = a.num("lr_num_cycles", int)
    v["lr_power"] = a.num("lr_power", float)
    v["max_grad_norm"] = a.num("max_grad_norm", float)
    optimizer = (a.text("optimizer") or "AdamW").lower()
    if optimizer not in ("adamw", "prodigy"):
        out.problems.append(f"{w}: --optimizer {a.text('optimizer')!r}: the script falls back to AdamW with a warning; "
                            "give AdamW or prodigy")  # fmt: skip
        optimizer = "adamw"
    args: dict[str, Any] = {
        "betas": (a.num("adam_beta1", float), a.num("adam_beta2", float)),
        "weight_decay": a.num("adam_weight_decay", float),
        "eps": a.num("adam_epsilon", float),
    }
    if optimizer == "prodigy":
        if a.given("prodigy_beta3"):
            args["beta3"] = a.num("prodigy_beta3", float)
        for name in ("decouple", "use_bias_correction", "safeguard_warmup"):
            raw = a.c.args.get(f"prodigy_{name}", True)  # type=bool: any non-empty string is True
            args[name] = bool(raw) if raw is True else bool(str(raw))
        v["optimizer"] = "prodigy"
    else:
        v["optimizer"] = "adamw8bit" if a.flag("use_8bit_adam") else "adamw"
    v["optimizer_args"] = _opt_args(args)


def _objective(a: _Args, script: Script, flow: bool, w: str, out: JobTranslation) -> None:
    v = out.values
    if flow:
        scheme = a.text("weighting_scheme") or "none"
        if scheme not in WEIGHTING:
            out.problems.append(f"{w}: --weighting_scheme {scheme!r}: choose one of {', '.join(WEIGHTING)}")
            return
        x0 = script.family == "sd3" and bool(a.num("precondition_outputs", int))
        if scheme in ("sigma_sqrt", "cosmap") and not x0:
            out.problems.append(f"{w}: --weighting_scheme {scheme} weighs the velocity loss; sdcore weighs it only "
                                "with an x0/sigma_scaled prediction")  # fmt: skip
        # u from the density, a timestep of the scheduler's 1000-step table: kohya's "sigma" sampling
        v["timestep_sampling"] = "sigma"
        v["weighting_scheme"] = WEIGHTING[scheme]
        v["logit_mean"] = a.num("logit_mean", float)
        v["logit_std"] = a.num("logit_std", float)
        v["mode_scale"] = a.num("mode_scale", float)
        v["discrete_flow_shift"] = FLOW_SHIFT[script.family]
        v["model_prediction_type"] = "x0" if x0 else "raw"
        if script.family == "flux":
            v["guidance_scale"] = a.num("guidance_scale", float)
        v["t5xxl_max_token_length"] = a.num("max_sequence_length", int) if script.kind != "control" else None
        if v["t5xxl_max_token_length"] is None:
            del v["t5xxl_max_token_length"]
    for name in ("snr_gamma", "noise_offset"):
        if a.given(name) and flow:
            out.problems.append(f"{w}: --{name}: not an argument of the flow-matching scripts")
    if a.given("snr_gamma") and not flow:
        v["min_snr_gamma"] = a.num("snr_gamma", float)
    if a.given("noise_offset") and not flow:
        v["noise_offset"] = a.num("noise_offset", float)


def _fine_tune(a: _Args, w: str, out: JobTranslation) -> None:
    """The text_to_image full fine-tunes' own arguments: EMA, input perturbation, DREAM, timestep bias."""
    v = out.values
    if a.flag("use_ema"):
        # EMAModel(unet.parameters()) with its defaults (diffusers src/diffusers/training_utils.py:639-644:
        # decay 0.9999, min_decay 0, update_after_step 0, no power warm-up), stepped after each optimizer step
        # (train_text_to_image.py:1052-1060): get_decay's (1 + s) / (10 + s) capped at 0.9999, 0 at the first
        # update, is sdcore's --ema-warmup diffusers; the result, the samples and each save use the average
        # (:1100-1113, :1121-1123), as sdcore's --ema does
        v["ema"] = True
        v["ema_decay"] = 0.9999
        v["ema_warmup"] = "diffusers"
        v["ema_update_every"] = 1
        if a.flag("offload_ema"):  # pin_memory + to("cuda") around each step: where the average lives
            v["ema_device"] = "cpu"
    elif a.flag("offload_ema") or a.given("non_ema_revision"):
        out.notes.append(f"{w}: --offload_ema/--non_ema_revision without --use_ema: not used (as in the script)")
    gamma = a.num("input_perturbation", float)
    if gamma:  # noise + gamma * randn noises the input, the target keeps the noise (:978-990): kohya's ip_noise_gamma
        v["ip_noise_gamma"] = gamma
    if a.given("dream_detail_preservation") and not a.flag("dream_training"):
        out.notes.append(f"{w}: --dream_detail_preservation without --dream_training: not used (as in the script)")
    strategy = a.text("timestep_bias_strategy") or "none"
    bias = [f"--{n}" for n in ("timestep_bias_multiplier", "timestep_bias_begin", "timestep_bias_end",
                               "timestep_bias_portion") if a.given(n)]  # fmt: skip
    if strategy not in ("none", "earlier", "later", "range"):
        out.problems.append(f"{w}: --timestep_bias_strategy {strategy!r}: choose one of earlier, later, range, none")
    elif strategy != "none":
        out.problems.append(f"{w}: --timestep_bias_strategy {strategy}: sdcore has no weighted DDPM timestep draw "
                            "(nearest: --min-timestep/--max-timestep, which keep only a range)")  # fmt: skip
    elif bias:
        out.notes.append(f"{w}: {', '.join(bias)} without --timestep_bias_strategy: not used (as in the script)")


def validation_prompts(command: Command) -> list[str]:
    """The command's validation prompts: ``--validation_prompts`` (train_text_to_image.py, ``nargs="+"``) or
    ``--validation_prompt`` (one, or several where the script takes ``nargs="+"``)."""
    for name in ("validation_prompts", "validation_prompt"):
        value = command.args.get(name)
        if isinstance(value, list):
            return [str(v) for v in value if str(v)]
        if value is not None and value is not True and str(value):
            return [str(value)]
    return []


def read_sample_prompts(path: str | os.PathLike[str], family: str | None = None) -> list[SamplePrompt]:
    """``--sample-prompts`` naming a diffusers command file: its validation prompts, one sample each."""
    from .sample_prompts import parse_prompt_line

    command = read_command(path)
    if command is None:
        raise ConfigError(f"--sample-prompts {path}: not a diffusers command")
    return [
        parse_prompt_line(p, f"{path}: validation prompt {i}") for i, p in enumerate(validation_prompts(command), 1)
    ]


def load_datasets(path: str | os.PathLike[str], options: TrainOptions | None) -> list[SubsetOptions]:
    """The command's images as sdcore subsets: ``--instance_data_dir`` with ``--repeats``, every image captioned
    with ``--instance_prompt`` (the scripts read no caption files), and with ``--with_prior_preservation`` on a LoRA
    run ``--class_data_dir`` as class images captioned ``--class_prompt`` (DreamBooth takes them as --class-data)."""
    from dataclasses import replace

    from ..data.dataset import SubsetOptions, subset_defaults

    command = read_command(path)
    local = local_dataset(command.args) if command is not None else None
    if command is None or command.script not in SCRIPTS or ("instance_data_dir" not in command.args and local is None):
        raise DataError(
            f"{path}: not a diffusers DreamBooth command with --instance_data_dir or a --dataset_name folder"
        )
    args = command.args
    base = SubsetOptions(image_dir=Path("."), **subset_defaults(options))
    repeats = int(args.get("repeats", 1))
    if local is not None and isinstance(args.get("caption_column"), str):
        # the dataset's rows (metadata.jsonl's file_name) captioned from --caption_column (DreamBoothDataset's
        # custom_instance_prompts, train_dreambooth_lora_sd3.py:746-794)
        columns = ("file_name", "", str(args["caption_column"]))
        instance = replace(base, image_dir=local, repeats=repeats, jsonl_file=local / "metadata.jsonl",
                           jsonl_columns=columns)  # fmt: skip
    else:  # the --dataset_name folder (the script's choice over --instance_data_dir) or the instance folder
        folder = local if local is not None else Path(str(args["instance_data_dir"])).expanduser()
        instance = replace(base, image_dir=folder, repeats=repeats, caption_text=str(args.get("instance_prompt", "")))
    subsets = [instance]
    dreambooth = options is not None and hasattr(options, "instance_prompt")
    if args.get("with_prior_preservation") is True and "class_data_dir" in args and not dreambooth:
        folder = Path(str(args["class_data_dir"])).expanduser()
        subsets.append(replace(base, image_dir=folder, is_class=True, caption_text=str(args.get("class_prompt", ""))))
    return subsets


__all__ = ["SCRIPTS", "Command", "is_command_file", "load_datasets", "read_command", "translate_command"]

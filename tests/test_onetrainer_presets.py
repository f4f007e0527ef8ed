"""OneTrainer's built-in training presets, and the full configs its UI saves from them, read by ``sdcore train
<method> --config`` (sdcore.train.onetrainer_config).

Each preset below has the keys and values of the file of the same name in Nerogar/OneTrainer's
``training_presets/`` at commit 23df3832e8f213d64c337e39f9365ba46e99fed0 (written here by hand, OneTrainer is
AGPL-3.0: no file is copied), but ``base_model_name``, which points at a tiny model. A preset gives only what it
changes: ``TrainConfig.default_values()`` applies to the rest. A config the UI saves (``TrainConfig.
to_settings_dict``) holds every key of every table, each table with its own ``__version``: :func:`saved` builds it
from the reader's default tables, which hold exactly the values ``to_settings_dict`` wrote for the default config at
that commit (checked field by field against OneTrainer's own ``TrainConfig`` when these tests were written), and
must translate to the same options as the preset. Expected values are OneTrainer's meanings (``create.py``:
optimizer and warmup; ``GenericTrainer.__apply_fused_back_pass``: per-tensor clipping; ``optimizer_util.
change_optimizer``: the UI's ``optimizer_defaults``; ``*FineTuneSetup``: weights trained in their weight_dtype).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMIT = "23df3832e8f213d64c337e39f9365ba46e99fed0"

_SD_LORA = {"backup_after": 10, "batch_size": 4, "layer_filter_preset": "attn-mlp", "learning_rate": 0.0003,
            "output_model_destination": "models/lora.safetensors", "output_model_format": "KOHYA_LORA",
            "resolution": "512", "training_method": "LORA"}  # fmt: skip
_EMBEDDING = {"backup_after": 10, "latent_caching": False, "learning_rate": 0.0003, "learning_rate_warmup_steps": 20,
              "output_model_destination": "models/embedding.safetensors", "output_model_format": "SAFETENSORS",
              "sample_after": 1, "training_method": "EMBEDDING", "vae": {"weight_dtype": "FLOAT_32"},
              "unet": {"weight_dtype": "FLOAT_16"}, "text_encoder": {"weight_dtype": "FLOAT_16"}}  # fmt: skip
_FINE_TUNE = {"batch_size": 4, "output_model_destination": "models/model.safetensors",
              "output_model_format": "ORIGINAL_SINGLE_FILE", "resolution": "512", "training_method": "FINE_TUNE",
              "vae": {"weight_dtype": "FLOAT_32"}}  # fmt: skip
_HALF = {"weight_dtype": "FLOAT_16"}
_SD3_TE = {"train": False, "weight_dtype": "FLOAT_16"}


def _chroma(kind: str, transformer: dict[str, Any], text_encoder: str) -> dict[str, Any]:
    """The Chroma presets: their shared keys, the transformer table and T5's weight_dtype of each."""
    preset = {
        "base_model_name": "tiny:chroma", "batch_size": 2, "model_type": "CHROMA_1", "resolution": "512",
        "transformer": {"train": True, **transformer}, "text_encoder": {"train": False, "weight_dtype": text_encoder},
        "vae": {"weight_dtype": "FLOAT_32"}, "train_dtype": "BFLOAT_16", "weight_dtype": "BFLOAT_16",
        "output_dtype": "BFLOAT_16", "timestep_distribution": "INVERTED_PARABOLA", "noising_weight": 7.7,
        "quantization": {"layer_filter": "transformer_block", "layer_filter_preset": "blocks"},
    }  # fmt: skip
    if kind == "LORA":
        preset.update(learning_rate=0.0003, output_model_format="DIFFUSERS_LORA", training_method="LORA",
                      layer_filter="attn,ff.net,proj_mlp", layer_filter_preset="attn-mlp")  # fmt: skip
    else:
        preset.update(learning_rate=1e-5, output_model_format="ORIGINAL_TRANSFORMER", training_method="FINE_TUNE",
                      optimizer={"optimizer": "ADAFACTOR"},
                      optimizer_defaults={"ADAFACTOR": {
                          "optimizer": "ADAFACTOR", "fused_back_pass": True, "beta1": None, "clip_threshold": 1.0,
                          "decay_rate": -0.8, "eps": 1e-30, "eps2": 0.001, "relative_step": False,
                          "scale_parameter": False, "stochastic_rounding": True, "warmup_init": False,
                          "weight_decay": 0.0}})  # fmt: skip
    return preset


#: preset file name -> its keys and values (base_model_name: a tiny model of the family)
PRESETS: dict[str, dict[str, Any]] = {
    "#sd 1.5 LoRA": {**_SD_LORA, "base_model_name": "tiny:sd1", "model_type": "STABLE_DIFFUSION_15",
                     "vae": {"weight_dtype": "FLOAT_32"}, "unet": _HALF, "text_encoder": _HALF},
    "#sd 1.5 embedding": {**_EMBEDDING, "base_model_name": "tiny:sd1", "model_type": "STABLE_DIFFUSION_15",
                          "resolution": "512"},
    "#sd 1.5 inpaint masked": {**_FINE_TUNE, "base_model_name": "tiny:sd1-inpainting", "masked_training": True,
                               "model_type": "STABLE_DIFFUSION_15_INPAINTING", "normalize_masked_area_loss": True},
    "#sd 1.5 inpaint": {**_FINE_TUNE, "base_model_name": "tiny:sd1-inpainting",
                        "model_type": "STABLE_DIFFUSION_15_INPAINTING"},
    "#sd 1.5 masked": {**_FINE_TUNE, "base_model_name": "tiny:sd1", "masked_training": True,
                       "max_noising_strength": 0.8, "model_type": "STABLE_DIFFUSION_15",
                       "normalize_masked_area_loss": True},
    "#sd 1.5": {**_FINE_TUNE, "base_model_name": "tiny:sd1", "model_type": "STABLE_DIFFUSION_15",
                "unet": {"train": True}},
    "#sd 2.0 inpaint LoRA": {**_SD_LORA, "base_model_name": "tiny:sd2-inpainting",
                             "model_type": "STABLE_DIFFUSION_20_INPAINTING", "vae": _HALF, "unet": _HALF,
                             "text_encoder": _HALF},
    "#sd 2.0 inpaint": {**_FINE_TUNE, "base_model_name": "tiny:sd2-inpainting",
                        "model_type": "STABLE_DIFFUSION_20_INPAINTING"},
    "#sd 2.1 LoRA": {**_SD_LORA, "base_model_name": "tiny:sd2", "model_type": "STABLE_DIFFUSION_21", "vae": _HALF,
                     "unet": _HALF, "text_encoder": _HALF},
    "#sd 2.1 embedding": {**_EMBEDDING, "base_model_name": "tiny:sd2", "model_type": "STABLE_DIFFUSION_21",
                          "resolution": "512"},
    "#sd 2.1": {**_FINE_TUNE, "base_model_name": "tiny:sd2", "model_type": "STABLE_DIFFUSION_21"},
    "#sdxl 1.0 LoRA": {**_SD_LORA, "base_model_name": "tiny:sdxl", "model_type": "STABLE_DIFFUSION_XL_10_BASE",
                       "resolution": "1024", "unet": _HALF, "text_encoder": {"train": False, **_HALF},
                       "text_encoder_2": {"train": False, **_HALF}, "vae": {"weight_dtype": "FLOAT_32"}},
    "#sdxl 1.0 embedding": {**_EMBEDDING, "base_model_name": "tiny:sdxl", "model_type": "STABLE_DIFFUSION_XL_10_BASE",
                            "resolution": "1024", "text_encoder_2": _HALF},
    "#sdxl 1.0 inpaint LoRA": {**_SD_LORA, "base_model_name": "tiny:sdxl-inpainting",
                               "model_type": "STABLE_DIFFUSION_XL_10_BASE_INPAINTING", "resolution": "1024",
                               "text_encoder": {"train": False, **_HALF}, "text_encoder_2": {"train": False, **_HALF},
                               "unet": _HALF, "vae": {"weight_dtype": "FLOAT_32"}},
    "#sdxl 1.0": {"base_model_name": "tiny:sdxl", "model_type": "STABLE_DIFFUSION_XL_10_BASE",
                  "output_model_destination": "models/model.safetensors", "output_model_format": "ORIGINAL_SINGLE_FILE",
                  "resolution": "1024", "training_method": "FINE_TUNE", "vae": {"weight_dtype": "FLOAT_32"},
                  "unet": {"weight_dtype": "BFLOAT_16"}, "text_encoder": {"train": False, "weight_dtype": "BFLOAT_16"},
                  "text_encoder_2": {"train": False, "weight_dtype": "BFLOAT_16"}},
    "#sd 3 LoRA": {"backup_after": 10, "base_model_name": "tiny:sd3", "batch_size": 4, "learning_rate": 0.0003,
                   "model_type": "STABLE_DIFFUSION_3", "output_model_destination": "models/lora.safetensors",
                   "output_model_format": "DIFFUSERS_LORA", "resolution": "1024",
                   "transformer": {"train": True, **_HALF}, "text_encoder": _SD3_TE, "text_encoder_2": _SD3_TE,
                   "text_encoder_3": _SD3_TE, "training_method": "LORA", "vae": {"weight_dtype": "FLOAT_32"},
                   "timestep_distribution": "LOGIT_NORMAL"},
    "#sd 3": {"base_model_name": "tiny:sd3", "model_type": "STABLE_DIFFUSION_3", "output_dtype": "FLOAT_16",
              "output_model_destination": "models/model.safetensors", "output_model_format": "ORIGINAL_SINGLE_FILE",
              "transformer": {"train": True, "weight_dtype": "FLOAT_32"}, "resolution": "1024",
              "text_encoder": _SD3_TE, "text_encoder_2": _SD3_TE, "text_encoder_3": _SD3_TE,
              "training_method": "FINE_TUNE", "vae": {"weight_dtype": "FLOAT_32"},
              "timestep_distribution": "LOGIT_NORMAL"},
    "#flux LoRA": {"backup_after": 10, "base_model_name": "tiny:flux", "batch_size": 4, "learning_rate": 0.0003,
                   "model_type": "FLUX_DEV_1", "output_model_destination": "models/lora.safetensors",
                   "output_model_format": "DIFFUSERS_LORA", "resolution": "768",
                   "transformer": {"train": True, "weight_dtype": "NFLOAT_4"},
                   "text_encoder": {"train": False, "weight_dtype": "BFLOAT_16"},
                   "text_encoder_2": {"train": False, "weight_dtype": "NFLOAT_4"}, "training_method": "LORA",
                   "vae": {"weight_dtype": "FLOAT_32"}, "train_dtype": "BFLOAT_16",
                   "timestep_distribution": "LOGIT_NORMAL", "dynamic_timestep_shifting": True},
    "#chroma Finetune 16GB": _chroma("FINE_TUNE", {"weight_dtype": "BFLOAT_16", "offload_fraction": 0.4}, "FLOAT_8"),
    "#chroma Finetune 24GB": _chroma("FINE_TUNE", {"weight_dtype": "BFLOAT_16"}, "BFLOAT_16"),
    "#chroma Finetune 8GB": _chroma("FINE_TUNE", {"weight_dtype": "BFLOAT_16", "offload_fraction": 0.85}, "FLOAT_8"),
    "#chroma LoRA 16GB": _chroma("LORA", {"weight_dtype": "FLOAT_8"}, "BFLOAT_16"),
    "#chroma LoRA 24GB": _chroma("LORA", {"weight_dtype": "BFLOAT_16"}, "BFLOAT_16"),
    "#chroma LoRA 8GB": _chroma("LORA", {"weight_dtype": "FLOAT_8", "offload_fraction": 0.6}, "FLOAT_8"),
}  # fmt: skip

#: what every preset keeps of OneTrainer's defaults: 100 epochs, AdamW (create.py's betas 0.9/0.999, weight
#: decay 1e-2, eps 1e-8), a constant rate after 200 warmup steps, clip 1.0, MSE, buckets on OneTrainer's grid
COMMON = {"epochs": 100, "max_grad_norm": 1.0, "gradient_accumulation": 1, "loss_type": "l2", "buckets": True,
          "bucket_rule": "onetrainer", "max_steps": None}  # fmt: skip
ADAMW = {"optimizer": "adamw", "optimizer_args": "betas=0.9,0.999 weight_decay=0.01 eps=1e-08 amsgrad=False",
         "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 200.0}  # fmt: skip
#: OneTrainer's LoRA defaults (rank 16, alpha 1), attn-mlp on SD: the attention blocks
SD_LORA = {**ADAMW, "rank": 16, "alpha": 1.0, "algo": "lora", "layer_filter": "attentions", "key_layout": "kohya",
           "lr": 0.0003, "batch_size": 4, "resolution": 512, "bucket_step": 8, "mixed_precision": "fp16",
           "save_dtype": "fp32", "train_text_encoder": True, "stop_text_encoder_after_epochs": 30,
           "output": "models/lora.safetensors", "cache_latents": True}  # fmt: skip
#: the embedding presets: batch 1, 20 warmup steps, no latent cache, the captions' <embedding>, one vector of "*"
EMBEDDING = {"optimizer": "adamw", "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 20.0, "lr": 0.0003,
             "batch_size": 1, "mixed_precision": "fp16", "cache_latents": False, "placeholder": "<embedding>",
             "vectors": 1, "init_text": "*", "template": "filewords", "name": "embedding", "format": "safetensors",
             "output": "models/embedding.pt"}  # fmt: skip
#: the SD fine-tunes: OneTrainer's 3e-6, batch 4, the text encoder trains for 30 of the 100 epochs
SD_FINE_TUNE = {**ADAMW, "lr": 3e-6, "batch_size": 4, "resolution": 512, "bucket_step": 8, "mixed_precision": "fp16",
                "save_format": "single-file", "save_dtype": "fp32", "train_text_encoder": True,
                "stop_text_encoder_after_epochs": 30, "full_bf16": False, "output": "models/model.safetensors"}  # fmt: skip
#: the Chroma presets: bf16, 512 on the 64 grid, OneTrainer's inverted-parabola draw with weight 7.7, T5 frozen
CHROMA = {"batch_size": 2, "resolution": 512, "bucket_step": 64, "mixed_precision": "bf16", "save_dtype": "bf16",
          "train_text_encoder": False, "timestep_distribution": "inverted_parabola", "noising_weight": 7.7,
          "noising_bias": 0.0, "discrete_flow_shift": 1.0, "model_prediction_type": "raw",
          "apply_t5_attn_mask": True, "output": "models/model.safetensors"}  # fmt: skip
CHROMA_FINE_TUNE = {**CHROMA, "lr": 1e-5, "save_format": "single-file", "optimizer": "adafactor",
                    "optimizer_args": "eps=1e-30,0.001 clip_threshold=1.0 decay_rate=-0.8 weight_decay=0.0 "
                    "scale_parameter=False relative_step=False warmup_init=False", "full_bf16": True,
                    "fused_backward_pass": True, "fused_clip": "per-tensor", "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 200.0,
                    "fp8_base": False}  # fmt: skip
CHROMA_LORA = {**CHROMA, **ADAMW, "lr": 0.0003, "rank": 16, "alpha": 1.0, "algo": "lora", "key_layout": "diffusers",
               "layer_filter": "attn,ff.net,proj_mlp"}  # fmt: skip

EXPECTED: dict[str, tuple[str, dict[str, Any]]] = {
    "#sd 1.5 LoRA": ("lora", SD_LORA),
    "#sd 1.5 embedding": ("ti", {**EMBEDDING, "resolution": 512, "bucket_step": 8}),
    "#sd 1.5 inpaint masked": ("dreambooth", {**SD_FINE_TUNE, "masked_loss": True, "masked_loss_normalize": True,
                                              "masked_loss_unmasked_weight": 0.1,
                                              "inpainting_unmasked_probability": 0.1}),
    "#sd 1.5 inpaint": ("dreambooth", {**SD_FINE_TUNE, "masked_loss": False, "inpainting_unmasked_probability": 0.1}),
    # max_noising_strength 0.8: int(1000 * U(0, 0.8)), kohya's uniform draw in [0, 800)
    "#sd 1.5 masked": ("dreambooth", {**SD_FINE_TUNE, "masked_loss": True, "masked_loss_normalize": True,
                                      "masked_loss_unmasked_weight": 0.1, "max_timestep": 800, "min_timestep": 0}),
    "#sd 1.5": ("dreambooth", SD_FINE_TUNE),
    "#sd 2.0 inpaint LoRA": ("lora", {**SD_LORA, "inpainting_unmasked_probability": 0.1}),
    "#sd 2.0 inpaint": ("dreambooth", {**SD_FINE_TUNE, "inpainting_unmasked_probability": 0.1}),
    "#sd 2.1 LoRA": ("lora", SD_LORA),
    "#sd 2.1 embedding": ("ti", {**EMBEDDING, "resolution": 512, "bucket_step": 8}),
    "#sd 2.1": ("dreambooth", SD_FINE_TUNE),
    "#sdxl 1.0 LoRA": ("lora", {**SD_LORA, "resolution": 1024, "bucket_step": 64, "train_text_encoder": False,
                                "stop_text_encoder_after_epochs": None}),
    "#sdxl 1.0 embedding": ("ti", {**EMBEDDING, "resolution": 1024, "bucket_step": 64}),
    "#sdxl 1.0 inpaint LoRA": ("lora", {**SD_LORA, "resolution": 1024, "bucket_step": 64, "train_text_encoder": False,
                                        "stop_text_encoder_after_epochs": None,
                                        "inpainting_unmasked_probability": 0.1}),
    # bf16 UNet weights under OneTrainer's default fp16 train_dtype: no --full-bf16 (it needs bf16), a note says so
    "#sdxl 1.0": ("dreambooth", {**ADAMW, "lr": 3e-6, "batch_size": 1, "resolution": 1024, "bucket_step": 64,
                                 "mixed_precision": "fp16", "save_format": "single-file", "save_dtype": "fp32",
                                 "train_text_encoder": False, "full_bf16": False, "full_fp16": False}),
    # logit-normal sigmoid(N(0, 1)) without shift; every Linear of the blocks (layer_filter_preset full)
    "#sd 3 LoRA": ("lora", {**ADAMW, "lr": 0.0003, "batch_size": 4, "rank": 16, "alpha": 1.0, "algo": "lora",
                            "layer_filter": None, "key_layout": "diffusers", "resolution": 1024, "bucket_step": 64,
                            "mixed_precision": "fp16", "save_dtype": "fp32", "train_text_encoder": False,
                            "timestep_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
                            "discrete_flow_shift": 1.0, "model_prediction_type": "raw", "weighting_scheme": "uniform"}),
    "#sd 3": ("dreambooth", {**ADAMW, "lr": 3e-6, "batch_size": 1, "resolution": 1024, "save_format": "single-file",
                             "save_dtype": "fp16", "mixed_precision": "fp16", "train_text_encoder": False,
                             "timestep_sampling": "logit_normal", "full_fp16": False}),
    # NF4 transformer and T5, logit-normal shifted by the resolution (dynamic_timestep_shifting): kohya's flux_shift
    "#flux LoRA": ("lora", {**ADAMW, "lr": 0.0003, "batch_size": 4, "rank": 16, "alpha": 1.0, "algo": "lora",
                            "key_layout": "diffusers", "resolution": 768, "bucket_step": 64, "mixed_precision": "bf16",
                            "save_dtype": "fp32", "base_weights_dtype": "nf4", "text_encoder_weights_dtype": "none,nf4",
                            "timestep_sampling": "flux_shift", "sigmoid_scale": 1.0, "train_text_encoder": False,
                            "model_prediction_type": "raw"}),
    "#chroma Finetune 16GB": ("dreambooth", CHROMA_FINE_TUNE),
    "#chroma Finetune 24GB": ("dreambooth", CHROMA_FINE_TUNE),
    "#chroma Finetune 8GB": ("dreambooth", CHROMA_FINE_TUNE),
    "#chroma LoRA 16GB": ("lora", {**CHROMA_LORA, "fp8_base": True, "text_encoder_weights_dtype": "none"}),
    "#chroma LoRA 24GB": ("lora", {**CHROMA_LORA, "fp8_base": False, "text_encoder_weights_dtype": "none"}),
    "#chroma LoRA 8GB": ("lora", {**CHROMA_LORA, "fp8_base": True, "text_encoder_weights_dtype": "fp8"}),
}  # fmt: skip


#: ``optimizer_util.OPTIMIZER_DEFAULT_PARAMETERS`` of the two optimizers the presets train with: the UI's defaults,
#: which ``change_optimizer`` loads into the ``optimizer`` table (under the chosen optimizer's ``optimizer_defaults``
#: entry) when a config or preset is loaded
UI_OPTIMIZER_DEFAULTS = {
    "ADAMW": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False, "foreach": False,
              "maximize": False, "capturable": False, "differentiable": False, "fused": True,
              "stochastic_rounding": False, "fused_back_pass": False},
    "ADAFACTOR": {"eps": 1e-30, "eps2": 1e-3, "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": None,
                  "weight_decay": 0.0, "scale_parameter": False, "relative_step": False, "warmup_init": False,
                  "stochastic_rounding": True, "fused_back_pass": False},
}  # fmt: skip


def saved(preset: dict[str, Any]) -> dict[str, Any]:
    """The config OneTrainer's UI saves after loading ``preset``: every field of ``TrainConfig`` and of each nested
    table, each table with its ``__version`` (0; the TrainConfig's is 11), and the ``optimizer`` table as
    ``change_optimizer`` loads it: the UI's defaults of the chosen optimizer, its ``optimizer_defaults`` entry over
    them."""
    from sdcore.train import onetrainer_config as ot

    config: dict[str, Any] = {"__version": ot.CONFIG_VERSION, **copy.deepcopy(ot.DEFAULTS)}
    config.pop("train_device")  # the machine's default device; any value is accepted with a note
    for name, changed in ot.PARTS.items():
        config[name] = {"__version": 0, **ot.PART_DEFAULTS, **changed, **preset.get(name, {})}
    for name, defaults in (("optimizer", ot.OPTIMIZER_DEFAULTS), ("embedding", ot.EMBEDDING_DEFAULTS),
                           ("quantization", ot.QUANTIZATION_DEFAULTS)):  # fmt: skip
        config[name] = {"__version": 0, **defaults, **preset.get(name, {})}
    config["embedding"]["uuid"] = "76c93bb5-110c-43cc-be8b-2aa18545765f"
    config["cloud"] = {"__version": 0, "enabled": False}
    for key, value in preset.items():
        if not isinstance(value, dict) or key == "optimizer_defaults":
            config[key] = copy.deepcopy(value)
    entries = {name: {"__version": 0, **ot.OPTIMIZER_DEFAULTS, **entry}
               for name, entry in preset.get("optimizer_defaults", {}).items()}  # fmt: skip
    config["optimizer_defaults"] = entries
    chosen = config["optimizer"]["optimizer"]
    config["optimizer"] = {**config["optimizer"], **UI_OPTIMIZER_DEFAULTS[chosen],
                           **{k: v for k, v in entries.get(chosen, {}).items() if k != "__version"}}  # fmt: skip
    return config


def _options(tmp_path: Path, config: dict[str, Any], method: str, notes: list[str] | None = None) -> Any:
    from sdcore.train.config import load_options

    if method == "lora":
        from sdplugin_lora.method import LoraOptions as cls
    elif method == "dreambooth":
        from sdplugin_dreambooth.options import DreamBoothOptions as cls
    else:
        from sdplugin_ti.method import TIOptions as cls
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return load_options(cls, path, notes=notes if notes is not None else [])


def _mapped(options: Any, expected: dict[str, Any]) -> dict[str, Any]:
    return {key: getattr(options, key) for key in expected}


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_and_its_saved_config_map_to_onetrainers_values(tmp_path, name):
    method, expected = EXPECTED[name]
    want = {**COMMON, **expected}
    if method == "ti":
        want.pop("buckets"), want.pop("max_grad_norm")
    preset = _options(tmp_path, PRESETS[name], method)
    assert _mapped(preset, want) == want
    full = _options(tmp_path, saved(PRESETS[name]), method)
    assert _mapped(full, want) == want


def test_a_saved_config_has_a_version_in_every_table_and_is_read(tmp_path):
    """BaseConfig.to_dict writes ``__version`` into every nested table (parts, optimizer, embedding, quantization,
    each optimizer_defaults entry): not an unknown field."""
    config = saved(PRESETS["#sd 1.5 LoRA"])
    assert config["unet"]["__version"] == 0 and config["optimizer"]["__version"] == 0
    notes: list[str] = []
    options = _options(tmp_path, config, "lora", notes)
    assert options.rank == 16 and not any("__version" in note for note in notes)


def test_chroma_fine_tune_takes_the_ui_optimizer_settings_and_trains_bf16_weights(tmp_path):
    notes: list[str] = []
    options = _options(tmp_path, PRESETS["#chroma Finetune 16GB"], "dreambooth", notes)
    # optimizer_defaults.ADAFACTOR's fused_back_pass is what the UI trains with: OneTrainer steps each tensor in
    # backward on Chroma too, clipped by its own norm (clip_grad_norm 1.0): --fused-clip per-tensor, in one note
    assert options.fused_backward_pass is True and options.fused_clip == "per-tensor" and options.full_bf16 is True
    text = "\n".join(notes)
    assert "optimizer_defaults.ADAFACTOR: clip_threshold=1.0, decay_rate=-0.8, eps=1e-30, eps2=0.001, " \
           "fused_back_pass=True, weight_decay=0.0" in text  # fmt: skip
    assert ("optimizer.fused_back_pass with clip_grad_norm 1.0 on chroma: --fused-clip per-tensor (OneTrainer clips "
            "each tensor by its own norm as it steps it in backward; sdcore's default follows kohya, whose scripts "
            "for this family clip all gradients together)") in text  # fmt: skip
    assert "transformer.weight_dtype BFLOAT_16: trained in that type itself" in text
    assert "stochastically" not in text  # fused Adafactor rounds bf16 updates stochastically, as OneTrainer
    # without clipping the family rule does not matter (no note), yet the run is OneTrainer's: per-tensor all the same
    quiet: list[str] = []
    unclipped = _options(tmp_path, {**PRESETS["#chroma Finetune 16GB"], "clip_grad_norm": None}, "dreambooth", quiet)
    assert unclipped.fused_backward_pass is True and unclipped.max_grad_norm == 0.0
    assert unclipped.fused_clip == "per-tensor" and not any("fused_back_pass with" in note for note in quiet)
    # OneTrainer steps in backward with gradient accumulation too (on the update's last batch): kept, no refusal, and
    # the pre-flight's note names OneTrainer's rule (not kohya's refusal of the pair, which a kohya TOML is told)
    from sdcore.train.fused import fused_notes

    for clip_grad_norm in (1.0, None):
        accumulated = _options(tmp_path, {**PRESETS["#chroma Finetune 16GB"], "gradient_accumulation_steps": 4,
                                          "clip_grad_norm": clip_grad_norm}, "dreambooth")  # fmt: skip
        assert accumulated.fused_backward_pass is True and accumulated.gradient_accumulation == 4
        assert fused_notes(accumulated)[-1] == (
            "--fused-backward-pass with --gradient-accumulation 4: the tensors step in the backward of each update's "
            "last micro-batch (OneTrainer's rule), so every gradient is held until then and the pass saves no "
            "gradient memory"
        )


def test_optimizer_and_optimizer_defaults_that_disagree_are_one_problem_each(tmp_path):
    from sdcore.errors import ConfigError

    config = copy.deepcopy(PRESETS["#chroma Finetune 24GB"])
    config["optimizer"] = {"optimizer": "ADAFACTOR", "weight_decay": 0.1, "eps2": 0.002}
    with pytest.raises(ConfigError) as info:
        _options(tmp_path, config, "dreambooth")
    problems = [p for p in info.value.problems if "optimizer_defaults" in p]
    assert len(problems) == 2
    assert problems[0].endswith(
        "optimizer.eps2 0.002: optimizer_defaults.ADAFACTOR.eps2 says 0.001: OneTrainer's UI trains with the latter, "
        "its scripts/train.py with the former; make them agree"
    )
    assert "optimizer.weight_decay 0.1: optimizer_defaults.ADAFACTOR.weight_decay says 0.0" in problems[1]


@pytest.mark.parametrize("build", [lambda p: {**p, "optimizer": {"optimizer": "ADAFACTOR", "fused_back_pass": False}},
                                   saved], ids=["preset", "saved"])  # fmt: skip
def test_an_optimizer_field_written_at_its_default_is_not_overridden_by_optimizer_defaults(tmp_path, build):
    """A hand-edited ``"fused_back_pass": false`` (scripts/train.py trains with it) against the entry's true: the
    entry fills only the fields the ``optimizer`` object leaves out, so this is the ambiguity, not a silent true."""
    from sdcore.errors import ConfigError

    config = build(copy.deepcopy(PRESETS["#chroma Finetune 24GB"]))
    config["optimizer"]["fused_back_pass"] = False
    with pytest.raises(ConfigError) as info:
        _options(tmp_path, config, "dreambooth")
    (problem,) = [p for p in info.value.problems if "optimizer_defaults" in p]
    assert problem.endswith(
        "optimizer.fused_back_pass False: optimizer_defaults.ADAFACTOR.fused_back_pass says True: OneTrainer's UI "
        "trains with the latter, its scripts/train.py with the former; make them agree"
    )


def test_sdxl_fine_tune_bf16_weights_under_fp16_say_the_master_copy(tmp_path):
    notes: list[str] = []
    _options(tmp_path, PRESETS["#sdxl 1.0"], "dreambooth", notes)
    assert any(
        "unet.weight_dtype BFLOAT_16: OneTrainer updates these weights in that type itself; sdcore trains them "
        "through a float32 master copy (more memory, finer updates) since train_dtype FLOAT_16 is not BFLOAT_16" in n
        for n in notes
    )
    # the frozen text encoders keep the old note, the trained UNet does not
    assert any(n.endswith("text_encoder.weight_dtype BFLOAT_16: sdcore keeps frozen weights in the training precision")
               for n in notes)  # fmt: skip
    assert not any("unet.weight_dtype BFLOAT_16: sdcore keeps frozen" in n for n in notes)


def test_fine_tune_fp16_weights_with_fp16_training_are_full_fp16(tmp_path):
    config = {**PRESETS["#sd 1.5"], "unet": {"weight_dtype": "FLOAT_16"}, "text_encoder": {"train": False}}
    options = _options(tmp_path, config, "dreambooth")
    assert options.full_fp16 is True and options.mixed_precision == "fp16"


def _tiny_images(folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo of <embedding>", encoding="utf-8")


def test_a_preset_without_concepts_reads_onetrainers_default_concepts_file(tmp_path, sd_cli, pm, monkeypatch):
    """None of the built-in presets names its concepts: TrainConfig's concept_file_name default
    ``training_concepts/concepts.json`` applies (resolved as OneTrainer's working directory would)."""
    root = tmp_path / "ot"
    _tiny_images(root / "images")
    (root / "training_concepts").mkdir(parents=True)
    (root / "training_concepts" / "concepts.json").write_text(
        json.dumps([{"name": "c", "path": str(root / "images")}]), encoding="utf-8"
    )
    preset = {**PRESETS["#sd 1.5 embedding"], "train_dtype": "FLOAT_32"}
    (root / "preset.json").write_text(json.dumps(preset), encoding="utf-8")
    monkeypatch.chdir(root)
    result = sd_cli(["train", "ti", "--config", "preset.json", "--dry-run"], pm=pm)
    assert result.exit_code == 0, result.output
    assert "2 training images" in result.output and "result: models/embedding.pt" in result.output

    # a built-in preset lies in training_presets/<model>/: run from elsewhere, OneTrainer's folder is found above it
    builtin = root / "training_presets" / "SD1.5" / "#sd 1.5 embedding.json"
    builtin.parent.mkdir(parents=True)
    builtin.write_text(json.dumps(preset), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = sd_cli(["train", "ti", "--config", str(builtin), "--dry-run"], pm=pm)
    assert result.exit_code == 0, result.output
    assert "2 training images" in result.output
    assert (f"concept_file_name: not given, OneTrainer's default training_concepts/concepts.json: the concepts of "
            f"{root / 'training_concepts' / 'concepts.json'} (unless --data is given)") in result.output  # fmt: skip

    (root / "training_concepts" / "concepts.json").unlink()
    result = sd_cli(["train", "ti", "--config", str(builtin), "--dry-run"], pm=pm)
    assert result.exit_code != 0
    assert (f"gives neither 'concepts' nor 'concept_file_name', and OneTrainer's default "
            f"training_concepts/concepts.json is not in {tmp_path}, {root}, {builtin.parent.parent}, "
            f"{builtin.parent} (the working directory first)") in " ".join(result.output.split())  # fmt: skip


@pytest.mark.parametrize(("name", "model", "why"), [
    ("#sd 1.5 inpaint", "tiny:sd1", "is not an inpainting model (no mask input)"),
    ("#sd 1.5", "tiny:sd1-inpainting", "is an inpainting model: use its _INPAINTING/FILL type"),
])  # fmt: skip
def test_an_inpainting_preset_needs_an_inpainting_model_and_a_plain_one_a_plain_model(tmp_path, name, model, why):
    """The inpainting presets above run on ``tiny:sd1-inpainting`` (9 input channels, read from the layout before
    anything loads); the wrong kind of model is one line naming model_type, as OneTrainer would fail at its first
    step on the shape."""
    from sdcore.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _options(tmp_path, {**PRESETS[name], "base_model_name": model}, "dreambooth")
    (problem,) = [p for p in info.value.problems if "model_type" in p]
    assert problem.endswith(f"base_model_name {model} {why}")


@pytest.mark.parametrize(("destination", "elsewhere"), [
    ("models/embedding.safetensors", ""),
    ("models/embedding.pt", "; OneTrainer writes that file as models/embedding.pt"),
    ("models/embedding.bin", "; OneTrainer writes that file as models/embedding.bin"),
])  # fmt: skip
def test_embedding_output_is_the_pt_name_with_the_safetensors_beside_it(tmp_path, destination, elsewhere):
    """OneTrainer's EmbeddingSaverMixin writes safetensors data to output_model_destination, whatever its suffix;
    sdcore's TI writes A1111's .pt (always) and the --format safetensors copy beside it."""
    notes: list[str] = []
    config = {**PRESETS["#sd 1.5 embedding"], "output_model_destination": destination}
    options = _options(tmp_path, config, "ti", notes)
    assert (options.output, options.format, options.name) == ("models/embedding.pt", "safetensors", "embedding")
    (note,) = [n for n in notes if "output_model_format" in n]
    assert note.endswith("output_model_format SAFETENSORS: the embedding is written to models/embedding.safetensors "
                         f"and, beside it, as A1111's embedding.pt{elsewhere}")  # fmt: skip


def test_the_embedding_preset_trains_and_writes_onetrainers_file(tmp_path, sd_cli, pm, monkeypatch):
    """A few real steps of "#sd 1.5 embedding" (made small: 64 px, 1 epoch, fp32): the safetensors file lands where
    OneTrainer's output_model_destination says, with the .pt beside it holding the same vector."""
    import torch
    from safetensors.torch import load_file

    _tiny_images(tmp_path / "images")
    config = {**PRESETS["#sd 1.5 embedding"], "resolution": "64", "epochs": 1, "train_dtype": "FLOAT_32",
              "sample_after_unit": "NEVER", "concepts": [{"name": "c", "path": "images"}]}  # fmt: skip
    (tmp_path / "preset.json").write_text(json.dumps(config), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = sd_cli(["train", "ti", "--config", "preset.json", "--no-progress"], pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    written = sorted(p.name for p in (tmp_path / "models").iterdir() if p.is_file())
    assert written == ["embedding.pt", "embedding.safetensors"]
    tensors = load_file(str(tmp_path / "models" / "embedding.safetensors"))
    (vector,) = tensors.values()
    assert vector.shape == (1, 32)  # one vector ("*") of tiny:sd1's 32-wide CLIP
    pt = torch.load(tmp_path / "models" / "embedding.pt", weights_only=False)
    (trained,) = pt["string_to_param"].values()
    assert torch.equal(trained.detach().cpu().float(), vector.float())


def test_fused_back_pass_on_an_optimizer_onetrainer_does_not_fuse_has_no_effect(tmp_path):
    """Optimizer.supports_fused_back_pass: OneTrainer ignores the flag for LION (it steps after backward)."""
    notes: list[str] = []
    config = {**PRESETS["#sdxl 1.0 LoRA"], "optimizer": {"optimizer": "LION", "fused_back_pass": True}}
    options = _options(tmp_path, config, "lora", notes)
    assert options.optimizer == "lion" and options.fused_backward_pass is False
    assert any(n.endswith("optimizer.fused_back_pass: accepted, no effect with LION (OneTrainer steps it after "
                          "backward: Optimizer.supports_fused_back_pass)") for n in notes)  # fmt: skip

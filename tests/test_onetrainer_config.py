"""OneTrainer training configs read by ``sdcore train <method> --config config.json``
(sdcore.train.onetrainer_config).

The configs below are written by hand with OneTrainer's field names (OneTrainer is AGPL-3.0: none of its
presets is copied). Expected values are OneTrainer's meanings, from the files cited next to them in
Nerogar/OneTrainer (mirror HEAD 23df3832): ``modules/util/config/TrainConfig.py`` (TC: field defaults),
``modules/util/create.py`` (optimizers, warmup), ``modules/util/lr_scheduler_util.py`` (curves),
``modules/modelSetup/mixin/ModelSetupNoiseMixin.py`` (noise, timesteps), ``modules/util/TimedActionMixin.py``
(time units), ``modules/util/config/SampleConfig.py`` (sample defaults).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _options_class(method: str):
    if method == "lora":
        from sdplugin_lora.method import LoraOptions

        return LoraOptions
    if method == "dreambooth":
        from sdplugin_dreambooth.options import DreamBoothOptions

        return DreamBoothOptions
    from sdplugin_ti.method import TIOptions

    return TIOptions


def _write(tmp_path: Path, config: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def _load(tmp_path: Path, config: dict, method: str = "lora", notes: list[str] | None = None):
    from sdcore.train.config import load_options

    return load_options(_options_class(method), _write(tmp_path, config), notes=notes if notes is not None else [])


def _problems(tmp_path: Path, config: dict, method: str = "lora") -> str:
    from sdcore.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _load(tmp_path, config, method)
    return str(info.value)


#: a LoRA config as OneTrainer's SD1.5 LoRA preset is shaped (its fields, hand-written values)
SD15_LORA = {
    "training_method": "LORA", "model_type": "STABLE_DIFFUSION_15", "base_model_name": "tiny:sd1",
    "batch_size": 4, "layer_filter_preset": "attn-mlp", "learning_rate": 0.0003, "backup_after": 10,
    "output_model_destination": "models/lora.safetensors", "output_model_format": "KOHYA_LORA", "resolution": "512",
    "epochs": 20, "unet": {"weight_dtype": "FLOAT_16"}, "text_encoder": {"weight_dtype": "FLOAT_16"},
    "vae": {"weight_dtype": "FLOAT_32"},
}  # fmt: skip


def test_sd15_lora_with_onetrainer_defaults(tmp_path):
    notes: list[str] = []
    o = _load(tmp_path, SD15_LORA, notes=notes)
    assert (o.model, o.output, o.lr, o.epochs, o.batch_size, o.resolution) == (
        "tiny:sd1", "models/lora.safetensors", 3e-4, 20, 4, 512,
    )  # fmt: skip
    # TC: lora_rank 16, lora_alpha 1.0, peft_type LORA; attn-mlp on SD = the "attentions" blocks (kohya's targets)
    assert (o.rank, o.alpha, o.algo, o.key_layout) == (16, 1.0, "lora", "kohya")
    # TC: train_dtype FLOAT_16, output_dtype FLOAT_32; text_encoder.train True (30 epochs > these 20: no stop)
    assert (o.mixed_precision, o.save_dtype, o.train_text_encoder, o.te_only) == ("fp16", "fp32", True, False)
    # TC: CONSTANT with learning_rate_warmup_steps 200.0 (> 1: a step count, create.py) -> constant with warmup
    assert (o.lr_scheduler, o.lr_warmup_steps) == ("constant_with_warmup", 200)
    # create.py ADAMW: betas (0.9, 0.999), weight_decay 1e-2, eps 1e-8 when the config leaves them None
    from sdcore.train.optim import parse_optimizer_args

    assert o.optimizer == "adamw"
    assert parse_optimizer_args(o.optimizer_args) == {
        "betas": (0.9, 0.999), "weight_decay": 0.01, "eps": 1e-8, "amsgrad": False,
    }  # fmt: skip
    # TC: clip_grad_norm 1.0, unet.gradient_checkpointing True, aspect_ratio_bucketing/latent_caching True
    assert (o.max_grad_norm, o.gradient_checkpointing, o.buckets, o.cache_latents) == (1.0, True, True, True)
    assert o.data.endswith("config.json")  # the concepts are read from the config itself
    assert any("backup_after" in n for n in notes) and any("unet.weight_dtype FLOAT_16" in n for n in notes)


def test_sdxl_lora_rates_optimizer_schedule_and_loss(tmp_path):
    config = {
        "training_method": "LORA", "model_type": "STABLE_DIFFUSION_XL_10_BASE", "base_model_name": "tiny:sdxl",
        "learning_rate": 1e-4, "epochs": 10, "resolution": "1024", "layer_filter_preset": "attn-mlp",
        "lora_rank": 32, "lora_alpha": 16.0, "gradient_accumulation_steps": 2, "learning_rate_warmup_steps": 100,
        "learning_rate_scheduler": "COSINE_WITH_RESTARTS", "learning_rate_cycles": 2.0,
        "learning_rate_min_factor": 0.1, "loss_weight_fn": "MIN_SNR_GAMMA", "loss_weight_strength": 5.0,
        "offset_noise_weight": 0.05, "dropout_probability": 0.1, "clip_grad_norm": None,
        "unet": {"learning_rate": 2e-4}, "text_encoder": {"learning_rate": 5e-5},
        "text_encoder_2": {"learning_rate": 5e-5}, "text_encoder_layer_skip": 1, "text_encoder_2_layer_skip": 1,
        "optimizer": {"optimizer": "PRODIGY", "weight_decay": 0.01, "d_coef": 2.0, "decouple": True},
        "min_noising_strength": 0.1, "max_noising_strength": 0.9,
    }  # fmt: skip
    o = _load(tmp_path, config)
    assert (o.rank, o.alpha, o.unet_lr, o.te_lr) == (32, 16.0, 2e-4, 5e-5)
    assert o.gradient_accumulation == 2 and o.lr_warmup_steps == 50  # create.py: int(100 / accumulation 2)
    # lr_scheduler_util: min + (1 - min) * 0.5 * (1 + cos(2 pi * 2 * p)) = cosine_with_min_lr with 4 half-waves
    assert (o.lr_scheduler, o.lr_cycles, o.lr_min_ratio) == ("cosine_with_min_lr", 4, 0.1)
    assert (o.min_snr_gamma, o.noise_offset, o.dropout, o.max_grad_norm) == (5.0, 0.05, 0.1, 0.0)
    assert o.clip_skip == 2  # one final layer skipped = the penultimate layer
    # UNIFORM: int(1000 * min) + (int(1000 * max) - int(1000 * min)) * U, floored
    assert (o.min_timestep, o.max_timestep) == (100, 900)
    from sdcore.train.optim import parse_optimizer_args

    args = parse_optimizer_args(o.optimizer_args)
    assert o.optimizer == "prodigy"  # create.py PRODIGY: its fallbacks where the config gives None
    assert args["d_coef"] == 2.0 and args["decouple"] is True and args["weight_decay"] == 0.01
    assert args["d0"] == 1e-6 and args["betas"] == (0.9, 0.999) and args["slice_p"] == 1 and "beta3" not in args


def test_sd3_lora_logit_normal_shift_and_diffusers_output(tmp_path):
    config = {
        "training_method": "LORA", "model_type": "STABLE_DIFFUSION_3", "base_model_name": "tiny:sd3",
        "learning_rate": 3e-4, "epochs": 5, "resolution": "1024", "output_model_format": "DIFFUSERS_LORA",
        "train_dtype": "BFLOAT_16", "timestep_distribution": "LOGIT_NORMAL", "noising_weight": 0.5,
        "noising_bias": -0.2, "timestep_shift": 3.0,
        "transformer": {"train": True, "weight_dtype": "FLOAT_16"}, "text_encoder": {"train": False},
        "text_encoder_2": {"train": False}, "text_encoder_3": {"train": False},
    }  # fmt: skip
    o = _load(tmp_path, config)
    assert (o.key_layout, o.mixed_precision, o.train_text_encoder) == ("diffusers", "bf16", False)
    # LOGIT_NORMAL: sigmoid(N(noising_bias, noising_weight + 1)), then s t / ((s - 1) t + 1)
    assert (o.timestep_sampling, o.logit_mean, o.logit_std, o.discrete_flow_shift) == ("logit_normal", -0.2, 1.5, 3.0)
    assert (o.model_prediction_type, o.weighting_scheme) == ("raw", "uniform")
    assert o.algo == "lora"  # layer_filter_preset full on a transformer: the blocks' Linear layers (a note)


def test_flux_lora_fp8_dynamic_shift_guidance(tmp_path):
    config = {
        "training_method": "LORA", "model_type": "FLUX_DEV_1", "base_model_name": "tiny:flux", "epochs": 4,
        "learning_rate": 3e-4, "batch_size": 4, "resolution": "768", "train_dtype": "BFLOAT_16",
        "timestep_distribution": "LOGIT_NORMAL", "dynamic_timestep_shifting": True,
        "output_model_format": "DIFFUSERS_LORA",
        "transformer": {"train": True, "weight_dtype": "FLOAT_8", "guidance_scale": 1.0, "attention_mask": True},
        "text_encoder": {"train": False, "weight_dtype": "BFLOAT_16"},
        "text_encoder_2": {"train": False, "weight_dtype": "BFLOAT_16"},
        "optimizer": {"optimizer": "ADAFACTOR"}, "ema": "OFF",
    }  # fmt: skip
    o = _load(tmp_path, config)
    assert o.fp8_base is True  # FLOAT_8 storage of the frozen transformer, upcast per layer
    # sigmoid(N(0, 1)) shifted by the resolution's exp(mu) (BaseFluxSetup: dynamic shift) = flux_shift
    assert (o.timestep_sampling, o.sigmoid_scale, o.apply_t5_attn_mask) == ("flux_shift", 1.0, True)
    assert (o.key_layout, o.train_text_encoder) == ("diffusers", False)
    from sdcore.train.optim import parse_optimizer_args

    # create.py ADAFACTOR: TC's relative_step / scale_parameter / warmup_init are False (not None), eps (1e-30, 1e-3)
    args = parse_optimizer_args(o.optimizer_args)
    assert o.optimizer == "adafactor" and args["relative_step"] is False and args["scale_parameter"] is False
    assert args["eps"] == (1e-30, 1e-3) and args["decay_rate"] == -0.8 and "beta1" not in args


def test_sd15_fine_tune(tmp_path):
    config = {
        "training_method": "FINE_TUNE", "model_type": "STABLE_DIFFUSION_15", "base_model_name": "tiny:sd1",
        "learning_rate": 1e-6, "epochs": 10, "output_model_format": "SAFETENSORS", "output_dtype": "FLOAT_16",
        "output_model_destination": "models/model.safetensors", "learning_rate_scheduler": "LINEAR",
        "learning_rate_warmup_steps": 0.1, "unet": {"learning_rate": 2e-6},
        "text_encoder": {"train": True, "learning_rate": 5e-7, "stop_training_after": 300,
                         "stop_training_after_unit": "STEP"},
        "optimizer": {"optimizer": "ADAMW_8BIT", "weight_decay": 0.0},
    }  # fmt: skip
    o = _load(tmp_path, config, "dreambooth")
    assert (o.lr, o.te_lr, o.train_text_encoder, o.stop_text_encoder_at) == (2e-6, 5e-7, True, 300)
    assert (o.save_format, o.save_dtype, o.lr_scheduler, o.lr_warmup_steps) == ("single-file", "fp16", "linear", 0.1)
    from sdcore.train.optim import parse_optimizer_args

    args = parse_optimizer_args(o.optimizer_args)  # create.py ADAMW_8BIT fallbacks
    assert o.optimizer == "adamw8bit" and args["weight_decay"] == 0.0 and args["min_8bit_size"] == 4096
    assert args["percentile_clipping"] == 100


def test_sdxl_embedding(tmp_path):
    config = {
        "training_method": "EMBEDDING", "model_type": "STABLE_DIFFUSION_XL_10_BASE", "base_model_name": "tiny:sdxl",
        "learning_rate": 3e-3, "embedding_learning_rate": 1e-3, "epochs": 8, "resolution": "1024",
        "output_model_format": "SAFETENSORS", "output_model_destination": "models/emb.safetensors",
        "embedding": {"placeholder": "sksemb", "token_count": 4, "initial_embedding_text": "a cat"},
    }  # fmt: skip
    o = _load(tmp_path, config, "ti")
    assert (o.name, o.placeholder) == ("emb", "sksemb")  # the file stem names it, the captions say the placeholder
    assert (o.vectors, o.init_text, o.lr) == (4, "a cat", 1e-3)  # embedding_learning_rate wins
    assert o.template == "filewords"  # OneTrainer trains on the captions, which hold the placeholder
    # sdcore's TI output names A1111's .pt, the --format copy models/emb.safetensors (OneTrainer's file) beside it
    assert (o.format, o.output, o.epochs) == ("safetensors", "models/emb.pt", 8)


def test_ema_modes_become_the_runtime_ema(tmp_path):
    # TrainConfig: ema OFF/GPU/CPU, ema_decay 0.999, ema_update_step_interval 5 (EMAModuleWrapper's warm-up)
    o = _load(tmp_path, {**SD15_LORA, "ema": "CPU", "ema_decay": 0.998, "ema_update_step_interval": 5})
    assert (o.ema, o.ema_decay, o.ema_update_every, o.ema_warmup, o.ema_device) == (True, 0.998, 5, "onetrainer", "cpu")
    o = _load(tmp_path, {**SD15_LORA, "ema": "GPU"})
    assert (o.ema, o.ema_device) == (True, "same")
    assert _load(tmp_path, SD15_LORA).ema is False  # the preset's OFF
    assert "choose OFF, GPU or CPU" in _problems(tmp_path, {**SD15_LORA, "ema": "SOMETIMES"})


def test_refusals_by_name_all_at_once(tmp_path):
    config = {
        **SD15_LORA, "perturbation_noise_weight": 0.1, "timestep_distribution": "LINEAR", "masked_training": True,
        "masked_prior_preservation_weight": 0.5,
        "loss_weight_fn": "SIGMA", "mse_strength": 0.0, "peft_type": "OFT_2", "resolution": "1000x2",
        "unet": {"weight_dtype": "FLOAT_W8A8"}, "optimizer": {"optimizer": "CAME"}, "dropout_probability": 0.1,
        "learning_rate_scheduler": "REX", "save_every_unit": "EPOCH", "save_every": 2,
    }  # fmt: skip
    text = _problems(tmp_path, config)
    for expected in ("perturbation_noise_weight 0.1", "timestep_distribution 'LINEAR'",
                     "masked_prior_preservation_weight 0.5",
                     "loss_weight_fn 'SIGMA'", "every loss strength is 0", "peft_type 'OFT_2'", "resolution '1000x2'",
                     "unet.weight_dtype 'FLOAT_W8A8'", "optimizer.optimizer 'CAME'", "learning_rate_scheduler 'REX'",
                     "dropout_probability 0.1"):  # fmt: skip
        assert expected in text, expected


def test_preset_text_encoder_stop_after_30_of_100_epochs_loads_for_lora(tmp_path):
    # TC: text_encoder stops after 30 EPOCH by default and epochs is 100: TimedActionMixin.single_action_elapsed
    # (EPOCH: epoch + 1 > 30) trains the text encoder in epochs 0..29, i.e. sdcore's epochs 1..30
    config = {k: v for k, v in SD15_LORA.items() if k != "epochs"}
    notes: list[str] = []
    o = _load(tmp_path, config, notes=notes)
    assert (o.epochs, o.train_text_encoder, o.stop_text_encoder_after_epochs, o.stop_text_encoder_at) == (
        100, True, 30, None,
    )  # fmt: skip
    assert any("freezes it from the first step of epoch 31 on" in n for n in notes)
    o = _load(tmp_path, {**config, "text_encoder": {"train": False}})
    assert o.train_text_encoder is False and o.stop_text_encoder_after_epochs is None


def test_text_encoder_stop_in_steps_counts_micro_batches(tmp_path):
    # TrainProgress.global_step counts micro-batches: STEP 300 with 4 accumulation steps = micro-batches 0..299
    # = the first 75 optimizer steps; 301 micro-batches need 76 (the last one partly)
    te = {"stop_training_after": 300, "stop_training_after_unit": "STEP"}
    o = _load(tmp_path, {**SD15_LORA, "gradient_accumulation_steps": 4, "text_encoder": te})
    assert (o.stop_text_encoder_at, o.stop_text_encoder_after_epochs) == (75, None)
    te = {"stop_training_after": 301, "stop_training_after_unit": "STEP"}
    assert (
        _load(tmp_path, {**SD15_LORA, "gradient_accumulation_steps": 4, "text_encoder": te}).stop_text_encoder_at == 76
    )
    fine_tune = {**SD15_LORA, "training_method": "FINE_TUNE", "output_model_format": "SAFETENSORS",
                 "text_encoder": {"stop_training_after": 3, "stop_training_after_unit": "EPOCH"}}  # fmt: skip
    assert _load(tmp_path, fine_tune, "dreambooth").stop_text_encoder_after_epochs == 3


def test_text_encoder_stops_that_sdcore_cannot_express_are_refused(tmp_path):
    sdxl = {**SD15_LORA, "model_type": "STABLE_DIFFUSION_XL_10_BASE", "base_model_name": "tiny:sdxl",
            "text_encoder": {"stop_training_after": 5, "stop_training_after_unit": "EPOCH"},
            "text_encoder_2": {"stop_training_after": 8, "stop_training_after_unit": "EPOCH"}}  # fmt: skip
    assert "sdcore stops all text encoders at the same point" in _problems(tmp_path, sdxl)
    zero = {**SD15_LORA, "text_encoder": {"stop_training_after": 0, "stop_training_after_unit": "STEP"}}
    assert "stops before the first step: set text_encoder.train false" in _problems(tmp_path, zero)
    clock = {**SD15_LORA, "text_encoder": {"stop_training_after": 2, "stop_training_after_unit": "HOUR"}}
    assert "not on a clock" in _problems(tmp_path, clock)


def test_families_and_methods_refused_by_name(tmp_path):
    assert "model_type 'PIXART_SIGMA'" in _problems(tmp_path, {**SD15_LORA, "model_type": "PIXART_SIGMA"})
    text = _problems(tmp_path, {**SD15_LORA, "model_type": "STABLE_DIFFUSION_15_INPAINTING"})
    assert "inpainting" in text
    assert "run it with `sdcore train lora`" in _problems(tmp_path, SD15_LORA, "dreambooth")
    assert "FINE_TUNE_VAE" in _problems(tmp_path, {**SD15_LORA, "training_method": "FINE_TUNE_VAE"})
    text = _problems(tmp_path, {**SD15_LORA, "model_type": "STABLE_DIFFUSION_XL_10_BASE"})
    assert "is a sd1 model, not sdxl" in text


def test_unknown_fields_name_the_nearest(tmp_path):
    config = {**SD15_LORA, "learning_rat": 1e-4, "unet": {"learning_rte": 1e-4}, "optimizer": {"weight_decy": 0.1}}
    text = _problems(tmp_path, config)
    assert "'learning_rat' (did you mean 'learning_rate'?)" in text
    assert "'learning_rte' (did you mean 'learning_rate'?)" in text
    assert "'weight_decy' (did you mean 'weight_decay'?)" in text


def test_old_config_versions_are_refused(tmp_path):
    assert "__version 5" in _problems(tmp_path, {**SD15_LORA, "__version": 5})
    assert _load(tmp_path, {**SD15_LORA, "__version": 11}).rank == 16


def test_samples_saves_and_sample_prompts(tmp_path):
    from sdcore.train.sample_prompts import read_sample_prompts

    samples = [
        {"prompt": "a cat", "seed": 7, "diffusion_steps": 12, "noise_scheduler": "DDIM"},
        {"prompt": "off", "enabled": False},
        {"prompt": "a dog", "random_seed": True, "cfg_scale": 5.0, "width": 640},
    ]
    config = {**SD15_LORA, "samples": samples, "sample_after": 50, "sample_after_unit": "STEP",
              "save_every": 2, "save_every_unit": "EPOCH"}  # fmt: skip
    o = _load(tmp_path, config)
    assert (o.sample_every, o.sample_at_first, o.save_every_epochs) == (50, True, 2)
    prompts = read_sample_prompts(o.sample_prompts)
    # SampleConfig defaults for SD1.5: 512x512, 30 steps, cfg 7.5, EULER_A; disabled samples are skipped
    assert [(p.prompt, p.width, p.height, p.steps, p.seed, p.cfg, p.sampler) for p in prompts] == [
        ("a cat", 512, 512, 12, 7, 7.5, "ddim"),
        ("a dog", 640, 512, 30, None, 5.0, "euler_a"),
    ]
    o = _load(tmp_path, {**config, "sample_after_unit": "MINUTE"}, notes=(notes := []))
    assert o.sample_prompts is None and any("not on a clock" in n for n in notes)


def test_step_intervals_count_batches_not_optimizer_steps(tmp_path):
    # TimedActionMixin.py:34-40 tests train_progress.global_step, which GenericTrainer.py:835 advances once per
    # batch (next_step); an optimizer step is every gradient_accumulation_steps batches (GenericTrainer.py:555),
    # and the save/sample waits for it: every 40 batches with 4 per step = every 10 optimizer steps (was: 40)
    samples = [{"prompt": "a cat"}]
    config = {**SD15_LORA, "samples": samples, "sample_after": 40, "sample_after_unit": "STEP",
              "save_every": 80, "save_every_unit": "STEP", "gradient_accumulation_steps": 4}  # fmt: skip
    o = _load(tmp_path, config)
    assert (o.gradient_accumulation, o.sample_every, o.save_every) == (4, 10, 20)
    o = _load(tmp_path, {**config, "gradient_accumulation_steps": 1})
    assert (o.sample_every, o.save_every) == (40, 80)
    text = _problems(tmp_path, {**config, "save_every": 30, "sample_after": 10})
    assert "save_every 30: OneTrainer counts it in batches, 4 per optimizer step" in text
    assert "sample_after 10: OneTrainer counts it in batches" in text


def test_flux_samples_use_guidance(tmp_path):
    from sdcore.train.onetrainer_config import read_sample_prompts

    path = _write(tmp_path, {"training_method": "LORA", "model_type": "FLUX_DEV_1", "samples": [{"prompt": "x"}]})
    (p,) = read_sample_prompts(path)
    assert (p.width, p.steps, p.cfg, p.guidance) == (1024, 30, None, 3.5)  # Flux: cfg_scale is the guidance


# --- end to end -----------------------------------------------------------------------------------------


def test_cli_trains_a_onetrainer_lora_config(tmp_path, sd_cli, pm, monkeypatch):
    """`sdcore train lora --config config.json` on tiny:sd1 with the concepts embedded: 2 images, batch 1, one
    epoch = 2 steps; the LoRA file carries the translated rank and learning rate."""
    from safetensors import safe_open
    from sdcore.testing.datasets import make_tiny_dataset

    monkeypatch.chdir(tmp_path)
    make_tiny_dataset(tmp_path / "data", n=2, size=64)
    config = {
        "training_method": "LORA", "model_type": "STABLE_DIFFUSION_15", "base_model_name": "tiny:sd1",
        "learning_rate": 0.002, "epochs": 1, "batch_size": 1, "resolution": "64", "lora_rank": 4,
        "lora_alpha": 2.0, "layer_filter_preset": "attn-mlp", "train_dtype": "FLOAT_32",
        "output_model_format": "KOHYA_LORA", "output_model_destination": "out/ot_lora.safetensors",
        "learning_rate_warmup_steps": 0, "text_encoder": {"train": False},
        "unet": {"gradient_checkpointing": False}, "sample_after_unit": "NEVER",
        "concepts": [{"path": "data/1_sks", "name": "sks", "image": {"enable_crop_jitter": False}}],
    }  # fmt: skip
    path = _write(tmp_path, config)
    result = sd_cli(["train", "lora", "--config", str(path), "--no-progress"], pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = tmp_path / "out" / "ot_lora.safetensors"
    assert out.is_file()
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert float(meta["ss_learning_rate"]) == 0.002 and meta["ss_max_train_steps"] == "2"


# --- settings mapped onto sdcore options with the same maths (each checked against OneTrainer's formula) -----

SD3_LORA = {
    "training_method": "LORA", "model_type": "STABLE_DIFFUSION_3", "base_model_name": "tiny:sd3", "epochs": 2,
    "learning_rate": 1e-4, "resolution": "1024", "output_model_format": "DIFFUSERS_LORA",
    "text_encoder": {"train": False}, "text_encoder_2": {"train": False}, "text_encoder_3": {"train": False},
}  # fmt: skip


def test_heavy_tail_is_the_mode_sampling_with_noising_weight_as_scale(tmp_path):
    import math

    import torch
    from sdcore.train.objectives import FlowMatchingObjective

    config = {**SD3_LORA, "timestep_distribution": "HEAVY_TAIL", "noising_weight": 0.8, "timestep_shift": 3.0}
    o = _load(tmp_path, config)
    assert (o.timestep_sampling, o.mode_scale, o.discrete_flow_shift) == ("mode", 0.8, 3.0)
    objective = FlowMatchingObjective(timestep_sampling="mode", shift=o.discrete_flow_shift, mode_scale=o.mode_scale)
    sdcore = objective.sample_sigmas(4096, torch.Generator().manual_seed(7))
    # ModelSetupNoiseMixin._get_timestep_discrete (HEAVY_TAIL, T = 1000), rewritten: u -> 1 - u - w (cos(pi/2 u)^2
    # - 1 + u), times T, shifted T s t / ((s - 1) t + T); BaseSD3Setup then takes sigma = (int(t) + 1) / T
    u = torch.rand(4096, generator=torch.Generator().manual_seed(7))
    w, s, T = 0.8, 3.0, 1000
    t = (1.0 - u - w * (torch.cos(math.pi / 2.0 * u) ** 2.0 - 1.0 + u)) * T
    t = T * s * t / ((s - 1) * t + T)
    torch.testing.assert_close(sdcore, (t / T).clamp(0, 1), rtol=1e-5, atol=1e-6)  # the same continuous draw
    onetrainer_sigma = (t.int() + 1).float() / T
    assert (sdcore - onetrainer_sigma).abs().max() <= 1.0 / T + 1e-6  # OneTrainer's 1000-step grid: at most 1/1000
    # outside [-1, 2 / (pi - 2)] the map is not monotone: refused by name
    assert "noising_weight 2.5" in _problems(tmp_path, {**config, "noising_weight": 2.5})


def test_flow_distributions_become_sdcore_timestep_distributions(tmp_path):
    # ModelSetupNoiseMixin: SIGMOID/COS_MAP/INVERTED_PARABOLA/BETA, and any range (narrowed before the shift), are
    # OneTrainer's own draw: sdcore's --timestep-distribution with the same weight, bias, range and shift
    o = _load(tmp_path, {**SD3_LORA, "timestep_distribution": "SIGMOID", "noising_weight": 2.0, "noising_bias": 0.1,
                         "timestep_shift": 3.0})  # fmt: skip
    assert (o.timestep_distribution, o.noising_weight, o.noising_bias, o.discrete_flow_shift) == ("sigmoid", 2, 0.1, 3)
    o = _load(tmp_path, {**SD3_LORA, "min_noising_strength": 0.2})
    assert (o.timestep_distribution, o.min_noising_strength, o.max_noising_strength) == ("uniform", 0.2, 1.0)
    o = _load(tmp_path, {**SD3_LORA, "timestep_distribution": "LOGIT_NORMAL"})  # the whole range: kohya's sampling
    assert (o.timestep_distribution, o.timestep_sampling) == (None, "logit_normal")
    assert "SD3/Flux train with flow matching" in _problems(tmp_path, {**SD3_LORA, "loss_weight_fn": "MIN_SNR_GAMMA"})


def _debiased_weights(prediction_type: str, sqrt: bool = False):
    """sdcore's --debiased-estimation-loss weights and OneTrainer's __debiased_estimation_weight (rewritten:
    rsqrt(clip(snr, max=1000) (+ 1 for v-prediction))) on SD's DDPM schedule at every timestep."""
    import torch
    from diffusers import DDPMScheduler
    from sdcore.train.loss import post_process_loss

    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type
    )
    timesteps = torch.arange(1000)
    sdcore = post_process_loss(
        torch.ones(1000), timesteps, scheduler, debiased_estimation_loss=True, debiased_estimation_sqrt=sqrt
    )
    abar = scheduler.alphas_cumprod.float()
    snr = (abar.sqrt() / (1 - abar).sqrt()) ** 2  # DiffusionScheduleCoefficients: (sqrt(abar) / sqrt(1 - abar))^2
    snr = torch.clip(snr, max=1.0e3)
    onetrainer = torch.rsqrt(snr + 1.0) if prediction_type == "v_prediction" else torch.rsqrt(snr)
    return sdcore, onetrainer


def test_debiased_estimation_maps_with_onetrainer_s_v_prediction_weight(tmp_path):
    import torch

    o = _load(tmp_path, {**SD15_LORA, "loss_weight_fn": "DEBIASED_ESTIMATION"})
    assert (o.debiased_estimation_loss, o.debiased_estimation_sqrt) == (True, False)
    sdcore, onetrainer = _debiased_weights("epsilon")
    torch.testing.assert_close(sdcore, onetrainer, rtol=1e-5, atol=0)
    # v-prediction (the SD2 768 model types): kohya's 1 / (snr + 1) is not OneTrainer's 1 / sqrt(snr + 1) ...
    sdcore, onetrainer = _debiased_weights("v_prediction")
    assert not torch.allclose(sdcore, onetrainer, rtol=1e-2)
    # ... so the config sets --debiased-estimation-sqrt, whose weight is OneTrainer's
    sdcore, onetrainer = _debiased_weights("v_prediction", sqrt=True)
    torch.testing.assert_close(sdcore, onetrainer, rtol=1e-5, atol=0)
    sd21 = {
        **SD15_LORA,
        "model_type": "STABLE_DIFFUSION_21",
        "base_model_name": "",
        "loss_weight_fn": "DEBIASED_ESTIMATION",
    }
    o = _load(tmp_path, sd21)
    assert (o.debiased_estimation_loss, o.debiased_estimation_sqrt) == (True, True)
    base = {**sd21, "model_type": "STABLE_DIFFUSION_21_BASE"}
    assert (_load(tmp_path, base).debiased_estimation_sqrt, _load(tmp_path, base).debiased_estimation_loss) == (
        False,
        True,
    )


def test_zero_terminal_snr_loss_weights_follow_onetrainer_or_say_what_differs(tmp_path):
    """OneTrainer's SNR loss weights read its rescaled scheduler (rescale_noise_scheduler_to_zero_terminal_snr).
    P2 and the v-prediction debiased weight follow it; min-SNR and the epsilon debiased weight keep kohya's
    schedule (an option of their own would be needed), and the translation says so."""
    import torch
    from diffusers import DDPMScheduler
    from sdcore.train.objectives import DdpmObjective

    rescale = {"rescale_noise_scheduler_to_zero_terminal_snr": True}
    min_snr = {**SD15_LORA, **rescale, "loss_weight_fn": "MIN_SNR_GAMMA", "loss_weight_strength": 5.0}
    notes: list[str] = []
    o = _load(tmp_path, min_snr, notes=notes)
    assert o.zero_terminal_snr and o.min_snr_gamma == 5.0
    said = [n for n in notes if "loss_weight_fn MIN_SNR_GAMMA with rescale_noise_scheduler_to_zero_terminal_snr" in n]
    assert len(said) == 1 and "before the zero-terminal rescale" in said[0], notes
    # what the note says, in numbers: sdcore's weight is the original schedule's, not the rescaled one's
    kwargs = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    plain, rescaled = DDPMScheduler(**kwargs), DDPMScheduler(**kwargs, rescale_betas_zero_snr=True)
    t = torch.arange(0, 999, 9)
    objective = DdpmObjective(DDPMScheduler(**kwargs), min_snr_gamma=5.0, zero_terminal_snr=True)
    got = objective.noised(torch.zeros(len(t), 1), torch.ones(len(t), 1), t).weights.double()
    for scheduler, same in ((plain, True), (rescaled, False)):
        abar = scheduler.alphas_cumprod.double()[t]
        snr = abar / (1 - abar)
        want = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr  # OneTrainer's __min_snr_weight, epsilon
        assert torch.allclose(got, want, rtol=1e-4) is same
    # DEBIASED_ESTIMATION: every SD setup forces v with the rescale (force_v_prediction), so its weight is the
    # v-prediction one, which follows the rescaled schedule (nothing to note), on an SD1.5 model too
    debiased = {**SD15_LORA, **rescale, "loss_weight_fn": "DEBIASED_ESTIMATION"}
    notes = []
    o = _load(tmp_path, debiased, notes=notes)
    assert (o.prediction_type, o.debiased_estimation_sqrt) == ("v_prediction", True)
    assert not any("DEBIASED_ESTIMATION with" in n for n in notes), notes
    notes = []
    o = _load(tmp_path, {**debiased, "model_type": "STABLE_DIFFUSION_21", "base_model_name": ""}, notes=notes)
    assert o.debiased_estimation_sqrt and not any("DEBIASED_ESTIMATION with" in n for n in notes), notes
    # P2 follows too; and without the rescale nothing is said
    notes = []
    _load(tmp_path, {**SD15_LORA, **rescale, "loss_weight_fn": "P2"}, notes=notes)
    notes_plain: list[str] = []
    _load(tmp_path, {**SD15_LORA, "loss_weight_fn": "MIN_SNR_GAMMA"}, notes=notes_plain)
    assert not any("zero_terminal_snr: sdcore" in n for n in [*notes, *notes_plain]), [*notes, *notes_plain]


def test_learning_rate_scaler_multiplies_every_rate_by_the_square_root(tmp_path):
    import math

    config = {**SD15_LORA, "learning_rate_scaler": "BOTH", "batch_size": 4, "gradient_accumulation_steps": 2,
              "unet": {"learning_rate": 2e-4}, "text_encoder": {"learning_rate": 5e-5}}  # fmt: skip
    notes: list[str] = []
    o = _load(tmp_path, config, notes=notes)
    # NamedParameterGroupCollection.parameters_for_optimizer: lr * get_scale(batch, accumulation) ** 0.5
    scale = (4 * 2) ** 0.5
    assert math.isclose(o.lr, 3e-4 * scale) and math.isclose(o.unet_lr, 2e-4 * scale)
    assert math.isclose(o.te_lr, 5e-5 * scale)
    assert any("sqrt(8)" in n for n in notes)
    o = _load(tmp_path, {**config, "learning_rate_scaler": "GLOBAL_BATCH"})  # world size 1 without multi_gpu
    assert math.isclose(o.unet_lr, 2e-4 * 2.0)
    assert _load(tmp_path, {**config, "learning_rate_scaler": "NONE"}).unet_lr == 2e-4


#: create.py's fallbacks for each optimizer the config leaves at OneTrainer's defaults (TC's optimizer defaults
#: are None for numbers, so create.py's values apply; booleans are TC's), rewritten by hand
CREATE_PY_ARGS = {
    "ADAM_8BIT": ("bitsandbytes.optim.Adam", {"betas": (0.9, 0.999), "weight_decay": 0, "eps": 1e-8,
                  "min_8bit_size": 4096, "percentile_clipping": 100, "block_wise": False, "is_paged": False}),
    "ADAGRAD": ("bitsandbytes.optim.Adagrad", {"weight_decay": 0, "eps": 1e-10, "lr_decay": 0,
                "initial_accumulator_value": 0}),
    "RMSPROP": ("bitsandbytes.optim.RMSprop", {"weight_decay": 0, "eps": 1e-8, "alpha": 0.99, "momentum": 0,
                "centered": False}),
    "LION_8BIT": ("lion8bit", {"weight_decay": 0, "betas": (0.9, 0.999), "min_8bit_size": 4096,
                  "percentile_clipping": 100, "block_wise": False, "is_paged": False}),
    "SCHEDULE_FREE_ADAMW": ("adamwschedulefree", {"betas": (0.9, 0.999), "weight_decay": 0.01, "eps": 1e-8, "r": 0,
                            "weight_lr_power": 2.0, "foreach": False, "warmup_steps": 200.0}),
    "SCHEDULE_FREE_SGD": ("sgdschedulefree", {"momentum": 0, "weight_decay": 0, "r": 0, "weight_lr_power": 2.0,
                          "foreach": False, "warmup_steps": 200.0}),
    "DADAPT_SGD": ("dadaptsgd", {"momentum": 0.0, "weight_decay": 0, "log_every": 0, "d0": 1e-6,
                   "fsdp_in_use": False}),
    "DADAPT_ADAM": ("dadaptadam", {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "log_every": 0,
                    "decouple": False, "use_bias_correction": False, "d0": 1e-6, "fsdp_in_use": False}),
    "DADAPT_ADAN": ("dadaptadan", {"betas": (0.98, 0.92, 0.99), "eps": 1e-8, "weight_decay": 0.02, "no_prox": False,
                    "log_every": 0, "d0": 1e-6}),
    "DADAPT_ADA_GRAD": ("dadaptadagrad", {"momentum": 0, "log_every": 0, "weight_decay": 0.0, "eps": 0.0,
                        "d0": 1e-6}),
    "DADAPT_LION": ("dadaptlion", {"betas": (0.9, 0.999), "weight_decay": 0.0, "log_every": 0, "d0": 1e-6,
                    "fsdp_in_use": False}),
    "PRODIGY_PLUS_SCHEDULE_FREE": ("prodigyplus.ProdigyPlusScheduleFree", {
        "betas": (0.9, 0.99), "weight_decay": 0.0, "weight_decay_by_lr": True, "use_bias_correction": False,
        "d0": 1e-6, "d_coef": 1.0, "prodigy_steps": 0, "use_speed": False, "eps": None, "split_groups": True,
        "split_groups_mean": True, "factored": True, "factored_fp32": True, "use_stableadamw": True,
        "use_cautious": False, "use_grams": False, "use_adopt": False, "stochastic_rounding": True,
        "d_limiter": True, "use_schedulefree": True, "schedulefree_c": 0.0, "use_orthograd": False}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CREATE_PY_ARGS))
def test_optimizers_get_every_argument_create_py_passes(tmp_path, name):
    from sdcore.train.optim import parse_optimizer_args

    optimizer, expected = CREATE_PY_ARGS[name]
    config = {**SD15_LORA, "gradient_accumulation_steps": 2, "optimizer": {"optimizer": name}}
    o = _load(tmp_path, config)
    assert o.optimizer == optimizer
    assert parse_optimizer_args(o.optimizer_args) == expected
    if name in ("SCHEDULE_FREE_ADAMW", "SCHEDULE_FREE_SGD", "PRODIGY_PLUS_SCHEDULE_FREE"):
        # create_lr_scheduler forces CONSTANT without warmup for them; the optimizer gets the 200 steps itself,
        # not divided by the accumulation (create.py passes config.learning_rate_warmup_steps)
        assert (o.lr_scheduler, o.lr_warmup_steps) == ("constant", 0)


def test_arguments_left_to_the_library_are_create_py_values():
    """growth_rate's fallback (and Prodigy's beta3 None) is left out: the installed classes' defaults must be
    create.py's values (dadaptation 3.2, prodigy-plus-schedule-free 2.0.1 as OneTrainer pins them)."""
    import inspect
    import math

    import dadaptation
    from prodigyplus import ProdigyPlusScheduleFree

    for cls in (dadaptation.DAdaptSGD, dadaptation.DAdaptAdam, dadaptation.DAdaptAdan, dadaptation.DAdaptAdaGrad):
        assert math.isinf(inspect.signature(cls).parameters["growth_rate"].default), cls
    assert inspect.signature(ProdigyPlusScheduleFree).parameters["beta3"].default is None
    # and the arguments sdcore passes are all accepted by the classes it builds
    import torch
    from sdcore.train.optim import optimizer_class, optimizer_kwargs

    for name in ("SCHEDULE_FREE_ADAMW", "DADAPT_ADAN", "DADAPT_LION", "PRODIGY_PLUS_SCHEDULE_FREE"):
        optimizer, expected = CREATE_PY_ARGS[name]
        kwargs = optimizer_kwargs(optimizer, expected)
        optimizer_class(optimizer)([torch.nn.Parameter(torch.zeros(2))], lr=1.0, **kwargs)


def test_adafactor_relative_step_is_kohyas_adafactor_schedule(tmp_path):
    from sdcore.train.optim import parse_optimizer_args

    notes: list[str] = []
    config = {**SD15_LORA, "optimizer": {"optimizer": "ADAFACTOR", "relative_step": True, "scale_parameter": True}}
    o = _load(tmp_path, config, notes=notes)
    args = parse_optimizer_args(o.optimizer_args)
    # create.py: lr=None and the groups' rates removed: Adafactor's own relative step, whatever the schedule
    assert o.optimizer == "adafactor" and args["relative_step"] is True and args["scale_parameter"] is True
    assert (o.lr_scheduler, o.lr_warmup_steps) == ("adafactor", 0)
    assert any("learning_rate_scheduler CONSTANT: no effect with Adafactor's relative_step" in n for n in notes)
    text = _problems(tmp_path, {**SD15_LORA, "learning_rate_scheduler": "ADAFACTOR"})
    assert "keeps the first parameter group's rate" in text


def test_refusals_say_why_the_maths_differs(tmp_path):
    text = _problems(tmp_path, {**SD15_LORA, "perturbation_noise_weight": 0.1, "loss_scaler": "BATCH",
                                "learning_rate_scheduler": "REX"})  # fmt: skip
    assert "--ip-noise-gamma perturbs the input only" in text
    assert "loss_scaler 'BATCH'" in text and "REX's" in text
    assert "runs its own copy" in _problems(tmp_path, {**SD15_LORA, "optimizer": {"optimizer": "CAME"}})
    # the mask settings are OneTrainer's no-ops without masked_training: a note, not a refusal
    notes: list[str] = []
    _load(tmp_path, {**SD15_LORA, "unmasked_weight": 0.3}, notes=notes)
    assert any("unmasked_weight: accepted, no effect without masked_training" in n for n in notes)
    text = _problems(tmp_path, {**SD15_LORA, "masked_training": True, "unmasked_weight": 1.5})
    assert "unmasked_weight 1.5" in text and "[0, 1]" in text


# --- masked training (TC: masked_training False, unmasked_probability 0.1, unmasked_weight 0.1,
# normalize_masked_area_loss False, masked_prior_preservation_weight 0.0; ModelSetupDiffusionLossMixin /
# util/loss/masked_loss.py: loss * clamp(mask, unmasked_weight, 1), / its mean when normalising) -------------


def test_masked_preset_shape_translates_to_onetrainers_mask_rule(tmp_path):
    # the shape of OneTrainer's "#sd 1.5 masked" preset (its fields, values written here): FINE_TUNE, masked,
    # normalised, max_noising_strength 0.8; unmasked_weight/probability left at TC's defaults
    config = {
        "training_method": "FINE_TUNE", "model_type": "STABLE_DIFFUSION_15", "base_model_name": "tiny:sd1",
        "batch_size": 4, "masked_training": True, "normalize_masked_area_loss": True, "max_noising_strength": 0.8,
        "output_model_format": "ORIGINAL_SINGLE_FILE", "output_model_destination": "models/model.safetensors",
        "resolution": "512", "vae": {"weight_dtype": "FLOAT_32"},
    }  # fmt: skip
    notes: list[str] = []
    o = _load(tmp_path, config, "dreambooth", notes=notes)
    assert (o.masked_loss, o.masked_loss_unmasked_weight, o.masked_loss_normalize) == (True, 0.1, True)
    assert o.max_timestep == 800 and o.batch_size == 4  # the preset's other fields still translate
    # unmasked_probability only feeds RandomLatentMaskRemove, which OneTrainer adds for inpainting models only
    assert any("unmasked_probability 0.1: no effect" in n for n in notes)
    lora = _load(tmp_path, {**SD15_LORA, "masked_training": True, "unmasked_weight": 0.0})
    assert (lora.masked_loss, lora.masked_loss_unmasked_weight, lora.masked_loss_normalize) == (True, 0.0, False)
    off = _load(tmp_path, SD15_LORA)  # OneTrainer's default: no masks, kohya's defaults kept
    assert (off.masked_loss, off.masked_loss_unmasked_weight, off.masked_loss_normalize) == (False, 0.0, False)
    # masked prior preservation is a LoRA-only second forward without the LoRA: refused there, a no-op elsewhere
    text = _problems(tmp_path, {**SD15_LORA, "masked_training": True, "masked_prior_preservation_weight": 0.5})
    assert "masked_prior_preservation_weight 0.5" in text and "base model's own prediction" in text
    notes = []
    _load(tmp_path, {**config, "masked_prior_preservation_weight": 0.5}, "dreambooth", notes=notes)
    assert any("masked_prior_preservation_weight: accepted, no effect" in n for n in notes)


def test_cli_trains_a_masked_onetrainer_lora_config(tmp_path, sd_cli, pm, monkeypatch):
    """`sdcore train lora --config` with masked_training: the concept's -masklabel.png masks are read (one
    image has none: a full mask) and the run trains; a mask file that is not an image stops it before."""
    import numpy as np
    from PIL import Image
    from sdcore.testing.datasets import make_tiny_dataset

    monkeypatch.chdir(tmp_path)
    folder = make_tiny_dataset(tmp_path / "data", n=2, size=64) / "1_sks"
    grey = np.zeros((64, 64), dtype=np.uint8)
    grey[:, 32:] = 255
    Image.fromarray(grey, "L").save(folder / "000-masklabel.png")
    config = {
        "training_method": "LORA", "model_type": "STABLE_DIFFUSION_15", "base_model_name": "tiny:sd1",
        "learning_rate": 0.002, "epochs": 1, "batch_size": 2, "resolution": "64", "lora_rank": 4,
        "layer_filter_preset": "attn-mlp", "train_dtype": "FLOAT_32", "output_model_format": "KOHYA_LORA",
        "output_model_destination": "out/masked.safetensors", "learning_rate_warmup_steps": 0,
        "text_encoder": {"train": False}, "unet": {"gradient_checkpointing": False}, "sample_after_unit": "NEVER",
        "masked_training": True, "unmasked_weight": 0.1, "normalize_masked_area_loss": True,
        "concepts": [{"path": "data/1_sks", "name": "sks", "image": {"enable_crop_jitter": False}}],
    }  # fmt: skip
    path = _write(tmp_path, config)
    result = sd_cli(["train", "lora", "--config", str(path), "--no-progress"], pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (tmp_path / "out" / "masked.safetensors").is_file()
    (folder / "001-masklabel.png").write_bytes(b"not an image")
    result = sd_cli(["train", "lora", "--config", str(path), "--no-progress"], pm=pm)
    assert result.exit_code != 0 and "-masklabel mask(s) unreadable" in result.output


def test_lokr_options_map_to_lycoris_lokr(tmp_path):
    # TrainConfig: lokr_dim 16, lokr_decompose_factor -1, lokr_decompose_both False, lokr_use_tucker False;
    # LoRAModule's LoKr builds w1_a/w1_b and lokr_t2 under LyCORIS' conditions (the same keys)
    config = {**SD15_LORA, "peft_type": "LOKR", "lokr_dim": 8, "lokr_decompose_factor": 4,
              "lokr_decompose_both": True, "lokr_use_tucker": True}  # fmt: skip
    o = _load(tmp_path, config)
    assert (o.algo, o.rank, o.lokr_factor, o.decompose_both, o.use_tucker) == ("lokr", 8, 4, True, True)
    o = _load(tmp_path, {**SD15_LORA, "peft_type": "LOKR"})
    assert (o.algo, o.rank, o.decompose_both, o.use_tucker) == ("lokr", 16, False, False)


def test_every_resolution_form_onetrainer_reads(tmp_path):
    """MGDS reads ``resolution`` with Python's int per comma part (mgds 3a6994a src/mgds/pipelineModules/
    SingleAspectCalculation.py:81, AspectBucketing.py:188-190), and, with aspect_ratio_bucketing, text with an 'x'
    and no comma as a fixed size WIDTHxHEIGHT that every image covers and is cropped to (AspectBucketing.py:182-208;
    without bucketing SingleAspectCalculation's int('1024x1024') fails). A square fixed size is sdcore's
    buckets-off square crop."""
    o = _load(tmp_path, {**SD15_LORA, "resolution": "+768"})
    assert (o.resolution, o.resolutions) == (768, "")
    o = _load(tmp_path, {**SD15_LORA, "resolution": " 512 , 768,512", "latent_caching": False})
    assert (o.resolution, o.resolutions, o.resolution_draw) == (768, "512,768,512", "epoch")
    o = _load(tmp_path, {**SD15_LORA, "resolution": "1024x1024", "aspect_ratio_bucketing": True})
    assert (o.resolution, o.resolutions, o.buckets) == (1024, "", False)
    text = _problems(tmp_path, {**SD15_LORA, "resolution": "1024x1024", "aspect_ratio_bucketing": False})
    assert "resolution '1024x1024': OneTrainer reads a fixed size only with aspect_ratio_bucketing" in text
    # AspectBucketing reads "1024x768" as width 1024, height 768 (target (h, w) = (768, 1024)): every image covers
    # it and is cropped to it, sdcore's kohya W,H without buckets (the side of the area, isqrt(1024*768) = 886)
    o = _load(tmp_path, {**SD15_LORA, "resolution": "1024x768", "aspect_ratio_bucketing": True})
    assert (o.resolution, o.resolution_size, o.buckets) == (886, (1024, 768), False)
    # AspectBucketing puts a fixed size on the family's grid with Python's round (8 for SD1.5: 1000 stays, 1003 ->
    # 1000, 1004 -> 1008 and 764, 772 -> 768 (round half to even: 125.5 -> 126, 96.5 -> 96); 64 for SDXL: 1000 -> 1024), with a note where it moved
    notes: list[str] = []
    o = _load(tmp_path, {**SD15_LORA, "resolution": "1000x768", "aspect_ratio_bucketing": True}, notes=notes)
    assert (o.resolution_size, o.buckets) == ((1000, 768), False)
    assert not any("rounds a fixed size" in note for note in notes)
    for written, fixed in (("1003x764", (1000, 768)), ("1004x772", (1008, 768))):
        notes = []
        o = _load(tmp_path, {**SD15_LORA, "resolution": written, "aspect_ratio_bucketing": True}, notes=notes)
        assert o.resolution_size == fixed
        assert any(f"resolution {written}: OneTrainer rounds a fixed size to its grid, so the images are cropped "
                   f"to {fixed[0]}x{fixed[1]}" in note for note in notes), notes  # fmt: skip
    sdxl = {**SD15_LORA, "model_type": "STABLE_DIFFUSION_XL_10_BASE", "base_model_name": "tiny:sdxl"}
    o = _load(tmp_path, {**sdxl, "resolution": "1000x768", "aspect_ratio_bucketing": True})
    assert o.resolution_size == (1024, 768)
    text = _problems(tmp_path, {**sdxl, "resolution": "30x768", "aspect_ratio_bucketing": True})
    assert "resolution '30x768': on OneTrainer's grid of 64 this size has a side of 0" in text
    assert "'12a'" in _problems(tmp_path, {**SD15_LORA, "resolution": "512,12a"})


def test_the_bucket_rule_and_grid_follow_the_family(tmp_path):
    """OneTrainer's buckets on its family loader's ``aspect_bucketing_quantization``: 8 for SD, 64 for SDXL, also
    with bucketing off (its square crop rounds as its buckets do)."""
    o = _load(tmp_path, SD15_LORA)
    assert (o.bucket_rule, o.bucket_step, o.buckets) == ("onetrainer", 8, True)
    o = _load(tmp_path, {**SDXL_LORA_PRESET_KEYS, "aspect_ratio_bucketing": False})
    assert (o.bucket_rule, o.bucket_step, o.buckets) == ("onetrainer", 64, False)


def test_images_resize_as_mgds_scale_crop_image(tmp_path):
    """MGDS ScaleCropImage resizes with torchvision's Resize(BILINEAR, antialias=True) on float tensors; a OneTrainer
    config resizes with PIL's bilinear, which antialiases too: the same pixels within a level of rounding, where
    sdcore's default (area when shrinking, as kohya) is several levels away."""
    import numpy as np
    import torch
    from PIL import Image, ImageFilter
    from sdcore.data.loading import resize_for_bucket

    o = _load(tmp_path, SD15_LORA)
    assert o.resize_interpolation == "bilinear"
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(2))
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    for size in ((96, 64), (600, 400)):  # shrinking and enlarging
        mgds = torch.nn.functional.interpolate(tensor, size=size[::-1], mode="bilinear", antialias=True)
        mgds = mgds[0].permute(1, 2, 0).numpy() * 255
        ours = np.asarray(resize_for_bucket(image, size, o.resize_interpolation), dtype=np.float64)
        assert np.abs(ours - mgds).max() <= 1.0 + 1e-3  # float32 rounding of the reference
        if size == (96, 64):
            kohya = np.asarray(resize_for_bucket(image, size, None), dtype=np.float64)
            assert np.abs(kohya - mgds).max() > 3.0


def test_kohyas_no_upscale_with_onetrainers_buckets_is_a_preflight_problem():
    from sdcore.train.options import TrainOptions
    from sdcore.train.preflight import bucket_rule_problems

    assert bucket_rule_problems(TrainOptions(bucket_rule="onetrainer")) == []
    assert bucket_rule_problems(TrainOptions(bucket_no_upscale=True)) == []  # kohya's own
    (problem,) = bucket_rule_problems(TrainOptions(bucket_rule="onetrainer", bucket_no_upscale=True))
    assert "--bucket-no-upscale" in problem and "--bucket-rule onetrainer" in problem
    (problem,) = bucket_rule_problems(TrainOptions(bucket_rule="onetrainer", bucket_step=0))
    assert "must be positive" in problem


#: a config with the keys of OneTrainer's SDXL LoRA preset (training_presets/SDXL/#sdxl 1.0 LoRA.json: its field
#: names, values written here for a tiny run); the preset sets no concepts: OneTrainer's default concept (crop
#: jitter on) with latent caching on (the default)
SDXL_LORA_PRESET_KEYS = {
    "backup_after": 10, "base_model_name": "tiny:sdxl", "batch_size": 2, "layer_filter_preset": "attn-mlp",
    "learning_rate": 0.0003, "model_type": "STABLE_DIFFUSION_XL_10_BASE", "output_model_destination":
    "out/sdxl_lora.safetensors", "output_model_format": "KOHYA_LORA", "resolution": "64", "training_method": "LORA",
    "unet": {"weight_dtype": "FLOAT_16"}, "text_encoder": {"train": False, "weight_dtype": "FLOAT_16"},
    "text_encoder_2": {"train": False, "weight_dtype": "FLOAT_16"}, "vae": {"weight_dtype": "FLOAT_32"},
}  # fmt: skip


def test_cli_trains_the_sdxl_lora_preset_with_crop_jitter_and_cached_latents(tmp_path, sd_cli, pm, monkeypatch):
    """The SDXL LoRA preset's keys with a concept whose crop jitter is on (OneTrainer's default) and latents cached
    (its default): 4 wide images, batch 2, one epoch = 2 steps (``--mixed-precision no``: fp16 needs CUDA). The
    cache holds each image encoded from one crop drawn in the scaled image's excess (MGDS ``ScaleCropImage``'s
    ``randint(0, scaled - crop)``, kept by its ``DiskCache``): not every image at the centre crop."""
    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 100, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a photo number {i}", encoding="utf-8")
    config = {**SDXL_LORA_PRESET_KEYS, "epochs": 1, "learning_rate_warmup_steps": 0, "sample_after_unit": "NEVER",
              "concepts": [{"path": "data", "name": "c", "image": {"enable_crop_jitter": True}}]}  # fmt: skip
    path = _write(tmp_path, config)
    args = ["train", "lora", "--config", str(path), "--mixed-precision", "no", "--no-progress",
            "--cache-latents-to-disk", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    result = sd_cli(args, pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = tmp_path / "out" / "sdxl_lora.safetensors"
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    # OneTrainer's LoRA defaults (rank 16, alpha 1), the preset's rate, 2 steps; attn-mlp: the attention blocks
    assert meta["ss_network_dim"] == "16" and float(meta["ss_network_alpha"]) == 1.0
    assert float(meta["ss_learning_rate"]) == 0.0003 and meta["ss_max_train_steps"] == "2"
    assert keys and all(k.startswith("lora_unet_") for k in keys)  # no text encoder: its train is false
    assert not any(part in k for k in keys for part in ("in_layers", "out_layers", "emb_layers", "skip_connection"))
    files = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(files) == 4
    crops = []
    for file in files:
        with np.load(file) as stored:
            crops.append(tuple(int(x) for x in stored["crop"]))
    # OneTrainer's buckets at 64 on SDXL's grid of 64: a 100x64 image goes to 128x64 and is scaled to 128x82, so
    # the excess is top and bottom
    assert all(left == 0 for _, left in crops)
    assert len({top for top, _ in crops}) > 1  # drawn per image, not one centre crop for all


def test_cli_trains_a_onetrainer_config_in_onetrainers_buckets(tmp_path, sd_cli, pm, monkeypatch):
    """An SD1 config with aspect_ratio_bucketing (OneTrainer's default) trains each image in the bucket MGDS's
    ``AspectBucketing`` gives it on SD's grid of 8 (80x56 for a 100x64 image, no kohya bucket: its sides step by
    64), scaled as MGDS scales it and centre-cropped (crop jitter off): the cached latents have those sizes, the
    dry run lists those buckets."""
    import sys

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parents[1] / "packages" / "sdcore" / "tests" / "data"))
    from test_onetrainer_buckets import mgds_assign  # MGDS's rule written out

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"wide": (100, 64), "tall": (64, 120), "square": (64, 64), "near": (90, 70)}
    for stem, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data / f"{stem}.png")
        (data / f"{stem}.txt").write_text(f"a {stem} photo", encoding="utf-8")
    config = {
        "training_method": "LORA", "model_type": "STABLE_DIFFUSION_15", "base_model_name": "tiny:sd1",
        "learning_rate": 0.002, "epochs": 1, "batch_size": 1, "resolution": "64", "lora_rank": 2,
        "layer_filter_preset": "attn-mlp", "train_dtype": "FLOAT_32", "output_model_format": "KOHYA_LORA",
        "output_model_destination": "out/ot.safetensors", "learning_rate_warmup_steps": 0,
        "text_encoder": {"train": False}, "unet": {"gradient_checkpointing": False}, "sample_after_unit": "NEVER",
        "aspect_ratio_bucketing": True,
        "concepts": [{"path": "data", "name": "c", "image": {"enable_crop_jitter": False}}],
    }  # fmt: skip
    path = _write(tmp_path, config)
    want = {}  # stem -> (bucket (w, h), centre crop (top, left))
    for stem, (w, h) in sizes.items():
        (scale_h, scale_w), (crop_h, crop_w) = mgds_assign(h, w, 64, 8)
        want[stem] = ((crop_w, crop_h), ((scale_h - crop_h) // 2, (scale_w - crop_w) // 2))
    assert any(bw % 64 or bh % 64 for (bw, bh), _ in want.values())  # not on kohya's 64 step
    assert len({bucket for bucket, _ in want.values()}) == 4

    dry = sd_cli(["train", "lora", "--config", str(path), "--dry-run"], pm=pm)
    assert dry.exit_code == 0, dry.output
    (line,) = [line for line in dry.output.splitlines() if line.startswith("buckets:")]
    assert all(f"{bw}x{bh}: 1" in line for (bw, bh), _ in want.values()), line

    args = ["train", "lora", "--config", str(path), "--no-progress", "--cache-latents-to-disk",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    result = sd_cli(args, pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    files = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(files) == 4
    for file in files:
        stem = file.name.split("_")[0]
        (bw, bh), crop = want[stem]
        with np.load(file) as stored:
            assert stored["latents"].shape[-2:] == (bh // 8, bw // 8), file.name
            assert tuple(int(x) for x in stored["crop"]) == crop, file.name
            assert tuple(int(x) for x in stored["original_size"]) == sizes[stem][::-1]


def test_a_config_without_train_dtype_says_fp16_is_onetrainers_default(tmp_path, sd_cli, pm, monkeypatch):
    """OneTrainer's TrainConfig defaults train_dtype to FLOAT_16 (its UI saves the field; a hand-written config
    may leave it out): sdcore keeps that precision (never changed in silence) and says where it came from and what
    to set instead, since on a machine without CUDA the pre-flight then refuses an fp16 the user never typed."""
    from sdcore.testing.datasets import make_tiny_dataset

    notes: list[str] = []
    o = _load(tmp_path, SD15_LORA, notes=notes)
    assert o.mixed_precision == "fp16"  # OneTrainer's default, kept
    (said,) = [note for note in notes if "train_dtype" in note]
    assert "train_dtype is not set" in said and "OneTrainer's default FLOAT_16" in said
    assert '"train_dtype": "FLOAT_32"' in said and "--mixed-precision no" in said
    given: list[str] = []  # the config sets it: nothing to say
    assert _load(tmp_path, {**SD15_LORA, "train_dtype": "FLOAT_16"}, notes=given).mixed_precision == "fp16"
    assert not [note for note in given if "train_dtype" in note]
    from sdcore.train.config import load_options

    overridden: list[str] = []  # --mixed-precision on the command line replaces it: nothing to say either
    path = _write(tmp_path, SD15_LORA)
    o = load_options(_options_class("lora"), path, {"mixed_precision": "no"}, notes=overridden)
    assert o.mixed_precision == "no" and not [note for note in overridden if "train_dtype" in note]

    # the CPU run: the note names the cause right above the pre-flight's refusal
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    make_tiny_dataset(tmp_path / "data", n=2, size=64)
    config = {**SD15_LORA, "resolution": "64", "epochs": 1, "batch_size": 1, "output_model_destination": "out/l.safetensors",
              "concepts": [{"path": "data/1_sks", "name": "sks"}]}  # fmt: skip
    config.pop("unet"), config.pop("text_encoder"), config.pop("vae")
    result = sd_cli(["train", "lora", "--config", str(_write(tmp_path, config, "ot.json")), "--dry-run"], pm=pm)
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    note = next(i for i, line in enumerate(lines) if "train_dtype is not set" in line)
    error = next(i for i, line in enumerate(lines) if line.startswith("Error: --mixed-precision fp16"))
    assert lines[note].startswith("note: ") and note < error
    with_flag = sd_cli(
        ["train", "lora", "--config", str(tmp_path / "ot.json"), "--mixed-precision", "no", "--dry-run"], pm=pm
    )
    assert with_flag.exit_code == 0, with_flag.output

"""kohya sd-scripts option names, in one table used by ``sdcore train`` and ``--config``.

A kohya user's command line (``--network_dim 16 --output_dir out --output_name x ...``) and
training TOML (flat as the kohya_ss GUI writes it, or in ``[model_arguments]``-style sections)
work unchanged: every kohya name is translated to sdcore's option here, once.

- :data:`ALIASES`: kohya name -> sdcore option (with a value converter where kohya writes values
  differently, e.g. ``resolution = "512,512"`` or ``optimizer_type = "AdamW8bit"``). An alias
  applies to a method when its options have the target field (``network_dim`` -> ``rank`` only
  for LoRA).
- Composite names are translated in :func:`translate`: ``output_dir`` + ``output_name`` +
  ``save_model_as`` -> ``output``; ``network_module`` + ``network_args`` -> the LoRA algorithm and
  its settings; ``max_train_epochs`` overrides ``max_train_steps`` as in kohya.
- :data:`IGNORED`: options that do not change the trained result here (attention kernels, data
  loader workers, logging): accepted with one note.
- :data:`UNSUPPORTED`: options that would change the result and sdcore does not implement:
  accepted while they hold their "off" value (what the kohya_ss GUI writes for untouched fields),
  an error naming them otherwise.
- kohya_ss GUI configs (JSON with the GUI's own field names): :mod:`.kohya_gui` turns them into
  these names first, then the same table applies.
- :data:`KOHYA_DEFAULTS`: where kohya's default differs from sdcore's and decides what trains
  (kohya trains the text encoder too, dim 4, alpha 1, no buckets, 1600 steps, learning rate 2e-6, ``.caption``
  captions, float32 saves) or what is written, a run written with kohya names gets kohya's default, with a note
  saying so.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from .loss import HUBER_SCHEDULES, LOSS_TYPES
from .optim import LR_SCHEDULES, OPTIMIZER_TABLE


def _text(value: Any) -> str:
    return str(value).strip()


def resolution_value(value: Any) -> int | tuple[int, int]:
    """kohya: ``512``, ``"512"``, ``"512,512"`` -> ``512``; ``"768,512"`` or ``[768, 512]`` -> ``(768, 512)``
    (0 stays 0, sdcore's "the model's native size"). The pair is kept because kohya builds its buckets on the
    exact area ``w * h`` and crops to ``w`` x ``h`` with buckets off (:func:`split_resolution` makes it
    ``resolution`` = its side plus ``resolution_size``); a square pair is its side, as kohya trains it the same."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (list, tuple)):
        parts = [int(v) for v in value]
    else:
        parts = [int(float(p)) for p in str(value).replace(" ", "").split(",") if p]
    if len(parts) == 1:
        parts *= 2
    if parts == [0, 0]:
        return 0  # sdcore's own spelling of "the model's native size"
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError
    return parts[0] if parts[0] == parts[1] else (parts[0], parts[1])


def resolution_side(value: Any) -> int:
    """kohya: ``512``, ``"512"``, ``"512,768"`` or ``[512, 768]`` -> the side of the same area (0 stays 0)."""
    read = resolution_value(value)
    from ..data.buckets import area_side

    return area_side(read)


def split_resolution(resolution: Any, size: Any) -> tuple[int, tuple[int, int] | None]:
    """``(resolution, resolution_size)`` of the options from a ``resolution`` in any spelling (int, ``"W,H"``,
    ``[W, H]``) and a ``resolution_size`` given beside it (a dumped config's ``[W, H]``, else ``None``): a pair
    becomes its side ``isqrt(W*H)`` and the pair; a plain side keeps a given size only where it is that size's
    side. Raises ``ValueError`` for what is not a resolution."""
    from ..data.buckets import area_side

    read = resolution_value(resolution)
    if not isinstance(read, int):
        return area_side(read), read
    if size is None:
        return read, None
    given = resolution_value(size)
    if isinstance(given, int) or area_side(given) != read:
        return read, None
    return read, given


def _args_text(value: Any) -> str:
    """kohya lists ``["weight_decay=0.1", "betas=0.9,0.99"]`` -> sdcore's ``"weight_decay=0.1 betas=0.9,0.99"``."""
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value if _text(v))
    return _text(value)


def _pair_text(value: Any) -> str:
    """kohya's ``"2.0,4.0"`` (CLI) or ``[2.0, 4.0]`` (TOML) -> ``"2.0,4.0"``."""
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return _text(value)


def _precision(value: Any) -> str:
    text = _text(value).lower()
    return {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(text, text)


def _te_rates(value: Any) -> float | str | tuple[float, ...] | None:
    """``text_encoder_lr`` (argparse ``nargs="*"``): one number, or a list whose values are one per text
    encoder. A list of one value (or of equal ones) is that rate; different values stay a tuple, which
    :func:`kohya_text_encoder_rates` gives to the encoders once the model's family is known. A rate of 0
    keeps the encoders' modules untrained, as in kohya (:func:`_zero_is_a_value`)."""
    if isinstance(value, (list, tuple)):
        rates = tuple(float(v) for v in value)
        if not rates:
            return None
        return _zero_is_a_value(rates[0]) if len(set(rates)) == 1 else rates
    return _zero_is_a_value(value)


def kohya_text_encoder_rates(values: dict[str, Any], family: str | None, where: str) -> tuple[list[str], list[str]]:
    """Give a ``text_encoder_lr`` list of different rates (``values["te_lr"]`` a tuple, :func:`_te_rates`) to the
    text encoders as kohya's ``train_network.py`` does for the model's family, in place; (notes, problems).

    SD3 (``networks.lora_sd3``): CLIP-L, CLIP-G, T5; two values give CLIP-G's to T5 too, values past the third
    are unused. Flux and Chroma (``networks.lora_flux``): CLIP-L, T5 (Chroma has T5 only: the second value).
    SD1/SD2/SDXL: ``networks.lora`` (and LyCORIS) take one rate, so kohya passes the first value to every
    text encoder. The T5 rate applies only when T5 trains (``train_t5xxl``)."""
    rates = values.get("te_lr")
    if not isinstance(rates, tuple):
        return [], []
    shown = "[" + ", ".join(f"{r:g}" for r in rates) + "]"
    values["te_lr"] = None
    if family is None:
        return [], [
            f"{where}: text_encoder_lr {shown}: which text encoder each rate is for depends on the model family "
            "(kohya: SD3 CLIP-L, CLIP-G, T5; Flux CLIP-L, T5; SD1/SDXL the first for all), which cannot be read "
            "before loading; set te1_lr/te2_lr/te3_lr"
        ]
    if values.get("unet_only"):
        return [f"text_encoder_lr {shown}: no effect with network_train_unet_only (as in kohya)"], []
    if family == "sd3":
        per_slot = {1: rates[0], 2: rates[1], 3: rates[2] if len(rates) > 2 else rates[1]}
        used = 3
    elif family in ("flux", "chroma"):
        per_slot, used = {1: rates[0], 3: rates[1]}, 2
    else:
        values["te_lr"] = rates[0]
        return [
            f"text_encoder_lr {shown}: kohya's networks.lora takes one text-encoder rate, so every text encoder "
            f"trains at the first, {rates[0]:g} (set te2_lr for CLIP-G's own rate)"
        ], []
    notes = [f"text_encoder_lr {shown}: the values after the first {used} are unused (as in kohya's {family} network)"]
    notes = notes if len(rates) > used else []
    if family == "chroma":
        per_slot.pop(1)  # Chroma's only text encoder is T5 (lora_te3): kohya gives it the second value
    if 3 in per_slot and not values.get("train_t5"):
        per_slot.pop(3)  # kohya trains T5 only with train_t5xxl
    given = [f"te{slot}_lr" for slot in per_slot if values.get(f"te{slot}_lr") is not None]
    if given:
        return [], [f"{where}: text_encoder_lr {shown} and {', '.join(given)} both set a text encoder's rate"]
    for slot, rate in per_slot.items():
        values[f"te{slot}_lr"] = rate
    return notes, []


def _zero_is_a_value(value: Any) -> float | str:
    """A kohya number whose 0 is a value, not "unset", passed on as the text ``"0"``, which the config layer's rule
    for kohya_ss's untouched fields (a numeric 0 of an optional option means None) leaves as it is:

    * rates whose 0 freezes a part: ``learning_rate_te{1,2,3}`` (sdxl_train.py, sd3_train.py: "0 means not
      train"), ``learning_rate_te`` (train_db.py, fine_tune.py: the text encoder's optimizer group at rate 0) and the
      LoRA scripts' ``unet_lr`` / ``text_encoder_lr`` (networks/lora*.py ``prepare_optimizer_params`` leave a 0-rate
      group out of the optimizer; only modules a ``network_reg_lrs`` rule gives a rate still train); the kohya_ss
      GUI writes no 0 rate (its presets' 0 is turned into train flags first);
    * ``guidance_scale`` (flux_train_network.py / flux_train.py feed ``float(args.guidance_scale)`` to the guidance
      embedding; kohya's docs ask 0.0 for Chroma; ``--guidance-scale``'s None is "not given"); the kohya_ss GUI's
      LoRA tab, which writes no 0, drops it first (:mod:`.kohya_gui`)."""
    number = float(value)
    return "0" if number == 0 else number


def _is_zero_rate(value: Any) -> bool:
    try:
        return value is not None and not isinstance(value, bool) and float(value) == 0
    except (TypeError, ValueError):
        return False


def kohya_zero_rate_notes(values: Mapping[str, Any], origin: Mapping[str, str], fields: Collection[str]) -> list[str]:
    """A note for each part a kohya rate of 0 keeps frozen (:func:`_zero_is_a_value`), so that a run whose
    U-Net or text encoder does not move says why: LoRA's ``unet_lr`` / ``text_encoder_lr`` (a ``network_reg_lrs``
    rule's rate still trains its modules, as kohya's lora_flux puts those groups first), DreamBooth's
    ``learning_rate_te`` (train_db.py / fine_tune.py)."""
    notes: list[str] = []
    lora = "unet_only" in fields
    rules = " (except the modules a network_reg_lrs rule gives a rate)" if values.get("module_lrs") else ""
    why = "kohya leaves a 0-rate group out of the optimizer" if lora else "kohya trains it at rate 0"
    trains_te = not _is_off(values.get("train_text_encoder"), _OFF) and _is_off(values.get("unet_only"), _OFF)
    unet_zero = origin.get("unet_lr") == "unet_lr" and _is_zero_rate(values.get("unet_lr"))
    if lora and unet_zero and _is_off(values.get("te_only"), _OFF):
        notes.append(f"unet_lr = 0: the U-Net's LoRA modules stay untrained{rules} ({why})")
    name = origin.get("te_lr")
    if name in ("text_encoder_lr", "learning_rate_te") and _is_zero_rate(values.get("te_lr")) and trains_te:
        what = "the text encoders' LoRA modules stay untrained" + rules if lora else "the text encoder stays frozen"
        notes.append(f"{name} = 0: {what} ({why})")
    return notes


#: kohya optimizer_type (lower case) -> (sdcore optimizer, extra optimizer args kohya implies): sdcore's
#: optimizer table has kohya's names; kohya's Adafactor computes its own rate unless told otherwise
OPTIMIZERS = {name: (name, "") for name in OPTIMIZER_TABLE if name != "sgd"} | {
    "adafactor": ("adafactor", "relative_step=True")
}
#: kohya lr_scheduler -> sdcore (the same names: transformers' schedules, diffusers' piecewise_constant)
SCHEDULERS = {name: name for name in LR_SCHEDULES}


def _optimizer(value: Any) -> str:
    """A table name (any case) -> sdcore's; any other name is a class path, checked by the pre-flight
    (kohya: ``module.Class``, or a bare name from ``torch.optim``)."""
    text = _text(value)
    if text.lower() in OPTIMIZER_TABLE:
        return text.lower()
    if not all(part.isidentifier() for part in text.split(".")):
        raise ValueError(f"available: {', '.join(OPTIMIZERS)}, or a class path such as came_pytorch.CAME")
    return text


def _steps_or_ratio(value: Any) -> int | float:
    """kohya's ``lr_warmup_steps``/``lr_decay_steps`` (``int_or_float``): a step count, or a float
    below 1 (or ``"10%"``) as a ratio of the total steps."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            ratio = float(text[:-1]) / 100.0
            if not 0 <= ratio < 1:
                raise ValueError("a percentage must be between 0% and 100%")
            return ratio
        number = float(text)
        value = int(text) if number >= 1 else number  # kohya: int("1.5") is an error
    if isinstance(value, float) and value >= 1:
        raise ValueError(
            "kohya reads a float as a ratio of the total steps (times the steps); write an integer step count"
        )
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _named(table: Mapping[str, str] | Sequence[str], note: str = "") -> Callable[[Any], str]:
    """A converter for a kohya option whose value is one of ``table``'s names (case-insensitive),
    giving sdcore's name for it (a sequence maps each name to itself)."""
    names = dict(table) if isinstance(table, Mapping) else {name: name for name in table}

    def convert(value: Any) -> str:
        name = _text(value).lower()
        if name not in names:
            raise ValueError(f"available: {', '.join(names)}{note}")
        return names[name]

    return convert


_scheduler = _named(SCHEDULERS)


#: kohya's flow-matching samplings (flux_train_network.py) -> sdcore's: kohya "shift" is its sigmoid
#: sampling followed by the --discrete_flow_shift time shift (sdcore's sigmoid with the shift); kohya's
#: uniform and sigmoid do not shift (see :func:`kohya_flow_semantics`), its sigma and flux_shift are sdcore's
FLOW_SAMPLINGS = {"sigma": "sigma", "uniform": "uniform", "sigmoid": "sigmoid", "shift": "sigmoid",
                  "flux_shift": "flux_shift", "logit_normal": "logit_normal", "mode": "mode"}  # fmt: skip
#: kohya's --weighting_scheme (train_util.py; "none" is "uniform" there too): sdcore's option of the same name
WEIGHTING_SCHEMES = {"uniform": "uniform", "none": "uniform", "logit_normal": "logit_normal", "mode": "mode",
                     "sigma_sqrt": "sigma_sqrt", "cosmap": "cosmap"}  # fmt: skip
#: kohya Flux's --model_prediction_type values (sdcore's "x0" is how kohya's SD3 script reads the output)
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled", "x0")


_flow_sampling = _named(FLOW_SAMPLINGS)
_weighting_scheme = _named(WEIGHTING_SCHEMES)
_model_prediction_type = _named(MODEL_PREDICTION_TYPES)


_loss_type = _named(LOSS_TYPES)
_huber_schedule = _named(HUBER_SCHEDULES)


def _v_parameterization(value: Any) -> str:
    """kohya's ``--v_parameterization`` (store_true; the GUI writes false) -> ``--prediction-type``: v, or the
    model's own (auto) where it is off; sdcore, unlike kohya, also reads a v-prediction file's own marker."""
    return "auto" if _is_off(value, _OFF) else "v_prediction"


def _off_is_zero(value: Any) -> float:
    """kohya's ``v_pred_like_loss`` defaults to None (off); the GUI writes 0 for off."""
    if isinstance(value, str) and value.strip().lower() in ("", "none", "false"):
        return 0.0
    return float(value)


def _unless_zero(value: Any) -> Any:
    """kohya tests these options for truth (``if args.ip_noise_gamma:``) and kohya_ss writes 0 for
    an untouched field; 0 is sdcore's "not set" (None), so a GUI preset's 0 never trips a check
    that only applies when the option is on (adaptive_noise_scale needs noise_offset)."""
    return None if value == 0 else value


def _ratio(value: Any) -> float | None:
    """A top-level LoRA+ ratio: the kohya_ss GUI writes 0 for "off" (it then leaves it out of network_args)."""
    return _unless_zero(float(value))


def _path_list(value: Any) -> str:
    """kohya ``--base_weights a.safetensors b.safetensors`` (a list) -> sdcore's ``"a.safetensors,b.safetensors"``."""
    items = [_text(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if _text(v)]
    if any("," in item for item in items):
        raise ValueError("a path with a comma cannot be passed on (sdcore separates the files with commas)")
    return ",".join(items)


def _float_list(value: Any) -> str:
    """kohya ``--base_weights_multiplier 1.0 0.5`` (a list of floats) -> ``"1.0,0.5"``."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    return ",".join(str(float(v)) for v in items)


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

_OFF: tuple[Any, ...] = (None, False, "", 0, 0.0, [], ())
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

#: network_args keys -> sdcore LoRA option (keys that are option names themselves pass through)
NETWORK_ARGS = {
    "conv_dim": "conv_rank",
    "conv_alpha": "conv_alpha",
    "algo": "algo",
    "dropout": "dropout",
    "rank_dropout": "rank_dropout",
    "module_dropout": "module_dropout",
    "factor": "lokr_factor",
    "train_t5xxl": "train_t5",  # lora_sd3 / lora_flux
    # LyCORIS (lycoris.kohya create_network) reads use_cp and use_conv_cp as older names of use_tucker
    "use_cp": "use_tucker",
    "use_conv_cp": "use_tucker",
}
#: LyCORIS' names of one switch, in the order its create_network reads them
_LYCORIS_TUCKER = ("use_conv_cp", "use_cp", "use_tucker")
#: kohya's plain-LoRA network modules (SD1/SD2/SDXL, FLUX.1, SD3): sdcore's --algo lora
KOHYA_LORA_MODULES = ("networks.lora", "networks.lora_flux", "networks.lora_sd3")
#: kohya's other network modules (sd-scripts 48d368f ``networks/``) -> (the option values the module means,
#: or ``None`` when sdcore refuses it; what it is / why refused and what to use instead). The values name
#: options of the method (``algo``...), never a plugin.
KOHYA_OTHER_MODULES: dict[str, tuple[dict[str, Any] | None, str]] = {
    "networks.lora_fa": (
        {"algo": "lora_fa"},
        "LoRA-FA: lora_down frozen at its init, only lora_up trains; the file is a plain LoRA (algo lora_fa)",
    ),
    "networks.dylora": (
        {"algo": "dylora"},
        "DyLoRA: nested ranks, network_args unit= rows trained per step; the file is a plain LoRA (algo dylora, "
        "dylora_unit)",
    ),
    "networks.oft": (
        {"algo": "oft"},
        "OFT: network_dim = blocks per layer, network_alpha = constraint (algo oft; oft_all_linear = "
        "enable_all_linear)",
    ),
    "networks.oft_flux": (
        {"algo": "oft"},
        "OFT on FLUX.1 (flux_train_network.py): network_dim = blocks per part, network_alpha = constraint, q/k/v "
        "and the MLP input rotated as separate parts (algo oft on a FLUX.1 model; oft_all_linear = enable_all_linear)",
    ),
    "networks.lora_lumina": (None, "a LoRA for Lumina-Image 2.0, a model family sdcore does not load"),
    "networks.lora_anima": (None, "a LoRA for Anima, a model family sdcore does not load"),
    "networks.lora_hunyuan_image": (None, "a LoRA for HunyuanImage-2.1, a model family sdcore does not load"),
    "networks.lora_diffusers": (
        None,
        "kohya's LoRA loader for diffusers pipelines, not a training network: use network_module = networks.lora",
    ),
    "networks.control_net_lllite": (
        None,
        "ControlNet-LLLite (sdxl_train_control_net_lllite.py), a control network, not a LoRA: sdcore trains no "
        "ControlNet",
    ),
    "networks.control_net_lllite_for_train": (
        None,
        "ControlNet-LLLite (sdxl_train_control_net_lllite_old.py), a control network, not a LoRA: sdcore trains "
        "no ControlNet",
    ),
}
#: network_args a kohya module in :data:`KOHYA_OTHER_MODULES` reads besides the common ones -> option
_MODULE_ARGS = {
    "networks.dylora": {"unit": "dylora_unit"},
}
#: network_args keys without an effect at these values
NETWORK_ARGS_OFF: dict[str, tuple[str, ...]] = {
    "use_scalar": ("false",),
    "constrain": ("0", "0.0"),
    "use_tucker": ("false",),
    "use_cp": ("false",),
    "train_blocks": ("all",),  # lora_flux: all blocks is the default
    "dora_wd": ("false",),
    "wd_on_output": ("false",),  # DoRA's magnitude per input channel: the layout sdcore trains and writes
    "bypass_mode": ("false", "true"),  # the same maths, another forward implementation
    "preset": ("full", "attn-mlp"),
    "verbose": ("true", "false"),  # lora_flux / lora_sd3: logs the modules and their dims, trains the same
}
#: lora_flux's ``train_blocks`` (FLUX.1/Chroma: kohya adapts only BFL's SingleStreamBlocks or DoubleStreamBlocks;
#: the text encoders are not filtered) -> the LoRA option that selects the same diffusers modules
#: (``single_transformer_blocks.N`` are the single blocks, ``transformer_blocks.N`` the double ones)
_FLUX_TRAIN_BLOCKS = {
    "single": ("layer_filter", "single_transformer_blocks."),
    "double": ("layer_exclude", "single_transformer_blocks."),
}
#: LyCORIS' built-in presets with enable_conv=False (lycoris/config.py)
_LYCORIS_LINEAR_PRESETS = ("full-lin", "attn-mlp", "attn-only", "unet-transformer-only")
#: LyCORIS network_args that are sdcore LoRA options of the same name (kohya's own modules ignore them)
_LYCORIS_ONLY_ARGS = ("decompose_both", "rank_dropout_scale", "train_norm")
_LYCORIS_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr", "diag-oft": "diag_oft",
                  "boft": "boft", "ia3": "ia3", "glora": "glora", "full": "full"}  # fmt: skip
#: per LyCORIS algo (sdcore's name), the options its module takes and never uses (LyCORIS f49d30d lycoris/modules):
#: a kohya run trains without them, so the translation drops them with a note (sdcore's own flags refuse them for
#: that algo, sdplugin_lora.method.LYCORIS_PLAIN). IA3Module/FullModule/ButterflyOFTModule never apply ``drop``
#: (dropout), IA3/BOFT never ``rank_drop``; GLoRA's conv branch ANDs use_tucker with "all kernels 1x1" before asking
#: for a kxk kernel, so it never builds a Tucker core, and ia3/full/diag-oft/boft build none; ia3/full/glora keep
#: the base ``apply_max_norm`` (returns None: LycorisNetwork.apply_max_norm_regularization skips the module)
_LYCORIS_UNREAD: dict[str, tuple[str, ...]] = {
    "ia3": ("dropout", "rank_dropout", "use_tucker", "scale_weight_norms"),
    "full": ("dropout", "use_tucker", "scale_weight_norms"),
    "glora": ("use_tucker", "scale_weight_norms"),
    "diag_oft": ("use_tucker",),
    "boft": ("dropout", "rank_dropout", "use_tucker"),
}
#: LyCORIS algos sdcore does not train -> what each is, and the nearest thing sdcore trains (LyCORIS f49d30d)
LYCORIS_OTHER_ALGOS = {
    "dylora": "LyCORIS' DyLoRA trains only the first b+1 blocks per step, scaled by alpha/(b+1); kohya's "
    "networks.dylora (which sdcore trains) keeps the whole rank and scales by alpha/rank * sqrt(rank/(b+unit)), "
    "another network; the nearest is network_module = networks.dylora with unit = block_size",
    "oft": "LyCORIS has no algo=oft (its OFT is diag-oft); kohya's OFT is network_module = networks.oft",
}
#: networks.lora's block-wise network_args (LyCORIS has none of them)
_BLOCK_ARGS = {"block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
               "up_lr_weight", "block_lr_zero_threshold"}  # fmt: skip

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


def is_kohya_name(name: str) -> bool:
    return name in ALIASES or name in COMPOSITE or name in IGNORED or name in UNSUPPORTED


def flag_names() -> set[str]:
    """kohya options that are store_true flags on kohya's command line."""
    return (
        {n for n, a in ALIASES.items() if a.flag}
        | _FLAG_COMPOSITES
        | (_FLAG_IGNORED & set(IGNORED))
        | (_FLAG_UNSUPPORTED & set(UNSUPPORTED))
    )


#: kohya options that take several values (argparse nargs="*")
MULTI_VALUE = (
    "network_args",
    "optimizer_args",
    "lr_scheduler_args",
    "base_weights",
    "base_weights_multiplier",
    "text_encoder_lr",
)


def cli_names(fields: Iterable[str]) -> list[str]:
    """kohya names to accept on the command line for a method with these option fields."""
    present = set(fields)
    names = [n for n, a in ALIASES.items() if a.applies(present)]
    names += [n for n in COMPOSITE if _composite_applies(n, present)]
    names += list(IGNORED) + list(UNSUPPORTED)
    names = [n for n in names if "_" in n or n not in present]  # --seed is sdcore's own flag
    return list(dict.fromkeys(names))


def _composite_applies(name: str, fields: set[str]) -> bool:
    if name in ("network_module", "network_args"):
        return "rank" in fields
    if name in ("use_object_template", "use_style_template"):
        return "template" in fields
    return True


def help_rows(fields: Iterable[str]) -> list[tuple[str, str]]:
    """(kohya flag, meaning) rows for the "kohya names" section of ``--help``."""
    present = set(fields)
    rows = []
    for name, alias in ALIASES.items():
        if alias.applies(present) and name != alias.target:
            rows.append((f"--{name}", f"--{alias.target.replace('_', '-')}"))
    rows += [(f"--{n}", text) for n, text in COMPOSITE.items() if _composite_applies(n, present)]
    rows.append(("--config_file FILE", "--config FILE (kohya training TOML, flat or in sections)"))
    return rows


def help_epilog() -> str:
    ignored = ", ".join(sorted(IGNORED))
    return (
        "Every option above also works in kohya's spelling with underscores (--lr_scheduler, --noise_offset). "
        f"Accepted with a note (no effect on the result here): {ignored}. Options that would change the "
        "result and sdcore does not implement are accepted at their 'off' value and refused otherwise. "
        "A run written with kohya's names gets kohya's defaults where they decide what trains "
        "(dim 4, alpha 1, text encoder trained, no buckets, 1600 steps, learning rate 2e-6, .caption captions "
        "without a .txt fallback, float32 saves, every intermediate save kept, no resumable state; on Flux and SD3 "
        "its scripts' "
        "timestep_sampling, model_prediction_type, discrete_flow_shift and guidance_scale), with a note."
    )


# --------------------------------------------------------------------------------------------
# translation


def _is_off(value: Any, allowed: tuple[Any, ...]) -> bool:
    """Whether a kohya value means "not used" (kohya_ss writes untouched fields this way)."""
    if isinstance(value, (list, tuple, dict)):
        return not value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "false", "none"):
            return True
        if any(isinstance(a, str) and a.lower() == text for a in allowed):
            return True
        try:
            value = float(text)
        except ValueError:
            return False
    return any(value == a for a in allowed if not isinstance(a, (str, list, tuple)))


def _network_args(items: Any, fields: set[str], out: Translation, where: str) -> dict[str, str]:
    """``["conv_dim=8", "algo=loha"]`` -> ``{"conv_dim": "8", "algo": "loha"}`` (checked)."""
    if isinstance(items, str):
        items = items.split()
    parsed: dict[str, str] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            out.problems.append(f"{where}: network_args {item!r} is not key=value")
            continue
        parsed[key.strip()] = value.strip()
    return parsed


def _same_value(a: Any, b: Any) -> bool:
    """Equal, or the same number written twice (``loraplus_lr_ratio = 16`` top-level and ``"16"`` in network_args)."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def translate(items: dict[str, Any], fields: Iterable[str], *, where: str) -> Translation:
    """Translate kohya-named options ``items`` (raw values) for a method with option ``fields``."""
    present = set(fields)
    out = Translation()
    ignored: list[str] = []
    if items.get("dataset_config") and items.get("train_data_dir"):
        out.notes.append("dataset_config is given, so train_data_dir is ignored (as in kohya)")
        items = {k: v for k, v in items.items() if k != "train_data_dir"}
    if items.get("dataset_config") and items.get("in_json"):
        out.notes.append("dataset_config is given, so in_json is ignored (as in kohya)")
        items = {k: v for k, v in items.items() if k != "in_json"}
    elif items.get("in_json") and items.get("reg_data_dir"):
        out.notes.append("in_json is given, so reg_data_dir is ignored (as in kohya's fine-tuning dataset)")
        items = {k: v for k, v in items.items() if k != "reg_data_dir"}

    def put(target: str, value: Any, name: str) -> None:
        if target not in present:
            out.problems.append(f"{where}: {name} is not an option of this method")
            return
        if target in out.origin and out.origin[target] != name and not _same_value(out.values.get(target), value):
            out.problems.append(f"{where}: {name} and {out.origin[target]} both set {target}")
            return
        out.values[target] = value
        out.origin[target] = name

    for name, value in items.items():
        if name in present and name not in ALIASES:
            put(name, value, name)  # a method's own option that happens to share a kohya name
        elif name in ALIASES:
            alias = ALIASES[name]
            if value is None or (isinstance(value, str) and not value.strip()):
                continue  # kohya_ss writes "" for fields left empty
            if not alias.applies(present):
                if _is_off(value, _ALIAS_OFF.get(name, _OFF)):
                    continue  # kohya_ss writes every field, e.g. stop_text_encoder_training = 0 for LoRA
                which = f" (kohya's {alias.methods} option)" if alias.methods else ""
                out.problems.append(f"{where}: {name} is not an option of this method{which}")
                continue
            try:
                converted = alias.convert(value) if alias.convert is not None and value is not None else value
            except (TypeError, ValueError) as exc:
                detail = f" ({exc})" if str(exc) and "invalid literal" not in str(exc) else ""
                out.problems.append(f"{where}: {name} = {value!r} is not a valid value{detail}")
                continue
            put(alias.target, converted, name)
        elif name in IGNORED:
            if name in _IGNORED_NOTES and not _is_off(value, _OFF):
                out.notes.append(f"{name}: {_IGNORED_NOTES[name]}")
            elif not _is_off(value, _OFF):
                ignored.append(name)
        elif name in UNSUPPORTED:
            if not _is_off(value, UNSUPPORTED[name]):
                why = _UNSUPPORTED_NOTES.get(name, "it changes the result")
                out.problems.append(f"{where}: {name} = {value!r} is not supported by sdcore ({why})")
        elif name not in COMPOSITE:
            raise KeyError(name)  # callers pass kohya names only
    _composites(items, present, out, where, put)
    if ignored:
        out.notes.append("accepted without effect here: " + ", ".join(sorted(ignored)))
    return out


def _int_at_most_zero(value: Any) -> bool:
    try:
        return value is not None and not isinstance(value, bool) and int(value) <= 0
    except (TypeError, ValueError):
        return False


def _composites(
    items: dict[str, Any], present: set[str], out: Translation, where: str, put: Callable[[str, Any, str], None]
) -> None:
    # train_db.py: a negative stop_text_encoder_training trains no text encoder, 0 gives it no gradient at any step
    stop = out.values.get("stop_text_encoder_at")
    if out.origin.get("stop_text_encoder_at") == "stop_text_encoder_training" and _int_at_most_zero(stop):
        out.values.pop("stop_text_encoder_at")
        out.origin.pop("stop_text_encoder_at")
        put("train_text_encoder", False, "stop_text_encoder_training")
        out.notes.append(
            f"stop_text_encoder_training = {stop}: the text encoder does not train (as in kohya's train_db.py)"
        )
    # length: kohya's max_train_epochs overrides max_train_steps
    if items.get("max_train_epochs") and items.get("max_train_steps") and "max_steps" in out.values:
        out.values.pop("max_steps")
        out.notes.append("max_train_epochs overrides max_train_steps (as in kohya)")
    gui_epochs = items.get("epoch")
    if gui_epochs and not items.get("max_train_epochs") and not items.get("max_train_steps"):
        put("epochs", gui_epochs, "epoch")
    # the optimizer and schedule
    if _text(items.get("optimizer_type") or "").lower() in OPTIMIZERS and "optimizer" in out.values:
        implied = OPTIMIZERS[_text(items["optimizer_type"]).lower()][1]
        given = out.values.get("optimizer_args", "")
        extra = " ".join(a for a in implied.split() if a.split("=")[0] + "=" not in given)
        if extra:
            out.values["optimizer_args"] = f"{given} {extra}".strip()
    cycles = items.get("lr_scheduler_num_cycles")
    cycled = ("cosine_with_restarts", "cosine_with_min_lr", "warmup_stable_decay")
    if cycles not in (None, "", 0, 1, "1") and _text(items.get("lr_scheduler") or "").lower() not in cycled:
        out.notes.append(f"lr_scheduler_num_cycles only applies to {', '.join(cycled)}; ignored")
    scheduler = _text(items.get("lr_scheduler") or "constant").lower()
    if (
        scheduler == "constant"
        and not items.get("lr_scheduler_type")
        and not _is_off(items.get("lr_warmup_steps"), _OFF)
    ):
        out.notes.append(
            "lr_warmup_steps with the constant schedule (kohya refuses it): warming up, as constant_with_warmup"
        )
    for name, target in (("sample_every_n_steps", "sample_every"), ("sample_every_n_epochs", "sample_every_epochs")):
        if items.get(name) and not items.get("sample_prompts") and target in out.values:
            out.values.pop(target)
            out.notes.append(f"{name} without sample_prompts: no sample images (as in kohya)")
    if items.get("sample_every_n_steps") and items.get("sample_every_n_epochs") and "sample_every" in out.values:
        # sd-scripts 48d368f library/train_util.py:6381-6384 (flux/sd3_train_utils the same): epochs decide alone
        out.values.pop("sample_every")
        out.notes.append("sample_every_n_steps is ignored beside sample_every_n_epochs (as in kohya)")
    if items.get("sample_at_first") and not items.get("sample_prompts") and "sample_at_first" in out.values:
        out.values.pop("sample_at_first")  # kohya stops on the missing prompt file at its first render
        out.notes.append("sample_at_first without sample_prompts: no sample images")
    # without save_precision kohya saves a full_bf16/full_fp16 network in that dtype (save_dtype None)
    for name, dtype in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
        if items.get(name) is True and not items.get("save_precision") and "save_dtype" in present:
            put("save_dtype", dtype, name)
            break
    if "base_weights_multiplier" in out.values and not _text(out.values.get("base_weights") or ""):
        out.values.pop("base_weights_multiplier")
        out.notes.append("base_weights_multiplier without base_weights has no effect (as in kohya)")
    if "network_multiplier" in out.values:
        out.notes.append(
            "network_multiplier outside a dataset TOML: kohya's training scripts have no run-wide multiplier "
            "and would ignore it; sdcore trains the whole network at it (--network-multiplier)"
        )
    for name, optimizer in (("use_8bit_adam", "adamw8bit"), ("use_lion_optimizer", "lion")):
        if items.get(name) is True:
            put("optimizer", optimizer, name)
    # retention by steps: kohya keeps the saves of the last N steps
    last_steps = items.get("save_last_n_steps")
    if last_steps:
        every = items.get("save_every_n_steps")
        if every:
            window = steps_window(int(last_steps), int(every))
            if out.origin.get("save_limit") == "save_last_n_epochs":
                # kohya prunes step and epoch saves apart (save_last_n_epochs does nothing without epoch
                # saves); sdcore keeps one count of newest results, so the windows add up
                epochs = bool(items.get("save_every_n_epochs") or items.get("save_n_epoch_ratio"))
                out.values["save_limit"] = window + (int(out.values["save_limit"]) if epochs else 0)
                out.origin["save_limit"] = "save_last_n_steps"
            else:
                put("save_limit", window, "save_last_n_steps")
        else:
            out.notes.append("save_last_n_steps without save_every_n_steps has no effect")
    end_state = not _is_off(items.get("save_state_on_train_end"), _OFF)
    if end_state and "save_state" in present and _is_off(items.get("save_state"), _OFF):  # (else on already)
        put("save_state", True, "save_state_on_train_end")  # sdcore's state: at the end and with each save
    _state_retention(items, present, out, put)
    # TI templates
    for name, template in (("use_object_template", "subject"), ("use_style_template", "style")):
        if items.get(name):
            put("template", template, name)
    # without either flag kohya's train_textual_inversion.py trains on the captions as written, its token_string
    # replaced inside them (L353-357): sdcore's filewords template, not its A1111 default style_filewords
    flagged = any(items.get(n) for n in ("use_object_template", "use_style_template"))
    if items.get("token_string") and not flagged and "template" in present:
        out.implied["template"] = "filewords"
    # kohya: --cache_text_encoder_outputs_to_disk turns --cache_text_encoder_outputs on (sdxl_train_util and the
    # SD3/Flux scripts set it, over an explicit false); sdcore keeps one store file per dataset folder
    if not _is_off(items.get("cache_text_encoder_outputs_to_disk"), _OFF) and "cache_text_encoder_outputs" in present:
        out.values["cache_text_encoder_outputs"] = True
        out.origin["cache_text_encoder_outputs"] = "cache_text_encoder_outputs_to_disk"
        put("cache_text_encoder_outputs_to_disk", True, "cache_text_encoder_outputs_to_disk")
    _deepspeed(items, out, where)
    _block_swap_spellings(items, present, out, where, put)
    if not _is_off(items.get("use_t5xxl_cache_only"), _OFF):
        if not _is_off(items.get("train_t5xxl"), _OFF):
            out.problems.append(
                f"{where}: use_t5xxl_cache_only with train_t5xxl: kohya refuses the pair (a trained T5's outputs "
                "cannot be cached)"
            )
        elif "unet_only" in present:  # LoRA's options: kohya's network scripts have no such option
            out.notes.append(f"use_t5xxl_cache_only: {_T5_CACHE_ONLY_UNREAD} (LoRA scripts); no effect")
        elif "cache_text_encoder_outputs" in present and out.values.get("cache_text_encoder_outputs") is not True:
            # kohya sd3_train.py turns cache_text_encoder_outputs on for it (over an explicit false); sdcore's
            # partial cache then keeps T5's outputs while CLIP trains (sdcore.train.cache.partial_text_encoders),
            # all of them when nothing trains (the same values: kohya's frozen CLIP runs uncached). Other
            # families' scripts do not read it: kohya_t5_cache_only, once the model's family is known
            out.values["cache_text_encoder_outputs"] = True
            out.origin["cache_text_encoder_outputs"] = "use_t5xxl_cache_only"
    if items.get("v2"):
        out.notes.append("v2: the model family is read from the model itself (see `sdcore model info`)")
    if out.values.get("no_token_padding") is True:
        out.notes.append(
            "no_token_padding: captions are padded to the batch's longest (at most 77 tokens), as its help says and "
            "train_db.py did until 2023; sd-scripts since then ignores the flag (or, 2023-2025, fails on it)"
        )
    _output(items, present, out, where, put)
    _network(items, present, out, where, put)


def _block_swap_spellings(
    items: dict[str, Any], present: set[str], out: Translation, where: str, put: Callable[[str, Any, str], None]
) -> None:
    """kohya's deprecated block-swap options and ``cpu_offload_checkpointing`` (flux_train.py,
    flux_train_network.py, sd3_train_network.py): used only while ``blocks_to_swap`` is not given, as there."""
    try:
        double = int(items.get("double_blocks_to_swap") or 0)
        single = int(items.get("single_blocks_to_swap") or 0)
    except (TypeError, ValueError):
        out.problems.append(f"{where}: double_blocks_to_swap/single_blocks_to_swap must be whole numbers")
        return
    swap = double + single // 2  # flux_train.py's conversion
    if items.get("split_mode") is True and not swap:
        swap = 18  # flux_train_network.py: "18 is safe for most cases"
    names = ", ".join(n for n in ("double_blocks_to_swap", "single_blocks_to_swap", "split_mode") if items.get(n))
    if swap and items.get("blocks_to_swap") is not None:
        out.notes.append(f"{names}: ignored because blocks_to_swap is given (as in kohya)")
    elif swap:
        put("blocks_to_swap", swap, names.split(", ")[0])
        out.notes.append(
            f"{names}: kohya's deprecated spelling, read as blocks_to_swap = {swap} (as kohya converts it)"
        )
    if items.get("cpu_offload_checkpointing") is True:
        if out.values.get("blocks_to_swap"):
            out.problems.append(
                f"{where}: cpu_offload_checkpointing with blocks_to_swap: kohya refuses the pair (choose one)"
            )
        elif "cpu_offload_checkpointing" in present:
            put("cpu_offload_checkpointing", True, "cpu_offload_checkpointing")
            if "gradient_checkpointing" in present and out.values.get("gradient_checkpointing") is not True:
                out.values["gradient_checkpointing"] = True
                out.origin.setdefault("gradient_checkpointing", "cpu_offload_checkpointing")
                out.notes.append(
                    "cpu_offload_checkpointing: gradient checkpointing is on (kohya's flux_train.py turns it on too)"
                )


def steps_window(last_n_steps: int, every: int) -> int:
    """How many step saves kohya keeps for ``save_last_n_steps``/``save_last_n_steps_state`` N with a
    save every S steps: at step t it deletes the save of step ``(t - N - 1)`` rounded down to a multiple
    of S (``train_util.get_remove_step_no``), so the saves no older than N steps stay: ``N // S + 1``
    (N=30, S=10: steps 20, 30, 40, 50 at step 50, as its comment says)."""
    return last_n_steps // every + 1


def _state_retention(
    items: dict[str, Any], present: set[str], out: Translation, put: Callable[[str, Any, str], None]
) -> None:
    """kohya's state pruning -> ``--keep-states``: with ``save_state`` each step save keeps the states of
    the last ``save_last_n_steps_state`` (else ``save_last_n_steps``) steps, each epoch save those of the
    last ``save_last_n_epochs_state`` (else ``save_last_n_epochs``) epochs; without them every state stays.
    sdcore keeps one count of newest states, so the two windows add up (0 = keep all when one is open)."""
    names = ("save_last_n_steps_state", "save_last_n_epochs_state")
    if not items.get("save_state"):
        given = [name for name in names if not _is_off(items.get(name), _OFF)]
        if given:
            out.notes.append(f"{' and '.join(given)} without save_state: no states to prune (as in kohya)")
        return
    if "keep_states" not in present:
        return
    windows: list[tuple[str, int]] = []  # (the option that decides, states kept; 0 = all)
    every_steps = items.get("save_every_n_steps")
    if every_steps:
        name = "save_last_n_steps_state" if items.get("save_last_n_steps_state") else "save_last_n_steps"
        n = items.get(name)
        windows.append((name, steps_window(int(n), int(every_steps)) if n else 0))
    if items.get("save_every_n_epochs") or items.get("save_n_epoch_ratio"):
        name = "save_last_n_epochs_state" if items.get("save_last_n_epochs_state") else "save_last_n_epochs"
        n = items.get(name)
        windows.append((name, int(n) if n else 0))
    if not windows:
        return  # no intermediate saves: the state at the end only, which sdcore writes too
    if any(keep == 0 for _, keep in windows):
        put("keep_states", 0, "save_state")
        out.notes.append("save_state without save_last_n_*: every state is kept, as in kohya (--keep-states 0)")
        return
    put("keep_states", sum(keep for _, keep in windows), windows[0][0])


def _output(
    items: dict[str, Any], present: set[str], out: Translation, where: str, put: Callable[[str, Any, str], None]
) -> None:
    keys = ("output_dir", "output_name", "save_model_as")
    if not any(items.get(k) not in (None, "") for k in keys):
        return
    directory = items.get("output_dir")
    if directory in (None, ""):
        out.problems.append(f"{where}: output_name/save_model_as need output_dir (where kohya writes the result)")
        return
    name = _text(items.get("output_name") or "last")
    fmt = _text(items.get("save_model_as") or "").lower()
    is_ti = "vectors" in present
    if fmt in ("", "safetensors") and not is_ti:
        suffix = ".safetensors"
    elif is_ti and fmt in ("", "pt", "safetensors"):
        suffix = ".pt"  # A1111's .pt is always written; safetensors is written beside it
        if fmt == "safetensors":
            put("format", "safetensors", "save_model_as")
    elif fmt in ("diffusers", "diffusers_safetensors") and "save_format" in present:
        suffix = ""
        put("save_format", "diffusers", "save_model_as")
    elif fmt in ("ckpt", "pt"):
        out.problems.append(
            f"{where}: save_model_as = {fmt!r}: sdcore writes .safetensors (pickle files are unsafe to share)"
        )
        return
    else:
        out.problems.append(f"{where}: save_model_as = {fmt!r} is not available for this method")
        return
    put("output", str(PurePath(_text(directory)) / f"{name}{suffix}"), "output_dir")


#: kohya's DeepSpeed options (deepspeed_utils.add_deepspeed_arguments) with their defaults; all but the last
#: are also keys of accelerate's ``deepspeed_config`` in an ``accelerate launch --config_file`` YAML
_DEEPSPEED_OPTIONS: dict[str, Any] = {
    "zero_stage": 2,
    "offload_optimizer_device": None,
    "offload_optimizer_nvme_path": None,
    "offload_param_device": None,
    "offload_param_nvme_path": None,
    "zero3_init_flag": False,
    "zero3_save_16bit_model": False,
    "fp16_master_weights_and_gradients": False,
}


def _deepspeed(items: dict[str, Any], out: Translation, where: str) -> None:
    """kohya's ``--deepspeed`` builds an accelerate ``DeepSpeedPlugin`` from its options; sdcore takes
    DeepSpeed from accelerate's own launch config (the one engine setup it documents), so the run is
    refused with the ``deepspeed_config`` lines that give the same engine. Without ``--deepspeed`` kohya
    ignores the other options: accepted, with a note when one is set to other than kohya's default."""
    given = {
        k: items[k]
        for k in _DEEPSPEED_OPTIONS
        if k in items and items[k] not in (None, "") and (k == "zero_stage" or not _is_off(items[k], _OFF))
    }  # zero_stage 0 is a stage
    if _is_off(items.get("deepspeed"), _OFF):
        changed = sorted(k for k, v in given.items() if not _same_value(v, _DEEPSPEED_OPTIONS[k]))
        if changed:
            out.notes.append(f"{', '.join(changed)}: DeepSpeed options without deepspeed have no effect (as in kohya)")
        return
    config = {"zero_stage": given.get("zero_stage", 2)}
    config |= {k: v for k, v in given.items() if k not in ("zero_stage", "fp16_master_weights_and_gradients")}
    config["gradient_accumulation_steps"] = items.get("gradient_accumulation_steps") or 1
    config["gradient_clipping"] = items.get("max_grad_norm", 1.0)  # kohya: DeepSpeedPlugin(gradient_clipping=...)
    lines = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in config.items())
    extra = (
        "; fp16_master_weights_and_gradients goes in a DeepSpeed JSON (deepspeed_config_file)"
        if "fp16_master_weights_and_gradients" in given
        else ""
    )
    out.problems.append(
        f"{where}: deepspeed: sdcore takes DeepSpeed from accelerate's launch config, not from training options: "
        f"run `accelerate launch --config_file ds.yaml -m sdcore train ...` with a ds.yaml like "
        f"docs/accelerate/deepspeed-zero2.yaml whose deepspeed_config has {{{lines}}}{extra}, and drop deepspeed "
        "and its options from this config (docs/training.md, 'Several GPUs and machines')"
    )


def _lycoris_str_bool(raw: str, key: str, out: Translation) -> bool:
    """LyCORIS' ``str_bool`` (lycoris/utils ``str(val).lower() != "false"``): every text but "false" is on, so
    "0", "no", "off" or an empty value turn the switch on in a kohya run too (a note says so)."""
    on = raw.lower() != "false"
    if on and raw.lower() in ("", "0", "no", "off", "none"):
        out.notes.append(
            f"network_args {key}={raw}: LyCORIS reads it with str_bool (only 'false' is off), so it is on, as in a "
            "kohya run (write false for off)"
        )
    return on


def _lycoris_as_kohya_runs_it(
    args: dict[str, str], algo: str, out: Translation, put: Callable[[str, Any, str], None]
) -> None:
    """network_args that lycoris.kohya's create_network reads differently from what they say, so that a kohya
    config trains the network a kohya run trains: ``decompose_both`` goes to the modules as the raw text (any
    non-empty value, ``False`` included, turns it on; only LoKr reads it), ``rank_dropout_scale`` is never passed,
    and ``train_norm`` is read by LyCORIS' ``str_bool`` (:func:`_lycoris_str_bool`: only "false" is off)."""
    raw_norm = args.pop("train_norm", None)
    if raw_norm is not None:
        put("train_norm", _lycoris_str_bool(raw_norm, "train_norm", out), "network_args train_norm")
    raw = args.pop("decompose_both", None)
    if raw is not None and raw != "" and algo == "lokr":
        put("decompose_both", True, "network_args decompose_both")
        if raw.lower() in ("false", "0"):
            out.notes.append(
                f"network_args decompose_both={raw}: lycoris.kohya passes the text on unparsed, so any value turns "
                "it on (the kohya_ss GUI always sends False); sdcore trains that network too (drop the key for off)"
            )
    if args.pop("rank_dropout_scale", "false").lower() != "false":
        out.notes.append(
            "network_args rank_dropout_scale: lycoris.kohya does not pass it to its modules, so it has no effect "
            "in a kohya run and none here (sdcore's --rank-dropout-scale is the LyCORIS modules' option)"
        )


def _lycoris_unread(args: dict[str, str], algo: str, out: Translation) -> None:
    """Drop (with a note) what lycoris.kohya's modules never read, so the config trains what a kohya run trains:
    per algo the options its module ignores (:data:`_LYCORIS_UNREAD`). ``network_dropout`` reaches LyCORIS as its
    ``dropout`` (train_network.py:674-676, "workaround for LyCORIS": ``net_kwargs["dropout"] = network_dropout`` when
    network_args gives no ``dropout=``; the ``neuron_dropout`` keyword it also passes is not read), so it is dropped
    only where network_args ``dropout=`` wins over it or the algo ignores dropout. Taken out of ``args`` and
    ``out.values``; off values go silently."""
    unread = _LYCORIS_UNREAD.get(algo, ())
    dropped: list[str] = []
    if out.origin.get("dropout") == "network_dropout" and ("dropout" in args or "dropout" in unread):
        value = out.values.pop("dropout")
        out.origin.pop("dropout")
        if _is_off(value, _OFF):
            pass
        elif "dropout" in args:
            out.notes.append(
                f"network_dropout {value}: kohya gives LyCORIS network_args dropout={args['dropout']} instead "
                "(train_network.py copies network_dropout into dropout only when network_args has none); dropped"
            )
        else:
            dropped.append(f"network_dropout {value}")
    for key in ("dropout", "rank_dropout", *_LYCORIS_TUCKER):
        target = NETWORK_ARGS.get(key, key)
        if key in args and target in unread:
            raw = args.pop(key)
            on = raw.lower() != "false" if target == "use_tucker" else not _is_off(raw, _OFF)
            if on:
                dropped.append(f"network_args {key}={raw}")
    if "scale_weight_norms" in unread and out.origin.get("scale_weight_norms") == "scale_weight_norms":
        value = out.values.pop("scale_weight_norms")
        out.origin.pop("scale_weight_norms")
        if not _is_off(value, _OFF):
            dropped.append(f"scale_weight_norms {value}")
    if dropped:
        out.notes.append(
            f"{', '.join(dropped)} with algo={algo}: LyCORIS' {algo} module takes and never uses "
            f"{'it' if len(dropped) == 1 else 'them'} (a kohya run trains without), so dropped here; sdcore's own "
            "flags refuse them for this algo"
        )


def _network(
    items: dict[str, Any], present: set[str], out: Translation, where: str, put: Callable[[str, Any, str], None]
) -> None:
    module = _text(items.get("network_module") or "")
    args = _network_args(items.get("network_args"), present, out, where)
    if not module and not args:
        return
    if "rank" not in present:
        out.problems.append(f"{where}: network_module/network_args are LoRA options (sdcore train lora)")
        return
    other = KOHYA_OTHER_MODULES.get(module)
    if other is not None and other[0] is None:
        out.problems.append(f"{where}: network_module {module!r} is not supported by sdcore: {other[1]}")
        return
    if module not in ("", "lycoris.kohya", *KOHYA_LORA_MODULES) and other is None:
        known = ", ".join(
            (*KOHYA_LORA_MODULES, *(m for m, (v, _) in KOHYA_OTHER_MODULES.items() if v), "lycoris.kohya")
        )
        out.problems.append(f"{where}: network_module {module!r} is not available ({known})")
        return
    lycoris = module == "lycoris.kohya"
    algo = args.pop("algo", "").lower()
    if not lycoris:  # LyCORIS' options (LoRA options of the same names): kohya's own modules ignore them
        given = sorted(key for key in _LYCORIS_ONLY_ARGS if args.pop(key, "false").lower() != "false")
        if given:
            out.problems.append(
                f"{where}: network_args {', '.join(given)} are LyCORIS options that network_module "
                f"{module or 'networks.lora'} ignores; use network_module = lycoris.kohya or drop them"
            )
    if other is not None:
        if algo:
            out.problems.append(f"{where}: network_args algo= needs network_module = lycoris.kohya (not {module})")
            return
        _other_module(module, other[0] or {}, args, present, out, where, put)
    elif lycoris:
        if algo in LYCORIS_OTHER_ALGOS:
            out.problems.append(
                f"{where}: LyCORIS algo={algo!r} is not supported by sdcore: {LYCORIS_OTHER_ALGOS[algo]}"
            )
            return
        if algo and algo not in _LYCORIS_ALGOS:
            out.problems.append(
                f"{where}: LyCORIS algo={algo!r} is not available "
                f"(lora/locon, {', '.join(a for a in _LYCORIS_ALGOS if a not in ('lora', 'locon'))})"
            )
            return
        chosen = _LYCORIS_ALGOS[algo or "lora"]
        for name in [n for n in _LYCORIS_TUCKER if n in args][1:]:
            args.pop(name)  # LyCORIS reads the first of these that is given (its values are non-empty strings)
        _lycoris_as_kohya_runs_it(args, chosen, out, put)
        for key in ("constraint", "rescaled"):  # read by diag-oft and BOFT only (rescaled with str_bool)
            raw = args.pop(key, None)
            if raw is not None and chosen in ("diag_oft", "boft"):
                put(key, _lycoris_str_bool(raw, key, out) if key == "rescaled" else raw, f"network_args {key}")
            elif raw is not None:
                out.notes.append(f"network_args {key}={raw}: LyCORIS reads it for diag-oft and boft only")
        if _lycoris_str_bool(args.pop("dora_wd", "false"), "dora_wd", out):
            if chosen != "locon":
                out.problems.append(f"{where}: dora_wd=True is available with algo=lora only")
            chosen = "dora"
        _lycoris_unread(args, chosen, out)
        if chosen == "ia3":  # LyCORIS f49d30d lycoris/wrapper.py network_module_dict has no "ia3" (since 9598468)
            out.notes.append(
                "network_args algo=ia3: lycoris.kohya's algo table has no ia3 (LyCORIS 3.x: network_module_dict), so a "
                "kohya run stops with KeyError 'ia3'; sdcore trains (IA)^3 on the preset's modules (--algo ia3)"
            )
        if args.pop("train_on_input", None) is not None:  # lycoris.kohya's create_network does not pass it on
            out.notes.append("network_args train_on_input has no effect: lycoris.kohya does not pass it to its modules")
        # LyCORIS reads preset= by its exact name (a built-in one) or as a TOML file path; sdcore's
        # --lycoris-preset selects the same modules (sdplugin_lora.presets), conv_dim defaults to network_dim
        preset = args.pop("preset", None)
        # GLoRA too: lycoris.kohya's "only train transformer" branch compares the algo's name with the
        # GLoRAModule class, which never holds, so its GLoRA adapts the preset's modules (LyCORIS f49d30d)
        put("lycoris_preset", "full" if preset is None else preset, "network_args preset")
        if preset in _LYCORIS_LINEAR_PRESETS:  # enable_conv=False: no kxk conv whatever conv_dim says
            if chosen == "locon":
                chosen = "lora"
            for key in ("conv_dim", "conv_alpha"):
                if args.pop(key, None) is not None:
                    out.notes.append(f"network_args {key} has no effect with preset={preset} (enable_conv=False)")
        else:
            if "conv_dim" not in args and "conv_rank" in present:
                out.follow["conv_rank"] = "rank"
            if "conv_alpha" not in args and "conv_alpha" in present:
                out.follow["conv_alpha"] = "alpha"
        put("algo", chosen, "network_args algo")
        blockwise = sorted(set(args) & _BLOCK_ARGS)
        if blockwise:  # networks.lora's options: lycoris.kohya reads none of them
            out.problems.append(
                f"{where}: network_args {', '.join(blockwise)} with network_module lycoris.kohya: LyCORIS ignores "
                "them (they are networks.lora's); use networks.lora or drop them"
            )
            for key in blockwise:
                args.pop(key)
        if not _is_off(items.get("scale_weight_norms"), _OFF) and chosen in ("locon", "lora"):
            out.notes.append(
                "scale_weight_norms: rescales lora_up and lora_down by sqrt(ratio) as networks.lora does (LyCORIS "
                "rescales a per-module scalar instead: the same weights after the step, slightly different updates later)"
            )
    elif algo:
        out.problems.append(f"{where}: network_args algo= needs network_module = lycoris.kohya")
        return
    _ggpo(module or "networks.lora", args, out, put)
    _record_per_module_args(module, args, put)
    blocks = args.get("train_blocks", "all").lower()
    if module == "networks.lora_flux" and blocks in _FLUX_TRAIN_BLOCKS and "in_dims" in args:
        # in_dims' embedders are outside the blocks (a layer filter would drop them): a first rank rule instead
        args["_train_blocks"] = args.pop("train_blocks").lower()
    _per_module_args(module, args, out, where, put)
    if module != "networks.lora_flux" or "train_blocks" not in args:
        pass
    elif blocks in _FLUX_TRAIN_BLOCKS:
        args.pop("train_blocks")
        target, pattern = _FLUX_TRAIN_BLOCKS[blocks]
        put(target, pattern, f"network_args train_blocks={blocks}")
    elif blocks != "all":
        out.problems.append(f"{where}: network_args train_blocks={args.pop('train_blocks')}: all, single or double")
    for key, value in args.items():
        target = NETWORK_ARGS.get(key, key)
        if key in ("dylora_unit", "oft_all_linear"):
            target = ""  # sdcore's option names, not kohya network_args (kohya's keys: unit, enable_all_linear)
        if target in present:  # includes LoRA options named as kohya names them (block_dims, use_tucker ...)
            put(target, value, f"network_args {key}")
        elif key not in NETWORK_ARGS_OFF or value.lower() not in NETWORK_ARGS_OFF[key]:
            out.problems.append(f"{where}: network_args {key}={value} is not supported by sdcore")


def _ggpo(module: str, args: dict[str, str], out: Translation, put: Callable[[str, Any, str], None]) -> None:
    """LoRA-GGPO's ``ggpo_sigma``/``ggpo_beta`` (taken out of ``args``): ``networks.lora_flux`` reads them and
    turns GGPO on only when both are given; kohya's other modules read neither (their create_network ignores
    unknown network_args), so that kohya run has no GGPO and neither has this one (a note each)."""
    given = {key: args.pop(key) for key in ("ggpo_sigma", "ggpo_beta") if key in args}
    if not given:
        return
    if module != "networks.lora_flux":
        out.notes.append(
            f"network_args {', '.join(given)}: {module} ignores them (only networks.lora_flux reads them), so GGPO "
            "is off as in that kohya run; sdcore's --ggpo-sigma/--ggpo-beta turn it on for any family"
        )
    elif len(given) == 1:
        out.notes.append(
            f"network_args {next(iter(given))} alone: networks.lora_flux turns GGPO on only with both ggpo_sigma and "
            "ggpo_beta, so it is off, as in that kohya run"
        )
    else:
        for key, value in given.items():
            put(key, value, f"network_args {key}")


#: kohya lora_flux's type dims: network_args key -> the substrings a module's kohya name must all contain
#: (create_modules' ``identifier`` list, in its order: the first given one that matches decides)
_FLUX_TYPE_DIMS = (("img_attn_dim", ("img_attn",)), ("txt_attn_dim", ("txt_attn",)), ("img_mlp_dim", ("img_mlp",)),
                   ("txt_mlp_dim", ("txt_mlp",)), ("img_mod_dim", ("img_mod",)), ("txt_mod_dim", ("txt_mod",)),
                   ("single_dim", ("single_blocks", "linear")), ("single_mod_dim", ("modulation",)))  # fmt: skip
#: kohya lora_sd3's type dims, as :data:`_FLUX_TYPE_DIMS`
_SD3_TYPE_DIMS = (("context_attn_dim", ("context_block", "attn")), ("context_mlp_dim", ("context_block", "mlp")),
                  ("context_mod_dim", ("context_block", "adaLN_modulation")), ("x_attn_dim", ("x_block", "attn")),
                  ("x_mlp_dim", ("x_block", "mlp")), ("x_mod_dim", ("x_block", "adaLN_modulation")))  # fmt: skip
#: the embedder lists: network_args key -> the name substrings kohya filters the extra modules by, in order
_EMBEDDER_DIMS = {
    "networks.lora_flux": ("in_dims", ("_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in")),
    "networks.lora_sd3": ("emb_dims", ("context_embedder", "_t_embedder", "x_embedder", "y_embedder",
                                       "final_layer_adaLN_modulation", "final_layer_linear")),
}  # fmt: skip
#: block selections: network_args key -> (kohya module, the block name prefix, kohya's block count)
_BLOCK_SELECTIONS = {
    "train_double_block_indices": ("networks.lora_flux", "double_blocks", 19),
    "train_single_block_indices": ("networks.lora_flux", "single_blocks", 38),
    "train_block_indices": ("networks.lora_sd3", "joint_blocks", 999),  # lora_sd3 parses with a dummy 999
}
#: which kohya module reads each per-module network_args key
_PER_MODULE_KEYS = {
    **{key: "networks.lora_flux" for key, _ in _FLUX_TYPE_DIMS},
    **{key: "networks.lora_sd3" for key, _ in _SD3_TYPE_DIMS},
    **{key: module for module, (key, _) in _EMBEDDER_DIMS.items()},
    **{key: module for key, (module, _, _) in _BLOCK_SELECTIONS.items()},
    "network_reg_dims": "networks.lora_flux",
    "network_reg_lrs": "networks.lora_flux",
}
_MODULE_FAMILY = {"networks.lora_flux": "FLUX.1/Chroma", "networks.lora_sd3": "SD3"}


def _block_selection(text: str, total: int) -> list[int] | str:
    """kohya's ``parse_block_selection``: ``all``, ``none`` or empty, else comma-separated indices and
    ``a-b`` ranges (0-based, inclusive, each below ``total``) -> the selected indices, or why not."""
    if text == "all":
        return list(range(total))
    if text in ("none", ""):
        return []
    chosen: set[int] = set()
    for part in text.split(","):
        try:
            if "-" in part:
                first, last = (int(x.strip()) for x in part.split("-"))
                if not (0 <= first < total and 0 <= last < total and first <= last):
                    return f"{part.strip()!r} is not a range inside 0-{total - 1}"
                chosen.update(range(first, last + 1))
            else:
                index = int(part)
                if not 0 <= index < total:
                    return f"{index} is not inside 0-{total - 1}"
                chosen.add(index)
        except ValueError:
            return f"{part.strip()!r} is not an index or a range a-b (all, none, or e.g. 0,1,5-8)"
    return sorted(chosen)


def _kohya_pairs(text: str, integer: bool, key: str, out: Translation, where: str) -> list[tuple[str, float]]:
    """kohya lora_flux's ``parse_kv_pairs``: comma-separated ``regex=value``, split at the first ``=``, in order
    (a repeated regex keeps its first place and its last value, as a dict). kohya warns and skips a bad pair;
    here it is a problem (the run would train another network than written)."""
    import re

    pairs: dict[str, float] = {}
    for raw in text.split(","):
        pair = raw.strip()
        if not pair:
            continue
        regex, sep, value = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            number = int(value.strip()) if integer else float(value.strip())
            re.compile(regex.strip())
        except (ValueError, re.error):
            want = "an integer rank" if integer else "a learning rate"
            out.problems.append(f"{where}: network_args {key}: {pair!r} is not regex={want}")
            continue
        pairs[regex.strip()] = number
    return list(pairs.items())


#: the option that keeps a kohya run's per-module network_args as given, for ``ss_network_args``
KOHYA_NETWORK_ARGS = "kohya_network_args"


def _record_per_module_args(module: str, args: dict[str, str], put: Callable[[str, Any, str], None]) -> None:
    """Keep the per-module network_args this module reads (and lora_flux's ``train_blocks``) as given, in their
    order: kohya writes every network_args it was given into the file's ``ss_network_args``, and the rules they
    become (``module_ranks``/``extra_module_ranks``/``module_lrs``, layer filters) are sdcore's, not kohya's."""
    import json

    kept = {
        key: value
        for key, value in args.items()
        if _PER_MODULE_KEYS.get(key) == module or (key == "train_blocks" and module == "networks.lora_flux")
    }
    if kept:
        put(KOHYA_NETWORK_ARGS, json.dumps(kept), "network_args")


def kohya_rule_options(args: Mapping[str, str]) -> set[str]:
    """The sdcore rule options that a run's kept per-module network_args keys set (:func:`_per_module_args`):
    ``network_reg_lrs`` -> ``module_lrs``, ``in_dims``/``emb_dims`` -> ``extra_module_ranks``, the dims and block
    indices -> ``module_ranks``; ``train_blocks=single/double`` too when ``in_dims`` is given (else it is a layer
    filter)."""
    embedders = {key for key, _ in _EMBEDDER_DIMS.values()}
    found = set()
    for key, value in args.items():
        if key == "network_reg_lrs":
            found.add("module_lrs")
        elif key in embedders:
            found.add("extra_module_ranks")
        elif key in _PER_MODULE_KEYS or (
            key == "train_blocks" and value.lower() in _FLUX_TRAIN_BLOCKS and "in_dims" in args
        ):
            found.add("module_ranks")
    return found


def _per_module_args(
    module: str, args: dict[str, str], out: Translation, where: str, put: Callable[[str, Any, str], None]
) -> None:
    """kohya lora_flux / lora_sd3's per-module network_args -> ``module_ranks`` / ``extra_module_ranks`` /
    ``module_lrs`` rules that build the same network (:mod:`sdplugin_lora.module_rules`): kohya's
    ``create_modules`` gives a module the first ``network_reg_dims`` regex's dim; else a block left out by the
    block indices gets none; else the first given type dim whose name parts it contains; else network_dim
    (an embedder: its in_dims/emb_dims value). Every module keeps network_alpha. ``verbose`` only logs."""
    import re

    found = [key for key in _PER_MODULE_KEYS if key in args]
    wrong = [key for key in found if _PER_MODULE_KEYS[key] != module]
    for key in wrong:
        reader = _PER_MODULE_KEYS[key]
        out.problems.append(
            f"{where}: network_args {key} is read by {reader} ({_MODULE_FAMILY[reader]}), not by "
            f"{module or 'networks.lora'}"
        )
        args.pop(key)
    if not set(found) - set(wrong) and "_train_blocks" not in args:
        return
    prefix = "^lora_unet_"
    ranks: list[str] = []
    leftout = args.pop("_train_blocks", None)  # lora_flux train_blocks with in_dims: first, nothing revives them
    if leftout is not None:
        ranks.append(f"{prefix}{'double' if leftout == 'single' else 'single'}_blocks_=0")
    reg = args.pop("network_reg_dims", None)
    if reg is not None:
        ranks += [f"{regex}={dim:d}" for regex, dim in _kohya_pairs(reg, True, "network_reg_dims", out, where)]
    for key, (_, name, total) in _BLOCK_SELECTIONS.items():
        text = args.pop(key, None)
        if text is None:
            continue
        chosen = _block_selection(text, total)
        if isinstance(chosen, str):
            out.problems.append(f"{where}: network_args {key}={text}: {chosen}")
        elif not chosen:
            ranks.append(rf"{prefix}{name}_\d+_=0")
        elif len(chosen) < total:
            ranks.append(rf"{prefix}{name}_(?!(?:{'|'.join(map(str, chosen))})_)\d+_=0")
    for key, parts in _FLUX_TYPE_DIMS + _SD3_TYPE_DIMS:
        text = args.pop(key, None)
        if text is None:
            continue
        try:
            dim = int(text)
        except ValueError:
            out.problems.append(f"{where}: network_args {key}={text}: expected an integer rank (0: not adapted)")
            continue
        ranks.append(prefix + "".join(f"(?=.*{re.escape(part)})" for part in parts) + f"={dim}")
    embedders = _EMBEDDER_DIMS.get(module)
    if embedders is not None and embedders[0] in args:
        key, filters = embedders
        text = args.pop(key).strip()
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        try:
            dims = [int(d) for d in inner.split(",")]
        except ValueError:
            dims = []
        if len(dims) != len(filters):
            out.problems.append(
                f"{where}: network_args {key}={text}: expected {len(filters)} integer ranks "
                f"({', '.join(f.strip('_') for f in filters)})"
            )
        else:
            conv_dim = args.get("conv_dim")
            if module == "networks.lora_sd3" and conv_dim is not None and conv_dim.strip().isdigit():
                # SAI's x_embedder.proj is a 2x2 conv: lora_sd3 gives a non-1x1 conv conv_dim (and conv_alpha)
                # whenever conv_dim is set, before emb_dims' value (create_modules' conv branch comes first)
                dims[filters.index("x_embedder")] = int(conv_dim)
            put("extra_module_ranks", ",".join(f"{re.escape(f)}={d}" for f, d in zip(filters, dims, strict=True)),
                f"network_args {key}")  # fmt: skip
    lrs = args.pop("network_reg_lrs", None)
    if lrs is not None:
        pairs = _kohya_pairs(lrs, False, "network_reg_lrs", out, where)
        if pairs:
            put("module_lrs", ",".join(f"{regex}={lr!r}" for regex, lr in pairs), "network_args network_reg_lrs")
    if ranks:
        put("module_ranks", ",".join(ranks), "network_args (per-module dims)")


def _other_module(
    module: str,
    values: dict[str, Any],
    args: dict[str, str],
    present: set[str],
    out: Translation,
    where: str,
    put: Callable[[str, Any, str], None],
) -> None:
    """A :data:`KOHYA_OTHER_MODULES` module sdcore trains: its option values and its own network_args
    (taken out of ``args``; the common ones stay for :func:`_network`)."""
    for target, value in values.items():
        put(target, value, f"network_module {module}")
    for key, target in _MODULE_ARGS.get(module, {}).items():
        if key in args:
            put(target, args.pop(key), f"network_args {key}")
    if module == "networks.dylora" and args.pop("conv_alpha", None) is not None:
        out.notes.append(
            "network_args conv_alpha: kohya's networks.dylora reads it but gives conv modules network_alpha"
        )
    if module in ("networks.oft", "networks.oft_flux"):
        # kohya's oft.py / oft_flux.py: bool(value) of the network_args string, so any non-empty value turns it on
        for key in ("enable_all_linear", "enable_conv"):
            value = args.pop(key, None)
            on = value is not None and value != ""
            if on and value.strip().lower() in ("false", "0", "no"):
                out.notes.append(f"network_args {key}={value}: kohya's {module} reads any non-empty value as True")
            if key == "enable_conv" and on and module == "networks.oft_flux":
                out.notes.append("network_args enable_conv: kohya's networks.oft_flux ignores it (FLUX.1 has no convs)")
            elif key == "enable_conv" and on:
                out.problems.append(
                    f"{where}: network_args enable_conv with networks.oft: sdcore's OFT has no conv modules (kohya "
                    "rotates the ResNet/sampler convs too); drop enable_conv"
                )
            elif key == "enable_all_linear" and "oft_all_linear" in present:
                put("oft_all_linear", on, "network_args enable_all_linear")
        if "unet_only" in present and "te_only" not in out.values:
            put("unet_only", True, f"network_module {module}")
            out.notes.append(f"{module} adapts the UNet only: the text encoder is not trained (as in kohya)")


#: families whose kohya full fine-tune script (sdxl_train.py, sd3_train.py, flux_train.py) leaves the text
#: encoders frozen unless asked (train_db.py, SD1/SD2, trains the text encoder by default)
_FULL_FT_FROZEN_TE = ("sdxl", "sd3", "flux")


def family_default_targets(family: str | None = None) -> set[str]:
    """The options :data:`KOHYA_FAMILY_DEFAULTS` sets (for ``family``, or for any family)."""
    tables = [KOHYA_FAMILY_DEFAULTS.get(family, ())] if family else list(KOHYA_FAMILY_DEFAULTS.values())
    return {target for table in tables for target, _, _ in table}


def _dataset_toml_sets(data: Any, key: str) -> bool:
    """Whether a kohya dataset TOML (``dataset_config``) sets ``key`` for every subset (in ``[general]``, in each
    ``[[datasets]]`` or in each of its ``[[datasets.subsets]]``; kohya's old spelling ``caption_extention`` counts
    for ``caption_extension``): then the run-wide default never applies, and a note saying "buckets are off" would
    contradict the buckets the run shows. Unreadable files say no (the dataset reader reports them)."""
    keys = {key, "caption_extention"} if key == "caption_extension" else {key}
    if not isinstance(data, str) or not data.lower().endswith(".toml"):
        return False
    import tomllib

    try:
        with open(data, "rb") as handle:
            table = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError):
        return False

    def sets(table: Any) -> bool:
        return isinstance(table, dict) and bool(keys & set(table))

    if sets(table.get("general")):
        return True
    datasets = table.get("datasets")

    def every_subset(dataset: Any) -> bool:
        subsets = dataset.get("subsets") if isinstance(dataset, dict) else None
        return isinstance(subsets, list) and bool(subsets) and all(sets(s) for s in subsets)

    return isinstance(datasets, list) and bool(datasets) and all(sets(d) or every_subset(d) for d in datasets)


def kohya_defaults(
    options_fields: Iterable[str],
    given: set[str],
    given_values: Mapping[str, Any] | None = None,
    *,
    family: str | None = None,
    own_defaults: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """kohya's defaults for a run written with kohya names, for the options nobody set (``given_values``:
    the given options' values, for defaults that only matter when another option is on). ``family``
    (the model's, when known before loading) adds the defaults of kohya's script for that family.
    ``own_defaults`` (the method's option defaults) leaves out a :data:`KOHYA_DEFAULTS` entry the method has
    already (DreamBooth's learning rate is kohya's 2e-6), so that its note says nothing new."""
    present = set(options_fields)
    unset = object()
    values: dict[str, Any] = {}
    applied: list[str] = []
    for target, value, why in KOHYA_FAMILY_DEFAULTS.get(family or "", ()):
        # kohya writes min_timestep = 0 for "unset" (read as None); for SD3 0 is that default: integer timesteps
        zero_start = target == "min_timestep" and (given_values or {}).get("min_timestep", 0) is None
        if target not in present or (target in given and not zero_start):
            continue
        if target == "min_timestep" and "max_timestep" in given:
            continue  # the range is on already
        if target in _SAMPLE_TARGETS and not (given_values or {}).get("sample_prompts"):
            continue  # no samples: nothing to say
        if target == "guidance_scale" and not _is_off((given_values or {}).get("control_lora"), _OFF):
            # 3.5 is flux_train_network.py's, which trains no control LoRA: the run keeps the guidance of diffusers'
            # train_control_lora_flux.py (whose names it shares), 30 (objectives.training_guidance)
            continue
        if value is None:  # kohya's default is sdcore's own: nothing to set or say, but the general one is kept out
            values[target] = None
            continue
        if target == "timestep_sampling" and family == "sd3":
            scheme = str((given_values or {}).get("weighting_scheme", "uniform"))
            value = _SD3_DENSITIES.get(scheme, "uniform")
            why = f"sd3: the noise level is drawn with weighting_scheme's density ({value})"
        values[target] = value
        applied.append(why)
    for target, value, why in KOHYA_DEFAULTS:
        if target not in present or target in given or target in values:
            continue  # (a family's own default wins)
        if (own_defaults or {}).get(target, unset) == value:
            continue  # the method's own default is kohya's
        if target == "caption_extension" and (
            (given_values or {}).get("metadata_file") or _dataset_toml_sets((given_values or {}).get("data"), target)
        ):
            continue  # captions from a metadata file, or the dataset TOML's own extension everywhere
        if target == "lr" and "unet_lr" in given and ("te_lr" in given or (given_values or {}).get("unet_only")):
            values[target] = value  # LoRA's own rates decide; learning_rate is only the file's ss_learning_rate
            continue
        if target == "save_limit" and not any(
            (given_values or {}).get(name) for name in ("save_every", "save_every_epochs", "save_n_epoch_ratio")
        ):
            continue  # no intermediate saves: nothing to keep or remove
        if target == "train_text_encoder" and {"unet_only", "te_only"} & given:
            continue
        if target == "train_text_encoder" and not _is_off((given_values or {}).get("control_lora"), _OFF):
            # a FLUX.1 control LoRA (diffusers' train_control_lora_flux.py, which shares kohya's names) trains no
            # text encoder, and kohya has no control-LoRA script whose default would say otherwise
            continue
        if target == "train_text_encoder" and "unet_only" not in present and family in _FULL_FT_FROZEN_TE:
            continue  # full fine-tuning: train_db.py trains the text encoder, sdxl/sd3/flux_train.py do not
        if (
            target == "train_text_encoder"
            and family == "chroma"
            and _is_off((given_values or {}).get("train_t5"), _OFF)
        ):
            # flux_train_network.py trains CLIP-L unless --network_train_unet_only, and T5 only with
            # train_t5xxl: Chroma has no CLIP-L, so nothing of the text encoder trains (and its outputs cache);
            # network_args values are strings here ("False" is off)
            continue
        if target == "max_steps" and "epochs" in given:
            continue
        if target in _SAMPLE_TARGETS and not (given_values or {}).get("sample_prompts"):
            continue  # no samples: nothing to say
        if target == "buckets" and _dataset_toml_sets((given_values or {}).get("data"), "enable_bucket"):
            continue  # the dataset TOML's enable_bucket decides (kohya reads the command line's only as a fallback)
        if (
            target == "cache_latents"
            and (given_values or {}).get("inpainting_masks") != "random"
            and not any(
                str((given_values or {}).get(name, False)).strip().lower() not in ("false", "0", "", "none")
                for name in ("random_crop", "color_aug", "face_crop_aug_range")
            )
        ):  # sdcore caches by default; kohya's default matters only where caching is refused (train_inpainting too)
            continue
        values[target] = value
        if why:
            applied.append(why)
    return values, applied


def kohya_flow_semantics(values: dict[str, Any], kohya_sampling: Any, family: str | None) -> list[str]:
    """Fix ``values`` (in place) where kohya's flow options mean something else than sdcore's same
    names, for a run written in kohya's terms; the notes saying so.

    kohya's Flux script (``flux_train_utils.get_noisy_model_input_and_timesteps``) does not apply
    ``--discrete_flow_shift`` to its ``uniform`` and ``sigmoid`` samplings (sdcore's shift every
    sampling but flux_shift): the shift becomes 1 on Flux (or a family not known before loading).
    kohya's SD3 script has no ``--timestep_sampling``, so on SD3 the name keeps sdcore's meaning.
    ``kohya_sampling``: the run's ``timestep_sampling`` as written in kohya's terms (None when sdcore's
    own flag gave it).
    """
    notes = _kohya_flow_loss_weights(values, family)
    sampling = _text(kohya_sampling or "").lower()  # kohya's own name ("shift" is sdcore's sigmoid, shifted)
    if family not in (None, "flux", "chroma") or sampling not in ("uniform", "sigmoid"):
        return notes  # SD3 (and the DDPM families, which ignore the flow options) keep sdcore's meaning
    shift = values.get("discrete_flow_shift")
    try:
        number = 1.0 if shift is None else float(shift)
    except (TypeError, ValueError):
        return []  # not a number: reported with the given value's type
    values["discrete_flow_shift"] = 1.0  # and not kohya Flux's default 3.0
    if number == 1.0:
        return notes
    return [
        *notes,
        f"timestep_sampling {sampling}: kohya's Flux script does not time-shift it, so discrete_flow_shift "
        f"{shift} has no effect (use timestep_sampling shift for a shifted sigmoid)",
    ]


def kohya_v_parameterization(values: dict[str, Any], origin: Mapping[str, str], family: str | None) -> list[str]:
    """``v_parameterization`` once the model's family is known: kohya's Flux and SD3 scripts compute their own
    flow-matching target and never read it, so a kohya config that carries it (copied from an SD2/SDXL one)
    still trains there; the run keeps ``auto`` (where ``--prediction-type`` itself would be refused) and says so.
    ``values`` is changed in place. None (family unread): left as given."""
    if origin.get("prediction_type") != "v_parameterization" or values.get("prediction_type") in (None, "auto"):
        return []
    from ..errors import SdcoreError
    from ..models.family import get_family

    try:
        objective = get_family(family).objective if family else "ddpm"
    except SdcoreError:
        return []
    if objective == "ddpm":
        return []
    values["prediction_type"] = "auto"
    return [f"v_parameterization: {family} trains with flow matching; kohya's {family} script does not read it"]


#: why kohya_t5_cache_only ignores ``use_t5xxl_cache_only`` outside sd3_train.py
_T5_CACHE_ONLY_UNREAD = (
    "sd3_train.py's option, which kohya's other scripts do not define (a config file's unknown keys stay unread)"
)


def kohya_t5_cache_only(
    values: dict[str, Any], given: Mapping[str, Any], origin: Mapping[str, str], family: str | None
) -> list[str]:
    """``use_t5xxl_cache_only`` once the model's family is known: only kohya's sd3_train.py defines it (and turns
    ``cache_text_encoder_outputs`` on for it, over an explicit false), so on another family (flux_train.py,
    sdxl_train.py, train_db.py) the run keeps ``given``'s ``cache_text_encoder_outputs`` (kohya's config names as
    written); ``values`` is changed in place. None (family unread): as on SD3."""
    if origin.get("cache_text_encoder_outputs") != "use_t5xxl_cache_only":
        return []
    stated = given.get("cache_text_encoder_outputs")
    # set in the config ("" is the GUI's unset); then off, else the value would not come from use_t5xxl_cache_only
    explicit_off = stated is not None and not (isinstance(stated, str) and not stated.strip())
    if family in (None, "sd3"):
        if not explicit_off:
            return []
        return ["use_t5xxl_cache_only: turns cache_text_encoder_outputs on, as kohya's sd3_train.py does"]
    if explicit_off:
        values["cache_text_encoder_outputs"] = False
    return [f"use_t5xxl_cache_only: {_T5_CACHE_ONLY_UNREAD}; no effect on this {family} model"]


#: the text-encoder options of kohya's full fine-tune scripts (sdcore option -> kohya name), none of which
#: flux_train.py defines
_FULL_FT_TEXT_ENCODER = {"train_text_encoder": "train_text_encoder", "train_t5": "train_t5xxl", "te_lr": "learning_rate_te",
                         "te1_lr": "learning_rate_te1", "te2_lr": "learning_rate_te2", "te3_lr": "learning_rate_te3"}  # fmt: skip


def kohya_flux_train_text_encoder(
    values: dict[str, Any], origin: Mapping[str, str], cli: Collection[str], fields: Collection[str], family: str | None
) -> list[str]:
    """A kohya full fine-tune config on FLUX.1 is for flux_train.py, which defines no ``--train_text_encoder``
    (nor ``train_t5xxl`` or a text-encoder rate) and keeps CLIP-L and T5 frozen (sd-scripts 48d368f
    flux_train.py L226-227); a config file's keys the script does not define are read into its arguments and
    never used (library/train_util.py ``read_config_from_file``, L4760). So those options, given in kohya's
    names, are dropped from ``values`` (in place) with a note, and the text encoders stay frozen as in kohya;
    sdcore's own ``--train-text-encoder`` on the command line (``cli``) still trains CLIP-L there. LoRA configs
    (``unet_only`` among the ``fields``: flux_train_network.py trains CLIP-L) and other families are untouched."""
    if "unet_only" in fields or family != "flux" or "train_text_encoder" in cli:
        return []
    dropped = []
    for target, name in _FULL_FT_TEXT_ENCODER.items():
        value = values.get(target)
        if (
            origin.get(target) != name
            or target in cli
            or value is None
            or (target.startswith("train") and _is_off(value, _OFF))
        ):
            continue  # a rate of 0 is dropped too (it is kohya's "frozen", :func:`_zero_is_a_value`)
        values.pop(target, None)
        dropped.append(name)
    if not dropped:
        return []
    return [
        f"{', '.join(dropped)}: kohya's FLUX.1 fine-tune script (flux_train.py) does not define it and keeps the "
        "text encoders frozen; no effect (sdcore's --train-text-encoder trains CLIP-L)"
    ]


def kohya_text_cache_notes(
    values: Mapping[str, Any], origin: Mapping[str, str], fields: Collection[str], family: str | None
) -> list[str]:
    """A note when a kohya LoRA run asks for ``cache_text_encoder_outputs`` while its text encoder trains (kohya's
    default without ``--network_train_unet_only``) and sdcore then caches nothing: its SDXL script refuses the
    pair, SD 1.x/2.x cache nothing, a trained T5 (``train_t5xxl``) is refused; without the note the option looks
    taken and the run is slower and larger than the user planned. On SD3/FLUX.1 with CLIP alone training there is
    none: sdcore caches T5's outputs as kohya does (:func:`sdcore.train.cache.partial_text_encoders`)."""
    asked = origin.get("cache_text_encoder_outputs") in (
        "cache_text_encoder_outputs",
        "cache_text_encoder_outputs_to_disk",
        "use_t5xxl_cache_only",
    )
    if not asked or "unet_only" not in fields:  # LoRA's options (DreamBooth's text encoder is frozen by default)
        return []
    trains = not _is_off(values.get("train_text_encoder"), _OFF) and _is_off(values.get("unet_only"), _OFF)
    if not trains:
        return []
    if family in ("flux", "sd3") and _is_off(values.get("train_t5"), _OFF):
        return []  # T5's outputs cached while CLIP trains, as kohya's scripts do (partial caching)
    peer = {
        "chroma": "kohya refuses caching with train_t5xxl",
        "sdxl": "kohya's sdxl_train_network.py refuses the pair",
        # train_network.py's cache_text_encoder_outputs_if_needed only moves the encoders: no cache on SD 1.x/2.x
        "sd1": "kohya's train_network.py caches nothing on SD 1.x/2.x",
        "sd2": "kohya's train_network.py caches nothing on SD 1.x/2.x",
    }.get(family or "", "kohya needs --network_train_unet_only for it")
    if family in ("flux", "sd3") and not _is_off(values.get("train_t5"), _OFF):
        peer = "kohya refuses caching with train_t5xxl"  # flux_train_network.py / sd3_train_network.py
    return [
        "cache_text_encoder_outputs: the text encoder trains (kohya's default without --network_train_unet_only), "
        f"so sdcore encodes the captions at every step and caches nothing ({peer}); add --network_train_unet_only "
        "to cache them"
    ]


def kohya_text_encoder_storage(
    values: dict[str, Any], given: Mapping[str, Any], fields: Collection[str], family: str | None
) -> list[str]:
    """kohya's ``--fp8_base`` without ``--fp8_base_unet`` also stores the text encoders that run during training in
    float8 (train_network.py: ``te_weight_dtype``, each script's ``prepare_text_encoder_fp8`` keeping the embeddings,
    and T5's norms, in the compute dtype). Encoders whose outputs are cached are not: kohya caches them from the
    compute dtype (flux/sd3_train_network.py: CLIP "always not fp8", T5 as its file is) and leaves them on the CPU,
    where the cast is skipped. So ``values`` gets ``text_encoder_weights_dtype`` fp8 for the encoders that run
    uncached (all without the cache; on SD3/FLUX.1 the training CLIPs beside a cached T5), in place.

    Only kohya's network scripts read ``te_weight_dtype`` (train_network.py and its subclasses; sd-scripts'
    fine-tune and textual-inversion scripts never read ``fp8_base``), so only LoRA options (``unet_only`` among
    the ``fields``) get it. SD 1.x/2.x cache nothing (train_network.py's ``cache_text_encoder_outputs_if_needed``
    only moves the encoders to the device, where they are cast), so their encoders are fp8 with the cache too."""
    if _is_off(given.get("fp8_base"), _OFF) or not _is_off(given.get("fp8_base_unet"), _OFF):
        return []
    if "text_encoder_weights_dtype" not in fields or str(values.get("text_encoder_weights_dtype") or "none") != "none":
        return []
    if "unet_only" not in fields:
        return []
    cached = values.get("cache_text_encoder_outputs") is True and family not in ("sd1", "sd2")
    # the text encoder trains unless network_train_unet_only (kohya's default, put in values by kohya_defaults
    # where kohya trains one: not on Chroma, whose CLIP-L is absent and T5 trains only with train_t5xxl)
    asked = not _is_off(values.get("train_text_encoder"), _OFF) or not _is_off(values.get("te_only"), _OFF)
    trains = asked and _is_off(values.get("unet_only"), _OFF)
    from ..models.family import get_family

    specs = get_family(family).text_encoders if family else ()
    partial = trains and family in ("flux", "sd3") and _is_off(values.get("train_t5"), _OFF)
    if not cached or (trains and not partial):
        chosen = ["fp8"]  # every encoder runs at each step (kohya caches nothing while one trains, but T5's)
    elif partial and specs:
        chosen = ["none" if spec.kind.startswith("t5") else "fp8" for spec in specs]
    else:
        return [
            "fp8_base with cache_text_encoder_outputs: kohya caches the text encoders' outputs in the compute dtype "
            "(a T5-XXL file already in fp8 as it is), so they stay unconverted here too"
        ]
    values["text_encoder_weights_dtype"] = ",".join(chosen)
    return [
        f"fp8_base: the text encoders that run during training are stored in fp8 too, as kohya does "
        f"(--text-encoder-weights-dtype {values['text_encoder_weights_dtype']}: their Linear weights; kohya also "
        "rounds their norms and biases to fp8, sdcore keeps those)"
    ]


#: train_network.py's SNR loss weightings, which kohya's SD3/Flux/Chroma LoRA scripts skip (their
#: ``post_process_loss`` returns the loss as it is) -> the value that is off
_DDPM_LOSS_WEIGHTS = {"min_snr_gamma": None, "debiased_estimation_loss": False,
                      "scale_v_pred_loss_like_noise_pred": False, "v_pred_like_loss": 0.0}  # fmt: skip


def _kohya_flow_loss_weights(values: dict[str, Any], family: str | None) -> list[str]:
    """A kohya run on a flow family trains without the SNR weightings kohya's SD3/Flux scripts skip, so a
    kohya config that sets them (the kohya_ss GUI's own Flux preset has min_snr_gamma 7) trains as it does in
    kohya instead of being refused; sdcore's own names on such a model stay refused by the pre-flight."""
    if family not in ("flux", "chroma", "sd3"):
        return []
    dropped = []
    for name, off in _DDPM_LOSS_WEIGHTS.items():
        value = values.get(name)
        if value is not None and str(value).strip().lower() not in ("", "0", "0.0", "false", "none"):
            values[name] = off
            dropped.append(f"{name} {value}")
    if not dropped:
        return []
    return [f"{', '.join(dropped)}: kohya's {family} script does not apply SNR loss weights (flow matching); ignored"]


def model_type_problems(kohya: Mapping[str, Any], family: str | None, where: str) -> list[str]:
    """flux_train_network.py's ``model_type`` against the model's family (read from its file; sdcore needs no
    model_type), and the Chroma settings kohya's script asserts or documents that sdcore cannot honour otherwise:
    ``guidance_scale`` must be 0 (the approximator's guidance input is 0 in sdcore, as in diffusers)."""
    problems: list[str] = []
    model_type = _text(kohya.get("model_type") or "").lower()
    if model_type == "chroma" and family not in (None, "chroma"):
        problems.append(f"{where}: model_type = 'chroma' but the model is a {family} model (use model_type = 'flux')")
    if model_type == "flux" and family == "chroma":
        problems.append(f"{where}: model_type = 'flux' but the model is Chroma (use model_type = 'chroma')")
    if family == "chroma" and kohya.get("guidance_scale") not in (None, ""):
        try:
            value = float(kohya["guidance_scale"])
        except (TypeError, ValueError):
            value = 0.0  # not a number: reported with the option's type
        if value != 0.0:
            problems.append(
                f"{where}: guidance_scale {kohya['guidance_scale']}: Chroma is trained with guidance 0 (kohya's docs "
                "require --guidance_scale 0.0; sdcore's Chroma has no guidance input): set 0.0 or drop it"
            )
    return problems


def written_in_kohya_terms(names: Iterable[str], fields: Iterable[str]) -> bool:
    """True when any of ``names`` is a kohya spelling that is not also an sdcore option name."""
    present = set(fields)
    return any(is_kohya_name(n) and n not in present for n in names)


def nearest_name(name: str, fields: Iterable[str]) -> str | None:
    """The sdcore option a mistyped or kohya-spelled ``name`` most likely means (or ``None``).

    ``network-dim``/``network_dim`` -> ``rank``; ``lrr`` -> ``lr``; ``network_dimm`` -> ``rank``
    (via kohya's ``network_dim``). A kohya name returns its sdcore target when this method has it.
    """
    present = list(fields)
    key = name.strip().lstrip("-").replace("-", "_")
    if key in present:
        return key
    if NETWORK_ARGS.get(key) in present:  # a network_args key given as an option: --conv_dim
        return NETWORK_ARGS[key]
    kohya = [n for n in [*ALIASES, *COMPOSITE] if n not in present]
    match = difflib.get_close_matches(key, [*present, *kohya], n=1, cutoff=0.6)
    if not match:
        return None
    alias = ALIASES.get(match[0])
    if match[0] not in present and alias is not None and alias.applies(present):
        return alias.target
    return match[0]


@dataclass(frozen=True)
class NameHint:
    """A name another tool uses that sdcore does not take (typing it stays an error: a near name must not run
    with a different meaning), with what to write instead, said by the unknown-option error of ``sdcore train``
    and the unknown-key error of a config file (:func:`name_hint`)."""

    #: whose name it is, for the message ("A1111's save_embedding_every"); "" where ``note`` says it all
    source: str = ""
    #: the sdcore option that means the same; "" where none does
    target: str = ""
    #: what else to know: how it differs, or why no option is needed
    note: str = ""
    #: the methods that have ``target`` where not all do ("ti, apt"), for the message on the others
    methods: str = ""


def _a1111(name: str, target: str = "", note: str = "", methods: str = "") -> NameHint:
    return NameHint(f"A1111's {name}", target, note, methods)


_DOCS_ONLY = (
    "kohya's sdxl_train_network.py has no such argument (its docs show one); give text_encoder_lr two values, "
    "one per text encoder (--text_encoder_lr 1e-5 1e-5)"
)
_FAMILY_FLAG = (
    "not needed: sdcore reads the model family (SD1, SD2, SDXL, SD3, FLUX.1 ...) from the model itself; kohya "
    "picks it by script (sdxl_train_network.py) and some tools by a flag"
)
#: the family flags of other tools (kohya's extract_lora_from_models.py --sdxl, some scripts' --sd3/--flux); sdcore
#: reads the family from the model, so none is an option (kohya's --v2 is accepted by the training commands)
FAMILY_FLAGS = ("sdxl", "sd3", "flux")


def family_flag_hint(option: str) -> str | None:
    """`` (not needed: ...)`` for ``--sdxl``, ``--sd3``, ``--flux`` (and kohya's ``--v2``, which only the training
    commands accept) on a command that has no such option, e.g. ``sdcore generate``; ``None`` for any other name."""
    name = option.strip().lstrip("-").replace("-", "_")
    return f" ({_FAMILY_FLAG})" if name in (*FAMILY_FLAGS, "v2") else None


_A1111_SCHEDULE = "A1111's 'rate:step, rate' schedule strings are --lr-schedule of `sdcore train ti, hn, apt`"
_HN_DROPOUT = "dropout is --dropout of `sdcore train hn`, the structure itself (e.g. 0,0.1,0)"
_A1111_SIZE = (
    "A1111 resizes each image to W x H; sdcore builds aspect-ratio buckets of that area, or crops with --no-buckets"
)

_DIFFUSERS_CAPTIONS = (
    "sdcore captions each image by its caption file (.txt) or, without one, by its folder's name, kohya's "
    "N_<prompt> (10_sks dog, inside --data); or run the diffusers command as written: sdcore train lora --config "
    "train.sh"
)

#: other tools' names that are no option of sdcore, by the name as typed with underscores: the unknown-option hint
#: says what they are here. Keys are never kohya names or sdcore options (those are accepted as they are), and a
#: target only where the meaning is the same; the A1111 names are the Train tab's fields (modules/ui.py and
#: textual_inversion.train_embedding / hypernetwork.train_hypernetwork's parameters).
NAME_HINTS: dict[str, NameHint] = {
    # names kohya's docs show that its argparse does not define (docs/sdxl_train_network.md's SDXL LoRA example):
    # kohya itself stops with "unrecognized arguments"
    "text_encoder_lr1": NameHint(note=_DOCS_ONLY),
    "text_encoder_lr2": NameHint(note=_DOCS_ONLY),
    # a model family flag (kohya's tools: extract_lora_from_models.py --sdxl; some scripts --sdxl/--flux; kohya's own
    # --v2 and --v_parameterization are accepted, see COMPOSITE and ALIASES): no flag needed
    **dict.fromkeys(FAMILY_FLAGS, NameHint(note=_FAMILY_FLAG)),
    # A1111's Train tab (Textual Inversion, Hypernetwork)
    "learn_rate": _a1111("learn_rate", "lr", _A1111_SCHEDULE),
    "embedding_learn_rate": _a1111("embedding_learn_rate", "lr", _A1111_SCHEDULE),
    "hypernetwork_learn_rate": _a1111("hypernetwork_learn_rate", "lr", _A1111_SCHEDULE),
    "gradient_step": _a1111("gradient_step", "gradient_accumulation"),
    "data_root": _a1111("data_root", "data"),
    "dataset_directory": _a1111("dataset_directory", "data"),
    "log_directory": _a1111(
        "log_directory",
        note="no single equivalent: A1111 writes its saves, previews and loss log there; sdcore writes the saves "
        "(--save-every) and the previews beside --output, and TensorBoard logs to --log-dir",
    ),
    "training_width": _a1111("training_width", "resolution", f"--resolution W,H; {_A1111_SIZE}"),
    "training_height": _a1111("training_height", "resolution", f"--resolution W,H; {_A1111_SIZE}"),
    "varsize": _a1111(
        "varsize",
        note="no equivalent: A1111 then trains each image at its own size; sdcore resizes images to aspect-ratio "
        "buckets (--buckets, the default)",
    ),
    "steps": _a1111("steps", "max_steps"),
    "clip_grad_mode": _a1111(
        "clip_grad_mode", "grad_clip_method", "norm or value; A1111's 'disabled' (its default) is --max-grad-norm 0"
    ),
    "clip_grad_value": _a1111(
        "clip_grad_value", "max_grad_norm", "one number: A1111's 'value:step' schedule strings are not taken"
    ),
    "shuffle_tags": _a1111("shuffle_tags", "shuffle_caption"),
    "tag_drop_out": _a1111("tag_drop_out", "tag_dropout"),
    "latent_sampling_method": _a1111("latent_sampling_method", "latent_sampling", methods="ti, apt"),
    "use_weight": _a1111(
        "use_weight",
        "alpha_mask",
        "kohya's alpha weighting, the same within an image whose alpha reaches 0; A1111 also rescales each "
        "image's weights to a mean of 1 (alpha - its minimum, divided by the mean of that), sdcore uses alpha/255",
    ),
    "create_image_every": _a1111(
        "create_image_every", "sample_every", "it renders --sample-prompts (A1111 the batch's first prompt)"
    ),
    # A1111's Settings > Training, read by the Train tab's dataset (modules/textual_inversion/dataset.py)
    "dataset_filename_word_regex": _a1111(
        "dataset_filename_word_regex", "filename_word_regex", "with --filename-captions a1111, as A1111 applies it"
    ),
    "dataset_filename_join_string": _a1111("dataset_filename_join_string", "filename_join_string"),
    "save_embedding_every": _a1111("save_embedding_every", "save_every"),
    "save_hypernetwork_every": _a1111("save_hypernetwork_every", "save_every"),
    "template_file": _a1111("template_file", "template", methods="ti, hn, apt"),
    "template_filename": _a1111("template_filename", "template", methods="ti, hn, apt"),
    "initialization_text": _a1111("initialization_text", "init_text", methods="ti, apt"),
    "nvpt": _a1111("nvpt", "vectors", methods="ti, apt"),
    "save_image_with_stored_embedding": _a1111(
        "save_image_with_stored_embedding",
        note="no equivalent: training writes no preview PNG carrying the embedding; the .pt (and --format's copy) "
        "is the embedding, and sdplugin_ti.formats.save_embedding(emb, 'x.png', preview=image) writes such a PNG",
    ),
    "preview_from_txt2img": _a1111(
        "preview_from_txt2img",
        note="no equivalent: write the preview's prompt and settings as a --sample-prompts line (--n negative, --w "
        "--h size, --s steps, --l CFG, --d seed, --ss sampler), rendered every --sample-every steps",
    ),
    # A1111's Create hypernetwork fields
    "add_layer_norm": _a1111("add_layer_norm", "layer_norm", methods="hn"),
    "activation_func": _a1111("activation_func", "activation", methods="hn"),
    "weight_init": _a1111("weight_init", "init", "A1111's names (Normal, XavierUniform ...) are accepted", "hn"),
    # no target: LoRA's --dropout is another thing (a dropout of its down output)
    "dropout_structure": _a1111("dropout_structure", note=f"the hypernetwork's {_HN_DROPOUT}"),
    "use_dropout": _a1111("use_dropout", note=f"a checkbox in A1111; the hypernetwork's {_HN_DROPOUT}"),
    # diffusers' example scripts (train_dreambooth_lora*.py), typed on sdcore's command line; the whole command
    # runs as it is written with --config train.sh (sdcore.train.diffusers_script)
    "instance_data_dir": NameHint("diffusers' instance_data_dir", "data", _DIFFUSERS_CAPTIONS),
    "instance_prompt": NameHint("diffusers' instance_prompt", "instance_prompt", _DIFFUSERS_CAPTIONS, "dreambooth"),
    "class_data_dir": NameHint("diffusers' class_data_dir", "reg_data", _DIFFUSERS_CAPTIONS),
    "class_prompt": NameHint("diffusers' class_prompt", "class_prompt", _DIFFUSERS_CAPTIONS, "dreambooth"),
    "checkpointing_steps": NameHint("diffusers' checkpointing_steps", "save_every"),
    "validation_prompt": NameHint(
        "diffusers' validation_prompt", "sample_prompts", "a file of prompts, one a line, rendered every --sample-every"
    ),
    # short forms people type
    "dim": NameHint("kohya's network_dim", "rank", methods="lora, locon"),
    "images": NameHint(target="data"),
}


def name_hint(name: str, fields: Collection[str], flag: Callable[[str], str]) -> str | None:
    """What to say after "No such option: NAME" (or an unknown config key) when ``name`` is in
    :data:`NAME_HINTS`: `` (did you mean --save-every (A1111's save_embedding_every)?)``, the method that has the
    option, or why there is none. ``fields`` are the method's options; ``flag`` writes an option's name as the
    user would type it (``--save-every`` on the command line, ``'save_every'`` in a config). ``None``: not a
    name of the table (or its target is in none of the methods named), so the nearest name is the hint."""
    key = name.strip().lstrip("-").lower().replace("-", "_")  # users type other tools' names in any case
    hint = NAME_HINTS.get(key)
    if hint is None:
        return None
    source = f" ({hint.source})" if hint.source else ""
    note = f" {hint.note}" if hint.note else ""
    if hint.target and hint.target in fields:
        return f" (did you mean {flag(hint.target)}{source}?{note})"
    if hint.target and hint.methods:
        # a name that is those methods' own option (diffusers' instance_prompt, DreamBooth's too): what it is here
        here = f"; with this method {hint.note}" if hint.target == key and hint.note else ""
        return f" ({hint.source} is {flag(hint.target)} of `sdcore train {hint.methods}`, not of this method{here})"
    if hint.target:
        return None
    return f" ({hint.source}: {hint.note})" if hint.source else f" ({hint.note})"


def nearest(name: str, fields: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for an unknown config key (empty when nothing is close)."""
    present = list(fields)
    hinted = name_hint(name, present, repr)
    if hinted is not None:
        return hinted
    found = nearest_name(name, present)
    if found is None:
        return ""
    if found in present:
        return f" (did you mean {found!r}?)"
    return f" (did you mean {found!r}, kohya's name for an option of another method?)"


__all__ = [
    "ALIASES",
    "COMPOSITE",
    "IGNORED",
    "KOHYA_DEFAULTS",
    "KOHYA_FAMILY_DEFAULTS",
    "MULTI_VALUE",
    "NAME_HINTS",
    "UNSUPPORTED",
    "Translation",
    "cli_names",
    "family_default_targets",
    "flag_names",
    "help_rows",
    "is_kohya_name",
    "kohya_defaults",
    "kohya_flow_semantics",
    "kohya_text_encoder_rates",
    "kohya_v_parameterization",
    "name_hint",
    "nearest",
    "nearest_name",
    "translate",
    "written_in_kohya_terms",
]

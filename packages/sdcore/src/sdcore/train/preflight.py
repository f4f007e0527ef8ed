"""The pre-flight: every check that can run before a model loads, all problems reported at once.

``sdcore train <method> --dry-run`` runs it and prints the plan; every run runs it first (the
``train()`` call does, before the accelerator starts and before any weight is read). It checks:

- the options (:func:`option_problems`, which ``validate_options`` raises from);
- the model: the path exists and its header is readable, family detected
  (:func:`sdcore.models.layout.read_layout`: a safetensors header, a diffusers folder's configs, a
  cached Hub id, ``tiny:<family>``; no weights are read);
- the parts given separately (``--clip-l``, ``--clip-g``, ``--t5xxl``, ``--vae``, ``--t5-tokenizer``): each is
  there, readable and (from its header) that part, the model takes it, and the model file plus the parts
  make a complete model (:func:`sdcore.models.parts.part_problems`);
- the output and state folders are writable (a probe file is created and removed; a folder that
  does not exist yet is checked at its nearest existing parent);
- the dataset has usable images (the runtime's own index and buckets), and what the method asks of it
  (:meth:`TrainingMethod.dataset_problems`, e.g. a caption with its new token);
- a ``--resume`` state belongs to this method and was trained with the same shape options
  (:attr:`TrainingMethod.resume_shape_options`: LoRA rank and algorithm, TI vector count...) and
  the same ``--ema`` settings;
- free disk for the result, the intermediate results and the states the save settings keep.

It also makes the memory plan (:mod:`sdcore.train.memory`) from the model's configs and the
method's parameters on a shapes-only (meta device) copy of the model. Problems are collected in a
:class:`PreflightError` (one line each); the CLI prints them and exits with code 2.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..console import warning_line
from ..dtypes import element_bytes
from ..errors import ConfigError, ModelFormatError, SdcoreError
from .method import ALL_AT_LR
from .options import MIXED_PRECISION, SAVE_DTYPES, TrainOptions

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle
    from ..models.layout import ModelLayout
    from .data import TrainData
    from .memory import MemoryEstimate, ParameterPlan, Suggestion
    from .method import TrainingMethod

log = logging.getLogger("sdcore.train")

MIB = 1024 * 1024


class PreflightError(ConfigError):
    """One or more problems found before training (or before ``sdcore generate`` loads its model); ``problems``
    holds one line each. The CLI exits with status 2."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        problems = list(dict.fromkeys(problems))  # two checks that meet the same fault say it once
        super().__init__("\n".join(problems), problems)


# ----------------------------------------------------------------------------------------------------------
# options


def validate_options(options: TrainOptions, method: TrainingMethod[Any] | None = None) -> None:
    """Raise for missing or contradictory options (all of them, one line each:
    :class:`PreflightError`), before anything heavy runs."""
    problems = option_problems(options, method)
    if problems:
        raise PreflightError(problems)


def option_problems(options: TrainOptions, method: TrainingMethod[Any] | None = None) -> list[str]:
    """Every missing or contradictory option, one line each (empty when all is well)."""
    from .accelerate_options import accelerate_option_problems
    from .optim import optimizer_problems

    o = options
    problems: list[str] = []
    if not o.model:
        problems.append("no base model given (--model: a model file or folder, or tiny:<family>)")
    if not o.data:
        problems.append("no dataset given (--data: a folder of images or a dataset .toml)")
    if not o.output:
        problems.append("no output given (--output: where to write the result)")
    for name, value, choices in (
        ("mixed_precision", o.mixed_precision, MIXED_PRECISION),
        ("save_dtype", o.save_dtype, SAVE_DTYPES),
    ):
        if value not in choices:
            problems.append(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(choices)}")
    positive = {
        "batch_size": o.batch_size,
        "gradient_accumulation": o.gradient_accumulation,
        "clip_skip": o.clip_skip,
        "caption_variants": o.caption_variants,
        "dataset_repeats": o.dataset_repeats,
    }
    for label, count in positive.items():
        if count < 1:
            problems.append(f"--{label.replace('_', '-')} must be at least 1, got {count}")
    for name in (
        "max_steps",
        "epochs",
        "save_every",
        "save_every_epochs",
        "save_n_epoch_ratio",
        "sample_every",
        "sample_every_epochs",
        "sample_resolution",
    ):
        value = getattr(o, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1 when given, got {value}")
    from .initial import initial_option_problems

    problems.extend(initial_option_problems(o))  # --initial-step/--initial-epoch (kohya)
    for name in ("save_limit", "keep_states"):  # 0 keeps all
        value = getattr(o, name)
        if value is not None and value < 0:
            problems.append(f"--{name.replace('_', '-')} must be 0 (keep all) or more, got {value}")
    if o.resolution < 0:
        problems.append(f"--resolution must be positive (or 0 for the model's native size), got {o.resolution}")
    problems.extend(resolutions_problems(o))
    problems.extend(bucket_rule_problems(o))
    # --lr 0 is legal where every trained part has its own rate (LoRA's unet_lr/text_encoder_lr, kohya)
    at_lr = method.lr_fallback_parts() if method is not None and o.lr == 0 else []
    if o.lr < 0 or (o.lr == 0 and (method is None or at_lr)):
        own = [part for part in at_lr if part != ALL_AT_LR]  # a method with per-part rates: which part lacks one
        problems.append(f"--lr must be positive, got {o.lr}" + (f" ({', '.join(own)} train at it)" if own else ""))
    if o.sample_cfg is not None and o.sample_cfg <= 0:
        problems.append(f"--sample-cfg must be positive when given, got {o.sample_cfg}")
    for name in ("caption_dropout", "tag_dropout"):
        value = getattr(o, name)
        if not 0.0 <= value <= 1.0:
            problems.append(f"--{name.replace('_', '-')} must be between 0 and 1, got {value}")
    if o.caption_dropout_every_n_epochs < 0:
        problems.append(
            f"--caption-dropout-every-n-epochs must be 0 (off) or more, got {o.caption_dropout_every_n_epochs}"
        )
    from .caption_checks import caption_option_problems

    problems.extend(caption_option_problems(o, method))
    from .sd3_options import rate_problems

    problems.extend(rate_problems(o))  # kohya's SD3 options (caption dropout per encoder, positional embedding)
    if o.noise_offset < 0:
        problems.append(f"--noise-offset must be >= 0, got {o.noise_offset}")
    if o.min_snr_gamma is not None and o.min_snr_gamma <= 0:
        problems.append(f"--min-snr-gamma must be positive, got {o.min_snr_gamma}")
    from .loss import loss_option_problems

    problems.extend(loss_option_problems(o))
    problems.extend(noise_option_problems(o))
    from .objectives import flow_option_problems, flow_reading_problems

    problems.extend(
        flow_option_problems(o.timestep_sampling, o.discrete_flow_shift, o.logit_std, o.mode_scale, o.sigmoid_scale)
    )
    problems.extend(flow_reading_problems(o.model_prediction_type, o.weighting_scheme))
    if o.max_grad_norm < 0:
        problems.append(f"--max-grad-norm must be >= 0 (0 disables clipping), got {o.max_grad_norm}")
    problems.extend(grad_clip_problems(o))
    if o.cache_latents_to_disk and not o.cache_latents:
        problems.append("--cache-latents-to-disk needs --cache-latents")
    if o.cache_text_encoder_outputs_to_disk and not o.cache_text_encoder_outputs:
        problems.append("--cache-text-encoder-outputs-to-disk needs --cache-text-encoder-outputs")
    from ..data.augment import face_crop_range

    try:
        face_crop_range(o.face_crop_aug_range)
    except ValueError as exc:
        problems.append(f"--{exc}".replace("face_crop_aug_range", "face-crop-aug-range", 1))
    if o.sample_every is not None and not o.sample_prompts:
        problems.append("--sample-every needs --sample-prompts")
    if o.sample_every_epochs is not None and not o.sample_prompts:
        problems.append("--sample-every-epochs needs --sample-prompts")
    if o.sample_at_first and not o.sample_prompts:
        problems.append("--sample-at-first needs --sample-prompts")
    from .modelspec import metadata_option_problems

    problems.extend(metadata_option_problems(o))  # --metadata-thumbnail
    if o.sample_prompts and not o.sample_prompts.strip():
        problems.append("--sample-prompts is empty")
    elif o.sample_prompts:
        from .sample_prompts import (
            inpaint_image_problems,
            network_problems,
            read_sample_prompts,
            reference_problems,
            sampler_name,
            size_problems,
        )

        def sample_problems() -> list[str]:
            from ..models.layout import peek_family
            from .sampling import sample_resolution

            # a header or config read, no weights: a Hub id from the local cache only (never the network), a
            # pickle or a missing model None (no size line then; the loader reports a missing model)
            family = peek_family(o.model) if o.model else None
            prompts = read_sample_prompts(o.sample_prompts or "", family)
            return (network_problems(prompts) + reference_problems(prompts, family) + inpaint_image_problems(prompts)
                    + size_problems(prompts, family, sample_resolution(o)))  # fmt: skip

        for check in (
            lambda: sampler_name(o.sample_sampler) if o.sample_sampler is not None else None,
            lambda: problems.extend(sample_problems()),
        ):
            try:  # syntax errors and <lora:...> tags now, not after an hour of training
                check()
            except SdcoreError as exc:
                problems.append(str(exc))
    if o.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            problems.append("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    from .memory_options import option_problems as memory_option_problems

    problems.extend(memory_option_problems(o))
    from .offload_checkpointing import offload_option_problems

    problems.extend(offload_option_problems(o))  # --cpu-offload-checkpointing with --blocks-to-swap
    from .token_routing import option_problems as routing_option_problems

    problems.extend(routing_option_problems(o))  # --tread-route: syntax, ratio, block order
    from .validation import precision_option_problems, validation_option_problems

    problems.extend(validation_option_problems(o))
    problems.extend(precision_option_problems(o))
    problems.extend(optimizer_problems(o))  # names, class paths, packages, schedule arguments
    from .fused import fused_problems

    problems.extend(fused_problems(o, method))  # --fused-backward-pass: optimizer, accumulation, method
    problems.extend(accelerate_option_problems(o))  # --ddp-timeout (kohya's accelerate settings)
    from .ema import ema_option_problems

    problems.extend(ema_option_problems(o))  # --ema-decay, --ema-update-every; FSDP/DeepSpeed
    from .te_stop import stop_option_problems

    problems.extend(stop_option_problems(o, method))  # --stop-text-encoder-at/-after-epochs
    if method is not None:
        if method.capabilities().needs_pixels and o.cache_latents:
            problems.append(f"method {method.name!r} needs decoded pixels every step: pass --no-cache-latents")
        try:
            method.validate()
        except SdcoreError as exc:
            problems.append(str(exc))
    from ..options import range_problems

    # every declared range (option(minimum=...)), used in this run or not: a mistyped value is said at once
    problems.extend(range_problems(o, problems))
    return problems


#: --grad-clip-method values (SimpleTuner's grad_clip_method choices: value, norm)
GRAD_CLIP_METHODS = ("norm", "value")


def grad_clip_problems(o: TrainOptions) -> list[str]:
    """--grad-clip-method: one of :data:`GRAD_CLIP_METHODS`; ``value`` (accelerate's ``clip_grad_value_``) needs
    every gradient whole on each process, so not with a sharding engine (accelerate refuses it under FSDP and
    DeepSpeed, SimpleTuner skips the clipping there) nor with the tensors stepping inside backward (which clip
    each tensor by its own norm, kohya's rule)."""
    from .ema import sharded_engine
    from .fused import steps_in_backward

    if o.grad_clip_method not in GRAD_CLIP_METHODS:
        return [f"--grad-clip-method {o.grad_clip_method!r}: choose one of {', '.join(GRAD_CLIP_METHODS)}"]
    if o.grad_clip_method != "value" or o.max_grad_norm <= 0:
        return []
    problems = []
    engine = sharded_engine()
    if engine:
        problems.append(f"--grad-clip-method value with {engine}: accelerate clips values only on whole gradients "
                        "(use --grad-clip-method norm, or plain multi-GPU)")  # fmt: skip
    if steps_in_backward(o):
        problems.append("--grad-clip-method value with a fused backward pass: the tensors step inside backward, "
                        "clipped by their own norm (kohya's rule); use --grad-clip-method norm")  # fmt: skip
    return problems


def noise_option_problems(o: TrainOptions) -> list[str]:
    """Bad values of the noise/timestep options (kohya's meanings; the family checks are in
    :func:`objective_option_checks`)."""
    from .objectives import table_range_problem, timestep_range_problem

    problems = []
    if o.adaptive_noise_scale is not None and not o.noise_offset:
        problems.append("--adaptive-noise-scale adds to the noise offset: it needs --noise-offset (as kohya asserts)")
    if o.multires_noise_iterations is not None and o.multires_noise_iterations < 0:
        problems.append(f"--multires-noise-iterations must be >= 0, got {o.multires_noise_iterations}")
    if not o.multires_noise_discount >= 0:
        problems.append(f"--multires-noise-discount must be >= 0, got {o.multires_noise_discount}")
    if o.ip_noise_gamma is not None and not o.ip_noise_gamma >= 0:
        problems.append(f"--ip-noise-gamma must be >= 0, got {o.ip_noise_gamma}")
    # every family sdcore trains has 1000 training timesteps; the objective checks the model's own count again
    for problem in (
        timestep_range_problem(o.min_timestep, o.max_timestep, 1000),
        table_range_problem(o.min_table_index, o.max_table_index, 1000),
    ):
        if problem:
            problems.append(problem)
    problems.extend(distribution_option_problems(o))
    return problems


#: what --timestep-distribution reads (without it they do nothing; we say so)
_DISTRIBUTION_OPTIONS = ("noising_weight", "noising_bias", "min_noising_strength", "max_noising_strength",
                         "timestep_shift")  # fmt: skip


def distribution_option_problems(o: TrainOptions) -> list[str]:
    """Bad ``--timestep-distribution`` settings (OneTrainer's), one line each."""
    if o.timestep_distribution is None:
        return []
    from .timestep_distributions import distribution_problems

    shift = 1.0 if o.timestep_shift is None else o.timestep_shift
    problems = distribution_problems(
        o.timestep_distribution, o.noising_weight, o.noising_bias, o.min_noising_strength, o.max_noising_strength, shift
    )
    if o.min_timestep is not None or o.max_timestep is not None:
        problems.append(
            "--min-timestep/--max-timestep with --timestep-distribution: give the range as "
            "--min-noising-strength/--max-noising-strength (OneTrainer's, narrowed before the shift)"
        )
    return problems


def _distribution_notes(options: TrainOptions) -> list[str]:
    """The options --timestep-distribution replaces or needs, where they have no effect."""
    from dataclasses import fields

    names = _DISTRIBUTION_OPTIONS if options.timestep_distribution is None else _FLOW_SAMPLING_OPTIONS
    defaults = {f.name: f.default for f in fields(type(options)) if f.name in names}
    changed = ["--" + n.replace("_", "-") for n in names if getattr(options, n) != defaults[n]]
    if not changed:
        return []
    if options.timestep_distribution is None:
        return [f"{', '.join(changed)}: without effect without --timestep-distribution"]
    return [f"{', '.join(changed)}: without effect with --timestep-distribution (it draws the timesteps)"]


#: the noise options kohya's SD3/Flux scripts do not apply (their noise is plain N(0, 1))
_DDPM_ONLY_NOISE = {
    "noise_offset_random_strength": "--noise-offset-random-strength",
    "adaptive_noise_scale": "--adaptive-noise-scale",
    "multires_noise_iterations": "--multires-noise-iterations",
    "zero_terminal_snr": "--zero-terminal-snr",
}


def _flow_noise_problems(options: TrainOptions, family: str) -> list[str]:
    """The noise/timestep options a flow-matching family refuses, as kohya's scripts treat them."""
    problems = []
    for name, flag in _DDPM_ONLY_NOISE.items():
        if getattr(options, name) not in (None, False, 0):
            problems.append(
                f"{flag} is a DDPM option; {family} trains with flow matching and kohya's SD3/Flux "
                "scripts do not apply it"
            )
    low = 0 if options.min_timestep is None else options.min_timestep
    high = 1000 if options.max_timestep is None else options.max_timestep
    if (low, high) != (0, 1000) and family != "sd3":  # kohya's SD3 script maps its sigmas into the range
        problems.append(
            f"--min-timestep/--max-timestep: kohya's scripts for {family} (a flow-matching family) ignore them; "
            "only its SD3 script bounds the noise levels with them (choose them with --timestep-sampling instead)"
        )
    from .objectives import TABLE_SAMPLINGS

    if (low, high) != (0, 1000) and family == "sd3" and options.timestep_sampling in TABLE_SAMPLINGS:
        problems.append(
            f"--min-timestep/--max-timestep with --timestep-sampling {options.timestep_sampling}: ai-toolkit's tables "
            "are narrowed by --min-table-index/--max-table-index (ai-toolkit's min/max_denoising_steps), not by kohya's "
            "SD3 range"
        )
    if family == "sd3" and options.ip_noise_gamma:
        problems.append("--ip-noise-gamma: kohya's SD3 scripts do not apply input perturbation (its Flux script does)")
    return problems


# ----------------------------------------------------------------------------------------------------------
# folders and disk


#: the flow-matching options and their defaults (a DDPM family ignores them; we say so)
_FLOW_OPTIONS = ("timestep_sampling", "discrete_flow_shift", "logit_mean", "logit_std", "mode_scale", "sigmoid_scale",
                 "weighting_scheme", "min_table_index", "max_table_index")  # fmt: skip
#: the flow-matching draw's own options (--timestep-distribution replaces them; the shift stays)
_FLOW_SAMPLING_OPTIONS = ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "sigmoid_scale")


def objective_option_checks(options: TrainOptions, family_name: str) -> tuple[list[str], list[str]]:
    """Problems and notes about loss options that do not fit the family's training objective."""
    from dataclasses import fields

    from ..models.family import get_family

    try:
        family = get_family(family_name)
    except SdcoreError as exc:
        return [str(exc)], []
    problems: list[str] = []
    notes: list[str] = []
    if family.objective == "flow-matching" and options.min_snr_gamma:
        problems.append(
            f"--min-snr-gamma weighs a DDPM schedule's timesteps; {family.name} trains with flow matching "
            "(choose the noise levels with --timestep-sampling instead)"
        )
    if family.objective == "flow-matching":
        problems.extend(_flow_noise_problems(options, family.name))
        notes.extend(_flow_reading_notes(options))
        notes.extend(_flow_shift_notes(options))
    if family.objective == "ddpm" and options.dynamic_timestep_shift:
        problems.append(
            f"--dynamic-timestep-shift: a flow-matching shift by resolution (Flux's); {family.name} trains with DDPM "
            "(shift its --timestep-distribution with --timestep-shift)"
        )
    if family.objective == "flow-matching" or options.timestep_distribution is None:
        notes.extend(_distribution_notes(options))
    if family.objective == "ddpm" and options.model_prediction_type != "raw":
        problems.append(
            f"--model-prediction-type {options.model_prediction_type}: how a flow-matching denoiser's output is read "
            f"(kohya's Flux option); {family.name} trains with DDPM (epsilon or v: --prediction-type)"
        )
    if family.objective == "ddpm":
        defaults = {f.name: f.default for f in fields(type(options)) if f.name in _FLOW_OPTIONS}
        # a shift of 1 is none (and the default configs saved before it became None still carry it)
        unchanged = {**{name: (default,) for name, default in defaults.items()}, "discrete_flow_shift": (None, 1.0)}
        changed = [name for name in _FLOW_OPTIONS if getattr(options, name) not in unchanged[name]]
        if changed:
            flags = ", ".join("--" + name.replace("_", "-") for name in changed)
            notes.append(f"{flags}: flow-matching options, without effect on {family.name} (a DDPM family)")
    return problems, notes


def prediction_type_checks(options: TrainOptions, layout: ModelLayout) -> tuple[list[str], list[str]]:
    """``--prediction-type`` against the model: a problem on a flow-matching family (no epsilon or v there), a
    note where it overrides what the model itself declares (the run follows the option, as kohya follows its
    ``--v_parameterization``: the note is there because one of the two is likely a mistake)."""
    from ..models.family import get_family

    chosen = options.prediction_type
    if chosen == "auto":
        return [], []
    try:
        family = get_family(layout.family)
    except SdcoreError as exc:
        return [str(exc)], []
    if family.objective != "ddpm":
        return [
            f"--prediction-type {chosen}: {family.name} trains with flow matching, not epsilon or v-prediction "
            "(leave it at auto; kohya's --v_parameterization and diffusers' --prediction_type are SD1/SD2/SDXL "
            "options)"
        ], []
    if chosen != layout.prediction_type and layout.prediction_source != "default":
        return [], [
            f"--prediction-type {chosen}: the model declares {layout.prediction_type} ({layout.prediction_source}); "
            f"training follows --prediction-type (as kohya follows --v_parameterization) and the trained files say "
            f"{chosen}"
        ]
    return [], []


def guidance_bypass_problems(options: TrainOptions, layout: ModelLayout) -> list[str]:
    """``--bypass-guidance-embedding`` needs a denoiser with a guidance embedding (FLUX.1 dev, Flex.1): on
    any other model there is nothing to bypass, and a silent no-op would hide a wrong model or option."""
    if not options.bypass_guidance_embedding:
        return []
    config = layout.configs.get("transformer") or {}
    if layout.family == "flux" and config.get("guidance_embeds", True):
        return []
    what = "this FLUX.1 (schnell)" if layout.family == "flux" else layout.family
    return [
        f"--bypass-guidance-embedding: {what} has no guidance embedding to bypass (the option is for FLUX.1 dev "
        "and Flex.1)"
    ]


def text_cache_notes(options: TrainOptions, method: TrainingMethod[Any], family: str) -> list[str]:
    """A note when the user asked for ``--cache-text-encoder-outputs`` (on by default: only when given, in
    sdcore's spelling; kohya's gets :func:`sdcore.train.kohya.kohya_text_cache_notes` when the config loads) while
    the method trains the text encoder, so nothing is cached: without it the option looks taken and the run is
    slower and larger than planned. None where SD3/FLUX.1 cache T5's outputs while CLIP trains."""
    from ..options import given, option_label
    from .cache import partial_text_encoders

    caps = method.capabilities()
    name = "cache_text_encoder_outputs"
    if not (options.cache_text_encoder_outputs and given(options, name) and caps.trains_text_encoder):
        return []
    if not caps.cacheable_text or partial_text_encoders(options, caps, family, method):
        return []  # its own encoding (said elsewhere), or T5's outputs cached while CLIP trains
    flags = [f for f, on in (("--te-only", "te_only"), ("--train-text-encoder", "train_text_encoder"))
             if getattr(method.options, on, False) is True]  # fmt: skip
    why = f"the text encoder trains ({flags[0]})" if flags else "the method trains the text encoder"
    return [
        f"{option_label(options, name)}: {why}, so sdcore encodes the captions at every step and caches nothing"
        + (f"; drop {flags[0]} to cache them" if flags == ["--train-text-encoder"] else "")
    ]


def sidecar_vae_notes(options: TrainOptions, layout: Any) -> list[str]:
    """A VAE that A1111 would load with this SD1/SD2/SDXL file (``<name>.vae.safetensors`` beside it) where
    no ``--vae`` is given: sdcore trains with the file's own VAE, as kohya does, and says how to match A1111."""
    from ..models.detect import unused_a1111_vae

    found = unused_a1111_vae(layout.source, layout.source_format, layout.family, bool(options.vae))
    if found is None:
        return []
    from ..models.safe_pickle import not_torch_file
    from ..models.source import PICKLE_SUFFIXES

    broken = None
    if found.suffix.lower() in PICKLE_SUFFIXES:
        with contextlib.suppress(OSError):
            broken = not_torch_file(found)
    if broken is not None:  # A1111 would fail on it too: no advice to pass it
        return [
            f"{found.name} is beside the model, where A1111 looks for a VAE, but it is not a torch file ({broken}); "
            "sdcore trains with the model's own VAE"
        ]
    return [
        f"{found.name} is beside the model: A1111 (its Automatic VAE) encodes with it; sdcore, like kohya, trains with "
        f"the model's own VAE: give --vae {found} to train on A1111's latents"
    ]


def guidance_scale_notes(options: TrainOptions, family_name: str) -> list[str]:
    """``--guidance-scale`` given on a family whose adapter says its denoiser has no guidance input
    (``guidance_input = False``, the default of a plugin's adapter): one note, since the run would take the
    value and drop it in silence. FLUX.1 says True (dev embeds it; a schnell file has no embedding and keeps
    its silence, as before); SD3, Chroma and the SD UNet families say None (no note: kohya's configs carry
    the value there, Chroma's docs even ask for 0.0). The adapter is resolved only when the value is given."""
    if options.guidance_scale is None:  # not given
        return []
    from ..models.family import family_adapter, get_family, guidance_input

    try:
        if guidance_input(family_adapter(family_name)) is not False:
            return []
        label = get_family(family_name).label
    except SdcoreError:
        return []  # an adapter that does not load is reported where the model loads
    return [
        f"--guidance-scale {options.guidance_scale:g}: {label} models have no guidance input (the family's adapter "
        "says guidance_input = False); without effect"
    ]


def _flow_shift_notes(options: TrainOptions) -> list[str]:
    """The shift options that a flow-matching draw does not read (it says which one it reads)."""
    from .objectives import DEFAULT_TABLE_RANGE, TABLE_SAMPLINGS

    sampling, notes = options.timestep_sampling, []
    table = options.timestep_distribution is None and sampling in TABLE_SAMPLINGS
    if options.dynamic_timestep_shift:
        if options.timestep_distribution is None and sampling != "shift_table":
            notes.append(
                "--dynamic-timestep-shift: shifts --timestep-distribution and --timestep-sampling shift_table only; "
                f"without effect with --timestep-sampling {sampling}"
            )
        elif options.timestep_shift is not None or options.discrete_flow_shift not in (None, 1.0):
            flag = "--timestep-shift" if options.timestep_shift is not None else "--discrete-flow-shift"
            notes.append(f"{flag}: without effect with --dynamic-timestep-shift (the resolution decides the shift)")
    if not table and (options.min_table_index, options.max_table_index) != DEFAULT_TABLE_RANGE:
        why = f"--timestep-sampling {sampling}" if options.timestep_distribution is None else "--timestep-distribution"
        notes.append(
            f"--min-table-index/--max-table-index: the index range of ai-toolkit's tables (--timestep-sampling "
            f"{', '.join(TABLE_SAMPLINGS)}); without effect with {why}"
        )
    if table and sampling != "shift_table" and options.discrete_flow_shift not in (None, 1.0):
        notes.append(
            f"--discrete-flow-shift: without effect with --timestep-sampling {sampling} (ai-toolkit does not shift "
            "this table; shift_table is shifted)"
        )
    return notes


def _flow_reading_notes(options: TrainOptions) -> list[str]:
    """Where ``--weighting-scheme`` has no effect with the other flow options (kohya accepts it silently)."""
    scheme, reading = options.weighting_scheme, options.model_prediction_type
    if scheme in ("sigma_sqrt", "cosmap") and reading not in ("sigma_scaled", "x0"):
        return [
            f"--weighting-scheme {scheme}: a loss weight only with --model-prediction-type sigma_scaled or x0 "
            f"(as kohya's Flux script); without effect with {reading}"
        ]
    if scheme in ("logit_normal", "mode") and options.timestep_sampling not in ("sigma", scheme):
        return [
            f"--weighting-scheme {scheme}: the density of --timestep-sampling sigma only; without effect with "
            f"--timestep-sampling {options.timestep_sampling}"
        ]
    return []


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    current = path.absolute()
    while not current.exists() and current.parent != current:
        current = current.parent
    return current


def write_probe(path: Path) -> None:
    """Create ``path`` with one byte (the caller removes it): raises OSError where files cannot be made."""
    with open(path, "wb") as handle:
        handle.write(b"x")


def folder_problem(folder: Path, what: str, flag: str) -> str | None:
    """None when files can be created in ``folder`` (or, if it does not exist yet, in its nearest
    existing parent); else one line saying why not. A probe file is created and removed."""
    target = nearest_existing(folder)
    where = str(folder) if target == folder.absolute() else f"{folder} (checked at {target}, which exists)"
    if not target.is_dir():
        return f"{what} {where}: {target} is a file, not a folder; choose another {flag}"
    probe = target / f".sdcore-write-probe-{os.getpid()}"
    try:
        write_probe(probe)
    except OSError as exc:
        return f"{what} {where} is not writable ({exc.strerror or exc}); choose another {flag} or fix its permissions"
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def _size(n: int) -> str:
    if n < 1024:  # a small embedding's state: not "0 KiB"
        return f"{n} bytes"
    return f"{n / MIB:,.0f} MiB" if n >= MIB else f"{n / 1024:,.0f} KiB"


@dataclass(frozen=True)
class DiskPlan:
    """What the run's saves will keep on disk at most, and the free space where they go. ``written_results``: the
    intermediate results among them a resumed run's state recorded that are on disk already (their bytes are not
    free now, so only :attr:`needed` must be)."""

    result_bytes: int
    intermediate_results: int
    state_bytes: int
    states: int
    free_bytes: int | None
    folder: Path
    written_results: int = 0

    @property
    def total(self) -> int:
        return self.result_bytes * (1 + self.intermediate_results) + self.state_bytes * self.states

    @property
    def needed(self) -> int:
        """What the saves still have to write: :attr:`total` less the results already on disk."""
        return self.total - self.result_bytes * self.written_results

    def line(self) -> str:
        mib = _size
        parts = [f"result {mib(self.result_bytes)}"]
        if self.intermediate_results:
            written = f" ({self.written_results} already written)" if self.written_results else ""
            parts.append(f"{self.intermediate_results} intermediate results x {mib(self.result_bytes)}{written}")
        parts.append(f"{self.states} states x {mib(self.state_bytes)}")
        return f"saves will use about {mib(self.total)} ({', '.join(parts)})"


def planned_saves(
    options: TrainOptions, total_steps: int, steps_per_epoch: int, *, start_step: int = 0, kept: int = 0
) -> tuple[int, int]:
    """(intermediate results kept, states kept) at the end of the run, following the runtime's
    save points (every ``save_every`` steps and ``save_every_epochs`` epochs, not at the last one)
    and retention (the newest ``save_limit`` results and ``keep_states`` states; a state with each save
    and at the end). Epoch saves follow ``save_n_epoch_ratio`` when given (:func:`.checkpoints.epoch_save_interval`).

    A ``--resume`` from step ``start_step`` adds the results still to come to the ``kept`` ones its state recorded
    (:func:`.checkpoints.recorded_saves`: every earlier save still on disk as the run wrote it, and the weights a
    Ctrl-C/SIGTERM/stop or a process failing alone wrote after the state): with ``--save-limit N`` the newest N of
    them, without a limit all of them, so each earlier stop's weights file counts as the one more result it is.

    A run not resumed plans no stop's weights file: a stopped run has not written its final result, and that file
    (the same weights, the same size) stands in for it, so a run stopped and never resumed holds no more than
    planned (N results and that file, no final result; without a state nothing is recorded and nothing pruned,
    the file is the user's). The saves' transient one more result (each writes its file before the oldest goes)
    is the final result's place too."""
    from .checkpoints import epoch_save_interval

    o = options
    saves = later = 0
    if o.save_every:
        saves += max(0, (total_steps - 1) // o.save_every)
        later += max(0, (total_steps - 1) // o.save_every - start_step // o.save_every)
    every_epochs = epoch_save_interval(o, total_steps, steps_per_epoch)
    if every_epochs and steps_per_epoch > 0:
        epochs = math.ceil(total_steps / steps_per_epoch)
        saves += max(0, (epochs - 1) // every_epochs)
        later += max(0, (epochs - 1) // every_epochs - (start_step // steps_per_epoch) // every_epochs)
    if start_step or kept:
        saves_kept = kept + later
    else:
        saves_kept = saves
    results = min(saves_kept, o.save_limit) if o.save_limit else saves_kept
    states = 0
    if o.save_state:
        states = saves + 1
        if o.keep_states:
            states = min(states, o.keep_states)
    return results, states


def resumed_saves(method: TrainingMethod[Any], options: TrainOptions, state_root: Path) -> tuple[int, int]:
    """(step, recorded results) of the state ``--resume`` names, for the disk estimate: the step it continues
    from and how many results its run recorded that are still the run's own
    (:func:`.checkpoints.recorded_saves`, what the resumed run adopts). (0, 0) without ``--resume`` or with a
    state that cannot be read (:func:`resume_problems` says why)."""
    from .checkpoints import recorded_saves
    from .state import read_position, resolve_resume

    if not options.resume:
        return 0, 0
    try:
        folder = resolve_resume(options.resume, state_root)
        position, record = read_position(folder)
    except SdcoreError:
        return 0, 0
    return position.step, len(recorded_saves(method, options, folder, record))


def disk_plan(
    options: TrainOptions,
    params: ParameterPlan,
    *,
    total_steps: int,
    steps_per_epoch: int,
    folder: Path,
    start_step: int = 0,
    kept: int = 0,
) -> DiskPlan:
    """Sizes from the parameter plan: a result is what the method says it writes
    (:meth:`~sdcore.train.method.TrainingMethod.result_bytes`), else its parameters at ``--save-dtype``; a
    state holds the trainable tensors in fp32 (twice with ``--ema``: the average too) and the optimizer's
    moments (:data:`.memory.OPTIMIZER_STATE_BYTES`). ``start_step``/``kept``: a ``--resume``'s step and the results
    its state recorded (:func:`resumed_saves`), counted as :func:`planned_saves` says; those still kept at the end
    are on disk already (:attr:`DiskPlan.written_results`)."""
    from .memory import OPTIMIZER_STATE_BYTES

    result = params.result_bytes
    if result is None:
        result = params.result * (element_bytes(options.save_dtype) if options.save_dtype in SAVE_DTYPES else 2)
    tensors = 8 if getattr(options, "ema", False) else 4
    state = int(params.trainable * (tensors + OPTIMIZER_STATE_BYTES.get(options.optimizer.lower(), 8.0)))
    results, states = planned_saves(options, total_steps, steps_per_epoch, start_step=start_step, kept=kept)
    new_only, _ = planned_saves(options, total_steps, steps_per_epoch, start_step=start_step)
    try:
        free: int | None = shutil.disk_usage(nearest_existing(folder)).free
    except OSError:
        free = None
    return DiskPlan(result, results, state, states, free, folder, written_results=max(0, results - new_only))


# ----------------------------------------------------------------------------------------------------------
# resume


def earlier_state_notes(options: TrainOptions, state_root: Path) -> list[str]:
    """A run without ``--resume`` into an ``--output`` whose state folder holds an earlier run's states starts
    afresh, and its own states then take their place (``--keep-states``): said before anything is written, with the
    way to continue that run instead: ai-toolkit continues a job from its folder's newest save when the job is run
    again, here that takes ``--resume latest``."""
    from .state import list_states, read_position

    if options.resume:
        return []
    states = list_states(state_root)
    if not states:
        return []
    try:
        step = f" (step {read_position(states[-1])[0].step})"
    except SdcoreError:  # another tool's or an unreadable record: still an earlier run's folder
        step = ""
    if not options.save_state:
        fate = "writes no state of its own (--no-save-state)"
    elif options.keep_states > 0:
        fate = f"its own states replace it as they are saved (--keep-states {options.keep_states})"
    else:
        fate = "its own states are kept beside it (--keep-states 0)"
    return [
        f"{state_root} holds the resumable state of an earlier run{step}: this run starts afresh without --resume "
        f"and {fate}; to continue the earlier run instead, add --resume latest"
    ]


def resume_problems(method: TrainingMethod[Any], options: TrainOptions, state_root: Path) -> list[str]:
    """A ``--resume`` state that cannot continue this run: wrong method, other shape options."""
    from .state import read_position, resolve_resume

    if not options.resume:
        return []
    try:
        folder = resolve_resume(options.resume, state_root)
        _position, record = read_position(folder)
    except SdcoreError as exc:
        return [str(exc)]
    problems = []
    if record.get("method") not in (None, method.name):
        problems.append(f"--resume {folder}: the state is from method {record.get('method')!r}, not {method.name!r}")
        return problems
    saved = record.get("options") or {}
    for name in method.resume_shape_options:
        current = getattr(options, name, None)
        if isinstance(current, tuple):  # a repeatable option is a JSON list in the state's record
            current = list(current)
        if name in saved and saved[name] != current:
            flag = "--" + name.replace("_", "-")
            problems.append(
                f"--resume {folder}: the state was trained with {flag} {saved[name]!r}, this run has "
                f"{flag} {getattr(options, name, None)!r} (the trained tensors would not fit; use the same value "
                "or start without --resume)"
            )
    from .ema import ema_resume_problems

    problems.extend(ema_resume_problems(saved, options, folder))
    return problems


# ----------------------------------------------------------------------------------------------------------
# the memory plan


@dataclass
class MemoryPlan:
    estimate: MemoryEstimate
    params: ParameterPlan
    free: int | None
    budget: int | None
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.estimate.total <= self.budget

    def lines(self) -> list[str]:
        out = [self.estimate.line()]
        if not self.fits and self.free is not None:
            out.append(
                warning_line(
                    f"that is more than the {self.free / MIB:,.0f} MiB free on {self.estimate.device} "
                    "(with the libraries' share)"
                )
            )
            fitting = [s for s in self.suggestions if s.fits]
            if fitting:
                out.append(
                    "options that would fit: "
                    + "; ".join(
                        f"{s.flags} ({s.estimate.total / MIB:,.0f} MiB{_host_part(s.estimate)})" for s in fitting
                    )
                )
            elif self.suggestions:
                best = min(self.suggestions, key=lambda s: s.estimate.total)
                out.append(
                    f"even {best.flags} needs about {best.estimate.total / MIB:,.0f} MiB{_host_part(best.estimate)}"
                )
        return out


def _host_part(estimate: MemoryEstimate) -> str:
    """What a suggestion moves to host memory (``--cpu-offload-checkpointing``'s block inputs), said beside the
    device's total it leaves."""
    return f", {estimate.host / MIB:,.0f} MiB in host memory" if estimate.host else ""


def parameter_plan(
    method: TrainingMethod[Any], options: TrainOptions, layout: ModelLayout, tokenizers: list[Any] | None = None
) -> ParameterPlan:
    """Parameter counts of the model and of what ``method`` trains, on a meta-device copy of
    ``layout`` (the method's :meth:`~TrainingMethod.plan_groups` runs on a throwaway instance).

    ``tokenizers`` (a loaded bundle's) are copied for a method that trains text (``trains_text_encoder``): its
    ``prepare`` may add tokens to them (a new-token method), which must not reach the run's own tokenizers before
    its real ``prepare``."""
    import torch

    from ..models.layout import meta_bundle
    from .memory import count_parameters
    from .memory_options import exclude_patterns
    from .method import ProcessInfo

    # only a method that trains text can add tokens (a new token's row is a text-encoder weight); copying CLIP's
    # tokenizers costs ~33 MB of peak memory, which a UNet-only run should not pay
    if tokenizers is not None and method.capabilities().trains_text_encoder:
        tokenizers = copy.deepcopy(tokenizers)
    bundle = meta_bundle(layout, tokenizers)
    from ..options import keep_records

    fresh = type(method)(keep_records(options, copy.deepcopy(options)))  # its problems name what the user wrote
    fresh.processes = ProcessInfo.from_environment()  # no accelerator yet: the launcher's numbers
    rng = torch.random.get_rng_state()
    try:
        groups = fresh.plan_groups(bundle)
    finally:
        torch.random.set_rng_state(rng)
    whole = method.capabilities().saves_whole_model
    counts = count_parameters(bundle, groups, whole_model_result=whole, exclude=exclude_patterns(options))
    return replace(counts, result_bytes=fresh.result_bytes(bundle), notes=tuple(fresh.plan_notes()))


def memory_plan(
    method: TrainingMethod[Any],
    options: TrainOptions,
    *,
    layout: ModelLayout | None = None,
    bundle: ModelBundle | None = None,
    params: ParameterPlan | None = None,
    device: str | None = None,
    reference_images: int = 0,
    batch_from_data: bool = False,
) -> MemoryPlan:
    """The memory estimate (and, when over the device's free memory, the options that would fit);
    ``reference_images``: FLUX.1 Kontext reference images per sample (their tokens join the latents');
    ``batch_from_data``: the dataset config sets the batch sizes (no ``--batch-size`` suggestion)."""
    from ..models.layout import layout_of_bundle
    from .memory import RUNTIME_OVERHEAD, device_free_memory, estimate_memory, suggestions, training_device

    if layout is None:
        if bundle is None:
            raise ValueError("memory_plan needs a layout or a bundle")
        layout = layout_of_bundle(bundle)
    if params is None:
        params = parameter_plan(method, options, layout, bundle.tokenizers if bundle is not None else None)
    device = device or training_device()
    caps = method.capabilities()
    options, kwargs = _estimate_settings(method, options, device, layout.family)
    if reference_images:
        kwargs["reference_images"] = reference_images
    estimate = estimate_memory(layout, params, options, **kwargs)
    free = device_free_memory(device)
    budget = None if free is None else free - RUNTIME_OVERHEAD.get(device, 0)
    plan = MemoryPlan(estimate, params, free, budget)
    if budget is not None and estimate.total > budget:
        import importlib.util

        plan.suggestions = suggestions(
            layout,
            params,
            options,
            budget,
            optimizer_8bit_available=importlib.util.find_spec("bitsandbytes") is not None,
            steps_in_backward=caps.steps_in_backward,
            batch_from_data=batch_from_data,
            **kwargs,
        )
    return plan


def _estimate_settings(
    method: TrainingMethod[Any], options: TrainOptions, device: str, family: str | None = None
) -> tuple[TrainOptions, dict[str, Any]]:
    """The options and keyword arguments :func:`~sdcore.train.memory.estimate_memory` needs for
    ``method`` on ``device`` with a ``family`` model (what the method trains and caches decides parts of the
    estimate: SD3/FLUX.1's T5 cached while CLIP trains leaves the device, :func:`.cache.partial_text_encoders`)."""
    import dataclasses

    from .cache import partial_text_encoders

    caps = method.capabilities()
    # asked as if the option were on, so the suggestions can offer it; the estimate reads the option itself
    partial = partial_text_encoders(dataclasses.replace(options, cache_text_encoder_outputs=True), caps, family, method)
    if not caps.cacheable_text and options.cache_text_encoder_outputs:  # the text encoders run every step
        options = dataclasses.replace(options, cache_text_encoder_outputs=False)
    kwargs: dict[str, Any] = dict(
        device=device,
        text_encoder_frozen=not caps.trains_text_encoder,
        needs_pixels=caps.needs_pixels,
        cast_frozen_weights=caps.cast_frozen_weights,
    )
    if partial:
        kwargs["partial_text_cache"] = partial
    return options, kwargs


def memory_relief(
    method: TrainingMethod[Any],
    options: TrainOptions,
    layout: ModelLayout,
    params: ParameterPlan,
    *,
    device: str,
    limit: int = 4,
) -> list[str]:
    """The option changes that lower the memory estimate of a running ``method`` most, largest saving
    first, each as ``"--flag (-N MiB)"``: the advice of a run that nearly fills or overflows its device
    (:mod:`sdcore.train.memory_watch`). Savings are differences of two estimates of the same run, so they
    hold where the estimate's absolute level is off."""
    import importlib.util

    from .memory import estimate_memory, suggestions

    options, kwargs = _estimate_settings(method, options, device, layout.family)
    now = estimate_memory(layout, params, options, **kwargs).total
    changes = suggestions(
        layout,
        params,
        options,
        budget=now // 2,
        optimizer_8bit_available=importlib.util.find_spec("bitsandbytes") is not None,
        steps_in_backward=method.capabilities().steps_in_backward,
        **kwargs,
    )
    names = [s.flags for s in changes]  # the last is all of them together: left to the user
    single = [s for s in changes if sum(other in s.flags for other in names if other != s.flags) < 2]
    saving = sorted(((now - s.estimate.total, s.flags) for s in single), key=lambda pair: -pair[0])
    return [f"{flags} (-{gain / MIB:,.0f} MiB)" for gain, flags in saving if gain >= MIB][:limit]


# ----------------------------------------------------------------------------------------------------------
# the whole pre-flight


@dataclass
class PreflightReport:
    problems: list[str] = field(default_factory=list)
    layout: ModelLayout | None = None
    data: TrainData | None = None
    total_steps: int = 0
    epochs: int | None = None
    output: Path | None = None
    state_root: Path | None = None
    disk: DiskPlan | None = None
    memory: MemoryPlan | None = None
    notes: list[str] = field(default_factory=list)
    #: the method joins the control images on the channels (a FLUX.1 control LoRA), not as Kontext references
    control_channels: bool = False

    def raise_problems(self) -> None:
        if self.problems:
            raise PreflightError(self.problems)

    def plan_lines(self) -> list[str]:
        """What the run will do: model, data, steps, buckets, caches, saves, memory."""
        lines = []
        if self.layout is not None:
            lines.append(f"model: {self.layout.source} ({self.layout.family}, {self.layout.source_format})")
        if self.data is not None:
            lines.append(self.data.index.summary())
            from .kontext_data import control_summary

            lines.extend(control_summary(self.data.index, channels=self.control_channels))
            if self.data.held_out:
                held = [self.data.entries[i] for i in sorted(self.data.held_out)]
                lines.append(
                    f"validation: {len(held)} images ({sum(e.repeats for e in held)} with repeats) held out, never trained"
                )
            buckets: dict[tuple[int, int], int] = {}
            for assignment in self.data.assignments:
                buckets[assignment.bucket] = buckets.get(assignment.bucket, 0) + 1
            shown = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(buckets.items(), key=lambda kv: -kv[1])[:8])
            more = f" (+{len(buckets) - 8} more)" if len(buckets) > 8 else ""
            lines.append(f"buckets: {len(buckets)} ({shown}{more})")
        lines.extend(self.notes)
        if self.disk is not None:
            lines.append(self.disk.line())
        if self.memory is not None:
            lines.extend(self.memory.lines())
        return lines


def _is_main_process() -> bool:
    from ..console import launcher_rank

    return launcher_rank() == 0


def run_preflight(
    method: TrainingMethod[Any],
    options: TrainOptions,
    *,
    bundle: ModelBundle | None = None,
    plugin_manager: Any = None,
    verify_images: bool = True,
    plan: bool = True,
) -> PreflightReport:
    """Run every check and collect the problems (the caller decides to raise or print them).

    ``bundle`` (an already loaded model) skips the model check and sizes the plan from it;
    ``plan`` False skips the memory and disk estimates (they need the model's configs).
    """
    from ..data.dataset import DatasetProblems
    from .data import build_train_data, image_option_problems, strength_problems
    from .initial import initial_option_problems
    from .loop import output_paths, total_steps_for

    o = options
    report = PreflightReport()
    claimed: str | None = None
    tokenizers = bundle.tokenizers if bundle is not None else None
    report.problems.extend(option_problems(o, method))
    from .optim import optimizer_notes

    report.notes.extend(optimizer_notes(o))
    from .initial import initial_notes

    report.notes.extend(initial_notes(o))  # where kohya's --initial_step/--initial_epoch surprise
    from .fused import fused_notes

    report.notes.extend(fused_notes(o))
    from .offload_checkpointing import offload_notes

    report.notes.extend(offload_notes(o))  # --cpu-offload-checkpointing turns checkpointing on

    # the model: header only
    if bundle is not None:
        from ..models.layout import layout_of_bundle

        report.layout = layout_of_bundle(bundle)
    elif o.model:
        claimed = _plugin_format(plugin_manager, o.model)
        if claimed:
            report.notes.append(f"model: read by the {claimed!r} format plugin (header not checked)")
        else:
            from ..models.layout import LayoutUnavailableError, read_layout
            from ..models.parts import given_parts

            try:
                try:
                    report.layout = read_layout(o.model, given_parts(o))
                except ModelFormatError:
                    if o.prediction_type == "auto":
                        raise
                    # what the file declares cannot be used (an EDM model.yaml beside it), but the loader takes
                    # --prediction-type instead: the layout is read as it will load
                    report.layout = read_layout(o.model, given_parts(o), prediction_type=o.prediction_type)
            except LayoutUnavailableError as exc:
                report.notes.append(f"memory plan unavailable: {exc}")
            except SdcoreError as exc:
                report.problems.append(str(exc))  # the message load_model gives, in every command

    if o.model and bundle is None and not claimed:
        # the parts given separately (--clip-l, --t5xxl, --vae...): there, readable, the right kind, and with
        # the model file a complete model (Flux transformer-only without --t5xxl: one line naming it)
        from ..models.parts import given_parts, part_problems

        family = report.layout.family if report.layout is not None else None
        report.problems.extend(part_problems(o.model, given_parts(o), family=family))

    from .control_lora import control_sample_checks  # kohya's --cn: a control LoRA's samples need it

    problems, notes = control_sample_checks(o, control=method.capabilities().control_channels,
                                            family=report.layout.family if report.layout is not None else None)  # fmt: skip
    report.problems.extend(problems)
    report.notes.extend(notes)

    if report.layout is not None:
        problems, notes = prediction_type_checks(o, report.layout)
        report.problems.extend(problems)
        report.notes.extend(notes)
        if not problems and o.prediction_type != "auto":  # the checks below and the plans see what will train
            report.layout = replace(report.layout, prediction_type=o.prediction_type, prediction_source="user")
        from ..models.family import family_adapter, get_family
        from ..models.text import clip_skip_problem

        try:  # Flux and Chroma read no CLIP hidden states: clip skip changes nothing there (generate warns)
            ignored = getattr(family_adapter(get_family(report.layout.family)), "clip_skip_ignored", False)
        except SdcoreError:
            ignored = True
        if not ignored:
            encoders = report.layout.configs.get("text_encoders") or []
            skip = clip_skip_problem(o.clip_skip, report.layout.family, encoders)
            if skip is not None:
                report.problems.append(skip)
        problems, notes = objective_option_checks(o, report.layout.family)
        report.problems.extend(problems)
        report.notes.extend(notes)
        from .loss import loss_family_checks

        problems, notes = loss_family_checks(o, report.layout.family, report.layout.prediction_type, method)
        report.problems.extend(problems)
        report.notes.extend(notes)
        report.problems.extend(method.family_problems(report.layout.family))
        from .caption_checks import caption_family_problems

        report.problems.extend(caption_family_problems(o, report.layout.family))
        from .sd3_options import family_problems as sd3_conditioning_problems

        report.problems.extend(sd3_conditioning_problems(o, report.layout.family))
        from .fused import fused_family_problems

        report.problems.extend(fused_family_problems(o, report.layout.family))
        from .offload_checkpointing import offload_family_problems

        report.problems.extend(offload_family_problems(o, report.layout.family))  # a UNet has no blocks to offload
        report.problems.extend(guidance_bypass_problems(o, report.layout))
        if method.capabilities().control_channels:
            from .control_lora import control_lora_family_problems, control_lora_notes

            report.problems.extend(control_lora_family_problems(report.layout))
            report.notes.extend(control_lora_notes(o))
        report.notes.extend(guidance_scale_notes(o, report.layout.family))
        report.notes.extend(text_cache_notes(o, method, report.layout.family))
        report.notes.extend(sidecar_vae_notes(o, report.layout))

    # folders
    if o.output:
        try:
            report.output, report.state_root = output_paths(method, o)
        except SdcoreError as exc:
            report.problems.append(str(exc))
    if report.output is not None:
        from ..io import read_only_problem

        guarded = read_only_problem(report.output)  # the run would train, then fail to write its result there
        if guarded:
            report.problems.append(f"--output {guarded}, or choose another --output")
    if report.output is not None and report.state_root is not None:
        checks = [(report.output.parent, "output folder", "--output")]
        if o.save_state or o.resume:
            checks.append((report.state_root, "state folder", "--output"))
        if o.log_dir:
            checks.append((Path(o.log_dir).expanduser(), "log folder", "--log-dir"))
        for on, what in (
            (o.cache_latents_to_disk and o.cache_latents, "latent"),
            (o.cache_text_encoder_outputs_to_disk and o.cache_text_encoder_outputs, "text-encoder output"),
        ):
            if not on:
                continue
            if o.cache_dir:
                checks.append((Path(o.cache_dir).expanduser(), f"{what} cache folder", "--cache-dir"))
            elif o.data and Path(o.data).expanduser().is_dir():  # cache files go beside the images
                checks.append(
                    (Path(o.data).expanduser(), f"dataset folder (for the {what} cache files)", "--cache-dir")
                )
        seen: set[Path] = set()
        for folder, what, flag in checks:
            key = nearest_existing(folder)
            if key in seen:
                continue
            seen.add(key)
            problem = folder_problem(folder, what, flag)
            if problem:
                report.problems.append(problem)
        report.notes.extend(earlier_state_notes(o, report.state_root))

    # a missing --sample-prompts file is reported with the options (read_sample_prompts)

    # the dataset and the step math
    if o.data:
        # a --batch-size below 1 is already an options problem: plan the dataset's batches at 1 so its own
        # problems are still found and the batch planner does not report the same value a second time
        planned = o if o.batch_size >= 1 else replace(o, batch_size=1)
        try:
            if verify_images:
                data = build_train_data(
                    planned, balance_class=method.capabilities().balance_class, auxiliary=method.is_auxiliary_file
                )
            else:
                data = _build_unverified(planned, method)
            report.data = data
            if o.dataset_repeats != 1 and not o.metadata_file and Path(o.data).expanduser().is_dir():
                report.notes.append(
                    f"--dataset-repeats {o.dataset_repeats} is not used: a folder dataset takes its repeats from "
                    "the folder names (as in kohya)"
                )
            report.problems.extend(image_option_problems(o, data.index))
            from .token_routing import dataset_notes as routing_dataset_notes

            family = report.layout.family if report.layout is not None else None
            report.notes.extend(routing_dataset_notes(o, data.index, family))  # --tread-route keeps masked tokens
            report.notes.extend(bucket_side_notes(data.index))
            from ..options import option_label

            # a batch size no bucket fills: the batch used instead, the size named as the user wrote it
            report.notes.extend(data.batch_size_notes(option_label(o, "batch_size")))
            from .caption_checks import caption_twin_notes, filename_caption_notes

            report.notes.extend(filename_caption_notes(data.index))  # an A1111 dataset's file-name captions
            report.notes.extend(caption_twin_notes(data.index))  # .txt captions a kohya run's .caption leaves unread
            from .data import mask_augment_checks
            from .inpainting import layout_kind

            has_mask_input = report.layout is not None and layout_kind(report.layout) is not None
            mask_problems, mask_notes = mask_augment_checks(o, data.index, mask_input=has_mask_input)
            report.problems.extend(mask_problems)
            report.notes.extend(mask_notes)
            from .kontext_data import control_family_problems, control_problems

            report.problems.extend(control_problems(data.index))  # FLUX.1 Kontext's control images
            if method.capabilities().control_channels:  # a control LoRA's control images (:mod:`.control_lora`)
                from .control_lora import control_lora_problems

                report.control_channels = True

                report.problems.extend(control_lora_problems(o, data.index))
            elif report.layout is not None:
                report.problems.extend(control_family_problems(report.layout, data.index))
            from .inpainting import inpainting_problems

            report.problems.extend(inpainting_problems(o, report.layout, data.index))  # SD inpainting, FLUX.1 Fill
            report.problems.extend(strength_problems(method, data.index))
            problems, notes = method_dataset_checks(method, data.index)  # the method's own (a new token's caption)
            report.problems.extend(problems)
            report.notes.extend(notes)
            report.total_steps, report.epochs = total_steps_for(o, data)
            if report.total_steps < 1:
                report.problems.append(
                    "nothing to train: the run has 0 steps (check --max-steps/--epochs and the dataset)"
                )
            elif not initial_option_problems(o):
                from .initial import step_limit_problem

                limit_problem = step_limit_problem(o, data, report.total_steps)  # kohya: max_train_steps > initial_step
                if limit_problem:
                    report.problems.append(limit_problem)
            if report.total_steps >= 1:
                from .optim import schedule_length_problems
                from .te_stop import stop_notes

                report.problems.extend(schedule_length_problems(o, report.total_steps))  # a ratio warmup, --epochs
                report.notes.extend(stop_notes(o, data, report.total_steps, report.epochs))  # where it stops
        except DatasetProblems as exc:  # e.g. every missing image of a metadata file, one line each
            # a problem of an option the subsets inherit (--filename-word-regex) is already among the options'
            report.problems.extend(p for p in exc.problems if p not in report.problems)
        except SdcoreError as exc:
            report.problems.append(str(exc))

    # resume
    if report.state_root is not None:
        report.problems.extend(resume_problems(method, o, report.state_root))

    # disk and memory plans (need the model's layout and the method's parameters)
    params: ParameterPlan | None = None
    if plan and report.layout is not None and report.output is not None:
        try:
            params = parameter_plan(method, o, report.layout, tokenizers)
        except ConfigError as exc:  # the options select nothing of this model (e.g. a LoRA --layer-filter)
            report.problems.append(str(exc))
        except Exception as exc:  # a method that cannot run on a shapes-only model: no plan, no failure
            log.debug("parameter plan failed", exc_info=True)
            report.notes.append(f"memory plan unavailable: {method.name!r} could not be sized without weights ({exc})")
            params = None
        if params is not None:
            report.notes.extend(params.notes)
            per_epoch = 0
            if report.data is not None:
                per_epoch = report.data.steps_in_epoch(0, o.gradient_accumulation)
            start_step, kept = resumed_saves(method, o, report.state_root) if report.state_root else (0, 0)
            report.disk = disk_plan(
                o,
                params,
                total_steps=report.total_steps,
                steps_per_epoch=per_epoch,
                folder=report.output.parent,
                start_step=start_step,
                kept=kept,
            )
            free = report.disk.free_bytes
            if free is not None and report.disk.needed > free:
                disk = report.disk
                written = f", {_size(disk.needed)} of it still to write" if disk.needed != disk.total else ""
                report.problems.append(
                    f"not enough free disk in {nearest_existing(report.output.parent)}: "
                    f"{disk.line().removeprefix('saves will use ')}{written}, but only {_size(free)} free "
                    "(lower --save-limit, save less often, or use --no-save-state)"
                )
            peaks = [o]
            if report.data is not None:  # the largest training resolution sizes the peak (several: --resolutions)
                import dataclasses

                shapes = report.data.batch_shapes
                if len(shapes) > 1:  # kohya [[datasets]] with their own batch sizes: the worst dataset's batch
                    peaks = [
                        dataclasses.replace(o, batch_size=batch, resolution=max(o.resolution, resolution))
                        for batch, resolution in shapes
                    ]
                else:  # at the batch the run makes (--batch-size 1000 on 40 images: 40; one [[datasets]]'s own size)
                    batch = shapes[0][0] if shapes else report.data.effective_batch(o.batch_size)
                    peaks = [
                        dataclasses.replace(
                            o, resolution=max(o.resolution, report.data.largest_resolution), batch_size=batch
                        )
                    ]
            from .kontext_data import reference_count

            # a control LoRA joins its control images on the channels: no extra tokens (:mod:`.control_lora`)
            index = report.data.index if report.data is not None else None
            references = 0 if method.capabilities().control_channels else reference_count(index)
            # a dataset config's own batch_size wins over --batch-size (kohya): suggesting one would change nothing
            own_batch = index is not None and any(e.subset.batch_size is not None for e in index.entries)
            report.memory = max(
                (
                    memory_plan(
                        method,
                        p,
                        layout=report.layout,
                        params=params,
                        reference_images=references,
                        batch_from_data=own_batch,
                    )
                    for p in peaks
                ),
                key=lambda plan: plan.estimate.total,
            )
    if report.layout is not None:  # --fp8-base / --blocks-to-swap on this model and method
        from .memory_options import model_problems

        report.problems.extend(model_problems(o, report.layout, params))
        from .token_routing import model_problems as routing_model_problems

        report.problems.extend(routing_model_problems(o, report.layout))  # --tread-route: family, block count
    return report


def method_dataset_checks(method: TrainingMethod[Any], index: Any) -> tuple[list[str], list[str]]:
    """(problems, notes) of the method's own dataset checks (:meth:`TrainingMethod.dataset_problems`,
    :meth:`~TrainingMethod.dataset_notes`); a check that raises an sdcore error gives that line as a problem, so
    every other check still reports."""
    out: tuple[list[str], list[str]] = ([], [])
    for found, check in zip(out, (method.dataset_problems, method.dataset_notes), strict=True):
        try:
            found.extend(check(index))
        except SdcoreError as exc:
            out[0].append(str(exc))
    return out


def bucket_side_notes(index: Any) -> list[str]:
    """One note per distinct bucket setting whose sides are off the step (kohya's adjustment, applied), and one
    per resolution outside its subset's bucket sides (kohya's assert, :func:`~sdcore.data.buckets.bucket_range_note`;
    each of a subset's ``resolutions`` counts)."""
    from ..data.buckets import bucket_range_note, bucket_sides_note

    kohya = [e.subset for e in index.entries
             if e.subset.buckets and getattr(e.subset, "bucket_rule", "kohya") == "kohya"]  # fmt: skip
    sides = {(s.min_bucket_reso, s.max_bucket_reso, s.bucket_step) for s in kohya}
    notes = [note for note in (bucket_sides_note(*side) for side in sorted(sides)) if note]
    ranges = {(resolution, s.min_bucket_reso, s.max_bucket_reso, s.bucket_step, bool(s.bucket_no_upscale))
              for s in kohya for resolution in (tuple(s.resolutions) or (s.bucket_resolution,))}  # fmt: skip
    found = (bucket_range_note(*each[:4], no_upscale=each[4]) for each in sorted(ranges, key=repr))
    return notes + list(dict.fromkeys(note for note in found if note))


def bucket_rule_problems(o: TrainOptions) -> list[str]:
    """``--bucket-rule onetrainer`` with what OneTrainer's buckets do not have: kohya's no-upscale (OneTrainer
    always scales an image to cover its bucket) or a bucket grid that is not positive."""
    if o.bucket_rule != "onetrainer":
        return []
    problems = []
    if o.bucket_no_upscale:
        problems.append(
            "--bucket-no-upscale is kohya's; OneTrainer's buckets (--bucket-rule onetrainer) always scale an image "
            "to cover its bucket: leave one of them out"
        )
    if o.bucket_step <= 0:
        problems.append(f"--bucket-step (OneTrainer's bucket quantization) must be positive, got {o.bucket_step}")
    return problems


def resolutions_problems(o: TrainOptions) -> list[str]:
    """``--resolutions``: a list of positive numbers whose largest is ``--resolution`` (or that is 0)."""
    from ..data.resolutions import parse_resolutions

    try:
        sizes = parse_resolutions(o.resolutions)
    except ConfigError as exc:
        return [str(exc)]
    if sizes and o.resolution and o.resolution != max(sizes):
        return [
            f"--resolution {o.resolution} with --resolutions {o.resolutions}: --resolution is the largest of the "
            f"list ({max(sizes)}), the size the memory plan assumes; leave it out or set {max(sizes)}"
        ]
    if not sizes and o.resolution_draw != "epoch":
        return ["--resolution-draw only matters with --resolutions (several training resolutions)"]
    return []


def _build_unverified(options: TrainOptions, method: TrainingMethod[Any]) -> TrainData:
    """The data plan without the per-image completeness check (the runtime verifies right after)."""
    from ..data.dataset import build_dataset_index
    from .data import drop_method_files, plan_train_data

    index = build_dataset_index(options, verify=False)
    drop_method_files(index, method.is_auxiliary_file, options.data)
    return plan_train_data(index, options, balance_class=method.capabilities().balance_class)


def resolve_model_names(
    options: TrainOptions, plugin_manager: Any = None, say: Callable[[str], None] | None = None
) -> None:
    """``--model`` and the part options (``--vae``, ``--clip-l``, ``--t5xxl`` ...) given as names in
    ``--models-dir`` (and the folders of ComfyUI's ``extra_model_paths.yaml``) become their files, in place,
    before the pre-flight reads a header and before any model loads: the lookup and the messages of ``sdcore
    generate`` (:func:`sdcore.generate.model_paths.resolve_sources`). Without ``--models-dir`` the options are
    paths, as kohya's (nothing changes). Every name not found (or ambiguous) is one line of a
    :class:`PreflightError`; a note (the root's ``extra_model_paths.yaml`` unreadable) goes to ``say``."""
    o = options
    if not o.models_dir:
        if o.extra_model_paths:
            raise PreflightError(
                ["--extra-model-paths needs --models-dir (names are looked up below it and in the file's folders)"]
            )
        return
    from ..generate.model_paths import resolve_sources
    from ..models.parts import given_parts

    claimed = bool(o.model) and _plugin_format(plugin_manager, o.model) is not None
    found = resolve_sources(o.model, given_parts(o), o.models_dir, o.extra_model_paths, plugin_format=claimed)
    if found.problems:
        raise PreflightError(found.problems)
    if o.model:
        o.model = found.model
    for name, value in found.parts.items():
        setattr(o, name, value)
    if say is not None and _is_main_process():
        for line in found.notes:
            say(warning_line(line))


def _plugin_format(pm: Any, path: str) -> str | None:
    """The name of a plugin (not sdcore) model format that claims ``path``, if any."""
    if pm is None or not hasattr(pm, "registrations"):
        return None
    from ..specs import resolve

    try:
        registrations = pm.registrations("model format")
        for spec in pm.model_formats():
            if registrations[spec.name].distribution == "sdcore":
                continue
            if resolve(spec.sniff)(path):
                return str(spec.name)
    except Exception:  # a broken plugin is reported when loading; the pre-flight does not judge it
        return None
    return None


def preflight_for_run(
    method: TrainingMethod[Any],
    options: TrainOptions,
    *,
    bundle: ModelBundle | None = None,
    plugin_manager: Any = None,
    say: Callable[[str], None] | None = None,
) -> PreflightReport:
    """The pre-flight at the start of a run: raise :class:`PreflightError` with every problem, else
    print the disk and memory plans (main process only) and return the report."""
    report = run_preflight(method, options, bundle=bundle, plugin_manager=plugin_manager, verify_images=False)
    report.raise_problems()
    if say is not None and _is_main_process():
        for line in report.notes:
            say(line)
        if report.disk is not None:
            say(report.disk.line())
        if report.memory is not None:
            for line in report.memory.lines():
                say(line)
    return report

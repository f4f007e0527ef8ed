"""Options checks that need nothing loaded: missing or contradictory options fail here, before
any model loads, with one clear line (:class:`sdcore.errors.ConfigError`)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .method import TrainingMethod
from .options import LR_SCHEDULERS, MIXED_PRECISION, OPTIMIZERS, SAVE_DTYPES, TrainOptions


def validate_options(options: TrainOptions, method: TrainingMethod[Any] | None = None) -> None:
    """Raise :class:`ConfigError` for missing or contradictory options, before anything heavy runs."""
    from .optim import check_optimizer_available

    o = options
    if not o.model:
        raise ConfigError("no base model given (--model: a model file or folder, or tiny:sd1|sd2|sdxl)")
    if not o.data:
        raise ConfigError("no dataset given (--data: a folder of images or a dataset .toml)")
    if not o.output:
        raise ConfigError("no output given (--output: where to write the result)")
    for name, value, choices in (
        ("mixed_precision", o.mixed_precision, MIXED_PRECISION),
        ("optimizer", o.optimizer, OPTIMIZERS),
        ("lr_scheduler", o.lr_scheduler, LR_SCHEDULERS),
        ("save_dtype", o.save_dtype, SAVE_DTYPES),
    ):
        if value not in choices:
            raise ConfigError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(choices)}")
    positive = {
        "batch_size": o.batch_size,
        "gradient_accumulation": o.gradient_accumulation,
        "clip_skip": o.clip_skip,
        "caption_variants": o.caption_variants,
    }
    for label, count in positive.items():
        if count < 1:
            raise ConfigError(f"--{label.replace('_', '-')} must be at least 1, got {count}")
    for name in (
        "max_steps",
        "epochs",
        "save_every",
        "save_every_epochs",
        "sample_every",
        "sample_every_epochs",
    ):
        value = getattr(o, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 when given, got {value}")
    for name in ("save_limit", "keep_states"):  # 0 keeps all
        value = getattr(o, name)
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be 0 (keep all) or more, got {value}")
    if o.resolution < 0:
        raise ConfigError(f"--resolution must be positive (or 0 for the model's native size), got {o.resolution}")
    if o.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {o.lr}")
    if o.lr_warmup_steps < 0:
        raise ConfigError(f"--lr-warmup-steps must be >= 0, got {o.lr_warmup_steps}")
    for name in ("caption_dropout", "tag_dropout"):
        value = getattr(o, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be between 0 and 1, got {value}")
    if o.noise_offset < 0:
        raise ConfigError(f"--noise-offset must be >= 0, got {o.noise_offset}")
    if o.min_snr_gamma is not None and o.min_snr_gamma <= 0:
        raise ConfigError(f"--min-snr-gamma must be positive, got {o.min_snr_gamma}")
    if o.max_grad_norm < 0:
        raise ConfigError(f"--max-grad-norm must be >= 0 (0 disables clipping), got {o.max_grad_norm}")
    if o.cache_latents_to_disk and not o.cache_latents:
        raise ConfigError("--cache-latents-to-disk needs --cache-latents")
    if o.sample_every is not None and not o.sample_prompts:
        raise ConfigError("--sample-every needs --sample-prompts")
    if o.sample_every_epochs is not None and not o.sample_prompts:
        raise ConfigError("--sample-every-epochs needs --sample-prompts")
    if o.sample_prompts and not o.sample_prompts.strip():
        raise ConfigError("--sample-prompts is empty")
    if o.sample_prompts:
        from .sample_prompts import read_sample_prompts, sampler_name

        sampler_name(o.sample_sampler)
        read_sample_prompts(o.sample_prompts)  # syntax errors now, not after an hour of training
    if o.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    check_optimizer_available(o.optimizer)
    if method is not None:
        if method.capabilities().needs_pixels and o.cache_latents:
            raise ConfigError(f"method {method.name!r} needs decoded pixels every step: pass --no-cache-latents")
        method.validate()

"""Pre-flight checks of kohya's SD3-only training options (``sd3_train_utils.add_sd3_training_arguments``):
the per-encoder caption dropout (:mod:`.encoder_dropout`), ``--apply_lg_attn_mask`` and the positional-
embedding options (:mod:`sdcore.models.sd3.pos_embed`). Bad values and other families are refused before any
model loads; kohya's Flux scripts have none of these options."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .encoder_dropout import ENCODERS

if TYPE_CHECKING:
    from .options import TrainOptions

#: the rates, each a probability
_RATES = (*(option for _name, option in ENCODERS), "pos_emb_random_crop_rate")
#: the flags
_FLAGS = ("apply_lg_attn_mask", "enable_scaled_pos_embed")


def rate_problems(options: TrainOptions) -> list[str]:
    """Rates outside [0, 1], one line each."""
    problems = []
    for option in _RATES:
        value = getattr(options, option)
        if not 0.0 <= value <= 1.0:
            problems.append(f"--{option.replace('_', '-')} must be between 0 and 1, got {value}")
    return problems


def family_problems(options: TrainOptions, family: str) -> list[str]:
    """The SD3 options on another family, one line each."""
    if family == "sd3":
        return []
    given = [option for option in (*_RATES, *_FLAGS) if getattr(options, option)]
    return [
        f"--{option.replace('_', '-')} is an SD3 option (kohya's sd3 scripts: CLIP-L/CLIP-G/T5 conditioning, MMDiT "
        f"positional embedding); this model is {family}"
        for option in given
    ]


__all__ = ["family_problems", "rate_problems"]

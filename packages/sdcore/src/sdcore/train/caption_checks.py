"""Pre-flight checks of kohya's caption options (token warm-up, weighted captions).

Kept apart from :mod:`.preflight` so that the rules about captions sit in one place: bad values
are refused before any model loads, and ``--weighted-captions`` is refused where kohya refuses it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .method import TrainingMethod
    from .options import TrainOptions


def caption_option_problems(options: TrainOptions, method: TrainingMethod[Any] | None = None) -> list[str]:
    """Bad values of the caption options, and ``--weighted-captions`` with a method that encodes
    captions its own way (Textual Inversion: kohya's ``train_textual_inversion.py`` has no
    ``--weighted_captions`` either)."""
    o = options
    problems: list[str] = []
    if o.token_warmup_min < 0:
        problems.append(f"--token-warmup-min must be 0 or more, got {o.token_warmup_min}")
    if not math.isfinite(o.token_warmup_step) or o.token_warmup_step < 0:
        problems.append(
            f"--token-warmup-step must be 0 (off), a fraction of the run below 1 or a step count, got {o.token_warmup_step}"
        )
    if o.keep_tokens_separator is not None and o.keep_tokens_separator and not o.keep_tokens_separator.strip():
        problems.append("--keep-tokens-separator is only whitespace: it would split every caption (use e.g. '|||')")
    if not o.caption_separator:
        problems.append("--caption-separator is empty: give the text between tags (kohya's default is ',')")
    # the family's encoding reads the emphasis (DreamBooth's, padded, too): one rule, the method's declaration
    if o.weighted_captions and method is not None and not method.encodes_as_family():
        problems.append(
            f"--weighted-captions: method {method.name!r} encodes captions its own way and does not read "
            "their emphasis (kohya's textual inversion script has no --weighted_captions either)"
        )
    return problems


def caption_family_problems(options: TrainOptions, family_name: str) -> list[str]:
    """``--weighted-captions`` only where kohya supports it: SD1/SD2/SDXL (kohya's SD3 and FLUX.1
    tokenizers have no weighted tokenization)."""
    if not options.weighted_captions:
        return []
    from ..errors import SdcoreError
    from ..models.family import get_family

    try:
        family = get_family(family_name)
    except SdcoreError as exc:
        return [str(exc)]
    if family.denoiser != "unet":
        return [
            f"--weighted-captions: {family.label} is not supported (kohya's SD3/FLUX.1 scripts cannot weigh "
            "caption tokens); it works with SD1, SD2 and SDXL"
        ]
    return []

"""Per-module ranks and learning rates by pattern on the module's kohya name (``--module-ranks``,
``--module-lrs``, ``--extra-module-ranks``).

kohya's ``networks.lora_flux`` reads ``network_reg_dims`` / ``network_reg_lrs``: ``REGEX=VALUE`` pairs,
comma-separated, each regex searched (``re.search``) in the module's kohya name; the first pair that matches,
in the order written, decides. Its other per-module args (type dims, ``in_dims``, block indices, SD3's
``emb_dims`` ...) are all expressible as such ordered rules, so sdcore has this one mechanism and the kohya
translation (:mod:`sdcore.train.kohya`) writes rules.

The name a rule sees is the module's name in a kohya-layout file: ``lora_unet_double_blocks_0_img_attn_qkv``
on FLUX.1 (one name for a fused q/k/v Linear, whose diffusers parts share it), SDXL's SGM names,
``lora_te1_text_model_encoder_layers_0_self_attn_q_proj`` for CLIP-L. ``sdcore lora targets`` lists them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .naming import ModuleIndex


@dataclass(frozen=True)
class Rule:
    """One ``REGEX=VALUE`` pair."""

    pattern: str
    value: float

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def parse_rules(text: str | None, *, flag: str, integer: bool) -> tuple[list[Rule], list[str]]:
    """``"img_attn=8,single.*linear1=0"`` -> the rules in order, and the problems (one line each).

    Pairs are split on commas (so a regex cannot hold one, as in kohya) and each at its *last* ``=`` (a
    regex may hold ``=``, e.g. a lookahead ``(?=``; the value never does). ``integer``: ranks (whole numbers,
    0 or more); else learning rates (numbers, 0 or more). An empty pair is skipped (a trailing comma)."""
    rules: list[Rule] = []
    problems: list[str] = []
    for raw in (text or "").split(","):
        pair = raw.strip()
        if not pair:
            continue
        pattern, sep, value_text = pair.rpartition("=")
        pattern = pattern.strip()
        if not sep or not pattern:
            problems.append(f"{flag} {pair!r}: expected REGEX={'RANK' if integer else 'LR'}")
            continue
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"{flag} {pattern!r}: not a regular expression ({exc})")
            continue
        value: float
        try:
            value = int(value_text) if integer else float(value_text)
        except ValueError:
            what = "a whole number (0: not adapted)" if integer else "a number"
            problems.append(f"{flag} {pair!r}: {value_text.strip()!r} is not {what}")
            continue
        if value < 0 or value != value:
            problems.append(f"{flag} {pair!r}: must be 0 or more")
            continue
        rules.append(Rule(pattern, value))
    return rules, problems


def first_match(rules: list[Rule], name: str) -> int:
    """The position of the first rule whose regex is found in ``name``, or -1."""
    for position, rule in enumerate(rules):
        if rule.matches(name):
            return position
    return -1


def kohya_names(index: ModuleIndex) -> dict[str, str]:
    """Every target's canonical name -> its name in a kohya-layout file: on SD3/FLUX.1/Chroma the SAI/BFL
    module it belongs to (a fused q/k/v part gets the fused module's name), elsewhere the canonical name."""
    by_path = {part.path: module.name for module in index.kohya.values() for part in module.parts}
    names: dict[str, str] = {}
    for name, target in index.targets.items():
        kohya = by_path.get(target.path) if target.component == index.denoiser else None
        names[name] = kohya or name
    return names


__all__ = ["Rule", "first_match", "kohya_names", "parse_rules"]

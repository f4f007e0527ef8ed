"""DreamArtist's training CFG scale: ``"3"``, ``"1.5-3.0"`` or ``"1.5-3.0:cos"``.

With ``lo != hi`` the scale moves with the timestep: ``r = t / (T - 1)`` and
``scale = lo + (hi - lo) * f(r)`` with ``f`` one of ``ln`` (``r``, the default), ``cos``
(``cos((r - 1) * pi / 2)``) or ``cos2`` (``1 - cos(r * pi / 2)``). DreamArtist also evaluates any
other text as a Python expression; we refuse it (running text from a config is unsafe).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdcore.errors import ConfigError

if TYPE_CHECKING:
    import torch

CURVES = ("ln", "cos", "cos2")
_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_PATTERN = re.compile(rf"^\s*({_NUMBER})\s*(?:-\s*({_NUMBER})\s*)?(?::\s*(\w+)\s*)?$")


@dataclass(frozen=True)
class GuidanceSchedule:
    low: float
    high: float
    curve: str = "ln"

    @property
    def constant(self) -> bool:
        return self.low == self.high

    @property
    def disabled(self) -> bool:
        """DreamArtist skips the positive/negative combination when the upper scale is 1."""
        return self.high == 1.0

    def scale(self, timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
        """Per-sample scale ``[B]`` (float32) for integer timesteps ``[B]``."""
        import torch

        t = timesteps.float()
        if self.constant:
            return torch.full_like(t, self.low)
        r = t / max(num_train_timesteps - 1, 1)
        if self.curve == "cos":
            f = torch.cos((r - 1) * math.pi / 2)
        elif self.curve == "cos2":
            f = 1 - torch.cos(r * math.pi / 2)
        else:
            f = r
        return self.low + (self.high - self.low) * f


def parse_guidance(text: str | float) -> GuidanceSchedule:
    match = _PATTERN.match(str(text))
    if not match:
        raise ConfigError(f"--cfg-scale {text!r}: want 'scale', 'low-high' or 'low-high:ln|cos|cos2'")
    low = float(match.group(1))
    high = float(match.group(2)) if match.group(2) is not None else low
    curve = match.group(3) or "ln"
    if curve not in CURVES:
        raise ConfigError(
            f"--cfg-scale {text!r}: unknown curve {curve!r} (want {', '.join(CURVES)}; expressions are not evaluated)"
        )
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 or high <= 0:
        raise ConfigError(f"--cfg-scale {text!r}: scales must be positive numbers")
    return GuidanceSchedule(low, high, curve)

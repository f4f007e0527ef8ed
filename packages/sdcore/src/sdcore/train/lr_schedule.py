"""A1111 learning-rate schedule strings: ``"0.005:100, 1e-3:1000, 1e-5"``.

Shared by the methods that bring A1111's training-tab options (TI, APT, hypernetworks); a method
returns :func:`schedule_lambda` from ``TrainingMethod.lr_lambda`` and the runtime applies it.

Each comma-separated item is ``rate:end_step`` (the rate holds for steps before ``end_step``) or a
bare ``rate`` / ``rate:-1`` (open-ended; must be last). Steps are absolute optimizer steps, so a
resumed run picks up where it was. Unlike A1111, running past the last listed step does not stop
training: the last rate simply continues (A1111 users were surprised by that stop).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_ITEM = re.compile(rf"^\s*({_NUMBER})\s*(?::\s*([+-]?\d+)\s*)?$")


@dataclass(frozen=True)
class LearnSchedule:
    """``segments`` are ``(rate, end_step)`` pairs; ``end_step`` None means open-ended."""

    segments: tuple[tuple[float, int | None], ...]

    def rate_at(self, step: int) -> float:
        """The rate for optimizer step ``step`` (0-based): the first segment whose end lies past it."""
        for rate, end in self.segments:
            if end is None or step < end:
                return rate
        return self.segments[-1][0]

    @property
    def is_constant(self) -> bool:
        return len({rate for rate, _ in self.segments}) == 1

    def __str__(self) -> str:
        return ", ".join(f"{rate:g}" if end is None else f"{rate:g}:{end}" for rate, end in self.segments)


def parse_schedule(text: str | float) -> LearnSchedule:
    """Parse an A1111 schedule string; raise ConfigError naming the bad item."""
    if isinstance(text, (int, float)):
        text = repr(float(text))
    if not str(text).strip():
        raise ConfigError("learning-rate schedule is empty (want e.g. '0.005:100, 1e-3:1000, 1e-5')")
    segments: list[tuple[float, int | None]] = []
    items = str(text).split(",")
    last_end = 0
    for position, item in enumerate(items):
        match = _ITEM.match(item)
        if not match:
            raise ConfigError(
                f"learning-rate schedule {text!r}: cannot read {item.strip()!r} (want 'rate' or 'rate:step')"
            )
        rate = float(match.group(1))
        if not math.isfinite(rate) or rate <= 0:
            raise ConfigError(f"learning-rate schedule {text!r}: rate {match.group(1)} must be a positive number")
        end: int | None = None if match.group(2) is None else int(match.group(2))
        if end == -1:
            end = None
        if end is None:
            if position != len(items) - 1:
                raise ConfigError(
                    f"learning-rate schedule {text!r}: the open-ended rate {match.group(1)} must come last"
                )
        elif end <= last_end:
            raise ConfigError(
                f"learning-rate schedule {text!r}: step {end} must be greater than {last_end} (steps are absolute and increasing)"
            )
        else:
            last_end = end
        segments.append((rate, end))
    return LearnSchedule(tuple(segments))


def schedule_lambda(schedule: LearnSchedule, base_lr: float) -> Callable[[int], float]:
    """The schedule as a factor of ``base_lr`` per optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``.

    Parameter groups with their own rate keep their ratio to ``base_lr``.
    """
    if base_lr <= 0:
        raise ConfigError("--lr must be positive when --lr-schedule is used (the schedule is a factor of it)")
    return lambda step: schedule.rate_at(int(step)) / base_lr

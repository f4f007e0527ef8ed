"""OneTrainer's timestep distributions (``--timestep-distribution``), for every family.

OneTrainer (``ModelSetupNoiseMixin._get_timestep_discrete``) draws an *integer* timestep ``t`` in
``[0, T)`` (T = the scheduler's 1000 training steps) for SD1/SD2/SDXL and for the flow-matching models
alike; the flow models then noise with ``sigma = (t + 1) / T``. The draw, rewritten from its code:

- the range: ``low = int(T * min_noising_strength)``, ``high = int(T * max_noising_strength)``,
  ``n = high - low``; ``w`` = ``noising_weight``, ``b`` = ``noising_bias``, ``s`` = the timestep shift
  (``--timestep-shift``, by default ``--discrete-flow-shift`` on the flow families and 1 on the DDPM ones).
- *continuous* kinds draw ``x`` in ``[0, 1)``, narrow it to ``y = low + n x``, shift it
  ``T s y / ((s - 1) y + T)`` (so the narrowing comes *before* the shift) and truncate to an integer:
  ``uniform`` ``x = u``; ``logit_normal`` ``x = sigmoid(N(b, w + 1))``; ``heavy_tail`` the SD3 paper's
  ``x = 1 - u - w (cos^2(pi u / 2) - 1 + u)``; ``beta`` ``x ~ Beta(max(1e-4, w), max(1e-4, b))``
  (``u^(1/alpha)`` when beta is 1, ``1 - u^(1/beta)`` when alpha is 1).
- *discrete* kinds pick bucket ``i`` of ``n`` with probability proportional to a weight on the grid
  ``g_i = i / (n - 1)`` (``linspace(0, 1, n)``), and give ``t = low + i``. The shift enters through the
  inverse shift ``r(g) = g / (s - s g + g)`` and its derivative ``s / (s + g - s g)^2``, which multiplies
  every weight: ``cos_map`` ``2 / (pi (1 - 2 r + 2 r^2))``; ``sigmoid``
  ``1 / (1 + exp(-w (r(r(g)) - (b + 0.5))))`` (OneTrainer applies the inverse shift twice to this one's
  argument; so does sdcore, to draw what it draws); ``inverted_parabola``
  ``max(0, 2 - w (r - (b + 0.5))^2)``. The range stretches the whole shape over ``[low, high)``.

Two things differ, both for sdcore's per-sample seeding (:mod:`.noise`): each sample draws its own
timestep from its own generator (OneTrainer draws the batch from one), and the general ``beta`` case is
drawn from that generator too (two gamma variates, Marsaglia and Tsang) where OneTrainer's
``torch.distributions.Beta`` ignores its seed. A continuous draw that lands on ``T`` (``u = 0`` for
``heavy_tail``, a sigmoid rounding to 1, with ``max_noising_strength`` 1) is kept at ``T - 1`` where
OneTrainer would index past its table. The shift moves a continuous draw out of ``[low, high)``
(``[shift(low), shift(high))``); it is kept there, as in OneTrainer.

The shift is OneTrainer's ``timestep_shift`` on every family (it shifts SD1/SD2/SDXL's DDPM timesteps
with the same formula), or, with its ``dynamic_timestep_shifting`` (Flux), a shift per batch: the
resolution's ``exp(mu)`` (``FluxModel.calculate_timestep_shift``), passed to :meth:`TimestepDistribution.draw`
*after* whichever distribution drew (``_get_timestep_discrete(..., shift=...)``). OneTrainer computes a
discrete kind's bucket weights once, with the first batch's shift, and keeps them; sdcore weighs each
draw with its own batch's shift (the same draw while every image has one size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: OneTrainer's ``TimestepDistribution`` values (lower case; sdcore's ``--timestep-distribution`` choices)
TIMESTEP_DISTRIBUTIONS = ("uniform", "sigmoid", "logit_normal", "heavy_tail", "cos_map", "inverted_parabola", "beta")
#: the kinds OneTrainer draws as a continuous value then shifts (the others pick a weighted bucket)
CONTINUOUS_DISTRIBUTIONS = ("uniform", "logit_normal", "heavy_tail", "beta")
#: OneTrainer's floor for the beta distribution's parameters (noising_weight -> alpha, noising_bias -> beta)
BETA_FLOOR = 1e-4


def inverse_shift(grid: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of the time shift ``s y / (1 + (s - 1) y)``: ``g / (s - s g + g)``."""
    return grid / (shift - shift * grid + grid)


def bucket_weights(kind: str, count: int, weight: float, bias: float, shift: float) -> torch.Tensor:
    """The unnormalised probability of each of ``count`` buckets for a discrete kind (see the module doc)."""
    import torch

    grid = torch.linspace(0, 1, count)
    shifted = inverse_shift(grid, shift)
    derivative = shift / (shift + grid - grid * shift) ** 2
    if kind == "cos_map":
        density = 2.0 / (math.pi * (1.0 - 2.0 * shifted + 2.0 * shifted**2))
    elif kind == "sigmoid":
        density = torch.sigmoid(weight * (inverse_shift(shifted, shift) - (bias + 0.5)))
    elif kind == "inverted_parabola":
        density = torch.clamp(2.0 - weight * (shifted - (bias + 0.5)) ** 2, min=0.0)
    else:
        raise ValueError(f"{kind!r} is not a discrete timestep distribution")
    return density * derivative


def _log_gamma_variate(shape: float, generator: torch.Generator) -> float:
    """The logarithm of one Gamma(shape, 1) variate from ``generator`` (Marsaglia and Tsang 2000; a shape
    below 1 boosted by ``U^(1/shape)``, kept as a logarithm so OneTrainer's 1e-4 floor does not underflow)."""
    import torch

    log_boost = 0.0
    if shape < 1.0:
        u = float(torch.rand((), generator=generator))
        log_boost = math.log(max(u, 1e-300)) / shape
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = float(torch.randn((), generator=generator))
        v = (1.0 + c * x) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=generator))
        if u > 0 and math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
            return math.log(d * v) + log_boost


@dataclass(frozen=True)
class TimestepDistribution:
    """One OneTrainer timestep distribution: :meth:`draw` gives integer timesteps in ``[0, num_timesteps)``."""

    kind: str
    weight: float = 0.0
    bias: float = 0.0
    min_strength: float = 0.0
    max_strength: float = 1.0
    shift: float = 1.0
    num_timesteps: int = 1000
    _weights: Any = field(default=None, init=False, repr=False, compare=False)
    #: a discrete kind's bucket weights for the shifts given to :meth:`draw` (the dynamic shift)
    _shifted: dict[float, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = distribution_problems(
            self.kind, self.weight, self.bias, self.min_strength, self.max_strength, self.shift, self.num_timesteps
        )
        if problems:
            from ..errors import ConfigError

            raise ConfigError("; ".join(problems))
        if self.kind not in CONTINUOUS_DISTRIBUTIONS:
            low, high = self.bounds
            object.__setattr__(
                self, "_weights", bucket_weights(self.kind, high - low, self.weight, self.bias, self.shift)
            )

    @property
    def bounds(self) -> tuple[int, int]:
        """``[low, high)``: OneTrainer's ``int(T * min_noising_strength)``, ``int(T * max_noising_strength)``."""
        return int(self.num_timesteps * self.min_strength), int(self.num_timesteps * self.max_strength)

    def _unit(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        """A continuous kind's ``x`` in [0, 1] (before the range and the shift)."""
        import torch

        kind, weight, bias = self.kind, self.weight, self.bias
        if kind == "uniform":
            return torch.rand(count, generator=generator)
        if kind == "logit_normal":
            return torch.sigmoid(torch.randn(count, generator=generator) * (weight + 1.0) + bias)
        if kind == "heavy_tail":
            u = torch.rand(count, generator=generator)
            return 1.0 - u - weight * (torch.cos(math.pi / 2.0 * u) ** 2.0 - 1.0 + u)
        alpha, beta = max(BETA_FLOOR, weight), max(BETA_FLOOR, bias)
        if abs(beta - 1.0) < 1e-5:
            return torch.rand(count, generator=generator).pow(1.0 / alpha)
        if abs(alpha - 1.0) < 1e-5:
            return 1.0 - torch.rand(count, generator=generator).pow(1.0 / beta)
        gen = generator if generator is not None else torch.default_generator
        values = []
        for _ in range(count):  # X / (X + Y) = sigmoid(log X - log Y) for X ~ Gamma(alpha), Y ~ Gamma(beta)
            log_a, log_b = _log_gamma_variate(alpha, gen), _log_gamma_variate(beta, gen)
            values.append(1.0 / (1.0 + math.exp(min(log_b - log_a, 700.0))))
        return torch.tensor(values, dtype=torch.float32)

    def _bucket_weights(self, shift: float) -> Any:
        """A discrete kind's weights for ``shift`` (the constructor's are computed once; others cached)."""
        if shift == self.shift:
            return self._weights
        if shift not in self._shifted:
            if not (math.isfinite(shift) and shift > 0):
                from ..errors import ConfigError

                raise ConfigError(f"the timestep shift must be positive (1 = none), got {shift}")
            low, high = self.bounds
            self._shifted[shift] = bucket_weights(self.kind, high - low, self.weight, self.bias, shift)
        return self._shifted[shift]

    def draw(
        self, generator: torch.Generator | None = None, count: int = 1, shift: float | None = None
    ) -> torch.Tensor:
        """``count`` integer timesteps (int64, CPU) drawn from ``generator``; ``shift`` replaces the
        distribution's own (OneTrainer's dynamic shift: the batch's resolution decides it)."""
        import torch

        low, high = self.bounds
        shift = self.shift if shift is None else float(shift)
        if self._weights is not None:
            weights = self._bucket_weights(shift)
            picks = torch.multinomial(weights, count, replacement=True, generator=generator)
            return picks.long() + low
        steps = low + (high - low) * self._unit(count, generator)
        total = self.num_timesteps
        steps = total * shift * steps / ((shift - 1.0) * steps + total)
        return steps.long().clamp(0, total - 1)

    def sigmas(
        self, generator: torch.Generator | None = None, count: int = 1, shift: float | None = None
    ) -> torch.Tensor:
        """Flow matching: OneTrainer's noise level ``(t + 1) / T`` of :meth:`draw`'s timesteps (float32)."""
        return (self.draw(generator, count, shift) + 1).float() / self.num_timesteps


def distribution_problems(
    kind: str | None,
    weight: float,
    bias: float,
    min_strength: float,
    max_strength: float,
    shift: float = 1.0,
    num_timesteps: int = 1000,
) -> list[str]:
    """What is wrong with a timestep distribution's settings, one line each (empty when all is well)."""
    from .objectives import MODE_SCALE_RANGE

    problems: list[str] = []
    if kind not in TIMESTEP_DISTRIBUTIONS:
        return [f"--timestep-distribution {kind!r}: choose one of {', '.join(TIMESTEP_DISTRIBUTIONS)}"]
    for name, value in (("noising-weight", weight), ("noising-bias", bias)):
        if not math.isfinite(value):
            problems.append(f"--{name} must be a finite number, got {value}")
    if not (math.isfinite(min_strength) and math.isfinite(max_strength) and 0.0 <= min_strength < max_strength <= 1.0):
        problems.append(
            f"--min-noising-strength {min_strength} / --max-noising-strength {max_strength}: need 0 <= min < max <= 1"
        )
    elif int(num_timesteps * max_strength) - int(num_timesteps * min_strength) < 1:
        problems.append(
            f"--min-noising-strength {min_strength} / --max-noising-strength {max_strength}: no timestep of "
            f"{num_timesteps} lies in between"
        )
    if not (math.isfinite(shift) and shift > 0):
        problems.append(f"the timestep shift must be positive (1 = none), got {shift}")
    if problems:
        return problems
    low, high = MODE_SCALE_RANGE
    if kind == "heavy_tail" and not low <= weight <= high:
        problems.append(
            f"--noising-weight {weight}: heavy_tail's scale must lie in [{low:g}, {high:.4f}] (outside it the "
            "SD3 paper's mapping is not monotone and leaves [0, 1])"
        )
    if kind == "logit_normal" and not weight + 1.0 > 0:
        problems.append(f"--noising-weight {weight}: logit_normal's standard deviation is weight + 1, it must be > 0")
    if kind in ("cos_map", "sigmoid", "inverted_parabola"):
        count = int(num_timesteps * max_strength) - int(num_timesteps * min_strength)
        weights = bucket_weights(kind, count, weight, bias, shift)
        if not (bool(weights.isfinite().all()) and float(weights.sum()) > 0):
            problems.append(
                f"--timestep-distribution {kind} with --noising-weight {weight} / --noising-bias {bias}: no timestep "
                "has a positive weight (the parabola lies below 0 everywhere)"
            )
    return problems


__all__ = [
    "BETA_FLOOR",
    "CONTINUOUS_DISTRIBUTIONS",
    "TIMESTEP_DISTRIBUTIONS",
    "TimestepDistribution",
    "bucket_weights",
    "distribution_problems",
    "inverse_shift",
]

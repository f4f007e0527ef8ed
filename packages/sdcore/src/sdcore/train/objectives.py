"""Training objectives: how a batch of latents becomes (noisy input, timesteps, target, loss weights).

The family says which one a model trains with (``ModelFamily.objective``); :func:`objective_for`
builds it from the run's options.

- :class:`DdpmObjective` (SD1/SD2/SDXL): integer timesteps uniform in ``[0, T)``, ``noisy =
  sqrt(abar_t) x + sqrt(1 - abar_t) eps`` from the model's DDPM scheduler, the target is the noise
  (epsilon) or the velocity (v-prediction), optional min-SNR-gamma weights.
- :class:`FlowMatchingObjective` (SD3, Flux; rectified flow): a sigma ``s`` in ``[0, 1]`` drawn with
  the chosen timestep sampling, then time-shifted ``s' = shift * s / (1 + (shift - 1) * s)`` (SD3
  paper, eq. 23); ``noisy = (1 - s) x + s * eps``, the target is the velocity ``eps - x`` (as SD3/Flux
  trainers use: kohya, diffusers' examples, SimpleTuner), no loss weighting, and the denoiser is
  called with ``timestep = s * 1000`` as diffusers' SD3 and Flux pipelines do.

Noise and the timestep are drawn per sample from a generator seeded by the sample's identity (see
:mod:`.noise`), so every objective keeps the runtime's batch-size/accumulation/resume invariance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError
from .noise import NoiseSettings, draw_noise
from .options import TIMESTEP_SAMPLINGS

if TYPE_CHECKING:
    import torch

    from ..models.bundle import ModelBundle
    from .options import TrainOptions

#: the SD3 paper's bounds for the mode sampling's scale: outside them f_mode is not monotone,
#: so it would not map [0, 1] onto [0, 1]
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


@dataclass
class Noised:
    """One micro-batch prepared for the denoiser."""

    noisy: torch.Tensor  # the denoiser's input
    timesteps: torch.Tensor  # what the denoiser is called with ([B]; long for DDPM, float s*1000 for flow)
    target: torch.Tensor  # the regression target
    weights: torch.Tensor | None = None  # per-sample loss weights of the objective ([B]) or None


class TrainingObjective(Protocol):
    """What the step asks of an objective. The built-in objectives subclass it for :meth:`sample`,
    which is :meth:`draw` with nothing but an offset (one way to draw noise for every objective)."""

    name: str

    def sample(
        self, keys: Sequence[int], shape: Sequence[int], *, noise_offset: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample seeded noise ``[B, *shape]`` and timesteps ``[B]`` (on the CPU)."""
        noise, timesteps, _ = self.draw(keys, shape, NoiseSettings(noise_offset=noise_offset))
        return noise, timesteps

    def draw(
        self,
        keys: Sequence[int],
        shape: Sequence[int],
        settings: NoiseSettings,
        latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`sample` with every noise option (:class:`.noise.NoiseSettings`), plus the
        perturbed noise the noisy input is made with (input perturbation; else None)."""
        ...

    def noised(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        input_noise: torch.Tensor | None = None,
    ) -> Noised:
        """The noisy latents (made with ``input_noise`` when given, else ``noise``), the denoiser's
        timesteps, the target (always from ``noise``) and the loss weights."""
        ...


class DdpmObjective(TrainingObjective):
    """Epsilon / v-prediction on the model's DDPM schedule, with optional min-SNR-gamma weighting."""

    name = "ddpm"

    def __init__(
        self,
        scheduler: Any,
        *,
        min_snr_gamma: float | None = None,
        min_timestep: int | None = None,
        max_timestep: int | None = None,
        zero_terminal_snr: bool = False,
    ) -> None:
        from .noise import zero_terminal_snr_scheduler

        self.scheduler = scheduler  # the model's schedule: the SNR weights read it (kohya: before the fix)
        self.min_snr_gamma = min_snr_gamma
        self.min_timestep = min_timestep
        self.max_timestep = max_timestep
        problem = timestep_range_problem(min_timestep, max_timestep, self.num_timesteps)
        if problem:
            raise ConfigError(problem)
        #: the schedule the noisy input and the target are made with (zero terminal SNR when asked)
        self.noising = zero_terminal_snr_scheduler(scheduler) if zero_terminal_snr else scheduler

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler.config["num_train_timesteps"])

    def draw(
        self,
        keys: Sequence[int],
        shape: Sequence[int],
        settings: NoiseSettings,
        latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        from .noise import integer_timesteps

        steps = integer_timesteps(self.num_timesteps, self.min_timestep, self.max_timestep)
        return draw_noise(keys, shape, settings, steps, latents)

    def noised(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        input_noise: torch.Tensor | None = None,
    ) -> Noised:
        from .noise import min_snr_weights, training_target

        source = noise if input_noise is None else input_noise.to(noise.device)
        noisy = self.noising.add_noise(latents, source, timesteps)
        target = training_target(self.noising, latents, noise, timesteps)
        weights = None
        if self.min_snr_gamma:
            weights = min_snr_weights(self.scheduler, timesteps, self.min_snr_gamma)
        return Noised(noisy, timesteps, target, weights)


def time_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution-dependent time shift ``s' = shift * s / (1 + (shift - 1) * s)``; ``shift``
    1 is the identity, larger values move sigmas towards 1 (more noise)."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def mode_sigmas(u: torch.Tensor, mode_scale: float) -> torch.Tensor:
    """The SD3 paper's ``f_mode(u; s) = 1 - u - s * (cos^2(pi u / 2) - 1 + u)`` for uniform ``u``."""
    import torch

    return 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)


@dataclass(frozen=True)
class FlowMatchingObjective(TrainingObjective):
    """Rectified-flow matching with a choice of timestep sampling (see the module doc)."""

    timestep_sampling: str = "logit_normal"
    shift: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigmoid_scale: float = 1.0
    num_timesteps: int = 1000
    #: kohya's SD3 --min_timestep/--max_timestep (see :meth:`in_range`); None: the whole [0, 1]
    min_timestep: int | None = None
    max_timestep: int | None = None

    name = "flow-matching"

    def __post_init__(self) -> None:
        problems = flow_option_problems(
            self.timestep_sampling, self.shift, self.logit_std, self.mode_scale, self.sigmoid_scale
        )
        problem = timestep_range_problem(self.min_timestep, self.max_timestep, self.num_timesteps)
        if problem:
            problems.append(problem)
        if problems:
            raise ConfigError("; ".join(problems))

    def sample_sigmas(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` sigmas in [0, 1] with this sampling and shift (float32, CPU)."""
        import torch

        kind = self.timestep_sampling
        if kind == "uniform":
            sigmas = torch.rand((count,), generator=generator)
        elif kind == "logit_normal":  # sigmoid of N(mean, std): SD3's default "lognorm(0, 1)"
            sigmas = torch.sigmoid(torch.randn((count,), generator=generator) * self.logit_std + self.logit_mean)
        elif kind == "mode":
            sigmas = mode_sigmas(torch.rand((count,), generator=generator), self.mode_scale)
        else:  # "sigmoid": kohya's flux sampling, sigmoid(scale * N(0, 1))
            sigmas = torch.sigmoid(self.sigmoid_scale * torch.randn((count,), generator=generator))
        return time_shift(sigmas, self.shift).clamp(0.0, 1.0)

    def draw(
        self,
        keys: Sequence[int],
        shape: Sequence[int],
        settings: NoiseSettings,
        latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        noise, sigmas, perturbed = draw_noise(keys, shape, settings, lambda gen: self.sample_sigmas(1, gen), latents)
        return noise, self.timesteps_of(sigmas), perturbed

    def timesteps_of(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The denoiser's timesteps ``s * T`` for drawn sigmas; with kohya's SD3 timestep range
        (``sd3_train_utils.get_noisy_model_input_and_timesteps``) the integer ``int(s * (max - min) +
        min)`` instead, whose sigma is that timestep / T. Without a range the sigmas are used as drawn
        (kohya's SD3 script rounds them down to a multiple of 1/1000 even then; sdcore does not)."""
        if self.min_timestep is None and self.max_timestep is None:
            return sigmas * self.num_timesteps
        import torch

        low = 0 if self.min_timestep is None else self.min_timestep
        high = self.num_timesteps if self.max_timestep is None else self.max_timestep
        return torch.floor(sigmas * (high - low) + low)

    def noised(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        input_noise: torch.Tensor | None = None,
    ) -> Noised:
        sigmas = (timesteps.float() / self.num_timesteps).to(latents.device)
        s = sigmas.reshape(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        # kohya's Flux input perturbation: (1 - s) x + s (noise + gamma xi), the target keeps noise
        source = noise if input_noise is None else input_noise.to(noise.device)
        noisy = (1.0 - s) * latents + s * source
        return Noised(noisy, sigmas * self.num_timesteps, noise - latents)


def flow_option_problems(
    timestep_sampling: str, shift: float, logit_std: float, mode_scale: float, sigmoid_scale: float
) -> list[str]:
    """What is wrong with the flow-matching options (one line each; empty when all is well)."""
    problems = []
    if timestep_sampling not in TIMESTEP_SAMPLINGS:
        problems.append(f"--timestep-sampling {timestep_sampling!r}: choose one of {', '.join(TIMESTEP_SAMPLINGS)}")
    if not shift > 0:
        problems.append(f"--discrete-flow-shift must be positive (1 = no shift), got {shift}")
    if not logit_std > 0:
        problems.append(f"--logit-std must be positive, got {logit_std}")
    low, high = MODE_SCALE_RANGE
    if not low <= mode_scale <= high:
        problems.append(f"--mode-scale must be between {low:g} and {high:.4f} (SD3 paper), got {mode_scale}")
    if not sigmoid_scale > 0:
        problems.append(f"--sigmoid-scale must be positive, got {sigmoid_scale}")
    return problems


def timestep_range_problem(min_timestep: int | None, max_timestep: int | None, num_timesteps: int) -> str | None:
    """kohya's ``--min_timestep``/``--max_timestep`` must satisfy ``0 <= min < max <= T`` (unset:
    0 and T); one line saying what is wrong, else None."""
    if min_timestep is None and max_timestep is None:
        return None
    low = 0 if min_timestep is None else min_timestep
    high = num_timesteps if max_timestep is None else max_timestep
    if not 0 <= low < high <= num_timesteps:
        return (
            f"--min-timestep {low} / --max-timestep {high}: need 0 <= min < max <= {num_timesteps} "
            "(timesteps are drawn uniformly in [min, max))"
        )
    return None


def objective_for(bundle: ModelBundle, options: TrainOptions) -> TrainingObjective:
    """The objective of ``bundle``'s family, configured from the run's options."""
    objective = bundle.family_spec.objective
    if objective == "ddpm":
        return DdpmObjective(
            bundle.noise_scheduler,
            min_snr_gamma=options.min_snr_gamma,
            min_timestep=options.min_timestep,
            max_timestep=options.max_timestep,
            zero_terminal_snr=options.zero_terminal_snr,
        )
    if objective == "flow-matching":
        return FlowMatchingObjective(
            timestep_sampling=options.timestep_sampling,
            shift=options.discrete_flow_shift,
            logit_mean=options.logit_mean,
            logit_std=options.logit_std,
            mode_scale=options.mode_scale,
            sigmoid_scale=options.sigmoid_scale,
            min_timestep=options.min_timestep,
            max_timestep=options.max_timestep,
        )
    raise ConfigError(f"model family {bundle.family!r} has an objective sdcore does not know: {objective!r}")


__all__ = [
    "TIMESTEP_SAMPLINGS",
    "DdpmObjective",
    "FlowMatchingObjective",
    "Noised",
    "TrainingObjective",
    "flow_option_problems",
    "mode_sigmas",
    "objective_for",
    "time_shift",
    "timestep_range_problem",
]

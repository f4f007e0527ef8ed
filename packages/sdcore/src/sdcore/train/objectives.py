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
  called with ``timestep = s * 1000`` as diffusers' SD3 and Flux pipelines do. kohya's variants are
  options: its Flux samplings ``sigma`` (a sigma of the shifted 1000-step scheduler table) and
  ``flux_shift`` (a resolution-dependent shift), its ``--model_prediction_type`` (how the output is
  read: :meth:`FlowMatchingObjective.model_output`) and its ``--weighting_scheme`` loss weights
  (:func:`flow_loss_weights`); see :mod:`sdcore.train.kohya` for which kohya script means what.
  ai-toolkit's flow-matching draws are the samplings ``linear_table`` and ``shift_table``
  (:func:`aitoolkit_timestep_table`), ``lognorm_blend_table`` and ``sigmoid_table`` (a table drawn anew):
  an index of a 1000-entry table of timesteps, drawn uniformly from ``[--min-table-index,
  --max-table-index)`` (ai-toolkit's ``min/max_denoising_steps``).

With ``--timestep-distribution`` both objectives draw their timesteps as OneTrainer does instead
(:mod:`.timestep_distributions`: an integer ``t``; flow matching noises with ``sigma = (t + 1) / T``),
shifted by ``--timestep-shift`` on every family, or per batch by the resolution on flow matching
(``--dynamic-timestep-shift``: Flux's ``exp(mu)``, which replaces the fixed shift after any distribution).

Noise and the timestep are drawn per sample from a generator seeded by the sample's identity (see
:mod:`.noise`), so every objective keeps the runtime's batch-size/accumulation/resume invariance.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError
from .noise import NoiseSettings, draw_noise
from .options import MODE_SCALE_RANGE, TIMESTEP_SAMPLINGS

if TYPE_CHECKING:
    import torch

    from ..models.bundle import ModelBundle
    from ..models.family import ModelFamily
    from .options import TrainOptions
    from .timestep_distributions import TimestepDistribution


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

    def model_output(self, output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser's ``output`` is compared with the target as (the objective's reading of
        it; the output itself unless the objective says otherwise)."""
        return output

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
        distribution: TimestepDistribution | None = None,
    ) -> None:
        from .noise import zero_terminal_snr_scheduler

        self.scheduler = scheduler  # the model's schedule: the SNR weights read it (kohya: before the fix)
        self.min_snr_gamma = min_snr_gamma
        self.min_timestep = min_timestep
        self.max_timestep = max_timestep
        #: OneTrainer's timestep distribution (--timestep-distribution) instead of the uniform draw; None: uniform
        self.distribution = distribution
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

        if self.distribution is not None:
            return draw_noise(keys, shape, settings, self.distribution.draw, latents)
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


def flux_shift_mu(height: int, width: int) -> float:
    """Flux's resolution-dependent shift ``mu`` for latents of ``height x width`` (unpacked, 16
    channels): linear in the packed token count ``(h // 2) * (w // 2)``, 0.5 at 256 tokens and 1.15
    at 4096 (BFL's schedule, which kohya's ``flux_shift`` sampling uses while training)."""
    tokens = (height // 2) * (width // 2)
    slope = (1.15 - 0.5) / (4096 - 256)
    return slope * tokens + (0.5 - slope * 256)


def exponential_time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Flux's time shift ``e^mu / (e^mu + (1/s - 1))``: the SD3 shift with ``shift = e^mu``."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def aitoolkit_timestep_table(
    kind: str, shift: float = 1.0, mu: float | None = None, num_timesteps: int = 1000
) -> torch.Tensor:
    """ai-toolkit's flow-matching training table (``CustomFlowMatchEulerDiscreteScheduler.set_train_timesteps``),
    ``num_timesteps`` float32 timesteps from the noisiest down; a sample noises with ``sigma = t / T``.

    ``linear_table`` (its ``linear`` and ``weighted``): ``linspace(T, 1, T)``. ``shift_table`` (its ``shift``
    and ``flux_shift``, one branch): diffusers' scheduler keeps its ends ``sigma_max``/``sigma_min`` from
    construction (float32 ``T/T`` and ``1/T``, time-shifted by ``shift`` unless the shift is dynamic), the
    table is ``linspace`` between them (float64), time-shifted again, by ``shift`` (so the low end is shifted
    twice, as diffusers' scheduler does) or with ``mu`` (Flux's resolution, :func:`exponential_time_shift`),
    then rounded to float32 and times ``T``. Its scheduler configurations for the families sdcore trains
    have no terminal stretch and no Karras/exponential/beta spacing, so nothing else applies."""
    import torch

    if kind == "linear_table":
        return torch.linspace(float(num_timesteps), 1.0, num_timesteps)
    if kind != "shift_table":
        raise ValueError(f"{kind!r} is not one of ai-toolkit's timestep tables")
    ends = torch.tensor([num_timesteps, 1], dtype=torch.float32) / num_timesteps
    if mu is None:
        ends = time_shift(ends, shift)
    high, low = (float(end) * num_timesteps for end in ends)
    sigmas = torch.linspace(high, low, num_timesteps, dtype=torch.float64) / num_timesteps
    sigmas = time_shift(sigmas, shift) if mu is None else exponential_time_shift(sigmas, mu)
    return sigmas.float() * num_timesteps


def aitoolkit_lognorm_blend_table(generator: torch.Generator | None = None, num_timesteps: int = 1000) -> torch.Tensor:
    """ai-toolkit's ``lognorm_blend`` table (``set_train_timesteps``), drawn from ``generator``: 3/4 of it
    log-normal draws ``x = exp(0.333 N(0, 1))`` mapped to ``1000 (1 - x / max x)`` (so the largest draw is 0),
    1/4 ``linspace(1000, 1)``, sorted from the noisiest down and truncated to integers (int32). ai-toolkit
    builds one per step for the whole batch; sdcore builds one per sample from its generator (the same
    distribution for each sample, without the batch sharing a table)."""
    import torch

    blend = 0.75
    draws = torch.exp(0.333 * torch.randn(int(num_timesteps * blend), generator=generator))
    logs = (1 - draws / draws.max()) * 1000
    linear = torch.linspace(1000, 1, int(num_timesteps * (1 - blend)))
    return torch.sort(torch.cat((logs, linear)), descending=True).values.to(torch.int)


def aitoolkit_sigmoid_table(generator: torch.Generator | None = None, num_timesteps: int = 1000) -> torch.Tensor:
    """ai-toolkit's ``sigmoid`` table (``set_train_timesteps``), drawn from ``generator``: ``num_timesteps`` values
    ``1000 (1 - sigmoid(N(0, 1)))`` sorted from the noisiest down (float32). ai-toolkit builds one per step for the
    whole batch and picks an index of it; sdcore builds one per sample from its generator.

    Why a table and not sdcore's continuous ``sigmoid`` sampling (``sigmoid(N(0, 1))``, the same law for one
    value, as ``1 - sigmoid(x) = sigmoid(-x)``): the index picks an order statistic. Over the default index range
    ``[0, 999)`` the draw is a uniform mixture of all order statistics but the least noisy, so its CDF is
    ``(1000 F - 1 + (1 - F)^1000) / 999``, within ``1/999`` of the continuous ``F`` (no test of practical size
    tells them apart); a narrower range (``min/max_denoising_steps``) keeps a quantile band of each table, which
    the continuous sampling cannot express."""
    import torch

    values = (1.0 - torch.sigmoid(torch.randn(num_timesteps, generator=generator))) * 1000
    return torch.sort(values, descending=True).values


@functools.lru_cache(maxsize=64)
def _cached_table(kind: str, shift: float, mu: float | None, num_timesteps: int) -> torch.Tensor:
    return aitoolkit_timestep_table(kind, shift, mu, num_timesteps)


#: ai-toolkit's flow-matching samplings (an index of :func:`aitoolkit_timestep_table` or, drawn anew each
#: time, :func:`aitoolkit_lognorm_blend_table` / :func:`aitoolkit_sigmoid_table`)
TABLE_SAMPLINGS = ("linear_table", "shift_table", "lognorm_blend_table", "sigmoid_table")
#: the tables drawn anew for each sample
DRAWN_TABLES = {"lognorm_blend_table": aitoolkit_lognorm_blend_table, "sigmoid_table": aitoolkit_sigmoid_table}
#: the index range ai-toolkit draws from by default: ``randint(0, 999)`` (its min/max_denoising_steps 0 and 999)
DEFAULT_TABLE_RANGE = (0, 999)


def density_draw(
    scheme: str,
    count: int,
    generator: torch.Generator | None,
    *,
    logit_mean: float,
    logit_std: float,
    mode_scale: float,
) -> torch.Tensor:
    """kohya's ``compute_density_for_timestep_sampling``: ``u`` in [0, 1] from the logit-normal
    (sigmoid of N(mean, std)) or the mode density, uniform for every other scheme."""
    import torch

    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn((count,), generator=generator) * logit_std + logit_mean)
    if scheme == "mode":
        return mode_sigmas(torch.rand((count,), generator=generator), mode_scale)
    return torch.rand((count,), generator=generator)


def scheduler_table_sigmas(u: torch.Tensor, shift: float, num_timesteps: int = 1000) -> torch.Tensor:
    """kohya Flux's ``sigma`` sampling: ``u`` picks index ``i = floor(u * T)`` of the flow-matching
    Euler scheduler's training table, whose sigmas run from 1 down to 1/T, time-shifted by ``shift``:
    ``sigma_i = shift((T - i) / T)`` (float32, as the scheduler builds it). ``u`` = 1 (a logit-normal
    draw that rounds to 1, or the mode density's end) takes the last index rather than failing."""

    index = (u * num_timesteps).long().clamp(0, num_timesteps - 1)
    return time_shift((num_timesteps - index).float() / num_timesteps, shift)


def flow_loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """kohya's ``compute_loss_weighting_for_sd3``: ``sigma_sqrt`` 1/sigma^2, ``cosmap``
    2 / (pi (1 - 2s + 2s^2)); None (weight 1) for the density schemes."""
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    return None


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
    #: how the output is read (:meth:`model_output`) and which loss weight applies (kohya's names)
    model_prediction_type: str = "raw"
    weighting_scheme: str = "uniform"
    #: OneTrainer's timestep distribution (--timestep-distribution; it shifts by its own shift) instead of
    #: ``timestep_sampling``; None: ``timestep_sampling``
    distribution: TimestepDistribution | None = None
    #: shift ``distribution`` and ``shift_table`` by the latents' resolution (Flux's ``exp(mu)``) instead
    dynamic_shift: bool = False
    #: ai-toolkit's tables: the index is drawn uniformly from ``[min_table_index, max_table_index)``
    min_table_index: int = DEFAULT_TABLE_RANGE[0]
    max_table_index: int = DEFAULT_TABLE_RANGE[1]

    name = "flow-matching"

    def __post_init__(self) -> None:
        problems = flow_option_problems(
            self.timestep_sampling, self.shift, self.logit_std, self.mode_scale, self.sigmoid_scale
        )
        problems += flow_reading_problems(self.model_prediction_type, self.weighting_scheme)
        for problem in (
            timestep_range_problem(self.min_timestep, self.max_timestep, self.num_timesteps),
            table_range_problem(self.min_table_index, self.max_table_index, self.num_timesteps),
        ):
            if problem:
                problems.append(problem)
        if problems:
            raise ConfigError("; ".join(problems))

    def table_index(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        """ai-toolkit's ``randint(min_denoising_steps, max_denoising_steps)``: ``count`` table indices."""
        import torch

        return torch.randint(self.min_table_index, self.max_table_index, (count,), generator=generator)

    def sample_sigmas(
        self, count: int, generator: torch.Generator | None = None, latent_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """``count`` sigmas in [0, 1] with this sampling and shift (float32, CPU); ``latent_size``
        (height, width of the latents) is what ``flux_shift`` shifts by (needed for it only)."""
        import torch

        def density(scheme: str) -> torch.Tensor:
            return density_draw(scheme, count, generator, logit_mean=self.logit_mean,
                                logit_std=self.logit_std, mode_scale=self.mode_scale)  # fmt: skip

        def resolution_mu() -> float:
            if latent_size is None:
                raise ConfigError("a resolution-dependent timestep shift needs the latents' size")
            return flux_shift_mu(*latent_size)

        if self.distribution is not None:  # OneTrainer's integer draw, sigma = (t + 1) / T
            shift = math.exp(resolution_mu()) if self.dynamic_shift else None
            return self.distribution.sigmas(generator, count, shift)
        kind = self.timestep_sampling
        if kind in DRAWN_TABLES:  # a fresh table per sample, then the index as below
            picks = []
            for _ in range(count):
                drawn = DRAWN_TABLES[kind](generator, self.num_timesteps)
                picks.append(drawn[self.table_index(1, generator)])
            return torch.cat(picks).float() / self.num_timesteps
        if kind in TABLE_SAMPLINGS:  # ai-toolkit: randint(min, max) picks an entry (by default of the first T - 1)
            mu = resolution_mu() if self.dynamic_shift and kind == "shift_table" else None
            table = _cached_table(kind, float(self.shift), mu, self.num_timesteps)
            return table[self.table_index(count, generator)] / self.num_timesteps
        if kind == "sigma":  # kohya Flux's default: --discrete_flow_shift through the scheduler's table
            return scheduler_table_sigmas(density(self.weighting_scheme), self.shift, self.num_timesteps)
        if kind in ("sigmoid", "flux_shift"):  # kohya's flux sampling, sigmoid(scale * N(0, 1))
            sigmas = torch.sigmoid(self.sigmoid_scale * torch.randn((count,), generator=generator))
            if kind == "flux_shift":  # Flux's mu instead of --discrete_flow_shift
                if latent_size is None:
                    raise ConfigError("the flux_shift timestep sampling needs the latents' size")
                return exponential_time_shift(sigmas, flux_shift_mu(*latent_size))
        else:  # uniform, logit_normal (SD3's default "lognorm(0, 1)"), mode: the densities kohya's SD3 draws from
            sigmas = density(kind)
        return time_shift(sigmas, self.shift).clamp(0.0, 1.0)

    def draw(
        self,
        keys: Sequence[int],
        shape: Sequence[int],
        settings: NoiseSettings,
        latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        size = (int(shape[-2]), int(shape[-1]))
        noise, sigmas, perturbed = draw_noise(
            keys, shape, settings, lambda gen: self.sample_sigmas(1, gen, size), latents
        )
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
        # kohya's SD3 script compares a clean-latent estimate with the latents; its Flux script keeps
        # the velocity target for every prediction type (sigma_scaled included)
        target = latents if self.model_prediction_type == "x0" else noise - latents
        weights = None
        if self.model_prediction_type in ("sigma_scaled", "x0"):  # kohya weighs only these
            weights = flow_loss_weights(self.weighting_scheme, sigmas)
        return Noised(noisy, sigmas * self.num_timesteps, target, weights)

    def model_output(self, output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """kohya's ``apply_model_prediction_type``: ``raw`` the output, ``additive`` output + noisy
        input, ``sigma_scaled``/``x0`` noisy input - sigma * output (SD3's preconditioning: with a
        velocity output this is the clean-latent estimate)."""
        kind = self.model_prediction_type
        if kind == "raw":
            return output
        if kind == "additive":
            return output + noisy
        sigmas = (timesteps.float() / self.num_timesteps).to(output.device)
        s = sigmas.reshape(-1, *([1] * (output.ndim - 1))).to(output.dtype)
        return noisy - s * output


def flow_option_problems(
    timestep_sampling: str, shift: float | None, logit_std: float, mode_scale: float, sigmoid_scale: float
) -> list[str]:
    """What is wrong with the flow-matching options (one line each; empty when all is well); ``shift`` None:
    not given (the family's)."""
    problems = []
    if timestep_sampling not in TIMESTEP_SAMPLINGS:
        problems.append(f"--timestep-sampling {timestep_sampling!r}: choose one of {', '.join(TIMESTEP_SAMPLINGS)}")
    if shift is not None and not shift > 0:
        problems.append(f"--discrete-flow-shift must be positive (1 = no shift), got {shift}")
    if not logit_std > 0:
        problems.append(f"--logit-std must be positive, got {logit_std}")
    low, high = MODE_SCALE_RANGE
    if not low <= mode_scale <= high:
        problems.append(f"--mode-scale must be between {low:g} and {high:.4f} (SD3 paper), got {mode_scale}")
    if not sigmoid_scale > 0:
        problems.append(f"--sigmoid-scale must be positive, got {sigmoid_scale}")
    return problems


def flow_reading_problems(model_prediction_type: str, weighting_scheme: str) -> list[str]:
    """What is wrong with ``--model-prediction-type`` / ``--weighting-scheme`` (empty when all is well)."""
    from .options import MODEL_PREDICTION_TYPES, WEIGHTING_SCHEMES

    problems = []
    if model_prediction_type not in MODEL_PREDICTION_TYPES:
        problems.append(
            f"--model-prediction-type {model_prediction_type!r}: choose one of {', '.join(MODEL_PREDICTION_TYPES)}"
        )
    if weighting_scheme not in WEIGHTING_SCHEMES:
        problems.append(f"--weighting-scheme {weighting_scheme!r}: choose one of {', '.join(WEIGHTING_SCHEMES)}")
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


def table_range_problem(min_index: int, max_index: int, num_timesteps: int) -> str | None:
    """The table index range must satisfy ``0 <= min < max <= T``; one line saying what is wrong, else None."""
    if not 0 <= min_index < max_index <= num_timesteps:
        return (
            f"--min-table-index {min_index} / --max-table-index {max_index}: need 0 <= min < max <= {num_timesteps} "
            "(the index of ai-toolkit's timestep table is drawn uniformly in [min, max))"
        )
    return None


def timestep_distribution(options: TrainOptions, num_timesteps: int, shift: float) -> TimestepDistribution | None:
    """The run's ``--timestep-distribution`` over ``num_timesteps`` steps with ``shift`` (None when not given)."""
    if options.timestep_distribution is None:
        return None
    from .timestep_distributions import TimestepDistribution

    return TimestepDistribution(
        options.timestep_distribution,
        weight=options.noising_weight,
        bias=options.noising_bias,
        min_strength=options.min_noising_strength,
        max_strength=options.max_noising_strength,
        shift=shift,
        num_timesteps=num_timesteps,
    )


def flow_shift(options: Any, family: str | ModelFamily) -> float:
    """The run's flow-matching time shift: ``--discrete-flow-shift`` when given, else the family's declared
    ``flow_shift`` (1.0, no shift, for SD3, Flux and Chroma; a plugin family may declare its scheduler's, as
    AuraFlow's 1.73)."""
    given = getattr(options, "discrete_flow_shift", None)
    if given is not None:
        return float(given)
    from ..models.family import get_family

    return get_family(family).flow_shift


#: the guidance a FLUX.1 dev run trains at without --guidance-scale: 1.0, as kohya's examples
DEFAULT_TRAINING_GUIDANCE = 1.0
#: the same for a control-LoRA run (``control``): diffusers' train_control_lora_flux.py's --guidance_scale default,
#: which it trains and validates at (a diffusers user's run without the option gets what the script gives)
CONTROL_TRAINING_GUIDANCE = 30.0


def training_guidance(options: Any, *, control: bool = False) -> float:
    """The guidance a run's guidance embedding gets while training (and a control-LoRA run's samples where a line
    gives no ``--g`` and ``--sample-cfg`` is unset): ``--guidance-scale`` when given (a kohya-named FLUX.1 config
    gets kohya's 3.5 unless it trains a control LoRA; an ai-toolkit job always gives it), else
    :data:`CONTROL_TRAINING_GUIDANCE` on a control-LoRA run (the method's
    :attr:`~sdcore.train.method.Capabilities.control_channels`), else :data:`DEFAULT_TRAINING_GUIDANCE`. One
    resolution for the step, the samples, the held-out loss and the file's ``ss_guidance_scale``."""
    given = getattr(options, "guidance_scale", None)
    if given is not None:
        return float(given)
    return CONTROL_TRAINING_GUIDANCE if control else DEFAULT_TRAINING_GUIDANCE


def objective_for(bundle: ModelBundle, options: TrainOptions) -> TrainingObjective:
    """The objective of ``bundle``'s family, configured from the run's options."""
    objective = bundle.family_spec.objective
    shift = options.timestep_shift  # --timestep-distribution's (OneTrainer's timestep_shift on every family)
    if objective == "ddpm":
        scheduler = bundle.noise_scheduler
        steps = int(scheduler.config["num_train_timesteps"])
        return DdpmObjective(
            scheduler,
            min_snr_gamma=options.min_snr_gamma,
            min_timestep=options.min_timestep,
            max_timestep=options.max_timestep,
            zero_terminal_snr=options.zero_terminal_snr,
            distribution=timestep_distribution(options, steps, 1.0 if shift is None else shift),
        )
    if objective == "flow-matching":
        flow = flow_shift(options, bundle.family_spec)
        return FlowMatchingObjective(
            timestep_sampling=options.timestep_sampling,
            shift=flow,
            logit_mean=options.logit_mean,
            logit_std=options.logit_std,
            mode_scale=options.mode_scale,
            sigmoid_scale=options.sigmoid_scale,
            min_timestep=options.min_timestep,
            max_timestep=options.max_timestep,
            model_prediction_type=options.model_prediction_type,
            weighting_scheme=options.weighting_scheme,
            distribution=timestep_distribution(options, 1000, flow if shift is None else shift),
            dynamic_shift=options.dynamic_timestep_shift,
            min_table_index=options.min_table_index,
            max_table_index=options.max_table_index,
        )
    raise ConfigError(f"model family {bundle.family!r} has an objective sdcore does not know: {objective!r}")


__all__ = [
    "CONTROL_TRAINING_GUIDANCE",
    "DEFAULT_TABLE_RANGE",
    "DEFAULT_TRAINING_GUIDANCE",
    "DRAWN_TABLES",
    "TABLE_SAMPLINGS",
    "TIMESTEP_SAMPLINGS",
    "DdpmObjective",
    "FlowMatchingObjective",
    "Noised",
    "TrainingObjective",
    "aitoolkit_lognorm_blend_table",
    "aitoolkit_sigmoid_table",
    "aitoolkit_timestep_table",
    "density_draw",
    "exponential_time_shift",
    "flow_loss_weights",
    "flow_option_problems",
    "flow_reading_problems",
    "flow_shift",
    "flux_shift_mu",
    "mode_sigmas",
    "objective_for",
    "scheduler_table_sigmas",
    "table_range_problem",
    "time_shift",
    "timestep_distribution",
    "timestep_range_problem",
    "training_guidance",
]

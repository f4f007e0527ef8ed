"""kohya sd-scripts' loss options: the per-element loss (``--loss-type``) and the SNR-based weights
applied after the per-sample loss (``--debiased-estimation-loss``, ``--scale-v-pred-loss-like-noise-pred``,
``--v-pred-like-loss``).

Each option means what it means in kohya (``library/train_util.py`` and
``library/custom_train_functions.py``), because kohya users bring their configs:

- ``l2`` is the mean squared error (the default; the step's loss is unchanged with it), ``l1`` the
  absolute error; ``huber`` is the pseudo-Huber loss ``2 c (sqrt(d^2 + c^2) - c)`` and ``smooth_l1``
  ``2 (sqrt(d^2 + c^2) - c)`` (the pseudo-Huber divided by ``c``), with ``d = pred - target`` and a
  per-sample threshold ``c`` from the timestep:
  ``constant`` ``c = huber_c * huber_scale``; ``exponential`` ``c = huber_scale * exp(ln(huber_c) * t / T)``
  (``huber_c`` at the last timestep, ``huber_scale`` at t=0); ``snr`` ``c = (1 - huber_c) / (1 + sigma_t)^2
  + huber_c`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)`` (1 at t=0, towards ``huber_c`` as noise grows;
  kohya leaves ``huber_scale`` out of this one, and so do we).
  On flow-matching families (SD3, Flux) kohya passes ``t = sigma * 1000`` (its timesteps), so
  ``exponential`` is ``huber_scale * huber_c ** sigma``; ``snr`` needs a DDPM schedule and kohya stops
  there, so the pre-flight refuses it.
- After the per-sample loss and its per-sample weights, kohya's ``post_process_loss`` multiplies, in
  this order: min-SNR (sdcore's objective weights), ``scale_v_pred_loss_like_noise_pred``
  (``snr / (snr + 1)``), ``v_pred_like_loss`` (``loss + loss / (snr / (snr + 1)) * v``) and
  ``debiased_estimation_loss`` (``1 / sqrt(snr)``, ``1 / (snr + 1)`` for v-prediction), where those
  three clamp the SNR at 1000 (t=0 would give infinity). kohya's SD3/Flux scripts skip them all
  (their ``post_process_loss`` returns the loss unchanged), so sdcore refuses them there instead of
  silently doing nothing.

OneTrainer's losses (``modules/modelSetup/mixin/ModelSetupDiffusionLossMixin.py``), because OneTrainer
users bring their configs too:

- ``--loss-type mix`` is OneTrainer's sum ``mse_strength * MSE + mae_strength * MAE + log_cosh_strength *
  log-cosh + huber_strength * Huber``, each term the per-sample mean of its per-element loss in float32
  (after the mask when masked), with log-cosh ``d + softplus(-2 d) - ln 2`` and torch's true Huber
  ``d^2 / 2`` for ``|d| <= huber_delta``, ``delta (|d| - delta / 2)`` above (not kohya's pseudo-Huber).
  The per-sample mean and the mask are linear, so sdcore sums the weighted per-element losses first and
  reduces once. A separate loss type rather than strengths beside ``--loss-type`` keeps a kohya user's
  ``--loss-type huber`` meaning kohya's pseudo-Huber, and the strengths take OneTrainer's defaults
  (MSE 1, the rest 0).
- OneTrainer multiplies the per-sample loss by the concept's loss weight and then by one timestep weight
  (``loss_weight_fn``); all are products, so the order is the value's. ``--p2-loss-gamma`` is its ``P2``
  ``(1 + snr')^-gamma`` with ``snr' = snr + 1`` on v-prediction (unclamped; the SNR of the schedule the input
  is noised with, zero-terminal when asked, as OneTrainer rescales its scheduler); ``--debiased-estimation-sqrt``
  its ``DEBIASED_ESTIMATION`` on v-prediction, ``1 / sqrt(min(snr, 1000) + 1)`` on that same schedule (on
  epsilon it is kohya's ``1 / sqrt(min(snr, 1000))``, on kohya's schedule); ``--sigma-loss-weight`` its flow-matching ``SIGMA``: the noise level
  ``sigma`` of the sample (OneTrainer's ``(t + 1) / T``, the sigma the input was noised with).

ai-toolkit's loss weight per timestep (``--timestep-loss-weight``; its ``linear_timesteps``/``linear_timesteps2``
and ``timestep_type: weighted``, ``toolkit/samplers/custom_flowmatch_sampler.py`` and ``SDTrainer``): a per-sample
factor on the flow-matching loss, a function of the noise level (:func:`bell_timestep_weights`, or the measured
table of :func:`weighted_table_timestep_weights`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from ..errors import SdcoreError

if TYPE_CHECKING:
    import torch

    from .method import TrainingMethod
    from .objectives import TrainingObjective
    from .options import TrainOptions

#: kohya's --loss_type values
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
#: OneTrainer's sum of losses (--loss-type mix with the --*-strength options)
MIX_LOSS_TYPE = "mix"
#: every --loss-type sdcore trains with: kohya's and OneTrainer's sum
SDCORE_LOSS_TYPES = (*LOSS_TYPES, MIX_LOSS_TYPE)
#: the strengths of --loss-type mix (OneTrainer's field names)
MIX_STRENGTHS = ("mse_strength", "mae_strength", "log_cosh_strength", "huber_strength")
_MIX_OPTIONS = (*MIX_STRENGTHS, "huber_delta")
#: kohya's --huber_schedule values (its default: snr)
HUBER_SCHEDULES = ("constant", "exponential", "snr")
#: loss types that use the Huber threshold (and so --huber-schedule/--huber-c/--huber-scale)
HUBER_LOSS_TYPES = ("huber", "smooth_l1")
#: kohya clamps the SNR here in its debiased/v-pred-like scales (t=0 has an SNR near infinity)
SNR_CLAMP = 1000.0
#: the options of this module that only a DDPM schedule gives a meaning to
_DDPM_WEIGHT_OPTIONS = ("scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "debiased_estimation_loss")
_HUBER_OPTIONS = ("huber_schedule", "huber_c", "huber_scale")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def huber_threshold(
    schedule: str,
    huber_c: float,
    huber_scale: float,
    timesteps: torch.Tensor,
    *,
    num_timesteps: int,
    scheduler: Any = None,
) -> torch.Tensor:
    """kohya's ``get_huber_threshold_if_needed``: the per-sample threshold ``[B]`` (float32).

    ``timesteps`` are what the denoiser is called with (DDPM: integers in ``[0, T)``; flow matching:
    ``sigma * 1000``). ``scheduler`` (a DDPM scheduler with ``alphas_cumprod``) is needed for ``snr``.
    """
    import torch

    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c * huber_scale)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_timesteps
        return torch.exp(-alpha * t) * huber_scale
    if schedule == "snr":
        if scheduler is None or not hasattr(scheduler, "alphas_cumprod"):
            raise SdcoreError("--huber-schedule snr needs a DDPM noise schedule (SD1/SD2/SDXL)")
        alphas = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
        sigmas = ((1.0 - alphas) / alphas) ** 0.5
        return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    raise SdcoreError(f"--huber-schedule {schedule!r}: choose one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str, threshold: torch.Tensor | None = None
) -> torch.Tensor:
    """kohya's ``conditional_loss(..., reduction="none")``: the loss of every element.

    ``threshold`` is the per-sample Huber ``c`` ``[B]`` (from :func:`huber_threshold`), needed by
    ``huber`` and ``smooth_l1``.
    """
    import torch

    if loss_type == "l2":
        return torch.nn.functional.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return torch.nn.functional.l1_loss(pred, target, reduction="none")
    if loss_type in HUBER_LOSS_TYPES:
        if threshold is None:
            raise SdcoreError(f"--loss-type {loss_type} needs the Huber threshold")
        c = threshold.to(pred.device, pred.dtype).view(-1, *([1] * (pred.ndim - 1)))
        soft = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2 * c * soft if loss_type == "huber" else 2 * soft
    raise SdcoreError(f"--loss-type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")


def log_cosh(diff: torch.Tensor) -> torch.Tensor:
    """``log(cosh(d))`` as OneTrainer writes it, ``d + softplus(-2 d) - ln 2`` (no overflow for large ``|d|``)."""
    import torch

    return diff + torch.nn.functional.softplus(-2.0 * diff) - math.log(2.0)


def mixed_loss(pred: torch.Tensor, target: torch.Tensor, strengths: dict[str, float], delta: float) -> torch.Tensor:
    """OneTrainer's sum of per-element losses in float32 (``strengths``: :data:`MIX_STRENGTHS` -> weight;
    zero strengths are left out as OneTrainer leaves them out)."""
    import torch
    import torch.nn.functional as F

    pred, target = pred.float(), target.float()
    total = torch.zeros_like(pred)
    if strengths.get("mse_strength"):
        total = total + F.mse_loss(pred, target, reduction="none") * strengths["mse_strength"]
    if strengths.get("mae_strength"):
        total = total + F.l1_loss(pred, target, reduction="none") * strengths["mae_strength"]
    if strengths.get("log_cosh_strength"):
        total = total + log_cosh(pred - target) * strengths["log_cosh_strength"]
    if strengths.get("huber_strength"):
        total = total + F.huber_loss(pred, target, reduction="none", delta=delta) * strengths["huber_strength"]
    return total


def _ddpm_scheduler(objective: TrainingObjective) -> Any:
    """The model's DDPM schedule (the SNR weights read it, as kohya's ``all_snr`` is computed before
    ``--zero-terminal-snr`` fixes the betas); None for flow matching."""
    from .objectives import DdpmObjective

    return objective.scheduler if isinstance(objective, DdpmObjective) else None


def _noising_scheduler(objective: TrainingObjective) -> Any:
    """The schedule the noisy input is made with: the zero-terminal-SNR one when asked. kohya's Huber
    ``snr`` threshold reads ``noise_scheduler.alphas_cumprod`` after the betas were fixed, so it
    follows this one (at the last step its sigma is infinite and the threshold is ``huber_c``)."""
    from .objectives import DdpmObjective

    return objective.noising if isinstance(objective, DdpmObjective) else None


def step_loss(
    options: TrainOptions,
    objective: TrainingObjective,
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """The run's per-element loss between ``pred`` and ``target`` at the denoiser's ``timesteps``."""
    if options.loss_type == MIX_LOSS_TYPE:
        strengths = {name: float(getattr(options, name)) for name in MIX_STRENGTHS}
        return mixed_loss(pred, target, strengths, float(options.huber_delta))
    threshold = None
    if options.loss_type in HUBER_LOSS_TYPES:
        threshold = huber_threshold(
            options.huber_schedule,
            options.huber_c,
            options.huber_scale,
            timesteps,
            num_timesteps=int(getattr(objective, "num_timesteps", 1000)),
            scheduler=_noising_scheduler(objective),
        )
    return elementwise_loss(pred, target, options.loss_type, threshold)


def _clamped_snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    import torch

    from .noise import snr

    ratio = snr(scheduler, timesteps.long())
    return torch.minimum(ratio, torch.full_like(ratio, SNR_CLAMP))


def post_process_loss(
    loss: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: Any,
    *,
    scale_v_pred_loss_like_noise_pred: bool = False,
    v_pred_like_loss: float = 0.0,
    debiased_estimation_loss: bool = False,
    debiased_estimation_sqrt: bool = False,
    p2_loss_gamma: float | None = None,
    onetrainer_scheduler: Any = None,
) -> torch.Tensor:
    """kohya's weights after min-SNR, in kohya's order, on the per-sample loss ``[B]``, then OneTrainer's
    P2 (``debiased_estimation_sqrt``: OneTrainer's v-prediction debiased weight instead of kohya's).
    ``onetrainer_scheduler``: the schedule OneTrainer's own weights (P2, the ``debiased_estimation_sqrt``
    one) read their SNR from (default ``scheduler``); OneTrainer's is the noising one, rescaled when zero
    terminal SNR is on (it rescales the model's scheduler itself). kohya's weights read ``scheduler``:
    kohya takes its SNR table before fixing the betas."""
    if not (scale_v_pred_loss_like_noise_pred or v_pred_like_loss or debiased_estimation_loss or p2_loss_gamma):
        return loss
    import torch

    ratio = _clamped_snr(scheduler, timesteps).to(loss.device)
    scale = ratio / (ratio + 1.0)  # kohya's get_snr_scale
    if scale_v_pred_loss_like_noise_pred:
        loss = loss * scale
    if v_pred_like_loss:
        loss = loss + loss / scale * v_pred_like_loss
    v_pred = scheduler.config.prediction_type == "v_prediction"
    onetrainer = onetrainer_scheduler or scheduler
    if debiased_estimation_loss:
        if v_pred and debiased_estimation_sqrt:  # OneTrainer's, clamped as its own, on its schedule
            loss = loss * torch.rsqrt(_clamped_snr(onetrainer, timesteps).to(loss.device) + 1.0)
        elif v_pred:
            loss = loss * (1.0 / (ratio + 1.0))
        else:
            loss = loss * (1.0 / torch.sqrt(ratio))
    if p2_loss_gamma:
        from .noise import snr

        full = snr(onetrainer, timesteps.long()).to(loss.device)  # OneTrainer does not clamp it
        if v_pred:
            full = full + 1.0
        loss = loss * (1.0 + full) ** -float(p2_loss_gamma)
    return loss


def apply_loss_weights(
    options: TrainOptions, objective: TrainingObjective, loss: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The per-sample loss ``[B]`` after the run's kohya weights (unchanged when they are off)."""
    scheduler = _ddpm_scheduler(objective)
    if scheduler is None:  # flow matching: the pre-flight refused the SNR weights (kohya's SD3/Flux skip them)
        total = float(getattr(objective, "num_timesteps", 1000))
        if options.sigma_loss_weight:  # OneTrainer's SIGMA: the sample's noise level
            loss = loss * (timesteps.float().to(loss.device) / total)
        if options.timestep_loss_weight != "none":  # ai-toolkit's linear_timesteps(2), weighted
            sigmas = timesteps.float() / total
            loss = loss * timestep_loss_weights(options.timestep_loss_weight, sigmas).to(loss.device)
        return loss
    return post_process_loss(
        loss,
        timesteps,
        scheduler,
        scale_v_pred_loss_like_noise_pred=options.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=options.v_pred_like_loss,
        debiased_estimation_loss=options.debiased_estimation_loss,
        debiased_estimation_sqrt=options.debiased_estimation_sqrt,
        p2_loss_gamma=options.p2_loss_gamma,
        onetrainer_scheduler=_noising_scheduler(objective),
    )


#: ``--timestep-loss-weight`` choices: none, ai-toolkit's bell (linear_timesteps), half bell (linear_timesteps2) and
#: measured table (timestep_type weighted)
TIMESTEP_LOSS_WEIGHTS = ("none", "bell", "half_bell", "weighted_table")
#: ai-toolkit's measured weights (``weighted``), shipped as package data with its MIT notice
WEIGHTED_TABLE_FILE = "aitoolkit_data/timestep_weights.txt"


def timestep_loss_weights(kind: str, sigmas: torch.Tensor) -> torch.Tensor:
    """``--timestep-loss-weight kind`` (not ``none``) at the flow-matching noise levels ``sigmas`` (float32)."""
    if kind == "weighted_table":
        return weighted_table_timestep_weights(sigmas)
    return bell_timestep_weights(sigmas, kind == "half_bell")


def bell_timestep_weights(sigmas: torch.Tensor, half: bool = False, num_timesteps: int = 1000) -> torch.Tensor:
    """ai-toolkit's "bell-shaped mean-normalized timestep weighting" for flow-matching noise levels ``sigmas``
    (float32, the shape of ``sigmas``).

    ai-toolkit builds it on its linear table ``linspace(1000, 1, T)``, whose index ``i`` is the timestep
    ``T - i``: ``y_i = exp(-2 ((i - T/2) / T)^2)``, minus its lowest value (at ``i = 0``: ``exp(-1/2)``), scaled
    so that the ``T`` values have mean 1; the half bell (``linear_timesteps2``) keeps the first half and holds
    ``i >= T/2`` at the second half's largest value (the peak, ``i = T/2``). With ``sigma = (T - i) / T``,
    ``(i - T/2) / T = 1/2 - sigma``, so the weight is the same bell in ``sigma`` for every sigma (the table's
    points give ai-toolkit's values); the half bell holds ``sigma <= 1/2`` at the peak. ai-toolkit multiplies
    the per-element loss of each sample by its weight before the mean, which is the per-sample mean times it."""
    import torch

    index = torch.arange(num_timesteps, dtype=torch.float64)
    table = torch.exp(-2.0 * ((index - num_timesteps / 2) / num_timesteps) ** 2)
    low, total = float(table.min()), float((table - table.min()).sum())
    s = sigmas.double()
    if half:
        s = torch.clamp(s, min=0.5)
    weights = (torch.exp(-2.0 * (s - 0.5) ** 2) - low) * (num_timesteps / total)
    return weights.float()


@functools.cache
def weighted_table() -> tuple[float, ...]:
    """ai-toolkit's ``default_weighing_scheme`` (``toolkit/timestep_weighing/default_weighing_scheme.py``): 1000 loss
    weights its comment says were measured on Flex.1-alpha; weight ``i`` belongs to entry ``i`` (timestep
    ``1000 - i``) of its linear table ``linspace(1000, 1, 1000)``. Data, not a formula, so it ships as a package file (with ai-toolkit's MIT notice
    beside it) read on first use rather than at import."""
    from importlib import resources

    text = resources.files("sdcore.train").joinpath(WEIGHTED_TABLE_FILE).read_text(encoding="utf-8")
    values = tuple(float(line) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    if len(values) != 1000:
        raise SdcoreError(f"sdcore's {WEIGHTED_TABLE_FILE} has {len(values)} weights, not 1000: reinstall sdcore")
    return values


def weighted_table_timestep_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """ai-toolkit's ``weighted`` loss weight (``get_weights_for_timesteps(..., timestep_type="weighted")``): the
    measured table's entry at the index of the sample's timestep in the linear table ``linspace(1000, 1, 1000)``,
    i.e. ``i = 1000 - 1000 sigma``. ai-toolkit only draws from that table with ``weighted``, so ``i`` is the drawn
    index (``--timestep-sampling linear_table``); another sampling takes the nearest entry, ``round(1000 (1 -
    sigma))`` held to [0, 999] (sigma near 0 takes the last, least noisy, entry). Multiplied into the per-sample
    loss, as ai-toolkit multiplies each sample's per-element loss before the mean (float32, shape of ``sigmas``)."""
    import torch

    table = torch.tensor(weighted_table(), dtype=torch.float32)
    size = table.numel()
    index = torch.round((1.0 - sigmas.detach().double().cpu()) * size).long().clamp(0, size - 1)
    return table[index].to(sigmas.device)


def loss_option_problems(options: TrainOptions) -> list[str]:
    """Bad values of the loss options, one line each (family-independent)."""
    o = options
    problems: list[str] = []
    if o.loss_type not in SDCORE_LOSS_TYPES:
        problems.append(f"--loss-type {o.loss_type!r}: choose one of {', '.join(SDCORE_LOSS_TYPES)}")
    if o.loss_type == MIX_LOSS_TYPE:
        bad = [f"{_flag(n)} {getattr(o, n)}" for n in MIX_STRENGTHS if not (math.isfinite(getattr(o, n)) and
                                                                            getattr(o, n) >= 0)]  # fmt: skip
        if bad:
            problems.append(f"{', '.join(bad)}: the strengths of --loss-type mix must be 0 (off) or positive")
        elif not any(getattr(o, n) for n in MIX_STRENGTHS):
            problems.append(f"--loss-type mix with every strength 0 ({', '.join(map(_flag, MIX_STRENGTHS))}): "
                            "nothing to train; give one a positive weight")  # fmt: skip
        if o.huber_strength and not (math.isfinite(o.huber_delta) and o.huber_delta > 0):
            problems.append(f"--huber-delta must be positive (OneTrainer's default 1.0), got {o.huber_delta}")
    if o.p2_loss_gamma is not None and not (math.isfinite(o.p2_loss_gamma) and o.p2_loss_gamma > 0):
        problems.append(f"--p2-loss-gamma must be positive (OneTrainer's loss_weight_strength), got {o.p2_loss_gamma}")
    if o.debiased_estimation_sqrt and not o.debiased_estimation_loss:
        problems.append("--debiased-estimation-sqrt changes --debiased-estimation-loss's weight: it needs it")
    if o.timestep_loss_weight not in TIMESTEP_LOSS_WEIGHTS:
        problems.append(
            f"--timestep-loss-weight {o.timestep_loss_weight!r}: choose one of {', '.join(TIMESTEP_LOSS_WEIGHTS)}"
        )
    if o.huber_schedule not in HUBER_SCHEDULES:
        problems.append(f"--huber-schedule {o.huber_schedule!r}: choose one of {', '.join(HUBER_SCHEDULES)}")
    if o.loss_type in HUBER_LOSS_TYPES:
        if not (math.isfinite(o.huber_c) and o.huber_c > 0):
            problems.append(f"--huber-c must be positive (kohya's default 0.1), got {o.huber_c}")
        if not (math.isfinite(o.huber_scale) and o.huber_scale > 0):
            problems.append(f"--huber-scale must be positive (kohya's default 1.0), got {o.huber_scale}")
    weight = o.masked_loss_unmasked_weight
    if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
        problems.append(f"--masked-loss-unmasked-weight must be in [0, 1] (0: kohya's mask as it is), got {weight}")
    chance = o.masked_loss_probability
    if not (math.isfinite(chance) and 0.0 <= chance <= 1.0):
        problems.append(f"--masked-loss-probability must be in [0, 1] (1: every batch masked), got {chance}")
    if not (math.isfinite(o.v_pred_like_loss) and o.v_pred_like_loss >= 0):
        problems.append(f"--v-pred-like-loss must be 0 (off) or positive, got {o.v_pred_like_loss}")
    return problems


def loss_family_checks(
    options: TrainOptions, family_name: str, prediction_type: str, method: TrainingMethod[Any] | None = None
) -> tuple[list[str], list[str]]:
    """Problems and notes about loss options that do not fit the model (family, prediction type) or method."""
    from ..models.family import get_family

    o = options
    problems: list[str] = []
    notes: list[str] = []
    try:
        family = get_family(family_name)
    except SdcoreError as exc:
        return [str(exc)], []
    huber = o.loss_type in HUBER_LOSS_TYPES
    if family.objective != "ddpm":
        given = [_flag(n) for n in (*_DDPM_WEIGHT_OPTIONS, "p2_loss_gamma") if getattr(o, n)]
        if given:
            problems.append(
                f"{', '.join(given)}: SNR weights of a DDPM schedule; {family.name} trains with flow matching "
                "(kohya's SD3/Flux scripts skip them)"
            )
        table = o.timestep_distribution is None and o.timestep_sampling == "linear_table"
        if o.timestep_loss_weight == "weighted_table" and not table:
            drawn = (f"--timestep-sampling {o.timestep_sampling}" if o.timestep_distribution is None
                     else "--timestep-distribution")  # fmt: skip
            notes.append(
                f"--timestep-loss-weight weighted_table with {drawn}: ai-toolkit applies these weights with its "
                "linear table only (--timestep-sampling linear_table); sdcore weighs each sample by the entry "
                "nearest its noise level"
            )
        if huber and o.huber_schedule == "snr":
            problems.append(
                f"--loss-type {o.loss_type} with --huber-schedule snr (kohya's default) needs a DDPM schedule; "
                f"{family.name} trains with flow matching: choose --huber-schedule exponential or constant"
            )
    else:
        if o.timestep_loss_weight != "none":
            problems.append(
                f"--timestep-loss-weight {o.timestep_loss_weight}: ai-toolkit's weight of a flow-matching noise level; "
                f"{family.name} trains with DDPM (ai-toolkit weighs flowmatch only)"
            )
        if o.sigma_loss_weight:
            problems.append(
                f"--sigma-loss-weight weighs a flow-matching noise level; {family.name} trains with DDPM "
                "(OneTrainer refuses SIGMA there too)"
            )
        v_pred = prediction_type == "v_prediction"
        if o.scale_v_pred_loss_like_noise_pred and not v_pred:
            problems.append("--scale-v-pred-loss-like-noise-pred needs a v-prediction model (as in kohya)")
        if o.v_pred_like_loss and v_pred:
            problems.append("--v-pred-like-loss is for epsilon-prediction models, not v-prediction (as in kohya)")
    if not huber:
        defaults = {f.name: f.default for f in fields(type(o)) if f.name in _HUBER_OPTIONS}
        changed = [_flag(n) for n in _HUBER_OPTIONS if getattr(o, n) != defaults[n]]
        if changed:
            notes.append(f"{', '.join(changed)}: without effect with --loss-type {o.loss_type} (huber/smooth_l1 only)")
    if o.loss_type != MIX_LOSS_TYPE:
        defaults = {f.name: f.default for f in fields(type(o)) if f.name in _MIX_OPTIONS}
        changed = [_flag(n) for n in _MIX_OPTIONS if getattr(o, n) != defaults[n]]
        if changed:
            notes.append(f"{', '.join(changed)}: without effect with --loss-type {o.loss_type} (mix only)")
    if method is not None and o.loss_type != "l2":
        from .method import TrainingMethod

        if type(method).compute_loss is not TrainingMethod.compute_loss:
            problems.append(
                f"--loss-type {o.loss_type}: method {method.name!r} computes its own loss (only l2 applies to it)"
            )
    return problems, notes


__all__ = [
    "HUBER_LOSS_TYPES",
    "HUBER_SCHEDULES",
    "LOSS_TYPES",
    "MIX_LOSS_TYPE",
    "MIX_STRENGTHS",
    "SDCORE_LOSS_TYPES",
    "SNR_CLAMP",
    "TIMESTEP_LOSS_WEIGHTS",
    "WEIGHTED_TABLE_FILE",
    "apply_loss_weights",
    "bell_timestep_weights",
    "elementwise_loss",
    "huber_threshold",
    "log_cosh",
    "loss_family_checks",
    "loss_option_problems",
    "mixed_loss",
    "post_process_loss",
    "step_loss",
    "timestep_loss_weights",
    "weighted_table",
    "weighted_table_timestep_weights",
]

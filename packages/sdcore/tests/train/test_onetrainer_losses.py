"""OneTrainer's losses, loss weights and timestep distributions in sdcore (``--loss-type mix``,
``--p2-loss-gamma``, ``--sigma-loss-weight``, ``--debiased-estimation-sqrt``, ``--timestep-distribution``).

The references are rewritten here, in float64, from Nerogar/OneTrainer (mirror HEAD):
``modules/modelSetup/mixin/ModelSetupDiffusionLossMixin.py`` (``__unmasked_losses``/``__masked_losses``: a sum
of per-sample means times their strengths; ``__log_cosh_loss``; torch's ``huber_loss``; ``__p2_loss_weight``,
``__sigma_loss_weight``, ``__debiased_estimation_weight``) and ``ModelSetupNoiseMixin._get_timestep_discrete``
(the distributions). The densities are compared with what sdcore draws through a Kolmogorov-Smirnov bound.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from runtime_methods import ConvOutMethod, ProjOutMethod
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.loop import TrainSession
from sdcore.train.loss import mixed_loss, post_process_loss
from sdcore.train.noise import sample_noise
from sdcore.train.objectives import DdpmObjective, FlowMatchingObjective
from sdcore.train.preflight import option_problems
from sdcore.train.timestep_distributions import TimestepDistribution

T = 1000


# --- OneTrainer's formulas, rewritten (float64) --------------------------------------------------------------


def ref_terms(d: torch.Tensor, delta: float) -> dict[str, torch.Tensor]:
    """The per-element losses OneTrainer sums, from the difference ``d = pred - target``."""
    d = d.double()
    a = d.abs()
    return {
        "mse_strength": d**2,
        "mae_strength": a,
        "log_cosh_strength": torch.log(torch.cosh(d)),
        "huber_strength": torch.where(a <= delta, 0.5 * d**2, delta * (a - 0.5 * delta)),
    }


def ref_sample_loss(d: torch.Tensor, strengths: dict[str, float], delta: float, mask: torch.Tensor | None = None):
    """``sum_k strength_k * mean(term_k * mask)`` per sample (``__masked_losses`` with the mask already clamped)."""
    terms = ref_terms(d, delta)
    total = torch.zeros(d.shape[0], dtype=torch.float64)
    for name, strength in strengths.items():
        term = terms[name] if mask is None else terms[name] * mask.double()
        total += term.flatten(1).mean(1) * strength
    return total


def ref_snr(scheduler, t: torch.Tensor) -> torch.Tensor:
    abar = scheduler.alphas_cumprod.double()[t]
    return (abar.sqrt() / (1 - abar).sqrt()) ** 2  # DiffusionScheduleCoefficients' (sqrt(abar)/sqrt(1-abar))^2


def _sd_scheduler(prediction: str) -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction)


def ref_inverse_shift(g: torch.Tensor, s: float) -> torch.Tensor:
    return g / (s - s * g + g)


def ref_bucket_pmf(kind: str, n: int, w: float, b: float, s: float) -> torch.Tensor:
    """The discrete kinds: weights on ``linspace(0, 1, n)`` (inverse-shifted), times the inverse shift's slope."""
    g = torch.linspace(0, 1, n, dtype=torch.float64)
    r = ref_inverse_shift(g, s)
    slope = s / (s + g - g * s) ** 2
    if kind == "cos_map":
        f = 2.0 / (math.pi - 2.0 * math.pi * r + 2.0 * math.pi * r**2)
    elif kind == "sigmoid":
        f = 1 / (1 + torch.exp(-w * (ref_inverse_shift(r, s) - (b + 0.5))))
    else:
        f = torch.clamp(-w * (r - (b + 0.5)) ** 2 + 2, min=0.0)
    p = f * slope
    return p / p.sum()


def ref_unit_cdf(kind: str, x: torch.Tensor, w: float, b: float) -> torch.Tensor:
    """P(X < x) of a continuous kind's draw in [0, 1]."""
    x = x.clamp(0.0, 1.0)
    if kind == "uniform":
        return x
    if kind == "logit_normal":  # sigmoid(N(b, w + 1))
        z = (torch.logit(x.clamp(1e-12, 1 - 1e-12)) - b) / (w + 1.0)
        return 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    if kind == "heavy_tail":  # x = f(u) = 1 - u - w (cos^2(pi u / 2) - 1 + u), decreasing: P(f(u) < x) = 1 - f^-1(x)
        lo, hi = torch.zeros_like(x), torch.ones_like(x)
        for _ in range(60):
            mid = (lo + hi) / 2
            f = 1 - mid - w * (torch.cos(math.pi / 2 * mid) ** 2 - 1 + mid)
            lo, hi = torch.where(f > x, mid, lo), torch.where(f > x, hi, mid)
        return 1 - (lo + hi) / 2
    if (w, b) == (2.0, 3.0):  # Beta(2, 3): I_x(2, 3) = sum_{j=2..4} C(4, j) x^j (1 - x)^(4 - j)
        return sum(math.comb(4, j) * x**j * (1 - x) ** (4 - j) for j in range(2, 5))
    if (w, b) == (0.5, 0.5):  # the arcsine distribution: 2 / pi asin(sqrt(x))
        return 2 / math.pi * torch.asin(x.sqrt())
    assert b == 1.0  # Beta(w, 1): x^w
    return x**w


def ref_timestep_cdf(kind: str, w: float, b: float, lo_s: float, hi_s: float, s: float) -> torch.Tensor:
    """P(t <= k) for k = 0..T-1 of OneTrainer's integer timestep."""
    low, high = int(T * lo_s), int(T * hi_s)
    n = high - low
    if kind in ("cos_map", "sigmoid", "inverted_parabola"):
        pmf = torch.zeros(T, dtype=torch.float64)
        pmf[low:high] = ref_bucket_pmf(kind, n, w, b, s)
        return pmf.cumsum(0)
    # t = int(shift(low + n x)), shift(y) = T s y / ((s - 1) y + T): t <= k  <=>  y < shift^-1(k + 1)
    z = torch.arange(1, T + 1, dtype=torch.float64)
    y = z * T / (s * T - (s - 1) * z)
    return ref_unit_cdf(kind, (y - low) / n, w, b)


# --- the loss sum ------------------------------------------------------------------------------------------


STRENGTHS = [
    {"mse_strength": 1.0, "mae_strength": 0.5},
    {"mse_strength": 0.3, "log_cosh_strength": 2.0, "huber_strength": 0.7},
    {"huber_strength": 1.0},
    {"mse_strength": 1.0, "mae_strength": 0.25, "log_cosh_strength": 0.5, "huber_strength": 1.5},
]


@pytest.mark.parametrize("strengths", STRENGTHS)
@pytest.mark.parametrize("delta", [1.0, 0.3])
def test_the_loss_sum_is_onetrainers(strengths, delta):
    gen = torch.Generator().manual_seed(3)
    pred, target = torch.randn(3, 4, 6, 5, generator=gen) * 2, torch.randn(3, 4, 6, 5, generator=gen)
    got = mixed_loss(pred, target, strengths, delta).mean(dim=(1, 2, 3))
    want = ref_sample_loss(pred - target, strengths, delta)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_huber_is_torch_s_true_huber_not_kohya_s_pseudo_huber():
    d = torch.tensor([0.0, 0.2, 0.5, 1.0, 3.0])
    got = mixed_loss(d, torch.zeros_like(d), {"huber_strength": 1.0}, 0.5)
    assert got.tolist() == pytest.approx([0.0, 0.02, 0.125, 0.375, 1.375])  # d^2/2 up to 0.5, then 0.5 (|d| - 0.25)


def _session(tmp_path, family="sd1", bundle=None, method=ConvOutMethod, **kw):
    """A set-up session on tiny ``family`` (SD3/Flux: the tiny model sdcore loads itself)."""
    o = contract_options(method, tmp_path, kw, family=family)
    if bundle is None and family in ("sd1", "sd2", "sdxl"):
        bundle = create_tiny_bundle(family)
    s = TrainSession(method(o), bundle=bundle)
    s.setup()
    return s


def _capture(s):
    seen = {}

    def compute_loss(ctx):
        seen.update(pred=ctx.predict(ctx.conditioning).float(), target=ctx.target.float())
        return None

    s.method.compute_loss = compute_loss
    return seen


def test_the_step_sums_after_the_mask_and_multiplies_the_concept_weight(tmp_path):
    strengths = STRENGTHS[3]
    s = _session(tmp_path, loss_type="mix", huber_delta=0.4, **strengths)
    batch = s.make_batch(s.data.epoch_plan(0)[0])
    mask = torch.rand((2, 1, *batch.latents.shape[-2:]), generator=torch.Generator().manual_seed(1))
    batch.masks, batch.loss_weights = mask, torch.tensor([1.0, 0.4])
    noise, _ = sample_noise([1, 2], batch.latents.shape[1:])
    seen = _capture(s)
    with torch.no_grad():
        loss = s.sample_loss(batch, noise, torch.tensor([3, 870]), 0)
    # OneTrainer: each term's masked per-sample mean times its strength, summed, then times the concept's loss_weight
    want = ref_sample_loss(seen["pred"] - seen["target"], strengths, 0.4, mask) * torch.tensor([1.0, 0.4]).double()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)


# --- the loss weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 5.0])
def test_p2_weight_is_onetrainers(prediction, gamma):
    scheduler = _sd_scheduler(prediction)
    t = torch.arange(T)
    got = post_process_loss(torch.ones(T), t, scheduler, p2_loss_gamma=gamma)
    snr = ref_snr(scheduler, t)
    if prediction == "v_prediction":
        snr = snr + 1.0  # OneTrainer adds 1 before (1 + snr)^-gamma
    torch.testing.assert_close(got.double(), (1.0 + snr) ** -gamma, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_p2_weight_reads_the_zero_terminal_snr_schedule_as_onetrainer(prediction):
    """OneTrainer rescales model.noise_scheduler itself (StableDiffusionModel.rescale_noise_scheduler_to_zero_terminal_snr)
    and hands its betas to _diffusion_losses (BaseStableDiffusionSetup.calculate_loss), so P2's SNR is the
    rescaled schedule's (ModelSetupDiffusionLossMixin.__snr / __p2_loss_weight)."""
    from types import SimpleNamespace

    from sdcore.train.loss import apply_loss_weights

    objective = DdpmObjective(_sd_scheduler(prediction), zero_terminal_snr=True)
    options = SimpleNamespace(scale_v_pred_loss_like_noise_pred=False, v_pred_like_loss=0.0,
                              debiased_estimation_loss=False, debiased_estimation_sqrt=False, p2_loss_gamma=1.0)  # fmt: skip
    t = torch.arange(0, T, 7)
    got = apply_loss_weights(options, objective, torch.ones(len(t)), t)
    rescaled = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             prediction_type=prediction, rescale_betas_zero_snr=True)  # fmt: skip
    snr = ref_snr(rescaled, t)
    if prediction == "v_prediction":
        snr = snr + 1.0
    torch.testing.assert_close(got.double(), (1.0 + snr) ** -1.0, rtol=1e-4, atol=1e-7)


def test_debiased_sqrt_weight_reads_the_zero_terminal_snr_schedule_as_onetrainer():
    """OneTrainer's DEBIASED_ESTIMATION reads the same rescaled schedule as its P2 (__snr); sdcore's
    --debiased-estimation-sqrt (OneTrainer's v-prediction weight, set by the config translation) read the
    schedule before the rescale, kohya's. kohya's own debiased weight keeps kohya's schedule."""
    from types import SimpleNamespace

    from sdcore.train.loss import apply_loss_weights

    objective = DdpmObjective(_sd_scheduler("v_prediction"), zero_terminal_snr=True)
    t = torch.arange(0, T, 7)
    rescaled = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             prediction_type="v_prediction", rescale_betas_zero_snr=True)  # fmt: skip
    plain = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="v_prediction")  # fmt: skip
    for sqrt, scheduler in ((True, rescaled), (False, plain)):
        options = SimpleNamespace(scale_v_pred_loss_like_noise_pred=False, v_pred_like_loss=0.0, p2_loss_gamma=None,
                                  debiased_estimation_loss=True, debiased_estimation_sqrt=sqrt)  # fmt: skip
        got = apply_loss_weights(options, objective, torch.ones(len(t)), t)
        snr = torch.clip(ref_snr(scheduler, t), max=1.0e3) + 1.0  # __debiased_estimation_weight on v-prediction
        want = torch.rsqrt(snr) if sqrt else 1.0 / snr  # kohya's v-prediction weight: 1 / (min(snr, 1000) + 1)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    # the two schedules give weights far enough apart for the comparison above to tell them apart
    apart = torch.rsqrt(torch.clip(ref_snr(rescaled, t), max=1.0e3) + 1) - torch.rsqrt(
        torch.clip(ref_snr(plain, t), max=1.0e3) + 1
    )
    assert float(apart.abs().max()) > 1e-2


def test_v_prediction_debiased_weight_is_onetrainers_through_the_step(tmp_path):
    bundle = create_tiny_bundle("sd2")
    assert bundle.noise_scheduler.config.prediction_type == "v_prediction"
    s = _session(tmp_path, "sd2", bundle)
    batch = s.make_batch(s.data.epoch_plan(0)[0])
    noise, _ = sample_noise([1, 2], batch.latents.shape[1:])
    t = torch.tensor([0, 640])
    with torch.no_grad():
        plain = s.sample_loss(batch, noise, t, 0)
        s.options.debiased_estimation_loss, s.options.debiased_estimation_sqrt = True, True
        debiased = s.sample_loss(batch, noise, t, 0)
        s.options.debiased_estimation_loss, s.options.debiased_estimation_sqrt = False, False
        s.options.p2_loss_gamma = 1.0
        p2 = s.sample_loss(batch, noise, t, 0)
    snr = ref_snr(bundle.noise_scheduler, t)
    torch.testing.assert_close(debiased.double(), plain.double() / torch.sqrt(snr.clamp(max=1000.0) + 1), rtol=1e-6,
                               atol=0)  # fmt: skip
    torch.testing.assert_close(p2.double(), plain.double() / (2.0 + snr), rtol=1e-6, atol=0)


def test_sigma_weight_is_the_flow_noise_level(tmp_path):
    s = _session(tmp_path, "sd3", bundle=None, method=ProjOutMethod)
    batch = s.make_batch(s.data.epoch_plan(0)[0], with_conditioning=True)
    noise, _ = sample_noise([1, 2], batch.latents.shape[1:])
    t = torch.tensor([150.0, 920.0])  # sigma * 1000, OneTrainer's (t + 1) for t = 149, 919
    with torch.no_grad():
        plain = s.sample_loss(batch, noise, t, 0)
        s.options.sigma_loss_weight = True
        weighted = s.sample_loss(batch, noise, t, 0)
    torch.testing.assert_close(weighted.double(), plain.double() * torch.tensor([0.15, 0.92]).double(), rtol=1e-6,
                               atol=0)  # fmt: skip


# --- the timestep distributions ----------------------------------------------------------------------------


CASES = [  # kind, noising_weight, noising_bias, min/max_noising_strength, shift
    ("uniform", 0.0, 0.0, 0.0, 1.0, 1.0),
    ("uniform", 0.0, 0.0, 0.2, 0.9, 3.0),
    ("logit_normal", 0.5, -0.3, 0.0, 1.0, 1.0),
    ("logit_normal", 0.0, 0.4, 0.1, 0.8, 2.0),
    ("heavy_tail", 0.8, 0.0, 0.0, 1.0, 3.0),
    ("beta", 0.5, 1.0, 0.0, 1.0, 1.0),
    ("beta", 2.0, 3.0, 0.1, 0.9, 2.0),
    ("beta", 0.5, 0.5, 0.0, 1.0, 1.0),
    ("sigmoid", 6.0, 0.1, 0.0, 1.0, 1.0),
    ("sigmoid", 3.0, -0.2, 0.1, 0.9, 3.0),
    ("cos_map", 0.0, 0.0, 0.0, 1.0, 1.0),
    ("cos_map", 0.0, 0.0, 0.3, 1.0, 3.0),
    ("inverted_parabola", 4.0, 0.0, 0.0, 1.0, 1.0),
    ("inverted_parabola", 8.0, 0.2, 0.1, 0.7, 2.0),
]


@pytest.mark.parametrize(("kind", "w", "b", "lo", "hi", "shift"), CASES)
def test_drawn_timesteps_follow_onetrainers_density(kind, w, b, lo, hi, shift):
    count = 20000
    dist = TimestepDistribution(kind, weight=w, bias=b, min_strength=lo, max_strength=hi, shift=shift)
    steps = dist.draw(torch.Generator().manual_seed(11), count)
    assert steps.dtype == torch.int64 and steps.shape == (count,)
    want = ref_timestep_cdf(kind, w, b, lo, hi, shift)
    got = torch.bincount(steps, minlength=T).double().cumsum(0) / count
    ks = float((got - want).abs().max())
    assert ks < 1.95 / math.sqrt(count), (kind, ks)  # Kolmogorov-Smirnov at 0.1 %
    low, high = int(T * lo), int(T * hi)
    if kind in ("cos_map", "sigmoid", "inverted_parabola"):  # buckets over the range itself
        assert low <= int(steps.min()) and int(steps.max()) < high
    else:  # narrowed, then shifted: within [int(shift(low)), int(shift(high))]

        def shifted(y):
            return T * shift * y / ((shift - 1) * y + T)

        assert int(shifted(low)) <= int(steps.min()) and int(steps.max()) <= min(int(shifted(high)), T - 1)


def test_the_shift_moves_the_draw_towards_noise():
    a = TimestepDistribution("uniform").draw(torch.Generator().manual_seed(0), 4000).double().mean()
    b = TimestepDistribution("uniform", shift=3.0).draw(torch.Generator().manual_seed(0), 4000).double().mean()
    # E[3u / (1 + 2u)] over u in [0, 1) = 1.5 - 0.75 ln 3 ~ 0.676
    assert float(a) == pytest.approx(499.5, abs=10) and float(b) == pytest.approx(
        T * (1.5 - 0.75 * math.log(3)), abs=10
    )


def test_the_objectives_draw_from_the_distribution_per_sample():
    dist = TimestepDistribution("cos_map", min_strength=0.1, max_strength=0.9, shift=2.0)
    keys = [5, 6, 7]
    ddpm = DdpmObjective(_sd_scheduler("epsilon"), distribution=dist)
    _, steps = ddpm.sample(keys, (4, 2, 2))
    flow = FlowMatchingObjective(distribution=dist)
    _, flow_steps = flow.sample(keys, (4, 2, 2))
    for i, key in enumerate(keys):
        gen = torch.Generator().manual_seed(key)
        torch.randn((4, 2, 2), generator=gen)  # the sample's noise comes first
        t = int(dist.draw(gen))
        assert int(steps[i]) == t
        # flow matching: OneTrainer's sigma (t + 1) / T, the denoiser called with sigma * T
        assert float(flow_steps[i]) == pytest.approx(t + 1, abs=1e-3)


# --- pre-flight --------------------------------------------------------------------------------------------


def _problems(tmp_path, **kw) -> list[str]:
    return option_problems(contract_options(ConvOutMethod, tmp_path, kw))


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"loss_type": "mix", "mae_strength": -0.5}, "--mae-strength -0.5: the strengths of --loss-type mix"),
        ({"loss_type": "mix", "mse_strength": 0.0}, "--loss-type mix with every strength 0"),
        ({"loss_type": "mix", "huber_strength": 1.0, "huber_delta": 0.0}, "--huber-delta must be positive"),
        ({"timestep_distribution": "linear"}, "--timestep-distribution 'linear': choose one of uniform, sigmoid"),
        ({"timestep_distribution": "uniform", "min_noising_strength": 0.9, "max_noising_strength": 0.5},
         "need 0 <= min < max <= 1"),
        ({"timestep_distribution": "heavy_tail", "noising_weight": 3.0}, "heavy_tail's scale must lie in"),
        ({"timestep_distribution": "inverted_parabola", "noising_weight": 50.0, "noising_bias": 3.0},
         "no timestep has a positive weight"),
        ({"timestep_distribution": "cos_map", "min_timestep": 100}, "give the range as --min-noising-strength"),
        ({"p2_loss_gamma": -1.0}, "--p2-loss-gamma must be positive"),
        ({"debiased_estimation_sqrt": True}, "--debiased-estimation-sqrt changes --debiased-estimation-loss"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_each(tmp_path, kw, expected):
    problems = _problems(tmp_path, **kw)
    hits = [p for p in problems if expected in p]
    assert len(hits) == 1 and "\n" not in hits[0], problems


def test_family_checks_refuse_weights_of_the_other_objective(tmp_path):
    from sdcore.train.loss import loss_family_checks

    o = contract_options(ConvOutMethod, tmp_path, {"sigma_loss_weight": True, "p2_loss_gamma": 1.0})
    problems, _ = loss_family_checks(o, "sd1", "epsilon")
    assert len(problems) == 1 and "--sigma-loss-weight weighs a flow-matching noise level" in problems[0]
    problems, _ = loss_family_checks(o, "sd3", "flow")
    assert len(problems) == 1 and "--p2-loss-gamma" in problems[0]
    o = contract_options(ConvOutMethod, tmp_path, {"mae_strength": 0.5})
    _, notes = loss_family_checks(o, "sd1", "epsilon")
    assert any("--mae-strength: without effect with --loss-type l2" in n for n in notes)


# --- OneTrainer configs ------------------------------------------------------------------------------------


SD15 = {"training_method": "LORA", "model_type": "STABLE_DIFFUSION_15", "base_model_name": "tiny:sd1",
        "output_model_destination": "models/lora.safetensors", "output_model_format": "KOHYA_LORA"}  # fmt: skip
SD3 = {
    **SD15,
    "model_type": "STABLE_DIFFUSION_3",
    "base_model_name": "tiny:sd3",
    "output_model_format": "DIFFUSERS_LORA",
    "text_encoder": {"train": False},
    "text_encoder_2": {"train": False},
    "text_encoder_3": {"train": False},
}
#: what the configs below set, and the sdcore options they become
LOSS_FIELDS = ("loss_type", "mse_strength", "mae_strength", "log_cosh_strength", "huber_strength", "huber_delta",
               "p2_loss_gamma", "sigma_loss_weight", "timestep_distribution", "noising_weight", "noising_bias",
               "min_noising_strength", "max_noising_strength", "discrete_flow_shift", "timestep_shift",
               "dynamic_timestep_shift")  # fmt: skip


def _load(tmp_path: Path, config: dict):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return load_options(LoraOptions, path, notes=[])


def test_onetrainer_configs_load_and_train(tmp_path):
    sd15 = {**SD15, "mse_strength": 1.0, "huber_strength": 0.5, "huber_delta": 0.3, "log_cosh_strength": 0.2,
            "loss_weight_fn": "P2", "loss_weight_strength": 1.0, "timestep_distribution": "INVERTED_PARABOLA",
            "noising_weight": 4.0, "noising_bias": 0.1, "min_noising_strength": 0.1, "max_noising_strength": 0.9,
            "timestep_shift": 2.0}  # fmt: skip
    o = _load(tmp_path, sd15)
    assert o.timestep_shift == 2.0  # OneTrainer shifts DDPM timesteps with the same formula
    assert (o.loss_type, o.mse_strength, o.mae_strength, o.log_cosh_strength, o.huber_strength, o.huber_delta) == (
        "mix", 1.0, 0.0, 0.2, 0.5, 0.3)  # fmt: skip
    assert (o.p2_loss_gamma, o.timestep_distribution, o.noising_weight, o.noising_bias) == (
        1.0, "inverted_parabola", 4.0, 0.1)  # fmt: skip
    assert (o.min_noising_strength, o.max_noising_strength) == (0.1, 0.9)
    sd3 = {**SD3, "mae_strength": 1.0, "mse_strength": 0.0, "loss_weight_fn": "SIGMA", "timestep_distribution": "BETA",
           "noising_weight": 0.5, "noising_bias": 1.0, "max_noising_strength": 0.8, "timestep_shift": 3.0}  # fmt: skip
    flow = _load(tmp_path, sd3)
    assert (flow.loss_type, flow.sigma_loss_weight, flow.timestep_distribution, flow.discrete_flow_shift) == (
        "l1", True, "beta", 3.0)  # fmt: skip
    assert (flow.noising_weight, flow.noising_bias, flow.max_noising_strength) == (0.5, 1.0, 0.8)
    # both train 2 steps on the tiny models, through the runtime's own loss (SD1.5's with sdcore's --masked-loss off)
    for family, options, method in (("sd1", o, ConvOutMethod), ("sd3", flow, ProjOutMethod)):
        kw = {name: getattr(options, name) for name in LOSS_FIELDS}
        s = _session(tmp_path / family, family, method=method, max_steps=2, save_state=False, **kw)
        assert not option_problems(s.options, s.method)
        seen: list[torch.Tensor] = []
        original = s.objective.draw_for  # the objective is rebuilt per use: record where the step draws

        def recording(*args, _draw=original, _seen=seen, **kwargs):
            out = _draw(*args, **kwargs)
            _seen.append(out[1])
            return out

        s.objective.draw_for = recording
        result = s.run()
        assert result.steps == 2 and len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
        drawn = torch.cat(seen)
        if family == "sd1":  # OneTrainer's buckets over [100, 900)
            assert drawn.dtype == torch.int64 and int(drawn.min()) >= 100 and int(drawn.max()) < 900
        else:  # sigma * 1000 = t + 1 with t = int(shift(y)), y in [0, 800)
            assert torch.equal(drawn, drawn.round()) and float(drawn.min()) >= 1 and float(drawn.max()) <= 924


def test_onetrainer_refusals_that_remain(tmp_path):
    from sdcore.errors import ConfigError

    for config, expected in (
        ({**SD15, "loss_weight_fn": "SIGMA"}, "a flow-matching noise-level weight"),
        ({**SD3, "loss_weight_fn": "P2"}, "an SNR weight of a DDPM schedule"),
        ({**SD15, "mse_strength": 0.0}, "every loss strength is 0"),
        ({**SD15, "timestep_distribution": "LINEAR"}, "timestep_distribution 'LINEAR': choose one of UNIFORM"),
    ):
        with pytest.raises(ConfigError) as info:
            _load(tmp_path, config)
        assert expected in str(info.value), (expected, str(info.value))


def test_cli_flags_reach_the_preflight_one_line_each(tmp_path):
    from click.testing import CliRunner
    from sdcore.specs import MethodSpec
    from sdcore.train.cli import build_train_command

    command = build_train_command(MethodSpec(name="convout", summary="test", method="runtime_methods:ConvOutMethod"))
    o = contract_options(ConvOutMethod, tmp_path, {})
    base = ["--model", "tiny:sd1", "--data", o.data, "--output", str(tmp_path / "r.safetensors"), "--dry-run",
            "--resolution", "64"]  # fmt: skip
    bad = ["--loss-type", "mix", "--mse-strength", "0", "--timestep-distribution", "heavy_tail", "--noising-weight",
           "5", "--sigma-loss-weight"]  # fmt: skip
    result = CliRunner().invoke(command, [*base, *bad])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 3 and "Traceback" not in result.output, result.output
    assert "every strength 0" in errors[0] and "heavy_tail's scale" in errors[1] and "--sigma-loss-weight" in errors[2]
    good = ["--loss-type", "mix", "--mae-strength", "0.5", "--timestep-distribution", "cos_map", "--p2-loss-gamma", "1"]
    result = CliRunner().invoke(command, [*base, *good])
    assert result.exit_code == 0, result.output


# --- the timestep shift on DDPM, the resolution's shift after any distribution ------------------------------


def ref_flux_shift(height: int, width: int) -> float:
    """``FluxModel.calculate_timestep_shift`` with FLUX.1's scheduler (256/4096 tokens, shifts 0.5/1.15), exp(mu)."""
    tokens = (width // 2) * (height // 2)
    m = (1.15 - 0.5) / (4096 - 256)
    return math.exp(tokens * m + (0.5 - m * 256))


def _ks(steps: torch.Tensor, want: torch.Tensor) -> float:
    got = torch.bincount(steps, minlength=T).double().cumsum(0) / steps.numel()
    return float((got - want).abs().max())


def test_ddpm_timestep_shift_reaches_the_objective(tmp_path):
    from sdcore.train.objectives import objective_for

    notes: list[str] = []
    o = _load_noted(tmp_path, {**SD15, "timestep_shift": 3.0, "max_noising_strength": 0.8}, notes)
    # UNIFORM shifted: OneTrainer's own draw (int(shift(y)), y uniform in [0, 800)), not kohya's range
    assert (o.timestep_distribution, o.timestep_shift, o.max_noising_strength) == ("uniform", 3.0, 0.8)
    assert (o.min_timestep, o.max_timestep) == (None, None)
    objective = objective_for(create_tiny_bundle("sd1"), o)
    assert isinstance(objective, DdpmObjective) and objective.distribution.shift == 3.0
    count = 20000
    steps = objective.distribution.draw(torch.Generator().manual_seed(5), count)
    assert _ks(steps, ref_timestep_cdf("uniform", 0.0, 0.0, 0.0, 0.8, 3.0)) < 1.95 / math.sqrt(count)
    from sdcore.train.preflight import distribution_option_problems

    assert distribution_option_problems(o) == []


@pytest.mark.parametrize(
    ("kind", "w", "b", "lo", "hi"),
    [("logit_normal", 0.5, 0.3, 0.0, 1.0), ("beta", 2.0, 3.0, 0.1, 0.9), ("cos_map", 0.0, 0.0, 0.0, 1.0),
     ("sigmoid", 3.0, -0.2, 0.1, 0.9)],
)  # fmt: skip
def test_dynamic_shift_is_the_resolutions_after_any_distribution(kind, w, b, lo, hi):
    size = (48, 80)  # the latents of a 384x640 image: 960 tokens
    shift = ref_flux_shift(*size)
    dist = TimestepDistribution(kind, weight=w, bias=b, min_strength=lo, max_strength=hi)  # its own shift: 1
    flow = FlowMatchingObjective(distribution=dist, dynamic_shift=True)
    fixed = TimestepDistribution(kind, weight=w, bias=b, min_strength=lo, max_strength=hi, shift=shift)
    keys = list(range(30))
    _, steps = flow.sample(keys, (16, *size))
    for i, key in enumerate(keys):  # each sample: the draw of the distribution with the resolution's shift
        gen = torch.Generator().manual_seed(key)
        torch.randn((16, *size), generator=gen)
        assert float(steps[i]) == pytest.approx(int(fixed.draw(gen)) + 1, abs=1e-3)
    count = 20000
    sigmas = flow.sample_sigmas(count, torch.Generator().manual_seed(3), size)
    drawn = (sigmas.double() * T).round().long() - 1  # OneTrainer's sigma (t + 1) / T
    assert _ks(drawn, ref_timestep_cdf(kind, w, b, lo, hi, shift)) < 1.95 / math.sqrt(count), kind
    other = flow.sample_sigmas(count, torch.Generator().manual_seed(3), (128, 128))  # 4096 tokens: exp(1.15)
    assert float(other.mean()) > float(sigmas.mean())


def _load_noted(tmp_path: Path, config: dict, notes: list[str]):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return load_options(LoraOptions, path, notes=notes)


FLUX = {**SD3, "model_type": "FLUX_DEV_1", "base_model_name": "tiny:flux", "dynamic_timestep_shifting": True}
FLUX.pop("text_encoder_3")


def test_flux_dynamic_shifting_with_other_distributions_loads_and_trains(tmp_path):
    notes: list[str] = []
    config = {**FLUX, "timestep_distribution": "COS_MAP", "min_noising_strength": 0.2, "timestep_shift": 2.0}
    o = _load_noted(tmp_path, config, notes)
    assert (o.timestep_distribution, o.dynamic_timestep_shift, o.min_noising_strength) == ("cos_map", True, 0.2)
    assert (o.discrete_flow_shift, o.timestep_shift) == (None, None)  # unset: the family's shift (Flux: 1.0)
    assert any("keeps the bucket weights of its first batch's resolution" in n for n in notes), notes
    assert any("timestep_shift: without effect with dynamic_timestep_shifting" in n for n in notes), notes
    beta = _load_noted(tmp_path, {**FLUX, "timestep_distribution": "BETA", "noising_weight": 0.5,
                                  "noising_bias": 1.0, "max_noising_strength": 0.9}, [])  # fmt: skip
    assert (beta.timestep_distribution, beta.dynamic_timestep_shift, beta.timestep_sampling) == ("beta", True,
                                                                                                 "logit_normal")  # fmt: skip
    # LOGIT_NORMAL(0, 0) over the whole range stays kohya's flux_shift (sigmoid(N(0, 1)) shifted by exp(mu))
    plain = _load_noted(tmp_path, {**FLUX, "timestep_distribution": "LOGIT_NORMAL"}, [])
    assert (plain.timestep_sampling, plain.timestep_distribution, plain.dynamic_timestep_shift) == (
        "flux_shift", None, False)  # fmt: skip
    kw = {name: getattr(o, name) for name in LOSS_FIELDS}
    s = _session(tmp_path / "flux", "flux", method=ProjOutMethod, max_steps=2, save_state=False, **kw)
    assert not option_problems(s.options, s.method)
    seen: list[torch.Tensor] = []
    original = s.objective.draw_for

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[1])
        return out

    s.objective.draw_for = recording
    result = s.run()
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
    drawn = torch.cat(seen)  # t + 1 for buckets t in [200, 1000)
    assert torch.equal(drawn, drawn.round()) and float(drawn.min()) >= 201 and float(drawn.max()) <= 1000


def test_shift_options_are_checked_where_they_apply(tmp_path):
    from sdcore.train.preflight import objective_option_checks

    problems = _problems(tmp_path, timestep_distribution="uniform", timestep_shift=0.0)
    assert any("the timestep shift must be positive" in p for p in problems), problems
    o = contract_options(ConvOutMethod, tmp_path, {"timestep_distribution": "uniform", "dynamic_timestep_shift": True})
    problems, _ = objective_option_checks(o, "sd1")
    assert any("--dynamic-timestep-shift: a flow-matching shift by resolution" in p for p in problems), problems
    _, notes = objective_option_checks(
        contract_options(ConvOutMethod, tmp_path, {"dynamic_timestep_shift": True}), "flux"
    )
    assert any("without effect with --timestep-sampling logit_normal" in n for n in notes), notes
    _, notes = objective_option_checks(contract_options(ConvOutMethod, tmp_path, {"timestep_shift": 2.0}), "sd3")
    assert any("--timestep-shift: without effect without --timestep-distribution" in n for n in notes), notes

"""kohya's loss options (--loss-type, the Huber schedules, debiased estimation, the v-prediction scales).

The references below are written here, in float64 and one sample at a time, from kohya sd-scripts'
``get_huber_threshold_if_needed``/``conditional_loss`` (library/train_util.py) and
``apply_snr_weight``/``scale_v_prediction_loss_like_noise_prediction``/``add_v_prediction_like_loss``/
``apply_debiased_estimation`` (library/custom_train_functions.py), applied in train_network.py's order.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler
from runtime_methods import ConvOutMethod
from sdcore.models import family as fam
from sdcore.models.family import SD1, register_family
from sdcore.models.tiny import create_tiny_bundle
from sdcore.specs import MethodSpec
from sdcore.testing.contract import contract_options
from sdcore.train.cli import build_train_command
from sdcore.train.loop import TrainSession
from sdcore.train.loss import elementwise_loss, huber_threshold, loss_family_checks, post_process_loss
from sdcore.train.noise import sample_noise
from sdcore.train.preflight import PreflightError, validate_options

TIMESTEPS = [0, 1, 10, 250, 500, 750, 999]


def _sd_scheduler(prediction: str = "epsilon") -> DDPMScheduler:
    """SD1/SD2's training schedule (scaled_linear 0.00085..0.012, 1000 steps)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction,
    )


# --- kohya's formulas, written independently (float64, per sample) -------------------------------


def _abar(scheduler, t: int) -> float:
    return float(scheduler.alphas_cumprod[t].double())


def ref_threshold(schedule: str, c: float, scale: float, t: float, scheduler=None, num_timesteps: int = 1000) -> float:
    if schedule == "exponential":
        alpha = -math.log(c) / num_timesteps
        return math.exp(-alpha * t) * scale
    if schedule == "snr":
        a = _abar(scheduler, int(t))
        sigma = ((1.0 - a) / a) ** 0.5
        return (1.0 - c) / (1.0 + sigma) ** 2 + c
    return c * scale


def ref_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, c: float | None) -> torch.Tensor:
    d = pred.double() - target.double()
    if loss_type == "l2":
        return d * d
    if loss_type == "l1":
        return d.abs()
    assert c is not None
    root = torch.sqrt(d * d + c * c) - c
    return 2 * c * root if loss_type == "huber" else 2 * root


def ref_all_snr(scheduler, t: int) -> float:
    a = _abar(scheduler, t)
    return (math.sqrt(a) / math.sqrt(1.0 - a)) ** 2


def ref_post_process(
    loss: float,
    t: int,
    scheduler,
    *,
    v_prediction: bool,
    min_snr_gamma=None,
    scale_v=False,
    v_pred_like=0.0,
    debiased=False,
) -> float:
    """train_network.py's post_process_loss for one sample."""
    snr = ref_all_snr(scheduler, t)
    if min_snr_gamma:
        loss *= min(snr, min_snr_gamma) / (snr + 1 if v_prediction else snr)
    clamped = min(snr, 1000.0)
    scale = clamped / (clamped + 1)
    if scale_v:
        loss *= scale
    if v_pred_like:
        loss = loss + loss / scale * v_pred_like
    if debiased:
        loss *= 1 / (clamped + 1) if v_prediction else 1 / math.sqrt(clamped)
    return loss


# --- unit level: thresholds, per-element losses, weights ----------------------------------------


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize(("c", "scale"), [(0.1, 1.0), (0.3, 2.5)])
def test_huber_threshold_matches_kohya_on_a_ddpm_schedule(schedule, c, scale):
    sched = _sd_scheduler()
    t = torch.tensor(TIMESTEPS)
    got = huber_threshold(schedule, c, scale, t, num_timesteps=1000, scheduler=sched)
    want = torch.tensor([ref_threshold(schedule, c, scale, x, sched) for x in TIMESTEPS], dtype=torch.float64)
    assert got.shape == (len(TIMESTEPS),) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7)
    if schedule == "exponential":  # scale at t=0, c*scale at t=T
        assert float(got[0]) == pytest.approx(scale) and float(want[-1]) == pytest.approx(scale * c ** (999 / 1000))
    if schedule == "snr":  # near 1 for the cleanest timestep, towards c as noise grows; no scale (kohya)
        assert float(got[0]) > 0.9 and float(got[-1]) == pytest.approx(c, abs=0.01)


def test_huber_snr_threshold_follows_the_zero_terminal_snr_schedule():
    """kohya fixes the betas in place before the step, so its Huber ``snr`` threshold reads the fixed
    schedule (the SNR weights keep the table computed before): at t=999 the fixed schedule's sigma is
    infinite and the threshold is ``huber_c``; the model's own schedule would give about 0.104."""
    from types import SimpleNamespace

    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
    from sdcore.train.loss import step_loss
    from sdcore.train.objectives import DdpmObjective

    sched = _sd_scheduler()
    fixed = DDPMScheduler.from_config(sched.config)
    fixed.alphas_cumprod = torch.cumprod(1.0 - rescale_zero_terminal_snr(sched.betas), dim=0)
    t = torch.tensor([10, 500, 999])
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    options = SimpleNamespace(loss_type="huber", huber_schedule="snr", huber_c=0.1, huber_scale=1.0)
    got = step_loss(options, DdpmObjective(sched, zero_terminal_snr=True), pred, target, t)
    abar = fixed.alphas_cumprod[t].double()  # kohya's formula; 0 at t=999 (torch gives sigma = inf there)
    want_c = ((1 - 0.1) / (1 + ((1 - abar) / abar) ** 0.5) ** 2 + 0.1).float()
    assert float(want_c[-1]) == pytest.approx(0.1)
    assert torch.allclose(got, elementwise_loss(pred, target, "huber", want_c), atol=1e-6)
    plain = step_loss(options, DdpmObjective(sched), pred, target, t)
    assert not torch.allclose(got[2], plain[2], atol=1e-4)  # the model's schedule gives another threshold


def test_huber_threshold_on_flow_matching_takes_sigma_times_1000():
    """kohya's Flux/SD3 scripts pass timesteps = sigma * 1000: exponential is scale * c ** sigma."""
    sigmas = torch.tensor([0.0, 0.05, 0.5, 0.93, 1.0])
    got = huber_threshold("exponential", 0.1, 2.0, sigmas * 1000, num_timesteps=1000)
    assert torch.allclose(got.double(), 2.0 * 0.1 ** sigmas.double(), rtol=1e-5)
    const = huber_threshold("constant", 0.1, 2.0, sigmas * 1000, num_timesteps=1000)
    assert torch.allclose(const, torch.full((5,), 0.2))
    with pytest.raises(Exception, match="needs a DDPM noise schedule"):
        huber_threshold("snr", 0.1, 1.0, sigmas * 1000, num_timesteps=1000)


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_elementwise_loss_matches_kohya_at_several_timesteps(loss_type, schedule):
    sched = _sd_scheduler()
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn((len(TIMESTEPS), 4, 5, 5), generator=gen) * 2
    target = torch.randn((len(TIMESTEPS), 4, 5, 5), generator=gen)
    t = torch.tensor(TIMESTEPS)
    c = huber_threshold(schedule, 0.2, 1.5, t, num_timesteps=1000, scheduler=sched)
    got = elementwise_loss(pred, target, loss_type, c)
    assert got.shape == pred.shape
    for i, step in enumerate(TIMESTEPS):
        want = ref_loss(pred[i], target[i], loss_type, ref_threshold(schedule, 0.2, 1.5, step, sched))
        assert torch.allclose(got[i].double(), want, rtol=1e-5, atol=1e-6), (loss_type, schedule, step)


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far_away():
    c = torch.tensor([0.1])
    small, large = torch.full((1, 1), 0.01), torch.full((1, 1), 100.0)
    zero = torch.zeros((1, 1))
    # 2c(sqrt(d^2+c^2)-c) ~ d^2 for |d| << c, ~ 2c|d| for |d| >> c
    assert float(elementwise_loss(small, zero, "huber", c)) == pytest.approx(1e-4, rel=1e-2)
    assert float(elementwise_loss(large, zero, "huber", c)) == pytest.approx(2 * 0.1 * 100, rel=1e-2)
    assert float(elementwise_loss(large, zero, "smooth_l1", c)) == pytest.approx(2 * 100, rel=1e-2)


@pytest.mark.parametrize(
    ("prediction", "kw"),
    [
        ("epsilon", {"debiased": True}),
        ("v_prediction", {"debiased": True}),
        ("v_prediction", {"scale_v": True}),
        ("epsilon", {"v_pred_like": 0.3}),
        ("epsilon", {"v_pred_like": 0.3, "debiased": True}),
        ("v_prediction", {"scale_v": True, "debiased": True}),
    ],
)
def test_snr_weights_match_kohya(prediction, kw):
    sched = _sd_scheduler(prediction)
    t = torch.tensor(TIMESTEPS)
    loss = torch.linspace(0.5, 2.0, len(TIMESTEPS))
    got = post_process_loss(
        loss,
        t,
        sched,
        scale_v_pred_loss_like_noise_pred=kw.get("scale_v", False),
        v_pred_like_loss=kw.get("v_pred_like", 0.0),
        debiased_estimation_loss=kw.get("debiased", False),
    )
    want = [
        ref_post_process(float(x), s, sched, v_prediction=prediction == "v_prediction", **kw)
        for x, s in zip(loss, TIMESTEPS, strict=True)
    ]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5)
    assert not torch.allclose(got, loss)
    # t=0: SD's SNR there is above 1000, so kohya's clamp decides the weight
    assert ref_all_snr(sched, 0) > 1000


def test_weights_off_return_the_same_tensor():
    loss = torch.rand(3)
    assert post_process_loss(loss, torch.tensor([1, 2, 3]), _sd_scheduler()) is loss


# --- through the step: masks, per-sample weights, min-SNR, families --------------------------------


def _session(tmp_path, bundle, family="sd1", **kw):
    o = contract_options(ConvOutMethod, tmp_path, kw, family=family)
    s = TrainSession(ConvOutMethod(o), bundle=bundle)
    s.setup()
    return s


def _capture(s):
    """Make the method record the prediction and target the step sees (and still leave the loss to the step)."""
    seen = {}

    def compute_loss(ctx):
        seen.update(pred=ctx.predict(ctx.conditioning).float(), target=ctx.target.float(), t=ctx.timesteps)
        return None

    s.method.compute_loss = compute_loss
    return seen


@pytest.mark.parametrize(
    ("loss_type", "schedule"), [("l1", "snr"), ("huber", "snr"), ("huber", "exponential"), ("smooth_l1", "constant")]
)
def test_step_loss_with_masks_and_sample_weights(tmp_path, loss_type, schedule):
    s = _session(
        tmp_path, create_tiny_bundle("sd1"), loss_type=loss_type, huber_schedule=schedule, huber_c=0.2, huber_scale=1.5
    )
    batch = s.make_batch(s.data.epoch_plan(0)[0])
    mask = torch.rand((2, 1, *batch.latents.shape[-2:]), generator=torch.Generator().manual_seed(1))
    batch.masks = mask
    batch.loss_weights = torch.tensor([1.0, 0.4])
    noise, _ = sample_noise([1, 2], batch.latents.shape[1:])
    t = torch.tensor([3, 870])
    seen = _capture(s)
    with torch.no_grad():
        loss = s.sample_loss(batch, noise, t, 0)
    sched = s.bundle.noise_scheduler
    for i, step in enumerate(t.tolist()):
        c = ref_threshold(schedule, 0.2, 1.5, step, sched)
        per = ref_loss(seen["pred"][i], seen["target"][i], loss_type, c) * mask[i].double()
        want = per.mean() * [1.0, 0.4][i]
        assert float(loss[i]) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize(
    ("family", "kw"),
    [
        ("sd1", {"min_snr_gamma": 5.0, "v_pred_like_loss": 0.2, "debiased_estimation_loss": True}),
        ("sd2", {"min_snr_gamma": 5.0, "scale_v_pred_loss_like_noise_pred": True, "debiased_estimation_loss": True}),
    ],
)
def test_step_applies_kohya_weights_after_min_snr_and_sample_weights(tmp_path, family, kw):
    bundle = create_tiny_bundle(family)
    s = _session(tmp_path, bundle, family=family)
    batch = s.make_batch(s.data.epoch_plan(0)[0])
    batch.loss_weights = torch.tensor([1.0, 0.5])
    noise, _ = sample_noise([1, 2], batch.latents.shape[1:])
    t = torch.tensor([0, 640])
    with torch.no_grad():
        plain = s.sample_loss(batch, noise, t, 0)
        for key, value in kw.items():
            setattr(s.options, key, value)
        weighted = s.sample_loss(batch, noise, t, 0)
    sched = bundle.noise_scheduler
    v_pred = sched.config.prediction_type == "v_prediction"
    assert v_pred == (family == "sd2")
    ref_kw = {
        "min_snr_gamma": kw["min_snr_gamma"],
        "scale_v": kw.get("scale_v_pred_loss_like_noise_pred", False),
        "v_pred_like": kw.get("v_pred_like_loss", 0.0),
        "debiased": kw["debiased_estimation_loss"],
    }
    want = [
        ref_post_process(float(x), step, sched, v_prediction=v_pred, **ref_kw)
        for x, step in zip(plain, [0, 640], strict=True)
    ]
    assert torch.allclose(weighted.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5)


def test_options_at_their_defaults_leave_the_step_bit_identical(tmp_path):
    bundle = create_tiny_bundle("sd1")
    s = _session(tmp_path, bundle)
    batch = s.make_batch(s.data.epoch_plan(0)[0])
    noise, _ = sample_noise([1, 2], batch.latents.shape[1:])
    t = torch.tensor([20, 800])
    seen = _capture(s)
    with torch.no_grad():
        default = s.sample_loss(batch, noise, t, 0)
        # the Huber settings do nothing with l2 (kohya), 0 is v_pred_like_loss's "off"
        s.options.huber_schedule, s.options.huber_c, s.options.huber_scale = "constant", 0.5, 3.0
        again = s.sample_loss(batch, noise, t, 0)
    old = torch.nn.functional.mse_loss(seen["pred"], seen["target"], reduction="none").mean(dim=(1, 2, 3))
    assert torch.equal(default, old * batch.loss_weights) and torch.equal(again, default)


@pytest.fixture
def flow_family():
    """SD1's UNet trained with flow matching: a family declared at run time (as a plugin would)."""
    before = dict(fam._REGISTERED)
    register_family(dataclasses.replace(SD1, name="toy-flow", objective="flow-matching"))
    yield
    fam._REGISTERED.clear()
    fam._REGISTERED.update(before)


def test_flow_matching_huber_exponential_through_the_step(tmp_path, flow_family):
    bundle = create_tiny_bundle("sd1")
    bundle.family = "toy-flow"
    s = _session(tmp_path, bundle, loss_type="huber", huber_schedule="exponential", huber_c=0.1, huber_scale=2.0)
    batch = s.make_batch(s.data.epoch_plan(0)[0])
    noise, _ = sample_noise([1, 2], batch.latents.shape[1:])
    t = torch.tensor([150.0, 920.0])  # sigma * 1000
    seen = _capture(s)
    with torch.no_grad():
        loss = s.sample_loss(batch, noise, t, 0)
    for i, sigma in enumerate([0.15, 0.92]):
        c = 2.0 * 0.1**sigma
        want = ref_loss(seen["pred"][i], seen["target"][i], "huber", c).mean() * float(batch.loss_weights[i])
        assert float(loss[i]) == pytest.approx(float(want), rel=1e-5)


# --- pre-flight -----------------------------------------------------------------------------------


def test_bad_values_are_all_reported_at_once(tmp_path):
    o = contract_options(
        ConvOutMethod, tmp_path, {"loss_type": "huber", "huber_c": 0.0, "huber_scale": -1.0, "v_pred_like_loss": -0.1}
    )
    with pytest.raises(PreflightError) as info:
        validate_options(o)
    text = "\n".join(info.value.problems)
    assert "--huber-c must be positive" in text and "--huber-scale must be positive" in text
    assert "--v-pred-like-loss must be 0 (off) or positive" in text
    o = contract_options(ConvOutMethod, tmp_path, {"loss_type": "l3", "huber_schedule": "cosine"})
    with pytest.raises(PreflightError) as info:
        validate_options(o)
    assert info.value.problems == [
        "--loss-type 'l3': choose one of l2, l1, huber, smooth_l1, mix",
        "--huber-schedule 'cosine': choose one of constant, exponential, snr",
    ]


def test_family_and_prediction_checks(tmp_path, flow_family):
    ddpm_only = {"debiased_estimation_loss": True, "v_pred_like_loss": 0.1, "loss_type": "smooth_l1"}
    o = contract_options(ConvOutMethod, tmp_path, ddpm_only)
    problems, _ = loss_family_checks(o, "toy-flow", "epsilon")
    assert len(problems) == 2
    assert "--v-pred-like-loss, --debiased-estimation-loss: SNR weights of a DDPM schedule" in problems[0]
    assert "--huber-schedule snr (kohya's default) needs a DDPM schedule" in problems[1]
    assert loss_family_checks(o, "sd1", "epsilon") == ([], [])
    o = contract_options(ConvOutMethod, tmp_path, {"loss_type": "huber", "huber_schedule": "exponential"})
    assert loss_family_checks(o, "toy-flow", "epsilon") == ([], [])
    o = contract_options(ConvOutMethod, tmp_path, {"scale_v_pred_loss_like_noise_pred": True})
    assert loss_family_checks(o, "sd1", "epsilon")[0] == [
        "--scale-v-pred-loss-like-noise-pred needs a v-prediction model (as in kohya)"
    ]
    assert loss_family_checks(o, "sd2", "v_prediction") == ([], [])
    o = contract_options(ConvOutMethod, tmp_path, {"v_pred_like_loss": 0.2})
    assert "--v-pred-like-loss is for epsilon-prediction models" in loss_family_checks(o, "sd2", "v_prediction")[0][0]
    o = contract_options(ConvOutMethod, tmp_path, {"huber_c": 0.3})
    assert loss_family_checks(o, "sd1", "epsilon") == (
        [],
        ["--huber-c: without effect with --loss-type l2 (huber/smooth_l1 only)"],
    )


def test_a_method_with_its_own_loss_refuses_other_loss_types(tmp_path):
    class OwnLoss(ConvOutMethod):
        def compute_loss(self, ctx):
            return None

    o = contract_options(ConvOutMethod, tmp_path, {"loss_type": "l1"})
    problems, _ = loss_family_checks(o, "sd1", "epsilon", OwnLoss(o))
    assert problems == ["--loss-type l1: method 'convout' computes its own loss (only l2 applies to it)"]
    assert loss_family_checks(o, "sd1", "epsilon", ConvOutMethod(o)) == ([], [])


def _command():
    return build_train_command(MethodSpec(name="convout", summary="test", method="runtime_methods:ConvOutMethod"))


def test_cli_preflight_reports_every_loss_problem_with_exit_2(tmp_path):
    o = contract_options(ConvOutMethod, tmp_path, {})
    result = CliRunner().invoke(
        _command(),
        ["--model", "tiny:sd2", "--data", o.data, "--output", str(tmp_path / "r.safetensors"), "--dry-run",
         "--loss-type", "huber", "--huber-c", "0", "--v-pred-like-loss", "0.1", "--resolution", "64"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2, result.output
    assert "--huber-c must be positive" in errors[0]
    assert "--v-pred-like-loss is for epsilon-prediction models" in errors[1]
    assert "Traceback" not in result.output
    result = CliRunner().invoke(_command(), ["--loss-type", "l3"])
    assert result.exit_code == 2 and "'l3' is not one of" in result.output

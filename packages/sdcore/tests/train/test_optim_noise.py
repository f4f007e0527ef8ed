"""Optimizers by name, --optimizer-args parsing, LR schedules, noise/targets/min-SNR."""

import importlib.util
import itertools

import pytest
import torch
from sdcore.errors import ConfigError
from sdcore.models.tiny import noise_scheduler_config
from sdcore.train.noise import min_snr_weights, sample_noise, snr, training_target
from sdcore.train.optim import create_optimizer, create_scheduler, parse_optimizer_args


def test_parse_optimizer_args():
    args = parse_optimizer_args("weight_decay=0.01 betas=0.9,0.99 decouple=True eps=1e-8 name=x")
    assert args == {"weight_decay": 0.01, "betas": (0.9, 0.99), "decouple": True, "eps": 1e-8, "name": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_optimizer_args("weight_decay")


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion", "prodigy", "adafactor"])
def test_optimizers_step(name):
    if (
        name in ("lion", "prodigy")
        and importlib.util.find_spec({"lion": "lion_pytorch", "prodigy": "prodigyopt"}[name]) is None
    ):
        pytest.skip(f"{name} not installed")
    p = torch.nn.Parameter(torch.ones(3))
    opt = create_optimizer(name, [{"params": [p], "name": "g"}], lr=0.1 if name != "prodigy" else 1.0)
    (p**2).sum().backward()
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3))


def test_adamw8bit_without_bitsandbytes_is_a_clear_config_error():
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes installed")
    with pytest.raises(ConfigError, match="bitsandbytes"):
        create_optimizer("adamw8bit", [{"params": [torch.nn.Parameter(torch.ones(1))]}], lr=1e-3)


def test_bad_optimizer_args_are_config_errors():
    with pytest.raises(ConfigError, match="adamw"):
        create_optimizer("adamw", [{"params": [torch.nn.Parameter(torch.ones(1))]}], lr=1e-3, args="bogus=1")


def _lrs(name, steps=10, warmup=2, **kw):
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = create_scheduler(name, opt, total_steps=steps, warmup_steps=warmup, **kw)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules():
    assert _lrs("constant", warmup=0) == [1.0] * 10
    assert _lrs("constant", warmup=2)[:3] == [0.0, 0.5, 1.0]  # constant + warmup means warmup
    cos = _lrs("cosine")
    assert cos[:3] == [0.0, 0.5, 1.0] and cos[-1] < 0.1 and all(a >= b for a, b in itertools.pairwise(cos[2:]))
    lin = _lrs("linear", warmup=0)
    assert lin[0] == 1.0 and lin[5] == pytest.approx(0.5)
    poly = _lrs("polynomial", warmup=0, power=2.0)
    assert poly[5] < lin[5]


def test_noise_is_seeded_per_sample_not_per_batch():
    n1, t1 = sample_noise([11, 22], (4, 8, 8))
    n2, t2 = sample_noise([22], (4, 8, 8))
    assert torch.equal(n1[1], n2[0]) and t1[1] == t2[0]
    assert not torch.equal(n1[0], n1[1])
    assert ((t1 >= 0) & (t1 < 1000)).all()


def test_noise_offset_shifts_channel_means():
    keys = list(range(64))
    plain, _ = sample_noise(keys, (4, 8, 8))
    offset, _ = sample_noise(keys, (4, 8, 8), noise_offset=0.5)
    spread_plain = plain.mean(dim=(2, 3)).std()
    spread_offset = offset.mean(dim=(2, 3)).std()
    assert spread_offset > 3 * spread_plain


def test_v_target_and_min_snr():
    from diffusers import DDPMScheduler

    eps_sched = DDPMScheduler(**noise_scheduler_config("epsilon"))
    v_sched = DDPMScheduler(**noise_scheduler_config("v_prediction"))
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.equal(training_target(eps_sched, latents, noise, t), noise)
    a = eps_sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - eps_sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(training_target(v_sched, latents, noise, t), a * noise - s * latents, atol=1e-6)
    ratio = snr(eps_sched, t)
    w_eps = min_snr_weights(eps_sched, t, 5.0)
    w_v = min_snr_weights(v_sched, t, 5.0)
    assert ratio[0] > 5 > ratio[1]
    assert w_eps[0] == pytest.approx(5.0 / float(ratio[0])) and w_eps[1] == pytest.approx(1.0)
    assert w_v[0] == pytest.approx(5.0 / (float(ratio[0]) + 1)) and w_v[1] == pytest.approx(
        float(ratio[1] / (ratio[1] + 1))
    )

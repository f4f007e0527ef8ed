"""ai-toolkit's flow-matching timesteps in sdcore (``--timestep-sampling linear_table|shift_table``,
``--dynamic-timestep-shift``) and the ``timestep_type``/``loss_type`` values of its jobs that stay refused.

The reference is rewritten here from ostris/ai-toolkit (mirror HEAD): ``toolkit/sampler.py`` (the scheduler
configurations ``flux_config``: dynamic shifting, ``sd_flow_config``: shift 3.0),
``toolkit/samplers/custom_flowmatch_sampler.py`` (``set_train_timesteps``: the ``linear`` and the ``shift``/
``flux_shift`` tables, ``calculate_shift``) and ``jobs/process/BaseSDTrainProcess.py`` (``content_or_style``
balanced on flowmatch: ``randint(min_denoising_steps, max_denoising_steps)`` = an index in [0, 999) of the
table; the noise level is ``timestep / 1000``). diffusers' own ``FlowMatchEulerDiscreteScheduler`` gives the
table's ends, as it does in ai-toolkit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from runtime_methods import ConvOutMethod, ProjOutMethod
from sdcore.testing.contract import contract_options
from sdcore.train.loop import TrainSession
from sdcore.train.objectives import FlowMatchingObjective, aitoolkit_lognorm_blend_table, aitoolkit_timestep_table

T = 1000
#: toolkit/sampler.py's scheduler configurations (the fields that matter here)
FLUX_CONFIG = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
               "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}  # fmt: skip
SD_FLOW_CONFIG = {**FLUX_CONFIG, "use_dynamic_shifting": False}


def ref_table(kind: str, config: dict, latent_size: tuple[int, int] | None = None) -> torch.Tensor:
    """``set_train_timesteps(1000, timestep_type=kind, latents, patch_size=2)``'s ``self.timesteps``."""
    if kind == "linear":
        return torch.linspace(1000, 1, T)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    timesteps = np.linspace(scheduler._sigma_to_t(scheduler.sigma_max), scheduler._sigma_to_t(scheduler.sigma_min), T)
    sigmas = timesteps / scheduler.config.num_train_timesteps
    if scheduler.config.use_dynamic_shifting:
        assert latent_size is not None
        h, w = latent_size
        seq = h * w // (2**2)  # Flux: patch size 2
        m = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
        mu = seq * m + (config["base_shift"] - m * config["base_image_seq_len"])
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    else:
        shift = scheduler.shift
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.from_numpy(sigmas).to(torch.float32) * T


@pytest.mark.parametrize(
    ("sampling", "kind", "config", "shift", "dynamic", "size"),
    [
        ("linear_table", "linear", None, 1.0, False, None),
        ("shift_table", "shift", SD_FLOW_CONFIG, 3.0, False, None),
        ("shift_table", "flux_shift", FLUX_CONFIG, 1.0, True, (64, 64)),
        ("shift_table", "flux_shift", FLUX_CONFIG, 1.0, True, (48, 80)),
        ("shift_table", "shift", FLUX_CONFIG, 1.0, True, (128, 128)),
    ],
)  # fmt: skip
def test_tables_and_draws_are_ai_toolkits(sampling, kind, config, shift, dynamic, size):
    want = ref_table(kind, config, size)
    objective = FlowMatchingObjective(timestep_sampling=sampling, shift=shift, dynamic_shift=dynamic)
    latent = size or (32, 32)
    mu = None
    if dynamic:
        from sdcore.train.objectives import flux_shift_mu

        mu = flux_shift_mu(*latent)
    table = aitoolkit_timestep_table(sampling, shift, mu)
    assert table.dtype == torch.float32 and table.shape == (T,)
    torch.testing.assert_close(table, want, rtol=0, atol=1e-4)  # 1e-7 in sigma
    # each sample: randint(0, 999) from its generator, after its noise; sigma = table[i] / 1000, called with table[i]
    keys = list(range(20))
    _, steps = objective.sample(keys, (16, *latent))
    for i, key in enumerate(keys):
        gen = torch.Generator().manual_seed(key)
        torch.randn((16, *latent), generator=gen)
        index = int(torch.randint(0, T - 1, (1,), generator=gen))
        assert float(steps[i]) == pytest.approx(float(want[index]), abs=1e-3)
    # many draws: every one an entry of the table's first 999, each equally likely (KS over the indices)
    count = 20000
    sigmas = objective.sample_sigmas(count, torch.Generator().manual_seed(1), latent)
    distance = ((sigmas.double() * T)[:, None] - want.double()[None, :]).abs()
    nearest = distance.argmin(1)
    assert float(distance.min(1).values.max()) < 1e-3 and int(nearest.max()) <= T - 2
    got = torch.bincount(nearest, minlength=T).double().cumsum(0) / count
    uniform = torch.clamp(torch.arange(1, T + 1, dtype=torch.float64) / (T - 1), max=1.0)
    assert float((got - uniform).abs().max()) < 1.95 / math.sqrt(count)


def ref_lognorm_blend_table() -> torch.Tensor:
    """``set_train_timesteps(1000, timestep_type="lognorm_blend")``: from torch's global generator, as there."""
    from torch.distributions import LogNormal

    t1 = LogNormal(loc=0, scale=0.333).sample((int(1000 * 0.75),))
    t1 = (1 - t1 / t1.max()) * 1000
    t2 = torch.linspace(1000, 1, int(1000 * (1 - 0.75)))
    return torch.sort(torch.cat((t1, t2)), descending=True).values.to(torch.int)


def test_the_lognorm_blend_table_is_ai_toolkits():
    state = torch.get_rng_state()
    try:
        for seed in (0, 7, 123):
            torch.manual_seed(seed)
            want = ref_lognorm_blend_table()
            got = aitoolkit_lognorm_blend_table(torch.Generator().manual_seed(seed))
            assert got.dtype == torch.int32 and torch.equal(got, want)
        # the marginal of one drawn timestep: ai-toolkit's (a table per step, randint(0, 999) of it) against
        # sdcore's (a table per sample from its generator): two-sample Kolmogorov-Smirnov at 0.1 %
        count = 4000
        torch.manual_seed(99)
        ref = torch.stack([ref_lognorm_blend_table()[int(torch.randint(0, T - 1, (1,)))] for _ in range(count)])
    finally:
        torch.set_rng_state(state)
    objective = FlowMatchingObjective(timestep_sampling="lognorm_blend_table")
    drawn = objective.sample_sigmas(count, torch.Generator().manual_seed(5)) * T  # integer timesteps / T, times T
    assert float((drawn - drawn.round()).abs().max()) < 1e-3
    drawn = drawn.round()
    assert float(drawn.min()) >= 0 and float(drawn.max()) <= 1000
    grid = torch.arange(0, T + 1, dtype=torch.float64)
    cdf_ref = (ref.double()[None, :] <= grid[:, None]).double().mean(1)
    cdf_got = (drawn.double()[None, :] <= grid[:, None]).double().mean(1)
    assert float((cdf_ref - cdf_got).abs().max()) < 1.95 * math.sqrt(2 / count)
    # per sample: the noise, then the table, then the index, all from the sample's generator
    _, steps = objective.sample([3, 4], (4, 8, 8))
    for i, key in enumerate((3, 4)):
        gen = torch.Generator().manual_seed(key)
        torch.randn((4, 8, 8), generator=gen)
        table = aitoolkit_lognorm_blend_table(gen)
        assert float(steps[i]) == pytest.approx(float(table[int(torch.randint(0, T - 1, (1,), generator=gen))]))


def test_the_dynamic_table_follows_the_resolution():
    small = FlowMatchingObjective(timestep_sampling="shift_table", dynamic_shift=True)
    a = small.sample_sigmas(4000, torch.Generator().manual_seed(0), (32, 32))  # 256 tokens: exp(0.5)
    b = small.sample_sigmas(4000, torch.Generator().manual_seed(0), (128, 128))  # 4096 tokens: exp(1.15)
    # the same indices, shifted further towards noise at the larger size
    assert bool((b >= a).all()) and float(b.mean()) > float(a.mean()) + 0.05
    with pytest.raises(Exception, match="needs the latents' size"):
        small.sample_sigmas(1, torch.Generator().manual_seed(0))


# --- ai-toolkit jobs ---------------------------------------------------------------------------------------


def _job(tmp_path: Path, model: dict, train: dict) -> Path:
    path = tmp_path / "job.json"
    process = {"type": "sd_trainer", "model": model, "datasets": [{"folder_path": "imgs"}], "train": train}
    path.write_text(json.dumps({"job": "extension", "config": {"name": "run", "process": [process]}}), encoding="utf-8")
    return path


def _load(path: Path):
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    return load_options(LoraOptions, path, notes=[])


FLUX = {"name_or_path": "tiny:flux", "is_flux": True}
SD3 = {"name_or_path": "tiny:sd3", "is_v3": True}
FLOW = {"noise_scheduler": "flowmatch"}


@pytest.mark.parametrize(
    ("model", "kind", "expected"),
    [
        (FLUX, "shift", ("shift_table", 1.0, True)),
        (FLUX, "flux_shift", ("shift_table", 1.0, True)),
        (SD3, "shift", ("shift_table", 3.0, False)),
        (SD3, "flux_shift", ("shift_table", 3.0, False)),
        (FLUX, "linear", ("linear_table", 1.0, False)),
        (SD3, "lognorm_blend", ("lognorm_blend_table", 1.0, False)),
    ],
)
def test_timestep_types_map_to_the_tables(tmp_path, model, kind, expected):
    o = _load(_job(tmp_path, model, {**FLOW, "timestep_type": kind}))
    assert (o.timestep_sampling, o.discrete_flow_shift, o.dynamic_timestep_shift) == expected
    assert (o.model_prediction_type, o.weighting_scheme, o.timestep_distribution) == ("raw", "uniform", None)


def test_the_rest_stays_refused_with_the_reason(tmp_path):
    from sdcore.errors import ConfigError

    for train, expected in (
        ({**FLOW, "timestep_type": "weighted"}, "1000 values measured on Flex.1-alpha"),
        ({**FLOW, "loss_type": "pseudo_huber"}, "--loss-type mix has no pseudo-Huber term"),
    ):
        with pytest.raises(ConfigError) as info:
            _load(_job(tmp_path, FLUX, train))
        assert len(info.value.problems) == 1 and expected in info.value.problems[0], info.value.problems


def test_lognorm_blend_says_sdcore_draws_a_table_per_sample(tmp_path):
    notes: list[str] = []
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    path = _job(tmp_path, FLUX, {**FLOW, "timestep_type": "lognorm_blend", "batch_size": 2})
    o = load_options(LoraOptions, path, notes=notes)
    assert o.timestep_sampling == "lognorm_blend_table" and o.batch_size == 2
    assert any("one table per step for the whole batch; sdcore draws one per sample" in n for n in notes), notes


def test_a_shift_table_job_trains_on_tiny_flux(tmp_path):
    o = _load(_job(tmp_path, FLUX, {**FLOW, "timestep_type": "flux_shift"}))
    kw = {name: getattr(o, name) for name in ("timestep_sampling", "discrete_flow_shift", "dynamic_timestep_shift")}
    options = contract_options(ProjOutMethod, tmp_path, {"max_steps": 2, "save_state": False, **kw}, family="flux")
    s = TrainSession(ProjOutMethod(options), bundle=None)
    s.setup()
    seen: list[tuple[torch.Tensor, tuple[int, int]]] = []
    original = s.objective.draw_for

    def recording(refs, batch, *args, **kwargs):
        out = original(refs, batch, *args, **kwargs)
        seen.append((out[1], tuple(out[0].shape[-2:])))
        return out

    s.objective.draw_for = recording
    result = s.run()
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses) and seen
    for steps, size in seen:  # each drawn timestep is an entry of ai-toolkit's Flux table for the latents' size
        want = ref_table("flux_shift", FLUX_CONFIG, size).double()
        assert float((steps.double()[:, None] - want[None, :-1]).abs().min(1).values.max()) < 1e-3


def test_preflight_says_where_the_shifts_do_nothing(tmp_path):
    from sdcore.train.preflight import objective_option_checks, option_problems

    o = contract_options(ConvOutMethod, tmp_path, {"timestep_sampling": "linear_table", "discrete_flow_shift": 3.0})
    _, notes = objective_option_checks(o, "sd3")
    assert any("linear_table (ai-toolkit does not shift this table" in n for n in notes), notes
    o = contract_options(ConvOutMethod, tmp_path, {"timestep_sampling": "shift_table", "dynamic_timestep_shift": True,
                                                   "discrete_flow_shift": 3.0})  # fmt: skip
    _, notes = objective_option_checks(o, "flux")
    assert any("--discrete-flow-shift: without effect with --dynamic-timestep-shift" in n for n in notes), notes
    o = contract_options(ConvOutMethod, tmp_path, {"timestep_sampling": "shift_table", "min_timestep": 100})
    problems, _ = objective_option_checks(o, "sd3")
    assert any("ai-toolkit's tables are drawn from their first 999 entries" in p for p in problems), problems
    assert not [p for p in option_problems(o) if "--timestep-sampling 'shift_table'" in p]  # a valid choice

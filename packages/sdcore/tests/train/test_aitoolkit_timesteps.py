"""ai-toolkit's flow-matching timesteps in sdcore (``--timestep-sampling linear_table|shift_table|
lognorm_blend_table|sigmoid_table``, ``--dynamic-timestep-shift``, ``--min/--max-table-index``), its
``linear_timesteps`` and ``weighted`` loss weights (``--timestep-loss-weight``), ``arch: flex1``, and the
``timestep_type``/``loss_type``/``arch`` values of its jobs that stay refused.

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
    process = {"type": "sd_trainer", "model": model, "datasets": [{"folder_path": "imgs"}], "train": train,
               "network": {"type": "lora", "linear": 16, "linear_alpha": 16}}  # fmt: skip
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
        ({**FLOW, "timestep_type": "next_sample"}, "sdcore does not train on the next sampling step"),
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
    assert any("ai-toolkit's tables are narrowed by --min-table-index/--max-table-index" in p for p in problems)
    assert not [p for p in option_problems(o) if "--timestep-sampling 'shift_table'" in p]  # a valid choice


# --- linear_timesteps' loss weight, min/max_denoising_steps, the sigmoid table, flex1 -------------------------


def ref_bell_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """``CustomFlowMatchEulerDiscreteScheduler.__init__``'s ``linear_timesteps_weights`` (bsmntw) and
    ``linear_timesteps_weights2`` (hbsmntw), rewritten: one weight per index of linspace(1000, 1, 1000)."""
    x = torch.arange(T, dtype=torch.float32)
    y = torch.exp(-2 * ((x - T / 2) / T) ** 2)
    shifted = y - y.min()
    bell = shifted * (T / shifted.sum())
    half = bell.clone()
    half[T // 2 :] = half[T // 2 :].max()
    return bell, half


def test_the_bell_weights_are_ai_toolkits():
    from sdcore.train.loss import bell_timestep_weights

    bell, half = ref_bell_tables()
    sigmas = torch.linspace(1000, 1, T) / T  # get_weights_for_timesteps: the weight of the timestep's index
    torch.testing.assert_close(bell_timestep_weights(sigmas), bell, rtol=0, atol=1e-6)
    torch.testing.assert_close(bell_timestep_weights(sigmas, half=True), half, rtol=0, atol=1e-6)
    assert float(bell.mean()) == pytest.approx(1.0, abs=1e-5) and float(bell[0]) == 0.0  # the noisiest: weight 0
    assert float(half[600]) == float(half.max()) and float(half[100]) < float(half.max()) - 0.5


def test_the_bell_weight_multiplies_the_flow_loss(tmp_path):
    from sdcore.train.loss import apply_loss_weights

    bell, half = ref_bell_tables()
    objective = FlowMatchingObjective(timestep_sampling="linear_table")
    index = torch.tensor([0, 250, 500, 998])
    timesteps = torch.linspace(1000, 1, T)[index]
    loss = torch.tensor([0.5, 1.0, 2.0, 3.0])
    for weight, table in (("bell", bell), ("half_bell", half), ("none", torch.ones(T))):
        o = contract_options(ConvOutMethod, tmp_path, {"timestep_loss_weight": weight})
        got = apply_loss_weights(o, objective, loss, timesteps)
        torch.testing.assert_close(got, loss * table[index], rtol=1e-6, atol=1e-6)


def _indices(sigmas: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    distance = ((sigmas.double() * T)[:, None] - table.double()[None, :]).abs()
    assert float(distance.min(1).values.max()) < 1e-3
    return distance.argmin(1)


@pytest.mark.parametrize(("sampling", "low", "high"), [("linear_table", 100, 400), ("shift_table", 0, 500)])
def test_the_index_range_is_drawn_uniformly(sampling, low, high):
    objective = FlowMatchingObjective(timestep_sampling=sampling, shift=3.0, min_table_index=low, max_table_index=high)
    table = aitoolkit_timestep_table(sampling, 3.0)
    count = 20000
    index = _indices(objective.sample_sigmas(count, torch.Generator().manual_seed(2)), table)
    assert int(index.min()) == low and int(index.max()) == high - 1
    got = torch.bincount(index - low, minlength=high - low).double().cumsum(0) / count
    uniform = torch.arange(1, high - low + 1, dtype=torch.float64) / (high - low)
    assert float((got - uniform).abs().max()) < 1.95 / math.sqrt(count)  # KS at 0.1 %
    # per sample: the noise, then randint(low, high) from the sample's generator
    _, steps = objective.sample([5, 6], (16, 8, 8))
    for i, key in enumerate((5, 6)):
        gen = torch.Generator().manual_seed(key)
        torch.randn((16, 8, 8), generator=gen)
        assert float(steps[i]) == pytest.approx(float(table[int(torch.randint(low, high, (1,), generator=gen))]))


def ref_sigmoid_table() -> torch.Tensor:
    """``set_train_timesteps(1000, timestep_type="sigmoid")``: from torch's global generator, as there."""
    t = torch.sigmoid(torch.randn((T,)))
    return torch.sort((1 - t) * 1000, descending=True).values


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def test_the_sigmoid_table_is_ai_toolkits_and_differs_from_the_continuous_draw_by_its_range():
    from sdcore.train.objectives import aitoolkit_sigmoid_table

    state = torch.get_rng_state()
    try:
        for seed in (0, 11):
            torch.manual_seed(seed)
            want = ref_sigmoid_table()
            torch.testing.assert_close(aitoolkit_sigmoid_table(torch.Generator().manual_seed(seed)), want)
        # ai-toolkit's draw with min/max_denoising_steps 0/500: a table per step, randint(0, 500) of it
        count = 4000
        torch.manual_seed(3)
        ref = torch.stack([ref_sigmoid_table()[int(torch.randint(0, 500, (1,)))] for _ in range(count)]) / T
    finally:
        torch.set_rng_state(state)
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    inner = grid[1:-1]
    # the continuous sigmoid's CDF of sigma = 1 - sigmoid(N): Phi(logit(s)); the table's over [0, 999) leaves out
    # the least noisy of 1000 order statistics: G = (1000 F - 1 + (1 - F)^1000) / 999, within 1/999 of F
    f = _normal_cdf(torch.log(inner / (1 - inner)))
    g = (1000 * f - 1 + (1 - f) ** 1000) / 999
    assert 0.9 / 999 < float((g - f).abs().max()) <= 1 / 999
    default = FlowMatchingObjective(timestep_sampling="sigmoid_table")
    drawn = default.sample_sigmas(count, torch.Generator().manual_seed(4)).double()
    empirical = (drawn[None, :] <= inner[:, None]).double().mean(1)
    assert float((empirical - g).abs().max()) < 1.95 / math.sqrt(count)  # KS at 0.1 % against G
    # the range: sdcore's table draw matches ai-toolkit's (two-sample KS); the continuous sigmoid is far off
    ranged = FlowMatchingObjective(timestep_sampling="sigmoid_table", max_table_index=500)
    ours = ranged.sample_sigmas(count, torch.Generator().manual_seed(6)).double()
    cdf_ref = (ref.double()[None, :] <= grid[:, None]).double().mean(1)
    cdf_ours = (ours[None, :] <= grid[:, None]).double().mean(1)
    assert float((cdf_ref - cdf_ours).abs().max()) < 1.95 * math.sqrt(2 / count)
    continuous = FlowMatchingObjective(timestep_sampling="sigmoid").sample_sigmas(
        count, torch.Generator().manual_seed(7)
    )
    cdf_cont = (continuous.double()[None, :] <= grid[:, None]).double().mean(1)
    assert float((cdf_ref - cdf_cont).abs().max()) > 0.3
    assert float(ours.min()) > 0.2  # the noisier half of each table


def test_linear_timesteps_and_denoising_steps_translate(tmp_path):
    cases = [
        ({"linear_timesteps": True}, ("linear_table", "bell", 0, 999, 1.0, False)),
        ({"linear_timesteps2": True}, ("linear_table", "half_bell", 0, 999, 1.0, False)),
        ({"linear_timesteps": True, "linear_timesteps2": True}, ("linear_table", "half_bell", 0, 999, 1.0, False)),
        # BaseSDTrainProcess: linear_timesteps replaces the shift table with the linear one
        ({"linear_timesteps": True, "timestep_type": "shift"}, ("linear_table", "bell", 0, 999, 1.0, False)),
        ({"min_denoising_steps": 200, "max_denoising_steps": 700}, ("sigmoid_table", "none", 200, 700, 1.0, False)),
        ({"min_denoising_steps": -5, "max_denoising_steps": 5000}, ("sigmoid_table", "none", 0, 999, 1.0, False)),
        ({"timestep_type": "flux_shift", "min_denoising_steps": 300, "max_denoising_steps": 300},
         ("shift_table", "none", 300, 301, 1.0, True)),  # equal: always that index
    ]  # fmt: skip
    for train, expected in cases:
        o = _load(_job(tmp_path, FLUX, {**FLOW, **train}))
        got = (o.timestep_sampling, o.timestep_loss_weight, o.min_table_index, o.max_table_index,
               o.discrete_flow_shift, o.dynamic_timestep_shift)  # fmt: skip
        assert got == expected, train
    from sdcore.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _load(_job(tmp_path, FLUX, {**FLOW, "min_denoising_steps": 600, "max_denoising_steps": 500}))
    assert any("randint(600, 500) needs min <= max" in p for p in info.value.problems)
    notes: list[str] = []
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    load_options(LoraOptions, _job(tmp_path, FLUX, {**FLOW, "batch_size": 2}), notes=notes)
    assert any("timestep_type sigmoid: ai-toolkit draws one table per step" in n for n in notes), notes


def test_preflight_checks_the_new_options(tmp_path):
    from sdcore.train.loss import loss_family_checks
    from sdcore.train.preflight import objective_option_checks, option_problems

    o = contract_options(ConvOutMethod, tmp_path, {"min_table_index": 500, "max_table_index": 400})
    assert any("--min-table-index 500 / --max-table-index 400: need 0 <= min < max <= 1000" in p
               for p in option_problems(o))  # fmt: skip
    o = contract_options(ConvOutMethod, tmp_path, {"timestep_sampling": "logit_normal", "max_table_index": 500})
    _, notes = objective_option_checks(o, "flux")
    assert any("--min-table-index/--max-table-index" in n and "without effect with --timestep-sampling logit_normal"
               in n for n in notes), notes  # fmt: skip
    o = contract_options(ConvOutMethod, tmp_path, {"timestep_loss_weight": "bell"})
    problems, _ = loss_family_checks(o, "sd1", "epsilon")
    assert any("--timestep-loss-weight bell: ai-toolkit's weight of a flow-matching noise level" in p for p in problems)
    assert not loss_family_checks(o, "flux", "flow")[0]


def test_flex1_is_flux_and_loads_with_8_double_blocks(tmp_path):
    """config_modules: arch flex1 becomes flux. Flex.1-alpha is a FLUX.1 with 8 double blocks and the guidance
    embedding: a BFL-layout file of that shape (no sdcore metadata) loads as a Flux with those counts."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file
    from sdcore.models.flux.convert import diffusers_to_bfl
    from sdcore.models.flux.tiny import transformer_config
    from sdcore.models.load import load_model

    o = _load(_job(tmp_path, {"name_or_path": "tiny:flux", "arch": "flex1"}, FLOW))
    assert (o.key_layout, o.split_qkv, o.timestep_sampling) == ("diffusers", True, "sigmoid_table")
    torch.manual_seed(0)
    flex = FluxTransformer2DModel(**{**transformer_config("dev"), "num_layers": 8})
    path = tmp_path / "flex1.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl(flex.state_dict()).items()}, str(path))
    bundle = load_model(path)
    config = bundle.transformer.config
    assert (bundle.family, config.num_layers, config.num_single_layers, config.guidance_embeds) == ("flux", 8, 2, True)
    theirs = flex.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in bundle.transformer.state_dict().items())


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"arch": "flex2"}, "control and inpainting latents as extra input channels"),
        ({"arch": "ssd"}, "Segmind SSD-1B is a distilled SDXL"),
        ({"is_vega": True}, "is_vega: sdcore does not train this model family: Segmind Vega is a distilled SDXL"),
        ({"arch": "lumina2"}, "model.arch 'lumina2': sdcore does not train this model family (it trains"),
    ],
)
def test_other_arches_are_refused_with_their_family(tmp_path, model, expected):
    from sdcore.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _load(_job(tmp_path, {"name_or_path": "tiny:flux", **model}, FLOW))
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_a_linear_timesteps_job_trains_on_tiny_flux_with_the_weights(tmp_path, monkeypatch):
    import sdcore.train.loss as loss_module

    train = {**FLOW, "linear_timesteps2": True, "min_denoising_steps": 100, "max_denoising_steps": 600}
    o = _load(_job(tmp_path, FLUX, train))
    names = ("timestep_sampling", "timestep_loss_weight", "min_table_index", "max_table_index")
    kw = {name: getattr(o, name) for name in names}
    assert tuple(kw.values()) == ("linear_table", "half_bell", 100, 600)
    options = contract_options(ProjOutMethod, tmp_path, {"max_steps": 2, "save_state": False, **kw}, family="flux")
    s = TrainSession(ProjOutMethod(options), bundle=None)
    s.setup()
    weighed: list[tuple[torch.Tensor, bool]] = []
    original = loss_module.bell_timestep_weights

    def recording(sigmas, half=False, num_timesteps=1000):
        weighed.append((sigmas.detach().cpu().clone(), half))
        return original(sigmas, half, num_timesteps)

    monkeypatch.setattr(loss_module, "bell_timestep_weights", recording)
    result = s.run()
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses) and weighed
    for sigmas, half in weighed:  # every weighed sample: an entry 100..599 of the linear table, the half bell
        index = _indices(sigmas, torch.linspace(1000, 1, T))
        assert half and int(index.min()) >= 100 and int(index.max()) <= 599


# --- timestep_type weighted: the linear table with ai-toolkit's measured loss weights -----------------------------

#: entries of ai-toolkit's default_weighing_scheme (toolkit/timestep_weighing/default_weighing_scheme.py at
#: 27a03a91), typed from the source: index -> value
WEIGHING_SCHEME_ENTRIES = {0: 0.905706524848938, 1: 0.9097874164581299, 16: 1.1399472951889038,
                           500: 0.9254037141799927, 998: 0.4453802704811096, 999: 0.4472601115703583}  # fmt: skip


def _weights_file() -> list[float]:
    """The shipped data file, read here on its own terms: comment lines, then one value a line."""
    from importlib import resources

    text = resources.files("sdcore.train").joinpath("aitoolkit_data/timestep_weights.txt").read_text("utf-8")
    return [float(line) for line in text.splitlines() if line and not line.startswith("#")]


def test_the_weighted_table_is_ai_toolkits_with_its_license_beside_it():
    from importlib import resources

    from sdcore.train.loss import weighted_table

    values = _weights_file()
    assert len(values) == T and tuple(values) == weighted_table()
    for index, value in WEIGHING_SCHEME_ENTRIES.items():
        assert values[index] == value, index
    assert sum(values) / T == pytest.approx(1.0, abs=1e-6)  # measured weights normalised to mean 1
    folder = resources.files("sdcore.train").joinpath("aitoolkit_data")
    header = folder.joinpath("timestep_weights.txt").read_text("utf-8")
    assert "toolkit/timestep_weighing/default_weighing_scheme.py" in header
    assert "27a03a91f23eb1b757d5ec2e80ee3e129cfcc350" in header and "Copyright (c) 2024 Ostris, LLC" in header
    license_text = folder.joinpath("LICENSE-ai-toolkit.txt").read_text("utf-8")
    assert license_text.startswith("MIT License") and "Permission is hereby granted, free of charge" in license_text


def test_the_wheel_ships_the_weighted_table():
    """hatchling's own file selection for sdcore's wheel (what ``pip install`` gets) holds the table and license."""
    from hatchling.builders.wheel import WheelBuilder  # a dev requirement (requirements-dev.txt)

    root = Path(__file__).parents[2]  # packages/sdcore
    assert (root / "pyproject.toml").is_file()
    shipped = {f.distribution_path for f in WheelBuilder(str(root)).recurse_included_files()}
    assert {"sdcore/train/aitoolkit_data/timestep_weights.txt",
            "sdcore/train/aitoolkit_data/LICENSE-ai-toolkit.txt"} <= shipped  # fmt: skip


def test_the_weighted_loss_weight_is_the_table_at_the_drawn_index(tmp_path):
    """``weighted``: set_train_timesteps builds linspace(1000, 1, 1000), the index is randint(min, max) of it
    (balanced), and get_weights_for_timesteps(timestep_type="weighted") takes the table's entry at that index."""
    from sdcore.train.loss import apply_loss_weights

    table = torch.tensor(_weights_file())
    objective = FlowMatchingObjective(timestep_sampling="linear_table", min_table_index=10, max_table_index=990)
    keys = list(range(40, 72))
    _, steps = objective.sample(keys, (16, 8, 8))
    index = []
    for key in keys:  # the sample's generator: its noise, then randint(10, 990) (recomputed here)
        gen = torch.Generator().manual_seed(key)
        torch.randn((16, 8, 8), generator=gen)
        index.append(int(torch.randint(10, 990, (1,), generator=gen)))
    want_index = torch.tensor(index)
    assert torch.equal(steps, torch.linspace(1000, 1, T)[want_index] / T * T)
    loss = torch.rand(len(keys), generator=torch.Generator().manual_seed(0)) + 0.5
    o = contract_options(ConvOutMethod, tmp_path, {"timestep_loss_weight": "weighted_table"})
    got = apply_loss_weights(o, objective, loss, steps)
    torch.testing.assert_close(got, loss * table[want_index], rtol=0, atol=0)
    # the typed entries, through the weight function at their timesteps 1000 - i
    for i, value in WEIGHING_SCHEME_ENTRIES.items():
        one = apply_loss_weights(o, objective, torch.ones(1), torch.tensor([float(T - i)]))
        assert float(one) == pytest.approx(value, rel=1e-7), i


def test_the_weighted_table_takes_the_nearest_entry_of_other_noise_levels():
    from sdcore.train.loss import weighted_table_timestep_weights

    table = torch.tensor(_weights_file())
    sigmas = torch.tensor([1.0, 0.9996, 0.9994, 0.5, 0.0014, 0.0006, 0.0])
    index = [0, 0, 1, 500, 999, 999, 999]  # round(1000 (1 - s)), held to the table
    torch.testing.assert_close(weighted_table_timestep_weights(sigmas), table[index], rtol=0, atol=0)


def test_weighted_translates_to_the_linear_table_with_the_measured_weights(tmp_path):
    cases = [
        (FLUX, {}, ("linear_table", "weighted_table", 0, 999, 1.0, False)),
        (SD3, {}, ("linear_table", "weighted_table", 0, 999, 1.0, False)),  # linear: SD3's shift 3 not applied
        # SDTrainer: timestep_type weighted wins over linear_timesteps(2)'s bells (get_weights_for_timesteps)
        (FLUX, {"linear_timesteps2": True}, ("linear_table", "weighted_table", 0, 999, 1.0, False)),
        (FLUX, {"min_denoising_steps": 100, "max_denoising_steps": 900},
         ("linear_table", "weighted_table", 100, 900, 1.0, False)),
    ]  # fmt: skip
    for model, train, expected in cases:
        o = _load(_job(tmp_path, model, {**FLOW, "timestep_type": "weighted", **train}))
        got = (o.timestep_sampling, o.timestep_loss_weight, o.min_table_index, o.max_table_index,
               o.discrete_flow_shift, o.dynamic_timestep_shift)  # fmt: skip
        assert got == expected, (model, train)
    # the other types keep their weights
    assert _load(_job(tmp_path, FLUX, {**FLOW, "timestep_type": "linear"})).timestep_loss_weight == "none"


def test_preflight_notes_the_weighted_table_off_its_linear_table(tmp_path):
    from sdcore.train.loss import loss_family_checks

    o = contract_options(ConvOutMethod, tmp_path, {"timestep_loss_weight": "weighted_table"})
    problems, _ = loss_family_checks(o, "sd1", "epsilon")
    assert any("--timestep-loss-weight weighted_table: ai-toolkit's weight of a flow-matching" in p for p in problems)
    o = contract_options(ConvOutMethod, tmp_path, {"timestep_loss_weight": "weighted_table",
                                                   "timestep_sampling": "linear_table"})  # fmt: skip
    assert loss_family_checks(o, "flux", "flow") == ([], [])
    o = contract_options(ConvOutMethod, tmp_path, {"timestep_loss_weight": "weighted_table",
                                                   "timestep_sampling": "logit_normal"})  # fmt: skip
    problems, notes = loss_family_checks(o, "sd3", "flow")
    assert not problems
    assert any("weighted_table with --timestep-sampling logit_normal: ai-toolkit applies these weights" in n
               for n in notes), notes  # fmt: skip


def test_a_weighted_job_trains_on_tiny_flux_with_the_table_weights(tmp_path, monkeypatch):
    """One step of a ``weighted`` job against the same step unweighted (same seed: the same draws): each
    sample's loss is the unweighted one times the table's entry at its drawn index, and the step's loss is
    their mean."""
    import sdcore.train.loss as loss_module

    o = _load(_job(tmp_path, FLUX, {**FLOW, "timestep_type": "weighted"}))
    kw = {name: getattr(o, name) for name in ("timestep_sampling", "timestep_loss_weight")}
    assert kw == {"timestep_sampling": "linear_table", "timestep_loss_weight": "weighted_table"}
    table = torch.tensor(_weights_file())
    original = loss_module.apply_loss_weights

    def run(weight: str, tag: str) -> tuple[list[float], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def recording(options, objective, loss, timesteps):
            out = original(options, objective, loss, timesteps)
            seen.append((loss.detach().clone(), timesteps.detach().clone(), out.detach().clone()))
            return out

        monkeypatch.setattr(loss_module, "apply_loss_weights", recording)
        overrides = {"max_steps": 1, "save_state": False, **kw, "timestep_loss_weight": weight}
        options = contract_options(ProjOutMethod, tmp_path, overrides, family="flux", tag=tag)
        s = TrainSession(ProjOutMethod(options), bundle=None)
        s.setup()
        result = s.run()
        assert result.steps == 1 and len(seen) == 1
        return result.losses, seen

    weighted_losses, weighted = run("weighted_table", "weighted")
    plain_losses, plain = run("none", "plain")
    (_, steps, out), (plain_in, plain_steps, plain_out) = weighted[0], plain[0]
    assert torch.equal(steps, plain_steps) and torch.equal(plain_in, plain_out)
    index = _indices(steps / T, torch.linspace(1000, 1, T))  # an entry of the linear table
    assert int(index.max()) <= 998
    want = plain_in * table[index]
    torch.testing.assert_close(out, want, rtol=1e-6, atol=0)
    assert weighted_losses[0] == pytest.approx(float(want.mean()), rel=1e-6)
    assert plain_losses[0] == pytest.approx(float(plain_in.mean()), rel=1e-6)
    assert weighted_losses[0] != pytest.approx(plain_losses[0], rel=1e-3)  # the weights changed the loss

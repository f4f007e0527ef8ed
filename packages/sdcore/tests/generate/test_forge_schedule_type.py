"""Forge's "Schedule type" on the flow families: sdcore writes the label only where its sampler's sigmas are the
ones Forge computes for it, and --from-png accepts only that label. Forge's sigmas are rewritten here from its
source (lllyasviel/stable-diffusion-webui-forge):

- backend/modules/k_prediction.py PredictionFlux: a table of 10000 sigmas ``exp(mu) / (exp(mu) + 1/t - 1)`` for
  t = k/10000, k = 1..10000, with mu fixed when the model loads: FLUX.1 dev ``calculate_shift(4096, 256, 4096,
  0.5, 1.15)`` = 1.15 (backend/diffusion_engine/flux.py), schnell and Chroma ``mu=1.0`` (flux.py, chroma.py);
  PredictionDiscreteFlow (SD3, backend/diffusion_engine/sd35.py ``shift=3.0``): ``shift*t / (1 + (shift-1)*t)``
  for t = timestep/1000, timesteps 1..1000; ``timestep(sigma)`` is ``sigma * 1000``;
- modules/sd_schedulers.py simple_scheduler (every ``len/n``-th table entry from the top, then 0) and
  normal_scheduler (``linspace(timestep(sigma_max), timestep(sigma_min), n)`` mapped back to sigmas, then 0).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sdcore.generate.flow_samplers import forge_schedule_type
from sdcore.models.load import load_model


def _flux_table(mu: float) -> list[float]:
    return [math.exp(mu) / (math.exp(mu) + 1 / (k / 10000) - 1) for k in range(1, 10001)]


def _forge_simple(table: list[float], n: int) -> list[float]:
    step = len(table) / n
    return [table[-(1 + int(x * step))] for x in range(n)] + [0.0]


def _forge_normal_sd3(n: int, shift: float = 3.0) -> list[float]:
    def sigma(timestep: float) -> float:
        t = timestep / 1000
        return shift * t / (1 + (shift - 1) * t)

    start, end = sigma(1000) * 1000, sigma(1) * 1000  # timestep(sigma_max), timestep(sigma_min)
    return [sigma(t) for t in np.linspace(start, end, n)] + [0.0]


def _sdcore_sigmas(bundle, sampler: str, steps: int, size: int) -> list[float]:
    """The sigmas sdcore's pipeline runs: its scheduler, set as the family's pipeline sets it."""
    from sdcore.models.family import family_adapter

    scheduler = family_adapter(bundle.family_spec).flow_scheduler_for(bundle, sampler)
    if bundle.family == "sd3":
        scheduler.set_timesteps(steps)
    else:  # FluxPipeline/ChromaPipeline: their own sigma list and the resolution's mu
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = bundle.noise_scheduler.config
        mu = calculate_shift((size // 16) ** 2, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))  # fmt: skip
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sigmas = [float(s) for s in scheduler.sigmas]
    order = 2 if sampler == "heun" else 1  # Heun lists each inner sigma twice
    return sigmas[:1] + sigmas[1:-1:order] + sigmas[-1:] if order == 2 else sigmas


@pytest.fixture(scope="module")
def models():
    return {name: load_model(f"tiny:{name}") for name in ("flux", "flux-schnell", "chroma", "sd3")}


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun"])
def test_flux_dev_at_4096_tokens_is_forges_simple(models, sampler):
    dev = models["flux"]
    assert forge_schedule_type(dev, sampler, (1024, 1024)) == "Simple"
    for steps in (20, 8):  # n divides Forge's 10000-entry table: the same numbers
        np.testing.assert_allclose(_sdcore_sigmas(dev, sampler, steps, 1024), _forge_simple(_flux_table(1.15), steps),
                                   rtol=0, atol=1e-5)  # fmt: skip
    # 28 steps: Forge takes entry int(x*10000/28), within 1/10000 of t = 1 - x/28, so within exp(mu)/10000 in
    # sigma (the shift's steepest slope, at t = 0)
    np.testing.assert_allclose(_sdcore_sigmas(dev, sampler, 28, 1024), _forge_simple(_flux_table(1.15), 28),
                               rtol=0, atol=math.exp(1.15) / 10000)  # fmt: skip


def test_flux_dev_at_other_sizes_and_schnell_and_chroma_are_not(models):
    """Forge keeps mu = 1.15 at every size (its TODO in PredictionFlux); diffusers shifts with the token count, so
    at Forge's own 896x1152 the sigmas differ by more than the table's resolution: no label, none accepted."""
    dev = models["flux"]
    assert forge_schedule_type(dev, "euler", (896, 1152)) is None
    ours = _sdcore_sigmas(dev, "euler", 20, 768)
    assert max(abs(a - b) for a, b in zip(ours, _forge_simple(_flux_table(1.15), 20), strict=True)) > 1e-3
    # schnell: diffusers' fixed shift 1 (no shift), Forge's exp(1); Chroma: diffusers' resolution shift, Forge's exp(1)
    for name in ("flux-schnell", "chroma"):
        assert forge_schedule_type(models[name], "euler", (1024, 1024)) is None
        ours = _sdcore_sigmas(models[name], "euler", 20, 1024)
        assert max(abs(a - b) for a, b in zip(ours, _forge_simple(_flux_table(1.0), 20), strict=True)) > 1e-3
    assert forge_schedule_type(dev, "dpm++2m", (1024, 1024)) is None  # its own flow sigmas


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun"])
def test_sd3_is_forges_normal(models, sampler):
    sd3 = models["sd3"]
    assert forge_schedule_type(sd3, sampler, (1024, 1024)) == forge_schedule_type(sd3, sampler, (64, 96)) == "Normal"
    for steps in (20, 7):
        np.testing.assert_allclose(_sdcore_sigmas(sd3, sampler, steps, 64), _forge_normal_sd3(steps), rtol=0, atol=1e-5)
    assert forge_schedule_type(sd3, "unipc", (1024, 1024)) is None


def test_from_png_follows_forges_label_where_sdcore_runs_it(models):
    """A Forge FLUX.1 PNG's "Schedule type: Simple" (its Flux preset, modules_forge/main_entry.py) is followed
    at 1024x1024 and said otherwise, with why; "Automatic" (Forge's predictor sigmas, ForgeScheduleLinker.
    get_sigmas) and "Beta" are never sdcore's; SD3's "Normal" is followed."""
    from sdcore.generate.pnginfo import parse_parameters
    from sdcore.generate.recall import recall_parameters

    def notes(model: str, schedule: str, size: tuple[int, int]) -> list[str]:
        text = f"x\nSteps: 20, Sampler: Euler, Schedule type: {schedule}, CFG scale: 1, Seed: 1, RNG: CPU"
        if model == "flux":
            text += ", Distilled CFG Scale: 3.5"
        recalled = recall_parameters(parse_parameters(text))
        return recalled.notes(models[model], sampler="euler", hires_sampler=None, distilled=model == "flux",
                              model_hash=None, size=size)  # fmt: skip

    assert notes("flux", "Simple", (1024, 1024)) == []
    assert notes("sd3", "Normal", (832, 1216)) == []
    (line,) = notes("flux", "Simple", (896, 1152))
    assert "Schedule type: Simple (" in line and "at 1024x1024 only" in line
    for model, schedule in (("flux", "Automatic"), ("flux", "Beta"), ("sd3", "Automatic"), ("sd3", "Simple"),
                            ("chroma", "Simple"), ("flux-schnell", "Simple")):  # fmt: skip
        (line,) = notes(model, schedule, (1024, 1024))
        assert f"Schedule type: {schedule} (sdcore's euler runs its own)" in line, (model, line)


def test_generate_writes_forges_label_where_exact(tmp_path):
    """SD3's Euler is Forge's "Normal" at every size: the PNG says it and reads back without a note; FLUX.1 at
    64x64 (16 tokens: diffusers' shift is not Forge's) writes none, as DPM++ 2M on SD3 (its own sigmas)."""
    import types

    from click.testing import CliRunner
    from sdcore.builtin.generate_command import generate
    from sdcore.generate.pnginfo import read_png_parameters
    from sdcore.plugins import get_plugin_manager

    obj = types.SimpleNamespace(pm=get_plugin_manager(builtins=False, entrypoints=False))
    base = ["a ring", "--steps", "1", "--size", "32x48", "--seed", "1"]
    for model, sampler, expected in (("tiny:sd3", "euler", "Normal"), ("tiny:sd3", "dpm++2m", None),
                                     ("tiny:flux", "euler", None)):  # fmt: skip
        out = tmp_path / f"{model[5:]}-{sampler}.png"
        result = CliRunner().invoke(generate, [*base, "-m", model, "--sampler", sampler, "-o", str(out)], obj=obj)
        assert result.exit_code == 0, result.output
        params = read_png_parameters(out)
        assert params is not None and params.extra.get("Schedule type") == expected, (model, sampler)
    again = CliRunner().invoke(generate, ["-m", "tiny:sd3", "--from-png", str(tmp_path / "sd3-euler.png"), "-o",
                                          str(tmp_path / "again.png")], obj=obj)  # fmt: skip
    assert again.exit_code == 0, again.output
    assert "Schedule type" not in again.output
    assert read_png_parameters(tmp_path / "again.png").extra.get("Schedule type") == "Normal"

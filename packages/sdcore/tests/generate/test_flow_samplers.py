"""The flow samplers on schedules with a resolution shift (sdcore.generate.flow_samplers)."""

import copy

import pytest
import torch


def _timesteps(module, run):
    seen = []
    handle = module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(round(float(torch.as_tensor(kwargs["timestep"]).flatten()[0]), 4)),
        with_kwargs=True,
    )
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_heun_on_sd3_with_a_dynamic_shift_uses_the_pipelines_mu(loaded_tiny):
    """An SD3 schedule with use_dynamic_shifting (the pipeline computes mu only when its scheduler's config says
    so): Heun evaluates Euler's timesteps under the same mu (each but the first twice) instead of failing in
    diffusers for want of mu."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from sdcore.generate.pipeline import generate_images

    bundle = copy.copy(loaded_tiny("sd3"))
    config = {k: v for k, v in bundle.noise_scheduler.config.items() if not k.startswith("_")}
    # (without _use_default_values, which would keep use_dynamic_shifting at its default)
    dynamic = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 16,
               "max_image_seq_len": 256}  # fmt: skip
    bundle.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config({**config, **dynamic})

    def render(sampler):
        return lambda: generate_images(bundle, ["a cat"], steps=3, seed=1, width=64, height=32, cfg=1.0,
                                       sampler=sampler)  # fmt: skip

    assert bundle.noise_scheduler.config.use_dynamic_shifting
    euler = _timesteps(bundle.transformer, render("euler"))
    heun = _timesteps(bundle.transformer, render("heun"))
    assert heun == [euler[0], euler[1], euler[1], euler[2], euler[2]]
    static = FlowMatchEulerDiscreteScheduler.from_config(config)
    static.set_timesteps(3)
    assert euler != pytest.approx([float(t) for t in static.timesteps])  # the shift is the resolution's

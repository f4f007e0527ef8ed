"""What a plugin family declares and the core now reads (``plugin_family``: AuraFlow's layout under a name the core
never sees): its block lists (memory plan, block swap), its flow shift, the flow samplers it offers through the
core's table, its families found through a test's own plugin manager, its lack of a guidance input, and the tiny
size of a ``create-tiny`` file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from plugin_family import FAMILY, NAME, SCHEDULER
from sdcore.errors import ConfigError
from sdcore.models import family as fam
from sdcore.models.family import temporary_family
from sdcore.train.options import TrainOptions


@pytest.fixture
def toyflow():
    with temporary_family(FAMILY):
        yield FAMILY
    fam.reset_family_cache()


@pytest.fixture(scope="module")
def tiny():
    """One tiny bundle for the tests that only read it (building it takes a second)."""
    with temporary_family(FAMILY):
        from sdcore.models.load import load_model

        return load_model(f"tiny:{NAME}")


def test_the_memory_plan_counts_the_blocks_by_the_familys_config_keys(toyflow, tiny):
    from sdcore.models.layout import ModelLayout
    from sdcore.train.memory import (
        FLUX_ACTIVATION_CONSTANTS,
        count_parameters,
        estimate_memory,
        transformer_activation_bytes,
    )

    config = dict(tiny.transformer.config)
    config.update(num_mmdit_layers=4, num_single_dit_layers=32)  # AuraFlow's real depths on the tiny widths
    layout = ModelLayout("toy.safetensors", NAME, "flow-matching", {"transformer": config, "vae": dict(tiny.vae.config)},
                         "single-file")  # fmt: skip
    params = count_parameters(tiny, [], whole_model_result=False)
    options = TrainOptions(model="x", data="x", resolution=64, batch_size=2, mixed_precision="no")
    got = estimate_memory(layout, params, options).activations
    # rewritten from the plan's documented rule: Flux's constants per block on D (N + T) token units, the joint
    # (MMDiT) blocks as its double blocks; N = (64 px / 8 / patch 2)^2 image tokens, T = the family's tokens
    k_double, k_single = FLUX_ACTIVATION_CONSTANTS["adapter"]
    width = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = (64 // 8 // config["patch_size"]) ** 2
    units = width * (tokens + FAMILY.context_tokens) * (4 * k_double + 32 * k_single)
    assert got == math.ceil(2 * 4 * units)
    # the default declaration (SD3's and Flux's keys) counted this config as one block (what the walk found)
    common = {"batch": 2, "resolution": 64, "latent_channels": 4, "context_tokens": FAMILY.context_tokens}
    assert got == transformer_activation_bytes(config, block_lists=FAMILY.block_lists, **common)
    assert got > 30 * transformer_activation_bytes(config, **common)


def test_block_swap_swaps_the_lists_the_family_names(toyflow, tiny):
    from sdcore.train.block_swap import BLOCK_LISTS, swappable_blocks
    from sdcore.train.memory_options import MemorySetup

    transformer = tiny.transformer.requires_grad_(False)  # a frozen base, as under a LoRA
    expected = [*transformer.joint_transformer_blocks, *transformer.single_transformer_blocks]  # forward order
    assert len(swappable_blocks(transformer, BLOCK_LISTS)) == 1  # the default table found the single block only
    setup = MemorySetup.before_placement(tiny, TrainOptions(model="x", data="x", blocks_to_swap=2))
    assert [id(b) for b in setup.swapped] == [id(b) for b in expected]
    setup.after_placement(tiny, "cpu")
    try:
        assert [id(b) for b in setup.swap.blocks] == [id(b) for b in expected]
    finally:
        setup.swap.remove()
    with pytest.raises(ConfigError, match="only 2 transformer blocks"):
        MemorySetup.before_placement(tiny, TrainOptions(model="x", data="x", blocks_to_swap=3))


def test_the_familys_flow_shift_is_the_default_and_the_option_wins(toyflow, tiny):
    from sdcore.models.family import get_family
    from sdcore.train.objectives import objective_for

    assert objective_for(tiny, TrainOptions(model="x", data="x")).shift == SCHEDULER["shift"] == 1.73
    for given in (1.0, 3.0):
        assert objective_for(tiny, TrainOptions(model="x", data="x", discrete_flow_shift=given)).shift == given
    # sdcore's own flow families keep training unshifted by default, as before
    assert [get_family(name).flow_shift for name in ("sd3", "flux", "chroma")] == [1.0, 1.0, 1.0]


def test_a_plugin_renders_with_the_cores_flow_samplers(toyflow, tiny, tmp_path):
    import diffusers
    from sdcore.cli import build_cli
    from sdcore.models.family import family_adapter
    from sdcore.plugins import get_plugin_manager

    adapter = family_adapter(NAME)
    heun = adapter.flow_scheduler_for(tiny, "heun")
    assert isinstance(heun, diffusers.FlowMatchHeunDiscreteScheduler) and heun.config.shift == 1.73
    solver = adapter.flow_scheduler_for(tiny, "DPM++ 2M")  # A1111's spelling too
    assert isinstance(solver, diffusers.DPMSolverMultistepScheduler) and solver.config.flow_shift == 1.73

    def render(sampler: str) -> torch.Tensor:
        (image,) = adapter.generate(tiny, ["a red circle"], [""], seeds=[3], steps=3, cfg=3.0, width=64, height=64,
                                    sampler=sampler)  # fmt: skip
        return torch.from_numpy(np.asarray(image, dtype=np.float32))

    euler = render("euler")
    assert torch.equal(render("euler"), euler)
    assert (render("dpm++2m") - euler).abs().max() > 0
    assert torch.equal(render("euler_a"), render("euler_a"))  # stochastic, yet a function of the seed
    args = ["generate", "x", "--model", f"tiny:{NAME}", "--steps", "2", "--size", "64x64", "--sampler", "ddim",
            "-o", str(tmp_path / "x.png")]  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args)
    assert result.exit_code != 0 and "sampler 'ddim' does not sample flow-matching models" in result.output
    assert not (tmp_path / "x.png").exists()


class _FamilyPlugin:
    """A plugin that only declares the family (given to a test's own manager, never installed)."""

    import sdcore as _sdcore

    @_sdcore.hookimpl
    def sdcore_model_families(self):
        return [FAMILY]


def test_a_family_of_a_tests_own_plugin_manager_is_found(tmp_path):
    from sdcore.cli import build_cli
    from sdcore.models.family import get_family, using_plugin_manager
    from sdcore.models.load import load_model
    from sdcore.plugins import get_plugin_manager

    fam.reset_family_cache()
    pm = get_plugin_manager(entrypoints=False, extra=[_FamilyPlugin()])
    with pytest.raises(ConfigError, match=f"unknown model family '{NAME}'"):
        get_family(NAME)  # not registered, not installed
    with using_plugin_manager(pm):
        bundle = load_model(f"tiny:{NAME}")
        assert bundle.family_spec is FAMILY and get_family("sd3").name == "sd3"  # the installed ones still found
    with pytest.raises(ConfigError):
        get_family(NAME)  # only inside the block
    out = tmp_path / "toy.safetensors"
    result = CliRunner().invoke(build_cli(pm), ["model", "create-tiny", "--family", NAME, str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    fam.reset_family_cache()


def test_guidance_scale_on_a_family_without_a_guidance_input_is_noted(toyflow):
    from sdcore.train.preflight import guidance_scale_notes

    assert guidance_scale_notes(TrainOptions(model="x", data="x"), NAME) == []  # not given
    given = TrainOptions(model="x", data="x", guidance_scale=3.5)
    (note,) = guidance_scale_notes(given, NAME)
    assert note.startswith("--guidance-scale 3.5: Toy flow DiT") and "without effect" in note
    # FLUX.1 takes it (dev); SD3, Chroma and the SD families keep their silence
    assert [guidance_scale_notes(given, name) for name in ("flux", "sd3", "chroma", "sdxl")] == [[], [], [], []]


def test_a_create_tiny_file_of_a_plugin_family_trains_at_the_tiny_size(toyflow, tmp_path):
    from sdcore.cli import build_cli
    from sdcore.models.load import load_model
    from sdcore.models.native import TINY_METADATA_KEY, peek_native_resolution
    from sdcore.plugins import get_plugin_manager
    from sdcore.train.options import apply_model_defaults

    out = tmp_path / "toy.safetensors"
    result = CliRunner().invoke(build_cli(get_plugin_manager()), ["model", "create-tiny", "--family", NAME, str(out)])
    assert result.exit_code == 0, result.output
    assert peek_native_resolution(out) == 64  # as tiny:toyflow, before any weight loads
    options = TrainOptions(model=str(out), data="x")
    assert apply_model_defaults(options) and options.resolution == 64
    bundle = load_model(out)
    assert bundle.metadata[TINY_METADATA_KEY] == NAME
    # the same model saved without the mark is the family's native size
    plain = tmp_path / "plain.safetensors"
    bundle.save(plain)
    assert peek_native_resolution(plain) == FAMILY.native_resolution == 1024

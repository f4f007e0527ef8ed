"""Configs rebuilt from tensor shapes: real layouts are recognised, odd ones load with their own sizes."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file
from sdcore.models.convert.checkpoint import modules_to_ldm
from sdcore.models.infer import infer_configs, same_structure
from sdcore.models.load import build_empty_modules, bundled_config, load_model


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_real_layouts_are_recognised(family):
    config = bundled_config(family, "epsilon")
    unet, vae, encoders = build_empty_modules(config)  # meta tensors: no memory, no time
    shapes = {k: tuple(v.shape) for k, v in modules_to_ldm(family, unet, vae, encoders).items()}
    inferred = infer_configs(set(shapes), shapes.__getitem__, family)
    assert same_structure(config, inferred)
    unet2, vae2, encoders2 = build_empty_modules(inferred)
    assert _params(unet2) == _params(unet) and _params(vae2) == _params(vae)
    assert [_params(e) for e in encoders2] == [_params(e) for e in encoders]


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_file_without_config_entry_loads_by_shapes(family, tiny_files, tmp_path, assert_modules_equal):
    bare = tmp_path / f"{family}-bare.safetensors"
    save_file(load_file(str(tiny_files[family])), str(bare))  # drops all metadata
    loaded = load_model(bare)
    reference = load_model(tiny_files[family])
    assert loaded.family == family
    assert loaded.unet.config.block_out_channels == reference.unet.config.block_out_channels
    for name, module in reference.components().items():
        assert_modules_equal(module, loaded.components()[name])

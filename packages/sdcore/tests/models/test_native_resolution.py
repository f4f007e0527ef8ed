"""The model's native size, known before its weights load (issue 17: --resolution was 512 for every model)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from sdcore.models.convert.clip import SD1_PREFIX
from sdcore.models.convert.openclip import SD2_PREFIX, SDXL_BIGG_PREFIX
from sdcore.models.detect import UNET_IN
from sdcore.models.load import bundled_config
from sdcore.models.native import bundle_native_resolution, native_resolution, peek_native_resolution
from sdcore.models.tiny import create_tiny_bundle


@pytest.mark.parametrize(
    ("family", "prediction", "size"),
    [("sd1", "epsilon", 512), ("sd2", "v_prediction", 768), ("sd2", "epsilon", 512), ("sdxl", "epsilon", 1024)],
)
def test_family_sizes(family, prediction, size):
    configs = bundled_config(family, prediction)
    assert native_resolution(configs["unet"], configs["vae"]) == size


@pytest.mark.parametrize(
    ("te_key", "size"),
    [
        (SD1_PREFIX + "text_model.final_layer_norm.weight", 512),
        (SD2_PREFIX + "ln_final.weight", 768),  # SD2 files default to 768-v (the family detection's rule)
        (SDXL_BIGG_PREFIX + "ln_final.weight", 1024),
    ],
)
def test_single_file_header_only(tmp_path, te_key, size):
    path = tmp_path / "model.safetensors"
    save_file({UNET_IN: torch.zeros(1, 4, 1, 1), te_key: torch.zeros(1)}, str(path))  # no weights to speak of
    assert peek_native_resolution(path) == size


def test_tiny_models_and_their_files(tmp_path):
    assert peek_native_resolution("tiny:sd1") == peek_native_resolution("tiny:sdxl") == 64
    bundle = create_tiny_bundle("sd1")
    assert bundle_native_resolution(bundle) == 64
    bundle.save(tmp_path / "tiny.safetensors")
    bundle.save(tmp_path / "tiny-diffusers", format="diffusers")
    assert peek_native_resolution(tmp_path / "tiny.safetensors") == 64
    assert peek_native_resolution(tmp_path / "tiny-diffusers") == 64
    assert peek_native_resolution("someone/some-model") is None  # a hub id: known once loaded

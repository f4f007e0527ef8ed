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


@pytest.mark.parametrize("family", ["flux", "chroma"])
def test_a_tiny_transformer_file_keeps_its_64_and_a_real_one_its_familys_size(tmp_path, family):
    """FLUX.1 and Chroma transformers have no sample_size: the single file's modelspec.resolution is the only
    record, so a tiny model written to disk (as `sdcore model create-tiny` does) generates and trains at 64 as
    `tiny:<family>` does, not at the family's 1024; a file that says nothing (BFL's) is the family's size."""
    from safetensors import safe_open
    from sdcore.generate.pipeline import default_size
    from sdcore.models.load import load_model

    path = tmp_path / "tiny.safetensors"
    load_model(f"tiny:{family}").save(path)
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    assert metadata["modelspec.resolution"] == "64x64"
    assert peek_native_resolution(path) == 64
    loaded = load_model(path)
    assert bundle_native_resolution(loaded) == default_size(loaded) == 64
    loaded.metadata = {k: v for k, v in (loaded.metadata or {}).items() if k != "modelspec.resolution"}
    assert bundle_native_resolution(loaded) == 1024


@pytest.mark.parametrize("family", ["flux", "chroma"])
def test_another_tools_modelspec_resolution_is_not_the_native_size(tmp_path, family):
    """kohya's trainers write their --resolution into modelspec.resolution (sd-scripts library/train_util.py
    get_sai_model_spec: ``reso = args.resolution``; library/sai_model_spec.py determine_resolution: "1024x1024"
    only when none was given), and the kohya_ss GUI always passes its max resolution (kohya_gui/
    dreambooth_gui.py: ``"resolution": max_resolution``): a FLUX.1 fine-tune trained at 512 says "512x512" but is
    still a 1024 model. Only sdcore's own files (with ``sdcore.config``) record the native size there."""
    from safetensors import safe_open
    from sdcore.models.load import load_model

    path = tmp_path / "tiny.safetensors"
    load_model(f"tiny:{family}").save(path)
    with safe_open(str(path), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        metadata = dict(f.metadata())
    assert "sdcore.config" in metadata
    foreign = {k: v for k, v in metadata.items() if k.startswith("modelspec.")} | {"modelspec.resolution": "512x512"}
    save_file(tensors, str(tmp_path / "kohya.safetensors"), metadata=foreign)
    assert peek_native_resolution(tmp_path / "kohya.safetensors") == 1024
    assert bundle_native_resolution(load_model(tmp_path / "kohya.safetensors")) == 1024

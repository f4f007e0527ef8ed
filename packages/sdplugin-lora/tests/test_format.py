"""The file we write: kohya layout, fp16 default, ss_*/modelspec metadata and sshs hashes."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from lora_testutil import fresh_bundle, random_network
from safetensors import safe_open
from sdplugin_lora.format import header_metadata, network_metadata, save_lora, sshs_hashes, tag_frequency


def test_layout_dtype_and_metadata(tmp_path):
    bundle = fresh_bundle("sd2")
    network = random_network(bundle, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)
    meta = network_metadata(
        family="sd2",
        prediction_type="v_prediction",
        rank=4,
        alpha=2.0,
        conv_rank=2,
        conv_alpha=1.0,
        title="mychar",
        resolution=64,
        extra={"ss_tag_frequency": tag_frequency({"data/10_mychar": ["A cat, red", "a cat"]}), "ss_steps": 10},
    )
    path = save_lora(tmp_path / "x.safetensors", network.state_dict(), meta)
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        header = handle.metadata()
        dtypes = {handle.get_tensor(k).dtype for k in keys}
        alpha = handle.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha")
    assert dtypes == {torch.float16}
    assert alpha.dim() == 0 and float(alpha) == 2.0
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert len(keys) == 3 * len(network)
    assert header["ss_network_module"] == "networks.lora"
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "2"
    assert json.loads(header["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert header["ss_base_model_version"] == "sd_v2_v" and header["ss_v2"] == "True"
    assert header["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert header["modelspec.prediction_type"] == "v" and header["modelspec.resolution"] == "64x64"
    assert header["modelspec.title"] == "mychar" and header["ss_output_name"] == "mychar"
    assert json.loads(header["ss_tag_frequency"]) == {"10_mychar": {"a cat": 2, "red": 1}}
    assert all(isinstance(v, str) for v in header.values())


def test_sshs_hashes_follow_kohya_definition(tmp_path):
    bundle = fresh_bundle("sd1")
    network = random_network(bundle, rank=4, conv_rank=0)
    meta = network_metadata(family="sd1", rank=4, alpha=1)
    path = save_lora(tmp_path / "x.safetensors", network.state_dict(), meta)
    header = header_metadata(path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    # the tensor region of the written file equals the ss_-only serialization's region
    assert header["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    tensors = {}
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    assert sshs_hashes(tensors, header) == (header["sshs_model_hash"], header["sshs_legacy_hash"])
    assert len(header["sshs_legacy_hash"]) == 8
    # editing a non-ss field does not change the hashes
    assert sshs_hashes(tensors, {**header, "modelspec.title": "other"}) == (
        header["sshs_model_hash"],
        header["sshs_legacy_hash"],
    )


def test_minimal_metadata_and_sdxl_keys(tmp_path):
    meta = network_metadata(
        family="sdxl", rank=8, alpha=4, extra={"ss_dataset_dirs": {"10_a": {"n_repeats": 10, "img_count": 2}}}
    )
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "1024x1024"
    path = save_lora(tmp_path / "m.safetensors", {"lora_te1_x.alpha": torch.tensor(1.0)}, meta, minimal=True)
    header = header_metadata(path)
    assert "ss_dataset_dirs" not in header and header["ss_network_dim"] == "8"
    assert "sshs_model_hash" in header and "modelspec.architecture" in header


def test_header_metadata_of_a_broken_file_is_one_line(tmp_path):
    """A truncated or non-safetensors file gives sdcore's one-line ModelFormatError (it raised a bare
    JSONDecodeError / read the whole file to take 8 bytes)."""
    from sdcore.errors import ModelFormatError

    bundle = fresh_bundle("sd1")
    path = save_lora(tmp_path / "x.safetensors", random_network(bundle, rank=2).state_dict(), {"a": "b"})
    assert header_metadata(path)["a"] == "b"
    text = tmp_path / "notes.safetensors"
    text.write_text("these are notes, not tensors", encoding="utf-8")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:200])
    for broken in (text, cut):
        with pytest.raises(ModelFormatError, match=broken.name):
            header_metadata(broken)

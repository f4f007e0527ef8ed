"""Our files load in diffusers (the real client) and give exactly kohya's merge."""

from __future__ import annotations

import pytest
import torch
from lora_testutil import all_params, fresh_bundle, random_network
from sdplugin_lora.apply import apply_lora
from sdplugin_lora.format import network_metadata, read_lora, save_lora
from sdplugin_lora.naming import ModuleIndex


def _pipeline(bundle):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if bundle.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=bundle.vae,
            text_encoder=bundle.text_encoders[0],
            text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0],
            tokenizer_2=bundle.tokenizers[1],
            unet=bundle.unet,
            scheduler=bundle.noise_scheduler,
        )
    return StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoders[0],
        tokenizer=bundle.tokenizers[0],
        unet=bundle.unet,
        scheduler=bundle.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _expected(bundle, path, multiplier):
    """base + m * alpha/rank * up @ down from the tensors in our file, per (component, param name)."""
    lora = read_lora(path)
    index = ModuleIndex.from_bundle(bundle)
    expected = {}
    for name, weights in lora.modules.items():
        target = index.resolve(name)
        assert target is not None, name
        base = target.module.weight.detach().float()
        delta = (weights.up.float().flatten(1) @ weights.down.float().flatten(1)).reshape(base.shape)
        expected[(target.component, f"{target.path}.weight")] = base + multiplier * weights.alpha / weights.rank * delta
    return expected


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_fuse_matches_kohya_formula(family, tmp_path):
    bundle = fresh_bundle(family)
    network = random_network(bundle, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)
    path = save_lora(
        tmp_path / "ours.safetensors",
        network.state_dict(),
        network_metadata(
            family=family, prediction_type=bundle.prediction_type, rank=4, alpha=2, conv_rank=2, conv_alpha=1
        ),
    )
    multiplier = 0.7
    expected = _expected(bundle, path, multiplier)
    assert len(expected) == len(network)
    before = all_params(bundle)

    pipe = _pipeline(bundle)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=multiplier)
    pipe.unload_lora_weights()

    after = all_params(bundle)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == set(expected), "diffusers must touch exactly the modules in our file"
    for key, want in expected.items():
        torch.testing.assert_close(after[key], want, atol=1e-5, rtol=0)

    # our merge of the same file gives the same weights
    ours = fresh_bundle(family)
    applied = apply_lora(ours, path, multiplier, merge=True)
    assert applied.touched == len(expected)
    mine = all_params(ours)
    for key, want in expected.items():
        torch.testing.assert_close(mine[key], want, atol=1e-5, rtol=0)

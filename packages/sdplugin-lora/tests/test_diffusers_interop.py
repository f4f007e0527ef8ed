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


@pytest.mark.parametrize("algo", ["lora_fa", "dylora"])
def test_kohya_lora_fa_and_dylora_files_fuse_in_diffusers(algo, tmp_path):
    """LoRA-FA and DyLoRA save plain LoRA files (kohya's networks.lora_fa / networks.dylora write the same
    keys), so diffusers must fuse a trained one to exactly kohya's formula too."""
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import train
    from sdplugin_lora.method import LoraMethod

    options = contract_options(LoraMethod, tmp_path, {"algo": algo, "rank": 4, "alpha": 2.0, "max_steps": 2,
                                                      "lr": 1e-2, "train_text_encoder": True, "save_dtype": "fp32"})  # fmt: skip
    path = train(LoraMethod(options), bundle=fresh_bundle("sd1")).output
    assert read_lora(path).metadata["ss_network_module"] == f"networks.{algo}"
    bundle = fresh_bundle("sd1")
    expected = _expected(bundle, path, 0.8)
    before = all_params(bundle)
    pipe = _pipeline(bundle)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    after = all_params(bundle)
    assert {key for key in before if not torch.equal(before[key], after[key])} == set(expected)
    for key, want in expected.items():
        torch.testing.assert_close(after[key], want, atol=1e-5, rtol=0)

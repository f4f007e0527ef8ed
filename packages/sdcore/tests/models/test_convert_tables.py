"""Key tables against known ldm names of the real SD1/SD2/SDXL layouts and diffusers' own converter."""

from __future__ import annotations

import pytest
import torch
from sdcore.models.convert.unet import UNetLayout, unet_key_map, unet_key_to_ldm
from sdcore.models.convert.vae import vae_key_to_ldm
from sdcore.models.load import build_empty_modules, bundled_config


def test_sd1_known_names():
    layout = UNetLayout.from_config(bundled_config("sd1")["unet"])
    assert unet_key_to_ldm("down_blocks.0.downsamplers.0.conv.weight", layout) == "input_blocks.3.0.op.weight"
    assert unet_key_to_ldm("down_blocks.3.resnets.1.norm1.weight", layout) == "input_blocks.11.0.in_layers.0.weight"
    assert unet_key_to_ldm("up_blocks.0.upsamplers.0.conv.weight", layout) == "output_blocks.2.1.conv.weight"
    assert unet_key_to_ldm("up_blocks.1.upsamplers.0.conv.bias", layout) == "output_blocks.5.2.conv.bias"
    assert unet_key_to_ldm("up_blocks.3.attentions.2.proj_out.weight", layout) == "output_blocks.11.1.proj_out.weight"
    assert (
        unet_key_to_ldm("mid_block.resnets.1.conv_shortcut.weight", layout) == "middle_block.2.skip_connection.weight"
    )
    assert unet_key_to_ldm("time_embedding.linear_2.bias", layout) == "time_embed.2.bias"
    assert vae_key_to_ldm("decoder.up_blocks.0.resnets.2.conv1.weight", 4) == "decoder.up.3.block.2.conv1.weight"
    assert vae_key_to_ldm("decoder.up_blocks.3.upsamplers.0.conv.weight", 4) == "decoder.up.0.upsample.conv.weight"
    assert vae_key_to_ldm("encoder.mid_block.attentions.0.to_out.0.bias", 4) == "encoder.mid.attn_1.proj_out.bias"


def test_sdxl_known_names():
    layout = UNetLayout.from_config(bundled_config("sdxl")["unet"])
    assert unet_key_to_ldm("add_embedding.linear_1.weight", layout) == "label_emb.0.0.weight"
    assert unet_key_to_ldm("up_blocks.0.upsamplers.0.conv.weight", layout) == "output_blocks.2.2.conv.weight"
    assert unet_key_to_ldm("up_blocks.1.upsamplers.0.conv.weight", layout) == "output_blocks.5.2.conv.weight"
    assert (
        unet_key_to_ldm("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight", layout)
        == "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"
    )


@pytest.mark.parametrize("name", ["sd1", "sd2-512", "sdxl", "sdxl-refiner"])
def test_real_layouts_agree_with_diffusers_converter(name):
    """Our diffusers->ldm table, inverted by diffusers' ldm->diffusers converter, is the identity."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = bundled_config("sd2", "epsilon") if name == "sd2-512" else bundled_config(name)
    unet, _vae, _tes = build_empty_modules({**config, "text_encoders": []})
    keys = list(unet.state_dict().keys())
    mapping = unet_key_map(keys, dict(unet.config))
    fake = {ldm: torch.tensor(float(i)) for i, ldm in enumerate(mapping.values())}
    back = convert_ldm_unet_checkpoint(fake, dict(unet.config))
    assert set(back) == set(keys)
    for i, (key, _ldm) in enumerate(mapping.items()):
        assert back[key].item() == float(i), key

"""kohya names: SD1/SD2 diffusers-style, SDXL SGM-style, text encoders with ``text_model_``."""

from __future__ import annotations

import pytest
import torch
from lora_testutil import fresh_bundle
from sdplugin_lora.naming import ModuleIndex, sgm_block_table, unet_name

SDXL_CONFIG = {
    "sample_size": 128,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SD15_CONFIG = {
    "sample_size": 64,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("down_blocks.1.attentions.0.proj_in", "lora_unet_input_blocks_4_1_proj_in"),
        (
            "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
            "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
        ),
        (
            "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj",
            "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj",
        ),
        (
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
            "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0",
        ),
        (
            "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_v",
            "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_v",
        ),
        ("down_blocks.0.resnets.0.conv1", "lora_unet_input_blocks_1_0_in_layers_2"),
        ("down_blocks.1.resnets.0.conv_shortcut", "lora_unet_input_blocks_4_0_skip_connection"),
        ("down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op"),
        ("up_blocks.0.upsamplers.0.conv", "lora_unet_output_blocks_2_2_conv"),
        ("up_blocks.1.upsamplers.0.conv", "lora_unet_output_blocks_5_2_conv"),
        ("mid_block.resnets.1.time_emb_proj", "lora_unet_middle_block_2_emb_layers_1"),
        ("up_blocks.2.resnets.2.conv2", "lora_unet_output_blocks_8_0_out_layers_3"),
    ],
)
def test_sdxl_real_layout_names_from_config(path, expected):
    """Known real kohya SDXL names, from a config-derived table (no UNet instantiated)."""
    assert unet_name(path, sgm_table=sgm_block_table(SDXL_CONFIG)) == expected


def test_sd1_sgm_aliases_follow_a1111_numbering():
    table = sgm_block_table(SD15_CONFIG)
    for i in range(3):
        for j in range(2):
            assert table[f"down_blocks.{i}.attentions.{j}"] == f"input_blocks.{1 + 3 * i + j}.1"
        assert table[f"down_blocks.{i}.downsamplers.0.conv"] == f"input_blocks.{3 + 3 * i}.0.op"
        assert table[f"up_blocks.{i}.upsamplers.0.conv"] == f"output_blocks.{2 + 3 * i}.{2 if i > 0 else 1}.conv"
    assert table["up_blocks.3.attentions.2"] == "output_blocks.11.1"
    # SD1 canonical names stay diffusers-style
    assert unet_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", sgm_table=None) == (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )


@pytest.mark.parametrize(
    ("family", "config", "lierla", "c3lier", "conv3x3"),
    [
        ("sd1", SD15_CONFIG, 192, 278, 50),
        ("sdxl", SDXL_CONFIG, 722, 788, 38),
    ],
)
def test_real_layout_module_counts_match_kohya(family, config, lierla, c3lier, conv3x3):
    """Counts kohya logs for real models ("create LoRA for U-Net: 192 modules"), built on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    index = ModuleIndex.build(family, unet, [])
    assert len(index.select()) == lierla
    chosen = index.select(conv=True)
    assert len(chosen) == c3lier
    assert sum(t.is_conv3x3 for t in chosen) == conv3x3


def test_real_text_encoder_counts_and_names():
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        te = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        )
    unet_index = ModuleIndex.build("sd1", fresh_bundle("sd1").unet, [("text_encoder", te)])
    names = [t.name for t in unet_index.select(unet=False)]
    assert len(names) == 72
    assert "lora_te_text_model_encoder_layers_11_mlp_fc1" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names


def test_tiny_bundles_both_ways():
    for family, te_prefixes in (("sd1", ["lora_te_"]), ("sd2", ["lora_te_"]), ("sdxl", ["lora_te1_", "lora_te2_"])):
        bundle = fresh_bundle(family)
        index = ModuleIndex.from_bundle(bundle)
        chosen = index.select(conv=True)
        for target in chosen:
            component = bundle.components()[target.component]
            assert dict(component.named_modules())[target.path] is target.module
            assert index.resolve(target.name) is target
            assert index.name_of(target.component, target.path) == target.name
            for alias in target.aliases:
                assert index.resolve(alias) is target
        te_names = [t.name for t in chosen if t.is_text_encoder]
        for prefix in te_prefixes:
            # transformers 5 has no text_model level in CLIPTextModel; the name keeps it anyway
            assert any(name.startswith(prefix + "text_model_encoder_layers_0_self_attn_q_proj") for name in te_names)
        assert all("_text_model_encoder_layers_" in name for name in te_names)
        unet_names = [t.name for t in chosen if not t.is_text_encoder]
        if family == "sdxl":
            assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in unet_names
            assert "lora_unet_output_blocks_1_2_conv" in unet_names
            assert not any("down_blocks" in n for n in unet_names)
        else:
            assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in unet_names
            assert not any("input_blocks" in n for n in unet_names)


def test_default_targets_are_lierla_and_conv_adds_c3lier():
    index = ModuleIndex.from_bundle(fresh_bundle("sd1"))
    default = {t.name for t in index.select()}
    conv = {t.name for t in index.select(conv=True)}
    assert all(t.group in ("transformer", "te") for t in index.select())
    extra = conv - default
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in extra
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj" in extra
    assert "lora_unet_down_blocks_1_resnets_0_conv_shortcut" in extra
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in extra
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in extra
    for never in ("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1"):
        assert never not in conv
        assert index.resolve(never) is not None  # but files that have them (LyCORIS "full") resolve

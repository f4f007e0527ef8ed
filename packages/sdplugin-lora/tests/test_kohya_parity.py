"""kohya parity: block indexing, block dims and lr weights, LoRA+, resize --dynamic ranks."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from lora_testutil import fresh_bundle
from sdcore.errors import ConfigError
from sdplugin_lora.blocks import BlockPlan, block_count, block_index, block_lr_weights
from sdplugin_lora.commands import lora_group
from sdplugin_lora.format import parse_state_dict, read_lora, save_lora
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_lora.tools import resize_lora

# --- block indexing (kohya's table: IN01..IN11 = 1..11, MID = 12, OUT00..OUT11 = 13..24) ----------------


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 1),  # IN01
        ("lora_unet_down_blocks_0_resnets_1_conv1", 2),  # IN02
        ("lora_unet_down_blocks_0_downsamplers_0_conv", 3),  # IN03
        ("lora_unet_down_blocks_1_attentions_0_proj_in", 4),  # IN04
        ("lora_unet_down_blocks_3_resnets_1_conv2", 11),  # IN11
        ("lora_unet_mid_block_attentions_0_proj_out", 12),  # MID
        ("lora_unet_mid_block_resnets_1_time_emb_proj", 12),
        ("lora_unet_up_blocks_0_resnets_0_conv1", 13),  # OUT00
        ("lora_unet_up_blocks_0_upsamplers_0_conv", 15),  # OUT02
        ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2", 18),  # OUT05
        ("lora_unet_up_blocks_3_attentions_2_proj_out", 24),  # OUT11
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", -1),
    ],
)
def test_sd1_block_index(name, block):
    assert block_index(name, "sd1") == block
    assert block_count("sd1") == 25


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("lora_unet_input_blocks_1_0_in_layers_2", 2),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 5),
        ("lora_unet_input_blocks_8_1_proj_out", 9),
        ("lora_unet_middle_block_1_transformer_blocks_3_attn2_to_k", 11),
        ("lora_unet_middle_block_2_emb_layers_1", 12),
        ("lora_unet_output_blocks_0_1_proj_in", 13),
        ("lora_unet_output_blocks_8_0_skip_connection", 21),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1", -1),
    ],
)
def test_sdxl_block_index(name, block):
    assert block_index(name, "sdxl") == block
    assert block_count("sdxl") == 23


def test_lr_weight_presets_and_fill_rules():
    # sine over 12 down blocks, +0.5 offset; up given as 3 numbers is filled with 1; mid 0.5
    weights = block_lr_weights("sd1", "sine+0.5", "0.5", "0,0.25,2", zero_threshold=0.1)
    sine = [math.sin(math.pi * (i / 11) / 2) + 0.5 for i in range(12)]
    assert weights is not None and len(weights) == 25
    assert weights[:12] == pytest.approx(sine)
    assert weights[12] == 0.5
    assert weights[13:] == [0.0, 0.25, 2.0] + [1.0] * 9
    cosine = block_lr_weights("sd1", "cosine", None, "reverse_linear", 0.0)
    assert cosine is not None
    assert cosine[0] == pytest.approx(1.0) and cosine[11] == pytest.approx(0.0, abs=1e-12)
    assert cosine[13:] == pytest.approx([(11 - i) / 11 for i in range(12)])
    # SDXL: 9 + 3 + 9 values framed by 1.0 for the embedding and out blocks
    xl = block_lr_weights("sdxl", "zeros+0.3", "1,2", None, 0.0)
    assert xl == [1.0] + [0.3] * 9 + [1.0, 2.0, 1.0] + [1.0] * 9 + [1.0]
    with pytest.raises(ConfigError, match="sine, cosine"):
        block_lr_weights("sd1", "wavy", None, None)


def test_block_plan_zero_lr_blocks_get_no_modules_and_dims():
    dims = ",".join(str(i % 5) for i in range(25))
    plan = BlockPlan.build(
        "sd1", rank=4, alpha=2.0, conv_rank=None, conv_alpha=None, block_dims=dims, down_lr_weight="1,1,0"
    )
    assert plan is not None
    assert plan.rank_for("lora_unet_down_blocks_0_attentions_0_proj_in", False) == (1, 2.0)
    assert plan.rank_for("lora_unet_down_blocks_0_resnets_1_conv1", True) == (0, None), "no conv dims: no conv"
    assert plan.dims[2] == 0 and plan.dims[3] == 3, "block 2 (IN02) has lr weight 0: no modules"
    assert plan.rank_for("lora_te_text_model_encoder_layers_0_mlp_fc1", False) is None
    with pytest.raises(ConfigError, match="needs 25"):
        BlockPlan.build("sd1", rank=4, alpha=2.0, conv_rank=None, conv_alpha=None, block_dims="1,2,3")


def fresh_network_count(family):
    from sdplugin_lora.naming import ModuleIndex

    return ModuleIndex.from_bundle(fresh_bundle(family)).select(conv=True)


def _dims_for_tiny(family):
    return [0 if i in (2, 13) else 1 + (i % 3) for i in range(block_count(family))]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_training_builds_kohya_block_dims_and_lr_groups(family):
    dims = _dims_for_tiny(family)
    conv_dims = [(i % 2) + 1 for i in range(block_count(family))]
    method = LoraMethod(
        LoraOptions(
            rank=4,
            alpha=4.0,
            lr=1e-3,
            unet_lr=2e-3,
            block_dims=",".join(map(str, dims)),
            conv_block_dims=",".join(map(str, conv_dims)),
            down_lr_weight="linear+0.5",
            up_lr_weight="2,1",
        )
    )
    method.validate()
    groups = method.prepare(fresh_bundle(family))
    network = method.network
    assert network is not None and len(network) > 0
    # kohya's list: (SDXL: 1.0 for the embedding) down, mid, up (SDXL: 1.0 for out)
    side = 9 if family == "sdxl" else 12
    mid = [1.0] * (3 if family == "sdxl" else 1)
    expected = [i / (side - 1) + 0.5 for i in range(side)] + mid + [2.0] + [1.0] * (side - 1)
    if family == "sdxl":
        expected = [1.0, *expected, 1.0]
    conv_seen = False
    for module in network:
        block = block_index(module.lora_name, family)
        assert block >= 0
        conv3x3 = module.is_conv and tuple(module.base.kernel_size) != (1, 1)
        conv_seen |= conv3x3
        assert module.rank == (conv_dims if conv3x3 else dims)[block], module.lora_name
    assert conv_seen, "conv_block_dims alone must add the 3x3 convs"
    assert all(m.rank > 0 for m in network), "blocks at dim 0 get no modules"
    assert any(dims[i] == 0 for i in range(len(dims))) and len(network) < len(fresh_network_count(family)), (
        "the zero blocks really removed modules"
    )
    for group in groups:
        block = int(group["name"].split("block")[1])
        assert group["lr"] == pytest.approx(2e-3 * expected[block])
    owned = [id(p) for g in groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in network.parameters()), "each tensor in exactly one group"


def test_loraplus_puts_up_weights_at_ratio_and_trains_them_faster():
    method = LoraMethod(
        LoraOptions(
            rank=4,
            lr=1e-3,
            train_text_encoder=True,
            te_lr=5e-4,
            loraplus_lr_ratio=16.0,
            loraplus_text_encoder_lr_ratio=4.0,
        )
    )
    groups = method.prepare(fresh_bundle("sd1"))
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"unet": 1e-3, "unet_plus": 16e-3, "text_encoder": 5e-4, "text_encoder_plus": 2e-3}
    names = {id(p): n for m in method.network for n, p in m.named_parameters()}
    for group in groups:
        assert all(("lora_up" in names[id(p)]) == group["name"].endswith("_plus") for p in group["params"])
    # one AdamW step moves each weight by about its group's lr (Adam's first step is sign-like)
    for module in method.network:
        with torch.no_grad():
            module.lora_up.weight.normal_()
    params = [p for g in groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    loss = sum((m.delta_weight(detach=False) ** 2).sum() for m in method.network)
    loss.backward()
    optimizer.step()
    moved = {g["name"]: 0.0 for g in groups}
    for group in groups:
        for p in group["params"]:
            i = next(k for k, q in enumerate(params) if q is p)
            moved[group["name"]] = max(moved[group["name"]], float((p.detach() - before[i]).abs().max()))
    for name, lr in lrs.items():
        assert moved[name] == pytest.approx(lr, rel=1e-3)


def test_block_options_rejected_early():
    with pytest.raises(ConfigError, match=r"block-dims.*25.*23") as info:
        LoraMethod(LoraOptions(block_dims="1,2", down_lr_weight="wavy", loraplus_lr_ratio=-1)).validate()
    assert "down-lr-weight" in str(info.value) and "loraplus" in str(info.value)
    with pytest.raises(ConfigError, match="needs 23"):
        LoraMethod(LoraOptions(block_dims=",".join(["4"] * 25))).prepare(fresh_bundle("sdxl"))


# --- resize --dynamic: kohya's ranks on a module with known singular values -----------------------------


def _known_spectrum_file(tmp_path, S, out=32, inp=24, conv=False):
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(out, len(S), generator=g))
    V, _ = torch.linalg.qr(torch.randn(inp * (9 if conv else 1), len(S), generator=g))
    up = U * torch.tensor(S)
    down = V.T
    name = "lora_unet_down_blocks_0_resnets_0_conv1" if conv else "lora_unet_down_blocks_0_attentions_0_proj_in"
    if conv:
        up, down = up.reshape(out, len(S), 1, 1), down.reshape(len(S), inp, 3, 3)
    tensors = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(4.0)}
    return save_lora(tmp_path / "spectrum.safetensors", tensors, {"ss_network_dim": "8"}, dtype="fp32"), name


# S = 8, 4, 2, 1, 1/2, 1/4, 1/8, 1/16 (and zeros beyond rank 8). By hand, kohya's rules give:
#   sv_ratio 5:        S > 8/5 -> 3 values -> index 3 -> rank 4
#   sv_fro 0.9:        cumulative S²/ΣS² = .750, .9375, ... first >= .81 at 1 -> index 2 -> rank 3
#   sv_cumulative 0.9: cumulative S/ΣS = .502, .753, .878, .941 ... first >= .9 at 3 -> index 4 -> rank 5
#   sv_cumulative 0.5: .502 >= .5 at 0 -> index 1 -> rank 2
SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]


@pytest.mark.parametrize(
    ("method", "param", "cap", "rank"),
    [
        ("sv_ratio", 5.0, 8, 4),
        ("sv_fro", 0.9, 8, 3),
        ("sv_cumulative", 0.9, 8, 5),
        ("sv_cumulative", 0.5, 8, 2),
        ("sv_cumulative", 0.9, 4, 4),  # capped at --rank
        ("sv_ratio", 1000.0, 8, 8),
    ],
)
@pytest.mark.parametrize("conv", [False, True])
def test_dynamic_resize_picks_kohyas_ranks(tmp_path, method, param, cap, rank, conv):
    path, name = _known_spectrum_file(tmp_path, SPECTRUM, conv=conv)
    result = resize_lora(read_lora(path), cap, dynamic=method, dynamic_param=param)
    assert result.ranks[name] == (8, rank)
    resized = parse_state_dict(result.tensors).modules[name]
    assert resized.rank == rank
    assert float(resized.tensors["alpha"]) == pytest.approx(0.5 * rank), "new alpha = old scale x new rank"
    if conv:
        assert tuple(resized.down.shape[1:]) == (24, 3, 3)


def test_dynamic_resize_zero_module_keeps_rank_one_and_cli(tmp_path):
    path, name = _known_spectrum_file(tmp_path, [0.0] * 4)
    assert resize_lora(read_lora(path), 8, dynamic="sv_fro", dynamic_param=0.9).ranks[name] == (4, 1)
    path, name = _known_spectrum_file(tmp_path, SPECTRUM)
    out = tmp_path / "small.safetensors"
    result = CliRunner().invoke(
        lora_group,
        ["resize", str(path), "-o", str(out), "--rank", "8", "--dynamic", "sv_fro", "--dynamic-param", "0.9"],
    )
    assert result.exit_code == 0, result.output
    assert "ranks [3]" in result.output
    assert read_lora(out).modules[name].rank == 3

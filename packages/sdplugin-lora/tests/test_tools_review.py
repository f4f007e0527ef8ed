"""Review of ``sdcore lora merge/extract/resize`` against kohya sd-scripts: numbers, metadata, bad input.

Expected values are rewritten from kohya's scripts (``networks/svd_merge_lora.py``, ``resize_lora.py``,
``flux_extract_lora.py``), cited per test; tensors are tiny in-memory LoRAs (no model needed).
"""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from sdcore.errors import ConfigError, NetworkMismatchError
from sdplugin_lora.commands import lora_group
from sdplugin_lora.format import parse_state_dict, save_lora
from sdplugin_lora.tools import extract_lora, merge_into_model, merge_loras, resize_lora

LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def _lora(seed: int, *, rank: int = 3, alpha: float = 1.5, width: int = 16, conv: bool = True, meta=None):
    g = torch.Generator().manual_seed(seed)
    t = {
        f"{LINEAR}.lora_down.weight": torch.randn(rank, width, generator=g),
        f"{LINEAR}.lora_up.weight": torch.randn(width, rank, generator=g),
        f"{LINEAR}.alpha": torch.tensor(alpha),
    }
    if conv:
        t |= {
            f"{CONV}.lora_down.weight": torch.randn(rank, 4, 3, 3, generator=g),
            f"{CONV}.lora_up.weight": torch.randn(6, rank, 1, 1, generator=g),
            f"{CONV}.alpha": torch.tensor(alpha),
        }
    return parse_state_dict(t, meta or {"ss_base_model_version": "sd_v1"})


def _kohya_svd_merge(parts, new_rank, quantile=0.99):
    """kohya svd_merge_lora.py merge_lora_models: weight += ratio * up @ down * alpha/dim (conv 3x3 by a
    conv2d of the factors, i.e. up @ down.flatten(1)); then SVD, U = U[:, :r] @ diag(S[:r]), Vh[:r], both
    clamped to +-quantile(cat(U, Vh), CLAMP_QUANTILE = 0.99) (svd_merge_lora.py, "extract new lora")."""
    weight = sum(
        ratio * (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0]) for up, down, alpha, ratio in parts
    )
    U, S, Vh = torch.linalg.svd(weight)
    r = min(new_rank, *weight.shape)
    U, Vh = U[:, :r] @ torch.diag(S[:r]), Vh[:r, :]
    hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), quantile)
    return U.clamp(-hi, hi), Vh.clamp(-hi, hi)


def test_svd_merge_clamps_factors_like_kohya():
    a, b = _lora(1), _lora(2, rank=2, alpha=4.0)
    tensors, meta = merge_loras([(a, 0.7), (b, -0.4)], mode="svd", rank=2, conv_rank=3)
    for name, rank in ((LINEAR, 2), (CONV, 3)):
        parts = [
            (lora.modules[name].up, lora.modules[name].down, lora.modules[name].alpha, ratio)
            for lora, ratio in ((a, 0.7), (b, -0.4))
        ]
        up, down = _kohya_svd_merge(parts, rank)
        # SVD signs are free: compare the clamped product, which the sign choice does not change
        got = tensors[f"{name}.lora_up.weight"].flatten(1) @ tensors[f"{name}.lora_down.weight"].flatten(1)
        torch.testing.assert_close(got, up @ down, atol=1e-5, rtol=1e-4)
        assert float(tensors[f"{name}.alpha"]) == rank  # alpha = new rank (svd_merge_lora.py)
    # kohya writes dim/alpha = new rank and conv_dim/conv_alpha = new conv rank
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "2")
    assert '"conv_dim": "3"' in meta["ss_network_args"]
    unclamped, _ = merge_loras([(a, 0.7), (b, -0.4)], mode="svd", rank=2, conv_rank=3, clamp_quantile=None)
    assert not torch.equal(unclamped[f"{LINEAR}.lora_up.weight"].abs(), tensors[f"{LINEAR}.lora_up.weight"].abs())


def test_concat_of_different_shapes_is_one_error(tmp_path):
    a, b = _lora(1, width=16, conv=False), _lora(2, width=32, conv=False)
    with pytest.raises(NetworkMismatchError, match="different shapes"):
        merge_loras([(a, 1.0), (b, 1.0)])
    paths = []
    for lora, name in ((a, "a"), (b, "b")):
        paths.append(str(save_lora(tmp_path / f"{name}.safetensors", lora.kohya_state_dict(), {}, dtype="fp32")))
    out = tmp_path / "ab.safetensors"
    result = CliRunner().invoke(lora_group, ["merge", *paths, "-o", str(out)])
    assert result.exit_code != 0 and isinstance(result.exception, NetworkMismatchError)
    assert not out.exists()


@pytest.mark.parametrize("ratio", [math.nan, math.inf])
def test_non_finite_ratio_refused(ratio):
    with pytest.raises(ConfigError, match="finite"):
        merge_loras([(_lora(1), ratio)])
    with pytest.raises(ConfigError, match="finite"):
        merge_into_model(None, [(_lora(1), ratio)])


def test_ranks_below_one_refused():
    lora = _lora(1)
    with pytest.raises(ConfigError, match="at least 1"):
        resize_lora(lora, 0)
    with pytest.raises(ConfigError, match="at least 1"):
        resize_lora(lora, 2, conv_rank=-1)
    with pytest.raises(ConfigError, match="at least 1"):
        merge_loras([(lora, 1.0)], mode="svd", rank=-3)


@pytest.mark.parametrize("quantile", [0.0, -0.5, 1.5])
def test_clamp_quantile_outside_zero_one_refused(quantile):
    with pytest.raises(ConfigError, match="clamp-quantile"):
        merge_loras([(_lora(1), 1.0)], mode="svd", rank=2, clamp_quantile=quantile)
    with pytest.raises(ConfigError, match="clamp-quantile"):
        extract_lora(None, None, clamp_quantile=quantile)


def test_cli_bad_ratio_names_file_and_ratio(tmp_path):
    path = save_lora(tmp_path / "a.safetensors", _lora(1).kohya_state_dict(), {}, dtype="fp32")
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(lora_group, ["merge", f"{path}:abc", "-o", str(out)])
    assert isinstance(result.exception, ConfigError)
    assert "'abc' is not a number" in str(result.exception)
    assert not out.exists()


def test_resize_metadata_as_kohya():
    # resize_lora.py resize(): fixed rank -> ss_network_dim = new rank, ss_network_alpha = str(new alpha)
    # (scale x new rank, a float), comment "dimension is resized from <largest old rank> to <new>";
    # dynamic -> "Dynamic" for both and "Dynamic resize with <method>: <param> from <old>"
    lora = _lora(1, rank=6, alpha=3.0, meta={"ss_base_model_version": "sd_v1", "ss_network_dim": "99"})
    meta = resize_lora(lora, 4).metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["ss_training_comment"] == "dimension is resized from 6 to 4"
    meta = resize_lora(lora, 4, conv_rank=2).metadata
    assert meta["ss_training_comment"] == "dimension is resized from 6 to 4 (conv: 2)"
    meta = resize_lora(lora, 4, dynamic="sv_fro", dynamic_param=0.9).metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert meta["ss_training_comment"] == "Dynamic resize with sv_fro: 0.9 from 6"


def test_flux_files_keep_kohyas_flux_network_module():
    # flux_extract_lora.py writes ss_network_module "networks.lora_flux" (lora_flux is what loads BFL names)
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_double_blocks_0_img_attn_proj"
    t = {
        f"{name}.lora_down.weight": torch.randn(2, 8, generator=g),
        f"{name}.lora_up.weight": torch.randn(8, 2, generator=g),
        f"{name}.alpha": torch.tensor(2.0),
    }
    lora = parse_state_dict(t, {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"})
    _, meta = merge_loras([(lora, 1.0), (lora, 0.5)])
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["ss_base_model_version"] == "flux1"
    # a LyCORIS (LoHa) Flux file resized is a plain LoRA afterwards: kohya's Flux LoRA module
    loha = {
        f"{name}.hada_w1_a": torch.randn(8, 2, generator=g),
        f"{name}.hada_w1_b": torch.randn(2, 8, generator=g),
        f"{name}.hada_w2_a": torch.randn(8, 2, generator=g),
        f"{name}.hada_w2_b": torch.randn(2, 8, generator=g),
        f"{name}.alpha": torch.tensor(2.0),
    }
    loha_file = parse_state_dict(loha, {"ss_base_model_version": "flux1", "ss_network_module": "lycoris.kohya"})
    assert resize_lora(loha_file, 2).metadata["ss_network_module"] == "networks.lora_flux"

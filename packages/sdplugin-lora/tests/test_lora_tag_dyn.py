"""A1111's full ``<lora:name:te:unet:dyn>`` arguments: ``dyn`` cuts the ranks, anything else is refused early."""

from __future__ import annotations

import pytest
import torch
from lora_testutil import all_params, fresh_bundle, random_network
from sdcore.errors import ConfigError
from sdcore.generate.session import NetworkSession
from sdplugin_lora.apply import LoraHandler
from sdplugin_lora.format import network_metadata, save_lora


def _rank4(bundle, directory):
    network = random_network(bundle, rank=4, alpha=3.0, conv_rank=0, seed=1)
    meta = network_metadata(family=bundle.family, prediction_type=bundle.prediction_type, rank=4, alpha=3)
    return network.state_dict(), save_lora(directory / "dy.safetensors", network.state_dict(), meta, dtype="fp32")


def _render(directory, prompt):
    bundle = fresh_bundle("sd1")
    with NetworkSession({"lora": LoraHandler(directory)}).apply(bundle, prompt):
        return all_params(bundle)


def test_dyn_uses_the_first_ranks_with_alpha_over_the_full_rank(tmp_path):
    """A1111: Lora/lyco_helpers.py rebuild_conventional cuts ``up[:, :dyn] @ down[:dyn]``; Lora/network.py
    calc_scale keeps ``alpha / dim`` with ``dim`` the file's rank (network_lora.py sets it from lora_down)."""
    state, _ = _rank4(fresh_bundle("sd1"), tmp_path)
    base = all_params(fresh_bundle("sd1"))
    named = _render(tmp_path, "a cat <lora:dy:0.7:unet=0.7:dyn=2>")
    positional = _render(tmp_path, "a cat <lora:dy:0.7:0.7:2>")
    full = _render(tmp_path, "a cat <lora:dy:0.7>")

    # the reference, rewritten from A1111's formula: W + m * (alpha / 4) * up[:, :2] @ down[:2]
    checked = 0
    bundle = fresh_bundle("sd1")
    modules = dict(bundle.unet.named_modules())
    for key, down in state.items():
        if not key.endswith("lora_down.weight") or not key.startswith("lora_unet_"):
            continue
        prefix = key[: -len("lora_down.weight")]
        up, alpha = state[prefix + "lora_up.weight"], float(state[prefix + "alpha"])
        assert down.shape[0] == 4
        name = next(n for n in modules if n and "lora_unet_" + n.replace(".", "_") == prefix[:-1])
        param = ("unet", name + ".weight")
        weight = base[param]
        change = (up[:, :2].float().flatten(1) @ down[:2].float().flatten(1)).reshape(weight.shape)
        expected = (weight.float() + 0.7 * (alpha / 4) * change).to(weight.dtype)
        torch.testing.assert_close(named[param], expected, atol=1e-6, rtol=0)
        assert torch.equal(named[param], positional[param]), "positional dyn is the named one"
        assert (full[param] - named[param]).abs().max() > 1e-4, "dyn=2 must differ from the full rank"
        checked += 1
    assert checked > 3


def test_dyn_equals_a_rank2_file_of_the_first_ranks(tmp_path):
    """The rank-2 file of the first two ranks, alpha chosen so alpha'/2 == alpha/4 (A1111's scale), renders
    bit for bit as ``dyn=2`` on the rank-4 file."""
    big = tmp_path / "big"
    big.mkdir()
    state, _ = _rank4(fresh_bundle("sd1"), big)
    small: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("lora_down.weight"):
            small[key] = value[:2].clone()
        elif key.endswith("lora_up.weight"):
            small[key] = value[:, :2].clone()
        else:
            small[key] = value * 2 / 4  # alpha: 3 -> 1.5, exact in binary
    other = tmp_path / "small"
    other.mkdir()
    bundle = fresh_bundle("sd1")
    meta = network_metadata(family=bundle.family, prediction_type=bundle.prediction_type, rank=2, alpha=1.5)
    save_lora(other / "dy.safetensors", small, meta, dtype="fp32")
    cut = _render(big, "a cat <lora:dy:1:dyn=2>")
    reference = _render(other, "a cat <lora:dy:1>")
    assert all(torch.equal(cut[k], reference[k]) for k in reference)
    whole = _render(big, "a cat <lora:dy:1:dyn=16>")  # above the rank: the whole LoRA, as A1111's slice
    assert all(torch.equal(whole[k], v) for k, v in _render(big, "a cat <lora:dy:1>").items())


def test_unknown_or_extra_arguments_are_one_line_before_loading(tmp_path):
    _rank4(fresh_bundle("sd1"), tmp_path)
    session = NetworkSession({"lora": LoraHandler(tmp_path)})
    assert session.check([("a <lora:dy:1:dyn=2> <lora:dy:0.5:0.5:2>", "")]) == []
    problems = session.check(
        [("a <lora:dy:foo=1>", ""), ("b <lora:dy:1:1:2:3>", ""), ("c <lora:dy:dyn=1.5>", ""), ("d <lora:dy:0:0:0>", "")]
    )
    assert problems == [
        "<lora:dy:foo=1>: unknown argument 'foo' (known: te, unet, dyn)",
        "<lora:dy:1:1:2:3>: 4 positional values (at most 3: te, unet, dyn)",
        "<lora:dy:dyn=1.5>: dyn=1.5 must be a whole number of ranks, 1 or more",
        "<lora:dy:0:0:0>: dyn=0 must be a whole number of ranks, 1 or more",
    ]
    assert all("\n" not in p for p in problems)
    # activate itself refuses too (a caller without the session's check), before touching the model
    bundle = fresh_bundle("sd1")
    before = all_params(bundle)
    with pytest.raises(ConfigError, match="unknown argument 'foo'"):
        with session.apply(bundle, "a <lora:dy:foo=1>"):
            pass
    assert all(torch.equal(before[k], v) for k, v in all_params(bundle).items())

"""``lora_B.bias``/``lora_up.bias`` and full norm scales outside BFL's control LoRAs' generation path.

Since sdcore applies a LoRA module's ``lora_up`` bias (``m · s · b``, BFL's ``LinearLora`` and PEFT's ``lora_bias``)
and a file's full attention-norm scales, every path that reads such a file must use them, keep them or refuse them in
one line: merging a bias into a layer that has none (PEFT refuses that merge too, peft/tuners/lora/layer.py
``Linear.merge``: "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias"), and
``sdcore lora resize``/``merge``, which re-factor the modules' weights.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lora_testutil import all_params, fresh_bundle, random_network  # noqa: E402


def _with_bias_on_to_q(bundle, tmp_path):
    """A kohya SD1 LoRA whose ``to_q`` (a Linear without bias in diffusers' UNet) and ``proj_in`` (with one) modules
    carry a ``lora_up.bias``."""
    from sdplugin_lora.format import network_metadata, save_lora

    state = dict(random_network(bundle, text_encoder=False).state_dict())
    names = sorted({key.split(".")[0] for key in state})
    to_q = next(name for name in names if name.endswith("attn1_to_q"))
    proj_in = next(name for name in names if name.endswith("proj_in"))
    generator = torch.Generator().manual_seed(1)
    for name in (proj_in, to_q):  # proj_in (merged first) before to_q
        state[f"{name}.lora_up.bias"] = torch.randn(state[f"{name}.lora_up.weight"].shape[0], generator=generator)
    path = save_lora(
        tmp_path / "bias.safetensors", state, network_metadata(family="sd1", rank=4, alpha=2), dtype="fp32"
    )
    return path, to_q, state


def test_a_bias_on_a_layer_without_one_is_refused_in_one_line_when_merging_and_nothing_changes(tmp_path):
    from sdcore.errors import NetworkMismatchError
    from sdplugin_lora.apply import apply_lora

    bundle = fresh_bundle("sd1")
    path, to_q, _ = _with_bias_on_to_q(bundle, tmp_path)
    before = all_params(bundle)
    with pytest.raises(NetworkMismatchError) as caught:
        apply_lora(bundle, path, 0.7, merge=True)
    message = str(caught.value)
    assert "\n" not in message and to_q in message and "bias" in message
    after = all_params(bundle)
    assert [key for key, value in before.items() if not torch.equal(value, after[key])] == []


def test_hooks_add_the_bias_on_a_layer_without_one(tmp_path):
    """Unmerged, as PEFT's forward does (y = W x + s · (B A x + b)), at the tag's multiplier."""
    from sdplugin_lora.apply import apply_lora

    bundle = fresh_bundle("sd1")
    path, to_q, state = _with_bias_on_to_q(bundle, tmp_path)
    layer = bundle.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = layer(x)
        applied = apply_lora(bundle, path, 0.7, merge=False)
        hooked = layer(x)
        applied.remove()
    up, down = state[f"{to_q}.lora_up.weight"].flatten(1), state[f"{to_q}.lora_down.weight"].flatten(1)
    scale = 2.0 / 4  # alpha / rank
    expected = base + 0.7 * scale * (x @ (up @ down).T + state[f"{to_q}.lora_up.bias"])
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=1e-5)


def _bfl_file(seed: int, *, norms: bool = True, rank: int = 3):
    """A BFL-layout FLUX.1 LoRA (``LinearLora``: lora_A, lora_B with a bias, no alpha) of two modules, with a full
    attention-norm scale when ``norms``."""
    from sdplugin_lora.format import parse_state_dict

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module, (out, fan_in) in {"double_blocks.0.img_attn.proj": (8, 8), "single_blocks.0.linear2": (8, 40)}.items():
        state[f"{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator)
        state[f"{module}.lora_B.weight"] = torch.randn(out, rank, generator=generator)
        state[f"{module}.lora_B.bias"] = torch.randn(out, generator=generator)
    if norms:
        state["double_blocks.0.img_attn.norm.query_norm.scale"] = 1 + torch.randn(4, generator=generator) * 0.1
    lora = parse_state_dict(state)
    assert {w.tensors.get("lora_up.bias") is not None for w in lora.modules.values()} == {True}
    return lora, state


def _bias_change(lora, name):
    """``s · b``: what a module's ``lora_up.bias`` adds at multiplier 1 (``LoraAdapter.bias_change``)."""
    weights = lora.modules[name]
    return weights.tensors["lora_up.bias"].float() * weights.scale


def test_resize_keeps_the_biases_and_the_norm_scales():
    """A file in BFL's layout that sets norm scales is written back in it (``lora_A``/``lora_B``/``lora_B.bias``, no
    alpha: tests/test_control_lora_resize.py checks the loaders)."""
    from sdplugin_lora.format import parse_state_dict
    from sdplugin_lora.tools import resize_lora

    lora, state = _bfl_file(0)
    result = resize_lora(lora, 2)
    assert set(result.tensors) == set(state)
    assert {tuple(result.tensors[f"{m}.lora_A.weight"].shape) for m in lora.modules} == {(2, 8), (2, 40)}
    resized = parse_state_dict(result.tensors, result.metadata)
    for name in lora.modules:
        torch.testing.assert_close(_bias_change(resized, name), _bias_change(lora, name))
    assert resized.norm_scales.keys() == lora.norm_scales.keys()
    key = "double_blocks.0.img_attn.norm.query_norm.scale"
    assert torch.equal(resized.norm_scales[key], state[key])
    assert resized.unknown_keys == []


@pytest.mark.parametrize("mode", ["concat", "svd"])
def test_merge_sums_the_biases_at_their_ratios(mode):
    """``Σ ratio · s · b``: the merged file's modules change the layers' outputs by the same bias term."""
    from sdplugin_lora.format import parse_state_dict
    from sdplugin_lora.tools import merge_loras

    first, _ = _bfl_file(0, norms=False)
    second, _ = _bfl_file(1, norms=False, rank=2)
    tensors, meta = merge_loras([(first, 0.5), (second, -0.75)], mode=mode, rank=4)
    merged = parse_state_dict(tensors, meta)
    for name in first.modules:
        expected = 0.5 * _bias_change(first, name) - 0.75 * _bias_change(second, name)
        torch.testing.assert_close(_bias_change(merged, name), expected)


def test_merge_refuses_a_file_that_sets_norm_scales_in_one_line():
    from sdcore.errors import NetworkMismatchError
    from sdplugin_lora.tools import merge_loras

    control, _ = _bfl_file(0)
    other, _ = _bfl_file(1, norms=False)
    with pytest.raises(NetworkMismatchError) as caught:
        merge_loras([(other, 1.0), (control, 0.5)], mode="concat")
    message = str(caught.value)
    assert "\n" not in message and "query_norm.scale" in message


def test_info_counts_the_biases_and_norm_scales(tmp_path):
    """They were listed as unknown keys before sdcore applied them; ``lora info`` still shows them."""
    from click.testing import CliRunner
    from safetensors.torch import save_file
    from sdplugin_lora.commands import info_command
    from sdplugin_lora.tools import lora_info

    _, state = _bfl_file(0)
    path = tmp_path / "flux1-canny-dev-lora.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    info = lora_info(path)
    assert (info["bias_modules"], info["norm_scales"], info["unknown_keys"]) == (2, 1, [])
    result = CliRunner().invoke(info_command, [str(path)])
    assert result.exit_code == 0, result.output
    assert "lora_up bias: 2" in result.output and "norm scales (set in full): 1" in result.output

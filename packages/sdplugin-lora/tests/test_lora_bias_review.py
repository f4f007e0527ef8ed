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

"""DoRA files give the same merged weights in sdcore, A1111, ComfyUI and LyCORIS.

Each tool's merge is written here independently, from its documented behaviour:

* A1111 (``extensions-builtin/Lora``): ``updown = scale·ΔW``; with ``dora_scale`` the merged weight
  ``W + updown`` is divided by its norm taken per *input* channel (over the output and kernel
  axes) and multiplied by ``dora_scale``; the change ``W' - W`` is then multiplied by the weight.
* ComfyUI (``comfy/weight_adapter/base.py weight_decompose``): if ``dora_scale.shape[0]`` equals
  the output width it divides by the per-output-row norm of the *original* weight, else by the
  per-input-channel norm of ``W + ΔW``; it adds float eps to the norm; strength s gives
  ``W + s·(W' - W)``.
* LyCORIS (``apply_weight_decompose``): norm of ``W + ΔW`` on the axis of its ``wd_on_out``
  setting plus eps; a multiplier m interpolates the scale: ``(W + ΔW) · (m·(d/‖·‖ - 1) + 1)``.
"""

from __future__ import annotations

import pytest
import torch
from lora_testutil import fresh_bundle
from sdplugin_lora.apply import apply_lora
from sdplugin_lora.format import network_metadata, read_lora, save_lora
from sdplugin_lora.naming import ModuleIndex
from sdplugin_lora.network import LoraNetwork

EPS = torch.finfo(torch.float32).eps


def _in_norm(m):
    dims = (0, *range(2, m.dim()))
    return torch.linalg.vector_norm(m, dim=dims, keepdim=True)


def _out_norm(m):
    return torch.linalg.vector_norm(m, dim=tuple(range(1, m.dim())), keepdim=True)


def a1111(w, up, down, alpha, dora, mult):
    updown = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (alpha / down.shape[0])
    merged = w + updown
    return w + mult * (merged * (dora / _in_norm(merged)) - w)


def comfyui(w, up, down, alpha, dora, strength):
    diff = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (alpha / down.shape[0])
    calc = w + diff
    norm = _out_norm(w) if dora.shape[0] == w.shape[0] else _in_norm(calc)
    calc = calc * (dora / (norm + EPS))
    return w + strength * (calc - w)


def lycoris(w, up, down, alpha, dora, mult, wd_on_out):
    merged = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (alpha / down.shape[0])
    norm = (_out_norm(merged) if wd_on_out else _in_norm(merged)) + EPS
    return merged * (mult * (dora / norm - 1) + 1)


def _dora_file(tmp_path, family="sd1", layout=None):
    """A trained-looking DoRA file from our network (factors and magnitude moved off init)."""
    bundle = fresh_bundle(family)
    targets = ModuleIndex.from_bundle(bundle).select(conv=True, text_encoder=True)
    network = LoraNetwork.create(targets, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, algo="dora")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * 0.1)
            module.dora_scale.mul_(1 + 0.1 * torch.rand(module.dora_scale.shape, generator=g))
    state = network.state_dict()
    if layout == "out":  # what LyCORIS writes with wd_on_out=True
        for name, module in network.loras.items():
            w = module.base.weight.detach().float()
            state[f"{name}.dora_scale"] = _out_norm(w) * (1 + 0.1 * torch.rand(w.shape[0], generator=g)).reshape(
                -1, *[1] * (w.dim() - 1)
            )
    meta = network_metadata(family=family, rank=4, alpha=2, network_module="lycoris.kohya")
    return save_lora(tmp_path / f"dora-{layout}.safetensors", state, meta, dtype="fp32"), len(network)


def _modules(path, bundle):
    index = ModuleIndex.from_bundle(bundle)
    for name, weights in read_lora(path).modules.items():
        target = index.resolve(name)
        t = weights.tensors
        yield (
            target,
            target.module.weight.detach().float().clone(),
            t["lora_up.weight"].float(),
            t["lora_down.weight"].float(),
            float(t["alpha"]),
            t["dora_scale"].float(),
        )


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("mult", [1.0, 0.6])
def test_our_dora_merges_like_a1111_comfyui_and_lycoris(tmp_path, family, mult):
    path, count = _dora_file(tmp_path, family)
    saved = read_lora(path)
    assert all(w.is_dora for w in saved.modules.values())
    # the magnitude is per input channel: [1, in] / [1, in, 1, 1]
    for weights in saved.modules.values():
        dora = weights.tensors["dora_scale"]
        assert dora.shape[0] == 1 and dora.shape[1] == weights.down.shape[1]
    bundle = fresh_bundle(family)
    expected = {}
    worst = {"a1111": 0.0, "comfyui": 0.0, "lycoris": 0.0}
    for target, w, up, down, alpha, dora in _modules(path, bundle):
        want = a1111(w, up, down, alpha, dora, mult)
        expected[target.name] = want
        worst["comfyui"] = max(worst["comfyui"], float((comfyui(w, up, down, alpha, dora, mult) - want).abs().max()))
        if mult == 1.0:
            lyco = lycoris(w, up, down, alpha, dora, mult, wd_on_out=False)
            worst["lycoris"] = max(worst["lycoris"], float((lyco - want).abs().max()))
        assert float((want - w).abs().max()) > 1e-3, "the file must change the weights"
    applied = apply_lora(bundle, path, mult, merge=True)
    assert applied.touched == count == len(expected)
    index = ModuleIndex.from_bundle(bundle)
    for name, want in expected.items():
        worst["a1111"] = max(worst["a1111"], float((index.resolve(name).module.weight.detach() - want).abs().max()))
    assert max(worst.values()) <= 1e-5, worst


def test_the_output_row_layout_is_what_the_uis_get_wrong(tmp_path):
    """Why we write [1, in]: with LyCORIS' [out, 1] layout A1111 and ComfyUI disagree with the
    trainer's own weights (A1111 broadcasts [out,1]/[1,in]; ComfyUI normalises by ‖W‖)."""
    path, _ = _dora_file(tmp_path, "sd1", layout="out")
    bundle = fresh_bundle("sd1")
    rows = list(_modules(path, bundle))
    apply_lora(bundle, path, 1.0, merge=True)  # we follow LyCORIS for files it wrote
    ours_vs_lycoris = a1111_gap = comfy_gap = 0.0
    for target, w, up, down, alpha, dora in rows:
        lyco = lycoris(w, up, down, alpha, dora, 1.0, wd_on_out=True)
        ours_vs_lycoris = max(ours_vs_lycoris, float((target.module.weight.detach() - lyco).abs().max()))
        a1111_gap = max(a1111_gap, float((a1111(w, up, down, alpha, dora, 1.0) - lyco).abs().max()))
        comfy_gap = max(comfy_gap, float((comfyui(w, up, down, alpha, dora, 1.0) - lyco).abs().max()))
    assert ours_vs_lycoris <= 1e-5
    assert a1111_gap > 1e-2 and comfy_gap > 1e-4, (a1111_gap, comfy_gap)


def test_trained_dora_starts_at_identity_and_hooks_match_merge(tmp_path):
    from lora_testutil import unet_inputs, unet_out

    path, _ = _dora_file(tmp_path)
    hooked, merged, base = fresh_bundle("sd1"), fresh_bundle("sd1"), fresh_bundle("sd1")
    apply_lora(hooked, path, 0.8, merge=False)
    apply_lora(merged, path, 0.8, merge=True)
    inputs = unet_inputs(base)
    out_h, out_m = unet_out(hooked, inputs), unet_out(merged, inputs)
    torch.testing.assert_close(out_h, out_m, atol=1e-4, rtol=0)
    assert (out_m - unet_out(base, inputs)).abs().max() > 1e-3

"""OFT as kohya's networks/oft.py writes it: keys, constraint, merge, and what ComfyUI computes.

Formulas written here from the tools' behaviour:

* kohya: ``Q = B - Bᵀ`` per block; the norm of all of ``Q`` is clamped to ``alpha · out``;
  ``R = (I + Q)(I - Q)⁻¹`` per block, block-diagonal; weight m: ``m·R + (1-m)·I``;
  merged ``W'[p, i] = Σ_o W[o, i] R[o, p]``.
* ComfyUI (``weight_adapter/oft.py``): the same ``R`` but the norm is clamped to ``alpha`` itself;
  ``W' = W + s · einsum(r·s - s·I, W)`` per block.
"""

from __future__ import annotations

import pytest
import torch
from lora_testutil import fresh_bundle, unet_inputs, unet_out
from sdcore.errors import ConfigError
from sdcore.train.method import SaveInfo
from sdplugin_lora.apply import apply_lora
from sdplugin_lora.format import read_lora
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_lora.naming import ModuleIndex
from sdplugin_lora.tools import lora_info


def _cayley(q):
    eye = torch.eye(q.shape[-1]).expand_as(q)
    return (eye + q) @ torch.linalg.inv(eye - q)


def kohya(w, blocks, alpha, m):
    out = w.shape[0]
    q = blocks - blocks.transpose(1, 2)
    norm = torch.norm(q.flatten())
    q = q * ((torch.clamp(norm, max=alpha * out) + 1e-8) / (norm + 1e-8))
    r = torch.block_diag(*_cayley(q))
    r = m * r + (1 - m) * torch.eye(out)
    flat = w.reshape(out, -1)
    return torch.einsum("oi, op -> pi", flat, r).reshape(w.shape)


def comfyui(w, blocks, alpha, s):
    n, size, _ = blocks.shape
    q = blocks - blocks.transpose(1, 2)
    norm = torch.norm(q) + 1e-8
    if alpha > 0 and norm > alpha:
        q = q * alpha / norm
    r = _cayley(q)
    eye = torch.eye(size)
    diff = torch.einsum("k n m, k n ... -> k m ...", r * s - s * eye, w.reshape(n, size, *w.shape[1:]))
    return w + s * diff.reshape(w.shape)


def _trained(tmp_path, alpha, std):
    bundle = fresh_bundle("sd1")
    method = LoraMethod(LoraOptions(rank=4, alpha=alpha, algo="oft", save_dtype="fp32"))
    method.validate()
    method.prepare(bundle)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in method.network:
            module.oft_blocks.normal_(0, std, generator=g)
    path = method.save(bundle, SaveInfo(path=tmp_path / "oft.safetensors", step=1, epoch=1, metadata={}, final=True))
    return bundle, method, path


@pytest.mark.parametrize("m", [1.0, 0.6])
def test_oft_file_is_kohyas_and_merges_like_kohya_and_comfyui(tmp_path, m):
    trained, method, path = _trained(tmp_path, alpha=1.0, std=0.002)
    lora = read_lora(path)
    assert lora.metadata["ss_network_module"] == "networks.oft"
    assert all(key.startswith("oft_unet_") for key in lora.modules)
    assert all(set(w.tensors) == {"oft_blocks", "alpha"} for w in lora.modules.values())
    bundle = fresh_bundle("sd1")
    index = ModuleIndex.from_bundle(bundle)
    expected = {}
    comfy_gap = 0.0
    for key, weights in lora.modules.items():
        target = index.resolve("lora_unet_" + key[len("oft_unet_") :])
        w = target.module.weight.detach().float().clone()
        blocks, alpha = weights.tensors["oft_blocks"].float(), float(weights.tensors["alpha"])
        q_norm = float((blocks - blocks.transpose(1, 2)).norm())
        assert q_norm < alpha, "below both constraints: kohya and ComfyUI agree"
        expected[target.name] = kohya(w, blocks, alpha, m)
        if m == 1.0:
            comfy_gap = max(comfy_gap, float((comfyui(w, blocks, alpha, 1.0) - expected[target.name]).abs().max()))
        assert float((expected[target.name] - w).abs().max()) > 1e-4
    applied = apply_lora(bundle, path, m, merge=True)
    assert applied.touched == len(expected) == len(method.network)
    worst = max(float((index.resolve(n).module.weight.detach() - want).abs().max()) for n, want in expected.items())
    assert worst <= 1e-5 and comfy_gap <= 1e-5, (worst, comfy_gap)
    if m == 1.0:  # the training forward (hooks on the trained bundle) is the merged model
        inputs = unet_inputs(bundle)
        torch.testing.assert_close(unet_out(bundle, inputs), unet_out(trained, inputs), atol=1e-4, rtol=0)
    assert lora_info(path)["algorithm"] == "OFT"


def test_oft_constraint_is_kohyas_alpha_times_out(tmp_path):
    """Between alpha and alpha·out the norm is clamped by ComfyUI but not by kohya (nor by us)."""
    _, _, path = _trained(tmp_path, alpha=1e-3, std=0.02)
    bundle = fresh_bundle("sd1")
    index = ModuleIndex.from_bundle(bundle)
    rows = []
    for key, weights in read_lora(path).modules.items():
        target = index.resolve("lora_unet_" + key[len("oft_unet_") :])
        rows.append((target, target.module.weight.detach().float().clone(), weights.tensors["oft_blocks"].float()))
    apply_lora(bundle, path, merge=True)
    ours_vs_kohya = comfy_gap = 0.0
    for target, w, blocks in rows:
        want = kohya(w, blocks, 1e-3, 1.0)
        ours_vs_kohya = max(ours_vs_kohya, float((target.module.weight.detach() - want).abs().max()))
        comfy_gap = max(comfy_gap, float((comfyui(w, blocks, 1e-3, 1.0) - want).abs().max()))
    assert ours_vs_kohya <= 1e-5
    assert comfy_gap > 1e-4


def test_oft_trains_and_is_refused_where_kohya_has_none():
    bundle = fresh_bundle("sd1")
    method = LoraMethod(LoraOptions(rank=4, algo="oft"))
    groups = method.prepare(bundle)
    assert float(method.network.state_dict()[next(iter(method.network.state_dict()))].abs().max()) >= 0
    assert all(float(m.delta_weight().abs().max()) < 1e-6 for m in method.network), "R = I at the start"
    latents, t, hidden, _ = unet_inputs(bundle)
    bundle.unet(latents, t, encoder_hidden_states=hidden).sample.pow(2).mean().backward()
    grads = [p.grad for g in groups for p in g["params"]]
    assert all(g is not None for g in grads) and any(float(g.abs().max()) > 0 for g in grads)
    with pytest.raises(ConfigError, match="UNet only"):
        LoraMethod(LoraOptions(algo="oft", train_text_encoder=True)).validate()
    with pytest.raises(ConfigError, match="drop --block-dims, --use-tucker"):
        LoraMethod(LoraOptions(algo="oft", block_dims="1", use_tucker=True)).validate()
    with pytest.raises(ConfigError, match="dividing"):
        LoraMethod(LoraOptions(algo="oft", rank=7)).prepare(fresh_bundle("sd1"))


def test_oft_warm_start_from_its_own_file(tmp_path):
    _, first, path = _trained(tmp_path, alpha=1.0, std=0.002)
    second = LoraMethod(LoraOptions(rank=4, alpha=1.0, algo="oft", network_weights=str(path)))
    second.prepare(fresh_bundle("sd1"))
    a, b = first.trainable_state_dict(), second.trainable_state_dict()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def comfyui_unet_keys(unet):
    """The LoRA keys ComfyUI's ``model_lora_keys_unet`` maps for an SD UNet, from its documented
    rules: ``lora_unet_`` + the diffusers module path with dots as underscores (and the ldm path,
    which the diffusers names cover here), ``lycoris_`` + the same, the bare dotted path and
    ``unet.`` + it. There is no ``oft_unet_`` entry (facts from comfy/lora.py; no code copied)."""
    keys = set()
    for path, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            flat = path.replace(".", "_")
            keys |= {f"lora_unet_{flat}", f"lycoris_{flat}", path, f"unet.{path}"}
    return keys


@pytest.mark.parametrize(("alpha", "std"), [(1.0, 0.002), (1e-3, 0.02)])
def test_comfyui_loads_the_converted_file_with_our_merged_weights(tmp_path, alpha, std):
    """ComfyUI skips kohya's ``oft_unet_`` keys; ``sdcore lora convert --to comfyui`` renames them and
    applies kohya's constraint, after which ComfyUI's formula gives our merged weights (<= 1e-5),
    also where the two constraints differ (second case)."""
    from click.testing import CliRunner
    from sdplugin_lora.commands import lora_group

    _, _, path = _trained(tmp_path, alpha=alpha, std=std)
    bundle = fresh_bundle("sd1")
    comfy_keys = comfyui_unet_keys(bundle.unet)
    kohya_file = read_lora(path)
    assert not any(key in comfy_keys for key in kohya_file.modules), "ComfyUI would load kohya's OFT names"

    converted = tmp_path / "comfy.safetensors"
    result = CliRunner().invoke(lora_group, ["convert", str(path), "-o", str(converted), "--to", "comfyui"])
    assert result.exit_code == 0, result.output
    comfy_file = read_lora(converted)
    assert set(comfy_file.modules) <= comfy_keys and len(comfy_file.modules) == len(kohya_file.modules)

    index = ModuleIndex.from_bundle(bundle)
    original = {n: index.resolve(n).module.weight.detach().float().clone() for n in comfy_file.modules}
    apply_lora(bundle, path, merge=True)  # ours, from kohya's file
    ours = {n: index.resolve(n).module.weight.detach().float().clone() for n in comfy_file.modules}
    unconverted_gap = converted_gap = 0.0
    for name, weights in comfy_file.modules.items():
        kohya_weights = kohya_file.modules["oft_unet_" + name[len("lora_unet_") :]].tensors
        raw = comfyui(original[name], kohya_weights["oft_blocks"].float(), float(kohya_weights["alpha"]), 1.0)
        unconverted_gap = max(unconverted_gap, float((raw - ours[name]).abs().max()))
        t = weights.tensors
        got = comfyui(original[name], t["oft_blocks"].float(), float(t["alpha"]), 1.0)
        converted_gap = max(converted_gap, float((got - ours[name]).abs().max()))
    assert converted_gap <= 1e-5, converted_gap
    if alpha < 1e-2:  # the norm is above alpha: ComfyUI alone would clamp it harder than kohya
        assert unconverted_gap > 1e-4
    again = fresh_bundle("sd1")  # sdcore reads the converted file to the same weights
    apply_lora(again, converted, merge=True)
    index2 = ModuleIndex.from_bundle(again)
    worst = max(float((index2.resolve(n).module.weight.detach() - w).abs().max()) for n, w in ours.items())
    assert worst <= 1e-5

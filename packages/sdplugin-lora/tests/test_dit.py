"""LoRA for the DiT families (SD3/SD3.5 MMDiT, FLUX.1) on tiny diffusers transformers.

The expected names are written here from kohya's rules (sd-scripts ``networks/lora_flux.py``,
``networks/lora_sd3.py``: every Linear of BFL's ``DoubleStreamBlock``/``SingleStreamBlock`` and of
SAI's ``SingleDiTBlock``, flattened with ``_``), the expected weights from diffusers itself:
``load_lora_weights`` + ``fuse_lora`` (which reads kohya's Flux names but not kohya's SD3 names) and
diffusers' single-file converter from SAI's checkpoint layout (the oracle for SD3's kohya names).
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from safetensors.torch import save_file
from sdcore.errors import NetworkMismatchError


def _flux_full_width():
    """One single block at Flux's real width (diffusers' kohya Flux reader splits ``linear1`` as
    3 x 3072 + 12288 whatever the model), zero weights: allocating is all it costs (180M parameters)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=0,
            num_single_layers=1,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=8,
            pooled_projection_dim=8,
            axes_dims_rope=(16, 56, 56),
        )
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    return model.eval()


@functools.cache
def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
        guidance_embeds=True,
    ).eval()


@functools.cache
def _sd3(medium35: bool = True):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(1)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        qk_norm="rms_norm" if medium35 else None,
        dual_attention_layers=(0, 1) if medium35 else (),
    ).eval()


def fresh(family: str):
    return copy.deepcopy(_flux() if family == "flux" else _sd3())


def _index(family: str, model, encoders=()):
    from sdplugin_lora.naming import ModuleIndex

    return ModuleIndex.build_dit(family, model, list(encoders))


def _network(index, *, rank=2, alpha=1.0, seed=0, t5=False):
    from sdplugin_lora.network import LoraNetwork

    network = LoraNetwork.create(index.select(t5=t5), rank=rank, alpha=alpha)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=gen) * 0.3)
    return network


def _tiny_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    t5 = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu")
    return (
        CLIPTextModel(CLIPTextConfig(**clip)),
        CLIPTextModelWithProjection(CLIPTextConfig(**clip, projection_dim=16)),
        T5EncoderModel(t5),
    )


# --- names ---------------------------------------------------------------------------------------


def kohya_flux_names(double: int, single: int) -> set[str]:
    """kohya lora_flux: every Linear of BFL's double blocks (img/txt attn qkv+proj, mlp 0/2, mod.lin)
    and single blocks (linear1, linear2, modulation.lin)."""
    names = set()
    for i in range(double):
        for stream in ("img", "txt"):
            for leaf in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2", "mod_lin"):
                names.add(f"lora_unet_double_blocks_{i}_{stream}_{leaf}")
    for i in range(single):
        for leaf in ("linear1", "linear2", "modulation_lin"):
            names.add(f"lora_unet_single_blocks_{i}_{leaf}")
    return names


def kohya_sd3_names(layers: int, attn2: tuple[int, ...]) -> set[str]:
    """kohya lora_sd3: every Linear of SAI's x_block and context_block; the last context block is
    'pre-only' (qkv and adaLN only), attn2 exists in SD3.5-medium's MMDiT-X layers."""
    names = set()
    for i in range(layers):
        leaves = ["attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1"]
        for leaf in leaves + (["attn2_qkv", "attn2_proj"] if i in attn2 else []):
            names.add(f"lora_unet_joint_blocks_{i}_x_block_{leaf}")
        for leaf in leaves if i < layers - 1 else ["attn_qkv", "adaLN_modulation_1"]:
            names.add(f"lora_unet_joint_blocks_{i}_context_block_{leaf}")
    return names


def _file_names(state) -> set[str]:
    return {key.split(".", 1)[0] for key in state}


def test_flux_and_sd3_default_names_are_kohyas():
    from sdplugin_lora.dit import kohya_state_dict

    index = _index("flux", _flux())
    assert _file_names(kohya_state_dict(_network(index).state_dict(), index)) == kohya_flux_names(2, 2)
    for medium35, attn2 in ((True, (0, 1)), (False, ())):
        index = _index("sd3", _sd3(medium35))
        assert _file_names(kohya_state_dict(_network(index).state_dict(), index)) == kohya_sd3_names(3, attn2)


def test_text_encoder_names_te1_te2_te3():
    clip_l, clip_g, t5 = _tiny_encoders()
    index = _index("sd3", _sd3(), [("text_encoder", clip_l), ("text_encoder_2", clip_g), ("text_encoder_3", t5)])
    names = {t.name for t in index.select(unet=False)}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc2" in names
    assert not any(n.startswith("lora_te3") for n in names)  # T5 only with kohya's train_t5xxl
    t5_names = {t.name for t in index.select(unet=False, t5=True)} - names
    # kohya: T5Attention (q, k, v, o) and T5DenseGatedActDense (wi_0, wi_1, wo) of every block
    assert t5_names == {
        f"lora_te3_encoder_block_0_layer_{layer}_{leaf}"
        for layer, leaves in ((0, ("SelfAttention_q", "SelfAttention_k", "SelfAttention_v", "SelfAttention_o")),)
        for leaf in leaves
    } | {f"lora_te3_encoder_block_0_layer_1_DenseReluDense_{leaf}" for leaf in ("wi_0", "wi_1", "wo")}
    flux = _index("flux", _flux(), [("text_encoder", clip_l), ("text_encoder_2", t5)])
    assert {t.name.split("_text_model")[0] for t in flux.select(unet=False)} == {"lora_te1"}
    assert any(t.name.startswith("lora_te3_encoder_block_0") for t in flux.select(unet=False, t5=True))


# --- fusing and splitting ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_fused_file_is_exact_and_splits_back_into_the_trained_factors(family):
    from sdplugin_lora.dit import kohya_state_dict
    from sdplugin_lora.format import match_modules, parse_state_dict

    model = fresh(family)
    index = _index(family, model)
    network = _network(index, rank=2, alpha=3.0)
    state = kohya_state_dict(network.state_dict(), index)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv" if family == "flux" else "lora_unet_joint_blocks_0_x_block_attn_qkv"
    prefix = "lora_transformer_transformer_blocks_0_attn_to_"
    parts = [network.loras[prefix + x] for x in "qkv"]
    down, up = state[f"{qkv}.lora_down.weight"], state[f"{qkv}.lora_up.weight"]
    assert down.shape == (6, 16) and up.shape == (48, 6)
    torch.testing.assert_close(down, torch.cat([p.lora_down.weight for p in parts]))
    torch.testing.assert_close(up, torch.block_diag(*[p.lora_up.weight for p in parts]))
    assert float(state[f"{qkv}.alpha"]) == 9.0  # alpha/rank stays 3/2
    if family == "flux":  # linear1 = q, k, v and the MLP input
        assert state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (16 * 3 + 64, 8)
    else:  # the pre-only context block's adaLN halves are [shift; scale] in SAI's order
        name = "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1"
        ours = network.loras["lora_transformer_transformer_blocks_2_norm1_context_linear"].lora_up.weight
        torch.testing.assert_close(state[f"{name}.lora_up.weight"], torch.cat([ours[16:], ours[:16]]))

    match = match_modules(parse_state_dict(state), index)
    assert set(match.modules) == set(network.loras) and not match.unmatched
    for name, (target, weights) in match.modules.items():
        trained = network.loras[name]
        torch.testing.assert_close(weights.down, trained.lora_down.weight, atol=0, rtol=0)
        torch.testing.assert_close(weights.up, trained.lora_up.weight, atol=0, rtol=0)
        assert weights.scale == pytest.approx(1.5)
        torch.testing.assert_close(weights.delta(tuple(target.module.weight.shape)), trained.delta_weight())


def test_fusing_parts_with_other_scales_or_missing_parts_is_exact():
    from sdplugin_lora.adapters import LoraAdapter
    from sdplugin_lora.dit import kohya_state_dict
    from sdplugin_lora.format import match_modules, parse_state_dict
    from sdplugin_lora.network import LoraNetwork

    model = fresh("flux")
    index = _index("flux", model)
    base = "lora_transformer_single_transformer_blocks_1_"
    chosen = {base + "attn_to_q": (2, 1.0), base + "attn_to_v": (3, 6.0), base + "proj_mlp": (1, 0.25)}
    modules = [LoraAdapter(n, index.targets[n].module, r, a) for n, (r, a) in chosen.items()]
    network = LoraNetwork(modules)
    with torch.no_grad():
        for m in network:
            m.lora_up.weight.normal_()
    state = kohya_state_dict(network.state_dict(), index)
    assert _file_names(state) == {"lora_unet_single_blocks_1_linear1"}
    match = match_modules(parse_state_dict(state), index)
    fused_delta = torch.cat([match.modules[base + p][1].delta((16 if p != "proj_mlp" else 64, 16)) for p in
                             ("attn_to_q", "attn_to_k", "attn_to_v", "proj_mlp")])  # fmt: skip
    want = torch.cat([
        network.loras[base + "attn_to_q"].delta_weight(),
        torch.zeros(16, 16),
        network.loras[base + "attn_to_v"].delta_weight(),
        network.loras[base + "proj_mlp"].delta_weight(),
    ])  # fmt: skip
    torch.testing.assert_close(fused_delta, want, atol=1e-6, rtol=0)


# --- diffusers ----------------------------------------------------------------------------------


def _flux_pipeline(model, text_encoder=None):
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=model,
    )  # fmt: skip


def _sd3_pipeline(model):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None, transformer=model,
    )  # fmt: skip


def _weights(model) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def _assert_fused(model_after, before, network, index, scale, *, skip=()):
    """Every adapted weight is base + scale * alpha/rank * up @ down (<= 1e-5), nothing else moved."""
    after = _weights(model_after)
    adapted = set()
    for module in network:
        target = index.targets[module.lora_name]
        if any(s in module.lora_name for s in skip):
            continue
        key = target.path + ".weight"
        adapted.add(key)
        want = before[key] + scale * module.delta_weight()
        torch.testing.assert_close(after[key], want, atol=1e-5, rtol=0, msg=key)
    for key, value in before.items():
        if key not in adapted:
            torch.testing.assert_close(after[key], value, atol=0, rtol=0, msg=key)
    assert adapted


def test_our_flux_kohya_and_diffusers_files_fuse_exactly_in_diffusers(tmp_path):
    from sdplugin_lora.dit import diffusers_state_dict, kohya_state_dict
    from sdplugin_lora.format import network_metadata, save_lora

    clip_l, _, t5 = _tiny_encoders()
    index = _index("flux", fresh("flux"), [("text_encoder", clip_l), ("text_encoder_2", t5)])
    network = _network(index, rank=2, alpha=1.0)  # transformer and CLIP-L (lora_te1) modules
    # diffusers' kohya Flux reader splits linear1 as 3 x 3072 + 12288 (the real width): tiny single blocks
    # go through the diffusers layout below and through the full-width test
    state = {k: v for k, v in kohya_state_dict(network.state_dict(), index).items() if "single_blocks" not in k}
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in state)
    meta = network_metadata(family="flux", variant="dev", rank=2, alpha=1.0)
    path = save_lora(tmp_path / "flux_kohya.safetensors", state, meta, dtype="fp32")
    model, te = fresh("flux"), copy.deepcopy(clip_l)
    before, te_before = _weights(model), _weights(te)
    pipe = _flux_pipeline(model, te)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(
        components=["transformer", "text_encoder"], lora_scale=0.7
    )  # Flux fuses the transformer only by default
    te_modules = [m for m in network if m.lora_name.startswith("lora_te1")]
    transformer_modules = [m for m in network if not m.lora_name.startswith("lora_te1")]
    _assert_fused(model, before, transformer_modules, index, 0.7, skip=("single_transformer_blocks",))
    _assert_fused(te, te_before, te_modules, index, 0.7)

    # the diffusers/PEFT layout with ranks and alphas that differ per module (rank_pattern/alpha_pattern)
    from sdplugin_lora.adapters import LoraAdapter
    from sdplugin_lora.network import LoraNetwork

    mixed = LoraNetwork(
        [LoraAdapter(t.name, t.module, 2 + i % 3, 1.0 + i % 2) for i, t in enumerate(index.select(text_encoder=False))]
    )
    with torch.no_grad():
        for m in mixed:
            m.lora_up.weight.normal_()
    tensors, header = diffusers_state_dict(mixed.state_dict(), index)
    assert "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "flux_peft.safetensors"), header)
    model = fresh("flux")
    before = _weights(model)
    pipe = _flux_pipeline(model)
    pipe.load_lora_weights(str(tmp_path / "flux_peft.safetensors"))
    pipe.fuse_lora(lora_scale=1.0)
    _assert_fused(model, before, mixed, index, 1.0)


def test_our_sd3_diffusers_file_fuses_exactly_in_diffusers(tmp_path):
    from sdplugin_lora.adapters import LoraAdapter
    from sdplugin_lora.dit import diffusers_state_dict
    from sdplugin_lora.network import LoraNetwork

    index = _index("sd3", fresh("sd3"))
    network = LoraNetwork([LoraAdapter(t.name, t.module, 1 + i % 3, 0.5 + i % 4) for i, t in enumerate(index.select())])
    with torch.no_grad():
        for m in network:
            m.lora_up.weight.normal_()
    tensors, header = diffusers_state_dict(network.state_dict(), index)
    assert json.loads(header["lora_adapter_metadata"])["transformer.alpha_pattern"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "sd3.safetensors"), header)
    model = fresh("sd3")
    before = _weights(model)
    pipe = _sd3_pipeline(model)
    pipe.load_lora_weights(str(tmp_path / "sd3.safetensors"))
    pipe.fuse_lora(lora_scale=0.6)
    _assert_fused(model, before, network, index, 0.6)


# --- kohya files written here, applied by sdcore, compared with diffusers ------------------------------


def _kohya_file(names_rows: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Random kohya modules (dense up: not block-diagonal) with alpha != rank."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, (name, (out, inp)) in enumerate(sorted(names_rows.items())):
        state[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=gen) * 0.3
        state[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen) * 0.3
        state[f"{name}.alpha"] = torch.tensor(float(rank) / (2 + i % 3))
    return state


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "hooked"])
def test_kohya_flux_file_applies_like_diffusers(merge, tmp_path):
    names = {}
    for i in range(2):
        for stream in ("img", "txt"):
            names[f"lora_unet_double_blocks_{i}_{stream}_attn_qkv"] = (48, 16)
            names[f"lora_unet_double_blocks_{i}_{stream}_attn_proj"] = (16, 16)
            names[f"lora_unet_double_blocks_{i}_{stream}_mlp_0"] = (64, 16)
            names[f"lora_unet_double_blocks_{i}_{stream}_mlp_2"] = (16, 64)
            names[f"lora_unet_double_blocks_{i}_{stream}_mod_lin"] = (96, 16)
    state = _kohya_file(names, rank=3, seed=5)
    reference = fresh("flux")
    pipe = _flux_pipeline(reference)
    pipe.load_lora_weights({k: v.clone() for k, v in state.items()})
    pipe.fuse_lora(lora_scale=0.8)
    want = _weights(reference)
    model = fresh("flux")
    before = _weights(model)
    from sdplugin_lora.apply import LoraSpec, apply_loras
    from sdplugin_lora.format import parse_state_dict

    index = _index("flux", model)
    applied = apply_loras(None, [LoraSpec(parse_state_dict(state), 0.8)], index=index, merge=merge, strict=True)
    changed = [k for k in want if not torch.equal(want[k], before[k])]
    assert len(changed) == 2 * 2 * 7  # q, k, v, proj, mlp 0/2, mod per stream and block
    _assert_applied(model, index, applied, merge, want)
    applied.remove()
    for key, value in _weights(model).items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


def _assert_applied(model, index, applied, merge, want):
    """Merged: every weight equals ``want`` (<= 1e-5). Hooked: weights untouched and every adapted
    layer's output is that of ``want``'s weight (and bias) on random inputs."""
    got = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    if merge:
        for key in want:
            error = (got[key].float() - want[key].float()).abs().max().item()
            assert error <= 1e-5, f"{key}: {error}"
        return
    gen = torch.Generator().manual_seed(3)
    targets = [target for match in applied.matches for target, _ in match.modules.values()]
    assert targets
    for target in targets:
        layer, key = target.module, target.path
        x = torch.randn(3, layer.in_features, generator=gen)
        with torch.no_grad():
            expected = torch.nn.functional.linear(x, want[key + ".weight"], want.get(key + ".bias"))
            torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=0, msg=key)


def test_kohya_flux_linear1_at_full_width_applies_like_diffusers():
    """diffusers reads kohya's single-block ``linear1`` only at Flux's real width (3 x 3072 + 12288).
    One model: sdcore's merged weights and hooked outputs are taken (and undone exactly) first,
    then diffusers fuses the same file into the same model."""
    from sdplugin_lora.apply import apply_loras
    from sdplugin_lora.format import parse_state_dict

    state = _kohya_file({"lora_unet_single_blocks_0_linear1": (3 * 3072 + 12288, 3072)}, rank=2, seed=7)
    model = _flux_full_width()
    index = _index("flux", model)
    paths = [f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    layers = {path: index.resolve_path("transformer", path).module for path in paths}
    x = torch.randn(2, 3072, generator=torch.Generator().manual_seed(0))
    applied = apply_loras(None, [parse_state_dict(state)], index=index, merge=True, strict=True)
    merged = {path: layer.weight.detach().clone() for path, layer in layers.items()}
    applied.remove()
    assert all(float(layer.weight.detach().abs().max()) == 0 for layer in layers.values())  # undone exactly
    applied = apply_loras(None, [parse_state_dict(state)], index=index, merge=False, strict=True)
    with torch.no_grad():
        hooked = {path: layer(x) - layer.bias for path, layer in layers.items()}
    applied.remove()

    pipe = _flux_pipeline(model)
    pipe.load_lora_weights({k: v.clone() for k, v in state.items()})
    pipe.fuse_lora(lora_scale=1.0)
    for path in paths:
        want = model.state_dict()[f"{path}.base_layer.weight"]
        assert float(want.abs().max()) > 0, path
        assert (merged[path] - want).abs().max() <= 1e-5, path
        assert (hooked[path] - x @ want.T).abs().max() <= 1e-4, path


def _sai_checkpoint(model) -> dict[str, torch.Tensor]:
    """SAI's MMDiT keys for the adapted layers, from documented facts: ``qkv`` = cat(q, k, v) rows,
    the pre-only context block's adaLN as [shift; scale] (diffusers keeps [scale; shift])."""
    w = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sai: dict[str, torch.Tensor] = {"context_embedder.weight": w["context_embedder.weight"]}
    layers = len(model.transformer_blocks)
    for i in range(layers):
        b, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        groups = {
            "x_block.attn.qkv": [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"],
            "x_block.attn.proj": [f"{b}.attn.to_out.0"],
            "x_block.attn2.qkv": [f"{b}.attn2.to_q", f"{b}.attn2.to_k", f"{b}.attn2.to_v"],
            "x_block.attn2.proj": [f"{b}.attn2.to_out.0"],
            "x_block.mlp.fc1": [f"{b}.ff.net.0.proj"],
            "x_block.mlp.fc2": [f"{b}.ff.net.2"],
            "x_block.adaLN_modulation.1": [f"{b}.norm1.linear"],
            "context_block.attn.qkv": [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"],
            "context_block.attn.proj": [f"{b}.attn.to_add_out"],
            "context_block.mlp.fc1": [f"{b}.ff_context.net.0.proj"],
            "context_block.mlp.fc2": [f"{b}.ff_context.net.2"],
            "context_block.adaLN_modulation.1": [f"{b}.norm1_context.linear"],
        }
        for sai_name, paths in groups.items():
            if f"{paths[0]}.weight" not in w:
                continue
            for kind in ("weight", "bias"):
                value = torch.cat([w[f"{p}.{kind}"] for p in paths])
                if sai_name.startswith("context_block.adaLN") and i == layers - 1:
                    value = torch.cat(value.chunk(2)[::-1])
                sai[f"{j}.{sai_name}.{kind}"] = value
        if f"{b}.attn.norm_q.weight" in w:
            sai[f"{j}.x_block.attn.ln_q.weight"] = w[f"{b}.attn.norm_q.weight"]
    return sai


def _diffusers_from_sai(sai: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own single-file converter; keys we did not build come back as placeholders."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    class Lenient(dict):
        def pop(self, key, *default):
            return super().pop(key) if key in self else torch.zeros(2)

    return convert_sd3_transformer_checkpoint_to_diffusers(Lenient(sai))


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "hooked"])
def test_kohya_sd3_file_applies_like_diffusers_conversion_of_the_sai_weights(merge):
    """diffusers has no reader for kohya's SD3 names; its SAI -> diffusers checkpoint converter is
    the oracle: SAI weights + kohya's update, converted, must equal sdcore's result."""
    from sdplugin_lora.apply import LoraSpec, apply_loras
    from sdplugin_lora.format import parse_state_dict

    model = fresh("sd3")
    before = _weights(model)
    sai = _sai_checkpoint(model)
    converted = _diffusers_from_sai(dict(sai))
    checked = [k for k in before if k in converted and k != "context_embedder.weight" and converted[k].numel() > 2]
    assert len(checked) > 60
    for key in checked:  # the reverse mapping written above is diffusers' own, on every adapted layer
        torch.testing.assert_close(converted[key], before[key], atol=0, rtol=0, msg=key)

    names = {n.rsplit(".", 1)[0].replace(".", "_"): tuple(sai[n].shape) for n in sai if n.endswith(".weight")}
    names = {f"lora_unet_{n}": shape for n, shape in names.items() if "joint_blocks" in n and "ln_q" not in n}
    assert set(names) == kohya_sd3_names(3, (0, 1))
    state = _kohya_file(names, rank=3, seed=11)
    for name in names:
        sai_key = next(k for k in sai if k.endswith(".weight") and k[:-7].replace(".", "_") == name[10:])
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        sai[sai_key] = sai[sai_key] + 0.9 * float(state[f"{name}.alpha"]) / 3 * (up @ down)
    want = {**before, **{k: v for k, v in _diffusers_from_sai(sai).items() if k in checked}}

    index = _index("sd3", model)
    applied = apply_loras(None, [LoraSpec(parse_state_dict(state), 0.9)], index=index, merge=merge, strict=True)
    _assert_applied(model, index, applied, merge, want)
    applied.remove()


# --- families: refusal, info, metadata ------------------------------------------------------------


def _save_flux_kohya(tmp_path, *, metadata=True):
    from sdplugin_lora.dit import kohya_state_dict
    from sdplugin_lora.format import network_metadata, save_lora

    index = _index("flux", fresh("flux"))
    state = kohya_state_dict(_network(index).state_dict(), index)
    meta = network_metadata(family="flux", variant="dev", rank=2, alpha=1.0) if metadata else {}
    return save_lora(tmp_path / f"flux{int(metadata)}.safetensors", state, meta)


def test_flux_lora_on_sd1_and_sd1_lora_on_flux_are_refused_naming_both(tmp_path):
    from lora_testutil import fresh_bundle, random_network
    from sdplugin_lora.apply import apply_lora, apply_loras
    from sdplugin_lora.format import network_metadata, save_lora

    for metadata in (True, False):  # from ss_base_model_version, else from BFL block names
        path = _save_flux_kohya(tmp_path, metadata=metadata)
        with pytest.raises(NetworkMismatchError, match=r"made for flux .*loaded model is sd1"):
            apply_lora(fresh_bundle("sd1"), path)
    sd1 = fresh_bundle("sd1")
    sd1_path = save_lora(
        tmp_path / "sd1.safetensors", random_network(sd1).state_dict(), network_metadata(family="sd1", rank=4, alpha=2)
    )
    with pytest.raises(NetworkMismatchError, match=r"made for sd1 .*loaded model is flux"):
        apply_loras(None, [sd1_path], index=_index("flux", fresh("flux")))
    with pytest.raises(NetworkMismatchError, match=r"made for flux .*loaded model is sd3"):
        apply_loras(None, [path], index=_index("sd3", fresh("sd3")))


def test_lora_info_names_the_family_of_sd3_and_flux_files(tmp_path):
    from click.testing import CliRunner
    from sdplugin_lora.commands import lora_group
    from sdplugin_lora.dit import kohya_state_dict
    from sdplugin_lora.format import save_lora
    from sdplugin_lora.tools import lora_info

    path = _save_flux_kohya(tmp_path)
    info = lora_info(path)
    assert info["family"] == "flux" and info["architecture"] == "flux-1-dev/lora"
    assert info["modules"] == len(kohya_flux_names(2, 2)) and info["parts"] == {"unet": 26}
    assert lora_info(_save_flux_kohya(tmp_path, metadata=False))["family"] == "flux"
    out = CliRunner().invoke(lora_group, ["info", str(path)])
    assert out.exit_code == 0, out.output
    assert "family:      flux" in out.output and "flux-1-dev/lora" in out.output

    index = _index("sd3", fresh("sd3"))
    bare = save_lora(tmp_path / "sd3.safetensors", kohya_state_dict(_network(index).state_dict(), index), {})
    info = lora_info(bare)
    assert info["family"] == "sd3" and "joint_blocks" in info["family_from"]
    out = CliRunner().invoke(lora_group, ["info", str(bare)])
    assert out.exit_code == 0 and "family:      sd3" in out.output


def test_metadata_as_kohya_writes_it_and_read_back():
    from sdplugin_lora.dit import variant_of_transformer
    from sdplugin_lora.format import family_from_metadata, network_metadata

    assert variant_of_transformer("flux", _flux()) == "dev"
    assert variant_of_transformer("sd3", _sd3(True)) == "5-medium"
    assert variant_of_transformer("sd3", _sd3(False)) == "medium"
    flux = network_metadata(family="flux", variant="schnell", rank=4, alpha=2)
    assert flux["ss_base_model_version"] == "flux1"
    assert flux["modelspec.architecture"] == "flux-1-schnell/lora"
    assert flux["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert flux["modelspec.resolution"] == "1024x1024" and "modelspec.prediction_type" not in flux
    sd3 = network_metadata(family="sd3", variant="5-large", rank=4, alpha=2)
    assert sd3["ss_base_model_version"] == "5-large"
    assert sd3["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"
    assert sd3["modelspec.implementation"] == "diffusers" and sd3["ss_v2"] == "False"
    assert family_from_metadata(flux) == "flux" and family_from_metadata(sd3) == "sd3"
    assert family_from_metadata({"ss_base_model_version": "medium"}) == "sd3"
    assert family_from_metadata({"modelspec.architecture": "stable-diffusion-3-medium/lora"}) == "sd3"


# --- the training method on a DiT bundle -------------------------------------------------------------


class _DitBundle:
    """What the LoRA method reads from a bundle whose denoiser is a transformer."""

    def __init__(self, family, transformer, encoders):
        self.family, self.transformer, self.encoders = family, transformer, encoders
        self.prediction_type = "flow"
        self.device = torch.device("cpu")

    def components(self):
        return {"transformer": self.transformer, **dict(self.encoders)}


def test_method_trains_saves_kohya_or_diffusers_and_warm_starts_exactly(tmp_path):
    from sdcore.errors import ConfigError
    from sdcore.train.method import SaveInfo
    from sdplugin_lora.format import read_lora
    from sdplugin_lora.method import LoraMethod, LoraOptions

    clip_l, _, t5 = _tiny_encoders()
    bundle = _DitBundle("flux", fresh("flux"), [("text_encoder", clip_l), ("text_encoder_2", t5)])
    method = LoraMethod(LoraOptions(rank=2, alpha=1.0, train_text_encoder=True, save_dtype="fp32"))
    groups = method.prepare(bundle)
    assert {g["name"] for g in groups} == {"unet", "text_encoder"}
    with torch.no_grad():
        for module in method.network:
            module.lora_up.weight.normal_()
    info = SaveInfo(path=tmp_path / "flux.safetensors", step=1, epoch=1, metadata={}, final=True)
    lora = read_lora(method.save(bundle, info))
    unet = {k for k in lora.modules if k.startswith("lora_unet_")}
    assert unet == kohya_flux_names(2, 2)
    assert {k.split("_text_model")[0] for k in lora.modules if k.startswith("lora_te")} == {"lora_te1"}
    assert lora.metadata["ss_base_model_version"] == "flux1"
    assert lora.metadata["modelspec.architecture"] == "flux-1-dev/lora"

    second = LoraMethod(LoraOptions(rank=2, alpha=1.0, train_text_encoder=True, network_weights=str(info.path)))
    second.prepare(_DitBundle("flux", fresh("flux"), [("text_encoder", clip_l), ("text_encoder_2", t5)]))
    for name, module in method.network.loras.items():
        torch.testing.assert_close(second.network.loras[name].lora_up.weight, module.lora_up.weight, atol=0, rtol=0)
        torch.testing.assert_close(second.network.loras[name].lora_down.weight, module.lora_down.weight)

    peft = LoraMethod(LoraOptions(rank=2, key_layout="diffusers"))
    sd3 = _DitBundle("sd3", fresh("sd3"), [])
    peft.prepare(sd3)
    path = peft.save(sd3, SaveInfo(path=tmp_path / "sd3.safetensors", step=1, epoch=1, metadata={}, final=True))
    saved = read_lora(path)
    assert "transformer.transformer_blocks.0.attn.to_q" in saved.modules
    assert json.loads(saved.metadata["lora_adapter_metadata"])["transformer.r"] == 2
    assert saved.modules["transformer.transformer_blocks.0.attn.to_q"].alpha == 1.0  # rank/2, from the header

    with pytest.raises(ConfigError, match="diffusers/PEFT files hold LoRA only"):  # LoHa/LoKr: kohya names only
        LoraMethod(LoraOptions(rank=2, algo="loha", key_layout="diffusers")).prepare(
            _DitBundle("flux", fresh("flux"), [])
        )
    with pytest.raises(ConfigError, match="train --algo lora, loha or lokr"):
        LoraMethod(LoraOptions(rank=2, algo="ia3")).prepare(_DitBundle("flux", fresh("flux"), []))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_extract_writes_kohya_modules_and_recovers_a_known_fused_lora(family):
    from sdplugin_lora.apply import apply_loras
    from sdplugin_lora.format import parse_state_dict
    from sdplugin_lora.tools import extract_lora

    base, tuned = fresh(family), fresh(family)
    names = kohya_flux_names(2, 2) if family == "flux" else kohya_sd3_names(3, (0, 1))
    index = _index(family, tuned)
    rows = {m.name: (m.rows, int(index.resolve_path("transformer", m.parts[0].path).module.in_features))
            for m in index.kohya.values() if m.name in names}  # fmt: skip
    known = _kohya_file(rows, rank=2, seed=13)
    applied = apply_loras(None, [parse_state_dict(known)], index=index, merge=True, strict=True)
    applied.backups.clear()
    result = extract_lora(
        _DitBundle(family, base, []), _DitBundle(family, tuned, []), rank=2, clamp_quantile=None, text_encoder=False
    )
    extracted = parse_state_dict(result.tensors, result.metadata)
    assert set(extracted.modules) == names and {w.rank for w in extracted.modules.values()} == {2}
    assert result.metadata["ss_base_model_version"] == ("flux1" if family == "flux" else "5-medium")
    # flux_extract_lora.py: ss_network_module "networks.lora_flux" (SD3: lora_sd3, what loads its names)
    assert result.metadata["ss_network_module"] == f"networks.lora_{family}"
    base_index = _index(family, base)
    apply_loras(None, [extracted], index=base_index, merge=True, strict=True)
    want, got = _weights(tuned), _weights(base)
    for key in want:
        assert (want[key] - got[key]).abs().max() <= 1e-4, key


def test_other_trainers_key_styles_resolve_to_the_same_modules():
    """OneTrainer ``lora_transformer_<diffusers path>``, diffusers/ai-toolkit ``transformer.<path>.lora_A``
    and dotted BFL paths (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A``) as ComfyUI reads them."""
    from sdplugin_lora.dit import kohya_state_dict
    from sdplugin_lora.format import match_modules, parse_state_dict

    index = _index("flux", fresh("flux"))
    network = _network(index, rank=2, alpha=2.0)
    want = {m.lora_name: m.delta_weight() for m in network}
    onetrainer = dict(network.state_dict())
    diffusers_keys = {}
    for key, value in network.state_dict().items():
        name, part = key.split(".", 1)
        path = index.targets[name].path
        suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(part)
        if suffix:
            diffusers_keys[f"transformer.{path}.{suffix}"] = value
    bfl = {}
    for key, value in kohya_state_dict(network.state_dict(), index).items():
        name, part = key.split(".", 1)
        module = index.kohya[name]
        # rebuild the dotted BFL path from the kohya name: double_blocks.N.img_attn.qkv ...
        dotted = name[len("lora_unet_") :].replace("_blocks_", "_blocks.").replace("_attn_", "_attn.")
        dotted = (
            dotted.replace("_mlp_", "_mlp.").replace("_mod_lin", "_mod.lin").replace("modulation_lin", "modulation.lin")
        )
        dotted = dotted.replace("_img", ".img").replace("_txt", ".txt").replace("_linear", ".linear")
        dotted = dotted.replace("_modulation", ".modulation")
        suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}[part]
        bfl[f"diffusion_model.{dotted}.{suffix}"] = value
        assert module.name == name
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in bfl
    assert "diffusion_model.single_blocks.1.modulation.lin.lora_B.weight" in bfl
    for state in (onetrainer, diffusers_keys, bfl):
        alphas = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 2.0})}
        match = match_modules(parse_state_dict(state, alphas), index)
        assert set(match.modules) == set(want) and not match.unmatched
        for name, (target, weights) in match.modules.items():
            torch.testing.assert_close(weights.delta(tuple(target.module.weight.shape)), want[name])


def test_kohya_network_args_train_t5xxl_is_train_t5():
    from sdcore.errors import ConfigError
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    kohya = {"network_module": "networks.lora_flux", "network_args": ["train_t5xxl=True", "split_qkv=True"]}
    options = load_options(LoraOptions, None, kohya=kohya, notes=[])
    assert options.train_t5 is True and options.split_qkv is True
    kohya = {"network_module": "networks.lora_sd3", "network_args": ["train_t5xxl=False"]}
    assert load_options(LoraOptions, None, kohya=kohya, notes=[]).train_t5 is False
    with pytest.raises(ConfigError, match="train_blocks=single is not supported"):  # networks.lora has none
        kohya = {"network_module": "networks.lora", "network_args": ["train_blocks=single"]}
        load_options(LoraOptions, None, kohya=kohya, notes=[])


@pytest.mark.parametrize("blocks", ["single", "double", "all"])
def test_kohya_train_blocks_adapts_kohyas_block_set(blocks, tmp_path):
    """lora_flux's ``train_blocks=single|double`` (also what the kohya_ss GUI's split mode sends): only the
    SingleStreamBlocks' or DoubleStreamBlocks' modules, kohya's names and count; the text encoder as before."""
    from sdcore.train.config import load_options
    from sdcore.train.method import SaveInfo
    from sdplugin_lora.format import read_lora
    from sdplugin_lora.method import LoraMethod, LoraOptions

    kohya = {"network_module": "networks.lora_flux", "network_args": [f"train_blocks={blocks}"], "network_dim": 2}
    method = LoraMethod(load_options(LoraOptions, None, kohya=kohya, notes=[]))
    clip_l, _, t5 = _tiny_encoders()
    bundle = _DitBundle("flux", fresh("flux"), [("text_encoder", clip_l), ("text_encoder_2", t5)])
    method.prepare(bundle)
    info = SaveInfo(path=tmp_path / "f.safetensors", step=1, epoch=1, metadata={}, final=True)
    saved = read_lora(method.save(bundle, info)).modules
    prefix = {"single": "lora_unet_single_blocks_", "double": "lora_unet_double_blocks_", "all": "lora_unet_"}[blocks]
    assert {name for name in saved if name.startswith("lora_unet_")} == {
        name for name in kohya_flux_names(2, 2) if name.startswith(prefix)
    }
    assert any(name.startswith("lora_te1_") for name in saved)


def _transformer_families() -> list[str]:
    from sdcore.models.family import families

    return [f.name for f in families() if f.denoiser == "transformer" and f.name in ("sd3", "flux")]


@pytest.mark.parametrize("family", _transformer_families())
def test_registered_family_bundle_trains_saves_and_applies_in_kohya_names(family, tmp_path):
    """On the bundles the SD3/Flux families build themselves (runs once they are registered)."""
    from sdcore.models.family import family_adapter
    from sdcore.train.method import SaveInfo
    from sdplugin_lora.apply import apply_lora
    from sdplugin_lora.format import detect_family, read_lora
    from sdplugin_lora.method import LoraMethod, LoraOptions

    bundle = family_adapter(family).create_tiny()
    method = LoraMethod(LoraOptions(rank=2, train_text_encoder=True, save_dtype="fp32"))
    method.prepare(bundle)
    with torch.no_grad():
        for module in method.network:
            module.lora_up.weight.normal_()
    method.network.remove()
    path = method.save(bundle, SaveInfo(path=tmp_path / "x.safetensors", step=1, epoch=1, metadata={}, final=True))
    lora = read_lora(path)
    blocks = "joint_blocks_" if family == "sd3" else "double_blocks_"
    assert any(k.startswith(f"lora_unet_{blocks}0_") for k in lora.modules)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in lora.modules)
    assert detect_family(lora)[0] == family
    before = {n: p.detach().clone() for n, p in bundle.denoiser.named_parameters()}
    apply_lora(bundle, path, 1.0, merge=True, strict=True)
    after = dict(bundle.denoiser.named_parameters())
    deltas = {}
    for module in method.network:
        if hasattr(module, "member_deltas"):  # kohya's default: one LoRA with a shared down per fused qkv
            deltas.update(module.member_deltas())
        elif method.index.targets[module.lora_name].component == "transformer":
            deltas[method.index.targets[module.lora_name].path] = module.delta_weight()
    assert any(".to_q" in path for path in deltas)
    for path, delta in deltas.items():
        want = before[path + ".weight"] + delta
        assert (after[path + ".weight"] - want).abs().max() <= 1e-5, path

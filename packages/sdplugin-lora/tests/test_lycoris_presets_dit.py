"""LyCORIS presets and LoHa/LoKr on SD3 and FLUX.1 (kohya ``flux_train_network.py``/``sd3_train_network.py`` with
``network_module = lycoris.kohya``).

LyCORIS (f49d30d lycoris/config.py PRESET, lycoris/kohya.py ``create_modules``) walks kohya's own SAI/BFL model
classes (sd-scripts library/flux_models.py, library/sd3_models.py), so the expected sets are written here from
those classes: a target class adapts every Linear under it, named ``lora_unet_<kohya path>``; the fused
``qkv``/``linear1`` Linear is one module. Not computed with sdplugin_lora.presets."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from sdcore.errors import ConfigError
from sdcore.train.method import SaveInfo
from sdplugin_lora.format import read_lora
from sdplugin_lora.method import LoraMethod, LoraOptions
from test_dit import _DitBundle, _tiny_encoders, fresh

#: BFL DoubleStreamBlock's Linears by sub-module (class): Modulation, SelfAttention, Sequential MLP
FLUX_DOUBLE = {"Modulation": ("img_mod_lin", "txt_mod_lin"),
               "SelfAttention": ("img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj"),
               "Sequential": ("img_mlp_0", "img_mlp_2", "txt_mlp_0", "txt_mlp_2")}  # fmt: skip
#: BFL SingleStreamBlock's Linears (no SelfAttention inside: its qkv is part of linear1)
FLUX_SINGLE = ("linear1", "linear2", "modulation_lin")
#: SAI SingleDiTBlock's Linears (attention class AttentionLinears); the tiny SD3.5-medium: 3 blocks, attn2 in 0 and
#: 1, the last context block pre-only (no attn proj, no MLP)
SD3_BLOCK = ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1")
BLOCKS = ("DoubleStreamBlock", "SingleStreamBlock", "SingleDiTBlock")
CLIP = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
#: LyCORIS' built-in presets: (DiT block classes of the UNet list, other UNet classes, TE classes)
PRESETS = {
    "full": (BLOCKS, (), CLIP),
    "full-lin": (BLOCKS, (), CLIP),
    "attn-mlp": (BLOCKS, (), CLIP),
    "attn-only": ((), ("CrossAttention", "SelfAttention"), ("CLIPAttention", "CLIPSdpaAttention")),
    "unet-only": (BLOCKS, (), ()),
    "unet-transformer-only": (BLOCKS, (), ()),
    "unet-convblock-only": ((), ("ResnetBlock2D", "Downsample2D", "Upsample2D"), ()),
}


def _expected_dit(family: str, preset: str) -> set[str]:
    blocks, others, _ = PRESETS[preset]
    want: set[str] = set()
    if family == "flux":
        for i in range(2):
            if "DoubleStreamBlock" in blocks:
                want |= {f"lora_unet_double_blocks_{i}_{n}" for names in FLUX_DOUBLE.values() for n in names}
            if "SelfAttention" in others:
                want |= {f"lora_unet_double_blocks_{i}_{n}" for n in FLUX_DOUBLE["SelfAttention"]}
            if "SingleStreamBlock" in blocks:
                want |= {f"lora_unet_single_blocks_{i}_{n}" for n in FLUX_SINGLE}
    elif "SingleDiTBlock" in blocks:
        for i in range(3):
            want |= {f"lora_unet_joint_blocks_{i}_x_block_{n}" for n in SD3_BLOCK}
            context = SD3_BLOCK if i < 2 else ("attn_qkv", "adaLN_modulation_1")
            want |= {f"lora_unet_joint_blocks_{i}_context_block_{n}" for n in context}
            if i < 2:
                want |= {f"lora_unet_joint_blocks_{i}_x_block_attn2_{n}" for n in ("qkv", "proj")}
    return want


def _expected_te(encoder, preset: str) -> set[str]:
    from sdplugin_lora.naming import te_relative_path

    want = set()
    for path, module in encoder.named_modules():
        if type(module).__name__ in PRESETS[preset][2]:
            for sub, leaf in module.named_modules():
                if isinstance(leaf, torch.nn.Linear):
                    full = te_relative_path(f"{path}.{sub}")
                    want.add("lora_te1_text_model_" + full.replace(".", "_"))
    return want


def _kohya_names(method: LoraMethod) -> set[str]:
    """The network's modules by the names a kohya run gives them (fused ones already are; plain aliases)."""
    index = method.index
    names = set()
    for name in method.network.loras:
        target = index.targets.get(name)
        if target is None or target.is_text_encoder:
            names.add(name)
        else:
            names.add(next(a for a in target.aliases if a in index.kohya))
    return names


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_builtin_presets_adapt_what_lycoris_adapts_on_kohyas_model(family, preset):
    clip = _tiny_encoders()[0]
    bundle = _DitBundle(family, fresh(family), [("text_encoder", clip)])
    method = LoraMethod(LoraOptions(rank=2, algo="lokr", lycoris_preset=preset, train_text_encoder=True))
    method.validate()
    assert method.family_problems(family) == []
    want = _expected_dit(family, preset) | _expected_te(clip, preset)
    if not want:  # e.g. unet-convblock-only: no ResNet block nor conv_in in a DiT, and no CLIP target
        with pytest.raises(ConfigError, match="selects no module"):
            method.prepare(bundle)
        return
    method.prepare(bundle)
    assert _kohya_names(method) == want


def _flux_out(model, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return model(
        hidden_states=torch.randn(1, 4, 4, generator=gen),
        encoder_hidden_states=torch.randn(1, 3, 16, generator=gen),
        pooled_projections=torch.randn(1, 8, generator=gen),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(4, 3),
        txt_ids=torch.zeros(3, 3),
        guidance=torch.tensor([1.0]),
    ).sample


@pytest.mark.parametrize(("algo", "key"), [("lokr", "lokr_w1"), ("loha", "hada_w1_a")])
def test_lokr_loha_on_flux_train_save_lycoris_names_and_reapply_exactly(tmp_path, algo, key):
    from sdplugin_lora.adapters import FusedMixin
    from sdplugin_lora.apply import apply_loras

    bundle = _DitBundle("flux", fresh("flux"), [])
    method = LoraMethod(LoraOptions(rank=2, algo=algo, lycoris_preset="full", save_dtype="fp32"))
    method.validate()
    groups = method.prepare(bundle)
    fused = {n: m for n, m in method.network.loras.items() if isinstance(m, FusedMixin)}
    assert set(fused) == {f"lora_unet_double_blocks_{i}_{s}_attn_qkv" for i in range(2) for s in ("img", "txt")} | {
        f"lora_unet_single_blocks_{i}_linear1" for i in range(2)
    }
    optimizer = torch.optim.SGD([p for g in groups for p in g["params"]], lr=0.5)
    for _ in range(2):
        loss = _flux_out(bundle.transformer).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    qkv = fused["lora_unet_double_blocks_0_img_attn_qkv"]
    assert float(qkv.delta_weight().abs().max()) > 0  # two steps moved the fused module
    # the members' changes are the rows of the one fused ΔW, q then k then v
    deltas = qkv.member_deltas()
    torch.testing.assert_close(torch.cat([deltas[p] for p in qkv.paths]), qkv.delta_weight())
    method.network.eval()
    with torch.no_grad():
        trained = _flux_out(bundle.transformer)
    path = method.save(bundle, SaveInfo(path=tmp_path / "x.safetensors", step=2, epoch=1, metadata={}, final=True))
    from safetensors.torch import load_file

    lora, keys = read_lora(path), set(load_file(str(path)))
    assert f"lora_unet_double_blocks_0_img_attn_qkv.{key}" in keys
    assert f"lora_unet_single_blocks_1_linear1.{key}" in keys
    assert all(k.startswith("lora_unet_") for k in keys)
    assert {w.kind for w in lora.modules.values()} == {algo}
    assert json.loads(lora.metadata["ss_network_args"])["algo"] == algo
    method.network.remove()
    model = bundle.transformer
    with torch.no_grad():
        base = _flux_out(model)
    assert float((trained - base).abs().max()) > 1e-4
    for merge in (False, True):  # the file alone (split per diffusers module on load) gives the trained output
        applied = apply_loras(bundle, [str(path)], merge=merge, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(_flux_out(model), trained, atol=1e-5, rtol=0)
        applied.remove()
    with torch.no_grad():
        torch.testing.assert_close(_flux_out(model), base, atol=0, rtol=0)


def test_kohya_flux_config_with_lycoris_lokr_attn_only_translates_and_trains(tmp_path):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.contract import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    out = tmp_path / "out"
    cfg = tmp_path / "kohya.toml"
    cfg.write_text(
        f"""pretrained_model_name_or_path = "tiny:flux"
train_data_dir = "{data}"
output_dir = "{out}"
output_name = "lokr"
resolution = "64"
max_train_steps = 2
save_precision = "float"
network_dim = 2
guidance_scale = 1.0
timestep_sampling = "sigmoid"
network_module = "lycoris.kohya"
network_args = ["algo=lokr", "preset=attn-only"]
"""
    )
    result = CliRunner().invoke(
        build_cli(get_plugin_manager()), ["train", "lora", "--config", str(cfg), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    lora = read_lora(out / "lokr.safetensors")
    assert lora.metadata["ss_network_module"] == "lycoris.kohya"
    assert (json.loads(lora.metadata["ss_network_args"])["preset"]) == "attn-only"
    assert {w.kind for w in lora.modules.values()} == {"lokr"}
    # attn-only on BFL's model: the double blocks' SelfAttention (img/txt qkv and proj), nothing else
    unet = {n for n in lora.modules if n.startswith("lora_unet_")}
    blocks = sorted({int(n.split("_")[4]) for n in unet})
    assert blocks and unet == {f"lora_unet_double_blocks_{i}_{n}" for i in blocks for n in FLUX_DOUBLE["SelfAttention"]}
    # kohya trains the text encoder by default: attn-only adapts CLIP's self_attn too (and nothing of T5)
    te = set(lora.modules) - unet
    assert te and all(n.startswith("lora_te1_") and "_self_attn_" in n for n in te)


# --- Chroma (flux_train_network.py --model_type chroma: sd-scripts library/chroma_models.py Chroma) ----------

#: kohya's Chroma DoubleStreamBlock: BFL's without Modulation (its Approximator makes every modulation)
CHROMA_DOUBLE = {"SelfAttention": FLUX_DOUBLE["SelfAttention"], "Sequential": FLUX_DOUBLE["Sequential"]}
#: kohya's Chroma SingleStreamBlock: linear1 and linear2 only
CHROMA_SINGLE = ("linear1", "linear2")


def _expected_chroma(preset: str) -> set[str]:
    """LyCORIS' rule over kohya's Chroma: a DoubleStreamBlock/SingleStreamBlock adapts every Linear of it,
    a SelfAttention (attn-only) its qkv and proj; the tiny Chroma has 2 + 2 blocks."""
    blocks, others, _ = PRESETS[preset]
    want: set[str] = set()
    for i in range(2):
        if "DoubleStreamBlock" in blocks:
            want |= {f"lora_unet_double_blocks_{i}_{n}" for names in CHROMA_DOUBLE.values() for n in names}
        if "SelfAttention" in others:
            want |= {f"lora_unet_double_blocks_{i}_{n}" for n in CHROMA_DOUBLE["SelfAttention"]}
        if "SingleStreamBlock" in blocks:
            want |= {f"lora_unet_single_blocks_{i}_{n}" for n in CHROMA_SINGLE}
    return want


_CHROMA: list = []


def _chroma_bundle() -> _DitBundle:
    """The tiny Chroma's transformer and T5 (its only encoder: no CLIP class, so no preset adapts it)."""
    import copy

    if not _CHROMA:
        from sdcore.models.load import load_model

        _CHROMA.append(load_model("tiny:chroma"))
    bundle = _CHROMA[0]
    return _DitBundle("chroma", copy.deepcopy(bundle.transformer), [("text_encoder", bundle.text_encoders[0])])


def _chroma_out(model, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    return model(
        hidden_states=torch.randn(1, 4, c.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(1, 3, c.joint_attention_dim, generator=gen),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(4, 3),
        txt_ids=torch.zeros(3, 3),
    ).sample


@pytest.mark.parametrize("preset", list(PRESETS))
def test_builtin_presets_on_chroma_adapt_what_lycoris_adapts_on_kohyas_chroma(preset):
    bundle = _chroma_bundle()
    method = LoraMethod(LoraOptions(rank=2, algo="lokr", lycoris_preset=preset, train_text_encoder=True))
    method.validate()
    assert method.family_problems("chroma") == []
    want = _expected_chroma(preset)
    if not want:  # unet-convblock-only: no ResNet block nor conv_in in Chroma, and T5 has no CLIP class
        with pytest.raises(ConfigError, match="selects no module"):
            method.prepare(bundle)
        return
    method.prepare(bundle)
    assert _kohya_names(method) == want


def test_a_preset_reaching_chromas_approximator_is_refused(tmp_path):
    toml = tmp_path / "approx.toml"
    toml.write_text('unet_target_module = ["MLPEmbedder", "SingleStreamBlock"]\nunet_target_name = []\n')
    method = LoraMethod(LoraOptions(rank=2, algo="loha", lycoris_preset=str(toml)))
    method.validate()
    with pytest.raises(ConfigError, match=r"4 Linears of chroma's approximator \(distilled_guidance_layer\.layers"):
        method.prepare(_chroma_bundle())


def test_lokr_full_on_chroma_trains_saves_lycoris_names_and_reapplies_exactly(tmp_path):
    from safetensors.torch import load_file
    from sdplugin_lora.adapters import FusedLokrAdapter
    from sdplugin_lora.apply import apply_loras

    bundle = _chroma_bundle()
    method = LoraMethod(LoraOptions(rank=2, algo="lokr", lycoris_preset="full", save_dtype="fp32"))
    method.validate()
    groups = method.prepare(bundle)
    fused = {n for n, m in method.network.loras.items() if isinstance(m, FusedLokrAdapter)}
    assert fused == {f"lora_unet_double_blocks_{i}_{s}_attn_qkv" for i in range(2) for s in ("img", "txt")} | {
        f"lora_unet_single_blocks_{i}_linear1" for i in range(2)
    }
    model = bundle.transformer
    optimizer = torch.optim.SGD([p for g in groups for p in g["params"]], lr=0.5)
    for _ in range(2):
        _chroma_out(model).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(float(m.delta_weight().abs().max()) > 0 for m in method.network)  # two steps moved every module
    method.network.eval()
    with torch.no_grad():
        trained = _chroma_out(model)
    path = method.save(bundle, SaveInfo(path=tmp_path / "c.safetensors", step=2, epoch=1, metadata={}, final=True))
    keys = set(load_file(str(path)))
    modules = {k.rsplit(".", 1)[0] for k in keys}
    assert modules == _expected_chroma("full")  # kohya's BFL names, no modulation
    assert all(k.rsplit(".", 1)[1] in ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha") for k in keys)
    lora = read_lora(path)
    assert {w.kind for w in lora.modules.values()} == {"lokr"}
    assert lora.metadata["ss_network_module"] == "lycoris.kohya"
    assert lora.metadata["ss_base_model_version"] == "chroma"
    method.network.remove()
    with torch.no_grad():
        base = _chroma_out(model)
    assert float((trained - base).abs().max()) > 1e-4
    for merge in (False, True):  # the file alone (split per diffusers module on load) gives the trained output
        applied = apply_loras(bundle, [str(path)], merge=merge, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(_chroma_out(model), trained, atol=1e-5, rtol=0)
        applied.remove()
    with torch.no_grad():
        torch.testing.assert_close(_chroma_out(model), base, atol=0, rtol=0)

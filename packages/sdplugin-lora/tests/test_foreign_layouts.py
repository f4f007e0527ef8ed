"""LoRA layouts of other trainers that diffusers or ComfyUI apply: sdcore applies them to the same weights.

* XLabs' x-flux FLUX.1 LoRAs (``double_blocks.<i>.processor.qkv_lora1.down.weight`` ...): the oracle is diffusers'
  ``load_lora_weights`` + ``fuse_lora`` (``_convert_xlabs_flux_lora_to_diffusers``) and the formula both diffusers
  and ComfyUI use for them (no alpha in the file: ``W + strength * up @ down`` on the q/k/v rows or the proj).
* ComfyUI's generic key forms (``diffusion_model.<ldm path>``, ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.``,
  ``single_blocks.<i>.linear1_qkv``): the same tensors under kohya's names, which the other tests check against
  diffusers, must give the same modules and deltas; the Flux CLIP-L form against diffusers' Flux reader too.
* Layouts nothing maps (Stable Cascade, XLabs IP-Adapters, unknown x-flux processors): one error naming the layout.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from sdcore.errors import ModelFormatError
from test_dit import _flux, _flux_pipeline, _index, _tiny_encoders, _weights

RANK = 3


def _xlabs_state(*, prefix: str = "", seed: int = 0, dim: int = 16, mlp: int = 64) -> dict[str, torch.Tensor]:
    """An x-flux LoRA for a tiny FLUX.1 (default width 16, MLP 64; two double and two single blocks), shaped as
    x-flux's processors make them: qkv ``[3 * dim]`` rows, the single blocks' proj reading ``dim + mlp`` inputs."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {}
    for i in range(2):
        for stream in ("1", "2"):
            shapes[f"double_blocks.{i}.processor.qkv_lora{stream}"] = (3 * dim, dim)
            shapes[f"double_blocks.{i}.processor.proj_lora{stream}"] = (dim, dim)
        shapes[f"single_blocks.{i}.processor.qkv_lora"] = (3 * dim, dim)
        shapes[f"single_blocks.{i}.processor.proj_lora"] = (dim, dim + mlp)
    state = {}
    for name, (out, inp) in shapes.items():
        state[f"{prefix}{name}.down.weight"] = torch.randn(RANK, inp, generator=gen) * 0.3
        state[f"{prefix}{name}.up.weight"] = torch.randn(out, RANK, generator=gen) * 0.3
    return state


#: x-flux's LoRA -> the diffusers modules whose rows it adds to, in row order (x-flux's processors)
def _xlabs_targets(name: str) -> list[str]:
    block, index = name.split(".")[0], name.split(".")[1]
    lora = name.rsplit(".", 1)[1]
    if block == "double_blocks":
        b = f"transformer_blocks.{index}.attn"
        return {
            "qkv_lora1": [f"{b}.to_q", f"{b}.to_k", f"{b}.to_v"],
            "qkv_lora2": [f"{b}.add_q_proj", f"{b}.add_k_proj", f"{b}.add_v_proj"],
            "proj_lora1": [f"{b}.to_out.0"],
            "proj_lora2": [f"{b}.to_add_out"],
        }[lora]
    b = f"single_transformer_blocks.{index}"
    return {"qkv_lora": [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"], "proj_lora": [f"{b}.proj_out"]}[lora]


def _xlabs_formula(state, before, strength):
    """ComfyUI's and diffusers' result: alpha absent -> scale 1, ``W + strength * up @ down`` on each target's rows."""
    want = dict(before)
    for key in state:
        if not key.endswith(".down.weight"):
            continue
        name = key.removesuffix(".down.weight").removeprefix("diffusion_model.")
        delta = state[key.replace(".down.", ".up.")] @ state[key]
        start = 0
        for path in _xlabs_targets(name):
            rows = before[f"{path}.weight"].shape[0]
            want[f"{path}.weight"] = before[f"{path}.weight"] + strength * delta[start : start + rows]
            start += rows
        assert start == delta.shape[0]
    return want


@pytest.mark.parametrize("prefix", ["", "diffusion_model."], ids=["bare", "diffusion_model"])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "hooked"])
def test_xlabs_flux_lora_applies_as_diffusers_fuses_it(merge, prefix, tmp_path):
    from sdplugin_lora.apply import LoraSpec, apply_loras
    from sdplugin_lora.format import read_lora

    state = _xlabs_state(prefix=prefix)
    path = tmp_path / "xlabs.safetensors"
    save_file(state, str(path))
    reference = copy.deepcopy(_flux())
    before = _weights(reference)
    pipe = _flux_pipeline(reference)
    pipe.load_lora_weights({k: v.clone() for k, v in state.items()})
    pipe.fuse_lora(lora_scale=0.7)
    want = _weights(reference)
    formula = _xlabs_formula(state, before, 0.7)
    changed = sorted(k for k in want if not torch.equal(want[k], before[k]))
    assert len(changed) == 2 * 8 + 2 * 4  # double: q k v proj per stream; single: q k v and proj_out
    assert "single_transformer_blocks.0.proj_mlp.weight" not in changed  # qkv_lora leaves linear1's MLP rows alone
    for key in want:
        assert (want[key] - formula[key]).abs().max() <= 1e-5, key

    model = copy.deepcopy(_flux())
    index = _index("flux", model)
    lora = read_lora(path)
    assert "diffusion_model.single_blocks.0.linear1_qkv" in lora.modules
    assert "diffusion_model.double_blocks.1.txt_attn.qkv" in lora.modules
    applied = apply_loras(None, [LoraSpec(lora, 0.7)], index=index, merge=merge, strict=True)
    assert {t.path for m in applied.matches for t, _ in m.modules.values()} == {k[: -len(".weight")] for k in changed}
    got = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    if merge:
        for key in want:
            assert (got[key] - want[key]).abs().max() <= 1e-5, key
    else:
        gen = torch.Generator().manual_seed(1)
        for key in changed:
            layer = index.resolve_path("transformer", key[: -len(".weight")]).module
            x = torch.randn(2, layer.in_features, generator=gen)
            with torch.no_grad():
                expected = torch.nn.functional.linear(x, want[key], want[key.replace(".weight", ".bias")])
                torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0, msg=key)
    applied.remove()
    for key, value in _weights(model).items():
        assert torch.equal(value, before[key]), key


def test_xlabs_lora_on_chroma_applies_as_diffusers_chroma_pipeline_fuses_it(tmp_path):
    """Chroma keeps FLUX.1's block layout (diffusers' ChromaPipeline reads LoRAs with the Flux reader, ComfyUI's
    Chroma is a Flux model): an x-flux file applies to it the same way, q/k/v rows of ``linear1`` only."""
    from diffusers import ChromaPipeline
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import LoraSpec, apply_loras
    from sdplugin_lora.format import read_lora

    bundle = load_model("tiny:chroma")
    model = bundle.transformer
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    mlp = model.single_transformer_blocks[0].proj_mlp.out_features
    assert (model.config.num_layers, model.config.num_single_layers) == (2, 2) and dim != 16  # not the Flux shapes
    state = _xlabs_state(seed=5, dim=dim, mlp=mlp)
    path = tmp_path / "xlabs_chroma.safetensors"
    save_file(state, str(path))

    reference = copy.deepcopy(model)
    before = _weights(reference)
    pipe = ChromaPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=reference)
    pipe.load_lora_weights({k: v.clone() for k, v in state.items()})
    pipe.fuse_lora(lora_scale=0.7)
    want = _weights(reference)
    formula = _xlabs_formula(state, before, 0.7)
    changed = sorted(k for k in want if not torch.equal(want[k], before[k]))
    assert len(changed) == 2 * 8 + 2 * 4 and "single_transformer_blocks.1.proj_mlp.weight" not in changed
    for key in want:
        assert (want[key] - formula[key]).abs().max() <= 1e-5, key

    applied = apply_loras(bundle, [LoraSpec(read_lora(path), 0.7)], merge=True, strict=True)
    got = _weights(model)
    for key in want:
        assert (got[key] - want[key]).abs().max() <= 1e-5, key
    applied.remove()
    assert all(torch.equal(v, before[k]) for k, v in _weights(model).items())


def test_xlabs_keys_are_lora_keys_and_comfyui_linear1_qkv_is_the_same_module():
    from sdplugin_lora.format import is_lora_key, match_modules, parse_state_dict, xlabs_key

    assert is_lora_key("double_blocks.0.processor.qkv_lora1.down.weight")  # --lora-dir finds XLabs files
    assert xlabs_key("single_blocks.3.processor.proj_lora.up.weight") == (
        "diffusion_model.single_blocks.3.linear2.lora_up.weight"
    )
    assert xlabs_key("double_blocks.0.processor.qkv_lora3.down.weight") is None
    index = _index("flux", copy.deepcopy(_flux()))
    state = _xlabs_state(seed=2)
    comfy = {}  # ComfyUI's convert_uso_lora spelling of the same file
    for key, value in state.items():
        comfy[xlabs_key(key)] = value
    xlabs, converted = match_modules(parse_state_dict(state), index), match_modules(parse_state_dict(comfy), index)
    assert set(xlabs.modules) == set(converted.modules) and len(xlabs.modules) == 24
    assert not xlabs.unmatched and not converted.unmatched
    for name, (target, weights) in xlabs.modules.items():
        shape = tuple(target.module.weight.shape)
        assert torch.equal(weights.delta(shape), converted.modules[name][1].delta(shape)), name
        assert weights.scale == 1.0  # no alpha in the file: alpha = rank


def _kohya_and_comfy(index, names, *, seed=0):
    """The same random modules under kohya's names and under ComfyUI's generic names (``names``: kohya -> comfy)."""
    gen = torch.Generator().manual_seed(seed)
    kohya, comfy = {}, {}
    for kohya_name, comfy_name in names.items():
        shape = tuple(
            index.resolve(kohya_name).module.weight.shape
        )  # kohya's conv factors: [r, in, k, k], [out, r, 1, 1]
        down = torch.randn(2, *shape[1:], generator=gen)
        up = torch.randn(shape[0], 2, *(1,) * (len(shape) - 2), generator=gen)
        alpha = torch.tensor(1.0)
        kohya.update({f"{kohya_name}.lora_down.weight": down, f"{kohya_name}.lora_up.weight": up})
        comfy.update({f"{comfy_name}.lora_down.weight": down, f"{comfy_name}.lora_up.weight": up})
        kohya[f"{kohya_name}.alpha"], comfy[f"{comfy_name}.alpha"] = alpha, alpha
    return kohya, comfy


def _same_match(index, kohya, comfy, count):
    from sdplugin_lora.format import match_modules, parse_state_dict

    want, got = match_modules(parse_state_dict(kohya), index), match_modules(parse_state_dict(comfy), index)
    assert set(got.modules) == set(want.modules) and len(got.modules) == count and not got.unmatched
    for name, (target, weights) in want.modules.items():
        shape = tuple(target.module.weight.shape)
        assert torch.equal(got.modules[name][1].delta(shape), weights.delta(shape)), name


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_comfyui_generic_ldm_and_text_encoder_keys_resolve_like_kohya_names(family):
    """ComfyUI's key map holds ``diffusion_model.<ldm path>`` for every UNet weight and
    ``text_encoders.<clip_l|clip_g>.transformer.<path>`` for every text-encoder weight (its "generic lora format")."""
    from lora_testutil import _bundle
    from sdplugin_lora.naming import ModuleIndex, sgm_block_table, unet_path_to_sgm

    bundle = _bundle(family)
    index = ModuleIndex.from_bundle(bundle)
    table = sgm_block_table(bundle.unet.config)
    names = {}
    for target in index.targets.values():
        if target.component == "unet" and target.group in ("transformer", "resnet"):
            ldm = unet_path_to_sgm(target.path, table)
            if ldm is not None:
                names[target.name] = f"diffusion_model.{ldm}"
        elif target.component == "text_encoder":
            names[target.name] = (
                f"text_encoders.clip_l.transformer.text_model.{target.path.removeprefix('text_model.')}"
            )
        elif target.component == "text_encoder_2":
            names[target.name] = (
                f"text_encoders.clip_g.transformer.text_model.{target.path.removeprefix('text_model.')}"
            )
    assert any(v.startswith("diffusion_model.input_blocks.") for v in names.values())
    assert any(v.startswith("text_encoders.clip_g.") for v in names.values()) == (family == "sdxl")
    kohya, comfy = _kohya_and_comfy(index, names)
    _same_match(index, kohya, comfy, len(names))


def test_comfyui_flux_clip_l_and_t5xxl_keys(tmp_path):
    """``text_encoders.clip_l.transformer.`` and ``text_encoders.t5xxl.transformer.`` (ComfyUI) are lora_te1/lora_te3;
    diffusers' Flux reader fuses the CLIP-L ones (with ComfyUI's dotted ``diffusion_model.`` transformer keys) to the
    weights sdcore merges."""
    from sdplugin_lora.apply import LoraSpec, apply_loras
    from sdplugin_lora.format import read_lora

    clip_l, _, t5 = _tiny_encoders()
    index = _index("flux", copy.deepcopy(_flux()), [("text_encoder", clip_l), ("text_encoder_2", t5)])
    names = {}
    for target in index.targets.values():
        if target.component == "text_encoder":
            names[target.name] = (
                f"text_encoders.clip_l.transformer.text_model.{target.path.removeprefix('text_model.')}"
            )
        elif target.component == "text_encoder_2":
            names[target.name] = f"text_encoders.t5xxl.transformer.{target.path}"
    names["lora_unet_double_blocks_0_img_attn_proj"] = "diffusion_model.double_blocks.0.img_attn.proj"
    assert any(k.startswith("lora_te3_encoder_block_0_") for k in names)
    kohya, comfy = _kohya_and_comfy(index, names, seed=4)
    _same_match(index, kohya, comfy, len(names))

    no_t5 = {k: v for k, v in comfy.items() if "t5xxl" not in k}  # diffusers leaves T5 LoRAs out
    path = tmp_path / "comfy.safetensors"
    save_file(no_t5, str(path))
    model, te = copy.deepcopy(_flux()), copy.deepcopy(clip_l)
    base = {**_weights(model), **{f"te.{k}": v for k, v in _weights(te).items()}}
    pipe = _flux_pipeline(model, te)
    pipe.load_lora_weights({k: v.clone() for k, v in no_t5.items()})
    pipe.fuse_lora(components=["transformer", "text_encoder"], lora_scale=0.6)
    want = {**_weights(model), **{f"te.{k}": v for k, v in _weights(te).items()}}
    model, te = copy.deepcopy(_flux()), copy.deepcopy(clip_l)
    ours = _index("flux", model, [("text_encoder", te), ("text_encoder_2", t5)])
    applied = apply_loras(None, [LoraSpec(read_lora(path), 0.6)], index=ours, merge=True, strict=True)
    assert len(applied.matches[0].modules) == len(no_t5) // 3
    got = {**_weights(model), **{f"te.{k}": v for k, v in _weights(te).items()}}
    assert len([k for k in want if not torch.equal(want[k], base[k])]) == len(no_t5) // 3  # every module moved
    for key in want:
        assert (got[key] - want[key]).abs().max() <= 1e-5, key


@pytest.mark.parametrize(
    ("key", "words"),
    [
        (
            "lora_prior_unet_down_levels_0_1_attention_to_q.lora_down.weight",
            "a Stable Cascade LoRA (lora_prior_unet_/lora_prior_te_ keys: ComfyUI's names of Stable Cascade's prior); "
            "sdcore has no Stable Cascade model to apply it to",
        ),
        (
            "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight",
            "an XLabs IP-Adapter for FLUX.1 (processor.ip_adapter_* keys): image-prompt attention layers, not a LoRA; "
            "neither diffusers' load_lora_weights nor ComfyUI's LoRA loader applies it",
        ),
        (
            "single_blocks.0.processor.ref_qkv_lora_q.down.weight",
            "an XLabs (x-flux) FLUX.1 file with processor keys other than qkv_lora1/2, proj_lora1/2 (double blocks) "
            "and qkv_lora, proj_lora (single blocks); diffusers and ComfyUI map only those to FLUX.1's Linears",
        ),
    ],
    ids=["cascade", "xlabs-ip-adapter", "xlabs-unknown-processor"],
)
def test_layouts_nothing_maps_are_one_error_naming_the_layout(key, words, tmp_path):
    from sdplugin_lora.format import read_lora

    state = _xlabs_state()  # the rest of the file is mappable: the foreign key must not end up a mere warning
    state[key] = torch.zeros(2, 16)
    path = tmp_path / "foreign.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelFormatError) as caught:
        read_lora(path)
    assert str(caught.value) == f"{path}: {words} (key {key})"

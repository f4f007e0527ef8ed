"""Files sdcore writes from XLabs x-flux / ComfyUI ``linear1_qkv`` FLUX.1 LoRAs hold kohya's names, which every client
reads, and ``lora info`` still describes the layouts sdcore refuses to apply.

The oracle for the written files is diffusers' ``load_lora_weights`` + ``fuse_lora`` of the *original* XLabs file
(``_convert_xlabs_flux_lora_to_diffusers``): fusing the written file must give the same weights. diffusers' kohya
Flux reader splits ``linear1`` as 3 x 3072 + 12288 whatever the model, so the single-block ``linear1`` is checked on
a one-block transformer at FLUX.1's real width (zero weights, as ``test_dit.py``'s), the rest on the tiny FLUX.1.
"""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file
from sdcore.errors import NetworkMismatchError
from test_dit import _flux, _flux_full_width, _flux_pipeline, _index, _weights
from test_foreign_layouts import _xlabs_state

#: kohya's names of the modules a tiny x-flux file (two double and two single blocks) adapts
_TINY_KOHYA = {
    *(f"lora_unet_double_blocks_{i}_{s}_attn_{m}" for i in range(2) for s in ("img", "txt") for m in ("qkv", "proj")),
    *(f"lora_unet_single_blocks_{i}_linear{n}" for i in range(2) for n in (1, 2)),
}


#: a rank-2 LoHa of a tiny FLUX.1 single block's linear1 (112 x 16)
LOHA_SHAPES = (("hada_w1_a", (112, 2)), ("hada_w1_b", (2, 16)), ("hada_w2_a", (112, 2)), ("hada_w2_b", (2, 16)))


def _cli(*args: str) -> None:
    from sdplugin_lora.commands import lora_group

    out = CliRunner().invoke(lora_group, list(args))
    assert out.exit_code == 0, (out.output, out.exception)


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118


def _modules(state) -> set[str]:
    return {key.removesuffix(".alpha").removesuffix(".lora_down.weight").removesuffix(".lora_up.weight")
            for key in state}  # fmt: skip


def _diffusers_fused(model, state, scale=0.7) -> dict[str, torch.Tensor]:
    pipe = _flux_pipeline(model)
    pipe.load_lora_weights({k: v.clone() for k, v in state.items()})
    pipe.fuse_lora(lora_scale=scale)
    return _weights(model)


def _sdcore_merged(path, scale=0.7) -> dict[str, torch.Tensor]:
    from sdplugin_lora.apply import LoraSpec, apply_loras
    from sdplugin_lora.format import read_lora

    model = copy.deepcopy(_flux())
    apply_loras(None, [LoraSpec(read_lora(path), scale)], index=_index("flux", model), merge=True, strict=True)
    return _weights(model)


def _close(got, want, atol=1e-5):
    assert got.keys() == want.keys()
    for key in want:
        assert (got[key] - want[key]).abs().max() <= atol, key


def test_convert_to_kohya_linear1_fuses_in_diffusers_as_the_xlabs_file_at_full_width(tmp_path):
    """x-flux's single-block ``qkv_lora`` written as kohya's ``linear1`` (zero MLP rows): diffusers fuses the converted
    and the merged (concat) file to the weights it fuses from the XLabs file itself, ``proj_mlp`` untouched."""
    gen = torch.Generator().manual_seed(3)
    xlabs = {
        "single_blocks.0.processor.qkv_lora.down.weight": torch.randn(2, 3072, generator=gen) * 0.3,
        "single_blocks.0.processor.qkv_lora.up.weight": torch.randn(3 * 3072, 2, generator=gen) * 0.3,
        "single_blocks.0.processor.proj_lora.down.weight": torch.randn(2, 3072 + 12288, generator=gen) * 0.3,
        "single_blocks.0.processor.proj_lora.up.weight": torch.randn(3072, 2, generator=gen) * 0.3,
    }
    source = tmp_path / "xlabs.safetensors"
    save_file(xlabs, str(source))
    converted, merged = tmp_path / "kohya.safetensors", tmp_path / "merged.safetensors"
    _cli("convert", str(source), "-o", str(converted), "--to", "kohya")
    _cli("merge", str(source), "-o", str(merged), "--save-dtype", "fp32")

    paths = [f"single_transformer_blocks.0.{p}.weight" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")]
    want = {k: v for k, v in _diffusers_fused(_flux_full_width(), xlabs).items() if k in paths}
    assert all(float(want[k].abs().max()) > 0 for k in paths)
    for path in (converted, merged):
        state, meta = _read(path)
        assert _modules(state) == {"lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"}
        up = state["lora_unet_single_blocks_0_linear1.lora_up.weight"]
        assert tuple(up.shape) == (3 * 3072 + 12288, 2) and float(up[3 * 3072 :].abs().max()) == 0
        assert float(state["lora_unet_single_blocks_0_linear1.alpha"]) == 2.0
        assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
        fused = _diffusers_fused(_flux_full_width(), state)
        assert float(fused["single_transformer_blocks.0.proj_mlp.weight"].abs().max()) == 0
        _close({k: v for k, v in fused.items() if k in paths}, want)


def test_convert_to_kohya_on_tiny_flux_keeps_every_change(tmp_path):
    """Every module under kohya's name with alpha = rank (x-flux's files have none); diffusers fuses the double blocks
    and single-block ``linear2`` of the converted file as it fuses them from the XLabs file, and sdcore applies the
    whole converted file (``linear1`` included) as it applies the XLabs file."""
    xlabs = _xlabs_state(seed=4)
    source, converted = tmp_path / "xlabs.safetensors", tmp_path / "kohya.safetensors"
    save_file(xlabs, str(source))
    _cli("convert", str(source), "-o", str(converted), "--to", "kohya")
    state, _ = _read(converted)
    assert _modules(state) == _TINY_KOHYA and not any("qkv_lora" in k or "linear1_qkv" in k for k in state)
    assert {float(state[f"{name}.alpha"]) for name in _TINY_KOHYA} == {3.0}
    up = state["lora_unet_single_blocks_1_linear1.lora_up.weight"]
    assert tuple(up.shape) == (3 * 16 + 64, 3) and float(up[48:].abs().max()) == 0
    assert torch.equal(up[:48], xlabs["single_blocks.1.processor.qkv_lora.up.weight"])

    no_linear1 = {k: v for k, v in state.items() if "_linear1." not in k}  # diffusers: linear1 at the real width only
    no_qkv = {k: v for k, v in xlabs.items() if "processor.qkv_lora." not in k or "double" in k}
    _close(_diffusers_fused(copy.deepcopy(_flux()), no_linear1), _diffusers_fused(copy.deepcopy(_flux()), no_qkv))
    _close(_sdcore_merged(converted), _sdcore_merged(source), atol=1e-6)


def test_resize_and_merge_write_kohya_linear1_for_linear1_qkv(tmp_path):
    """``resize`` (full rank: the same change) of an XLabs file writes kohya's names, of a file under ComfyUI's names
    keeps them but ``linear1_qkv``; ``merge`` with a kohya file that adapts the same ``linear1`` gives one
    ``lora_unet_single_blocks_0_linear1`` module whose change is ``0.5 ·`` the x-flux q/k/v rows' plus the kohya
    module's."""
    from sdplugin_lora.format import xlabs_key

    xlabs = _xlabs_state(seed=6, prefix="diffusion_model.")
    source, resized = tmp_path / "xlabs.safetensors", tmp_path / "resized.safetensors"
    save_file(xlabs, str(source))
    _cli("resize", str(source), "-o", str(resized), "--rank", "3", "--save-dtype", "fp32")
    state, meta = _read(resized)
    assert _modules(state) == _TINY_KOHYA and meta["ss_network_module"] == "networks.lora_flux"
    assert float(state["lora_unet_single_blocks_0_linear1.lora_up.weight"][48:].abs().max()) == 0
    _close(_sdcore_merged(resized), _sdcore_merged(source))

    comfy, resized_comfy = tmp_path / "comfy.safetensors", tmp_path / "resized_comfy.safetensors"
    save_file({xlabs_key(k): v for k, v in xlabs.items()}, str(comfy))  # ComfyUI's convert_uso_lora spelling
    _cli("resize", str(comfy), "-o", str(resized_comfy), "--rank", "3", "--save-dtype", "fp32")
    state, _ = _read(resized_comfy)
    assert {m for m in _modules(state) if "single_blocks" in m} == {
        *(f"diffusion_model.single_blocks.{i}.linear2" for i in (0, 1)),  # the file's names stay
        *(f"lora_unet_single_blocks_{i}_linear1" for i in (0, 1)),  # but linear1_qkv's
    }
    _close(_sdcore_merged(resized_comfy), _sdcore_merged(source))

    gen = torch.Generator().manual_seed(8)
    kohya = {
        "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(2, 16, generator=gen),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(112, 2, generator=gen),
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(1.0),
    }
    other, merged = tmp_path / "kohya.safetensors", tmp_path / "merged.safetensors"
    save_file(kohya, str(other))
    _cli("merge", f"{source}:0.5", str(other), "-o", str(merged), "--save-dtype", "fp32")
    state, _ = _read(merged)
    assert not any("linear1_qkv" in k for k in state)
    assert state["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 3 + 2
    qkv = xlabs["diffusion_model.single_blocks.0.processor.qkv_lora.up.weight"]
    qkv = qkv @ xlabs["diffusion_model.single_blocks.0.processor.qkv_lora.down.weight"]
    want = torch.cat([0.5 * qkv, torch.zeros(64, 16)]) + 0.5 * (
        kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"]
        @ kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    )  # alpha 1 / rank 2
    name = "lora_unet_single_blocks_0_linear1"
    got = state[f"{name}.lora_up.weight"] @ state[f"{name}.lora_down.weight"] * (float(state[f"{name}.alpha"]) / 5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("alphas", [(1.0, 6.0), (1.0, 1.5)], ids=["other-scales", "same-scale"])
def test_a_file_with_linear1_qkv_and_linear1_of_one_block_becomes_one_exact_module(alphas):
    """Both modules stacked (ranks 2 + 3): the change is the sum of both (what ComfyUI applies: ``linear1_qkv`` adds to
    the q/k/v rows of the weight ``linear1`` adds to), scales folded into the up blocks (alpha = 5) when they differ,
    alpha = 5 · s when both have the scale s."""
    from sdplugin_lora.apply import LoraSpec, apply_loras
    from sdplugin_lora.bfl_names import widen_linear1_qkv
    from sdplugin_lora.format import parse_state_dict

    gen = torch.Generator().manual_seed(9)
    state = {
        "diffusion_model.single_blocks.0.linear1_qkv.lora_down.weight": torch.randn(2, 16, generator=gen),
        "diffusion_model.single_blocks.0.linear1_qkv.lora_up.weight": torch.randn(48, 2, generator=gen),
        "diffusion_model.single_blocks.0.linear1_qkv.alpha": torch.tensor(alphas[0]),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(3, 16, generator=gen),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(112, 3, generator=gen),
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(alphas[1]),
    }
    lora = parse_state_dict(state)
    widened = widen_linear1_qkv(lora)
    assert list(widened.modules) == ["lora_unet_single_blocks_0_linear1"]
    module = widened.modules["lora_unet_single_blocks_0_linear1"]
    assert module.rank == 5 and module.alpha == (5.0 if alphas == (1.0, 6.0) else 5 * 0.5)
    qkv = state["diffusion_model.single_blocks.0.linear1_qkv.lora_up.weight"]
    qkv = qkv @ state["diffusion_model.single_blocks.0.linear1_qkv.lora_down.weight"] * (alphas[0] / 2)
    full = state["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    full = full @ state["lora_unet_single_blocks_0_linear1.lora_down.weight"] * (alphas[1] / 3)
    want = torch.cat([qkv, torch.zeros(64, 16)]) + full  # ComfyUI's sum: linear1_qkv adds to rows 0..48 only
    torch.testing.assert_close(module.delta((112, 16)), want, atol=1e-6, rtol=0)
    model = copy.deepcopy(_flux())
    before = _weights(model)
    apply_loras(None, [LoraSpec(widened, 0.8)], index=_index("flux", model), merge=True, strict=True)
    after = _weights(model)
    b = "single_transformer_blocks.0"
    for i, path in enumerate((f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v")):
        rows = slice(16 * i, 16 * (i + 1))
        torch.testing.assert_close(
            after[f"{path}.weight"], before[f"{path}.weight"] + 0.8 * want[rows], atol=1e-6, rtol=0
        )
    torch.testing.assert_close(
        after[f"{b}.proj_mlp.weight"], before[f"{b}.proj_mlp.weight"] + 0.8 * want[48:], atol=1e-6, rtol=0
    )


def test_linear1_qkv_that_is_no_plain_lora_is_refused_in_one_line():
    from sdplugin_lora.bfl_names import widen_linear1_qkv
    from sdplugin_lora.format import parse_state_dict

    gen = torch.Generator().manual_seed(1)
    key = "diffusion_model.single_blocks.0.linear1_qkv"
    state = {f"{key}.{n}": torch.randn(*shape, generator=gen)
             for n, shape in (("hada_w1_a", (48, 2)), ("hada_w1_b", (2, 16)), ("hada_w2_a", (48, 2)),
                              ("hada_w2_b", (2, 16)))}  # fmt: skip
    with pytest.raises(NetworkMismatchError) as caught:
        widen_linear1_qkv(parse_state_dict(state))
    assert str(caught.value) == (
        f"<in memory>: {key} is loha; ComfyUI's linear1_qkv is written as kohya's single-block linear1 (the q/k/v "
        "rows' LoRA with zero MLP rows), which only a plain LoRA can be"
    )


def test_convert_to_kohya_refuses_a_file_of_another_family(tmp_path):
    from sdplugin_lora.bfl_names import kohya_names
    from sdplugin_lora.format import parse_state_dict

    state = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(2, 768),
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(320, 2)}  # fmt: skip
    with pytest.raises(NetworkMismatchError) as caught:
        kohya_names(parse_state_dict(state))
    assert str(caught.value) == (
        "<in memory>: --to kohya rewrites FLUX.1/Chroma files under BFL's, ComfyUI's or XLabs' names; this one is sd1 "
        "(from its cross-attention width 768)"
    )


@pytest.mark.parametrize(
    ("key", "layout", "why"),
    [
        (
            "lora_prior_unet_down_levels_0_1_attention_to_q",
            "a Stable Cascade LoRA (lora_prior_unet_/lora_prior_te_ keys: ComfyUI's names of Stable Cascade's prior)",
            "sdcore has no Stable Cascade model to apply it to",
        ),
        (
            "double_blocks.0.processor.ip_adapter_double_stream_k_proj",
            "an XLabs IP-Adapter for FLUX.1 (processor.ip_adapter_* keys): image-prompt attention layers, not a LoRA",
            "neither diffusers' load_lora_weights nor ComfyUI's LoRA loader applies it",
        ),
    ],
    ids=["cascade", "xlabs-ip-adapter"],
)
def test_info_describes_a_layout_sdcore_refuses_and_exits_0(key, layout, why, tmp_path):
    import json

    from sdplugin_lora.commands import lora_group

    if key.startswith("lora_prior"):  # a kohya-style LoRA of Stable Cascade's prior: ranks can be told
        state = {f"{key}.lora_down.weight": torch.ones(4, 8), f"{key}.lora_up.weight": torch.ones(8, 4),
                 f"{key}.alpha": torch.tensor(2.0)}  # fmt: skip
        first = f"{key}.alpha"  # safetensors keeps keys sorted: the first that tells
    else:  # IP-Adapter projections: no LoRA module at all
        state = {f"{key}.weight": torch.ones(8, 4), f"{key}.bias": torch.ones(8)}
        first = f"{key}.bias"
    path = tmp_path / "foreign.safetensors"
    save_file(state, str(path))
    out = CliRunner().invoke(lora_group, ["info", str(path)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[1] == f"layout:      {layout}"
    assert lines[2] == f"cannot be applied by sdcore: {why} (key {first})"
    if key.startswith("lora_prior"):
        assert "ranks:       {4: 1}" in lines and "alphas:      {2.0: 1}" in lines
    else:
        assert f"unknown keys (2): {key}.bias, {key}.weight" in lines and "ranks:       {}" in lines
    info = json.loads(CliRunner().invoke(lora_group, ["info", "--json", str(path)]).output)
    assert (info["layout"], info["cannot_apply"]) == (layout, f"{why} (key {first})")


def test_info_of_an_xlabs_lora_names_no_refused_layout(tmp_path):
    from sdplugin_lora.tools import lora_info

    path = tmp_path / "xlabs.safetensors"
    save_file(_xlabs_state(), str(path))
    info = lora_info(path)
    assert info["layout"] is None and info["cannot_apply"] is None and info["ranks"] == {3: 12}


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "hooks"])
def test_applying_linear1_qkv_and_linear1_of_one_block_adds_both(merge):
    """ComfyUI patches ``linear1_qkv`` (the q/k/v rows, an offset patch) and ``linear1`` (the whole weight) of one
    block both, so the layer gets the sum; sdcore applies the file as it is (no rewrite) to the same weights, merged or
    as hooks, whatever the order or scales of the two modules."""
    from sdplugin_lora.apply import LoraSpec, apply_loras
    from sdplugin_lora.format import parse_state_dict

    gen = torch.Generator().manual_seed(11)
    qkv, full = "diffusion_model.single_blocks.1.linear1_qkv", "lora_unet_single_blocks_1_linear1"
    state = {
        f"{full}.lora_down.weight": torch.randn(3, 16, generator=gen),
        f"{full}.lora_up.weight": torch.randn(112, 3, generator=gen),
        f"{full}.alpha": torch.tensor(6.0),
        f"{qkv}.lora_down.weight": torch.randn(2, 16, generator=gen),
        f"{qkv}.lora_up.weight": torch.randn(48, 2, generator=gen),
        f"{qkv}.alpha": torch.tensor(1.0),
    }
    change = torch.cat([state[f"{qkv}.lora_up.weight"] @ state[f"{qkv}.lora_down.weight"] * 0.5, torch.zeros(64, 16)])
    change += state[f"{full}.lora_up.weight"] @ state[f"{full}.lora_down.weight"] * 2.0
    model = copy.deepcopy(_flux())
    before = _weights(model)
    applied = apply_loras(
        None, [LoraSpec(parse_state_dict(state), 0.8)], index=_index("flux", model), merge=merge, strict=True
    )
    b = "single_transformer_blocks.1"
    parts = (f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp")
    x = torch.randn(5, 16, generator=gen)
    for i, path in enumerate(parts):
        rows = slice(16 * i, 16 * (i + 1) if i < 3 else 112)
        layer = model.get_submodule(path)
        want_weight = before[f"{path}.weight"] + 0.8 * change[rows]
        got = layer(x) if not merge else x @ _weights(model)[f"{path}.weight"].T + layer.bias
        torch.testing.assert_close(got, x @ want_weight.T + layer.bias, atol=1e-5, rtol=0)
    applied.remove()
    _close(_weights(model), before, atol=0)


def test_applying_a_loha_linear1_beside_linear1_qkv_adds_both_and_dora_is_refused():
    """A LyCORIS (LoHa) ``linear1`` and a ``linear1_qkv`` LoRA add up as their summed difference; a DoRA module on a
    layer another module of the file adapts (here ``linear2`` under two spellings) is refused in one line: its
    magnitude is of the weight it gets."""
    from sdplugin_lora.apply import LoraSpec, apply_loras
    from sdplugin_lora.format import parse_state_dict

    gen = torch.Generator().manual_seed(12)
    qkv, full = "diffusion_model.single_blocks.0.linear1_qkv", "lora_unet_single_blocks_0_linear1"
    state = {
        f"{qkv}.lora_down.weight": torch.randn(2, 16, generator=gen),
        f"{qkv}.lora_up.weight": torch.randn(48, 2, generator=gen),
        **{f"{full}.{n}": torch.randn(*shape, generator=gen) * 0.5 for n, shape in LOHA_SHAPES},
        f"{full}.alpha": torch.tensor(1.0),
    }
    loha = (state[f"{full}.hada_w1_a"] @ state[f"{full}.hada_w1_b"]) * (
        state[f"{full}.hada_w2_a"] @ state[f"{full}.hada_w2_b"]
    )
    change = torch.cat([state[f"{qkv}.lora_up.weight"] @ state[f"{qkv}.lora_down.weight"], torch.zeros(64, 16)])
    change += loha * 0.5  # alpha 1 / rank 2
    model = copy.deepcopy(_flux())
    before = _weights(model)
    apply_loras(None, [LoraSpec(parse_state_dict(state), 1.0)], index=_index("flux", model), merge=True, strict=True)
    after = _weights(model)
    b = "single_transformer_blocks.0"
    for i, path in enumerate((f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp")):
        rows = slice(16 * i, 16 * (i + 1) if i < 3 else 112)
        torch.testing.assert_close(after[f"{path}.weight"], before[f"{path}.weight"] + change[rows], atol=1e-5, rtol=0)

    plain, dora = "diffusion_model.single_blocks.0.linear2", "lora_unet_single_blocks_0_linear2"
    state = {f"{plain}.lora_down.weight": torch.randn(2, 80, generator=gen),
             f"{plain}.lora_up.weight": torch.randn(16, 2, generator=gen),
             f"{dora}.lora_down.weight": torch.randn(2, 80, generator=gen),
             f"{dora}.lora_up.weight": torch.randn(16, 2, generator=gen),
             f"{dora}.dora_scale": torch.ones(1, 80)}  # fmt: skip
    with pytest.raises(NetworkMismatchError) as caught:
        apply_loras(None, [parse_state_dict(state)], index=_index("flux", _flux()), merge=True)
    assert str(caught.value) == (
        f"<in memory>: {plain} and {dora} adapt the same layer and one is DoRA, which sdcore cannot add to another "
        "module"
    )


def test_convert_to_kohya_of_a_peft_file_makes_its_alphas_tensors_and_drops_the_peft_header(tmp_path):
    """A BFL-named file whose alphas live in diffusers' ``lora_adapter_metadata`` header: the converted file holds
    them as kohya's ``.alpha`` tensors and no longer that header, from which diffusers would take the old file's
    config rather than read the kohya one."""
    import json

    gen = torch.Generator().manual_seed(13)
    key = "transformer.double_blocks.0.img_attn.qkv"
    state = {f"{key}.lora_A.weight": torch.randn(2, 16, generator=gen),
             f"{key}.lora_B.weight": torch.randn(48, 2, generator=gen)}  # fmt: skip
    source, converted = tmp_path / "peft.safetensors", tmp_path / "kohya.safetensors"
    header = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 4})}
    save_file(state, str(source), metadata=header)
    _cli("convert", str(source), "-o", str(converted), "--to", "kohya")
    got, meta = _read(converted)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    assert set(got) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    assert float(got[f"{name}.alpha"]) == 4.0 and meta["ss_network_alpha"] == "4"
    assert "lora_adapter_metadata" not in meta
    assert torch.equal(got[f"{name}.lora_up.weight"], state[f"{key}.lora_B.weight"])


def test_merge_of_an_xlabs_file_and_a_comfyui_named_one_writes_each_layer_once(tmp_path):
    """The XLabs file is written under kohya's names, the other file names the same FLUX.1 layers under BFL's dotted
    ones: each layer is one module (ComfyUI keeps only one patch per whole weight), whose change is the sum."""
    gen = torch.Generator().manual_seed(14)
    dotted = {
        "diffusion_model.double_blocks.0.img_attn.qkv": (48, 16),
        "diffusion_model.single_blocks.1.linear1": (112, 16),
        "diffusion_model.single_blocks.1.linear2": (16, 80),
    }
    comfy = {f"{k}.{n}": torch.randn(*(shape if n == "lora_up.weight" else shape[::-1]), generator=gen)
             for k, (o, i) in dotted.items() for n, shape in (("lora_up.weight", (o, 2)), ("lora_down.weight", (i, 2)))}  # fmt: skip
    xlabs, other, merged = tmp_path / "xlabs.safetensors", tmp_path / "comfy.safetensors", tmp_path / "m.safetensors"
    save_file(_xlabs_state(seed=15), str(xlabs))
    save_file(comfy, str(other))
    _cli("merge", f"{xlabs}:0.5", f"{other}:0.25", "-o", str(merged), "--save-dtype", "fp32")
    state, _ = _read(merged)
    assert _modules(state) == _TINY_KOHYA  # no dotted name left beside its kohya twin
    assert state["lora_unet_single_blocks_1_linear1.lora_down.weight"].shape[0] == 3 + 2
    model = copy.deepcopy(_flux())
    before = _weights(model)
    want = {k: before[k] + 0.5 * (v - before[k]) for k, v in _sdcore_merged(xlabs, scale=1.0).items()}
    for k, v in _sdcore_merged(other, scale=1.0).items():
        want[k] = want[k] + 0.25 * (v - before[k])
    _close(_sdcore_merged(merged, scale=1.0), want)

"""LyCORIS ``ia3``, ``glora`` and ``full``: the trained modules, their files, applying them, and training
them from kohya configs and the CLI.

Reference formulas are rewritten here from LyCORIS f49d30d (lycoris/modules/ia3.py, glora.py, full.py:
init, forward, ``custom_state_dict``) and the UIs' documented handling of the same keys (A1111's
network_ia3 / network_full: ``orig_weight * w`` and ``diff`` plus ``diff_b`` as extra bias; ComfyUI's
GLoRA adapter: the new layout ``W @ a1 @ a2 + b1 @ b2``, the old one ``b2 @ b1 + W @ a2 @ a1``, both
times ``strength * alpha / rank``): not imported from sdcore."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from lora_testutil import fresh_bundle, unet_inputs, unet_out
from sdcore.errors import ConfigError
from sdcore.testing.contract import make_tiny_dataset
from sdcore.train.method import SaveInfo
from sdplugin_lora.adapters import FullAdapter, GloraAdapter, Ia3Adapter
from sdplugin_lora.apply import apply_lora
from sdplugin_lora.format import parse_state_dict, read_lora
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_lora.tools import effective_deltas, lora_info
from torch import nn

LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"  # Linear 128 -> 32, with bias
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"  # Conv2d 32 -> 64, 3x3, with bias
CONV1X1 = "lora_unet_down_blocks_0_attentions_0_proj_in"  # Conv2d 32 -> 32, 1x1


def _layer(conv: bool) -> nn.Module:
    torch.manual_seed(3)
    return nn.Conv2d(6, 8, 3, padding=1) if conv else nn.Linear(6, 8)


def _x(conv: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 6, 5, 5, generator=g) if conv else torch.randn(3, 6, generator=g)


def _op(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return nn.functional.conv2d(x, weight, bias, layer.stride, layer.padding)
    return nn.functional.linear(x, weight, bias)


def _randomize(module: nn.Module, seed: int = 1, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * std)


def _module(bundle, name):
    from sdplugin_lora.naming import ModuleIndex

    return ModuleIndex.from_bundle(bundle).targets[name].module


def _layer_out(bundle, name, x):
    with torch.no_grad():
        return _module(bundle, name)(x)


def _save(tmp_path, tensors, name="f.safetensors"):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# --- (IA)^3 ----------------------------------------------------------------------------------------------


def _ia3_merged(w: torch.Tensor, vector: torch.Tensor, on_input: bool, m: float) -> torch.Tensor:
    """LyCORIS IA3Module.make_weight (multiplier m): W * (vector * m + 1) along the output (W transposed) or
    input axis; A1111 network_ia3: W + m * W * w (w as a column for the output axis)."""
    if on_input:
        return w * (vector.reshape(1, -1, *[1] * (w.dim() - 2)) * m + 1)
    return (w.transpose(0, 1) * (vector.reshape(1, -1, *[1] * (w.dim() - 2)) * m + 1)).transpose(0, 1)


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_module_is_lycoris(conv, on_input):
    layer = _layer(conv)
    ia3 = Ia3Adapter("m", layer, on_input=on_input)
    state = ia3.state_dict()
    width = 6 if on_input else 8
    # LyCORIS: weight [train_dim] (Linear) or [1, train_dim, 1, 1] (conv), zero; on_input an int buffer; no alpha
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "weight": (1, width, 1, 1) if conv else (width,), "on_input": ()}  # fmt: skip
    assert int(state["on_input"]) == int(on_input) and not state["on_input"].is_floating_point()
    assert torch.count_nonzero(state["weight"]) == 0 and torch.count_nonzero(ia3.delta_weight()) == 0
    _randomize(ia3)
    ia3.multiplier = 0.7
    ia3.attach()
    x = _x(conv)
    w = layer.weight.detach()
    # LyCORIS forward (non-bypass): base + op(x, merged - W)
    want = _op(layer, x, w, layer.bias) + _op(layer, x, _ia3_merged(w, ia3.weight.detach(), on_input, 0.7) - w)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    # bypass form: output channels scaled by (1 + m * w) (input channels: the input scaled)
    if not on_input:
        vector = ia3.weight.detach().flatten()
        base = _op(layer, x, w)
        scaled = base * (1 + 0.7 * (vector.reshape(1, -1, 1, 1) if conv else vector))
        torch.testing.assert_close(
            layer(x), scaled + _op(layer, x, torch.zeros_like(w), layer.bias), atol=1e-5, rtol=1e-5
        )
    ia3.detach()
    before = w.clone()
    backup = ia3.merge(0.7)
    torch.testing.assert_close(layer.weight.detach(), _ia3_merged(before, ia3.weight.detach(), on_input, 0.7))
    ia3.unmerge(backup)
    assert torch.equal(layer.weight.detach(), before)


def test_ia3_merge_matches_a1111_on_a_linear():
    layer = _layer(False)
    for on_input in (False, True):
        ia3 = Ia3Adapter("m", layer, on_input=on_input)
        _randomize(ia3, seed=4)
        w = layer.weight.detach().clone()
        vector = ia3.weight.detach()
        # A1111 network_ia3.calc_updown: updown = W * w, w reshaped to a column unless on_input; W + m * updown
        updown = w * (vector if on_input else vector.reshape(-1, 1))
        backup = ia3.merge(0.7)
        torch.testing.assert_close(layer.weight.detach(), w + 0.7 * updown)
        ia3.unmerge(backup)


# --- GLoRA -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [False, True])
def test_glora_init_keys_and_forward_are_lycoris(conv):
    layer = _layer(conv)
    torch.manual_seed(11)
    glora = GloraAdapter("m", layer, 2, 3.0)
    # LyCORIS GLoRAModule.__init__: a2 (in->r), a1 (r->in), b2 (in->r, the layer's kernel), b1 (r->out) built in
    # this order (each draws its default init), then a1, b1 kaiming-uniform(a=sqrt 5), a2, b2 zero
    torch.manual_seed(11)
    if conv:
        mods = [nn.Conv2d(6, 2, 1, bias=False), nn.Conv2d(2, 6, 1, bias=False),
                nn.Conv2d(6, 2, 3, 1, 1, bias=False), nn.Conv2d(2, 8, 1, bias=False)]  # fmt: skip
    else:
        mods = [nn.Linear(6, 2, bias=False), nn.Linear(2, 6, bias=False),
                nn.Linear(6, 2, bias=False), nn.Linear(2, 8, bias=False)]  # fmt: skip
    _a2, a1, _b2, b1 = (m.weight.detach().clone() for m in mods)  # a2, b2 are zeroed after their draws
    nn.init.kaiming_uniform_(a1, a=math.sqrt(5))
    nn.init.kaiming_uniform_(b1, a=math.sqrt(5))
    state = glora.state_dict()
    assert set(state) == {"alpha", "a1.weight", "a2.weight", "b1.weight", "b2.weight"}
    assert float(state["alpha"]) == 3.0
    for key, want in (("a1.weight", a1), ("b1.weight", b1)):
        assert torch.equal(state[key], want), key
    assert torch.count_nonzero(state["a2.weight"]) == 0 and torch.count_nonzero(state["b2.weight"]) == 0
    assert torch.count_nonzero(glora.delta_weight()) == 0
    _randomize(glora, seed=2)
    t = {k: v.detach() for k, v in glora.state_dict().items()}
    w = layer.weight.detach()
    # LyCORIS make_weight: (b1 @ b2 viewed as W + W·(a1 @ a2) over the input axis) * alpha / r
    wa1, wa2 = t["a1.weight"].flatten(1), t["a2.weight"].flatten(1)
    wb = (t["b1.weight"].flatten(1) @ t["b2.weight"].flatten(1)).reshape(w.shape)
    w_a = torch.einsum("o i ..., i j -> o j ...", torch.einsum("o i ..., i j -> o j ...", w, wa1), wa2)
    change = (wb + w_a) * (3.0 / 2)
    torch.testing.assert_close(glora.delta_weight(), change, rtol=1e-5, atol=1e-6)
    glora.multiplier = 0.7
    glora.attach()
    x = _x(conv)
    torch.testing.assert_close(
        layer(x), _op(layer, x, w, layer.bias) + _op(layer, x, change * 0.7), rtol=1e-5, atol=1e-5
    )
    glora.detach()
    # ComfyUI's GLoRA adapter (new layout): W += strength * alpha / rank * (W @ a1 @ a2 + b1 @ b2)
    if not conv:
        comfy = w + 0.7 * (3.0 / 2) * ((w @ wa1) @ wa2 + t["b1.weight"] @ t["b2.weight"])
        before = w.clone()
        backup = glora.merge(0.7)
        torch.testing.assert_close(layer.weight.detach(), comfy, rtol=1e-5, atol=1e-6)
        glora.unmerge(backup)
        assert torch.equal(layer.weight.detach(), before)


# --- full ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [False, True])
def test_full_module_is_lycoris(conv):
    layer = _layer(conv)
    full = FullAdapter("m", layer)
    state = full.state_dict()
    # LyCORIS FullModule.custom_state_dict: diff = weight - base (zero at the start), diff_b likewise; no alpha
    assert {k: tuple(v.shape) for k, v in state.items()} == {"diff": tuple(layer.weight.shape), "diff_b": (8,)}
    assert all(torch.count_nonzero(v) == 0 for v in state.values())
    _randomize(full, seed=6)
    diff, diff_b = full.diff.detach(), full.diff_b.detach()
    full.multiplier = 0.7
    full.attach()
    x = _x(conv)
    w, b = layer.weight.detach(), layer.bias.detach()
    # LyCORIS forward: base + op(x, (W + m·diff) - W, (b + m·diff_b) - b)
    torch.testing.assert_close(
        layer(x), _op(layer, x, w, b) + _op(layer, x, 0.7 * diff, 0.7 * diff_b), rtol=1e-5, atol=1e-5
    )
    full.detach()
    # A1111 network_full: updown = diff, ex_bias = diff_b, both times the multiplier
    w0, b0 = w.clone(), b.clone()
    backup = full.merge(0.7)
    torch.testing.assert_close(layer.weight.detach(), w0 + 0.7 * diff)
    torch.testing.assert_close(layer.bias.detach(), b0 + 0.7 * diff_b)
    full.unmerge(backup)
    assert torch.equal(layer.weight.detach(), w0) and torch.equal(layer.bias.detach(), b0)
    assert FullAdapter("n", nn.Linear(6, 8, bias=False)).state_dict().keys() == {"diff"}


# --- files written by LyCORIS, applied here --------------------------------------------------------------


def _lycoris_file(bundle) -> dict[str, torch.Tensor]:
    """One module per algo, in LyCORIS' layout and dtypes (on_input an int64 scalar, no alpha for ia3/full)."""
    g = torch.Generator().manual_seed(9)
    conv, proj = (_module(bundle, n).weight for n in (CONV, CONV1X1))
    attn2_k = LINEAR[: -len("ff_net_2")] + "attn2_to_k"
    to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    to_v = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"
    return {
        f"{LINEAR}.weight": torch.randn(128, generator=g) * 0.3,  # ff.net.2 on its input (LyCORIS' ia3 preset)
        f"{LINEAR}.on_input": torch.tensor(1),
        f"{CONV}.weight": torch.randn(1, conv.shape[0], 1, 1, generator=g) * 0.3,
        f"{CONV}.on_input": torch.tensor(0),
        f"{to_k}.a1.weight": torch.randn(32, 2, generator=g) * 0.3,
        f"{to_k}.a2.weight": torch.randn(2, 32, generator=g) * 0.3,
        f"{to_k}.b1.weight": torch.randn(32, 2, generator=g) * 0.3,
        f"{to_k}.b2.weight": torch.randn(2, 32, generator=g) * 0.3,
        f"{to_k}.alpha": torch.tensor(1.0),
        f"{CONV1X1}.a1.weight": torch.randn(32, 2, 1, 1, generator=g) * 0.3,
        f"{CONV1X1}.a2.weight": torch.randn(2, 32, 1, 1, generator=g) * 0.3,
        f"{CONV1X1}.b1.weight": torch.randn(proj.shape[0], 2, 1, 1, generator=g) * 0.3,
        f"{CONV1X1}.b2.weight": torch.randn(2, 32, 1, 1, generator=g) * 0.3,
        f"{CONV1X1}.alpha": torch.tensor(4.0),
        f"{to_v}.diff": torch.randn(32, 32, generator=g) * 0.1,  # to_v has no bias: no diff_b
        "lora_unet_down_blocks_1_resnets_0_conv2.diff": torch.randn(64, 64, 3, 3, generator=g) * 0.05,
        "lora_unet_down_blocks_1_resnets_0_conv2.diff_b": torch.randn(64, generator=g) * 0.1,
        f"{attn2_k}.weight": torch.randn(32, generator=g) * 0.3,  # a Linear's output
        f"{attn2_k}.on_input": torch.tensor(0),
    }


def _ui_change(w: torch.Tensor, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The UIs' change of one module (multiplier 1): A1111 ia3/full, ComfyUI glora (alpha / rank)."""
    if "on_input" in t:
        vector = t["weight"].flatten()
        if int(t["on_input"]):
            return w * vector.reshape(1, -1, *[1] * (w.dim() - 2)), None
        return w * vector.reshape(-1, 1, *[1] * (w.dim() - 2)), None
    if "diff" in t:
        return t["diff"], t.get("diff_b")
    a1, a2 = t["a1.weight"].flatten(1), t["a2.weight"].flatten(1)
    b1, b2 = t["b1.weight"].flatten(1), t["b2.weight"].flatten(1)
    scale = float(t["alpha"]) / a2.shape[0]
    wa = torch.einsum("o i ..., i j -> o j ...", torch.einsum("o i ..., i j -> o j ...", w, a1), a2)
    return (wa + (b1 @ b2).reshape(w.shape)) * scale, None


@pytest.mark.parametrize("merge", [False, True])
def test_lycoris_written_files_apply_as_the_uis(tmp_path, merge):
    bundle = fresh_bundle("sd1")
    state = _lycoris_file(bundle)
    path = _save(tmp_path, state)
    lora = read_lora(path)
    assert not lora.unknown_keys
    assert sorted({w.kind for w in lora.modules.values()}) == ["full", "glora", "ia3"]
    originals = {n: (_module(bundle, n).weight.detach().clone(), _module(bundle, n).bias) for n in lora.modules}
    originals = {n: (w, None if b is None else b.detach().clone()) for n, (w, b) in originals.items()}
    applied = apply_lora(bundle, path, 0.7, merge=merge, strict=True)
    for name, weights in lora.modules.items():
        module = _module(bundle, name)
        w, b = originals[name]
        change, bias_change = _ui_change(w, {k: v.float() for k, v in weights.tensors.items()})
        x = torch.randn(2, w.shape[1], 6, 6) if w.dim() == 4 else torch.randn(3, w.shape[1])
        want = _op(
            module,
            x,
            w + 0.7 * change,
            None if b is None else b + (0.7 * bias_change if bias_change is not None else 0),
        )
        torch.testing.assert_close(_layer_out(bundle, name, x), want, rtol=1e-5, atol=1e-5, msg=name)
        if merge:
            torch.testing.assert_close(module.weight.detach(), w + 0.7 * change, rtol=1e-5, atol=1e-6)
    applied.remove()
    for name, (w, b) in originals.items():
        assert torch.equal(_module(bundle, name).weight.detach(), w)
        if b is not None:
            assert torch.equal(_module(bundle, name).bias.detach(), b)
    # the dense changes the tools read (LoRA merge/resize): the same formulas, with the base model given;
    # a bias change is something no LoRA carries, which they say
    from sdcore.errors import NetworkMismatchError

    with pytest.raises(NetworkMismatchError, match="also changes the bias"):
        effective_deltas(lora, fresh_bundle("sd1"))
    lora = parse_state_dict({k: v for k, v in state.items() if not k.endswith(".diff_b")})
    deltas = effective_deltas(lora, fresh_bundle("sd1"))
    for name, weights in lora.modules.items():
        change, _ = _ui_change(originals[name][0], {k: v.float() for k, v in weights.tensors.items()})
        torch.testing.assert_close(deltas[name], change.flatten(1), rtol=1e-5, atol=1e-6)


def test_old_layout_glora_file_applies_as_comfyui(tmp_path):
    bundle = fresh_bundle("sd1")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"  # Linear 32 -> 256
    g = torch.Generator().manual_seed(4)
    # older LyCORIS: a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r]
    t = {"a1.weight": torch.randn(2, 32, generator=g) * 0.3, "a2.weight": torch.randn(32, 2, generator=g) * 0.3,
         "b1.weight": torch.randn(2, 32, generator=g) * 0.3, "b2.weight": torch.randn(256, 2, generator=g) * 0.3,
         "alpha": torch.tensor(1.0)}  # fmt: skip
    path = _save(tmp_path, {f"{name}.{k}": v for k, v in t.items()})
    w = _module(bundle, name).weight.detach().clone()
    apply_lora(bundle, path, 0.7, merge=True, strict=True)
    # ComfyUI (old_glora): b2 @ b1 + W @ a2 @ a1, times strength * alpha / rank with rank = a1's rows
    want = w + 0.7 * (1.0 / 2) * (t["b2.weight"] @ t["b1.weight"] + (w @ t["a2.weight"]) @ t["a1.weight"])
    torch.testing.assert_close(_module(bundle, name).weight.detach(), want, rtol=1e-5, atol=1e-6)


def test_ia3_weight_key_is_read_only_next_to_on_input():
    lora = parse_state_dict({"lora_te_text_projection.weight": torch.zeros(3), "x.on_input": torch.tensor(0),
                             "x.weight": torch.ones(3)})  # fmt: skip
    assert list(lora.modules) == ["x"] and lora.modules["x"].kind == "ia3"
    assert lora.unknown_keys == ["lora_te_text_projection.weight"]


def test_info_names_the_algos_and_tools_need_the_base(tmp_path):
    bundle = fresh_bundle("sd1")
    path = _save(tmp_path, _lycoris_file(bundle))
    info = lora_info(path)
    assert info["kinds"] == {"ia3": 3, "glora": 2, "full": 2}
    from sdcore.errors import NetworkMismatchError

    with pytest.raises(
        NetworkMismatchError, match=r"is (\(IA\)\^3|GLoRA): its change depends on the base weights; pass --base-model"
    ):
        effective_deltas(read_lora(path))


# --- training: the method, kohya configs, the CLI --------------------------------------------------------


@pytest.mark.parametrize("algo", ["ia3", "glora", "full"])
def test_trained_file_has_lycoris_keys_and_reapplies_exactly(tmp_path, algo):
    bundle = fresh_bundle("sd1")
    method = LoraMethod(LoraOptions(rank=2, conv_rank=2, algo=algo, save_dtype="fp32"))
    method.validate()
    method.prepare(bundle)
    modules = list(method.network)
    kinds = {type(m) for m in modules}
    assert kinds == {{"ia3": Ia3Adapter, "glora": GloraAdapter, "full": FullAdapter}[algo]}
    names = {m.lora_name for m in modules}
    assert CONV in names and LINEAR in names  # GLoRA too: lycoris.kohya's transformer-only branch never runs
    for i, m in enumerate(modules):
        _randomize(m, seed=i, std=0.05)
    path = method.save(
        bundle, SaveInfo(path=tmp_path / f"{algo}.safetensors", step=1, epoch=1, metadata={}, final=True)
    )
    saved = read_lora(path)
    assert (saved.metadata["ss_network_module"], json.loads(saved.metadata["ss_network_args"])["algo"]) == (
        "lycoris.kohya", algo)  # fmt: skip
    want_keys = {"ia3": {"weight", "on_input"}, "glora": {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"},
                 "full": {"diff", "diff_b"}}[algo]  # fmt: skip
    for m in modules:
        assert set(saved.modules[m.lora_name].tensors) == want_keys - ({"diff_b"} if m.base.bias is None else set())
    inputs = unet_inputs(bundle)
    trained = unet_out(bundle, inputs)
    for merge in (False, True):
        other = fresh_bundle("sd1")
        apply_lora(other, path, merge=merge, strict=True)
        torch.testing.assert_close(unet_out(other, inputs), trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("algo", ["ia3", "glora", "full"])
def test_kohya_config_lycoris_algo_trains_a_step(tmp_path, algo):
    from sdcore.train.config import load_options

    kohya = {"network_module": "lycoris.kohya", "network_args": [f"algo={algo}", "conv_dim=2"], "network_dim": 2,
             "network_alpha": 1, "network_train_unet_only": True}  # fmt: skip
    notes: list[str] = []
    o = load_options(LoraOptions, None, kohya=kohya, notes=notes)
    assert o.algo == algo
    assert (o.conv_rank, o.lycoris_preset) == (2, "full")
    o.save_dtype = "fp32"
    bundle = fresh_bundle("sd1")
    method = LoraMethod(o)
    method.validate()
    optimizer = torch.optim.SGD(method.prepare(bundle), lr=1e-1)
    start = {k: v.clone() for k, v in method.network.state_dict().items()}
    latents, t, hidden, _kw = unet_inputs(bundle)
    for _ in range(2):
        optimizer.zero_grad()
        bundle.unet(latents, t, encoder_hidden_states=hidden).sample.square().mean().backward()
        optimizer.step()
    changed = [k for k, v in method.network.state_dict().items() if not torch.equal(v, start[k])]
    assert changed
    path = method.save(bundle, SaveInfo(path=tmp_path / "k.safetensors", step=2, epoch=1, metadata={}, final=True))
    meta = read_lora(path).metadata
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == algo


def test_kohya_train_on_input_is_said_to_do_nothing_and_other_algos_stay_refused():
    from sdcore.train.config import load_options

    notes: list[str] = []
    kohya = {"network_module": "lycoris.kohya", "network_args": ["algo=ia3", "train_on_input=True"]}
    assert load_options(LoraOptions, None, kohya=kohya, notes=notes).algo == "ia3"
    assert any("train_on_input has no effect" in n for n in notes)
    # LyCORIS f49d30d lycoris/wrapper.py:45-55: network_module_dict has no "ia3", and lycoris/kohya.py:403 looks
    # the algo up there, so a kohya run with algo=ia3 stops with KeyError 'ia3': a note says sdcore trains it anyway
    assert any("kohya run stops with KeyError 'ia3'" in n for n in notes)
    with pytest.raises(ConfigError, match="algo='glokr' is not available"):
        load_options(LoraOptions, None, kohya={"network_module": "lycoris.kohya", "network_args": ["algo=glokr"]})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"algo": "ia3", "dropout": 0.1}, "--dropout with --algo ia3"),
        ({"algo": "full", "rank_dropout": 0.1, "use_tucker": True}, "--rank-dropout, --use-tucker with --algo full"),
        ({"algo": "glora", "use_tucker": True}, "--use-tucker with --algo glora"),
        ({"algo": "ia3", "scale_weight_norms": 1.0}, "--scale-weight-norms with --algo ia3"),
    ],
)
def test_options_without_meaning_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        LoraMethod(LoraOptions(**options)).validate()


def test_cli_trains_ia3(tmp_path):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    out = tmp_path / "out" / "ia3.safetensors"
    args = ["train", "lora", "--pretrained_model_name_or_path", "tiny:sd1", "--train_data_dir", str(data),
            "--output", str(out), "--resolution", "64", "--max_train_steps", "2", "--lr", "1e-2",
            "--save_precision", "float", "--no-progress", "--network_train_unet_only", "--algo", "ia3"]  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lora = read_lora(out)
    assert {w.kind for w in lora.modules.values()} == {"ia3"}
    assert all(int(w.tensors["on_input"]) == 0 for w in lora.modules.values())
    assert any(torch.count_nonzero(w.tensors["weight"]) for w in lora.modules.values())  # it learned something
    assert json.loads(lora.metadata["ss_network_args"])["algo"] == "ia3"

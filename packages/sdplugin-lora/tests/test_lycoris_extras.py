"""LyCORIS' decompose_both (LoKr), rank_dropout_scale and train_norm: the module maths, the file keys,
applying the files, and training them from kohya_ss GUI presets and the CLI.

Reference formulas are rewritten here from LyCORIS f49d30d (lycoris/modules/lokr.py, locon.py, loha.py,
norms.py, lycoris/kohya.py) and the UIs' documented handling of the same keys (ComfyUI's LoKr adapter,
A1111's network_lokr / network_norm): not imported from sdcore."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from click.testing import CliRunner
from lora_testutil import fresh_bundle, unet_inputs, unet_out
from sdcore.errors import NetworkMismatchError
from sdcore.testing.contract import make_tiny_dataset
from sdcore.train.method import SaveInfo
from sdplugin_lora.adapters import LohaAdapter, LokrAdapter, LoraAdapter, NormAdapter
from sdplugin_lora.apply import apply_lora
from sdplugin_lora.format import read_lora
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_lora.tools import lora_info, resize_lora
from torch import nn


def _kaiming(shape):
    t = torch.empty(*shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def _randomize(module, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * std)


# --- decompose_both -------------------------------------------------------------------------------------


def test_decompose_both_splits_w1_under_lycoris_condition_with_its_init():
    base = nn.Linear(64, 48)  # out 48 = 6 x 8, in 64 = 8 x 8
    torch.manual_seed(0)
    lokr = LokrAdapter("m", base, 2, 1.0, decompose_both=True)
    # LyCORIS LokrModule.__init__: w1 low-rank when decompose_both and rank < max(out_l, in_m) / 2;
    # init order w2_a (kaiming), w2_b (zeros), then w1_a, w1_b (kaiming)
    torch.manual_seed(0)
    w2_a, w2_b = _kaiming((8, 2)), torch.zeros(2, 8)
    w1_a, w1_b = _kaiming((6, 2)), _kaiming((2, 8))
    state = lokr.state_dict()
    assert set(state) == {"alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    for key, want in (("lokr_w1_a", w1_a), ("lokr_w1_b", w1_b), ("lokr_w2_a", w2_a), ("lokr_w2_b", w2_b)):
        assert torch.equal(state[key], want), key
    assert lokr.scale == pytest.approx(0.5)  # a low-rank factor: alpha / rank
    # rank 4 is not below max(6, 8) / 2 = 4: w1 stays full, as LyCORIS keeps it
    assert "lokr_w1" in LokrAdapter("m", base, 4, 1.0, decompose_both=True).state_dict()
    assert "lokr_w1" in LokrAdapter("m", base, 2, 1.0).state_dict()


@pytest.mark.parametrize("conv", [False, True])
def test_decompose_both_delta_is_lycoris_kron(conv):
    base = nn.Conv2d(64, 48, 3, padding=1) if conv else nn.Linear(64, 48)
    lokr = LokrAdapter("m", base, 2, 3.0, decompose_both=True)
    _randomize(lokr)
    t = {k: v.detach() for k, v in lokr.state_dict().items()}
    # LyCORIS get_weight: make_kron(w1_a @ w1_b, w2_a @ w2_b, scale); a 2-D w1 is unsqueezed to w2's dims
    w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if conv:
        w2 = w2.reshape(8, 8, 3, 3)
        w1 = w1[:, :, None, None]
    want = torch.kron(w1, w2).reshape(base.weight.shape) * (3.0 / 2)
    torch.testing.assert_close(lokr.delta_weight(), want, rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 64, 5, 5) if conv else torch.randn(3, 64)
    lokr.eval()
    op = (lambda w: nn.functional.conv2d(x, w, padding=1)) if conv else (lambda w: x @ w.T)
    torch.testing.assert_close(lokr.delta(x), op(want), rtol=1e-5, atol=1e-5)


def _ui_lokr(t, shape):
    """ComfyUI (weight_adapter/lokr.py) and A1111 (network_lokr.py): w1 = w1_a @ w1_b when w1 is absent,
    w2 likewise; the rank ("dim") is w1_b's rows, else w2_b's; scale alpha / dim (1 without a dim);
    a 4-D w2 makes w1 [a, c, 1, 1]; ΔW = kron(w1, w2) reshaped to the layer's weight."""
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        dim = t["lokr_w1_b"].shape[0]
        w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        dim = t["lokr_w2_b"].shape[0]
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if len(shape) == 4:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = float(t["alpha"]) / dim if dim else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


def test_decompose_both_training_file_has_lycoris_keys_and_applies_as_the_uis(tmp_path):
    bundle = fresh_bundle("sd1")
    method = LoraMethod(LoraOptions(rank=1, conv_rank=1, algo="lokr", decompose_both=True, save_dtype="fp32"))
    method.validate()
    method.prepare(bundle)
    split = [m for m in method.network if "lokr_w1_a" in m.state_dict()]
    assert split, "some module has a low-rank w1"
    for m in method.network:
        _randomize(m, std=0.05)
    path = method.save(bundle, SaveInfo(path=tmp_path / "k.safetensors", step=1, epoch=1, metadata={}, final=True))
    saved = read_lora(path)
    args = json.loads(saved.metadata["ss_network_args"])
    assert (saved.metadata["ss_network_module"], args["algo"], args["decompose_both"]) == (
        "lycoris.kohya", "lokr", "True")  # fmt: skip
    for m in split:
        t = saved.modules[m.lora_name].tensors
        assert set(t) == {"alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
        ui = _ui_lokr(t, tuple(m.base.weight.shape))
        torch.testing.assert_close(ui, m.delta_weight(), rtol=1e-5, atol=1e-7)
    inputs = unet_inputs(bundle)
    trained = unet_out(bundle, inputs)
    merged = fresh_bundle("sd1")
    apply_lora(merged, path, merge=True, strict=True)
    torch.testing.assert_close(unet_out(merged, inputs), trained, atol=1e-4, rtol=0)
    hooked = fresh_bundle("sd1")
    apply_lora(hooked, path, strict=True)
    torch.testing.assert_close(unet_out(hooked, inputs), trained, atol=1e-4, rtol=0)


# --- rank_dropout_scale -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [LokrAdapter, LohaAdapter])
@pytest.mark.parametrize("rescale", [False, True])
def test_rank_dropout_of_weight_algos_is_lycoris(cls, rescale):
    base = nn.Linear(64, 48)  # LoKr: w1 [6, 8] full, w2 = w2_a [8, 2] @ w2_b [2, 8]
    module = cls("m", base, 2, 1.0, rank_dropout=0.5, rank_dropout_scale=rescale)
    module.multiplier = 0.7
    _randomize(module)
    module.train()
    x = torch.randn(3, 64)
    torch.manual_seed(5)
    got = module.delta(x)
    # LyCORIS get_weight: drop = (rand(out) > p); with rank_dropout_scale drop /= drop.mean(); weight *= drop
    t = {k: v.detach() for k, v in module.state_dict().items()}
    if cls is LokrAdapter:
        w = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * (1.0 / 2)
    else:
        w = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (1.0 / 2)
    torch.manual_seed(5)
    drop = (torch.rand(48) > 0.5).float()
    if rescale:
        drop = drop / drop.mean()
    want = x @ (w * drop[:, None] * 0.7).T
    assert 0 < float(drop.count_nonzero()) < 48, "the seed drops some rows, not all"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv", [False, True])
def test_rank_dropout_scale_on_locon_is_lycoris_rebuilt_weight(conv):
    """LyCORIS f49d30d locon.py: ``forward`` (lines 309-332) rebuilds the weight unless bypass_mode (off in
    lycoris.kohya and create_lycoris: ``str_bool(kwargs.get("bypass_mode", False))``); ``make_weight``
    (lines 199-218) drops whole output rows of ``up @ down``: ``drop = rand(out) > p``, ``drop /= drop.mean()``
    with rank_dropout_scale; then ``W + m · scale · drop · ΔW``; no neuron dropout on that path."""
    base = nn.Conv2d(6, 12, 3, padding=1) if conv else nn.Linear(16, 12)
    lora = LoraAdapter("m", base, 4, 2.0, dropout=0.3, rank_dropout=0.5, rank_dropout_scale=True)
    lora.multiplier = 0.5
    _randomize(lora)
    lora.train()
    x = torch.randn(3, 6, 5, 5) if conv else torch.randn(3, 16)
    torch.manual_seed(11)
    got = lora.delta(x)
    down, up = lora.lora_down.weight.detach(), lora.lora_up.weight.detach()
    delta = (up.flatten(1) @ down.flatten(1)).reshape(base.weight.shape) * (2.0 / 4)
    torch.manual_seed(11)
    drop = (torch.rand(12) > 0.5).float()
    assert 0 < float(drop.count_nonzero()) < 12
    drop = (drop / drop.mean()).reshape(-1, *[1] * (delta.dim() - 1))
    weight = delta * drop * 0.5
    want = nn.functional.conv2d(x, weight, None, 1, 1) if conv else x @ weight.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dropout_with_rank_dropout_scale_on_locon_is_said_to_do_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="sdplugin_lora"):
        LoraMethod(LoraOptions(algo="locon", dropout=0.1, rank_dropout=0.2, rank_dropout_scale=True)).validate()
    assert any(
        r.getMessage().startswith("--dropout has no effect on --algo locon with --rank-dropout-scale")
        for r in caplog.records
    )


def test_the_notes_of_a_training_command_print_as_cli_warnings(tmp_path, monkeypatch, python_warnings_shown):
    """``--dropout`` on LoHa and GGPO half-given, under ``sdcore train lora``: each note one ``warning: ...`` line,
    not Python's two-line ``preflight.py:N: UserWarning: ...`` with the source line under it."""
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    monkeypatch.delenv("SDCORE_DEBUG", raising=False)
    data = make_tiny_dataset(tmp_path / "data", n=1, size=64)
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", str(tmp_path / "o.safetensors"),
            "--resolution", "64", "--max-steps", "1", "--algo", "loha", "--dropout", "0.1", "--ggpo-sigma", "0.1",
            "--dry-run"]  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "--dropout has no effect" in line or "GGPO" in line]
    assert notes == [
        "warning: --dropout has no effect on --algo loha (LyCORIS has no neuron dropout for it either); "
        "--rank-dropout and --module-dropout apply",
        "warning: --ggpo-sigma without --ggpo-beta: GGPO is off (kohya's lora_flux turns it on only when both are "
        "given)",
    ], result.output
    assert "UserWarning" not in result.output


# --- train_norm -------------------------------------------------------------------------------------------


def _expected_norms(unet, conv):
    """LyCORIS' kohya wrapper: modules whose class name has "Norm" inside Transformer2DModel (and with the
    ResNets adapted, ResnetBlock2D/Down/Upsample2D) blocks."""
    classes = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D") if conv else ("Transformer2DModel",)
    found = set()
    for name, block in unet.named_modules():
        if type(block).__name__ in classes:
            for child_name, child in block.named_modules():
                if child_name and "Norm" in type(child).__name__:
                    found.add(f"lora_unet_{name}.{child_name}".replace(".", "_"))
    return found


def test_train_norm_trains_norms_saves_lycoris_keys_and_applies_as_the_uis(tmp_path):
    bundle = fresh_bundle("sd1")
    method = LoraMethod(LoraOptions(rank=2, algo="locon", train_norm=True, lr=1e-2, save_dtype="fp32"))
    method.validate()
    groups = method.prepare(bundle)
    norms = {m.lora_name: m for m in method.network if isinstance(m, NormAdapter)}
    assert set(norms) == _expected_norms(bundle.unet, conv=True) and len(norms) > 5
    assert {type(m.base).__name__ for m in norms.values()} == {"GroupNorm", "LayerNorm"}
    before = {k: v.detach().clone() for k, v in bundle.unet.state_dict().items()}
    start = {k: v.detach().clone() for k, v in method.network.state_dict().items()}
    optimizer = torch.optim.SGD(groups, lr=1e-2)
    for _ in range(2):  # step 1 moves the zero-initialised ups, step 2 reaches through them
        latents, t, hidden, _kw = unet_inputs(bundle)
        loss = bundle.unet(latents, t, encoder_hidden_states=hidden).sample.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = method.network.state_dict()
    for name in norms:
        assert not torch.equal(after[f"{name}.w_norm"], start[f"{name}.w_norm"]), name
        assert not torch.equal(after[f"{name}.b_norm"], start[f"{name}.b_norm"]), name
    assert all(torch.equal(before[k], v) for k, v in bundle.unet.state_dict().items()), "the model stays frozen"

    path = method.save(bundle, SaveInfo(path=tmp_path / "n.safetensors", step=2, epoch=1, metadata={}, final=True))
    saved = read_lora(path)
    assert json.loads(saved.metadata["ss_network_args"])["train_norm"] == "True"
    assert saved.metadata["ss_network_module"] == "lycoris.kohya"
    for name, module in norms.items():
        t = saved.modules[name].tensors
        assert set(t) == {"w_norm", "b_norm"}  # LyCORIS NormModule's state dict: no alpha
        assert torch.equal(t["w_norm"], module.w_norm.detach()) and torch.equal(t["b_norm"], module.b_norm.detach())
    inputs = unet_inputs(bundle)
    trained = unet_out(bundle, inputs)
    merged = fresh_bundle("sd1")
    base_state = {k: v.clone() for k, v in merged.unet.state_dict().items()}
    applied = apply_lora(merged, path, merge=True, strict=True)
    # ComfyUI ("diff" patches of w_norm/b_norm) and A1111 (network_norm: updown = w_norm, ex_bias = b_norm):
    # weight + m * w_norm, bias + m * b_norm
    state = merged.unet.state_dict()
    for name, module in norms.items():
        path_ = next(p for p, mod in bundle.unet.named_modules() if mod is module.base)
        t = saved.modules[name].tensors
        torch.testing.assert_close(state[f"{path_}.weight"], base_state[f"{path_}.weight"] + t["w_norm"])
        torch.testing.assert_close(state[f"{path_}.bias"], base_state[f"{path_}.bias"] + t["b_norm"])
    torch.testing.assert_close(unet_out(merged, inputs), trained, atol=1e-4, rtol=0)
    applied.remove()
    assert all(torch.equal(base_state[k], v) for k, v in merged.unet.state_dict().items()), "bias restored too"
    info = lora_info(path)
    assert info["kinds"]["norm"] == len(norms)
    with pytest.raises(NetworkMismatchError, match="is a LyCORIS norm module"):
        resize_lora(saved, 1)
    hooked = fresh_bundle("sd1")
    apply_lora(hooked, path, 0.5, strict=True)
    half = fresh_bundle("sd1")
    apply_lora(half, path, 0.5, merge=True, strict=True)
    torch.testing.assert_close(unet_out(hooked, inputs), unet_out(half, inputs), atol=1e-4, rtol=0)


def test_norm_module_forward_is_lycoris_norm_op():
    base = nn.GroupNorm(4, 8)
    norm = NormAdapter("n", base, multiplier=0.6)
    _randomize(norm)
    x = torch.randn(2, 8, 3, 3)
    # LyCORIS NormModule.forward: base + group_norm(x, weight=m * w_norm, bias=m * b_norm)
    want = nn.functional.group_norm(x, 4, norm.w_norm.detach() * 0.6, norm.b_norm.detach() * 0.6, base.eps)
    torch.testing.assert_close(norm.delta(x), want)
    layer = nn.LayerNorm(8)
    ln = NormAdapter("l", layer)
    _randomize(ln)
    y = torch.randn(2, 5, 8)
    with torch.no_grad():
        merged = nn.functional.layer_norm(y, (8,), layer.weight + ln.w_norm, layer.bias + ln.b_norm, layer.eps)
    ln.attach()
    torch.testing.assert_close(layer(y), merged, atol=1e-6, rtol=1e-6)


def test_norm_module_rank_dropout_draws_as_lycoris():
    """LyCORIS f49d30d norms.py ``make_weight`` (lines 75-88): with rank_dropout while training it draws
    ``rand(dim) < p`` (and rescales it with rank_dropout_scale), then overwrites ``drop`` with a second
    ``rand(dim) < p``: the second draw is the mask, and both draws consume the generator."""
    base = nn.GroupNorm(4, 8)
    norm = NormAdapter("n", base, multiplier=0.6, rank_dropout=0.5)
    _randomize(norm)
    norm.train()
    x = torch.randn(2, 8, 3, 3)
    torch.manual_seed(3)
    got = norm.delta(x)
    after = torch.rand(5)
    torch.manual_seed(3)
    first = torch.rand(8) < 0.5
    keep = (torch.rand(8) < 0.5).float()
    assert not torch.equal(first.float(), keep), "the seed tells the two draws apart"
    w, b = norm.w_norm.detach() * keep * 0.6, norm.b_norm.detach() * keep * 0.6
    torch.testing.assert_close(got, nn.functional.group_norm(x, 4, w, b, base.eps))
    assert torch.equal(after, torch.rand(5)), "the generator moved on by both draws"


def test_lycoris_options_are_refused_where_they_mean_nothing():
    from sdcore.errors import ConfigError

    for options, words in (
        (LoraOptions(algo="loha", decompose_both=True), "--decompose-both is LyCORIS' LoKr option"),
        (LoraOptions(algo="dylora", train_norm=True, rank=4), "--train-norm with --algo dylora"),
        (LoraOptions(algo="oft", rank_dropout_scale=True, rank=4), "--rank-dropout-scale with --algo oft"),
    ):
        with pytest.raises(ConfigError, match=words):
            LoraMethod(options).validate()
    assert any("--train-norm on flux" in p for p in LoraMethod(LoraOptions(train_norm=True)).family_problems("flux"))


# --- GUI presets and the CLI ------------------------------------------------------------------------------


def test_gui_lokr_preset_with_the_three_options_trains_a_step(tmp_path):
    from pathlib import Path

    from sdcore.train.config import load_options

    preset = Path(__file__).parents[3] / "tests" / "data" / "kohya_ss_gui" / "lora" / "sd15 - LoKr v1.1.json"
    o = load_options(LoraOptions, preset, notes=[])
    # rank_dropout_scale=True in the preset: lycoris.kohya never hands it to its modules, so off as in a kohya run
    assert (o.algo, o.decompose_both, o.rank_dropout_scale, o.train_norm) == ("lokr", True, False, True)
    assert (o.lokr_factor, o.use_tucker) == (6, True)
    bundle = fresh_bundle("sd1")
    method = LoraMethod(o)
    method.validate()
    optimizer = torch.optim.SGD(method.prepare(bundle), lr=1e-2)
    assert any(isinstance(m, NormAdapter) for m in method.network)
    assert any(isinstance(m, LokrAdapter) and m.full_matrix for m in method.network)  # network_dim 100000
    start = {k: v.clone() for k, v in method.network.state_dict().items()}
    latents, t, hidden, _kw = unet_inputs(bundle)
    bundle.unet(latents, t, encoder_hidden_states=hidden).sample.square().mean().backward()
    optimizer.step()
    changed = [k for k, v in method.network.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.endswith(".w_norm") for k in changed) and any(k.endswith(".lokr_w2") for k in changed)


def test_cli_trains_lokr_decompose_both_and_train_norm(tmp_path):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    out = tmp_path / "out" / "lyco.safetensors"
    args = ["train", "lora", "--pretrained_model_name_or_path", "tiny:sd1", "--train_data_dir", str(data),
            "--output", str(out), "--network_dim", "1", "--resolution", "64", "--max_train_steps", "1",
            "--save_precision", "float", "--no-progress", "--network_train_unet_only", "--algo", "lokr",
            "--decompose-both", "--train-norm", "--rank-dropout", "0.1", "--rank-dropout-scale"]  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lora = read_lora(out)
    kinds = {w.kind for w in lora.modules.values()}
    assert kinds == {"lokr", "norm"}
    assert any("lokr_w1_a" in w.tensors for w in lora.modules.values())
    args_meta = json.loads(lora.metadata["ss_network_args"])
    assert {k: args_meta[k] for k in ("decompose_both", "train_norm", "rank_dropout_scale")} == {
        "decompose_both": "True", "train_norm": "True", "rank_dropout_scale": "True"}  # fmt: skip


def test_train_norm_on_sdxl_uses_sgm_names_and_resumes_exactly(tmp_path):
    bundle = fresh_bundle("sdxl")
    method = LoraMethod(LoraOptions(rank=2, conv_rank=2, algo="lokr", train_norm=True, save_dtype="fp32"))
    method.validate()
    method.prepare(bundle)
    norms = [m for m in method.network if isinstance(m, NormAdapter)]
    names = {m.lora_name for m in norms}
    assert len(names) == len(_expected_norms(bundle.unet, conv=True))
    # sd-scripts' SDXL UNet (SGM names): ResNet norms are in_layers.0 / out_layers.0, transformer norms keep theirs
    assert all(
        n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for n in names
    )
    assert any(n.endswith("_in_layers_0") for n in names) and any(n.endswith("_out_layers_0") for n in names)
    assert any(n.endswith("_transformer_blocks_0_norm1") for n in names) and any(n.endswith("_1_norm") for n in names)
    for m in method.network:
        _randomize(m, std=0.05)
    state = method.trainable_state_dict()
    fresh = LoraMethod(LoraOptions(rank=2, conv_rank=2, algo="lokr", train_norm=True))
    fresh.prepare(fresh_bundle("sdxl"))
    fresh.load_trainable_state_dict(state)
    assert all(torch.equal(v, state[k]) for k, v in fresh.trainable_state_dict().items())
    path = method.save(bundle, SaveInfo(path=tmp_path / "x.safetensors", step=1, epoch=1, metadata={}, final=True))
    inputs = unet_inputs(bundle)
    merged = fresh_bundle("sdxl")
    apply_lora(merged, path, merge=True, strict=True)
    torch.testing.assert_close(unet_out(merged, inputs), unet_out(bundle, inputs), atol=1e-4, rtol=0)


def test_kohya_network_args_pass_the_lycoris_options_for_lycoris_only():
    from sdcore.errors import ConfigError
    from sdcore.train.config import load_options

    args = ["algo=lokr", "decompose_both=True", "rank_dropout_scale=True", "train_norm=True", "rank_dropout=0.1"]
    notes: list[str] = []
    o = load_options(LoraOptions, None, kohya={"network_module": "lycoris.kohya", "network_args": args}, notes=notes)
    # lycoris.kohya create_network passes no rank_dropout_scale to its modules: a kohya run trains without it
    assert (o.algo, o.decompose_both, o.rank_dropout_scale, o.train_norm) == ("lokr", True, False, True)
    assert any("rank_dropout_scale: lycoris.kohya does not pass it" in n for n in notes)
    # ... and passes decompose_both as the raw text: "False" (what the kohya_ss GUI sends) is on, "" is off
    notes = []
    lokr = {"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "decompose_both=False"]}
    assert load_options(LoraOptions, None, kohya=lokr, notes=notes).decompose_both is True
    assert any("passes the text on unparsed" in n for n in notes)
    lokr["network_args"] = ["algo=lokr", "decompose_both="]
    assert load_options(LoraOptions, None, kohya=lokr, notes=[]).decompose_both is False
    loha = {"network_module": "lycoris.kohya", "network_args": ["algo=loha", "decompose_both=True"]}
    assert load_options(LoraOptions, None, kohya=loha, notes=[]).decompose_both is False  # only LoKr reads it
    off = ["decompose_both=False", "train_norm=False"]
    o = load_options(LoraOptions, None, kohya={"network_module": "networks.lora", "network_args": off}, notes=[])
    assert (o.decompose_both, o.train_norm) == (False, False)
    with pytest.raises(ConfigError, match="network_args rank_dropout_scale, train_norm are LyCORIS options"):
        load_options(
            LoraOptions,
            None,
            kohya={"network_module": "networks.lora", "network_args": ["train_norm=True", "rank_dropout_scale=True"]},
            notes=[],
        )


@pytest.mark.parametrize("value", ["0", "no", "1", ""])
def test_kohya_lycoris_switches_read_as_lycoris_str_bool_reads_them(value):
    """LyCORIS f49d30d lycoris/kohya.py reads ``train_norm`` and ``dora_wd`` with ``str_bool``
    (lycoris/utils/__init__.py:44-45: ``str(val).lower() != "false"``): every text but "false" is on,
    "0" and "no" included, so a kohya run with these values trains norms / DoRA."""
    from sdcore.train.config import load_options

    notes: list[str] = []
    args = ["algo=locon", f"train_norm={value}", f"dora_wd={value}"]
    o = load_options(LoraOptions, None, kohya={"network_module": "lycoris.kohya", "network_args": args}, notes=notes)
    assert (o.train_norm, o.algo) == (True, "dora")
    if value in ("0", "no", ""):
        assert any("train_norm" in n and "str_bool" in n for n in notes)
        assert any("dora_wd" in n and "str_bool" in n for n in notes)
    off = ["algo=locon", "train_norm=False", "dora_wd=false"]
    o = load_options(LoraOptions, None, kohya={"network_module": "lycoris.kohya", "network_args": off}, notes=[])
    assert (o.train_norm, o.algo) == (False, "locon")


def test_kohya_lycoris_conv_dim_zero_still_adapts_the_resnets_linears_and_norms():
    """LyCORIS f49d30d kohya.py ``create_single_module``: a Linear gets a module whenever lora_dim > 0 and a
    1x1 conv as a Linear; only kxk convs need conv_dim; with train_norm every "Norm" class is taken first. Preset
    full walks ResnetBlock2D whatever conv_dim is, so conv_dim=0 still adapts time_emb_proj, the shortcuts and
    (train_norm) the ResNet norms: sdcore's preset selection trains them too."""
    from sdcore.train.config import load_options

    kohya = {"network_module": "lycoris.kohya", "network_args": ["algo=loha", "conv_dim=0", "train_norm=True"]}
    o = load_options(LoraOptions, None, kohya=kohya, notes=[])
    assert (o.conv_rank, o.lycoris_preset) == (0, "full")
    method = LoraMethod(o)
    method.validate()
    method.prepare(fresh_bundle("sd1"))
    names = set(method.network.loras)
    resnet = {n for n in names if "_resnets_" in n}
    assert any(n.endswith("_time_emb_proj") for n in resnet) and any(n.endswith("_conv_shortcut") for n in resnet)
    assert any(n.endswith("_norm1") for n in resnet)
    assert not any(n.endswith(("_conv1", "_conv2")) for n in resnet)  # kxk: need conv_dim

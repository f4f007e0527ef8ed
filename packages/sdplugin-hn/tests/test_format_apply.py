"""The A1111 file format and how a hypernetwork acts on the attention key/value inputs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sdcore.errors import ModelFormatError, NetworkMismatchError, UnsafeFileError
from sdcore.generate.networks import NetworkRef
from sdplugin_hn.apply import HypernetworkHandler, apply_hypernetworks, attention_layers, context_widths
from sdplugin_hn.format import hypernetwork_to_dict, load_hypernetwork, save_hypernetwork
from sdplugin_hn.modules import Hypernetwork, HypernetworkModule


def _a1111_state(dim: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """State dict of [1,2,1] relu + layer norm + dropout [0,0.1,0], activate_output False.

    A1111's Sequential is Linear(0) ReLU(1) LayerNorm(2) Dropout(3) Linear(4) LayerNorm(5).
    """

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.2

    return {
        "linear.0.weight": rand(2 * dim, dim),
        "linear.0.bias": rand(2 * dim),
        "linear.2.weight": 1 + rand(2 * dim),
        "linear.2.bias": rand(2 * dim),
        "linear.4.weight": rand(dim, 2 * dim),
        "linear.4.bias": rand(dim),
        "linear.5.weight": 1 + rand(dim),
        "linear.5.bias": rand(dim),
    }


def _reference_mlp(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The documented math, written independently of sdplugin_hn."""
    h = F.relu(x @ state["linear.0.weight"].T + state["linear.0.bias"])
    h = F.layer_norm(h, h.shape[-1:], state["linear.2.weight"], state["linear.2.bias"])
    h = h @ state["linear.4.weight"].T + state["linear.4.bias"]
    return F.layer_norm(h, h.shape[-1:], state["linear.5.weight"], state["linear.5.bias"])


def _capture_kv(unet):
    """Register capture hooks on every to_k/to_v; returns (records, handles)."""
    records: list[tuple[str, str, torch.Tensor]] = []
    handles = []
    for name, attention in attention_layers(unet):
        for slot in ("to_k", "to_v"):

            def hook(_m, args, _name=name, _slot=slot):
                records.append((_name, _slot, args[0].detach().clone()))

            handles.append(getattr(attention, slot).register_forward_pre_hook(hook))
    return records, handles


def test_a1111_file_loads_and_transforms_kv_exactly(tmp_path: Path, sd1_bundle, run_unet) -> None:
    generator = torch.Generator().manual_seed(1)
    k_state, v_state = _a1111_state(32, generator), _a1111_state(32, generator)
    data = {
        32: (k_state, v_state),
        "layer_structure": [1.0, 2.0, 1.0],
        "activation_func": "relu",
        "is_layer_norm": True,
        "weight_initialization": "Normal",
        "use_dropout": True,
        "dropout_structure": [0.0, 0.1, 0.0],
        "last_layer_dropout": False,
        "activate_output": False,
        "step": 1234,
        "name": "stored-name",
        "sd_checkpoint": "abcdef12",
        "sd_checkpoint_name": "model",
    }
    path = tmp_path / "mynet.pt"
    torch.save(data, path)
    hn = load_hypernetwork(path)
    assert hn.name == "mynet" and hn.step == 1234 and hn.dims == [32]
    assert hn.sd_checkpoint == "abcdef12"

    unet = sd1_bundle.unet
    before, before_handles = _capture_kv(unet)  # registered first: sees the raw inputs
    hooks = apply_hypernetworks(unet, [(hn, 0.7)])
    after, after_handles = _capture_kv(unet)  # registered last: sees what to_k/to_v receive
    try:
        run_unet(unet)
    finally:
        for handle in before_handles + after_handles:
            handle.remove()
        hooks.remove()
    assert len(before) == len(after) == 2 * len(attention_layers(unet))
    changed = unchanged = 0
    for (name, slot, x), (name2, slot2, y) in zip(before, after, strict=True):
        assert (name, slot) == (name2, slot2)
        if x.shape[-1] == 32:
            state = k_state if slot == "to_k" else v_state
            torch.testing.assert_close(y, x + _reference_mlp(state, x) * 0.7, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(x, y)
            changed += 1
        else:  # width 64 (the mid block's self-attention): no module, the context passes unchanged
            assert torch.equal(x, y)
            unchanged += 1
    # SD1 layout: self-attention at 32 and cross-attention (context 32) both change; mid-block self-attention is 64
    assert changed >= 4 and unchanged == 2


def test_legacy_linear1_linear2_file_loads(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(2)
    dim = 32

    def legacy() -> dict[str, torch.Tensor]:
        return {
            "linear1.weight": torch.randn(2 * dim, dim, generator=generator),
            "linear1.bias": torch.randn(2 * dim, generator=generator),
            "linear2.weight": torch.randn(dim, 2 * dim, generator=generator),
            "linear2.bias": torch.randn(dim, generator=generator),
        }

    k_state, v_state = legacy(), legacy()
    path = tmp_path / "old.pt"
    torch.save({dim: (k_state, v_state)}, path)
    hn = load_hypernetwork(path)
    k_module, v_module = hn.pair(dim)
    x = torch.randn(2, 5, dim, generator=generator)
    for module, state in ((k_module, k_state), (v_module, v_state)):
        expected = (
            x
            + (x @ state["linear1.weight"].T + state["linear1.bias"]) @ state["linear2.weight"].T
            + state["linear2.bias"]
        )
        torch.testing.assert_close(module(x, 1.0), expected, rtol=1e-5, atol=1e-4)
    assert hn.activate_output is True and hn.activation is None


def test_sequential_layout_matches_a1111_indices() -> None:
    module = HypernetworkModule(
        8, [1, 2, 2, 1], "relu", layer_norm=True, dropout_structure=[0, 0.3, 0.3, 0], activate_output=False
    )
    kinds = [type(m).__name__ for m in module.linear]
    assert kinds == [
        "Linear",
        "ReLU",
        "LayerNorm",
        "Dropout",
        "Linear",
        "ReLU",
        "LayerNorm",
        "Dropout",
        "Linear",
        "LayerNorm",
    ]
    plain = HypernetworkModule(8, [1, 2, 1], "swish", activate_output=True)
    assert [type(m).__name__ for m in plain.linear] == ["Linear", "Hardswish", "Linear", "Hardswish"]
    assert list(HypernetworkModule(8, [1, 2, 1], "linear").state_dict()) == [
        "linear.0.weight",
        "linear.0.bias",
        "linear.1.weight",
        "linear.1.bias",
    ]


def _random_hypernetwork(dims, seed: int = 3, **kwargs) -> Hypernetwork:
    torch.manual_seed(seed)
    hn = Hypernetwork("ours", dims, layer_structure=[1, 1.5, 1], activation="elu", layer_norm=True, **kwargs)
    with torch.no_grad():
        for parameter in hn.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return hn.eval()


def test_saved_and_reloaded_gives_identical_outputs(tmp_path: Path, sd1_bundle, run_unet) -> None:
    unet = sd1_bundle.unet
    base = run_unet(unet)
    hn = _random_hypernetwork(context_widths(unet), dropout_structure=[0, 0.2, 0])
    hn.step = 7
    path = save_hypernetwork(hn, tmp_path / "out.pt", dtype="fp32")
    raw = torch.load(path, weights_only=True)
    for key in (
        "layer_structure",
        "activation_func",
        "is_layer_norm",
        "weight_initialization",
        "use_dropout",
        "dropout_structure",
        "last_layer_dropout",
        "activate_output",
        "step",
        "name",
        "sd_checkpoint",
        "sd_checkpoint_name",
    ):
        assert key in raw
    assert set(k for k in raw if isinstance(k, int)) == {32, 64}
    assert raw["use_dropout"] is True and raw["step"] == 7
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    reloaded = load_hypernetwork(path)
    outputs = []
    for network in (hn, reloaded):
        hooks = apply_hypernetworks(unet, [(network, 0.8)])
        outputs.append(run_unet(unet))
        hooks.remove()
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], base)
    assert torch.equal(run_unet(unet), base)  # removing the hooks restores the model exactly


def test_strength_zero_is_bit_for_bit_base(sd1_bundle, run_unet) -> None:
    unet = sd1_bundle.unet
    base = run_unet(unet)
    hn = _random_hypernetwork(context_widths(unet))
    hooks = apply_hypernetworks(unet, [(hn, 0.0)])
    assert torch.equal(run_unet(unet), base)
    hooks.remove()
    hooks = apply_hypernetworks(unet, [(hn, 1.0)])
    assert not torch.allclose(run_unet(unet), base)
    hooks.remove()


def test_networks_chain_in_order() -> None:
    first, second = _random_hypernetwork([16], seed=4), _random_hypernetwork([16], seed=5)
    attention = torch.nn.Module()
    attention.to_k, attention.to_v = torch.nn.Identity(), torch.nn.Identity()
    holder = torch.nn.Module()
    holder.attn = attention
    hooks = apply_hypernetworks(holder, [(first, 0.5), (second, 2.0)])
    x = torch.randn(1, 3, 16)
    expected = second.pair(16)[0](first.pair(16)[0](x, 0.5), 2.0)
    torch.testing.assert_close(attention.to_k(x), expected)
    hooks.remove()
    assert torch.equal(attention.to_k(x), x)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({768: evil}, handle)
    torch.save({768: evil, "name": "x"}, tmp_path / "evil2.pt")
    for candidate in (path, tmp_path / "evil2.pt"):
        with pytest.raises(UnsafeFileError, match=candidate.name):
            load_hypernetwork(candidate)
    assert not marker.exists()


def test_not_a_hypernetwork_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "emb.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}}, path)
    with pytest.raises(ModelFormatError, match="no hypernetwork layers"):
        load_hypernetwork(path)
    bad = tmp_path / "bad.pt"
    torch.save({32: ({"linear.0.weight": torch.zeros(3, 3)}, {}), "layer_structure": [1, 2, 1]}, bad)
    with pytest.raises(ModelFormatError, match=r"bad\.pt"):
        load_hypernetwork(bad)


def test_handler_applies_and_undoes(tmp_path: Path, sd1_bundle, run_unet) -> None:
    unet = sd1_bundle.unet
    base = run_unet(unet)
    folder = tmp_path / "hypernetworks" / "sub"
    hn = _random_hypernetwork([32, 64])
    save_hypernetwork(hn, folder / "style.pt")
    handler = HypernetworkHandler(tmp_path / "hypernetworks")
    activation = handler.activate(sd1_bundle, [NetworkRef("hypernet", "style", (0.6,))], "a cat", "")
    assert activation.prompt == "a cat" and "style" in activation.info["Hypernet hashes"]
    styled = run_unet(unet)
    activation.undo()
    assert torch.equal(run_unet(unet), base)
    hooks = apply_hypernetworks(unet, [(load_hypernetwork(folder / "style.pt"), 0.6)])
    assert torch.equal(run_unet(unet), styled)
    hooks.remove()
    (tmp_path / "hypernetworks" / "style-state" / "step-1").mkdir(parents=True)
    torch.save({}, tmp_path / "hypernetworks" / "style-state" / "step-1" / "optimizer.pt")
    assert [p.stem for p in handler.available()] == ["style"]
    with pytest.raises(NetworkMismatchError, match="missing"):
        handler.activate(sd1_bundle, [NetworkRef("hypernet", "missing")], "", "")
    save_hypernetwork(_random_hypernetwork([768]), folder / "sd1real.pt")
    with pytest.raises(NetworkMismatchError, match="match no attention layer"):
        handler.activate(sd1_bundle, [NetworkRef("hypernet", "sd1real")], "", "")


def test_dict_round_trip_keeps_structure() -> None:
    hn = _random_hypernetwork([8], activate_output=True, weight_init="xavier-normal")
    data = hypernetwork_to_dict(hn, dtype="fp16")
    assert data[8][0]["linear.0.weight"].dtype == torch.float16
    assert data["weight_initialization"] == "XavierNormal" and data["activate_output"] is True
    assert data["activation_func"] == "elu" and data["layer_structure"] == [1.0, 1.5, 1.0]


@pytest.mark.parametrize(
    ("layers", "dropout", "expected"),
    [((1, 2, 1), (0, 0.1, 0), True), ((1, 2, 1), (0, 0, 0), False), ((1, 2, 2, 1), (0, 0.3, 0, 0), False)],
)
def test_last_layer_dropout_is_written_from_the_dropout_structure(
    layers: tuple[float, ...], dropout: tuple[float, ...], expected: bool
) -> None:
    """A1111 writes ``last_layer_dropout = dropout_structure[-2] != 0``: a reader without
    ``dropout_structure`` support then rebuilds the same Dropout slots (and ``linear.N`` keys)."""
    hn = Hypernetwork("x", [8], layer_structure=layers, dropout_structure=dropout)
    data = hypernetwork_to_dict(hn)
    assert data["last_layer_dropout"] is expected
    assert data["use_dropout"] is any(dropout) and data["dropout_structure"] == [float(p) for p in dropout]


@pytest.mark.parametrize(("family", "widths"), [("sd2", [32, 64]), ("sdxl", [64, 96])])
def test_other_families_get_a_module_per_width(family: str, widths: list[int]) -> None:
    from sdcore.models.tiny import create_tiny_bundle

    bundle = create_tiny_bundle(family)
    unet = bundle.unet
    assert context_widths(unet) == widths  # SDXL's cross-attention width is the concatenated text width
    hn = _random_hypernetwork(widths)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 8, unet.config.cross_attention_dim, generator=generator)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 64), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad():
        base = unet(sample, torch.tensor([10]), encoder_hidden_states=context, **kwargs).sample
        hooks = apply_hypernetworks(unet, [(hn, 1.0)])
        styled = unet(sample, torch.tensor([10]), encoder_hidden_states=context, **kwargs).sample
        hooks.remove()
        again = unet(sample, torch.tensor([10]), encoder_hidden_states=context, **kwargs).sample
    assert not torch.allclose(base, styled) and torch.equal(base, again)


@pytest.mark.parametrize("init", ["normal", "xavier-uniform", "xavier-normal", "kaiming-uniform", "kaiming-normal"])
def test_new_layer_norms_start_near_zero_whatever_the_init(init: str) -> None:
    """A1111 draws LayerNorm weights from N(0, 0.01) for every weight init (not only Normal); the
    init choice applies to the Linear weights. With PyTorch's LayerNorm default (weight 1) a
    Xavier/Kaiming network with layer norm would start far from the identity."""
    torch.manual_seed(0)
    module = HypernetworkModule(64, (1, 2, 1), "relu", layer_norm=True, weight_init=init)
    norms = [layer for layer in module.linear if isinstance(layer, torch.nn.LayerNorm)]
    linears = [layer for layer in module.linear if isinstance(layer, torch.nn.Linear)]
    assert len(norms) == 2 and len(linears) == 2
    for norm in norms:
        assert abs(norm.weight.std().item() - 0.01) < 0.003 and norm.weight.abs().max().item() < 0.06
        assert torch.count_nonzero(norm.bias).item() == 0
    first = linears[0].weight
    if init == "normal":
        assert abs(first.std().item() - 0.01) < 0.002
    else:  # Xavier / Kaiming scale with the fan, far above 0.01 at width 64
        assert first.std().item() > 0.05
    x = torch.randn(3, 5, 64)
    assert (module(x) - x).abs().max().item() < 0.1  # the last LayerNorm keeps the residual small

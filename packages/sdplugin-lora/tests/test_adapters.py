"""One adapter per algorithm: forward == merged weight, exact unmerge, file round trip, formulas."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from sdplugin_lora.adapters import (
    GloraAdapter,
    LohaAdapter,
    LokrAdapter,
    LoraAdapter,
    OftAdapter,
    adapter_from_tensors,
    effective_delta,
    variant_of,
)
from torch import nn


def _randomise(adapter, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if name == "dora_scale":
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=g))
            else:
                param.copy_(torch.randn(param.shape, generator=g) * std)
    return adapter


def _layer(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(12, 10)
    if kind == "conv1x1":
        return nn.Conv2d(8, 6, 1)
    if kind == "conv3x3-dilated":  # the kernel-holding factor must take the layer's stride, padding and dilation
        return nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2)
    return nn.Conv2d(8, 6, 3, padding=1)


def _input(layer):
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 5, layer.in_features)
    return torch.randn(2, layer.in_channels, 7, 7)


CASES = [
    ("lora", "linear", {}),
    ("lora", "conv1x1", {}),
    ("lora", "conv3x3", {}),
    ("lora", "conv3x3", {"tucker": True}),
    ("lora", "conv3x3-dilated", {}),
    ("lora", "conv3x3-dilated", {"tucker": True}),
    ("dora", "linear", {"dora": True}),
    ("dora", "conv3x3", {"dora": True}),
    ("dora", "conv3x3", {"dora": True, "tucker": True}),
    ("loha", "linear", {}),
    ("loha", "conv3x3", {}),
    ("loha", "conv3x3", {"tucker": True}),
    ("lokr", "linear", {}),
    ("lokr", "conv3x3", {}),
    ("lokr", "conv3x3", {"tucker": True}),
    ("lokr-full", "linear", {}),
    ("oft", "linear", {}),
    ("oft", "conv3x3", {}),
    ("glora", "linear", {}),
    ("glora", "conv3x3", {}),
    ("glora", "conv3x3-dilated", {}),
]


def _make(algo, layer, extra):
    if algo in ("lora", "dora"):
        return LoraAdapter("m", layer, 3, 1.5, **extra)
    if algo == "loha":
        return LohaAdapter("m", layer, 3, 1.5, **extra)
    if algo == "lokr":
        return LokrAdapter("m", layer, 1, 0.5, factor=2, **extra)
    if algo == "oft":
        return OftAdapter("m", layer, 2, 1.0, **extra)
    if algo == "glora":
        return GloraAdapter("m", layer, 3, 1.5, **extra)
    return LokrAdapter("m", layer, 8, 0.5, factor=2, **extra)  # rank >= half of w2: full matrices


@pytest.mark.parametrize(("algo", "kind", "extra"), CASES)
def test_forward_equals_merged_weight_and_unmerge_is_exact(algo, kind, extra):
    layer = _layer(kind)
    adapter = _make(algo, layer, extra)
    assert float(adapter.delta_weight().abs().max()) < 1e-6, "a new adapter starts as the identity"
    _randomise(adapter)
    if extra.get("tucker"):
        assert adapter.is_tucker
    assert float(adapter.delta_weight().abs().max()) > 1e-3
    x = _input(layer)
    base_out = layer(x).detach()
    adapter.multiplier = 0.7
    adapter.eval()
    adapter.attach()
    hooked = layer(x).detach()
    adapter.detach()
    assert torch.equal(layer(x).detach(), base_out)
    before = layer.weight.detach().clone()
    backup = adapter.merge(0.7)
    merged = layer(x).detach()
    torch.testing.assert_close(hooked, merged, atol=2e-5, rtol=1e-5)
    assert (merged - base_out).abs().max() > 1e-3
    adapter.unmerge(backup)
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize(("algo", "kind", "extra"), CASES)
def test_file_tensors_rebuild_the_same_adapter(algo, kind, extra):
    layer = _layer(kind)
    adapter = _randomise(_make(algo, layer, extra), seed=1)
    state = adapter.state_dict()
    assert variant_of(state) is adapter.variant
    rebuilt = adapter_from_tensors("m", layer, state)
    assert type(rebuilt) is type(adapter)
    torch.testing.assert_close(rebuilt.delta_weight(), adapter.delta_weight())
    torch.testing.assert_close(effective_delta(layer, state, 0.5), 0.5 * adapter.delta_weight())
    rebuilt.freeze()
    x = _input(layer)
    rebuilt.attach()
    frozen_out = layer(x)
    rebuilt.detach()
    adapter.eval()
    adapter.attach()
    torch.testing.assert_close(frozen_out, layer(x), atol=1e-5, rtol=1e-5)
    adapter.detach()


def test_tucker_formulas_written_out():
    """LyCORIS' Tucker definitions, summed element by element (not with einsum)."""
    layer = _layer("conv3x3")
    r = 2
    lora = _randomise(LoraAdapter("m", layer, r, 2.0, tucker=True), seed=3)
    down = lora.lora_down.weight.detach()[:, :, 0, 0]  # [r, in]
    up = lora.lora_up.weight.detach()[:, :, 0, 0]  # [out, r]
    mid = lora.lora_mid.weight.detach()  # [r, r, 3, 3]
    want = torch.zeros(6, 8, 3, 3)
    for i, j, m, n in itertools.product(range(6), range(8), range(r), range(r)):
        want[i, j] += mid[m, n] * up[i, m] * down[n, j]
    torch.testing.assert_close(lora.delta_weight(), want, atol=1e-5, rtol=1e-5)

    loha = _randomise(LohaAdapter("m", layer, r, 1.0, tucker=True), seed=4)
    p = {k: v.detach() for k, v in loha.named_parameters()}

    def part(t, wa, wb):
        out = torch.zeros(6, 8, 3, 3)
        for i, j, m, n in itertools.product(range(6), range(8), range(r), range(r)):
            out[i, j] += t[m, n] * wa[m, i] * wb[n, j]
        return out

    want = part(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * part(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    torch.testing.assert_close(loha.delta_weight(), want * (1.0 / r), atol=1e-5, rtol=1e-5)


def test_lokr_kron_and_scale_rules():
    layer = _layer("linear")
    lokr = _randomise(LokrAdapter("m", layer, 1, 0.5, factor=2), seed=5)
    p = {k: v.detach() for k, v in lokr.named_parameters()}
    w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    want = torch.zeros(10, 12)  # kron written out: block (a, c) = w1[a, c] * w2
    for a, c in itertools.product(range(p["lokr_w1"].shape[0]), range(p["lokr_w1"].shape[1])):
        want[a * w2.shape[0] : (a + 1) * w2.shape[0], c * w2.shape[1] : (c + 1) * w2.shape[1]] = p["lokr_w1"][a, c] * w2
    torch.testing.assert_close(lokr.delta_weight(), want * 0.5, atol=1e-6, rtol=1e-6)
    full = LokrAdapter("m", layer, 8, 0.5, factor=2)
    assert full.full_matrix and full.scale == 1.0, "both factors full: scale 1 whatever alpha says"


def test_rank_dropout_and_dropout_only_while_training():
    layer = _layer("linear")
    adapter = _randomise(LoraAdapter("m", layer, 4, 4.0, dropout=0.5, rank_dropout=0.5))
    x = _input(layer)
    adapter.eval()
    torch.testing.assert_close(adapter.delta(x), F.linear(x, adapter.delta_weight()), atol=1e-5, rtol=1e-5)
    assert torch.equal(adapter.delta(x), adapter.delta(x))
    adapter.train()
    torch.manual_seed(0)
    assert not torch.equal(adapter.delta(x), adapter.delta(x))

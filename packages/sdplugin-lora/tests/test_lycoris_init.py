"""Training starts where LyCORIS starts: LoHa / LoKr / DoRA initial tensors, scale and magnitude.

The references are written here from LyCORIS' documented init (``lycoris/modules/{loha,lokr,locon}.py``,
lycoris-lora 4.1.3): LoHa ``w1_b, w2_b ~ N(0, 1)``, ``w1_a ~ N(0, 0.1²)``, ``w2_a = 0`` (Tucker cores
``~ N(0, 0.1²)``), drawn in the order t1, t2, w1_b, w1_a, w2_b; LoKr ``w2`` (or ``w2_a``
kaiming-uniform, ``w2_b = 0``) first, then ``w1`` kaiming-uniform, scale 1 when both factors are
full; DoRA's magnitude ``‖W‖`` and the change 0 at the start. Same torch seed, same tensors: a user
who moves from LyCORIS starts from the very same point. ``benchmarks/bench_lycoris.py`` compares
against the installed LyCORIS itself (init, forward, gradients, one AdamW step).
"""

from __future__ import annotations

import math

import pytest
import torch
from sdplugin_lora.adapters import LohaAdapter, LokrAdapter, LoraAdapter, factorization
from torch import nn


def _kaiming(*shape: int) -> torch.Tensor:
    t = torch.empty(*shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_init_is_lycoris_draw_for_draw(tucker):
    layer = nn.Conv2d(8, 6, 3, padding=1)
    torch.manual_seed(3)
    loha = LohaAdapter("m", layer, 4, 2.0, tucker=tucker)
    torch.manual_seed(3)
    want = {}
    if tucker:  # w_a [r, out], w_b [r, in], t [r, r, k, k]
        want["hada_t1"] = torch.empty(4, 4, 3, 3).normal_(std=0.1)
        want["hada_t2"] = torch.empty(4, 4, 3, 3).normal_(std=0.1)
        a_shape, b_in = (4, 6), 8
    else:  # flattened conv: w_a [out, r], w_b [r, in·k·k]
        a_shape, b_in = (6, 4), 8 * 9
    want["hada_w1_b"] = torch.empty(4, b_in).normal_(std=1.0)
    want["hada_w1_a"] = torch.empty(*a_shape).normal_(std=0.1)
    want["hada_w2_b"] = torch.empty(4, b_in).normal_(std=1.0)
    want["hada_w2_a"] = torch.zeros(*a_shape)
    got = dict(loha.named_parameters())
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key].detach(), value, rtol=0, atol=0, msg=key)
    assert loha.scale == 0.5
    assert float(loha.delta_weight().abs().max()) == 0.0


def test_loha_init_distributions():
    """The documented std values themselves (not just the draw order): 0.1 and 1, w2_a zero."""
    torch.manual_seed(0)
    loha = LohaAdapter("m", nn.Linear(320, 640), 16, 8.0)
    p = {k: v.detach() for k, v in loha.named_parameters()}
    assert abs(float(p["hada_w1_a"].std()) - 0.1) < 0.005
    assert abs(float(p["hada_w1_b"].std()) - 1.0) < 0.05
    assert abs(float(p["hada_w2_b"].std()) - 1.0) < 0.05
    assert float(p["hada_w2_a"].abs().max()) == 0.0


@pytest.mark.parametrize(
    ("shape", "rank", "factor", "tucker", "full"),
    [
        ((640, 320), 4, -1, False, False),  # w2 factored: w2_a kaiming, w2_b zeros
        ((32, 32), 8, -1, False, True),  # the toy world's layers at rank 8: full w2, scale 1
        ((64, 32, 3, 3), 2, 4, True, False),  # Tucker conv: t2 and w2_a kaiming, w2_b zeros
        ((64, 32, 3, 3), 2, 4, False, False),  # flattened conv: w2_b [r, in_n·k·k]
    ],
)
def test_lokr_init_is_lycoris_draw_for_draw(shape, rank, factor, tucker, full):
    out, inp, *kernel = shape
    layer = nn.Linear(inp, out) if not kernel else nn.Conv2d(inp, out, kernel[0], padding=1)
    torch.manual_seed(5)
    lokr = LokrAdapter("m", layer, rank, 1.0, factor=factor, tucker=tucker)
    (out_m, out_n), (in_m, in_n) = factorization(out, factor), factorization(inp, factor)
    torch.manual_seed(5)
    want: dict[str, torch.Tensor] = {}
    if full:
        want["lokr_w2"] = torch.zeros(out_n, in_n, *kernel)
    elif tucker:
        want["lokr_t2"] = _kaiming(rank, rank, *kernel)
        want["lokr_w2_a"] = _kaiming(rank, out_n)
        want["lokr_w2_b"] = torch.zeros(rank, in_n)
    else:
        want["lokr_w2_a"] = _kaiming(out_n, rank)
        want["lokr_w2_b"] = torch.zeros(rank, in_n * math.prod(kernel))
    want["lokr_w1"] = _kaiming(out_m, in_m)
    got = dict(lokr.named_parameters())
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key].detach(), value, rtol=0, atol=0, msg=key)
    # LyCORIS: alpha/rank, except when both factors are full matrices (scale 1 whatever alpha says)
    assert lokr.scale == (1.0 if full else 1.0 / rank)
    assert float(lokr.delta_weight().abs().max()) == 0.0


def test_dora_starts_at_identity_with_a_trained_magnitude_and_a_live_norm():
    """DoRA's magnitude is ``‖W‖`` per input channel (sdcore's files; LyCORIS ``wd_on_out=False``), it
    is a trained parameter, and the norm of ``W + ΔW`` is differentiated (not detached), as in LyCORIS."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    dora = LoraAdapter("m", layer, 4, 2.0, dora=True)
    assert dora.dora_scale is not None and dora.dora_scale.requires_grad
    torch.testing.assert_close(dora.dora_scale.detach(), layer.weight.detach().norm(dim=0, keepdim=True))
    assert float(dora.delta_weight().abs().max()) < 1e-6  # identity at the start
    with torch.no_grad():
        dora.lora_up.weight.normal_(std=0.1)
    w = layer.weight.detach()
    up, down = dora.lora_up.weight.detach().clone().requires_grad_(), dora.lora_down.weight.detach()
    m = dora.dora_scale.detach().clone().requires_grad_()
    merged = w + up @ down * 0.5  # independent DoRA: m · (W + sΔW) / ‖W + sΔW‖ per input channel
    want = m * merged / merged.norm(dim=0, keepdim=True) - w
    g = torch.randn(10, 12)
    (want * g).sum().backward()
    (dora.delta_weight(detach=False) * g).sum().backward()
    torch.testing.assert_close(dora.lora_up.weight.grad, up.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dora.dora_scale.grad, m.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora"])
def test_rank_dropout_drops_output_rows_of_the_change_as_lycoris(algo):
    """LyCORIS' LoHa/LoKr/DoRA rank dropout: each output row of the scaled ``ΔW`` is kept when
    ``rand(out) > p`` (one CPU draw per forward, no rescaling), before DoRA's decomposition;
    nothing is dropped in eval mode. (Before, sdcore ignored ``--rank-dropout`` for these.)"""
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    if algo == "loha":
        adapter = LohaAdapter("m", layer, 4, 2.0, rank_dropout=0.5)
    elif algo == "lokr":
        adapter = LokrAdapter("m", layer, 1, 0.5, factor=2, rank_dropout=0.5)
    else:
        adapter = LoraAdapter("m", layer, 4, 2.0, dora=True, rank_dropout=0.5)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if name != "dora_scale":
                param.normal_(std=0.3)
    x = torch.randn(3, 12)
    w = layer.weight.detach()
    p = {k: v.detach() for k, v in adapter.named_parameters()}
    if algo == "loha":
        change = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * 0.5
    elif algo == "lokr":
        change = torch.kron(p["lokr_w1"], p["lokr_w2_a"] @ p["lokr_w2_b"]) * 0.5
    else:
        change = p["lora_up.weight"] @ p["lora_down.weight"] * 0.5
    adapter.train()
    torch.manual_seed(42)
    got = adapter.delta(x).detach()
    torch.manual_seed(42)
    keep = (torch.rand(10) > 0.5).float()
    assert 0 < int(keep.sum()) < 10  # the seed drops some rows and keeps some
    dropped = change * keep[:, None]
    if algo == "dora":  # magnitude · (W + ΔW') / ‖W + ΔW'‖ per input channel, minus W
        merged = w + dropped
        dropped = p["dora_scale"] * merged / merged.norm(dim=0, keepdim=True) - w
    torch.testing.assert_close(got, x @ dropped.T, atol=1e-5, rtol=1e-5)
    adapter.eval()
    torch.testing.assert_close(adapter.delta(x).detach(), x @ adapter.delta_weight().T, atol=1e-5, rtol=1e-5)

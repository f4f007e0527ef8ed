"""Per-sample network strengths: kohya's per-dataset ``network_multiplier`` (slider LoRAs).

kohya (sd-scripts v0.8.2 to v0.9.1, ``train_network.py``) reads ``batch["network_multipliers"]`` (the
dataset's ``network_multiplier`` for every sample) and calls ``network.set_multiplier(m)``; its LoRA
forward is ``org(x) + lora_up(lora_down(x)) * multiplier * scale``. A batch of sample ``b`` at strength
``s_b`` must therefore give, row by row, the forward of the whole network at multiplier ``s_b``; the
references below are exactly those separate forwards (the adapters' own global multiplier, which
``test_max_norm_multiplier.py`` checks against the written-out formula).
"""

from __future__ import annotations

import pytest
import torch
from sdplugin_lora.adapters import LohaAdapter, LokrAdapter, LoraAdapter, OftAdapter, SharedDownLora
from sdplugin_lora.network import LoraNetwork

STRENGTHS = (1.0, -1.0, 0.5)


def _randomise(adapter: torch.nn.Module, seed: int) -> None:
    """Non-zero factors, so every algorithm changes the layer (DoRA: a magnitude away from ||W||)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if name == "dora_scale":
                param.mul_(1.0 + 0.2 * noise.abs())
            else:
                param.copy_(noise * 0.2)


def _linear() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Linear(12, 8), torch.randn(len(STRENGTHS), 5, 12)


def _conv(kernel: int = 3) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    return torch.nn.Conv2d(4, 8, kernel, padding=kernel // 2), torch.randn(len(STRENGTHS), 4, 6, 6)


#: (layer maker, adapter class, rank, alpha, keyword arguments) per algorithm and layer kind
_SPECS = {
    "lora": (_linear, LoraAdapter, 3, 1.5, {}),
    "locon_3x3": (_conv, LoraAdapter, 3, 1.5, {}),
    "locon_tucker": (_conv, LoraAdapter, 3, 2.0, {"tucker": True}),
    "dora": (_linear, LoraAdapter, 3, 1.5, {"dora": True}),
    "dora_conv": (_conv, LoraAdapter, 2, 1.0, {"dora": True}),
    "loha": (_linear, LohaAdapter, 2, 1.0, {}),
    "loha_conv": (_conv, LohaAdapter, 2, 1.0, {}),
    "lokr": (_linear, LokrAdapter, 2, 1.0, {"factor": 2}),
    "lokr_conv": (_conv, LokrAdapter, 2, 1.0, {"factor": 2}),
    "oft": (_linear, OftAdapter, 4, 1e-3, {}),
    "oft_conv": (lambda: _conv(1), OftAdapter, 2, 1e-3, {}),
}


def _case(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    make, cls, rank, alpha, kwargs = _SPECS[name]
    base, x = make()
    return cls("m", base, rank, alpha, **kwargs), x


def _separate(base: torch.nn.Module, adapter: torch.nn.Module, x: torch.Tensor, multiplier: float) -> torch.Tensor:
    """Each sample alone, through the adapter at the run-wide multiplier ``multiplier * s_b``."""
    rows = []
    for b, strength in enumerate(STRENGTHS):
        adapter.multiplier = multiplier * strength
        rows.append(base(x[b : b + 1]))
    adapter.multiplier = multiplier
    return torch.cat(rows)


@pytest.mark.parametrize("multiplier", [1.0, 0.8])
@pytest.mark.parametrize("case", sorted(_SPECS))
def test_per_sample_strengths_equal_separate_forwards(case, multiplier):
    adapter, x = _case(case)
    base = adapter.base
    _randomise(adapter, 7)
    adapter.multiplier = multiplier
    adapter.attach()
    try:
        plain = base(x)
        adapter.sample_strength = torch.tensor(STRENGTHS)
        got = base(x)
        adapter.sample_strength = None
        want = _separate(base, adapter, x, multiplier)
        assert torch.equal(base(x), plain)  # strengths gone: the usual forward again
    finally:
        adapter.detach()
    unadapted = base(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the strengths did something: the -1 and 0.5 rows move the other way / half as far
    change = (plain - unadapted).abs().amax()
    assert change > 1e-3
    torch.testing.assert_close(got[1] - unadapted[1], -(plain[1] - unadapted[1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2] - unadapted[2], 0.5 * (plain[2] - unadapted[2]), rtol=1e-5, atol=1e-6)


def test_shared_down_lora_scales_each_member_per_sample():
    """SD3/Flux's fused q/k/v LoRA (one down shared by the members) gets the same per-sample rule."""
    torch.manual_seed(2)
    q, k = torch.nn.Linear(6, 4), torch.nn.Linear(6, 3)
    adapter = SharedDownLora("qkv", [("q", q), ("k", k)], 2, 1.0)
    _randomise(adapter, 3)
    x = torch.randn(len(STRENGTHS), 5, 6)
    adapter.attach()
    try:
        adapter.sample_strength = torch.tensor(STRENGTHS)
        got = (q(x), k(x))
        adapter.sample_strength = None
        want = []
        for layer in (q, k):
            rows = []
            for b, strength in enumerate(STRENGTHS):
                adapter.multiplier = strength
                rows.append(layer(x[b : b + 1]))
            adapter.multiplier = 1.0
            want.append(torch.cat(rows))
    finally:
        adapter.detach()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0][0], got[0][1])


@pytest.mark.parametrize("case", ["lora", "loha", "dora"])
def test_per_sample_gradients_are_the_sum_of_the_separate_ones(case):
    """Training sees the same thing: the batch's gradient is the sum of each sample's gradient at its
    own multiplier."""
    adapter, x = _case(case)
    base = adapter.base
    _randomise(adapter, 11)
    weights = torch.randn(base(x).shape, generator=torch.Generator().manual_seed(4))
    adapter.attach()
    try:
        adapter.sample_strength = torch.tensor(STRENGTHS)
        (base(x) * weights).sum().backward()
        adapter.sample_strength = None
        together = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
        adapter.zero_grad()
        for b, strength in enumerate(STRENGTHS):
            adapter.multiplier = strength
            (base(x[b : b + 1]) * weights[b : b + 1]).sum().backward()
        adapter.multiplier = 1.0
        separate = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
    finally:
        adapter.detach()
    assert together.keys() == separate.keys() and together
    for name in together:
        torch.testing.assert_close(together[name], separate[name], rtol=1e-4, atol=1e-6)


def test_text_encoder_chunk_rows_repeat_each_strength():
    """The text encoders see a prompt's 77-token chunks as consecutive rows ([B, k, 77] reshaped):
    each strength covers its prompt's ``k`` rows; a row count that is no multiple is an error."""
    adapter, _ = _case("lora")
    base = adapter.base
    _randomise(adapter, 5)
    x = torch.randn(2 * len(STRENGTHS), 4, 12)
    adapter.attach()
    try:
        adapter.sample_strength = torch.tensor(STRENGTHS)
        got = base(x)
        adapter.sample_strength = None
        rows = []
        for b in range(x.shape[0]):
            adapter.multiplier = STRENGTHS[b // 2]
            rows.append(base(x[b : b + 1]))
        adapter.multiplier = 1.0
        adapter.sample_strength = torch.tensor(STRENGTHS)
        with pytest.raises(RuntimeError, match="3 per-sample strengths do not fit an input of 4 rows"):
            base(x[:4])
    finally:
        adapter.sample_strength = None
        adapter.detach()
    torch.testing.assert_close(got, torch.cat(rows), rtol=1e-5, atol=1e-6)


def test_network_context_sets_and_restores_every_module():
    modules = [_case("lora")[0], _case("loha")[0]]
    modules[0].lora_name, modules[1].lora_name = "a", "b"
    network = LoraNetwork(modules)
    outer, inner = torch.tensor([1.0, -1.0]), torch.tensor([0.5, 2.0])
    with network.sample_strengths(outer):
        assert all(m.sample_strength is outer for m in network)
        with network.sample_strengths(inner):
            assert all(m.sample_strength is inner for m in network)
        assert all(m.sample_strength is outer for m in network)
    assert all(m.sample_strength is None for m in network)

"""``--lora-input-dropout``: PEFT's ``lora_dropout`` (diffusers' and SimpleTuner's LoRAs), checked number for number
against PEFT's own layer (``peft.tuners.lora.layer.Linear.forward``: ``result + lora_B(lora_A(dropout(x))) *
scaling``) holding the same weights, with torch's global generator at the same seed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


class _Attention(torch.nn.Module):
    """Three projections reading one input, as diffusers' ``to_q``/``to_k``/``to_v`` (or one fused ``to_qkv``)."""

    def __init__(self, names: tuple[str, ...], width: int = 8, rows: int = 6) -> None:
        super().__init__()
        self.names = names
        for name in names:
            setattr(self, name, torch.nn.Linear(width, rows * (3 if len(names) == 1 else 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, name)(x) for name in self.names], dim=-1)


def _peft(base: _Attention, rank: int, alpha: float, p: float) -> _Attention:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=p, target_modules=list(base.names))
    return inject_adapter_in_model(config, base)  # type: ignore[no-any-return]


def _random_up(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator))


def _same_run(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor, seed: int) -> None:
    """Forward and backward of both at one seed: outputs and the input's gradient agree up to float rounding (the
    same mask, the same products, summed in another order: an AMD EPYC CPU left 7e-6 on a gradient of about 3; a
    mask drawn differently moves them by O(1))."""
    results = []
    for model in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(seed)
        out = model(xi)
        (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        results.append((out.detach(), xi.grad))
    (out_a, grad_a), (out_b, grad_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-5, atol=1e-5)


def test_each_module_draws_its_own_mask_as_peft_on_separate_projections():
    """sdcore's LoRA per diffusers module (SimpleTuner's to_q/to_k/to_v, --split-qkv on SD3/Flux, every UNet
    attention) against PEFT's: the same numbers while training, a mask that actually drops (the result differs
    from the one without dropout), and no dropout in eval mode."""
    import copy

    from sdplugin_lora.adapters import LoraAdapter
    from sdplugin_lora.network import LoraNetwork

    torch.manual_seed(0)
    base = _Attention(("to_q", "to_k", "to_v"))
    theirs = _peft(copy.deepcopy(base), rank=4, alpha=2.0, p=0.3)
    modules = [LoraAdapter(n, getattr(base, n), 4, 2.0, input_dropout=0.3) for n in base.names]
    for i, (name, module) in enumerate(zip(base.names, modules, strict=True)):
        _random_up(module.lora_up, i)
        layer = getattr(theirs, name)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(module.lora_down.weight)
            layer.lora_B["default"].weight.copy_(module.lora_up.weight)
    network = LoraNetwork(modules).attach()
    network.train()
    theirs.train()
    x = torch.randn(2, 5, 8)
    _same_run(base, theirs, x, seed=3)

    torch.manual_seed(3)
    dropped = base(x)
    for module in modules:
        module.input_dropout = None
    assert not torch.allclose(dropped, base(x))  # the mask changed the LoRA's output
    for module in modules:
        module.input_dropout = 0.3
    network.eval()
    theirs.eval()
    torch.testing.assert_close(base(x), theirs(x), rtol=1e-6, atol=1e-6)
    torch.manual_seed(9)
    first = base(x)
    assert torch.equal(first, base(x))  # eval: no draw at all


def test_a_fused_module_draws_one_mask_for_its_members_as_peft_on_to_qkv():
    """sdcore's shared-down LoRA (kohya's one module over SD3/Flux's fused qkv) reads the members' one input
    through one mask, as PEFT's one module on a fused ``to_qkv`` (SimpleTuner with fuse_qkv_projections)."""
    import copy

    from sdplugin_lora.adapters import SharedDownLora
    from sdplugin_lora.network import LoraNetwork

    torch.manual_seed(1)
    split = _Attention(("to_q", "to_k", "to_v"))
    fused = _Attention(("to_qkv",))
    with torch.no_grad():
        fused.to_qkv.weight.copy_(torch.cat([getattr(split, n).weight for n in split.names]))
        fused.to_qkv.bias.copy_(torch.cat([getattr(split, n).bias for n in split.names]))
    theirs = _peft(copy.deepcopy(fused), rank=4, alpha=4.0, p=0.5)
    shared = SharedDownLora("qkv", [(n, getattr(split, n)) for n in split.names], 4, 4.0, input_dropout=0.5)
    _random_up(shared.lora_up, 7)
    with torch.no_grad():
        theirs.to_qkv.lora_A["default"].weight.copy_(shared.lora_down.weight)
        theirs.to_qkv.lora_B["default"].weight.copy_(shared.lora_up.weight)
    network = LoraNetwork([shared]).attach()
    network.train()
    theirs.train()
    _same_run(split, theirs, torch.randn(3, 8), seed=5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"algo": "loha"}, "not defined for --algo loha"),
        ({"algo": "lokr"}, "not defined for --algo lokr"),
        ({"algo": "dora"}, "not defined for --algo dora"),
        ({"rank_dropout": 0.1, "rank_dropout_scale": True}, "--rank-dropout-scale"),
        ({"lora_input_dropout": 1.0}, "--lora-input-dropout must be in [0, 1)"),
    ],
)
def test_refused_where_peft_does_not_define_it(extra, message):
    from sdcore.errors import ConfigError
    from sdplugin_lora.method import LoraMethod, LoraOptions

    values = {"rank": 2, "lora_input_dropout": 0.1, **extra}
    with pytest.raises(ConfigError) as info:
        LoraMethod(LoraOptions(**values)).validate()
    assert message in str(info.value)
    LoraMethod(LoraOptions(rank=2, lora_input_dropout=0.1, algo="locon")).validate()  # plain LoRA: accepted

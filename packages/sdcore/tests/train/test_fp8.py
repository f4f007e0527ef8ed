"""--fp8-base: frozen Linear/Conv2d weights stored as float8_e4m3fn, upcast per op."""

from __future__ import annotations

import copy

import pytest
import torch
from sdcore.train.fp8 import Fp8Conv2d, Fp8Linear, convert_to_fp8, fp8_element_counts, fp8_problem
from torch import nn

F8 = torch.float8_e4m3fn


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.SiLU(),
        nn.Flatten(2),  # (B, 8, 36)
        nn.Linear(36, 48),
        nn.GELU(),
        nn.LayerNorm(48),
        nn.Linear(48, 16),
    ).requires_grad_(False)


def _rounded(model: nn.Module) -> nn.Module:
    """The float path on fp8-rounded weights: the reference --fp8-base must equal exactly."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.data = m.weight.data.to(F8).to(m.weight.dtype)
    return ref


def _x(dtype=torch.float32):
    return torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_weights_take_one_byte_per_element():
    model = _model()
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    assert fp8_element_counts(model) == weights
    assert convert_to_fp8(model, torch.float32) == weights
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    assert before - after == weights * 3  # 4 bytes -> 1 byte per weight element; biases/norms unchanged
    assert isinstance(model[0], Fp8Conv2d) and isinstance(model[3], Fp8Linear)
    assert model[3].weight.dtype == F8 and model[3].bias.dtype == torch.float32
    assert model[5].weight.dtype == torch.float32  # LayerNorm is not converted
    assert "3.weight" in model.state_dict()  # names unchanged


def test_output_equals_the_float_path_on_rounded_weights_exactly_and_is_close_to_full_precision():
    model = _model()
    full = copy.deepcopy(model)
    ref = _rounded(model)
    convert_to_fp8(model, torch.float32)
    x = _x()
    out = model(x)
    assert torch.equal(out, ref(x))
    error = (out - full(x)).norm() / full(x).norm()
    assert 0 < error < 0.08, error  # e4m3 keeps 3 mantissa bits: a few percent
    # under bf16 autocast too (the op runs in bf16 from the fp8 storage)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, ref16 = model(x), ref(x)
    assert out16.dtype == torch.bfloat16 and torch.equal(out16, ref16)


def test_gradients_reach_the_input_and_an_adapter_not_the_base():
    model = _model()
    ref = _rounded(model)
    convert_to_fp8(model, torch.float32)
    # a LoRA-style adapter: a forward hook adding a trainable low-rank update to the last layer
    torch.manual_seed(3)
    down, up = nn.Parameter(torch.randn(4, 48) * 0.1), nn.Parameter(torch.randn(16, 4) * 0.1)

    def hook(module, args, output):
        return output + args[0] @ down.t() @ up.t()

    grads = []
    for net in (ref, model):
        handle = net[6].register_forward_hook(hook)
        x = _x().requires_grad_(True)
        net(x).square().mean().backward()
        handle.remove()
        grads.append((x.grad, down.grad.clone(), up.grad.clone()))
        down.grad = up.grad = None
    (gx_ref, gd_ref, gu_ref), (gx, gd, gu) = grads
    assert gd.abs().sum() > 0 and gu.abs().sum() > 0
    torch.testing.assert_close(gd, gd_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gu, gu_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-7)  # through the fp8 linear and conv layers
    assert all(p.grad is None for p in model.parameters())  # the base gets none


def test_backward_keeps_only_the_fp8_weight():
    """What autograd saves for a converted layer is its 1-byte weight, never an upcast copy."""
    layer = nn.Linear(32, 32).requires_grad_(False)
    convert_to_fp8(layer, torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    weights = [t for t in saved if t.shape == (32, 32)]
    assert weights and all(t.dtype == F8 for t in weights)


def test_trainable_layers_are_not_converted():
    model = _model()
    model[3].weight.requires_grad_(True)
    convert_to_fp8(model, torch.float32)
    assert type(model[3]) is nn.Linear and model[3].weight.dtype == torch.float32
    assert model[6].weight.dtype == F8


def test_the_cpu_supports_fp8_storage_and_a_missing_dtype_is_a_clear_problem(monkeypatch):
    assert fp8_problem("cpu") is None
    monkeypatch.delattr(torch, "float8_e4m3fn")
    problem = fp8_problem("cpu")
    assert problem is not None and "--fp8-base needs torch" in problem


@pytest.mark.parametrize("bias", [True, False])
def test_linear_on_3d_tokens(bias):
    layer = nn.Linear(24, 40, bias=bias).requires_grad_(False)
    ref = _rounded(layer)
    convert_to_fp8(layer, torch.float32)
    x = torch.randn(2, 7, 24)
    assert torch.equal(layer(x), ref(x))


def test_base_weights_exclude_keeps_the_matching_layers_in_their_dtype():
    """--base-weights-exclude (ai-toolkit's quantize_kwargs exclude, optimum-quanto's fnmatch on module names):
    Flex.1's '*time_text_embed*' keeps that embedder's Linear layers as they are and converts the rest; a
    pattern matching nothing and the option without a storage format are one-line errors."""
    from types import SimpleNamespace

    from sdcore.errors import ConfigError
    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.train.memory_options import MemorySetup, option_problems

    bundle = FluxAdapter().create_tiny(variant="dev", seed=0)
    bundle.denoiser.requires_grad_(False)
    options = SimpleNamespace(base_weights_dtype="fp8", fp8_base=False, mixed_precision="no", blocks_to_swap=0,
                              base_weights_exclude="*time_text_embed*")  # fmt: skip
    setup = MemorySetup.before_placement(bundle, options)
    layers = {name: m for name, m in bundle.denoiser.named_modules() if isinstance(m, nn.Linear)}
    kept = [name for name, m in layers.items() if m.weight.dtype == torch.float32]
    assert kept and all("time_text_embed" in name for name in kept)
    assert len(kept) == sum("time_text_embed" in name for name in layers)
    assert setup.fp8_elements == sum(m.weight.numel() for name, m in layers.items() if name not in kept)
    options.base_weights_exclude = "*no_such_layer*"
    with pytest.raises(ConfigError, match=r"--base-weights-exclude \*no_such_layer\*: matches none"):
        MemorySetup.before_placement(FluxAdapter().create_tiny(variant="dev", seed=0), options)
    options.base_weights_dtype = "none"
    assert any("--base-weights-exclude: keeps layers out of" in p for p in option_problems(options, "cpu"))


def test_memory_plan_counts_excluded_layers_in_their_dtype():
    """The plan's converted elements are what --base-weights-exclude leaves to convert (the excluded layers stay in
    the load dtype, so counting them at 1 byte made the estimate low), and the estimate grows by exactly their bytes."""
    from types import SimpleNamespace

    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.models.layout import layout_of_bundle
    from sdcore.train.memory import count_parameters, estimate_memory
    from sdcore.train.memory_options import MemorySetup

    bundle = FluxAdapter().create_tiny(variant="dev", seed=0)
    bundle.denoiser.requires_grad_(False)
    whole = count_parameters(bundle, [], whole_model_result=False)
    plan = count_parameters(bundle, [], whole_model_result=False, exclude=["*time_text_embed*"])
    excluded = [m.weight for n, m in bundle.denoiser.named_modules() if isinstance(m, nn.Linear) and "time_text" in n]
    assert plan.denoiser_fp8 == whole.denoiser_fp8 - sum(w.numel() for w in excluded)
    assert plan.denoiser_rows == whole.denoiser_rows - sum(w.shape[0] for w in excluded)
    options = SimpleNamespace(base_weights_dtype="fp8", fp8_base=False, mixed_precision="bf16", blocks_to_swap=0,
                              base_weights_exclude="*time_text_embed*")  # fmt: skip
    setup = MemorySetup.before_placement(bundle, options)
    assert setup.fp8_elements == plan.denoiser_fp8  # the plan counts what the run converts
    from sdcore.train.options import TrainOptions

    train = TrainOptions(base_weights_dtype="fp8", mixed_precision="bf16", base_weights_exclude="*time_text_embed*")
    layout = layout_of_bundle(FluxAdapter().create_tiny(variant="dev", seed=0))
    grown = estimate_memory(layout, plan, train).weights - estimate_memory(layout, whole, train).weights
    assert grown == sum(w.numel() for w in excluded) * (2 - 1)  # bf16 instead of fp8

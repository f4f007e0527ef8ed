"""--base-weights-dtype nf4|int8: frozen Linear/Conv2d weights of the denoiser stored as QLoRA's NF4
(blocks of 64, fp32 maxima) or absmax int8 per output row, dequantised per op (sdcore.train.base_weights).

Expected numbers come from the formats' definitions rewritten here by brute force (nearest code by
argmin over all 16 NF4 values, block maxima by reshaping, the memory formula by hand)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from sdcore.dtypes import NF4_BLOCK
from sdcore.train.base_weights import (
    NF4_CODES,
    STORAGE_FORMATS,
    QuantizedConv2d,
    QuantizedLinear,
    convert_base_weights,
)
from torch import nn
from torch.nn import functional as F

NF4, INT8 = STORAGE_FORMATS["nf4"], STORAGE_FORMATS["int8"]
CODES = torch.tensor(NF4_CODES)


def _weight(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    w.view(-1)[7] = 0.4  # an outlier: its block's maximum
    return w


def _blocks(w: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(-1)
    padded = torch.zeros(math.ceil(flat.numel() / NF4_BLOCK) * NF4_BLOCK)
    padded[: flat.numel()] = flat
    return padded.reshape(-1, NF4_BLOCK)


# --- the formats -----------------------------------------------------------------------------------


def test_nf4_codes_are_the_nearest_codebook_entries_of_each_blocks_scaled_values():
    w = _weight(5, 27)  # 135 elements: 3 blocks, the last padded with zeros
    packed, absmax = NF4.quantise(w)
    assert packed.dtype == torch.uint8 and packed.shape == (3 * NF4_BLOCK // 2,)  # two codes per byte
    assert absmax.dtype == torch.float32 and torch.equal(absmax, _blocks(w).abs().amax(1))
    scaled = (_blocks(w) / absmax[:, None]).reshape(-1)
    codes = NF4.unpack(packed)
    distances = (scaled[:, None] - CODES[None, :]).abs()
    chosen = distances.gather(1, codes[:, None]).squeeze(1)
    assert torch.allclose(chosen, distances.min(1).values, rtol=0, atol=1e-7)  # nearest (ties either way)
    assert torch.equal(codes[135:], torch.full((192 - 135,), 7))  # padding: the code of 0.0
    # packing: the first of each pair in the high nibble, and unpacking inverts it exactly
    assert torch.equal(packed.long(), codes[0::2] * 16 + codes[1::2])
    assert 15 in codes.tolist() or 0 in codes.tolist()  # each block's maximum takes an end code


def test_nf4_error_is_within_half_the_largest_code_gap_of_each_blocks_maximum():
    w = _weight(64, 40, seed=1)
    stored = NF4.quantise(w)
    back = NF4.dequantise(stored, w.shape, torch.float32)
    assert back.shape == w.shape and back.dtype == torch.float32
    half_gap = float((CODES[1:] - CODES[:-1]).max()) / 2  # 0.1385: between 0.7230 and 1.0
    bound = _blocks(w).abs().amax(1)[:, None] * half_gap
    error = (_blocks(w) - _blocks(back)).abs()
    assert torch.all(error <= bound * (1 + 1e-6))
    assert error.max() > 0.5 * bound.min()  # a real 4-bit rounding, not an identity
    # the values are exactly code * block maximum
    codes = NF4.unpack(stored[0])[: w.numel()]
    maxima = stored[1].repeat_interleave(NF4_BLOCK)[: w.numel()]
    assert torch.equal(back.reshape(-1), CODES[codes] * maxima)


def test_int8_is_symmetric_absmax_per_output_row():
    w = _weight(12, 3, 3, 3, seed=2)  # a Conv2d weight: rows are output channels
    codes, absmax = INT8.quantise(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert torch.equal(absmax, w.reshape(12, -1).abs().amax(1))
    assert int(codes.abs().max()) == 127 and int(codes.min()) >= -127
    back = INT8.dequantise((codes, absmax), w.shape, torch.float32)
    row_error = (w - back).reshape(12, -1).abs().amax(1)
    assert torch.all(row_error <= absmax / 254 * (1 + 1e-6))
    assert torch.equal(back, (codes.float().reshape(12, -1) * (absmax[:, None] / 127)).reshape(w.shape))


def test_an_all_zero_block_or_row_stays_zero():
    w = torch.zeros(4, 64)
    for fmt in (NF4, INT8):
        assert torch.equal(fmt.dequantise(fmt.quantise(w), w.shape, torch.float32), w)


# --- converted layers --------------------------------------------------------------------------------


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


def _dequantised(model: nn.Module) -> nn.Module:
    """The float path on the dequantised weights: the reference a converted model must equal."""
    ref = copy.deepcopy(model)
    for name, m in model.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedConv2d)):
            plain = ref.get_submodule(name)
            plain.__class__ = nn.Linear if isinstance(m, nn.Linear) else nn.Conv2d
            for key in m.storage.names:
                del plain._buffers[key]
            plain.weight = nn.Parameter(m.dequantised_weight(torch.float32), requires_grad=False)
    return ref


def _x() -> torch.Tensor:
    return torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_outputs_and_input_gradients_equal_the_float_path_on_the_dequantised_weights(storage):
    model = _model()
    full = copy.deepcopy(model)
    convert_base_weights(model, storage, torch.float32)
    assert isinstance(model[0], QuantizedConv2d) and isinstance(model[3], QuantizedLinear)
    ref = _dequantised(model)
    x, x_ref = _x().requires_grad_(True), _x().requires_grad_(True)
    out, expected = model(x), ref(x_ref)
    assert torch.equal(out, expected)
    error = float((out.detach() - full(_x())).norm() / full(_x()).norm())
    assert 0 < error < (0.2 if storage == "nf4" else 0.02), error
    out.square().mean().backward()
    expected.square().mean().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-7)
    # one Linear alone: F.linear on the dequantised weight and the bias, bit for bit
    tokens = torch.randn(3, 5, 36)
    layer = model[3]
    assert torch.equal(layer(tokens), F.linear(tokens, STORAGE_FORMATS[storage].dequantise(
        layer.stored(), torch.Size((48, 36)), torch.float32), layer.bias))  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the op in bf16 from the stored codes
        out16, ref16 = model(_x()), ref(_x())
    assert out16.dtype == torch.bfloat16 and torch.equal(out16, ref16)


@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_a_lora_hook_on_a_converted_layer_trains_and_the_base_gets_no_gradient(storage):
    model = _model()
    convert_base_weights(model, storage, torch.float32)
    ref = _dequantised(model)
    torch.manual_seed(3)
    down, up = nn.Parameter(torch.randn(4, 48) * 0.1), nn.Parameter(torch.randn(16, 4) * 0.1)

    def hook(module, args, output):
        return output + args[0] @ down.t() @ up.t()

    grads = []
    for net in (ref, model):
        handle = net[6].register_forward_hook(hook)
        net(_x()).square().mean().backward()
        handle.remove()
        grads.append((down.grad.clone(), up.grad.clone()))
        down.grad = up.grad = None
    (gd_ref, gu_ref), (gd, gu) = grads
    assert gd.abs().sum() > 0 and gu.abs().sum() > 0
    torch.testing.assert_close(gd, gd_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gu, gu_ref, rtol=1e-5, atol=1e-7)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("storage", "packed_bytes"), [("nf4", 128 * 96 // 2), ("int8", 128 * 96)])
def test_a_converted_layer_holds_only_its_codes_maxima_and_bias(storage, packed_bytes):
    layer = nn.Linear(128, 96).requires_grad_(False)
    assert convert_base_weights(layer, storage, torch.bfloat16) == 128 * 96
    state = layer.state_dict()
    maxima = 128 * 96 // NF4_BLOCK if storage == "nf4" else 96  # one fp32 maximum per block / per row
    assert sorted(state) == sorted(["bias", f"weight_{storage}", "weight_absmax"])
    assert sum(t.numel() * t.element_size() for t in state.values()) == packed_bytes + 4 * maxima + 96 * 4
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    # ``weight`` reads as the dequantised weight (what DoRA's norm or a shape check sees), never written
    assert layer.weight.shape == (96, 128) and layer.weight.dtype == torch.bfloat16
    with pytest.raises(AttributeError, match="cannot be written"):
        layer.weight = torch.zeros(96, 128)
    layer.to(torch.bfloat16)  # a model-wide cast must not round the maxima
    assert layer.weight_absmax.dtype == torch.float32


@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_backward_keeps_only_the_stored_tensors(storage):
    layer = nn.Linear(64, 32).requires_grad_(False)
    convert_base_weights(layer, storage, torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert saved and all(not t.is_floating_point() or t.numel() <= 64 for t in saved)  # codes and maxima only
    assert not any(t.shape == (32, 64) and t.is_floating_point() for t in saved)


def test_trainable_layers_are_never_converted():
    model = _model()
    model[3].weight.requires_grad_(True)
    convert_base_weights(model, "nf4", torch.float32)
    assert type(model[3]) is nn.Linear and model[3].weight.requires_grad
    assert isinstance(model[6], QuantizedLinear)


@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_block_swap_moves_the_stored_tensors_and_changes_no_number(storage):
    from sdcore.train.block_swap import BlockSwap

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer_blocks = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))

        def forward(self, x):
            for block in self.transformer_blocks:
                x = torch.tanh(block(x))
            return x

    torch.manual_seed(0)
    plain = Tiny().requires_grad_(False)
    convert_base_weights(plain, storage, torch.float32)
    swapped = copy.deepcopy(plain)
    seen: list[list[str]] = []

    class Recording:
        def to_device(self, index, block):
            tensors = {n: t.detach().clone() for n, t in (*block.named_parameters(), *block.named_buffers())}
            seen.append(sorted(tensors))
            return tensors

        def release(self, index):
            pass

    swap = BlockSwap(swapped, 2, "cpu", mover=Recording())
    x1, x2 = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32)
    x2.requires_grad_(True)
    with torch.no_grad():
        x2.copy_(x1)
    a, b = plain(x1), swapped(x2)
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    assert seen and all(names == sorted(["bias", f"weight_{storage}", "weight_absmax"]) for names in seen)
    swap.remove()


# --- the runtime -------------------------------------------------------------------------------------


def _lora_run(tmp_path, family: str, tag: str, **kw):
    from sdcore.models.load import load_model
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import train
    from sdplugin_lora.format import read_lora
    from sdplugin_lora.method import LoraMethod

    values = {"rank": 4, "max_steps": 2, "save_state": False, **kw}
    options = contract_options(LoraMethod, tmp_path, values, family=family, tag=tag)
    bundle = load_model(f"tiny:{family}")
    result = train(LoraMethod(options), bundle=bundle)
    return result, read_lora(options.output), bundle


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_lora_trains_on_an_nf4_and_an_int8_base_through_the_runtime(tmp_path, family):
    _, plain, _ = _lora_run(tmp_path, family, "plain")
    for storage in ("nf4", "int8"):
        result, saved, bundle = _lora_run(tmp_path, family, storage, base_weights_dtype=storage)
        layers = [m for m in bundle.denoiser.modules() if isinstance(m, (QuantizedLinear, QuantizedConv2d))]
        assert layers and all(m.storage.name == storage for m in layers)  # the run trained on the stored base
        assert not any(isinstance(m, nn.Linear) and type(m) is nn.Linear for m in bundle.denoiser.modules())
        assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses), result.losses
        assert sorted(saved.modules) == sorted(plain.modules)  # the same file, no base weight in it
        ups = [m.up.float() for m in saved.modules.values()]
        assert sum(int(u.abs().sum() > 0) for u in ups) == len(ups)  # every lora_up left zero: gradients arrived


# --- the memory plan ---------------------------------------------------------------------------------


@pytest.fixture
def flux_like_frozen(flux_like):
    """The conftest's tiny Flux family (layout, bundle) with its transformer frozen, and a LoRA-sized group of new
    parameters on its block Linears."""
    layout, bundle = flux_like
    bundle.transformer.requires_grad_(False)
    params = []
    for name, module in bundle.transformer.named_modules():
        if isinstance(module, nn.Linear) and "transformer_blocks" in name:
            params += [
                nn.Parameter(torch.zeros(4, module.in_features)),
                nn.Parameter(torch.zeros(module.out_features, 4)),
            ]
    return layout, bundle, [{"params": params}]


def _options(**kw):
    from sdcore.train.options import TrainOptions

    return TrainOptions(
        **{"model": "m", "data": "d", "output": "o", "resolution": 256, "mixed_precision": "bf16", **kw}
    )


def test_the_plan_counts_nf4_and_int8_weights_by_their_formulas(flux_like_frozen):
    from sdcore.train.memory import count_parameters, estimate_memory

    layout, bundle, groups = flux_like_frozen
    plan = count_parameters(bundle, groups, whole_model_result=False)
    linears = [m for m in bundle.transformer.modules() if isinstance(m, nn.Linear)]
    elements, rows = sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)
    assert (plan.denoiser_fp8, plan.denoiser_rows) == (elements, rows)
    n, rest = plan.components["transformer"], plan.components["transformer"] - elements
    bf16, fp8, nf4, int8 = (
        estimate_memory(layout, plan, _options(**kw), device="cuda")
        for kw in ({}, {"fp8_base": True}, {"base_weights_dtype": "nf4"}, {"base_weights_dtype": "int8"})
    )
    lora = plan.added * 4
    assert bf16.weights == n * 2 + lora
    assert fp8.weights == elements + rest * 2 + lora
    assert nf4.weights == int(elements * (0.5 + 4 / 64) + rest * 2 + lora)
    assert int8.weights == elements + 4 * rows + rest * 2 + lora
    assert nf4.weights < fp8.weights < int8.weights < bf16.weights
    assert bf16.weights - nf4.weights == pytest.approx(elements * (2 - 0.5625), abs=1)
    assert (nf4.settings["base_weights_dtype"], fp8.settings["base_weights_dtype"]) == ("nf4", "fp8")
    assert nf4.activations == bf16.activations and nf4.gradients == bf16.gradients
    # swapped blocks leave the device at their stored size
    swapped = estimate_memory(layout, plan, _options(base_weights_dtype="int8", blocks_to_swap=3), device="cuda")
    blocks = list(bundle.transformer.single_transformer_blocks)

    def stored(block):
        lin = [m for m in block.modules() if isinstance(m, nn.Linear)]
        e = sum(m.weight.numel() for m in lin)
        return e + 4 * sum(m.out_features for m in lin) + (sum(p.numel() for p in block.parameters()) - e) * 2

    sizes = [stored(b) for b in blocks]
    assert int8.weights - swapped.weights == sum(sizes) - sum(sorted(sizes)[-2:])


# --- pre-flight and configs --------------------------------------------------------------------------


def test_preflight_refusals_one_line_each(flux_like_frozen):
    from sdcore.train.memory import count_parameters
    from sdcore.train.memory_options import model_problems, option_problems

    layout, bundle, groups = flux_like_frozen
    assert option_problems(_options(base_weights_dtype="nf4"), "cpu") == []
    assert option_problems(_options(fp8_base=True, base_weights_dtype="fp8"), "cpu") == []
    assert option_problems(_options(fp8_base=True, base_weights_dtype="int8"), "cpu") == [
        "--fp8-base with --base-weights-dtype int8: the frozen weights have one storage format; choose one"
    ]
    plan = count_parameters(bundle, groups, whole_model_result=False)
    assert model_problems(_options(base_weights_dtype="nf4", blocks_to_swap=5), layout, plan) == []
    # a whole-model result (DreamBooth training the text encoder only) would hold the codes
    whole = count_parameters(bundle, groups, whole_model_result=True)
    (line,) = model_problems(_options(base_weights_dtype="int8"), layout, whole)
    assert line.startswith("--base-weights-dtype int8: this method saves the whole model, transformer included")
    assert model_problems(_options(fp8_base=True), layout, whole) == []  # fp8 weights save as a (rounded) model
    bundle.transformer.requires_grad_(True)
    full = count_parameters(bundle, [{"params": list(bundle.transformer.parameters())}], whole_model_result=True)
    problems = model_problems(_options(base_weights_dtype="nf4"), layout, full)
    assert problems == [
        "--base-weights-dtype nf4: this method trains the transformer's own weights; the option applies to frozen "
        "base weights (adapter training such as LoRA)"
    ]


def test_the_runtime_refuses_a_denoiser_with_nothing_frozen(flux_like_frozen):
    from sdcore.errors import ConfigError
    from sdcore.train.memory_options import MemorySetup

    _layout, bundle, _groups = flux_like_frozen
    bundle.transformer.requires_grad_(True)
    with pytest.raises(ConfigError, match=r"^--base-weights-dtype nf4: the denoiser has no frozen Linear/Conv2d"):
        MemorySetup.before_placement(bundle, _options(base_weights_dtype="nf4"))


@pytest.mark.parametrize(("dtype", "expected"), [("NFLOAT_4", "nf4"), ("INT_8", "int8")])
def test_onetrainer_weight_dtype_of_the_denoiser_maps(tmp_path, dtype, expected):
    from sdcore.errors import ConfigError
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    config = {
        "training_method": "LORA", "model_type": "FLUX_DEV_1", "base_model_name": "tiny:flux", "epochs": 1,
        "output_model_destination": "out.safetensors", "output_model_format": "DIFFUSERS_LORA",
        "transformer": {"train": True, "weight_dtype": dtype}, "text_encoder": {"train": False},
        "text_encoder_2": {"train": False},
    }  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    notes: list[str] = []
    o = load_options(LoraOptions, path, notes=notes)
    assert (o.base_weights_dtype, o.fp8_base) == (expected, False)
    assert any(f"transformer.weight_dtype {dtype}" in n and expected in n for n in notes)
    config["text_encoder"]["weight_dtype"] = dtype  # a text encoder's: --text-encoder-weights-dtype, per encoder
    path.write_text(json.dumps(config), encoding="utf-8")
    assert load_options(LoraOptions, path, notes=[]).text_encoder_weights_dtype == f"{expected},none"
    config["text_encoder"]["weight_dtype"] = "GGUF"  # a type sdcore has no format for: refused, by name
    path.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"text_encoder\.weight_dtype 'GGUF'"):
        load_options(LoraOptions, path, notes=[])


def _aitoolkit(tmp_path, qtype: str):
    import yaml
    from sdcore.train.config import load_options
    from sdplugin_lora.method import LoraOptions

    process = {"type": "sd_trainer", "datasets": [{"folder_path": "imgs"}],
               "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
               "model": {"name_or_path": "tiny:flux", "is_flux": True, "quantize": True, "qtype": qtype}}  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"job": "extension", "config": {"name": "run", "process": [process]}}))
    notes: list[str] = []
    return load_options(LoraOptions, path, notes=notes), notes


@pytest.mark.parametrize(
    ("qtype", "storage", "said"),
    [("qint8", "int8", "like quanto's qint8"), ("qint4", "nf4", "NOT quanto's qint4"), ("uint4", "nf4", "NOT")],
)
def test_aitoolkit_qtypes_map_with_their_difference_said(tmp_path, qtype, storage, said):
    o, notes = _aitoolkit(tmp_path, qtype)
    assert (o.base_weights_dtype, o.fp8_base) == (storage, False)
    assert any("model.quantize" in n and said in n for n in notes)
    o, _ = _aitoolkit(tmp_path, "qfloat8")
    assert (o.base_weights_dtype, o.fp8_base) == ("none", True)


@pytest.mark.parametrize("qtype", ["qint2", "uint4|ostris/accuracy_recovery_adapters/x.safetensors"])
def test_aitoolkit_qtypes_without_an_equivalent_are_refused(tmp_path, qtype):
    from sdcore.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _aitoolkit(tmp_path, qtype)
    assert [p for p in info.value.problems if "model.qtype" in p] and all("\n" not in p for p in info.value.problems)


def test_the_option_reaches_the_cli():
    from sdcore.train.options import BASE_WEIGHTS_DTYPES, TrainOptions

    field = {f.name: f for f in dataclasses.fields(TrainOptions)}["base_weights_dtype"]
    assert field.default == "none" and field.metadata["choices"] == BASE_WEIGHTS_DTYPES == (
        "none",
        "fp8",
        "nf4",
        "int8",
    )


def test_dora_reads_the_dequantised_base_weight_and_trains(tmp_path):
    """DoRA's magnitude needs the base weight's norm: ``layer.weight`` gives the dequantised one."""
    result, saved, bundle = _lora_run(tmp_path, "sd1", "dora", algo="dora", base_weights_dtype="nf4")
    assert any(isinstance(m, QuantizedLinear) for m in bundle.denoiser.modules())
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert saved.modules and all(m.up.abs().sum() > 0 for m in saved.modules.values())

"""The memory plan of --fp8-base, --blocks-to-swap and a bf16 base, on a tiny Flux-architecture
family declared at run time; and the pre-flight's checks of those options on that model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn


def _lora_groups(transformer: nn.Module) -> list[dict]:
    """Freeze the model; rank-4 factors for every block Linear (added parameters, as LoRA's)."""
    transformer.requires_grad_(False)
    params = []
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and "transformer_blocks" in name:
            params += [
                nn.Parameter(torch.zeros(4, module.in_features)),
                nn.Parameter(torch.zeros(module.out_features, 4)),
            ]
    return [{"params": params}]


def _options(**kw):
    from sdcore.train.options import TrainOptions

    return TrainOptions(**{"model": "m", "data": "d", "output": "o", "resolution": 256, **kw})


def test_parameter_plan_counts_fp8_weights_and_blocks(flux_like):
    from sdcore.train.memory import count_parameters

    _layout, bundle = flux_like
    transformer = bundle.transformer
    plan = count_parameters(bundle, _lora_groups(transformer), whole_model_result=False)
    linear = sum(m.weight.numel() for m in transformer.modules() if isinstance(m, nn.Linear))
    assert plan.denoiser_fp8 == linear
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert [b[0] for b in plan.blocks] == [sum(p.numel() for p in b.parameters()) for b in blocks]


def test_fp8_and_bf16_base_weights_on_a_gpu(flux_like):
    from sdcore.train.memory import count_parameters, estimate_memory

    layout, bundle = flux_like
    plan = count_parameters(bundle, _lora_groups(bundle.transformer), whole_model_result=False)
    n = plan.components["transformer"]
    # latents and text outputs cached: on a GPU only the transformer and the LoRA stay
    fp32 = estimate_memory(layout, plan, _options(), device="cuda")
    bf16 = estimate_memory(layout, plan, _options(mixed_precision="bf16"), device="cuda")
    fp8 = estimate_memory(layout, plan, _options(mixed_precision="bf16", fp8_base=True), device="cuda")
    assert fp32.weights == n * 4 + plan.added * 4
    assert bf16.weights == n * 2 + plan.added * 4  # bf16 base: frozen weights at 2 bytes
    assert fp8.weights == plan.denoiser_fp8 * 1 + (n - plan.denoiser_fp8) * 2 + plan.added * 4
    assert fp8.weights < 0.6 * bf16.weights  # the Linear weights are nearly all of a transformer
    assert fp8.activations == bf16.activations and fp8.gradients == bf16.gradients
    assert fp8.settings["fp8_base"] is True


def test_block_swap_moves_block_weights_off_the_gpu_and_recomputes_their_activations(flux_like):
    from sdcore.train.memory import count_parameters, estimate_memory

    layout, bundle = flux_like
    transformer = bundle.transformer
    plan = count_parameters(bundle, _lora_groups(transformer), whole_model_result=False)
    base = _options(mixed_precision="bf16", fp8_base=True)
    plain = estimate_memory(layout, plan, base, device="cuda")
    swapped = estimate_memory(layout, plan, dataclasses.replace(base, blocks_to_swap=3), device="cuda")

    def stored(block):  # fp8 Linear weights, the rest in bf16
        linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
        return linear + (sum(p.numel() for p in block.parameters()) - linear) * 2

    last3 = [stored(b) for b in transformer.single_transformer_blocks]  # the last three blocks
    assert plain.weights - swapped.weights == sum(last3) - sum(sorted(last3)[-2:])
    # swapped blocks run checkpointed: fewer saved activations, more than full checkpointing
    checkpointed = estimate_memory(layout, plan, dataclasses.replace(base, gradient_checkpointing=True), device="cuda")
    assert checkpointed.activations < swapped.activations < plain.activations
    # on the CPU (no device to free) the copies in flight add to the weights instead
    cpu_plain = estimate_memory(layout, plan, base, device="cpu")
    cpu_swapped = estimate_memory(layout, plan, dataclasses.replace(base, blocks_to_swap=3), device="cpu")
    assert cpu_swapped.weights - cpu_plain.weights == sum(sorted(last3)[-2:])


def test_preflight_checks_of_the_memory_options_on_this_model(flux_like):
    from sdcore.train.memory import count_parameters
    from sdcore.train.memory_options import model_problems

    layout, bundle = flux_like
    plan = count_parameters(bundle, _lora_groups(bundle.transformer), whole_model_result=False)
    assert model_problems(_options(blocks_to_swap=5, fp8_base=True), layout, plan) == []
    assert model_problems(_options(blocks_to_swap=6), layout, plan) == [
        "--blocks-to-swap 6: the toy FLUX.1 transformer has only 5 transformer blocks; choose 1 to 5"
    ]
    bundle.transformer.requires_grad_(True)
    full = count_parameters(bundle, [{"params": list(bundle.transformer.parameters())}], whole_model_result=True)
    problems = model_problems(_options(blocks_to_swap=2, fp8_base=True), layout, full)
    assert len(problems) == 2 and "trains the transformer's own weights" in problems[0]
    assert "add --fused-backward-pass" in problems[1]  # a full fine-tune swaps trained weights only with it


def test_runtime_setup_converts_then_leaves_swapped_blocks_on_the_cpu(flux_like):
    from sdcore.train.memory_options import MemorySetup
    from sdcore.train.method import Capabilities
    from sdcore.train.placement import place_model

    _layout, bundle = flux_like
    _lora_groups(bundle.transformer)  # frozen base (the factors live outside the model)
    setup = MemorySetup.before_placement(bundle, _options(fp8_base=True, blocks_to_swap=2, mixed_precision="bf16"))
    assert setup.fp8_elements == sum(m.weight.numel() for m in bundle.transformer.modules() if isinstance(m, nn.Linear))
    assert setup.swapped == list(bundle.transformer.single_transformer_blocks)[-2:]
    # a recording device: which tensors placement moved (to "meta" here: nothing is computed)
    place_model(bundle, [], Capabilities(), torch.device("meta"), "bf16", stay_on_cpu=setup.swapped)
    for block in setup.swapped:
        assert all(p.device.type == "cpu" for p in block.parameters())
    assert all(p.device.type == "meta" for p in bundle.transformer.transformer_blocks.parameters())
    q = bundle.transformer.transformer_blocks[0].attn.to_q
    assert q.weight.dtype == torch.float8_e4m3fn and q.bias.dtype == torch.bfloat16  # fp8 kept, bias cast
    norm = setup.swapped[0].norm.linear  # inside a swapped block: converted and cast where it is
    assert norm.weight.dtype == torch.float8_e4m3fn and norm.bias.dtype == torch.bfloat16


def test_flux_activations_match_what_autograd_saves(flux_like):
    """The Flux constants on a size they were not measured on (hidden 64, 2+3 blocks, 64 text tokens)."""
    from sdcore.train.memory import count_parameters, estimate_memory

    layout, bundle = flux_like
    transformer = bundle.transformer
    groups = _lora_groups(transformer)
    factors = iter(groups[0]["params"])
    for name, module in transformer.named_modules():  # the factors act as LoRA: forward hooks
        if isinstance(module, nn.Linear) and "transformer_blocks" in name:
            down, up = next(factors), next(factors)
            module.register_forward_hook(lambda m, a, out, d=down, u=up: out + a[0] @ d.t() @ u.t())
    plan = count_parameters(bundle, groups, whole_model_result=False)
    estimate = estimate_memory(layout, plan, _options(resolution=256))
    side = 256 // 16  # latent 32x32 packed 2x2
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(16.0), torch.arange(16.0), indexing="ij"), -1)
    params = {p.untyped_storage().data_ptr() for p in [*transformer.parameters(), *groups[0]["params"]]}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        transformer(
            hidden_states=torch.randn(1, side * side, 64),
            encoder_hidden_states=torch.randn(1, 64, 32),
            pooled_projections=torch.randn(1, 32),
            timestep=torch.tensor([0.5]),
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(64, 3),
            return_dict=False,
        )
    measured = sum(seen.values())
    assert estimate.activations == pytest.approx(measured, rel=0.1), (estimate.activations, measured)


def test_over_budget_suggestions_include_fp8_and_block_swap(flux_like):
    from sdcore.train.memory import count_parameters, estimate_memory, suggestions

    layout, bundle = flux_like
    plan = count_parameters(bundle, _lora_groups(bundle.transformer), whole_model_result=False)
    options = _options(mixed_precision="bf16", gradient_checkpointing=True)
    now = estimate_memory(layout, plan, options, device="cuda")
    found = {s.flags: s for s in suggestions(layout, plan, options, now.total - 1, device="cuda")}
    assert found["--fp8-base"].fits and found["--fp8-base"].estimate.total < now.total
    # two swapped blocks are in flight: 3 is the first count that saves anything, and enough here
    swap = found["--blocks-to-swap 3"]
    assert swap.fits and swap.estimate.weights < now.weights
    tight = {s.flags for s in suggestions(layout, plan, options, 1, device="cuda")}
    assert "--blocks-to-swap 5" in tight  # nothing fits: all of them
    # a full fine-tune trains the weights those options act on: not suggested
    bundle.transformer.requires_grad_(True)
    full = count_parameters(bundle, [{"params": list(bundle.transformer.parameters())}], whole_model_result=True)
    flags = [s.flags for s in suggestions(layout, full, options, 1, device="cuda")]
    assert not any("fp8" in f or "swap" in f for f in flags)


def test_over_budget_suggestions_offer_cpu_offload_checkpointing_never_with_block_swap(flux_like):
    """--cpu-offload-checkpointing on a transformer's blocks: its estimate keeps two block inputs and the largest
    block on the device and every block's input ``D (N + T)`` in host memory (formula rewritten as in
    test_offload_checkpointing); refused with --blocks-to-swap, so no suggestion names both."""
    import math

    from sdcore.models.family import get_family
    from sdcore.train.memory import (
        FLUX_ACTIVATION_CONSTANTS,
        count_parameters,
        estimate_memory,
        suggestions,
        transformer_tokens,
    )
    from sdcore.train.preflight import MemoryPlan

    flag, swap = "--cpu-offload-checkpointing", "--blocks-to-swap"
    layout, bundle = flux_like
    plan = count_parameters(bundle, _lora_groups(bundle.transformer), whole_model_result=False)
    options = _options(gradient_checkpointing=True)
    now = estimate_memory(layout, plan, options, device="cuda")
    found = {s.flags: s for s in suggestions(layout, plan, options, now.total - 1, device="cuda")}
    family = get_family(layout.family)
    vae = layout.configs["vae"].get("block_out_channels", (128, 256, 512, 512))
    side = 256 / 2 ** (len(vae) - 1)
    inputs = 4 * 16 * (transformer_tokens(layout.configs["transformer"], side * side, family.latent.channels)
                       + family.context_tokens)  # fmt: skip
    largest = max(FLUX_ACTIVATION_CONSTANTS["adapter"]) * inputs
    offload = found[flag].estimate
    assert offload.host == math.ceil(4 * 5 * inputs)  # 2 double + 3 single blocks, fp32
    assert now.activations == math.ceil(4 * (5 * inputs + largest))
    assert offload.total == now.total - now.activations + math.ceil(4 * (largest + 2 * inputs))
    assert offload.total < now.total and not now.host
    assert any(swap in f for f in found)  # both are offered, each alone
    assert not [f for f in found if flag in f and swap in f]
    *_, together = found.values()
    alone = {name: next(s for f, s in found.items() if f.startswith(name)) for name in (flag, swap)}
    winner = min(alone, key=lambda name: alone[name].estimate.total)
    assert winner in together.flags and ({flag, swap} - {winner}).pop() not in together.flags
    # the plan's advice says what moves to the host
    lines = MemoryPlan(now, plan, now.total - 1, now.total - 1, suggestions=[found[flag]]).lines()
    assert f"{flag} ({offload.total / 2**20:,.0f} MiB, {offload.host / 2**20:,.0f} MiB in host memory)" in lines[-1]

    # a full fine-tune: no block swap, the offload still applies (and checkpointing off: it turns it on)
    bundle.transformer.requires_grad_(True)
    full = count_parameters(bundle, [{"params": list(bundle.transformer.parameters())}], whole_model_result=True)
    flags = [s.flags for s in suggestions(layout, full, _options(), 1, device="cuda")]
    assert flag in flags and "--gradient-checkpointing" in flags and not any(swap in f for f in flags)
    assert flag in flags[-1]
    # not where it is refused, already on, or moves nothing off the device
    for kw, device in (({"blocks_to_swap": 3}, "cuda"), ({"cpu_offload_checkpointing": True}, "cuda"), ({}, "cpu")):
        flags = [
            s.flags for s in suggestions(layout, full, _options(gradient_checkpointing=True, **kw), 1, device=device)
        ]
        assert not any(flag in f for f in flags), (kw, device, flags)


def test_unet_suggestions_never_offer_cpu_offload_checkpointing():
    """An SD1.5 UNet has no transformer blocks to offload (the run refuses the option there)."""
    from sdcore.train.memory import suggestions
    from test_memory import LORA, SD15

    for checkpointing in (False, True):
        flags = [s.flags for s in suggestions(SD15, LORA, _options(gradient_checkpointing=checkpointing), 1,
                                              device="cuda")]  # fmt: skip
        assert flags and not any("--cpu-offload-checkpointing" in f for f in flags), flags


def test_no_batch_size_suggestion_when_the_dataset_config_sets_it(flux_like):
    """A kohya dataset config's batch_size wins over --batch-size (kohya's config_util order), so the plan
    does not offer a --batch-size change that would change nothing; without one it does."""
    from sdcore.train.memory import count_parameters, suggestions

    layout, bundle = flux_like
    plan = count_parameters(bundle, _lora_groups(bundle.transformer), whole_model_result=False)
    options = _options(mixed_precision="bf16", gradient_checkpointing=True, batch_size=4)
    offered = [s.flags for s in suggestions(layout, plan, options, 1, device="cuda")]
    assert "--batch-size 2 --gradient-accumulation 2" in offered
    from_data = [s.flags for s in suggestions(layout, plan, options, 1, device="cuda", batch_from_data=True)]
    assert not any("--batch-size" in f for f in from_data)
    assert any("--blocks-to-swap" in f for f in from_data)  # the other suggestions stay

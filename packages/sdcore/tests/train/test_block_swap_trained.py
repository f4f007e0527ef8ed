"""--blocks-to-swap on a full fine-tune (kohya's flux_train.py/sd3_train.py with --fused_backward_pass):
the swapped blocks' trained weights live on the CPU, each steps in backward on a device copy, and the
weights after N steps equal the unswapped fused run's bit for bit."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from sdcore.errors import SdcoreError
from sdcore.train.block_swap import BlockSwap, WeightMover, swappable_blocks
from sdcore.train.fused import StepInBackward
from sdcore.train.optim import create_optimizer
from test_block_swap import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3


class TrainedRecorder(WeightMover):
    """Records every copy of a trained weight (forward, recompute, step) and keeps weak references to them."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.events: list[tuple[str, int, str]] = []
        self.copies: list[weakref.ref] = []

    def trained_to_device(self, index, name, tensor):
        self.events.append(("copy", index, name))
        copied = super().trained_to_device(index, name, tensor)
        self.copies.append(weakref.ref(copied))
        return copied


def _run(model, inputs, steps, *, swap=0, checkpointing=False, bf16=False, clip=0.0, mover=None,
         optimizer_name="adafactor", optimizer_args="relative_step=False scale_parameter=False warmup_init=False"):  # fmt: skip
    """``steps`` fused steps of the whole transformer (by default Adafactor: kohya's flux_train.py settings)."""
    if bf16:
        model.to(torch.bfloat16)
    if checkpointing:
        model.enable_gradient_checkpointing()
    params = list(model.parameters())
    optimizer = create_optimizer(optimizer_name, [{"params": params}], lr=1e-3, args=optimizer_args)
    hooks = StepInBackward(optimizer, params, max_grad_norm=clip, seed=7, stochastic_bf16=True)
    installed = None
    if swap:
        installed = BlockSwap(model, swap, "cpu", mover=mover, trained=True)
        installed.stepper = hooks.step_swapped
    losses = []
    for step in range(steps):
        hooks.begin(step)
        batch = inputs()
        batch["hidden_states"] = batch["hidden_states"] + 0.1 * step
        if bf16:
            batch = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                     for k, v in batch.items()}  # fmt: skip
        out = model(**batch)[0]
        loss = (out.float() - 0.5).square().mean()
        loss.backward()
        hooks.end()
        losses.append(loss.detach())
    hooks.remove()
    return losses, optimizer, installed


@pytest.mark.parametrize(
    ("family", "checkpointing", "bf16", "clip"),
    [("flux", False, False, 0.0), ("flux", True, False, 1.0), ("sd3", False, False, 0.0), ("flux", False, True, 0.0)],
)
def test_swapped_trained_weights_equal_the_unswapped_fused_run_bit_for_bit(family, checkpointing, bf16, clip):
    build, inputs = (tiny_flux, flux_inputs) if family == "flux" else (tiny_sd3, sd3_inputs)
    base = build()
    swapped = copy.deepcopy(base)
    start = {k: v.detach().clone() for k, v in base.state_dict().items()}
    losses_ref, opt_ref, _ = _run(base, inputs, 2, checkpointing=checkpointing, bf16=bf16, clip=clip)
    losses, opt, swap = _run(swapped, inputs, 2, swap=3, checkpointing=checkpointing, bf16=bf16, clip=clip)
    for got, want in zip(losses, losses_ref, strict=True):
        assert torch.equal(got, want)
    moved = 0
    for (name, got), want in zip(swapped.state_dict().items(), base.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
        moved += not torch.equal(got, start[name])
    assert moved > len(start) // 2  # the steps changed the weights, the swapped blocks' among them
    in_swapped = [p for block in swap.blocks for p in block.parameters()]
    changed = sum(not torch.equal(p, start[_name(swapped, p)]) for p in in_swapped)
    assert changed > 0.8 * len(in_swapped)  # (a few get no gradient: SD3's last block drops its context output)
    assert all(p.grad is None for p in in_swapped)  # the CPU master never holds a gradient
    # the optimizer state of each weight, under the weight itself (not its copies), equals the unswapped one's
    ref_states = [opt_ref.state[p] for p in base.parameters()]
    states = [opt.state[p] for p in swapped.parameters()]
    assert len(opt.state) == len(opt_ref.state) == len(states)
    for got, want in zip(states, ref_states, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(want[key]))


@pytest.mark.parametrize(("name", "args"), [("adamw", ""), ("sgd", "momentum=0.9"), ("sgdnesterov", "momentum=0.9")])
def test_the_other_fused_optimizers_step_swapped_weights_as_unswapped(name, args):
    """Every optimizer --fused-backward-pass takes (FUSED_OPTIMIZERS): the same weights bit for bit on one device."""
    base = tiny_flux()
    swapped = copy.deepcopy(base)
    _run(base, flux_inputs, 2, clip=0.5, optimizer_name=name, optimizer_args=args)
    _run(swapped, flux_inputs, 2, swap=3, clip=0.5, optimizer_name=name, optimizer_args=args)
    for (key, got), want in zip(swapped.state_dict().items(), base.state_dict().values(), strict=True):
        assert torch.equal(got, want), key


def _name(model, param):
    return next(n for n, p in model.named_parameters() if p is param)


def test_trained_copies_are_made_per_call_and_die_after_their_step():
    model = tiny_flux()
    mover = TrainedRecorder()
    count = 2
    blocks = swappable_blocks(model)[-count:]
    names = [[n for n, _ in block.named_parameters()] for block in blocks]
    _run(model, flux_inputs, 1, swap=count, mover=mover)
    gc.collect()
    forward = [("copy", i, n) for i in range(count) for n in names[i]]
    assert mover.events[: len(forward)] == forward
    rest = mover.events[len(forward) :]
    # backward: each block recomputed (last first, its weights copied in again), then a copy per weight to step
    for i in reversed(range(count)):
        recompute = [("copy", i, n) for n in names[i]]
        assert rest[: len(recompute)] == recompute
        rest = rest[len(recompute) :]
        stepped = sorted(e for e in rest if e[1] == i)
        assert stepped == sorted(recompute)
        rest = [e for e in rest if e[1] != i]
    assert rest == []
    assert mover.copies and all(ref() is None for ref in mover.copies)


def test_the_forward_keeps_no_trained_copy_alive():
    model = tiny_flux()
    mover = TrainedRecorder()
    BlockSwap(model, 2, "cpu", mover=mover, trained=True)
    out = model(**flux_inputs())[0]
    gc.collect()
    assert mover.copies and all(ref() is None for ref in mover.copies)
    assert out.requires_grad
    # and a backward with nothing to step them is an error, not a silent loss of their gradients
    with pytest.raises(SdcoreError, match="--fused-backward-pass"):
        out.square().mean().backward()


def test_sampling_without_autograd_uses_the_current_weights():
    base = tiny_flux()
    swapped = copy.deepcopy(base)
    BlockSwap(swapped, 4, "cpu", trained=True)
    with torch.no_grad():
        assert torch.equal(swapped(**flux_inputs())[0], base(**flux_inputs())[0])


def _options(**kw):
    from sdcore.train.options import TrainOptions

    return TrainOptions(**{"model": "m", "data": "d", "output": "o", "resolution": 256, **kw})


def test_the_preflight_swaps_trained_weights_only_with_the_fused_backward_pass(flux_like):
    from sdcore.train.memory import count_parameters
    from sdcore.train.memory_options import model_problems

    layout, bundle = flux_like
    bundle.transformer.requires_grad_(True)
    full = count_parameters(bundle, [{"params": list(bundle.transformer.parameters())}], whole_model_result=True)
    fused = dict(fused_backward_pass=True, optimizer="adafactor")
    assert model_problems(_options(blocks_to_swap=5, **fused), layout, full) == []
    assert model_problems(_options(blocks_to_swap=6, **fused), layout, full) == [
        "--blocks-to-swap 6: the toy FLUX.1 transformer has only 5 transformer blocks; choose 1 to 5"
    ]
    (plain,) = model_problems(_options(blocks_to_swap=2), layout, full)
    assert plain.startswith("--blocks-to-swap 2: this method trains the swapped blocks' own weights")
    assert "add --fused-backward-pass with --optimizer adafactor" in plain
    (blockwise,) = model_problems(_options(blocks_to_swap=2, blockwise_fused_optimizers=True), layout, full)
    assert "use --fused-backward-pass" in blockwise


@pytest.mark.parametrize("full_bf16", [False, True])
def test_the_memory_plan_moves_the_swapped_trained_weights_to_host_memory(flux_like, full_bf16):
    import dataclasses

    from sdcore.train.memory import count_parameters, estimate_memory

    layout, bundle = flux_like
    transformer = bundle.transformer.requires_grad_(True)
    full = count_parameters(bundle, [{"params": list(transformer.parameters())}], whole_model_result=True)
    precision = dict(mixed_precision="bf16", full_bf16=True) if full_bf16 else {}
    base = _options(fused_backward_pass=True, optimizer="adafactor", **precision)
    plain = estimate_memory(layout, full, base, device="cuda")
    swapped = estimate_memory(layout, full, dataclasses.replace(base, blocks_to_swap=3), device="cuda")
    per = 2 if full_bf16 else 4  # the trained weights' bytes
    last3 = [sum(p.numel() for p in b.parameters()) * per for b in transformer.single_transformer_blocks]
    # device: the unswapped blocks' weights plus two swapped blocks in flight; host: the swapped weights
    assert plain.weights - swapped.weights == sum(last3) - sum(sorted(last3)[-2:])
    assert swapped.swapped_host == sum(last3) and plain.swapped_host == 0
    assert "MiB of swapped block weights" in swapped.line()
    # the optimizer states stay on the device (the step runs there, as kohya's); one gradient at a time
    assert swapped.optimizer == plain.optimizer and swapped.gradients == plain.gradients
    # without the fused backward pass nothing trained is swapped (the pre-flight refuses it)
    unfused = estimate_memory(layout, full, dataclasses.replace(base, blocks_to_swap=3, fused_backward_pass=False),
                              device="cuda")  # fmt: skip
    assert unfused.swapped_host == 0


def test_a_saved_and_loaded_optimizer_state_resumes_the_swapped_run_exactly():
    """The state is keyed by the CPU weight (saved and loaded like any other); a loaded state sits beside its
    weight (torch's rule) and moves to the step's device at its first step."""
    base = tiny_flux()
    first = copy.deepcopy(base)
    _run(base, flux_inputs, 2)  # the uninterrupted unswapped run
    _, opt, _swap = _run(first, flux_inputs, 1, swap=3)
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(first.state_dict())

    resumed = tiny_flux()
    resumed.load_state_dict(saved_model)
    params = list(resumed.parameters())
    optimizer = create_optimizer(
        "adafactor", [{"params": params}], lr=1e-3, args="relative_step=False scale_parameter=False warmup_init=False"
    )
    optimizer.load_state_dict(saved_opt)
    hooks = StepInBackward(optimizer, params, max_grad_norm=0.0, seed=7, stochastic_bf16=True)
    installed = BlockSwap(resumed, 3, "cpu", trained=True)
    installed.stepper = hooks.step_swapped
    hooks.begin(1)
    batch = flux_inputs()
    batch["hidden_states"] = batch["hidden_states"] + 0.1
    (resumed(**batch)[0] - 0.5).square().mean().backward()
    hooks.end()
    for (name, got), want in zip(resumed.state_dict().items(), base.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


def test_the_plan_offers_block_swap_to_a_fused_full_fine_tune(flux_like):
    from sdcore.train.memory import count_parameters, estimate_memory, suggestions

    layout, bundle = flux_like
    bundle.transformer.requires_grad_(True)
    full = count_parameters(bundle, [{"params": list(bundle.transformer.parameters())}], whole_model_result=True)
    fused = _options(fused_backward_pass=True, optimizer="adafactor", gradient_checkpointing=True)
    offered = {s.flags: s for s in suggestions(layout, full, fused, 1, device="cuda", steps_in_backward=True)}
    swap = [f for f in offered if "--blocks-to-swap" in f]
    assert swap and estimate_memory(layout, full, fused, device="cuda").total > offered[swap[0]].estimate.total
    plain = _options(gradient_checkpointing=True)  # without it the swap would be refused: not offered
    assert not any("--blocks-to-swap" in s.flags for s in suggestions(layout, full, plain, 1, device="cuda"))


def test_the_memory_plan_counts_the_swapped_weights_ema_in_host_memory(flux_like):
    """--ema averages each trained weight where it lives (``WeightEMA``: ``--ema-device same`` puts the shadow
    beside its weight), so the swapped blocks' fp32 averages are host memory, not device memory."""
    import dataclasses

    from sdcore.train.ema import WeightEMA
    from sdcore.train.memory import count_parameters, estimate_memory

    layout, bundle = flux_like
    transformer = bundle.transformer.requires_grad_(True)
    full = count_parameters(bundle, [{"params": list(transformer.parameters())}], whole_model_result=True)
    base = _options(fused_backward_pass=True, optimizer="adafactor", ema=True, blocks_to_swap=3)
    plain = estimate_memory(layout, full, dataclasses.replace(base, blocks_to_swap=0), device="cuda")
    swapped = estimate_memory(layout, full, base, device="cuda")
    last3 = sum(p.numel() for b in transformer.single_transformer_blocks for p in b.parameters())
    # what the runtime does: the average of a weight kept on the CPU is on the CPU
    on_cpu = torch.nn.Parameter(torch.zeros(2))
    assert WeightEMA([on_cpu], decay=0.9).shadow[0].device.type == "cpu"
    assert plain.ema == full.trainable * 4
    assert swapped.ema == (full.trainable - last3) * 4
    weights_only = estimate_memory(layout, full, dataclasses.replace(base, ema=False), device="cuda")
    assert swapped.swapped_host == weights_only.swapped_host + last3 * 4
    # --ema-device cpu: no EMA on the device either way
    cpu = estimate_memory(layout, full, dataclasses.replace(base, ema_device="cpu"), device="cuda")
    assert cpu.ema == 0 and cpu.swapped_host == weights_only.swapped_host

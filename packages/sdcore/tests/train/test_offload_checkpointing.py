"""--cpu-offload-checkpointing: checkpointed blocks keep their inputs on the offload device, exactly."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
from sdcore.train.offload_checkpointing import ActivationOffload
from test_block_swap import Lora, flux_inputs, sd3_inputs, step, tiny_flux, tiny_sd3


class Recording(ActivationOffload):
    """Real copies on one CPU (``always_copy``), each move recorded: the host copies made for the
    checkpoint (``kept_copies``, with the tensor each came from) and the copies blocks compute on."""

    always_copy = True

    def __init__(self) -> None:
        super().__init__("cpu", "cpu")
        self.offloaded: list[tuple[weakref.ref, weakref.ref]] = []  # (source, host copy)
        self.fetched: list[weakref.ref] = []

    def to_offload(self, tensor):
        copy_ = super().to_offload(tensor)
        self.offloaded.append((weakref.ref(tensor), weakref.ref(copy_)))
        return copy_

    def to_compute(self, tensor):
        copy_ = super().to_compute(tensor)
        self.fetched.append(weakref.ref(copy_))
        return copy_


def _blocks(model):
    return [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]


def _watch_block_inputs(model):
    """Weak references to the hidden-state tensors each block is called with (first call only: the forward)."""
    seen: list[weakref.ref] = []

    def hook(module, args, kwargs):
        tensor = args[0] if args else kwargs["hidden_states"]
        seen.append(weakref.ref(tensor))

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in _blocks(model)]
    return seen, handles


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_offloaded_checkpointing_equals_plain_checkpointing_bit_for_bit(family):
    build, inputs = (tiny_flux, flux_inputs) if family == "flux" else (tiny_sd3, sd3_inputs)
    plain = build().requires_grad_(False)
    offloaded = copy.deepcopy(plain)
    plain.enable_gradient_checkpointing()
    mover = Recording()
    offloaded.enable_gradient_checkpointing(gradient_checkpointing_func=mover)
    lora_plain, lora_offloaded = Lora(plain), Lora(offloaded)
    for _ in range(2):
        loss_ref, grads_ref = step(plain, inputs(), lora_plain)
        loss, grads = step(offloaded, inputs(), lora_offloaded)
        assert torch.equal(loss, loss_ref)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))
    assert mover.offloaded and mover.fetched  # the moves ran (real copies on this machine)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_what_the_checkpoint_keeps_is_the_host_copy_and_blocks_compute_on_device_copies(family):
    build, inputs = (tiny_flux, flux_inputs) if family == "flux" else (tiny_sd3, sd3_inputs)
    model = build().requires_grad_(False)
    mover = Recording()
    model.enable_gradient_checkpointing(gradient_checkpointing_func=mover)
    lora = Lora(model)
    seen, handles = _watch_block_inputs(model)
    args = inputs()
    x = args["hidden_states"].clone().requires_grad_(True)
    out = model(**{**args, "hidden_states": x})[0]
    loss = (out - 0.5).square().mean()
    for h in handles:
        h.remove()
    gc.collect()
    blocks = len(_blocks(model))
    assert len(seen) == blocks
    # each block computed on a copy the mover made for the compute device...
    fetched = {id(r()) for r in mover.fetched if r() is not None}
    assert all(r() is None or id(r()) in fetched for r in seen)
    # ...and between forward and backward none of those device copies is alive: only the host copies are
    assert all(r() is None for r in seen)
    kept = [c for _, c in mover.offloaded]
    assert all(c() is not None and c().device == mover.offload for c in kept)
    # only the hidden states moved (at most two per block); a tensor every block gets (temb, rotary
    # embedding) stays on the device, as kohya and OneTrainer keep it
    sources = [s() for s, _ in mover.offloaded]
    assert len({id(s) for s in sources if s is not None}) == len([s for s in sources if s is not None])
    assert blocks <= len(mover.offloaded) <= blocks * 2
    forward_fetches = len(mover.fetched)
    torch.autograd.grad(loss, [*lora.params, x])
    del loss, out
    gc.collect()
    assert len(mover.fetched) == 2 * forward_fetches  # the recompute fetched every input again
    assert all(c() is None for c in kept)  # backward released the host copies


def _full_step(model, args, micro_steps):
    """A full fine-tune's gradients (every weight) and each micro-step's model-input gradient."""
    model.zero_grad(set_to_none=True)
    losses, input_grads = [], []
    for m in range(micro_steps):
        x = args["hidden_states"].clone().requires_grad_(True)
        loss = (model(**{**args, "hidden_states": x})[0] - 0.5).square().mean() * (m + 1)
        loss.backward()
        losses.append(loss.detach())
        input_grads.append(x.grad)
    return losses, {n: p.grad for n, p in model.named_parameters()}, input_grads


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("micro_steps", [1, 2])
def test_full_fine_tune_gradients_equal_plain_checkpointing_bit_for_bit(family, micro_steps):
    """Every weight trains (DreamBooth): the time/guidance/pooled-text embedders' gradients too. Their output
    ``temb`` goes to every block and to the final norm; plain checkpointing sums each use's gradient into it in
    turn, and a host copy shared by the blocks would sum the blocks' part first (another rounding). So ``temb``
    and the rotary embedding stay on the device, as kohya keeps ``vec``/``pe`` there (flux_models.py
    ``DoubleStreamBlock.forward``: only the previous block's outputs come back from ``to_cpu``) and OneTrainer
    offloads only ``hidden_states``/``encoder_hidden_states`` (checkpointing_util.py
    ``enable_checkpointing_for_flux_transformer``)."""
    build, inputs = (tiny_flux, flux_inputs) if family == "flux" else (tiny_sd3, sd3_inputs)
    plain = build()
    offloaded = copy.deepcopy(plain)
    plain.enable_gradient_checkpointing()
    mover = Recording()
    offloaded.enable_gradient_checkpointing(gradient_checkpointing_func=mover)
    for _ in range(2):
        args = inputs()
        losses_ref, grads_ref, x_grads_ref = _full_step(plain, args, micro_steps)
        losses, grads, x_grads = _full_step(offloaded, args, micro_steps)
        assert all(torch.equal(a, b) for a, b in zip(losses, losses_ref, strict=True))
        assert all(g is not None for g in grads_ref.values())
        assert [n for n in grads if not torch.equal(grads[n], grads_ref[n])] == []
        assert all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in zip(x_grads, x_grads_ref, strict=True))
        for model, g in ((plain, grads_ref), (offloaded, grads)):  # the same plain SGD step on both
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p -= 1e-2 * g[n]
    assert mover.offloaded and mover.fetched


def test_plain_checkpointing_keeps_the_block_inputs_themselves():
    """The control of the test above: without the offload the tensors blocks were called with stay alive."""
    model = tiny_flux().requires_grad_(False)
    model.enable_gradient_checkpointing()
    Lora(model)
    seen, handles = _watch_block_inputs(model)
    out = model(**flux_inputs())[0]
    for h in handles:
        h.remove()
    gc.collect()
    assert sum(r() is not None for r in seen) >= len(_blocks(model)) - 1
    del out


def test_the_checkpoint_gets_a_compute_device_tensor_for_its_random_state(monkeypatch):
    """torch's checkpoint restores the random state of its tensor arguments' devices; with every input on
    the host it would skip the GPU's (dropout in a block would then recompute other masks)."""
    import torch.utils.checkpoint as ckpt

    got = []
    real = ckpt.checkpoint

    def spy(function, *args, **kwargs):
        got.append(args[0])
        return real(function, *args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", spy)
    model = tiny_sd3().requires_grad_(False)
    mover = ActivationOffload("cpu")
    model.enable_gradient_checkpointing(gradient_checkpointing_func=mover)
    Lora(model)
    model(**sd3_inputs())
    assert got and all(t is mover.anchor and t.device == mover.compute and t.numel() == 0 for t in got)


def _options(**kw):
    from sdcore.train.options import TrainOptions

    return TrainOptions(**{"model": "m", "data": "d", "output": "o", "resolution": 256, **kw})


def test_option_checks_and_family_refusals():
    from sdcore.train.offload_checkpointing import offload_family_problems, offload_notes
    from sdcore.train.preflight import option_problems

    both = option_problems(_options(cpu_offload_checkpointing=True, blocks_to_swap=2))
    assert any("--cpu-offload-checkpointing with --blocks-to-swap" in p for p in both)
    assert not [p for p in option_problems(_options(cpu_offload_checkpointing=True)) if "offload" in p]
    for family in ("sd1", "sd2", "sdxl"):
        (line,) = offload_family_problems(_options(cpu_offload_checkpointing=True), family)
        assert "has no such blocks" in line and "--gradient-checkpointing" in line
    for family in ("flux", "sd3", "chroma"):
        assert offload_family_problems(_options(cpu_offload_checkpointing=True), family) == []
    assert offload_family_problems(_options(), "sd1") == []
    assert offload_notes(_options(cpu_offload_checkpointing=True))
    assert offload_notes(_options(cpu_offload_checkpointing=True, gradient_checkpointing=True)) == []


def test_memory_plan_moves_the_block_inputs_to_the_host(flux_like):
    from sdcore.models.family import get_family
    from sdcore.train.memory import FLUX_ACTIVATION_CONSTANTS, count_parameters, estimate_memory, transformer_tokens

    layout, bundle = flux_like
    bundle.transformer.requires_grad_(False)
    params = count_parameters(bundle, [{"params": [torch.nn.Parameter(torch.zeros(8))]}], whole_model_result=False)
    plain = estimate_memory(layout, params, _options(gradient_checkpointing=True), device="cuda")
    off = estimate_memory(layout, params, _options(cpu_offload_checkpointing=True), device="cuda")
    # the formula, rewritten: a block input is D (N + T); 5 blocks; the largest block Flux's double-stream one
    family = get_family(layout.family)
    vae = layout.configs["vae"].get("block_out_channels", (128, 256, 512, 512))
    side = 256 / 2 ** (len(vae) - 1)
    n = transformer_tokens(layout.configs["transformer"], side * side, family.latent.channels)
    inputs = 4 * 16 * (n + family.context_tokens)
    k_double, k_single = FLUX_ACTIVATION_CONSTANTS["adapter"]
    largest = max(k_double, k_single) * inputs
    assert plain.activations == math.ceil(4 * (5 * inputs + largest))
    assert off.host == math.ceil(4 * 5 * inputs)
    assert off.activations == math.ceil(4 * (largest + 2 * inputs))
    assert off.total == plain.total - plain.activations + off.activations  # the host part is not the device's
    assert off.settings["gradient_checkpointing"] and off.settings["cpu_offload_checkpointing"]
    assert "in host memory:" in off.line() and "in host memory" not in plain.line()
    # on the CPU host and device are one memory: the same as plain checkpointing
    on_cpu = estimate_memory(layout, params, _options(cpu_offload_checkpointing=True), device="cpu")
    assert on_cpu.host == 0
    assert on_cpu.total == estimate_memory(layout, params, _options(gradient_checkpointing=True), device="cpu").total


def test_onetrainer_activation_offloading_of_the_transformer_is_the_option(tmp_path):
    """OneTrainer keeps a checkpointed layer's inputs on its temp device (``LayerOffloadConductor.after_layer``)
    when the part has ``activation_offloading``: the option on a transformer; a UNet's stays a note."""
    from test_onetrainer_losses import FLUX, SD15, _load_noted

    notes: list[str] = []
    part = {"train": True, "gradient_checkpointing": True, "activation_offloading": True}
    o = _load_noted(tmp_path, {**FLUX, "transformer": part}, notes)
    assert o.cpu_offload_checkpointing and o.gradient_checkpointing
    assert not any("transformer: offloading" in n for n in notes), notes
    o = _load_noted(tmp_path, {**FLUX, "transformer": {**part, "gradient_checkpointing": False}}, notes)
    assert not o.cpu_offload_checkpointing  # no checkpointing, no checkpointed inputs to keep
    o = _load_noted(tmp_path, {**FLUX, "transformer": {**part, "offload_fraction": 0.5}}, notes)
    assert o.cpu_offload_checkpointing and any("transformer: offloading accepted" in n for n in notes)
    unet_notes: list[str] = []
    o = _load_noted(tmp_path, {**SD15, "unet": part}, unet_notes)
    assert not o.cpu_offload_checkpointing and any("unet: offloading accepted" in n for n in unet_notes)

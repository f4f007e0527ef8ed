"""--blocks-to-swap: swapped blocks compute on device copies of their weights, exactly."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from sdcore.errors import ConfigError
from sdcore.train.block_swap import BlockSwap, WeightMover, block_sizes, swappable_blocks
from torch import nn


def tiny_flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=12,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )


def tiny_sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=16,
    )


def flux_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    img, txt = 16, 5
    return {
        "hidden_states": torch.randn(2, img, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, txt, 16, generator=g),
        "pooled_projections": torch.randn(2, 12, generator=g),
        "timestep": torch.tensor([0.3, 0.8]),
        "guidance": torch.tensor([3.5, 3.5]),
        "img_ids": torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
        ).reshape(-1, 3),
        "txt_ids": torch.zeros(txt, 3),
        "return_dict": False,
    }


def sd3_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 6, 16, generator=g),
        "pooled_projections": torch.randn(2, 12, generator=g),
        "timestep": torch.tensor([300.0, 800.0]),
        "return_dict": False,
    }


class Lora:
    """A LoRA-like adapter set (trainable factors outside the model, forward hooks on its Linears,
    as sdplugin-lora attaches them) on every attention projection of the blocks."""

    def __init__(self, model: nn.Module) -> None:
        torch.manual_seed(5)
        self.params: list[nn.Parameter] = []
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ("to_q" in name or "to_v" in name or "proj_mlp" in name):
                down = nn.Parameter(torch.randn(2, module.in_features) * 0.1)
                up = nn.Parameter(torch.randn(module.out_features, 2) * 0.1)
                self.params += [down, up]
                self.handles.append(module.register_forward_hook(self._hook(down, up)))

    @staticmethod
    def _hook(down, up):
        return lambda module, args, output: output + args[0] @ down.t() @ up.t()


def step(model, inputs, lora):
    """One loss and its gradients (adapter factors and the input)."""
    x = inputs["hidden_states"].clone().requires_grad_(True)
    out = model(**{**inputs, "hidden_states": x})[0]
    loss = (out - 0.5).square().mean()
    grads = torch.autograd.grad(loss, [*lora.params, x])
    return loss.detach(), grads


class RecordingMover(WeightMover):
    """Copies from clean weights kept aside (the blocks' own parameters are poisoned with NaN, so a
    computation that used them could not match), records each move, and tracks every copy."""

    def __init__(self, blocks):
        super().__init__("cpu")
        self.clean = [{k: v.detach().clone() for k, v in (*b.named_parameters(), *b.named_buffers())} for b in blocks]
        self.events: list[tuple[str, int]] = []
        self.copies: list[weakref.ref] = []

    def to_device(self, index, block):
        self.events.append(("in", index))
        tensors = {k: v.clone() for k, v in self.clean[index].items()}
        self.copies += [weakref.ref(t) for t in tensors.values()]
        return tensors

    def release(self, index):
        self.events.append(("out", index))


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapped_blocks_give_the_same_losses_and_gradients_bit_for_bit(family, checkpointing):
    build, inputs = (tiny_flux, flux_inputs) if family == "flux" else (tiny_sd3, sd3_inputs)
    base = build().requires_grad_(False)
    swapped = copy.deepcopy(base)
    if checkpointing:
        base.enable_gradient_checkpointing()
        swapped.enable_gradient_checkpointing()
    lora_base, lora_swapped = Lora(base), Lora(swapped)
    loss_ref, grads_ref = step(base, inputs(), lora_base)

    blocks = swappable_blocks(swapped)
    count = 3
    mover = RecordingMover(blocks[-count:])
    BlockSwap(swapped, count, "cpu", mover=mover)
    with torch.no_grad():
        for block in blocks[-count:]:
            for p in block.parameters():
                p.fill_(float("nan"))

    x = inputs()["hidden_states"].clone().requires_grad_(True)
    out = swapped(**{**inputs(), "hidden_states": x})[0]
    gc.collect()
    # after the forward no swapped weight copy is alive: autograd holds none of them
    assert mover.copies and all(ref() is None for ref in mover.copies)
    forward_events = list(mover.events)
    assert forward_events == [(e, i) for i in range(count) for e in ("in", "out")]
    loss = (out - 0.5).square().mean()
    grads = torch.autograd.grad(loss, [*lora_swapped.params, x])
    # backward recomputes the swapped blocks last to first, each moved in and out again
    assert mover.events[len(forward_events) :] == [(e, i) for i in reversed(range(count)) for e in ("in", "out")]
    assert torch.equal(loss, loss_ref)
    for got, want in zip(grads, grads_ref, strict=True):
        assert got.abs().sum() > 0
        assert torch.equal(got, want)
    # without autograd (sampling): moved in and out once each, still the same output
    mover.events.clear()
    with torch.no_grad():
        out_ng = swapped(**inputs())[0]
        out_ref = base(**inputs())[0]
    assert torch.equal(out_ng, out_ref)
    assert mover.events == [(e, i) for i in range(count) for e in ("in", "out")]


def test_the_default_mover_trains_identically_and_keeps_weights_on_the_cpu():
    base = tiny_flux().requires_grad_(False)
    swapped = copy.deepcopy(base)
    lora_base, lora_swapped = Lora(base), Lora(swapped)
    swap = BlockSwap(swapped, 5, "cpu")
    assert len(swap.blocks) == 5 and isinstance(swap.mover, WeightMover)
    for _ in range(2):  # two optimizer steps on both: still equal
        (loss_a, grads_a), (loss_b, grads_b) = (
            step(base, flux_inputs(), lora_base),
            step(swapped, flux_inputs(), lora_swapped),
        )
        assert torch.equal(loss_a, loss_b)
        with torch.no_grad():
            for p, q, ga, gb in zip(lora_base.params, lora_swapped.params, grads_a, grads_b, strict=False):
                assert torch.equal(ga, gb)
                p -= 0.1 * ga
                q -= 0.1 * gb
    swap.remove()
    assert swapped.single_transformer_blocks[0].forward.__func__ is type(swapped.single_transformer_blocks[0]).forward


def test_wrong_counts_are_clear_errors():
    model = tiny_flux()
    assert len(swappable_blocks(model)) == 5
    with pytest.raises(ConfigError, match="has only 5 transformer blocks; choose 1 to 5"):
        BlockSwap(model, 6, "cpu")
    with pytest.raises(ConfigError, match="0 \\(off\\) or more"):
        BlockSwap(model, -1, "cpu")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        sample_size=8,
    )
    with pytest.raises(ConfigError, match="no repeated transformer blocks to swap"):
        BlockSwap(unet, 1, "cpu")


def test_block_sizes_count_frozen_and_fp8_elements():
    model = tiny_flux().requires_grad_(False)
    sizes = block_sizes(model)
    assert len(sizes) == 5
    for (frozen, fp8), block in zip(sizes, swappable_blocks(model), strict=True):
        assert frozen == sum(p.numel() for p in block.parameters())
        linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
        assert fp8 == linear and 0 < fp8 < frozen
    # a trainable weight is neither swapped nor stored in fp8
    first = swappable_blocks(model)[0]
    first.attn.to_q.weight.requires_grad_(True)
    frozen, fp8 = block_sizes(model)[0]
    assert (frozen, fp8) == (sizes[0][0] - first.attn.to_q.weight.numel(), sizes[0][1] - first.attn.to_q.weight.numel())

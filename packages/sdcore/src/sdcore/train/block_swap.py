"""Block swap (``--blocks-to-swap N``, kohya's ``--blocks_to_swap``): the frozen weights of the
last N repeated blocks of a transformer denoiser stay in CPU memory and visit the training device
only while their block computes.

How, and why this way:

- The swapped blocks' parameters never leave the CPU. Each call of a swapped block makes device
  copies of its frozen parameters and buffers (:meth:`WeightMover.to_device`) and runs the block's
  own forward on those copies (``torch.func.functional_call``). The copies are plain tensors owned
  by that call: when the forward returns, only autograd can still hold them.
- Autograd must not hold them across the whole forward, or every swapped block would be back on
  the device by the end of it. So a swapped block always runs under activation checkpointing
  (``torch.utils.checkpoint``, non-reentrant): its forward keeps nothing, and in backward the block
  is recomputed, which copies its weights in again, and autograd frees that copy once the block's
  gradients are done. Under ``--gradient-checkpointing`` the denoiser already checkpoints every
  block (diffusers' ``gradient_checkpointing``), so the swap adds no second checkpoint then.
- Because the copies are new tensors with the same values, the swap changes no number: losses and
  gradients equal the unswapped run bit for bit (tested on CPU with a recording mover).
- Trainable parameters inside a swapped block (rare for adapters: LoRA factors live outside the
  blocks) stay on the device and are used as they are, unless the swap trains them (below).

Trained weights (a full fine-tune with ``--fused-backward-pass``, kohya's ``flux_train.py`` /
``sd3_train.py`` ``--blocks_to_swap``): kohya keeps the swapped blocks' trained weights on the CPU
and can only step them inside backward, while a block's weights are on the device (after backward
they are back on the CPU, away from their gradients), so its README pairs ``--blocks_to_swap`` with
``--fused_backward_pass``; sdcore refuses the swap of trained weights without it. Here the master
weights stay on the CPU (pinned on a GPU) and each call gets a device copy through
:class:`_TrainedCopy`, an autograd function whose backward receives the copy's whole gradient (all
its uses in the block summed) on the device. There, instead of handing a gradient to the CPU
weight, it makes a device copy of the weight (the step's copy: the recomputed one may already be
freed), lets ``stepper`` (:meth:`sdcore.train.fused.StepInBackward.step_swapped`) step that copy
with the device gradient and the optimizer state on the device (where kohya's Adafactor creates it:
like the gradient), and copies the stepped weights back into the CPU master. The CPU weight never
gets a ``.grad``. Each tensor's step is the unswapped fused step on the same values, so the weights
after N steps equal the unswapped run's bit for bit (tested on CPU). Per block and step: one copy in
(forward), one in (recompute), and one in and out per trained tensor (the step), as kohya's swap
moves a block in and out in forward and in backward.

Which blocks: the denoiser's repeated block lists its family declares
(``ModelFamily.block_lists``, :func:`block_list_names`; by default :data:`BLOCK_LISTS`, SD3's
``transformer_blocks``, Flux's ``transformer_blocks`` then ``single_transformer_blocks``), in forward
order; the last N are swapped. The memory plan counts the same declaration. A UNet has no such lists: the pre-flight refuses ``--blocks-to-swap``
there. With ``accelerate``/DDP each process swaps its own copy (the swapped weights are frozen and
outside what DDP wraps; trained ones only step in backward, which refuses several processes); sharding engines (FSDP, DeepSpeed ZeRO-3) place weights themselves and
should not be combined with it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import ConfigError, SdcoreError
from ..models.family import DEFAULT_BLOCK_LISTS

#: attribute names of a denoiser's repeated-block ``ModuleList``s, in forward order (the families' default)
BLOCK_LISTS = tuple(block.attribute for block in DEFAULT_BLOCK_LISTS)


def block_list_names(bundle: Any) -> tuple[str, ...]:
    """The block lists ``bundle``'s family declares (``ModelFamily.block_lists``), :data:`BLOCK_LISTS` for a
    bundle-like object without a known family."""
    try:
        return tuple(block.attribute for block in bundle.family_spec.block_lists)
    except (AttributeError, SdcoreError):
        return BLOCK_LISTS


def swappable_blocks(denoiser: nn.Module, lists: Sequence[str] = BLOCK_LISTS) -> list[nn.Module]:
    """The denoiser's repeated transformer blocks in forward order (empty for a UNet): the ``ModuleList``s
    named ``lists`` (the family's, :func:`block_list_names`)."""
    blocks: list[nn.Module] = []
    for name in lists:
        found = getattr(denoiser, name, None)
        if isinstance(found, nn.ModuleList):
            blocks.extend(found)
    return blocks


def blocks_to_swap_problem(count: int, available: int, what: str) -> str | None:
    """Why ``--blocks-to-swap count`` cannot apply to a denoiser with ``available`` blocks."""
    if count < 0:
        return f"--blocks-to-swap must be 0 (off) or more, got {count}"
    if count == 0:
        return None
    if available == 0:
        return (
            f"--blocks-to-swap: {what} has no repeated transformer blocks to swap (block swap is for the "
            "transformer families, SD3 and Flux); use --gradient-checkpointing and --fp8-base to save memory"
        )
    if count > available:
        return f"--blocks-to-swap {count}: {what} has only {available} transformer blocks; choose 1 to {available}"
    return None


class Mover(Protocol):
    """Makes a block's device copies (``to_device``) and is told when the swap drops them (``release``)."""

    def to_device(self, index: int, block: nn.Module) -> dict[str, torch.Tensor]: ...

    def release(self, index: int) -> None: ...


class WeightMover:
    """Copies a block's frozen parameters and buffers to ``device`` (from pinned CPU memory on a GPU,
    so the copy can run asynchronously)."""

    def __init__(self, device: Any) -> None:
        self.device = torch.device(device)

    def to_device(self, index: int, block: nn.Module) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in (*block.named_parameters(), *block.named_buffers()):
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                continue  # trainable: stays on the device as itself
            tensors[name] = tensor.detach().to(self.device, copy=True, non_blocking=True)
        return tensors

    def release(self, index: int) -> None:
        """Nothing to do: the copies die with their last reference (the swap's or autograd's)."""

    def trained_to_device(self, index: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A device copy of the trained weight ``name`` of swapped block ``index`` (its value, no autograd)."""
        return tensor.detach().to(self.device, copy=True, non_blocking=True)


#: ``stepper(weight, device_copy, device_grad)``: step ``device_copy`` in place as ``weight`` would step
Stepper = Callable[[nn.Parameter, torch.Tensor, torch.Tensor], None]


class _TrainedCopy(torch.autograd.Function):
    """A trained weight's device copy whose gradient steps the weight instead of reaching it."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, copy: torch.Tensor, swap: BlockSwap, index: int, name: str) -> Any:
        ctx.weight, ctx.swap, ctx.index, ctx.name = weight, swap, index, name
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        ctx.swap._step(ctx.weight, ctx.index, ctx.name, grad)
        return None, None, None, None, None


def _pin(tensor: torch.Tensor) -> torch.Tensor:
    try:
        return tensor.pin_memory()
    except RuntimeError:  # no pinnable memory here: plain copies still work
        return tensor


class BlockSwap:
    """The swap installed on one denoiser; :meth:`remove` undoes it (all weights back to the device).

    ``trained``: the swapped blocks' trainable weights stay on the CPU too and step in backward through
    :attr:`stepper` (set once the optimizer exists; a backward without it is an error)."""

    def __init__(self, denoiser: nn.Module, count: int, device: Any, mover: Mover | None = None,
                 lists: Sequence[str] = BLOCK_LISTS, *, trained: bool = False) -> None:  # fmt: skip
        blocks = swappable_blocks(denoiser, lists)
        problem = blocks_to_swap_problem(count, len(blocks), type(denoiser).__name__)
        if problem:
            raise ConfigError(problem)
        self.denoiser = denoiser
        self.device = torch.device(device)
        self.mover: Mover = mover or WeightMover(device)
        self.trained = trained
        self.stepper: Stepper | None = None
        self.blocks = blocks[len(blocks) - count :] if count else []
        self._originals: list[Callable[..., Any]] = []
        self._inside: set[int] = set()
        for index, block in enumerate(self.blocks):
            self._install(index, block)

    def _install(self, index: int, block: nn.Module) -> None:
        pinned = self.device.type == "cuda"
        trained = [(name, p) for name, p in block.named_parameters() if p.requires_grad] if self.trained else []
        for tensor in (*block.parameters(), *block.buffers()):
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad and not self.trained:
                tensor.data = tensor.data.to(self.device)
            else:
                data = tensor.data.to("cpu")
                tensor.data = _pin(data) if pinned else data
        original = block.forward
        self._originals.append(original)
        key = id(block)

        def run(*args: Any, **kwargs: Any) -> Any:
            tensors = self.mover.to_device(index, block)
            for name, p in trained:
                copy = self._trained_copy(index, name, p)
                tensors[name] = _TrainedCopy.apply(p, copy, self, index, name) if torch.is_grad_enabled() else copy
            self._inside.add(key)
            try:
                return torch.func.functional_call(block, tensors, args, kwargs, strict=False)
            finally:
                self._inside.discard(key)
                del tensors
                self.mover.release(index)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if key in self._inside:  # functional_call calling the block itself: its own forward
                return original(*args, **kwargs)
            if torch.is_grad_enabled() and not getattr(self.denoiser, "gradient_checkpointing", False):
                from torch.utils.checkpoint import checkpoint

                return checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)  # no autograd, or the denoiser checkpoints each block already

        block.forward = forward  # type: ignore[method-assign]

    def _trained_copy(self, index: int, name: str, weight: torch.Tensor) -> torch.Tensor:
        own = getattr(self.mover, "trained_to_device", None)
        if own is not None:
            copied: torch.Tensor = own(index, name, weight)
            return copied
        return weight.detach().to(self.device, copy=True, non_blocking=True)

    def _step(self, weight: nn.Parameter, index: int, name: str, grad: torch.Tensor) -> None:
        """The backward of a trained weight's copy: step a fresh device copy with ``grad`` (the stepper's
        optimizer, its state on the device) and write the stepped values back into the CPU weight."""
        if self.stepper is None:
            raise SdcoreError(
                "--blocks-to-swap: a swapped block's trained weight got its gradient with nothing to step it "
                "(trained weights of swapped blocks step in backward: --fused-backward-pass)"
            )
        with torch.no_grad():
            copy = self._trained_copy(index, name, weight)
            self.stepper(weight, copy, grad)
            weight.copy_(copy)  # device to the (pinned) CPU master; blocking, so the next read sees it

    def remove(self) -> None:
        """Put every swapped block's weights on the device and its own forward back (for saving
        whole models or generating without the swap)."""
        for block, original in zip(self.blocks, self._originals, strict=True):
            block.forward = original  # type: ignore[method-assign]
            block.to(self.device)
        self.blocks, self._originals = [], []


def block_sizes(
    denoiser: nn.Module, *, trainable: Collection[int] | None = None, lists: Sequence[str] = BLOCK_LISTS
) -> list[tuple[int, int]]:
    """Per swappable block (forward order): (frozen elements, of which ``--fp8-base`` would store in
    fp8). ``trainable``: ids of the parameters that train (default: those requiring grad). Shapes
    only, so it works on a meta-device model (the memory plan)."""

    def trains(p: torch.Tensor) -> bool:
        return p.requires_grad if trainable is None else id(p) in trainable

    sizes = []
    for block in swappable_blocks(denoiser, lists):
        frozen = sum(p.numel() for p in block.parameters() if not trains(p))
        frozen += sum(b.numel() for b in block.buffers())
        layers = [m for m in block.modules() if type(m) in (nn.Linear, nn.Conv2d)]
        weights = [m.weight for m in layers if isinstance(m.weight, torch.Tensor)]
        fp8 = sum(w.numel() for w in weights if not trains(w) and w.is_floating_point())
        sizes.append((frozen, fp8))
    return sizes

"""``--cpu-offload-checkpointing`` (kohya's ``--cpu_offload_checkpointing``): gradient checkpointing whose
kept block inputs live in host memory.

With gradient checkpointing each transformer block keeps only its inputs between the forward and the
backward pass (the block is recomputed from them in backward). On a FLUX.1 run those inputs, one
hidden-state tensor per block (``D (N + T)`` elements, 57 blocks), are most of what the activations
still take on the device. This option keeps them in CPU memory instead: each checkpointed block call

1. copies its hidden-state inputs (:data:`OFFLOADED`) to the *offload device* (the CPU) outside the
   checkpoint, so the copies are what the checkpoint keeps for backward (the device tensors die once the next block has its output);
2. runs the block on the *compute device* (the training device) from copies of those inputs, inside
   ``torch.utils.checkpoint`` (non-reentrant), so the recompute in backward copies them in again;
3. returns the block's outputs on the compute device, so whatever the denoiser does between blocks
   (ControlNet residuals, Chroma's per-block modulation, the final norm) sees device tensors as before.

kohya moves each block's outputs to the CPU and its inputs back (``flux_models.py``'s ``to_cpu``/``to_cuda``
around the checkpointed ``_forward``), which needs the model's own forward to move the last output back;
diffusers' forwards cannot be edited, so here the move to the host happens at the next block's door instead:
what the checkpoint keeps is the same (every block's hidden states, on the host), and no tensor between
blocks changes device. Only the hidden states move (:data:`OFFLOADED`, by the block's parameter names):
the inputs every block gets (the timestep embedding, the rotary embedding, a mask) stay on the device, as
kohya keeps ``vec``/``pe`` there and OneTrainer offloads only ``hidden_states``/``encoder_hidden_states``.
They are small and alive on the device for the whole forward anyway, and moving them would change the
numbers: the timestep embedding's gradient (trained in a full fine-tune) would sum the blocks' parts
through the copy before adding the final norm's, another rounding than plain checkpointing's.

The copies are exact, so losses and gradients equal plain checkpointing's bit for bit (tested on CPU,
where :attr:`ActivationOffload.always_copy` makes the moves real copies a test can watch). One subtlety:
``torch.utils.checkpoint`` saves and restores the random state of the devices of its tensor *arguments*;
with every tensor argument on the CPU (a block given only hidden states) it would not restore the GPU's,
and a block with dropout (LoRA ``--network-dropout``, rank/module dropout) would recompute other masks. So each call also passes an empty
tensor on the compute device (:attr:`ActivationOffload.anchor`), as OneTrainer passes its dummy tensor.

Where: one wrapper for every transformer family, installed as diffusers' ``gradient_checkpointing_func``
(``ModelMixin.enable_gradient_checkpointing``): FLUX.1, Chroma (inside its masked checkpointing) and SD3 call
each block through it. kohya has it for FLUX.1 only (its SD3 and Chroma models ignore the flag); a UNet
(SD1/SD2/SDXL) is refused, as kohya's UNet scripts have no such path: its checkpointed pieces are ResNet
and attention layers whose inputs the memory plan does not count per block. It is refused with
``--blocks-to-swap`` (as kohya refuses the pair: both move block data between host and device, and the
swap keeps its own checkpoint for the swapped blocks). The fused backward pass, DDP and block-wise fused
optimizers are unaffected: they act on parameters and gradients, not on the checkpoint's inputs.

Import-light: torch is imported inside the functions and the class that need it.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..models.bundle import ModelBundle

FLAG = "--cpu-offload-checkpointing"

#: the block inputs kept in host memory: the previous block's outputs (kohya's ``img``/``txt``; OneTrainer's
#: ``include_from_offload_param_names`` for SD3/FLUX.1); a block without them offloads its first argument
OFFLOADED = ("hidden_states", "encoder_hidden_states")


def offloading(options: Any) -> bool:
    """The run keeps checkpointed block inputs in host memory."""
    return bool(getattr(options, "cpu_offload_checkpointing", False))


def checkpointing(options: Any) -> bool:
    """Gradient checkpointing is on: asked for, or turned on by :data:`FLAG` (as kohya's flux_train.py does)."""
    return bool(getattr(options, "gradient_checkpointing", False)) or offloading(options)


def offload_option_problems(options: Any) -> list[str]:
    """:data:`FLAG` with an option it cannot go with (the options alone)."""
    if not offloading(options):
        return []
    problems = []
    if getattr(options, "blocks_to_swap", 0):
        problems.append(
            f"{FLAG} with --blocks-to-swap: both move block data between host and device, and kohya refuses the "
            "pair too; choose one"
        )
    return problems


def offload_family_problems(options: Any, family: str) -> list[str]:
    """:data:`FLAG` on a family without repeated transformer blocks (a UNet)."""
    if not offloading(options):
        return []
    from ..errors import ConfigError
    from ..models.family import get_family

    try:
        spec = get_family(family)
    except ConfigError:
        return []
    if spec.denoiser == "unet" or not spec.block_lists:
        return [
            f"{FLAG}: keeps transformer blocks' inputs in host memory (SD3, FLUX.1, Chroma); the {spec.label} "
            f"{spec.denoiser} has no such blocks (kohya's UNet scripts have no such path either); use "
            "--gradient-checkpointing"
        ]
    return []


def offload_notes(options: Any) -> list[str]:
    """What the user may not expect (printed with the plan)."""
    if not offloading(options) or getattr(options, "gradient_checkpointing", False):
        return []
    return [f"{FLAG}: gradient checkpointing is on (the offload is part of it; kohya's flux_train.py turns it on too)"]


class ActivationOffload:
    """A diffusers ``gradient_checkpointing_func`` (``func(block, *args, **kwargs)``) that checkpoints the
    block with its inputs kept on :attr:`offload` and computes it on :attr:`compute` (see the module)."""

    #: make every move a real copy even where the devices are the same (tests on a CPU-only machine)
    always_copy: bool = False

    def __init__(self, compute: Any, offload: Any = "cpu") -> None:
        import torch

        self.compute = torch.device(compute)
        self.offload = torch.device(offload)
        #: an empty compute-device tensor each checkpoint gets, so it restores that device's random state
        self.anchor = torch.empty(0, device=self.compute)
        self._positions: dict[type, tuple[str, ...]] = {}

    def to_offload(self, tensor: torch.Tensor) -> torch.Tensor:
        """The host copy of one block input (differentiable: its gradient flows back to ``tensor``)."""
        return tensor.to(self.offload, copy=self.always_copy)

    def to_compute(self, tensor: torch.Tensor) -> torch.Tensor:
        """The compute-device copy a block runs on (in forward and again in the recompute)."""
        return tensor.to(self.compute, copy=self.always_copy)

    def _names(self, block: Any) -> tuple[str, ...]:
        """``block``'s positional parameter names (diffusers calls blocks positionally), once per block type."""
        kind = type(block)
        if kind not in self._positions:
            try:
                parameters = list(inspect.signature(block.forward).parameters.values())
            except (TypeError, ValueError):
                parameters = []
            self._positions[kind] = tuple(
                p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            )
        return self._positions[kind]

    def __call__(self, block: Any, *args: Any, **kwargs: Any) -> Any:
        import torch
        from torch.utils.checkpoint import checkpoint

        names = self._names(block)
        moved = {i for i, name in enumerate(names[: len(args)]) if name in OFFLOADED}
        moved_kw = {name for name in kwargs if name in OFFLOADED}
        if not moved and not moved_kw:
            moved = {0}  # not a diffusers block: its first argument, the hidden states by convention
        moved = {i for i in moved if i < len(args) and isinstance(args[i], torch.Tensor)}
        moved_kw = {name for name in moved_kw if isinstance(kwargs[name], torch.Tensor)}
        kept_args = [self.to_offload(a) if i in moved else a for i, a in enumerate(args)]
        kept_kwargs: dict[str, Any] = {k: self.to_offload(v) if k in moved_kw else v for k, v in kwargs.items()}

        def run(anchor: torch.Tensor, *inputs: Any, **named: Any) -> Any:
            inputs_ = [self.to_compute(a) if i in moved else a for i, a in enumerate(inputs)]
            named_ = {k: self.to_compute(v) if k in moved_kw else v for k, v in named.items()}
            return block(*inputs_, **named_)

        return checkpoint(run, self.anchor, *kept_args, use_reentrant=False, **kept_kwargs)


def enable_offload_checkpointing(bundle: ModelBundle, compute: Any, offload: Any = "cpu") -> ActivationOffload:
    """Gradient checkpointing of ``bundle``'s transformer through one :class:`ActivationOffload`; a family
    adapter with ``enable_gradient_checkpointing(bundle, gradient_checkpointing_func=...)`` (Chroma) is
    handed the function, the others get diffusers' own call with it."""
    from ..errors import ConfigError
    from ..models.family import family_adapter

    denoiser = bundle.denoiser
    if not getattr(denoiser, "_supports_gradient_checkpointing", False):
        raise ConfigError(f"{FLAG}: {type(denoiser).__name__} does not support diffusers' gradient checkpointing")
    offload_func = ActivationOffload(compute, offload)
    own = getattr(family_adapter(bundle.family_spec), "enable_gradient_checkpointing", None)
    if own is not None:
        own(bundle, gradient_checkpointing_func=offload_func)
    else:
        denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=offload_func)
    return offload_func

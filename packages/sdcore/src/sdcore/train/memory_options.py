"""The memory options on a run: their checks (pre-flight) and their application to the loaded model.

- ``--fp8-base`` (:mod:`sdcore.train.fp8`): converted on the CPU after the method prepared the model
  (so its trainable weights are known and skipped) and before placement, so the device only ever
  receives the 1-byte weights.
- ``--blocks-to-swap N`` (:mod:`sdcore.train.block_swap`): the last N transformer blocks are left
  on the CPU by placement and the swap is installed after it.
- gradient checkpointing and ``--mixed-precision bf16`` (frozen weights stored in bf16) are the
  placement's own (:mod:`sdcore.train.placement`).

Import-light: torch is imported inside the functions that need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle
    from ..models.layout import ModelLayout
    from .memory import ParameterPlan
    from .options import TrainOptions


def option_problems(options: TrainOptions, device: str | None = None) -> list[str]:
    """What is wrong with the memory options alone (negative counts, fp8 on a device without it)."""
    problems = []
    count = getattr(options, "blocks_to_swap", 0)
    if count < 0:
        problems.append(f"--blocks-to-swap must be 0 (off) or more, got {count}")
    if getattr(options, "fp8_base", False):
        from .fp8 import fp8_problem
        from .memory import training_device

        problem = fp8_problem(device or training_device())
        if problem:
            problems.append(problem)
    return problems


def model_problems(options: TrainOptions, layout: ModelLayout, params: ParameterPlan | None) -> list[str]:
    """What the memory options cannot do on this model with this method (from its layout and, when
    the plan could size it, the method's trainable parameters)."""
    from ..models.family import get_family
    from .block_swap import blocks_to_swap_problem

    problems: list[str] = []
    count = getattr(options, "blocks_to_swap", 0)
    fp8 = getattr(options, "fp8_base", False)
    try:
        family = get_family(layout.family)
    except ConfigError:
        return problems
    if params is not None and family.denoiser in params.trainable_in:
        for flag, on in (("--fp8-base", fp8), (f"--blocks-to-swap {count}", count > 0)):
            if on:
                problems.append(
                    f"{flag}: this method trains the {family.denoiser}'s own weights; the option applies to frozen "
                    "base weights (adapter training such as LoRA)"
                )
        return problems
    if count > 0:
        available = len(params.blocks) if params is not None else (0 if family.denoiser == "unet" else count)
        problem = blocks_to_swap_problem(count, available, f"the {family.label} {family.denoiser}")
        if problem:
            problems.append(problem)
    if fp8 and params is not None and params.denoiser_fp8 == 0:
        problems.append(f"--fp8-base: the {family.denoiser} has no frozen Linear/Conv2d weights to store in fp8")
    return problems


@dataclass
class MemorySetup:
    """What the memory options did to one loaded model."""

    fp8_elements: int = 0
    swapped: list[Any] = field(default_factory=list)  # the blocks placement leaves on the CPU
    swap: Any = None  # the installed BlockSwap

    @classmethod
    def before_placement(cls, bundle: ModelBundle, options: TrainOptions) -> MemorySetup:
        """fp8 conversion (on the CPU) and the choice of blocks to swap; raises :class:`ConfigError`
        where the model or the method leaves nothing to convert or swap."""
        from ..dtypes import torch_dtype
        from .block_swap import blocks_to_swap_problem, swappable_blocks

        setup = cls()
        denoiser = bundle.denoiser
        if getattr(options, "fp8_base", False):
            from .fp8 import convert_to_fp8

            setup.fp8_elements = convert_to_fp8(denoiser, torch_dtype(options.mixed_precision))
            if not setup.fp8_elements:
                raise ConfigError("--fp8-base: the denoiser has no frozen Linear/Conv2d weights to store in fp8")
        count = getattr(options, "blocks_to_swap", 0)
        if count:
            blocks = swappable_blocks(denoiser)
            problem = blocks_to_swap_problem(count, len(blocks), type(denoiser).__name__)
            if problem:
                raise ConfigError(problem)
            setup.swapped = blocks[len(blocks) - count :]
            if all(p.requires_grad for b in setup.swapped for p in b.parameters()):
                raise ConfigError(f"--blocks-to-swap {count}: the swapped blocks train entirely; nothing to swap")
        return setup

    def after_placement(self, bundle: ModelBundle, device: Any) -> None:
        """Install the block swap once the rest of the model is on ``device``."""
        if self.swapped:
            from .block_swap import BlockSwap

            self.swap = BlockSwap(bundle.denoiser, len(self.swapped), device)

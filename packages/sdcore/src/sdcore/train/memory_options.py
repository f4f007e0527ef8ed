"""The memory options on a run: their checks (pre-flight) and their application to the loaded model.

- ``--base-weights-dtype fp8|nf4|int8`` (``--fp8-base`` = ``fp8``; :mod:`sdcore.train.base_weights`):
  converted on the CPU after the method prepared the model (so its trainable weights are known and
  skipped) and before placement, so the device only ever receives the stored (1- or 4-bit) weights.
  Block swap moves the stored tensors of a swapped block like its other frozen tensors.
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
from .options import BASE_WEIGHTS_DTYPES

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..models.bundle import ModelBundle
    from ..models.layout import ModelLayout
    from .memory import ParameterPlan
    from .options import TrainOptions


def base_weights_dtype(options: Any) -> str | None:
    """The storage format a run asks for: ``--base-weights-dtype`` or kohya's ``--fp8-base``; ``None``
    for the compute dtype. The pre-flight refuses ``--fp8-base`` with another format
    (:func:`base_weights_problem`), so here ``--fp8-base`` only fills an unset option."""
    name = str(getattr(options, "base_weights_dtype", "none") or "none")
    if name == "none" and getattr(options, "fp8_base", False):
        return "fp8"
    return None if name == "none" else name


def base_weights_flag(options: Any) -> str:
    """How the user spelled the storage option (for messages)."""
    name = base_weights_dtype(options)
    if name == "fp8" and getattr(options, "fp8_base", False):
        return "--fp8-base"
    return f"--base-weights-dtype {name}"


def exclude_patterns(options: Any) -> list[str]:
    """``--base-weights-exclude``'s glob patterns (comma-separated)."""
    text = getattr(options, "base_weights_exclude", None) or ""
    return [p for p in text.split(",") if p]


def base_weights_problem(options: Any) -> str | None:
    """``--fp8-base`` together with ``--base-weights-dtype nf4/int8``, or an unknown value."""
    name = str(getattr(options, "base_weights_dtype", "none") or "none")
    if name not in BASE_WEIGHTS_DTYPES:
        return f"--base-weights-dtype {name!r}: choose one of {', '.join(BASE_WEIGHTS_DTYPES)}"
    if getattr(options, "fp8_base", False) and name not in ("none", "fp8"):
        return f"--fp8-base with --base-weights-dtype {name}: the frozen weights have one storage format; choose one"
    return None


def option_problems(options: TrainOptions, device: str | None = None) -> list[str]:
    """What is wrong with the memory options alone (negative counts, ``--fp8-base`` with another
    storage format, a storage format the device cannot hold)."""
    problems = []
    count = getattr(options, "blocks_to_swap", 0)
    if count < 0:
        problems.append(f"--blocks-to-swap must be 0 (off) or more, got {count}")
    problem = base_weights_problem(options)
    if problem:
        return [*problems, problem]
    name = base_weights_dtype(options)
    exclude = exclude_patterns(options)
    if exclude and not name:
        problems.append("--base-weights-exclude: keeps layers out of --fp8-base / --base-weights-dtype; give one")
    bad = [p for p in exclude if p != p.strip()]
    if bad:
        problems.append(f"--base-weights-exclude {bad}: patterns are separated by commas without spaces")
    if name:
        from .base_weights import STORAGE_FORMATS
        from .memory import training_device

        problem = STORAGE_FORMATS[name].problem(device or training_device())
        if problem:
            problems.append(problem)
    return problems


def unused_exclude_problem(unused: Sequence[str], denoiser_class: str) -> str:
    """The line for ``--base-weights-exclude`` patterns that keep nothing out (the pre-flight's, from the
    meta-device model, and the run's own check after loading)."""
    return (
        f"--base-weights-exclude {','.join(unused)}: matches none of the {denoiser_class}'s frozen Linear/Conv2d "
        "layers (glob patterns on module names such as 'time_text_embed.timestep_embedder.linear_1')"
    )


def model_problems(options: TrainOptions, layout: ModelLayout, params: ParameterPlan | None) -> list[str]:
    """What the memory options cannot do on this model with this method (from its layout and, when
    the plan could size it, the method's trainable parameters)."""
    from ..models.family import get_family
    from .block_swap import blocks_to_swap_problem

    problems: list[str] = []
    count = getattr(options, "blocks_to_swap", 0)
    stored = base_weights_dtype(options)
    flag = base_weights_flag(options)
    try:
        family = get_family(layout.family)
    except ConfigError:
        return problems
    if params is not None and family.denoiser in params.trainable_in:
        for name, on in ((flag, bool(stored)), (f"--blocks-to-swap {count}", count > 0)):
            if on:
                problems.append(
                    f"{name}: this method trains the {family.denoiser}'s own weights; the option applies to frozen "
                    "base weights (adapter training such as LoRA)"
                )
        return problems
    if count > 0:
        available = len(params.blocks) if params is not None else (0 if family.denoiser == "unet" else count)
        problem = blocks_to_swap_problem(count, available, f"the {family.label} {family.denoiser}")
        if problem:
            problems.append(problem)
    if stored and params is not None and params.unused_exclude:  # the layers the run would look for after loading
        problems.append(unused_exclude_problem(params.unused_exclude, params.denoiser_class))
    if stored and params is not None and params.denoiser_fp8 == 0:
        problems.append(f"{flag}: the {family.denoiser} has no frozen Linear/Conv2d weights to store in {stored}")
    frozen_saved = (
        params is not None and params.result - params.trainable >= params.components.get(family.denoiser, 0) > 0
    )
    if stored in ("nf4", "int8") and frozen_saved:  # a result holding the frozen denoiser would hold its packed codes
        problems.append(
            f"{flag}: this method saves the whole model, {family.denoiser} included, and its {stored} codes are not "
            "a model file; train an adapter (LoRA) or choose --fp8-base"
        )
    return problems


@dataclass
class MemorySetup:
    """What the memory options did to one loaded model."""

    #: weight elements stored in the ``--base-weights-dtype`` format (``--fp8-base``: fp8)
    fp8_elements: int = 0
    swapped: list[Any] = field(default_factory=list)  # the blocks placement leaves on the CPU
    swap: Any = None  # the installed BlockSwap

    @classmethod
    def before_placement(cls, bundle: ModelBundle, options: TrainOptions) -> MemorySetup:
        """Base-weight conversion (on the CPU) and the choice of blocks to swap; raises :class:`ConfigError`
        where the model or the method leaves nothing to convert or swap."""
        from ..dtypes import torch_dtype
        from .block_swap import block_list_names, blocks_to_swap_problem, swappable_blocks

        setup = cls()
        denoiser = bundle.denoiser
        from .base_weights import convert_base_weights

        stored = base_weights_dtype(options)
        if stored:
            exclude = exclude_patterns(options)
            if exclude:
                from .base_weights import excluded_names

                unused = [p for p, names in excluded_names(denoiser, exclude).items() if not names]
                if unused:
                    raise ConfigError(unused_exclude_problem(unused, type(denoiser).__name__))
            setup.fp8_elements = convert_base_weights(denoiser, stored, torch_dtype(options.mixed_precision), exclude)
            if not setup.fp8_elements:
                raise ConfigError(
                    f"{base_weights_flag(options)}: the denoiser has no frozen Linear/Conv2d weights to store in {stored}"
                )
        count = getattr(options, "blocks_to_swap", 0)
        if count:
            blocks = swappable_blocks(denoiser, block_list_names(bundle))
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
            from .block_swap import BlockSwap, block_list_names

            self.swap = BlockSwap(bundle.denoiser, len(self.swapped), device, lists=block_list_names(bundle))

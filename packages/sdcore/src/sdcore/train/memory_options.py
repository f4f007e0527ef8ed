"""The memory options on a run: their checks (pre-flight) and their application to the loaded model.

- ``--base-weights-dtype fp8|nf4|int8`` (``--fp8-base`` = ``fp8``; :mod:`sdcore.train.base_weights`):
  converted on the CPU after the method prepared the model (so its trainable weights are known and
  skipped) and before placement, so the device only ever receives the stored (1- or 4-bit) weights.
  Block swap moves the stored tensors of a swapped block like its other frozen tensors.
- ``--text-encoder-weights-dtype fp8|nf4|int8`` (one value, or one per text encoder): the frozen text
  encoders' Linear weights in the same formats (:func:`sdcore.train.base_weights.convert_text_encoder`), at the
  same moment, so the text-encoder cache is filled by the converted encoders.
- ``--blocks-to-swap N`` (:mod:`sdcore.train.block_swap`): the last N transformer blocks are left
  on the CPU by placement and the swap is installed after it. On a full fine-tune their trained weights
  stay there too and step in backward (only with ``--fused-backward-pass``, :func:`trained_swap_problem`).
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


TE_FLAG = "--text-encoder-weights-dtype"


def text_encoder_weights_values(options: Any) -> list[str]:
    """``--text-encoder-weights-dtype``'s values as given: one, or one per text encoder (comma-separated)."""
    text = str(getattr(options, "text_encoder_weights_dtype", "none") or "none")
    return [value.strip() for value in text.split(",")]


def text_encoder_formats(options: Any, components: Sequence[str]) -> dict[str, str]:
    """Text-encoder component -> storage format for the encoders ``--text-encoder-weights-dtype`` converts
    (``components``: the family's text encoders in order); empty when it converts none or its count of values
    does not fit (:func:`model_problems` says so)."""
    values = text_encoder_weights_values(options)
    if len(values) == 1:
        values = values * len(components)
    if len(values) != len(components):
        return {}
    return {component: value for component, value in zip(components, values, strict=True) if value != "none"}


def _text_encoder_option_problems(options: Any, device: Any) -> list[str]:
    """Unknown values, and formats this device cannot store."""
    values = text_encoder_weights_values(options)
    bad = [value for value in values if value not in BASE_WEIGHTS_DTYPES]
    if bad:
        return [
            f"{TE_FLAG} {','.join(values)}: choose one of {', '.join(BASE_WEIGHTS_DTYPES)}, for every text encoder "
            "or one per encoder (comma-separated, in the family's order)"
        ]
    wanted = sorted({value for value in values if value != "none"})
    if not wanted:
        return []
    from .base_weights import STORAGE_FORMATS
    from .memory import training_device

    found = (STORAGE_FORMATS[name].problem(device or training_device()) for name in wanted)
    return [f"{TE_FLAG}: {problem}" for problem in found if problem]


def option_problems(options: TrainOptions, device: str | None = None) -> list[str]:
    """What is wrong with the memory options alone (negative counts, ``--fp8-base`` with another
    storage format, a storage format the device cannot hold)."""
    problems = []
    count = getattr(options, "blocks_to_swap", 0)
    if count < 0:
        problems.append(f"--blocks-to-swap must be 0 (off) or more, got {count}")
    problems.extend(_text_encoder_option_problems(options, device))
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


def text_encoder_problems(family: Any, params: ParameterPlan | None, options: Any) -> list[str]:
    """What ``--text-encoder-weights-dtype`` cannot do on this family with this method: a count of values that is
    neither one nor the family's encoders, an encoder whose own Linear weights train (a full fine-tune: the option
    stores frozen weights), one without frozen Linear weights, and a method that saves the whole model (the stored
    codes would replace the text encoders' weights in the saved file)."""
    values = text_encoder_weights_values(options)
    if values == ["none"]:
        return []
    specs = family.text_encoders
    if len(values) not in (1, len(specs)):
        kinds = ", ".join(spec.kind for spec in specs)
        return [
            f"{TE_FLAG} {','.join(values)}: {len(values)} values for the {family.label}'s {len(specs)} text "
            f"encoder(s) ({kinds}); give one value for all or one per encoder"
        ]
    formats = text_encoder_formats(options, [spec.component for spec in specs])
    if not formats or params is None:
        return []
    problems = []
    kind_of = {spec.component: spec.kind for spec in specs}
    for component in formats:
        convertible, _rows, trained = params.text_encoders.get(component, (0, 0, 0))
        if trained:
            problems.append(
                f"{TE_FLAG}: this method trains the {kind_of[component]} text encoder's own weights; the option stores "
                "frozen weights (keep that encoder at none, e.g. one value per encoder)"
            )
        elif not convertible:
            problems.append(f"{TE_FLAG}: the {kind_of[component]} text encoder has no frozen Linear weights to store")
    if params.result >= sum(params.components.values()) > 0:
        problems.append(
            f"{TE_FLAG}: this method saves the whole model, text encoders included, and their stored weights are "
            "not the model's; train an adapter (LoRA)"
        )
    return problems


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
    problems.extend(text_encoder_problems(family, params, options))
    if params is not None and family.denoiser in params.trainable_in:
        if stored:
            problems.append(
                f"{flag}: this method trains the {family.denoiser}'s own weights; the option applies to frozen "
                "base weights (adapter training such as LoRA)"
            )
        if count > 0:
            problem = trained_swap_problem(options, count) or blocks_to_swap_problem(
                count, len(params.blocks), f"the {family.label} {family.denoiser}"
            )
            if problem:
                problems.append(problem)
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


def trained_swap_problem(options: Any, count: int) -> str | None:
    """Why ``--blocks-to-swap`` cannot swap trained weights (a full fine-tune) with these options: they step
    only in backward, while a block's weights are on the device (kohya's flux_train.py/sd3_train.py pair the swap
    with ``--fused_backward_pass``: after backward a swapped weight is back on the CPU, away from its gradient)."""
    from .fused import steps_in_backward

    accumulation = getattr(options, "gradient_accumulation", 1)
    if getattr(options, "fused_backward_pass", False) and accumulation > 1:
        return (
            f"--blocks-to-swap {count} on a full fine-tune with --gradient-accumulation {accumulation}: a swapped "
            "weight steps in backward on a device copy, and its gradient cannot wait there for the update's last "
            "micro-batch; use --gradient-accumulation 1 (a larger --batch-size) or swap no trained blocks"
        )
    if getattr(options, "fused_backward_pass", False):
        return None
    if steps_in_backward(options):
        return (
            f"--blocks-to-swap {count} on a full fine-tune steps each swapped weight alone in backward: use "
            "--fused-backward-pass (same weights for these optimizers) instead of the optimizer groups"
        )
    return (
        f"--blocks-to-swap {count}: this method trains the swapped blocks' own weights, which can only step while "
        "their block is on the device, inside backward: add --fused-backward-pass with --optimizer adafactor "
        "(as kohya's flux_train.py/sd3_train.py are run), or train an adapter (LoRA)"
    )


def swaps_trained(options: Any) -> bool:
    """Whether a run that swaps blocks whose weights train may (``--fused-backward-pass``)."""
    return trained_swap_problem(options, getattr(options, "blocks_to_swap", 0)) is None


@dataclass
class MemorySetup:
    """What the memory options did to one loaded model."""

    #: weight elements stored in the ``--base-weights-dtype`` format (``--fp8-base``: fp8)
    fp8_elements: int = 0
    #: ``--text-encoder-weights-dtype``: text-encoder component -> weight elements stored
    text_encoder_elements: dict[str, int] = field(default_factory=dict)
    swapped: list[Any] = field(default_factory=list)  # the blocks placement leaves on the CPU
    swap: Any = None  # the installed BlockSwap
    #: the swapped blocks' trained weights stay on the CPU and step in backward (a full fine-tune)
    swap_trained: bool = False

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
        setup.convert_text_encoders(bundle, options)
        count = getattr(options, "blocks_to_swap", 0)
        if count:
            blocks = swappable_blocks(denoiser, block_list_names(bundle))
            problem = blocks_to_swap_problem(count, len(blocks), type(denoiser).__name__)
            if problem:
                raise ConfigError(problem)
            setup.swapped = blocks[len(blocks) - count :]
            if any(p.requires_grad for b in setup.swapped for p in b.parameters()):
                problem = trained_swap_problem(options, count)
                if problem and all(p.requires_grad for b in setup.swapped for p in b.parameters()):
                    raise ConfigError(problem)
                setup.swap_trained = problem is None
        return setup

    def convert_text_encoders(self, bundle: ModelBundle, options: TrainOptions) -> None:
        """``--text-encoder-weights-dtype``: each chosen frozen text encoder's Linear weights in its storage format
        (after the method prepared the model, so a trained encoder's weights are known, and before its outputs
        are cached); :class:`ConfigError` for an encoder that leaves nothing to convert."""
        from ..dtypes import torch_dtype
        from .base_weights import convert_text_encoder

        if text_encoder_weights_values(options) == ["none"]:
            return
        specs = bundle.family_spec.text_encoders
        formats = text_encoder_formats(options, [spec.component for spec in specs])
        for spec, encoder in zip(specs, bundle.text_encoders, strict=False):
            stored = formats.get(spec.component)
            if not stored or encoder is None:
                continue
            converted = convert_text_encoder(encoder, stored, torch_dtype(options.mixed_precision))
            if not converted:
                raise ConfigError(
                    f"{TE_FLAG}: the {spec.kind} text encoder has no frozen Linear weights to store in {stored} "
                    "(its weights train)"
                )
            self.text_encoder_elements[spec.component] = converted

    def after_placement(self, bundle: ModelBundle, device: Any) -> None:
        """Install the block swap once the rest of the model is on ``device``."""
        if self.swapped:
            from .block_swap import BlockSwap, block_list_names

            self.swap = BlockSwap(
                bundle.denoiser, len(self.swapped), device, lists=block_list_names(bundle), trained=self.swap_trained
            )

    def install_stepper(self, fused: Any) -> None:
        """Once the fused backward pass is installed: the swapped trained weights step through it."""
        if self.swap is not None and self.swap_trained:
            if fused is None:
                raise ConfigError("--blocks-to-swap on trained weights needs --fused-backward-pass")
            self.swap.stepper = fused.step_swapped

"""kohya's validation loss: held-out images, fixed timesteps, fixed noise.

What kohya sd-scripts does (``train_network.py`` and ``library/train_util.py``, 2025) and sdcore
with it:

- **The split** (:func:`kohya_split`), per subset of the training images (class/regularisation
  images are never held out): the subset's image paths in sorted order are shuffled with
  ``random.Random(validation_seed)`` and the last ``round(n * validation_split)`` are held out.
  kohya trains on the first ``ceil(n * (1 - split))``, which for some ``n`` (an odd ``n`` with
  split 0.5; ``n = 10`` with 0.7, where float rounding makes the ceiling one larger) overlaps the
  held-out images by one; sdcore trains on every image that is not held out, so a held-out image
  never trains. Without ``validation_seed`` kohya shuffles with the unseeded global state (its
  training and validation datasets then shuffle differently); sdcore uses ``--seed``.
- **When**: every ``validate_every_n_steps`` optimizer steps, and at the end of every
  ``validate_every_n_epochs``-th epoch (every epoch when not given).
- **What**: the held-out samples (each image times its repeats, as kohya's validation dataset),
  batched per bucket with the run's batch size, at most ``max_validation_steps`` batches; each
  batch at each of the fixed timesteps ``linspace(min_t, max_t, 6)[1:-1]`` as integers
  (``min_t = --min-timestep or 0``, ``max_t = --max-timestep or T``: 200, 400, 600, 800 by
  default). The validation loss is the mean of the batch-mean losses over batches x timesteps,
  computed under ``no_grad`` with the trained network in eval mode (dropout off), with the run's
  loss options (loss type, min-SNR, noise offset...) as kohya's ``process_batch`` applies them.
- **Fixed noise**: kohya reseeds the global RNG with the validation seed before each validation;
  sdcore draws each sample's noise from a generator keyed by (validation seed, image, repeat,
  timestep), so every validation sees the same noise and no training draw is consumed. No flips.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ..data.dataset import DatasetIndex
    from ..models.bundle import ModelBundle
    from .data import SampleRef
    from .method import TrainingMethod
    from .options import TrainOptions

T = TypeVar("T")

#: kohya's NUM_VALIDATION_TIMESTEPS
NUM_VALIDATION_TIMESTEPS = 4


def kohya_split(paths: Sequence[T], split: float, seed: int) -> tuple[list[T], list[T]]:
    """``(trained, held out)`` of one subset's images (``paths`` in kohya's sorted order), by
    kohya's ``split_train_val``: shuffle with ``random.Random(seed)``, hold out the last
    ``round(n * split)``; everything else trains (kohya's training part can overlap by one)."""
    order = list(paths)
    if split <= 0 or not order:
        return order, []
    random.Random(seed).shuffle(order)
    n = len(order)
    start = n - round(n * split)
    return order[:start], order[start:]


def held_out_entries(index: DatasetIndex, *, seed: int) -> frozenset[int]:
    """Indices into ``index.entries`` held out for validation (per subset, kohya's rule; ``seed``
    is the run's seed, used where a subset has no ``validation_seed``)."""
    by_subset: dict[int, list[int]] = {}
    for i, entry in enumerate(index.entries):
        if entry.is_class or getattr(entry.subset, "validation_split", 0.0) <= 0:
            continue
        by_subset.setdefault(id(entry.subset), []).append(i)
    held: set[int] = set()
    for members in by_subset.values():
        subset = index.entries[members[0]].subset
        own_seed = subset.validation_seed
        ordered = sorted(members, key=lambda i: str(index.entries[i].path))  # kohya's glob_images sort
        _, out = kohya_split(ordered, subset.validation_split, seed if own_seed is None else own_seed)
        held.update(out)
    return frozenset(held)


def validation_timesteps(num_timesteps: int, min_timestep: int | None, max_timestep: int | None) -> tuple[int, ...]:
    """kohya's ``np.linspace(min, max, NUM_VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1]``."""
    import numpy as np

    low = 0 if min_timestep is None else min_timestep
    high = num_timesteps if max_timestep is None else max_timestep
    return tuple(int(t) for t in np.linspace(low, high, NUM_VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1])


def validation_batches(
    index: DatasetIndex,
    held_out: frozenset[int],
    buckets: Sequence[Any],
    batch_size: int,
    max_batches: int | None,
    group_of: Callable[[Any], tuple[int, int]] | None = None,
) -> list[list[SampleRef]]:
    """The held-out samples (each image times its repeats) in batches of one bucket each, in a fixed
    order (bucket, then image), at most ``max_batches`` of them. ``epoch = -1``: no flips. ``group_of``: an
    entry's ``(dataset, batch size)`` (the sampler's): kohya's validation split is one per ``[[datasets]]``, each
    batched at its dataset's size; without it every entry batches at ``batch_size``."""
    from .data import SampleRef

    by_bucket: dict[Any, list[SampleRef]] = {}
    for i in sorted(held_out):
        group = group_of(index.entries[i]) if group_of is not None else (0, batch_size)
        for occurrence in range(index.entries[i].repeats):
            by_bucket.setdefault((*group, tuple(buckets[i].bucket)), []).append(SampleRef(i, occurrence, -1))
    batches: list[list[SampleRef]] = []
    for key in sorted(by_bucket):
        members, size = by_bucket[key], key[1]
        batches.extend(members[k : k + size] for k in range(0, len(members), size))
    return batches if max_batches is None else batches[:max_batches]


def should_validate_epoch(options: TrainOptions, epochs_done: int) -> bool:
    """kohya: after epoch ``e`` (1-based) when ``e % validate_every_n_epochs == 0``, every epoch when unset."""
    every = options.validate_every_n_epochs
    return every is None or epochs_done % every == 0


@contextlib.contextmanager
def evaluation_mode(bundle: ModelBundle, method: TrainingMethod[Any]) -> Iterator[None]:
    """The bundle's modules and the method's own networks in eval mode (dropout off), restored after;
    the global RNG states are restored too, so validation never shifts a training draw."""
    import torch

    modes = [(m, m.training) for module in bundle.components().values() for m in module.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), method.sampling(bundle):  # the method's eval switch
            for module, _ in modes:
                module.training = False
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def validation_option_problems(o: TrainOptions) -> list[str]:
    """Bad values of the validation options (the pre-flight reports them with the others)."""
    problems = []
    split = o.validation_split
    if not (isinstance(split, (int, float)) and 0.0 <= split < 1.0):
        problems.append(f"--validation-split must be in [0, 1) (the fraction of each subset held out), got {split}")
    for name in ("validate_every_n_steps", "validate_every_n_epochs"):
        value = getattr(o, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1 when given, got {value}")
    if o.max_validation_steps is not None and o.max_validation_steps < 0:
        problems.append(f"--max-validation-steps must be 0 or more when given, got {o.max_validation_steps}")
    from ..data.onetrainer import has_validation_concept

    uses_split = split > 0 or _toml_has_split(o.data) or has_validation_concept(o.data)
    if not uses_split:
        for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
            if getattr(o, name) is not None:
                problems.append(
                    f"--{name.replace('_', '-')} needs held-out images: give --validation-split "
                    "(or validation_split in the dataset TOML)"
                )
    return problems


def _toml_has_split(data: str) -> bool:
    """Whether a dataset TOML sets a positive ``validation_split`` in ``[general]`` or a dataset
    (its own checks run when the dataset is read)."""
    from pathlib import Path

    import tomllib

    if not data or not data.lower().endswith(".toml"):
        return False
    try:
        with open(Path(data).expanduser(), "rb") as handle:
            config = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError):
        return False
    tables = [config.get("general")]
    datasets = config.get("datasets")
    if isinstance(datasets, list):
        tables += datasets
    for table in tables:
        value = table.get("validation_split") if isinstance(table, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return True
    return False


def precision_option_problems(o: TrainOptions) -> list[str]:
    """kohya's full_bf16/full_fp16 checks: each needs the matching --mixed-precision; both at once
    contradict each other (kohya would silently take full_fp16)."""
    problems = []
    if o.full_bf16 and o.full_fp16:
        problems.append("--full-bf16 and --full-fp16 contradict each other: choose one")
    if o.full_bf16 and o.mixed_precision != "bf16":
        problems.append(f"--full-bf16 needs --mixed-precision bf16 (as kohya asserts), got {o.mixed_precision!r}")
    if o.full_fp16 and o.mixed_precision != "fp16":
        problems.append(f"--full-fp16 needs --mixed-precision fp16 (as kohya asserts), got {o.mixed_precision!r}")
    if o.full_fp16:
        import torch

        if not torch.cuda.is_available():
            problems.append(
                "--full-fp16 needs a CUDA GPU (fp16 weights with a gradient scaler); on this machine use "
                "--full-bf16 --mixed-precision bf16"
            )
    return problems


__all__ = [
    "NUM_VALIDATION_TIMESTEPS",
    "evaluation_mode",
    "held_out_entries",
    "kohya_split",
    "precision_option_problems",
    "should_validate_epoch",
    "validation_batches",
    "validation_option_problems",
    "validation_timesteps",
]

"""The training runtime: one loop every method plugin trains through.

Public API (all import-light: torch loads only when training starts)::

    from sdcore.train import train, TrainResult, TrainSession, validate_options
    from sdcore.train import TrainingStopped, TrainingDivergedError  # train(..., stop=event) / a NaN loss
    from sdcore.train import load_options, dump_options          # TOML/JSON configs
    from sdcore.train.method import TrainingMethod, Capabilities  # the method contract
    from sdcore.train.options import TrainOptions                 # the shared options

Modules, one job each: ``loop`` (the session composing the parts), ``preflight`` (every
check before anything loads) and ``memory`` (the memory plan), ``data`` (epoch plans, per-sample seeds, step math), ``cache``
(latents, text-encoder outputs), ``batches`` (micro-batches, prefetching), ``placement``
(accelerator, devices/dtypes, ``accelerator.prepare``), ``step`` (noise, loss, one optimizer step),
``checkpoints`` (results, states, resume, retention), ``sampling`` (sample images), ``progress``
(messages, bar, trackers), ``events`` (what lifecycle hooks receive), ``noise``, ``optim``,
``state``, ``config`` and ``cli``.
"""

from .config import dump_options, load_options
from .loop import StopFlag, TrainingDivergedError, TrainingStopped, TrainResult, TrainSession, train, validate_options

__all__ = [
    "StopFlag",
    "TrainResult",
    "TrainSession",
    "TrainingDivergedError",
    "TrainingStopped",
    "dump_options",
    "load_options",
    "train",
    "validate_options",
]

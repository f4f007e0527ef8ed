"""The training runtime: one loop every method plugin trains through.

Public API (all import-light: torch loads only when training starts)::

    from sdcore.train import train, TrainResult, TrainSession, validate_options
    from sdcore.train import load_options, dump_options          # TOML/JSON configs
    from sdcore.train.method import TrainingMethod, SaveInfo      # the method contract
    from sdcore.train.options import TrainOptions                 # the shared options

Modules: ``loop`` (the session), ``data`` (epoch plans, per-sample seeds), ``cache`` (latents,
text-encoder outputs), ``noise`` (noise/timesteps/targets/min-SNR), ``optim`` (optimizers and
schedules), ``state`` (resumable states), ``config`` and ``cli`` (options from files and flags),
``events`` (what lifecycle hooks receive).
"""

from .config import dump_options, load_options
from .loop import TrainingDivergedError, TrainResult, TrainSession, train, validate_options

__all__ = [
    "TrainResult",
    "TrainSession",
    "TrainingDivergedError",
    "dump_options",
    "load_options",
    "train",
    "validate_options",
]

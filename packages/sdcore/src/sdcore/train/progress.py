"""What the user sees and what trackers record: messages, the step bar, TensorBoard logs.

Only the main process of a multi-process run prints; messages always go to the ``sdcore.train``
logger too.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import asdict
from typing import Any

from .options import TrainOptions

log = logging.getLogger("sdcore.train")


def tracker_backend(options: TrainOptions) -> str | None:
    """``"tensorboard"`` when ``--log-dir`` is given and tensorboard is installed, else None."""
    if not options.log_dir:
        return None
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        log.warning("--log-dir given but tensorboard is not installed: not logging")
        return None
    return "tensorboard"


def flat_config(options: TrainOptions) -> dict[str, Any]:
    """Options as scalars (what trackers accept as hyper-parameters)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(options).items()}


class Progress:
    """Messages, the step bar and the trackers of one run."""

    def __init__(self, options: TrainOptions, accelerator: Any, *, name: str) -> None:
        self.options = options
        self.accelerator = accelerator
        self.name = name or "train"
        self.shown = bool(options.progress and accelerator.is_main_process)
        self.tracking = False
        self.bar: Any = None
        self.recent: list[float] = []

    def say(self, message: str) -> None:
        log.info(message)
        if self.shown:
            print(message, file=sys.stderr)

    def plan(self, summary: str, *, per_epoch: int, total_steps: int, max_epochs: int | None) -> None:
        """The dataset summary and the step math, once before training."""
        o, processes = self.options, self.accelerator.num_processes
        if not self.shown:
            return
        print(summary, file=sys.stderr)
        print(
            f"{per_epoch} batches of up to {o.batch_size} per epoch"
            + (f" per process ({processes} processes)" if processes > 1 else "")
            + f", gradient accumulation {o.gradient_accumulation}: {total_steps} optimizer steps"
            + (f" over {max_epochs} epochs" if max_epochs else ""),
            file=sys.stderr,
        )

    # -- trackers -------------------------------------------------------------------------------
    def start_trackers(self, backend: str | None) -> None:
        if backend:
            self.accelerator.init_trackers(f"sdcore-{self.name}", config=flat_config(self.options))
            self.tracking = True

    def end_trackers(self) -> None:
        if self.tracking and getattr(self.accelerator, "trackers", None):
            with contextlib.suppress(Exception):
                self.accelerator.end_training()

    # -- the bar --------------------------------------------------------------------------------
    def open_bar(self, *, total: int, initial: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, initial=initial, disable=not self.shown, unit="step", dynamic_ncols=True, desc=self.name
        )

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def step(self, step: int, epoch: int, loss: float, lr: float) -> dict[str, float]:
        """Advance the bar and log one optimizer step; returns what ``sdcore_on_train_step`` gets."""
        self.recent = [*self.recent, loss][-20:]
        logs = {"loss": loss, "loss_avg": sum(self.recent) / len(self.recent), "lr": lr, "epoch": epoch + 1}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{logs['loss_avg']:.4f}", lr=f"{lr:.2e}", epoch=epoch + 1, refresh=False)
        if self.tracking:
            self.accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)
        return logs

    def cache_bar(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.shown, leave=False)

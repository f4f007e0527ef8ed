"""What the user sees and what trackers record: messages, the progress display, TensorBoard logs.

Progress display: a tqdm bar on a terminal, plain lines in logs.

Piped or redirected stderr (a log file, ``nohup``, CI) gets no carriage-return frames: one plain
line every :data:`PLAIN_INTERVAL` seconds (and one at the end) with step, percentage, the bar's
postfix (loss, lr, epoch), speed and ETA. ``--no-progress`` hides only this display; the dataset
summary and other messages are printed either way.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import IO, Any

from .options import TrainOptions

log = logging.getLogger("sdcore.train")

#: seconds between two plain progress lines when stderr is not a terminal
PLAIN_INTERVAL = 10.0


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class PlainProgress:
    """The subset of tqdm's interface the runtime uses, printing one line per ``interval`` seconds."""

    def __init__(
        self,
        *,
        total: int | None,
        initial: int = 0,
        desc: str = "",
        unit: str = "step",
        stream: IO[str] | None = None,
        interval: float = PLAIN_INTERVAL,
        leave: bool = True,
    ) -> None:
        self.total = total
        self.n = initial
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.leave = leave
        self.postfix = ""
        self._start = time.monotonic()
        self._start_n = initial
        self._last = self._start
        self._printed_n = initial
        self._closed = False

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._emit(now)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        done = self.n - self._start_n
        rate = done / elapsed
        parts = [f"{self.desc}: " if self.desc else ""]
        if self.total:
            parts.append(f"{self.unit} {self.n}/{self.total} ({100 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{self.unit} {self.n}")
        if self.postfix:
            parts.append(f", {self.postfix}")
        if done > 0:
            parts.append(f", {rate:.2f} {self.unit}/s" if rate >= 1 else f", {1 / rate:.1f} s/{self.unit}")
            if self.total and self.n < self.total:
                parts.append(f", ETA {_clock((self.total - self.n) / rate)}")
        parts.append(f", elapsed {_clock(elapsed)}")
        return "".join(parts)

    def _emit(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self._last = now
        self._printed_n = self.n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.leave and self.n != self._printed_n:
            self._emit(time.monotonic())


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _Hidden:
    """A progress object that shows nothing (``--no-progress``, other processes)."""

    n = 0

    def __enter__(self) -> _Hidden:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        return None

    def close(self) -> None:
        return None


def progress_bar(
    *,
    total: int | None,
    desc: str,
    enabled: bool = True,
    initial: int = 0,
    unit: str = "step",
    leave: bool = True,
    stream: IO[str] | None = None,
) -> Any:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else :class:`PlainProgress`."""
    if not enabled:
        hidden = _Hidden()
        hidden.n = initial
        return hidden
    out = stream if stream is not None else sys.stderr
    if _is_terminal(out):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, leave=leave, file=out)
    return PlainProgress(total=total, initial=initial, desc=desc, unit=unit, stream=out, leave=leave)


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
        self.postfix: dict[str, Any] = {}
        #: the latest validation loss (shown on the bar from then on)
        self.val_loss: float | None = None

    def say(self, message: str) -> None:
        """Print ``message`` on the main process (``--no-progress`` hides only the bar, not this)."""
        log.debug(message)
        if self.accelerator.is_main_process:
            print(message, file=sys.stderr)

    def plan(
        self,
        summary: str,
        *,
        per_epoch: int,
        total_steps: int,
        max_epochs: int | None,
        steps: str = "",
        batch: str | None = None,
    ) -> None:
        """The dataset summary and the step math, once before training (shown with --no-progress
        too: it lists skipped files); ``batch``: the batch size(s) (``2-4`` where datasets batch differently)."""
        o, processes = self.options, self.accelerator.num_processes
        if not self.accelerator.is_main_process:
            return
        print(summary, file=sys.stderr)
        print(
            f"{per_epoch} batches of up to {batch or o.batch_size} per epoch"
            + (f" per process ({processes} processes)" if processes > 1 else "")
            + f", gradient accumulation {o.gradient_accumulation}: "
            + (steps or f"{total_steps} optimizer steps" + (f" over {max_epochs} epochs" if max_epochs else "")),
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
        self.bar = progress_bar(total=total, initial=initial, enabled=self.shown, desc=self.name)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def step(
        self, step: int, epoch: int, loss: float, lr: float, extra: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """Advance the bar and log one optimizer step; returns what ``sdcore_on_train_step`` gets.

        ``extra``: the method's own per-step values (what :meth:`TrainingMethod.on_step_end`
        returned, e.g. LoRA max-norm's ``keys_scaled``): shown on the bar after the runtime's,
        logged to the trackers as ``train/<name>`` and passed on in the hook's ``logs``.
        """
        self.recent = [*self.recent, loss][-20:]
        logs = {"loss": loss, "loss_avg": sum(self.recent) / len(self.recent), "lr": lr, "epoch": epoch + 1}
        own = {k: float(v) for k, v in (extra or {}).items() if k not in logs}
        logs.update(own)
        if self.bar is not None:
            self.bar.update(1)
            shown = {k: f"{v:.4g}" for k, v in own.items()}
            self.postfix = {"loss": f"{logs['loss_avg']:.4f}", "lr": f"{lr:.2e}", "epoch": epoch + 1, **shown}
            if self.val_loss is not None:
                self.postfix["val_loss"] = f"{self.val_loss:.4f}"
            self.bar.set_postfix(**self.postfix, refresh=False)
        if self.tracking:
            self.accelerator.log(
                {"train/loss": loss, "train/lr": lr, **{f"train/{k}": v for k, v in own.items()}}, step=step
            )
        return logs

    def validation(self, step: int, kind: str, loss: float) -> dict[str, float]:
        """Report a validation loss (``kind``: ``"step"`` or ``"epoch"``, kohya's two schedules): on
        the bar (``val_loss``), in the log, and to the trackers under kohya's names
        ``loss/validation/<kind>_average`` and ``..._divergence`` (validation minus the recent
        training loss average)."""
        self.val_loss = loss
        train = sum(self.recent) / len(self.recent) if self.recent else float("nan")
        logs = {f"loss/validation/{kind}_average": loss, f"loss/validation/{kind}_divergence": loss - train}
        message = f"validation loss at step {step} ({kind}): {loss:.6f}"
        log.debug(message)
        if self.accelerator.is_main_process:
            writer = getattr(self.bar, "write", None)  # tqdm: a line above the bar, which stays intact
            if callable(writer):
                writer(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr)
        if self.bar is not None:
            self.postfix["val_loss"] = f"{loss:.4f}"
            self.bar.set_postfix(**self.postfix, refresh=False)
        if self.tracking:
            self.accelerator.log(logs, step=step)
        return logs

    def cache_bar(self, total: int, desc: str) -> Any:
        return progress_bar(total=total, desc=desc, enabled=self.shown, unit="image", leave=False)


__all__ = ["PLAIN_INTERVAL", "PlainProgress", "Progress", "flat_config", "progress_bar", "tracker_backend"]

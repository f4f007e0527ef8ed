"""Device memory while a run trains: a warning when it nearly fills the GPU, one clear line instead of a
traceback when it runs out, and its real peak against the pre-flight's estimate at the end.

Why: running out of GPU memory is the complaint users of every trainer raise most, and the quiet variant
is worse than the crash: on Windows the NVIDIA driver's "sysmem fallback" moves allocations to system RAM
when the GPU is full, so the run goes on several times slower with no error at all. A run that holds
more than :data:`FULL_FRACTION` of the GPU is told so once, with the options that lower its need; an
out-of-memory error says where it happened, how much was in use, what the estimate was and what to change,
and the resumable state is saved first (as for any error). The closing line lets every user check the
memory plan against their own GPU.

Only accelerators report peaks (``torch.cuda``'s caching allocator); a CPU run reads nothing and prints
nothing here.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..console import warning_line
from ..errors import SdcoreError, is_out_of_memory

MIB = 1024 * 1024
#: the share of the device's memory a run may hold before it is told it is (nearly) full
FULL_FRACTION = 0.95
#: optimizer steps after which the memory is read (it grows over the first steps: the optimizer's state
#: appears at step 1, buckets of other sizes later), then every :data:`CHECK_INTERVAL` steps
CHECK_STEPS = frozenset((1, 2, 3, 5, 10, 20, 50))
CHECK_INTERVAL = 100


class TrainingOutOfMemoryError(SdcoreError):
    """The device ran out of memory; the message says where, how much, and which options lower the need."""


@dataclass(frozen=True)
class MemoryReading:
    """Peaks since the run started on one device, in bytes."""

    device: str
    peak_allocated: int
    peak_reserved: int
    total: int

    @property
    def fraction(self) -> float:
        return self.peak_reserved / self.total if self.total else 0.0


def read_device_memory(device: Any) -> MemoryReading | None:
    """The caching allocator's peaks on a CUDA ``device``; ``None`` elsewhere (nothing to read)."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    try:
        import torch

        return MemoryReading(
            device=str(device),
            peak_allocated=int(torch.cuda.max_memory_allocated(device)),
            peak_reserved=int(torch.cuda.max_memory_reserved(device)),
            total=int(torch.cuda.get_device_properties(device).total_memory),
        )
    except Exception:  # a driver that cannot tell: the watch stays silent
        return None


def release_failed_step(exc: BaseException) -> None:
    """Drop what the failed step still holds (its frames, kept alive by the traceback) so the state can
    be saved: saving moves tensors to the CPU, which needs a little device memory."""
    exc.__traceback__ = None
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"


class MemoryWatch:
    """Reads a device's memory peaks after chosen steps (:meth:`after_step`), warns once when the run
    holds :data:`FULL_FRACTION` of the device, and words the closing line and the out-of-memory error.

    ``relief`` gives the option changes that lower the estimate, each as ``"--flag (-N MiB)"``; it runs
    only when a warning or an error needs it (it re-estimates several variants). ``read`` is
    :func:`read_device_memory` or, in tests, a stand-in."""

    def __init__(
        self,
        device: Any,
        *,
        estimate: int | None,
        say: Callable[[str], None],
        relief: Callable[[], list[str]] = list,
        read: Callable[[Any], MemoryReading | None] | None = None,
        full_fraction: float = FULL_FRACTION,
    ) -> None:
        self.device = device
        self.estimate = estimate
        self.say = say
        self.relief = relief
        self.read = read if read is not None else read_device_memory
        self.full_fraction = full_fraction
        self.warned = False
        self.last: MemoryReading | None = None

    def after_step(self, step: int) -> None:
        """Read the peaks after optimizer step ``step`` when it is a checking step; warn once when full."""
        if step not in CHECK_STEPS and step % CHECK_INTERVAL:
            return
        reading = self.read(self.device)
        if reading is None:
            return
        self.last = reading
        if not self.warned and reading.fraction >= self.full_fraction:
            self.warned = True
            self.say(self.full_warning(reading, step))

    def changes(self) -> list[str]:
        """The relief's advice; never an error of its own (the warning or the original error matters more)."""
        try:
            return self.relief()
        except Exception:
            return []

    def full_warning(self, reading: MemoryReading, step: int) -> str:
        changes = self.changes()
        return warning_line(
            f"after step {step} the run holds {_mib(reading.peak_reserved)} of the "
            f"{_mib(reading.total)} on {reading.device} ({reading.fraction:.0%}): a larger batch or bucket can run "
            "out of memory, and on Windows the NVIDIA driver then moves memory to system RAM (its sysmem fallback) "
            "and training slows down several times without an error"
            + (f". Options that lower the need: {'; '.join(changes)}" if changes else "")
        )

    def summary(self) -> str | None:
        """The closing line: the run's peaks against the estimate (``None`` when nothing was read)."""
        reading = self.read(self.device) or self.last
        if reading is None:
            return None
        line = (
            f"memory: peak {_mib(reading.peak_allocated)} allocated, {_mib(reading.peak_reserved)} reserved "
            f"of {_mib(reading.total)} on {reading.device}"
        )
        if self.estimate:
            line += f" (the pre-flight estimated {_mib(self.estimate)})"
        return line

    def out_of_memory(self, *, where: str, state: Any = None) -> TrainingOutOfMemoryError:
        """The error to raise for an out-of-memory ``where`` (``"in step 12"``)."""
        return out_of_memory_error(
            where=where, reading=self.read(self.device), estimate=self.estimate, changes=self.changes(), state=state
        )


def out_of_memory_error(
    *,
    where: str,
    reading: MemoryReading | None,
    estimate: int | None,
    changes: list[str],
    state: Any = None,
) -> TrainingOutOfMemoryError:
    """One line: where the run ran out, its peak and the estimate, what lowers the need, and the state
    folder to resume from when one was saved."""
    parts = [f"out of memory {where}"]
    if reading is not None:
        parts.append(f"peak {_mib(reading.peak_reserved)} reserved of {_mib(reading.total)} on {reading.device}")
    if estimate:
        parts.append(f"the pre-flight estimated {_mib(estimate)}")
    message = "; ".join(parts)
    message += (
        f". Options that lower the need: {'; '.join(changes)}"
        if changes
        else ". Lower --batch-size or --resolution, or turn on --gradient-checkpointing"
    )
    if state is not None:
        message += f". The resumable state is in {state} (continue with --resume latest)"
    return TrainingOutOfMemoryError(message)


__all__ = [
    "CHECK_STEPS",
    "FULL_FRACTION",
    "MemoryReading",
    "MemoryWatch",
    "TrainingOutOfMemoryError",
    "is_out_of_memory",
    "out_of_memory_error",
    "read_device_memory",
    "release_failed_step",
]

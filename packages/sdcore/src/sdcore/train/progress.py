"""Progress display for training: a tqdm bar on a terminal, plain lines in logs.

Piped or redirected stderr (a log file, ``nohup``, CI) gets no carriage-return frames: one plain
line every :data:`PLAIN_INTERVAL` seconds (and one at the end) with step, percentage, the bar's
postfix (loss, lr, epoch), speed and ETA. ``--no-progress`` hides only this display; the dataset
summary and other messages are printed either way.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

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


__all__ = ["PLAIN_INTERVAL", "PlainProgress", "progress_bar"]

"""Lifecycle hooks: what ``sdcore_before_train`` and friends receive, and how the runtime calls them.

Hooks get a :class:`TrainEventContext`: a frozen, typed snapshot of the run (a new one per event),
never the live session, bundle or method, so a plugin cannot change the run it observes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import PluginError, SdcoreError
from .options import TrainOptions


@dataclass(frozen=True)
class TrainEventContext:
    """The run a lifecycle hook is told about (read-only).

    ``options`` is a copy of the run's options (changing it changes nothing); ``output`` is the
    final result path, ``state_dir`` where resumable states go, ``samples_dir`` where sample
    grids go; ``step``/``epoch`` are where the run is at this event. ``process_index`` and
    ``num_processes`` describe a multi-process run (hooks run on every process; most loggers act
    only when ``is_main_process``).
    """

    method_name: str
    options: TrainOptions
    output: Path
    state_dir: Path
    total_steps: int
    step: int = 0
    epoch: int = 0
    family: str = ""
    samples_dir: Path | None = None
    process_index: int = 0
    num_processes: int = 1
    extra: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0


class HookCaller:
    """Calls lifecycle hooks on a pluggy manager (or nothing when there is none).

    An exception from a plugin becomes a :class:`PluginError` naming it; KeyboardInterrupt and
    sdcore's own errors pass through unchanged.
    """

    def __init__(self, plugin_manager: Any) -> None:
        self.plugin_manager = plugin_manager

    def __call__(self, name: str, **kwargs: Any) -> None:
        if self.plugin_manager is None:
            return
        caller = getattr(self.plugin_manager.hook, name)
        try:
            caller(**kwargs)
        except SdcoreError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {culprit(caller, exc)!r} failed in {name}: {exc}") from exc


def culprit(caller: Any, exc: BaseException) -> str:
    """The name of the plugin whose hook implementation raised ``exc`` (from the traceback)."""
    codes = {}
    with contextlib.suppress(Exception):
        for impl in caller.get_hookimpls():
            codes[getattr(impl.function, "__code__", None)] = impl.plugin_name
    tb = exc.__traceback__
    found = "unknown"
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            found = codes[tb.tb_frame.f_code]
        tb = tb.tb_next
    return found

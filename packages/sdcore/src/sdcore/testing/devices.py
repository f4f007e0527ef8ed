"""Stand-ins for a GPU run on a machine without one, for tests of what the runtime moves where.

:class:`StandInAccelerator` is an accelerator of one process whose ``device`` says ``cuda``, so code that decides by
``accelerator.device.type`` (the caches moving the text encoders off the device once their outputs are cached, as
kohya does on a GPU) takes its GPU path on the CPU; :func:`recording_moves` records each module's ``.to(...)``
instead of making it (a CPU-only torch cannot move anything to ``cuda``). No pytest import: plugin authors can use
both from any test runner.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any


class StandInAccelerator:
    """What the runtime reads of accelerate's ``Accelerator`` in a one-process run, on ``device`` (``cuda`` unless
    given): ``device``, ``is_main_process``, ``num_processes`` and ``autocast()`` (a no-op)."""

    is_main_process = True
    num_processes = 1

    def __init__(self, device: str = "cuda") -> None:
        import torch

        self.device = torch.device(device)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@contextlib.contextmanager
def recording_moves(modules: Sequence[Any]) -> Iterator[list[int]]:
    """Within the block, ``modules[i].to(...)`` appends ``i`` to the yielded list and returns the module unmoved;
    each module's own ``to`` is back afterwards."""
    moved: list[int] = []

    def recorder(index: int, module: Any) -> Any:
        def to(*args: Any, **kwargs: Any) -> Any:
            moved.append(index)
            return module

        return to

    for index, module in enumerate(modules):
        module.to = recorder(index, module)
    try:
        yield moved
    finally:
        for module in modules:
            del module.to


__all__ = ["StandInAccelerator", "recording_moves"]

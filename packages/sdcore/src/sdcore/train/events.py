"""What lifecycle hooks (``sdcore_before_train`` and friends) receive."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainEventContext:
    """The run a lifecycle hook is told about.

    ``method_name``, ``options``, ``output`` (the final result path), ``state_dir`` (where
    resumable states go) and ``total_steps`` are stable; ``step``/``epoch`` follow the run.
    ``bundle``, ``method`` and ``session`` are the live objects, for plugins that need to look
    deeper (read-only use is strongly advised).
    """

    method_name: str
    options: Any
    output: Path
    state_dir: Path
    total_steps: int
    step: int = 0
    epoch: int = 0
    bundle: Any = None
    method: Any = None
    session: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

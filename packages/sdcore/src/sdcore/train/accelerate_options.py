"""kohya's accelerate settings (``--ddp_timeout``, ``--ddp_static_graph``, ``--ddp_gradient_as_bucket_view``):
what the run's ``Accelerator`` receives, in one place.

They change how processes talk (speed, waiting), never what trains: DDP averages the same gradients
with or without a static graph or bucket views. kohya passes them as accelerate kwargs handlers
(``train_util.prepare_accelerator``); so does sdcore, next to its own DDP settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .options import TrainOptions


def kwargs_handlers(options: TrainOptions) -> list[Any]:
    """accelerate kwargs handlers for ``options``: sdcore's DDP settings (``find_unused_parameters``: LoRA
    module dropout and a text-encoder stop (``te_stop``) leave some trainable parameters without a
    gradient on some steps; no buffer broadcast) plus kohya's ``static_graph``/``gradient_as_bucket_view``,
    and a process-group timeout in minutes when ``--ddp-timeout`` is given (else accelerate's default)."""
    import datetime

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers: list[Any] = [
        DistributedDataParallelKwargs(
            find_unused_parameters=True,
            broadcast_buffers=False,
            static_graph=bool(getattr(options, "ddp_static_graph", False)),
            gradient_as_bucket_view=bool(getattr(options, "ddp_gradient_as_bucket_view", False)),
        )
    ]
    timeout = getattr(options, "ddp_timeout", None)
    if timeout:
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=timeout)))
    return handlers


def accelerate_option_problems(options: TrainOptions) -> list[str]:
    """Bad values of these options, one line each (the pre-flight reports them with the rest)."""
    timeout = getattr(options, "ddp_timeout", None)
    if timeout is not None and timeout < 1:
        return [f"--ddp-timeout is in minutes and must be 1 or more (unset: accelerate's default), got {timeout}"]
    return []


__all__ = ["accelerate_option_problems", "kwargs_handlers"]

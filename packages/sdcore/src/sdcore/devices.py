"""``--device``: one click type for every command that takes a torch device (generate, the taggers, aesthetic).

A mistyped device (``--device cuda0``, an empty value from an unset shell variable) was found only when torch
used it, after the model had loaded, and shown as torch's traceback. The type checks the spelling when the
command line is read: ``auto`` (the command's choice) without importing torch, anything else with
``torch.device``, which knows every backend torch was built with.
"""

from __future__ import annotations

from typing import Any

import click

DEVICE_HELP = "auto, cpu, cuda, cuda:1, mps ..."


def device_problem(value: str) -> str | None:
    """Why ``value`` is no torch device (one line naming the accepted spellings), or ``None``."""
    if value == "auto":
        return None
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        return f"{value!r} is not a torch device; use {DEVICE_HELP}"
    return None


class DeviceType(click.ParamType):
    """A ``--device`` value, checked by :func:`device_problem` when the command line is read."""

    name = "DEVICE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or not isinstance(value, str):
            return value
        problem = device_problem(value)
        if problem is not None:
            self.fail(problem, param, ctx)
        return value


DEVICE = DeviceType()

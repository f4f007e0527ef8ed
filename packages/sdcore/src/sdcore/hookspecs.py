"""Every hook sdcore calls. This module and :mod:`sdcore.specs` are the public plugin API.

Conventions (see docs/writing-a-plugin.md):

- every hook starts with ``sdcore_``;
- ``sdcore_register_<things>(register)`` hooks receive a callback and call it with a frozen spec
  dataclass whose heavy parts are import strings, so registering never imports torch;
- lifecycle hooks are notifications: return values are ignored, and an exception raised inside
  one is reported with the plugin's name and aborts the run (training state is saved first).

An implementation may accept fewer arguments than the spec lists (pluggy passes only those it
names), so adding an argument here later does not break existing plugins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from .models.family import ModelFamily
    from .specs import MethodSpec, ModelFormatSpec, PromptNetworkSpec, TaggerSpec
    from .train.events import TrainEventContext
    from .train.loop import TrainResult

PROJECT = "sdcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def sdcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    """Register training methods (``sdcore train <name>``).

    Call ``register(MethodSpec(name=..., summary=..., method="pkg.mod:MethodClass"))`` once per
    method. Names must be unique across all installed plugins; a clash is an error naming both
    distributions. Added in sdcore 0.1.
    """


@hookspec
def sdcore_register_taggers(register: Callable[[TaggerSpec], None]) -> None:
    """Register dataset taggers (``sdcore tag <name>``) with ``TaggerSpec``. Added in sdcore 0.1."""


@hookspec
def sdcore_register_prompt_networks(register: Callable[[PromptNetworkSpec], None]) -> None:
    """Register prompt-network handlers for generation (``<lora:name:w>``, embeddings, ...).

    A handler claims its part of the A1111 prompt syntax, applies what it names to the model for
    one generation and removes it afterwards. Added in sdcore 0.1.
    """


@hookspec
def sdcore_register_model_formats(register: Callable[[ModelFormatSpec], None]) -> None:
    """Register model readers/writers (diffusers folder, single-file ldm, ...).

    ``load_model`` asks each format's ``sniff`` in registration order (plugins before built-ins,
    so a plugin can claim a path first) and reads with the first that accepts. Added in sdcore 0.1.
    """


@hookspec
def sdcore_model_families() -> Iterable[ModelFamily]:
    """Return the model families this plugin declares (:class:`sdcore.models.family.ModelFamily`).

    A family is a frozen, torch-free declaration; its behaviour (single-file detection and
    loading, the tiny model, prompt encoding, the denoiser call) is an adapter named by an import
    string and imported only when a model of the family is used. A name already declared by
    another plugin (or by sdcore: ``sd1``, ``sd2``, ``sdxl``, ``sdxl-refiner``) is an error naming
    both. See docs/families.md. Added in sdcore 0.2.
    """
    return ()  # a spec's body never runs; this states the type


@hookspec
def sdcore_register_commands(cli: click.Group) -> None:
    """Add commands or groups to the root ``sdcore`` CLI.

    Keep command modules import-light: import torch inside the command function. Added in sdcore 0.1.
    """


@hookspec
def sdcore_before_train(context: TrainEventContext) -> None:
    """Called once the model is prepared and before the first step.

    ``context`` is a frozen :class:`sdcore.train.events.TrainEventContext`: method name, a copy
    of the options, output and state folders, total steps, the current step and epoch, the model
    family and the process index/count. It is a snapshot, never the live session, model or
    method: hooks observe a run, they cannot change it. Added in sdcore 0.1 (typed read-only
    context since 0.2).
    """


@hookspec
def sdcore_on_train_step(context: TrainEventContext, step: int, logs: dict[str, float]) -> None:
    """Called after every optimizer step with the logged values (``loss``, ``loss_avg``, ``lr``, ``epoch``).

    Runs on every process of a multi-process run (``context.is_main_process`` tells the main one).
    Added in sdcore 0.1.
    """


@hookspec
def sdcore_after_train(context: TrainEventContext, result: TrainResult) -> None:
    """Called after training finished and the result was saved (``result.output`` is the path). Added in sdcore 0.1."""


@hookspec
def sdcore_on_train_error(context: TrainEventContext, error: BaseException) -> None:
    """Called when training stops with an exception (after the resumable state was saved). Added in sdcore 0.1."""

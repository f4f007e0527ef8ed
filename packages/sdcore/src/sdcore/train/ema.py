"""An exponential moving average (EMA) of the trained weights (``--ema``), for every method.

After an optimizer step that really stepped (not a step the fp16 grad scaler skipped, nor a
diverged one), every ``--ema-update-every`` steps, each trained tensor's fp32 shadow moves towards
the tensor: ``shadow = d * shadow + (1 - d) * weight``. The shadow starts as the weights training
starts from (ai-toolkit, OneTrainer and diffusers all copy them at creation).

The decay ``d`` of the update after optimizer step ``n`` (1-based, counted over the whole run so a
resumed run continues the same rule), with ``D = --ema-decay``:

==============  =========================================================================================
``onetrainer``  ``min(D, (1 + u) / (10 + u))`` with ``u = n - 1`` (OneTrainer's ``EMAModuleWrapper``: its
                ``optimization_step`` is the optimizer steps before this one). The default: early
                updates are not dominated by the starting weights (a LoRA's up matrices start at 0).
``diffusers``   the same, but the first update copies the weights (``d = 0`` at ``n = 1``: diffusers'
                ``EMAModel.get_decay`` with ``update_after_step=0`` and no power warm-up)
``none``        ``D`` at every update (ai-toolkit's trainer: its ``ExponentialMovingAverage`` is built
                without ``use_num_updates``)
``copy``        ``0`` (the update copies the weights) while ``n < W``, ``D`` from ``n = W`` on, with
                ``W = --ema-warmup-steps`` (SimpleTuner's ``ema_warmup_steps``: its ``EMAModel.get_decay``
                copies before that optimizer step, then switches straight to the fixed decay)
==============  =========================================================================================

With ``--ema-update-every N`` the update runs after steps ``N, 2N, ...`` and ``d`` is not adjusted
for the interval (OneTrainer's ``ema_update_step_interval``): ``n`` is still the optimizer step.

What uses the average: every saved result (intermediate, final, and the result rescued when a save
fails), sample images and the validation loss swap the averaged weights in and the raw ones back
exactly (:meth:`WeightEMA.applied`), so the raw weights train exactly as without ``--ema``. The
resumable state keeps the raw weights and the shadow apart (``ema.safetensors``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

    from .options import TrainOptions

#: the decay warm-up rules (``--ema-warmup``), the first the default
EMA_WARMUPS = ("onetrainer", "diffusers", "none", "copy")
#: where the shadow lives: ``same`` = beside the weights it averages, ``cpu`` = host memory (OneTrainer's CPU EMA)
EMA_DEVICES = ("same", "cpu")
#: options a resumed run must keep: the average would not equal an uninterrupted run's
EMA_RESUME_FIXED = ("ema", "ema_decay", "ema_update_every", "ema_warmup", "ema_warmup_steps")
#: the state file holding the shadow tensors
EMA_STATE_FILE = "ema.safetensors"


def ema_decay_at(step: int, decay: float, warmup: str = "onetrainer", warmup_steps: int = 0) -> float:
    """The decay of the EMA update after optimizer step ``step`` (1-based) for ``--ema-warmup warmup``
    (``warmup_steps``: ``--ema-warmup-steps``, read by ``copy`` only)."""
    if warmup == "none":
        return decay
    if warmup == "copy":
        return 0.0 if step < warmup_steps else decay
    if warmup == "diffusers" and step <= 1:
        return 0.0
    u = step - 1  # OneTrainer's optimization_step; diffusers' step after update_after_step
    return min(decay, (1 + u) / (10 + u))


def ema_option_problems(options: TrainOptions) -> list[str]:
    """The ``--ema*`` values that cannot work, one line each (nothing when ``--ema`` is off)."""
    o = options
    if not o.ema:
        return []
    problems = []
    if not 0.0 < o.ema_decay < 1.0:
        problems.append(f"--ema-decay must be between 0 and 1 (exclusive), got {o.ema_decay}")
    if o.ema_update_every < 1:
        problems.append(f"--ema-update-every must be at least 1, got {o.ema_update_every}")
    if o.ema_warmup not in EMA_WARMUPS:
        problems.append(f"--ema-warmup {o.ema_warmup!r}: choose one of {', '.join(EMA_WARMUPS)}")
    if o.ema_warmup == "copy" and o.ema_warmup_steps < 1:
        problems.append(f"--ema-warmup copy needs --ema-warmup-steps of at least 1, got {o.ema_warmup_steps}")
    elif o.ema_warmup != "copy" and o.ema_warmup_steps:
        problems.append(f"--ema-warmup-steps {o.ema_warmup_steps}: read only by --ema-warmup copy")
    if o.ema_device not in EMA_DEVICES:
        problems.append(f"--ema-device {o.ema_device!r}: choose one of {', '.join(EMA_DEVICES)}")
    engine = sharded_engine()
    if engine:
        problems.append(
            f"--ema with {engine}: each process holds only a shard of the weights, so sdcore keeps no EMA there "
            "(use plain multi-GPU (DDP) or drop --ema)"
        )
    return problems


def sharded_engine(distributed_type: Any = None) -> str | None:
    """``FSDP`` or ``DeepSpeed`` when this process runs under a sharding engine (``accelerate launch`` sets
    ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``; a started accelerator tells its type)."""
    kind = str(distributed_type or "").upper()
    if "FSDP" in kind or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if "DEEPSPEED" in kind or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DeepSpeed"
    return None


def ema_resume_problems(saved: dict[str, Any], options: TrainOptions, folder: Any) -> list[str]:
    """A ``--resume`` state whose EMA settings differ from this run's (a state from before ``--ema``
    existed counts as trained without it)."""
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(options) if f.name in EMA_RESUME_FIXED}
    was = {k: saved.get(k, defaults[k]) for k in EMA_RESUME_FIXED}
    now = {k: getattr(options, k) for k in EMA_RESUME_FIXED}
    if not was["ema"] and not now["ema"]:
        return []
    changed = [k for k in EMA_RESUME_FIXED if was[k] != now[k]]
    if not changed:
        return []
    flags = ", ".join(f"--{k.replace('_', '-')} {was[k]!r} -> {now[k]!r}" for k in changed)
    return [
        f"--resume {folder}: the EMA settings changed ({flags}); the average would not continue the saved one "
        "(use the state's values, or start without --resume)"
    ]


def ema_metadata(options: TrainOptions) -> dict[str, str]:
    """The keys a saved result gets when it holds averaged weights (sdcore's own ``sdcore_*`` keys)."""
    o = options
    if not o.ema:
        return {}
    keys = {
        "sdcore_ema_decay": str(o.ema_decay),
        "sdcore_ema_update_every": str(o.ema_update_every),
        "sdcore_ema_warmup": o.ema_warmup,
    }
    if o.ema_warmup == "copy":
        keys["sdcore_ema_warmup_steps"] = str(o.ema_warmup_steps)
    return keys


class WeightEMA:
    """The fp32 shadow of ``params`` (the tensors the optimizer updates), updated by :meth:`update`."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        *,
        decay: float,
        update_every: int = 1,
        warmup: str = "onetrainer",
        warmup_steps: int = 0,
        device: str = "same",
    ) -> None:
        import torch

        self.params = list(params)
        self.decay = decay
        self.update_every = update_every
        self.warmup = warmup
        self.warmup_steps = warmup_steps
        self.on_cpu = device == "cpu"
        self.shadow = [
            p.detach().to(device="cpu" if self.on_cpu else p.device, dtype=torch.float32, copy=True)
            for p in self.params
        ]
        self._applied = False

    @classmethod
    def from_options(cls, options: TrainOptions, params: Sequence[torch.nn.Parameter]) -> WeightEMA:
        o = options
        return cls(params, decay=o.ema_decay, update_every=o.ema_update_every, warmup=o.ema_warmup,
                   warmup_steps=o.ema_warmup_steps, device=o.ema_device)  # fmt: skip

    def update(self, step: int) -> bool:
        """Average after optimizer step ``step`` (1-based) if it is one of the updating steps; True when it was."""
        import torch

        if step % self.update_every:
            return False
        keep = ema_decay_at(step, self.decay, self.warmup, self.warmup_steps)
        with torch.no_grad():
            for shadow, param in zip(self.shadow, self.params, strict=True):
                value = param.detach().to(device=shadow.device, dtype=torch.float32)
                shadow.mul_(keep).add_(value, alpha=1.0 - keep)
        return True

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in place of the raw ones for the ``with`` block, the raw ones back
        after it bit for bit (kept on the CPU with ``--ema-device cpu``). Nested blocks share one swap."""
        import torch

        if self._applied:
            yield
            return
        # an fp32 weight beside its shadow swaps storage with it (no copy, no memory: a full fine-tune's average
        # would otherwise need a second copy of the model while saving); the others are copied in and back
        swapped = [self._swappable(i) for i in range(len(self.params))]
        backup: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for i, (shadow, param) in enumerate(zip(self.shadow, self.params, strict=True)):
                if swapped[i]:
                    param.data, self.shadow[i] = shadow, param.data
                else:
                    backup[i] = param.detach().to("cpu" if self.on_cpu else param.device, copy=True)
                    param.copy_(shadow)
        self._applied = True
        try:
            yield
        finally:
            self._applied = False
            with torch.no_grad():
                for i, param in enumerate(self.params):
                    if swapped[i]:
                        param.data, self.shadow[i] = self.shadow[i], param.data
                    else:
                        param.copy_(backup[i])

    def _swappable(self, index: int) -> bool:
        shadow, param = self.shadow[index], self.params[index]
        return shadow.dtype == param.dtype and shadow.device == param.device and shadow.shape == param.shape

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors by position in the trained-parameter list (stable for a method and its shape options)."""
        return {f"ema.{i}": t.detach().to("cpu").contiguous().clone() for i, t in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor], *, where: str = "the state") -> None:
        problems = []
        if len(state) != len(self.shadow):
            problems.append(f"{len(state)} EMA tensors, this run trains {len(self.shadow)}")
        missing = []
        for i, shadow in enumerate(self.shadow):
            saved = state.get(f"ema.{i}")
            if saved is None:
                missing.append(f"ema.{i}")
            elif tuple(saved.shape) != tuple(shadow.shape):
                problems.append(f"EMA tensor {i} has shape {tuple(saved.shape)}, the weight {tuple(shadow.shape)}")
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            problems.append(f"no EMA tensor {', '.join(missing[:5])}{more}")
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))
        import torch

        with torch.no_grad():
            for i, shadow in enumerate(self.shadow):
                shadow.copy_(state[f"ema.{i}"])


def applied(ema: WeightEMA | None) -> contextlib.AbstractContextManager[None]:
    """``ema.applied()``, or nothing without an EMA."""
    return contextlib.nullcontext() if ema is None else ema.applied()

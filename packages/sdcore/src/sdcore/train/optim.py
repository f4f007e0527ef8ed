"""Optimizers and learning-rate schedules by name, with kohya-style ``--optimizer-args``.

Optional optimizers (8-bit AdamW, Lion, Prodigy, Adafactor) live in optional packages; asking for
one that is not installed is a :class:`ConfigError` naming the package to install, raised before
any model loads (see :func:`check_optimizer_available`).
"""

from __future__ import annotations

import ast
import importlib.util
from typing import Any

from ..errors import ConfigError

_OPTIONAL = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "lion": ("lion_pytorch", "lion-pytorch"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "adafactor": ("transformers", "transformers"),
}


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if "," in text:
        return tuple(_parse_value(part) for part in text.split(",") if part != "")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """Parse ``"weight_decay=0.01 betas=0.9,0.99 decouple=True"`` into keyword arguments."""
    args: dict[str, Any] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--optimizer-args: {item!r} is not key=value")
        args[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return args


def check_optimizer_available(name: str) -> None:
    """Raise :class:`ConfigError` when ``name`` needs a package that is not installed."""
    if name not in _OPTIONAL:
        return
    module, package = _OPTIONAL[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"--optimizer {name} is unavailable: install the '{package}' package (pip install {package})")


def _fusable(groups: list[dict[str, Any]]) -> bool:
    """True when torch's fused AdamW applies: floating-point parameters on CPU or CUDA, one device."""
    params = [p for group in groups for p in group["params"]]
    devices = {p.device.type for p in params}
    return (
        bool(params) and len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    )


def create_optimizer(
    name: str, param_groups: list[dict[str, Any]], *, lr: float, args: str | dict[str, Any] = ""
) -> Any:
    """Build the optimizer ``name`` over ``param_groups`` (groups may carry their own ``lr``)."""
    import torch

    check_optimizer_available(name)
    kwargs = parse_optimizer_args(args) if isinstance(args, str) else dict(args)
    groups = [{k: v for k, v in group.items() if k != "name"} for group in param_groups]
    try:
        if name == "adamw":
            if "fused" not in kwargs and "foreach" not in kwargs and _fusable(groups):
                # one kernel for all parameters: ~3x faster steps for the hundreds of small LoRA tensors
                kwargs["fused"] = True
            return torch.optim.AdamW(groups, lr=lr, **kwargs)
        if name == "sgd":
            return torch.optim.SGD(groups, lr=lr, **kwargs)
        if name == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, lr=lr, **kwargs)
        if name == "lion":
            from lion_pytorch import Lion

            return Lion(groups, lr=lr, **kwargs)
        if name == "prodigy":
            from prodigyopt import Prodigy

            return Prodigy(groups, lr=lr, **kwargs)
        if name == "adafactor":
            from transformers.optimization import Adafactor

            kwargs.setdefault("relative_step", False)
            kwargs.setdefault("scale_parameter", False)
            kwargs.setdefault("warmup_init", False)
            return Adafactor(groups, lr=lr, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"--optimizer-args not accepted by {name}: {exc}") from exc
    raise ConfigError(f"unknown optimizer {name!r}")


def create_scheduler(name: str, optimizer: Any, *, total_steps: int, warmup_steps: int = 0, power: float = 1.0) -> Any:
    """An LR schedule stepped once per optimizer step (diffusers' schedules)."""
    from diffusers.optimization import get_scheduler

    if name == "constant" and warmup_steps:
        name = "constant_with_warmup"
    kwargs: dict[str, Any] = {"num_warmup_steps": warmup_steps, "num_training_steps": max(total_steps, 1)}
    if name == "polynomial":
        kwargs["power"] = power
    if name == "constant":
        kwargs = {}
    if name == "constant_with_warmup":
        kwargs.pop("num_training_steps")
    try:
        return get_scheduler(name, optimizer, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"--lr-scheduler {name}: {exc}") from exc

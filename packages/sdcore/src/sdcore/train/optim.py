"""Optimizers and learning-rate schedules by name, with kohya-style ``--optimizer-args``.

One table (:data:`OPTIMIZER_TABLE`) names every optimizer kohya sd-scripts' ``get_optimizer``
accepts, with the class it builds, the pip package it lives in and the arguments kohya implies
(SGDNesterov's ``nesterov=True`` and ``momentum=0.9``). Any other name is a class path, as in
kohya: ``came_pytorch.CAME``, ``prodigyplus.ProdigyPlusScheduleFree``, or a bare ``torch.optim``
class name (``RAdam``). Asking for one whose package is not installed, or a path that does not
import to an optimizer class, is a :class:`ConfigError` raised before any model loads
(:func:`optimizer_problems`).

The LR schedules are transformers' (``transformers.optimization``), the functions kohya's
``get_scheduler_fix`` calls, with kohya's mapping of its options: ``lr_scheduler_num_cycles``
(restarts; halved for ``cosine_with_min_lr`` and ``warmup_stable_decay``),
``lr_scheduler_min_lr_ratio``, ``lr_decay_steps``, ``lr_scheduler_timescale``; ``piecewise_constant``
is diffusers'; ``lr_scheduler_type`` is any scheduler class with ``lr_scheduler_args``. Adafactor
with ``relative_step`` computes its own rate, so kohya forces the ``adafactor`` schedule (a proxy
that reports it); schedule-free optimizers (names ending in ``ScheduleFree``) get no schedule, as
kohya's dummy scheduler.

Optimizers with ``train()``/``eval()`` (schedule-free ones) hold other weights while stepping than
the ones to evaluate: the runtime switches them with :class:`OptimizerModes` around sampling,
saving and evaluation, as kohya's ``train_network.py`` does.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ConfigError
from ..options import option_label

#: import module (top level) -> the pip package that provides it, for "install X" messages
PIP_PACKAGES: dict[str, str] = {
    "bitsandbytes": "bitsandbytes",
    "lion_pytorch": "lion-pytorch",
    "prodigyopt": "prodigyopt",
    "transformers": "transformers",
    "dadaptation": "dadaptation",
    "schedulefree": "schedulefree",
    "prodigyplus": "prodigy-plus-schedule-free",
    "came_pytorch": "came-pytorch",
    "pytorch_optimizer": "pytorch-optimizer",
    "torch_optimizer": "torch-optimizer",
}


@dataclass(frozen=True)
class OptimizerSpec:
    """One named optimizer: ``cls`` is ``"module:Class"`` (imported only when the optimizer is built)."""

    cls: str
    #: passed to the class but not recorded in ``ss_optimizer`` (kohya passes them outside its kwargs)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    #: added when not given, and recorded (kohya adds them to its kwargs)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: optimizer state bytes per trainable fp32 parameter, for the memory plan
    state_bytes: float = 8.0
    #: D-Adaptation / Prodigy: the rate is a multiplier of an estimated step size (kohya advises lr ~ 1)
    adaptive_lr: bool = False

    @property
    def module(self) -> str:
        return self.cls.partition(":")[0]

    @property
    def package(self) -> str:
        top = self.module.split(".")[0]
        return "" if top == "torch" else PIP_PACKAGES.get(top, top)


def _bnb(name: str, state_bytes: float, **kw: Any) -> OptimizerSpec:
    return OptimizerSpec(f"bitsandbytes.optim:{name}", state_bytes=state_bytes, **kw)


_NESTEROV: dict[str, Any] = {"fixed": {"nesterov": True}, "defaults": {"momentum": 0.9}}

#: every optimizer kohya's ``--optimizer_type`` names (lower case, as kohya compares them), plus sdcore's plain ``sgd``
OPTIMIZER_TABLE: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch.optim:AdamW", state_bytes=8.0),  # exp_avg + exp_avg_sq, fp32
    "adamw8bit": _bnb("AdamW8bit", 2.05),  # two uint8 moments + per-block absmax (blocks of 2048)
    "pagedadamw": _bnb("PagedAdamW", 8.0),
    "pagedadamw8bit": _bnb("PagedAdamW8bit", 2.05),
    "pagedadamw32bit": _bnb("PagedAdamW32bit", 8.0),
    "lion": OptimizerSpec("lion_pytorch:Lion", state_bytes=4.0),  # one momentum
    "lion8bit": _bnb("Lion8bit", 1.03),
    "pagedlion8bit": _bnb("PagedLion8bit", 1.03),
    "sgd": OptimizerSpec("torch.optim:SGD", state_bytes=0.0),  # no momentum unless momentum=...
    "sgdnesterov": OptimizerSpec("torch.optim:SGD", state_bytes=4.0, **_NESTEROV),
    "sgdnesterov8bit": _bnb("SGD8bit", 1.03, **_NESTEROV),
    "dadaptation": OptimizerSpec("dadaptation.experimental:DAdaptAdamPreprint", state_bytes=12.0, adaptive_lr=True),
    "dadaptadampreprint": OptimizerSpec(
        "dadaptation.experimental:DAdaptAdamPreprint", state_bytes=12.0, adaptive_lr=True
    ),
    "dadaptadagrad": OptimizerSpec("dadaptation:DAdaptAdaGrad", state_bytes=12.0, adaptive_lr=True),
    "dadaptadam": OptimizerSpec("dadaptation:DAdaptAdam", state_bytes=12.0, adaptive_lr=True),
    "dadaptadan": OptimizerSpec("dadaptation:DAdaptAdan", state_bytes=20.0, adaptive_lr=True),
    "dadaptadanip": OptimizerSpec("dadaptation.experimental:DAdaptAdanIP", state_bytes=20.0, adaptive_lr=True),
    "dadaptlion": OptimizerSpec("dadaptation:DAdaptLion", state_bytes=8.0, adaptive_lr=True),
    "dadaptsgd": OptimizerSpec("dadaptation:DAdaptSGD", state_bytes=12.0, adaptive_lr=True),
    "prodigy": OptimizerSpec("prodigyopt:Prodigy", state_bytes=16.0, adaptive_lr=True),  # exp_avg(_sq), s, p0
    # factored second moment (rows + columns), no first moment by default
    "adafactor": OptimizerSpec("transformers.optimization:Adafactor", state_bytes=0.1),
    "radamschedulefree": OptimizerSpec("schedulefree:RAdamScheduleFree", state_bytes=8.0),
    "adamwschedulefree": OptimizerSpec("schedulefree:AdamWScheduleFree", state_bytes=8.0),  # z + exp_avg_sq
    "sgdschedulefree": OptimizerSpec("schedulefree:SGDScheduleFree", state_bytes=4.0),
}
#: sdcore's own Adafactor defaults when relative_step is not given: a fixed rate (kohya's default is
#: relative_step=True with transformers' other defaults; a kohya config without relative_step gets
#: relative_step=True through the kohya translation, so these never apply to it)
ADAFACTOR_DEFAULTS: dict[str, Any] = {"relative_step": False, "scale_parameter": False, "warmup_init": False}

#: every LR schedule by name: transformers' that kohya's get_scheduler_fix passes its options to,
#: diffusers' piecewise_constant, and kohya's adafactor proxy
LR_SCHEDULES = (
    "constant",
    "constant_with_warmup",
    "cosine",
    "linear",
    "polynomial",
    "cosine_with_restarts",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "inverse_sqrt",
    "piecewise_constant",
    "adafactor",
)


# ----------------------------------------------------------------------------------------------------------
# names and arguments


def normalize_optimizer(name: str) -> str:
    """A table name in lower case (kohya compares them so); a class path as given."""
    text = name.strip()
    return text.lower() if text.lower() in OPTIMIZER_TABLE else text


def is_schedule_free(name: str) -> bool:
    """kohya's test (``is_schedulefree_optimizer``): the name ends in ``ScheduleFree``. These
    optimizers get no LR schedule (their own warmup is an optimizer argument)."""
    return name.strip().lower().endswith("schedulefree")


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:  # kohya reads every value with ast.literal_eval: "0.9,0.99", "'1:10,0.1:20'", "[1, 2]"
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if "," in text:
        return tuple(_parse_value(part) for part in text.split(",") if part != "")
    return text


def parse_optimizer_args(text: str, flag: str = "--optimizer-args") -> dict[str, Any]:
    """Parse ``"weight_decay=0.01 betas=0.9,0.99 decouple=True"`` into keyword arguments."""
    args: dict[str, Any] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag}: {item!r} is not key=value")
        args[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return args


def optimizer_kwargs(name: str, args: str | Mapping[str, Any] = "") -> dict[str, Any]:
    """The keyword arguments kohya records for optimizer ``name``: the given ones, then the ones
    it implies (SGDNesterov's momentum; Adafactor's fixed-rate defaults here, with kohya's rule that
    ``warmup_init=True`` needs ``relative_step=True``)."""
    key = normalize_optimizer(name)
    kwargs = parse_optimizer_args(args) if isinstance(args, str) else dict(args)
    spec = OPTIMIZER_TABLE.get(key)
    if spec is not None:
        for k, v in spec.defaults.items():
            kwargs.setdefault(k, v)
    if key == "adafactor":
        if "relative_step" not in kwargs:  # sdcore's fixed-rate recipe; given relative_step: transformers' defaults
            for k, v in ADAFACTOR_DEFAULTS.items():
                kwargs.setdefault(k, v)
        if kwargs.get("warmup_init") and not kwargs.get("relative_step"):
            kwargs["relative_step"] = True  # kohya: "set relative_step to True because warmup_init is True"
    return kwargs


def adafactor_relative_step(name: str, args: str | Mapping[str, Any] = "") -> bool:
    """Adafactor computing its own rate (``relative_step``): the ``--lr`` is its initial rate only."""
    if normalize_optimizer(name) != "adafactor":
        return False
    try:
        return bool(optimizer_kwargs(name, args).get("relative_step"))
    except ConfigError:
        return False


def effective_scheduler(name: str, optimizer: str, optimizer_args: str = "", scheduler_type: str = "") -> str:
    """The schedule a run really uses, kohya's way: none (``constant``) for schedule-free
    optimizers, ``adafactor`` for Adafactor with ``relative_step`` (unless a scheduler class is given)."""
    if is_schedule_free(optimizer):
        return "constant"
    if not scheduler_type and adafactor_relative_step(optimizer, optimizer_args):
        return "adafactor"
    return name


# ----------------------------------------------------------------------------------------------------------
# the optimizer class


def _import_attr(path: str, flag: str) -> Any:
    """``module.Class`` / ``module:Class`` -> the attribute; ConfigError naming what to install."""
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{flag} {path!r}: give a class path such as module.Class")
    top = module_name.split(".")[0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(f"{flag} {path!r}: importing {module_name!r} failed ({exc})") from exc
        package = PIP_PACKAGES.get(top)
        hint = f"install the '{package}' package (pip install {package})" if package else "is its package installed?"
        raise ConfigError(f"{flag} {path!r}: cannot import module {module_name!r}: {hint}") from exc
    except Exception as exc:  # a broken third-party module: say which and why, no traceback
        raise ConfigError(f"{flag} {path!r}: importing {module_name!r} failed ({type(exc).__name__}: {exc})") from exc
    if not hasattr(module, attr):
        raise ConfigError(f"{flag} {path!r}: module {module_name!r} has no {attr!r}")
    return getattr(module, attr)


def optimizer_class(name: str) -> Any:
    """The optimizer class for a table name or a class path (a bare name is a ``torch.optim`` class)."""
    import torch

    key = normalize_optimizer(name)
    spec = OPTIMIZER_TABLE.get(key)
    if spec is not None:
        check_optimizer_available(key)
        cls = _import_attr(spec.cls, "--optimizer")
    elif "." in key:
        cls = _import_attr(key, "--optimizer")
    else:
        cls = getattr(torch.optim, key, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            known = ", ".join(OPTIMIZER_TABLE)
            raise ConfigError(
                f"--optimizer {name!r} is unknown: choose one of {known}, a torch.optim class (RAdam), "
                "or a class path (came_pytorch.CAME)"
            )
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"--optimizer {name!r} is not an optimizer class (a torch.optim.Optimizer subclass)")
    return cls


def check_optimizer_available(name: str) -> None:
    """Raise :class:`ConfigError` when a table optimizer's package is not installed (cheap: no import)."""
    spec = OPTIMIZER_TABLE.get(normalize_optimizer(name))
    if spec is None or not spec.package:
        return
    if importlib.util.find_spec(spec.module.split(".")[0]) is None:
        raise ConfigError(
            f"--optimizer {name} is unavailable: install the '{spec.package}' package (pip install {spec.package})"
        )


def optimizer_state_bytes(name: str) -> float:
    """Optimizer state bytes per trainable parameter (a class path: AdamW's 8, a guess)."""
    spec = OPTIMIZER_TABLE.get(normalize_optimizer(name))
    return 8.0 if spec is None else spec.state_bytes


# ----------------------------------------------------------------------------------------------------------
# building


def _fusable(groups: list[dict[str, Any]]) -> bool:
    """True when torch's fused AdamW applies: floating-point parameters on CPU or CUDA, one device."""
    params = [p for group in groups for p in group["params"]]
    devices = {p.device.type for p in params}
    return (
        bool(params) and len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    )


def create_optimizer(
    name: str,
    param_groups: list[dict[str, Any]],
    *,
    lr: float,
    args: str | dict[str, Any] = "",
    say: Callable[[str], None] | None = None,
) -> Any:
    """Build the optimizer ``name`` over ``param_groups`` (groups may carry their own ``lr``).

    kohya's rules: D-Adaptation/Prodigy advice when the rate is low or differs between groups;
    Adafactor with ``relative_step`` gets no rate (``--lr`` is the adafactor schedule's initial
    rate) and the groups' own rates are dropped. Optimizers with ``train()`` start in train mode.
    """
    tell = say or (lambda _message: None)
    key = normalize_optimizer(name)
    spec = OPTIMIZER_TABLE.get(key)
    cls = optimizer_class(key)
    kwargs = optimizer_kwargs(key, args)
    groups = [{k: v for k, v in group.items() if k != "name"} for group in param_groups]
    rate: float | None = lr
    if lr <= 0 and groups and all("lr" in group for group in groups):
        # --lr 0 beside per-part rates (kohya's learning_rate 0 with unet_lr): a default no group reads, which some
        # optimizers refuse (lion_pytorch asserts lr > 0); the groups keep their own rates
        rate = max(group["lr"] for group in groups)
    if spec is not None and spec.adaptive_lr:
        rates = [group.get("lr", lr) for group in groups]
        first = rates[0] if rates else lr
        if first <= 0.1:
            tell(f"--optimizer {key}: the learning rate {first:g} is low; D-Adaptation/Prodigy want about 1.0 (kohya)")
        if len(set(rates)) > 1:
            tell(f"--optimizer {key}: several learning rates given; only the first ({first:g}) takes effect (kohya)")
    if key == "adafactor" and kwargs.get("relative_step"):
        rate = None
        dropped = [group.pop("lr", None) for group in groups]  # every group's (no short-circuit)
        if any(value is not None for value in dropped):
            tell("Adafactor relative_step: the per-group learning rates (unet_lr, te_lr) are ignored (as kohya)")
    if key == "adamw" and "fused" not in kwargs and "foreach" not in kwargs and _fusable(groups):
        # one kernel for all parameters: ~3x faster steps for the hundreds of small LoRA tensors
        kwargs["fused"] = True
    call = {**kwargs, **(spec.fixed if spec is not None else {})}
    try:
        optimizer = cls(groups, lr=rate, **call)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--optimizer-args not accepted by {name}: {exc}") from exc
    train = getattr(optimizer, "train", None)
    if callable(train):
        train()  # kohya: schedule-free optimizers step in train mode (they refuse to step in eval mode)
    return optimizer


def optimizer_metadata(name: str, args: str | Mapping[str, Any] = "") -> str:
    """kohya's ``ss_optimizer``: ``module.Class(key=value,...)`` with the arguments kohya records."""
    key = normalize_optimizer(name)
    try:
        cls = optimizer_class(key)
        qualified = f"{cls.__module__}.{cls.__name__}"
    except ConfigError:
        spec = OPTIMIZER_TABLE.get(key)
        qualified = spec.cls.replace(":", ".") if spec is not None else key
    try:
        kwargs = optimizer_kwargs(key, args)
    except ConfigError:
        kwargs = {}
    text = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return qualified + (f"({text})" if text else "")


def scheduler_metadata(options: Any) -> str:
    """kohya's ``ss_lr_scheduler``: the name given, or ``adafactor:<lr>`` when Adafactor's
    relative_step forced its schedule (kohya rewrites ``args.lr_scheduler`` so)."""
    o = options
    if effective_scheduler(o.lr_scheduler, o.optimizer, o.optimizer_args, o.lr_scheduler_type) == "adafactor":
        return f"adafactor:{o.lr}"
    return str(o.lr_scheduler)


def steps_text(value: float) -> str:
    """A step count or ratio as kohya records it (``100``, ``0.1``)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# ----------------------------------------------------------------------------------------------------------
# schedules


def resolve_steps(value: float, total_steps: int) -> int:
    """kohya's ``lr_warmup_steps``/``lr_decay_steps``: a value below 1 is a ratio of the total steps."""
    if 0 < value < 1:
        return int(value * total_steps)
    return int(value)


@dataclass(frozen=True)
class ScheduleSettings:
    """The LR schedule options (kohya's names in brackets)."""

    name: str = "constant"  # lr_scheduler
    warmup_steps: float = 0  # lr_warmup_steps: steps, or a ratio of the total below 1
    power: float = 1.0  # lr_scheduler_power
    cycles: int = 1  # lr_scheduler_num_cycles
    min_lr_ratio: float | None = None  # lr_scheduler_min_lr_ratio
    decay_steps: float = 0  # lr_decay_steps: steps, or a ratio of the total below 1
    timescale: int | None = None  # lr_scheduler_timescale
    scheduler_type: str = ""  # lr_scheduler_type: a scheduler class
    scheduler_args: str = ""  # lr_scheduler_args
    initial_lr: float = 0.0  # the adafactor schedule's initial rate

    @classmethod
    def from_options(cls, o: Any) -> ScheduleSettings:
        return cls(
            name=effective_scheduler(o.lr_scheduler, o.optimizer, o.optimizer_args, o.lr_scheduler_type),
            warmup_steps=o.lr_warmup_steps,
            power=o.lr_power,
            cycles=o.lr_cycles,
            min_lr_ratio=o.lr_min_ratio,
            decay_steps=o.lr_decay_steps,
            timescale=o.lr_timescale,
            scheduler_type="" if is_schedule_free(o.optimizer) else o.lr_scheduler_type,
            scheduler_args=o.lr_scheduler_args,
            initial_lr=o.lr,
        )


def _scheduler_class(path: str) -> Any:
    import torch

    if "." in path:
        cls = _import_attr(path, "--lr-scheduler-type")
    else:
        cls = getattr(torch.optim.lr_scheduler, path, None)
        if cls is None:
            raise ConfigError(
                f"--lr-scheduler-type {path!r}: torch.optim.lr_scheduler has no such class (or give module.Class)"
            )
    if not isinstance(cls, type) or issubclass(cls, torch.optim.Optimizer) or not callable(getattr(cls, "step", None)):
        raise ConfigError(f"--lr-scheduler-type {path!r} is not a scheduler class (it has no step())")
    return cls


def _raw_arg(text: str, key: str) -> str | None:
    for item in text.split():
        k, sep, value = item.partition("=")
        if sep and k.strip() == key:
            return value.strip().strip("'\"")
    return None


def build_scheduler(settings: ScheduleSettings, optimizer: Any, *, total_steps: int) -> Any:
    """The LR schedule, stepped once per optimizer step, exactly as kohya's ``get_scheduler_fix``
    builds it from the same options (``total_steps`` = kohya's ``max_train_steps``)."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    s = settings
    total = max(total_steps, 1)
    warmup = resolve_steps(s.warmup_steps, total)
    decay = resolve_steps(s.decay_steps, total)
    kwargs = parse_optimizer_args(s.scheduler_args, "--lr-scheduler-args")

    def no_warmup(what: str) -> None:
        if warmup:
            raise ConfigError(f"{what} has no warmup (kohya refuses --lr-warmup-steps with it): set it to 0")

    try:
        if s.scheduler_type:
            no_warmup(f"--lr-scheduler-type {s.scheduler_type}")
            return _scheduler_class(s.scheduler_type)(optimizer, **kwargs)
        name = s.name
        if name == "adafactor":
            from transformers.optimization import Adafactor, AdafactorSchedule

            if not isinstance(optimizer, Adafactor) or not optimizer.defaults.get("relative_step"):
                raise ConfigError("--lr-scheduler adafactor needs --optimizer adafactor with relative_step=True")
            no_warmup("--lr-scheduler adafactor")
            return AdafactorSchedule(optimizer, s.initial_lr)
        if name == "piecewise_constant":
            from diffusers.optimization import get_piecewise_constant_schedule

            rules = _raw_arg(s.scheduler_args, "step_rules")
            if not rules:
                raise ConfigError(
                    "--lr-scheduler piecewise_constant needs --lr-scheduler-args step_rules=1:10,0.1:20,0.01 "
                    "(factor:until_step pairs, then the last factor)"
                )
            kwargs.pop("step_rules", None)
            return get_piecewise_constant_schedule(optimizer, rules, **kwargs)
        if name == "constant" and warmup:
            name = "constant_with_warmup"  # sdcore: warmup on the constant schedule means warming up to it
        if name not in LR_SCHEDULES:
            raise ConfigError(f"--lr-scheduler {name!r}: choose one of {', '.join(LR_SCHEDULES)}")
        func: Any = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
        if name == "constant":
            return func(optimizer, **kwargs)
        if name == "constant_with_warmup":
            return func(optimizer, num_warmup_steps=warmup, **kwargs)
        if name == "inverse_sqrt":
            return func(optimizer, num_warmup_steps=warmup, timescale=s.timescale, **kwargs)
        common = {"num_warmup_steps": warmup, **kwargs}
        if name == "cosine_with_restarts":
            return func(optimizer, num_training_steps=total, num_cycles=s.cycles, **common)
        if name == "polynomial":
            return func(optimizer, num_training_steps=total, power=s.power, **common)
        if name == "cosine_with_min_lr":
            if s.min_lr_ratio is None and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
                raise ConfigError("--lr-scheduler cosine_with_min_lr needs --lr-min-ratio (the floor, e.g. 0.1)")
            return func(
                optimizer, num_training_steps=total, num_cycles=s.cycles / 2, min_lr_rate=s.min_lr_ratio, **common
            )
        if name in ("linear", "cosine"):
            return func(optimizer, num_training_steps=total, **common)
        # warmup_stable_decay: stable = total - warmup - decay (kohya)
        stable = total - warmup - decay
        if stable < 0:
            raise ConfigError(
                f"--lr-scheduler warmup_stable_decay: warmup ({warmup}) + decay ({decay}) steps exceed the "
                f"run's {total} steps"
            )
        return func(
            optimizer,
            num_stable_steps=stable,
            num_decay_steps=decay,
            num_cycles=s.cycles / 2,
            min_lr_ratio=s.min_lr_ratio if s.min_lr_ratio is not None else 0.0,
            **common,
        )
    except (TypeError, ValueError, KeyError) as exc:
        what = f"--lr-scheduler-type {s.scheduler_type}" if s.scheduler_type else f"--lr-scheduler {s.name}"
        raise ConfigError(f"{what}: {exc}") from exc


def create_scheduler(
    name: str, optimizer: Any, *, total_steps: int, warmup_steps: float = 0, power: float = 1.0
) -> Any:
    """A named LR schedule with warmup (see :func:`build_scheduler` for every option)."""
    return build_scheduler(
        ScheduleSettings(name=name, warmup_steps=warmup_steps, power=power), optimizer, total_steps=total_steps
    )


def constant_schedule(optimizer: Any) -> Any:
    """kohya's dummy scheduler for schedule-free optimizers: the rate stays ``--lr``."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)


def scheduler_for(options: Any, optimizer: Any, *, total_steps: int) -> Any:
    """The run's LR schedule from its options (kohya's choice of schedule included)."""
    if is_schedule_free(options.optimizer):
        return constant_schedule(optimizer)
    return build_scheduler(ScheduleSettings.from_options(options), optimizer, total_steps=total_steps)


# ----------------------------------------------------------------------------------------------------------
# pre-flight


def optimizer_problems(o: Any) -> list[str]:
    """Bad optimizer/schedule options, one line each (the class paths are imported and checked)."""
    name = normalize_optimizer(o.optimizer)
    try:
        if name in OPTIMIZER_TABLE:
            check_optimizer_available(name)
        else:
            optimizer_class(name)
        optimizer_kwargs(name, o.optimizer_args)
    except ConfigError as exc:
        return [str(exc), *_schedule_problems(o, name)]
    return _schedule_problems(o, name)


def reads_cycles(o: Any) -> bool:
    """Whether the run's schedule reads ``--lr-cycles`` (kohya's ``lr_scheduler_num_cycles``): cosine_with_restarts,
    cosine_with_min_lr, and warmup_stable_decay with its default cosine decay. Every other schedule ignores it, as
    kohya does, so the kohya_ss GUI's ``lr_scheduler_num_cycles = 0`` beside a constant schedule trains."""
    if o.lr_scheduler_type or is_schedule_free(o.optimizer):
        return False
    name = effective_scheduler(o.lr_scheduler, o.optimizer, o.optimizer_args, o.lr_scheduler_type)
    if name == "warmup_stable_decay":
        return (_raw_arg(o.lr_scheduler_args, "decay_type") or "cosine") == "cosine"
    return name in ("cosine_with_restarts", "cosine_with_min_lr")


def cycles_problems(o: Any) -> list[str]:
    """``--lr-cycles`` below 1 where the schedule reads it: the cosine of 0 cycles is 1 at every step, so the
    schedule asked for would hold the rate flat (and a negative count runs it backwards); elsewhere it is unread."""
    if o.lr_cycles >= 1 or not reads_cycles(o):
        return []
    label = option_label(o, "lr_cycles")
    return [
        f"{label} must be at least 1 with --lr-scheduler {o.lr_scheduler}, got {o.lr_cycles} (0 cycles hold the rate flat)"
    ]


def _schedule_problems(o: Any, name: str, total_steps: int | None = None) -> list[str]:
    """The schedule's problems; ``total_steps`` is the run's length when known (else ``--max-steps``): a ratio
    warmup/decay is ``int(ratio * steps)`` of it (kohya), so without a length it is judged later
    (:func:`schedule_length_problems`)."""
    problems: list[str] = []
    steps = o.max_steps or total_steps
    warmup, decay = o.lr_warmup_steps, o.lr_decay_steps
    for flag, value in (("--lr-warmup-steps", warmup), ("--lr-decay-steps", decay)):
        if not value >= 0 or (value >= 1 and not float(value).is_integer()):
            problems.append(f"{flag} must be a step count or a ratio of the total steps below 1, got {value}")
    problems.extend(cycles_problems(o))
    if o.lr_min_ratio is not None and not 0 <= o.lr_min_ratio <= 1:
        problems.append(f"--lr-min-ratio must be between 0 and 1, got {o.lr_min_ratio}")
    if o.lr_timescale is not None and o.lr_timescale < 1:
        problems.append(f"--lr-timescale must be at least 1, got {o.lr_timescale}")
    if o.lr_scheduler not in LR_SCHEDULES:
        problems.append(f"--lr-scheduler {o.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULES)}")
        return problems
    if o.lr_scheduler == "adafactor" and not adafactor_relative_step(o.optimizer, o.optimizer_args):
        problems.append(
            "--lr-scheduler adafactor reports Adafactor's own rate: it needs --optimizer adafactor with "
            "--optimizer-args relative_step=True (kohya)"
        )
        return problems
    if problems or is_schedule_free(name):
        return problems
    # build the schedule once on a stand-in optimizer: every bad name/argument now, not after loading
    import torch

    settings = ScheduleSettings.from_options(o)
    if not steps:  # a ratio's steps are known with the run's length (schedule_length_problems, build_scheduler)
        settings = replace(
            settings, warmup_steps=0 if 0 < warmup < 1 else warmup, decay_steps=0 if 0 < decay < 1 else decay
        )
    if settings.name == "adafactor" and not settings.scheduler_type:
        # kohya refuses a warmup of int(ratio * max_train_steps) != 0: 0.01 of 50 steps is 0 steps and runs
        if resolve_steps(settings.warmup_steps, steps or 1):
            problems.append(
                "--lr-scheduler adafactor has no warmup (kohya refuses --lr-warmup-steps with it): set it to 0"
            )
        return problems
    stand_in = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)  # a bad --lr is reported apart
    try:  # without --max-steps the length is known after the dataset is read: no overlong-phase check then
        total = steps or max(1000, int(warmup) + int(decay))
        build_scheduler(settings, stand_in, total_steps=total)
    except ConfigError as exc:
        problems.append(str(exc))
    return problems


def schedule_length_problems(o: Any, total_steps: int) -> list[str]:
    """The schedule's problems at the run's length, once the dataset gives it (``--epochs`` without
    ``--max-steps``): a ratio warmup/decay is then ``int(ratio * total_steps)`` steps, as kohya's
    ``get_scheduler_fix`` counts it, which :func:`optimizer_problems` could not judge without the length (the
    Adafactor schedule's warmup refusal, warmup_stable_decay's phases). Empty with ``--max-steps`` (judged there)."""
    if o.max_steps or total_steps < 1:
        return []
    ratios = (o.lr_warmup_steps, o.lr_decay_steps)
    if not any(0 < value < 1 for value in ratios):
        return []
    name = normalize_optimizer(o.optimizer)
    return [p for p in _schedule_problems(o, name, total_steps) if p not in _schedule_problems(o, name)]


def optimizer_notes(o: Any) -> list[str]:
    """What kohya does with these options that the user may not expect (printed with the plan)."""
    notes: list[str] = []
    name = normalize_optimizer(o.optimizer)
    if is_schedule_free(name) and (o.lr_scheduler != "constant" or o.lr_warmup_steps or o.lr_scheduler_type):
        notes.append(
            f"--optimizer {name} is schedule-free: --lr-scheduler/--lr-warmup-steps are not used (as kohya); "
            "give its own warmup with --optimizer-args warmup_steps=N"
        )
    if adafactor_relative_step(name, o.optimizer_args):
        if o.lr_scheduler not in ("adafactor", "constant") and not o.lr_scheduler_type:
            notes.append(
                f"Adafactor relative_step: the adafactor schedule replaces --lr-scheduler {o.lr_scheduler} (kohya)"
            )
        notes.append(f"Adafactor relative_step: the rate is Adafactor's own; --lr {o.lr:g} is only its initial rate")
    return notes


# ----------------------------------------------------------------------------------------------------------
# train/eval modes


def _modal(optimizer: Any) -> Any:
    """The optimizer whose ``train()``/``eval()`` switch its weights (under accelerate's wrapper), or None."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer always has train/eval
    if callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None)):
        return inner
    return None


class OptimizerModes:
    """``with modes.evaluating():`` puts an optimizer with ``train()``/``eval()`` (schedule-free ones)
    in eval mode for sampling, saving and evaluating, and back to train mode after; nested uses
    switch once. A no-op for other optimizers."""

    def __init__(self, optimizer: Any) -> None:
        self.target = _modal(optimizer)
        self.depth = 0

    @property
    def active(self) -> bool:
        return self.target is not None

    def train(self) -> None:
        if self.target is not None and self.depth == 0:
            self.target.train()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        if self.target is None:
            yield
            return
        if self.depth == 0:
            self.target.eval()
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.target.train()


__all__ = [
    "LR_SCHEDULES",
    "OPTIMIZER_TABLE",
    "OptimizerModes",
    "OptimizerSpec",
    "ScheduleSettings",
    "build_scheduler",
    "check_optimizer_available",
    "create_optimizer",
    "create_scheduler",
    "optimizer_class",
    "optimizer_kwargs",
    "optimizer_metadata",
    "optimizer_problems",
    "parse_optimizer_args",
    "schedule_length_problems",
    "scheduler_for",
    "scheduler_metadata",
]

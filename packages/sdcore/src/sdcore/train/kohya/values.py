"""kohya value converters: kohya's spellings of values (``resolution = "512,512"``, ``optimizer_type = "AdamW8bit"``,
scheduler and loss names, ratios, path lists) -> sdcore's, and what "off" means in a kohya config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..loss import HUBER_SCHEDULES, LOSS_TYPES
from ..optim import LR_SCHEDULES, OPTIMIZER_TABLE


def _text(value: Any) -> str:
    return str(value).strip()


def resolution_value(value: Any) -> int | tuple[int, int]:
    """kohya: ``512``, ``"512"``, ``"512,512"`` -> ``512``; ``"768,512"`` or ``[768, 512]`` -> ``(768, 512)``
    (0 stays 0, sdcore's "the model's native size"). The pair is kept because kohya builds its buckets on the
    exact area ``w * h`` and crops to ``w`` x ``h`` with buckets off (:func:`split_resolution` makes it
    ``resolution`` = its side plus ``resolution_size``); a square pair is its side, as kohya trains it the same."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (list, tuple)):
        parts = [int(v) for v in value]
    else:
        parts = [int(float(p)) for p in str(value).replace(" ", "").split(",") if p]
    if len(parts) == 1:
        parts *= 2
    if parts == [0, 0]:
        return 0  # sdcore's own spelling of "the model's native size"
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError
    return parts[0] if parts[0] == parts[1] else (parts[0], parts[1])


def resolution_side(value: Any) -> int:
    """kohya: ``512``, ``"512"``, ``"512,768"`` or ``[512, 768]`` -> the side of the same area (0 stays 0)."""
    read = resolution_value(value)
    from ...data.buckets import area_side

    return area_side(read)


def split_resolution(resolution: Any, size: Any) -> tuple[int, tuple[int, int] | None]:
    """``(resolution, resolution_size)`` of the options from a ``resolution`` in any spelling (int, ``"W,H"``,
    ``[W, H]``) and a ``resolution_size`` given beside it (a dumped config's ``[W, H]``, else ``None``): a pair
    becomes its side ``isqrt(W*H)`` and the pair; a plain side keeps a given size only where it is that size's
    side. Raises ``ValueError`` for what is not a resolution."""
    from ...data.buckets import area_side

    read = resolution_value(resolution)
    if not isinstance(read, int):
        return area_side(read), read
    if size is None:
        return read, None
    given = resolution_value(size)
    if isinstance(given, int) or area_side(given) != read:
        return read, None
    return read, given


def _args_text(value: Any) -> str:
    """kohya lists ``["weight_decay=0.1", "betas=0.9,0.99"]`` -> sdcore's ``"weight_decay=0.1 betas=0.9,0.99"``."""
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value if _text(v))
    return _text(value)


def _pair_text(value: Any) -> str:
    """kohya's ``"2.0,4.0"`` (CLI) or ``[2.0, 4.0]`` (TOML) -> ``"2.0,4.0"``."""
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return _text(value)


def _precision(value: Any) -> str:
    text = _text(value).lower()
    return {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(text, text)


def _te_rates(value: Any) -> float | str | tuple[float, ...] | None:
    """``text_encoder_lr`` (argparse ``nargs="*"``): one number, or a list whose values are one per text
    encoder. A list of one value (or of equal ones) is that rate; different values stay a tuple, which
    :func:`kohya_text_encoder_rates` gives to the encoders once the model's family is known. A rate of 0
    keeps the encoders' modules untrained, as in kohya (:func:`_zero_is_a_value`)."""
    if isinstance(value, (list, tuple)):
        rates = tuple(float(v) for v in value)
        if not rates:
            return None
        return _zero_is_a_value(rates[0]) if len(set(rates)) == 1 else rates
    return _zero_is_a_value(value)


def _zero_is_a_value(value: Any) -> float | str:
    """A kohya number whose 0 is a value, not "unset", passed on as the text ``"0"``, which the config layer's rule
    for kohya_ss's untouched fields (a numeric 0 of an optional option means None) leaves as it is:

    * rates whose 0 freezes a part: ``learning_rate_te{1,2,3}`` (sdxl_train.py, sd3_train.py: "0 means not
      train"), ``learning_rate_te`` (train_db.py, fine_tune.py: the text encoder's optimizer group at rate 0) and the
      LoRA scripts' ``unet_lr`` / ``text_encoder_lr`` (networks/lora*.py ``prepare_optimizer_params`` leave a 0-rate
      group out of the optimizer; only modules a ``network_reg_lrs`` rule gives a rate still train); the kohya_ss
      GUI writes no 0 rate (its presets' 0 is turned into train flags first);
    * ``guidance_scale`` (flux_train_network.py / flux_train.py feed ``float(args.guidance_scale)`` to the guidance
      embedding; kohya's docs ask 0.0 for Chroma; ``--guidance-scale``'s None is "not given"); the kohya_ss GUI's
      LoRA tab, which writes no 0, drops it first (:mod:`.kohya_gui`)."""
    number = float(value)
    return "0" if number == 0 else number


def _is_zero_rate(value: Any) -> bool:
    try:
        return value is not None and not isinstance(value, bool) and float(value) == 0
    except (TypeError, ValueError):
        return False


#: kohya optimizer_type (lower case) -> (sdcore optimizer, extra optimizer args kohya implies): sdcore's
#: optimizer table has kohya's names; kohya's Adafactor computes its own rate unless told otherwise
OPTIMIZERS = {name: (name, "") for name in OPTIMIZER_TABLE if name != "sgd"} | {
    "adafactor": ("adafactor", "relative_step=True")
}


#: kohya lr_scheduler -> sdcore (the same names: transformers' schedules, diffusers' piecewise_constant)
SCHEDULERS = {name: name for name in LR_SCHEDULES}


def _optimizer(value: Any) -> str:
    """A table name (any case) -> sdcore's; any other name is a class path, checked by the pre-flight
    (kohya: ``module.Class``, or a bare name from ``torch.optim``)."""
    text = _text(value)
    if text.lower() in OPTIMIZER_TABLE:
        return text.lower()
    if not all(part.isidentifier() for part in text.split(".")):
        raise ValueError(f"available: {', '.join(OPTIMIZERS)}, or a class path such as came_pytorch.CAME")
    return text


def _steps_or_ratio(value: Any) -> int | float:
    """kohya's ``lr_warmup_steps``/``lr_decay_steps`` (``int_or_float``): a step count, or a float
    below 1 (or ``"10%"``) as a ratio of the total steps."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            ratio = float(text[:-1]) / 100.0
            if not 0 <= ratio < 1:
                raise ValueError("a percentage must be between 0% and 100%")
            return ratio
        number = float(text)
        value = int(text) if number >= 1 else number  # kohya: int("1.5") is an error
    if isinstance(value, float) and value >= 1:
        raise ValueError(
            "kohya reads a float as a ratio of the total steps (times the steps); write an integer step count"
        )
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _named(table: Mapping[str, str] | Sequence[str], note: str = "") -> Callable[[Any], str]:
    """A converter for a kohya option whose value is one of ``table``'s names (case-insensitive),
    giving sdcore's name for it (a sequence maps each name to itself)."""
    names = dict(table) if isinstance(table, Mapping) else {name: name for name in table}

    def convert(value: Any) -> str:
        name = _text(value).lower()
        if name not in names:
            raise ValueError(f"available: {', '.join(names)}{note}")
        return names[name]

    return convert


_scheduler = _named(SCHEDULERS)


#: kohya's flow-matching samplings (flux_train_network.py) -> sdcore's: kohya "shift" is its sigmoid
#: sampling followed by the --discrete_flow_shift time shift (sdcore's sigmoid with the shift); kohya's
#: uniform and sigmoid do not shift (see :func:`kohya_flow_semantics`), its sigma and flux_shift are sdcore's
FLOW_SAMPLINGS = {"sigma": "sigma", "uniform": "uniform", "sigmoid": "sigmoid", "shift": "sigmoid",
                  "flux_shift": "flux_shift", "logit_normal": "logit_normal", "mode": "mode"}  # fmt: skip


#: kohya's --weighting_scheme (train_util.py; "none" is "uniform" there too): sdcore's option of the same name
WEIGHTING_SCHEMES = {"uniform": "uniform", "none": "uniform", "logit_normal": "logit_normal", "mode": "mode",
                     "sigma_sqrt": "sigma_sqrt", "cosmap": "cosmap"}  # fmt: skip


#: kohya Flux's --model_prediction_type values (sdcore's "x0" is how kohya's SD3 script reads the output)
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled", "x0")


_flow_sampling = _named(FLOW_SAMPLINGS)


_weighting_scheme = _named(WEIGHTING_SCHEMES)


_model_prediction_type = _named(MODEL_PREDICTION_TYPES)


_loss_type = _named(LOSS_TYPES)


_huber_schedule = _named(HUBER_SCHEDULES)


def _v_parameterization(value: Any) -> str:
    """kohya's ``--v_parameterization`` (store_true; the GUI writes false) -> ``--prediction-type``: v, or the
    model's own (auto) where it is off; sdcore, unlike kohya, also reads a v-prediction file's own marker."""
    return "auto" if _is_off(value, _OFF) else "v_prediction"


def _off_is_zero(value: Any) -> float:
    """kohya's ``v_pred_like_loss`` defaults to None (off); the GUI writes 0 for off."""
    if isinstance(value, str) and value.strip().lower() in ("", "none", "false"):
        return 0.0
    return float(value)


def _unless_zero(value: Any) -> Any:
    """kohya tests these options for truth (``if args.ip_noise_gamma:``) and kohya_ss writes 0 for
    an untouched field; 0 is sdcore's "not set" (None), so a GUI preset's 0 never trips a check
    that only applies when the option is on (adaptive_noise_scale needs noise_offset)."""
    return None if value == 0 else value


def _ratio(value: Any) -> float | None:
    """A top-level LoRA+ ratio: the kohya_ss GUI writes 0 for "off" (it then leaves it out of network_args)."""
    return _unless_zero(float(value))


def _path_list(value: Any) -> str:
    """kohya ``--base_weights a.safetensors b.safetensors`` (a list) -> sdcore's ``"a.safetensors,b.safetensors"``."""
    items = [_text(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if _text(v)]
    if any("," in item for item in items):
        raise ValueError("a path with a comma cannot be passed on (sdcore separates the files with commas)")
    return ",".join(items)


def _float_list(value: Any) -> str:
    """kohya ``--base_weights_multiplier 1.0 0.5`` (a list of floats) -> ``"1.0,0.5"``."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    return ",".join(str(float(v)) for v in items)


_OFF: tuple[Any, ...] = (None, False, "", 0, 0.0, [], ())


def _is_off(value: Any, allowed: tuple[Any, ...]) -> bool:
    """Whether a kohya value means "not used" (kohya_ss writes untouched fields this way)."""
    if isinstance(value, (list, tuple, dict)):
        return not value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "false", "none"):
            return True
        if any(isinstance(a, str) and a.lower() == text for a in allowed):
            return True
        try:
            value = float(text)
        except ValueError:
            return False
    return any(value == a for a in allowed if not isinstance(a, (str, list, tuple)))

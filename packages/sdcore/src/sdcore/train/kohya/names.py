"""Which names are kohya's: :func:`is_kohya_name`, the store_true flags (:func:`flag_names`), the options that take
several values (:data:`MULTI_VALUE`) and the names a method's command line accepts (:func:`cli_names`).
"""

from __future__ import annotations

from collections.abc import Iterable

from .tables import _FLAG_COMPOSITES, _FLAG_IGNORED, _FLAG_UNSUPPORTED, ALIASES, COMPOSITE, IGNORED, UNSUPPORTED


def is_kohya_name(name: str) -> bool:
    return name in ALIASES or name in COMPOSITE or name in IGNORED or name in UNSUPPORTED


def flag_names() -> set[str]:
    """kohya options that are store_true flags on kohya's command line."""
    return (
        {n for n, a in ALIASES.items() if a.flag}
        | _FLAG_COMPOSITES
        | (_FLAG_IGNORED & set(IGNORED))
        | (_FLAG_UNSUPPORTED & set(UNSUPPORTED))
    )


#: kohya options that take several values (argparse nargs="*")
MULTI_VALUE = (
    "network_args",
    "optimizer_args",
    "lr_scheduler_args",
    "base_weights",
    "base_weights_multiplier",
    "text_encoder_lr",
)


def cli_names(fields: Iterable[str]) -> list[str]:
    """kohya names to accept on the command line for a method with these option fields."""
    present = set(fields)
    names = [n for n, a in ALIASES.items() if a.applies(present)]
    names += [n for n in COMPOSITE if _composite_applies(n, present)]
    names += list(IGNORED) + list(UNSUPPORTED)
    names = [n for n in names if "_" in n or n not in present]  # --seed is sdcore's own flag
    return list(dict.fromkeys(names))


def _composite_applies(name: str, fields: set[str]) -> bool:
    if name in ("network_module", "network_args"):
        return "rank" in fields
    if name in ("use_object_template", "use_style_template"):
        return "template" in fields
    return True

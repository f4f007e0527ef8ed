"""Weight-initialisation names: sdcore's option values, A1111's stored names and how users type them.

Torch-free, so the CLI (``sdcore --help``, ``--init`` parsing) reads it without importing torch.
A1111's Train tab offers "Normal", "XavierUniform", "XavierNormal", "KaimingUniform" and
"KaimingNormal" (what its files store as ``weight_initialization``); users also type them with spaces,
hyphens or underscores and in any case. Every spelling maps to the same option value.
"""

from __future__ import annotations

#: ``--init`` values (what configs and ``--save-config`` hold)
WEIGHT_INIT_CHOICES = ("normal", "xavier-uniform", "xavier-normal", "kaiming-uniform", "kaiming-normal")

#: Canonical weight-init names as stored in files (A1111's), keyed by the spellings we accept.
WEIGHT_INITS: dict[str, str] = {
    "normal": "Normal",
    "xavieruniform": "XavierUniform",
    "xaviernormal": "XavierNormal",
    "xavier": "XavierUniform",
    "kaiminguniform": "KaimingUniform",
    "kaimingnormal": "KaimingNormal",
    "kaiming": "KaimingUniform",
}

#: A1111's stored name -> the ``--init`` value
_CHOICE_OF = {WEIGHT_INITS[choice.replace("-", "")]: choice for choice in WEIGHT_INIT_CHOICES}


def weight_init_key(name: str) -> str:
    """``Xavier Normal`` / ``xavier_normal`` / ``XavierNormal`` -> ``xaviernormal`` (the key of :data:`WEIGHT_INITS`)."""
    return "".join(ch for ch in name.lower() if ch not in " -_\t")


def stored_weight_init(name: str) -> str | None:
    """A1111's stored name for any accepted spelling, or ``None`` for an unknown one."""
    return WEIGHT_INITS.get(weight_init_key(name))


def weight_init_choice(value: str) -> str:
    """The ``--init`` value for any accepted spelling (``"Xavier Normal"`` -> ``"xavier-normal"``); an unknown
    value comes back unchanged, so the option's choices check reports it with the accepted values."""
    stored = stored_weight_init(value)
    return _CHOICE_OF[stored] if stored is not None else value


def accepted_weight_inits() -> str:
    """The accepted values, for messages: the option values, then A1111's spellings."""
    return f"{', '.join(WEIGHT_INIT_CHOICES)} (or A1111's {', '.join(_CHOICE_OF)}, in any case, with spaces)"

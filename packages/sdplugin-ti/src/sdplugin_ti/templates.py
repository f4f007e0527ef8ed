"""TI's built-in prompt templates (``style``, ``subject``, ``*_filewords``, ``none``).

The files are our own wording in A1111's format; loading and rendering are sdcore's
(:mod:`sdcore.train.templates`), shared with the other template-driven methods.
"""

from __future__ import annotations

from sdcore.train.templates import load_template as _load
from sdcore.train.templates import pick_line, render

BUILTIN = ("style", "subject", "style_filewords", "subject_filewords", "none", "filewords")


def load_template(spec: str) -> tuple[str, ...]:
    """A built-in name of this plugin or a template file path -> its lines."""
    return _load(spec, package="sdplugin_ti", builtin=BUILTIN)


__all__ = ["BUILTIN", "load_template", "pick_line", "render"]

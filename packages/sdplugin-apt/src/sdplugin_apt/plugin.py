"""Import-light registration of sdplugin-apt (no torch here)."""

from __future__ import annotations

from collections.abc import Callable

import sdcore
from sdcore import MethodSpec


@sdcore.hookimpl
def sdcore_register_methods(register: Callable[[MethodSpec], None]) -> None:
    register(
        MethodSpec(
            name="apt",
            summary="DreamArtist: a positive and a negative embedding trained with a training-time CFG loss.",
            method="sdplugin_apt.method:APTMethod",
            aliases=("dreamartist",),
        )
    )

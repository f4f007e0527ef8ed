"""Import-light registration of the DreamBooth method (no torch here)."""

from __future__ import annotations

import sdcore
from sdcore import MethodSpec


@sdcore.hookimpl
def sdcore_register_methods(register):
    register(
        MethodSpec(
            name="dreambooth",
            summary="DreamBooth: full fine-tuning with prior preservation, saved as a checkpoint UIs load",
            method="sdplugin_dreambooth.method:DreamBoothMethod",
            aliases=("db",),
        )
    )

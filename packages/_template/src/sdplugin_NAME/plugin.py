"""Registration only (imported by every `sdcore` start: keep it free of torch)."""

from __future__ import annotations

import sdcore
from sdcore import MethodSpec


@sdcore.hookimpl
def sdcore_register_methods(register):
    register(MethodSpec(name="NAME", summary="SUMMARY", method="sdplugin_NAME.method:Method"))

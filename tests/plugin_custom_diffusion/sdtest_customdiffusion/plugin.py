"""Registration of the test-only Custom Diffusion method (import-light: no torch)."""

from typing import Any

import sdcore
from sdcore import MethodSpec


@sdcore.hookimpl
def sdcore_register_methods(register: Any) -> None:
    register(
        MethodSpec(
            name="custom-diffusion",
            summary="Custom Diffusion (test plugin): cross-attention K/V and a new token, for diffusers",
            method="sdtest_customdiffusion.method:CustomDiffusionMethod",
        )
    )

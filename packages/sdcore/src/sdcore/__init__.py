"""sdcore: the core of a plugin-based Stable Diffusion fine-tuning toolkit.

Importing this package is cheap (no torch): heavy entry points such as :func:`load_model` are
imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DataError, ModelFormatError, NetworkMismatchError, PluginError, SdcoreError
from .hookspecs import hookimpl
from .specs import MethodSpec, ModelFormatSpec, PromptNetworkSpec, TaggerSpec

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "MethodSpec",
    "ModelFormatError",
    "ModelFormatSpec",
    "NetworkMismatchError",
    "PluginError",
    "PromptNetworkSpec",
    "SdcoreError",
    "TaggerSpec",
    "__version__",
    "create_tiny_bundle",
    "hookimpl",
    "load_model",
]

if TYPE_CHECKING:
    from .models.load import load_model
    from .models.tiny import create_tiny_bundle

_LAZY = {
    "load_model": "sdcore.models.load:load_model",
    "create_tiny_bundle": "sdcore.models.tiny:create_tiny_bundle",
    "ModelBundle": "sdcore.models.bundle:ModelBundle",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from .specs import resolve

        return resolve(_LAZY[name])
    raise AttributeError(f"module 'sdcore' has no attribute {name!r}")

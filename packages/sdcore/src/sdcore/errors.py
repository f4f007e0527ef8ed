"""The one exception family sdcore raises on purpose.

Every error a user can cause (bad file, bad option, wrong model family) is a subclass of
:class:`SdcoreError`, so the CLI can print it as one line and exit non-zero without a traceback,
and library users can catch exactly our errors.
"""

from __future__ import annotations


class SdcoreError(Exception):
    """Base class for errors caused by input, configuration or files (not by bugs)."""


class ConfigError(SdcoreError):
    """An option or config file is invalid or contradicts another option."""


class ModelFormatError(SdcoreError):
    """A model file is unreadable, truncated, unsafe or of an unknown layout."""


class UnsafeFileError(ModelFormatError):
    """A pickle-based file asked to run code or build objects outside the allow-list."""


class DataError(SdcoreError):
    """A dataset folder or dataset config cannot be used."""


class NetworkMismatchError(SdcoreError):
    """A network file (LoRA, embedding, hypernetwork) does not fit the loaded model."""


class PluginError(SdcoreError):
    """A plugin failed to load, registered something invalid, or clashes with another plugin."""

"""Frozen registry entries that plugins hand to the core.

Heavy parts are *import strings* (``"package.module:attribute"``): the core resolves them only
when the user runs that method or tagger, so listing plugins and printing ``--help`` never
imports torch. Names are stable lowercase ids because they end up in users' config files.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import PluginError

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_IMPORT_STRING = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def resolve(import_string: str) -> Any:
    """Import ``"pkg.module:attr.sub"`` and return the attribute.

    Errors name the import string so a broken plugin is easy to find.
    """
    if not _IMPORT_STRING.match(import_string):
        raise PluginError(f"not an import string (want 'module:attribute'): {import_string!r}")
    module_name, _, attr_path = import_string.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # a plugin's import may raise anything
        raise PluginError(f"cannot import {module_name!r} (from {import_string!r}): {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise PluginError(f"{import_string!r}: {module_name} has no attribute {attr_path!r}") from exc
    return obj


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise PluginError(f"invalid {kind} name {name!r}: use lowercase letters, digits, '-' or '_'")


def _check_import_string(kind: str, name: str, value: str | None) -> None:
    if value is not None and not _IMPORT_STRING.match(value):
        raise PluginError(f"{kind} {name!r}: {value!r} is not an import string 'module:attribute'")


@dataclass(frozen=True)
class MethodSpec:
    """A training method (``sdcore train <name>``).

    ``method`` points at a :class:`sdcore.train.method.TrainingMethod` subclass; its
    ``options_class`` (a dataclass) generates the CLI options and the TOML schema.
    """

    name: str
    summary: str
    method: str
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name("method", self.name)
        _check_import_string("method", self.name, self.method)

    def load(self) -> Any:
        return resolve(self.method)


@dataclass(frozen=True)
class TaggerSpec:
    """A dataset tagger (``sdcore tag <name>``).

    ``command`` points at a ``click.Command`` built by the plugin (imported lazily, so it may
    import onnxruntime or torch at module level only inside functions). ``tagger`` points at the
    Python API class implementing ``tag(images) -> list[TagResult]``.
    """

    name: str
    summary: str
    command: str
    tagger: str | None = None

    def __post_init__(self) -> None:
        _check_name("tagger", self.name)
        _check_import_string("tagger", self.name, self.command)
        _check_import_string("tagger", self.name, self.tagger)

    def load_command(self) -> Any:
        return resolve(self.command)

    def load_tagger(self) -> Any:
        if self.tagger is None:
            raise PluginError(f"tagger {self.name!r} has no Python API")
        return resolve(self.tagger)


@dataclass(frozen=True)
class PromptNetworkSpec:
    """A handler for part of the A1111 prompt syntax at generation time.

    ``tag`` is the ``<tag:name:weight>`` keyword it claims (``"lora"``, ``"hypernet"``), or
    ``None`` for handlers that look at plain words (textual-inversion embedding names).
    ``handler`` points at a :class:`sdcore.generate.networks.PromptNetworkHandler` subclass.
    ``directory_option`` names the folder option (``"lora_dir"``) the user sets once.
    ``default_subdir`` is the folder under ``--models-dir`` used when the user sets none; ``root_subdir`` a
    folder of the A1111 root (``--models-dir``'s parent), searched first when it exists (both when both exist),
    for files A1111 keeps beside ``models/`` rather than in it (``embeddings/``). ``more_subdirs`` are further
    folders under ``--models-dir`` searched too when they exist, for other tools' names of the same folder
    (ComfyUI's lower-case ``loras`` beside A1111's ``Lora``): a file in any of them is found, so a user of either
    tool needs no folder option. ``comfy_folder`` is ComfyUI's name for the kind (its ``folder_paths`` key and
    ``extra_model_paths.yaml`` key: ``loras``, ``embeddings``, ``hypernetworks``): the folders such a file lists
    for that key are searched too (:mod:`sdcore.generate.model_paths`).
    """

    name: str
    handler: str
    tag: str | None = None
    directory_option: str | None = None
    default_subdir: str | None = None
    root_subdir: str | None = None
    more_subdirs: tuple[str, ...] = ()
    comfy_folder: str | None = None
    file_suffixes: tuple[str, ...] = (".safetensors", ".pt", ".ckpt", ".bin")

    def __post_init__(self) -> None:
        _check_name("prompt network", self.name)
        _check_import_string("prompt network", self.name, self.handler)

    def load(self) -> Any:
        return resolve(self.handler)


@dataclass(frozen=True)
class ModelFormatSpec:
    """A model file format sdcore can read (and maybe write).

    ``sniff`` points at ``sniff(path: str) -> bool`` (cheap: look at the name, the folder or the
    header, never load weights); ``reader`` at ``read(path: str, **options) -> ModelBundle``;
    ``writer``, when given, at ``write(bundle, path: str, **options) -> Path``.
    """

    name: str
    summary: str
    sniff: str
    reader: str
    writer: str | None = None

    def __post_init__(self) -> None:
        _check_name("model format", self.name)
        for value in (self.sniff, self.reader, self.writer):
            _check_import_string("model format", self.name, value)


@dataclass(frozen=True)
class Registration:
    """Where a registered item came from (for conflict messages and ``sdcore plugins``)."""

    kind: str
    name: str
    plugin: str
    distribution: str | None
    item: Any = field(compare=False)

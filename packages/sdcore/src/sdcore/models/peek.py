"""What kind of network file is this? Cheap looks at keys and metadata, without loading weights.

Prompt-network handlers (LoRA, embeddings, hypernetworks, aesthetic embeddings) share suffixes
(``.pt``, ``.safetensors``), so a file name alone cannot say whether ``out/apt/mychar.pt`` is a
LoRA. :func:`peek_file` reads only a safetensors header, or unpickles a ``.pt`` through the
weights-only loader (memory-mapped when possible), and returns its top-level keys and metadata.
Results are cached per (path, mtime, size).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SdcoreError
from .source import SAFETENSORS_SUFFIXES

IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")


@dataclass(frozen=True)
class FilePeek:
    """The outline of a weights file: ``keys`` (top level, as strings), ``metadata`` (safetensors
    header), ``top`` (the type name of a pickle's top object, ``"dict"`` for safetensors) and
    ``nested`` (for pickled dicts: each key's value type name). ``error`` is set when unreadable."""

    path: Path
    keys: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    top: str = ""
    nested: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def has_key_ending(self, *endings: str) -> bool:
        return any(k.endswith(endings) for k in self.keys)

    def has_key_containing(self, *parts: str) -> bool:
        return any(p in k for k in self.keys for p in parts)


_CACHE: dict[tuple[str, int, int], FilePeek] = {}


def peek_file(path: str | os.PathLike[str]) -> FilePeek:
    """Keys and metadata of ``path`` (never raises for a bad file: ``error`` says why)."""
    file = Path(path)
    try:
        stat = file.stat()
    except OSError as exc:
        return FilePeek(file, error=exc.strerror or str(exc))
    key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        if len(_CACHE) > 512:
            _CACHE.clear()
        _CACHE[key] = _peek(file)
    return _CACHE[key]


def _peek(file: Path) -> FilePeek:
    suffix = file.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return FilePeek(file, top="image")
    if suffix in SAFETENSORS_SUFFIXES:
        from .source import read_safetensors_header

        try:
            header, _ = read_safetensors_header(file)
        except (SdcoreError, OSError) as exc:
            return FilePeek(file, error=str(exc))
        meta = header.pop("__metadata__", None) or {}
        return FilePeek(
            file,
            keys=tuple(header),
            metadata={str(k): str(v) for k, v in meta.items()},
            top="dict",
        )
    from .safe_pickle import load_pickle

    try:
        data: Any = load_pickle(file)
    except SdcoreError as exc:
        return FilePeek(file, error=str(exc))
    if isinstance(data, dict):
        return FilePeek(
            file,
            keys=tuple(str(k) for k in data),
            top="dict",
            nested={str(k): type(v).__name__ for k, v in data.items()},
        )
    return FilePeek(file, top=type(data).__name__)


__all__ = ["FilePeek", "peek_file"]

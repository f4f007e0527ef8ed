"""The model hashes users meet in A1111, Civitai and kohya metadata, computed by streaming.

- ``legacy_hash``: A1111 "old hash" / Civitai AutoV1 / kohya ``sshs_legacy_hash``: first 8 hex of
  sha256 over the 0x10000 bytes at offset 0x100000 (what is there; a smaller file hashes less).
- ``sha256_file`` and ``short_hash`` (first 10 hex, A1111 shorthash / Civitai AutoV2).
- ``autov3_hash`` / ``addnet_hash``: sha256 of a safetensors file's tensor data, i.e. every byte
  after the 8-byte length and the JSON header (unchanged by metadata edits; Civitai AutoV3, kohya
  ``sshs_model_hash``, and, prefixed with ``0x``, modelspec ``hash_sha256``).
- ``sshs_hashes``: the two kohya values for tensors about to be saved (LoRA writer's helper).
- ``network_short_hash``: A1111's 12-hex hash of a LoRA in the infotext's "Lora hashes" field.
- ``checkpoint_identity``: A1111's ``sd_checkpoint`` / ``sd_checkpoint_name`` pair that TI,
  hypernetwork and DreamArtist files record for the model they were trained on.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError

CHUNK = 1 << 20
LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000


def _stream(path: Path, start: int = 0, length: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = length
        while True:
            size = CHUNK if remaining is None else min(CHUNK, remaining)
            if size == 0:
                break
            block = handle.read(size)
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()


def legacy_hash(path: str | os.PathLike[str]) -> str:
    """A1111 old model hash (8 hex)."""
    return _stream(Path(path), LEGACY_OFFSET, LEGACY_LENGTH)[:8]


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of the whole file (64 hex), cached per (path, size, mtime) in this process.

    Generation hashes the model and every LoRA/embedding/hypernetwork for the PNG info on every
    image; the cache keeps that to one read per file.
    """
    file = Path(path)
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        _SHA256_CACHE[key] = _stream(file)
    return _SHA256_CACHE[key]


def short_hash(path: str | os.PathLike[str]) -> str:
    """A1111 shorthash / Civitai AutoV2 (10 hex)."""
    return sha256_file(path)[:10]


def safetensors_data_offset(path: str | os.PathLike[str]) -> int:
    file = Path(path)
    with open(file, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8:
        raise ModelFormatError(f"{file}: not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", head)
    if length > file.stat().st_size - 8:
        raise ModelFormatError(f"{file}: truncated or not safetensors (header length {length})")
    return 8 + length


def autov3_hash(path: str | os.PathLike[str]) -> str:
    """sha256 (64 hex) of the tensor data of a safetensors file (Civitai AutoV3 shows the first 12)."""
    return _stream(Path(path), safetensors_data_offset(path))


addnet_hash = autov3_hash
sshs_model_hash = autov3_hash
sshs_legacy_hash = legacy_hash


def sshs_hashes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """kohya's ``(sshs_model_hash, sshs_legacy_hash)`` for tensors about to be saved.

    kohya serialises the tensors with only the ``ss_*`` metadata and hashes those bytes, so the
    values stay valid after the hashes themselves (and modelspec keys) are added to the header.
    """
    from safetensors.torch import save

    kept = {k: str(v) for k, v in (metadata or {}).items() if k.startswith("ss_")}
    data = save(dict(tensors), metadata=kept)  # {} even when empty: kohya's bytes carry "__metadata__":{}
    (length,) = struct.unpack("<Q", data[:8])
    model = hashlib.sha256(data[8 + length :]).hexdigest()
    legacy = hashlib.sha256(data[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]
    return model, legacy


def network_short_hash(path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> str:
    """A1111's network hash (``extensions-builtin/Lora/network.py`` ``NetworkOnDisk``): the first 12 hex digits
    of kohya's ``sshs_model_hash`` when the file's metadata has it, else of the addnet hash (sha256 of the
    tensor data, unchanged by metadata edits) of a ``.safetensors`` file, else of the whole file's sha256.
    Generation writes it in "Lora hashes"; ``--from-png`` finds a renamed LoRA by it. ``metadata``: the
    file's header metadata when the caller has it (else a safetensors header is read, nothing loaded)."""
    file = Path(path)
    safetensors = file.suffix.lower() == ".safetensors"
    if metadata is None:
        metadata = {}
        if safetensors:
            from .peek import peek_file

            metadata = peek_file(file).metadata
    stored = metadata.get("sshs_model_hash")
    if stored:
        return stored[:12]
    return (autov3_hash(file) if safetensors else sha256_file(file))[:12]


def checkpoint_identity(source: str | os.PathLike[str] | None) -> tuple[str | None, str | None]:
    """A1111's ``(sd_checkpoint, sd_checkpoint_name)`` for the model a network was trained on.

    A1111 stores the checkpoint's shorthash (first 10 hex of the file's sha256) and its
    ``model_name`` (the file name without extension). Only single files have an A1111 hash: for a
    diffusers folder the hash is ``None`` and the name is the folder's; for a hub id the id itself.
    """
    if source is None or str(source) == "":
        return None, None
    path = Path(source)
    if path.is_file():
        return short_hash(path), path.stem
    if path.exists() or path.suffix:
        return None, path.name if path.is_dir() else path.stem
    return None, str(source)


def all_hashes(path: str | os.PathLike[str]) -> dict[str, str]:
    """Every hash of ``path`` a user may be asked for (AutoV3 only for safetensors)."""
    file = Path(path)
    full = sha256_file(file)
    out = {"legacy": legacy_hash(file), "sha256": full, "short": full[:10]}
    if file.suffix.lower() in (".safetensors", ".sft"):
        out["autov3"] = autov3_hash(file)
    return out

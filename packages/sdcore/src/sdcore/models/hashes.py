"""The model hashes users meet in A1111, Civitai and kohya metadata, computed by streaming.

- ``legacy_hash``: A1111 "old hash" / Civitai AutoV1 / kohya ``sshs_legacy_hash``: first 8 hex of
  sha256 over the 0x10000 bytes at offset 0x100000 (what is there; a smaller file hashes less).
- ``sha256_file`` and ``short_hash`` (first 10 hex, A1111 shorthash / Civitai AutoV2), kept on disk between runs
  (``sha256.json`` in the sdcore cache folder, keyed by resolved path, size and mtime, for files of 32 MiB or
  more; ``cached_sha256`` reads only that cache).
- ``autov3_hash`` / ``addnet_hash``: sha256 of a safetensors file's tensor data, i.e. every byte
  after the 8-byte length and the JSON header (unchanged by metadata edits; Civitai AutoV3, kohya
  ``sshs_model_hash``, and, prefixed with ``0x``, modelspec ``hash_sha256``). Cached as ``sha256_file`` is,
  in the same file entry under the key ``autov3`` (``cached_autov3`` reads only the cache).
- ``sshs_hashes``: the two kohya values for tensors about to be saved (LoRA writer's helper).
- ``network_short_hash``: A1111's 12-hex hash of a LoRA in the infotext's "Lora hashes" field.
- ``checkpoint_identity``: A1111's ``sd_checkpoint`` / ``sd_checkpoint_name`` pair that TI,
  hypernetwork and DreamArtist files record for the model they were trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Callable, Mapping
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


#: the values the cache keeps per file, each under its own key of the file's entry: ``sha256`` of the whole file
#: (:func:`sha256_file`) and ``autov3``, the sha256 of a safetensors file's tensor data (:func:`autov3_hash`)
HASH_KINDS = ("sha256", "autov3")
#: this process's values by (kind, resolved path, size, mtime_ns), whatever the file's size
_SHA256_CACHE: dict[tuple[str, str, int, int], str] = {}

#: the file below :func:`sdcore.io.cache_dir` that keeps whole-file sha256 values between runs
HASH_CACHE_FILE = "sha256.json"
_HASH_CACHE_VERSION = 1
#: files smaller than this are hashed again in each process, never kept on disk: reading them costs about what
#: reading and rewriting ``sha256.json`` does, and a folder of small files (embeddings, test files) would only
#: grow it. Checkpoints and most LoRAs are far bigger.
DISK_CACHE_MIN_BYTES = 32 << 20
#: where ``sha256.json`` is instead of the cache folder (``sdcore.testing`` points each test session at its own
#: temporary file, so tests never write the user's or CI's shared cache)
_HASH_CACHE_OVERRIDE: Path | None = None
#: the parsed disk cache and the ``os.stat`` signature of the file it was read from: a process reads the file
#: again only when another writer replaced it, so a run with many LoRAs parses it once, not once per file
_DISK_MEMO: tuple[tuple[str, int, int, int, int], dict[str, Any]] | None = None
#: whether this process already dropped the entries of deleted files (once per process: one ``stat`` per entry)
_PRUNED = False


def _hash_cache_path() -> Path:
    if _HASH_CACHE_OVERRIDE is not None:
        return _HASH_CACHE_OVERRIDE
    from ..io import cache_dir

    return cache_dir() / HASH_CACHE_FILE


def _signature(path: Path) -> tuple[str, int, int, int, int]:
    """What tells that the cache file was replaced (an atomic write makes a new inode and ctime)."""
    stat = path.stat()
    return str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _read_hash_cache() -> dict[str, Any]:
    """The on-disk entries (resolved path -> ``{"size", "mtime_ns"}`` and one key per :data:`HASH_KINDS`
    value known, e.g. ``"sha256"``); a missing, unreadable or
    corrupt file is an empty cache, never an error (the values can always be computed again). Parsed again only
    when the file changed since this process last read or wrote it (:data:`_DISK_MEMO`); callers must not
    change the dict returned."""
    import json

    global _DISK_MEMO
    path = _hash_cache_path()
    try:
        signature = _signature(path)
        if _DISK_MEMO is not None and _DISK_MEMO[0] == signature:
            return _DISK_MEMO[1]
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: bad JSON or bad UTF-8
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("version") == _HASH_CACHE_VERSION else None
    files = files if isinstance(files, dict) else {}
    _DISK_MEMO = (signature, files)
    return files


def _entry_hash(entry: object, size: int, mtime_ns: int, kind: str = "sha256") -> str | None:
    """The ``kind`` value (:data:`HASH_KINDS`) of a disk cache entry when it was taken of a file of this size
    and mtime."""
    if not isinstance(entry, dict) or entry.get("size") != size or entry.get("mtime_ns") != mtime_ns:
        return None
    value = entry.get(kind)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value
    return None


def _gone(path: str, temp: str) -> bool:
    """Whether a cache entry's file was deleted: it is missing and its folder is there, or it was below ``temp``
    (the temporary folder, resolved). A file whose folder is missing too may be on a drive that is not mounted
    now: its entry stays, so the drive's checkpoints are not all read again when it is back."""
    if os.path.exists(path):
        return False
    try:
        in_temp = os.path.commonpath([temp, path]) == temp
    except ValueError:  # another Windows drive, or a relative path in a hand-edited file
        in_temp = False
    return in_temp or os.path.isdir(os.path.dirname(path))


def _write_hash_cache(key: tuple[str, int, int], value: str, kind: str = "sha256") -> None:
    """Add one value to the disk cache (to the file's entry, keeping its other kinds when they are of the file as
    it is now): re-read (another process may have added some), drop the entries of
    deleted files (:func:`_gone`, the first write of a process only), write atomically (two writers: the last one
    wins, losing at most the other's new entry, which is computed again when needed). Failing to write is silent:
    the cache is an optimisation."""
    import json

    from ..errors import SdcoreError
    from ..io import atomic_write_text

    global _DISK_MEMO, _PRUNED
    files = dict(_read_hash_cache())
    if not _PRUNED:
        import tempfile

        temp = os.path.realpath(tempfile.gettempdir())
        files = {path: entry for path, entry in files.items() if not _gone(path, temp)}
        _PRUNED = True
    path, size, mtime_ns = key
    entry: dict[str, Any] = {"size": size, "mtime_ns": mtime_ns}
    for other in HASH_KINDS:
        known = _entry_hash(files.get(path), size, mtime_ns, other) if other != kind else value
        if known is not None:
            entry[other] = known
    files[path] = entry
    text = json.dumps({"version": _HASH_CACHE_VERSION, "files": files}, indent=0, sort_keys=True)
    target = _hash_cache_path()
    with contextlib.suppress(OSError, SdcoreError):  # a read-only or full cache folder
        atomic_write_text(target, text)
        _DISK_MEMO = (_signature(target), files)


def _cache_key(file: Path) -> tuple[str, int, int]:
    stat = file.stat()
    return str(file.resolve()), stat.st_size, stat.st_mtime_ns


def _cached(key: tuple[str, int, int], kind: str) -> str | None:
    """The ``kind`` value of the file ``key`` (:func:`_cache_key`) from this process's memory or the disk cache."""
    memo = (kind, *key)
    if memo not in _SHA256_CACHE:
        if key[1] < DISK_CACHE_MIN_BYTES:
            return None
        found = _entry_hash(_read_hash_cache().get(key[0]), key[1], key[2], kind)
        if found is None:
            return None
        _SHA256_CACHE[memo] = found
    return _SHA256_CACHE[memo]


def _hash_cached(path: str | os.PathLike[str], kind: str, compute: Callable[[Path], str]) -> str:
    """``compute(path)`` through the cache: in this process's memory always, on disk for files of
    :data:`DISK_CACHE_MIN_BYTES` or more, keyed by resolved path, size and mtime_ns (a changed file is hashed
    again). A file that changed while it was read (another size or mtime after than before: a copy still
    going on, a trainer saving over it) is hashed again, and kept only under the stat it had throughout: a
    value of bytes from before and after a change must never answer for either."""
    file = Path(path)
    key = _cache_key(file)
    known = _cached(key, kind)
    if known is not None:
        return known
    for _ in range(3):
        value = compute(file)
        after = _cache_key(file)
        if after == key:
            break
        key = after
    else:  # still changing: the value of a moving file, kept nowhere
        return value
    _SHA256_CACHE[(kind, *key)] = value
    if key[1] >= DISK_CACHE_MIN_BYTES:
        _write_hash_cache(key, value, kind)
    return value


def cached_sha256(path: str | os.PathLike[str]) -> str | None:
    """The whole-file sha256 of ``path`` when this process or the disk cache already has it for the file as it
    is now (same size and mtime), else ``None``, reading none of its bytes (to tell what a scan will cost)."""
    return _cached(_cache_key(Path(path)), "sha256")


def cached_autov3(path: str | os.PathLike[str]) -> str | None:
    """:func:`autov3_hash` of ``path`` when this process or the disk cache already has it, else ``None``,
    reading none of its bytes."""
    return _cached(_cache_key(Path(path)), "autov3")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of the whole file (64 hex), cached per (resolved path, size, mtime_ns) in this process and, for
    files of :data:`DISK_CACHE_MIN_BYTES` or more, on disk (``sha256.json`` in :func:`sdcore.io.cache_dir`).

    Generation hashes the model and every LoRA/embedding/hypernetwork for the PNG info on every image, and
    ``--from-png`` finds a model by its hash: a multi-GB checkpoint is read once, not once per run. A file
    changed since (another size or mtime) is hashed again.
    """
    return _hash_cached(path, "sha256", _stream)


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
    """sha256 (64 hex) of the tensor data of a safetensors file (Civitai AutoV3 shows the first 12).

    Cached as :func:`sha256_file` is (memory, and on disk from :data:`DISK_CACHE_MIN_BYTES`): every generate
    with a LoRA writes its hash in the infotext's "Lora hashes", and ``--from-png`` hashes each LoRA of the
    folders to find one by it; A1111 keeps these too ("hashes-addnet" in its ``cache.json``)."""
    return _hash_cached(path, "autov3", lambda file: _stream(file, safetensors_data_offset(file)))


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

"""Load pickle-based checkpoints (``.ckpt``/``.pt``/``.bin``) without running their code.

A pickle can call any importable function while it is read (``os.system`` included). torch's
``weights_only=True`` unpickler only rebuilds tensors and plain containers; anything else raises
``UnpicklingError``, which we turn into :class:`UnsafeFileError` naming the global it asked for.

A few more names are allowed, the data-only ones of A1111's restricted unpickler (modules/safe.py) that
real checkpoints hold: PyTorch Lightning's ``ModelCheckpoint`` class (the original SD 1.x ``.ckpt`` files
use the class itself as a key of their ``callbacks`` dict; it is read as an inert stand-in, never imported)
and numpy scalars and arrays (``global_step`` and other training values saved as numpy numbers).
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError, UnsafeFileError

_GLOBAL = re.compile(r"(?:GLOBAL|global)\s+([\w.]+(?:\s*[.:]\s*[\w.]+)?)")


def _global_name(message: str) -> str:
    match = _GLOBAL.search(message)
    if match:
        return match.group(1).replace(" ", "")
    match = re.search(r"Unsupported (?:operand|class) [^\n]*", message)
    return match.group(0) if match else message.strip().splitlines()[0][:120]


class LightningModelCheckpoint:
    """Stands in for ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` in a pickle: an empty
    class, so a Lightning checkpoint's ``callbacks`` dict reads without Lightning installed or any of its code run."""


def _extra_safe_globals() -> list[Any]:
    """The data-only globals of A1111's allow-list (modules/safe.py ``RestrictedUnpickler.find_class``) that
    torch's weights-only unpickler does not allow by default, under the names old and new files use."""
    import importlib

    import numpy as np

    multiarray: Any = importlib.import_module(
        "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
    )
    extra: list[Any] = [(LightningModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
                        (np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray")]  # fmt: skip
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x / 2.x pickles
        extra += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    # numpy 2 pickles a dtype's class too (numpy.dtypes.Float64DType ...)
    extra += [(cls, f"numpy.dtypes.{cls.__name__}") for cls in vars(getattr(np, "dtypes", object)).values()
              if isinstance(cls, type) and issubclass(cls, np.dtype)]  # fmt: skip
    return extra


#: how many bytes :func:`not_torch_file` reads
_SNIFF = 1024


#: first bytes of the images a model argument gets by mistake (a dataset image, a sample, a preview .png)
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"RIFF", "WebP"),
)


def not_torch_file(path: str | os.PathLike[str]) -> str | None:
    """What a file named like a torch file (``.pt``/``.ckpt``/``.pth``/``.bin``) is instead, from its first bytes,
    for the one-line error ``FILE: not a torch file (...)``; ``None`` when it may be one (a zip, a pickle, or
    bytes this does not recognise: torch then decides).

    What users end up with under such names: a safetensors file renamed (``x.vae.pt``), a web page a browser
    saved in place of the download (a login or "are you human" page), a Git LFS pointer from a clone without
    git-lfs, an empty file from a failed download. torch would read any of them as a pickle with an
    unknown opcode, which :func:`load_pickle` reported as a refusal to run code.
    """
    file = Path(path)
    with file.open("rb") as handle:
        head = handle.read(_SNIFF)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK") or head[:1] == b"\x80":  # torch's zip format, or a pickle (protocol 2+)
        return None
    size = file.stat().st_size
    if len(head) > 8 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return f"it is a safetensors file: rename it to {file.with_suffix('.safetensors').name}"
    for magic, kind in _IMAGE_MAGIC:  # a PNG's first bytes read as real pickle opcodes (0x89 NEWFALSE, 'P' PERSID)
        if head.startswith(magic) and (kind != "WebP" or head[8:12] == b"WEBP"):
            return f"it is a {kind} image, not a model: give the model file"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file: fetch the file itself (git lfs pull)"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in text:
        return "it is a web page (HTML), not a model: the browser saved a download page; download the file itself"
    if text[:1] in (b"{", b"["):
        return "it is a JSON text file, not a model"
    return None


def load_pickle(path: str | os.PathLike[str], *, mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, memory-mapped when the file allows it. A file that is no
    torch file at all (:func:`not_torch_file`) is a :class:`ModelFormatError` ``FILE: not a torch file (...)``."""
    import pickle

    import torch

    file = Path(path)
    try:
        what = not_torch_file(file)
    except FileNotFoundError:
        raise ModelFormatError(f"{file}: no such file") from None
    except OSError:
        what = None  # torch.load reports it below
    if what is not None:
        raise ModelFormatError(f"{file}: not a torch file ({what})")
    use_mmap = mmap and zipfile.is_zipfile(file)  # mmap needs the zip format (torch >= 1.6 files)
    try:
        with torch.serialization.safe_globals(_extra_safe_globals()):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        junk = _no_pickle_instruction(message)
        if junk is not None:  # a byte no pickle has: not a pickle at all, so no code was asked for
            raise ModelFormatError(
                f"{file}: not a torch file (no zip and no pickle: byte {junk:#04x} is no pickle instruction)"
            ) from None
        if "weights only" in message.lower() or "unsupported" in message.lower() or "GLOBAL" in message:
            raise UnsafeFileError(f"{file}: refuses to run code in pickle: {_global_name(message)}") from None
        raise ModelFormatError(_unreadable(file, exc)) from None
    except FileNotFoundError:
        raise ModelFormatError(f"{file}: no such file") from None
    except Exception as exc:  # truncated zips and junk make torch raise anything (IndexError, EOFError, ...)
        raise ModelFormatError(_unreadable(file, exc)) from None


def _no_pickle_instruction(message: str) -> int | None:
    """The byte of torch's "Unsupported operand N" when N is no pickle opcode at all (the file is junk, not a
    pickle), else ``None``: a real opcode torch's weights-only reader leaves out (``INST``, ``OBJ``, protocol 4's
    ``STACK_GLOBAL``, which ``pickle.dump`` writes by default) is how a planted pickle asks for code, a refusal."""
    import pickletools

    match = re.search(r"Unsupported operand (\d+)", message)
    if match is None:
        return None
    byte = int(match.group(1))
    return None if byte in {ord(op.code) for op in pickletools.opcodes} else byte


def _unreadable(file: Any, exc: BaseException) -> str:
    """Why torch could not read a file, for a user: its size, that it looks damaged, cut short or no torch file
    where torch's error is of that kind (a pickle's missing memo key or end, a zip without its directory), then
    torch's words with their type (a bare ``KeyError``'s text is a number: "(1785425525)" said nothing), cut at the
    first sentence (miniz's runs on for lines). Other refusals (torch's legacy tar format) keep torch's words."""
    try:
        size = f"{os.path.getsize(file):,} bytes"
    except OSError:
        size = ""
    name = type(exc).__name__
    text = _first_line(exc).split(". ")[0]
    said = name if text == name else f"{name}: {text}"
    broken = isinstance(exc, (KeyError, IndexError, EOFError)) or any(
        word in text.lower() for word in ("eof", "zip archive", "corrupt")
    )
    what = "; ".join(part for part in (size, "damaged, cut short or not a torch file" if broken else "") if part)
    return f"{file}: not a readable torch file ({what}{'; ' if what else ''}torch said {said})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__

"""Load pickle-based checkpoints (``.ckpt``/``.pt``/``.bin``) without running their code.

A pickle can call any importable function while it is read (``os.system`` included). torch's
``weights_only=True`` unpickler only rebuilds tensors and plain containers; anything else raises
``UnpicklingError``, which we turn into :class:`UnsafeFileError` naming the global it asked for.
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


def load_pickle(path: str | os.PathLike[str], *, mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, memory-mapped when the file allows it."""
    import pickle

    import torch

    file = Path(path)
    use_mmap = mmap and zipfile.is_zipfile(file)  # mmap needs the zip format (torch >= 1.6 files)
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "weights only" in message.lower() or "unsupported" in message.lower() or "GLOBAL" in message:
            raise UnsafeFileError(f"{file}: refuses to run code in pickle: {_global_name(message)}") from None
        raise ModelFormatError(f"{file}: not a readable torch file ({_first_line(exc)})") from None
    except FileNotFoundError:
        raise ModelFormatError(f"{file}: no such file") from None
    except Exception as exc:  # truncated zips and junk make torch raise anything (IndexError, EOFError, ...)
        raise ModelFormatError(f"{file}: not a readable torch file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__

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


def load_pickle(path: str | os.PathLike[str], *, mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, memory-mapped when the file allows it."""
    import pickle

    import torch

    file = Path(path)
    use_mmap = mmap and zipfile.is_zipfile(file)  # mmap needs the zip format (torch >= 1.6 files)
    try:
        with torch.serialization.safe_globals(_extra_safe_globals()):
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

"""Uniform read access to a single-file checkpoint (safetensors or pickle) without loading it all.

Safetensors files are validated (header length, JSON, offsets inside the file) before
``safe_open`` memory-maps them, so a truncated or lying file gives one clear line instead of a
Rust panic. Non-model keys (EMA copies, DDPM buffers, ``position_ids``, ``loss.*``, optimizer
state) are hidden; marker keys (``v_pred``, ``ztsnr``) are remembered.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError
from .convert.clip import SD1_PREFIX, add_missing_text_model_level

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MARKER_KEYS = ("v_pred", "ztsnr")
DDPM_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
}  # fmt: skip
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}  # fmt: skip


def _not_safetensors(file: Path, start: bytes, length: int, size: int) -> str:
    """The one message for a file that is not safetensors at all (a renamed text or HTML page,
    a pickle) or is cut short, used by every command that reads a ``.safetensors`` file."""
    text = start.lstrip()
    if text[:1] in (b"<", b"{") and (b"html" in start.lower() or b"<!doctype" in start.lower()):
        return f"{file}: not a safetensors file: it is an HTML page (a failed download?)"
    if start[:2] == b"PK" or start[:1] == b"\x80":
        return f"{file}: not a safetensors file: it is a pickle/zip checkpoint (rename it to .ckpt or .pt)"
    if start and all(32 <= b < 127 or b in (9, 10, 13) for b in start):
        preview = start.decode("ascii", "replace").splitlines()[0][:40]
        return f"{file}: not a safetensors file: it is a text file (starts with {preview!r})"
    return f"{file}: truncated or not a safetensors file (header says {length} bytes, file has {size})"


def check_safetensors(path: str | os.PathLike[str]) -> None:
    """Raise the shared one-line :class:`ModelFormatError` when ``path`` is not a whole safetensors file."""
    read_safetensors_header(path)


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header; returns (header dict, data start offset)."""
    file = Path(path)
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            if size == 0:
                raise ModelFormatError(f"{file}: empty file (0 bytes), not a safetensors file")
            raise ModelFormatError(_not_safetensors(file, head, 0, size))
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100_000_000:
            handle.seek(0)
            raise ModelFormatError(_not_safetensors(file, handle.read(64), length, size))
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFormatError(f"{file}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{file}: not a safetensors file (header is not a JSON object)")
    data_size = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            itemsize = _ST_SIZES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{file}: safetensors header entry {name!r} is malformed") from None
        if end > data_size:
            raise ModelFormatError(f"{file}: truncated (tensor {name!r} ends at byte {end}, data has {data_size})")
        if end - start != count * itemsize:
            raise ModelFormatError(f"{file}: header lies about tensor {name!r} (shape needs {count * itemsize} bytes)")
    return header, 8 + length


def _is_dropped(key: str) -> bool:
    return (
        key.startswith(("model_ema.", "loss.", "optimizer", "lr_scheduler"))
        or key in DDPM_BUFFERS
        or key.endswith("position_ids")
        or key in MARKER_KEYS
    )


class CheckpointSource:
    """Lazy view of a single-file checkpoint: ``keys``, ``shape(k)``, ``get(k)``, ``metadata``."""

    def __init__(self, path: str | os.PathLike[str], *, use_ema: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: no such file")
        self.metadata: dict[str, str] = {}
        self.extras: dict[str, Any] = {}  # non-tensor top-level values of a .ckpt (global_step, ...)
        self._handle: Any = None
        self._tensors: dict[str, Any] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        if self.path.suffix.lower() in SAFETENSORS_SUFFIXES or self._looks_like_safetensors():
            self.format = "safetensors"
            all_keys = self._open_safetensors()
        else:
            self.format = "pickle"
            all_keys = self._open_pickle()
        self.markers = {k for k in MARKER_KEYS if k in all_keys}
        keys = [k for k in all_keys if not _is_dropped(k)]
        legacy = add_missing_text_model_level(keys, SD1_PREFIX)  # old name -> canonical name
        legacy.update(self._sgm_sd2_renames(keys))
        self.keys: set[str] = {legacy.get(k, k) for k in keys}
        self._renames: dict[str, str] = {new: old for old, new in legacy.items()}  # public key -> stored key
        if use_ema:
            self._apply_ema(all_keys)

    def _sgm_sd2_renames(self, keys: list[str]) -> dict[str, str]:
        """SD2.1-turbo style SGM files keep the OpenCLIP-H encoder at ``conditioner.embedders.0.model.``."""
        sgm = "conditioner.embedders.0.model."
        final = sgm + "ln_final.weight"
        if (
            final not in self._shapes
            or self._shapes[final][0] != 1024
            or any(k.startswith("conditioner.embedders.1.") for k in keys)
        ):
            return {}
        return {k: "cond_stage_model.model." + k[len(sgm) :] for k in keys if k.startswith(sgm)}

    def _looks_like_safetensors(self) -> bool:
        with open(self.path, "rb") as handle:
            head = handle.read(9)
        return len(head) == 9 and head[8:9] == b"{" and self.path.suffix.lower() not in PICKLE_SUFFIXES

    def _open_safetensors(self) -> Iterable[str]:
        from safetensors import safe_open

        header, _ = read_safetensors_header(self.path)
        self.metadata = dict(header.get("__metadata__") or {})
        for name, info in header.items():
            if name != "__metadata__":
                self._shapes[name] = tuple(int(x) for x in info["shape"])
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise ModelFormatError(f"{self.path}: unreadable safetensors file ({exc})") from None
        return list(self._shapes)

    def _open_pickle(self) -> Iterable[str]:
        import torch

        from .safe_pickle import load_pickle

        data = load_pickle(self.path)
        while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            for key, value in data.items():
                if key != "state_dict" and not isinstance(value, (dict, torch.Tensor)):
                    self.extras.setdefault(key, value)
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise ModelFormatError(f"{self.path}: not a model checkpoint (top level is {type(data).__name__})")
        self._tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if not self._tensors:  # A1111's .pt embedding keeps its vectors in a dict: say what it is, as for a LoRA
            from .detect import network_file_hint

            hint = network_file_hint([str(key) for key in data])
            if hint:
                raise ModelFormatError(f"{self.path}: not a model checkpoint{hint}")
        self._shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        return list(self._tensors)

    def _apply_ema(self, all_keys: Iterable[str]) -> None:
        ema = {k for k in all_keys if k.startswith("model_ema.")}
        if len(ema) <= 2:
            raise ModelFormatError(f"{self.path}: --ema asked for, but the file has no EMA weights")
        for key in list(self._shapes):
            if key.startswith("model.diffusion_model."):
                ema_key = "model_ema." + key[len("model.") :].replace(".", "")
                if ema_key not in ema:
                    raise ModelFormatError(f"{self.path}: EMA weights incomplete (no {ema_key})")
                self._renames[key] = ema_key

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[self._renames.get(key, key)]

    def get(self, key: str) -> Any:
        stored = self._renames.get(key, key)
        if stored not in self._shapes:
            raise ModelFormatError(f"{self.path}: missing tensor {key!r}")
        if self._handle is not None:
            return self._handle.get_tensor(stored)
        return self._tensors[stored]

    def close(self) -> None:
        self._handle = None
        self._tensors = {}

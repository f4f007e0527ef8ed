"""Reading and writing A1111 hypernetwork ``.pt`` files.

The file is a pickled dict: integer keys (context widths) map to a ``(k_state_dict,
v_state_dict)`` pair, and string keys hold the structure and metadata. Legacy NovelAI-era files
have only the integer keys with ``linear1``/``linear2`` weights (dim -> 2*dim -> dim, no
activation). Files are loaded with ``torch.load(weights_only=True)`` only, so a pickle that tries
to run code is refused before anything runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from sdcore.dtypes import torch_dtype
from sdcore.errors import ConfigError, ModelFormatError
from sdcore.io import atomic_save

from .modules import Hypernetwork, canonical_weight_init

_LEGACY_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}


def read_pickle_dict(path: str | Path) -> dict[Any, Any]:
    """``torch.load`` a file safely (weights only, on the CPU) and insist on a dict."""
    from sdcore.models.safe_pickle import load_pickle

    path = Path(path)
    data = load_pickle(path, mmap=False)
    if not isinstance(data, Mapping):
        raise ModelFormatError(f"{path}: expected a dict in the hypernetwork file, found {type(data).__name__}")
    return dict(data)


def _known_init(value: Any) -> str:
    """The stored init name; an unknown one is kept as ``Normal`` (it only matters for new networks)."""
    try:
        return canonical_weight_init(str(value or "Normal"))
    except ConfigError:
        return "Normal"


def _fix_legacy(state: Mapping[str, Any]) -> dict[str, Any]:
    return {_LEGACY_KEYS.get(key, key): value for key, value in state.items()}


def hypernetwork_from_dict(
    data: Mapping[Any, Any], *, source: str = "hypernetwork", name: str | None = None
) -> Hypernetwork:
    """Build a :class:`Hypernetwork` from a file's dict (defaults as A1111 applies them on load)."""
    pairs: dict[int, tuple[Mapping[str, Any], Mapping[str, Any]]] = {}
    for key, value in data.items():
        if isinstance(key, bool) or not isinstance(key, int):
            continue
        if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(isinstance(v, Mapping) for v in value):
            raise ModelFormatError(f"{source}: width {key} should hold a (key, value) pair of state dicts")
        pairs[key] = (_fix_legacy(value[0]), _fix_legacy(value[1]))
    if not pairs:
        raise ModelFormatError(
            f"{source}: no hypernetwork layers (integer context-width keys) found; is this a hypernetwork?"
        )
    dropout = data.get("dropout_structure")
    use_dropout = bool(data.get("use_dropout", False))
    try:
        hn = Hypernetwork(
            name=str(name or data.get("name") or Path(source).stem),
            layer_structure=list(data.get("layer_structure") or [1, 2, 1]),
            activation=data.get("activation_func"),
            layer_norm=bool(data.get("is_layer_norm", False)),
            use_dropout=use_dropout,
            dropout_structure=list(dropout) if dropout is not None else None,
            last_layer_dropout=bool(data.get("last_layer_dropout", False)),
            activate_output=bool(data.get("activate_output", True)),
            weight_init=_known_init(data.get("weight_initialization")),
        )
    except Exception as exc:
        raise ModelFormatError(f"{source}: invalid hypernetwork structure: {exc}") from exc
    for dim, (k_state, v_state) in sorted(pairs.items()):
        hn.add_width(dim)
        k_module, v_module = hn.pair(dim)  # type: ignore[misc]
        for which, module, state in (("key", k_module, k_state), ("value", v_module, v_state)):
            try:
                module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0]
                raise ModelFormatError(
                    f"{source}: the {which} module for width {dim} does not match its stored structure: {first}"
                ) from exc
    hn.step = int(data.get("step") or 0)
    hn.sd_checkpoint = data.get("sd_checkpoint")
    hn.sd_checkpoint_name = data.get("sd_checkpoint_name")
    hn.optional_info = data.get("optional_info")
    hn.eval()
    hn.requires_grad_(False)
    return hn


def load_hypernetwork(path: str | Path, *, name: str | None = None) -> Hypernetwork:
    """Read an A1111 (or legacy NovelAI) hypernetwork ``.pt``; ``name`` defaults to the file stem.

    A1111 shows a hypernetwork under its file stem, so that is its name here too; the stored
    ``name`` is used only when ``name`` is given as ``None`` and the stem is empty.
    """
    path = Path(path)
    data = read_pickle_dict(path)
    return hypernetwork_from_dict(data, source=str(path), name=name or path.stem)


def hypernetwork_to_dict(hn: Hypernetwork, *, dtype: str | torch.dtype | None = None) -> dict[Any, Any]:
    """The dict A1111 saves: ``{dim: (k_sd, v_sd), ...}`` plus structure and metadata (a network on the
    meta device gives meta tensors: the shapes and dtypes of the file, for :func:`saved_size`)."""
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    data: dict[Any, Any] = {}
    for dim in hn.dims:
        pair = hn.pair(dim)
        assert pair is not None
        states = []
        for module in pair:
            state = {}
            for key, tensor in module.state_dict().items():
                tensor = tensor.detach() if tensor.is_meta else tensor.detach().to("cpu")
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[key] = tensor.contiguous().clone()
            states.append(state)
        data[dim] = (states[0], states[1])
    data.update(hn.describe())
    data.update(
        {
            "step": int(hn.step),
            "name": hn.name,
            "sd_checkpoint": hn.sd_checkpoint,
            "sd_checkpoint_name": hn.sd_checkpoint_name,
            "optional_info": hn.optional_info,
        }
    )
    return data


def saved_size(data: Any) -> int:
    """The bytes ``torch.save(data)`` writes, without the tensors' data in memory: the pickle of the
    structure with every tensor emptied, plus each tensor's bytes (meta tensors count by shape and
    dtype). The pre-flight's disk estimate: an A1111 ``.pt`` is its tensors plus a few KiB."""
    import io

    payload = 0

    def empty(value: Any) -> Any:
        nonlocal payload
        if isinstance(value, torch.Tensor):
            payload += value.numel() * value.element_size()
            return torch.empty(0, dtype=value.dtype)
        if isinstance(value, dict):
            return {key: empty(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(empty(item) for item in value)
        return value

    buffer = io.BytesIO()
    torch.save(empty(data), buffer)
    return buffer.getbuffer().nbytes + payload


def save_hypernetwork(hn: Hypernetwork, path: str | Path, *, dtype: str | torch.dtype | None = None) -> Path:
    """Write ``hn`` as an A1111 ``.pt`` atomically; returns the path."""
    data = hypernetwork_to_dict(hn, dtype=dtype)
    return atomic_save(path, lambda tmp: torch.save(data, tmp))

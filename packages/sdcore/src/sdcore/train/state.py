"""Resumable training state: one folder per save, written whole or not at all.

A state folder holds the trainable tensors (``trainable.safetensors``), with ``--ema`` their
average (``ema.safetensors``), the optimizer, LR schedule and grad-scaler states (``*.pt``, read
back with ``weights_only=True``), the RNG states of torch, numpy and Python (``rng.safetensors`` + ``rng.json``) and ``train_state.json`` with the
step, epoch and position inside the epoch. The folder is built under a temporary name and renamed,
so ``--resume latest`` never picks a half-written state.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import atomic_path, atomic_write_text

STATE_FORMAT = 1
_STATE_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainPosition:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # micro-batch index inside the epoch's plan


def state_name(step: int) -> str:
    return f"step-{step:08d}"


def _sequence(folder: Path) -> int:
    """The state's place in the order states were written under its root (``sequence``: one more than the
    highest there when :func:`save_state` wrote it; a count, not a clock, so a state copied from a machine whose
    clock runs ahead still sorts before the states written after it); 0 for a state written before sdcore
    recorded it, or one whose record cannot be read: those sort by step, before every numbered one."""
    try:
        record = json.loads((folder / "train_state.json").read_text(encoding="utf-8"))
        return int(record.get("sequence", 0)) if isinstance(record, dict) else 0
    except (OSError, ValueError, TypeError):
        return 0


def list_states(root: Path) -> list[Path]:
    """Complete state folders under ``root``, oldest first: in the order they were written, not by step,
    since a fresh run into the same ``--output`` writes lower steps after an earlier, longer run's (its states
    are the newest: what ``--resume latest`` continues and what ``--keep-states`` keeps)."""
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and _STATE_NAME.match(p.name) and (p / "train_state.json").exists()
    ]
    return sorted(found, key=lambda p: (_sequence(p), p.name))


def resolve_resume(resume: str, root: Path) -> Path:
    """``latest`` -> newest state under ``root``; otherwise the folder given."""
    if resume == "latest":
        states = list_states(root)
        if not states:
            raise ConfigError(f"--resume latest: no saved state in {root}")
        return states[-1]
    path = Path(resume).expanduser()
    if (path / "train_state.json").exists():
        return path
    # kohya's habits: its save_state folders are NAME-000002-state (epoch) / NAME-step00000004-state beside the
    # result, and a LoRA continues from its weights file; sdcore's states are NAME-state/step-NNNNNNNN, so name the
    # ones this run's output has
    states = list_states(root)
    ours = (
        f"; this --output's states are in {root}: {', '.join(p.name for p in states)} "
        f"(--resume latest continues {states[-1].name}, the newest)"
        if states
        else ""
    )
    if not path.exists():
        raise ConfigError(f"--resume {resume}: no such state folder{ours}")
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: not a training state folder (no train_state.json){ours}")
    states = list_states(path)
    if states:
        return states[-1]
    # the output folder given instead of the run's state folder beside the result: name the ones it holds
    inside = sorted(str(p) for p in path.iterdir() if p.is_dir() and list_states(p))
    hint = f"; the state folders in it: {', '.join(inside)}" if inside else ""
    raise ConfigError(f"--resume {resume}: not a training state folder (no train_state.json){hint}")


def _rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    np_state: Any = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py_version, py_internal, py_gauss = random.getstate()
    info = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, info


def _restore_rng(tensors: dict[str, Any], info: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    name, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))


def _torch_save(obj: Any, path: Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_state(
    root: Path,
    position: TrainPosition,
    *,
    trainable: dict[str, Any],
    optimizer: Any,
    scheduler: Any,
    scaler: Any = None,
    extra: dict[str, Any] | None = None,
    ema: dict[str, Any] | None = None,
) -> Path:
    """Write the state after ``position.step`` optimizer steps; return its folder (``ema``: the
    shadow tensors of ``--ema``, in ``ema.safetensors``)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / state_name(position.step)
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in trainable.items()}
        with atomic_path(tmp / "trainable.safetensors") as part:
            save_file(tensors, str(part))
        if ema is not None:
            with atomic_path(tmp / "ema.safetensors") as part:
                save_file({k: v.detach().to("cpu").contiguous() for k, v in ema.items()}, str(part))
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            _torch_save(scaler.state_dict(), tmp / "scaler.pt")
        rng_tensors, rng_info = _rng_state()
        with atomic_path(tmp / "rng.safetensors") as part:
            save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(part))
        atomic_write_text(tmp / "rng.json", json.dumps(rng_info))
        record = {"format": STATE_FORMAT, "step": position.step, "epoch": position.epoch, "batch": position.batch}
        record.update(extra or {})
        # list_states' order: the state written last is the latest, whatever its step
        record["sequence"] = 1 + max((_sequence(p) for p in list_states(root)), default=0)
        atomic_write_text(tmp / "train_state.json", json.dumps(record, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_position(folder: Path) -> tuple[TrainPosition, dict[str, Any]]:
    try:
        record = json.loads((folder / "train_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder / 'train_state.json'}: unreadable training state ({exc})") from exc
    if record.get("format") is None and "current_step" in record:  # kohya's train_state.json (accelerate state)
        raise ConfigError(
            f"--resume {folder}: a kohya sd-scripts state (accelerate's), which sdcore cannot resume; start a LoRA "
            "from the .safetensors kohya saved with it (--network_weights FILE; optimizer and schedule start "
            "afresh), or start without --resume"
        )
    if record.get("format") != STATE_FORMAT:
        raise ConfigError(f"{folder}: training state format {record.get('format')!r} is not supported")
    return TrainPosition(int(record["step"]), int(record["epoch"]), int(record["batch"])), record


def load_state(folder: Path, *, optimizer: Any, scheduler: Any, scaler: Any = None) -> dict[str, Any]:
    """Restore optimizer, schedule, scaler and RNG states; return the trainable tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..models.safe_pickle import load_pickle

    try:
        trainable = load_file(str(folder / "trainable.safetensors"))
        rng_tensors = load_file(str(folder / "rng.safetensors"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # SafetensorError: a plain Exception
        raise ConfigError(f"{folder}: unreadable training state ({exc})") from exc
    # pickles only through the weights-only loader: a planted file raises UnsafeFileError, runs nothing
    try:
        optimizer.load_state_dict(load_pickle(folder / "optimizer.pt", mmap=False))
    except ValueError as exc:  # torch: another number of groups, or a group of another size
        raise ConfigError(
            f"--resume {folder}: the optimizer state does not fit this run's parameter groups ({exc}); an option "
            "that splits the parameters into learning-rate groups changed since it was saved (LoRA: --module-lrs "
            "rules, LoRA+ ratios, block or text-encoder rates): use the same ones, or start without --resume"
        ) from exc
    scheduler.load_state_dict(load_pickle(folder / "scheduler.pt", mmap=False))
    if scaler is not None and (folder / "scaler.pt").exists():
        scaler.load_state_dict(load_pickle(folder / "scaler.pt", mmap=False))
    _restore_rng(rng_tensors, json.loads((folder / "rng.json").read_text(encoding="utf-8")))
    return trainable


def load_ema(folder: Path) -> dict[str, Any]:
    """The ``--ema`` shadow tensors of a state folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / "ema.safetensors"
    if not path.exists():
        raise ConfigError(f"{folder}: the state holds no EMA (it was saved without --ema)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{path}: unreadable EMA state ({exc})") from exc


def prune_states(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` state folders."""
    states = list_states(root)
    for old in states[: max(0, len(states) - keep)]:
        shutil.rmtree(old, ignore_errors=True)

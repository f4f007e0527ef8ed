"""Text-encoder outputs on disk (``--cache-text-encoder-outputs-to-disk``, kohya's option of that name).

SD3 and FLUX.1 runs spend minutes encoding every caption variant with T5-XXL before the first step;
kohya keeps those outputs in files beside the images so the next run on the same data skips that.
Here each dataset folder (or its counterpart under ``--cache-dir``) gets one ``.safetensors`` file
per text-encoder setup, holding the encodings of the prompts its images use in this run.

Which setup wrote a file is told by a *probe*: a few fixed prompts (one empty, one with emphasis
syntax, one longer than a CLIP window) encoded by this run's method and encoders, in the precision
the cache stores. A file is reused only when its probe digest equals this run's, so another model,
another clip skip, T5 length or attention-mask setting, weighted captions switched on or off, or
another mixed precision never feed stale encodings (a partial cache, T5's outputs alone while CLIP
trains, hashes the encoders it holds too, so it and a full cache never read each other's files; tokens a method
added to a cached encoder with their own vectors, e.g. a LoRA's ``--embedding`` tokens in an untrained T5, are hashed
with their vectors, since a caption holding them encodes to what those vectors are); what no
valid file holds is encoded and the file rewritten (atomically) with exactly this run's prompts. A digest that differs only because the
GPU computed a bit differently costs one re-encode, never a wrong result.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import atomic_save

if TYPE_CHECKING:
    from .method import Conditioning

STORE_FORMAT = "1"
#: prompts whose encodings identify the encoders and every option that changes an encoding
PROBE_PROMPTS = (
    "",
    "a photo of (a red cube:1.3) on [a table], sharp focus",
    " ".join(["a long caption with many words that runs past one seventy-seven token window"] * 12),
)


def probe_digest(encodings: list[Conditioning], *, part: tuple[str, ...] = (), added: str = "") -> str:
    """A digest of the probe prompts' encodings: shapes, dtypes and every byte; ``part``: the text encoders of a
    partial cache (:func:`sdcore.train.cache.partial_text_encoders`), so its files and a full cache's never
    serve each other even where the encodings' bytes could agree (a full cache's digest is as before);
    ``added``: :func:`sdcore.train.cache.added_rows_identity` of the cached encoders (no probe prompt holds an
    added token, so two runs whose tokens of the same name have other vectors would otherwise share files)."""
    import torch

    digest = hashlib.sha256(STORE_FORMAT.encode())
    if part:
        digest.update(f"partial:{','.join(part)}".encode())
    if added:
        digest.update(f"added:{added}".encode())
    for cond in encodings:
        parts = [("hidden_states", cond.hidden_states), ("pooled", cond.pooled), *sorted(cond.extra.items())]
        for name, tensor in parts:
            if tensor is None:
                digest.update(f"{name}:none".encode())
                continue
            flat = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}:{tuple(flat.shape)}:{flat.dtype}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


def store_file(image_dir: str | Path, digest: str, cache_dir: str | None) -> Path:
    """The store of a dataset folder: beside its images, or under ``cache_dir`` (named like the
    latent cache's folders there, so two datasets with the same folder name do not collide)."""
    folder = Path(image_dir)
    name = f"sdcore_text_{digest[:12]}.safetensors"
    if cache_dir:
        folder_hash = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:10]
        return Path(cache_dir).expanduser() / f"{folder.name}-{folder_hash}" / name
    return folder / name


def _flatten(prompt: str, cond: Conditioning) -> dict[str, Any]:
    key = prompt_key(prompt)
    tensors = {f"{key}.hidden_states": cond.hidden_states.contiguous()}
    if cond.pooled is not None:
        tensors[f"{key}.pooled"] = cond.pooled.contiguous()
    for name, value in cond.extra.items():
        tensors[f"{key}.extra.{name}"] = value.contiguous()
    return tensors


def read_store(path: Path, digest: str, prompts: set[str]) -> dict[str, Conditioning]:
    """The encodings ``path`` holds for ``prompts`` when it was written by this setup; ``{}`` when the
    file is missing, unreadable, truncated or from another setup (then everything is encoded again)."""
    from safetensors import safe_open

    from .method import Conditioning

    if not path.is_file():
        return {}
    found: dict[str, Conditioning] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("sdcore_text_store") != STORE_FORMAT or meta.get("probe") != digest:
                return {}
            fields: dict[str, list[str]] = {}
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                fields.setdefault(name.split(".", 1)[0], []).append(name)
            for prompt in prompts:
                key = prompt_key(prompt)
                names = fields.get(key, [])
                if f"{key}.hidden_states" not in names:
                    continue
                pooled = handle.get_tensor(f"{key}.pooled") if f"{key}.pooled" in names else None
                prefix = f"{key}.extra."
                extra = {n[len(prefix) :]: handle.get_tensor(n) for n in names if n.startswith(prefix)}
                found[prompt] = Conditioning(handle.get_tensor(f"{key}.hidden_states"), pooled, extra)
    except Exception:  # a foreign or damaged file is not an error: the run encodes instead
        return {}
    return found


def write_store(path: Path, digest: str, encodings: dict[str, Conditioning]) -> None:
    """Write ``encodings`` (this run's prompts of one folder) atomically, with the mode the umask gives."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    for prompt, cond in sorted(encodings.items()):
        tensors.update(_flatten(prompt, cond))
    meta = {
        "sdcore_text_store": STORE_FORMAT,
        "probe": digest,
        "prompts": json.dumps({prompt_key(p): p for p in sorted(encodings)}, ensure_ascii=False),
    }
    atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


__all__ = ["PROBE_PROMPTS", "STORE_FORMAT", "probe_digest", "prompt_key", "read_store", "store_file", "write_store"]

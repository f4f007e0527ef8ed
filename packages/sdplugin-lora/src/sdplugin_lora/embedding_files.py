"""``sdcore lora extract-embeddings``: a LoRA's bundled embeddings as separate embedding files.

OneTrainer (and ``sdcore train lora --embedding``) writes the embeddings trained with a LoRA into the LoRA file
(``bundle_emb.NAME.PART``). A1111 1.7+ applies them with the LoRA; ComfyUI and Forge skip those keys ("lora key not
loaded: bundle_emb...", OneTrainer issue #485, ComfyUI issue #3659) and diffusers' ``load_lora_weights`` refuses
the whole file ("Invalid LoRA checkpoint"). This writes each one as its own textual-inversion file (sdcore's one
layout, :mod:`sdcore.models.embedding_files`: ``emb_params`` for SD1/SD2, ``clip_l``/``clip_g``/``t5`` for
SDXL/SD3/FLUX.1; an output embedding's ``*_out`` vectors kept in OneTrainer's layout, ``emp_params``/``emp_params_out``
or ``clip_l_out``...), named as OneTrainer names its separate files, and optionally a copy of the LoRA without the
bundle keys. Only the ``bundle_emb.*`` tensors are read: the LoRA's modules are neither parsed nor needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sdcore.errors import ConfigError, ModelFormatError

if TYPE_CHECKING:
    import torch
    from sdcore.models.bundled_embeddings import BundledEmbedding


@dataclass(frozen=True)
class EmbeddingFile:
    """One embedding to write: its name in the LoRA, its file, and the vectors as the file holds them."""

    embedding: BundledEmbedding
    path: Path
    vectors: dict[str, torch.Tensor]
    #: OneTrainer's output vectors (``*_out``), keyed as ``vectors``; written beside them in OneTrainer's layout
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def word(self) -> str:
        """The prompt word A1111 and ComfyUI (``embedding:WORD``) use for the file: its stem."""
        return self.path.stem


def read_bundled(path: str | Path) -> list[BundledEmbedding]:
    """The embeddings bundled in the LoRA file ``path`` with their tensors; only the ``bundle_emb.*`` tensors of a
    ``.safetensors`` are read (a pickle LoRA is read whole, safely)."""
    from sdcore.models.bundled_embeddings import bundled_embeddings, header_shapes

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: LoRA file not found")
    if path.suffix.lower() != ".safetensors":
        from .format import read_lora

        return read_lora(path).bundled
    from safetensors import SafetensorError, safe_open
    from sdcore.models.source import check_safetensors

    check_safetensors(path)  # the same message as every other command for a bad file
    keys = header_shapes(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: not a readable safetensors file ({exc})") from exc
    return bundled_embeddings(state, source=path)


def plan_files(lora: str | Path, output: str | Path | None) -> list[EmbeddingFile]:
    """What :func:`write_files` writes for the LoRA file ``lora`` into ``output`` (default: the LoRA's
    ``<file>_embeddings`` folder, where ``--embedding-files`` and OneTrainer put them). ConfigError, before anything
    is written, for a file that bundles none, a part no embedding file holds, or two names that give one file."""
    from sdcore.models.embedding_files import (
        bundled_file_outputs,
        bundled_file_vectors,
        embedding_file_name,
        embeddings_folder,
    )

    lora = Path(lora)
    found = read_bundled(lora)
    if not found:
        raise ConfigError(
            f"{lora}: no bundled embeddings (no bundle_emb.* keys) to extract; the LoRA was trained without new "
            "embeddings, or they were written as separate files already"
        )
    folder = Path(output) if output is not None else embeddings_folder(lora)
    planned: list[EmbeddingFile] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for emb in found:
        try:
            name = embedding_file_name(emb.name)
            vectors, outputs = bundled_file_vectors(emb), bundled_file_outputs(emb)
        except ModelFormatError as exc:
            problems.append(str(exc))
            continue
        if name.lower() in seen:
            problems.append(
                f"bundled embeddings {seen[name.lower()]!r} and {emb.name!r} would both be written as {name}"
            )
            continue
        seen[name.lower()] = emb.name
        planned.append(EmbeddingFile(emb, folder / name, vectors, outputs))
    if problems:
        raise ConfigError("; ".join(problems), problems)
    return planned


def write_files(planned: list[EmbeddingFile]) -> list[Path]:
    """Write every planned embedding file (atomic each; the folder made as needed), with the embedding's name
    in its header."""
    from sdcore.models.embedding_files import save_embedding_file

    written = []
    for item in planned:
        item.path.parent.mkdir(parents=True, exist_ok=True)
        source = item.embedding.source.name if item.embedding.source else ""
        written.append(
            save_embedding_file(
                item.path, item.vectors, {"name": item.embedding.name, "sdcore.source": source}, item.outputs
            )
        )
    return written


def check_strip(lora: str | Path) -> None:
    """ConfigError when ``--strip`` cannot copy ``lora`` (not a ``.safetensors``): asked before any file is written."""
    if Path(lora).suffix.lower() != ".safetensors":
        raise ConfigError(f"--strip: {lora} is no .safetensors file (sdcore writes the stripped copy as one)")


def strip_bundle(lora: str | Path, output: str | Path) -> int:
    """A copy of the LoRA ``.safetensors`` ``lora`` without its ``bundle_emb.*`` tensors, at ``output``
    (atomic): the other tensors as stored (dtype included) and the header, its ``sshs_*`` hashes (and a modelspec
    ``hash_sha256``) recomputed for the tensors left (A1111 shows ``sshs_model_hash`` as the LoRA's hash).
    Returns how many tensors were left out."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from sdcore.io import atomic_path
    from sdcore.models.bundled_embeddings import is_bundle_key
    from sdcore.models.hashes import sshs_hashes

    lora = Path(lora)
    check_strip(lora)
    with safe_open(str(lora), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        keys = list(handle.keys())
        kept = {key: handle.get_tensor(key) for key in keys if not is_bundle_key(key)}
    if any(key in metadata for key in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")):
        model_hash, legacy_hash = sshs_hashes(kept, metadata)
        if any(key in metadata for key in ("sshs_model_hash", "sshs_legacy_hash")):
            metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hash, legacy_hash
        if "modelspec.hash_sha256" in metadata:  # the sha256 of the tensor data, as save_lora writes it
            metadata["modelspec.hash_sha256"] = "0x" + model_hash
    with atomic_path(output) as tmp:
        save_file(kept, str(tmp), metadata=metadata or None)
    return len(keys) - len(kept)


__all__ = ["EmbeddingFile", "check_strip", "plan_files", "read_bundled", "strip_bundle", "write_files"]

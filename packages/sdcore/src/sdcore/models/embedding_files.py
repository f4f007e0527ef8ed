"""The ``.safetensors`` layout of a textual-inversion embedding file, written by every plugin that writes one.

A1111, ComfyUI, kohya and diffusers read an embedding from its own file, the prompt word being the file stem:

- SD1/SD2 (one text encoder): ``{"emb_params": [n, width]}`` (kohya ``train_textual_inversion.py``'s key). A1111's
  ``create_embedding_from_data`` takes the one tensor of a one-key dict; ComfyUI's ``load_embed`` takes its
  encoder's key if present, else the first value; diffusers' ``load_textual_inversion`` takes a one-key dict's
  tensor (with ``token=``).
- SDXL, SD3, FLUX.1, Chroma: one ``[n, width]`` tensor per text encoder, ``clip_l`` / ``clip_g`` / ``t5`` (OneTrainer's
  and kohya SDXL's names; Chroma's file has ``t5`` alone, OneTrainer's ``ChromaEmbeddingSaver``; A1111's SDXL branch
  needs ``clip_l`` and ``clip_g``; ComfyUI's tokenizers look up ``clip_l``, ``clip_g`` and ``t5xxl``, Chroma's T5 one
  too, so a T5 part is written under both ``t5`` and ``t5xxl``). :func:`encoder_part_keys` is the one reading of it.

OneTrainer's own embedding files (``modules/modelSaver/*EmbeddingSaver.py``) use the per-encoder keys, and for
SD1/SD2 ``emp_params`` (sic: its key, read as kohya's ``emb_params`` is); an "output embedding" adds ``<key>_out``
(``emp_params_out``, ``clip_l_out``...): the vectors that replace the text encoder's output at the word's
positions, its input vectors (``emp_params``...) being zeros. :func:`output_part_keys` reads those.

The textual-inversion plugin writes its ``.safetensors`` files through :func:`file_tensors`, and the LoRA plugin
writes the embeddings it trains with a LoRA (and those bundled in a LoRA file, ``sdcore lora extract-embeddings``)
through :func:`save_embedding_file`, so neither plugin imports the other. OneTrainer's own separate files
(``bundle_additional_embeddings: false``) go to ``<LoRA file>_embeddings/<placeholder>.safetensors`` with the
placeholder's spaces as ``_`` and only letters, digits and ``._-#`` kept (its ``safe_filename``):
:func:`embeddings_folder` and :func:`embedding_file_name` give those names. Importing this module does not import
torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelFormatError
from .bundled_embeddings import OUTPUT_SUFFIX, SINGLE, BundledEmbedding

if TYPE_CHECKING:
    import torch

#: the key of SD1/SD2's one tensor in a ``.safetensors`` embedding (kohya's; A1111 and ComfyUI read any one key)
EMB_PARAMS = "emb_params"
#: OneTrainer's key of SD1/SD2's one tensor (``StableDiffusionEmbeddingSaver``; its ``_out`` twin holds the output
#: vectors of an output embedding)
OT_EMP_PARAMS = "emp_params"
#: the key of CLIP-L's vectors (SDXL's text encoder 1, SD3's and FLUX.1's CLIP)
CLIP_L = "clip_l"
#: the key of OpenCLIP-bigG's vectors (SDXL's text encoder 2, SD3's second CLIP, the SDXL refiner's one encoder)
CLIP_G = "clip_g"
#: the key of T5-XXL's vectors (SD3, FLUX.1, Chroma), as OneTrainer writes it
T5 = "t5"
#: the per-encoder keys, in text-encoder order
ENCODER_KEYS = (CLIP_L, CLIP_G, T5)
#: ComfyUI's key of the T5 part (``t5xxl``: its T5-XXL tokenizers' ``embedding_key``), written beside OneTrainer's
#: ``t5`` and read as ``t5``
T5_ALIAS = "t5xxl"
#: the folder OneTrainer writes a LoRA's separate embeddings to: ``<the LoRA file's path>_embeddings``
FOLDER_SUFFIX = "_embeddings"
#: the characters OneTrainer's ``safe_filename`` keeps besides letters and digits (spaces become ``_`` first)
_KEPT = frozenset("._-#")
#: the device names Windows reserves whatever the extension (``CON.safetensors`` opens the console there), compared
#: case-insensitively with the part of the stem before its first dot; ``str.isalnum`` keeps the superscript digits
#: of ``COM¹``, which Windows reserves too
_WINDOWS_DEVICES = frozenset(
    {"con", "prn", "aux", "nul"} | {f"{port}{digit}" for port in ("com", "lpt") for digit in "0123456789¹²³"}
)


def encoder_part_keys(keys: Iterable[str]) -> dict[str, str]:
    """The per-encoder parts a file (or dict) with ``keys`` holds, as ``{part: key}`` in text-encoder order:
    ``clip_l``/``clip_g``/``t5`` under their own keys, ``t5`` under ComfyUI's ``t5xxl`` when ``t5`` is absent (a file
    with both reads ``t5``, OneTrainer's). Empty for another layout (``emb_params``, A1111's ``string_to_param``...).
    Every reader of the layout asks this, so which keys count, and which wins, is said once."""
    present = set(keys)
    parts = {key: key for key in ENCODER_KEYS if key in present}
    if T5 not in parts and T5_ALIAS in present:
        parts[T5] = T5_ALIAS
    return parts


def output_part_keys(keys: Iterable[str]) -> dict[str, str]:
    """The output vectors (OneTrainer's output embedding) a file with ``keys`` holds, as ``{part: key}`` in
    text-encoder order: ``emp_params_out`` is SD1/SD2's single tensor ``"*"``, ``clip_l_out``/``clip_g_out``/``t5_out``
    the per-encoder parts (OneTrainer's names only: no client writes a ``t5xxl_out``). Empty for a plain embedding."""
    present = set(keys)
    names = {SINGLE: OT_EMP_PARAMS, **{key: key for key in ENCODER_KEYS}}
    return {part: name + OUTPUT_SUFFIX for part, name in names.items() if name + OUTPUT_SUFFIX in present}


def _clean(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def per_encoder_tensors(vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One float32 tensor per encoder key; a ``t5`` part also under ComfyUI's ``t5xxl`` (a copy: safetensors refuses
    two keys sharing memory), so one file loads its T5 part in OneTrainer and ComfyUI alike."""
    tensors = {key: _clean(tensor) for key, tensor in vectors.items()}
    if T5 in tensors:
        tensors[T5_ALIAS] = tensors[T5].clone()
    return tensors


def file_tensors(
    vectors: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of an embedding's ``.safetensors`` file: ``emb_params`` for SD1/SD2's single tensor (key
    ``"*"``), else :func:`per_encoder_tensors`. ``vectors`` maps ``"*"`` or encoder keys to ``[n, width]``.

    ``outputs`` (an output embedding's vectors, keyed as ``vectors``) are written in OneTrainer's layout, which
    OneTrainer and sdcore read back (:func:`output_part_keys`): ``<key>_out`` beside each input part, SD1/SD2's as
    ``emp_params`` + ``emp_params_out`` (OneTrainer reads no ``emb_params``), an input part it lacks as zeros (what
    OneTrainer writes for an output embedding's inputs). A1111 and ComfyUI apply no output vectors."""
    outputs = dict(outputs or {})
    vectors = {**{key: _zeros_like(tensor) for key, tensor in outputs.items() if key not in vectors}, **vectors}
    if SINGLE in vectors:
        if len(vectors) != 1:
            raise ModelFormatError(f"an embedding has either one tensor or one per encoder, not {sorted(vectors)}")
        if outputs:
            return {OT_EMP_PARAMS: _clean(vectors[SINGLE]), OT_EMP_PARAMS + OUTPUT_SUFFIX: _clean(outputs[SINGLE])}
        return {EMB_PARAMS: _clean(vectors[SINGLE])}
    unknown = [key for key in vectors if key not in ENCODER_KEYS]
    if unknown or not vectors:
        raise ModelFormatError(f"embedding parts {sorted(vectors)}: want '*' or {', '.join(ENCODER_KEYS)}")
    tensors = per_encoder_tensors(vectors)
    tensors.update({key + OUTPUT_SUFFIX: _clean(tensor) for key, tensor in outputs.items()})
    return tensors


def _zeros_like(tensor: torch.Tensor) -> torch.Tensor:
    """Zero vectors of ``tensor``'s shape (an output embedding's input part)."""
    import torch

    return torch.zeros_like(tensor)


def save_embedding_file(
    path: str | Path,
    vectors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    outputs: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``vectors`` and an output embedding's ``outputs`` (see :func:`file_tensors`) as an embedding
    ``.safetensors`` at ``path``, atomically, with ``metadata`` (strings) in its header."""
    from safetensors.torch import save_file

    from ..io import atomic_path

    path = Path(path)
    tensors = file_tensors(vectors, outputs)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    return path


def read_embedding_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The input vectors of an embedding ``.safetensors`` as :func:`file_tensors` writes them back: ``{"*": tensor}``
    for a one-tensor file (``emb_params``, OneTrainer's ``emp_params`` or any one key), else the ``clip_l``/``clip_g``/``t5`` parts (``t5xxl`` read as
    ``t5``). ModelFormatError for a file that is neither."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        data = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(f"{path}: not a readable embedding file: {exc}") from exc
    parts = {part: data[key] for part, key in encoder_part_keys(data).items()}
    if parts:
        return {key: t.unsqueeze(0) if t.dim() == 1 else t for key, t in parts.items()}
    if OT_EMP_PARAMS in data:  # OneTrainer's SD1/SD2 file; an output embedding's emp_params_out is left out
        data = {OT_EMP_PARAMS: data[OT_EMP_PARAMS]}
    if len(data) == 1:
        tensor = next(iter(data.values()))
        return {SINGLE: tensor.unsqueeze(0) if tensor.dim() == 1 else tensor}
    raise ModelFormatError(f"{path}: not an embedding file (keys: {', '.join(sorted(data)[:8]) or 'none'})")


def bundled_file_vectors(embedding: BundledEmbedding) -> dict[str, torch.Tensor]:
    """The vectors of a LoRA's bundled embedding (read with tensors) as its own file holds them: SD1/SD2's one
    tensor (``string_to_param.*``, or ``clip_l`` alone as newer OneTrainer writes SD1's) is ``"*"``, written as
    ``emb_params`` (a FLUX.1 bundle with ``clip_l`` alone reads the same in A1111 and ComfyUI: the one tensor);
    SDXL/SD3/FLUX.1 parts keep their keys (``t5xxl`` as ``t5``, :func:`encoder_part_keys`). OneTrainer's output
    vectors (``*_out``) are :func:`bundled_file_outputs`'. ModelFormatError for a part no text encoder here reads
    (OneTrainer's ``llama``, ``gemma``...), naming it."""
    if not embedding.vectors and not embedding.output_vectors:
        raise ModelFormatError(f"bundled embedding {embedding.name!r} has no vectors")
    return _file_parts(embedding, dict(embedding.vectors), single=_single(embedding))


def bundled_file_outputs(embedding: BundledEmbedding) -> dict[str, torch.Tensor]:
    """OneTrainer's output vectors of a bundled embedding (``bundle_emb.NAME.clip_l_out``...) keyed as
    :func:`bundled_file_vectors` keys the inputs (SD1/SD2's ``clip_l_out`` as ``"*"``), for :func:`file_tensors`'
    ``outputs``: the extracted file keeps them in OneTrainer's layout. Empty for a plain embedding."""
    outputs = {part.removesuffix(OUTPUT_SUFFIX): tensor for part, tensor in embedding.output_vectors.items()}
    return _file_parts(embedding, outputs, single=_single(embedding), suffix=OUTPUT_SUFFIX)


def _single(embedding: BundledEmbedding) -> bool:
    """Whether a bundle is SD1/SD2's one tensor: ``string_to_param`` or ``clip_l`` alone (inputs and outputs)."""
    parts = set(embedding.vectors) | {part.removesuffix(OUTPUT_SUFFIX) for part in embedding.output_vectors}
    return parts in ({SINGLE}, {CLIP_L})


def _file_parts(
    embedding: BundledEmbedding, vectors: dict[str, torch.Tensor], *, single: bool, suffix: str = ""
) -> dict[str, torch.Tensor]:
    if not vectors:
        return {}
    if single:
        return {SINGLE: next(iter(vectors.values()))}
    out = {}
    chosen = encoder_part_keys(vectors)  # with both t5 and t5xxl, t5 is read, as from a file
    for part, tensor in vectors.items():
        key = T5 if part == T5_ALIAS else part
        if key not in ENCODER_KEYS:
            where = f"{embedding.source}: " if embedding.source else ""
            raise ModelFormatError(
                f"{where}bundled embedding {embedding.name!r} has a {part + suffix!r} part, which no embedding file "
                f"format here holds (want {', '.join(ENCODER_KEYS)})"
            )
        if chosen[key] == part:
            out[key] = tensor
    return out


def embedding_file_name(name: str) -> str:
    """``NAME.safetensors`` as OneTrainer names an embedding's own file: spaces become ``_``, then only letters,
    digits and ``._-#`` are kept (``<sks>`` -> ``sks.safetensors``); the prompt word in A1111 and ComfyUI is that
    stem. ModelFormatError when nothing is left, or when the stem is a device name Windows reserves (``CON``,
    ``nul.x``, ``COM1``...: the file could not be written or copied there)."""
    stem = "".join(c for c in name.replace(" ", "_") if c.isalnum() or c in _KEPT).strip()
    if not stem.strip("."):
        raise ModelFormatError(
            f"embedding {name!r}: no letter or digit is left for its file name (OneTrainer's rule: letters, digits "
            "and ._-#)"
        )
    if stem.split(".")[0].lower() in _WINDOWS_DEVICES:
        raise ModelFormatError(
            f"embedding {name!r}: its file name {stem}.safetensors is a device name Windows reserves (CON, PRN, AUX, "
            "NUL, COM0-9, LPT0-9; NUL.x.y too), which no Windows client can load"
        )
    return f"{stem}.safetensors"


def embeddings_folder(lora_path: str | Path) -> Path:
    """Where the embeddings trained with the LoRA ``lora_path`` go as separate files: ``<lora_path>_embeddings``
    (``out/x.safetensors`` -> ``out/x.safetensors_embeddings/``), OneTrainer's folder for the same setting."""
    path = Path(lora_path)
    return path.with_name(path.name + FOLDER_SUFFIX)


__all__ = [
    "CLIP_G",
    "CLIP_L",
    "EMB_PARAMS",
    "ENCODER_KEYS",
    "FOLDER_SUFFIX",
    "OT_EMP_PARAMS",
    "T5",
    "T5_ALIAS",
    "bundled_file_outputs",
    "bundled_file_vectors",
    "embedding_file_name",
    "embeddings_folder",
    "encoder_part_keys",
    "file_tensors",
    "output_part_keys",
    "per_encoder_tensors",
    "read_embedding_file",
    "save_embedding_file",
]

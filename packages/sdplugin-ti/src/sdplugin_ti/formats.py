"""Reading and writing embedding files: A1111 ``.pt``, ``.safetensors`` (kohya ``emb_params``, OneTrainer's
``emp_params``, or one key per text encoder: SDXL's ``clip_l``/``clip_g``, SD3's and Flux's with OneTrainer's
``t5``), diffusers ``.bin`` and A1111 PNG embeddings. OneTrainer's output embeddings (``emp_params_out``,
``clip_l_out``... beside zero input vectors) are read into :attr:`Embedding.output_vectors`.

Pickle files are opened with ``torch.load(weights_only=True)``: a file that wants to build any
object outside torch's tensor allow-list is refused with :class:`UnsafeFileError` before anything
in it runs. Every write is atomic (:mod:`sdcore.io`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdcore.errors import ModelFormatError
from sdcore.io import atomic_path
from sdcore.models.bundled_embeddings import OUTPUT_SUFFIX
from sdcore.models.embedding_files import (
    EMB_PARAMS,
    ENCODER_KEYS,
    OT_EMP_PARAMS,
    T5,
    T5_ALIAS,
    encoder_part_keys,
    output_part_keys,
)

from .embedding import SINGLE, Embedding

log = logging.getLogger(__name__)

#: A1111 writes the CLIP id of "*" here; it is a constant that loaders ignore
A1111_STAR_TOKEN = 265
FORMATS = ("pt", "safetensors", "bin", "png")
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt")
IMAGE_SUFFIXES = (".png", ".webp")
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors", *IMAGE_SUFFIXES)


def load_pickle(path: Path) -> Any:
    """Tensors and plain containers only (sdcore's safe reader); anything else is UnsafeFileError."""
    from sdcore.models.safe_pickle import load_pickle as safe_load

    return safe_load(path, mmap=False)


def _as_tensor(value: Any, where: str) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    raise ModelFormatError(f"{where}: expected a tensor, found {type(value).__name__}")


def embedding_from_dict(data: Any, name: str, *, source: Path | None = None) -> Embedding:
    """Interpret a loaded dict in any of the layouts A1111 accepts (see research 1.1)."""
    where = str(source or name)
    if not isinstance(data, Mapping):
        import torch

        if isinstance(data, torch.Tensor):  # a raw tensor: diffusers accepts it with a token
            return Embedding(name=name, vectors={SINGLE: data.detach().cpu()}, source=source)
        raise ModelFormatError(f"{where}: not an embedding (top level is {type(data).__name__}, want a dict)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # rinongal's ParameterDict files
        if not isinstance(params, Mapping) or len(params) != 1:
            count = len(params) if isinstance(params, Mapping) else "no"
            raise ModelFormatError(f"{where}: embedding file has {count} terms in string_to_param (want exactly one)")
        tensor = _as_tensor(next(iter(params.values())), where)
        step = data.get("step")
        return Embedding(
            name=name,
            vectors={SINGLE: tensor},
            step=int(step) if isinstance(step, int) else None,
            sd_checkpoint=_str_or_none(data.get("sd_checkpoint")),
            sd_checkpoint_name=_str_or_none(data.get("sd_checkpoint_name")),
            stored_name=_str_or_none(data.get("name")),
            source=source,
        )
    names = [key for key in data if isinstance(key, str)]
    outputs = {part: _as_tensor(data[key], f"{where} [{key}]") for part, key in output_part_keys(names).items()}
    parts = encoder_part_keys(names)  # sdcore's reading of the layout
    # clip_l/clip_g/t5 (ComfyUI's t5xxl as t5; T5 alone is Chroma's one encoder), or output vectors alone, which
    # OneTrainer loads as an output embedding (zero input vectors)
    if parts or (outputs and OT_EMP_PARAMS not in data and EMB_PARAMS not in data):
        vectors = {part: _as_tensor(data[key], f"{where} [{key}]") for part, key in parts.items()}
        return Embedding(
            name=name,
            vectors=_with_inputs(vectors, outputs),
            source=source,
            stored_name=_str_or_none(data.get("name")),
            output_vectors=outputs,
        )
    for key in (EMB_PARAMS, OT_EMP_PARAMS):  # kohya's key, OneTrainer's (with emp_params_out: an output embedding)
        if key in data:
            vectors = {SINGLE: _as_tensor(data[key], where)}
            return Embedding(name=name, vectors=vectors, source=source, output_vectors=outputs)
    tensors = {k: v for k, v in data.items() if not isinstance(v, (str, int, float, type(None)))}
    if len(tensors) == 1:  # diffusers {token: tensor}
        token, value = next(iter(tensors.items()))
        return Embedding(name=name, vectors={SINGLE: _as_tensor(value, where)}, source=source, stored_name=str(token))
    keys = ", ".join(map(str, list(data)[:8])) or "none"
    raise ModelFormatError(f"{where}: unknown embedding layout (keys: {keys})")


def _with_inputs(vectors: dict[str, Any], outputs: Mapping[str, Any]) -> dict[str, Any]:
    """``vectors`` with zeros for an output part whose input part is missing (OneTrainer writes zeros there and sets
    zeros when it loads an output embedding, whatever it holds), in text-encoder order."""
    import torch

    merged = {**{part: torch.zeros_like(tensor) for part, tensor in outputs.items()}, **vectors}
    order = (SINGLE, *ENCODER_KEYS)  # text-encoder order, as a file without output vectors reads
    return dict(sorted(merged.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def load_embedding(path: str | Path, *, name: str | None = None) -> Embedding:
    """Read an embedding file of any supported kind; ``name`` defaults to the file stem (A1111)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such embedding file")
    if path.stat().st_size == 0:
        raise ModelFormatError(f"{path}: empty file")
    suffix = path.suffix.lower()
    stem = name or path.stem
    if suffix == ".safetensors":
        return _load_safetensors(path, stem)
    if suffix in IMAGE_SUFFIXES:
        from .png import read_image_embedding

        data = read_image_embedding(path)
        # image embeddings are the one case where the stored name wins (A1111)
        stored = data.get("name") if isinstance(data, Mapping) else None
        emb = embedding_from_dict(data, name or str(stored or path.stem), source=path)
        return emb
    if suffix in PICKLE_SUFFIXES:
        return embedding_from_dict(load_pickle(path), stem, source=path)
    raise ModelFormatError(f"{path}: unsupported embedding file type {suffix!r} (want {', '.join(EMBEDDING_SUFFIXES)})")


def _load_safetensors(path: Path, name: str) -> Embedding:
    from safetensors import SafetensorError, safe_open
    from sdcore.models.source import check_safetensors

    check_safetensors(path)  # the same message as every other command for a bad file
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            data = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError) as exc:
        raise ModelFormatError(f"{path}: not a readable safetensors file: {exc}") from exc
    emb = embedding_from_dict(data, name, source=path)
    emb.metadata = metadata
    if "step" in metadata and metadata["step"].isdigit():
        emb.step = int(metadata["step"])
    emb.sd_checkpoint = metadata.get("sd_checkpoint") or emb.sd_checkpoint
    emb.sd_checkpoint_name = metadata.get("sd_checkpoint_name") or emb.sd_checkpoint_name
    emb.stored_name = metadata.get("name") or emb.stored_name
    return emb


def embedding_from_bundled(bundled: Any) -> Embedding:
    """A :class:`sdcore.models.bundled_embeddings.BundledEmbedding` (read by sdcore's one parser of ``bundle_emb.*``
    keys) as an :class:`Embedding`: ``string_to_param.*`` is the single tensor, ``clip_l``/``clip_g``/``t5`` (or
    ComfyUI's ``t5xxl``) the per-encoder ones; OneTrainer's output vectors (``*_out``: A1111 ignores them) go to :attr:`Embedding.output_vectors` (``clip_l_out`` -> ``clip_l``). ModelFormatError for a part no
    model here has (``llama``, ``gemma``: OneTrainer's other families)."""
    where = str(bundled.source or "LoRA file")
    source = Path(f"{bundled.source}/{bundled.name}") if bundled.source else None  # A1111's filename for it

    def read(tables: Mapping[str, Any], suffix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        stems = {part.removesuffix(suffix): part for part in tables}
        chosen = encoder_part_keys(stems)  # with both t5 and t5xxl, t5 is read, as from a file
        for stem, part in stems.items():
            key = T5 if stem == T5_ALIAS else stem
            if key not in (SINGLE, *ENCODER_KEYS):
                raise ModelFormatError(
                    f"{where}: unknown bundled embedding part {part!r} of {bundled.name!r} (no text encoder here "
                    "reads it)"
                )
            if chosen.get(key, stem) == stem:
                out[key] = _as_tensor(tables[part], f"{where} [bundle_emb.{bundled.name}.{part}]")
        return out

    outputs = read(bundled.output_vectors, OUTPUT_SUFFIX)
    return Embedding(
        name=bundled.name,
        vectors=_with_inputs(read(bundled.vectors, ""), outputs),
        source=source,
        output_vectors=outputs,
    )


def embeddings_in_lora(state: Mapping[str, Any], *, source: Path | None = None) -> list[Embedding]:
    """Embeddings bundled in a LoRA state dict (OneTrainer writes them; A1111 1.7+ reads them):
    ``bundle_emb.<name>.string_to_param.*`` or ``bundle_emb.<name>.clip_l`` / ``.clip_g`` / ``.t5``, parsed by sdcore
    (:func:`sdcore.models.bundled_embeddings.bundled_embeddings`)."""
    from sdcore.models.bundled_embeddings import bundled_embeddings

    return [embedding_from_bundled(emb) for emb in bundled_embeddings(state, source=source)]


# ----------------------------------------------------------------------------------------------
# writing


def _clean(tensor: Any) -> Any:
    import torch

    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def a1111_dict(emb: Embedding) -> dict[str, Any]:
    """The dict A1111 pickles: ``string_to_param`` for SD1/SD2; for SDXL (and SD3/Flux) only the
    per-encoder tensors (A1111 converts every value of an SDXL dict to a tensor, so extra keys would
    break it)."""
    if emb.is_sdxl:
        return {key: _clean(t) for key, t in emb.vectors.items()}
    return {
        "string_to_token": {"*": A1111_STAR_TOKEN},
        "string_to_param": {"*": _clean(emb.vectors[SINGLE])},
        "name": emb.name,
        "step": emb.step,
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
    }


def _header(emb: Embedding) -> dict[str, str]:
    meta = {"name": emb.name, "format": "pt"}
    if emb.step is not None:
        meta["step"] = str(emb.step)
    if emb.sd_checkpoint:
        meta["sd_checkpoint"] = emb.sd_checkpoint
    if emb.sd_checkpoint_name:
        meta["sd_checkpoint_name"] = emb.sd_checkpoint_name
    meta.update({k: str(v) for k, v in emb.metadata.items() if k not in meta})
    return meta


def _per_encoder(emb: Embedding) -> dict[str, Any]:
    """One key per encoder; a T5 part also under ComfyUI's ``t5xxl`` (sdcore's one writer of the layout,
    :func:`sdcore.models.embedding_files.per_encoder_tensors`)."""
    from sdcore.models.embedding_files import per_encoder_tensors

    return per_encoder_tensors(emb.vectors)


def save_embedding(emb: Embedding, path: str | Path, *, format: str | None = None, preview: Any = None) -> Path:
    """Write ``emb`` atomically; ``format`` (pt, safetensors, bin, png) defaults from the suffix.

    - ``pt``: the A1111 dict (readable by A1111, ComfyUI, diffusers with ``token=``).
    - ``safetensors``: kohya ``emb_params`` (SD1/SD2) or one key per encoder (SDXL ``clip_l``/``clip_g``;
      SD3 ``clip_l``/``clip_g``[/``t5``]; Flux ``clip_l``[/``t5``], OneTrainer's names), metadata in the header;
      an output embedding's vectors in OneTrainer's layout (``emp_params``/``emp_params_out``, ``clip_l_out``...),
      the other formats having no place for them: those are left out with a warning naming the file.
    - ``bin``: diffusers ``{name: tensor}`` (per-encoder embeddings: the same keys as safetensors).
    - ``png``: the A1111 ``sd-ti-embedding`` text chunk on ``preview`` (a PIL image) or a generated picture.
    """
    import torch

    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ModelFormatError(f"{path}: unknown embedding format {fmt!r} (want {', '.join(FORMATS)})")
    if emb.output_vectors and fmt != "safetensors":
        log.warning(
            "%s",
            f"{path}: the output vectors of OneTrainer's output embedding {emb.name!r} ({', '.join(emb.output_keys)}) "
            f"are left out: the {fmt} format (A1111's .pt/.png, diffusers' .bin) cannot hold them; write a "
            ".safetensors to keep them",
        )
    if fmt == "pt":
        data = a1111_dict(emb)
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
    elif fmt == "safetensors":  # sdcore's layout (emb_params, or clip_l/clip_g/t5 + t5xxl), shared with the LoRA's
        from sdcore.models.embedding_files import save_embedding_file

        save_embedding_file(path, emb.vectors, _header(emb), emb.output_vectors)  # output vectors: OneTrainer's
    elif fmt == "bin":
        tensors = _per_encoder(emb) if emb.is_sdxl else {emb.name: _clean(emb.vectors[SINGLE])}
        with atomic_path(path) as tmp:
            torch.save(tensors, tmp)
    else:
        from .png import write_png_embedding

        write_png_embedding(emb, path, preview=preview)
    return path

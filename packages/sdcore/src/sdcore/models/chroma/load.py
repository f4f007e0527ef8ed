"""Read Chroma models offline: diffusers folders (``ChromaPipeline``) and the single files users have.

A Chroma single file is FLUX.1's layouts with Chroma's transformer (:mod:`sdcore.models.flux.convert`
reads both): lodestones' release (``Chroma1-HD.safetensors``: the transformer alone, BFL keys with
``distilled_guidance_layer``), ComfyUI's checkpoints (under ``model.diffusion_model.``, optionally T5
under ``text_encoders.t5xxl.transformer.`` and the VAE under ``vae.``), a diffusers-layout transformer
file, or our writer's files (one of those plus ``sdcore.config``). Parts a file lacks come from
``t5xxl=`` and ``ae=``/``vae=``, as kohya's ``--model_type chroma`` takes them; Chroma has no CLIP-L, so
``clip_l=`` (and ``clip_g=``) is refused rather than ignored. The readers themselves are Flux's.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import ModelFormatError, SdcoreError
from ..bundle import ModelBundle
from ..flux.convert import CHROMA_PROBE, PROBE
from ..flux.load import (
    _VAE_LDM_PROBE,
    FLOW_PREDICTION,
    VAE_PREFIX,
    _dtype,
    _open,
    _refuse_quantized,
    _stored_configs,
    file_transformer_config,
    is_diffusers_transformer_file,
    part_config,
    read_diffusers_transformer,
    read_folder_components,
    read_transformer,
    read_vae_tensors,
    scheduler_for,
    transformer_prefix,
    vae_config_from_shapes,
)

#: the separate parts a Chroma model takes (``load_model`` keywords; ``vae`` is ``--vae``/``--ae``)
TAKES_PARTS = ("t5xxl", "vae", "t5_tokenizer")
#: which option supplies each part, for messages
PART_OPTIONS = {"text_encoder": "t5xxl", "vae": "ae"}
_T5_PROBE = "encoder.final_layer_norm.weight"


@contextlib.contextmanager
def quiet_chroma_construction() -> Iterator[None]:
    """Building a ``ChromaTransformer2DModel`` (diffusers 0.42) makes diffusers' own code import
    ``FluxPosEmbed`` from its old place and warn the user, on stderr, that *they* import it from there: a
    FutureWarning about diffusers' code they can do nothing about. Only that warning is hidden, only while
    a Chroma transformer is built; ``SDCORE_VERBOSE=1`` shows it (as
    :func:`~sdcore.generate.flow_samplers.quiet_pipeline_import` does)."""
    with warnings.catch_warnings():
        if not os.environ.get("SDCORE_VERBOSE"):
            warnings.filterwarnings("ignore", message=r"`FluxPosEmbed` is deprecated", category=FutureWarning)
        yield


def is_chroma_file(keys: Any) -> bool:
    """A Chroma transformer in BFL keys (FLUX.1's ``double_blocks`` with the approximator) or diffusers keys."""
    prefix = transformer_prefix(keys)
    if prefix is not None:
        return prefix + CHROMA_PROBE in keys
    return is_diffusers_transformer_file(keys) and CHROMA_PROBE in keys


def is_chroma_index(index: dict[str, Any]) -> bool:
    """A ``model_index.json`` of a Chroma pipeline (``ChromaPipeline``, ``ChromaImg2ImgPipeline``...)."""
    transformer = index.get("transformer") or [None, None]
    return str(index.get("_class_name", "")).startswith("Chroma") or transformer[-1] == "ChromaTransformer2DModel"


def _refuse_clip(where: Any, options: dict[str, Any]) -> None:
    given = [name for name in ("clip_l", "clip_g") if options.get(name) is not None]
    if given:
        raise SdcoreError(f"{where}: {' and '.join(given)} do not apply to Chroma (T5 only; parts: t5xxl, ae/vae, "
                          "t5_tokenizer)")  # fmt: skip


def _vae_option(where: Any, ae: Any, options: dict[str, Any]) -> Any:
    vae = options.get("vae")
    if vae is not None and ae is not None:
        raise SdcoreError(f"{where}: give the VAE once (ae= or vae=)")
    return ae if ae is not None else vae


def make_bundle(parts: dict[str, Any], *, source: str, source_format: str, metadata: dict[str, str] | None = None
                ) -> ModelBundle:  # fmt: skip
    """A ``chroma`` :class:`ModelBundle` from components under ``ChromaPipeline``'s names (missing ones ``None``)."""
    encoders = [parts["text_encoder"]] if parts.get("text_encoder") is not None else []
    return ModelBundle(
        family="chroma",
        prediction_type=FLOW_PREDICTION,
        unet=None,
        transformer=parts["transformer"],
        vae=parts.get("vae"),
        text_encoders=encoders,
        tokenizers=[parts.get("tokenizer")][: len(encoders)],
        noise_scheduler=parts["scheduler"],
        source=source,
        source_format=source_format,
        metadata=dict(metadata or {}),
    )


def _finish(parts: dict[str, Any], t5xxl: Any, ae: Any, t5_tokenizer: Any, dtype: Any) -> None:
    """Separate parts (they win over the file's), then the T5 tokenizer (``None`` when none is found:
    ``model info`` still works and encoding says what to give)."""
    from ..flux.load import load_ae
    from ..t5 import load_t5_encoder, load_t5_tokenizer

    if t5xxl is not None:
        parts["text_encoder"] = load_t5_encoder(t5xxl, dtype=dtype)
    if ae is not None:
        parts["vae"] = load_ae(ae, dtype=dtype)
    t5 = parts.get("text_encoder")
    if t5 is None or parts.get("tokenizer") is not None:
        return
    if t5_tokenizer is not None and not isinstance(t5_tokenizer, (str, os.PathLike)):
        parts["tokenizer"] = t5_tokenizer
        return
    try:
        parts["tokenizer"] = load_t5_tokenizer(t5_tokenizer, vocab_size=t5.config.vocab_size)
    except ModelFormatError:
        if t5_tokenizer is not None:
            raise
        parts["tokenizer"] = None


def read_chroma_single_file(
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    device: Any = None,
    t5_tokenizer: Any = None,
    config: Any = None,
    t5xxl: Any = None,
    ae: Any = None,
    **options: Any,
) -> ModelBundle:
    """A Chroma single file plus the parts given separately (see the module doc)."""
    _refuse_clip(path, options)
    ae = _vae_option(path, ae, options)
    from ..t5 import COMFY_T5_PREFIX, assign_t5, empty_t5, t5_config_from_shapes, t5_tensors

    file = Path(path)
    target = _dtype(dtype)
    source = _open(file)
    try:
        keys, shape, get = source.keys, source.shape, source.get
        if not is_chroma_file(keys):
            raise ModelFormatError(f"{file}: not a Chroma file (no {PROBE} with {CHROMA_PROBE})")
        _refuse_quantized(keys, file)
        stored = _stored_configs(source.metadata, file, config)
        prefix = transformer_prefix(keys)
        with quiet_chroma_construction():
            if prefix is None:
                transformer = read_diffusers_transformer(keys, shape, get, file, target, stored.get("transformer"))
            else:
                transformer = read_transformer(keys, shape, get, prefix, file, target, stored.get("transformer"))
        parts: dict[str, Any] = {"transformer": transformer}
        if t5xxl is None and COMFY_T5_PREFIX + _T5_PROBE in keys:
            t5_cfg = stored.get("text_encoder") or t5_config_from_shapes(keys, shape, COMFY_T5_PREFIX)
            parts["text_encoder"] = assign_t5(
                empty_t5(t5_cfg), t5_tensors(keys, get, COMFY_T5_PREFIX, dtype=target), file, target
            )
        if ae is None and VAE_PREFIX + _VAE_LDM_PROBE in keys:
            parts["vae"] = read_vae_tensors(keys, shape, get, VAE_PREFIX, file, target, stored.get("vae"))
        metadata = dict(source.metadata)
    finally:
        source.close()
    _finish(parts, t5xxl, ae, t5_tokenizer, dtype)
    parts["scheduler"] = scheduler_for("dev", stored.get("scheduler"))
    bundle = make_bundle(parts, source=str(file), source_format="single-file", metadata=metadata)
    if device is not None:
        bundle.to(device=device)
    return bundle


def read_chroma_diffusers(
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    device: Any = None,
    t5_tokenizer: Any = None,
    t5xxl: Any = None,
    ae: Any = None,
    **options: Any,
) -> ModelBundle:
    """A diffusers Chroma folder (``ChromaPipeline.save_pretrained`` layout), each component's ``from_pretrained``."""
    _refuse_clip(path, options)
    ae = _vae_option(path, ae, options)
    import transformers
    from diffusers import AutoencoderKL, ChromaTransformer2DModel

    folder = Path(path)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    wanted: dict[str, Any] = {"transformer": ChromaTransformer2DModel}
    if ae is None:
        wanted["vae"] = AutoencoderKL
    if t5xxl is None:
        wanted["text_encoder"] = transformers.T5EncoderModel
    with quiet_chroma_construction():
        parts = read_folder_components(folder, index, dtype, wanted, "Chroma")
    if (folder / "tokenizer").is_dir() and t5_tokenizer is None:
        t5_tokenizer = folder / "tokenizer"
    _finish(parts, t5xxl, ae, t5_tokenizer, dtype)
    sched = folder / "scheduler" / "scheduler_config.json"
    parts["scheduler"] = scheduler_for(
        "dev", json.loads(sched.read_text(encoding="utf-8")) if sched.is_file() else None
    )
    bundle = make_bundle(parts, source=str(folder), source_format="diffusers")
    if device is not None:
        bundle.to(device=device)
    return bundle


def chroma_part_slots(path: str | os.PathLike[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(parts a Chroma model takes, parts it lacks) from a file's header or a folder's ``model_index.json``."""
    from ..t5 import COMFY_T5_PREFIX

    where = Path(path)
    if where.is_dir():
        index = json.loads((where / "model_index.json").read_text(encoding="utf-8"))
        present = {name: bool((index.get(name) or [None])[0]) for name in ("text_encoder", "vae")}
    else:
        source = _open(where)
        try:
            keys = source.keys
        finally:
            source.close()
        present = {"text_encoder": COMFY_T5_PREFIX + _T5_PROBE in keys, "vae": VAE_PREFIX + _VAE_LDM_PROBE in keys}
    part = {"text_encoder": "t5xxl", "vae": "vae"}
    return TAKES_PARTS, tuple(part[name] for name in ("text_encoder", "vae") if not present[name])


def read_chroma_layout(path: str | os.PathLike[str], **parts: Any) -> Any:
    """The :class:`~sdcore.models.layout.ModelLayout` of a Chroma single file from its header alone (the
    pre-flight's memory plan); parts it lacks from the ``parts`` given, else at the released sizes."""
    from ..flux.tiny import vae_config
    from ..layout import ModelLayout, _bytes_per_weight
    from ..source import read_safetensors_header
    from ..t5 import COMFY_T5_PREFIX, T5_XXL_CONFIG, t5_config_from_shapes

    file = Path(path)
    source = _open(file)
    try:
        keys, shape = source.keys, source.shape
        if not is_chroma_file(keys):
            raise ModelFormatError(f"{file}: not a Chroma file (no {PROBE} with {CHROMA_PROBE})")
        stored = _stored_configs(source.metadata, file, None)
        prefix = transformer_prefix(keys)
        transformer = stored.get("transformer") or file_transformer_config(keys, shape, prefix, file)
        vae = stored.get("vae") or (
            vae_config_from_shapes(keys, shape, VAE_PREFIX) if VAE_PREFIX + _VAE_LDM_PROBE in keys else None
        )
        t5 = stored.get("text_encoder") or (
            t5_config_from_shapes(keys, shape, COMFY_T5_PREFIX) if COMFY_T5_PREFIX + _T5_PROBE in keys else None
        )
    finally:
        source.close()
    given = {**parts, "vae": parts.get("vae") or parts.get("ae")}
    vae = vae or (part_config("vae", given["vae"]) if given["vae"] else None)
    t5 = t5 or (part_config("t5xxl", given["t5xxl"]) if given.get("t5xxl") else None)
    notes = []
    missing = [name for name, cfg in (("vae", vae), ("t5xxl", t5)) if cfg is None]
    if missing:
        notes.append(f"not in the file, planned at the released sizes: {', '.join(missing)}")
    from ..flux.tiny import scheduler_config

    configs = {
        "transformer": {**transformer, "_class_name": "ChromaTransformer2DModel"},
        "vae": vae or vae_config(tiny=False),
        "text_encoders": [{**(t5 or T5_XXL_CONFIG), "_class_name": "T5EncoderModel"}],
        "scheduler": stored.get("scheduler") or scheduler_config("dev"),
    }
    header, _ = read_safetensors_header(file) if source.format == "safetensors" else ({}, 0)
    layout = ModelLayout(str(file), "chroma", FLOW_PREDICTION, configs, "single-file",
                         _bytes_per_weight(header) if header else 4.0)  # fmt: skip
    layout.notes.extend(notes)
    return layout

"""Write an SD3/SD3.5 bundle as an SAI single file (what ComfyUI, Forge and diffusers' ``from_single_file``
read) or as a diffusers ``StableDiffusion3Pipeline`` folder.

The single file uses SAI's release layout: ``model.diffusion_model.*`` (the MMDiT in ``joint_blocks``
form, see :mod:`.convert`), ``first_stage_model.*`` (the VAE, ldm names), and the text encoders in
Hugging Face layout under ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` (T5's tied
``encoder.embed_tokens`` written out as in Hugging Face's own T5 checkpoints). CLIP-L's projection is
left out when it is the identity, as in SAI's files (SD3 uses CLIP-L's pooled output unprojected).
The exact diffusers configs go into ``sdcore.config`` so non-standard sizes read back exactly.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from ...errors import SdcoreError
from ..bundle import ModelBundle
from ..detect import CONFIG_METADATA_KEY
from .convert import CLIP_G_PREFIX, CLIP_L_PREFIX, SAI_PREFIX, T5_PREFIX, mmdit_to_sai, shape_from_config

#: modelspec architecture ids as kohya sd-scripts writes them ("stable-diffusion-3" + "-" + the model type)
ARCHITECTURES = {
    "sd3": "stable-diffusion-3-medium",
    "sd3.5-large": "stable-diffusion-3-5-large",
    "sd3.5-medium": "stable-diffusion-3-5-medium",
}
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def variant_of_config(config: Any) -> str:
    from .detect import variant_of

    return variant_of(int(config["num_layers"]), bool(config.get("dual_attention_layers")), bool(config.get("qk_norm")))


def sd3_state_dict(bundle: ModelBundle) -> dict[str, Any]:
    """Every weight of the bundle under its SAI single-file key (tensors not copied where avoidable)."""

    from ..convert.clip import clip_key_map, has_text_model_level
    from ..convert.vae import is_conv_attention, vae_key_map

    transformer = bundle.transformer
    out = mmdit_to_sai(shape_from_config(transformer.config), transformer.state_dict(), SAI_PREFIX)
    state = bundle.vae.state_dict()
    for key, file_key in vae_key_map(list(state), len(bundle.vae.config.block_out_channels)).items():
        value = state[key]
        out[file_key] = value.reshape(*value.shape, 1, 1) if is_conv_attention(file_key) and value.ndim == 2 else value
    clip_l, clip_g, t5 = bundle.text_encoders
    for module, prefix in ((clip_l, CLIP_L_PREFIX), (clip_g, CLIP_G_PREFIX)):
        state = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        for key, file_key in clip_key_map(list(state), prefix, has_text_model_level(module)).items():
            value = state[key]
            if prefix == CLIP_L_PREFIX and key == "text_projection.weight" and _is_identity(value):
                continue
            out[file_key] = value
    for key, value in t5.state_dict().items():  # both shared.weight and its tied encoder.embed_tokens.weight:
        out[T5_PREFIX + key] = value  # diffusers' from_single_file loads each key as stored, without re-tying
    return out


def _is_identity(value: Any) -> bool:
    import torch

    square = value.ndim == 2 and value.shape[0] == value.shape[1] and not value.is_meta
    return square and torch.equal(value, torch.eye(value.shape[0], dtype=value.dtype, device=value.device))


def _json(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_json_string"):
        return json.loads(config.to_json_string())
    return json.loads(json.dumps(dict(config), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def sd3_config(bundle: ModelBundle) -> dict[str, Any]:
    """The ``sdcore.config`` entry: every component's diffusers/transformers config."""
    encoders = []
    for module in bundle.text_encoders:
        entry = _json(module.config)
        entry["_class_name"] = type(module).__name__
        encoders.append(entry)
    return {
        "family": "sd3",
        "transformer": _json(bundle.transformer.config),
        "vae": _json(bundle.vae.config),
        "text_encoders": encoders,
        "scheduler": _json(bundle.noise_scheduler.config),
    }


def write_sd3_single_file(
    bundle: ModelBundle, path: str | os.PathLike[str], *, dtype: Any = None, metadata: dict[str, str] | None = None,
    **_: Any,
) -> Path:  # fmt: skip
    """Write ``bundle`` as one SAI-layout ``.safetensors`` with modelspec metadata."""
    from safetensors.torch import save_file

    from ...dtypes import short_name
    from ...io import atomic_path
    from ..load import resolve_dtype
    from ..save import _HASH_PLACEHOLDER, _fill_data_hash, host_bundle

    target = Path(path)
    if target.suffix.lower() not in (".safetensors", ".sft"):
        raise SdcoreError(f"{target}: single files are written as .safetensors")
    want = resolve_dtype(dtype)
    seen: set[int] = set()
    out: dict[str, Any] = {}
    for key, value in sd3_state_dict(host_bundle(bundle, want)).items():  # converted in host memory
        value = value.detach().to("cpu")
        if want is not None and value.is_floating_point():
            value = value.to(want)
        value = value.contiguous()
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen and value.numel():
            value = value.clone()
        seen.add(pointer)
        out[key] = value
    config = bundle.transformer.config
    size = int(config.sample_size) * 8
    first = next(iter(bundle.transformer.parameters()))
    meta = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURES[variant_of_config(config)],
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": target.stem,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "modelspec.dtype": short_name(want or first.dtype),
        CONFIG_METADATA_KEY: json.dumps(sd3_config(bundle), sort_keys=True),
    }
    for key, value in (bundle.metadata or {}).items():
        if key in ("modelspec.title", "modelspec.author", "modelspec.description", "modelspec.license"):
            meta[key] = value
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    meta["modelspec.hash_sha256"] = _HASH_PLACEHOLDER
    with atomic_path(target) as tmp:
        save_file(out, str(tmp), metadata=meta)
        _fill_data_hash(tmp)
    return target


def write_sd3_diffusers(
    bundle: ModelBundle, path: str | os.PathLike[str], *, dtype: Any = None, metadata: dict[str, str] | None = None,
    **_: Any,
) -> Path:  # fmt: skip
    """Write a ``StableDiffusion3Pipeline`` folder: the core's diffusers writer, which builds the
    ``model_index.json`` of a transformer family from its declaration (CLIP weights keep ``text_model.``)."""
    from ..save import write_diffusers

    return write_diffusers(bundle, path, dtype=dtype, metadata=metadata)

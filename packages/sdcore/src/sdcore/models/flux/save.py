"""Write a Flux.1 bundle as one ``.safetensors`` in the layouts ComfyUI, Forge and kohya read.

``layout="comfy"`` (default): the transformer in BFL keys under ``model.diffusion_model.``, and, when
the bundle has them, the VAE in ldm keys under ``vae.`` (attention as 1x1 convs, as BFL's
``ae.safetensors``), CLIP-L under ``text_encoders.clip_l.transformer.`` (with ``text_model.``) and
T5 under ``text_encoders.t5xxl.transformer.``: ComfyUI's "checkpoint" Flux files.
``layout="bfl"``: the transformer alone in BFL keys, as ``flux1-dev.safetensors`` (ComfyUI's
``diffusion_models`` folder, Forge, kohya's ``--pretrained_model_name_or_path``).

Metadata: modelspec with kohya's Flux architecture names (``flux-1-dev`` / ``flux-1-schnell``) and
our ``sdcore.config`` entry (exact component configs) so non-standard sizes read back exactly.

Chroma bundles are written the same way (their transformer in BFL keys with ``distilled_guidance_layer``,
T5 and the VAE under ComfyUI's prefixes, no CLIP-L), with kohya's modelspec architecture ``chroma``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from ...errors import SdcoreError
from ..bundle import ModelBundle
from .convert import COMFY_PREFIX, diffusers_to_bfl
from .load import CLIP_L_PREFIX, CONFIG_METADATA_KEY, VAE_PREFIX

LAYOUTS = ("comfy", "bfl")
IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
#: kohya's sai_model_spec for Chroma (ARCH_FLUX_1_CHROMA, IMPL_CHROMA)
CHROMA_ARCHITECTURE, CHROMA_IMPLEMENTATION = "chroma", "https://huggingface.co/lodestones/Chroma"


def _encoders(bundle: ModelBundle) -> tuple[Any, Any]:
    """(CLIP-L, T5) of a Flux bundle, or (None, T5) of a Chroma one (T5 is its only encoder)."""
    te = bundle.text_encoders
    if bundle.family == "chroma":
        return None, (te[0] if te else None)
    return (te[0] if te else None), (te[1] if len(te) > 1 else None)


def flux_state(bundle: ModelBundle, layout: str = "comfy") -> dict[str, Any]:
    """Every tensor of ``bundle`` under its key in the ``layout`` file (see the module doc)."""
    from ..convert.clip import clip_key_map, has_text_model_level
    from ..convert.vae import PREFIX as LDM_VAE_PREFIX
    from ..convert.vae import is_conv_attention, vae_key_map
    from ..t5 import COMFY_T5_PREFIX, t5_file_tensors

    if layout not in LAYOUTS:
        raise SdcoreError(f"unknown Flux file layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    prefix = COMFY_PREFIX if layout == "comfy" else ""
    out = diffusers_to_bfl(bundle.transformer.state_dict(), prefix)
    if layout == "bfl":
        return out
    if bundle.vae is not None:
        state = bundle.vae.state_dict()
        for key, file_key in vae_key_map(list(state), len(bundle.vae.config.block_out_channels)).items():
            value = state[key]
            if is_conv_attention(file_key) and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
            out[VAE_PREFIX + file_key[len(LDM_VAE_PREFIX) :]] = value
    clip, t5 = _encoders(bundle)
    if clip is not None:
        state = {k: v for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
        for key, file_key in clip_key_map(list(state), CLIP_L_PREFIX, has_text_model_level(clip)).items():
            out[file_key] = state[key]
    if t5 is not None:
        out.update(t5_file_tensors(t5, COMFY_T5_PREFIX))
    return out


def flux_configs(bundle: ModelBundle, layout: str) -> dict[str, Any]:
    """The ``sdcore.config`` entry: family and the exact config of each component in the file."""
    from ..save import _json_config

    components: dict[str, Any] = {"transformer": _json_config(bundle.transformer.config)}
    components["scheduler"] = _json_config(bundle.noise_scheduler.config)
    if layout == "comfy":
        if bundle.vae is not None:
            components["vae"] = _json_config(bundle.vae.config)
        names = ("text_encoder",) if bundle.family == "chroma" else ("text_encoder", "text_encoder_2")
        for name, module in zip(names, bundle.text_encoders, strict=False):
            components[name] = _json_config(module.config)
    return {"family": bundle.family, "layout": layout, "components": components}


def write_flux_single_file(
    bundle: ModelBundle,
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    metadata: dict[str, str] | None = None,
    layout: str = "comfy",
) -> Path:
    """Write ``bundle`` as one ``.safetensors`` (atomic; modelspec hash filled in)."""
    from safetensors.torch import save_file

    from ...io import atomic_path
    from ..load import resolve_dtype
    from ..native import bundle_native_resolution
    from ..save import _HASH_PLACEHOLDER, SAI_SPEC_VERSION, _dtype_name, _fill_data_hash, host_bundle

    target = Path(path)
    if target.suffix.lower() not in (".safetensors", ".sft"):
        raise SdcoreError(f"{target}: single files are written as .safetensors")
    want = resolve_dtype(dtype)
    seen: set[int] = set()
    tensors: dict[str, Any] = {}
    # the BFL layout is the transformer alone: copy only it (FLUX.1's T5-XXL alone is 9.5 GB of host memory in bf16)
    source = replace(bundle, vae=None, text_encoders=[]) if layout == "bfl" else bundle
    for key, value in flux_state(host_bundle(source, want), layout).items():  # converted in host memory
        value = value.detach().to("cpu")
        if want is not None and value.is_floating_point():
            value = value.to(want)
        value = value.contiguous()
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen and value.numel():  # safetensors refuses tensors sharing memory (row views)
            value = value.clone()
        seen.add(pointer)
        tensors[key] = value
    if bundle.family == "chroma":
        architecture, implementation = CHROMA_ARCHITECTURE, CHROMA_IMPLEMENTATION
    else:
        variant = "dev" if bundle.transformer.config.guidance_embeds else "schnell"
        architecture, implementation = f"flux-1-{variant}", IMPLEMENTATION
    first = next(iter(bundle.transformer.parameters()))
    side = bundle_native_resolution(bundle) or 1024
    meta = {
        "modelspec.sai_model_spec": SAI_SPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": target.stem,
        "modelspec.resolution": f"{side}x{side}",  # a tiny model's 64, so it reads back as tiny:flux generates
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "modelspec.hash_sha256": _HASH_PLACEHOLDER,
        CONFIG_METADATA_KEY: json.dumps(flux_configs(bundle, layout), sort_keys=True),
        "sdcore.dtype": _dtype_name(want or first.dtype),
    }
    for key, value in (metadata or {}).items():
        meta[str(key)] = str(value)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        _fill_data_hash(tmp)
    return target

"""A model's native image size: what it was trained at, and so the sensible default resolution.

Native size = the UNet's ``sample_size`` (in latents) times the VAE's downscale factor
(``2 ** (len(vae.block_out_channels) - 1)``): SD1 512, SD2-768-v 768 (SD2-512-base 512), SDXL 1024,
the tiny test models their own 64 and the toy world's base model 32. :func:`peek_native_resolution` finds it before any weights
load (configs of a diffusers folder, a safetensors header, ``tiny:<family>``, ``toyworld:``), so the dataset's
buckets can be planned first; ``None`` means "load the model to know".
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: the tiny models of the transformer families (no ``sample_size`` in their configs) train and
#: generate at 64x64, as the tiny UNet models do
TINY_TRANSFORMER_RESOLUTION = 64
#: the metadata key ``sdcore model create-tiny`` writes (the family, as given): a tiny model of a family whose
#: files record no size (a plugin's own layout) then defaults to :data:`TINY_TRANSFORMER_RESOLUTION`, as
#: ``tiny:<family>`` does, instead of the family's native size, from the file as from the loaded bundle
TINY_METADATA_KEY = "sdcore.tiny"


def tiny_side(metadata: Mapping[str, str] | None) -> int | None:
    """:data:`TINY_TRANSFORMER_RESOLUTION` for a file ``sdcore model create-tiny`` wrote, else ``None``."""
    return TINY_TRANSFORMER_RESOLUTION if TINY_METADATA_KEY in (metadata or {}) else None


def native_resolution(unet_config: Mapping[str, Any], vae_config: Mapping[str, Any]) -> int | None:
    """Image side from the UNet and VAE configs, or ``None`` when they do not say."""
    sample = unet_config.get("sample_size")
    blocks = vae_config.get("block_out_channels")
    if isinstance(sample, (list, tuple)):
        sample = max(sample) if sample else None
    if not isinstance(sample, int) or not blocks:
        return None
    return int(sample) * 2 ** (len(blocks) - 1)


def _as_mapping(config: Any) -> Mapping[str, Any]:
    """A diffusers ``FrozenDict`` config, or any object with the config values as attributes."""
    return config if isinstance(config, Mapping) else vars(config)


#: the modelspec field (SAI's model spec, which sdcore's writers fill) that says a model's preferred size
MODELSPEC_RESOLUTION = "modelspec.resolution"


def modelspec_side(metadata: Mapping[str, str] | None) -> int | None:
    """The larger side of a file's ``modelspec.resolution`` (``"1024x1024"``), ``None`` when it has none, it
    does not read, or another tool wrote the file. A transformer without ``sample_size`` (FLUX.1, Chroma) has no
    other record of its size, so this is how a tiny model written to disk (``sdcore model create-tiny``) keeps
    its 64 as ``tiny:flux`` has it. Only sdcore's own files (with ``sdcore.config``) count: kohya's trainers
    write their training ``--resolution`` there (a FLUX.1 fine-tune at 512 says "512x512"), not the size."""
    from .detect import CONFIG_METADATA_KEY

    if CONFIG_METADATA_KEY not in (metadata or {}):
        return None
    text = (metadata or {}).get(MODELSPEC_RESOLUTION, "")
    try:
        sides = [int(part) for part in text.lower().split("x")]
    except ValueError:
        return None
    return max(sides) if len(sides) == 2 and min(sides) > 0 else None


def bundle_native_resolution(bundle: Any) -> int | None:
    """Native size of a loaded :class:`~sdcore.models.bundle.ModelBundle`: from its denoiser's
    ``sample_size`` when it has one (a transformer may not), else the file's ``modelspec.resolution``, else its
    family's declared size."""
    vae = _as_mapping(bundle.vae.config) if bundle.vae is not None else {}  # a transformer-only Flux file
    found = native_resolution(_as_mapping(bundle.denoiser.config), vae)
    if found is None and bundle.source_format == "tiny":
        return TINY_TRANSFORMER_RESOLUTION
    if found is None:
        metadata = getattr(bundle, "metadata", None)
        found = modelspec_side(metadata) or tiny_side(metadata)
    return found if found is not None else bundle.family_spec.native_resolution


def peek_native_resolution(source: str | os.PathLike[str], prediction_type: str | None = None) -> int | None:
    """Native size of a model source without loading weights; ``None`` when that needs the model.

    ``prediction_type`` is the loader's override (``--prediction-type``): an SD2 single file without its own
    configs is 768 as v-prediction and 512 as epsilon, as the loader builds it."""
    text = str(source)
    try:
        if text.startswith("tiny:"):
            from .tiny import tiny_unet_config, tiny_vae_config

            family = text.split(":", 1)[1] or "sd1"
            if family not in ("sd1", "sd2", "sdxl"):  # tiny transformer families (tiny:flux, ...)
                return TINY_TRANSFORMER_RESOLUTION
            return native_resolution(tiny_unet_config(family), tiny_vae_config(family))
        path = Path(text).expanduser()
        if text.startswith("toyworld:"):
            from .load import toyworld_model_dir

            path = toyworld_model_dir()
        if (path / "model_index.json").is_file():
            denoiser = "unet" if (path / "unet").is_dir() else "transformer"  # SD3's transformer has sample_size
            unet = json.loads((path / denoiser / "config.json").read_text(encoding="utf-8"))
            vae = json.loads((path / "vae" / "config.json").read_text(encoding="utf-8"))
            return native_resolution(unet, vae)
        if path.is_file() and path.suffix.lower() in (".safetensors", ".sft"):
            return _single_file(path, prediction_type)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    except Exception as exc:  # a model-format error: the loader reports it properly later
        from ..errors import SdcoreError

        if isinstance(exc, SdcoreError):
            return None
        raise
    return None


def _single_file(path: Path, prediction_type: str | None = None) -> int | None:
    from .detect import CONFIG_METADATA_KEY, detect, detect_family
    from .load import bundled_config
    from .source import CheckpointSource

    source = CheckpointSource(path)  # safetensors: the header only, tensors stay memory-mapped
    try:
        if CONFIG_METADATA_KEY in source.metadata:
            stored = json.loads(source.metadata[CONFIG_METADATA_KEY])
            stored = stored.get("components", stored)  # the FLUX.1/Chroma writer nests the component configs
            if "transformer" not in stored:
                return native_resolution(stored.get("unet") or {}, stored.get("vae") or {})
            found_size = native_resolution(stored["transformer"], stored.get("vae") or {})  # SD3 has sample_size
            if found_size is not None:
                return found_size
        from .family import get_family

        family = get_family(detect_family(source.keys, path))
        if family.denoiser != "unet":  # no ldm configs to read: the file's modelspec, else the family's size
            return modelspec_side(source.metadata) or tiny_side(source.metadata) or family.native_resolution
        found = detect(
            source.keys, source.shape, source.metadata, path=path, markers=source.markers, extras=source.extras,
            prediction_type=prediction_type,
        )  # fmt: skip
    finally:
        source.close()
    configs = bundled_config(found.family, found.prediction_type)
    return native_resolution(configs["unet"], configs["vae"])


__all__ = [
    "TINY_METADATA_KEY",
    "bundle_native_resolution",
    "modelspec_side",
    "native_resolution",
    "peek_native_resolution",
    "tiny_side",
]

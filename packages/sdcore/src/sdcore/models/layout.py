"""What a model is, from its header and configs only: no weights are read.

:func:`read_layout` answers "is this a model, which family, which component configs" for every
source :func:`sdcore.models.load.load_model` reads (a single file's safetensors header or pickle
keys, a diffusers folder's JSON configs, ``tiny:<family>``, a Hub id in the local cache), using the
same detection and config rules as the readers. :func:`meta_bundle` builds a
:class:`~sdcore.models.bundle.ModelBundle` of that layout with every parameter on the meta device
(shapes, no memory), which the training pre-flight and memory plan count and size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError, SdcoreError
from .bundle import ModelBundle
from .family import get_family


@dataclass
class ModelLayout:
    """A model's family and component configs (the ``sdcore.config`` shape: ``unet``, ``vae``,
    ``text_encoders``, ``scheduler``), and the bytes per weight as stored (2 for fp16 files)."""

    source: str
    family: str
    prediction_type: str
    configs: dict[str, Any]
    source_format: str
    stored_bytes_per_weight: float = 4.0
    inpainting: bool = False
    notes: list[str] = field(default_factory=list)
    #: where ``prediction_type`` comes from: what the model declares (``modelspec``, ``sdcore.config``,
    #: ``v_pred key``, ``scheduler config``, ``loaded model``) or ``default`` (nothing declares it: a guess)
    prediction_source: str = "default"


def _bytes_per_weight(header: dict[str, Any]) -> float:
    """Stored bytes per element over every tensor of a safetensors header (2.0 for an fp16 file)."""
    elements = stored = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= int(dim)
        elements += count
        stored += int(info["data_offsets"][1]) - int(info["data_offsets"][0])
    return stored / elements if elements else 4.0


def _tiny_layout(spec: str) -> ModelLayout:
    from .family import family_adapter, get_family
    from .load import tiny_spec
    from .sd_unet import SdUnetAdapter
    from .tiny import tiny_sd_inpainting, tiny_text_encoder_config, tiny_unet_config, tiny_vae_config

    try:
        name, options = tiny_spec(spec)  # tiny:flux-schnell, tiny:sd3:sd3.5-medium: the loader's reading
        family = get_family(name)
        adapter = family_adapter(family)
        if not isinstance(adapter, SdUnetAdapter):  # another family's tiny model: build it (it is tiny)
            layout = layout_of_bundle(adapter.create_tiny(**options))
            layout.source, layout.source_format = spec, "tiny"
            return layout
        inpainting = tiny_sd_inpainting(name, options.get("variant"))  # tiny:sd1-inpainting: 9 input channels
        unet = tiny_unet_config(name, inpainting=inpainting)
    except (ValueError, SdcoreError) as exc:
        raise ModelFormatError(f"{spec}: {exc}") from None
    encoders = []
    for index, encoder in enumerate(family.text_encoders):
        te = dict(tiny_text_encoder_config(name, index))
        te["_class_name"] = "CLIPTextModelWithProjection" if encoder.kind == "clip-g" else "CLIPTextModel"
        encoders.append(te)
    configs = {"unet": unet, "vae": tiny_vae_config(name), "text_encoders": encoders, "scheduler": {}}
    return ModelLayout(spec, name, family.default_prediction_type, configs, "tiny", inpainting=inpainting)


class LayoutUnavailableError(SdcoreError):
    """The model is readable but its family cannot describe it without loading (no plan then)."""


def _takes_parts(read: Any) -> bool:
    """Whether a family adapter's ``read_layout`` takes the separate parts (``**parts``; older ones: the path)."""
    import inspect

    try:
        params = inspect.signature(read).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(param.kind is inspect.Parameter.VAR_KEYWORD for param in params)


def _single_file_layout(
    path: Path, parts: dict[str, Any] | None = None, prediction_type: str | None = None
) -> ModelLayout:
    from .detect import detect, detect_family
    from .family import family_adapter
    from .load import single_file_configs
    from .sd_unet import SdUnetAdapter
    from .source import CheckpointSource, read_safetensors_header

    source = CheckpointSource(path)
    try:
        name = detect_family(source.keys, path)
        adapter = family_adapter(name)
        if not isinstance(adapter, SdUnetAdapter):  # another family: its adapter may know the layout
            source.close()
            read = getattr(adapter, "read_layout", None)
            if read is None:
                raise LayoutUnavailableError(f"{path}: the {name} family cannot tell its layout without loading")
            return read(path, **parts) if parts and _takes_parts(read) else read(path)  # type: ignore[no-any-return]
        found = detect(
            source.keys, source.shape, source.metadata, path=path, markers=source.markers, extras=source.extras,
            prediction_type=prediction_type,
        )  # fmt: skip
        configs = single_file_configs(source, found)
    finally:
        source.close()
    stored = _bytes_per_weight(read_safetensors_header(path)[0]) if source.format == "safetensors" else 4.0
    return ModelLayout(
        str(path), found.family, found.prediction_type, configs, "single-file", stored, found.inpainting,
        prediction_source=found.prediction_source,
    )  # fmt: skip


def _diffusers_layout(folder: Path, source: str, source_format: str) -> ModelLayout:
    from .load import (
        _folder_family,
        _other_family_folder,
        _read_json,
        configs_from_diffusers_folder,
        require_unet_folder,
    )

    index = _read_json(folder / "model_index.json")
    other = _other_family_folder(index)
    if other is not None:
        family, configs = other[0], _family_folder_configs(folder, index, other[0])
    else:
        require_unet_folder(folder, index)
        configs = configs_from_diffusers_folder(folder)
        family = _folder_family(folder, index, configs)
    sched = configs.get("scheduler") or {}
    prediction = "v_prediction" if sched.get("prediction_type") in ("v", "v_prediction") else "epsilon"
    denoiser = "unet" if other is None else get_family(family).denoiser
    weights = [*(folder / denoiser).glob("*.safetensors"), *(folder / denoiser).glob("*.bin")]
    if not weights:
        raise ModelFormatError(f"{folder}: diffusers folder without {denoiser} weights ({denoiser}/*.safetensors)")
    stored = 4.0
    first = sorted(weights)[0]
    if first.suffix == ".safetensors":
        from .source import read_safetensors_header

        stored = _bytes_per_weight(read_safetensors_header(first)[0])
    inpainting = other is None and int(configs["unet"].get("in_channels", 4)) == 9
    declared = "scheduler config" if sched.get("prediction_type") else "default"
    return ModelLayout(
        source, family, prediction, configs, source_format, stored, inpainting, prediction_source=declared
    )


def _family_folder_configs(folder: Path, index: dict[str, Any], family_name: str) -> dict[str, Any]:
    """A declared family's component configs from its diffusers folder (denoiser, VAE, the text
    encoders the family declares, scheduler), in the layout's shape."""
    from .load import _read_json

    family = get_family(family_name)
    configs: dict[str, Any] = {
        family.denoiser: _read_json(folder / family.denoiser / "config.json"),
        "vae": _read_json(folder / "vae" / "config.json"),
        "text_encoders": [],
    }
    for encoder in family.text_encoders:
        entry = index.get(encoder.component)
        if entry and entry[0] is not None:
            te = _read_json(folder / encoder.component / "config.json")
            te["_class_name"] = entry[1]
            configs["text_encoders"].append(te)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    configs["scheduler"] = _read_json(scheduler) if scheduler.exists() else {}
    return configs


def read_layout(
    path_or_hub_id: str | os.PathLike[str], parts: dict[str, Any] | None = None, *, prediction_type: str | None = None
) -> ModelLayout:
    """The layout of a model source, reading headers and configs only; ``parts`` (``load_model``'s part
    keywords, e.g. ``{"t5xxl": "t5xxl_fp16.safetensors"}``) describe what a single file lacks (the family
    adapter's ``read_layout(path, **parts)``). ``prediction_type`` is the user's choice for an SD single file,
    as ``load_model`` takes it: what the file (or the A1111 config beside it) declares is then not read, so a
    declaration sdcore refuses (an EDM ``model.yaml``) does not stop a run the loader would load.

    Raises :class:`~sdcore.errors.ModelFormatError` (or another :class:`~sdcore.errors.SdcoreError`)
    with the same one-line message ``load_model`` would give for a missing or unreadable model.
    """
    from .load import (
        TOYWORLD_PREFIX,
        cached_hub_folder,
        missing_model_error,
        sniff_hub,
        sniff_tiny,
        sniff_toyworld,
        toyworld_model_dir,
    )

    text = os.fspath(path_or_hub_id)
    if sniff_tiny(text):
        return _tiny_layout(text)
    if sniff_toyworld(text):
        if text.rstrip() != TOYWORLD_PREFIX:
            raise ModelFormatError(f"{text}: write the toy world's base model as plain {TOYWORLD_PREFIX!r}")
        return _diffusers_layout(toyworld_model_dir(), TOYWORLD_PREFIX, "toyworld")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelFormatError(f"{path}: folder is not a diffusers model (no model_index.json)")
        return _diffusers_layout(path, str(path), "diffusers")
    if path.is_file():
        return _single_file_layout(path, parts, prediction_type)
    if sniff_hub(text):
        return _diffusers_layout(cached_hub_folder(text), text, "hub")
    raise missing_model_error(text)


def peek_family(path_or_hub_id: str | os.PathLike[str]) -> str | None:
    """The family of a model source from a safetensors header, a diffusers folder's configs or the
    ``tiny:<family>`` name only (no weights read, no model built): what options whose default depends on
    the family need before anything loads. None when that cannot be told without loading (a pickle
    file) or the source is unreadable (the loader and the pre-flight say why)."""
    from .detect import detect_family
    from .load import sniff_tiny, tiny_spec
    from .source import CheckpointSource

    text = os.fspath(path_or_hub_id)
    try:
        if sniff_tiny(text):
            return get_family(tiny_spec(text)[0]).name
        path = Path(text).expanduser()
        if path.is_file():
            if path.suffix.lower() not in (".safetensors", ".sft"):
                return None
            source = CheckpointSource(path)
            try:
                return detect_family(source.keys, path)
            finally:
                source.close()
        return read_layout(text).family
    except (OSError, ValueError, KeyError, TypeError, SdcoreError):
        return None


def layout_of_bundle(bundle: ModelBundle) -> ModelLayout:
    """The layout of an already loaded bundle (configs read from its modules; the denoiser's under
    its family's component name, ``unet`` or ``transformer``)."""
    encoders = []
    for te in bundle.text_encoders:
        config = te.config.to_dict()
        config["_class_name"] = type(te).__name__
        encoders.append(config)
    denoiser = bundle.denoiser
    configs = {
        bundle.family_spec.denoiser: {**dict(denoiser.config), "_class_name": type(denoiser).__name__},
        "vae": dict(bundle.vae.config),
        "text_encoders": encoders,
        "scheduler": {},
    }
    sizes = [p.element_size() for p in denoiser.parameters()]
    stored = sum(sizes) / max(len(sizes), 1)
    return ModelLayout(
        bundle.source or "<bundle>",
        bundle.family,
        bundle.prediction_type,
        configs,
        bundle.source_format or "bundle",
        stored,
        bundle.inpainting,
        prediction_source="loaded model",
    )


def meta_bundle(layout: ModelLayout, tokenizers: list[Any] | None = None) -> ModelBundle:
    """A bundle of ``layout`` with every parameter on the meta device (no weight memory).

    ``tokenizers`` (e.g. those of an already loaded bundle) saves building the bundled CLIP ones."""
    from .family import get_family
    from .load import _noise_scheduler, _tokenizers, build_empty_modules

    family = get_family(layout.family)
    denoiser, vae, encoders = build_empty_modules(layout.configs)
    for module in [denoiser, vae, *encoders]:
        module.requires_grad_(True)
    if tokenizers is None:
        unet_family = family.denoiser == "unet"
        tokenizers = _tokenizers(layout.family, None, None) if unet_family else [None] * len(encoders)
    transformer = family.denoiser == "transformer"
    return ModelBundle(
        family=layout.family,
        prediction_type=layout.prediction_type,
        unet=None if transformer else denoiser,
        transformer=denoiser if transformer else None,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=_noise_scheduler(layout.configs.get("scheduler") or {}, layout.prediction_type),
        source=layout.source,
        source_format="meta",
        inpainting=layout.inpainting,
    )

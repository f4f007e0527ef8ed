"""Which Stable Diffusion family a single-file checkpoint is, from its keys, shapes and metadata.

Family comes from the text-encoder keys (they differ per family); inpainting from the UNet's
input channels (9). v-prediction is not in the weights: the sources, in priority order, are an
explicit user setting, the A1111 config beside the file (``<name>.yaml``: A1111 reads it before
anything else; :func:`sidecar_prediction`), ``modelspec.prediction_type``, our ``sdcore.config``
entry, the ``v_pred`` marker key (A1111 >= 1.10, ComfyUI), and finally a default: SD2 files are
v-prediction (SD2.x-768 is the common SD2 release; diffusers assumes the same) unless the ``.ckpt``
says ``global_step == 875000`` (the SD2-512-base release); everything else is epsilon.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError, SdcoreError
from .convert.clip import SD1_PREFIX, SDXL_CLIP_L_PREFIX
from .convert.openclip import REFINER_BIGG_PREFIX, SD2_PREFIX, SDXL_BIGG_PREFIX

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
CONFIG_METADATA_KEY = "sdcore.config"

TEXT_ENCODER_PREFIXES: dict[str, list[tuple[str, bool]]] = {  # family -> [(prefix, openclip?)]
    "sd1": [(SD1_PREFIX, False)],
    "sd2": [(SD2_PREFIX, True)],
    "sdxl": [(SDXL_CLIP_L_PREFIX, False), (SDXL_BIGG_PREFIX, True)],
    "sdxl-refiner": [(REFINER_BIGG_PREFIX, True)],
}


@dataclass(frozen=True)
class Detection:
    family: str
    inpainting: bool
    prediction_type: str
    prediction_source: str  # "user", "<name>.yaml", "modelspec", "sdcore.config", "v_pred key", "default"


def _normalise_prediction(value: str) -> str | None:
    value = value.strip().lower()
    if value in ("v", "v_prediction", "v-prediction", "vpred", "v_pred"):
        return "v_prediction"
    if value in ("epsilon", "eps", "noise"):
        return "epsilon"
    return None


def sidecar_config(path: str | Path) -> Path | None:
    """The A1111 model config of a single file: ``<name>.yaml`` beside ``<name>.safetensors``/``.ckpt``
    (A1111 uses it instead of the config it would guess; SD2-768 and v-prediction SDXL releases ship one)."""
    candidate = Path(path).with_suffix(".yaml")
    return candidate if Path(path).suffix and candidate.is_file() else None


#: the VAE file names A1111 takes for ``<name>.safetensors`` when its VAE setting is Automatic (its default)
A1111_VAE_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")


def sidecar_vae(path: str | Path) -> Path | None:
    """``<name>.vae.safetensors`` (``.pt``, ``.ckpt``) beside a single file: the VAE A1111 loads with that model
    ("found near the checkpoint"). kohya, ComfyUI and diffusers do not, and neither does sdcore without
    ``--vae``; the pre-flight says so where one is there, since the latents would differ from A1111's."""
    model = Path(path)
    if not model.suffix:
        return None
    found = (model.with_name(model.stem + suffix) for suffix in A1111_VAE_SUFFIXES)
    return next((candidate for candidate in found if candidate.is_file()), None)


def unused_a1111_vae(source: str | Path | None, source_format: str | None, family: str, vae_given: bool) -> Path | None:
    """The A1111 VAE (:func:`sidecar_vae`) beside an SD1/SD2/SDXL single file that sdcore will not use because
    no ``--vae`` names it: the one rule behind the notes of the pre-flight, ``sdcore generate`` and
    ``sdcore model info`` (each says it in its own words). Folders and the transformer families have no such
    file in A1111; ``None`` where there is nothing to say."""
    if vae_given or not source or source_format != "single-file" or family not in FAMILY_MARKERS:
        return None
    return sidecar_vae(source)


#: the SGM (SDXL) denoiser scalings: A1111 treats ``VScaling`` and its subclasses as v-prediction
_SGM_SCALINGS = {"EpsScaling": "epsilon", "VScaling": "v_prediction", "VScalingWithEDMcNoise": "v_prediction"}


def sidecar_prediction(path: str | Path) -> tuple[str, str] | None:
    """``(prediction type, source)`` declared by the A1111 config beside the file, or ``None`` when there is
    none or it is not a model config.

    An ldm config (SD1/SD2) declares ``model.params.parameterization`` (``v``; absent means ``eps``, as
    ldm's default: SD2-512-base ships ``v2-inference.yaml`` without it). An SGM config (SDXL) declares
    its denoiser's scaling class (``model.params.denoiser_config.params.scaling_config.target``). An EDM
    scaling (Playground v2.5, CosXL) is refused: its noise schedule is not a DDPM one sdcore trains.
    """
    config = sidecar_config(path)
    if config is None:
        return None
    import yaml

    try:
        loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise ModelFormatError(
            f"{config}: the model config beside {Path(path).name} cannot be read: {reason}"
        ) from None
    model = loaded.get("model") if isinstance(loaded, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict):
        return None
    source = config.name
    denoiser = params.get("denoiser_config")
    if isinstance(denoiser, dict):
        inner = denoiser.get("params")
        scaling_config = inner.get("scaling_config") if isinstance(inner, dict) else None
        scaling = scaling_config.get("target") if isinstance(scaling_config, dict) else None
        name = str(scaling or "").rsplit(".", 1)[-1]
        if name in _SGM_SCALINGS:
            return _SGM_SCALINGS[name], source
        raise ModelFormatError(
            f"{config}: denoiser scaling {scaling!r}: sdcore trains epsilon and v-prediction models "
            "(EpsScaling, VScaling); an EDM model is not one"
        )
    declared = str(params.get("parameterization", "eps"))
    chosen = _normalise_prediction(declared)
    if chosen is None:
        raise ModelFormatError(f"{config}: parameterization {declared!r}: sdcore trains eps and v models")
    return chosen, source


#: one key only a single file of each UNet family has (checked together with :data:`UNET_IN`)
FAMILY_MARKERS: dict[str, str] = {
    "sdxl": SDXL_BIGG_PREFIX + "ln_final.weight",
    "sdxl-refiner": REFINER_BIGG_PREFIX + "ln_final.weight",
    "sd2": SD2_PREFIX + "ln_final.weight",
    "sd1": SD1_PREFIX + "text_model.final_layer_norm.weight",
}


def is_unet_family_file(keys: Collection[str], family: str) -> bool:
    """Whether ``keys`` are an ldm/SGM single file of the UNet family ``family``."""
    return UNET_IN in keys and FAMILY_MARKERS.get(family, "\0") in keys


def detect_family(keys: Collection[str], path: str | Path = "<checkpoint>") -> str:
    """The family whose adapter claims a single file with these keys (sdcore's families first,
    then those of plugins); :class:`ModelFormatError` naming ``path`` when none does."""
    from .family import families, family_adapter

    skipped = []
    for family in families():
        try:
            adapter = family_adapter(family)
        except SdcoreError as exc:  # a broken plugin family must not stop SD files from loading
            skipped.append(str(exc))
            continue
        if adapter.detect_single_file(keys):
            return family.name
    note = f" (not asked: {'; '.join(skipped)})" if skipped else ""
    if UNET_IN in keys:
        raise ModelFormatError(
            f"{path}: unknown model layout (UNet found, but no SD1/SD2/SDXL text encoder keys){note}"
        )
    known = ", ".join(f.name for f in families())
    raise ModelFormatError(
        f"{path}: not a Stable Diffusion checkpoint (no {UNET_IN}, and no other known family's keys: {known}){note}"
        + (_part_hint(keys) or network_file_hint(keys))
    )


#: key pieces only a LoRA-family file holds (kohya/LyCORIS, PEFT/diffusers)
_NETWORK_KEY_PIECES = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a", ".lokr_w1", ".oft_blocks")
#: the tensor names of textual-inversion files (A1111 .pt/.safetensors, SDXL's clip_l/clip_g, SD3/Flux's t5)
_EMBEDDING_KEYS = {"emb_params", "string_to_param", "string_to_token", "clip_l", "clip_g", "t5"}


def network_file_hint(keys: Collection[str]) -> str:
    """``; it is a LoRA ...`` / ``; it is a textual-inversion embedding ...`` for a file a user gave where a model
    belongs (both sit beside checkpoints in A1111's and ComfyUI's models folders), so the message says what it is
    and where it goes; ``""`` for any other file."""
    if any(piece in key for key in keys for piece in _NETWORK_KEY_PIECES):
        return (
            "; it is a LoRA, not a model: `sdcore lora info` describes it, <lora:NAME:1> in a prompt (or `sdcore lora "
            "merge --model`) applies it to a model"
        )
    if keys and (set(keys) <= _EMBEDDING_KEYS or "string_to_param" in keys):  # A1111's .pt: name, step ... beside
        return "; it is a textual-inversion embedding, not a model: write its name in a prompt (--embeddings-dir)"
    if "layer_structure" in keys or (any(k.isdigit() for k in keys) and {"name", "step"} & set(keys)):
        # A1111's hypernetwork .pt: its layers under the attention widths (768, 1024 ...), beside its settings
        return "; it is a hypernetwork, not a model: <hypernet:NAME:1> in a prompt applies it (--hypernetwork-dir)"
    return ""


def _part_hint(keys: Collection[str]) -> str:
    """What a file that is no checkpoint is, when its keys are a model part's (ComfyUI keeps them in ``clip/``,
    ``text_encoders/`` and ``vae/``), and the option that takes it, so the message says what to do with it."""
    from .parts import PART_LABELS, flag, parts_in

    found = parts_in(keys)
    if not found:
        return ""
    options = " or ".join(flag(name) for name in found)
    labels = " / ".join(dict.fromkeys(PART_LABELS[name] for name in found))
    return f"; it holds a {labels} alone: give it with {options} to a model file that lacks it"


def detect(
    keys: Collection[str],
    shape: Callable[[str], tuple[int, ...]],
    metadata: Mapping[str, str],
    *,
    path: str | Path = "<checkpoint>",
    markers: Collection[str] = (),
    extras: Mapping[str, Any] | None = None,
    prediction_type: str | None = None,
) -> Detection:
    """Classify a checkpoint; raises :class:`ModelFormatError` naming ``path`` if it is not one."""
    family = detect_family(keys, path)
    inpainting = shape(UNET_IN)[1] == 9
    if prediction_type is not None:
        chosen = _normalise_prediction(prediction_type)
        if chosen is None:
            raise ModelFormatError(f"{path}: unknown prediction type {prediction_type!r} (use epsilon or v_prediction)")
        return Detection(family, inpainting, chosen, "user")
    beside = sidecar_prediction(path)
    if beside is not None:
        return Detection(family, inpainting, *beside)
    spec = _normalise_prediction(metadata.get("modelspec.prediction_type", ""))
    if spec:
        return Detection(family, inpainting, spec, "modelspec")
    if CONFIG_METADATA_KEY in metadata:
        try:
            stored = json.loads(metadata[CONFIG_METADATA_KEY]).get("prediction_type")
        except (json.JSONDecodeError, AttributeError):
            stored = None
        if stored and _normalise_prediction(stored):
            return Detection(family, inpainting, _normalise_prediction(stored) or "epsilon", "sdcore.config")
    if "v_pred" in markers:
        return Detection(family, inpainting, "v_prediction", "v_pred key")
    if family == "sd2" and not inpainting and (extras or {}).get("global_step") != 875000:
        return Detection(family, inpainting, "v_prediction", "default")
    return Detection(family, inpainting, "epsilon", "default")

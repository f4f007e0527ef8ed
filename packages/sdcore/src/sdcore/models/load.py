"""``load_model``: read any Stable Diffusion model users have into a :class:`ModelBundle`, offline.

Accepted: a diffusers folder (``model_index.json``), a single-file ldm/SGM ``.safetensors`` or
pickle (``.ckpt``/``.pt``, read with ``weights_only=True``), ``tiny:sd1|sd2|sdxl``, ``toyworld:`` (the
toy world's trained base model that ships with sdcore), or a Hub id that
is already in the local Hugging Face cache (never downloaded). Single files are turned into modules
without the network: the family's diffusers configs ship in ``models/configs/`` and our own writer
stores the exact configs in the ``sdcore.config`` metadata entry (that is how tiny or otherwise
non-standard layouts load exactly); other non-standard files get configs inferred from their tensor
shapes (:mod:`sdcore.models.infer`), or from ``config=<diffusers folder>``. Modules are built on the meta device and the file's tensors are
assigned directly, so loading costs one read of the file and no random initialisation.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from ..dtypes import resolve_dtype as resolve_dtype  # the one dtype table (re-exported)
from ..errors import ModelFormatError, SdcoreError
from .bundle import ModelBundle
from .detect import CONFIG_METADATA_KEY, TEXT_ENCODER_PREFIXES, Detection, detect, detect_family

# ----------------------------------------------------------------------------------------------- configs

#: text-encoder classes a layout may name (built on the meta device from their configs): sdcore's own families'
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
#: and, for a plugin family's encoder (AuraFlow's ``UMT5EncoderModel``...), any transformers model class so named
TEXT_ENCODER_SUFFIXES = ("EncoderModel", "TextModel", "TextModelWithProjection")


def text_encoder_class(name: str) -> Any:
    """The transformers class a layout's ``_class_name`` names, or ``None`` when it is no text-encoder model class
    (a name from a file header never reaches ``getattr`` unchecked)."""
    import transformers

    if name not in TEXT_ENCODER_CLASSES and not name.endswith(TEXT_ENCODER_SUFFIXES):
        return None
    cls = getattr(transformers, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def bundled_config(family: str, prediction_type: str = "epsilon") -> dict[str, Any]:
    """The diffusers configs of a standard ``family`` model, shipped with sdcore."""
    name = family
    if family == "sd2":
        name = "sd2-768-v" if prediction_type == "v_prediction" else "sd2-512"
    text = resources.files("sdcore.models").joinpath(f"configs/{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def configs_from_diffusers_folder(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Component configs (no weights) of a diffusers folder, in the ``sdcore.config`` shape."""
    root = Path(folder)
    index = _read_json(root / "model_index.json")
    out: dict[str, Any] = {"text_encoders": []}
    for name in ("unet", "vae"):
        out[name] = _read_json(root / name / "config.json")
    for name in ("text_encoder", "text_encoder_2"):
        entry = index.get(name)
        if entry and entry[0] is not None:
            te = _read_json(root / name / "config.json")
            te["_class_name"] = entry[1]
            out["text_encoders"].append(te)
    scheduler = root / "scheduler" / "scheduler_config.json"
    out["scheduler"] = _read_json(scheduler) if scheduler.exists() else {}
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None


def config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config's constructor arguments: without diffusers' ``_`` entries and transformers' bookkeeping."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


_clean = config_fields


# ----------------------------------------------------------------------------------------------- modules


def _no_init_contexts() -> list[Any]:
    contexts: list[Any] = []
    try:
        from diffusers.models.modeling_utils import no_init_weights as diffusers_no_init

        contexts.append(diffusers_no_init())
    except ImportError:  # pragma: no cover - older diffusers
        pass
    try:
        from transformers.initialization import no_init_weights as transformers_no_init

        contexts.append(transformers_no_init())
    except ImportError:  # pragma: no cover - older transformers
        pass
    return contexts


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Modules built inside get parameters on the meta device (buffers real) and skip random init.

    Loaders build the module skeleton here, then assign the file's tensors: no weight is allocated
    twice and no time goes into initialising what is overwritten.
    """
    from accelerate import init_empty_weights

    with contextlib.ExitStack() as stack:
        stack.enter_context(init_empty_weights(include_buffers=False))
        for skip in _no_init_contexts():  # random init of meta tensors is wasted work (~0.2 s)
            stack.enter_context(skip)
        yield


def empty_module(build: Callable[[], Any]) -> Any:
    """``build()`` inside :func:`empty_weights`."""
    with empty_weights():
        return build()


def build_empty_modules(configs: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """Denoiser, VAE and text encoders with parameters on the meta device (buffers real).

    The denoiser is ``configs["unet"]`` (a ``UNet2DConditionModel``) or ``configs["transformer"]``
    (the diffusers class its ``_class_name`` names, e.g. ``SD3Transformer2DModel``); text encoders
    are the transformers classes their ``_class_name`` names (CLIP, CLIP with projection, T5).
    """
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with empty_weights():
        if "unet" in configs or "transformer" not in configs:
            denoiser = UNet2DConditionModel.from_config(_clean(configs["unet"]))
        else:
            cls_name = configs["transformer"].get("_class_name", "")
            cls = getattr(diffusers, cls_name, None) if cls_name.endswith("Transformer2DModel") else None
            if cls is None:
                raise ModelFormatError(f"unsupported transformer class {cls_name!r}")
            denoiser = cls.from_config(_clean(configs["transformer"]))
        vae = AutoencoderKL.from_config(_clean(configs["vae"]))
        encoders = []
        for te in configs["text_encoders"]:
            cls_name = te.get("_class_name") or (te.get("architectures") or ["CLIPTextModel"])[0]
            model_cls = text_encoder_class(cls_name)
            if model_cls is None:
                raise ModelFormatError(f"unsupported text encoder class {cls_name!r}")
            fields = {k: v for k, v in te.items() if k not in ("_class_name", "architectures", "model_type")}
            encoders.append(model_cls(model_cls.config_class(**fields)))
    return denoiser, vae, encoders


def _assign(module: Any, tensors: dict[str, Any], name: str, path: Path, dtype: Any) -> None:
    """Put the file's tensors into the meta-initialised ``module`` as its parameters (no copy).

    Equivalent to ``load_state_dict(strict=True, assign=True)`` but without its per-module
    bookkeeping, which costs more than reading a memory-mapped file.
    """
    import torch

    expected: dict[str, Any] = {}
    needed: set[str] = set()
    for owner_name, owner in module.named_modules():
        dot = owner_name + "." if owner_name else ""
        for attr, value in owner._parameters.items():
            if value is not None:
                expected[dot + attr] = value
                needed.add(dot + attr)
        for attr, value in owner._buffers.items():
            if value is not None:
                expected[dot + attr] = value
                if attr not in owner._non_persistent_buffers_set:
                    needed.add(dot + attr)
    missing = sorted(needed - set(tensors))
    if missing:
        raise ModelFormatError(f"{path}: {name} weights missing from the file: {', '.join(missing[:3])}")
    for key, value in tensors.items():
        if key not in expected:
            raise ModelFormatError(f"{path}: {name} has no tensor {key!r} (layout mismatch)")
        want = expected[key].shape
        if tuple(value.shape) != tuple(want):
            if value.numel() == expected[key].numel():  # 1x1 conv <-> linear, e.g. VAE attention
                value = value.reshape(want)
            else:
                raise ModelFormatError(
                    f"{path}: {name} tensor {key!r} has shape {tuple(value.shape)}, the model config expects "
                    f"{tuple(want)} (non-standard layout: pass config=<diffusers folder>)"
                )
        if dtype is not None and value.dtype != dtype and value.is_floating_point():
            value = value.to(dtype)
        owner_path, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if attr in owner._parameters:
            owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=owner._parameters[attr].requires_grad)
        else:
            owner._buffers[attr] = value
    left = sorted(k for k, v in expected.items() if v.is_meta and k not in tensors)
    if left:
        raise ModelFormatError(f"{path}: {name} weights missing from the file: {', '.join(left[:3])}")
    module.eval()


def _modules_from_source(source: Any, family: str, configs: dict[str, Any], dtype: Any) -> tuple[Any, Any, list[Any]]:
    from .convert.checkpoint import text_encoder_tensors, unet_tensors, vae_tensors

    path = source.path
    unet, vae, encoders = build_empty_modules(configs)
    slots = TEXT_ENCODER_PREFIXES[family]
    if len(encoders) != len(slots):
        raise ModelFormatError(f"{path}: {family} needs {len(slots)} text encoder config(s), got {len(encoders)}")

    def get(key: str) -> Any:
        if key not in source:
            raise ModelFormatError(
                f"{path}: missing tensor {key!r} (file incomplete, or a non-standard {family} layout: "
                "pass config=<diffusers folder>)"
            )
        return source.get(key)

    _assign(unet, unet_tensors(unet, get), "UNet", path, dtype)
    _assign(vae, vae_tensors(vae, get), "VAE", path, dtype)
    for module, (prefix, openclip) in zip(encoders, slots, strict=True):
        _assign(module, text_encoder_tensors(module, prefix, openclip, get), "text encoder", path, dtype)
    return unet, vae, encoders


def _tokenizers(family: str, tokenizer: Any, folder: Path | None) -> list[Any]:
    from .family import get_family
    from .tokenizer import EOS_TOKEN, OPENCLIP_PAD_TOKEN, bundled_clip_tokenizer, load_clip_tokenizer

    slots = TEXT_ENCODER_PREFIXES[family]
    names = [te.tokenizer_component for te in get_family(family).text_encoders]
    user = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer] * len(slots)
    out = []
    for index, (_prefix, openclip) in enumerate(slots):
        pad = OPENCLIP_PAD_TOKEN if openclip else EOS_TOKEN
        given = user[index] if index < len(user) else None
        if given is not None and not isinstance(given, (str, os.PathLike)):
            out.append(given)  # an already-built tokenizer object
        elif given is not None:
            out.append(load_clip_tokenizer(given))
        elif folder is not None and (folder / names[index]).is_dir():
            out.append(load_clip_tokenizer(folder / names[index]))
        else:
            out.append(bundled_clip_tokenizer(pad_token=pad))
    return out


def _noise_scheduler(scheduler_config: dict[str, Any], prediction_type: str) -> Any:
    from diffusers import DDPMScheduler

    from .tiny import noise_scheduler_config

    base = noise_scheduler_config(prediction_type)
    # a timestep_spacing the config only holds as DDPMScheduler's default (diffusers lists it in
    # ``_use_default_values``, which sdcore.config keeps) stays a default: passed explicitly, DDPM's "leading"
    # would bind every sampler made from it (diffusers' from_config gives Euler its own "linspace" otherwise),
    # so an SD1 file sdcore saved would sample Euler a on A1111's "DDIM" schedule instead of its "Uniform"
    # (the other keys' defaults are the same for every scheduler class, or sdcore always passes them)
    defaulted = {"timestep_spacing"} & set(scheduler_config.get("_use_default_values") or ())
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset", "timestep_spacing",
                "rescale_betas_zero_snr", "trained_betas"):  # fmt: skip
        if key in scheduler_config and key not in defaulted:
            base[key] = scheduler_config[key]
    base["prediction_type"] = prediction_type
    return DDPMScheduler(**base)


def override_prediction_type(bundle: ModelBundle, prediction_type: str | None) -> ModelBundle:
    """Make ``bundle`` train and save as ``prediction_type`` (``epsilon``/``v_prediction``; None or ``auto``
    keeps what it was loaded as): its ``prediction_type`` and its noise scheduler's, the rest of the schedule
    (betas, zero-terminal SNR) as it was. This is what a loader's ``prediction_type=`` gives a file that does
    not declare it, for a bundle already in memory (kohya's ``--v_parameterization`` on a loaded model).

    Only the DDPM families have the choice; a flow-matching family's bundle raises
    :class:`~sdcore.errors.ConfigError` (its objective is not epsilon or v).
    """
    from ..errors import ConfigError
    from .detect import _normalise_prediction

    if prediction_type in (None, "auto"):
        return bundle
    chosen = _normalise_prediction(str(prediction_type))
    if chosen is None:
        raise ConfigError(f"unknown prediction type {prediction_type!r} (use auto, epsilon or v_prediction)")
    if bundle.family_spec.objective != "ddpm":
        raise ConfigError(
            f"--prediction-type {prediction_type}: {bundle.family} trains with flow matching, not epsilon or "
            "v-prediction (use auto)"
        )
    if bundle.prediction_type != chosen or bundle.noise_scheduler.config.prediction_type != chosen:
        bundle.prediction_type = chosen
        bundle.noise_scheduler = _noise_scheduler(dict(bundle.noise_scheduler.config), chosen)
    return bundle


def _finish(bundle: ModelBundle, device: Any) -> ModelBundle:
    if device is not None:
        bundle.to(device=device)
    return bundle


# ----------------------------------------------------------------------------------------------- readers


def single_file_configs(source: Any, found: Detection, config: Any = None) -> dict[str, Any]:
    """The component configs of a single file (a :class:`~.source.CheckpointSource`), from its header only.

    ``config`` (a diffusers folder or a dict) wins; then our ``sdcore.config`` metadata entry; then
    the family's shipped configs, replaced by configs inferred from the tensor shapes when they differ.
    """
    if config is not None:
        return copy.deepcopy(config) if isinstance(config, dict) else configs_from_diffusers_folder(config)
    if CONFIG_METADATA_KEY in source.metadata:
        try:
            stored: dict[str, Any] = json.loads(source.metadata[CONFIG_METADATA_KEY])
        except json.JSONDecodeError:
            raise ModelFormatError(f"{source.path}: metadata {CONFIG_METADATA_KEY!r} is not valid JSON") from None
        return stored
    from .infer import infer_configs, same_structure

    configs = bundled_config(found.family, found.prediction_type)
    if found.inpainting:
        configs["unet"]["in_channels"] = 9
    try:
        inferred = infer_configs(source.keys, source.shape, found.family)
    except ModelFormatError as exc:  # "VAE has no encoder blocks": say which file
        raise ModelFormatError(f"{source.path}: {exc}") from None
    if not same_structure(configs, inferred):  # a distilled/pruned variant: sizes from the file
        inferred["scheduler"] = configs["scheduler"]
        configs = inferred
    return configs


def read_single_file(
    path: str | os.PathLike[str],
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    dtype: Any = None,
    device: Any = None,
    tokenizer: Any = None,
    config: Any = None,
    use_ema: bool = False,
    **family_options: Any,
) -> ModelBundle:
    """Read a single-file checkpoint (``.safetensors``, ``.ckpt``, ``.pt``) of any family.

    The family comes from the keys (each family's adapter's ``detect_single_file``); the UNet
    families' ldm/SGM layouts are read here, other families' files by their adapter's
    ``load_single_file`` (with the same options, plus ``family_options``: the family's parts in separate
    files or folders, kohya's names, e.g. ``clip_l``/``clip_g``/``t5xxl``/``vae`` for SD3, ``clip_l``/``t5xxl``/
    ``ae`` for Flux, and ``t5_tokenizer``, as kohya/ComfyUI users keep them).
    """
    import torch

    from .family import family_adapter
    from .sd_unet import SdUnetAdapter
    from .source import CheckpointSource

    file = Path(path)
    source = CheckpointSource(file, use_ema=use_ema)
    try:
        found_family = detect_family(source.keys, file)
        if family is not None and family != found_family:
            raise ModelFormatError(f"{file}: is a {found_family} checkpoint, not {family}")
        adapter = family_adapter(found_family)
        if not isinstance(adapter, SdUnetAdapter):
            source.close()
            return adapter.load_single_file(
                file, prediction_type=prediction_type, dtype=dtype, device=device, tokenizer=tokenizer,
                config=config, use_ema=use_ema, **family_options,
            )  # fmt: skip
        vae_part = family_options.pop("vae", None)  # the UNet families' one separate part (kohya's --vae)
        if family_options:
            raise SdcoreError(f"{file}: option(s) {', '.join(sorted(family_options))} do not apply to {found_family}")
        found: Detection = detect(
            source.keys, source.shape, source.metadata, path=file, markers=source.markers,
            extras=source.extras, prediction_type=prediction_type,
        )  # fmt: skip
        configs = single_file_configs(source, found, config)
        target = None if dtype == "auto" else (resolve_dtype(dtype) or torch.float32)
        unet, vae, encoders = _modules_from_source(source, found.family, configs, target)
        folder = Path(config) if isinstance(config, (str, os.PathLike)) else None
        bundle = ModelBundle(
            family=found.family,
            prediction_type=found.prediction_type,
            unet=unet,
            vae=vae,
            text_encoders=encoders,
            tokenizers=_tokenizers(found.family, tokenizer, folder),
            noise_scheduler=_noise_scheduler(
                {
                    **(configs.get("scheduler") or {}),
                    **({"rescale_betas_zero_snr": True} if "ztsnr" in source.markers else {}),
                },
                found.prediction_type,
            ),
            source=str(file),
            source_format="single-file",
            metadata=dict(source.metadata),
            inpainting=found.inpainting,
        )
    finally:
        source.close()
    if vae_part is not None:
        from .parts import load_vae_like

        bundle.vae = load_vae_like(vae_part, bundle.vae, dtype=target if target is not None else "auto")
    return _finish(bundle, device)


def _other_family_folder(index: dict[str, Any]) -> tuple[str, Any] | None:
    """A non-UNet family whose adapter claims this ``model_index.json`` (optional adapter methods
    ``detect_diffusers(index) -> bool`` and ``load_diffusers(folder, **options)``)."""
    from .family import families, family_adapter

    for family in families():
        if family.denoiser == "unet":
            continue
        try:
            adapter = family_adapter(family)
        except SdcoreError:
            continue
        detect_folder = getattr(adapter, "detect_diffusers", None)
        if detect_folder is not None and detect_folder(index):
            return family.name, adapter
    return None


def require_unet_folder(folder: Path, index: dict[str, Any]) -> None:
    """A folder no family's adapter claims is read as a UNet (SD1/SD2/SDXL) folder; one without a UNet (a plugin
    family's transformer folder, which the core's writer makes from the declaration alone) is refused in one line
    naming what would read it, not with a missing ``unet/config.json``."""
    entry = index.get("unet")
    if entry and entry[0] is not None:
        return
    from .family import families, family_adapter

    cls = index.get("_class_name") or "?"
    writers = []
    for family in families():
        try:
            adapter = family_adapter(family)
        except SdcoreError:
            continue
        if family.denoiser != "unet" and getattr(adapter, "diffusers_pipeline", None) == cls:
            writers.append(family.name)
    why = (f"the {', '.join(writers)} family writes them but its adapter has no detect_diffusers/load_diffusers"
           if writers else "no installed model family reads them")  # fmt: skip
    raise ModelFormatError(f"{folder}: a diffusers folder of {cls} without a UNet; {why}")


def _folder_family(folder: Path, index: dict[str, Any], configs: dict[str, Any]) -> str:
    cls = index.get("_class_name", "")
    if "XL" in cls:
        te = index.get("text_encoder")
        return "sdxl" if te and te[0] is not None else "sdxl-refiner"
    if not configs["text_encoders"]:
        raise ModelFormatError(f"{folder}: diffusers folder without a text encoder")
    act = configs["text_encoders"][0].get("hidden_act", "quick_gelu")
    return "sd1" if act == "quick_gelu" else "sd2"


_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def stored_dtype(component: Path) -> Any:
    """The floating dtype a diffusers component folder stores its weights in (from the first
    ``.safetensors`` header, no weights read); ``None`` when it cannot tell."""
    import torch

    from .source import read_safetensors_header

    for file in sorted(component.glob("*.safetensors")):
        try:
            header, _ = read_safetensors_header(file)
        except (ModelFormatError, OSError):
            return None
        for name, entry in header.items():
            if name != "__metadata__" and entry.get("dtype") in _ST_DTYPES:
                return getattr(torch, _ST_DTYPES[entry["dtype"]])
    return None


@contextlib.contextmanager
def quiet_transformers_loading() -> Iterator[None]:
    """transformers 5's ``from_pretrained`` draws a "Loading weights" bar on stderr for every text encoder, in
    a command that has its own output (``sdcore generate -m toyworld:`` printed it before the image's line),
    and diffusers' draws "Loading checkpoint shards" for a model saved in several files (FLUX.1's and
    Chroma's transformers); saving draws transformers' "Writing model shards" (``write_diffusers`` runs its
    ``save_pretrained`` calls in here too). Both libraries' bars are off inside and as they were after;
    ``SDCORE_VERBOSE=1`` keeps them (as :func:`~sdcore.generate.flow_samplers.quiet_pipeline_import` keeps
    transformers' warnings)."""
    import huggingface_hub.utils
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if os.environ.get("SDCORE_VERBOSE"):
        yield
        return
    transformers_on = transformers_logging.is_progress_bar_enabled()
    diffusers_on = diffusers_logging.is_progress_bar_enabled()
    hub_disabled = huggingface_hub.utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # turns the Hub's bars off too
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if transformers_on:
            transformers_logging.enable_progress_bar()
            if hub_disabled:
                huggingface_hub.utils.disable_progress_bars()
        if diffusers_on:
            diffusers_logging.enable_progress_bar()


def read_diffusers(
    path: str | os.PathLike[str],
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    dtype: Any = None,
    device: Any = None,
    tokenizer: Any = None,
    config: Any = None,
    use_ema: bool = False,
    **family_options: Any,
) -> ModelBundle:
    """Read a diffusers folder with the components' ``from_pretrained`` (local files only)."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .family import get_family

    folder = Path(path)
    index = _read_json(folder / "model_index.json")
    other = _other_family_folder(index)
    if other is not None:  # a family whose adapter reads its own diffusers folders
        name, adapter = other
        if family is not None and family != name:
            raise ModelFormatError(f"{folder}: is a {name} model, not {family}")
        return adapter.load_diffusers(  # type: ignore[no-any-return]
            folder, prediction_type=prediction_type, dtype=dtype, device=device, tokenizer=tokenizer,
            config=config, use_ema=use_ema, **family_options,
        )  # fmt: skip
    require_unet_folder(folder, index)
    vae_part = family_options.pop("vae", None)  # the UNet families' one separate part (kohya's --vae)
    if family_options:
        raise SdcoreError(f"{folder}: option(s) {', '.join(sorted(family_options))} do not apply to this model")
    configs = configs_from_diffusers_folder(folder)
    found = _folder_family(folder, index, configs)
    if family is not None and family != found:
        raise ModelFormatError(f"{folder}: is a {found} model, not {family}")

    def target(component: str) -> Any:  # "auto": each component as stored (model info on an fp16 folder)
        if dtype == "auto":
            return stored_dtype(folder / component) or torch.float32
        return resolve_dtype(dtype) or torch.float32

    def kwargs(component: str) -> dict[str, Any]:
        return {"local_files_only": True, "torch_dtype": target(component)}

    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kwargs("unet"))
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kwargs("vae"))
        encoders = []
        with quiet_transformers_loading():
            for name in [te.component for te in get_family(found).text_encoders]:
                cls = getattr(transformers, index[name][1])
                encoders.append(cls.from_pretrained(folder / name, local_files_only=True, dtype=target(name)))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFormatError(f"{folder}: cannot read diffusers folder ({first})") from None
    for module in [unet, vae, *encoders]:
        module.eval()
    sched = configs.get("scheduler") or {}
    prediction = prediction_type or sched.get("prediction_type") or "epsilon"
    prediction = "v_prediction" if prediction in ("v", "v_prediction") else "epsilon"
    bundle = ModelBundle(
        family=found,
        prediction_type=prediction,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=_tokenizers(found, tokenizer, folder),
        noise_scheduler=_noise_scheduler(sched, prediction),
        source=str(folder),
        source_format="diffusers",
        inpainting=unet.config.in_channels == 9,
    )
    if vae_part is not None:
        from .parts import load_vae_like

        bundle.vae = load_vae_like(vae_part, vae, dtype="auto" if dtype == "auto" else target("vae"))
    return _finish(bundle, device)


def tiny_family(name: str) -> tuple[str, dict[str, Any]]:
    """``flux`` -> (``flux``, {}); ``flux-schnell`` -> (``flux``, {"variant": "schnell"}) when
    ``flux-schnell`` is no family of its own (``sdxl-refiner`` is one): names of tiny models, in any case."""
    from .family import family_names

    known = family_names()
    name = name.strip().lower()  # --family SDXL, tiny:SD3: family names are lower case
    if name in known or "-" not in name:
        return name, {}
    base, _, variant = name.rpartition("-")
    return (base, {"variant": variant}) if base in known else (name, {})


def tiny_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """The family and ``create_tiny`` options of a ``tiny:`` source: ``tiny:<family>[:<variant>]``
    (``tiny:sd3:sd3.5-medium``) or ``tiny:<family>-<variant>`` (``tiny:flux-schnell``, ``tiny:sd1-inpainting``).
    The loader and the layout reader both read the name here, so they agree on what it builds."""
    family = spec.split(":", 1)[1] if ":" in spec else spec
    family, _sep, variant = family.partition(":")
    name, options = tiny_family(family)
    if variant:
        options["variant"] = variant
    return name, options


def read_tiny(
    spec: str, *, prediction_type: str | None = None, dtype: Any = None, device: Any = None, **_: Any
) -> ModelBundle:
    from .family import family_adapter

    try:
        name, options = tiny_spec(spec)
        if prediction_type is not None:
            options["prediction_type"] = prediction_type
        bundle = family_adapter(name).create_tiny(**options)
    except (ValueError, SdcoreError) as exc:
        raise SdcoreError(f"{spec}: {exc}") from None
    if dtype is not None and dtype != "auto":  # "auto" (model info): as created
        bundle.to(dtype=resolve_dtype(dtype))
    return _finish(bundle, device)


TOYWORLD_PREFIX = "toyworld:"


def toyworld_model_dir() -> Path:
    """The toy world's base model shipped inside sdcore (a diffusers folder; see ``sdcore.testing.toyworld``)."""
    return Path(str(resources.files("sdcore.models").joinpath("toyworld_base")))


def read_toyworld(spec: str, **options: Any) -> ModelBundle:
    """``toyworld:``: the toy world's base model, read from its diffusers folder inside sdcore."""
    if spec.rstrip() != TOYWORLD_PREFIX:
        raise SdcoreError(f"{spec}: write the toy world's base model as plain {TOYWORLD_PREFIX!r}")
    folder = toyworld_model_dir()
    if not (folder / "model_index.json").is_file():
        raise ModelFormatError(
            f"{TOYWORLD_PREFIX} the base model is missing from {folder}; "
            "rebuild it with `python -m sdcore.testing.toyworld build`"
        )
    bundle = read_diffusers(folder, **options)
    bundle.source, bundle.source_format = TOYWORLD_PREFIX, "toyworld"
    return bundle


def cached_hub_folder(repo_id: str) -> Path:
    """The local snapshot folder of a Hub id already in the cache (never downloads)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        raise SdcoreError(f"{repo_id}: not a file or folder, and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise missing_model_error(repo_id) from None


def read_hub(repo_id: str, **options: Any) -> ModelBundle:
    """A Hub id already in the local cache (``snapshot_download(local_files_only=True)``)."""
    bundle = read_diffusers(cached_hub_folder(repo_id), **options)
    bundle.source, bundle.source_format = repo_id, "hub"
    return bundle


# ----------------------------------------------------------------------------------------------- sniffers


def sniff_tiny(path: str) -> bool:
    return str(path).startswith("tiny:")


def sniff_toyworld(path: str) -> bool:
    return str(path).startswith(TOYWORLD_PREFIX)


def sniff_diffusers(path: str) -> bool:
    return (Path(path) / "model_index.json").is_file()


def sniff_single_file(path: str) -> bool:
    return Path(path).is_file()


#: suffixes of model files: they make a name a file path, never a Hub id (``models/v1-5.safetensors``), and
#: are the files ``--model NAME`` looks for in the model folders (:mod:`sdcore.generate.model_paths`)
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def looks_like_path(text: str) -> bool:
    """Whether ``text`` is meant as a file or folder path rather than a Hub id ``owner/name``."""
    return (
        text.lower().endswith(MODEL_FILE_SUFFIXES)
        or text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") != 1
        or not all(text.split("/"))
    )


def sniff_hub(path: str) -> bool:
    text = str(path)
    return not looks_like_path(text) and not Path(text).exists()


def missing_model_error(text: str) -> ModelFormatError:
    """The one message for a model that is not there, whatever command asked (train, generate, model)."""
    if not looks_like_path(text):
        return ModelFormatError(
            f"{text}: not a local file or folder, and not in the Hugging Face cache (sdcore never downloads: "
            f"fetch it first with `hf download {text}`, or give the path of a model file or folder)"
        )
    path = Path(text).expanduser()
    parent = path.parent
    if not parent.is_dir():
        return ModelFormatError(f"{path}: no such model file or folder (the folder {parent} does not exist either)")
    nearby = sorted(
        p.name
        for p in parent.iterdir()
        if p.suffix.lower() in MODEL_FILE_SUFFIXES or (p / "model_index.json").is_file()
    )
    hint = f"; models in {parent}: {', '.join(nearby[:8])}" + (" ..." if len(nearby) > 8 else "") if nearby else ""
    return ModelFormatError(f"{path}: no such model file or folder{hint}")


def load_model(
    path_or_hub_id: str | os.PathLike[str],
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    dtype: Any = None,
    device: Any = None,
    tokenizer: Any = None,
    config: Any = None,
    use_ema: bool = False,
    pm: Any = None,
    **family_options: Any,
) -> ModelBundle:
    """Load a Stable Diffusion model from a folder, a single file, ``tiny:<family>``, ``toyworld:`` or a cached Hub id.

    ``pm`` (a plugin manager) lets formats registered by plugins claim the path first; the
    built-in formats below are registered through the same hook and answer otherwise.

    ``family`` checks the detected family; ``prediction_type`` overrides detection (``epsilon`` or
    ``v_prediction``); ``dtype`` (``fp32``/``fp16``/``bf16`` or torch dtype, default fp32) and
    ``device`` apply to every module (``"auto"`` keeps a single file's stored dtypes); ``tokenizer`` is a tokenizer folder (or a list, one per text
    encoder) that wins over the model's own and the bundled one; ``config`` is a diffusers folder
    (or a dict in the ``sdcore.config`` shape) giving the layout of a non-standard single file;
    ``use_ema`` reads the ``model_ema.*`` UNet weights of a training checkpoint. ``family_options`` go to
    a transformer family's reader: its parts in separate files or folders (kohya's names; SD3 ``clip_l=``,
    ``clip_g=``, ``t5xxl=``, ``vae=``, see :mod:`sdcore.models.sd3.load`; Flux ``clip_l=``, ``t5xxl=``, ``ae=``,
    see :mod:`sdcore.models.flux.load`) and ``t5_tokenizer=``.
    """
    if family is not None:
        from .family import get_family

        get_family(family)  # an unknown name is a ConfigError listing the known families
    text = os.fspath(path_or_hub_id)
    options = dict(family=family, prediction_type=prediction_type, dtype=dtype, device=device,
                   tokenizer=tokenizer, config=config, use_ema=use_ema, **family_options)  # fmt: skip
    if pm is not None:
        bundle = _read_with_plugin_formats(pm, text, options)
        if bundle is not None:
            return bundle
    if sniff_tiny(text):
        return read_tiny(text, **options)
    if sniff_toyworld(text):
        return read_toyworld(text, **options)
    path = Path(text).expanduser()
    if path.is_dir():
        if sniff_diffusers(str(path)):
            return read_diffusers(path, **options)
        raise ModelFormatError(f"{path}: folder is not a diffusers model (no model_index.json)")
    if path.is_file():
        return read_single_file(path, **options)
    if sniff_hub(text):
        return read_hub(text, **options)
    raise missing_model_error(text)


def plugin_format_for(pm: Any, text: str) -> Any:
    """The first format registered by a plugin (not sdcore's own) whose sniffer claims ``text``, or ``None``:
    such a source is read by that plugin, never looked up as a model name (:mod:`sdcore.generate.model_paths`)."""
    from ..specs import resolve

    registrations = pm.registrations("model format")
    for spec in pm.model_formats():
        if registrations[spec.name].distribution != "sdcore" and resolve(spec.sniff)(text):
            return spec
    return None


def _read_with_plugin_formats(pm: Any, text: str, options: dict[str, Any]) -> ModelBundle | None:
    """Ask formats registered by plugins (not sdcore's own) whether they read ``text``."""
    from ..specs import resolve

    spec = plugin_format_for(pm, text)
    if spec is None:
        return None
    bundle = resolve(spec.reader)(text, **options)
    if not isinstance(bundle, ModelBundle):
        raise ModelFormatError(
            f"{text}: model format {spec.name!r} returned {type(bundle).__name__}, not a ModelBundle"
        )
    return bundle

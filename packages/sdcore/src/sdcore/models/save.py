"""Write a :class:`ModelBundle` as a single ldm/SGM ``.safetensors`` file or a diffusers folder.

Single files use the key names A1111, ComfyUI, Forge and diffusers' ``from_single_file`` read
(``text_model.`` kept, OpenCLIP packing, VAE attention as 1x1 convs), carry Stability's modelspec
metadata plus the ``v_pred`` marker for v-prediction models, and store the exact diffusers
configs under ``sdcore.config`` so a non-standard layout (our tiny models) reads back exactly.
Diffusers folders keep the ``text_model.`` level in the text encoders' weights, so transformers
4.x and 5.x both load them.
Every write is atomic: a file through :mod:`sdcore.io`, a folder built beside the target and
renamed into place.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import SdcoreError
from ..io import apply_default_modes, atomic_path, output_problems
from .bundle import ModelBundle
from .detect import CONFIG_METADATA_KEY
from .source import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES

SAI_SPEC_VERSION = "1.0.1"
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
LDM_IMPLEMENTATION = "https://github.com/Stability-AI/stablediffusion"


def modelspec_architecture(bundle: ModelBundle) -> str:
    if bundle.family == "sd1":
        return "stable-diffusion-v1-inpainting" if bundle.inpainting else "stable-diffusion-v1"
    if bundle.family == "sd2":
        if bundle.inpainting:
            return "stable-diffusion-v2-inpainting"
        return "stable-diffusion-v2-768-v" if bundle.is_v_prediction else "stable-diffusion-v2-512"
    if bundle.family == "sdxl":  # OneTrainer's SDXL inpainting model spec says "...-base-inpainting"
        return "stable-diffusion-xl-v1-base-inpainting" if bundle.inpainting else "stable-diffusion-xl-v1-base"
    return "stable-diffusion-xl-v1-refiner"


def _json_config(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_json_string"):  # transformers config
        return json.loads(config.to_json_string())
    return json.loads(json.dumps(dict(config), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _drop_defaulted_spacing(path: Path, config: Any) -> None:
    """Leave ``timestep_spacing`` out of a written scheduler config when the scheduler only has it as its class's
    default (diffusers' ``_use_default_values``, which ``save_pretrained`` does not write): SD1.5's own config
    names no spacing, so diffusers gives each sampler its class's default (Euler: ``linspace``, A1111's
    "Uniform"); DDPM's ``leading`` written out would put Euler a on A1111's "DDIM" schedule after a reload."""
    if "timestep_spacing" not in (config.get("_use_default_values") or ()):
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("timestep_spacing", None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def sdcore_config(bundle: ModelBundle) -> dict[str, Any]:
    """Everything needed to rebuild the modules of ``bundle`` (the ``sdcore.config`` metadata entry)."""
    encoders = []
    for module in bundle.text_encoders:
        entry = _json_config(module.config)
        entry["_class_name"] = type(module).__name__
        encoders.append(entry)
    return {
        "family": bundle.family,
        "prediction_type": bundle.prediction_type,
        "inpainting": bundle.inpainting,
        "unet": _json_config(bundle.unet.config),
        "vae": _json_config(bundle.vae.config),
        "text_encoders": encoders,
        "scheduler": _json_config(bundle.noise_scheduler.config),
    }


def build_metadata(bundle: ModelBundle, path: Path, extra: dict[str, str] | None, dtype_name: str) -> dict[str, str]:
    size = int(bundle.unet.config.sample_size) * bundle.vae_scale_factor
    meta = {
        "modelspec.sai_model_spec": SAI_SPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(bundle),
        "modelspec.implementation": SGM_IMPLEMENTATION if bundle.is_sdxl else LDM_IMPLEMENTATION,
        "modelspec.title": path.stem,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": "v" if bundle.is_v_prediction else "epsilon",
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "modelspec.unet_dtype": dtype_name,
        "modelspec.vae_dtype": dtype_name,
        CONFIG_METADATA_KEY: json.dumps(sdcore_config(bundle), sort_keys=True),
    }
    for key, value in (bundle.metadata or {}).items():  # keep what the source said (title, author, ...)
        if key.startswith("modelspec.") and key not in ("modelspec.date", "modelspec.hash_sha256"):
            meta.setdefault(key, value)
            if key in ("modelspec.title", "modelspec.author", "modelspec.description", "modelspec.license"):
                meta[key] = value
    for key, value in (extra or {}).items():
        meta[str(key)] = str(value)
    return meta


#: a module's forward/backward hook tables: a host copy for writing leaves them behind (a hook held as a bound
#: method or ``functools.partial`` would be deep-copied with its owner, maybe onto the device)
_RUN_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def host_copy(module: Any, dtype: Any = None) -> Any:
    """A copy of ``module`` whose tensors are on the CPU, cast as ``module.to(dtype)`` would cast them,
    for writing it; ``module`` is left as it was (same parameter objects, same config).

    Why not ``copy.deepcopy(module).to(dtype)``: on a GPU that first copies every tensor on the device (a
    FLUX.1 transformer in fp32 is 47 GB more device memory) before casting. Here the module's structure
    (classes, configs, a quantised layer's class switch) is deep-copied with its tensors replaced by
    ``meta`` tensors, the copy's ``.to(dtype)`` decides each tensor's dtype by the module's own rules
    (floats only; a quantised base layer keeps its fp32 block maxima), and then each tensor is cast on
    its own device, moved to the CPU and put in place, one at a time: the extra device memory is one cast
    tensor, the host holds the converted tensors. Values equal the old path's (the same cast, on the
    same device). A CPU tensor that needs no cast is shared, not copied. Tied tensors stay tied.
    """
    import torch

    memo: dict[int, Any] = {}
    for sub in module.modules():
        for name in _RUN_HOOKS:
            hooks = sub.__dict__.get(name)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
        for tensor in (*sub._parameters.values(), *sub._buffers.values()):
            if tensor is None or id(tensor) in memo:
                continue
            empty = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = (
                torch.nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else empty
            )
    shell = copy.deepcopy(module, memo)
    del memo
    if dtype is not None:  # nn.Module's own: diffusers' ``to`` warns about fp32 modules on every dtype cast
        torch.nn.Module.to(shell, dtype)
    done: dict[int, Any] = {}
    pairs = zip(module.named_modules(remove_duplicate=False), shell.named_modules(remove_duplicate=False), strict=True)
    for (name, source), (copied_name, target) in pairs:
        if name != copied_name:  # deepcopy keeps the order; a mismatch would write wrong tensors
            raise SdcoreError(f"could not copy {type(module).__name__} for writing ({name!r} vs {copied_name!r})")
        for slot in ("_parameters", "_buffers"):
            mine, theirs = getattr(target, slot), getattr(source, slot)
            for key, placeholder in mine.items():
                if placeholder is None:
                    continue
                original = theirs[key]
                value = done.get(id(original))
                if value is None:
                    with torch.no_grad():
                        tensor = original.detach()
                        if tensor.dtype != placeholder.dtype:
                            tensor = tensor.to(placeholder.dtype)  # on its device, as module.to(dtype) casts
                        tensor = tensor.to("cpu")
                    is_param = isinstance(placeholder, torch.nn.Parameter)
                    value = torch.nn.Parameter(tensor, original.requires_grad) if is_param else tensor
                    done[id(original)] = value
                mine[key] = value
    return shell


def host_bundle(bundle: ModelBundle, dtype: Any = None) -> ModelBundle:
    """``bundle`` with every module replaced by its :func:`host_copy` (cast to ``dtype``), for the
    single-file writers: their key conversions (fused q/k/v, OpenCLIP packing) then make their new
    tensors in host memory, never a second copy of a trained model on the device. Casting before the
    conversion gives the values the old order (convert, then cast) gave: the conversions only move,
    concatenate and reshape elements."""
    from dataclasses import replace

    def copied(module: Any) -> Any:
        return None if module is None else host_copy(module, dtype)

    return replace(
        bundle,
        unet=copied(bundle.unet),
        transformer=copied(bundle.transformer),
        vae=copied(bundle.vae),
        text_encoders=[copied(module) for module in bundle.text_encoders],
    )


def _dtype_name(dtype: Any) -> str:
    from ..dtypes import short_name

    return short_name(dtype)


def write_single_file(
    bundle: ModelBundle,
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    prune: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``bundle`` as one ldm/SGM ``.safetensors`` file (EMA-free; ``prune`` has nothing more to drop)."""
    import torch
    from safetensors.torch import save_file

    from .convert.checkpoint import modules_to_ldm
    from .load import resolve_dtype

    target = Path(path)
    if target.suffix.lower() not in (".safetensors", ".sft"):
        raise SdcoreError(f"{target}: single files are written as .safetensors (pickle .ckpt is unsafe to share)")
    want = resolve_dtype(dtype)
    host = host_bundle(bundle, want)
    state = modules_to_ldm(host.family, host.unet, host.vae, host.text_encoders)
    del host
    seen: set[int] = set()
    out: dict[str, Any] = {}
    for key, value in state.items():
        value = value.detach().to("cpu")
        if want is not None and value.is_floating_point():
            value = value.to(want)
        value = value.contiguous()
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen and value.numel():  # safetensors refuses tensors that share memory
            value = value.clone()
        seen.add(pointer)
        out[key] = value
    if bundle.is_v_prediction:  # markers A1111 >= 1.10 / ComfyUI / Forge read
        out["v_pred"] = torch.tensor([])
    if getattr(bundle.noise_scheduler.config, "rescale_betas_zero_snr", False):
        out["ztsnr"] = torch.tensor([])
    first = next(iter(bundle.unet.parameters()))
    meta = build_metadata(bundle, target, metadata, _dtype_name(want or first.dtype))
    meta["modelspec.hash_sha256"] = _HASH_PLACEHOLDER
    with atomic_path(target) as tmp:
        save_file(out, str(tmp), metadata=meta)
        _fill_data_hash(tmp)
    return target


_HASH_PLACEHOLDER = "0x" + "0" * 64


def _fill_data_hash(path: Path) -> None:
    """Write modelspec ``hash_sha256`` (sha256 of the tensor data) into the header in place.

    The hash covers only the bytes after the header, so a same-length placeholder written with the
    file can be overwritten afterwards without moving any data.
    """
    from .hashes import autov3_hash, safetensors_data_offset

    digest = "0x" + autov3_hash(path)
    start = safetensors_data_offset(path)
    with open(path, "r+b") as handle:
        header = handle.read(start)
        needle = b'"modelspec.hash_sha256":"' + _HASH_PLACEHOLDER.encode()
        position = header.find(needle)
        if position < 0 or header.find(needle, position + 1) >= 0:
            raise SdcoreError(f"{path}: could not place modelspec.hash_sha256 in the header")
        handle.seek(position + len(needle) - len(_HASH_PLACEHOLDER))
        handle.write(digest.encode())


def tokenizer_class(tokenizer: Any) -> str:
    """The tokenizer class name diffusers' loader resolves (transformers 5 merged the slow and fast classes)."""
    name = type(tokenizer).__name__
    return {"T5Tokenizer": "T5TokenizerFast", "CLIPTokenizerFast": "CLIPTokenizer"}.get(name, name)


def _family_model_index(bundle: ModelBundle, index: dict[str, Any]) -> dict[str, Any]:
    """``model_index.json`` of a non-UNet family, from its declaration: the denoiser, the VAE and one
    text encoder/tokenizer entry per ``TextEncoderSpec`` (``[None, None]`` for a part the bundle lacks,
    e.g. a transformer-only Flux file); the pipeline class is the adapter's ``diffusers_pipeline``."""
    from .family import family_adapter

    spec = bundle.family_spec
    adapter = family_adapter(spec)
    named = getattr(adapter, "diffusers_pipeline_of", None)  # a release's own pipeline (FLUX.1 Kontext)
    pipeline = named(bundle) if named is not None else getattr(adapter, "diffusers_pipeline", None)
    if pipeline is None:
        raise SdcoreError(f"family {spec.name!r}: its adapter names no diffusers pipeline (diffusers_pipeline)")
    none: list[str | None] = [None, None]
    index.update(_class_name=pipeline, image_encoder=none, feature_extractor=none)
    index[spec.denoiser] = ["diffusers", type(bundle.denoiser).__name__]
    index["vae"] = ["diffusers", type(bundle.vae).__name__] if bundle.vae is not None else none
    index["scheduler"] = ["diffusers", type(bundle.noise_scheduler).__name__]
    for i, encoder in enumerate(spec.text_encoders):
        module = bundle.text_encoders[i] if i < len(bundle.text_encoders) else None
        tokenizer = bundle.tokenizers[i] if i < len(bundle.tokenizers) else None
        index[encoder.component] = ["transformers", type(module).__name__] if module is not None else none
        index[encoder.tokenizer_component] = ["transformers", tokenizer_class(tokenizer)] if tokenizer else none
    return index


def _model_index(bundle: ModelBundle) -> dict[str, Any]:
    import diffusers

    index: dict[str, Any] = {"_diffusers_version": diffusers.__version__}
    if bundle.family_spec.denoiser != "unet":
        return _family_model_index(bundle, index)
    none: list[str | None] = [None, None]
    unet = ["diffusers", "UNet2DConditionModel"]
    vae = ["diffusers", "AutoencoderKL"]
    scheduler = ["diffusers", type(bundle.noise_scheduler).__name__]
    tok = ["transformers", "CLIPTokenizer"]
    te: list[list[str | None]] = [["transformers", type(m).__name__] for m in bundle.text_encoders]
    if bundle.family in ("sd1", "sd2"):
        cls = "StableDiffusionInpaintPipeline" if bundle.inpainting else "StableDiffusionPipeline"
        index.update(_class_name=cls, unet=unet, vae=vae, scheduler=scheduler, text_encoder=te[0], tokenizer=tok,
                     safety_checker=none, feature_extractor=none, image_encoder=none, requires_safety_checker=False)  # fmt: skip
    elif bundle.family == "sdxl":
        cls = "StableDiffusionXLInpaintPipeline" if bundle.inpainting else "StableDiffusionXLPipeline"
        index.update(_class_name=cls, unet=unet, vae=vae, scheduler=scheduler, text_encoder=te[0], tokenizer=tok,
                     text_encoder_2=te[1], tokenizer_2=tok, image_encoder=none, feature_extractor=none,
                     force_zeros_for_empty_prompt=True)  # fmt: skip
    else:
        index.update(_class_name="StableDiffusionXLImg2ImgPipeline", unet=unet, vae=vae, scheduler=scheduler,
                     text_encoder=none, tokenizer=none, text_encoder_2=te[0], tokenizer_2=tok, image_encoder=none,
                     feature_extractor=none, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)  # fmt: skip
    return index


TEXT_MODEL_PREFIX = "text_model."


def _text_model_key(key: str) -> str:
    """A CLIP text-encoder key as transformers 4.x names it (``text_projection.*`` stays top level)."""
    if key.startswith(TEXT_MODEL_PREFIX) or key.startswith("text_projection."):
        return key
    return TEXT_MODEL_PREFIX + key


def prefix_text_model_keys(folder: Path) -> None:
    """Rewrite a saved CLIP text encoder's weights with the ``text_model.`` level transformers 4.x needs.

    transformers 5's ``CLIPTextModel`` has no ``text_model`` module and saves its weights without
    the prefix; transformers 4.x (what kohya and most UIs pin) then finds none of its keys and
    silently starts from random weights. Both versions load the prefixed names.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    renamed: dict[str, str] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
            metadata = handle.metadata()
        if all(_text_model_key(key) == key for key in keys):
            continue
        tensors = {_text_model_key(key): value for key, value in load_file(str(file)).items()}
        renamed.update({key: _text_model_key(key) for key in keys})
        with atomic_path(file) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    index = folder / "model.safetensors.index.json"
    if renamed and index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {renamed.get(k, k): v for k, v in data.get("weight_map", {}).items()}
        index.write_text(json.dumps(data, indent=2), encoding="utf-8")


def check_diffusers_target(target: Path) -> None:
    """Refuse a diffusers output path that holds something other than a diffusers model (see
    :func:`write_diffusers`): an empty folder or an earlier model folder (``model_index.json``) may be replaced."""
    if not target.exists():
        return
    if not target.is_dir():
        raise SdcoreError(f"{target}: a file is there; a diffusers model is a folder (give a new folder name)")
    if (target / "model_index.json").is_file() or not any(target.iterdir()):
        return
    raise SdcoreError(
        f"{target}: the folder exists and is not a diffusers model (no model_index.json); not replacing it "
        "(give a new or empty folder)"
    )


def diffusers_target_problems(target: Path, sources: Sequence[str], option: str = "-o") -> list[str]:
    """What keeps a diffusers model from being written to ``target``, found before the model is read (a command's
    check, one line each): a folder that is not an earlier diffusers model (:func:`check_diffusers_target`), and
    one that holds a file or folder of ``sources`` (the model and its parts): the folder is replaced whole, so the
    source inside would be deleted with it. ``option``: how the command names its output (``-o``, ``DST``)."""
    problems = []
    try:
        check_diffusers_target(target)
    except SdcoreError as exc:
        problems.append(str(exc))
    folder = target.expanduser().resolve()
    for source in sources:
        path = Path(source).expanduser()
        if path.exists() and folder in path.resolve().parents:
            problems.append(
                f"{option} {target} holds the input {source}: replacing the folder would delete it; choose another "
                f"{option}"
            )
    return problems


def model_output_problems(
    target: Path, sources: Sequence[str], *, overwrite: bool, format: str, option: str = "-o"
) -> list[str]:
    """sdcore's rule for every written file (:func:`sdcore.io.output_problems`) for a model saved at ``target`` in
    ``format`` (:func:`save_format`), one line per problem, before any model is read (``model convert``,
    ``create-tiny``, ``lora merge --model``): never one of ``sources``, an earlier model replaced only with
    ``--overwrite``. A diffusers ``target`` also meets :func:`diffusers_target_problems`; there only an earlier model
    folder needs ``--overwrite`` (an empty folder holds nothing to lose, and a file, a folder of other things or
    one holding a source is refused whatever ``--overwrite`` says, so that advice would be wrong)."""
    if format != "diffusers":
        return output_problems([target], inputs=sources, overwrite=overwrite, option=option)
    refused = diffusers_target_problems(target, sources, option)
    earlier_model = target.is_dir() and (target / "model_index.json").is_file() and not refused
    replace_ok = overwrite or not earlier_model
    return [*output_problems([target], inputs=sources, overwrite=replace_ok, option=option, folder_ok=True), *refused]


#: swaps a folder move tries while other writers keep putting their folders at the same place
MOVE_ATTEMPTS = 20


def move_folder_into_place(folder: Path, target: Path) -> None:
    """Rename the finished ``folder`` to ``target``, replacing the folder there (moved aside under a name of
    this call's own, then deleted). Several writers of one target at once (the processes of a run each saving
    the same result) race between these renames: a rename that finds another writer's folder newly in place,
    or no folder left to move aside, tries again, so each writer ends with a whole folder at ``target`` (the
    last one's) and none reports a failure. ``target`` is never a partly written folder: only finished
    folders are renamed there."""
    import errno
    import uuid

    for _ in range(MOVE_ATTEMPTS):
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                os.replace(target, old)
            except FileNotFoundError:  # another writer moved it aside first
                continue
        try:
            os.replace(folder, target)
        except OSError as exc:  # another writer's folder arrived between the two renames
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(errno.EBUSY, f"other writers kept replacing it ({MOVE_ATTEMPTS} attempts)")


def write_diffusers(
    bundle: ModelBundle,
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    prune: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``bundle`` as a diffusers folder (safetensors weights, configs, scheduler, tokenizers).

    The folder is built beside ``path`` and renamed into place, replacing an earlier diffusers model there
    (a later save of the same training output). Anything else at ``path`` is refused, not replaced: a file, or
    a folder with other content (``sdcore model convert model.safetensors ~/models`` must not delete the
    user's models; diffusers' ``save_pretrained`` and kohya write into a folder and never delete it).
    """
    from .load import quiet_transformers_loading, resolve_dtype

    target = Path(path)
    check_diffusers_target(target)
    want = resolve_dtype(dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        components = bundle.components()
        for name, module in components.items():
            first = next(iter(module.parameters()))
            out = host_copy(module, want) if want is not None and first.dtype != want else module
            with quiet_transformers_loading():  # no "Writing model shards" bar in a command's output
                out.save_pretrained(tmp / name, safe_serialization=True)
            if name.startswith("text_encoder") and type(module).__name__.startswith("CLIP"):  # not T5
                prefix_text_model_keys(tmp / name)
        token_names = [te.tokenizer_component for te in bundle.family_spec.text_encoders]
        for name, tokenizer in zip(token_names, bundle.tokenizers, strict=False):
            if tokenizer is not None:  # a Flux T5 with no tokenizer found (model info of a real file)
                tokenizer.save_pretrained(str(tmp / name))
        bundle.noise_scheduler.save_pretrained(tmp / "scheduler")
        _drop_defaulted_spacing(tmp / "scheduler" / "scheduler_config.json", bundle.noise_scheduler.config)
        (tmp / "model_index.json").write_text(json.dumps(_model_index(bundle), indent=2), encoding="utf-8")
        if metadata:
            (tmp / "sdcore_metadata.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        apply_default_modes(tmp)  # mkdtemp made it 0700, save_pretrained writes 0600 files
        move_folder_into_place(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SdcoreError(f"could not write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_format(path: str | os.PathLike[str], format: str | None = None) -> str:
    """The format a model saved at ``path`` gets: ``format``, else ``single-file`` for a ``.safetensors``/``.sft``
    name and ``diffusers`` for any other. A ``.ckpt``/``.pt`` name with no ``format`` is an error, not a diffusers
    folder of that name: the user wanted the one file A1111 loads, and sdcore writes single files as safetensors."""
    if format is not None:
        return format
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "single-file"
    if suffix in PICKLE_SUFFIXES:
        raise SdcoreError(
            f"{target}: single files are written as .safetensors (pickle {suffix} is unsafe to share; A1111, "
            f"ComfyUI and Forge load .safetensors): use {target.with_suffix('.safetensors')}, or a name without "
            "that suffix for a diffusers folder"
        )
    return "diffusers"


def save_bundle(
    bundle: ModelBundle,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    dtype: Any = None,
    prune: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save ``bundle``; ``format`` is ``single-file`` or ``diffusers`` (default: from the path's suffix).

    The UNet families are written here; another family's bundle by its adapter's optional
    ``save(bundle, path, format=..., dtype=..., prune=..., metadata=...)``.
    """
    from .family import family_adapter
    from .sd_unet import SdUnetAdapter

    target = Path(path)
    format = save_format(target, format)
    adapter = family_adapter(bundle.family)
    if not isinstance(adapter, SdUnetAdapter):
        save = getattr(adapter, "save", None)
        if save is None:
            raise SdcoreError(f"saving {bundle.family} models is not supported")
        return save(bundle, target, format=format, dtype=dtype, prune=prune, metadata=metadata)  # type: ignore[no-any-return]
    if format == "single-file":
        return write_single_file(bundle, target, dtype=dtype, prune=prune, metadata=metadata)
    if format == "diffusers":
        return write_diffusers(bundle, target, dtype=dtype, prune=prune, metadata=metadata)
    raise SdcoreError(f"unknown model format {format!r}; use single-file or diffusers")

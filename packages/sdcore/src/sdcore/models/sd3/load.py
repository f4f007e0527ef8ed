"""Read SD3/SD3.5 models offline: diffusers folders, SAI/ComfyUI single files, separate text encoders.

Single files come in the layouts users have: the whole model (SAI's ``sd3_medium_incl_clips_t5xxlfp16``,
ComfyUI checkpoint saves), the same without text encoders (``sd3.5_large.safetensors``), or the denoiser
alone (bare ``joint_blocks.*``, ComfyUI's ``models/diffusion_models``, or diffusers' own names). What the file lacks comes from
separate files or folders, named as kohya sd-scripts and ComfyUI users know them: ``clip_l``, ``clip_g``, ``t5xxl``
(``t5xxl_fp16.safetensors``...), ``vae``. A separate file wins over the one inside the checkpoint.

Configs: our own writer stores the exact diffusers configs in the ``sdcore.config`` metadata entry;
anything else gets configs inferred from tensor shapes (every size is in a shape; SAI's MMDiT
convention of one 64-wide head per block gives the head count when there is no QK norm to read it from).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from ...errors import ModelFormatError, SdcoreError
from ..bundle import ModelBundle
from ..detect import CONFIG_METADATA_KEY
from ..load import config_fields, empty_module
from . import SD3
from .convert import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    T5_PREFIX,
    VAE_PREFIX,
    is_diffusers_mmdit,
    mmdit_from_sai,
    sai_view,
    shape_from_config,
    shape_from_keys,
    strip_prefix,
)
from .detect import is_sd3_file

FAMILY = "sd3"
Shape = Callable[[str], tuple[int, ...]]

#: the options naming separate parts (kohya sd-scripts' SD3 names), and the CLI flags users pass them with
PART_OPTIONS = ("clip_l", "clip_g", "t5xxl", "vae", "t5_tokenizer")
_ENCODER_FLAGS = {"clip_l": "--clip-l", "clip_g": "--clip-g", "t5xxl": "--t5xxl"}
#: options every reader gets from load_model that mean nothing for SD3 files
_GENERIC_OPTIONS = ("prediction_type", "use_ema", "family", "pm")


def make_bundle(
    transformer: Any, vae: Any, text_encoders: list[Any], tokenizers: list[Any], scheduler: Any, **fields: Any
) -> ModelBundle:
    """The one place an SD3 :class:`ModelBundle` is put together (text encoders: CLIP-L, CLIP-G, T5)."""
    return ModelBundle(
        family=FAMILY,
        prediction_type="flow-matching",  # the spelling every flow family uses (flux.load.FLOW_PREDICTION)
        unet=None,
        transformer=transformer,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=scheduler,
        **fields,
    )


def flow_scheduler(config: dict[str, Any] | None = None) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .tiny import flow_scheduler_config

    settings = {**flow_scheduler_config(), **{k: v for k, v in (config or {}).items() if not k.startswith("_")}}
    return FlowMatchEulerDiscreteScheduler.from_config(settings)


# ----------------------------------------------------------------------------------------------- configs


def infer_transformer_config(keys: Collection[str], shape: Shape) -> dict[str, Any]:
    """``SD3Transformer2DModel`` config from SAI keys (with or without ``model.diffusion_model.``)."""
    prefix, _ = strip_prefix(keys)
    mmdit = shape_from_keys(keys)
    embed = shape(prefix + "x_embedder.proj.weight")  # (inner, in_channels, patch, patch)
    inner, patch = embed[0], embed[2]
    if mmdit.qk_norm:
        head_dim = shape(prefix + "joint_blocks.0.x_block.attn.ln_q.weight")[0]
    elif inner % mmdit.num_layers == 0:
        head_dim = inner // mmdit.num_layers  # SAI's MMDiT: hidden = 64 * depth, heads = depth
    else:
        raise ModelFormatError("cannot tell the SD3 head count from the file (pass config=<diffusers folder>)")
    positions = shape(prefix + "pos_embed")[1]
    side = math.isqrt(positions)
    context = shape(prefix + "context_embedder.weight")
    return {
        "sample_size": min(128, side * patch // 2),
        "patch_size": patch,
        "in_channels": embed[1],
        "out_channels": shape(prefix + "final_layer.linear.weight")[0] // (patch * patch),
        "num_layers": mmdit.num_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": context[1],
        "caption_projection_dim": context[0],
        "pooled_projection_dim": shape(prefix + "y_embedder.mlp.0.weight")[1],
        "pos_embed_max_size": side,
        "dual_attention_layers": list(mmdit.dual_attention_layers),
        "qk_norm": "rms_norm" if mmdit.qk_norm else None,
    }


def infer_vae_config(keys: Collection[str], shape: Shape, prefix: str = VAE_PREFIX) -> dict[str, Any]:
    """SD3's ``AutoencoderKL`` config from ldm VAE keys under ``prefix``."""
    from ..infer import infer_vae

    renamed = {VAE_PREFIX + k[len(prefix) :] for k in keys if k.startswith(prefix)}
    config = infer_vae(renamed, lambda k: shape(prefix + k[len(VAE_PREFIX) :]), "sdxl")
    config.update(
        sample_size=1024,
        scaling_factor=SD3.latent.scaling_factor,  # the family's latent format (every SD3/SD3.5 VAE)
        shift_factor=SD3.latent.shift_factor,
        use_quant_conv=VAE_PREFIX + "quant_conv.weight" in renamed,
        use_post_quant_conv=VAE_PREFIX + "post_quant_conv.weight" in renamed,
    )
    return config


def infer_clip_config(keys: Collection[str], shape: Shape, prefix: str, kind: str) -> dict[str, Any]:
    """CLIP-L (OpenAI, quick_gelu) or CLIP-G (OpenCLIP bigG in HF layout, gelu) config from HF keys."""
    from ..infer import infer_text_encoder

    config = infer_text_encoder(keys, shape, prefix, False, "sdxl")
    config["_class_name"] = "CLIPTextModelWithProjection"
    projection = prefix + "text_projection.weight"
    if projection in keys:
        config["projection_dim"] = shape(projection)[0]
    if kind == "clip-g":
        config.update(hidden_act="gelu", pad_token_id=0)
    return config


# ----------------------------------------------------------------------------------------------- modules


def empty_transformer(config: dict[str, Any]) -> Any:
    from diffusers import SD3Transformer2DModel

    return empty_module(lambda: SD3Transformer2DModel.from_config(config_fields(config)))


def empty_vae(config: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKL

    return empty_module(lambda: AutoencoderKL.from_config(config_fields(config)))


def empty_text_encoder(config: dict[str, Any]) -> Any:
    import transformers

    cls_name = config.get("_class_name") or (config.get("architectures") or ["CLIPTextModelWithProjection"])[0]
    if cls_name == "T5EncoderModel":
        from ..t5 import empty_t5

        return empty_t5(config)
    if cls_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        cls = transformers.CLIPTextModelWithProjection  # SD3 reads both CLIPs' projected pooled output
        return empty_module(lambda: cls(transformers.CLIPTextConfig(**config_fields(config))))
    raise ModelFormatError(f"unsupported SD3 text encoder class {cls_name!r}")


def _clip_tensors(module: Any, prefix: str, get: Callable[[str], Any], keys: Collection[str]) -> dict[str, Any]:
    """A CLIP's weights from HF-layout keys under ``prefix``; SD3's CLIP-L has no projection in SAI files
    (its pooled output is used unprojected), so a missing one is the identity, as diffusers loads it."""
    import torch

    from ..convert.clip import clip_key_map, has_text_model_level

    wanted = [k for k in module.state_dict() if not k.endswith("position_ids")]
    out: dict[str, Any] = {}
    for key, file_key in clip_key_map(wanted, prefix, has_text_model_level(module)).items():
        if file_key not in keys and key == "text_projection.weight":
            out[key] = torch.eye(module.config.hidden_size, module.config.projection_dim).T.contiguous()
        else:
            out[key] = get(file_key)
    return out


# ----------------------------------------------------------------------------------------------- readers


def scaled_fp8_getter(source: Any) -> Callable[[str], Any]:
    """``source.get`` that undoes ComfyUI's scaled fp8 (``sd3.5_large_fp8_scaled``): a float8 ``W / s``
    stored with ``<name>.scale_weight`` = ``s`` reads back as ``W8.float() * s`` (float32)."""
    import torch

    def get(key: str) -> Any:
        value = source.get(key)
        scale_key = key[: -len("weight")] + "scale_weight" if key.endswith(".weight") else None
        if scale_key is not None and scale_key in source.keys:
            return value.to(torch.float32) * source.get(scale_key).to(torch.float32)
        return value

    return get


def _find_prefix(keys: Collection[str], ending: str) -> str | None:
    for key in keys:
        if key.endswith(ending):
            return key[: -len(ending)]
    return None


def _encoder_from_path(path: str | os.PathLike[str], kind: str, dtype: Any) -> Any:
    """One text encoder from a separate file (any prefix, Hugging Face layout) or a transformers folder."""
    import transformers

    from ..load import _assign
    from ..source import CheckpointSource
    from ..t5 import load_t5_encoder

    if kind == "t5-xxl":
        return load_t5_encoder(path, dtype=dtype)
    where = Path(path).expanduser()
    if where.is_dir():
        config_file = where / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        if config.get("model_type") not in ("clip_text_model", "clip"):
            raise ModelFormatError(f"{where}: not a CLIP text encoder folder (model_type {config.get('model_type')!r})")
        from ..load import quiet_transformers_loading

        try:
            with quiet_transformers_loading():  # no "Loading weights" bar in a command's output
                module = transformers.CLIPTextModelWithProjection.from_pretrained(
                    where, local_files_only=True, dtype=dtype
                )
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{where}: cannot read {kind} folder ({str(exc).splitlines()[0]})") from None
        return module.eval()
    if not where.is_file():
        raise ModelFormatError(f"{where}: no such {kind} file or folder")
    source = CheckpointSource(where)
    try:
        prefix = _find_prefix(source.keys, "text_model.final_layer_norm.weight")
        if prefix is None:
            raise ModelFormatError(
                f"{where}: not a CLIP text encoder in Hugging Face layout (no text_model.final_layer_norm.weight)"
            )
        module = empty_text_encoder(infer_clip_config(source.keys, source.shape, prefix, kind))
        _assign(module, _clip_tensors(module, prefix, source.get, source.keys), kind, where, dtype)
    finally:
        source.close()
    return module


def _file_configs(source: Any, config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    if config is not None:
        if not (Path(config) / "model_index.json").is_file():
            raise ModelFormatError(f"{config}: config= must be an SD3 diffusers folder (with model_index.json)")
        return folder_configs(Path(config))
    if CONFIG_METADATA_KEY in source.metadata:
        try:
            stored: dict[str, Any] = json.loads(source.metadata[CONFIG_METADATA_KEY])
        except json.JSONDecodeError:
            raise ModelFormatError(f"{source.path}: metadata {CONFIG_METADATA_KEY!r} is not valid JSON") from None
        if stored.get("family") == FAMILY:
            return stored
    return {}


def folder_configs(folder: Path) -> dict[str, Any]:
    """The component configs of an SD3 diffusers folder, in the ``sdcore.config`` shape."""
    from ..load import _read_json

    index = _read_json(folder / "model_index.json")
    out: dict[str, Any] = {"family": FAMILY, "text_encoders": []}
    out["transformer"] = _read_json(folder / "transformer" / "config.json")
    out["vae"] = _read_json(folder / "vae" / "config.json")
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        entry = index.get(name)
        if entry and entry[0] is not None:
            te = _read_json(folder / name / "config.json")
            te["_class_name"] = entry[1]
            out["text_encoders"].append(te)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    out["scheduler"] = _read_json(scheduler) if scheduler.exists() else {}
    return out


#: the text encoders of an SD3 file: option name, kind, key prefix inside a full checkpoint
ENCODER_SLOTS = (
    ("clip_l", "clip-l", CLIP_L_PREFIX),
    ("clip_g", "clip-g", CLIP_G_PREFIX),
    ("t5xxl", "t5-xxl", T5_PREFIX),
)


def component_configs(source: Any, config: Any = None) -> dict[str, Any]:
    """Every component config an SD3 file (a :class:`~..source.CheckpointSource`) holds, from its header:
    ``config=`` first, then our ``sdcore.config`` entry, then tensor shapes. ``vae`` and each of the three
    ``text_encoders`` is ``None`` when the file does not have it (it comes as a separate part)."""
    from ..t5 import t5_config_from_shapes

    keys = source.keys
    stored = _file_configs(source, config)
    transformer = stored.get("transformer")
    has_vae = any(k.startswith(VAE_PREFIX) for k in keys)
    try:  # sizes from shapes: a tensor they are read from may be missing from a cut-down file
        if not transformer and is_diffusers_mmdit(keys):
            transformer = infer_transformer_config(*sai_view(keys, source.shape))
        transformer = dict(transformer or infer_transformer_config(keys, source.shape))
        vae = (stored.get("vae") or infer_vae_config(keys, source.shape)) if has_vae else None
    except KeyError as exc:
        raise ModelFormatError(f"{source.path}: tensor {exc} missing from the file") from None
    except ModelFormatError as exc:
        raise ModelFormatError(f"{source.path}: {exc}") from None
    transformer["_class_name"] = "SD3Transformer2DModel"
    kept = list(stored.get("text_encoders") or [])
    encoders: list[dict[str, Any] | None] = []
    for index, (_name, kind, prefix) in enumerate(ENCODER_SLOTS):
        if not any(k.startswith(prefix) for k in keys):
            encoders.append(None)
        elif len(kept) == len(ENCODER_SLOTS):
            encoders.append(kept[index])
        elif kind == "t5-xxl":
            encoders.append({**t5_config_from_shapes(keys, source.shape, prefix), "_class_name": "T5EncoderModel"})
        else:
            encoders.append(infer_clip_config(keys, source.shape, prefix, kind))
    return {"transformer": transformer, "vae": vae, "text_encoders": encoders,
            "scheduler": stored.get("scheduler") or {}}  # fmt: skip


def read_sd3_single_file(
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    device: Any = None,
    config: Any = None,
    clip_l: str | os.PathLike[str] | None = None,
    clip_g: str | os.PathLike[str] | None = None,
    t5xxl: str | os.PathLike[str] | None = None,
    vae: str | os.PathLike[str] | None = None,
    tokenizer: Any = None,
    t5_tokenizer: str | os.PathLike[str] | None = None,
    **others: Any,
) -> ModelBundle:
    """Read an SD3/SD3.5 single file; ``clip_l``/``clip_g``/``t5xxl``/``vae`` (files or folders) fill in, or
    replace, the parts the file has. ``tokenizer`` is a CLIP tokenizer folder (or a list, one per CLIP);
    ``t5_tokenizer`` a T5 tokenizer folder (default: a ``t5xxl`` folder's own, else :func:`~..t5.load_t5_tokenizer`)."""
    import torch

    from ..load import _assign, resolve_dtype
    from ..source import CheckpointSource

    file = Path(path)
    unknown = sorted(k for k, v in others.items() if k not in _GENERIC_OPTIONS and v is not None)
    if unknown:
        raise SdcoreError(
            f"{file}: option(s) {', '.join(unknown)} do not apply to SD3 files (parts: {', '.join(PART_OPTIONS)})"
        )
    source = CheckpointSource(file)
    try:
        keys = source.keys
        if not is_sd3_file(keys):
            raise ModelFormatError(f"{file}: not an SD3/SD3.5 checkpoint (no joint_blocks)")
        target = None if dtype == "auto" else (resolve_dtype(dtype) or torch.float32)
        configs = component_configs(source, config)
        prefix = strip_prefix(keys)[0]
        tconfig = configs["transformer"]
        transformer = empty_transformer(tconfig)
        get = scaled_fp8_getter(source)
        if is_diffusers_mmdit(keys):  # diffusers' own names: the file's tensors as they are
            tensors = {key: get(key) for key in transformer.state_dict()}
        else:
            tensors = mmdit_from_sai(shape_from_config(tconfig), get, prefix)
        _assign(transformer, tensors, "transformer", file, target)

        if vae is not None:
            vae_module = _vae_from_path(vae, target)
            channels = int(vae_module.config.latent_channels)
            if channels != SD3.latent.channels:
                raise ModelFormatError(
                    f"{vae}: a VAE with {channels} latent channels (SD1/SDXL's have 4); SD3 needs its "
                    f"{SD3.latent.channels}-channel VAE"
                )
        elif configs["vae"] is not None:
            vae_module = _vae_from_source(source, configs["vae"], target)
        else:
            raise ModelFormatError(f"{file}: the file has no VAE (first_stage_model.*): pass --vae <file or folder>")

        given = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl}
        encoders: list[Any] = []
        missing: list[str] = []
        for (name, kind, file_prefix), te_config in zip(ENCODER_SLOTS, configs["text_encoders"], strict=True):
            separate = given[name]
            if separate is not None:
                encoders.append(_encoder_from_path(separate, kind, target))
            elif te_config is None:
                missing.append(_ENCODER_FLAGS[name])
            elif kind == "t5-xxl":
                encoders.append(_embedded_t5(source, file, te_config, target))
            else:
                module = empty_text_encoder(te_config)
                _assign(module, _clip_tensors(module, file_prefix, source.get, keys), kind, file, target)
                encoders.append(module)
        if missing:
            raise ModelFormatError(
                f"{file}: the file has no {', '.join(m[2:] for m in missing)} text encoder(s): "
                f"pass {' '.join(m + ' <file or folder>' for m in missing)}"
            )
        metadata = dict(source.metadata)
    finally:
        source.close()
    bundle = make_bundle(
        transformer, vae_module, encoders, _tokenizers(tokenizer, t5_tokenizer, t5xxl, encoders[2]), flow_scheduler(configs.get("scheduler")),
        source=str(file), source_format="single-file", metadata=metadata,
    )  # fmt: skip
    if device is not None:
        bundle.to(device=device)
    return bundle


def _vae_from_source(source: Any, config: dict[str, Any], target: Any, prefix: str = VAE_PREFIX) -> Any:
    """VAE weights from ldm keys under ``prefix`` (1x1-conv attention is reshaped by ``_assign``)."""
    from ..convert.vae import vae_key_map
    from ..load import _assign

    module = empty_vae(config)
    tensors = {}
    for key, file_key in vae_key_map(list(module.state_dict()), len(module.config.block_out_channels)).items():
        tensors[key] = source.get(prefix + file_key[len(VAE_PREFIX) :])
    _assign(module, tensors, "VAE", source.path, target)
    return module


def _vae_from_path(path: str | os.PathLike[str], target: Any) -> Any:
    """A separate VAE: a diffusers ``vae`` folder, or a file in ldm layout (with or without ``first_stage_model.``)."""
    from diffusers import AutoencoderKL

    from ..source import CheckpointSource

    where = Path(path).expanduser()
    if where.is_dir():
        try:
            return AutoencoderKL.from_pretrained(where, local_files_only=True, torch_dtype=target).eval()
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{where}: cannot read VAE folder ({str(exc).splitlines()[0]})") from None
    if not where.is_file():
        raise ModelFormatError(f"{where}: no such VAE file or folder")
    source = CheckpointSource(where)
    try:
        prefix = _find_prefix(source.keys, "encoder.conv_in.weight")
        if prefix is None:
            raise ModelFormatError(f"{where}: not a VAE in ldm layout (no encoder.conv_in.weight)")
        if prefix + "encoder.down_blocks.0.resnets.0.conv1.weight" in source.keys:
            raise ModelFormatError(
                f"{where}: a VAE in diffusers layout: pass its folder (with config.json) as --vae instead"
            )
        return _vae_from_source(source, infer_vae_config(source.keys, source.shape, prefix), target, prefix)
    finally:
        source.close()


def _embedded_t5(source: Any, file: Path, config: dict[str, Any] | None, target: Any) -> Any:
    """The T5 encoder stored under ``text_encoders.t5xxl.transformer.`` in ``source``."""
    from ..t5 import assign_t5, empty_t5, t5_config_from_shapes, t5_tensors

    model = empty_t5(config or t5_config_from_shapes(source.keys, source.shape, T5_PREFIX))
    return assign_t5(model, t5_tensors(source.keys, source.get, T5_PREFIX, dtype=target), file, target)


def _tokenizers(tokenizer: Any, t5_tokenizer: Any, t5_path: Any, t5: Any) -> list[Any]:
    """CLIP-L's and CLIP-G's (bundled BPE unless given; CLIP-G pads with ``!`` as OpenCLIP) and T5's."""
    from ..t5 import load_t5_tokenizer
    from ..tokenizer import EOS_TOKEN, OPENCLIP_PAD_TOKEN, bundled_clip_tokenizer, load_clip_tokenizer

    given = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer, tokenizer]
    out: list[Any] = []
    for index, pad in enumerate((EOS_TOKEN, OPENCLIP_PAD_TOKEN)):
        choice = given[index] if index < len(given) else None
        if choice is None:
            out.append(bundled_clip_tokenizer(pad_token=pad))
        elif isinstance(choice, (str, os.PathLike)):
            out.append(load_clip_tokenizer(choice))
        else:
            out.append(choice)
    if t5_tokenizer is None and t5_path is not None and Path(t5_path).is_dir():
        folder = Path(t5_path)
        if (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file():
            t5_tokenizer = folder
    out.append(load_t5_tokenizer(t5_tokenizer, vocab_size=int(t5.config.vocab_size)))
    return out


def read_sd3_diffusers(
    path: str | os.PathLike[str], *, dtype: Any = None, device: Any = None, tokenizer: Any = None, **options: Any
) -> ModelBundle:
    """An SD3 diffusers folder (``StableDiffusion3Pipeline`` layout), each component's ``from_pretrained``.

    The separate-part options (``clip_l=``, ``t5xxl=``, ...) are for single files: a folder has its parts."""
    parts = sorted(name for name in options if name in PART_OPTIONS)
    if parts:
        raise SdcoreError(f"{path}: option(s) {', '.join(parts)} apply to single files only")
    import torch
    import transformers
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from ..load import _read_json, quiet_transformers_loading, resolve_dtype, stored_dtype

    folder = Path(path)
    index = _read_json(folder / "model_index.json")

    def target(component: str) -> Any:
        if dtype == "auto":
            return stored_dtype(folder / component) or torch.float32
        return resolve_dtype(dtype) or torch.float32

    with quiet_transformers_loading():  # no library progress bars in a command's output
        try:
            transformer = SD3Transformer2DModel.from_pretrained(
                folder, subfolder="transformer", local_files_only=True, torch_dtype=target("transformer")
            )
            vae = AutoencoderKL.from_pretrained(
                folder, subfolder="vae", local_files_only=True, torch_dtype=target("vae")
            )
            encoders = []
            tokenizers = []
            for name, tok in (
                ("text_encoder", "tokenizer"),
                ("text_encoder_2", "tokenizer_2"),
                ("text_encoder_3", "tokenizer_3"),
            ):
                entry = index.get(name)
                if not entry or entry[0] is None:
                    raise ModelFormatError(
                        f"{folder}: SD3 folder without {name} (sdcore needs all three text encoders)"
                    )
                cls = getattr(transformers, entry[1])
                encoders.append(cls.from_pretrained(folder / name, local_files_only=True, dtype=target(name)).eval())
                tok_cls = getattr(transformers, index[tok][1])
                tokenizers.append(tok_cls.from_pretrained(folder / tok, local_files_only=True))
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFormatError(f"{folder}: cannot read SD3 diffusers folder ({first})") from None
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    bundle = make_bundle(
        transformer.eval(), vae.eval(), encoders, tokenizers,
        flow_scheduler(_read_json(scheduler_file) if scheduler_file.is_file() else None),
        source=str(folder), source_format="diffusers",
    )  # fmt: skip
    if device is not None:
        bundle.to(device=device)
    return bundle


#: where a model folder given as a part keeps it
_PART_SUBFOLDERS = {"clip_l": ("text_encoder",), "clip_g": ("text_encoder_2",), "t5xxl": ("text_encoder_3",),
                    "vae": ("vae",)}  # fmt: skip


def part_config(name: str, path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The config of an SD3 part given separately (``clip_l``, ``clip_g``, ``t5xxl``, ``vae``) from its folder's
    ``config.json`` or its file's header, by the rules the readers above use; ``None`` when it cannot be read
    (the pre-flight's part check says why)."""
    from ..parts import part_folder_config, part_header
    from ..t5 import find_t5_prefix, t5_config_from_shapes

    where = Path(path).expanduser()
    classes = {"clip_l": "CLIPTextModelWithProjection", "clip_g": "CLIPTextModelWithProjection",
               "t5xxl": "T5EncoderModel"}  # fmt: skip
    try:
        if where.is_dir():
            config = part_folder_config(where, _PART_SUBFOLDERS[name])
            return None if config is None else {**config, **({"_class_name": classes[name]} if name in classes else {})}
        keys, shape = part_header(where)
        if name == "vae":
            prefix = _find_prefix(keys, "encoder.conv_in.weight")
            return None if prefix is None else infer_vae_config(keys, shape, prefix)
        if name == "t5xxl":
            found = find_t5_prefix(keys)
            return (
                None if found is None else {**t5_config_from_shapes(keys, shape, found), "_class_name": classes[name]}
            )
        prefix = _find_prefix(keys, "text_model.final_layer_norm.weight")
        return None if prefix is None else infer_clip_config(keys, shape, prefix, name.replace("_", "-"))
    except (SdcoreError, OSError, KeyError, ValueError):
        return None


def sd3_file_configs(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str], float]:
    """(configs in the ``sdcore.config`` shape, parts the file lacks, stored bytes per weight) of an SD3
    single file, from its header only: what :func:`~sdcore.models.layout.read_layout` needs."""
    from ..source import CheckpointSource, read_safetensors_header

    file = Path(path)
    source = CheckpointSource(file)
    try:
        if not is_sd3_file(source.keys):
            raise ModelFormatError(f"{file}: not an SD3/SD3.5 checkpoint (no joint_blocks)")
        configs = component_configs(source)
        fmt = source.format
    finally:
        source.close()
    missing = ["vae"] if configs["vae"] is None else []
    missing += [name for (name, _, _), te in zip(ENCODER_SLOTS, configs["text_encoders"], strict=True) if te is None]
    per_weight = 4.0
    if fmt == "safetensors":
        header = read_safetensors_header(file)[0]
        elements = used = 0
        for name, info in header.items():
            if name != "__metadata__" and not name.startswith((VAE_PREFIX, "text_encoders.")):  # the MMDiT
                count = math.prod(int(d) for d in info["shape"])
                elements += count
                used += int(info["data_offsets"][1]) - int(info["data_offsets"][0])
        per_weight = used / elements if elements else 4.0
    return configs, missing, per_weight

"""Read Flux.1 models offline: diffusers folders and the single files users have.

Layouts of a single file:

- BFL's release (``flux1-dev.safetensors``): the transformer only, BFL keys, no prefix;
- ComfyUI/Forge checkpoints: the transformer under ``model.diffusion_model.``, optionally the VAE
  under ``vae.`` (ldm keys), CLIP-L under ``text_encoders.clip_l.transformer.`` and T5-XXL under
  ``text_encoders.t5xxl.transformer.``;
- our own writer's files (one of the two above plus an ``sdcore.config`` metadata entry).

Parts a file lacks come from separate files or folders the user names, with the names kohya's
``flux_train_network.py`` and ComfyUI/Forge users know: ``clip_l=`` (``clip_l.safetensors``: HF
CLIP keys, or a folder), ``t5xxl=`` (``t5xxl_fp16.safetensors`` or a folder, see
:mod:`sdcore.models.t5`) and ``ae=`` (BFL's ``ae.safetensors`` in the ldm VAE layout, a diffusers
VAE file or folder). A part given separately wins over the one inside the checkpoint. A model
without some part still loads (``sdcore model info`` on a transformer-only file); using a missing
part raises an error naming the option that supplies it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from ...errors import ModelFormatError, SdcoreError
from ..bundle import ModelBundle
from ..load import config_fields, empty_module
from .convert import CHROMA_PROBE, COMFY_PREFIX, GUIDANCE_PROBE, PROBE, bfl_to_diffusers, transformer_config_from_bfl

VAE_PREFIX = "vae."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_PREFIXES = (CLIP_L_PREFIX, "", "cond_stage_model.transformer.", "text_encoder.")
_CLIP_PROBE = "text_model.final_layer_norm.weight"
_VAE_LDM_PROBE = "encoder.down.0.block.0.conv1.weight"
_VAE_DIFFUSERS_PROBE = "encoder.down_blocks.0.resnets.0.conv1.weight"
CONFIG_METADATA_KEY = "sdcore.config"
#: ``bundle.prediction_type`` of flow-matching models: the denoiser predicts the velocity noise - x0
FLOW_PREDICTION = "flow-matching"
#: which option supplies each part, for messages
PART_OPTIONS = {"text_encoder": "clip_l", "text_encoder_2": "t5xxl", "vae": "ae"}

Shape = Callable[[str], tuple[int, ...]]


# ----------------------------------------------------------------------------------------------- detection


def transformer_prefix(keys: Collection[str]) -> str | None:
    """Where a file keeps a Flux.1 transformer in BFL keys (``""`` or ComfyUI's prefix), or ``None``."""
    for prefix in ("", COMFY_PREFIX):
        if prefix + PROBE in keys:
            return prefix
    return None


#: tensors of later BFL-style models that also have ``double_blocks`` (Flux.2, Flux.3, Chroma): not Flux.1
NOT_FLUX1 = ("single_stream_modulation.lin.weight", "early_stream_modulations.image.lin.weight",
             "distilled_guidance_layer.in_proj.bias")  # fmt: skip


#: a diffusers-layout Flux transformer file (``transformer/diffusion_pytorch_model.safetensors`` saved alone)
DIFFUSERS_PROBES = ("x_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight",
                    "single_transformer_blocks.0.proj_mlp.weight")  # fmt: skip


def is_diffusers_transformer_file(keys: Collection[str]) -> bool:
    return all(key in keys for key in DIFFUSERS_PROBES)


def is_flux_file(keys: Collection[str]) -> bool:
    """A Flux.1 transformer in BFL keys (``double_blocks``), not one of the later models sharing them,
    or a diffusers-layout ``FluxTransformer2DModel`` file."""
    prefix = transformer_prefix(keys)
    if prefix is None:
        return is_diffusers_transformer_file(keys) and CHROMA_PROBE not in keys
    return not any(prefix + key in keys for key in NOT_FLUX1)


def _refuse_quantized(keys: Collection[str], file: Path) -> None:
    """bitsandbytes NF4/FP4 files (Forge's ``flux1-dev-bnb-nf4``) store packed 4-bit weights with
    ``absmax``/``quant_state`` tensors that no plain module takes: one clear line instead of a key error."""
    if any(key.endswith(".absmax") or ".quant_state." in key for key in keys):
        raise ModelFormatError(
            f"{file}: a bitsandbytes NF4/FP4 checkpoint, which sdcore does not read; use an fp16, bf16 or fp8 file"
        )


def diffusers_transformer_config(keys: Collection[str], shape: Shape) -> dict[str, Any]:
    """The config of a diffusers-layout Flux transformer file, read through the BFL shape rules."""
    from .convert import approximator_layers, diffusers_counts, key_plan

    num_double, num_single, guidance = diffusers_counts(keys)
    plan = key_plan(num_double, num_single, guidance, approximator_layers(keys))
    renamed = {group.bfl: group.diffusers[0] for group in plan if group.op == "same"}
    return transformer_config_from_bfl({g.bfl for g in plan}, lambda key: shape(renamed[key]))


def read_diffusers_transformer(
    keys: Collection[str], shape: Shape, get: Callable[[str], Any], path: Path, dtype: Any,
    config: dict[str, Any] | None = None,
) -> Any:  # fmt: skip
    module = empty_transformer(config or diffusers_transformer_config(keys, shape))
    tensors = {key: get(key) for key in keys}
    return _assign(module, tensors, "Flux transformer", path, dtype)


def variant_of(keys: Collection[str], prefix: str = "") -> str:
    """``dev`` when the guidance embedding is there (guidance-distilled dev), else ``schnell``."""
    return "dev" if prefix + GUIDANCE_PROBE in keys else "schnell"


def variant_of_transformer(transformer: Any) -> str:
    return "dev" if transformer.config.guidance_embeds else "schnell"


# ----------------------------------------------------------------------------------------------- empty modules


def empty_transformer(config: dict[str, Any]) -> Any:
    """A ``FluxTransformer2DModel``, or a ``ChromaTransformer2DModel`` for a config with Chroma's approximator."""
    import diffusers

    cls = diffusers.ChromaTransformer2DModel if "approximator_layers" in config else diffusers.FluxTransformer2DModel
    return empty_module(lambda: cls.from_config(config_fields(config)))


def empty_vae(config: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKL

    return empty_module(lambda: AutoencoderKL.from_config(config_fields(config)))


def empty_clip(config: dict[str, Any]) -> Any:
    import transformers

    return empty_module(lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**config_fields(config))))


# ----------------------------------------------------------------------------------------------- parts


def _assign(module: Any, tensors: dict[str, Any], name: str, path: Path, dtype: Any) -> Any:
    from ..load import _assign as assign

    assign(module, tensors, name, path, dtype)
    return module


def file_transformer_config(keys: Collection[str], shape: Shape, prefix: str | None, path: Path) -> dict[str, Any]:
    """The transformer config of a Flux/Chroma file from its shapes (BFL keys under ``prefix``, or diffusers'
    names when ``prefix`` is ``None``); a cut-down file's missing tensor is one line naming ``path``."""
    try:
        if prefix is None:
            return diffusers_transformer_config(keys, shape)
        return transformer_config_from_bfl(keys, shape, prefix)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{path}: {exc}") from None
    except KeyError as exc:
        raise ModelFormatError(f"{path}: Flux transformer tensor {exc} missing from the file") from None


def read_transformer(
    keys: Collection[str], shape: Shape, get: Callable[[str], Any], prefix: str, path: Path, dtype: Any,
    config: dict[str, Any] | None = None,
) -> Any:  # fmt: skip
    """The ``FluxTransformer2DModel`` of a BFL-layout file (config from shapes unless given)."""
    try:  # the converter's complaints (a tensor missing, blocks not numbered 0..n) say which file
        cfg = config or transformer_config_from_bfl(keys, shape, prefix)
        module = empty_transformer(cfg)
        tensors = bfl_to_diffusers(keys, get, prefix, inner_dim=module.inner_dim)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{path}: {exc}") from None
    except KeyError as exc:  # a tensor the shapes are read from
        raise ModelFormatError(f"{path}: Flux transformer tensor {exc} missing from the file") from None
    return _assign(module, tensors, "Flux transformer", path, dtype)


def vae_config_from_shapes(keys: Collection[str], shape: Shape, prefix: str) -> dict[str, Any]:
    """The Flux VAE config of an ldm-layout VAE under ``prefix`` (widths and depth from the shapes)."""
    from ..infer import V, infer_vae
    from .tiny import vae_config

    def rebased(key: str) -> tuple[int, ...]:
        return shape(prefix + key[len(V) :])

    moved = {V + k[len(prefix) :] for k in keys if k.startswith(prefix)}
    inferred = infer_vae(moved, rebased, "sdxl")
    base = vae_config(tiny=False)
    for field in ("block_out_channels", "layers_per_block", "norm_num_groups", "latent_channels", "in_channels",
                  "out_channels", "down_block_types", "up_block_types"):  # fmt: skip
        base[field] = inferred[field]
    if any(k.startswith(prefix + "quant_conv.") for k in keys):
        base["use_quant_conv"] = True
    if any(k.startswith(prefix + "post_quant_conv.") for k in keys):
        base["use_post_quant_conv"] = True
    return base


def read_vae_tensors(
    keys: Collection[str], shape: Shape, get: Callable[[str], Any], prefix: str, path: Path, dtype: Any,
    config: dict[str, Any] | None = None,
) -> Any:  # fmt: skip
    """An ``AutoencoderKL`` from ldm-layout (BFL ``ae.safetensors``, ComfyUI ``vae.``) or diffusers-layout keys."""
    from ..convert.vae import PREFIX as LDM_VAE_PREFIX
    from ..convert.vae import vae_key_map

    if prefix + _VAE_DIFFUSERS_PROBE in keys:
        if config is None:
            raise ModelFormatError(f"{path}: a diffusers-layout VAE file needs its config.json (give the VAE folder)")
        module = empty_vae(config)
        tensors = {k[len(prefix) :]: get(k) for k in keys if k.startswith(prefix)}
        return _assign(module, tensors, "VAE", path, dtype)
    if prefix + _VAE_LDM_PROBE not in keys:
        raise ModelFormatError(f"{path}: no VAE found (no {prefix}{_VAE_LDM_PROBE})")
    module = empty_vae(config or vae_config_from_shapes(keys, shape, prefix))
    state_keys = list(module.state_dict().keys())
    mapping = vae_key_map(state_keys, len(module.config.block_out_channels))
    tensors = {}
    for key, file_key in mapping.items():
        stored = prefix + file_key[len(LDM_VAE_PREFIX) :]
        if stored not in keys:
            raise ModelFormatError(f"{path}: VAE tensor {stored!r} missing")
        tensors[key] = get(stored)
    return _assign(module, tensors, "VAE", path, dtype)


def clip_prefix(keys: Collection[str]) -> str | None:
    for prefix in CLIP_PREFIXES:
        if prefix + _CLIP_PROBE in keys:
            return prefix
    return None


def read_clip_tensors(
    keys: Collection[str], shape: Shape, get: Callable[[str], Any], prefix: str, path: Path, dtype: Any,
    config: dict[str, Any] | None = None,
) -> Any:  # fmt: skip
    """A ``CLIPTextModel`` from HF CLIP keys (``text_model.``) under ``prefix``; ``text_projection`` ignored."""
    from ..convert.clip import clip_key_map, has_text_model_level
    from ..infer import infer_text_encoder

    cfg = config or infer_text_encoder(keys, shape, prefix, False, "sd1")
    module = empty_clip(cfg)
    wrapped = has_text_model_level(module)
    state_keys = [k for k in module.state_dict() if not k.endswith("position_ids")]
    tensors = {}
    for key, file_key in clip_key_map(state_keys, prefix, wrapped).items():
        if file_key not in keys:
            raise ModelFormatError(f"{path}: CLIP-L tensor {file_key!r} missing")
        tensors[key] = get(file_key)
    return _assign(module, tensors, "CLIP-L text encoder", path, dtype)


def _open(path: Path) -> Any:
    from ..source import CheckpointSource

    return CheckpointSource(path)


def _component_folder(path: Path, names: tuple[str, ...]) -> Path | None:
    for candidate in (path, *(path / n for n in names)):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def load_clip_l(path: str | os.PathLike[str], *, dtype: Any = None) -> Any:
    """CLIP-L from a file (``clip_l.safetensors``, any known prefix) or a transformers/diffusers folder."""
    file = Path(path).expanduser()
    target = _dtype(dtype)
    if file.is_dir():
        import transformers

        folder = _component_folder(file, ("text_encoder",))
        if folder is None:
            raise ModelFormatError(f"{file}: no CLIP text encoder folder here (config.json)")
        from ..load import quiet_transformers_loading

        try:
            with quiet_transformers_loading():  # no "Loading weights" bar in a command's output
                module = transformers.CLIPTextModel.from_pretrained(
                    str(folder), local_files_only=True, dtype=_folder_dtype(folder, target)
                )
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{folder}: cannot read CLIP text encoder ({exc})") from None
        return module.eval()
    source = _open(file)
    try:
        prefix = clip_prefix(source.keys)
        if prefix is None:
            raise ModelFormatError(f"{file}: no CLIP-L text encoder in this file (no ...{_CLIP_PROBE})")
        return read_clip_tensors(source.keys, source.shape, source.get, prefix, file, target)
    finally:
        source.close()


def load_ae(path: str | os.PathLike[str], *, dtype: Any = None) -> Any:
    """The Flux VAE from BFL's ``ae.safetensors`` (ldm keys), a diffusers VAE folder or ComfyUI's ``vae.``."""
    file = Path(path).expanduser()
    target = _dtype(dtype)
    if file.is_dir():
        from diffusers import AutoencoderKL

        folder = _component_folder(file, ("vae",))
        if folder is None:
            raise ModelFormatError(f"{file}: no VAE folder here (config.json)")
        try:
            module = AutoencoderKL.from_pretrained(
                str(folder), local_files_only=True, torch_dtype=_folder_dtype(folder, target)
            )
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{folder}: cannot read VAE ({exc})") from None
        return module.eval()
    source = _open(file)
    try:
        prefix = next((p for p in ("", VAE_PREFIX, "first_stage_model.") if p + _VAE_LDM_PROBE in source.keys), None)
        if prefix is None:
            raise ModelFormatError(f"{file}: no VAE in the ldm/BFL layout here (no {_VAE_LDM_PROBE})")
        return read_vae_tensors(source.keys, source.shape, source.get, prefix, file, target)
    finally:
        source.close()


def _dtype(dtype: Any) -> Any:
    """``None`` -> fp32 (load_model's default); ``"auto"`` -> ``None``: keep each tensor's stored dtype
    (``model info`` on a 12B bf16/fp8 file must not upcast it); else the named dtype."""
    import torch

    from ...dtypes import resolve_dtype

    if dtype is None:
        return torch.float32
    return None if dtype == "auto" else resolve_dtype(dtype)


def read_folder_components(
    folder: Path, index: dict[str, Any], dtype: Any, wanted: dict[str, Any], label: str
) -> dict[str, Any]:
    """The components of a diffusers pipeline folder, each through its class's ``from_pretrained`` (offline): every
    ``wanted`` name -> class that ``model_index.json`` lists (``transformer`` always), in ``dtype`` (``"auto"``: the
    dtype each component stores). diffusers models read ``subfolder=``, transformers models their own folder. A
    component that cannot be read is a one-line :class:`ModelFormatError` naming the ``label`` folder."""
    from ..load import quiet_transformers_loading, stored_dtype

    def target(component: str) -> Any:
        if dtype == "auto":
            return stored_dtype(folder / component) or _dtype(None)
        return _dtype(dtype)

    parts: dict[str, Any] = {}
    try:
        for name, cls in wanted.items():
            if name != "transformer" and not (index.get(name) or [None])[0]:
                continue
            with quiet_transformers_loading():  # no library progress bars in a command's output
                if cls.__module__.startswith("transformers"):
                    parts[name] = cls.from_pretrained(folder / name, local_files_only=True, dtype=target(name))
                else:
                    parts[name] = cls.from_pretrained(
                        folder, subfolder=name, local_files_only=True, torch_dtype=target(name)
                    )
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFormatError(f"{folder}: cannot read {label} diffusers folder ({first})") from None
    for module in parts.values():
        module.eval()
    return parts


def _folder_dtype(folder: Path, target: Any) -> Any:
    from ..load import stored_dtype

    return target or stored_dtype(folder) or _dtype(None)


# ----------------------------------------------------------------------------------------------- bundles


def make_bundle(parts: dict[str, Any], *, source: str, source_format: str, metadata: dict[str, str] | None = None
                ) -> ModelBundle:  # fmt: skip
    """A ``flux`` :class:`ModelBundle` from components under diffusers' names (missing ones ``None``)."""
    if parts.get("text_encoder") is None and parts.get("text_encoder_2") is not None:
        # the encoders sit in the family's order (CLIP-L, T5), so T5 alone has no slot
        raise ModelFormatError(f"{source}: the T5 encoder is there but CLIP-L is not; give clip_l=...")
    encoders = [parts[name] for name in ("text_encoder", "text_encoder_2") if parts.get(name) is not None]
    tokenizers = [parts.get("tokenizer"), parts.get("tokenizer_2")][: len(encoders)]
    return ModelBundle(
        family="flux",
        prediction_type=FLOW_PREDICTION,
        unet=None,
        transformer=parts["transformer"],
        vae=parts.get("vae"),
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=parts["scheduler"],
        source=source,
        source_format=source_format,
        metadata=dict(metadata or {}),
    )


def scheduler_for(variant: str, config: dict[str, Any] | None = None) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .tiny import scheduler_config

    return FlowMatchEulerDiscreteScheduler(**(config_fields(config) if config else scheduler_config(variant)))


def _tokenizers(parts: dict[str, Any], tokenizer: Any, t5_tokenizer: Any) -> None:
    from ..t5 import load_t5_tokenizer
    from ..tokenizer import load_clip_tokenizer

    clip_tok = tokenizer[0] if isinstance(tokenizer, (list, tuple)) else tokenizer
    if isinstance(tokenizer, (list, tuple)) and len(tokenizer) > 1 and t5_tokenizer is None:
        t5_tokenizer = tokenizer[1]
    if parts.get("text_encoder") is not None and parts.get("tokenizer") is None:
        parts["tokenizer"] = clip_tok if clip_tok is not None and not isinstance(clip_tok, (str, os.PathLike)) else (
            load_clip_tokenizer(clip_tok))  # fmt: skip
    t5 = parts.get("text_encoder_2")
    if t5 is not None and parts.get("tokenizer_2") is None:
        if t5_tokenizer is not None and not isinstance(t5_tokenizer, (str, os.PathLike)):
            parts["tokenizer_2"] = t5_tokenizer
        else:
            try:
                parts["tokenizer_2"] = load_t5_tokenizer(t5_tokenizer, vocab_size=t5.config.vocab_size)
            except ModelFormatError:
                if t5_tokenizer is not None:
                    raise
                parts["tokenizer_2"] = None  # model info still works; encoding says what to give


def _separate_parts(parts: dict[str, Any], clip_l: Any, t5xxl: Any, ae: Any, dtype: Any) -> None:
    from ..t5 import load_t5_encoder

    if clip_l is not None:
        parts["text_encoder"] = load_clip_l(clip_l, dtype=dtype)
    if t5xxl is not None:
        parts["text_encoder_2"] = load_t5_encoder(t5xxl, dtype=dtype)
    if ae is not None:
        parts["vae"] = load_ae(ae, dtype=dtype)


def _vae_part(where: Any, ae: Any, options: dict[str, Any]) -> Any:
    """The VAE part under either name (``ae=`` as kohya's Flux scripts, ``vae=`` as the CLI's shared
    ``--vae``); CLIP-G is an SD3 part, refused with the parts Flux takes."""
    if options.get("clip_g") is not None:
        raise SdcoreError(
            f"{where}: clip_g does not apply to Flux.1 models (parts: clip_l, t5xxl, ae/vae, t5_tokenizer)"
        )
    vae = options.get("vae")
    if vae is not None and ae is not None:
        raise SdcoreError(f"{where}: give the VAE once (ae= or vae=)")
    return ae if ae is not None else vae


def read_flux_single_file(
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    device: Any = None,
    tokenizer: Any = None,
    t5_tokenizer: Any = None,
    config: Any = None,
    clip_l: Any = None,
    t5xxl: Any = None,
    ae: Any = None,
    **options: Any,
) -> ModelBundle:
    """A Flux.1 single file (BFL or ComfyUI layout) plus the parts given separately (see the module doc)."""
    ae = _vae_part(path, ae, options)
    from ..t5 import COMFY_T5_PREFIX, assign_t5, empty_t5, t5_config_from_shapes, t5_tensors

    file = Path(path)
    target = _dtype(dtype)
    source = _open(file)
    try:
        prefix = transformer_prefix(source.keys)
        keys, shape, get = source.keys, source.shape, source.get
        stored = _stored_configs(source.metadata, file, config)
        _refuse_quantized(keys, file)
        if prefix is None and is_diffusers_transformer_file(keys):
            transformer = read_diffusers_transformer(keys, shape, get, file, target, stored.get("transformer"))
            variant = variant_of_transformer(transformer)
        elif prefix is None:
            raise ModelFormatError(f"{file}: not a Flux.1 file (no {PROBE})")
        else:
            transformer = read_transformer(keys, shape, get, prefix, file, target, stored.get("transformer"))
            variant = variant_of(keys, prefix)
        parts: dict[str, Any] = {"transformer": transformer}
        if clip_l is None and (cp := clip_prefix(keys)) is not None and cp:
            parts["text_encoder"] = read_clip_tensors(keys, shape, get, cp, file, target, stored.get("text_encoder"))
        if t5xxl is None and COMFY_T5_PREFIX + "encoder.final_layer_norm.weight" in keys:
            t5_cfg = stored.get("text_encoder_2") or t5_config_from_shapes(keys, shape, COMFY_T5_PREFIX)
            parts["text_encoder_2"] = assign_t5(
                empty_t5(t5_cfg), t5_tensors(keys, get, COMFY_T5_PREFIX, dtype=target), file, target
            )
        if ae is None and VAE_PREFIX + _VAE_LDM_PROBE in keys:
            parts["vae"] = read_vae_tensors(keys, shape, get, VAE_PREFIX, file, target, stored.get("vae"))
        metadata = dict(source.metadata)
    finally:
        source.close()
    _separate_parts(parts, clip_l, t5xxl, ae, dtype)
    parts["scheduler"] = scheduler_for(variant, stored.get("scheduler"))
    _tokenizers(parts, tokenizer, t5_tokenizer)
    bundle = make_bundle(parts, source=str(file), source_format="single-file", metadata=metadata)
    if device is not None:
        bundle.to(device=device)
    return bundle


def _stored_configs(metadata: dict[str, str], file: Path, config: Any) -> dict[str, Any]:
    """Component configs from ``config=`` (a diffusers folder or dict) or our ``sdcore.config`` entry."""
    if isinstance(config, dict):
        return dict(config)
    if config is not None:
        return folder_configs(Path(config))
    if CONFIG_METADATA_KEY in metadata:
        try:
            stored = json.loads(metadata[CONFIG_METADATA_KEY])
        except json.JSONDecodeError:
            raise ModelFormatError(f"{file}: metadata {CONFIG_METADATA_KEY!r} is not valid JSON") from None
        return dict(stored.get("components") or {})
    return {}


def folder_configs(folder: Path) -> dict[str, Any]:
    """``{component: config}`` of a diffusers Flux folder (configs only, no weights)."""
    out: dict[str, Any] = {}
    for name, file in (("transformer", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                       ("text_encoder_2", "config.json"), ("scheduler", "scheduler_config.json")):  # fmt: skip
        candidate = folder / name / file
        if candidate.is_file():
            try:
                out[name] = json.loads(candidate.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise ModelFormatError(f"{candidate}: not valid JSON") from None
    return out


def is_flux_index(index: dict[str, Any]) -> bool:
    """A ``model_index.json`` of a Flux.1 pipeline (any Flux pipeline class, or its transformer class)."""
    transformer = index.get("transformer") or [None, None]
    return str(index.get("_class_name", "")).startswith("Flux") or transformer[-1] == "FluxTransformer2DModel"


def read_flux_diffusers(
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    device: Any = None,
    tokenizer: Any = None,
    t5_tokenizer: Any = None,
    clip_l: Any = None,
    t5xxl: Any = None,
    ae: Any = None,
    **options: Any,
) -> ModelBundle:
    """A diffusers Flux folder (``FluxPipeline.save_pretrained`` layout), each component's ``from_pretrained``."""
    ae = _vae_part(path, ae, options)
    import transformers
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    folder = Path(path)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    wanted: dict[str, Any] = {"transformer": FluxTransformer2DModel}
    if ae is None:
        wanted["vae"] = AutoencoderKL
    if clip_l is None:
        wanted["text_encoder"] = transformers.CLIPTextModel
    if t5xxl is None:
        wanted["text_encoder_2"] = transformers.T5EncoderModel
    parts = read_folder_components(folder, index, dtype, wanted, "Flux")
    _separate_parts(parts, clip_l, t5xxl, ae, dtype)
    variant = variant_of_transformer(parts["transformer"])
    sched = folder / "scheduler" / "scheduler_config.json"
    parts["scheduler"] = scheduler_for(
        variant, json.loads(sched.read_text(encoding="utf-8")) if sched.is_file() else None
    )
    if (folder / "tokenizer").is_dir() and tokenizer is None:
        tokenizer = folder / "tokenizer"
    if (folder / "tokenizer_2").is_dir() and t5_tokenizer is None:
        t5_tokenizer = folder / "tokenizer_2"
    _tokenizers(parts, tokenizer, t5_tokenizer)
    from .variants import PIPELINE_METADATA_KEY, PIPELINE_VARIANTS

    pipeline = str(index.get("_class_name", ""))  # Kontext has dev's shapes: only the folder names it
    metadata = {PIPELINE_METADATA_KEY: pipeline} if pipeline in PIPELINE_VARIANTS else None
    bundle = make_bundle(parts, source=str(folder), source_format="diffusers", metadata=metadata)
    if device is not None:
        bundle.to(device=device)
    return bundle


# ----------------------------------------------------------------------------------------------- parts

#: the separate parts a Flux.1 model takes (``load_model`` keywords; ``vae`` is ``--vae``/``--ae``)
TAKES_PARTS = ("clip_l", "t5xxl", "vae", "t5_tokenizer")


def flux_part_slots(path: str | os.PathLike[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(parts a Flux model takes, parts it lacks) from a single file's header or a folder's
    ``model_index.json``, by the rules the readers above use (the pre-flight's completeness check)."""
    from ..t5 import COMFY_T5_PREFIX

    where = Path(path)
    if where.is_dir():
        index = json.loads((where / "model_index.json").read_text(encoding="utf-8"))
        present = {name: bool((index.get(name) or [None])[0]) for name in ("vae", "text_encoder", "text_encoder_2")}
    else:
        source = _open(where)
        try:
            keys = source.keys
        finally:
            source.close()
        present = {
            "vae": VAE_PREFIX + _VAE_LDM_PROBE in keys,
            "text_encoder": bool(clip_prefix(keys)),
            "text_encoder_2": COMFY_T5_PREFIX + "encoder.final_layer_norm.weight" in keys,
        }
    part = {"text_encoder": "clip_l", "text_encoder_2": "t5xxl", "vae": "vae"}
    return TAKES_PARTS, tuple(part[name] for name in ("text_encoder", "text_encoder_2", "vae") if not present[name])


# ----------------------------------------------------------------------------------------------- layout


def part_config(name: str, path: Any) -> dict[str, Any] | None:
    """The config of a Flux part given separately (``clip_l``, ``t5xxl``, ``vae``) from its folder's
    ``config.json`` or its file's header, by the readers' rules; ``None`` when it cannot be read."""
    from ..infer import infer_text_encoder
    from ..parts import part_folder_config, part_header
    from ..t5 import find_t5_prefix, t5_config_from_shapes

    where = Path(path).expanduser()
    subfolders = {"clip_l": ("text_encoder",), "t5xxl": ("text_encoder_2",), "vae": ("vae",)}
    try:
        if where.is_dir():
            return part_folder_config(where, subfolders[name])
        keys, shape = part_header(where)
        if name == "clip_l":
            cp = clip_prefix(keys)
            return None if cp is None else infer_text_encoder(keys, shape, cp, False, "sd1")
        if name == "t5xxl":
            found = find_t5_prefix(keys)
            return None if found is None else t5_config_from_shapes(keys, shape, found)
        prefix = next((p for p in ("", VAE_PREFIX, "first_stage_model.") if p + _VAE_LDM_PROBE in keys), None)
        return None if prefix is None else vae_config_from_shapes(keys, shape, prefix)
    except (SdcoreError, OSError, KeyError, ValueError):
        return None


def read_flux_layout(path: str | os.PathLike[str], **parts: Any) -> Any:
    """The :class:`~sdcore.models.layout.ModelLayout` of a Flux single file from its header alone
    (the pre-flight's memory plan). Parts the file lacks come from the ``parts`` given separately
    (``clip_l=``, ``t5xxl=``, ``vae=``/``ae=``: their headers or configs), or are planned at the released
    sizes (CLIP-L, T5-XXL, the Flux VAE), with a note."""
    from ..layout import ModelLayout, _bytes_per_weight
    from ..load import bundled_config
    from ..source import read_safetensors_header
    from ..t5 import COMFY_T5_PREFIX, T5_XXL_CONFIG, t5_config_from_shapes
    from .tiny import vae_config

    file = Path(path)
    source = _open(file)
    try:
        prefix = transformer_prefix(source.keys)
        keys, shape = source.keys, source.shape
        if prefix is None and not is_diffusers_transformer_file(keys):
            raise ModelFormatError(f"{file}: not a Flux.1 file (no {PROBE})")
        stored = _stored_configs(source.metadata, file, None)
        notes: list[str] = []
        transformer = stored.get("transformer") or file_transformer_config(keys, shape, prefix, file)
        vae = stored.get("vae") or (
            vae_config_from_shapes(keys, shape, VAE_PREFIX) if VAE_PREFIX + _VAE_LDM_PROBE in keys else None
        )
        cp = clip_prefix(keys)
        if stored.get("text_encoder"):
            clip = dict(stored["text_encoder"])
        elif cp:
            from ..infer import infer_text_encoder

            clip = infer_text_encoder(keys, shape, cp, False, "sd1")
        else:
            clip = None
        t5 = stored.get("text_encoder_2") or (
            t5_config_from_shapes(keys, shape, COMFY_T5_PREFIX)
            if COMFY_T5_PREFIX + "encoder.final_layer_norm.weight" in keys
            else None
        )
        variant = "dev" if transformer.get("guidance_embeds") else "schnell"
        width = int(transformer.get("in_channels", 64))
    finally:
        source.close()
    from .variants import TOOL_INPUTS, refuse

    # the pre-flight reads this before loading: FLUX.1 Depth/Canny stop here, not at the first step (Fill trains)
    refuse(TOOL_INPUTS.get(width, f"in{width}") if width != 64 else variant, str(file), "train", given=("mask",))
    given = {**parts, "vae": parts.get("vae") or parts.get("ae")}
    vae = vae or (part_config("vae", given["vae"]) if given["vae"] else None)
    clip = clip or (part_config("clip_l", given["clip_l"]) if given.get("clip_l") else None)
    t5 = t5 or (part_config("t5xxl", given["t5xxl"]) if given.get("t5xxl") else None)
    missing = [name for name, cfg in (("vae", vae), ("clip_l", clip), ("t5xxl", t5)) if cfg is None]
    if missing:
        notes.append(f"not in the file, planned at the released sizes: {', '.join(missing)}")
    clip = clip or {k: v for k, v in bundled_config("sd1")["text_encoders"][0].items()}
    clip["_class_name"] = "CLIPTextModel"
    t5 = {**(t5 or T5_XXL_CONFIG), "_class_name": "T5EncoderModel"}
    from .tiny import scheduler_config

    configs = {
        "transformer": {**transformer, "_class_name": "FluxTransformer2DModel"},
        "vae": vae or vae_config(tiny=False),
        "text_encoders": [clip, t5],
        "scheduler": stored.get("scheduler") or scheduler_config(variant),
    }
    header, _ = read_safetensors_header(file) if source.format == "safetensors" else ({}, 0)
    layout = ModelLayout(str(file), "flux", FLOW_PREDICTION, configs, "single-file",
                         _bytes_per_weight(header) if header else 4.0)  # fmt: skip
    layout.notes.extend(notes)
    return layout

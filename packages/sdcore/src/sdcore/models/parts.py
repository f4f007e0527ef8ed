"""Model parts given in separate files (``--clip-l``, ``--clip-g``, ``--t5xxl``, ``--vae``, ``--t5-tokenizer``),
checked from headers before any weight loads.

SD3 and FLUX.1 checkpoints are often the denoiser alone; kohya's ``sd3_train_network.py`` and
``flux_train_network.py`` take the text encoders and the VAE as separate files, and so do ``sdcore train``,
``generate`` and ``model info/convert``. A run that would only find out at load time that ``--t5xxl`` is
missing, or that ``--t5xxl`` names a CLIP file, wastes minutes of loading a 12B model first: the
pre-flight asks these questions of the files' headers instead (:func:`part_problems`).

Which parts a model takes, and which its file lacks, is the family's knowledge: its adapter's optional
``part_slots(path) -> (accepted, missing)`` (option names, e.g. ``("clip_l", "t5xxl", "vae",
"t5_tokenizer")``). A family without it (SD1/SD2/SDXL) takes no separate parts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import SdcoreError

#: option name -> what the part is, for messages
PART_LABELS = {
    "clip_l": "CLIP-L text encoder",
    "clip_g": "CLIP-G text encoder",
    "t5xxl": "T5-XXL text encoder",
    "vae": "VAE",
    "t5_tokenizer": "T5 tokenizer",
}
#: a tensor name (suffix) every file of that part has, in any layout the readers take; a file without it
#: is not that part (``--t5xxl clip_l.safetensors``)
_PROBES = {
    "clip_l": ("text_model.final_layer_norm.weight",),
    "clip_g": ("text_model.final_layer_norm.weight",),
    "t5xxl": ("encoder.block.0.layer.0.SelfAttention.q.weight",),
    "vae": ("encoder.conv_in.weight",),
}


def parts_in(keys: Collection[str]) -> list[str]:
    """The parts whose probe tensor ``keys`` hold (a CLIP file is both ``clip_l`` and ``clip_g``), in the order
    of :data:`PART_LABELS`; empty for a file that is no model part."""
    return [name for name, probes in _PROBES.items() if any(key.endswith(p) for key in keys for p in probes)]


def part_names() -> tuple[str, ...]:
    """The part options' names (``load_model`` keywords), in the CLI's order."""
    from ..builtin.part_options import PART_OPTIONS

    return tuple(name for _flags, name, _text in PART_OPTIONS)


def flag(name: str) -> str:
    """``t5xxl`` -> ``--t5xxl``; ``clip_l`` -> ``--clip-l`` (the flag the CLI shows first)."""
    from ..builtin.part_options import PART_OPTIONS

    return next(flags[0] for flags, option, _text in PART_OPTIONS if option == name)


def given_parts(options: Any) -> dict[str, Any]:
    """The parts set on ``options`` (train options, or a mapping of them) as ``load_model`` keywords."""
    values = options if isinstance(options, Mapping) else vars(options)
    return {name: str(values[name]) for name in part_names() if values.get(name) not in (None, "")}


def part_file_problems(parts: Mapping[str, Any]) -> list[str]:
    """Each given part that is not there, not readable, or (from its header or first bytes) not that part: one line
    each."""
    problems: list[str] = []
    for name, value in parts.items():
        where = Path(str(value)).expanduser()
        head = f"{flag(name)} {value}"
        if not where.exists():
            problems.append(f"{head}: no such file or folder (the {PART_LABELS[name]})")
        elif where.is_dir():
            if not os.access(where, os.R_OK | os.X_OK):
                problems.append(f"{head}: the folder is not readable")
        elif not os.access(where, os.R_OK):
            problems.append(f"{head}: the file is not readable")
        elif name == "t5_tokenizer":
            problems.append(f"{head}: give the tokenizer's folder (with tokenizer.json or spiece.model)")
        else:
            problem = _part_file_kind_problem(name, where)
            if problem is not None:
                problems.append(f"{head}: {problem}")
    return problems


def _part_file_kind_problem(name: str, where: Path) -> str | None:
    """Why the part file ``where`` cannot be the part ``name`` (``not a readable VAE file: ...``, ``not a VAE file
    (...); it is a LoRA ...``), from its header or, for a pickle, through the safe reader the loader uses
    (:class:`~sdcore.models.source.CheckpointSource`: no code runs; a zip pickle is memory-mapped), so the pre-flight
    refuses what the load would; ``None`` when it is that part (or a part without a probe tensor)."""
    from .detect import _part_hint, network_file_hint
    from .source import CheckpointSource

    label = PART_LABELS[name]
    try:
        source = CheckpointSource(where)
    except (SdcoreError, OSError) as exc:
        reason = str(exc)
        reason = reason[len(f"{where}: ") :] if reason.startswith(f"{where}: ") else reason
        return f"not a readable {label} file: {reason}"
    try:
        keys = set(source.keys)
    finally:
        source.close()
    probes = _PROBES.get(name, ())
    if not probes or name in parts_in(keys):
        return None
    others = [part for part in parts_in(keys) if part != name]
    hint = _part_hint(keys) if others else network_file_hint(keys)
    return f"not a {label} file (no tensor named like ...{probes[0]}){hint}"


def _family_of(path: Path) -> str:
    """The family of a model file (from its keys) or folder (from its configs)."""
    if path.is_dir():
        from .layout import read_layout

        return read_layout(path).family
    from .detect import detect_family
    from .source import CheckpointSource

    source = CheckpointSource(path)
    try:
        return detect_family(source.keys, path)
    finally:
        source.close()


def part_header(path: str | os.PathLike[str]) -> tuple[set[str], Callable[[str], tuple[int, ...]]]:
    """(tensor names, shape of a name) of a part file, from its header (no weights read)."""
    from .source import CheckpointSource

    source = CheckpointSource(Path(path).expanduser())
    try:
        keys = set(source.keys)
        shapes = {key: tuple(source.shape(key)) for key in keys}
    finally:
        source.close()
    return keys, shapes.__getitem__


def part_folder_config(path: str | os.PathLike[str], subfolders: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The ``config.json`` of a part folder (the component's own, or a model folder's ``subfolders``)."""
    import json

    where = Path(path).expanduser()
    for folder in (where, *(where / name for name in subfolders)):
        config = folder / "config.json"
        if config.is_file():
            try:
                data = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None
    return None


def vae_latent_channels(path: str | os.PathLike[str]) -> int | None:
    """Latent channels of a VAE file (``encoder.conv_out`` gives mean and log-variance: 2 x channels, in the
    ldm and the diffusers layout alike) or folder (``config.json``), from the header; ``None`` when unknown."""
    from .source import read_safetensors_header

    where = Path(path).expanduser()
    if where.is_dir():
        channels = (part_folder_config(where, ("vae",)) or {}).get("latent_channels")
        return int(channels) if isinstance(channels, int) else None
    if where.suffix.lower() != ".safetensors":
        return None
    try:
        header, _ = read_safetensors_header(where)
    except (SdcoreError, OSError):
        return None
    for key, info in header.items():
        if key.endswith("encoder.conv_out.weight") and not key.endswith("decoder.conv_out.weight"):
            return int(info["shape"][0]) // 2
    return None


def load_vae_like(path: str | os.PathLike[str], like: Any, dtype: Any = None) -> Any:
    """A VAE given separately for a model whose own VAE is ``like`` (SD1/SD2/SDXL's ``--vae``, kohya's ``--vae``:
    ``sdxl_vae.safetensors``, ``vae-ft-mse-840000-ema-pruned.safetensors``). A diffusers folder (the VAE's own
    or a model's ``vae/``) is read as it is; a file in the ldm layout (with or without ``first_stage_model.``)
    or in diffusers' names fills a VAE of ``like``'s config. Its latent channels must be ``like``'s."""
    import torch
    from diffusers import AutoencoderKL

    from ..errors import ModelFormatError
    from .convert.vae import PREFIX, vae_key_map
    from .load import _assign, config_fields, empty_module, stored_dtype
    from .source import CheckpointSource

    where = Path(path).expanduser()
    auto = isinstance(dtype, str) and dtype == "auto"  # each tensor as stored (model info)
    target = None if auto else (dtype if dtype is not None else next(like.parameters()).dtype)
    if where.is_dir():
        folder = where / "vae" if (where / "vae" / "config.json").is_file() else where
        try:
            stored = (stored_dtype(folder) or torch.float32) if auto else target
            module = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=stored)
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{where}: cannot read VAE folder ({str(exc).splitlines()[0]})") from None
    else:
        source = CheckpointSource(where)
        try:
            conv_in = next((k for k in source.keys if k.endswith("encoder.conv_in.weight")
                            and not k.endswith("decoder.conv_in.weight")), None)  # fmt: skip
            if conv_in is None:
                raise ModelFormatError(f"{where}: not a VAE (no encoder.conv_in.weight)")
            prefix = conv_in[: -len("encoder.conv_in.weight")]
            module = empty_module(lambda: AutoencoderKL.from_config(config_fields(dict(like.config))))
            names = [k for k in module.state_dict()]
            if prefix + "encoder.down_blocks.0.resnets.0.conv1.weight" in source.keys:  # diffusers' names
                mapping = {key: prefix + key for key in names}
            else:
                blocks = len(module.config.block_out_channels)
                mapping = {key: prefix + ldm[len(PREFIX) :] for key, ldm in vae_key_map(names, blocks).items()}
            absent = [stored for stored in mapping.values() if stored not in source.keys]
            if absent:
                raise ModelFormatError(f"{where}: not a VAE of this model's shape ({absent[0]!r} is missing)")
            _assign(module, {key: source.get(name) for key, name in mapping.items()}, "VAE", where, target)
        finally:
            source.close()
    channels, wanted = int(module.config.latent_channels), int(like.config.latent_channels)
    if channels != wanted:
        raise ModelFormatError(f"{where}: a VAE with {channels} latent channels; this model's has {wanted}")
    return module.eval()


def _flags(names: list[str]) -> str:
    return ", ".join(flag(name) for name in names)


def vae_channel_mismatch(
    vae: str | os.PathLike[str], family: str | None = None, model: str | None = None
) -> str | None:
    """``a VAE with C latent channels; LABEL needs its W-channel VAE`` when the VAE file or folder ``vae`` (its
    header) does not fit ``family`` (or the family of the file or folder ``model``), else ``None`` (also when
    either is unknown): an SD1/SDXL VAE for a 16-channel family, FLUX.1's ae for SD1."""
    from .family import get_family

    try:
        if family is None:
            path = Path(model).expanduser() if model else None
            if path is None or not (path.is_file() or path.is_dir()):
                return None
            family = _family_of(path)
        spec = get_family(family)
    except (SdcoreError, OSError):  # an unreadable model is the model check's line
        return None
    channels, wanted = vae_latent_channels(vae), spec.latent.channels
    if channels is None or channels == wanted:
        return None
    return f"a VAE with {channels} latent channels; {spec.label} needs its {wanted}-channel VAE"


def _adapter_hook(model: str | os.PathLike[str], name: str, default: Any) -> Any:
    """The model file or folder's family adapter's optional ``name(path)``; ``default`` for a family without it, a
    tiny model or a model that cannot be read here (its own check says why)."""
    from .family import family_adapter, get_family

    path = Path(model).expanduser()
    if not (path.is_file() or path.is_dir()):
        return default
    try:
        hook = getattr(family_adapter(get_family(_family_of(path))), name, None)
        return hook(path) if hook is not None else default
    except (SdcoreError, OSError):
        return default


def model_part_slots(model: str | os.PathLike[str]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(parts the model file or folder takes, parts it lacks): its family adapter's ``part_slots`` (``((), ())``:
    a folder that has its parts); ``None`` for a family without one (SD1/SD2/SDXL take a ``--vae`` only) or a
    model that cannot be read here."""
    slots: tuple[tuple[str, ...], tuple[str, ...]] | None = _adapter_hook(model, "part_slots", None)
    return slots


def model_clip_widths(model: str | os.PathLike[str]) -> tuple[dict[str, int], int | None]:
    """(the hidden width of each CLIP part the model expects, where its file tells it; the two CLIPs' widths
    together, from the denoiser's pooled input): the family adapter's optional ``clip_widths`` (SD3, which takes
    CLIP-L and CLIP-G); ``({}, None)`` without one."""
    widths: tuple[dict[str, int], int | None] = _adapter_hook(model, "clip_widths", ({}, None))
    return widths


#: Forge's rule (backend/loader.py ``replace_state_dict``: a CLIP file's ``layer_norm1`` width), for a model that
#: does not say its CLIPs' widths: CLIP-L is 768 wide, CLIP-G (OpenCLIP bigG) 1280
_FORGE_CLIP_WIDTHS = {768: "clip_l", 1280: "clip_g"}


def clip_kind(width: int, widths: Mapping[str, int], total: int | None) -> str | None:
    """Whether a CLIP file ``width`` wide is CLIP-L or CLIP-G for a model that takes both: the one whose expected
    width (``widths``, :func:`model_clip_widths`) it is; else, with the two widths' sum ``total`` only (a model
    holding neither CLIP), CLIP-L below half of it and CLIP-G above (CLIP-L is the narrower of every SD3's pair:
    768 and 1280); else Forge's fixed widths. ``None``: a width the model takes for neither."""
    matching = [kind for kind in ("clip_l", "clip_g") if widths.get(kind) == width]
    if len(matching) == 1:
        return matching[0]
    if widths:  # the model says a width and this is not it
        return None
    if total:
        return "clip_l" if 2 * width < total else "clip_g" if 2 * width > total else None
    return _FORGE_CLIP_WIDTHS.get(width)


def module_parts(
    files: Sequence[Path],
    accepted: Collection[str],
    widths: Mapping[str, int] | None = None,
    total: int | None = None,
) -> tuple[dict[str, Path], list[Path]]:
    """Which part (option name) each of ``files`` is, from its header (:func:`parts_in`, the pre-flight's probe
    tensors), among the parts the model takes (``accepted``: none, none is taken): Forge's "Module N" files,
    which its loader sorts by their tensors, not by their order. A CLIP file is CLIP-L or CLIP-G: the only one
    the model takes, else by its width (:func:`clip_kind` with the model's ``widths`` and ``total``,
    :func:`model_clip_widths`). Returns the parts found and the files that are none of them (or a part already
    taken by an earlier file)."""
    found: dict[str, Path] = {}
    left: list[Path] = []
    for file in files:
        try:
            keys, shape = part_header(file)
        except (SdcoreError, OSError):
            left.append(file)
            continue
        kinds = [kind for kind in parts_in(keys) if kind in accepted]
        kind: str | None = kinds[0] if kinds else None
        if set(kinds) >= {"clip_l", "clip_g"}:
            norm = next(key for key in keys if key.endswith(_PROBES["clip_l"][0]))
            kind = clip_kind(shape(norm)[0], widths or {}, total)
        if kind is None or kind in found:
            left.append(file)
        else:
            found[kind] = file
    return found, left


def part_problems(model: str, parts: Mapping[str, Any], *, family: str | None = None) -> list[str]:
    """Everything wrong with ``model`` plus ``parts`` before loading: part files that are missing or of the
    wrong kind, parts the model does not take, and parts the model file lacks that nobody gave (one line
    naming them all and the options that supply them). ``family`` saves detecting it again."""
    from .family import family_adapter, get_family

    problems = part_file_problems(parts)
    path = Path(model).expanduser()
    if not (path.is_file() or path.is_dir()):
        from .load import sniff_tiny, sniff_toyworld

        if parts and (sniff_tiny(model) or sniff_toyworld(model)):  # complete models built in
            problems.append(f"{_flags(list(parts))}: separate parts apply to model files and folders, not {model}")
        return problems  # a missing model is the model check's line
    try:
        name = family or _family_of(path)
        adapter = family_adapter(get_family(name))
    except SdcoreError:
        return problems  # the model check reports an unreadable model, with load_model's message
    slots = getattr(adapter, "part_slots", None)
    accepted, missing = slots(path) if slots is not None else ((), ())
    refused = [part for part in parts if part not in accepted]
    if refused:
        label = get_family(name).label
        kind = "diffusers folder" if path.is_dir() else "file"
        takes = f"it takes {_flags(list(accepted))}" if accepted else "it takes no separate parts"
        problems.append(f"{_flags(refused)}: not a part of this {label} ({name}) {kind} {model} ({takes})")
    if "vae" in parts and "vae" in accepted:  # an SD1/SDXL VAE (4 channels) for a 16-channel family
        mismatch = vae_channel_mismatch(parts["vae"], name)
        if mismatch is not None:
            problems.append(f"{flag('vae')} {parts['vae']}: {mismatch}")
    lacking = [part for part in missing if part not in parts]
    if lacking:
        what = ", ".join(PART_LABELS[part] for part in lacking)
        give = " ".join(f"{flag(part)} <file or folder>" for part in lacking)
        problems.append(f"{model} has no {what}: pass {give}")
    return problems


__all__ = [
    "PART_LABELS",
    "clip_kind",
    "flag",
    "given_parts",
    "load_vae_like",
    "model_clip_widths",
    "model_part_slots",
    "module_parts",
    "part_file_problems",
    "part_folder_config",
    "part_header",
    "part_names",
    "part_problems",
    "vae_channel_mismatch",
    "vae_latent_channels",
]

"""Model folders as A1111 and ComfyUI lay them out: ComfyUI's ``extra_model_paths.yaml`` and ``--model NAME``.

ComfyUI users name a checkpoint the way its loader node does (``ckpt_name``: the file's path relative to a
``checkpoints`` folder, ``sdxl/juggernaut.safetensors``), and A1111 users by its title in
``models/Stable-diffusion``; :func:`resolve_model_name` turns such a name into the file below ``--models-dir``
before anything loads. ComfyUI installs that share another install's files list its folders in an
``extra_model_paths.yaml`` (ComfyUI reads the one in its root, beside ``models/``, and the files given to
``--extra-model-paths-config``); :func:`read_extra_model_paths` reads that file as ComfyUI's
``utils/extra_config.py`` does, and :meth:`ExtraModelPaths.order` puts its folders where ComfyUI's
``folder_paths.add_model_folder_path`` does. The LoRA, embedding and hypernetwork folders
(:func:`sdcore.generate.session.handlers_from_plugin_manager`) and the checkpoint folders use the same order.

Import-light: no torch.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..console import warning_line
from ..errors import ConfigError

#: the file ComfyUI reads from its root folder (the parent of its ``models/``) at start
EXTRA_MODEL_PATHS_FILE = "extra_model_paths.yaml"

#: ComfyUI's old folder names, read as the current ones (``folder_paths.map_legacy``)
LEGACY_FOLDER_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}

#: the folders below ``--models-dir`` a ``--model NAME`` is looked for in, by ComfyUI's folder name, in search
#: order: whole checkpoints (ComfyUI's ``checkpoints/``, A1111's ``Stable-diffusion/``), then transformer-only
#: files (ComfyUI's ``unet/`` and ``diffusion_models/``, in the order ComfyUI lists them), which ``--model`` reads
#: with their parts given as ``--clip-l``/``--t5xxl``/``--ae``
MODEL_FOLDERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("checkpoints", ("checkpoints", "Stable-diffusion")),
    ("diffusion_models", ("unet", "diffusion_models")),
)


#: ComfyUI's folder of diffusers models (``folder_paths`` ``diffusers``, read by its ``DiffusersLoader`` node): each
#: folder below it that holds a ``model_index.json`` is a model, named by its path relative to ``diffusers/``
DIFFUSERS_FOLDER = "diffusers"
#: the file that makes a folder a diffusers model
MODEL_INDEX_FILE = "model_index.json"


def comfy_folder_name(name: str) -> str:
    """ComfyUI's current name for a folder key (``unet`` -> ``diffusion_models``, ``clip`` -> ``text_encoders``)."""
    return LEGACY_FOLDER_NAMES.get(name, name)


@dataclass(frozen=True)
class ExtraFolder:
    """One folder an ``extra_model_paths.yaml`` adds: ``kind`` is ComfyUI's folder name (legacy names mapped),
    ``is_default`` its section's flag (ComfyUI searches such folders before its own), ``source`` the file."""

    kind: str
    path: Path
    is_default: bool
    source: Path


@dataclass(frozen=True)
class ExtraModelPaths:
    """The folders of one or more ``extra_model_paths.yaml`` files, in the order they were read."""

    folders: tuple[ExtraFolder, ...] = ()
    files: tuple[Path, ...] = ()

    def order(self, kind: str | None, defaults: Sequence[Path]) -> list[Path]:
        """``defaults`` (sdcore's folders below ``--models-dir`` for ``kind``) with this file's folders of that kind
        where ComfyUI puts them (``folder_paths.add_model_folder_path``): a folder of an ``is_default`` section
        before all (each one before the ones added earlier, as ComfyUI inserts it first), any other after all, in
        file order; a folder already listed stays listed once (an ``is_default`` one moves first)."""
        ordered = list(defaults)
        if kind is None:
            return ordered
        kind = comfy_folder_name(kind)
        for folder in self.folders:
            if folder.kind != kind:
                continue
            known = [i for i, path in enumerate(ordered) if os.path.abspath(path) == os.path.abspath(folder.path)]
            if known:  # a folder listed again: once, moved first by an is_default section (as ComfyUI does)
                if folder.is_default and known[0] != 0:
                    ordered.insert(0, ordered.pop(known[0]))
            elif folder.is_default:
                ordered.insert(0, folder.path)
            else:
                ordered.append(folder.path)
        return ordered


def _text(value: object, where: str, path: Path) -> str:
    if not isinstance(value, str):
        kind = "nothing" if value is None else f"a {type(value).__name__}"
        raise ConfigError(f"{path}: {where} should be folder paths (one per line), got {kind}")
    return value


def read_extra_model_paths(path: str | os.PathLike[str]) -> list[ExtraFolder]:
    """The folders ``path`` (ComfyUI's ``extra_model_paths.yaml`` format) adds, read as ComfyUI reads it.

    Each top-level section (``a111:``, ``comfyui:``) maps ComfyUI folder names (``checkpoints``, ``loras``,
    ``embeddings`` ...) to one folder or several, one per line (a ``|`` block). ``base_path`` (``~`` and
    ``$VARS`` expanded; relative to the file's folder) is joined before each of them; without one a relative
    folder is relative to the file's folder. ``is_default: true`` puts the section's folders before the default
    ones. A section left empty is skipped; anything else that is no mapping of text is a
    :class:`~sdcore.errors.ConfigError` (ComfyUI stops with a traceback there)."""
    import yaml

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the extra model paths file ({exc.strerror or exc})") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{file}: not valid YAML{line} ({getattr(exc, 'problem', None) or exc})") from None
    if config is None:
        return []
    if not isinstance(config, dict):
        raise ConfigError(
            f"{file}: expected sections (a1111:, comfyui: ...) of folder names, got a {type(config).__name__}"
        )
    here = os.path.dirname(os.path.abspath(file))
    folders: list[ExtraFolder] = []
    for section, conf in config.items():
        if conf is None:
            continue
        if not isinstance(conf, dict):
            raise ConfigError(f"{file}: section {section!r} should map folder names to paths")
        conf = dict(conf)
        base = None
        if "base_path" in conf:
            base = os.path.expandvars(os.path.expanduser(_text(conf.pop("base_path"), f"{section}.base_path", file)))
            if not os.path.isabs(base):
                base = os.path.abspath(os.path.join(here, base))
        is_default = bool(conf.pop("is_default", False))
        for key, value in conf.items():
            for line in _text(value, f"{section}.{key}", file).split("\n"):
                line = line.strip()
                if not line:
                    continue
                if base:
                    full = os.path.join(base, line)
                elif os.path.isabs(line):
                    full = line
                else:
                    full = os.path.join(here, line)
                folder = ExtraFolder(comfy_folder_name(str(key)), Path(os.path.normpath(full)), is_default, file)
                folders.append(folder)
    return folders


def load_extra_model_paths(
    models_dir: str | os.PathLike[str] | None,
    files: Iterable[str | os.PathLike[str]] = (),
    notes: list[str] | None = None,
) -> ExtraModelPaths:
    """The extra folders ComfyUI would search for an install whose ``models/`` is ``models_dir``: the
    ``extra_model_paths.yaml`` of its root (``models_dir``'s parent, where ComfyUI's ``main.py`` reads it) when
    there is one, then ``files`` (``--extra-model-paths``, as ComfyUI's ``--extra-model-paths-config``), in that
    order.

    A file named in ``files`` that cannot be read is a :class:`~sdcore.errors.ConfigError`. The root's file is
    read without being asked for, so a problem with it must not stop a run that worked without it: with
    ``notes`` it is left out and the problem joins ``notes`` (one line to show the user), without it the error
    is raised."""
    chosen = [Path(file) for file in files]
    folders: list[ExtraFolder] = []
    read: list[Path] = []
    if models_dir is not None:
        root_file = Path(os.path.abspath(models_dir)).parent / EXTRA_MODEL_PATHS_FILE
        if root_file.is_file() and not any(_same(root_file, file) for file in chosen):
            try:
                folders += read_extra_model_paths(root_file)
                read.append(root_file)
            except ConfigError as exc:
                if notes is None:
                    raise
                notes.append(f"{exc}; that file (ComfyUI's, beside --models-dir) is left unread")
    for file in chosen:
        folders += read_extra_model_paths(file)
        read.append(file)
    return ExtraModelPaths(tuple(folders), tuple(read))


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def model_folders(models_dir: str | os.PathLike[str], extra: ExtraModelPaths | None = None) -> list[Path]:
    """Every folder a ``--model NAME`` is looked for in, first one first (existing or not): :data:`MODEL_FOLDERS`
    below ``models_dir``, each kind with its extra folders where ComfyUI puts them."""
    extra = extra or ExtraModelPaths()
    base = Path(models_dir)
    folders: list[Path] = []
    for kind, subdirs in MODEL_FOLDERS:
        folders += extra.order(kind, [base / name for name in subdirs])
    return folders


def diffusers_folders(models_dir: str | os.PathLike[str], extra: ExtraModelPaths | None = None) -> list[Path]:
    """The folders a ``--model NAME`` is looked for as a diffusers model in: ``diffusers/`` below ``models_dir``
    (ComfyUI's) with an ``extra_model_paths.yaml``'s ``diffusers`` folders where ComfyUI puts them."""
    return (extra or ExtraModelPaths()).order(DIFFUSERS_FOLDER, [Path(models_dir) / DIFFUSERS_FOLDER])


def _walk(folder: Path, leaf: str | None = None) -> Iterable[tuple[str, list[str]]]:
    """``(folder path, file names)`` of ``folder`` and every folder below it, sorted, linked folders followed (as
    ComfyUI and A1111 follow them) except a link to one of the folder's own ancestors (it would never end), and
    ``.git`` left out, as ComfyUI's lists do. A folder below ``folder`` holding a file named ``leaf`` is not
    descended into (a diffusers model's ``model_index.json``: its unet/, text_encoder/... hold no other model, and
    a models folder of big diffusers models would otherwise cost a listing of every one of their subfolders)."""
    above: dict[str, frozenset[str]] = {}  # a folder's path -> the real paths of it and its ancestors
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        chain = above.pop(dirpath, frozenset()) | {os.path.realpath(dirpath)}
        if leaf is not None and leaf in filenames and dirpath != str(folder):
            dirnames.clear()
        kept = []
        for name in sorted(dirnames):
            child = os.path.join(dirpath, name)
            if name != ".git" and os.path.realpath(child) not in chain:
                kept.append(name)
                above[child] = chain
        dirnames[:] = kept
        yield dirpath, sorted(filenames)


def list_diffusers_models(folders: Sequence[Path]) -> list[tuple[Path, str]]:
    """(folder, name relative to its search folder, with ``/``) for every folder below ``folders`` holding a
    ``model_index.json``, in folder order: the list ComfyUI's ``DiffusersLoader`` offers (a search folder that is
    itself a model has no name there and is left out). The walk does not go into a model's folder (ComfyUI's
    does: the two differ only for a model kept inside another model's folder)."""
    found: list[tuple[Path, str]] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for dirpath, filenames in _walk(folder, leaf=MODEL_INDEX_FILE):
            model = Path(dirpath)
            if MODEL_INDEX_FILE in filenames and model != folder:
                found.append((model, model.relative_to(folder).as_posix()))
    return found


def list_model_files(folders: Sequence[Path], suffixes: Sequence[str] | None = None) -> list[tuple[Path, str]]:
    """(file, name relative to its folder, with ``/``) for every file whose extension (``os.path.splitext``'s, any
    case, as ComfyUI and A1111 take it: a file named ``.pt`` has none) is one of ``suffixes`` (default
    :data:`sdcore.models.load.MODEL_FILE_SUFFIXES`) below ``folders``, in folder order (``.git`` left out, as
    ComfyUI's list does). Linked folders are followed, as ComfyUI and A1111 follow them (two links to one folder
    list its files under both names, each a name ComfyUI takes; ``Path.rglob`` does not descend into them, nor
    does 3.13's by default); a link to a folder that is already one of the current folder's ancestors is not, as
    it would never end. The model names here and the prompt networks' folders
    (:meth:`sdcore.generate.networks.PromptNetworkHandler.available`) are both listed with it."""
    if suffixes is None:
        from ..models.load import MODEL_FILE_SUFFIXES

        suffixes = MODEL_FILE_SUFFIXES
    wanted = tuple(suffix.lower() for suffix in suffixes)
    found: list[tuple[Path, str]] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for dirpath, filenames in _walk(folder):
            for filename in filenames:
                if os.path.splitext(filename)[1].lower() in wanted:
                    file = Path(dirpath) / filename
                    found.append((file, file.relative_to(folder).as_posix()))
    return found


def _stem(rel: str) -> str:
    return rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds ``repo_id`` (no network: ``local_files_only``)."""
    from ..errors import SdcoreError
    from ..models.load import cached_hub_folder

    try:
        cached_hub_folder(repo_id)
    except SdcoreError:
        return False
    return True


def _named_files(
    name: str, folders: Sequence[Path], model_folders: Sequence[Path] = ()
) -> tuple[Path | None, list[Path], list[Path], list[tuple[Path, str]]]:
    """What ``name`` (ComfyUI's relative name, ``/``-separated) picks below ``folders``: the file of that relative
    path in the first folder that has it (ComfyUI's ``get_full_path``; a name with a model file's extension only),
    the distinct files whose relative path without extension is ``name``, those whose file name is ``name`` with
    or without extension (a name without ``/``), and the whole listing (for the "not found" hint). The diffusers
    models below ``model_folders`` (:func:`list_diffusers_models`) join the same tiers by their folder's relative
    path and by its last folder name, so a folder and a file of one name are as ambiguous as two files."""
    from ..models.load import MODEL_FILE_SUFFIXES
    from .networks import _distinct_files

    if name.lower().endswith(MODEL_FILE_SUFFIXES):
        for folder in folders:
            file = folder / name
            if file.is_file():
                return file, [], [], []
    files = list_model_files(folders)
    models = list_diffusers_models(model_folders)
    # a folder's relative path: the first diffusers folder that has it, as ComfyUI's DiffusersLoader loads it
    by_path = next((path for path, rel in models if rel == name), None)
    by_stem = _distinct_files(
        [path for path, rel in files if _stem(rel) == name] + ([by_path] if by_path is not None else [])
    )
    by_file_name = _distinct_files(
        [path for path, _ in files if "/" not in name and name in (path.name, _stem(path.name))]
        + [path for path, _ in models if "/" not in name and path.name == name]
    )
    return None, by_stem, by_file_name, files + models


def _pick(option: str, text: str, tiers: Sequence[Sequence[Path]]) -> Path | None:
    """The one file of the first tier that has any; several there is a :class:`~sdcore.errors.ConfigError`."""
    for tier in tiers:
        if len(tier) == 1:
            return tier[0]
        if tier:
            listed = ", ".join(str(path) for path in tier)
            raise ConfigError(
                f"{option} {text!r} is ambiguous: {len(tier)} model files have that name ({listed}); give the "
                "name with its subfolder and extension as listed there, or the file's path"
                + (" (a diffusers folder's name has no extension)" if any(path.is_dir() for path in tier) else "")
            )
    return None


def _searched(name: str, folders: Sequence[Path], files: Sequence[tuple[Path, str]]) -> str:
    """``in FOLDERS and their subfolders`` with the close names there (or the first names), for "not found"."""
    where = ", ".join(str(folder.absolute()) for folder in folders)
    absent = [folder for folder in folders if not folder.is_dir()]
    if len(absent) == len(folders):
        where += " (none of which exists: point --models-dir at A1111's or ComfyUI's models folder)"
    names = list(dict.fromkeys(rel for _, rel in files))
    close = difflib.get_close_matches(name, names + [_stem(rel) for rel in names], n=5, cutoff=0.6)
    hint = ""
    if close:
        hint = "; close names: " + ", ".join(dict.fromkeys(close))
    elif names:
        hint = "; models there: " + ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
    return f"in {where} and their subfolders{hint}"


def _comfy_name(text: str) -> str:
    """``text`` as ComfyUI normalises a file name it is given (``a/../b`` -> ``b``, ``\\`` -> ``/``)."""
    return os.path.relpath(os.path.join("/", text.replace("\\", "/")), "/").replace(os.sep, "/")


def _is_path(text: str, models_dir: str | os.PathLike[str] | None) -> bool:
    """Whether ``text`` is taken as it is, never as a name: a ``scheme:`` source (``tiny:sd1``, a plugin
    format's, a Windows drive), an existing file or folder, a path written as one (absolute, ``./``, ``~``), or
    any text when there is no models folder to look in."""
    if ":" in text:
        return True
    try:
        if Path(text).expanduser().exists():
            return True
    except (OSError, ValueError):  # a name the OS cannot look up (too long): not found below
        pass
    return text.startswith(("/", "~", ".")) or os.path.isabs(text) or models_dir is None


#: an A1111 checkpoint title: its name, then its hash in brackets (``sub/name.safetensors [abcdef1234]``, what its
#: checkpoint dropdown and the API's ``sd_model_checkpoint`` show), or ``name [8-hex legacy hash]``, one of the
#: names ``CheckpointInfo.ids`` keeps for a checkpoint (its title before A1111 used sha256)
_A1111_TITLE = re.compile(r"^(?P<name>.*\S)\s*\[(?P<hash>[0-9a-fA-F]{8}|[0-9a-fA-F]{10})\]\s*$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")

#: a scan by hash says on stderr what it is about to read when the files not hashed before hold more than this
SCAN_NOTICE_BYTES = 1 << 30


def split_a1111_title(text: str) -> tuple[str, str | None]:
    """``(name, hash)`` of an A1111 checkpoint title (``sub/name.safetensors [abcdef1234]``), ``(text, None)``
    for anything else."""
    match = _A1111_TITLE.match(text)
    if match is None:
        return text, None
    return match["name"], match["hash"].lower()


def is_model_hash(text: str) -> bool:
    """Whether ``text`` is one of A1111's checkpoint hashes: the 8-hex legacy hash, the 10-hex shorthash (sha256
    prefix) or the whole sha256, which its ``checkpoint_aliases`` all accept as a model's name."""
    return len(text) in (8, 10, 64) and _HEX.match(text) is not None


def hash_of(path: str | os.PathLike[str], kind: str) -> str:
    """``path``'s hash of the kind (length) of ``kind``: the legacy hash for 8 hex, else the sha256 prefix."""
    from ..models.hashes import legacy_hash, sha256_file

    return legacy_hash(path) if len(kind) == 8 else sha256_file(path)[: len(kind)]


def find_by_hash(
    wanted: str, files: Sequence[Path], say: Callable[[str], None] | None = None, what: str = "model hash"
) -> Path | None:
    """The first of ``files`` whose hash is ``wanted`` (8 hex: A1111's legacy hash, a 64 KiB read; else a prefix of
    the whole file's sha256). Files whose sha256 is in the hash cache are tried first, at no cost; before reading
    the others whole, ``say`` is told how many bytes that is when it is over :data:`SCAN_NOTICE_BYTES` (their
    hashes are then cached: the next scan is quick). Unreadable files are skipped."""
    from ..models.hashes import cached_sha256, legacy_hash, sha256_file

    wanted = wanted.lower()
    files = list(dict.fromkeys(files))
    if len(wanted) == 8:
        for file in files:
            try:
                if legacy_hash(file) == wanted:
                    return file
            except OSError:
                continue
        return None
    unknown: list[Path] = []
    for file in files:
        try:
            known = cached_sha256(file)
        except OSError:
            continue
        if known is None:
            unknown.append(file)
        elif known.startswith(wanted):
            return file
    size = 0
    for file in unknown:
        with contextlib.suppress(OSError):
            size += file.stat().st_size
    if say is not None and size > SCAN_NOTICE_BYTES:
        say(
            f"hashing {len(unknown)} model file{'s' if len(unknown) > 1 else ''} ({size / 2**30:.1f} GiB) to find "
            f"{what} {wanted}; the hashes are cached, so this is once"
        )
    for file in unknown:
        try:
            if sha256_file(file).startswith(wanted):
                return file
        except OSError:
            continue
    return None


def _infotext_name_matches(name: str, file: Path, rel: str, base_name: bool = False) -> bool:
    """Whether an infotext's "Model" or "VAE" names ``file`` (``rel`` below its folder): A1111 writes a checkpoint's
    file name without extension (``name_for_extra``; before 1.6 its ``model_name``, the subfolders joined with
    ``_``) and a VAE's with it (``base_name``: ``sd_vae.get_loaded_vae_name``, the file's base name, also of a
    file in a subfolder); a ComfyUI image's name is relative to the folder, with or without extension (so a
    checkpoint's ``x.safetensors`` is not ``sub/x.safetensors``)."""
    stem = _stem(rel)
    return name in (_stem(file.name), stem, rel, stem.replace("/", "_")) or (base_name and name == file.name)


def _hash_or_unreadable(file: Path, kind: str) -> str:
    """:func:`hash_of` for an error message: an unreadable file is said, not raised (the message is the error)."""
    try:
        return hash_of(file, kind)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"


@dataclass(frozen=True)
class PngFileMatch:
    """What :func:`match_png_file` found for an infotext's name and hash: ``file`` and its name below its folder
    (``rel``; ``None`` when nothing was found), the files whose name is the infotext's (``named``: for a "not
    found" message, or the ambiguous ones without a hash), and the hash looked for (``None`` without one)."""

    file: Path | None
    rel: str | None
    named: tuple[tuple[Path, str], ...]
    wanted: str | None


def match_png_file(
    name: str | None,
    file_hash: str | None,
    listing: Sequence[tuple[Path, str]],
    say: Callable[[str], None] | None = None,
    what: str = "model hash",
    base_name: bool = False,
) -> PngFileMatch:
    """The file of ``listing`` (:func:`list_model_files`) that an infotext's name and hash pick, the one rule
    behind ``--from-png``'s checkpoint (:func:`find_png_model`) and VAE (:func:`find_png_vae`): the files whose
    name is ``name`` (:func:`_infotext_name_matches`), the one whose hash is ``file_hash`` when there is one
    (:func:`is_model_hash`), else every other file by that hash (:func:`find_by_hash`; ``say``/``what`` for its
    notice); without a hash the name alone, when it names one file. ``base_name``: a file's base name with its
    extension names it too (A1111's "VAE"). Nothing found is ``file`` ``None``."""
    name = _comfy_name(name) if name else None
    wanted = file_hash.lower() if file_hash and is_model_hash(file_hash) else None
    named = tuple((file, rel) for file, rel in listing if name and _infotext_name_matches(name, file, rel, base_name))
    rel_of = {file: rel for file, rel in reversed(listing)}  # a file's first name
    if wanted is not None:
        for file, _ in named:
            try:
                if hash_of(file, wanted) == wanted:
                    return PngFileMatch(file, rel_of[file], named, wanted)
            except OSError:
                continue
        found = find_by_hash(wanted, [file for file, _ in listing if file not in dict(named)], say, what)
        if found is not None:
            return PngFileMatch(found, rel_of[found], named, wanted)
    elif name is not None:
        files = list(dict.fromkeys(file for file, _ in named))
        if len(files) == 1:
            return PngFileMatch(files[0], rel_of[files[0]], named, None)
    return PngFileMatch(None, None, named, wanted)


def _folders_text(folders: Sequence[Path]) -> str:
    """The folders searched, for a "not found" message (and a hint when none of them exists)."""
    where = ", ".join(str(folder.absolute()) for folder in folders)
    if all(not folder.is_dir() for folder in folders):
        where += " (none of which exists: point --models-dir at A1111's or ComfyUI's models folder)"
    return where


def _other_hashes(match: PngFileMatch) -> str:
    """``; of that name, with another hash: rel (hash), ...`` for a "not found" message, or nothing."""
    if not match.named or match.wanted is None:
        return ""
    wanted = match.wanted
    return "; of that name, with another hash: " + ", ".join(
        f"{rel} ({_hash_or_unreadable(file, wanted)})" for file, rel in match.named
    )


def find_png_model(
    model_name: str | None,
    model_hash: str | None,
    folders: Sequence[Path],
    say: Callable[[str], None] | None = None,
) -> tuple[Path, str]:
    """The checkpoint an image's infotext names (``Model: name``, ``Model hash: abcdef1234``) below ``folders``,
    for ``generate --from-png`` without ``--model``, and the line that says which (``model from the PNG: NAME
    (hash)``), found by :func:`match_png_file`. Anything else is a :class:`~sdcore.errors.ConfigError` naming
    the hash, the name and the folders searched, and saying to pass ``--model``."""
    match = match_png_file(model_name, model_hash, list_model_files(folders), say)
    wanted = match.wanted
    if match.file is not None:
        how = wanted if wanted is not None else "by its name: the PNG has no Model hash"
        return match.file, f"model from the PNG: {match.rel} ({how})"
    files = list(dict.fromkeys(file for file, _ in match.named))
    if wanted is None and len(files) > 1:
        raise ConfigError(
            f"--from-png: the PNG's model {model_name!r} (no Model hash) is the name of {len(files)} model files "
            f"({', '.join(str(file) for file in files)}); pass --model with the one to use"
        )
    if wanted is None and not model_name:
        raise ConfigError("--from-png: the PNG names no model (no 'Model hash' nor 'Model' field); pass --model")
    what = " and ".join(
        part
        for part in (f"model hash {wanted}" if wanted else "", f"name {model_name!r}" if model_name else "")
        if part
    )
    raise ConfigError(
        f"--from-png: no model file with the PNG's {what} in {_folders_text(folders)} and their subfolders"
        f"{_other_hashes(match)}; pass --model (the file's path or name) to choose one"
    )


def vae_files(
    models_dir: str | os.PathLike[str], extra: ExtraModelPaths | None = None
) -> tuple[list[Path], list[Path], list[tuple[Path, str]]]:
    """The VAE files an infotext's "VAE" may name, as A1111 lists them (``sd_vae.refresh_vae_list``): every model
    file below the VAE folders (:func:`part_folders`), then A1111's ``NAME.vae.safetensors`` (``.vae.pt``,
    ``.vae.ckpt``: :data:`~sdcore.models.detect.A1111_VAE_SUFFIXES`) files below the checkpoint folders. Returns
    the VAE folders, the checkpoint folders and the listing (file, name below its folder)."""
    from ..models.detect import A1111_VAE_SUFFIXES

    vae_folders = part_folders("vae", models_dir, extra)
    kind, subdirs = MODEL_FOLDERS[0]
    checkpoint_folders = (extra or ExtraModelPaths()).order(kind, [Path(models_dir) / name for name in subdirs])
    beside = [(file, rel) for file, rel in list_model_files(checkpoint_folders)
              if file.name.lower().endswith(A1111_VAE_SUFFIXES)]  # fmt: skip
    return vae_folders, checkpoint_folders, list_model_files(vae_folders) + beside


def find_png_vae(
    vae_name: str | None,
    vae_hash: str | None,
    models_dir: str | os.PathLike[str],
    extra: ExtraModelPaths | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[Path | None, str]:
    """The VAE an image's infotext names (A1111's ``VAE: name.safetensors``, ``VAE hash: abcdef1234``: the file's
    base name and the start of its sha256) among :func:`vae_files`, for ``generate --from-png`` without ``--vae``,
    found by :func:`match_png_file` as the checkpoint is, and the line to say: ``VAE from the PNG: NAME (hash)``,
    or, with ``None``, a warning naming the VAE and the folders searched (the image is still made, with the
    model's own VAE: it differs from the PNG's only in its decoding)."""
    vae_folders, checkpoint_folders, listing = vae_files(models_dir, extra)
    match = match_png_file(vae_name, vae_hash, listing, say, "VAE hash", base_name=True)
    wanted = match.wanted
    if match.file is not None:
        how = wanted if wanted is not None else "by its name: the PNG has no VAE hash"
        return match.file, f"VAE from the PNG: {match.rel} ({how})"
    files = list(dict.fromkeys(file for file, _ in match.named))
    own = "the model's own VAE decodes"
    if wanted is None and len(files) > 1:
        return None, warning_line(
            f"the PNG's VAE {vae_name!r} (no VAE hash) is the name of {len(files)} files "
            f"({', '.join(str(file) for file in files)}); {own}: pass --vae with the one to use"
        )
    what = ", ".join(part for part in (repr(vae_name) if vae_name else "", f"hash {wanted}" if wanted else "") if part)
    return None, warning_line(
        f"the PNG's VAE ({what}) is not in {_folders_text(vae_folders)} and their subfolders, nor beside "
        f"a checkpoint (NAME.vae.safetensors) in {', '.join(str(f.absolute()) for f in checkpoint_folders)}"
        f"{_other_hashes(match)}; {own}: pass --vae to choose one"
    )


def module_files(
    models_dir: str | os.PathLike[str], extra: ExtraModelPaths | None = None
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files a Forge "Module N" may name: every model file below the VAE and text encoder folders
    (:func:`part_folders`: Forge's ``VAE/`` and ``text_encoder/`` among them, which its ``module_list`` walks).
    Returns the folders (each once) and the listing (file, name below its folder)."""
    folders: list[Path] = []
    for part in ("vae", "clip_l"):  # every text encoder part has clip_l's folders
        for folder in part_folders(part, models_dir, extra):
            if not any(folder == known or _same(folder, known) for known in folders):
                folders.append(folder)
    return folders, list_model_files(folders)


def find_png_module(
    name: str, models_dir: str | os.PathLike[str], extra: ExtraModelPaths | None = None
) -> tuple[Path | None, str]:
    """The file a Forge "Module N" field names (its stem, no hash: Forge's paste takes the file of its
    ``module_list`` whose name without extension it is) among :func:`module_files`, found by
    :func:`match_png_file`, and its name below its folder; ``None`` with why not (not there, or the name of
    several files)."""
    folders, listing = module_files(models_dir, extra)
    match = match_png_file(name, None, listing, base_name=True)
    if match.file is not None:
        return match.file, match.rel or match.file.name
    files = list(dict.fromkeys(file for file, _ in match.named))
    if len(files) > 1:
        return None, f"is the name of {len(files)} files ({', '.join(str(file) for file in files)})"
    return None, f"is not in {_folders_text(folders)} and their subfolders"


def resolve_model_name(
    text: str,
    models_dir: str | os.PathLike[str] | None,
    extra: ExtraModelPaths | None = None,
    notes: list[str] | None = None,
    say: Callable[[str], None] | None = None,
) -> str:
    """What ``--model text`` loads: ``text`` itself when it is a path or another source, else the file (or
    diffusers folder) its name picks below ``models_dir``'s model folders (:func:`model_folders`,
    :func:`diffusers_folders`).

    Precedence: a ``scheme:`` source (``tiny:sd1``, ``toyworld:``, a plugin's) and an existing file or folder are
    ``text`` unchanged, so is a path written as one (absolute, ``./``, ``~``). Otherwise the name is looked up
    as ComfyUI's ``ckpt_name``: the file whose path relative to a model folder is ``text`` (the first folder that
    has it wins, as ComfyUI's ``get_full_path``), else the one file whose relative path without its extension is
    ``text`` (``sdxl/juggernaut``), else the one file named ``text`` with or without extension in any subfolder
    (``juggernaut.safetensors``, ``juggernaut``). ComfyUI's ``diffusers/`` folders (:func:`diffusers_folders`)
    are searched too: a folder below one that holds a ``model_index.json`` is the model its path relative to that
    folder names (``sdxl/base``, the ``DiffusersLoader`` node's ``model_path``; the first diffusers folder that
    has it, as that node loads it), in the tier of the relative path without extension, and by its last folder name (``base``) in the tier of the file name. A name of a Hugging
    Face id's form (``org/name``, no
    extension) that is in the Hub cache stays the Hub id, as it was before names existed, even where a
    ``checkpoints/org/name.safetensors`` exists too: that file is then reached by its name with the extension,
    and ``notes`` gets a line saying so. Several files for a name is a :class:`~sdcore.errors.ConfigError`
    listing them; no file (and no cached Hub id) is one naming the folders searched and the close names, before
    anything loads.

    A1111's spellings (``sd_models.get_closet_checkpoint_match``, ``CheckpointInfo.ids``): a checkpoint title,
    ``sub/name.safetensors [abcdef1234]``, is its name resolved as above, then checked against its hash (8 hex: the
    legacy hash); A1111 falls back to the name without the hash, so another hash loads that file too, with a line
    in ``notes``. A name that finds no file but is a hash (8, 10 or 64 hex, A1111's aliases) is the first model
    file that has it (:func:`find_by_hash`; ``say`` is told when that reads many bytes)."""
    from ..models.load import looks_like_path, missing_model_error

    name_part, title_hash = split_a1111_title(text)
    if title_hash is not None and models_dir is not None and not _is_path(text, models_dir):
        found_name = resolve_model_name(name_part, models_dir, extra, notes, say)
        if Path(found_name).is_file() and notes is not None:
            ours = hash_of(found_name, title_hash)
            if ours != title_hash:
                notes.append(
                    f"--model {text}: {found_name} has hash {ours}, not {title_hash}; it is loaded by its name, as "
                    "A1111 does"
                )
        return found_name
    if _is_path(text, models_dir):
        return text
    assert models_dir is not None
    hub_id = not looks_like_path(text)
    name = _comfy_name(text)
    folders = model_folders(models_dir, extra)
    diffusers = diffusers_folders(models_dir, extra)
    direct, by_stem, by_file_name, files = _named_files(name, folders, diffusers)
    if direct is not None:
        return str(direct)
    if hub_id and _in_hub_cache(text):
        if by_stem and notes is not None:
            listed = ", ".join(str(path) for path in by_stem)
            folder = any(path.is_dir() for path in by_stem)  # a diffusers folder: no name with an extension
            notes.append(
                f"--model {text}: the Hugging Face Hub repo in the cache, not {listed} below --models-dir "
                + (
                    "(give its path to load it)"
                    if folder
                    else "(give that file's name with its extension, or its path, to load it)"
                )
            )
        return text
    found = _pick("--model", text, (by_stem, by_file_name))
    if found is not None:
        return str(found)
    if is_model_hash(text):  # a diffusers folder has no A1111 hash
        by_hash = find_by_hash(text, [file for file, _ in files if not file.is_dir()], say)
        if by_hash is not None:
            return str(by_hash)
    raise ConfigError(
        f"{missing_model_error(text)}; nor is it a model name {_searched(name, [*folders, *diffusers], files)}"
    )


#: the folders below ``--models-dir`` a part option's NAME (``--vae ae``, ``--t5xxl t5xxl_fp16``) is looked for
#: in, by part (``load_model`` keyword): ComfyUI's folder name (the ``extra_model_paths.yaml`` key, legacy
#: ``clip`` read as ``text_encoders``) and the subfolders in search order: ComfyUI's (``vae/``; ``text_encoders/``
#: then its legacy ``clip/``, as its ``folder_paths``), then A1111's and Forge's (``VAE/``, Forge's
#: ``text_encoder/``). The T5 tokenizer is a folder, which no UI keeps in a models folder: paths only.
PART_FOLDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "clip_l": ("text_encoders", ("text_encoders", "clip", "text_encoder")),
    "clip_g": ("text_encoders", ("text_encoders", "clip", "text_encoder")),
    "t5xxl": ("text_encoders", ("text_encoders", "clip", "text_encoder")),
    "vae": ("vae", ("vae", "VAE")),
}


def part_folders(part: str, models_dir: str | os.PathLike[str], extra: ExtraModelPaths | None = None) -> list[Path]:
    """Every folder a ``part`` option's NAME is looked for in, first one first (existing or not):
    :data:`PART_FOLDERS` below ``models_dir`` (one folder once: ``vae/`` and ``VAE/`` are one on a disk that
    ignores case), with the ``extra_model_paths.yaml`` folders of its kind where ComfyUI puts them."""
    kind, subdirs = PART_FOLDERS[part]
    defaults: list[Path] = []
    for name in subdirs:
        folder = Path(models_dir) / name
        if not any(_same(folder, known) for known in defaults):
            defaults.append(folder)
    return (extra or ExtraModelPaths()).order(kind, defaults)


def resolve_part_name(
    part: str,
    text: str,
    models_dir: str | os.PathLike[str] | None,
    extra: ExtraModelPaths | None = None,
) -> str:
    """What a part option (``--vae``, ``--clip-l``, ``--clip-g``, ``--t5xxl``: ``part`` is its ``load_model``
    keyword) given ``text`` loads: ``text`` when it is a path (as :func:`resolve_model_name` tells them), else the
    file its name picks below the part's folders (:func:`part_folders`), looked up as ComfyUI's ``vae_name`` and
    ``clip_name`` are and as :func:`resolve_model_name` looks up a checkpoint (``flux/ae.safetensors``,
    ``flux/ae``, ``ae.safetensors``, ``ae``). An ambiguous or unknown name is a
    :class:`~sdcore.errors.ConfigError` naming the files, or the folders searched and the close names; a part
    without folders (the T5 tokenizer) is ``text`` unchanged."""
    from ..models.parts import PART_LABELS, flag

    if part not in PART_FOLDERS or _is_path(text, models_dir):
        return text
    assert models_dir is not None
    name = _comfy_name(text)
    folders = part_folders(part, models_dir, extra)
    direct, by_stem, by_file_name, files = _named_files(name, folders)
    found = direct or _pick(flag(part), text, (by_stem, by_file_name))
    if found is not None:
        return str(found)
    raise ConfigError(
        f"{flag(part)} {text}: no such file or folder (the {PART_LABELS[part]}), nor a file of that name "
        + _searched(name, folders, files)
    )


def resolve_part_names(
    parts: Mapping[str, object],
    models_dir: str | os.PathLike[str] | None,
    extra: ExtraModelPaths | None = None,
) -> tuple[dict[str, str], list[str]]:
    """:func:`resolve_part_name` for each given part of ``parts`` (``load_model`` keywords to values; ``None``
    and ``""`` are not given): the parts that resolved (a part without folders unchanged), and a problem line
    for each that did not (every part is tried, so all are said at once)."""
    resolved: dict[str, str] = {}
    problems: list[str] = []
    for part, value in parts.items():
        if value is None or value == "":
            continue
        try:
            resolved[part] = resolve_part_name(part, str(value), models_dir, extra)
        except ConfigError as exc:
            problems.append(str(exc))
    return resolved, problems


@dataclass
class ResolvedSources:
    """What :func:`resolve_sources` made of a command's ``--model`` and part options."""

    model: str
    parts: dict[str, str]
    extra: ExtraModelPaths
    problems: list[str]
    notes: list[str]


def resolve_sources(
    model: str,
    parts: Mapping[str, object],
    models_dir: str | os.PathLike[str] | None,
    extra_files: Iterable[str | os.PathLike[str]] = (),
    *,
    plugin_format: bool = False,
    say: Callable[[str], None] | None = None,
    model_origin: str | None = None,
) -> ResolvedSources:
    """The model and part names of one run, for ``sdcore generate`` and ``sdcore train`` alike, before anything
    loads: ComfyUI's ``extra_model_paths.yaml`` files read (the root's beside ``models_dir``, then ``extra_files``:
    :func:`load_extra_model_paths`), ``model`` resolved (:func:`resolve_model_name`; not when a plugin's model
    format claims it: ``plugin_format``) and each given part (:func:`resolve_part_names`). Every problem is one
    line of ``problems`` (all are said at once; an unresolved model or part keeps its text); ``notes`` are lines
    to show without stopping (the root's file unreadable, a Hub id chosen over a file of its name, an A1111 title's
    other hash); ``say`` is told before a scan by hash reads many bytes. ``model_origin`` says where a ``model``
    the user did not type comes from (``generate --from-png``'s ComfyUI graph): its problem starts with it and
    ends saying to pass ``--model``, as the user never wrote that name."""
    notes: list[str] = []
    problems: list[str] = []
    try:
        extra = load_extra_model_paths(models_dir, extra_files, notes)
    except ConfigError as exc:
        problems.append(str(exc))
        extra = ExtraModelPaths()
    if not plugin_format:
        try:
            model = resolve_model_name(model, models_dir, extra, notes, say)
        except ConfigError as exc:
            if model_origin is None:
                problems.append(str(exc))
            else:
                problems.append(f"{model_origin}: {exc}; pass --model (the file's path or name) to choose one")
    resolved, wrong = resolve_part_names(parts, models_dir, extra)
    return ResolvedSources(model, resolved, extra, problems + wrong, notes)


__all__ = [
    "DIFFUSERS_FOLDER",
    "EXTRA_MODEL_PATHS_FILE",
    "LEGACY_FOLDER_NAMES",
    "MODEL_FOLDERS",
    "MODEL_INDEX_FILE",
    "PART_FOLDERS",
    "SCAN_NOTICE_BYTES",
    "ExtraFolder",
    "ExtraModelPaths",
    "PngFileMatch",
    "ResolvedSources",
    "comfy_folder_name",
    "diffusers_folders",
    "find_by_hash",
    "find_png_model",
    "find_png_module",
    "find_png_vae",
    "hash_of",
    "is_model_hash",
    "list_diffusers_models",
    "list_model_files",
    "load_extra_model_paths",
    "match_png_file",
    "model_folders",
    "module_files",
    "part_folders",
    "read_extra_model_paths",
    "resolve_model_name",
    "resolve_part_name",
    "resolve_part_names",
    "resolve_sources",
    "split_a1111_title",
    "vae_files",
]

"""The contract between ``sdcore generate`` and the plugins that apply networks from the prompt.

A prompt such as ``"a cat <lora:style:0.8> <hypernet:anime:1>, mychar-embedding"`` is parsed by
the core into :class:`NetworkRef` items. Each registered handler (see
:class:`sdcore.specs.PromptNetworkSpec`) whose ``tag`` matches receives its refs, applies them to
the bundle for one generation and returns an :class:`Activation` whose ``undo`` restores the
model exactly. Handlers with ``tag = None`` (textual-inversion embeddings) receive no refs but may
rewrite the prompt text (for example, register embedding tokens found in it).

A tagged handler may offer embeddings for the rest of the activation (a LoRA file with bundled embeddings, as A1111
reads them): it lists them in :attr:`Activation.embeddings`, and the session hands them to the untagged handlers that
set :attr:`PromptNetworkHandler.accepts_embeddings` (in :attr:`PromptNetworkHandler.extra_embeddings`), so the
prompt word works while that network is in the prompt, and neither plugin imports the other.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import NetworkMismatchError

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle
    from ..models.bundled_embeddings import BundledEmbedding


def _is_file(path: Path) -> bool:
    """Whether a prompt's network name is an existing file; a name the OS cannot even look up (too long, a
    NUL byte) is no file, so it gets the "not found" line with the names there are instead of a traceback."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _distinct_files(paths: Iterable[Path]) -> list[Path]:
    """``paths`` without the ones that are the same file as an earlier one (found through two search folders, a
    symlinked folder or file, or two spellings of one path), in the order given: one file is one candidate, never
    an "ambiguous" name or a name listed twice. Sameness is the file's identity (device and inode, as
    :func:`os.path.samefile`), because ``resolve()`` keeps the case it is given on macOS: on a case-insensitive
    disk ``models/lycoris`` and the ``LyCORIS`` folder searched beside it are one folder it does not unify. A
    path that cannot be looked up (missing, a symlink loop) is compared by its resolved, case-normalised spelling."""
    seen: set[object] = set()
    out = []
    for path in paths:
        key: object = None
        try:
            info = path.stat()
            if info.st_ino:  # 0 where a filesystem has no file ids (some network and FAT drives)
                key = (info.st_dev, info.st_ino)
        except (OSError, ValueError):
            pass
        if key is None:
            try:
                key = os.path.normcase(path.resolve())
            except (OSError, RuntimeError, ValueError):  # a symlink loop: its own spelling
                key = os.path.normcase(path.absolute())
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out


@dataclass(frozen=True)
class NetworkRef:
    """One ``<tag:name:w1[:w2...]>`` occurrence. A1111 allows a second weight (LoRA: text encoder
    weight first, UNet weight second); :attr:`weight` is the first, default 1.0."""

    tag: str
    name: str
    weights: tuple[float, ...] = ()
    text: str = ""
    named: tuple[tuple[str, float], ...] = ()
    """A1111's named arguments in prompt order: ``<lora:x:te=0.5:unet=1>`` gives
    ``(("te", 0.5), ("unet", 1.0))``. Positional weights, if any, come before them."""

    @property
    def weight(self) -> float:
        return self.weights[0] if self.weights else 1.0

    def arg(self, index: int, name: str, default: float) -> float:
        """The ``index``-th positional weight or the argument called ``name``, else ``default``.

        LoRA reads ``te = ref.arg(0, "te", 1.0)`` and ``unet = ref.arg(1, "unet", te)``, which covers
        ``<lora:x:0.5:1>`` and ``<lora:x:te=0.5:unet=1>`` alike.
        """
        for key, value in self.named:
            if key == name:
                return value
        if index < len(self.weights):
            return self.weights[index]
        return default


@dataclass(frozen=True)
class ControlNetwork:
    """A network file that turns the model into one taking a control image while it is applied (BFL's FLUX.1
    Depth/Canny control LoRAs widen dev's ``img_in``: :func:`sdcore.models.flux.control.widen_img_in`), as its
    handler tells from the file's header (:meth:`PromptNetworkHandler.control_network`)."""

    path: Path
    #: what it is, for the line that asks for a control image ("... is a FLUX.1 Depth/Canny control LoRA")
    what: str


class _NotFoundError(NetworkMismatchError):
    """:meth:`PromptNetworkHandler.find` met no file of that name (so :meth:`~PromptNetworkHandler.check` can
    list every such name in one line)."""


def _noop() -> None:
    return None


@dataclass
class Activation:
    """What a handler did: the (possibly rewritten) prompts, how to undo it, and PNG info fields."""

    prompt: str
    negative_prompt: str
    undo: Callable[[], None] = _noop
    info: dict[str, str] = field(default_factory=dict)
    #: embeddings this (tagged) activation offers to the embedding handlers for as long as it is active (a LoRA's
    #: bundled embeddings, each with ``network`` set to the name the prompt gave it)
    embeddings: list[BundledEmbedding] = field(default_factory=list)


class PromptNetworkHandler:
    """Base class for prompt-network handlers (LoRA, hypernetworks, embeddings).

    ``directory`` is where the user keeps these files (``--lora-dir`` ...); ``None`` means only
    explicit paths work.
    """

    tag: ClassVar[str | None] = None
    suffixes: ClassVar[tuple[str, ...]] = (".safetensors", ".pt", ".ckpt", ".bin")
    #: what the user calls these files, for messages ("LoRA", "hypernetwork")
    kind: ClassVar[str] = "network"
    #: where A1111 keeps these files, said when a name is not found in the default folder (an extension's
    #: folder is not below ``models/``, so a handler can say where it is instead)
    a1111_folder_note: ClassVar[str] = "as in A1111"
    #: ``True`` when :meth:`activate` resolves each ref's name with :meth:`find` (LoRA, hypernetworks): then
    #: :meth:`check` resolves them the same way before the model loads. A handler whose names are no files,
    #: or that resolves them otherwise, leaves it ``False`` (or overrides :meth:`check`).
    resolves_names: ClassVar[bool] = False
    #: ``True`` for an untagged handler that applies embeddings offered by tagged ones (:attr:`extra_embeddings`);
    #: when none does, the session says once that a network's bundled embeddings are not applied
    accepts_embeddings: ClassVar[bool] = False

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        # The ``sdcore generate`` option that sets the folder (``"lora_dir"``: ``--lora-dir``) and whether the
        # folder is its default (``--models-dir``'s A1111 subfolder), set by
        # :func:`sdcore.generate.session.handlers_from_plugin_manager` so "not found" can say how to point at it.
        self.directory_option: str | None = None
        self.directory_is_default = False
        # Further default folders searched after ``directory`` (A1111's root ``embeddings/`` and
        # ``models/embeddings`` when both exist), set by :func:`sdcore.generate.session.handlers_from_plugin_manager`.
        self.more_directories: tuple[Path, ...] = ()
        # Other default folders, none of which exists either (ComfyUI's ``models/loras`` when A1111's
        # ``models/Lora`` is missing too), named by "not found" so the user sees every folder it would read.
        self.absent_directories: tuple[Path, ...] = ()
        # Extra generation options (``sdcore generate -O key=value`` and plugin-added flags), set by
        # :func:`sdcore.generate.session.handlers_from_plugin_manager`; handlers read what they need.
        self.options: dict[str, Any] = {}
        # Embeddings the prompt's tagged networks offer (bundled in a LoRA file), set by
        # :class:`sdcore.generate.session.NetworkSession` for a handler that :attr:`accepts_embeddings` while it calls
        # :meth:`activate` (with vectors) or :meth:`check_prompts` (names and shapes only), in prompt order.
        self.extra_embeddings: tuple[BundledEmbedding, ...] = ()

    def search_folders(self) -> list[Path]:
        """The folders :meth:`available` searches, first one first: :attr:`directory`, then
        :attr:`more_directories`. A handler whose peer tool also reads a folder the options do not name (A1111's
        ``models/LyCORIS`` beside ``models/Lora``) adds it here, so the lookup and "not found" both see it."""
        return [f for f in (self.directory, *self.more_directories) if f is not None]

    def available(self) -> list[Path]:
        """Files this handler could load from its :meth:`search_folders` (recursively, into linked folders as
        ComfyUI and A1111 follow them: :func:`sdcore.generate.model_paths.list_model_files`), leaving out
        resumable training states (a folder with ``train_state.json``: its ``trainable.safetensors`` has a
        network's keys but is no network to name in a prompt)."""
        from .model_paths import list_model_files

        folders = self.search_folders()
        # each folder's files in path order, as the listing was before it followed links: of two hard links to
        # one file (one candidate) the first in that order is kept
        files = _distinct_files(
            p
            for folder in folders
            for p in sorted(q for q, _ in list_model_files([folder], self.suffixes))
            if p.is_file()
        )
        states = {folder for folder in {p.parent for p in files} if (folder / "train_state.json").is_file()}
        return sorted(p for p in files if p.parent not in states)

    def accepts(self, path: Path) -> bool:
        """Whether ``path`` holds this handler's kind of network, judged from its keys or metadata
        (:func:`sdcore.models.peek.peek_file`), not only its suffix. The default accepts any file."""
        return True

    def find(self, name: str) -> Path:
        """Resolve a prompt name to a file: an existing path, or ``<directory>/**/<name><suffix>``.

        Only files of this handler's kind (:meth:`accepts`) count: with ``--lora-dir out``,
        ``<lora:mychar>`` never picks an APT embedding ``out/apt/mychar.pt``. Several files of the
        right kind with that name are an error listing them.
        """
        direct = Path(name)
        if _is_file(direct):
            return direct
        named = _distinct_files(p for p in self.available() if p.stem == name or p.name == name)
        mine = [p for p in named if self.accepts(p)]
        if len(mine) == 1:
            return mine[0]
        label = self.tag or self.kind
        if mine:
            listed = ", ".join(str(p) for p in mine)
            raise NetworkMismatchError(
                f"{label} {name!r} is ambiguous: {len(mine)} {self.kind} files have that name ({listed}); "
                "rename one or give the path of the one you mean"
            )
        where = self.directory or "(no directory set)"
        if named:
            listed = ", ".join(str(p) for p in named)
            raise NetworkMismatchError(
                f"{label} {name!r}: no {self.kind} file of that name in {where} ({listed} "
                f"{'is' if len(named) == 1 else 'are'} not a {self.kind} file)"
            )
        raise _NotFoundError(self._not_found([name]))

    def _not_found(self, names: Sequence[str]) -> str:
        """The message for ``names`` that match no file, with the names there are (one line for them all): where
        it looked (the folder as an absolute path, and whether it exists) and the option that sets the folder,
        as A1111 users expect their files in its ``models/Lora`` and need to be told how to point there."""
        label = self.tag or self.kind
        # only files of this kind: a training state's optimizer.pt or rng.safetensors is no name to offer
        files = (p for p in _distinct_files(self.available()) if self.accepts(p))
        known = ", ".join(itertools.islice(dict.fromkeys(p.stem for p in files), 20)) or "none"
        if self.directory is None:
            where = "(no directory set)"
        else:
            missing = "" if self.directory.is_dir() else ", which does not exist"
            if missing and self.absent_directories:
                absent = ", ".join(str(folder.absolute()) for folder in self.absent_directories)
                missing = f", which does not exist (nor does {absent})"
            more = "".join(f" and {folder.absolute()}" for folder in self.search_folders() if folder != self.directory)
            where = f"{self.directory.absolute()}{more} and its subfolders{missing}"
        message = f"{label} {', '.join(repr(name) for name in names)} not found in {where}; available: {known}"
        if self.directory_option:
            flag = "--" + self.directory_option.replace("_", "-")
            default = ""
            if self.directory_is_default and self.directory is not None:
                default = (
                    f" (the default is the {self.directory.name} folder of --models-dir, {self.a1111_folder_note})"
                )
            message += f"; point {flag} at the folder with your {self.kind} files{default}"
        return message

    def check(self, names: Iterable[str]) -> list[str]:
        """Why :meth:`find` would fail for each of ``names``, as :meth:`activate` will call it, without loading
        any file: ``sdcore generate`` calls it before the model loads, so every missing file of every prompt
        (plot cells included) is reported at once instead of one at a time after the load. Names that match
        no file share one line; ambiguous names and files of another kind get :meth:`find`'s own message.

        Without :attr:`resolves_names` it finds nothing (``activate`` reports what it meets, after the load);
        a handler with its own resolver overrides it."""
        if not self.resolves_names:
            return []
        problems: list[str] = []
        missing: list[str] = []
        for name in dict.fromkeys(names):
            try:
                self.find(name)
            except _NotFoundError:
                missing.append(name)
            except NetworkMismatchError as exc:
                problems.append(str(exc))
        if missing:
            problems.append(self._not_found(missing))
        return problems

    def check_prompts(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
        """Why :meth:`activate` would fail on the words of ``prompts`` (``(prompt, negative prompt)`` pairs, tags
        removed), one line each, without loading a model: for a handler that reads names from the prompt text
        itself rather than from tags. :meth:`sdcore.generate.session.NetworkSession.check` calls it before the model
        loads, so a missing file is said then, with the tags' missing files. The default finds nothing."""
        return []

    def check_ref(self, ref: NetworkRef) -> str | None:
        """Why ``ref``'s arguments are wrong for this handler (one line), else ``None``; needs no file or model:
        :meth:`sdcore.generate.session.NetworkSession.check` calls it before the model loads, so an unknown
        argument is an error there instead of being dropped in silence. The default accepts anything."""
        return None

    def offered_embeddings(self, name: str) -> list[BundledEmbedding]:
        """The embeddings the file ``name`` resolves to carries (names and shapes, read from its header, no tensor
        loaded), for :meth:`sdcore.generate.session.NetworkSession.check`, so a bundled word counts as known
        before the model loads. The default: none. A name that does not resolve may raise; the check ignores it
        (:meth:`check` reports it)."""
        return []

    def control_network(self, name: str) -> ControlNetwork | None:
        """The file ``name`` resolves to when applying it makes the model take a control image (its header tells:
        nothing is loaded), else ``None``. ``sdcore generate`` asks before the model loads, so such a network
        without ``--control-image`` is one line then, and a Depth/Canny default guidance can follow its file
        name. The default: no network of this handler does."""
        return None

    def activation_key(self, refs: Sequence[NetworkRef]) -> Hashable | None:
        """A value that is equal for two lists of ``refs`` exactly when :meth:`activate` would do the same thing
        with them to the same model: the same files (as they are on disk now: a file rewritten since must give
        another key), every argument, every option it reads (:attr:`options`), the same infotext and offered
        embeddings, and the prompts left as given. ``None`` (the default): never equal.

        With a key, :meth:`sdcore.generate.session.NetworkSession.apply` inside
        :meth:`~sdcore.generate.session.NetworkSession.keeping` leaves an activation applied after its prompt and
        reuses it when the next prompt's key is the same, instead of undoing and applying it again (A1111 keeps
        the networks applied to each layer and redoes them only when the wanted names and weights change:
        extensions-builtin/Lora networks.py ``network_apply_weights``). May resolve names (and raise what
        :meth:`activate` would); must not load or apply anything."""
        return None

    def activate(self, bundle: ModelBundle, refs: list[NetworkRef], prompt: str, negative_prompt: str) -> Activation:
        """Apply ``refs`` to ``bundle`` (or rewrite the prompts) and say how to undo it."""
        raise NotImplementedError


def undo_all(activations: Iterable[Activation]) -> None:
    """Undo activations in reverse order (later handlers may depend on earlier ones)."""
    for activation in reversed(list(activations)):
        activation.undo()


__all__: list[str] = ["Activation", "ControlNetwork", "NetworkRef", "PromptNetworkHandler", "undo_all"]

"""Route a prompt's ``<tag:name:w>`` networks to the plugin handlers, and undo them afterwards.

A :class:`NetworkSession` holds one handler per tag (``"lora"``, ``"hypernet"``) plus any number
of untagged handlers (``None``: textual-inversion embeddings, aesthetic gradients). For one
prompt it parses the tags, refuses tags nobody handles (a silently ignored ``<lora:...>`` is the
worst kind of bug: the image looks plausible), calls the tagged handlers with their refs, then
the untagged ones, each seeing the prompt as the previous handler left it, and undoes all of
them in reverse order when the generation ends, also when it fails. Inside :meth:`NetworkSession.keeping`
(every ``generate_images`` call, all of ``sdcore generate``) tagged networks whose handler can say that the next
prompt's are the same (:meth:`~sdcore.generate.networks.PromptNetworkHandler.activation_key`) stay applied from
one prompt to the next, as A1111 keeps a LoRA merged between images.

Extra generation options (``sdcore generate -O key=value`` and flags that plugins add to the
command) reach handlers as ``handler.options``.

Embeddings a tagged network offers (a LoRA's bundled ones: :attr:`Activation.embeddings`) go to the untagged
handlers that accept embeddings, as A1111 registers a LoRA's bundled embeddings while the LoRA is in the prompt;
without such a handler the session says once that those words stay plain text.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, NetworkMismatchError, PluginError, SdcoreError
from .model_paths import ExtraModelPaths
from .networks import Activation, ControlNetwork, NetworkRef, PromptNetworkHandler, undo_all
from .prompt_syntax import parse_networks

DEFAULT_MODELS_DIR = Path("models")

log = logging.getLogger(__name__)


@dataclass
class AppliedNetworks:
    """What generation uses while a session is active: the final prompts and infotext fields."""

    prompt: str
    negative_prompt: str
    refs: list[NetworkRef] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)


class NetworkSession:
    """Handlers by tag; ``None`` (or any key given a list) may hold several untagged handlers."""

    def __init__(
        self,
        handlers: Mapping[str | None, PromptNetworkHandler | Sequence[PromptNetworkHandler]] | None = None,
        *,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.tagged: dict[str, PromptNetworkHandler] = {}
        self.untagged: list[PromptNetworkHandler] = []
        for tag, value in (handlers or {}).items():
            items = list(value) if isinstance(value, Sequence) else [value]
            if tag is None:
                self.untagged.extend(items)
            else:
                if len(items) != 1:
                    raise PluginError(f"tag {tag!r} is claimed by {len(items)} handlers; exactly one may handle it")
                self.tagged[tag] = items[0]
        if options is not None:
            for handler in self.handlers():
                handler.options = dict(options)
        # the embeddings offered by the networks of the ``apply`` now active (its further prompts: ``networks=False``)
        self._live_embeddings: list[Any] = []
        # (network, names) already said to need an embedding handler: said once a session
        self._unapplied_said: set[tuple[str, tuple[str, ...]]] = set()
        # keeping(): its depth, the networks it left applied, and how many apply(networks=True) blocks are open
        self._keep_depth = 0
        self._kept: _Kept | None = None
        self._open = 0

    def _embedding_handlers(self) -> list[PromptNetworkHandler]:
        return [handler for handler in self.untagged if handler.accepts_embeddings]

    def _say_unapplied(self, embeddings: Sequence[Any]) -> None:
        """Once a session per network: its bundled embeddings are not applied, as no installed plugin applies
        embeddings (its weights are)."""
        by_network: dict[str, list[str]] = {}
        for emb in embeddings:
            by_network.setdefault(emb.network or "a network", []).append(emb.name)
        for network, names in by_network.items():
            key = (network, tuple(names))
            if key in self._unapplied_said:
                continue
            self._unapplied_said.add(key)
            listed = ", ".join(repr(name) for name in names)
            log.warning(
                "%s",
                f"{network} carries the embedding{'s' if len(names) != 1 else ''} {listed}: applying them needs the "
                "textual inversion (embeddings) plugin, which is not installed or enabled, so those prompt words stay "
                "plain text; the network's weights are applied",
            )

    def handlers(self) -> list[PromptNetworkHandler]:
        return [*self.tagged.values(), *self.untagged]

    @property
    def known_tags(self) -> list[str]:
        return sorted(self.tagged)

    def parse(self, prompt: str, negative_prompt: str = "") -> tuple[str, str, list[NetworkRef]]:
        """Strip the tags and check each has a handler; nothing is applied yet."""
        clean, refs = parse_networks(prompt)
        clean_negative, negative_refs = parse_networks(negative_prompt)
        for problem in self._tag_problems(refs, negative_refs):
            raise problem
        return clean, clean_negative, refs

    def _tag_problems(self, refs: list[NetworkRef], negative_refs: list[NetworkRef]) -> list[SdcoreError]:
        """A tag in the negative prompt, and a tag no handler claims (the first ref of each such tag)."""
        problems: list[SdcoreError] = []
        if negative_refs:
            problems.append(
                ConfigError(
                    f"the negative prompt contains {negative_refs[0].text}: networks apply to the whole image, "
                    "put the tag in the prompt"
                )
            )
        known = ", ".join(self.known_tags) or "none (no network plugin is installed or enabled)"
        for tag in sorted({ref.tag for ref in refs if ref.tag not in self.tagged}):
            first = next(ref for ref in refs if ref.tag == tag)
            problems.append(NetworkMismatchError(f"no handler for {first.text} (tag {tag!r}); known tags: {known}"))
        return problems

    def check(self, prompts: Iterable[tuple[str, str]]) -> list[str]:
        """Every problem with the networks ``prompts`` (``(prompt, negative prompt)`` pairs) name, without
        loading a model or a network: malformed tags, tags in a negative prompt, tags no handler claims (the
        messages :meth:`parse` raises), arguments the handler does not take (its ``check_ref``) and names each handler cannot resolve to a file
        (:meth:`~sdcore.generate.networks.PromptNetworkHandler.check`, the lookup :meth:`apply` makes), and what the
        untagged handlers cannot resolve in the prompts' words (their
        :meth:`~sdcore.generate.networks.PromptNetworkHandler.check_prompts`).

        ``sdcore generate`` passes every prompt it will render (hires prompts, each X/Y/Z plot cell's after
        Prompt S/R and ``--style``), so a missing epoch file is found before the first cell, not at its own.
        Returns one line per problem; a handler's missing names share one line."""
        problems: list[str] = []
        names: dict[str, list[str]] = {}
        # each prompt's words with the embeddings its own networks offer (a word bundled in a LoRA is known there,
        # and only there: the same words with another LoRA are checked apart)
        entries: dict[tuple[tuple[str, str], tuple[str, ...]], tuple[Any, ...]] = {}
        for prompt, negative_prompt in prompts:
            try:
                clean, refs = parse_networks(prompt)
                clean_negative, negative_refs = parse_networks(negative_prompt)
            except SdcoreError as exc:  # a malformed tag
                problems.append(str(exc))
                continue
            problems += [str(problem) for problem in self._tag_problems(refs, negative_refs)]
            extra: list[Any] = []
            for ref in refs:
                if ref.tag in self.tagged:
                    names.setdefault(ref.tag, []).append(ref.name)
                    wrong = self.tagged[ref.tag].check_ref(ref)
                    if wrong:
                        problems.append(wrong)
                    with contextlib.suppress(SdcoreError):  # a name that resolves to no file: check() says so below
                        extra += self.tagged[ref.tag].offered_embeddings(ref.name)
            words = tuple(dict.fromkeys(emb.name for emb in extra))
            entries.setdefault(((clean, clean_negative), words), tuple(extra))
        for tag, tag_names in names.items():
            problems += self.tagged[tag].check(tag_names)
        texts = list(dict.fromkeys(text for text, _words in entries))
        groups: dict[tuple[str, ...], tuple[list[tuple[str, str]], tuple[Any, ...]]] = {}
        for (text, words), embeddings in entries.items():  # prompts whose networks offer the same words: together
            groups.setdefault(words, ([], embeddings))[0].append(text)
        for handler in self.untagged:  # names written in the prompt's words (embeddings)
            if not handler.accepts_embeddings:
                problems += handler.check_prompts(texts)
                continue
            for group, embeddings in groups.values():
                handler.extra_embeddings = embeddings
                try:
                    problems += handler.check_prompts(group)
                finally:
                    handler.extra_embeddings = ()
        return list(dict.fromkeys(problems))

    def control_networks(self, prompts: Iterable[tuple[str, str]]) -> list[ControlNetwork]:
        """The networks ``prompts`` name whose files make the model take a control image (each file once, judged
        from its header: :meth:`~sdcore.generate.networks.PromptNetworkHandler.control_network`). A tag or name
        that does not resolve counts as none here: :meth:`check` reports it."""
        found: dict[Path, ControlNetwork] = {}
        for prompt, _negative in prompts:
            try:
                _, refs = parse_networks(prompt)
            except SdcoreError:
                continue
            for ref in refs:
                handler = self.tagged.get(ref.tag)
                if handler is None:
                    continue
                try:
                    control = handler.control_network(ref.name)
                except SdcoreError:
                    continue
                if control is not None:
                    found.setdefault(control.path, control)
        return list(found.values())

    def control_problems(self, prompts: Iterable[tuple[str, str]], *, control_image: bool) -> list[str]:
        """Without a control image, one line per network of ``prompts`` that needs one (:meth:`control_networks`),
        said before the model loads."""
        if control_image:
            return []
        return [f"{control.what}: it needs a control image (a depth map or canny edges): add --control-image"
                for control in self.control_networks(prompts)]  # fmt: skip

    @staticmethod
    def _activate(
        handler: PromptNetworkHandler,
        bundle: Any,
        refs: list[NetworkRef],
        current: AppliedNetworks,
        activations: list[Activation],
    ) -> Activation:
        """One handler's activation on the prompts as the previous handler left them; its undo and infotext kept."""
        activation = handler.activate(bundle, refs, current.prompt, current.negative_prompt)
        if not isinstance(activation, Activation):
            raise PluginError(
                f"{type(handler).__name__}.activate returned {type(activation).__name__}, not an Activation"
            )
        activations.append(activation)
        current.prompt = activation.prompt
        current.negative_prompt = activation.negative_prompt
        NetworkSession._fold(activation, current)
        return activation

    @contextlib.contextmanager
    def keeping(self) -> Iterator[NetworkSession]:
        """While this block runs, the tagged networks a prompt applied stay applied after its :meth:`apply` ends
        when their handlers give an :meth:`~sdcore.generate.networks.PromptNetworkHandler.activation_key`, and
        the next :meth:`apply` on the same model object whose networks have the same keys reuses them instead of
        undoing and applying them again (A1111 keeps a LoRA merged from one image to the next and redoes it only
        when the wanted networks or weights change). Another set (or none) undoes the kept one first, so every
        prompt still sees exactly its own networks; so does an error in or under an :meth:`apply`.

        The block's end undoes what is kept, also on an error or Ctrl-C: the model comes back with its own
        weights bit for bit. Blocks nest; the outermost one's end undoes.
        :func:`sdcore.generate.pipeline.generate_images` runs inside one (a call's groups and hires passes), and
        ``sdcore generate`` holds one around all of its images and plot cells; a Python caller rendering several
        calls with one LoRA can hold one too. Training samples must not (the trained weights change between
        them, and an undo would restore stale ones): outside a block, every call leaves the model as it was."""
        self._keep_depth += 1
        try:
            yield self
        finally:
            self._keep_depth -= 1
            if self._keep_depth == 0:
                self.release()

    def release(self) -> None:
        """Undo the networks :meth:`keeping` left applied (nothing when none is)."""
        kept, self._kept = self._kept, None
        if kept is not None:
            undo_all(kept.activations)

    @property
    def kept_key(self) -> tuple[Any, ...] | None:
        """The key of the networks left applied (:meth:`keeping`), ``None`` when none are: for tests and logs."""
        return None if self._kept is None else self._kept.key

    @staticmethod
    def _keep_key(steps: Sequence[tuple[PromptNetworkHandler, list[NetworkRef]]]) -> tuple[Any, ...] | None:
        """The key of one prompt's tagged networks: each handler (itself) with its activation key, in order;
        ``None`` when a handler gives none."""
        parts: list[Any] = []
        for handler, refs in steps:
            key = handler.activation_key(refs)
            if key is None:
                return None
            parts.append((handler, key))
        return tuple(parts)

    @contextlib.contextmanager
    def apply(
        self, bundle: Any, prompt: str, negative_prompt: str = "", *, networks: bool = True
    ) -> Iterator[AppliedNetworks]:
        """Activate the prompt's networks for the duration of the ``with`` block.

        ``networks=False`` runs only the untagged handlers (prompt rewriting): for further prompts
        of a batch whose networks an outer ``apply`` already activated. Inside :meth:`keeping`, the tagged
        networks may stay applied after the block (see there); the untagged handlers run, and are undone, per
        prompt all the same (a LoRA's bundled embeddings included).
        """
        clean, clean_negative, refs = self.parse(prompt, negative_prompt)
        grouped: dict[str, list[NetworkRef]] = {}
        for ref in refs:
            grouped.setdefault(ref.tag, []).append(ref)
        tagged: list[Activation] = []  # undone at the end of the block unless kept
        untagged: list[Activation] = []
        current = AppliedNetworks(prompt=clean, negative_prompt=clean_negative, refs=refs)
        outer_embeddings = self._live_embeddings
        # embeddings offered by this prompt's networks (or, for a further prompt, by the outer apply's), in order
        offered: list[Any] = [] if networks else list(outer_embeddings)
        # the kept networks are reused or replaced only by an apply that is not inside another one's block
        outermost = networks and self._open == 0
        if networks:
            self._open += 1
        try:
            tagged_steps = [(self.tagged[tag], tag_refs) for tag, tag_refs in grouped.items()] if networks else []
            key = self._keep_key(tagged_steps) if outermost and (self._keep_depth or self._kept) else None
            kept = self._kept
            if outermost and kept is not None and key is not None and kept.bundle is bundle and kept.key == key:
                for activation in kept.activations:  # the same networks on the same model: as applied before
                    self._fold(activation, current)
                    offered += activation.embeddings
            else:
                if outermost:
                    self.release()  # another set (or none) wants the model as it was
                unchanged = True
                for handler, handler_refs in tagged_steps:
                    texts = (current.prompt, current.negative_prompt)
                    activation = self._activate(handler, bundle, handler_refs, current, tagged)
                    unchanged = unchanged and texts == (current.prompt, current.negative_prompt)
                    offered += activation.embeddings
                if outermost and self._keep_depth and key and unchanged:
                    self._kept, tagged = _Kept(bundle, key, tagged), []
            if networks:
                self._live_embeddings = list(offered)
                if offered and not self._embedding_handlers():
                    self._say_unapplied(offered)
            for handler in self.untagged:
                if handler.accepts_embeddings:
                    handler.extra_embeddings = tuple(offered)
                try:
                    self._activate(handler, bundle, [], current, untagged)
                finally:
                    handler.extra_embeddings = ()
            yield current
        except BaseException:
            undo_all([*tagged, *untagged])
            tagged = untagged = []
            if outermost:
                self.release()  # after an error the model is its own again, whatever the caller does next
            raise
        finally:
            if networks:
                self._open -= 1
            self._live_embeddings = outer_embeddings
            undo_all([*tagged, *untagged])

    @staticmethod
    def _fold(activation: Activation, current: AppliedNetworks) -> None:
        """``activation``'s infotext added to ``current`` (a kept one's too: its prompts are left as given, as its
        key promises)."""
        for key, value in activation.info.items():
            current.info[key] = f"{current.info[key]}, {value}" if key in current.info else value


@dataclass
class _Kept:
    """Tagged activations :meth:`NetworkSession.keeping` left applied: on which model, for which key."""

    bundle: Any
    key: tuple[Any, ...]
    activations: list[Activation]


def collect_prompt_network_specs(pm: Any) -> list[Any]:
    """The PromptNetworkSpecs every plugin registers.

    Uses the manager's checked registry (``SdPluginManager.prompt_networks()``: duplicate names
    are errors naming both plugins) when there is one, else calls the hook directly.
    """
    registry = getattr(pm, "prompt_networks", None)
    if callable(registry):
        return list(registry().values())
    specs: list[Any] = []
    pm.hook.sdcore_register_prompt_networks(register=specs.append)
    return specs


def _default_folders(
    spec: Any, models_dir: Path, extra: ExtraModelPaths | None = None
) -> tuple[list[Path], list[Path]]:
    """The folders a spec's files are looked for in without a folder option, first one first, and the ones of
    them that do not exist. Its ``root_subdir`` beside ``models_dir`` (A1111's root, found from the absolute path
    so ``--models-dir ..`` means the parent's parent), its ``default_subdir`` under it, then its ``more_subdirs``
    under it, with the folders ``extra`` (ComfyUI's ``extra_model_paths.yaml``) lists for its ``comfy_folder``
    where ComfyUI puts them (:meth:`~sdcore.generate.model_paths.ExtraModelPaths.order`). All that exist are
    searched: A1111 reads only ``webui/embeddings`` and ComfyUI only ``models/embeddings`` (A1111 ``models/Lora``,
    ComfyUI ``models/loras``), and a user may keep files in either; reading one of them alone would leave the
    other's words silently unapplied. None existing: the ``default_subdir`` (the folder "not found" names), and
    the others as absent."""
    under = models_dir / str(spec.default_subdir) if spec.default_subdir else None
    beside = Path(os.path.abspath(models_dir)).parent / str(spec.root_subdir) if spec.root_subdir else None
    if under is not None and beside is not None and os.path.abspath(under) == str(beside):
        beside = None  # --models-dir names the root itself (its parent is itself: "/")
    others = [models_dir / str(name) for name in spec.more_subdirs]
    candidates = [folder for folder in (beside, under, *others) if folder is not None]
    if extra is not None:
        candidates = extra.order(getattr(spec, "comfy_folder", None), candidates)
    existing = [folder for folder in candidates if folder.is_dir()]
    if existing or not candidates:  # none: a spec with only a comfy_folder no extra file lists
        return existing, []
    first = under or candidates[0]
    absent = [folder for folder in candidates if folder != first and folder != beside]
    return [first], absent


def handlers_from_plugin_manager(
    pm: Any,
    directories: Mapping[str, str | Path | None] | None = None,
    *,
    models_dir: str | Path = DEFAULT_MODELS_DIR,
    options: Mapping[str, Any] | None = None,
    extra_paths: ExtraModelPaths | None = None,
) -> dict[str | None, PromptNetworkHandler | list[PromptNetworkHandler]]:
    """Instantiate each registered handler with its folder.

    ``directories`` maps a spec's ``directory_option`` (``"lora_dir"``) to the folder the user
    chose (then that folder alone is searched); otherwise the folder is ``models_dir / spec.default_subdir``
    (A1111 layout: ``models/Lora``, ``models/hypernetworks``); a spec's ``root_subdir`` is looked for beside
    ``models_dir`` first (A1111 keeps ``embeddings/`` in its root, next to ``models/``), then
    ``models_dir / default_subdir`` (``models/embeddings``, ComfyUI's place), then the spec's ``more_subdirs``
    (``models/loras``), and the folders ``extra_paths`` (ComfyUI's ``extra_model_paths.yaml``,
    :func:`sdcore.generate.model_paths.load_extra_model_paths`) lists for the spec's ``comfy_folder``, in
    ComfyUI's order; all that exist are searched (:func:`_default_folders`).
    Two plugins claiming the same tag is a :class:`~sdcore.errors.PluginError`.
    """
    chosen = dict(directories or {})
    handlers: dict[str | None, Any] = {}
    owners: dict[str, str] = {}
    for spec in collect_prompt_network_specs(pm):
        cls = spec.load()
        if not (isinstance(cls, type) and issubclass(cls, PromptNetworkHandler)):
            raise PluginError(f"prompt network {spec.name!r}: {spec.handler} is not a PromptNetworkHandler subclass")
        directory = chosen.get(spec.directory_option) if spec.directory_option else None
        default = directory is None and bool(
            spec.default_subdir or spec.root_subdir or spec.more_subdirs or getattr(spec, "comfy_folder", None)
        )
        more: list[Path] = []
        absent: list[Path] = []
        if default:
            folders, absent = _default_folders(spec, Path(models_dir), extra_paths)
            directory, more = (folders[0], folders[1:]) if folders else (None, [])
        handler = cls(directory)
        handler.directory_option, handler.directory_is_default = spec.directory_option, default
        handler.more_directories = tuple(more)
        handler.absent_directories = tuple(absent)  # none exists: "not found" names them all
        handler.suffixes = tuple(spec.file_suffixes)  # type: ignore[misc]
        handler.options = dict(options or {})
        if spec.tag is None:
            handlers.setdefault(None, []).append(handler)
        elif spec.tag in handlers:
            raise PluginError(
                f"prompt network tag {spec.tag!r} is claimed by both {owners[spec.tag]!r} and {spec.name!r}"
            )
        else:
            handlers[spec.tag] = handler
            owners[spec.tag] = spec.name
    return handlers


def session_from_plugin_manager(
    pm: Any,
    directories: Mapping[str, str | Path | None] | None = None,
    *,
    models_dir: str | Path = DEFAULT_MODELS_DIR,
    options: Mapping[str, Any] | None = None,
    extra_paths: ExtraModelPaths | None = None,
) -> NetworkSession:
    """Shortcut: :func:`handlers_from_plugin_manager` wrapped in a :class:`NetworkSession`."""
    handlers = handlers_from_plugin_manager(pm, directories, models_dir=models_dir, options=options,
                                            extra_paths=extra_paths)  # fmt: skip
    return NetworkSession(handlers)


__all__ = [
    "DEFAULT_MODELS_DIR",
    "AppliedNetworks",
    "NetworkSession",
    "collect_prompt_network_specs",
    "handlers_from_plugin_manager",
    "session_from_plugin_manager",
]

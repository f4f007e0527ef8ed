"""The plugin manager: built-ins and installed plugins, loaded the same way, failures isolated.

Built-ins are plain modules listed in :data:`DEFAULT_PLUGINS` and registered with the same
``register`` call as third-party plugins (as pytest, llm and tox do). Installed plugins come from
the ``sdcore`` entry-point group, one at a time: a plugin whose import raises is recorded in
:attr:`SdPluginManager.load_errors` (shown by ``sdcore plugins``) and the rest keep working,
unless ``SDCORE_STRICT_PLUGINS=1``.

Order: built-ins first, then entry points. pluggy calls the most recently registered
implementation first, so a plugin's registration of a model format is tried before the built-in.

Environment switches (read by :func:`get_plugin_manager`):

- ``SDCORE_LOAD_PLUGINS=a,b``: load only these entry points ("" loads none);
- ``SDCORE_DISABLE_PLUGINS=a,b``: never import these entry points;
- ``SDCORE_STRICT_PLUGINS=1``: a plugin that fails to load is an error.
"""

from __future__ import annotations

import importlib
import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .models.family import ModelFamily
from .specs import MethodSpec, ModelFormatSpec, PromptNetworkSpec, Registration, TaggerSpec

GROUP = "sdcore"
DEFAULT_PLUGINS: tuple[str, ...] = (
    "sdcore.builtin.core_commands",
    "sdcore.builtin.model_formats",
    "sdcore.builtin.model_families",
    "sdcore.builtin.model_commands",
    "sdcore.builtin.data_commands",
    "sdcore.builtin.generate_command",
)
BUILTIN_DISTRIBUTION = "sdcore"


@dataclass(frozen=True)
class LoadError:
    """A plugin that could not be loaded or registered, kept for ``sdcore plugins``."""

    plugin: str
    distribution: str | None
    error: str
    detail: str = ""


@dataclass
class PluginInfo:
    """What ``sdcore plugins`` shows for one plugin."""

    name: str
    distribution: str | None
    version: str | None
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    builtin: bool = False


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _distribution_of(ep: metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


class SdPluginManager(pluggy.PluginManager):
    """pluggy's manager plus provenance, isolation and a typed facade over the registries."""

    def __init__(self) -> None:
        super().__init__(GROUP)
        self.add_hookspecs(hookspecs)
        self.load_errors: list[LoadError] = []
        self.distributions: dict[str, tuple[str | None, str | None]] = {}
        #: installed entry points left out by SDCORE_LOAD_PLUGINS/SDCORE_DISABLE_PLUGINS -> that variable;
        #: names those variables give that no installed entry point has -> the variable (for `sdcore plugins`)
        self.skipped: dict[str, str] = {}
        self.unknown_requested: dict[str, str] = {}
        self._registries: dict[str, dict[str, Registration]] | None = None

    # --- loading -----------------------------------------------------------------------------
    def register_builtin(self, module_name: str) -> None:
        module = importlib.import_module(module_name)
        self.register(module, name=module_name)
        self.distributions[module_name] = (BUILTIN_DISTRIBUTION, _own_version())

    def load_entrypoints(
        self, *, only: Iterable[str] | None = None, disabled: Iterable[str] = (), strict: bool = False
    ) -> None:
        """Import and register every ``sdcore`` entry point, isolating failures per plugin.

        Allow/deny lists are applied *before* importing, so a disabled plugin's code never runs.
        """
        allowed = None if only is None else set(only)
        blocked = set(disabled)
        for name in blocked:
            self.set_blocked(name)
        points = sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name)
        names = {ep.name for ep in points}
        for name, variable in ((n, "SDCORE_LOAD_PLUGINS") for n in sorted(allowed or ())):
            if name not in names:
                self.unknown_requested[name] = variable
        for name in sorted(blocked - names):
            self.unknown_requested[name] = "SDCORE_DISABLE_PLUGINS"
        for ep in points:
            dist_name, version = _distribution_of(ep)
            if ep.name in blocked or (allowed is not None and ep.name not in allowed):
                self.skipped[ep.name] = "SDCORE_DISABLE_PLUGINS" if ep.name in blocked else "SDCORE_LOAD_PLUGINS"
                continue
            if self.has_plugin(ep.name) or ep.name in self.distributions:
                other = self.distributions.get(ep.name, (None, None))[0]
                self._fail(ep.name, dist_name, f"entry point name {ep.name!r} is also used by {other}", strict)
                continue
            try:
                module = ep.load()
                self.register(module, name=ep.name)
            except Exception as exc:  # a plugin may raise anything at import or registration
                self._fail(ep.name, dist_name, f"{type(exc).__name__}: {exc}", strict, exc)
                continue
            unknown = self._unknown_hooks(module)
            if unknown:
                self.unregister(module)
                self._fail(ep.name, dist_name, f"implements hooks sdcore does not define: {', '.join(unknown)}", strict)
                continue
            self.distributions[ep.name] = (dist_name, version)

    def _unknown_hooks(self, plugin: object) -> list[str]:
        """Hook implementations with no matching spec (a typo would otherwise never be called)."""
        return sorted(caller.name for caller in self.get_hookcallers(plugin) or [] if caller.spec is None)

    def _fail(
        self, plugin: str, dist: str | None, message: str, strict: bool, exc: BaseException | None = None
    ) -> None:
        detail = "".join(traceback.format_exception(exc)) if exc is not None else ""
        self.load_errors.append(LoadError(plugin, dist, message, detail))
        if strict:
            raise PluginError(
                f"plugin {plugin!r} ({dist or 'unknown distribution'}) failed to load: {message}"
            ) from exc

    # --- registries --------------------------------------------------------------------------
    def _collect(self) -> dict[str, dict[str, Registration]]:
        """Run every ``sdcore_register_*`` hook once, recording which plugin registered what."""
        if self._registries is not None:
            return self._registries
        registries: dict[str, dict[str, Registration]] = {
            "method": {},
            "tagger": {},
            "prompt network": {},
            "model format": {},
            "model family": {},
        }
        hooks: dict[str, tuple[str, type]] = {
            "method": ("sdcore_register_methods", MethodSpec),
            "tagger": ("sdcore_register_taggers", TaggerSpec),
            "prompt network": ("sdcore_register_prompt_networks", PromptNetworkSpec),
            "model format": ("sdcore_register_model_formats", ModelFormatSpec),
            "model family": ("sdcore_model_families", ModelFamily),
        }
        for kind, (hook_name, spec_type) in hooks.items():
            caller = getattr(self.hook, hook_name)
            for impl in caller.get_hookimpls():  # registration order: built-ins first
                plugin_name = self.get_name(impl.plugin) or repr(impl.plugin)
                dist = self.distributions.get(plugin_name, (None, None))[0]

                def register(
                    item: Any,
                    _kind: str = kind,
                    _plugin: str = plugin_name,
                    _dist: str | None = dist,
                    _type: type = spec_type,
                ) -> None:
                    if not isinstance(item, _type):
                        raise PluginError(
                            f"plugin {_plugin!r} registered {item!r} as a {_kind}; expected {_type.__name__}"
                        )
                    names = [getattr(item, "name", ""), *getattr(item, "aliases", ())]
                    for name in names:
                        existing = registries[_kind].get(name)
                        if existing is not None:
                            raise PluginError(
                                f"{_kind} name {name!r} is registered twice: by {existing.plugin} "
                                f"({existing.distribution or 'unknown distribution'}) and by {_plugin} "
                                f"({_dist or 'unknown distribution'}); uninstall or disable one "
                                f"(SDCORE_DISABLE_PLUGINS={_plugin})"
                            )
                        registries[_kind][name] = Registration(_kind, name, _plugin, _dist, item)

                try:
                    if hook_name == "sdcore_model_families":  # returns its families instead of registering
                        for family in impl.function() or ():
                            register(family)
                    else:
                        impl.function(register=register)
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"plugin {plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}"
                    ) from exc
        self._registries = registries
        return registries

    def _items(self, kind: str) -> dict[str, Any]:
        return {name: reg.item for name, reg in self._collect()[kind].items()}

    def registrations(self, kind: str) -> dict[str, Registration]:
        return dict(self._collect()[kind])

    def methods(self) -> dict[str, MethodSpec]:
        """Training methods by name (aliases included)."""
        return self._items("method")

    def taggers(self) -> dict[str, TaggerSpec]:
        return self._items("tagger")

    def prompt_networks(self) -> dict[str, PromptNetworkSpec]:
        return self._items("prompt network")

    def model_formats(self) -> list[ModelFormatSpec]:
        """Formats in lookup order: the newest plugin's first, sdcore's built-ins last.

        Within one plugin the order it registered them in is kept.
        """
        order = [self.get_name(impl.plugin) for impl in self.hook.sdcore_register_model_formats.get_hookimpls()]
        items = list(self._collect()["model format"].values())
        return [reg.item for reg in sorted(items, key=lambda reg: -order.index(reg.plugin))]

    def model_families(self) -> dict[str, ModelFamily]:
        """Model families declared through ``sdcore_model_families`` (sdcore's own included)."""
        return self._items("model family")

    def add_commands(self, cli: Any) -> None:
        """Let every plugin add commands; one that raises is reported and skipped."""
        for impl in reversed(self.hook.sdcore_register_commands.get_hookimpls()):
            name = self.get_name(impl.plugin) or repr(impl.plugin)
            try:
                impl.function(cli=cli)
            except Exception as exc:
                self.load_errors.append(
                    LoadError(
                        name,
                        self.distributions.get(name, (None, None))[0],
                        f"sdcore_register_commands failed: {type(exc).__name__}: {exc}",
                    )
                )
                if _env_flag("SDCORE_STRICT_PLUGINS"):
                    raise PluginError(f"plugin {name!r} failed to add commands: {exc}") from exc

    # --- reporting ---------------------------------------------------------------------------
    def plugin_infos(self) -> list[PluginInfo]:
        registries = self._collect()
        infos = []
        for name, plugin in self.list_name_plugin():
            if plugin is None:
                continue
            dist, version = self.distributions.get(name, (None, None))
            hooks = sorted(h.name for h in self.get_hookcallers(plugin) or [])
            registered: dict[str, list[str]] = {}
            for kind, regs in registries.items():
                names = sorted(r.name for r in regs.values() if r.plugin == name)
                if names:
                    registered[kind] = names
            infos.append(PluginInfo(name, dist, version, hooks, registered, builtin=name in DEFAULT_PLUGINS))
        return sorted(infos, key=lambda i: (i.builtin, i.name))


def _own_version() -> str:
    from . import __version__

    return __version__


def get_plugin_manager(
    *,
    builtins: bool = True,
    entrypoints: bool = True,
    extra: Iterable[ModuleType | object] = (),
    strict: bool | None = None,
) -> SdPluginManager:
    """A fresh manager: built-ins, then entry points (per the environment switches), then ``extra``.

    There is no global manager; the CLI builds one in ``main()`` and tests build their own.
    """
    pm = SdPluginManager()
    if builtins:
        for module_name in DEFAULT_PLUGINS:
            pm.register_builtin(module_name)
    strict = _env_flag("SDCORE_STRICT_PLUGINS") if strict is None else strict
    if entrypoints:
        pm.load_entrypoints(
            only=_env_list("SDCORE_LOAD_PLUGINS"),
            disabled=_env_list("SDCORE_DISABLE_PLUGINS") or (),
            strict=strict,
        )
    for index, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", None) or f"extra-{index}-{type(plugin).__name__}"
        pm.register(plugin, name=name)
        pm.distributions.setdefault(name, (None, None))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook sdcore does not define: {exc}") from exc
    return pm

"""``sdcore.testing``: an opt-in pytest plugin for plugin authors.

Enable it in a ``conftest.py`` with ``pytest_plugins = ["sdcore.testing"]``. It adds fixtures:

- ``sd_pm_factory(plugins=(), builtins=True, entrypoints=False)``: a fresh plugin manager;
- ``sd_cli``: ``sd_cli(args, pm=None)`` runs the CLI in-process and returns click's result;
- ``temp_plugin``: ``with temp_plugin(pm, obj):`` registers an object for the block only;
- ``fake_distribution``: writes an installed distribution with ``sdcore`` entry points into a
  temporary ``site-packages`` on ``sys.path``, so the real entry-point loader runs;
- ``tiny_model``: ``tiny_model("sd1" | "sd2" | "sdxl")`` builds a tiny random ModelBundle (cached);
- ``tiny_dataset``: ``tiny_dataset(n=4, size=64)`` writes a kohya-style dataset folder;
- ``python_warnings_shown``: Python's warnings print on the stderr of the moment (click's, in ``sd_cli``), as they
  do outside pytest, which records them instead: a CLI test then sees the lines a user would.

It also gives each test session (each pytest-xdist worker) its own model hash cache (``sha256.json``, see
:mod:`sdcore.models.hashes`) in the session's temporary folder, so tests never write the user's or CI's shared
``$SDCORE_CACHE_DIR`` and two workers never race on one file.

Nothing here imports torch until a fixture that needs it runs.

:mod:`sdcore.testing.toyworld` is a toy world with a trained base model (``toyworld:``) and a
scorer, to measure whether a method teaches a concept; :mod:`sdcore.testing.contract` is the
contract suite every training method passes. :mod:`sdcore.testing.datasets` writes tiny datasets (and
inverted control images beside them); :mod:`sdcore.testing.devices` stands in for a GPU accelerator and
records the runtime's ``.to(...)`` moves without making them.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..plugins import SdPluginManager, get_plugin_manager


@pytest.fixture(autouse=True, scope="session")
def _sdcore_session_hash_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This session's ``sha256.json`` (in-process tests only: a ``sdcore`` subprocess uses the cache folder)."""
    from ..models import hashes

    before = hashes._HASH_CACHE_OVERRIDE
    hashes._HASH_CACHE_OVERRIDE = tmp_path_factory.mktemp("sdcore-hash-cache") / hashes.HASH_CACHE_FILE
    yield hashes._HASH_CACHE_OVERRIDE
    hashes._HASH_CACHE_OVERRIDE = before


@pytest.fixture
def sd_pm_factory() -> Callable[..., SdPluginManager]:
    """Return a factory of fresh managers holding exactly the chosen plugins."""

    def factory(
        plugins: tuple[Any, ...] | list[Any] = (), *, builtins: bool = True, entrypoints: bool = False
    ) -> SdPluginManager:
        return get_plugin_manager(builtins=builtins, entrypoints=entrypoints, extra=plugins)

    return factory


@pytest.fixture
def sd_cli() -> Callable[..., Any]:
    """Run ``sdcore`` in-process: ``result = sd_cli(["plugins"], pm=pm)``."""
    from click.testing import CliRunner

    from ..cli import build_cli

    def run(args: list[str], pm: SdPluginManager | None = None, **kwargs: Any) -> Any:
        manager = pm if pm is not None else get_plugin_manager(entrypoints=False)
        return CliRunner().invoke(
            build_cli(manager), args, catch_exceptions=kwargs.pop("catch_exceptions", True), **kwargs
        )

    return run


@pytest.fixture
def python_warnings_shown(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Python's warnings printed as outside pytest (``FILE:LINE: Category: message`` and the source line, on the
    current ``sys.stderr``), every time: pytest records them, so a test of what the command line prints would not
    see a warning the user sees."""
    import warnings

    def show(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", show)
        yield


@pytest.fixture
def temp_plugin() -> Callable[..., Any]:
    @contextlib.contextmanager
    def register(pm: SdPluginManager, plugin: object, name: str | None = None) -> Iterator[object]:
        pm.register(plugin, name=name)
        pm._registries = None
        try:
            yield plugin
        finally:
            pm.unregister(plugin)
            pm._registries = None

    return register


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """Install a fake distribution: ``fake_distribution("sdplugin-x", {"x": "sdplugin_x.plugin"}, modules={...})``.

    ``modules`` maps dotted module names to source code, written under the same temporary
    ``site-packages``. The folder is put first on ``sys.path`` and import caches are cleared.
    """
    site = tmp_path / "fake-site-packages"
    site.mkdir(exist_ok=True)
    monkeypatch.syspath_prepend(str(site))
    created_modules: list[str] = []

    def install(
        name: str, entry_points: dict[str, str], *, modules: dict[str, str] | None = None, version: str = "0.1.0"
    ) -> Path:
        normalized = name.replace("-", "_")
        dist_info = site / f"{normalized}-{version}.dist-info"
        dist_info.mkdir(parents=True, exist_ok=True)
        (dist_info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
        )
        lines = ["[sdcore]"] + [f"{key} = {value}" for key, value in entry_points.items()]
        (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for module_name, source in (modules or {}).items():
            parts = module_name.split(".")
            folder = site.joinpath(*parts[:-1])
            folder.mkdir(parents=True, exist_ok=True)
            for depth in range(1, len(parts)):
                init = site.joinpath(*parts[:depth], "__init__.py")
                if not init.exists():
                    init.write_text("", encoding="utf-8")
            (folder / f"{parts[-1]}.py").write_text(textwrap.dedent(source), encoding="utf-8")
            created_modules.append(module_name)
        importlib.invalidate_caches()
        return dist_info

    yield install
    for module_name in created_modules:
        for loaded in [m for m in sys.modules if m == module_name or m.startswith(module_name.split(".")[0])]:
            sys.modules.pop(loaded, None)
    importlib.invalidate_caches()


_TINY_CACHE: dict[tuple[str, int], Any] = {}


@pytest.fixture
def tiny_model() -> Callable[..., Any]:
    """``tiny_model(family="sd1", seed=0)`` -> a fresh deep copy of a cached tiny ModelBundle (any declared
    family: ``sd3`` too)."""
    import copy

    from ..models.family import family_adapter

    def make(family: str = "sd1", seed: int = 0) -> Any:
        key = (family, seed)
        if key not in _TINY_CACHE:
            _TINY_CACHE[key] = family_adapter(family).create_tiny(seed=seed)
        return copy.deepcopy(_TINY_CACHE[key])

    return make


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Callable[..., Path]:
    """``tiny_dataset(n=4, size=64, repeats=1, captions=True)`` -> the dataset root folder."""
    from .datasets import make_tiny_dataset

    counter = {"n": 0}

    def make(**kwargs: Any) -> Path:
        counter["n"] += 1
        return make_tiny_dataset(tmp_path / f"dataset-{counter['n']}", **kwargs)

    return make

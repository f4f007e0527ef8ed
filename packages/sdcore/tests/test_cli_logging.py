"""Records sent through ``logging`` print under the CLI as its own warnings do ("warning: ..."), once: on the main
process only, with nothing added to logging for a program that imports sdcore as a library."""

from __future__ import annotations

import logging
import subprocess
import sys
import types
import warnings

import pytest
from click.testing import CliRunner
from sdcore.cli import build_cli
from sdcore.hookspecs import hookimpl
from sdcore.plugins import get_plugin_manager


def _demo_plugin() -> types.ModuleType:
    """A plugin package of its own (``sdplugin_demo``) whose command logs at three levels, to two namespaces."""
    module = types.ModuleType("sdplugin_demo.plugin")

    @hookimpl
    def sdcore_register_commands(cli):
        @cli.command("log-demo")
        def log_demo() -> None:
            for _ in range(2):  # said again (as the sample prompts' warnings at each render): printed once
                logging.getLogger("sdplugin_demo.work").warning("the demo warns")
            logging.getLogger("sdcore.train").error("the demo failed to save: %s", "disk full")
            logging.getLogger("sdcore.train").info("the demo notes")

    module.sdcore_register_commands = sdcore_register_commands  # type: ignore[attr-defined]
    return module


@pytest.fixture
def demo_cli(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "SDCORE_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    # a run earlier in this test process may have left accelerate's state (process 0) behind
    monkeypatch.delitem(sys.modules, "accelerate.state", raising=False)
    return build_cli(get_plugin_manager(entrypoints=False, extra=[_demo_plugin()]))


def test_a_training_run_prints_a_logged_warning_once_as_a_cli_warning(tmp_path):
    """A real warning of a tiny run (a sample prompt's option sdcore does not use, logged by sdcore.train at each of
    the two renders) prints with the CLI's "warning: " before it, once, not bare (Python's last-resort handler
    printed it bare, at every render)."""
    from sdcore.testing.contract import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=1, size=64)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --zz 3 --s 1\n", encoding="utf-8")
    args = ["train", "lora", "--model", "tiny:sd1", "--data", str(data), "--output", str(tmp_path / "o.safetensors"),
            "--resolution", "64", "--max-steps", "2", "--no-progress", "--no-save-state",
            "--sample-prompts", str(prompts), "--sample-every", "1"]  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    message = "sample prompts: option --zz is not used by sdcore (left out of the prompt)"
    lines = [line for line in result.output.splitlines() if message in line]
    assert lines == [f"warning: {message}"], result.output


def test_plugin_and_sdcore_records_print_in_the_cli_form_and_still_reach_caplog(demo_cli, caplog):
    caplog.set_level(logging.INFO)
    result = CliRunner().invoke(demo_cli, ["log-demo"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["warning: the demo warns", "error: the demo failed to save: disk full"]
    # INFO is the library's record (the CLI prints its own line where one is due): not shown, still logged
    assert [r.getMessage() for r in caplog.records] == [
        "the demo warns",
        "the demo warns",
        "the demo failed to save: disk full",
        "the demo notes",
    ]
    # the handler lives as long as the command: a library user after it has logging as it was
    assert logging.getLogger("sdcore").handlers == []
    assert logging.getLogger("sdplugin_demo").handlers == []


def _class_plugin() -> type:
    """A plugin registered as a class (pluggy takes any namespace): its hooks are static methods, its package
    (``sdplugin_classdemo``) is the class's own ``__module__``, not ``builtins`` (the module of a class object's
    class)."""

    class ClassDemo:
        @staticmethod
        @hookimpl
        def sdcore_register_commands(cli):
            @cli.command("class-demo")
            def class_demo() -> None:
                logging.getLogger("sdplugin_classdemo.work").warning("the class plugin warns")

    ClassDemo.__module__ = "sdplugin_classdemo.plugin"
    return ClassDemo


def test_a_plugin_registered_as_a_class_logs_in_the_cli_form(monkeypatch):
    from sdcore.console import plugin_namespaces

    monkeypatch.delenv("SDCORE_DEBUG", raising=False)
    plugin = _class_plugin()
    assert plugin_namespaces([plugin]) == ["sdplugin_classdemo"]
    cli = build_cli(get_plugin_manager(entrypoints=False, extra=[plugin]))
    result = CliRunner().invoke(cli, ["class-demo"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["warning: the class plugin warns"]  # not bare, by the last-resort handler


def _warning_plugin() -> types.ModuleType:
    """A plugin package (``sdplugin_warndemo``) with a warning class of its own (as sdplugin_lora's documented
    ``LoraWarning``), whose command warns with it twice and with a library's category once."""
    module = types.ModuleType("sdplugin_warndemo.plugin")
    own = type("DemoWarning", (UserWarning,), {"__module__": "sdplugin_warndemo.apply"})

    @hookimpl
    def sdcore_register_commands(cli):
        @cli.command("warn-demo")
        def warn_demo() -> None:
            for _ in range(2):
                warnings.warn("3 keys matched no module", own, stacklevel=1)
            warnings.warn("a library's own note", FutureWarning, stacklevel=1)  # torch's, diffusers' ...

    module.sdcore_register_commands = sdcore_register_commands  # type: ignore[attr-defined]
    return module


def test_a_warning_class_of_a_plugin_prints_as_a_cli_warning_and_a_librarys_as_python_prints_it(
    monkeypatch, python_warnings_shown, caplog
):
    """A plugin's own warning category (a library user's documented ``warnings`` API) prints as ``warning: ...``,
    once, and reaches logging; a warning of another library's category keeps Python's ``FILE:LINE: Category:``
    form (not swallowed, as :func:`logging.captureWarnings` would with no handler on ``py.warnings``); after the
    command Python shows warnings as before."""
    monkeypatch.delenv("SDCORE_DEBUG", raising=False)
    before = warnings.showwarning
    cli = build_cli(get_plugin_manager(entrypoints=False, extra=[_warning_plugin()]))
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(cli, ["warn-demo"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "warning: 3 keys matched no module"
    assert lines[1].endswith(": FutureWarning: a library's own note") and __file__ in lines[1]
    assert not any("DemoWarning" in line for line in lines) and len([x for x in lines if "keys" in x]) == 1
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("sdplugin_warndemo.apply", "3 keys matched no module")
    ] * 2
    assert warnings.showwarning is before


def test_every_python_warning_of_ours_has_a_class_of_ours():
    """A ``warnings.warn`` in sdcore or a plugin with Python's own category (``UserWarning``) prints under the CLI
    as Python's two-line ``FILE:LINE: UserWarning: ...``: log it (``log.warning``) as every other note is, or give
    it a warning class of the package (a documented API, such as ``LoraWarning``), which the CLI prints as its own."""
    import ast
    import builtins
    from pathlib import Path

    packages = Path(__file__).parents[2]
    sources = sorted(packages.glob("*/src/**/*.py"))
    assert any(path.name == "apply.py" and "sdplugin_lora" in path.parts for path in sources)
    builtin = {name for name in dir(builtins) if name.endswith("Warning")}
    found = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warn"):
                continue
            if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "warnings"):
                continue
            category = (
                node.args[1]
                if len(node.args) > 1
                else next((k.value for k in node.keywords if k.arg == "category"), None)
            )
            if not isinstance(category, ast.Name) or category.id in builtin:
                found.append(f"{path.relative_to(packages)}:{node.lineno}")
    assert not found, f"log these (log.warning) or give them a warning class of their package: {', '.join(found)}"


def _accelerate_process(monkeypatch, index: int) -> None:
    state = types.ModuleType("accelerate.state")
    state.PartialState = type("PartialState", (), {"_shared_state": {"process_index": index}})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "accelerate.state", state)


@pytest.mark.parametrize("how", ["RANK", "LOCAL_RANK", "accelerate", "RANK, accelerate alone"])
def test_a_process_other_than_the_main_one_keeps_only_its_errors(demo_cli, monkeypatch, how):
    if how == "accelerate":  # a launcher that sets no RANK (mpirun): accelerate's process index tells
        _accelerate_process(monkeypatch, 1)
    elif how == "RANK, accelerate alone":  # torchrun on a CPU: accelerate saw no process group, index 0 everywhere
        _accelerate_process(monkeypatch, 0)
        monkeypatch.setenv("RANK", "1")
    else:
        monkeypatch.setenv(how, "1")
    result = CliRunner().invoke(demo_cli, ["log-demo"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["error: (process 1) the demo failed to save: disk full"]


def test_sdcore_debug_prints_every_level_with_its_logger(demo_cli, monkeypatch):
    monkeypatch.setenv("SDCORE_DEBUG", "1")
    monkeypatch.setenv("RANK", "1")  # every process, under SDCORE_DEBUG
    result = CliRunner().invoke(demo_cli, ["log-demo"], catch_exceptions=False)
    lines = result.output.splitlines()
    assert [line.split(" [")[0] for line in lines] == [
        "warning: (process 1) the demo warns",
        "warning: (process 1) the demo warns",
        "error: (process 1) the demo failed to save: disk full",
        "info: (process 1) the demo notes",
    ]
    assert lines[0].endswith(f"[sdplugin_demo.work, {__file__}:{_demo_line()}]")
    assert logging.getLogger("sdcore").level == logging.NOTSET  # the level the command set is undone


def _demo_line() -> int:
    import inspect

    source, start = inspect.getsourcelines(_demo_plugin)
    return start + next(i for i, line in enumerate(source) if "the demo warns" in line)


def test_importing_sdcore_adds_no_logging_handler():
    """A program using sdcore as a library (its CLI module and the training loop included) keeps standard
    logging: no handler on any sdcore or plugin logger, nor on the root logger."""
    code = (
        "import logging, sdcore, sdcore.cli, sdcore.console, sdcore.train.loop, sdplugin_lora.apply\n"
        "from sdcore.plugins import get_plugin_manager\n"
        "sdcore.cli.build_cli(get_plugin_manager())\n"
        "loggers = [logging.getLogger(n) for n in logging.root.manager.loggerDict if n.split('.')[0].startswith(("
        "'sdcore', 'sdplugin_'))]\n"
        "assert len(loggers) >= 3, loggers\n"
        "assert [(l.name, l.handlers) for l in loggers if l.handlers] == [], 'handler'\n"
        "assert logging.root.handlers == [], logging.root.handlers\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_no_module_spells_the_warning_prefix_itself():
    """Every CLI warning is built by :func:`sdcore.console.warning_line` (or ``warn``): a module writing its own
    ``"warning: "`` could drift from the form the logged warnings print in ("Warning:", a missing space)."""
    import ast
    from pathlib import Path

    import sdcore.console

    packages = Path(__file__).parents[2]
    sources = sorted(packages.glob("*/src/**/*.py"))
    assert any(path.samefile(sdcore.console.__file__) for path in sources)  # the tree scanned is the one tested
    spelled = []
    for path in sources:
        if path.samefile(sdcore.console.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            first = node.values[0] if isinstance(node, ast.JoinedStr) and node.values else node
            text = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else ""
            if text.lower().lstrip().startswith("warning:"):
                spelled.append(f"{path.relative_to(packages)}:{node.lineno}")
    assert not spelled, f"build these with sdcore.console.warning_line/warn: {', '.join(sorted(set(spelled)))}"

"""The ``--aesthetic-*`` options do nothing without ``--aesthetic`` (the handler is off): ``sdcore generate`` says
so before the model loads (``add_generate_option(needs=...)``), as it refuses ``--iterate-seed`` without
``--from-file``; ``--aesthetic`` given on the command line or as ``-O aesthetic=...`` satisfies it."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner


def _generate(tmp_path: Path, *extra: str) -> tuple[int, str]:
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    args = ["generate", "a castle", "-m", "tiny:sd1", "--steps", "1", "--size", "64x64", "-o", str(tmp_path / "o.png")]
    result = CliRunner().invoke(build_cli(get_plugin_manager()), [*args, *extra])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_aesthetic_options_alone_are_refused_before_the_model_loads(tmp_path: Path) -> None:
    code, out = _generate(tmp_path, "--aesthetic-weight", "0.5", "--aesthetic-slerp", "-O", "aesthetic_steps=3")
    assert code == 2, out
    assert (
        "Error: --aesthetic-weight, -O aesthetic_steps, --aesthetic-slerp only act with --aesthetic; give --aesthetic "
        "or drop them" in out
    )
    assert not (tmp_path / "o.png").exists()


def test_one_option_alone_is_named_alone(tmp_path: Path) -> None:
    code, out = _generate(tmp_path, "--aesthetic-negative")
    assert code == 2 and "Error: --aesthetic-negative only acts with --aesthetic; give --aesthetic or drop it" in out


@pytest.mark.parametrize("given", [["--aesthetic", "nosuch"], ["-O", "aesthetic=nosuch"]])
def test_aesthetic_given_either_way_satisfies_them(tmp_path: Path, given: list[str]) -> None:
    code, out = _generate(tmp_path, "--aesthetic-weight", "0.5", *given)
    assert "with --aesthetic; give --aesthetic" not in out
    assert code == 2 and "aesthetic embedding 'nosuch' not found" in out  # the lookup's own message, pre-flight


def test_defaults_alone_are_not_a_problem(tmp_path: Path) -> None:
    code, out = _generate(tmp_path)
    assert code == 0, out


def test_a_cell_that_sets_the_embedding_satisfies_them() -> None:
    """An X/Y/Z plot's cell or a --from-file line that sets ``aesthetic`` counts, as the command line does."""
    from sdcore.builtin.generate_command import _needs_problems
    from sdplugin_aesthetic.commands import register_generate_options

    register_generate_options()
    params = {"aesthetic": None, "aesthetic_weight": 0.5, "extra_pairs": {}}  # no click context: all typed
    assert _needs_problems(params, [params]) == [
        "--aesthetic-weight only acts with --aesthetic; give --aesthetic or drop it"
    ]
    assert _needs_problems(params, [params, {**params, "aesthetic": "style"}]) == []


def test_a_missing_embedding_is_refused_before_the_model_loads(tmp_path: Path, monkeypatch) -> None:
    """``--aesthetic NAME`` that names no file: the lookup's own line (where it looked, what is there, the folder
    option) with the pre-flight's other problems, exit 2, and no model loaded (it was said after the load, exit 1)."""
    from sdcore.builtin import generate_command

    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("the model must not load"))
    folder = tmp_path / "aes"
    folder.mkdir()
    (folder / "other.pt").write_bytes(b"")
    (tmp_path / "o.png").write_bytes(b"kept")  # an output in the way: another pre-flight problem
    code, out = _generate(tmp_path, "--aesthetic", "nosuch", "--aesthetic-dir", str(folder))
    assert code == 2, out
    assert f"aesthetic embedding 'nosuch' not found in {folder.absolute()} and its subfolders; available: other" in out
    assert "point --aesthetic-dir at the folder with your aesthetic embedding files" in out
    assert "o.png" in out and "--overwrite" in out  # said with the pre-flight's other problems, at once
    assert (tmp_path / "o.png").read_bytes() == b"kept"

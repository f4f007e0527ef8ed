"""kohya's ``--use_style_template``/``--use_object_template`` select textual inversion's ``style``/``subject``
templates, which a hypernetwork has not: the pre-flight names the flag as typed and the hypernetwork template
to give (``style_filewords``/``subject_filewords``), not a bare "no such file". Dry runs: no weights load."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sdcore.cli import build_cli
from sdcore.plugins import get_plugin_manager
from sdcore.testing.contract import make_tiny_dataset

BUILTINS = "(built-ins: hypernetwork, none, style_filewords, subject_filewords)"


def _errors(tmp_path, *extra: str) -> list[str]:
    data = tmp_path / "data"
    if not data.exists():
        make_tiny_dataset(data, n=2, size=64)
    args = ["train", "hn", "--model", "tiny:sd1", "--data", str(data), "--output", str(tmp_path / "o.pt"),
            "--resolution", "64", "--dry-run", *extra]  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 2, result.output
    return [line for line in result.output.splitlines() if line.startswith("Error: ")]


@pytest.mark.parametrize(
    ("flag", "name", "instead"),
    [("--use_style_template", "style", "style_filewords"), ("--use_object_template", "subject", "subject_filewords")],
)
def test_kohyas_ti_flags_name_the_flag_and_the_hn_template(tmp_path, flag, name, instead):
    (error,) = _errors(tmp_path, flag)
    assert error == (
        f"Error: {flag}: {name!r} is a textual-inversion template (kohya's TI flags select it), not a "
        f"hypernetwork's; give --template {instead} {BUILTINS}"
    )


def test_a_config_key_and_sdcores_flag_are_named_as_written(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("use_style_template = true\n", encoding="utf-8")
    (error,) = _errors(tmp_path, "--config", str(config))
    assert error.startswith(f"Error: {config}: use_style_template: 'style' is a textual-inversion template")
    (error,) = _errors(tmp_path, "--template", "subject")
    assert error.startswith("Error: --template: 'subject' is a textual-inversion template")
    assert "give --template subject_filewords" in error


def test_an_unknown_template_keeps_its_message(tmp_path):
    (error,) = _errors(tmp_path, "--template", "nosuch")
    assert error == f"Error: template 'nosuch': no such file and not a built-in ({BUILTINS[12:]}"

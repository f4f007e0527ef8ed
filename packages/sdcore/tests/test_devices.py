"""``--device`` of every command that takes one: a wrong spelling is refused when the command line is read.

``sdcore generate --device cuda0`` (or ``--device ""``, an unset shell variable) loaded the model first and then
ended in torch's traceback (``RuntimeError: Invalid device string``).
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sdcore.cli import build_cli
from sdcore.devices import device_problem
from sdcore.plugins import get_plugin_manager


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "a cat", "-m", "tiny:sd1", "-o", "x.png"],
        ["tag", "caption", "."],
        ["tag", "deepdanbooru", "."],
        ["aesthetic", "create", ".", "-o", "a.pt"],
    ],
)
@pytest.mark.parametrize("device", ["", " ", "cuda0", "gpu", "/tmp/x"])
def test_a_device_that_is_no_torch_device_is_refused_before_anything_loads(tmp_path, monkeypatch, command, device):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(build_cli(get_plugin_manager()), [*command, "--device", device])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '--device': {device!r} is not a torch device; use auto, cpu, cuda" in result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_real_devices_pass():
    assert [device_problem(d) for d in ("auto", "cpu", "cuda", "cuda:1", "mps", "meta")] == [None] * 6

"""The one shape every expected error of ``sdcore generate`` has (exit status 2, one ``Error:`` line, no
traceback), shared by the tests that read such messages."""

from __future__ import annotations

from typing import Any


def one_error_line(result: Any) -> str:
    """The message of a click ``Result`` that failed as an expected error does, without its ``Error: ``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0].removeprefix("Error: ")

"""Stop ``sdcore generate`` where it would load the model, recording what it asked for (one copy for the tests that
check which files a command line or a PNG chooses, without loading them)."""

from __future__ import annotations

from typing import Any


class StoppedAtLoad(Exception):
    """Raised in place of loading the model: the test reads what was asked."""


def stop_at_load(monkeypatch: Any) -> list[tuple[str, dict[str, Any]]]:
    """Patch generate's loader; each call appends ``(source, part keywords)`` and raises :class:`StoppedAtLoad`."""
    from sdcore.builtin import generate_command

    asked: list[tuple[str, dict[str, Any]]] = []

    def stop(source: str, pm: Any, **parts: Any) -> None:
        asked.append((source, parts))
        raise StoppedAtLoad

    monkeypatch.setattr(generate_command, "_load_bundle", stop)
    return asked

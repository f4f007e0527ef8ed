"""Print the first-party packages under packages/ in dependency order (dependencies first)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def first_party_dependencies(root: Path = ROOT) -> dict[str, list[str]]:
    """Each first-party package and the first-party packages it depends on."""
    names = sorted(p.parent.name for p in root.glob("packages/*/pyproject.toml") if not p.parent.name.startswith("_"))
    deps: dict[str, list[str]] = {}
    for name in names:
        data = tomllib.loads((root / "packages" / name / "pyproject.toml").read_text())
        wanted = [re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0] for req in data["project"].get("dependencies", [])]
        deps[name] = [w for w in wanted if w in names]
    return deps


def package_order(root: Path = ROOT) -> list[str]:
    deps = first_party_dependencies(root)
    names = sorted(deps)
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name not in ordered:
            for dep in deps[name]:
                visit(dep)
            ordered.append(name)

    for name in names:
        visit(name)
    return ordered


if __name__ == "__main__":
    print("\n".join(package_order()))

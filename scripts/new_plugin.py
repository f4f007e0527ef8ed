"""Create packages/sdplugin-<name>/ from packages/_template (``python scripts/new_plugin.py name "summary"``)."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def create(name: str, summary: str, packages: Path = ROOT / "packages") -> Path:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,30}", name):
        raise SystemExit(f"plugin name must be lowercase letters, digits or '_': {name!r}")
    target = packages / f"sdplugin-{name}"
    if target.exists():
        raise SystemExit(f"{target} already exists")
    shutil.copytree(packages / "_template", target, ignore=shutil.ignore_patterns("__pycache__"))
    (target / "src" / "sdplugin_NAME").rename(target / "src" / f"sdplugin_{name}")
    for path in target.rglob("*"):
        if path.is_file() and path.suffix in {".py", ".toml", ".md"}:
            text = path.read_text(encoding="utf-8")
            # the README's paragraph on using the template is not the new plugin's
            text = re.sub(r"<!-- template -->.*?<!-- /template -->\n\n", "", text, flags=re.S)
            text = text.replace("NAME", name).replace("SUMMARY", summary)
            path.write_text(text, encoding="utf-8")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name")
    parser.add_argument("summary", nargs="?", default="A training method for sdcore")
    args = parser.parse_args()
    print(create(args.name, args.summary))


if __name__ == "__main__":
    main()

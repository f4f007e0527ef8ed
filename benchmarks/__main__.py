"""``python -m benchmarks [NAME ...] [-- args]``: run the side-by-side benchmarks.

Each ``benchmarks/bench_<name>.py`` has ``main(argv) -> dict``, prints a table of ratios and
writes ``benchmarks/out/<name>.json``. With no name, every benchmark runs with its default
(CPU-sized) settings.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    folder = Path(__file__).parent
    return sorted(m.name[len("bench_") :] for m in pkgutil.iter_modules([str(folder)]) if m.name.startswith("bench_"))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(available())}")
    parser.add_argument("--list", action="store_true")
    argv = sys.argv[1:]
    rest: list[str] = []
    if "--" in argv:  # everything after `--` goes to the benchmarks themselves
        split = argv.index("--")
        argv, rest = argv[:split], argv[split + 1 :]
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(available()))
        return
    for name in args.names or available():
        if name not in available():
            raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(available())}")
        print(f"\n# benchmark: {name}")
        importlib.import_module(f"benchmarks.bench_{name}").main(rest)


if __name__ == "__main__":
    main()

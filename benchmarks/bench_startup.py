"""``sdcore --help`` start-up time with every plugin installed, against a bare interpreter.

Goal: under 0.5 s. The bare ``python -c pass`` start is the floor no CLI can beat.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from .common import print_table, write_json


def _time(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> dict:
    repeat = 7
    floor = _time([sys.executable, "-c", "pass"], repeat)
    help_time = _time([sys.executable, "-m", "sdcore", "--help"], repeat)
    train_help = _time([sys.executable, "-m", "sdcore", "train", "--help"], repeat)
    plugins = _time([sys.executable, "-m", "sdcore", "plugins"], repeat)
    rows = [
        ("python -c pass (floor)", f"{floor:.3f}", "1.00x"),
        ("sdcore --help", f"{help_time:.3f}", f"{help_time / floor:.2f}x"),
        ("sdcore train --help", f"{train_help:.3f}", f"{train_help / floor:.2f}x"),
        ("sdcore plugins", f"{plugins:.3f}", f"{plugins / floor:.2f}x"),
    ]
    print_table("start-up (median seconds)", rows, ("command", "seconds", "vs floor"))
    print(f"goal: sdcore --help < 0.5 s -> {'met' if help_time < 0.5 else 'MISSED'}")
    result = {"floor_s": floor, "help_s": help_time, "train_help_s": train_help, "plugins_s": plugins}
    write_json("startup", result)
    return result


if __name__ == "__main__":
    main()

"""Shared helpers: timing, peak RSS, result tables and JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).parent / "out"


@dataclass
class Measurement:
    name: str
    seconds: float
    runs: int
    peak_rss_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def time_call(fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(module: str, function: str, *args: str, timeout: int = 3600) -> dict[str, Any]:
    """Run ``module.function(*args)`` in a fresh interpreter so its peak RSS is its own.

    The function must return a JSON-serialisable dict; the child adds ``peak_rss_mb``.
    """
    code = (
        "import json, sys, resource, importlib\n"
        f"fn = getattr(importlib.import_module({module!r}), {function!r})\n"
        "result = fn(*sys.argv[1:])\n"
        "result['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print('RESULT=' + json.dumps(result))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parents[1],
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT="):
            return json.loads(line[len("RESULT=") :])
    raise RuntimeError(f"{module}.{function} failed:\n{proc.stderr[-4000:]}")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n## {title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def write_json(name: str, payload: dict[str, Any]) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **payload}
    path.write_text(
        json.dumps(payload, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    )
    print(f"\nraw figures: {path}")
    return path


#: ``--sdpa`` choices of the GPU scripts: which scaled-dot-product-attention kernels torch may pick
SDPA_CHOICES = ("default", "no-cudnn", "math")


def set_sdpa(choice: str) -> None:
    """Restrict torch's SDPA kernels for the whole process (torch 2.11 prefers cuDNN's on Hopper)."""
    if choice == "default":
        return
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)
    if choice == "math":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)

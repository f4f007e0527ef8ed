"""kohya's ``color_aug`` without OpenCV: sdcore's HSV conversions and hue step against ``cv2.cvtColor``.

kohya's hue step is ``cv2.cvtColor(rgb, COLOR_BGR2HSV)``, ``(h + shift) % 180`` truncated to 8 bits,
``cv2.cvtColor(hsv, COLOR_HSV2BGR)``. sdcore reimplements both conversions (:mod:`sdcore.data.augment`)
so it needs no OpenCV. This compares every 8-bit colour (BGR->HSV: 16.7 M, HSV->BGR: 11.8 M) and the
whole hue step on a 512x512 image for several shifts, and times the hue step (sdcore / cv2). OpenCV is
not a dependency: install ``opencv-python-headless`` (kohya pins 4.10.0.84) beside it to run this.
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import print_table, time_call, write_json


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench_kohya_color", description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv or [])
    try:
        import cv2
    except ImportError:
        print("cv2 is not installed (pip install opencv-python-headless==4.10.0.84): nothing to compare")
        return {}
    import numpy as np
    from sdcore.data.augment import bgr_to_hsv, hsv_to_bgr, hue_shift

    every = np.stack(np.meshgrid(*[np.arange(256)] * 3, indexing="ij"), -1).reshape(4096, 4096, 3).astype(np.uint8)
    to_hsv = int((cv2.cvtColor(every, cv2.COLOR_BGR2HSV) != bgr_to_hsv(every)).any(-1).sum())
    grid = np.meshgrid(np.arange(180), np.arange(256), np.arange(256), indexing="ij")
    hsv = np.stack(grid, -1).reshape(180 * 256, 256, 3).astype(np.uint8)
    to_bgr = int((cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR) != hsv_to_bgr(hsv)).any(-1).sum())

    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)

    def kohya(shift: float) -> Any:
        out = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        out[:, :, 0] = (out[:, :, 0] + shift) % 180
        return cv2.cvtColor(out, cv2.COLOR_HSV2BGR)

    shifts = (0.5, 3.7, 7.99, 172.2, 179.9)
    steps = {s: int((kohya(s) != hue_shift(image, s)).any(-1).sum()) for s in shifts}
    ours, _ = time_call(lambda: hue_shift(image, 3.7))
    theirs, _ = time_call(lambda: kohya(3.7))
    rows = [
        ("BGR->HSV, every colour", f"{to_hsv} of {every.shape[0] * every.shape[1]} differ"),
        ("HSV->BGR, every value", f"{to_bgr} of {hsv.shape[0] * hsv.shape[1]} differ"),
        *[(f"hue step {s} ({args.size}x{args.size})", f"{n} pixels differ") for s, n in steps.items()],
        ("hue step time sdcore / cv2", f"{ours * 1000:.1f} / {theirs * 1000:.1f} ms = {ours / theirs:.1f}x"),
    ]
    print_table(f"kohya color_aug: sdcore vs cv2 {cv2.__version__}", rows, ("check", "result"))
    result = {"cv2": cv2.__version__, "bgr2hsv_diff": to_hsv, "hsv2bgr_diff": to_bgr, "hue_step_diff": steps,
              "hue_step_s": {"sdcore": ours, "cv2": theirs}}  # fmt: skip
    write_json("kohya_color", result)
    return result

"""The main job, end to end, as a story you can see: teach the toy world's base model a new concept.

The base model that ships with sdcore (`toyworld:`, trained from scratch on flat circles, squares
and triangles in red, green, blue and yellow) has never seen a purple ring. The demo, through the
`sdcore` CLI as a user would run it:

1. writes a small kohya-layout dataset of the new concept (`10_sks/`: purple rings, no captions),
2. tags it with a WD14-contract ONNX tagger (a tiny graph built here: no download),
3. checks the dataset, renders the concept prompt on the base model (no purple ring there),
4. trains a LoCon through `sdcore train lora`,
5. renders the same prompt and seeds with `<lora:sks:1>`,
6. writes one grid PNG (top row before, bottom row after; A1111 parameters inside and beside it)
   and prints the scorer's `concept score before B, after A` as its last line.

    python scripts/demo.py [--out demo-output] [--steps 150] [--seeds 8]
    python scripts/demo.py --model path/to/real.safetensors --resolution 512   # the same job on a real model
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

TAGS = [  # (name, category): 9 = rating, 0 = general, 4 = character
    ("general", 9),
    ("sensitive", 9),
    ("questionable", 9),
    ("explicit", 9),
    ("red_theme", 0),
    ("green_theme", 0),
    ("blue_theme", 0),
    ("purple_theme", 0),
    ("simple_background", 0),
    ("no_humans", 0),
    ("pattern", 0),
    ("sks_character", 4),
]


def build_tiny_wd_tagger(folder: Path, size: int = 64) -> Path:
    """A WD v3-contract ONNX folder: NHWC BGR 0-255 input, sigmoid scores per tag in the CSV.

    The graph compares each colour channel's mean with the image's grey level, so tags depend on
    the image the way a real tagger's do (a red image gets red_theme), with no weights to download.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    names = [t for t, _ in TAGS]
    n = len(TAGS)
    # logits = (channel means - grey level) @ weights + bias: colour tags follow the dominant hue
    weights = np.zeros((3, n), dtype=np.float32)
    bias = np.full((n,), -4.0, dtype=np.float32)
    for channel, tag in ((2, "red_theme"), (1, "green_theme"), (0, "blue_theme")):  # BGR input
        weights[channel, names.index(tag)] = 0.12
        bias[names.index(tag)] = -2.0
    weights[:, names.index("purple_theme")] = (0.12, -0.24, 0.12)  # red and blue above green
    bias[names.index("purple_theme")] = -2.0
    for tag, b in (("general", 3.0), ("simple_background", 2.0), ("no_humans", 2.5)):
        bias[names.index(tag)] = b
    nodes = [
        helper.make_node("ReduceMean", ["input", "spatial_axes"], ["pooled"], keepdims=0),
        helper.make_node("ReduceMean", ["pooled", "channel_axis"], ["grey"], keepdims=1),
        helper.make_node("Sub", ["pooled", "grey"], ["deviation"]),
        helper.make_node("MatMul", ["deviation", "weights"], ["logits0"]),
        helper.make_node("Add", ["logits0", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_wd_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n])],
        initializer=[
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "spatial_axes"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "channel_axis"),
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (tag, category) in enumerate(TAGS):
            writer.writerow([i, tag, category, 1000 - i])
    return folder


def sdcore(*args: str) -> None:
    """Run one `sdcore` command like a user at a shell would, echoing it."""
    printable = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"\n$ sdcore {printable}", flush=True)
    subprocess.run([sys.executable, "-m", "sdcore", *args], check=True)


def concept_dataset(folder: Path, count: int = 8) -> Path:
    """`count` purple rings (the new concept: a shape and a colour the world lacks), no captions."""
    from sdcore.testing.toyworld.concepts import NEW_OBJECT

    return NEW_OBJECT.write_dataset(folder, count=count, repeats=10, captions=False)


def grid(before: list[Path], after: list[Path], scale: int = 4) -> Image.Image:
    """Top row: the base model; bottom row: with the LoCon; one column per seed."""
    from PIL import ImageDraw

    cells = [[Image.open(p).convert("RGB") for p in row] for row in (before, after)]
    side = cells[0][0].width * scale
    label = 64
    out = Image.new("RGB", (label + side * len(before), 2 * side), "white")
    draw = ImageDraw.Draw(out)
    for r, (row, name) in enumerate(zip(cells, ("before", "after"), strict=True)):
        draw.text((6, r * side + side // 2 - 6), name, fill="black")
        for c, image in enumerate(row):
            out.paste(image.resize((side, side), Image.Resampling.NEAREST), (label + c * side, r * side))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toyworld:", help="base model (default: the toy world's, toyworld:)")
    parser.add_argument("--out", default="demo-output", help="output folder (recreated)")
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--seeds", type=int, default=8, help="samples per row of the grid")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: 32, the toy world's)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    from sdcore.generate.pnginfo import read_png_parameters, save_png
    from sdcore.testing.toyworld import IMAGE_SIZE
    from sdcore.testing.toyworld.concepts import NEW_OBJECT

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = args.model
    resolution = args.resolution or IMAGE_SIZE
    sdcore("model", "info", model)

    # 1. a dataset of the new concept (kohya layout: 10 repeats), no captions yet
    images_dir = concept_dataset(out / "data")
    data = images_dir.parent

    # 2. tag it (the trigger word first, then the tagger's tags)
    tagger = build_tiny_wd_tagger(out / "wd-tiny")
    sdcore("tag", "wd14", str(images_dir), "--model-dir", str(tagger), "--include-first", "sks",
           "--general-threshold", "0.5")  # fmt: skip
    captions = [p.read_text(encoding="utf-8").strip() for p in sorted(images_dir.glob("*.txt"))]
    prompt = max(set(captions), key=captions.count)  # the concept prompt: the dataset's usual caption

    # 3. look at the data before any model loads; render the prompt on the base model
    buckets = ["--resolution", str(resolution), "--min-bucket-reso", str(resolution),
               "--max-bucket-reso", str(2 * resolution), "--bucket-step", str(resolution)]  # fmt: skip
    sdcore("data", "check", str(data), *buckets)
    lora_dir = out / "Lora"
    render = ["--model", model, "--lora-dir", str(lora_dir), "--seed", "100", "--batch", str(args.seeds),
              "--steps", "10", "--sampler", "ddim", "--cfg", "5", "--size", f"{resolution}x{resolution}"]  # fmt: skip
    samples = out / "samples"
    sdcore("generate", prompt, *render, "-o", str(samples / "before.png"))

    # 4. train a LoCon on the concept
    lora = lora_dir / "sks.safetensors"
    sdcore("train", "lora", "--model", model, "--data", str(data), "--output", str(lora),
           "--rank", "8", "--alpha", "8", "--conv-rank", "8", "--conv-alpha", "8",
           *buckets, "--batch-size", "4",
           "--max-steps", str(args.steps), "--lr", "2e-3", "--seed", "1")  # fmt: skip
    sdcore("lora", "info", str(lora))

    # 5. the same prompt and seeds with the LoCon
    sdcore("generate", f"{prompt} <lora:sks:1>", *render, "-o", str(samples / "after.png"))

    # 6. one grid, the A1111 parameters, the score
    n = args.seeds
    before = [samples / f"before-{i}.png" for i in range(n)] if n > 1 else [samples / "before.png"]
    after = [samples / f"after-{i}.png" for i in range(n)] if n > 1 else [samples / "after.png"]
    parameters = read_png_parameters(after[0])
    text = parameters.format() if parameters is not None else ""
    grid_path = save_png(grid(before, after), out / "grid.png", text)
    (out / "grid.txt").write_text(text + "\n", encoding="utf-8")
    score_before = NEW_OBJECT.score([Image.open(p) for p in before])
    score_after = NEW_OBJECT.score([Image.open(p) for p in after])
    print("\n== demo finished in %.0f s ==" % (time.time() - started))
    print(f"dataset:      {images_dir} ({len(captions)} purple rings, caption e.g. {captions[0]!r})")
    print(f"LoCon:        {lora}")
    print(f"prompt:       {prompt!r} on {model}, seeds 100..{100 + n - 1}")
    print(f"grid:         {grid_path}  (top: base model, bottom: with <lora:sks:1>)")
    print(f"parameters:   {out / 'grid.txt'}")
    print(f"concept score before {score_before:.2f}, after {score_after:.2f}")


if __name__ == "__main__":
    main()

"""The main job, end to end, through the `sdcore` CLI as a user would run it.

1. make a tiny SD1 model (or use --model PATH), 2. write a sample dataset with no captions,
3. tag it with a WD14-contract ONNX tagger (a tiny graph built here: no download),
4. check the dataset, 5. train a LoCon, 6. render the same seed with and without `<lora:...>`,
then print where everything is and how much the LoRA changed the image.

    python scripts/demo.py [--model path/to/model.safetensors] [--out demo-output] [--steps 80]
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
    ("simple_background", 0),
    ("no_humans", 0),
    ("pattern", 0),
    ("striped", 0),
    ("checkered", 0),
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
    for tag, b in (("general", 3.0), ("simple_background", 2.0), ("no_humans", 2.5), ("pattern", 1.5)):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a real checkpoint or diffusers folder (default: a tiny SD1 model made here)")
    parser.add_argument("--out", default="demo-output", help="output folder (recreated)")
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tiny = args.model is None
    resolution = 64 if tiny else 512
    steps = args.steps or (120 if tiny else 400)

    # 1. the model
    model = str(out / "tiny-sd1.safetensors") if tiny else args.model
    if tiny:
        sdcore("model", "create-tiny", model, "--family", "sd1", "--format", "single-file")
    sdcore("model", "info", model)

    # 2. a sample dataset: distinct patterns, no captions yet (kohya layout: 10 repeats)
    from sdcore.testing.datasets import make_tiny_dataset

    data = make_tiny_dataset(out / "data", n=6, size=resolution, repeats=10, captions=False)
    images_dir = data / "10_sks"

    # 3. tag it
    tagger = build_tiny_wd_tagger(out / "wd-tiny")
    sdcore(
        "tag",
        "wd14",
        str(images_dir),
        "--model-dir",
        str(tagger),
        "--include-first",
        "sks",
        "--general-threshold",
        "0.5",
    )

    # 4. look at it before any model loads
    sdcore("data", "check", str(data), "--resolution", str(resolution))

    # 5. train a LoCon
    lora_dir = out / "Lora"
    lora = lora_dir / "sks.safetensors"
    sdcore(
        "train",
        "lora",
        "--model",
        model,
        "--data",
        str(data),
        "--output",
        str(lora),
        "--rank",
        "8",
        "--alpha",
        "8",
        "--conv-rank",
        "4",
        "--conv-alpha",
        "4",
        "--resolution",
        str(resolution),
        "--batch-size",
        "2",
        "--max-steps",
        str(steps),
        "--lr",
        "1e-3" if tiny else "1e-4",
        "--seed",
        "1",
    )
    sdcore("lora", "info", str(lora))

    # 6. render with and without the LoRA, same seed
    prompt = "sks, pattern, simple background"
    without = out / "sample-without-lora.png"
    with_lora = out / "sample-with-lora.png"
    common = ["--model", model, "--lora-dir", str(lora_dir), "--seed", "7", "--steps", "20"]
    if tiny:
        common += ["--size", f"{resolution}x{resolution}"]
    sdcore("generate", prompt, *common, "-o", str(without))
    sdcore("generate", f"{prompt} <lora:sks:1>", *common, "-o", str(with_lora))

    a = np.asarray(Image.open(without).convert("RGB"), dtype=np.float32)
    b = np.asarray(Image.open(with_lora).convert("RGB"), dtype=np.float32)
    diff = float(np.abs(a - b).mean())
    captions = sorted(images_dir.glob("*.txt"))
    print("\n== demo finished in %.0f s ==" % (time.time() - started))
    print(f"model:            {model}")
    print(f"dataset:          {images_dir} ({len(captions)} captions, e.g. {captions[0].read_text().strip()!r})")
    print(f"LoCon:            {lora}")
    print(f"without LoRA:     {without}")
    print(f"with <lora:sks:1>: {with_lora}")
    print(f"mean |difference| between the two samples: {diff:.2f} / 255 per channel")
    if diff == 0.0:
        raise SystemExit("the LoRA did not change the image: something is wrong")


if __name__ == "__main__":
    main()

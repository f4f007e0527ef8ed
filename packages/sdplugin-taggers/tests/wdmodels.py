"""Tiny WD-contract ONNX models for tests, built with the onnx helper API.

The graph ignores image content except for its mean pixel: ``out = mean(x)/255 * W + B`` with
per-tag constants, so every probability in a test is known exactly (W = 0 gives constants).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# (name, category, constant probability) in output order; ratings first as in real files.
TAGS: list[tuple[str, int, float]] = [
    ("general", 9, 0.7),
    ("sensitive", 9, 0.2),
    ("questionable", 9, 0.05),
    ("explicit", 9, 0.05),
    ("1girl", 0, 0.95),
    ("long_hair", 0, 0.6),
    ("^_^", 0, 0.5),
    ('don\'t_say_"lazy"', 0, 0.4),
    ("solo", 0, 0.3),
    ("blue_sky", 0, 0.1),
    ("hatsune_miku_(vocaloid)", 4, 0.9),
    ("other_char", 4, 0.5),
    ("third_char", 4, 0.02),
]


def write_tags_csv(path: Path, tags: Sequence[tuple[str, int, float]] = TAGS) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat, _) in enumerate(tags):
            writer.writerow([1000 + i, name, cat, 100])
    return path


def build_graph(
    weights: Sequence[float],
    bias: Sequence[float],
    *,
    size: int = 32,
    v2: bool = False,
    fixed_batch: int = 1,
) -> onnx.ModelProto:
    """NHWC float input -> ``mean/255 * W + B`` of shape [batch, n]."""
    n = len(weights)
    in_name, out_name = ("input_1:0", "predictions_sigmoid") if v2 else ("input", "output")
    batch: int | str = fixed_batch if v2 else "batch_size"
    x = helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [batch, size, size, 3])
    y = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, n])
    inits = [
        numpy_helper.from_array(np.asarray([[w / 255.0 for w in weights]], dtype=np.float32), "W"),
        numpy_helper.from_array(np.asarray([list(bias)], dtype=np.float32), "B"),
        numpy_helper.from_array(np.asarray([-1, 1], dtype=np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("ReduceMean", [in_name], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["m", "shape"], ["m2"]),
        helper.make_node("Mul", ["m2", "W"], ["scaled"]),
        helper.make_node("Add", ["scaled", "B"], [out_name]),
    ]
    graph = helper.make_graph(nodes, "tiny_wd", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_wd_model(
    folder: Path,
    *,
    tags: Sequence[tuple[str, int, float]] = TAGS,
    weights: Sequence[float] | None = None,
    size: int = 32,
    v2: bool = False,
    fixed_batch: int = 1,
    csv_rows: Sequence[tuple[str, int, float]] | None = None,
) -> Path:
    """A WD model folder; probabilities are the constants in ``tags`` plus ``weights * mean/255``."""
    folder.mkdir(parents=True, exist_ok=True)
    bias = [p for _, _, p in tags]
    model = build_graph(
        weights if weights is not None else [0.0] * len(tags), bias, size=size, v2=v2, fixed_batch=fixed_batch
    )
    onnx.save(model, str(folder / "model.onnx"))
    write_tags_csv(folder / "selected_tags.csv", csv_rows if csv_rows is not None else tags)
    return folder


def save_image(path: Path, color=(0, 0, 0), size=(16, 16), mode="RGB") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path

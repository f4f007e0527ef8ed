"""Watermark scoring with a tiny ONNX classifier whose output is known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from sdplugin_taggers.hygiene import WatermarkScorer
from sdplugin_taggers.hygiene_commands import tag_tools_group
from wdmodels import save_image


def classifier(path: Path, *, size: int = 16, classes: int = 2, width: int | str = 2) -> Path:
    """NCHW input; logits = [3 * mean(x), 0, ...] so p(watermark) = sigmoid(3 * mean) with two classes.
    ``width``: the class count the graph declares (a name leaves it open)."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", width])
    inits = [
        numpy_helper.from_array(np.asarray([[3.0] + [0.0] * (classes - 1)], dtype=np.float32), "W"),
        numpy_helper.from_array(np.asarray([-1, 1], dtype=np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["m", "shape"], ["m2"]),
        helper.make_node("Mul", ["m2", "W"], ["logits"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "wm", [x], [y], initializer=inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_scores_are_softmax_of_class_zero(tmp_path: Path) -> None:
    model = classifier(tmp_path / "wm.onnx")
    white = save_image(tmp_path / "img" / "white.png", (255, 255, 255), size=(40, 20))
    black = save_image(tmp_path / "img" / "black.png", (0, 0, 0))
    scorer = WatermarkScorer(model, providers="cpu", mean=(0, 0, 0), std=(1, 1, 1))
    assert scorer.nchw and scorer.size == 16
    scores = {Path(p).name: s for p, s, _ in scorer.scores([white, black])}
    assert scores["white.png"] == pytest.approx(sigmoid(3.0), abs=1e-5)
    assert scores["black.png"] == pytest.approx(0.5, abs=1e-6)
    imagenet = WatermarkScorer(model, providers="cpu")  # default normalisation shifts the mean
    expected = np.mean([(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)])
    assert next(imagenet.scores([white]))[1] == pytest.approx(sigmoid(3 * expected), abs=1e-4)


def test_watermark_command_lists_flagged(tmp_path: Path) -> None:
    model = classifier(tmp_path / "wm.onnx")
    folder = tmp_path / "img"
    save_image(folder / "white.png", (255, 255, 255))
    save_image(folder / "black.png", (0, 0, 0))
    (folder / "bad.png").write_bytes(b"x")
    args = [
        "watermark", str(folder), "--model", str(model), "--providers", "cpu", "--threshold", "0.6",
        "--json", str(tmp_path / "wm.jsonl"), "--list", str(tmp_path / "flagged.txt"), "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(tag_tools_group, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "images: 3, watermarked (p > 0.6): 1, unreadable: 1" in result.output
    assert (tmp_path / "flagged.txt").read_text(encoding="utf-8").strip().endswith("white.png")
    records = [json.loads(line) for line in (tmp_path / "wm.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 2 and all(0 <= r["p_watermark"] <= 1 for r in records)


def test_without_a_model_the_command_says_where_to_get_one(tmp_path: Path) -> None:
    """No --model (it was click's bare "Missing option"), a missing file, or LAION's PyTorch weights: one line
    with the download and the export to ONNX, as ``sdcore tag wd14`` says where to get its model."""
    folder = tmp_path / "img"
    save_image(folder / "white.png", (255, 255, 255))
    laion = "curl -L -o watermark_model_v1.pt https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/"
    result = CliRunner().invoke(tag_tools_group, ["watermark", str(folder)])
    assert (
        result.exit_code == 2 and "no watermark classifier given (--model); sdcore downloads nothing" in result.output
    )
    assert laion in result.output and "export it to ONNX once (docs/offline-models.md" in result.output
    result = CliRunner().invoke(tag_tools_group, ["watermark", str(folder), "--model", str(tmp_path / "wm.onnx")])
    assert result.exit_code == 2 and f"--model {tmp_path / 'wm.onnx'}: no such file; LAION's" in result.output
    weights = tmp_path / "watermark_model_v1.pt"
    weights.write_bytes(b"torch")
    result = CliRunner().invoke(tag_tools_group, ["watermark", str(folder), "--model", str(weights)])
    assert result.exit_code == 2 and "PyTorch weights; sdcore runs an ONNX classifier: export it" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("width", [5, "k"], ids=["fixed", "open"])
def test_more_than_two_classes_warns_which_is_read_as_watermark(tmp_path: Path, width: int | str) -> None:
    """No ONNX file says which class means "watermark": past LAION's two, a warning names the index read (from the
    graph's class count, or the first batch's where the graph leaves it open); an index past the classes is an
    error naming the largest."""
    model = classifier(tmp_path / "wm.onnx", classes=5, width=width)
    folder = tmp_path / "img"
    save_image(folder / "white.png", (255, 255, 255))
    args = ["watermark", str(folder), "--model", str(model), "--providers", "cpu", "--no-progress"]
    result = CliRunner().invoke(tag_tools_group, [*args, "--watermark-index", "3"])
    assert result.exit_code == 0, result.output
    assert (f"warning: {model}: the classifier has 5 classes, not LAION's 2 (0 = watermark, 1 = clear): class 3 "
            '(--watermark-index) is read as "watermark", p = its softmax over all 5') in result.stderr  # fmt: skip
    assert "images: 1," in result.output
    result = CliRunner().invoke(tag_tools_group, [*args, "--watermark-index", "5"])
    assert (
        result.exit_code == 1 and "the classifier has 5 classes, no class 5: give --watermark-index 4" in result.output
    )
    two = classifier(tmp_path / "two.onnx")
    result = CliRunner().invoke(tag_tools_group, ["watermark", str(folder), "--model", str(two), "--no-progress"])
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output


def test_one_output_with_softmax_is_refused(tmp_path: Path) -> None:
    """A one-output classifier under the default softmax would score every image 1.0 (all flagged); it is an error
    naming --no-softmax, which reads that output as the probability."""
    model = classifier(tmp_path / "one.onnx", classes=1, width=1)
    folder = tmp_path / "img"
    save_image(folder / "white.png", (255, 255, 255))
    args = ["watermark", str(folder), "--model", str(model), "--providers", "cpu", "--no-progress"]
    result = CliRunner().invoke(tag_tools_group, args)
    assert result.exit_code == 1 and "its softmax is 1 for every image: give --no-softmax" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(tag_tools_group, [*args, "--no-softmax", "--threshold", "0.9"])
    assert result.exit_code == 0, result.output
    assert "images: 1," in result.output


def test_watermark_outputs_that_are_inputs_or_each_other_are_refused(tmp_path: Path) -> None:
    # sweep2: --list naming an image replaced it with the flagged list; --json and --list on one file kept one
    model = classifier(tmp_path / "wm.onnx")
    image = save_image(tmp_path / "img" / "a.png", (255, 255, 255))
    before = image.read_bytes()
    base = ["watermark", str(tmp_path / "img"), "--model", str(model), "--providers", "cpu", "--no-progress"]
    result = CliRunner().invoke(tag_tools_group, [*base, "--list", str(image)])
    assert result.exit_code == 1 and f"--list {image} is the image {image}: it would be replaced" in result.output
    assert image.read_bytes() == before
    same = str(tmp_path / "out.txt")
    result = CliRunner().invoke(tag_tools_group, [*base, "--json", same, "--list", same])
    assert result.exit_code == 1 and f"--json and --list are the same file {same}" in result.output
    assert not (tmp_path / "out.txt").exists()


def test_size_other_than_the_models_fixed_size_is_one_line(tmp_path: Path) -> None:
    # sweep2: --size 1 on a 16x16 classifier ended in onnxruntime's INVALID_ARGUMENT traceback on the first
    # batch; --size 100000 resized every image to 100000x100000 first (hung, then out of memory)
    model = classifier(tmp_path / "wm.onnx")
    save_image(tmp_path / "img" / "a.png")
    base = ["watermark", str(tmp_path / "img"), "--model", str(model), "--providers", "cpu", "--no-progress"]
    result = CliRunner().invoke(tag_tools_group, [*base, "--size", "1"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"--size 1: {model} takes 16x16 images only: leave --size out" in result.output
    assert CliRunner().invoke(tag_tools_group, [*base, "--size", "16"]).exit_code == 0
    result = CliRunner().invoke(tag_tools_group, [*base, "--size", "100000"])
    assert result.exit_code == 2 and "100000 is not in the range 1<=x<=4096" in result.output

"""``python -m sdcore.testing.toyworld check``: the pieces that decide whether a rebuild matches."""

from __future__ import annotations

import shutil

import numpy as np
from safetensors.numpy import load_file, save_file
from sdcore.models.load import toyworld_model_dir
from sdcore.testing.toyworld import build
from sdcore.testing.toyworld import evaluate as ev


def test_compare_names_each_accuracy_beyond_the_tolerance():
    reference = ev.Accuracy(n=64, colour=0.9, shape=0.75, size=0.8, colour_and_shape=0.75)
    close = ev.Accuracy(n=64, colour=0.85, shape=0.8, size=0.8, colour_and_shape=0.7)
    far = ev.Accuracy(n=64, colour=0.9, shape=0.5, size=0.8, colour_and_shape=0.6)
    assert ev.compare(close, reference, 0.1) == []
    misses = ev.compare(far, reference, 0.1)
    assert misses == ["shape 0.50 vs 0.75", "colour_and_shape 0.60 vs 0.75"]


def test_documented_accuracy_is_what_the_readme_says():
    from pathlib import Path

    import sdcore

    readme = (Path(sdcore.__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    shipped = ev.SHIPPED_ACCURACY
    expected = (
        f"colour {shipped.colour:.2f}, shape {shipped.shape:.2f}, "
        f"size {shipped.size:.2f}, colour and shape together {shipped.colour_and_shape:.2f}"
    )
    assert expected in readme.replace("**", "").replace("\n  ", " ")


def test_weight_difference_is_zero_for_the_same_weights_and_the_largest_change_otherwise(tmp_path):
    shipped = toyworld_model_dir()
    copy = tmp_path / "copy"
    shutil.copytree(shipped, copy)
    assert build.weight_difference(copy, shipped) == {"unet": 0.0, "vae": 0.0, "text_encoder": 0.0}

    file = next((copy / "unet").glob("*.safetensors"))
    tensors = load_file(str(file))
    name = sorted(tensors)[0]
    tensors[name] = (tensors[name].astype(np.float32) + 0.25).astype(tensors[name].dtype)
    save_file(tensors, str(file))
    difference = build.weight_difference(copy, shipped)
    assert abs(difference["unet"] - 0.25) < 1e-3 and difference["vae"] == 0.0

    del tensors[name]
    save_file(tensors, str(file))
    assert build.weight_difference(copy, shipped)["unet"] == float("inf")


def test_weight_difference_reads_clip_keys_with_and_without_the_text_model_level(tmp_path):
    shipped = toyworld_model_dir()
    copy = tmp_path / "copy"
    shutil.copytree(shipped, copy)
    file = copy / "text_encoder" / "model.safetensors"
    tensors = load_file(str(file))
    renamed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()}
    save_file(renamed, str(file))
    assert build.weight_difference(copy, shipped)["text_encoder"] == 0.0

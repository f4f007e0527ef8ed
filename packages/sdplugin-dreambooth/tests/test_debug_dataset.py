"""`--debug-dataset` with DreamBooth: the class images the trainer adds are shown too."""

from __future__ import annotations

from sdcore.testing.contract import contract_options
from sdplugin_dreambooth.method import DreamBoothMethod


def test_debug_dataset_shows_the_class_images(tmp_path):
    """`--debug-dataset` builds the dataset the trainer builds: DreamBooth's --class-data folder included."""
    from sdcore.testing.datasets import make_tiny_dataset
    from sdcore.train.debug_dataset import debug_dataset

    make_tiny_dataset(tmp_path / "class", n=2, concept="dog")
    values = {"class_data": str(tmp_path / "class" / "1_dog"), "prior_loss_weight": 0.5, "batch_size": 2}
    options = contract_options(DreamBoothMethod, tmp_path, {**values, "model": str(tmp_path / "absent")})
    shown = debug_dataset(DreamBoothMethod(options), steps=2)
    assert {s.is_class for s in shown} == {True, False}
    assert {s.loss_weight for s in shown if s.is_class} == {0.5}

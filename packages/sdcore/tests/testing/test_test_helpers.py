"""The small helpers ``sdcore.testing`` gives test writers: a stand-in GPU accelerator with recorded moves, and
inverted control images beside a tiny dataset."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def test_recording_moves_records_without_moving_and_restores_to():
    from sdcore.testing.devices import StandInAccelerator, recording_moves

    accelerator = StandInAccelerator()
    assert accelerator.device.type == "cuda" and accelerator.num_processes == 1 and accelerator.is_main_process
    with accelerator.autocast():
        pass
    modules = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    with recording_moves(modules) as moved:
        assert modules[1].to("cuda") is modules[1] and modules[0].to(torch.device("cuda"), torch.float16) is modules[0]
    assert moved == [1, 0]
    assert modules[0].weight.device.type == "cpu" and modules[0].weight.dtype == torch.float32  # nothing moved
    assert "to" not in vars(modules[0]) and modules[0].to(torch.float64).weight.dtype == torch.float64  # restored


def test_inverted_controls_are_255_minus_each_image(tmp_path):
    from sdcore.testing.datasets import make_tiny_dataset, write_inverted_controls

    data = make_tiny_dataset(tmp_path / "data", n=3, size=16)
    controls = write_inverted_controls(data, tmp_path / "controls")
    images = sorted(data.rglob("*.png"))
    assert sorted(p.name for p in controls.iterdir()) == [p.name for p in images]
    for image in images:
        pixels = np.asarray(Image.open(image).convert("RGB")).astype(np.int16)
        assert np.array_equal(np.asarray(Image.open(controls / image.name)).astype(np.int16), 255 - pixels)

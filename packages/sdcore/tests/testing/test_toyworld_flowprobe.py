"""``python -m sdcore.testing.toyworld flow-probe`` (the measurement behind the loss-based flow check):
it trains on unit-variance world latents with the velocity target and scores what it samples."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")


def test_a_short_probe_trains_samples_and_scores(capsys):
    from sdcore.testing.toyworld.__main__ import main
    from sdcore.testing.toyworld.flowprobe import probe

    result = probe(steps=3, images=64, n=3, sample_steps=2, log=lambda line: None)
    assert result.steps == 3 and result.accuracy.n == 3 and result.parameters > 10_000
    # an untrained model predicts about 0: the loss is E|eps - x|^2 = 1 + E[x^2], 2-3 for these unit-std latents
    assert math.isfinite(result.final_loss) and 1.0 < result.final_loss < 4.0, result.final_loss
    assert 0.0 <= result.accuracy.shape <= 1.0
    main(["flow-probe", "--steps", "1", "--images", "32", "--n", "1", "--layers", "1"])
    assert "flow probe (heads 2 x 8, 1 layers, patch 2): 1 steps in" in capsys.readouterr().out

"""Gradient checkpointing of trained text encoders turns on without transformers' FutureWarning about its
deprecated ``gradient_checkpointing_enable`` (printed on every run that trains a text encoder with
checkpointing, e.g. every OneTrainer config: its default checkpointing is on)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")


def test_text_encoder_checkpointing_is_on_and_quiet():
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.method import Capabilities
    from sdcore.train.placement import enable_gradient_checkpointing

    bundle = create_tiny_bundle("sd1")
    (te,) = bundle.text_encoders
    assert not te.is_gradient_checkpointing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        enable_gradient_checkpointing(bundle, Capabilities(trains_text_encoder=True))
    assert te.is_gradient_checkpointing
    assert bundle.denoiser.is_gradient_checkpointing

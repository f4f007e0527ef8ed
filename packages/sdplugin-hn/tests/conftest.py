"""Shared fixtures: one tiny SD1 UNet for the whole session (building it costs a second)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def sd1_bundle():
    from sdcore.models.tiny import create_tiny_bundle

    torch.set_num_threads(1)
    return create_tiny_bundle("sd1")


@pytest.fixture()
def unet_inputs():
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 8, 32, generator=generator)
    return sample, torch.tensor([500]), context


@pytest.fixture()
def run_unet(unet_inputs):
    def run(unet):
        sample, timestep, context = unet_inputs
        with torch.no_grad():
            return unet(sample, timestep, encoder_hidden_states=context).sample

    return run

"""Toy flow-matching families of any transformer shape, for memory tests and benchmarks.

The memory plan reads a family's declaration (latent format, context tokens, objective) and the
denoiser's config; a test that checks the plan at a size the constants were not fitted on needs a
family of that shape without the real family's adapter (which would insist on the released
configs). These helpers declare one, modelled on the real family's latent format, with SD1's
adapter standing in (nothing here runs the adapter), and build a bundle around a given transformer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..models.family import SD1, ModelFamily, temporary_family

if TYPE_CHECKING:
    import torch

    from ..models.bundle import ModelBundle


def toy_flow_family(name: str, like: ModelFamily, context_tokens: int) -> ModelFamily:
    """A transformer family called ``name`` with ``like``'s latent format and ``context_tokens``."""
    return dataclasses.replace(
        SD1,
        name=name,
        label=f"toy {like.label}",
        denoiser="transformer",
        latent=like.latent,
        objective="flow-matching",
        context_tokens=context_tokens,
    )


@contextlib.contextmanager
def toy_transformer_bundle(
    name: str, transformer: torch.nn.Module, *, like: ModelFamily, context_tokens: int
) -> Iterator[ModelBundle]:
    """A bundle of ``transformer`` (with a tiny 16-channel VAE and tiny SD1 text encoders) whose
    family ``name`` is registered for the ``with`` block only."""
    from diffusers import AutoencoderKL

    from ..models.bundle import ModelBundle
    from ..models.tiny import create_tiny_bundle, tiny_vae_config

    with temporary_family(toy_flow_family(name, like, context_tokens)):
        vae = AutoencoderKL(**{**tiny_vae_config("sd1"), "latent_channels": like.latent.channels})
        sd1 = create_tiny_bundle("sd1")
        yield ModelBundle(
            family=name, prediction_type="flow", unet=None, transformer=transformer, vae=vae,
            text_encoders=sd1.text_encoders, tokenizers=sd1.tokenizers, noise_scheduler=None,
        )  # fmt: skip


__all__ = ["toy_flow_family", "toy_transformer_bundle"]

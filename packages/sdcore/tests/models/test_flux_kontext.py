"""FLUX.1 Kontext's reference tokens: the transformer sees what diffusers' ``FluxKontextPipeline`` gives it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def dev():
    from sdcore.models.flux.adapter import FluxAdapter

    return FluxAdapter().create_tiny(variant="dev", seed=0)


def _pipeline_call(bundle, noisy, reference, t, cond, guidance):
    """The transformer call of one ``FluxKontextPipeline`` step, built from the pipeline's own helpers."""
    from diffusers import FluxKontextPipeline

    b, c, h, w = noisy.shape
    latents = FluxKontextPipeline._pack_latents(noisy, b, c, h, w)
    image_latents = FluxKontextPipeline._pack_latents(reference, *reference.shape)
    latent_ids = FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    image_ids = FluxKontextPipeline._prepare_latent_image_ids(b, reference.shape[2] // 2, reference.shape[3] // 2,
                                                              "cpu", torch.float32)  # fmt: skip
    image_ids[..., 0] = 1
    out = bundle.transformer(
        hidden_states=torch.cat([latents, image_latents], dim=1),
        timestep=torch.full((b,), t / 1000),
        guidance=torch.full((b,), guidance),
        pooled_projections=cond.pooled,
        encoder_hidden_states=cond.hidden_states,
        txt_ids=torch.zeros(cond.hidden_states.shape[1], 3),
        img_ids=torch.cat([latent_ids, image_ids], dim=0),
        return_dict=False,
    )[0]
    return FluxKontextPipeline._unpack_latents(out[:, : latents.shape[1]], h * 8, w * 8, 8)


@pytest.mark.parametrize("reference_side", [(8, 8), (6, 10)])
def test_predict_with_a_reference_is_the_kontext_pipelines_call(dev, reference_side):
    from sdcore.models.flux.adapter import FluxAdapter

    adapter = FluxAdapter()
    cond = adapter.encode_prompts(dev, ["a cat", "a dog"], t5_max_length=8)
    gen = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 16, 8, 8, generator=gen)
    reference = torch.randn(2, 16, *reference_side, generator=gen)
    with torch.no_grad():
        ours = adapter.predict(dev, noisy, torch.tensor([600.0, 600.0]), cond, guidance=2.5,
                               reference_latents=reference)  # fmt: skip
        theirs = _pipeline_call(dev, noisy, reference, 600.0, cond, 2.5)
        plain = adapter.predict(dev, noisy, torch.tensor([600.0, 600.0]), cond, guidance=2.5)
    assert ours.shape == noisy.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the reference takes part


def test_one_reference_is_shared_by_the_batch_and_a_wrong_one_is_one_line(dev):
    from sdcore.errors import ConfigError
    from sdcore.models.flux.adapter import FluxAdapter

    adapter = FluxAdapter()
    cond = adapter.encode_prompts(dev, ["a cat", "a cat"], t5_max_length=8)
    noisy = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    reference = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([300.0, 300.0])
    with torch.no_grad():
        shared = adapter.predict(dev, noisy, t, cond, reference_latents=reference)
        each = adapter.predict(dev, noisy, t, cond, reference_latents=reference.expand(2, -1, -1, -1))
    torch.testing.assert_close(shared, each)
    with pytest.raises(ConfigError, match="reference latents must be"):
        adapter.predict(dev, noisy, t, cond, reference_latents=torch.zeros(3, 16, 4, 4))
    with pytest.raises(ConfigError, match="reference latents have 4 channels"):
        adapter.predict(dev, noisy, t, cond, reference_latents=torch.zeros(2, 4, 4, 4))

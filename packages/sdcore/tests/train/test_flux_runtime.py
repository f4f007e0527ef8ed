"""The tiny Flux.1 model trains through sdcore's whole runtime (data, caches of latents and of both
text encoders' outputs, the family's flow-matching objective, the Flux adapter's predict)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from runtime_methods import ProjOutMethod  # noqa: E402
from sdcore.testing.contract import contract_options  # noqa: E402
from sdcore.train.loop import TrainSession  # noqa: E402


@pytest.mark.parametrize("variant", ["flux", "flux-schnell"])
def test_tiny_flux_trains_through_the_runtime(tmp_path, variant):
    from sdcore.train.objectives import FlowMatchingObjective

    o = contract_options(ProjOutMethod, tmp_path, {"max_steps": 12, "lr": 1e-2, "batch_size": 2, "save_state": False},
                         family=variant)  # fmt: skip
    s = TrainSession(ProjOutMethod(o), bundle=None)
    s.setup()
    assert s.bundle.family == "flux" and isinstance(s.objective.training, FlowMatchingObjective)
    before = s.fixed_loss()
    result = s.run()
    after = s.fixed_loss()
    assert all(math.isfinite(x) for x in result.losses)
    print(f"{variant}: fixed flow-matching loss {before:.4f} -> {after:.4f}")
    assert after < before * 0.9, (before, after)


def test_flux_options_reach_the_encoder_and_the_transformer(tmp_path):
    """--t5xxl-max-token-length / --apply-t5-attn-mask shape the cached conditioning; --guidance-scale
    is what the dev model's guidance embedding gets (it changes the loss)."""
    from sdcore.models.flux.adapter import T5_MASK

    base = {"max_steps": 1, "save_state": False, "t5xxl_max_token_length": 16, "apply_t5_attn_mask": True}
    s = TrainSession(ProjOutMethod(contract_options(ProjOutMethod, tmp_path, base, family="flux")), bundle=None)
    s.setup()
    batch = s.make_batch(s.data.epoch_plan(0)[0])
    cond = s.objective.conditioning_for(batch)
    assert cond.hidden_states.shape[1] == 16 and cond.extra[T5_MASK].shape == (batch.latents.shape[0], 16)
    before = s.fixed_loss()
    s.options.guidance_scale = 3.5
    assert s.fixed_loss() != before

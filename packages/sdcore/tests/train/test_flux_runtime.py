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


def test_kohya_flux_sample_prompts_render_with_g_l_and_n_as_kohya_means_them(tmp_path):
    """A kohya FLUX.1 prompt file (--n without --l is common) renders instead of stopping the run: --g is
    the embedded guidance, --l the true CFG a negative needs; the infotext says both as Forge does."""
    import json

    from PIL import Image
    from sdcore.generate.pnginfo import parse_parameters
    from sdcore.train.sample_info import ALL_PARAMETERS_KEY

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a ring --n blurry --g 4 --d 1\na ring --n blurry --l 2.5 --d 1\n", encoding="utf-8")
    options = {"max_steps": 1, "save_state": False, "sample_prompts": str(prompts), "sample_steps": 2}
    o = contract_options(ProjOutMethod, tmp_path, options, family="flux")
    TrainSession(ProjOutMethod(o), bundle=None).run()
    grid = next((tmp_path / o.output).parent.glob("*-samples/*.png"))
    texts = [parse_parameters(text) for text in json.loads(Image.open(grid).text[ALL_PARAMETERS_KEY])]
    assert [t.negative_prompt for t in texts] == ["", "blurry"]  # kohya drops --n without --l above 1
    assert [t.cfg for t in texts] == [1.0, 2.5]  # "CFG scale": the true CFG
    assert [t.extra.get("Distilled CFG Scale") for t in texts] == ["4", "3.5"]  # --g, else FLUX.1's 3.5


def test_bypass_guidance_embedding_reaches_predict_and_is_refused_without_a_guidance_embedding(tmp_path):
    """--bypass-guidance-embedding: the training loss no longer depends on --guidance-scale (the
    guidance embedding is left out) but differs from the guided loss; schnell and SD have no guidance
    embedding, so the pre-flight refuses the option there in one line."""
    from sdcore.train.preflight import run_preflight

    base = {"max_steps": 1, "save_state": False, "bypass_guidance_embedding": True}
    o = contract_options(ProjOutMethod, tmp_path, base, family="flux")
    assert not [p for p in run_preflight(ProjOutMethod(o), o, plan=False).problems if "guidance" in p]
    s = TrainSession(ProjOutMethod(o), bundle=None)
    s.setup()
    bypassed = s.fixed_loss()
    s.options.guidance_scale = 3.5
    assert s.fixed_loss() == bypassed
    s.options.bypass_guidance_embedding = False
    assert s.fixed_loss() != bypassed
    for family, what in (("flux-schnell", "this FLUX.1 (schnell)"), ("sd1", "sd1")):
        o = contract_options(ProjOutMethod, tmp_path / family, base, family=family)
        problems = [p for p in run_preflight(ProjOutMethod(o), o, plan=False).problems if "guidance" in p]
        assert problems == [f"--bypass-guidance-embedding: {what} has no guidance embedding to bypass (the option "
                            "is for FLUX.1 dev and Flex.1)"]  # fmt: skip

"""kohya's ``--full-bf16`` (``--full-fp16`` on a GPU): the trained weights themselves in half precision."""

from __future__ import annotations

import math

import pytest
import torch
from runtime_methods import ConvOutMethod
from sdcore.models.layout import ModelLayout
from sdcore.models.load import bundled_config
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.loop import TrainSession
from sdcore.train.memory import ParameterPlan, estimate_memory
from sdcore.train.options import TrainOptions

SD15 = ModelLayout("sd15", "sd1", "epsilon", bundled_config("sd1"), "test")
COUNTS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
LORA = ParameterPlan(COUNTS, trainable=12_750_000, added=12_750_000, result=12_750_000)
FULL = ParameterPlan(COUNTS, trainable=859_520_964, added=0, trainable_in=frozenset({"unet"}), result=0)


def _options(**kw):
    return TrainOptions(**{"model": "m", "data": "d", "output": "o", "resolution": 512, **kw})


@pytest.mark.parametrize("plan", [LORA, FULL], ids=["lora", "full"])
def test_the_memory_plan_counts_trained_weights_at_two_bytes(plan):
    mixed = estimate_memory(SD15, plan, _options(mixed_precision="bf16"))
    full = estimate_memory(SD15, plan, _options(mixed_precision="bf16", full_bf16=True))
    assert full.gradients == plan.trainable * 2 and mixed.gradients == plan.trainable * 4
    assert full.optimizer == plan.trainable * 4 and mixed.optimizer == plan.trainable * 8  # AdamW's two moments
    assert mixed.weights - full.weights == plan.trainable * 2  # 4 -> 2 bytes for what trains, frozen unchanged
    assert full.activations == mixed.activations
    eight_bit = {"mixed_precision": "bf16", "optimizer": "adamw8bit"}
    assert (
        estimate_memory(SD15, plan, _options(**eight_bit, full_bf16=True)).optimizer
        == estimate_memory(SD15, plan, _options(**eight_bit)).optimizer
    )  # 8-bit states do not follow the parameter dtype


def test_a_full_bf16_run_keeps_bf16_weights_and_state_and_learns(tmp_path):
    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"mixed_precision": "bf16", "full_bf16": True, "max_steps": 12, "batch_size": 4, "lr": 3e-3},
    )
    s = TrainSession(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    s.setup()
    assert s.params and all(p.dtype == torch.bfloat16 for p in s.params)
    before = s.fixed_loss()
    result = s.run()
    after = s.fixed_loss()
    assert all(math.isfinite(v) for v in result.losses)
    assert after < before * 0.95, (before, after)
    assert all(p.dtype == torch.bfloat16 for p in s.params)
    states = [v for st in s.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.ndim > 0]
    assert states and all(v.dtype == torch.bfloat16 for v in states)
    # without --full-bf16 the trained weights are the fp32 master copy
    plain = TrainSession(
        ConvOutMethod(contract_options(ConvOutMethod, tmp_path, {"mixed_precision": "bf16"}, tag="plain")),
        bundle=create_tiny_bundle("sd1"),
    )
    plain.setup()
    assert all(p.dtype == torch.float32 for p in plain.params)


def test_allow_fp16_gradients_passes_allow_fp16():
    from sdcore.train.placement import allow_fp16_gradients

    seen = []

    class Scaler:
        def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
            seen.append(allow_fp16)

    class Acc:
        scaler = Scaler()

    acc = Acc()
    allow_fp16_gradients(acc)
    acc.scaler._unscale_grads_(None, None, None, False)
    assert seen == [True]
    allow_fp16_gradients(type("NoScaler", (), {"scaler": None})())  # nothing to patch: no error


def test_a_full_bf16_run_resumes_exactly(tmp_path):
    import dataclasses

    from sdcore.train.loop import train

    base = {"mixed_precision": "bf16", "full_bf16": True, "batch_size": 1, "lr": 3e-3}
    straight = ConvOutMethod(contract_options(ConvOutMethod, tmp_path, {**base, "max_steps": 4}, tag="straight"))
    want = train(straight, bundle=create_tiny_bundle("sd1"))
    o = contract_options(ConvOutMethod, tmp_path, {**base, "max_steps": 2}, tag="parts")
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    resumed = ConvOutMethod(dataclasses.replace(o, max_steps=4, resume="latest"))
    got = train(resumed, bundle=create_tiny_bundle("sd1"))
    assert got.losses == want.losses
    a, b = straight.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

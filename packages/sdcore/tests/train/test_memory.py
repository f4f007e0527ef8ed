"""The memory plan: its parts react to each setting the way training memory does."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from sdcore.models.layout import ModelLayout, read_layout
from sdcore.models.load import bundled_config
from sdcore.train.memory import (
    MIB,
    ParameterPlan,
    activation_bytes,
    estimate_memory,
    unet_blocks,
)
from sdcore.train.options import TrainOptions

SD15 = ModelLayout("sd15", "sd1", "epsilon", bundled_config("sd1"), "test")
#: SD1.5's real parameter counts, and a rank-16 UNet LoRA's size
SD15_COUNTS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
LORA = ParameterPlan(SD15_COUNTS, trainable=12_750_000, added=12_750_000, result=12_750_000)
FULL = ParameterPlan(SD15_COUNTS, trainable=859_520_964, added=0, trainable_in=frozenset({"unet"}), result=0)


def _options(**kw):
    base = dict(model="m", data="d", output="o", resolution=512, batch_size=1)
    base.update(kw)
    return TrainOptions(**base)


def test_sd15_blocks_match_the_architecture():
    blocks = unet_blocks(SD15.configs["unet"], 64 * 64)
    resnets = [b for b in blocks if b.kind == "res"]
    transformers = [b for b in blocks if b.kind == "tf"]
    assert len(resnets) == 4 * 2 + 2 + 4 * 3  # down, mid, up (one more per up level)
    assert len(transformers) == 3 * 2 + 1 + 3 * 3
    assert max(b.area for b in blocks) == 64 * 64 and min(b.area for b in blocks) == 8 * 8
    # the first up ResNet of the last level sees its input concatenated with the 320-channel skip
    assert resnets[-1].c_in == 320 + 320 and resnets[-3].c_in == 640 + 320


def test_the_line_has_every_part():
    estimate = estimate_memory(SD15, LORA, _options())
    line = estimate.line()
    match = re.fullmatch(
        r"estimated peak memory: ([\d,]+) MiB \(weights ([\d,]+), gradients ([\d,]+), optimizer ([\d,]+), "
        r"activations ([\d,]+), runtime ([\d,]+)\)",
        line,
    )
    assert match, line
    total, *parts = (int(g.replace(",", "")) for g in match.groups())
    assert abs(total - sum(parts)) <= 2


def test_weights_gradients_and_optimizer_follow_the_parameters():
    est = estimate_memory(SD15, LORA, _options())
    assert est.gradients == LORA.trainable * 4
    assert est.optimizer == LORA.trainable * 8  # AdamW: two fp32 moments
    assert est.weights == sum(SD15_COUNTS.values()) * 4 + LORA.added * 4
    bf16 = estimate_memory(SD15, LORA, _options(mixed_precision="bf16"))
    assert bf16.weights == sum(SD15_COUNTS.values()) * 2 + LORA.added * 4  # frozen in bf16, LoRA fp32
    assert bf16.activations < est.activations
    eight_bit = estimate_memory(SD15, FULL, _options(optimizer="adamw8bit"))
    assert eight_bit.optimizer < estimate_memory(SD15, FULL, _options()).optimizer / 3


def test_monotonic_in_batch_and_resolution():
    previous = 0
    for batch in (1, 2, 4):
        total = estimate_memory(SD15, LORA, _options(batch_size=batch)).total
        assert total > previous
        previous = total
    previous = 0
    for resolution in (256, 512, 768, 1024):
        activations = estimate_memory(SD15, LORA, _options(resolution=resolution)).activations
        assert activations > previous
        previous = activations
    a1 = activation_bytes(SD15.configs["unet"], batch=1, resolution=512)
    a2 = activation_bytes(SD15.configs["unet"], batch=2, resolution=512)
    assert a2 == pytest.approx(2 * a1, rel=1e-6)


def test_gradient_checkpointing_lowers_activations():
    plain = estimate_memory(SD15, LORA, _options())
    checkpointed = estimate_memory(SD15, LORA, _options(gradient_checkpointing=True))
    assert checkpointed.activations < plain.activations / 3
    assert checkpointed.weights == plain.weights


def test_cached_latents_and_text_free_the_vae_and_text_encoder_on_a_gpu():
    cached = estimate_memory(SD15, LORA, _options(), device="cuda")
    no_latents = estimate_memory(SD15, LORA, _options(cache_latents=False), device="cuda")
    no_text = estimate_memory(SD15, LORA, _options(cache_text_encoder_outputs=False), device="cuda")
    assert no_latents.weights - cached.weights == SD15_COUNTS["vae"] * 4
    assert no_text.weights - cached.weights == SD15_COUNTS["text_encoder"] * 4
    training_te = estimate_memory(SD15, LORA, _options(), device="cuda", text_encoder_frozen=False)
    assert training_te.weights - cached.weights == SD15_COUNTS["text_encoder"] * 4  # cannot be cached
    assert training_te.activations > cached.activations  # and its activations count
    # on the CPU the runtime keeps every component in memory
    assert (
        estimate_memory(SD15, LORA, _options(cache_latents=False)).weights
        == estimate_memory(SD15, LORA, _options()).weights
    )


def test_suggestions_when_over_budget(tmp_path, monkeypatch):
    import sdcore.train.memory as memory
    from runtime_methods import ConvOutMethod
    from sdcore.testing.contract import contract_options
    from sdcore.train.preflight import memory_plan

    options = contract_options(ConvOutMethod, tmp_path, {"batch_size": 4, "resolution": 512})
    plain = memory_plan(ConvOutMethod(options), options, layout=SD15, params=FULL, device="cpu")
    budget = int(plain.estimate.total * 0.8)
    monkeypatch.setattr(memory, "device_free_memory", lambda device: budget + memory.RUNTIME_OVERHEAD[device])
    plan = memory_plan(ConvOutMethod(options), options, layout=SD15, params=FULL, device="cpu")
    assert not plan.fits
    flags = {s.flags: s for s in plan.suggestions}
    assert "--gradient-checkpointing" in flags and "--batch-size 2 --gradient-accumulation 2" in flags
    assert all(s.estimate.total < plan.estimate.total for s in plan.suggestions)
    assert flags["--gradient-checkpointing"].fits
    lines = plan.lines()
    assert lines[0].startswith("estimated peak memory:")
    assert "more than the" in lines[1]
    assert lines[2].startswith("options that would fit: ") and "--gradient-checkpointing (" in lines[2]
    # a budget nothing fits names the smallest estimate
    monkeypatch.setattr(memory, "device_free_memory", lambda device: 10 * MIB + memory.RUNTIME_OVERHEAD[device])
    tight = memory_plan(ConvOutMethod(options), options, layout=SD15, params=FULL, device="cpu")
    assert tight.lines()[2].startswith("even ")
    # within budget: only the estimate
    monkeypatch.setattr(memory, "device_free_memory", lambda device: 10**15)
    assert len(memory_plan(ConvOutMethod(options), options, layout=SD15, params=FULL).lines()) == 1


def test_parameter_counts_come_from_the_configs_without_weights(tmp_path):
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.preflight import parameter_plan
    from sdplugin_lora.method import LoraMethod, LoraOptions

    for family in ("sd1", "sdxl"):
        options = LoraOptions(model=f"tiny:{family}", rank=4, conv_rank=2)
        plan = parameter_plan(LoraMethod(options), options, read_layout(f"tiny:{family}"))
        bundle = create_tiny_bundle(family)
        groups = LoraMethod(dataclasses.replace(options)).prepare(bundle)
        assert plan.trainable == sum(p.numel() for g in groups for p in g["params"])
        assert plan.components == {k: sum(p.numel() for p in m.parameters()) for k, m in bundle.components().items()}
        assert plan.added == plan.trainable and plan.result == plan.trainable


def test_sd15_layout_counts_match_the_real_model():
    from sdcore.models.layout import meta_bundle

    bundle = meta_bundle(SD15)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in bundle.components().items()}
    assert counts == SD15_COUNTS
    assert all(p.is_meta for p in bundle.unet.parameters())


def test_sdxl_blocks_follow_the_per_level_transformer_depth():
    blocks = unet_blocks(bundled_config("sdxl")["unet"], 128 * 128)
    transformers = [b for b in blocks if b.kind == "tf"]
    # transformer depth per level (0, 2, 10): 2*2 + 2*10 = 24 down, 10 mid, 3*10 + 3*2 = 36 up
    assert len(transformers) == 70
    assert {b.area for b in transformers} == {64 * 64, 32 * 32}
    assert len([b for b in blocks if b.kind == "res"]) == 3 * 2 + 2 + 3 * 3


# --- a transformer family ------------------------------------------------------------------------


def _saved_bytes(model, forward) -> int:
    """Unique non-parameter storages autograd saves in one forward (what the constants count)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


@pytest.fixture
def mmdit_bundle():
    """A tiny SD3-architecture bundle of a family declared at run time (transformer denoiser,
    16 latent channels, 100 context tokens): a size the constants were not fitted on."""
    import torch
    from diffusers import SD3Transformer2DModel
    from sdcore.models.sd3 import SD3
    from sdcore.testing.toyfamily import toy_transformer_bundle

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=24, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=3, joint_attention_dim=32, caption_projection_dim=192, pooled_projection_dim=32,
        pos_embed_max_size=32,
    )  # fmt: skip
    with toy_transformer_bundle("toy-mmdit", transformer, like=SD3, context_tokens=100) as bundle:
        yield bundle


def test_transformer_family_plan_reads_the_denoiser_and_matches_saved_bytes(mmdit_bundle):
    import torch
    from sdcore.models.layout import layout_of_bundle, meta_bundle
    from sdcore.train.memory import count_parameters

    bundle = mmdit_bundle
    assert bundle.denoiser is bundle.transformer and bundle.device.type == "cpu"
    assert list(bundle.components()) == ["transformer", "vae", "text_encoder"]
    layout = layout_of_bundle(bundle)
    assert layout.configs["transformer"]["_class_name"] == "SD3Transformer2DModel" and "unet" not in layout.configs
    meta = meta_bundle(layout, bundle.tokenizers)  # the pre-flight's shapes-only model
    assert type(meta.denoiser).__name__ == "SD3Transformer2DModel" and meta.unet is None
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in bundle.components().items()}
    assert {name: sum(p.numel() for p in m.parameters()) for name, m in meta.components().items()} == counts

    transformer = bundle.transformer
    transformer.requires_grad_(True)
    params = count_parameters(bundle, [{"params": list(transformer.parameters())}], whole_model_result=True)
    assert params.trainable_in == frozenset({"transformer"}) and params.trainable == counts["transformer"]
    options = _options(resolution=192, batch_size=2)
    estimate = estimate_memory(layout, params, options)
    assert estimate.gradients == counts["transformer"] * 4

    latents = torch.randn(2, 16, 24, 24)
    context, pooled = torch.randn(2, 100, 32), torch.randn(2, 32)
    measured = _saved_bytes(
        transformer, lambda: transformer(latents, context, pooled, torch.tensor([500.0, 500.0]), return_dict=False)[0]
    )
    print(f"transformer activations: estimated {estimate.activations}, saved by autograd {measured}")
    assert estimate.activations == pytest.approx(measured, rel=0.15), (estimate.activations, measured)
    checkpointed = estimate_memory(layout, params, dataclasses.replace(options, gradient_checkpointing=True))
    # two blocks: their inputs plus one block recomputed at a time, a bit over half
    assert checkpointed.activations < 0.6 * estimate.activations


def test_the_plan_leaves_a_loaded_bundles_tokenizers_alone(tmp_path):
    """A new-token method (Custom Diffusion's ``<new1>``) adds its token to the tokenizer in ``prepare``; the
    memory plan runs ``prepare`` on a shapes-only copy of the model, which must not add it to the run's own
    tokenizers (its real ``prepare`` would then find the token taken). A method that trains no text cannot add
    tokens (a token's row is a text-encoder weight): its plan reads the tokenizers without copying them (~33 MB)."""
    from runtime_methods import ConvOutMethod
    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.testing.contract import contract_options
    from sdcore.train.method import Capabilities
    from sdcore.train.preflight import memory_plan

    class NewTokenMethod(ConvOutMethod):
        name = "newtoken"
        seen: list[Any] = []

        def capabilities(self) -> Capabilities:
            return Capabilities(trains_text_encoder=True)

        def prepare(self, bundle: Any) -> list[dict[str, Any]]:
            tokenizer = bundle.tokenizers[0]
            self.seen.append(tokenizer)
            assert tokenizer.add_tokens("<new1>") == 1, "the token is already there"
            return super().prepare(bundle)

    bundle = create_tiny_bundle("sd1")
    size = len(bundle.tokenizers[0])
    options = contract_options(NewTokenMethod, tmp_path)
    plan = memory_plan(NewTokenMethod(options), options, bundle=bundle, device="cpu")
    assert plan.params.trainable == sum(p.numel() for p in bundle.unet.conv_out.parameters())
    assert NewTokenMethod.seen and NewTokenMethod.seen[0] is not bundle.tokenizers[0]
    assert len(bundle.tokenizers[0]) == size  # the run's tokenizer did not gain the plan's token
    NewTokenMethod(options).prepare(bundle)  # so the run's own prepare can add it
    assert len(bundle.tokenizers[0]) == size + 1

    class UnetOnly(ConvOutMethod):
        name = "unetonly"
        seen: list[Any] = []

        def prepare(self, bundle: Any) -> list[dict[str, Any]]:
            self.seen.append(bundle.tokenizers[0])
            return super().prepare(bundle)

    memory_plan(UnetOnly(options), options, bundle=bundle, device="cpu")
    assert UnetOnly.seen and UnetOnly.seen[0] is bundle.tokenizers[0]

"""Partial text-encoder caching (kohya's ``is_partial`` on SD3/FLUX.1): with ``--cache-text-encoder-outputs``
while the LoRA trains CLIP, T5's outputs are cached once and CLIP runs at every step; the conditioning the
denoiser gets, and the gradients, are those of a full encode. A trained T5 caches nothing (kohya refuses it).

Each test builds the tiny FLUX.1 or SD3 and a 2-image dataset; the LoRA's up matrices are moved off zero so
that CLIP's LoRA changes its outputs (else a partial and a full encode would agree trivially)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from sdcore.models.load import load_model
from sdcore.testing.contract import contract_options, make_tiny_dataset
from sdcore.train.loop import TrainSession
from sdplugin_lora.method import LoraMethod

FAMILIES = ("flux", "sd3")
#: the component whose outputs are cached while CLIP trains
T5 = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}


def _options(tmp_path, family: str, **extra):
    data = tmp_path / "data"
    if not data.exists():
        make_tiny_dataset(data, n=2, size=64)
    values = {"rank": 2, "train_text_encoder": True, "split_qkv": True, "max_steps": 2, "batch_size": 2,
              "cache_text_encoder_outputs": True, "t5xxl_max_token_length": 16, **extra}  # fmt: skip
    return contract_options(LoraMethod, tmp_path, values, family=family)


def _t5(bundle):
    return bundle.text_encoders[-1]


def _count_forwards(module) -> dict[str, int]:
    calls = {"n": 0}
    module.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls


def _session(options, family: str) -> TrainSession:
    session = TrainSession(LoraMethod(options), bundle=load_model(f"tiny:{family}"))
    session.setup()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # CLIP's LoRA active: every up matrix off zero (the same in every session)
        for name, param in session.method.network.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return session


def _te_lora(session) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of the text encoders (kohya's lora_te* names)."""
    found = {n: p for n, p in session.method.network.named_parameters() if n.startswith("lora_te")}
    assert found, "the LoRA trains no text-encoder module"
    return found


def _refs(session):
    return session.data.epoch_plan(0)[0]


def _same(a, b, atol: float = 0.0) -> None:
    def close(x, y):
        return torch.equal(x, y) if atol == 0 else torch.allclose(x, y, atol=atol, rtol=0)

    assert close(a.hidden_states, b.hidden_states)
    assert (a.pooled is None) == (b.pooled is None) and (a.pooled is None or close(a.pooled, b.pooled))
    assert a.extra.keys() == b.extra.keys() and all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_partly_cached_step_gets_the_full_encodings_conditioning(tmp_path, family):
    extra = {"apply_t5_attn_mask": True} if family == "flux" else {}
    session = _session(_options(tmp_path, family, **extra), family)
    cache = session.text_cache
    assert cache is not None and cache.partial == (T5[family],)
    batch = session.make_batch(_refs(session))
    assert batch.conditioning is None and batch.cached_text is not None
    assert batch.cached_text.pooled is None  # T5's part alone is cached
    with torch.no_grad():
        partial = session.objective.conditioning_for(batch)
        full = session.method.encode(session.bundle, batch.captions)
        # CLIP's LoRA changes its part: at strength 0 the pooled vector differs (so the check is not trivial)
        with session.method.network.sample_strengths(torch.zeros(len(batch.captions))):
            plain = session.method.encode(session.bundle, batch.captions)
    _same(partial, full)
    assert not torch.allclose(plain.pooled, full.pooled)
    if family == "flux":
        assert partial.extra  # T5's attention mask travels with its cached part


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_clips_lora_and_equal_the_uncached_runs(tmp_path, family):
    options = _options(tmp_path, family)
    sessions = [_session(options, family), _session(dataclasses.replace(options, cache_text_encoder_outputs=False),
                                                    family)]  # fmt: skip
    assert sessions[0].text_cache is not None and sessions[1].text_cache is None
    grads = []
    for session in sessions:
        refs = _refs(session)
        batch = session.make_batch(refs)
        noise, timesteps = session.objective.noise_for(refs, batch)
        session.sample_loss(batch, noise, timesteps, step=0).mean().backward()
        grads.append({n: p.grad.clone() for n, p in _te_lora(session).items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert any(g.abs().sum() > 0 for g in grads[0].values())  # CLIP's LoRA learns from the partly cached step
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-5, rtol=0), name


@pytest.mark.parametrize("family", FAMILIES)
def test_t5_does_not_run_during_steps_or_samples(tmp_path, family):
    options = _options(tmp_path, family, sample_prompts="a red cube", sample_every=1, sample_steps=2)
    session = _session(options, family)
    assert session.text_cache.sample_parts is not None  # T5's encoding of the sample prompt, kept at caching
    t5, clip = _t5(session.bundle), session.bundle.text_encoders[0]
    t5_calls, clip_calls = _count_forwards(t5), _count_forwards(clip)
    session.run()
    assert session.position.step == 2
    assert len(list((tmp_path / "run").rglob("*.png"))) >= 2  # the samples rendered
    assert t5_calls["n"] == 0 and clip_calls["n"] >= 4  # CLIP runs at each step and render, T5 never
    assert not any(p.requires_grad for p in t5.parameters())
    assert next(t5.parameters()).device.type == "cpu"


def test_off_the_cpu_the_cached_t5_leaves_the_device_and_clip_stays(tmp_path):
    """``build_caches`` on a GPU run (a stand-in accelerator whose device says ``cuda``; the moves are recorded,
    not made): T5 goes to the CPU once its outputs are cached, the training CLIP stays where it is."""

    from sdcore.testing.devices import StandInAccelerator, recording_moves
    from sdcore.train.cache import build_caches

    options = _options(tmp_path, "flux")
    session = _session(options, "flux")
    with recording_moves(session.bundle.text_encoders) as moved:
        _, text_cache = build_caches(session.bundle, session.method, options, session.data, StandInAccelerator(),
                                     trains_text_encoder=True, needs_pixels=False, progress=session.progress,
                                     partial=("text_encoder_2",))  # fmt: skip
    assert text_cache is not None and text_cache.partial == ("text_encoder_2",)
    assert moved == [1]  # T5 alone


@pytest.mark.parametrize("family", FAMILIES)
def test_the_disk_cache_is_reused_by_a_partial_run_only(tmp_path, family):
    options = _options(tmp_path, family, cache_text_encoder_outputs_to_disk=True, max_steps=1)
    first = _session(options, family)
    assert first.text_cache.encoded > 0 and first.text_cache.reused == 0
    files = sorted((tmp_path / "data").rglob("sdcore_text_*.safetensors"))
    assert len(files) == 1
    # the same partial run again: every prompt from the file, T5 runs for the empty prompt and the probe only
    bundle = load_model(f"tiny:{family}")
    calls = _count_forwards(_t5(bundle))
    second = TrainSession(LoraMethod(options), bundle=bundle)
    second.setup()
    from sdcore.train.text_store import PROBE_PROMPTS

    assert second.text_cache.encoded == 0 and second.text_cache.reused == first.text_cache.encoded
    assert calls["n"] == 1 + len(PROBE_PROMPTS)
    # a full cache (nothing trains in the text encoders) neither reads the partial file nor is read by it
    unet_only = dataclasses.replace(options, train_text_encoder=False)
    full = _session(unet_only, family)
    assert full.text_cache.partial == () and full.text_cache.reused == 0 and full.text_cache.encoded > 0
    assert len(sorted((tmp_path / "data").rglob("sdcore_text_*.safetensors"))) == 2
    again = _session(options, family)
    assert again.text_cache.reused == first.text_cache.encoded and again.text_cache.encoded == 0
    # T5 trained: nothing of it is cached (as kohya, which refuses the pair), so no file is read or written
    t5_trained = _session(dataclasses.replace(options, train_t5=True), family)
    assert t5_trained.text_cache is None
    assert len(sorted((tmp_path / "data").rglob("sdcore_text_*.safetensors"))) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_the_memory_plan_leaves_the_cached_t5_off_the_device(tmp_path, family):
    """On a GPU the plan counts T5's weights and activations only without the cache: the difference is T5's
    parameters at 4 bytes (fp32 run) and its activations ``K_TE * tokens * width * layers`` per sample; with T5
    trained nothing is cached, so the option changes nothing."""
    from sdcore.models.layout import read_layout
    from sdcore.train.memory import ACTIVATION_CONSTANTS
    from sdcore.train.preflight import memory_plan

    layout = read_layout(f"tiny:{family}")
    options = _options(tmp_path, family)
    cached, plain = (
        memory_plan(LoraMethod(o), o, layout=layout, device="cuda").estimate
        for o in (options, dataclasses.replace(options, cache_text_encoder_outputs=False))
    )
    t5 = layout.configs["text_encoders"][-1]
    assert "d_model" in t5  # the last encoder is T5
    counts = memory_plan(LoraMethod(options), options, layout=layout, device="cuda").params.components
    assert plain.weights - cached.weights == counts[T5[family]] * 4
    k_te = ACTIVATION_CONSTANTS["adapter"][3]
    tokens = t5.get("n_positions") or 77  # what the plan counts a T5 config's tokens as (77 without n_positions)
    t5_units = k_te * tokens * t5["d_model"] * t5["num_layers"]
    assert plain.activations - cached.activations == pytest.approx(options.batch_size * 4 * t5_units, abs=2)
    assert cached.settings["text_cached_encoders"] == [T5[family]] and plain.settings["text_cached_encoders"] == []
    t5_trained = dataclasses.replace(options, train_t5=True)
    both = [memory_plan(LoraMethod(o), o, layout=layout, device="cuda").estimate.total
            for o in (t5_trained, dataclasses.replace(t5_trained, cache_text_encoder_outputs=False))]  # fmt: skip
    assert both[0] == both[1]


def test_the_dry_run_plan_names_the_partial_cache_and_its_smaller_estimate(tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    args = ["train", "lora", "--model", "tiny:flux", "--data", str(data), "--output", str(tmp_path / "o.safetensors"),
            "--resolution", "64", "--train-text-encoder", "--split-qkv", "--dry-run"]  # fmt: skip
    texts = []
    for extra in (["--no-cache-text-encoder-outputs"], ["--cache-text-encoder-outputs"]):
        result = CliRunner().invoke(build_cli(get_plugin_manager()), args + extra, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        texts.append(result.output)
    assert "text-encoder outputs no (the text encoder runs every step)" in texts[0]
    assert "text-encoder outputs in memory, T5-XXL only (the training text encoders run every step)" in texts[1]

    def activations(text: str) -> float:
        return float(re.search(r"estimated peak memory: .*activations ([\d,]+)", text).group(1).replace(",", ""))

    assert activations(texts[1]) < activations(texts[0])  # T5's are gone (on the CPU its weights stay)


@pytest.mark.parametrize("family", FAMILIES)
def test_shuffled_and_dropped_captions_join_t5_and_clip_of_the_same_variant(tmp_path, family):
    """With shuffling, tag and caption dropout the cache holds several variants per image (an empty one among
    them): at every step of three epochs the live CLIP part and the cached T5 part belong to the caption the
    batch trains with, so the joined conditioning equals a full encode of it (kohya refuses these options with a
    cache, flux_train_network.py:67; sdcore caches variants, and the partial cache must not mix two of them)."""
    options = _options(tmp_path, family, shuffle_caption=True, tag_dropout=0.3, caption_dropout_rate=0.3,
                       caption_variants=3)  # fmt: skip
    session = _session(options, family)
    assert session.text_cache.partial == (T5[family],)
    assert any(len(set(v)) > 1 for v in session.text_cache.variants)  # the captions really vary
    seen: set[str] = set()
    for epoch in range(3):
        for refs in session.data.epoch_plan(epoch):
            batch = session.make_batch(refs)
            seen.update(batch.captions)
            with torch.no_grad():
                _same(session.objective.conditioning_for(batch), session.method.encode(session.bundle, batch.captions))
    assert len(seen) > 2

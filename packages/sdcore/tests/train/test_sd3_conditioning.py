"""kohya's SD3 conditioning options: per-encoder caption dropout (``--clip_l_dropout_rate``,
``--clip_g_dropout_rate``, ``--t5_dropout_rate``: the encoder's output zeroed per sample, kohya's
``Sd3TextEncodingStrategy``) and ``--apply_lg_attn_mask`` (CLIP-L/G get their padding mask), on the
tiny SD3 model through the runtime."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from runtime_methods import ProjOutMethod  # noqa: E402
from sdcore.testing.contract import contract_options  # noqa: E402
from sdcore.train import kohya  # noqa: E402
from sdcore.train.data import SampleRef  # noqa: E402
from sdcore.train.encoder_dropout import DROPPED_KEY  # noqa: E402
from sdcore.train.loop import TrainSession  # noqa: E402
from sdcore.train.options import TrainOptions  # noqa: E402
from sdcore.train.preflight import option_problems  # noqa: E402
from sdcore.train.sd3_options import family_problems  # noqa: E402

T5_LEN = 16
RATES = ("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate")


def _session(tmp_path, **overrides):
    base = {"max_steps": 2, "save_state": False, "t5xxl_max_token_length": T5_LEN, "batch_size": 2}
    o = contract_options(ProjOutMethod, tmp_path, {**base, **overrides}, family="sd3", tag=str(len(overrides)))
    s = TrainSession(ProjOutMethod(o), bundle=None)
    s.setup()
    return s


def _kohya_form(bundle, captions, drop=(), lg_mask=False):
    """kohya's dropped SD3 conditioning, written from strategy_sd3.py's description with transformers' own
    encoders: CLIP-L/G penultimate hidden states and projected pooled outputs, each zeroed when its encoder
    is dropped, concatenated along channels and zero-padded to T5's width; T5's last hidden state (zeros
    when dropped) after CLIP's 77 tokens."""
    tok_l, tok_g, tok_t5 = bundle.tokenizers
    clip_l, clip_g, t5 = bundle.text_encoders
    outs, pools = [], []
    with torch.no_grad():
        for name, tok, enc in (("clip_l", tok_l, clip_l), ("clip_g", tok_g, clip_g)):
            t = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            out = enc(t.input_ids, attention_mask=t.attention_mask if lg_mask else None, output_hidden_states=True)
            hidden, pooled = out.hidden_states[-2], out.text_embeds
            outs.append(torch.zeros_like(hidden) if name in drop else hidden)
            pools.append(torch.zeros_like(pooled) if name in drop else pooled)
        ids = tok_t5(captions, padding="max_length", max_length=T5_LEN, truncation=True, return_tensors="pt").input_ids
        t5_out = t5(ids).last_hidden_state
    if "t5" in drop:
        t5_out = torch.zeros_like(t5_out)
    lg = torch.cat(outs, dim=-1)
    lg = F.pad(lg, (0, t5_out.shape[-1] - lg.shape[-1]))
    return torch.cat([lg, t5_out], dim=-2), torch.cat(pools, dim=-1)


def _refs(count):
    return [SampleRef(entry % 4, entry // 4, 0) for entry in range(count)]


@pytest.mark.parametrize("cache", [True, False])
def test_rate_one_zeroes_that_encoders_output_as_kohya(tmp_path, cache):
    """Rate 1.0 drops the encoder for every sample: the conditioning is kohya's zeroed form, whether it
    comes from the text-encoder cache or is encoded at the step; the cached encodings stay intact."""
    s = _session(tmp_path, cache_text_encoder_outputs=cache)
    refs = _refs(2)
    cached = None
    for drop in (("clip_l",), ("clip_g",), ("t5",), ("clip_l", "clip_g", "t5")):
        for name in RATES:
            setattr(s.options, name, 1.0 if name.split("_dropout")[0] in drop else 0.0)
        batch = s.make_batch(refs)
        assert (batch.conditioning is not None) == cache
        if cache:
            cached = batch.conditioning.hidden_states.clone()
        s.objective.draw_for(refs, batch)
        assert batch.extra[DROPPED_KEY] == [frozenset(drop)] * 2
        cond = s.objective.conditioning_for(batch)
        hidden, pooled = _kohya_form(s.bundle, batch.captions, drop)
        torch.testing.assert_close(cond.hidden_states.float(), hidden, rtol=0, atol=1e-5)
        torch.testing.assert_close(cond.pooled.float(), pooled, rtol=0, atol=1e-5)
        if cache:  # dropped after the cache, out of place
            assert torch.equal(s.make_batch(refs).conditioning.hidden_states, cached)


def test_rate_zero_draws_nothing_and_rates_keep_the_noise(tmp_path):
    """Rates 0 (the default): no draw, no key, the conditioning is the cache's object itself. Rates above 0
    draw after the noise and the timestep, so those stay bit-identical."""
    s = _session(tmp_path)
    refs = _refs(4)
    batch = s.make_batch(refs)
    noise, steps, _ = s.objective.draw_for(refs, batch)
    assert DROPPED_KEY not in batch.extra
    assert s.objective.conditioning_for(batch) is batch.conditioning
    for name in RATES:
        setattr(s.options, name, 0.5)
    batch2 = s.make_batch(refs)
    noise2, steps2, _ = s.objective.draw_for(refs, batch2)
    assert torch.equal(noise, noise2) and torch.equal(steps, steps2)
    assert DROPPED_KEY in batch2.extra


def test_draws_are_per_sample_reproducible_and_follow_the_samples_generator(tmp_path):
    """Each sample's drops come from its own noise generator after its noise and timestep draws (replayed
    here by hand: noise, the logit-normal normal, then one uniform per encoder with a rate), so they do not
    depend on the batch it is in, and a rerun gives the same."""
    s = _session(tmp_path, clip_l_dropout_rate=0.5, clip_g_dropout_rate=0.3, t5_dropout_rate=0.7)
    refs = [SampleRef(entry, occurrence, epoch) for epoch in range(3) for entry in range(4) for occurrence in range(2)]
    batch = s.make_batch(refs[:2])
    shape = batch.latents.shape[1:]
    together = []
    for start in range(0, len(refs), 6):
        part = refs[start : start + 6]
        b = s.make_batch(part[:2])  # the draws only read the latents' shape
        b.latents = torch.zeros((len(part), *shape))
        s.objective.draw_for(part, b)
        together += b.extra[DROPPED_KEY]
    alone, replayed = [], []
    for ref in refs:
        b = s.make_batch([ref])
        s.objective.draw_for([ref], b)
        alone += b.extra[DROPPED_KEY]
        gen = torch.Generator().manual_seed(ref.seed(s.options.seed, "noise"))
        torch.randn(tuple(shape), generator=gen)
        torch.randn((1,), generator=gen)
        rates = {"clip_l": 0.5, "clip_g": 0.3, "t5": 0.7}
        replayed.append(frozenset(n for n, r in rates.items() if float(torch.rand((), generator=gen)) < r))
    assert together == alone == replayed
    counts = {n: sum(n in d for d in alone) / len(alone) for n in ("clip_l", "clip_g", "t5")}
    assert 0 < counts["clip_g"] < counts["t5"] < 1 and 0 < counts["clip_l"] < 1, counts


def test_a_run_with_dropout_and_the_lg_mask_trains(tmp_path):
    """A short run with every option on: finite losses; with rates 1.0 on every encoder the trained result
    differs from a run without dropout (the conditioning reaching the MMDiT changed)."""
    on = {name: 1.0 for name in RATES} | {"apply_lg_attn_mask": True}
    s = _session(tmp_path, **on)
    losses = s.run().losses
    plain = _session(tmp_path / "plain").run().losses
    assert all(torch.isfinite(torch.tensor(losses))) and losses != plain


def test_lg_attn_mask_is_clips_padding_mask(tmp_path):
    """--apply-lg-attn-mask: CLIP-L/G run with the tokenizer's padding mask (transformers' masking): the
    caption's own tokens and the pooled vector are unchanged (CLIP is causal), padding positions change,
    T5's part is untouched."""
    from sdcore.models.sd3.adapter import Sd3Adapter

    s = _session(tmp_path, apply_lg_attn_mask=True)
    captions = ["a red cat", "two blue squares on the green grass"]
    adapter = Sd3Adapter()
    masked = adapter.encode_prompts(s.bundle, captions, t5_max_length=T5_LEN, lg_attention_mask=True)
    plain = adapter.encode_prompts(s.bundle, captions, t5_max_length=T5_LEN)
    hidden, pooled = _kohya_form(s.bundle, captions, lg_mask=True)
    torch.testing.assert_close(masked.hidden_states, hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(masked.pooled, pooled, rtol=0, atol=1e-5)
    real = s.bundle.tokenizers[0](captions[0], return_tensors="pt").input_ids.shape[1]
    assert torch.equal(masked.hidden_states[0, :real], plain.hidden_states[0, :real])
    assert not torch.allclose(masked.hidden_states[0, real:77], plain.hidden_states[0, real:77])
    assert torch.equal(masked.hidden_states[:, 77:], plain.hidden_states[:, 77:])
    torch.testing.assert_close(masked.pooled, plain.pooled, rtol=0, atol=1e-6)
    # the runtime passes it: the cached conditioning of the first batch is the masked encoding
    batch = s.make_batch(_refs(2))
    torch.testing.assert_close(
        batch.conditioning.hidden_states,
        adapter.encode_prompts(s.bundle, batch.captions, t5_max_length=T5_LEN, lg_attention_mask=True).hidden_states,
    )


def test_preflight_and_kohya_names():
    present = [f.name for f in dataclasses.fields(TrainOptions)]
    items = {"clip_l_dropout_rate": 0.1, "clip_g_dropout_rate": 0.2, "t5_dropout_rate": 0.3, "apply_lg_attn_mask": True}
    out = kohya.translate(items, present, where="cfg")
    assert out.values == items and not out.problems
    bad = TrainOptions(model="m", data="d", output="o", clip_l_dropout_rate=1.5, t5_dropout_rate=-0.1)
    problems = option_problems(bad)
    assert any("--clip-l-dropout-rate must be between 0 and 1, got 1.5" in p for p in problems)
    assert any("--t5-dropout-rate must be between 0 and 1" in p for p in problems)
    on = TrainOptions(t5_dropout_rate=0.1, apply_lg_attn_mask=True)
    assert family_problems(on, "sd3") == []
    flux = family_problems(on, "flux")
    assert len(flux) == 2 and all("SD3 option" in p and "flux" in p for p in flux)
    assert family_problems(TrainOptions(), "sd1") == []

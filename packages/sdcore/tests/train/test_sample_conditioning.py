"""Sample prompts encoded once at caching time (``sdcore.train.sampling.encode_sample_prompts``, kept in the memo
of ``sdcore.generate.conditioning_memo``), as kohya's ``sample_prompts_te_outputs``: a render from them equals a
render that encodes live, on every family, and runs no text-encoder forward and moves no text encoder; a run
whose text encoders train never uses them; a training run says "sample prompts: N texts encoded"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runtime_methods import ConvOutMethod
from sdcore.generate.conditioning_memo import ConditioningMemo, MemoMiss
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.loop import train
from sdcore.train.options import TrainOptions
from sdcore.train.sampling import encode_sample_prompts, render_samples

pytest.importorskip("sdcore.generate.pipeline")

# prompt editing, alternation, AND, a line's own --n (itself alternating), a line without one, a seed and steps
UNET_PROMPTS = "\n".join(
    [
        "a cat [red:blue:0.5] --n ugly",
        "[x|y] house AND a tree :0.5 --n [bad|worse] hands --s 3",
        "plain (words:1.2) --d 7",
    ]
)
# FLUX.1: a negative needs true CFG (--l above 1); a distilled line (--g) has none
FLUX_PROMPTS = "\n".join(
    [
        "a cat [red:blue:0.5] --l 2 --n ugly",
        "[x|y] house AND a tree :0.5 --l 2 --n [bad|worse] hands --s 3",
        "plain distilled words --g 4 --d 7",
    ]
)
#: a device other than the text encoders' one, as far as the runtime can tell ("cpu:0" is the CPU): a live
#: render moves them there and back, a render from the memo must not
ELSEWHERE = torch.device("cpu", 0)


def _bundle(family: str):
    from sdcore.models.family import family_adapter
    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.models.sd3.tiny import create_tiny_sd3

    makers = {
        "sd1": lambda: create_tiny_bundle("sd1"),
        "sdxl": lambda: create_tiny_bundle("sdxl"),
        "sd3": lambda: create_tiny_sd3(seed=1),
        "flux": lambda: FluxAdapter().create_tiny(variant="dev", seed=0),
        "chroma": lambda: family_adapter("chroma").create_tiny(),
    }
    return makers[family]()


def _options(tmp_path: Path, family: str, **overrides) -> TrainOptions:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(FLUX_PROMPTS if family == "flux" else UNET_PROMPTS, encoding="utf-8")
    size = 64 if family in ("sd1", "sdxl") else 32
    values = {"sample_prompts": str(prompts), "sample_steps": 4, "resolution": size, "seed": 3, **overrides}
    return TrainOptions(**values)


class _Plain(ConvOutMethod):
    """A method whose sampling() adds nothing (the runtime's default)."""

    def __init__(self) -> None:
        pass


class _Watch:
    """Text-encoder forwards and ``.to()`` calls on the text encoders, and what the denoiser is conditioned on."""

    TEXT_KEYS = ("encoder_hidden_states", "pooled_projections", "attention_mask", "txt_ids")

    def __init__(self, bundle, monkeypatch) -> None:
        self.forwards = 0
        self.moves: list[str] = []
        self.inputs: list[list[torch.Tensor]] = []
        self.handles = [te.register_forward_pre_hook(self._forward) for te in bundle.text_encoders]
        self.handles.append(bundle.denoiser.register_forward_pre_hook(self._denoiser, with_kwargs=True))
        for te in bundle.text_encoders:
            real = te.to

            def spy(*args, _real=real, _name=type(te).__name__, **kwargs):
                self.moves.append(_name)
                return _real(*args, **kwargs)

            monkeypatch.setattr(te, "to", spy)

    def _forward(self, module, args) -> None:
        self.forwards += 1

    def _denoiser(self, module, args, kwargs) -> None:
        seen = [kwargs[k].clone() for k in self.TEXT_KEYS if torch.is_tensor(kwargs.get(k))]
        added = kwargs.get("added_cond_kwargs") or {}
        if torch.is_tensor(added.get("text_embeds")):
            seen.append(added["text_embeds"].clone())
        self.inputs.append(seen)

    def reset(self) -> None:
        self.forwards, self.moves, self.inputs = 0, [], []

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _render(bundle, options, folder: Path, tag: str, memo=None) -> np.ndarray:
    path = render_samples(bundle, _Plain(), options, device=ELSEWHERE, folder=folder, tag=tag, step=0,
                          say=lambda _: None, conditioning=memo)  # fmt: skip
    assert path is not None
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux", "chroma"])
def test_render_from_the_memo_equals_live_encoding_and_leaves_the_text_encoders_alone(tmp_path, monkeypatch, family):
    bundle = _bundle(family)
    options = _options(tmp_path, family)
    memo = encode_sample_prompts(bundle, options, device=torch.device("cpu"))
    assert memo is not None
    # every text the renders encode: edits and alternations apart, AND's parts apart, the negatives
    texts = memo.texts()
    for expected in ("a cat red", "a cat blue", "x house", "y house", " a tree"):
        assert expected in texts
    assert {"bad hands", "worse hands"} <= texts
    assert ("ugly" in texts) is True
    watch = _Watch(bundle, monkeypatch)
    try:
        live = _render(bundle, options, tmp_path, "live")
        live_inputs, live_forwards, live_moves = watch.inputs, watch.forwards, watch.moves
        watch.reset()
        stored = _render(bundle, options, tmp_path, "stored", memo)
    finally:
        watch.close()
    assert live_forwards > 0 and live_moves  # the live render encodes, and brings the encoders over
    assert watch.forwards == 0 and watch.moves == []
    assert np.array_equal(stored, live)
    assert len(watch.inputs) == len(live_inputs)
    for got, want in zip(watch.inputs, live_inputs, strict=True):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and float((a.float() - b.float()).abs().max()) <= 1e-6


def test_a_text_missing_from_the_memo_is_encoded_live_with_the_encoders_brought_over(tmp_path, monkeypatch):
    bundle = _bundle("sd1")
    options = _options(tmp_path, "sd1")
    memo = encode_sample_prompts(bundle, options, device=torch.device("cpu"))
    live = _render(bundle, options, tmp_path, "live")
    # the prompt file changed after caching: its second line is new
    Path(options.sample_prompts).write_text(UNET_PROMPTS.replace("a tree", "a bush"), encoding="utf-8")
    changed = _render(bundle, options, tmp_path, "changed")
    watch = _Watch(bundle, monkeypatch)
    try:
        fallback = _render(bundle, options, tmp_path, "fallback", memo)
    finally:
        watch.close()
    assert watch.forwards > 0 and watch.moves  # encoded live, as without a memo
    assert np.array_equal(fallback, changed) and not np.array_equal(fallback, live)


def test_the_memo_refuses_unknown_texts_and_any_text_encoder_forward():
    bundle = create_tiny_bundle("sd1")
    memo = ConditioningMemo()
    with memo.recording("call", bundle.denoiser):
        memo.encode(["a"], [""], lambda: (torch.ones(1), None))
        memo.encoded_all()
        pytest.fail("recording stops after the encodings")
    assert memo.texts() == {"a"}  # the negative was not encoded (no uncond)
    with memo.replaying("call"):
        kept, uncond = memo.encode(["a"], [""], lambda: pytest.fail("replaying never encodes"))
        assert torch.equal(kept, torch.ones(1)) and uncond is None
        with pytest.raises(MemoMiss, match="'b'"):
            memo.encode(["b"], [""], lambda: None)
    with pytest.raises(MemoMiss), memo.replaying("call", bundle.text_encoders):
        bundle.text_encoders[0](torch.zeros(1, 77, dtype=torch.long))
    with pytest.raises(MemoMiss, match="encoded nothing"), memo.replaying("other"):
        pass


def test_a_method_with_sampling_extras_encodes_live(tmp_path, monkeypatch):
    """APT-like extras (a negative embedding, a CFG) change the prompts: the memo is not used."""
    import contextlib

    bundle = _bundle("sd1")
    options = _options(tmp_path, "sd1")
    memo = encode_sample_prompts(bundle, options, device=torch.device("cpu"))

    class Extras(_Plain):
        @contextlib.contextmanager
        def sampling(self, bundle):
            yield {"cfg": 5.0}

    watch = _Watch(bundle, monkeypatch)
    try:
        path = render_samples(bundle, Extras(), options, device=ELSEWHERE, folder=tmp_path, tag="x", step=0,
                              say=lambda _: None, conditioning=memo)  # fmt: skip
    finally:
        watch.close()
    assert path is not None and watch.forwards > 0 and watch.moves


# -- the runtime ---------------------------------------------------------------------------------------------


def _train(tmp_path: Path, tag: str, capsys, **overrides) -> tuple[np.ndarray, str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red [thing:stripe:0.5] --n blurry\n[x|y] AND z\n", encoding="utf-8")
    values = {"max_steps": 2, "sample_every": 2, "sample_prompts": str(prompts), "sample_steps": 3, **overrides}
    o = contract_options(ConvOutMethod, tmp_path, values, tag=tag)
    capsys.readouterr()
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    said = capsys.readouterr().err
    grid = np.asarray(Image.open(tmp_path / tag / "result-samples" / "step00000002.png").convert("RGB"))
    return grid, said


def test_a_run_with_cached_outputs_samples_from_the_memo_as_live_encoding_would(tmp_path, capsys, monkeypatch):
    forwards = []
    from sdcore.train import sampling

    real_render = sampling.render_samples

    def counting_render(bundle, *args, **kwargs):
        handles = [te.register_forward_pre_hook(lambda *_: forwards.append(1)) for te in bundle.text_encoders]
        try:
            return real_render(bundle, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    monkeypatch.setattr(sampling, "render_samples", counting_render)
    stored, said = _train(tmp_path, "stored", capsys, cache_text_encoder_outputs=True)
    # "a red thing", "a red stripe", "blurry"; "x", "y", " z" and the second line's empty negative
    assert "sample prompts: 7 texts encoded" in said
    assert forwards == []
    # the same run whose sample prompts were not encoded ahead: every render encodes live
    monkeypatch.setattr(sampling, "encode_sample_prompts", lambda *a, **k: None)
    live, said = _train(tmp_path, "live", capsys, cache_text_encoder_outputs=True)
    assert "sample prompts:" not in said and forwards
    assert np.array_equal(stored, live)


def test_a_run_that_trains_the_text_encoder_encodes_its_samples_live(tmp_path, capsys, monkeypatch):
    """Its text encoders change as it trains (here their final norm; LoRA on CLIP, TI and APT alike): no text
    cache, no memo, and the samples are those of the same run without --cache-text-encoder-outputs."""
    from sdcore.train import cache

    built = []
    real = cache.TextCache.fill

    def fill(self, **kwargs):
        built.append(self)
        return real(self, **kwargs)

    monkeypatch.setattr(cache.TextCache, "fill", fill)
    asked, said = _train(tmp_path, "asked", capsys, cache_text_encoder_outputs=True, train_text_norm=True)
    assert built == [] and "sample prompts:" not in said
    plain, _ = _train(tmp_path, "plain", capsys, train_text_norm=True)
    assert np.array_equal(asked, plain)


def test_textual_inversion_and_lora_on_clip_do_not_cache_text():
    """What keeps them out: their capabilities say their text encoders train (so ``uses_text_cache`` is false)."""
    from sdcore.train.cache import uses_text_cache

    ti = pytest.importorskip("sdplugin_ti.method")
    lora = pytest.importorskip("sdplugin_lora.method")
    assert ti.TIMethod(ti.TIOptions()).capabilities().trains_text_encoder
    with_te = lora.LoraMethod(lora.LoraOptions(train_text_encoder=True))
    assert with_te.capabilities().trains_text_encoder
    options = TrainOptions(cache_text_encoder_outputs=True)

    class NoWarmup:
        entries: list = []

    assert not uses_text_cache(options, NoWarmup(), trains_text_encoder=True)
    assert uses_text_cache(options, NoWarmup(), trains_text_encoder=False)


def test_the_validation_loss_reads_the_cached_captions(tmp_path, monkeypatch):
    """Held-out images are entries of the text cache too: validating runs no text-encoder forward."""
    from sdcore.train.loop import TrainSession

    values = {"max_steps": 1, "validation_split": 0.5, "cache_text_encoder_outputs": True}
    session = TrainSession(ConvOutMethod(contract_options(ConvOutMethod, tmp_path, values)), bundle=_bundle("sd1"))
    session.setup()
    assert session.text_cache is not None and session.validation_groups
    forwards = []
    handles = [te.register_forward_pre_hook(lambda *_: forwards.append(1)) for te in session.bundle.text_encoders]
    try:
        loss = session.validate()
    finally:
        for handle in handles:
            handle.remove()
    assert loss is not None and forwards == []


@pytest.mark.parametrize(("family", "cached", "edited"), [("chroma", "a cat --l 1", "a cat --l 4"),
                                                          ("flux", "a cat", "a cat --l 3")])  # fmt: skip
def test_a_line_whose_cfg_changed_after_caching_is_encoded_live(tmp_path, monkeypatch, family, cached, edited):
    """The prompt file is read again at each render: a line edited to turn CFG on (Chroma's --l above 1, FLUX.1's
    true CFG) keeps its text but now needs its negative encoded too, which caching did not do (Chroma and FLUX.1
    encode an uncond only with CFG). The render encodes live, as after any edit, instead of failing on the
    missing uncond ('NoneType' object has no attribute 'embeds')."""
    bundle = _bundle(family)
    options = _options(tmp_path, family, sample_steps=2)
    Path(options.sample_prompts).write_text(cached, encoding="utf-8")
    memo = encode_sample_prompts(bundle, options, device=torch.device("cpu"))
    assert memo is not None
    Path(options.sample_prompts).write_text(edited, encoding="utf-8")
    live = _render(bundle, options, tmp_path, "live")
    watch = _Watch(bundle, monkeypatch)
    try:
        fallback = _render(bundle, options, tmp_path, "fallback", memo)
    finally:
        watch.close()
    assert watch.forwards > 0  # encoded live: the memo holds no uncond for it
    assert np.array_equal(fallback, live)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_run_training_clip_renders_from_t5s_kept_outputs_and_clip_live(tmp_path, monkeypatch, family):
    """Partial caching (T5 cached while CLIP trains): the renders keep T5's encodings of the sample texts
    (``PartMemo``, kohya's ``sample_prompts_te_outputs`` with CLIP run live), T5 neither runs nor moves, CLIP
    runs, and the images equal a live render's."""
    from sdcore.generate.conditioning_memo import PartMemo

    bundle = _bundle(family)
    options = _options(tmp_path, family)
    parts = PartMemo()
    with parts.recording():
        assert encode_sample_prompts(bundle, options, device=torch.device("cpu")) is not None
    assert parts.entries
    t5, clip = bundle.text_encoders[-1], bundle.text_encoders[0]
    live = _render(bundle, options, tmp_path, "live")
    calls = {"t5": 0, "clip": 0}
    handles = [t5.register_forward_pre_hook(lambda *_: calls.__setitem__("t5", calls["t5"] + 1)),
               clip.register_forward_pre_hook(lambda *_: calls.__setitem__("clip", calls["clip"] + 1))]  # fmt: skip
    moves: list[str] = []
    real = t5.to
    monkeypatch.setattr(t5, "to", lambda *a, **k: moves.append("t5") or real(*a, **k))
    try:
        path = render_samples(bundle, _Plain(), options, device=ELSEWHERE, folder=tmp_path, tag="parts", step=0,
                              say=lambda _: None, parts=parts)  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    assert path is not None
    assert calls["t5"] == 0 and moves == [] and calls["clip"] > 0
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), live)

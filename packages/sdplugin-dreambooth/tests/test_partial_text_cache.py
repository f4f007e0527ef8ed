"""Partial text-encoder caching on a DreamBooth full fine-tune of SD3/FLUX.1 (kohya sd3_train.py's
``--use_t5xxl_cache_only``): with ``--train-text-encoder --cache-text-encoder-outputs`` T5's outputs are cached once
(class images' captions too), CLIP trains and runs every step, and the conditioning the transformer gets is a
full encode's. T5 stays frozen and is saved unchanged in the whole-model checkpoint. A trained T5 caches nothing
(kohya refuses the pair), and ``--no-token-padding``'s own encoding takes no partial cache.

Each test builds a tiny SD3 or FLUX.1 and a 2-image dataset (T5 cut at 16 tokens to stay fast)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sdcore.models.family import family_adapter
from sdcore.models.load import load_model
from sdcore.testing.datasets import make_tiny_dataset, pattern_image
from sdcore.train.cache import partial_text_encoders
from sdcore.train.config import load_options
from sdcore.train.loop import TrainSession
from sdplugin_dreambooth.method import DreamBoothMethod
from sdplugin_dreambooth.options import DreamBoothOptions

#: the component whose outputs are cached while CLIP trains
T5 = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}


def _options(tmp_path, family: str = "sd3", **overrides) -> DreamBoothOptions:
    data = tmp_path / "data"
    if not data.exists():
        make_tiny_dataset(data, n=2, repeats=1)
    base = dict(
        model=f"tiny:{family}", data=str(data), output=str(tmp_path / "out" / "db.safetensors"),
        resolution=64, min_bucket_reso=64, batch_size=2, lr=1e-3, max_steps=2, seed=0, progress=False,
        save_dtype="fp32", save_state=False, max_grad_norm=0.0, train_text_encoder=True,
        cache_text_encoder_outputs=True, t5xxl_max_token_length=16,
    )  # fmt: skip
    base.update(overrides)
    return DreamBoothOptions(**base)


def _session(options: DreamBoothOptions, family: str = "sd3") -> TrainSession:
    session = TrainSession(DreamBoothMethod(options), bundle=family_adapter(family).create_tiny())
    session.setup()
    return session


def _t5(bundle):
    return bundle.text_encoders[-1]


def _count_forwards(module) -> dict[str, int]:
    calls = {"n": 0}
    module.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls


def _close(a, b, atol: float = 1e-6) -> None:
    assert torch.allclose(a.hidden_states, b.hidden_states, atol=atol, rtol=0)
    assert (a.pooled is None) == (b.pooled is None) and (a.pooled is None or torch.allclose(a.pooled, b.pooled,
                                                                                             atol=atol, rtol=0))  # fmt: skip
    assert a.extra.keys() == b.extra.keys() and all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_partly_cached_step_gets_a_full_encode_with_the_trained_clip(tmp_path, family):
    session = _session(_options(tmp_path, family), family)
    assert session.text_cache is not None and session.text_cache.partial == (T5[family],)
    # CLIP as training leaves it: its weights moved off the base's (else partial and full agree trivially)
    clip = session.bundle.text_encoders[0]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in clip.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    batch = session.make_batch(session.data.epoch_plan(0)[0])
    assert batch.conditioning is None and batch.cached_text is not None and batch.cached_text.pooled is None
    with torch.no_grad():
        partial = session.objective.conditioning_for(batch)
        full = session.method.encode(session.bundle, batch.captions)
        base = family_adapter(family).create_tiny()  # the same seeded weights, CLIP untouched
        plain = session.method.encode(base, batch.captions)
    _close(partial, full)
    assert not torch.allclose(plain.pooled, full.pooled, atol=1e-3)  # the live CLIP's part is in the join


def test_a_partial_run_trains_clip_never_runs_t5_and_saves_it_unchanged(tmp_path):
    options = _options(tmp_path, max_steps=3)
    base = family_adapter("sd3").create_tiny()
    session = _session(options)
    t5 = _t5(session.bundle)
    t5_calls, clip_calls = _count_forwards(t5), _count_forwards(session.bundle.text_encoders[0])
    session.run()
    assert session.position.step == 3
    assert t5_calls["n"] == 0 and clip_calls["n"] >= 3  # CLIP at every step, T5 never (its outputs cached)
    assert not any(p.requires_grad or p.grad is not None for p in t5.parameters())
    for index, changed in enumerate((True, True, False)):  # CLIP-L and CLIP-G train, T5 is frozen
        before, after = base.text_encoders[index].state_dict(), session.bundle.text_encoders[index].state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before) == changed, index
    saved = load_model(str(tmp_path / "out" / "db.safetensors"))
    want = base.text_encoders[2].state_dict()
    got = saved.text_encoders[2].state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_off_the_cpu_t5_leaves_the_device_and_clip_stays(tmp_path):
    """The loop's caching step on a GPU run (a stand-in accelerator whose device says ``cuda``; the moves are
    recorded, not made), with the partial set the runtime asks for a DreamBooth run: T5 alone goes to the CPU."""
    from sdcore.testing.devices import StandInAccelerator, recording_moves
    from sdcore.train.cache import build_caches

    options = _options(tmp_path)
    session = _session(options)
    method = session.method
    partial = partial_text_encoders(options, method.capabilities(), "sd3", method)
    assert partial == ("text_encoder_3",)
    with recording_moves(session.bundle.text_encoders) as moved:
        _, text_cache = build_caches(session.bundle, method, options, session.data, StandInAccelerator(),
                                     trains_text_encoder=True, needs_pixels=False, progress=session.progress,
                                     partial=partial)  # fmt: skip
    assert text_cache is not None and moved == [2]


def test_class_image_captions_go_through_the_same_cache(tmp_path):
    """Prior preservation: the class prompt of ``--class-data`` images is cached (T5's part) like the instance
    captions, and every batch of an epoch, class images included, gets a full encode's conditioning."""
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for index in range(2):  # existing class images without captions: nothing to generate
        pattern_image(index + 5, 64).save(class_dir / f"class_{index:05d}.png")
    options = _options(tmp_path, class_data=str(class_dir), class_prompt="a photo of a cube", num_class_images=2,
                       prior_loss_weight=1.0, batch_size=1)  # fmt: skip
    session = _session(options)
    assert session.text_cache.partial == ("text_encoder_3",)
    assert "a photo of a cube" in session.text_cache.encodings
    classes = 0
    for refs in session.data.epoch_plan(0):
        batch = session.make_batch(refs)
        classes += batch.captions.count("a photo of a cube")
        with torch.no_grad():
            _close(session.objective.conditioning_for(batch), session.method.encode(session.bundle, batch.captions))
    assert classes > 0


def test_what_takes_no_partial_cache(tmp_path):
    """A trained T5 caches nothing (kohya refuses the pair); CLIP at rate 0 on FLUX.1 (its only CLIP) leaves
    nothing training, so no partial cache either; ``--no-token-padding`` (SD1/2) encodes its own way."""
    o = _options(tmp_path, train_t5=True)
    caps = DreamBoothMethod(o).capabilities()
    assert caps.trained_text_encoders == frozenset({1, 2, 3})
    assert partial_text_encoders(o, caps, "sd3", DreamBoothMethod(o)) == ()
    assert _session(o).text_cache is None
    o = _options(tmp_path, "flux", te1_lr=0.0)
    assert partial_text_encoders(o, DreamBoothMethod(o).capabilities(), "flux", DreamBoothMethod(o)) == ()
    o = _options(tmp_path, te1_lr=0.0)  # CLIP-G still trains on SD3
    assert DreamBoothMethod(o).capabilities().trained_text_encoders == frozenset({2})
    assert partial_text_encoders(o, DreamBoothMethod(o).capabilities(), "sd3", DreamBoothMethod(o)) == (T5["sd3"],)
    padded = DreamBoothMethod(_options(tmp_path, no_token_padding=True))
    unpadded = DreamBoothMethod(_options(tmp_path))
    assert not padded.encodes_as_family() and unpadded.encodes_as_family()


def test_the_rule_excludes_an_own_encoding_and_not_a_delegating_one(tmp_path):
    """The one rule in :func:`partial_text_encoders`: the method's own word (``encodes_as_family``) decides, so
    DreamBooth's unpadded encoding is left out even where the other conditions would allow a partial cache."""
    options = _options(tmp_path)
    caps = DreamBoothMethod(options).capabilities()
    as_family = DreamBoothMethod(options)
    own = DreamBoothMethod(dataclasses.replace(options, no_token_padding=True))
    assert partial_text_encoders(options, caps, "sd3", as_family) == ("text_encoder_3",)
    assert partial_text_encoders(options, caps, "sd3", own) == ()


def test_the_memory_plan_leaves_the_cached_t5_off_the_device(tmp_path):
    """On a GPU the plan counts T5's weights only without the cache: DreamBooth keeps frozen weights at full
    precision (fp32 here), so the difference is T5's parameters at 4 bytes; the cached encoders are T5's."""
    from sdcore.models.layout import read_layout
    from sdcore.train.preflight import memory_plan

    layout = read_layout("tiny:sd3")
    options = _options(tmp_path)
    plans = [memory_plan(DreamBoothMethod(o), o, layout=layout, device="cuda")
             for o in (options, dataclasses.replace(options, cache_text_encoder_outputs=False))]  # fmt: skip
    cached, plain = (p.estimate for p in plans)
    assert plain.weights - cached.weights == plans[0].params.components["text_encoder_3"] * 4
    assert plain.activations > cached.activations  # T5's activations are gone too
    assert (
        cached.settings["text_cached_encoders"] == ["text_encoder_3"] and plain.settings["text_cached_encoders"] == []
    )


def test_a_kohya_sd3_train_toml_with_use_t5xxl_cache_only_caches_t5_alone(tmp_path):
    """kohya sd3_train.py: ``use_t5xxl_cache_only`` turns ``cache_text_encoder_outputs`` on (its L86-91) and caches
    T5's outputs alone while CLIP-L/G train; here the same partial cache, no note saying otherwise."""
    data = make_tiny_dataset(tmp_path / "data", n=2)
    path = tmp_path / "kohya.toml"
    path.write_text(
        'pretrained_model_name_or_path = "tiny:sd3"\ntrain_text_encoder = true\nuse_t5xxl_cache_only = true\n'
        f'train_data_dir = "{data}"\noutput_dir = "{tmp_path / "out"}"\nresolution = "64,64"\nmax_train_steps = 1\n'
        't5xxl_max_token_length = 16\ncaption_extension = ".txt"\n',  # make_tiny_dataset's (kohya's: .caption)
        encoding="utf-8",
    )
    notes: list[str] = []
    options = load_options(DreamBoothOptions, path, notes=notes)
    assert options.cache_text_encoder_outputs is True and options.train_text_encoder and not options.train_t5
    assert not [n for n in notes if n.startswith(("use_t5xxl_cache_only", "cache_text_encoder_outputs"))]
    session = TrainSession(DreamBoothMethod(dataclasses.replace(options, progress=False)))
    session.setup()
    assert session.text_cache is not None and session.text_cache.partial == ("text_encoder_3",)
    assert session.text_cache.encoded == 2  # the two captions, once each


def test_resume_of_a_partial_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    from sdcore.testing.contract import check_resume

    joined: list[int] = []  # the steps' joins of T5's cached part with the live CLIP (every run is a partial one)
    real = DreamBoothMethod.encode_partial

    def counting(self, bundle, captions, cached=None):
        if cached is not None:
            joined.append(len(captions))
        return real(self, bundle, captions, cached)

    monkeypatch.setattr(DreamBoothMethod, "encode_partial", counting)
    check_resume(DreamBoothMethod, tmp_path, {"train_text_encoder": True, "cache_text_encoder_outputs": True,
                                              "t5xxl_max_token_length": 16, "lr": 1e-4}, steps=4, family="sd3")  # fmt: skip
    assert len(joined) == 4 + 2 + 2  # the full run's 4 steps, then 2 before the interruption and 2 resumed


def test_weighted_captions_follow_the_same_rule(tmp_path):
    """``--weighted-captions`` needs the family's encoding (kohya's train_db.py/sdxl_train.py read the emphasis):
    DreamBooth's padded encoding is it, its ``--no-token-padding`` one is not (the same declaration decides)."""
    from sdcore.train.caption_checks import caption_option_problems

    padded = _options(tmp_path, model="tiny:sd1", weighted_captions=True)
    assert caption_option_problems(padded, DreamBoothMethod(padded)) == []
    unpadded = dataclasses.replace(padded, no_token_padding=True)
    (problem,) = caption_option_problems(unpadded, DreamBoothMethod(unpadded))
    assert "encodes captions its own way" in problem


def test_the_dry_run_plan_names_the_partial_cache(tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    data = make_tiny_dataset(tmp_path / "data", n=2)
    args = ["train", "dreambooth", "--model", "tiny:sd3", "--data", str(data), "--output", str(tmp_path / "o.safetensors"),
            "--resolution", "64", "--train-text-encoder", "--dry-run"]  # fmt: skip
    texts = []
    for extra in ([], ["--train-t5"]):
        result = CliRunner().invoke(build_cli(get_plugin_manager()), args + extra, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        texts.append(result.output)
    assert "text-encoder outputs in memory, T5-XXL only (the training text encoders run every step)" in texts[0]
    assert "text-encoder outputs no (the text encoder runs every step)" in texts[1]


def test_a_subclass_with_its_own_encode_is_excluded_by_default(tmp_path):
    """The default of :meth:`TrainingMethod.encodes_as_family`: a method that overrides ``encode`` encodes its own
    way unless it says otherwise. A plugin subclassing DreamBooth to encode differently (here: a prefix word) must
    not get DreamBooth's "family encoding" answer: a partial cache would join T5's cached part of the plain caption
    with the live CLIP, not what its ``encode`` returns, and ``--weighted-captions`` would be taken unread."""
    from sdcore.train.caption_checks import caption_option_problems

    class Prefixed(DreamBoothMethod):
        def encode(self, bundle, captions):
            return super().encode(bundle, [f"sks {c}" for c in captions])

    options = _options(tmp_path)
    own = Prefixed(options)
    assert not own.encodes_as_family()
    assert partial_text_encoders(options, own.capabilities(), "sd3", own) == ()
    weighted = _options(tmp_path, model="tiny:sd1", weighted_captions=True)
    assert caption_option_problems(weighted, Prefixed(weighted))  # refused: its encode does not read emphasis
    assert DreamBoothMethod(options).encodes_as_family()  # DreamBooth itself still delegates

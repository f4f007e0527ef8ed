"""``--no-token-padding`` (kohya train_db.py's ``--no_token_padding``): captions padded to the batch's
longest, not to 77 tokens; the conditioning is a plain CLIP forward of those ids."""

from __future__ import annotations

import pytest
import torch
from sdcore.errors import ConfigError
from sdcore.models.text import encode_prompts
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.config import load_options
from sdcore.train.preflight import run_preflight
from sdplugin_dreambooth.method import DreamBoothMethod
from sdplugin_dreambooth.options import DreamBoothOptions
from transformers import CLIPTextModel

CAPTIONS = ["a dog", "a photo of sks dog on a red sofa, sunlight"]


def _reference(bundle, captions):
    """kohya's calls, written from its source: ``tokenizer(captions, padding=True, truncation=True)``, then
    ``text_encoder(input_ids)[0]`` on a separately built transformers CLIPTextModel with the same weights."""
    encoder = bundle.text_encoders[0]
    model = CLIPTextModel(encoder.config).eval()
    model.load_state_dict(encoder.state_dict())
    ids = bundle.tokenizers[0](captions, padding=True, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, model(ids)[0]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_conditioning_is_the_unpadded_clip_forward(tmp_path, family):
    bundle = create_tiny_bundle(family)
    method = DreamBoothMethod(contract_options(DreamBoothMethod, tmp_path, {"no_token_padding": True}, family=family))
    with torch.no_grad():
        cond = method.encode(bundle, CAPTIONS)
    ids, want = _reference(bundle, CAPTIONS)
    longest = max(len(bundle.tokenizers[0](c).input_ids) for c in CAPTIONS)
    assert ids.shape[1] == longest < 77
    assert cond.hidden_states.shape == want.shape == (2, longest, want.shape[-1])
    torch.testing.assert_close(cond.hidden_states, want, rtol=1e-5, atol=1e-5)
    assert cond.pooled is None
    # a batch of one is not padded at all: its own length
    with torch.no_grad():
        alone = method.encode(bundle, CAPTIONS[:1]).hidden_states
    assert alone.shape[1] == len(bundle.tokenizers[0](CAPTIONS[0]).input_ids)
    torch.testing.assert_close(alone, _reference(bundle, CAPTIONS[:1])[1], rtol=1e-5, atol=1e-5)


def test_long_captions_are_cut_at_77_tokens(tmp_path):
    bundle = create_tiny_bundle("sd1")
    method = DreamBoothMethod(contract_options(DreamBoothMethod, tmp_path, {"no_token_padding": True}))
    long = ", ".join(f"tag{i}" for i in range(60))
    assert len(bundle.tokenizers[0](long).input_ids) > 77
    with torch.no_grad():
        cond = method.encode(bundle, [long, "a dog"]).hidden_states
    ids, want = _reference(bundle, [long, "a dog"])
    assert cond.shape[1] == ids.shape[1] == 77
    torch.testing.assert_close(cond, want, rtol=1e-5, atol=1e-5)


def test_without_the_option_nothing_changes(tmp_path):
    bundle = create_tiny_bundle("sd1")
    method = DreamBoothMethod(contract_options(DreamBoothMethod, tmp_path, {}))
    assert method.capabilities().cacheable_text
    with torch.no_grad():
        cond = method.encode(bundle, CAPTIONS).hidden_states
        want = encode_prompts(bundle, CAPTIONS).hidden_states
    assert cond.shape[1] == 77 and torch.equal(cond, want)


def test_training_conditions_the_unet_on_unpadded_states(tmp_path):
    """A run with the text encoder frozen (normally cached) encodes every step, unpadded."""
    from sdcore.train.loop import train

    bundle = create_tiny_bundle("sd1")
    lengths: list[int] = []

    def spy(module, args, kwargs):
        states = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        lengths.append(int(states.shape[1]))

    bundle.unet.register_forward_pre_hook(spy, with_kwargs=True)
    values = {"no_token_padding": True, "max_steps": 2, "batch_size": 2, "lr": 1e-4, "save_dtype": "fp32"}
    options = contract_options(DreamBoothMethod, tmp_path, values)
    assert options.cache_text_encoder_outputs and not options.train_text_encoder
    train(DreamBoothMethod(options), bundle=bundle)
    assert lengths and all(n < 77 for n in lengths), lengths


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"clip_skip": 2}, "ignores clip skip"), ({"weighted_captions": True}, "weighted path pads")],
)
def test_contradicting_options_are_refused(tmp_path, overrides, message):
    options = contract_options(DreamBoothMethod, tmp_path, {"no_token_padding": True, **overrides})
    with pytest.raises(ConfigError, match=message):
        DreamBoothMethod(options).validate()


def test_other_families_are_refused_in_the_preflight(tmp_path):
    options = contract_options(DreamBoothMethod, tmp_path, {"no_token_padding": True}, family="sdxl")
    report = run_preflight(DreamBoothMethod(options), options, plan=False)
    assert any("for SD1/SD2 models; this model is sdxl" in p for p in report.problems), report.problems


def test_kohya_name(tmp_path):
    cfg = tmp_path / "db.toml"
    cfg.write_text('pretrained_model_name_or_path = "tiny:sd1"\nno_token_padding = true\n', encoding="utf-8")
    notes: list[str] = []
    o = load_options(DreamBoothOptions, cfg, notes=notes)
    assert o.no_token_padding is True
    assert any("sd-scripts since then ignores the flag" in n for n in notes)


def test_kohya_name_is_refused_for_lora_style_methods(tmp_path):
    """train_db.py's option only: a method without it names where it belongs."""
    from sdcore.train.options import TrainOptions

    with pytest.raises(ConfigError, match="kohya's dreambooth option"):
        load_options(TrainOptions, None, kohya={"no_token_padding": True})


def test_memory_plan_keeps_the_text_encoder_resident(tmp_path):
    """No text cache with the option: on a GPU the frozen text encoder stays there, and the plan says so."""
    from sdcore.models.layout import read_layout
    from sdcore.train.preflight import memory_plan

    layout = read_layout("tiny:sd1")
    totals = []
    for flag in (False, True):
        options = contract_options(DreamBoothMethod, tmp_path, {"no_token_padding": flag})
        totals.append(memory_plan(DreamBoothMethod(options), options, layout=layout, device="cuda").estimate.total)
    assert totals[1] > totals[0]

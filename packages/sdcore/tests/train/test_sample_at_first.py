"""kohya's --sample_at_first (sdcore --sample-at-first): the sample prompts rendered once before the
first optimizer step, into <name>-samples/step00000000.png."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
from runtime_methods import ConvOutMethod, ConvOutOptions
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.kohya import translate
from sdcore.train.loop import train
from sdcore.train.preflight import option_problems


def _fake_pipeline(monkeypatch, calls):
    from PIL import Image

    def fake_generate(bundle, prompts, **kw):
        calls.append(bundle.unet.conv_out.weight.detach().clone())  # the weights each render sees
        return [Image.new("RGB", (kw["width"], kw["height"]), (len(calls) * 40, 0, 0)) for _ in prompts]

    module = types.ModuleType("sdcore.generate.pipeline")
    module.generate_images = fake_generate  # type: ignore[attr-defined]
    module.sampler_id = lambda name: name  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sdcore.generate.pipeline", module)


def test_renders_the_untrained_model_before_the_first_step(tmp_path, monkeypatch):
    calls: list[torch.Tensor] = []
    _fake_pipeline(monkeypatch, calls)
    overrides = {"max_steps": 2, "sample_every": 2, "sample_prompts": "a red thing", "sample_at_first": True}
    o = contract_options(ConvOutMethod, tmp_path, {**overrides, "lr": 1e-2})
    bundle = create_tiny_bundle("sd1")
    start = bundle.unet.conv_out.weight.detach().clone()
    train(ConvOutMethod(o), bundle=bundle)
    samples = tmp_path / "run" / "result-samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step00000000.png", "step00000002.png"]
    assert len(calls) == 2
    assert torch.equal(calls[0], start)  # before any update
    assert not torch.equal(calls[1], start)  # step 2: trained


def test_off_by_default(tmp_path, monkeypatch):
    calls: list[torch.Tensor] = []
    _fake_pipeline(monkeypatch, calls)
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 2, "sample_every": 2, "sample_prompts": "a red thing"})
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    assert sorted(p.name for p in (tmp_path / "run" / "result-samples").iterdir()) == ["step00000002.png"]


def test_real_render_at_step_zero(tmp_path):
    pytest.importorskip("sdcore.generate.pipeline")
    from PIL import Image

    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"max_steps": 1, "sample_prompts": "tiny, red stripes", "sample_steps": 2, "sample_at_first": True},
    )
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    grid = Image.open(tmp_path / "run" / "result-samples" / "step00000000.png")
    assert grid.size == (64, 64)
    assert (tmp_path / "run" / "result-samples" / "final.png").is_file()


def test_needs_prompts_and_kohya_name(tmp_path):
    o = contract_options(ConvOutMethod, tmp_path, {"sample_at_first": True})
    assert "--sample-at-first needs --sample-prompts" in option_problems(o)
    fields = [f.name for f in dataclasses.fields(ConvOutOptions)]
    both = translate({"sample_at_first": True, "sample_prompts": "p.txt"}, fields, where="cfg")
    assert both.values == {"sample_at_first": True, "sample_prompts": "p.txt"} and not both.notes
    alone = translate({"sample_at_first": True}, fields, where="cfg")
    assert alone.values == {} and alone.notes == ["sample_at_first without sample_prompts: no sample images"]

"""FLUX.1 Kontext sample prompts: ai-toolkit's ``--ctrl_img PATH`` and musubi-tuner's ``--ci PATH`` name the
reference image a training sample edits; the render uses it as ai-toolkit's Kontext samples do (stretched to the
sample's size with bilinear, no Kontext resize), also from the prompt encodings made at caching time; an unreadable
file or a non-Flux model is a pre-flight problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from runtime_methods import ConvOutMethod
from sdcore.testing.contract import contract_options
from sdcore.train.options import TrainOptions
from sdcore.train.preflight import option_problems
from sdcore.train.sample_prompts import generation_arguments, generation_calls, parse_prompt_line

pytest.importorskip("sdcore.generate.pipeline")


def _picture(path, width: int = 70, height: int = 50):
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((width, height)).save(path)
    return path


def test_ctrl_img_and_ci_are_parsed_and_reach_the_generation_arguments():
    line = parse_prompt_line("make the person smile  --ctrl_img /data/ctrl/person 1.jpg --w 512 --d 3")
    assert line.prompt == "make the person smile" and line.reference == "/data/ctrl/person 1.jpg"
    assert line.ignored == () and line.width == 512 and line.seed == 3
    assert parse_prompt_line("x --ci a.png").reference == "a.png"
    arguments = generation_arguments([line], {"steps": 20, "width": 256, "height": 256}, {}, distilled=True)
    assert arguments["reference_image"] == "/data/ctrl/person 1.jpg"
    assert arguments["reference_resize"] == "output" and arguments["width"] == 512
    # prompts with different references never share a generation call
    calls = generation_calls([parse_prompt_line("x --ci a.png"), parse_prompt_line("x --ci b.png")], seed=0)
    assert len(calls) == 2


def test_a_repeated_flag_keeps_the_image_its_tool_samples_with():
    """musubi-tuner collects every ``--ci`` (hv_train_network.py parse_prompt_line appends to
    ``control_image_path``) and its FLUX.1 Kontext sample edits the first (flux_kontext_train_network.py
    do_inference: ``control_image_path[0]``); ai-toolkit's ``--ctrl_img`` is one value, the last one given
    (toolkit/config_modules.py ``_process_prompt_string``: ``self.ctrl_img = content``)."""
    assert parse_prompt_line("x --ci first.png --ci second.png").reference == "first.png"
    assert parse_prompt_line("x --ctrl_img first.png --ctrl_img second.png").reference == "second.png"


def test_ai_toolkit_job_prompts_carry_their_control_image(tmp_path):
    from sdcore.train.aitoolkit import read_sample_prompts

    job = tmp_path / "job.yaml"
    job.write_text(
        """job: extension
config:
  name: k
  process:
    - type: sd_trainer
      model: {name_or_path: x, arch: flux}
      sample:
        width: 512
        height: 768
        prompts:
          - "make the person smile  --ctrl_img /ctrl/person1.jpg"
        samples:
          - prompt: "give the person an afro"
            ctrl_img: /ctrl/person2.jpg
""",
        encoding="utf-8",
    )
    prompts = read_sample_prompts(job)
    assert [(p.prompt, p.reference, p.width, p.height) for p in prompts] == [
        ("give the person an afro", "/ctrl/person2.jpg", 512, 768)
    ]  # ai-toolkit: `samples` wins over `prompts`
    job.write_text(job.read_text().split("        samples:")[0], encoding="utf-8")
    (prompt,) = read_sample_prompts(job)
    assert prompt.prompt == "make the person smile" and prompt.reference == "/ctrl/person1.jpg"


def test_preflight_says_a_missing_reference_and_a_non_flux_model(tmp_path):
    good = _picture(tmp_path / "good.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a --ctrl_img {tmp_path / 'missing.png'}\nb --ci {good}\n", encoding="utf-8")
    o = contract_options(ConvOutMethod, tmp_path, {"sample_prompts": str(prompts), "model": "tiny:flux"})
    problems = option_problems(o)
    assert [p for p in problems if "reference" in p] == [
        f"--sample-prompts: reference image {tmp_path / 'missing.png'}: no such file"
    ]
    prompts.write_text(f"b --ci {good}\n", encoding="utf-8")
    o = contract_options(ConvOutMethod, tmp_path, {"sample_prompts": str(prompts), "model": "tiny:sd1"})
    assert any("--ctrl_img/--ci is FLUX.1 Kontext's reference image; a sd1 model" in p for p in option_problems(o))
    o = contract_options(ConvOutMethod, tmp_path, {"sample_prompts": str(prompts), "model": "tiny:flux"})
    assert not [p for p in option_problems(o) if "reference" in p or "ctrl_img" in p]


class _Plain(ConvOutMethod):
    def __init__(self) -> None:
        pass


def test_the_sample_edits_its_reference_as_ai_toolkit_renders_it(tmp_path):
    """The render equals FluxKontextPipeline given the control image stretched to the sample's size with
    bilinear and ``_auto_resize=False`` (ai-toolkit's flux_kontext generate_single_image); from the caching-time
    encodings too."""
    from diffusers import FluxKontextPipeline
    from sdcore.models.flux.adapter import FluxAdapter
    from sdcore.train.sampling import encode_sample_prompts, render_samples

    bundle = FluxAdapter().create_tiny(variant="dev", seed=0)
    reference = _picture(tmp_path / "person.png")
    options = TrainOptions(sample_prompts=f"make it red --ctrl_img {reference} --w 64 --h 80 --s 2 --d 5 --g 3 "
                                          "--ss euler", resolution=64)  # fmt: skip

    def render(tag, memo=None):
        path = render_samples(bundle, _Plain(), options, device=torch.device("cpu"), folder=tmp_path, tag=tag,
                              step=0, say=lambda _: None, conditioning=memo)  # fmt: skip
        assert path is not None
        return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)

    live = render("live")
    pipe = FluxKontextPipeline(scheduler=type(bundle.noise_scheduler).from_config(bundle.noise_scheduler.config),
                               vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0],
                               text_encoder_2=bundle.text_encoders[1], tokenizer_2=bundle.tokenizers[1],
                               transformer=bundle.transformer)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    control = Image.open(reference).convert("RGB").resize((64, 80), Image.BILINEAR)
    with torch.no_grad():
        expected = pipe(prompt="make it red", image=control, width=64, height=80, num_inference_steps=2,
                        guidance_scale=3.0, max_area=64 * 80, _auto_resize=False,
                        generator=torch.Generator().manual_seed(5)).images[0]  # fmt: skip
    assert np.array_equal(live, np.asarray(expected).astype(np.int16))
    memo = encode_sample_prompts(bundle, options, device=torch.device("cpu"))
    assert memo is not None and "make it red" in memo.texts()
    forwards = []
    handles = [te.register_forward_pre_hook(lambda *_: forwards.append(1)) for te in bundle.text_encoders]
    try:
        stored = render("stored", memo)
    finally:
        for handle in handles:
            handle.remove()
    assert forwards == [] and np.array_equal(stored, live)  # replayed, no text encoder ran

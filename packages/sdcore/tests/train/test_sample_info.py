"""Training samples carry A1111 infotext like ``sdcore generate``'s images (issue 17), and rendering
them is announced so the bar does not stall silently."""

from __future__ import annotations

import json

from PIL import Image
from runtime_methods import ConvOutMethod
from sdcore.generate.pnginfo import parse_parameters, read_png_parameters
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.loop import train
from sdcore.train.sample_info import ALL_PARAMETERS_KEY


def test_sample_grid_has_prompt_seed_and_settings(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red thing\na blue thing\n", encoding="utf-8")
    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"max_steps": 2, "sample_every": 2, "sample_prompts": str(prompts), "sample_steps": 2, "seed": 77},
    )
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    path = tmp_path / "run" / "result-samples" / "step00000002.png"
    params = read_png_parameters(path)
    assert params is not None
    assert params.prompt == "a red thing" and params.seed == 77 and params.steps == 2
    assert params.size == (64, 64) and params.sampler == "euler_a" and params.cfg == 7
    assert params.model_name == "tiny:sd1" and params.extra["Training step"] == "2"
    assert params.extra["RNG"] == "CPU"  # the samples' noise comes from CPU generators (A1111 processing.py)
    with Image.open(path) as image:
        assert "Sampler: Euler a" in image.info["parameters"]
        everything = json.loads(image.info[ALL_PARAMETERS_KEY])
    assert len(everything) == 2 and everything[1].startswith("a blue thing\n") and "Seed: 78" in everything[1]
    assert "rendering 2 sample image(s), 2 steps each" in capsys.readouterr().err


def test_sample_infotext_follows_each_kohya_prompt_line(tmp_path, capsys):
    """A prompt line's own kohya options (--n, --d, --s, --l) are what its image's infotext says."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red thing --n blurry --d 5 --s 3 --l 4.5\na blue thing\n", encoding="utf-8")
    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"max_steps": 1, "sample_every": 1, "sample_prompts": str(prompts), "sample_steps": 2, "seed": 77},
    )
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    path = tmp_path / "run" / "result-samples" / "step00000001.png"
    with Image.open(path) as image:
        first, second = (parse_parameters(t) for t in json.loads(image.info[ALL_PARAMETERS_KEY]))
    assert first.prompt == "a red thing" and first.negative_prompt == "blurry"
    assert (first.seed, first.steps, first.cfg) == (5, 3, 4.5)
    assert (second.prompt, second.seed, second.steps, second.negative_prompt) == ("a blue thing", 78, 2, "")
    # the announcement names the lines' own --s too (it said "2 steps each")
    assert "rendering 2 sample image(s), 2 or 3 steps each" in capsys.readouterr().err


def test_sample_infotext_says_the_schedule_a1111_19_needs(tmp_path):
    """Plain dpm++2m samples on uniform (SGM Uniform) sigmas; A1111 1.9+ reads a bare "DPM++ 2M" as
    Karras (modules/sd_samplers.py get_sampler_and_scheduler, "Automatic"), so the field is written."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red thing\n", encoding="utf-8")
    o = contract_options(
        ConvOutMethod,
        tmp_path,
        {"max_steps": 1, "sample_every": 1, "sample_prompts": str(prompts), "sample_steps": 2,
         "sample_sampler": "dpm++2m"},
    )  # fmt: skip
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))
    with Image.open(tmp_path / "run" / "result-samples" / "step00000001.png") as image:
        text = image.info["parameters"]
    assert "Sampler: DPM++ 2M, Schedule type: SGM Uniform, CFG scale" in text
    assert parse_parameters(text).sampler == "dpm++2m"


def test_sample_infotext_names_the_part_files_as_generate_does(tmp_path):
    """A separate --vae on SD1: A1111's "VAE hash"/"VAE" right after "Model"; FLUX.1's part files: Forge's "Module
    N" last, as ``sdcore generate`` writes them for the same parts (pnginfo's vae_fields/module_fields)."""
    import dataclasses
    import hashlib

    from sdcore import __version__
    from sdcore.train.sample_info import sample_infotexts
    from sdcore.train.sample_prompts import generation_calls, parse_prompt_line

    vae, clip_l, t5 = (tmp_path / f"{name}.safetensors" for name in ("my-vae", "clip_l", "t5xxl_fp16"))
    for path in (vae, clip_l, t5):
        path.write_bytes(path.name.encode())
    short = hashlib.sha256(vae.read_bytes()).hexdigest()[:10]
    o = contract_options(ConvOutMethod, tmp_path, {"seed": 5})
    calls = generation_calls([parse_prompt_line("a red thing")], 5)
    defaults = {"steps": 2, "width": 64, "height": 64, "sampler": "euler", "cfg": 7.0}
    image = Image.new("RGB", (64, 64))

    sd1 = sample_infotexts(dataclasses.replace(o, vae=str(vae)), 3, calls, defaults, [image], {},
                           bundle=create_tiny_bundle("sd1"))  # fmt: skip
    assert sd1[0].splitlines()[1] == (
        f'Steps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, Model: "tiny:sd1", VAE hash: {short}, '
        f"VAE: my-vae.safetensors, RNG: CPU, Training step: 3, Version: sdcore {__version__}"
    )
    flux = dataclasses.replace(o, model="tiny:flux", vae=str(vae), clip_l=str(clip_l), t5xxl=str(t5))
    text = sample_infotexts(flux, 3, calls, defaults, [image], {}, distilled=True,
                            bundle=create_tiny_bundle("flux"))[0]  # fmt: skip
    assert "VAE hash" not in text
    assert text.splitlines()[1].endswith(
        f", Training step: 3, Version: sdcore {__version__}, Module 1: my-vae, Module 2: clip_l, Module 3: t5xxl_fp16"
    )
    assert parse_parameters(text).extra["Module 3"] == "t5xxl_fp16"

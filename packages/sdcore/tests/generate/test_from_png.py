"""``sdcore generate --from-png``, ``--style`` and ``--tiling`` (A1111's PNG Info, styles.csv and Tiling)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import sdcore
import torch
from click.testing import CliRunner
from PIL import Image
from sdcore.builtin import generate_command
from sdcore.builtin.generate_command import generate
from sdcore.generate.pnginfo import parse_parameters, save_png
from sdcore.generate.recall import recall_parameters
from sdcore.generate.styles import apply_styles, merge_prompts, read_styles, select_styles
from sdcore.generate.tiling import tiling

# A1111's own documented infotext: the docstring of parse_generation_parameters in modules/infotext_utils.py
# (AUTOMATIC1111/stable-diffusion-webui, commit 036500223de0a3caaa86360a8ad3ed301e4367b0)
A1111_DOC_EXAMPLE = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
    "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn "
    "face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)


def _invoke(args):
    from sdcore.plugins import get_plugin_manager

    pm = get_plugin_manager(builtins=False, entrypoints=False)
    return CliRunner().invoke(generate, args, obj=types.SimpleNamespace(pm=pm), catch_exceptions=True)


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), parse_parameters(image.info["parameters"])


def test_sdcore_png_regenerates_bit_identically_and_command_line_wins(tmp_path):
    first = tmp_path / "first.png"
    args = ["-n", "ugly", "--steps", "2", "--seed", "11", "--sampler", "DPM++ 2M", "--clip-skip", "2"]
    hires = ["--hr-scale", "1.5", "--hr-steps", "1", "--denoising-strength", "0.6", "--hr-prompt", "a dog"]
    result = _invoke(["-m", "tiny:sd1", "a cat", *args, *hires, "--tiling", "--device", "cpu", "-o", str(first)])
    assert result.exit_code == 0, result.output
    pixels, params = _pixels(first)
    # A1111 (processing.py create_infotext) writes "Tiling: True" right after RNG, before the hires fields
    keys = list(params.extra)
    assert params.extra["Tiling"] == "True" and keys.index("Tiling") == keys.index("RNG") + 1
    assert keys.index("Tiling") < keys.index("Hires upscale")

    again = tmp_path / "again.png"
    result = _invoke(["-m", "tiny:sd1", "--from-png", str(first), "--device", "cpu", "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert "ignored" not in result.stderr  # everything sdcore wrote, it reads back
    again_pixels, again_params = _pixels(again)
    assert np.array_equal(pixels, again_pixels)
    assert again_params == params

    # options given on the command line win over the PNG's; the rest still comes from it
    other = tmp_path / "other.png"
    result = _invoke(
        [
            "-m",
            "tiny:sd1",
            "a bird",
            "--from-png",
            str(first),
            "--seed",
            "12",
            "--no-hires",
            "--no-tiling",
            "--device",
            "cpu",
            "-o",
            str(other),
        ]
    )
    assert result.exit_code == 0, result.output
    _, other_params = _pixels(other)
    assert (other_params.prompt, other_params.seed, other_params.negative_prompt) == ("a bird", 12, "ugly")
    assert (other_params.steps, other_params.sampler, other_params.extra["Clip skip"]) == (2, "dpm++2m", "2")
    assert "Tiling" not in other_params.extra and "Hires upscale" not in other_params.extra
    assert other_params.size == (64, 64)
    # with --init-image the hires fields stay out and the PNG's denoising strength is img2img's (A1111's
    # "Send to img2img" pastes it into img2img's slider)
    redo = tmp_path / "redo.png"
    result = _invoke(
        ["-m", "tiny:sd1", "--from-png", str(first), "--init-image", str(first), "--device", "cpu", "-o", str(redo)]
    )
    assert result.exit_code == 0, result.output
    _, redo_params = _pixels(redo)
    assert redo_params.extra["Denoising strength"] == "0.6" and redo_params.hires_fix() is None


def test_flux_png_regenerates_with_its_true_and_distilled_cfg(tmp_path):
    # sdcore writes FLUX.1's CFG as Forge does ("CFG scale" the true CFG, "Distilled CFG Scale" --cfg)
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    args = ["-m", "tiny:flux", "--steps", "1", "--size", "32", "--device", "cpu"]
    result = _invoke([*args, "a ring", "-n", "blurry", "--cfg", "4", "--true-cfg-scale", "2", "-o", str(first)])
    assert result.exit_code == 0, result.output
    result = _invoke([*args, "--from-png", str(first), "-o", str(again)])
    assert result.exit_code == 0, result.output
    (pixels, params), (again_pixels, again_params) = _pixels(first), _pixels(again)
    assert (params.cfg, params.extra["Distilled CFG Scale"]) == (2.0, "4")
    assert again_params == params and np.array_equal(pixels, again_pixels)


def test_variation_seed_fields_are_recalled_and_the_image_regenerates(tmp_path):
    """A1111's "Variation seed", "Variation seed strength" and "Seed resize from" set --subseed,
    --subseed-strength and --seed-resize-from: the second image of a batch comes back bit-identical."""
    args = ["-m", "tiny:sd1", "--steps", "2", "--size", "64", "--device", "cpu"]
    first = tmp_path / "first.png"
    variation = ["--subseed", "5", "--subseed-strength", "0.4", "--seed-resize-from", "48x80"]
    result = _invoke([*args, "a cat", "--seed", "3", "--batch", "2", *variation, "-o", str(first)])
    assert result.exit_code == 0, result.output
    second = tmp_path / "first-1.png"
    pixels, params = _pixels(second)
    assert (params.seed, params.extra["Variation seed"], params.extra["Seed resize from"]) == (3, "6", "48x80")
    recalled = recall_parameters(params).values
    assert (recalled["subseed"], recalled["subseed_strength"], recalled["seed_resize_from"]) == (6, 0.4, (48, 80))
    again = tmp_path / "again.png"
    result = _invoke([*args, "--from-png", str(second), "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert "ignored" not in result.stderr
    again_pixels, again_params = _pixels(again)
    assert again_params == params
    # Regenerated alone, not as a batch of 2: an AMD EPYC CPU rounded the two batch sizes' matmuls differently
    # (1 uint8 level here and there), so nearly equal; the first image of the batch, another seed, is far away
    diff = np.abs(pixels.astype(int) - again_pixels.astype(int))
    other = np.abs(pixels.astype(int) - _pixels(tmp_path / "first-0.png")[0].astype(int))
    print("regenerated: max", diff.max(), "mean", diff.mean(), "| other seed mean", other.mean())
    assert diff.max() <= 2 and diff.mean() < 0.05 and other.mean() > 5


def test_a1111_documented_infotext_maps_to_options(sd1):
    recalled = recall_parameters(parse_parameters(A1111_DOC_EXAMPLE))
    values = recalled.values
    assert values["prompt"].startswith("girl with an artist's beret") and values["prompt"].endswith("intricate")
    assert values["negative"].startswith("ugly, fat") and values["negative"].endswith("messy drawing")
    assert (values["steps"], values["sampler"], values["seed"], values["size"]) == (
        20,
        "euler_a",
        965400086,
        (512, 512),
    )
    assert values["clip_skip"] == 1  # A1111: a missing "Clip skip" means 1
    assert "hires" not in values and "tiling" not in values
    assert recalled.cfg_values(distilled=False) == {"cfg": 7.0}
    # its 8-digit hash is A1111's old one: compared with --model's old hash; no RNG field means A1111's GPU noise
    notes = recalled.notes(
        sd1,
        sampler="euler_a",
        hires_sampler=None,
        distilled=False,
        model_hash="0123456789",
        legacy_model_hash="abcdef01",
    )
    assert notes[0] == "warning: the PNG was made with model hash 45dee52b, --model has abcdef01"
    assert notes[1].startswith("ignored from the PNG") and "RNG: not given, A1111's default GPU" in notes[1]
    assert len(notes) == 2
    same = recalled.notes(
        sd1, sampler="euler_a", hires_sampler=None, distilled=False, model_hash=None, legacy_model_hash="45DEE52B"
    )
    assert len(same) == 1 and "model hash" not in same[0]
    # a field that is there is quoted as written; sdcore's own source is no note
    for rng, said in (
        ("GPU", "RNG: GPU (sdcore draws CPU noise"),
        ("NV", "RNG: NV (sdcore draws CPU noise"),
        ("CPU", None),
    ):
        given = recall_parameters(parse_parameters(A1111_DOC_EXAMPLE + f", RNG: {rng}"))
        lines = given.notes(sd1, sampler="euler_a", hires_sampler=None, distilled=False, model_hash=None)
        assert [line for line in lines if "RNG" in line] == ([] if said is None else [lines[-1]])
        assert said is None or (said in lines[-1] and "not given" not in lines[-1])


def test_a1111_19_fields_hires_schedule_and_forge_cfg(sd1):
    # the fields A1111 1.9+ writes (processing.py create_infotext; hires fields from StableDiffusionProcessingTxt2Img)
    text = (
        "a castle <lora:x:0.5>\nNegative prompt: fog\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 42, Size: 512x768, "
        "Model hash: 0123456789, Model: mymodel, Denoising strength: 0.45, Clip skip: 2, ENSD: 31337, "
        'Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent (nearest-exact), Lora hashes: "x: 0123abcd", '
        "Tiling: True, Hypernet: anime, Version: v1.9.4"
    )
    recalled = recall_parameters(parse_parameters(text))
    values = recalled.values
    assert values["prompt"] == "a castle <lora:x:0.5><hypernet:anime:1.0>"  # A1111 appends the old Hypernet field
    assert values["sampler"] == "dpm++2m_karras" and values["clip_skip"] == 2 and values["tiling"] is True
    assert values["hires"] is True and recalled.strength == 0.45 and recalled.img2img_strength is None
    assert (values["hr_scale"], values["hr_steps"], values["hr_upscaler"]) == (1.5, 12, "Latent (nearest-exact)")
    assert values["hr_sampler"] is None and values["hr_prompt"] is None
    assert recalled.ignored == ["ENSD: 31337"]
    # Forge's FLUX.1 fields: "CFG scale" is the true CFG, "Distilled CFG Scale" the embedded guidance
    forge = recall_parameters(
        parse_parameters("x\nSteps: 4, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 1, RNG: CPU")
    )
    assert forge.cfg_values(distilled=True) == {"cfg": 3.5, "true_cfg_scale": 1.0}
    assert forge.cfg_values(distilled=False) == {"cfg": 1.0}
    notes = forge.notes(sd1, sampler="euler_a", hires_sampler=None, distilled=False, model_hash=None)
    assert notes == [
        "ignored from the PNG (sdcore has no option for them): Distilled CFG Scale: 3.5 (not a guidance-distilled model)"
    ]
    # a "Schedule type" sdcore's sampler does not run is said; the one it runs is not
    euler = recall_parameters(
        parse_parameters("x\nSteps: 4, Sampler: Euler, Schedule type: Exponential, Seed: 1, RNG: CPU")
    )
    assert (
        "Schedule type: Exponential"
        in euler.notes(sd1, sampler="euler", hires_sampler=None, distilled=False, model_hash=None)[0]
    )
    uniform = recall_parameters(
        parse_parameters("x\nSteps: 4, Sampler: Euler, Schedule type: Uniform, Seed: 1, RNG: CPU")
    )
    assert uniform.notes(sd1, sampler="euler", hires_sampler=None, distilled=False, model_hash=None) == []


def test_from_png_errors_are_one_line_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("must not load"))
    png = tmp_path / "sde.png"
    save_png(Image.new("RGB", (8, 8)), png, "x\nSteps: 20, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 1")
    result = _invoke(["-m", "tiny:sd1", "--from-png", str(png), "-o", str(tmp_path / "o.png")])
    assert isinstance(result.exception, sdcore.ConfigError)
    message = str(result.exception)
    assert "'DPM++ SDE Karras'" in message and "euler_a" in message and "\n" not in message
    # (an explicit --sampler replaces the unknown one: test_an_unknown_sampler_gives_way_to_sampler)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    result = _invoke(["-m", "tiny:sd1", "--from-png", str(plain), "-o", str(tmp_path / "o.png")])
    assert isinstance(result.exception, sdcore.ConfigError) and "no generation parameters" in str(result.exception)
    result = _invoke(["-m", "tiny:sd1", "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 2 and "PROMPT" in result.output


def test_an_unknown_sampler_gives_way_to_sampler(tmp_path):
    # the error says "pass --sampler": with it the PNG's other fields apply and the image is made
    png = tmp_path / "sde.png"
    save_png(
        Image.new("RGB", (8, 8)), png, "a cat\nSteps: 1, Sampler: DPM++ SDE Karras, CFG scale: 6, Seed: 3, RNG: CPU"
    )
    out = tmp_path / "o.png"
    result = _invoke(
        ["-m", "tiny:sd1", "--from-png", str(png), "--sampler", "euler", "--size", "32x32", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    _, params = _pixels(out)
    assert (params.prompt, params.steps, params.sampler, params.cfg, params.seed) == ("a cat", 1, "euler", 6.0, 3)


def test_from_png_says_what_it_ignores(tmp_path):
    png = tmp_path / "a1111.png"
    save_png(
        Image.new("RGB", (8, 8)),
        png,
        "a cat\nSteps: 1, Sampler: Euler, CFG scale: 6, Seed: 3, Size: 64x64, ENSD: 31337, VAE: x.pt",
    )
    out = tmp_path / "o.png"
    result = _invoke(["-m", "tiny:sd1", "--from-png", str(png), "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [  # the VAE is looked for (test_from_png_model.py); without a models folder it is said
        "warning: the PNG's VAE x.pt is looked for below --models-dir, and there is no models/ here; the model's own "
        "VAE decodes: pass --models-dir or --vae",
        "ignored from the PNG (sdcore has no option for them): ENSD: 31337, RNG: not given, A1111's default GPU noise "
        "(sdcore draws CPU noise, A1111's 'CPU' source)",
    ]
    _, params = _pixels(out)
    assert (params.prompt, params.steps, params.sampler, params.cfg, params.seed) == ("a cat", 1, "euler", 6.0, 3)


# --- styles ---------------------------------------------------------------------------------------------


def test_style_rules_are_a1111s():
    # modules/styles.py merge_prompts: without {prompt} the stripped texts join with ", ", empty ones left out
    assert merge_prompts("masterpiece, best quality ", "  a cat ") == "a cat, masterpiece, best quality"
    assert merge_prompts("masterpiece", "") == "masterpiece" and merge_prompts("", "a cat ") == "a cat"
    # with {prompt} every placeholder takes the prompt as it is (not stripped)
    assert merge_prompts("photo of {prompt}, {prompt}!", " a cat") == "photo of  a cat,  a cat!"
    # apply_styles_to_prompt: each style applies to the previous result, in order
    assert apply_styles("a cat", ["in {prompt} land", "oil"]) == "in a cat land, oil"
    assert apply_styles("a cat", ["oil", "in {prompt} land"]) == "in a cat, oil land"


def test_styles_file_as_a1111_reads_it(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(
        '\ufeffname,prompt,negative_prompt\n# comment,x,y\nPhoto, "photo of {prompt}, 35mm", blurry\n'
        "Oil,oil painting,\nOil,oil painting 2,bad\n,nameless,z\n",
        encoding="utf-8",
    )
    styles = read_styles(path)
    assert list(styles) == ["Photo", "Oil"]  # BOM, comment and nameless rows skipped, a later row wins
    assert (styles["Photo"].prompt, styles["Photo"].negative_prompt) == ("photo of {prompt}, 35mm", "blurry")
    assert styles["Oil"].prompt == "oil painting 2"
    old = tmp_path / "old.csv"
    old.write_text("name,text\nA,old style\n", encoding="utf-8")  # A1111's older "name, text" columns
    assert read_styles(old)["A"].prompt == "old style" and read_styles(old)["A"].negative_prompt == ""
    with pytest.raises(sdcore.ConfigError, match=r"unknown style 'Nope' in .*; styles there: 'Photo', 'Oil'"):
        select_styles(styles, ["Photo", "Nope"], path)
    with pytest.raises(sdcore.ConfigError, match="does not exist"):
        read_styles(tmp_path / "missing.csv")


def test_style_option_applies_to_prompt_and_negative(tmp_path):
    (tmp_path / "styles.csv").write_text(
        "name,prompt,negative_prompt\nPhoto,photo of {prompt},blurry\nHQ,best quality,lowres\n"
    )
    out = tmp_path / "o.png"
    base = ["-m", "tiny:sd1", "a cat", "-n", "ugly", "--steps", "1", "--device", "cpu", "-o", str(out)]
    # the default file is styles.csv in --models-dir's parent, A1111's root
    result = _invoke([*base, "--models-dir", str(tmp_path / "models"), "--style", "Photo", "--style", "HQ"])
    assert result.exit_code == 0, result.output
    _, params = _pixels(out)
    assert (params.prompt, params.negative_prompt) == ("photo of a cat, best quality", "ugly, blurry, lowres")
    result = _invoke([*base, "--styles-file", str(tmp_path / "styles.csv"), "--style", "Nope", "--overwrite"])
    assert isinstance(result.exception, sdcore.ConfigError) and "'Photo', 'HQ'" in str(result.exception)


# --- tiling ---------------------------------------------------------------------------------------------


def _modes(*modules):
    return [m.padding_mode for module in modules for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def test_tiling_pads_every_conv_circularly_during_the_call_only(sd1):
    from sdcore.generate.pipeline import generate_images

    convs = [m for m in sd1.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    convs[0].padding_mode = "reflect"  # a layer's own mode comes back, not "zeros"
    before = _modes(sd1.unet, sd1.vae)
    seen: list[list[str]] = []
    hooks = [
        sd1.unet.register_forward_pre_hook(lambda *_: seen.append(_modes(sd1.unet, sd1.vae))),
        sd1.vae.decoder.register_forward_pre_hook(lambda *_: seen.append(_modes(sd1.unet, sd1.vae))),
    ]
    try:
        kwargs = {"steps": 2, "seed": 3, "sampler": "euler"}
        tiled = generate_images(sd1, ["stone wall"], tiling=True, **kwargs)[0]
        assert seen and all(modes == ["circular"] * len(before) for modes in seen)
        assert _modes(sd1.unet, sd1.vae) == before
        seen.clear()
        plain = generate_images(sd1, ["stone wall"], **kwargs)[0]
        assert seen and all(modes == before for modes in seen)
    finally:
        for hook in hooks:
            hook.remove()
        convs[0].padding_mode = "zeros"
    assert not np.array_equal(np.asarray(tiled), np.asarray(plain))
    # an error inside the block restores the modes too
    with pytest.raises(RuntimeError), tiling(sd1):
        raise RuntimeError("boom")
    assert set(_modes(sd1.unet, sd1.vae)) == {"zeros"}


def test_tiling_on_flux_wraps_the_vae():
    from sdcore.models.flux.adapter import FluxAdapter

    # A1111's rule (every Conv2d of the model; Forge's apply_circular_forge is disabled since before its FLUX.1
    # support): FLUX.1's transformer embeds patches with a linear layer, so its VAE is what wraps
    flux = FluxAdapter().create_tiny(variant="dev", seed=0)
    with tiling(flux) as layers:
        assert layers and set(_modes(flux.vae)) == {"circular"}
        assert set(_modes(flux.denoiser)) <= {"circular"}
    assert set(_modes(flux.vae)) == {"zeros"}


def test_from_png_reads_a_jpegs_exif_and_a_jpeg_without_one_is_one_line(tmp_path, monkeypatch):
    from exif_bytes import a1111_exif

    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("must not load"))
    bare = tmp_path / "bare.jpg"
    Image.new("RGB", (8, 8)).save(bare, format="JPEG")
    result = _invoke(["-m", "tiny:sd1", "--from-png", str(bare), "-o", str(tmp_path / "o.png")])
    assert isinstance(result.exception, sdcore.ConfigError)
    assert str(result.exception) == (
        f"--from-png {bare}: the image has no generation parameters (no 'parameters' PNG text, no EXIF UserComment, "
        "no ComfyUI 'prompt')"
    )
    assert result.exception.exit_code == 2  # found before the model loads: the CLI exits 2 as for every such problem
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    result = _invoke(["-m", "tiny:sd1", "--from-png", str(broken), "-o", str(tmp_path / "o.png")])
    assert result.exception.exit_code == 2
    assert str(result.exception).startswith(f"--from-png {broken}: cannot read the image")
    # an A1111 JPEG (EXIF UserComment, "UNICODE" + UTF-16BE) is recalled: its unknown sampler is the error here
    a1111 = tmp_path / "a1111.jpg"
    text = "x\nSteps: 20, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 1"
    Image.new("RGB", (8, 8)).save(a1111, format="JPEG", exif=a1111_exif(b"UNICODE\0" + text.encode("utf-16-be")))
    result = _invoke(["-m", "tiny:sd1", "--from-png", str(a1111), "-o", str(tmp_path / "o.png")])
    assert isinstance(result.exception, sdcore.ConfigError) and "'DPM++ SDE Karras'" in str(result.exception)


def test_a_styles_problem_is_said_with_the_axis_and_network_problems(tmp_path, monkeypatch):
    """A missing styles file, a wrong X/Y/Z axis and a LoRA tag nothing can resolve: one line naming all three, before
    the model loads (each used to stop the command on its own, the first one found hiding the others)."""
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("must not load"))
    models = tmp_path / "models"
    (models / "Lora").mkdir(parents=True)
    args = ["-m", "tiny:sd1", "a <lora:gone:0.5>", "--style", "nope", "--models-dir", str(models)]
    result = _invoke([*args, "--x-type", "Bogus", "--x-values", "1", "-o", str(tmp_path / "o.png")])
    message = str(result.exception)
    assert isinstance(result.exception, sdcore.ConfigError) and "\n" not in message
    assert "styles.csv does not exist" in message and "'Bogus'" in message and "<lora:gone:0.5>" in message

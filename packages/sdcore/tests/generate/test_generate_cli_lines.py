"""``sdcore generate``'s one-line refusals read as a Forge/ComfyUI user meets them: each problem said once, with
the change that works (not a second, contradicting one)."""

from __future__ import annotations

import types

from PIL import Image


def _cli(*args: str):
    from click.testing import CliRunner
    from sdcore.builtin.generate_command import generate
    from sdcore.plugins import get_plugin_manager

    pm = get_plugin_manager(builtins=False, entrypoints=False)
    return CliRunner().invoke(generate, list(args), obj=types.SimpleNamespace(pm=pm))


def test_hires_with_an_inpainting_is_said_once_and_keeps_the_init_image(tmp_path):
    from sdcore.errors import ConfigError

    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "init.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    base = ["a cat", "-m", "tiny:flux", "--init-image", str(tmp_path / "init.png"), "--hires", "-o",
            str(tmp_path / "o.png")]  # fmt: skip
    result = _cli(*base, "--mask", str(tmp_path / "mask.png"))
    assert isinstance(result.exception, ConfigError) and result.exception.exit_code == 2
    line = str(result.exception)
    # dropping --init-image would only trade this for "--mask repaints part of an init image"
    assert "drop the --hr options" in line and "drop --init-image" not in line
    assert line.count("the hires fix follows a txt2img pass") == 1
    result = _cli(*base)  # img2img: either way out works
    assert isinstance(result.exception, ConfigError)
    assert "drop --init-image or the --hr options" in str(result.exception)
    assert not (tmp_path / "o.png").exists()


def test_a_kontext_reference_with_an_inpainting_says_to_drop_both(tmp_path):
    """The Kontext refusal of --init-image names the mask too, else following it only meets '--mask repaints
    part of an init image: add --init-image'."""
    from sdcore.errors import ConfigError

    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "init.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    result = _cli("make it red", "-m", "tiny:flux-kontext", "--reference-image", str(tmp_path / "init.png"),
                  "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "-o",
                  str(tmp_path / "o.png"))  # fmt: skip
    assert isinstance(result.exception, ConfigError) and result.exception.exit_code == 2
    assert "drop --init-image (and its --mask" in str(result.exception)


def test_other_tools_option_names_name_sdcores():
    """A1111's API/prompts-file names and kohya gen_img.py's flags: click's nearest spellings of ``--cfg-scale``
    were --hr-scale, --slg-scale and --true-cfg-scale, none of them the CFG scale a user meant."""
    for typed, hint in (
        ("--cfg-scale", "A1111's CFG Scale is --cfg"),
        ("--cfg_scale", "A1111's CFG Scale is --cfg"),
        ("--scale", "kohya gen_img.py's --scale, the CFG scale, is --cfg"),
        ("--W", "kohya gen_img.py's --W/--H are --size WIDTHxHEIGHT"),
        ("--width", "width and height are --size WIDTHxHEIGHT"),
        ("--images_per_prompt", "kohya gen_img.py's images per prompt are --batch (image i has seed+i)"),
        ("--network_weights", "LoRA files are written in the prompt, <lora:NAME:WEIGHT>, found in --lora-dir"),
        ("--prompt", 'the prompt is the command\'s argument: sdcore generate "a cat" (or --from-file for several)'),
        ("--fp16", "half precision is --dtype fp16"),
        (
            "--scheduler",
            "the schedule goes with the sampler's name, as A1111 wrote it before 1.9: --sampler 'DPM++ 2M Karras'",
        ),
        ("--num_inference_steps", "the number of steps is --steps"),
        ("--lora", "LoRA files are written in the prompt, <lora:NAME:WEIGHT>, found in --lora-dir"),
    ):
        result = _cli("a cat", "-m", "tiny:sd1", typed, "5")
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert f"No such option: {typed} ({hint})" in result.output, result.output
        assert "Did you mean" not in result.output
    result = _cli("a cat", "-m", "tiny:sd1", "--stepz", "5")  # a typo of sdcore's own name: click's suggestion
    assert result.exit_code == 2 and "--steps" in result.output, result.output

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

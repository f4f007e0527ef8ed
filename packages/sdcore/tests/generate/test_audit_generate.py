"""What a newcomer to ``sdcore generate`` tripped on (A1111/kohya habits), each checked before the model loads."""

from __future__ import annotations

import types

import pytest
from click.testing import CliRunner
from sdcore.builtin import generate_command
from sdcore.builtin.generate_command import generate


def _no_load(*args, **kwargs):
    raise AssertionError("the model must not be loaded")


def _invoke(args):
    from sdcore.plugins import get_plugin_manager

    pm = get_plugin_manager(builtins=False, entrypoints=False)
    return CliRunner().invoke(generate, args, obj=types.SimpleNamespace(pm=pm), catch_exceptions=True)


@pytest.mark.parametrize("existing", [False, True])
def test_output_folder_is_refused_with_the_file_name_to_give(tmp_path, monkeypatch, existing):
    """``-o outputs/`` (A1111's --outdir habit) wrote one PNG named ``outputs`` (Path drops the slash); an
    existing folder got click's bare "is a directory". Both now name the file to give, and nothing is written."""
    monkeypatch.setattr(generate_command, "_load_bundle", _no_load)
    folder = tmp_path / "outputs"
    if existing:
        folder.mkdir()
    result = _invoke(["-m", "tiny:sd1", "a cat", "-o", f"{folder}/"])
    assert result.exit_code == 2, result.output
    assert f"{folder}/ is a folder; -o names the image file, e.g. -o {folder / 'output.png'}" in result.output
    assert "Traceback" not in result.output
    assert folder.is_dir() == existing and not (existing and any(folder.iterdir()))
    if existing:  # without the slash too
        result = _invoke(["-m", "tiny:sd1", "a cat", "-o", str(folder)])
        assert result.exit_code == 2 and f"{folder} is a folder; -o names the image file" in result.output


@pytest.mark.parametrize(
    ("typed", "says"),
    [
        ("--enable_hr", "A1111's enable_hr (Hires. fix) is --hires"),  # click: "Did you mean '--sampler'?"
        ("--enable-hr", "A1111's enable_hr (Hires. fix) is --hires"),
        ("--hr_second_pass_steps", "A1111's hires steps are --hr-steps"),
        ("--n_samples", "images per batch, are --batch"),  # click: --hr-sampler, --same-seed, --sampler
        ("--num_images_per_prompt", "diffusers' num_images_per_prompt is --batch"),
        ("--num-images", "--batch (one batch) times --n-iter"),  # click: --control-image, --init-image
        ("--restore_faces", "sdcore has no face restoration"),
        ("--refiner_checkpoint", "sdcore has no refiner switch inside one run"),  # click: nothing
        ("--refiner", "sdcore has no refiner switch inside one run"),  # click: --from-file
        ("--eta", "sdcore has no eta setting"),  # click: --ae, --t5, --vae
        ("--ddim_eta", "sdcore has no eta setting"),
        ("--s_noise", "sdcore has no sigma churn/noise settings"),  # click: --no-hires, --size
    ],
)
def test_other_tools_option_names_say_sdcores_way(typed, says):
    result = _invoke(["-m", "tiny:sd1", "a cat", typed, "1"])
    assert result.exit_code == 2
    assert f"No such option: {typed} (" in result.output and says in result.output, result.output
    assert "Did you mean" not in result.output

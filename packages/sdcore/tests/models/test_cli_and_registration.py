"""``sdcore model`` commands through click's CliRunner, and the hook registrations."""

from __future__ import annotations

import click
from click.testing import CliRunner
from sdcore.builtin import model_commands, model_formats
from sdcore.models.load import load_model
from sdcore.specs import ModelFormatSpec, resolve


def test_create_tiny_convert_and_info(tmp_path, assert_modules_equal):
    runner = CliRunner()
    folder = tmp_path / "tiny-sd2"
    result = runner.invoke(model_commands.model_group, ["create-tiny", str(folder), "--family", "sd2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert (folder / "model_index.json").is_file()

    single = tmp_path / "tiny-sd2.safetensors"
    result = runner.invoke(model_commands.model_group, ["convert", str(folder), str(single), "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    assert "sd2-v" in result.output

    result = runner.invoke(model_commands.model_group, ["info", str(single)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "family:          sd2-v (Stable Diffusion 2.x)" in out and "v_prediction" in out
    assert "float16" in out and "UNet2DConditionModel" in out
    assert "modelspec.architecture: stable-diffusion-v2-768-v" in out
    assert "AutoV3" in out and "sha256" in out

    back = tmp_path / "back"
    result = runner.invoke(
        model_commands.model_group, ["convert", str(single), str(back), "--to", "diffusers", "--dtype", "fp32"]
    )
    assert result.exit_code == 0, result.output
    a, b = load_model(back), load_model(single)
    for name, module in b.components().items():
        assert_modules_equal(module, a.components()[name])


def test_cli_error_is_sdcore_error(tmp_path):
    from sdcore.errors import SdcoreError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    result = CliRunner().invoke(model_commands.model_group, ["info", str(bad)])
    assert result.exit_code != 0
    assert isinstance(result.exception, SdcoreError)


def test_registrations():
    specs: list[ModelFormatSpec] = []
    model_formats.sdcore_register_model_formats(specs.append)
    assert [s.name for s in specs] == ["tiny", "toyworld", "diffusers", "single-file", "hub"]
    for spec in specs:
        assert callable(resolve(spec.sniff)) and callable(resolve(spec.reader))
        if spec.writer:
            assert callable(resolve(spec.writer))
    assert resolve("sdcore.builtin.model_formats:BUILTIN_FORMATS")[0].name == "tiny"
    cli = click.Group("root")
    model_commands.sdcore_register_commands(cli)
    assert cli.commands["model"] is model_commands.model_group


def test_convert_never_replaces_a_folder_or_file_that_is_not_a_model(tmp_path):
    """``model convert SRC DST`` writes a diffusers folder when DST has no .safetensors suffix. A DST folder
    holding other things (the user's models folder) or a file must be refused and left as it was; diffusers'
    ``save_pretrained`` and kohya's converter write into a folder and never delete what is in it. An earlier
    model folder is replaced with --overwrite; an empty folder holds nothing to lose."""
    from sdcore.errors import SdcoreError

    runner = CliRunner()
    src = tmp_path / "m.safetensors"
    assert runner.invoke(model_commands.model_group, ["create-tiny", str(src)]).exit_code == 0
    models = tmp_path / "models"
    models.mkdir()
    (models / "other.safetensors").write_bytes(b"precious")
    a_file = tmp_path / "out.ckpt"
    a_file.write_bytes(b"also precious")
    for dst in (models, a_file):
        result = runner.invoke(model_commands.model_group, ["convert", str(src), str(dst)])
        assert result.exit_code != 0 and isinstance(result.exception, SdcoreError), result.output
        assert str(dst) in str(result.exception) and "\n" not in str(result.exception)
    assert sorted(p.name for p in models.iterdir()) == ["other.safetensors"]
    assert (models / "other.safetensors").read_bytes() == b"precious" and a_file.read_bytes() == b"also precious"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-built folder left behind

    empty = tmp_path / "empty"
    empty.mkdir()
    for extra in ([], ["--overwrite"]):  # an empty folder, then the model folder written there the first time
        result = runner.invoke(model_commands.model_group, ["convert", str(src), str(empty), *extra])
        assert result.exit_code == 0, result.output
        dst = empty
        assert (dst / "model_index.json").is_file()


def test_info_on_a_tiny_model(tmp_path):
    """``model info`` reads every model as stored (``dtype="auto"``); ``tiny:<family>`` refused that name."""
    result = CliRunner().invoke(model_commands.model_group, ["info", "tiny:sd1"])
    assert result.exit_code == 0, result.output
    assert "family:          sd1" in result.output and "UNet2DConditionModel" in result.output
    assert load_model("tiny:sd1", dtype="auto").unet.dtype == load_model("tiny:sd1").unet.dtype

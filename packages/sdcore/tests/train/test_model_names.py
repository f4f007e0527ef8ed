"""``sdcore train --models-dir``: ``--model NAME`` and ``--vae NAME`` from A1111's or ComfyUI's models folder (and
ComfyUI's ``extra_model_paths.yaml``), resolved before the pre-flight reads a header and before any model loads,
with ``sdcore generate``'s lookup and messages."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from runtime_methods import ConvOutMethod
from sdcore.specs import MethodSpec
from sdcore.testing.contract import contract_options
from sdcore.train.cli import build_train_command
from sdcore.train.loop import train
from sdcore.train.preflight import PreflightError, resolve_model_names


def _command():
    return build_train_command(MethodSpec(name="convout", summary="test", method="runtime_methods:ConvOutMethod"))


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    """An A1111 ``models/`` with a tiny SD1 checkpoint in a subfolder of ``Stable-diffusion/`` and a VAE (another
    seed's, in diffusers' names) in ``VAE/``."""
    from safetensors.torch import save_file
    from sdcore.models.save import write_single_file
    from sdcore.models.tiny import create_tiny_bundle

    models = tmp_path_factory.mktemp("webui") / "models"
    model = models / "Stable-diffusion" / "sd15" / "tiny.safetensors"
    model.parent.mkdir(parents=True)
    write_single_file(create_tiny_bundle("sd1"), model)
    vae = create_tiny_bundle("sd1", seed=5).vae
    (models / "VAE").mkdir()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(models / "VAE" / "tiny-vae.safetensors"))
    return models


def test_a_run_loads_the_named_model_and_vae(webui, tmp_path, monkeypatch):
    import sdcore.train.loop as loop

    loaded = []
    real = loop.load_bundle

    def spy(options, pm=None):
        bundle = real(options, pm)
        loaded.append((options.model, options.vae, bundle))
        return bundle

    monkeypatch.setattr(loop, "load_bundle", spy)
    o = contract_options(ConvOutMethod, tmp_path, {"model": "tiny", "vae": "tiny-vae", "models_dir": str(webui),
                                                   "max_steps": 1})  # fmt: skip
    result = train(ConvOutMethod(o))
    assert result.steps == 1 and result.output.is_file()
    ((model, vae, bundle),) = loaded
    assert model == str(webui / "Stable-diffusion" / "sd15" / "tiny.safetensors")
    assert vae == str(webui / "VAE" / "tiny-vae.safetensors")
    from safetensors.torch import load_file

    expected = load_file(vae)
    assert all(torch.equal(bundle.vae.state_dict()[k].float(), expected[k].float()) for k in expected)


def test_dry_run_and_a_toml_config_take_names(webui, tmp_path):
    o = contract_options(ConvOutMethod, tmp_path)
    args = ["--data", o.data, "--output", str(tmp_path / "r.safetensors"), "--resolution", "64", "--dry-run"]
    result = CliRunner().invoke(_command(), ["--model", "sd15/tiny", "--models-dir", str(webui), *args])
    assert result.exit_code == 0, result.output
    assert f"model: {webui / 'Stable-diffusion' / 'sd15' / 'tiny.safetensors'} (sd1, single-file)" in result.output
    config = tmp_path / "run.toml"
    config.write_text(f'model = "tiny.safetensors"\nmodels_dir = "{webui}"\nvae = "tiny-vae"\n')
    result = CliRunner().invoke(_command(), ["--config", str(config), *args])
    assert result.exit_code == 0, result.output
    assert f"model: {webui / 'Stable-diffusion' / 'sd15' / 'tiny.safetensors'} (sd1, single-file)" in result.output


def test_a_comfyui_diffusers_folder_by_name(tmp_path):
    """ComfyUI's ``models/diffusers/sub/NAME`` (a folder holding model_index.json) is a --model name, as generate's."""
    from sdcore.models.tiny import create_tiny_bundle

    models = tmp_path / "ComfyUI" / "models"
    folder = models / "diffusers" / "sd15" / "tiny-folder"
    create_tiny_bundle("sd1").save(folder, format="diffusers")
    o = contract_options(ConvOutMethod, tmp_path)
    args = ["--data", o.data, "--output", str(tmp_path / "r.safetensors"), "--resolution", "64", "--dry-run"]
    for name in ("sd15/tiny-folder", "tiny-folder"):
        result = CliRunner().invoke(_command(), ["--model", name, "--models-dir", str(models), *args])
        assert result.exit_code == 0, result.output
        assert f"model: {folder} (sd1, diffusers)" in result.output


def test_names_not_found_stop_the_run_before_any_load_with_generates_messages(webui, tmp_path, no_model_load):
    o = contract_options(ConvOutMethod, tmp_path)
    args = ["--data", o.data, "--output", str(tmp_path / "r.safetensors"), "--models-dir", str(webui), "--dry-run"]
    result = CliRunner().invoke(_command(), ["--model", "tiyn", "--vae", "tiny_vae", *args])
    assert result.exit_code == 2, result.output
    checkpoints = ", ".join(
        str(webui / name) for name in ("checkpoints", "Stable-diffusion", "unet", "diffusion_models", "diffusers")
    )
    assert result.output.splitlines() == [
        f"Error: tiyn: no such model file or folder; nor is it a model name in {checkpoints} and their subfolders; "
        "models there: sd15/tiny.safetensors",
        f"Error: --vae tiny_vae: no such file or folder (the VAE), nor a file of that name in {webui / 'vae'}, "
        f"{webui / 'VAE'} and their subfolders; close names: tiny-vae",
    ]
    # the same from train() itself (Python), before the session loads anything
    bad = contract_options(ConvOutMethod, tmp_path, {"model": "tiyn", "models_dir": str(webui)})
    with pytest.raises(PreflightError) as info:
        train(ConvOutMethod(bad))
    assert info.value.problems[0].startswith("tiyn: no such model file or folder; nor is it a model name in ")


def test_without_models_dir_the_options_are_paths(tmp_path):
    o = contract_options(ConvOutMethod, tmp_path, {"model": "tiny", "vae": "tiny-vae"})
    resolve_model_names(o)
    assert (o.model, o.vae) == ("tiny", "tiny-vae")  # kohya's behaviour: the pre-flight says the path is missing
    o.extra_model_paths = (str(tmp_path / "extra_model_paths.yaml"),)
    with pytest.raises(PreflightError) as info:
        resolve_model_names(o)
    assert info.value.problems == [
        "--extra-model-paths needs --models-dir (names are looked up below it and in the file's folders)"
    ]


def test_the_yaml_checkpoints_folder(webui, tmp_path):
    """A ComfyUI install whose extra_model_paths.yaml shares the A1111 install: names of both."""
    comfy = tmp_path / "ComfyUI"
    (comfy / "models").mkdir(parents=True)
    (comfy / "extra_model_paths.yaml").write_text(
        f"a111:\n    base_path: {webui.parent}\n    checkpoints: models/Stable-diffusion\n    vae: models/VAE\n"
    )
    o = contract_options(ConvOutMethod, tmp_path, {"model": "tiny", "vae": "tiny-vae",
                                                   "models_dir": str(comfy / "models")})  # fmt: skip
    resolve_model_names(o)
    assert o.model == str(webui / "Stable-diffusion" / "sd15" / "tiny.safetensors")
    assert o.vae == str(webui / "VAE" / "tiny-vae.safetensors")


def test_a_run_by_names_records_the_files_and_resumes_by_names(webui, tmp_path, capsys):
    """The state records the files the names picked (as a run given their paths records them), and the same
    names with ``--resume latest`` pick them again: the resumed run continues as the uninterrupted run by paths
    does, loss for loss, with no "changed" warning."""
    import dataclasses
    import json

    model = str(webui / "Stable-diffusion" / "sd15" / "tiny.safetensors")
    vae = str(webui / "VAE" / "tiny-vae.safetensors")
    common = {"batch_size": 1, "max_steps": 4}
    straight = train(ConvOutMethod(contract_options(ConvOutMethod, tmp_path, {**common, "model": model, "vae": vae},
                                                    tag="straight")))  # fmt: skip
    names = {**common, "model": "sd15/tiny", "vae": "tiny-vae", "models_dir": str(webui)}
    first = contract_options(ConvOutMethod, tmp_path, {**names, "max_steps": 2}, tag="names")
    part = train(ConvOutMethod(first))
    (state,) = [p for p in part.state_dir.iterdir() if (p / "train_state.json").is_file()]
    recorded = json.loads((state / "train_state.json").read_text())["options"]
    assert (recorded["model"], recorded["vae"], recorded["models_dir"]) == (model, vae, str(webui))
    again = dataclasses.replace(first, model="sd15/tiny", vae="tiny-vae", max_steps=4, resume="latest")
    capsys.readouterr()
    resumed = train(ConvOutMethod(again))
    assert (again.model, again.vae) == (model, vae)
    assert len(straight.losses) == 4 and resumed.losses == straight.losses
    said = capsys.readouterr()
    assert f"resumed from {state} at step 2" in said.out + said.err
    assert "resuming with changed" not in said.out + said.err
